//! Inference backends: one trait, two engines.
//!
//! * [`tract`](crate::backend::TractBackend): pure Rust, no native library; the default and the
//!   fallback. The batch dimension is fixed per batch size before optimising, because a symbolic
//!   batch is many times slower.
//! * [`ort`](crate::backend::OrtBackend): ONNX Runtime, loaded at run time from
//!   `libonnxruntime.so` (the file the `onnxruntime` wheel on PyPI ships). 4-10x faster on
//!   convolutions.
//!
//! Backends are `Send + Sync` and take whole batches: `input` holds `batch` samples back to back,
//! the result holds `batch` rows of [`Backend::output_len`] values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::model::Model;

/// Why a backend could not load or run a model.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("ONNX Runtime is not available: {0}")]
    OrtUnavailable(String),
    /// The engine rejected the model file.
    #[error("cannot load model {path} with {backend}: {message}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// The engine.
        backend: BackendKind,
        /// The engine's reason.
        message: String,
    },
    /// The input does not hold `batch` samples of the model's size.
    #[error("input has {got} values, expected {expected} ({batch} samples of {per_sample})")]
    InputSize {
        /// Values given.
        got: usize,
        /// Values expected.
        expected: usize,
        /// Batch size.
        batch: usize,
        /// Values per sample.
        per_sample: usize,
    },
    /// The engine failed while running.
    #[error("{backend} inference failed: {message}")]
    Run {
        /// The engine.
        backend: BackendKind,
        /// The engine's reason.
        message: String,
    },
}

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract-onnx, pure Rust.
    #[default]
    Tract,
    /// ONNX Runtime through `ort`.
    Ort,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        })
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tract" => Ok(BackendKind::Tract),
            "ort" | "onnxruntime" => Ok(BackendKind::Ort),
            other => Err(format!(
                "unknown backend {other:?}; expected `tract` or `ort`"
            )),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendOptions {
    /// Which engine.
    pub kind: BackendKind,
    /// ONNX Runtime intra-op threads per session (ignored by tract, which is single-threaded).
    pub intra_threads: usize,
    /// Let ONNX Runtime's thread pool spin while idle. Off by default: spinning keeps a core busy,
    /// which an edge box with two cores cannot spare.
    pub spinning: bool,
    /// ONNX Runtime sessions to keep; concurrent calls use different sessions.
    pub sessions: usize,
    /// Path of `libonnxruntime.so`; when unset, see [`ort_library_path`].
    pub ort_library: Option<PathBuf>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            kind: BackendKind::Tract,
            intra_threads: 1,
            spinning: false,
            sessions: 1,
            ort_library: None,
        }
    }
}

/// A loaded model, ready to run batches.
pub trait Backend: Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> BackendKind;
    /// Output values per sample.
    fn output_len(&self) -> usize;
    /// Runs `batch` samples; returns `batch * output_len()` values.
    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError>;
}

/// Loads `model` with the engine `opts` names, and runs one sample through it so that a model
/// that cannot run fails here, at start-up, rather than on the first request.
pub fn load(model: &Model, opts: &BackendOptions) -> Result<Arc<dyn Backend>, BackendError> {
    let per_sample = model.config.sample_len();
    let backend: Arc<dyn Backend> = match opts.kind {
        BackendKind::Tract => Arc::new(TractBackend::load(model)?),
        BackendKind::Ort => Arc::new(OrtBackend::load(model, opts)?),
    };
    backend.run(&vec![0.0; per_sample], 1)?;
    Ok(backend)
}

fn check_input(input: &[f32], batch: usize, per_sample: usize) -> Result<(), BackendError> {
    let expected = batch * per_sample;
    if input.len() != expected || batch == 0 {
        return Err(BackendError::InputSize {
            got: input.len(),
            expected,
            batch,
            per_sample,
        });
    }
    Ok(())
}

fn load_err(model: &Model, backend: BackendKind, e: impl std::fmt::Display) -> BackendError {
    BackendError::Load {
        path: model.path.clone(),
        backend,
        message: format!("{e:#}"),
    }
}

