//! Paradigms: how a test case's modules are run over the test set.
//!
//! A paradigm is one file implementing [`Paradigm`], listed once in [`PARADIGMS`]; the runner knows
//! nothing else about it.

mod incremental_learning;
mod joint_inference;
mod single_task;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use sedge_inference_worker::backend::{BackendKind, BackendOptions};
use sedge_inference_worker::edge::{EdgeConfig, EdgeWorker};
use sedge_inference_worker::mining::HardExampleMining;
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::source::Source;

use crate::expand::{Module, TestCase, expand, value_text};
use crate::job::Algorithm;
use crate::metrics::Outcome;

pub use incremental_learning::{IncrementalLearning, IncrementalSetting};
pub use joint_inference::JointInference;
pub use single_task::SingleTaskLearning;

/// What a test case runs with.
pub struct CaseContext {
    /// The test samples.
    pub data: Source,
    /// Stop after this many samples.
    pub limit: Option<usize>,
    /// The case's output directory (exists).
    pub output_dir: PathBuf,
    /// The testenv's (or job's) `hard_example_mining_mode`, if set.
    pub mining_mode: Option<MiningMode>,
    /// Cloud-only accuracies, computed once per (model, engine) and shared by all cases.
    pub cloud_only: Arc<CloudOnlyCache>,
    /// The testenv's links, by name.
    pub links: Arc<std::collections::BTreeMap<String, crate::link::LinkProfile>>,
    /// Test samples done so far, across all cases of the run (the progress bar).
    pub progress: Arc<std::sync::atomic::AtomicU64>,
    /// Incremental learning's rounds, stream and deploy rule, when the testenv has them.
    pub incremental: Option<Arc<IncrementalSetting>>,
}

/// A way of running modules over a test set.
pub trait Paradigm: Send + Sync {
    /// Ianvs's `paradigm_type`.
    fn name(&self) -> &'static str;
    /// Module types that must be present.
    fn required(&self) -> &'static [&'static str];
    /// Module types that may be present besides the required ones.
    fn optional(&self) -> &'static [&'static str] {
        &[]
    }
    /// Runs one test case.
    fn run<'a>(
        &'a self,
        case: &'a TestCase,
        ctx: &'a CaseContext,
    ) -> BoxFuture<'a, Result<Outcome, String>>;
}

/// Every paradigm this runner has.
pub static PARADIGMS: &[&dyn Paradigm] =
    &[&SingleTaskLearning, &JointInference, &IncrementalLearning];

/// Finds a paradigm by its `paradigm_type`.
pub fn lookup(name: &str) -> Result<&'static dyn Paradigm, String> {
    PARADIGMS
        .iter()
        .copied()
        .find(|p| p.name() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = PARADIGMS.iter().map(|p| p.name()).collect();
            format!(
                "paradigm_type {name:?} is not supported; supported: {}",
                known.join(", ")
            )
        })
}

