//! Hot model update, Sedna's contract: with `MODEL_HOT_UPDATE=true` the worker reads
//! `MODEL_HOT_UPDATE_CONFIG` (a `model_config.json`) every `MODEL_POLL_PERIOD_SECONDS`:
//!
//! ```json
//! {"model_config": {"model_path": "/model-hot-update/edge-cnn-round2.onnx", "model_update_time": "2026-12-01T10:00:00Z"}}
//! ```
//!
//! When `model_update_time` differs from the last one seen, the model at `model_path` (with its
//! `.json` config beside it; a relative path is relative to the config file) is loaded into a new
//! backend **off the inference path**, then put in service between two batches
//! ([`EdgePipeline::swap_model`]); requests are never dropped or paused for the load. A model that
//! does not load, or is fed differently, is refused and the model in service stays; the refusal
//! is remembered for that update time, so a broken file is not reloaded every poll. Unlike
//! Sedna's poller (kubeedge/sedna#381) this keeps working for every later update time.
//!
//! At start, an existing config is applied at the first poll, so a restarted worker serves the
//! latest deployed model, not the one in its pod spec.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backend::{self, BackendOptions};
use crate::model::Model;
use crate::pipeline::EdgePipeline;

pub use sedge_worker_contract::hot_update::{
    CONFIG_ENV, ENABLED_ENV, MAX_CONFIG_BYTES, PERIOD_ENV, write_config,
};
use sedge_worker_contract::hot_update::{Entry, File};

/// What one poll did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No config, or the same update time as before.
    Unchanged,
    /// A new model is in service.
    Swapped {
        /// The model file.
        model: PathBuf,
        /// The pipeline's model version after the swap.
        version: u64,
        /// Loading the new backend (off the inference path).
        load: Duration,
        /// Holding the swap lock (the only time inference could wait).
        pause: Duration,
    },
    /// The update was refused; the model in service stays.
    Refused {
        /// The update time refused.
        update_time: String,
        /// Why.
        message: String,
    },
}

/// Polls one `model_config.json`.
pub struct HotUpdater {
    config: PathBuf,
    backend: BackendOptions,
    last: Option<String>,
}

impl HotUpdater {
    /// Watches `config`; new models are loaded with `backend`.
    pub fn new(config: impl Into<PathBuf>, backend: BackendOptions) -> Self {
        HotUpdater {
            config: config.into(),
            backend,
            last: None,
        }
    }

    fn read(&self) -> Result<Option<Entry>, String> {
        let meta = match std::fs::metadata(&self.config) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.config.display())),
        };
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "{} is {} bytes, more than the {MAX_CONFIG_BYTES} a model config may have",
                self.config.display(),
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| format!("{}: {e}", self.config.display()))?;
        let f: File = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not {{\"model_config\": {{\"model_path\", \"model_update_time\"}}}}: {e}",
                self.config.display()
            )
        })?;
        Ok(Some(f.model_config))
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p.strip_prefix("file://").unwrap_or(p));
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.config.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Reads the config once and swaps the model when its update time changed.
    pub fn poll(&mut self, pipeline: &EdgePipeline) -> Outcome {
        let entry = match self.read() {
            Ok(None) => return Outcome::Unchanged,
            Ok(Some(e)) => e,
            Err(message) => {
                // An unreadable file has no update time; report it once per distinct error.
                let key = format!("unreadable: {message}");
                if self.last.as_deref() == Some(key.as_str()) {
                    return Outcome::Unchanged;
                }
                self.last = Some(key);
                return Outcome::Refused {
                    update_time: String::new(),
                    message,
                };
            }
        };
        if self.last.as_deref() == Some(entry.model_update_time.as_str()) {
            return Outcome::Unchanged;
        }
        self.last = Some(entry.model_update_time.clone());
        let path = self.resolve(&entry.model_path);
        let refuse = |message: String| Outcome::Refused {
            update_time: entry.model_update_time.clone(),
            message,
        };
        let start = Instant::now();
        let model = match Model::load(&path) {
            Ok(m) => m,
            Err(e) => return refuse(e.to_string()),
        };
        let backend = match backend::load(&model, &self.backend) {
            Ok(b) => b,
            Err(e) => return refuse(e.to_string()),
        };
        let load = start.elapsed();
        let t = Instant::now();
        match pipeline.swap_model(backend, &model.config) {
            Ok(version) => Outcome::Swapped {
                model: path,
                version,
                load,
                pause: t.elapsed(),
            },
            Err(e) => refuse(e),
        }
    }
}