/// tract-onnx backend. Keeps the decluttered model and compiles one optimised plan per batch size
/// on first use.
pub struct TractBackend {
    typed: tract_onnx::prelude::TypedModel,
    batch_symbol: Option<tract_onnx::prelude::Symbol>,
    plans: Mutex<HashMap<usize, Arc<tract_onnx::prelude::TypedRunnableModel>>>,
    sample_shape: Vec<usize>,
    output_len: AtomicUsize,
}

impl TractBackend {
    /// Parses and declutters the model.
    pub fn load(model: &Model) -> Result<Self, BackendError> {
        use tract_onnx::prelude::*;
        let err = |e: TractError| load_err(model, BackendKind::Tract, e);
        let typed = tract_onnx::onnx()
            .model_for_path(&model.path)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .map_err(err)?;
        let fact = typed.input_fact(0).map_err(err)?;
        let batch_symbol = fact
            .shape
            .iter()
            .next()
            .and_then(|d| d.symbols().into_iter().next());
        Ok(TractBackend {
            typed,
            batch_symbol,
            plans: Mutex::new(HashMap::new()),
            sample_shape: model.config.input.shape.clone(),
            output_len: AtomicUsize::new(0),
        })
    }

    fn plan(
        &self,
        batch: usize,
    ) -> Result<Arc<tract_onnx::prelude::TypedRunnableModel>, BackendError> {
        use tract_onnx::prelude::*;
        if let Some(plan) = self.plans.lock().expect("plan cache poisoned").get(&batch) {
            return Ok(plan.clone());
        }
        let run_err = |e: TractError| BackendError::Run {
            backend: BackendKind::Tract,
            message: format!("cannot compile a plan for batch {batch}: {e:#}"),
        };
        let model = match &self.batch_symbol {
            Some(sym) => self
                .typed
                .set_symbols(&HashMap::from([(sym.clone(), TDim::from(batch as i64))]))
                .map_err(run_err)?,
            None => self.typed.clone(),
        };
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(run_err)?;
        self.plans
            .lock()
            .expect("plan cache poisoned")
            .insert(batch, plan.clone());
        Ok(plan)
    }
}

impl Backend for TractBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tract
    }

    fn output_len(&self) -> usize {
        self.output_len.load(Ordering::Relaxed)
    }

    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        use tract_onnx::prelude::*;
        check_input(input, batch, self.sample_shape.iter().product())?;
        let run_err = |e: TractError| BackendError::Run {
            backend: BackendKind::Tract,
            message: format!("{e:#}"),
        };
        let mut shape = vec![batch];
        shape.extend(&self.sample_shape);
        let tensor = Tensor::from_shape(&shape, input).map_err(run_err)?;
        let outputs = self
            .plan(batch)?
            .run(tvec!(tensor.into()))
            .map_err(run_err)?;
        let view = outputs[0].to_plain_array_view::<f32>().map_err(run_err)?;
        let values: Vec<f32> = view.iter().copied().collect();
        self.output_len
            .store(values.len() / batch, Ordering::Relaxed);
        Ok(values)
    }
}

/// The one ONNX Runtime environment of this process (ONNX Runtime allows only one).
static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where to find `libonnxruntime.so`, in order: `explicit`, `$ORT_DYLIB_PATH`, beside the running
/// executable, then `target/onnxruntime/` in any parent of the executable (where `make ort` puts the
/// library it unpacks from the `onnxruntime` wheel).
pub fn ort_library_path(explicit: Option<&Path>) -> Result<PathBuf, BackendError> {
    let check = |p: PathBuf, from: &str| {
        if p.is_file() {
            Ok(p)
        } else {
            Err(BackendError::OrtUnavailable(format!(
                "{from} names {}, which is not a file",
                p.display()
            )))
        }
    };
    if let Some(p) = explicit {
        return check(p.to_path_buf(), "the configured ort_library");
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return check(PathBuf::from(p), "ORT_DYLIB_PATH");
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            for candidate in [
                dir.join("libonnxruntime.so"),
                dir.join("target/onnxruntime/libonnxruntime.so"),
            ] {
                if candidate.is_file() {
                    return Ok(candidate);
                }
            }
        }
    }
    Err(BackendError::OrtUnavailable(
        "libonnxruntime.so not found: set ORT_DYLIB_PATH, or run `make ort` to unpack it from the onnxruntime wheel into target/onnxruntime/".into(),
    ))
}