/// Checks an algorithm before anything runs: the paradigm exists, module types fit it, models
/// have files, and every mining rule and parameter combination is valid.
pub fn check(algo: &Algorithm) -> Result<(), String> {
    let paradigm = lookup(&algo.paradigm_type)?;
    if let Some(d) = &algo.incremental_learning_data_setting {
        if !(d.train_ratio > 0.0 && d.train_ratio < 1.0) {
            return Err(format!(
                "incremental_learning_data_setting.train_ratio is {}; expected a share between 0 and 1 (0.8: 80% mined, 20% to evaluate)",
                d.train_ratio
            ));
        }
        if let Some(m) = d.splitting_method.as_deref()
            && m != "default"
        {
            return Err(format!(
                "incremental_learning_data_setting.splitting_method {m:?} is not supported; only default (in order)"
            ));
        }
    }
    for m in &algo.modules {
        if !paradigm.required().contains(&m.kind.as_str())
            && !paradigm.optional().contains(&m.kind.as_str())
        {
            return Err(format!(
                "module type {:?} does not belong to {}; it takes {}",
                m.kind,
                paradigm.name(),
                paradigm
                    .required()
                    .iter()
                    .chain(paradigm.optional())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if m.kind == "hard_example_mining" && m.url.is_some() {
            return Err(format!(
                "hard_example_mining {:?} has a url: Python modules are not supported; use a built-in rule by name",
                m.name
            ));
        }
        if m.kind.ends_with("model")
            && m.url.is_none()
            && !(m.kind == "basemodel" && algo.initial_model_url.is_some())
        {
            return Err(format!(
                "{} {:?} needs a url: the .onnx model file",
                m.kind, m.name
            ));
        }
    }
    for required in paradigm.required() {
        if !algo.modules.iter().any(|m| m.kind == *required) {
            return Err(format!("{} needs a {required} module", paradigm.name()));
        }
    }
    for case in expand("check", algo) {
        for module in case.modules.values() {
            if module.kind == "hard_example_mining" {
                HardExampleMining::from_env_strings(&module.name, &hem_parameters(module))
                    .map_err(|e| e.to_string())?;
            } else {
                backend_options(module)?;
            }
        }
    }
    Ok(())
}

/// A mining module's hyperparameters as Sedna's `HEM_PARAMETERS` JSON.
pub fn hem_parameters(module: &Module) -> String {
    let list: Vec<serde_json::Value> = module
        .hyperparameters
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": value_text(v)}))
        .collect();
    serde_json::Value::Array(list).to_string()
}

/// Engine settings of a model module: hyperparameters `backend` (tract, the default, or ort) and
/// `intra_threads`.
pub fn backend_options(module: &Module) -> Result<BackendOptions, String> {
    let mut opts = BackendOptions::default();
    for (k, v) in &module.hyperparameters {
        let text = value_text(v);
        match k.as_str() {
            // How the edge reaches a cloud model: read by the joint-inference paradigm.
            "link" if module.kind == "cloudmodel" => {}
            "protocol" if module.kind == "cloudmodel" => {
                text.parse::<sedge_inference_worker::client::OffloadProtocol>()
                    .map_err(|e| format!("{} protocol: {e}", module.name))?;
            }
            // Training, read by incrementallearning.
            "epochs" | "learning_rate" | "replay_ratio" if module.kind == "basemodel" => {
                text.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| {
                        format!("{} {k} {text:?} is not a number of 0 or more", module.name)
                    })?;
            }
            "backend" => opts.kind = text.parse::<BackendKind>()?,
            "intra_threads" => {
                opts.intra_threads = text.parse().map_err(|_| {
                    format!(
                        "{} intra_threads {text:?} is not a whole number",
                        module.name
                    )
                })?
            }
            "batch_size" => {
                text.parse::<usize>()
                    .ok()
                    .filter(|b| *b > 0)
                    .ok_or_else(|| {
                        format!(
                            "{} batch_size {text:?} is not a positive whole number",
                            module.name
                        )
                    })?;
            }
            other => {
                return Err(format!(
                    "model module {:?} has no hyperparameter {other:?}; it takes backend, intra_threads, batch_size{}",
                    module.name,
                    match module.kind.as_str() {
                        "cloudmodel" => ", protocol (grpc, sedna-json)",
                        "basemodel" =>
                            ", epochs, learning_rate, replay_ratio (incremental learning)",
                        _ => "",
                    }
                ));
            }
        }
    }
    Ok(opts)
}

/// An edge-worker config that runs `module`'s model with its engine and batch size and keeps every
/// answer on the edge; callers set a mining rule and a cloud where they need them.
fn model_config(module: &Module) -> Result<EdgeConfig, String> {
    Ok(EdgeConfig {
        model: module
            .url
            .clone()
            .ok_or_else(|| format!("{} {:?} has no url", module.kind, module.name))?,
        backend: backend_options(module)?,
        batch: batch_size(module),
        hem_name: "EdgeOnly".into(),
        hem_parameters: String::new(),
        ..Default::default()
    })
}

fn batch_size(module: &Module) -> usize {
    module
        .param("batch_size")
        .and_then(|b| b.parse().ok())
        .unwrap_or(1)
}

/// Runs the edge worker for a case, writing one JSON line per sample to `<output>/<file>`, and
/// turns its results into an [`Outcome`]. The case's own pass over the test set (not a
/// baseline's) counts its samples into the run's progress.
pub async fn run_edge(
    config: EdgeConfig,
    ctx: &CaseContext,
    file: &str,
) -> Result<Outcome, String> {
    run_edge_counted(config, ctx, file, true).await
}

async fn run_edge_counted(
    config: EdgeConfig,
    ctx: &CaseContext,
    file: &str,
    count: bool,
) -> Result<Outcome, String> {
    let out = ctx.output_dir.join(file);
    let config = EdgeConfig {
        output: Some(out.clone()),
        limit: ctx.limit,
        ..config
    };
    let worker = EdgeWorker::start(config).map_err(|e| e.to_string())?;
    let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = count.then(|| {
        let (metrics, counted, progress) = (
            worker.metrics.clone(),
            counted.clone(),
            ctx.progress.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                add_progress(&metrics, &counted, &progress);
            }
        })
    });
    let summary = worker.run(&ctx.data, std::future::pending()).await;
    if let Some(t) = ticker {
        t.abort();
        add_progress(&worker.metrics, &counted, &ctx.progress);
    }
    let summary = summary.map_err(|e| e.to_string())?;
    let (truth, predicted) = read_results(&out)?;
    Ok(Outcome {
        truth,
        predicted,
        inferred: summary.inference_number,
        offloaded: summary.hard_example_number,
        latency_p50_ms: summary.p50_ms,
        latency_p99_ms: summary.p99_ms,
        throughput: summary.throughput,
        bytes_offloaded: summary.bytes_sent,
        cloud_only_accuracy: None,
        rounds: Vec::new(),
    })
}

