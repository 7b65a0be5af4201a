//! Sedna's hot-update contract: with `MODEL_HOT_UPDATE=true` the worker polls the
//! `model_config.json` named by `MODEL_HOT_UPDATE_CONFIG` every `MODEL_POLL_PERIOD_SECONDS`;
//! the local controller writes it ([`write_config`]):
//!
//! ```json
//! {"model_config": {"model_path": "/model-hot-update/edge-cnn-round2.onnx", "model_update_time": "2026-12-01T10:00:00Z"}}
//! ```

use std::path::Path;

use serde::Deserialize;

/// `MODEL_HOT_UPDATE`: `true` turns polling on.
pub const ENABLED_ENV: &str = "MODEL_HOT_UPDATE";
/// `MODEL_POLL_PERIOD_SECONDS`.
pub const PERIOD_ENV: &str = "MODEL_POLL_PERIOD_SECONDS";
/// `MODEL_HOT_UPDATE_CONFIG`: the path of `model_config.json`.
pub const CONFIG_ENV: &str = "MODEL_HOT_UPDATE_CONFIG";
/// The largest config file read (it is a few hundred bytes; anything bigger is refused).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// The file.
#[derive(Debug, Deserialize)]
pub struct File {
    /// Its one entry.
    pub model_config: Entry,
}

/// Which model, since when.
#[derive(Debug, Deserialize)]
pub struct Entry {
    /// The model file (relative to the config file when not absolute).
    pub model_path: String,
    /// Changes when a new model is to be put in service.
    pub model_update_time: String,
}

/// Writes `model_config.json` the way Sedna's local controller does (to a temporary name, then
/// renamed, so the worker never reads half a file).
pub fn write_config(config: &Path, model_path: &Path, update_time: &str) -> std::io::Result<()> {
    let body = serde_json::json!({
        "model_config": {
            "model_path": model_path.display().to_string(),
            "model_update_time": update_time,
        }
    });
    sedge_datasets::export::write_atomic(config, &serde_json::to_vec_pretty(&body).expect("json"))
}