fn ort_environment(opts: &BackendOptions) -> Result<ort::environment::Environment, BackendError> {
    let env = ORT_ENV.get_or_init(|| {
        let path = ort_library_path(opts.ort_library.as_deref()).map_err(|e| e.to_string())?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        builder
            .with_name("sedge")
            .build()
            .map_err(|e| format!("cannot create an environment from {}: {e}", path.display()))
    });
    match env {
        Ok(env) => Ok(env.clone()),
        Err(e) => Err(BackendError::OrtUnavailable(e.clone())),
    }
}

/// ONNX Runtime backend: a small pool of sessions (a session runs one call at a time).
pub struct OrtBackend {
    sessions: Vec<Mutex<ort::session::Session>>,
    next: AtomicUsize,
    input_name: String,
    output_name: String,
    sample_shape: Vec<usize>,
    output_len: AtomicUsize,
}

impl OrtBackend {
    /// Loads the library (once per process) and creates `opts.sessions` sessions.
    pub fn load(model: &Model, opts: &BackendOptions) -> Result<Self, BackendError> {
        let env = ort_environment(opts)?;
        let err = |e: ort::Error| load_err(model, BackendKind::Ort, e);
        let mut sessions = Vec::new();
        for _ in 0..opts.sessions.max(1) {
            let session = ort::session::Session::builder(&env)
                .map_err(err)?
                .with_intra_threads(opts.intra_threads.max(1))
                .map_err(|e| err(e.into()))?
                .with_intra_op_spinning(opts.spinning)
                .map_err(|e| err(e.into()))?
                .with_inter_op_spinning(opts.spinning)
                .map_err(|e| err(e.into()))?
                .commit_from_file(&model.path)
                .map_err(err)?;
            sessions.push(Mutex::new(session));
        }
        let first = sessions[0].lock().expect("fresh session");
        let has = |names: Vec<&str>, wanted: &str, what: &str| {
            if names.contains(&wanted) {
                Ok(())
            } else {
                Err(load_err(
                    model,
                    BackendKind::Ort,
                    format!("the model has {what}s {names:?}, the model config names {wanted:?}"),
                ))
            }
        };
        has(
            first.inputs().iter().map(|o| o.name()).collect(),
            &model.config.input.name,
            "input",
        )?;
        has(
            first.outputs().iter().map(|o| o.name()).collect(),
            &model.config.output.name,
            "output",
        )?;
        drop(first);
        Ok(OrtBackend {
            sessions,
            next: AtomicUsize::new(0),
            input_name: model.config.input.name.clone(),
            output_name: model.config.output.name.clone(),
            sample_shape: model.config.input.shape.clone(),
            output_len: AtomicUsize::new(0),
        })
    }
}

impl Backend for OrtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ort
    }

    fn output_len(&self) -> usize {
        self.output_len.load(Ordering::Relaxed)
    }

    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        check_input(input, batch, self.sample_shape.iter().product())?;
        let run_err = |e: ort::Error| BackendError::Run {
            backend: BackendKind::Ort,
            message: e.to_string(),
        };
        let mut shape = vec![batch as i64];
        shape.extend(self.sample_shape.iter().map(|&d| d as i64));
        let tensor = ort::value::TensorRef::from_array_view((shape, input)).map_err(run_err)?;
        // Take a free session if there is one, else wait for the next in turn.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.sessions.len();
        let mut guard = (0..n)
            .find_map(|i| self.sessions[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.sessions[start % n]
                    .lock()
                    .expect("ort session poisoned")
            });
        let outputs = guard
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(run_err)?;
        let (_, values) = outputs[self.output_name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(run_err)?;
        let values = values.to_vec();
        self.output_len
            .store(values.len() / batch, Ordering::Relaxed);
        Ok(values)
    }
}