/// Moves what the worker inferred since the last look into the run's count.
fn add_progress(
    metrics: &sedge_inference_worker::metrics::EdgeMetrics,
    counted: &std::sync::atomic::AtomicU64,
    progress: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    let now = metrics.inference_number.get();
    let before = counted.swap(now, Ordering::SeqCst);
    progress.fetch_add(now.saturating_sub(before), Ordering::SeqCst);
}

fn read_results(path: &Path) -> Result<(Vec<u32>, Vec<Option<u32>>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut truth = Vec::new();
    let mut predicted = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(t) = v["truth"].as_u64() {
            truth.push(t as u32);
            predicted.push(v["final"].as_u64().map(|p| p as u32));
        }
    }
    Ok((truth, predicted))
}

/// Accuracy of cloud models alone on the test set, computed once per (model file, engine).
#[derive(Default)]
pub struct CloudOnlyCache {
    known: tokio::sync::Mutex<HashMap<(PathBuf, BackendKind), f64>>,
}

impl CloudOnlyCache {
    /// The cloud model's accuracy on its own, running it locally over the same samples.
    pub async fn accuracy(&self, module: &Module, ctx: &CaseContext) -> Result<f64, String> {
        let backend = backend_options(module)?;
        let model = module.url.clone().ok_or("cloud model has no url")?;
        let mut known = self.known.lock().await;
        if let Some(a) = known.get(&(model.clone(), backend.kind)) {
            return Ok(*a);
        }
        let config = EdgeConfig {
            batch: 32,
            ..model_config(module)?
        };
        let outcome = run_edge_counted(config, ctx, "cloud-only.jsonl", false).await?;
        let acc = crate::metrics::accuracy(&outcome.truth, &outcome.predicted)
            .ok_or("the test set has no labels")?;
        known.insert((model, backend.kind), acc);
        Ok(acc)
    }
}
