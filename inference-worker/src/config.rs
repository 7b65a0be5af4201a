//! Layered configuration: defaults < file (YAML or JSON) < environment < flags.
//!
//! The file may set any subset of fields; unknown fields are an error naming the field. The
//! environment layer is Sedna's worker contract, so Sedna-style pods configure our workers
//! unchanged: `MODEL_URL`, `HEM_NAME`, `HEM_PARAMETERS`, `MINING_MODE`, `BIG_MODEL_IP`,
//! `BIG_MODEL_PORT`, `BIG_MODEL_NAME` for the edge; `MODEL_URL`, `BIG_MODEL_BIND_IP`,
//! `BIG_MODEL_BIND_PORT` for the cloud, read on top of the generic layer of [`sedge_config`]
//! (`SEDGE_EDGE_WORKER_...`, `SEDGE_CLOUD_WORKER_...`). Flags are applied by the binary on top.

use serde::Serialize;

pub use sedge_config::{ConfigError, Loader, env, env_bool, env_parse, load, parse_bool};

/// Applies Sedna's edge-worker variables to an edge config.
pub fn apply_edge_env(c: &mut crate::edge::EdgeConfig) -> Result<(), ConfigError> {
    if let Some(v) = env(sedge_worker_contract::env::MODEL_URL) {
        c.model = v.into();
    }
    if let Some(v) = env(sedge_worker_contract::env::HEM_NAME) {
        c.hem_name = v;
    }
    if let Ok(v) = std::env::var(sedge_worker_contract::env::HEM_PARAMETERS) {
        c.hem_parameters = v;
    }
    // Sedge's: where hard examples go (a directory, or a Dataset's `.txt` index), as an
    // IncrementalLearningJob's inference worker is told.
    if let Some(v) = env(sedge_worker_contract::env::HARD_EXAMPLES_INDEX) {
        c.hard_examples_dir = Some(v.into());
    }
    if let Some(v) = env_parse::<usize>("SEDGE_HARD_EXAMPLES_PENDING_MAX")? {
        c.hard_examples_pending_max = v;
    }
    if let Some(v) = env_parse(sedge_worker_contract::env::MINING_MODE)? {
        c.mining_mode = v;
    }
    if let Some(v) = env_parse("BACKEND")? {
        c.backend.kind = v;
    }
    if let Some(v) = env_parse::<f64>("SEDGE_RATE")? {
        c.rate = Some(v);
    }
    if let Some(v) = env_bool("SEDGE_REPEAT")? {
        c.repeat = v;
    }
    if env_bool(crate::hot_update::ENABLED_ENV)? == Some(true) {
        let path = env(crate::hot_update::CONFIG_ENV).ok_or_else(|| ConfigError::Invalid {
            origin: format!("environment variable {}", crate::hot_update::ENABLED_ENV),
            message: format!("is true but {} is not set", crate::hot_update::CONFIG_ENV),
        })?;
        c.hot_update_config = Some(path.into());
    }
    if let Some(v) = env_parse::<f64>(crate::hot_update::PERIOD_ENV)? {
        if !(v > 0.0 && v.is_finite()) {
            return Err(ConfigError::Invalid {
                origin: format!("environment variable {}", crate::hot_update::PERIOD_ENV),
                message: format!("{v} is not a positive number of seconds"),
            });
        }
        c.hot_update_period_seconds = v;
    }
    if let Some(v) = env(sedge_worker_contract::env::BIG_MODEL_NAME) {
        c.offload.model = v;
    }
    match (
        env(sedge_worker_contract::env::BIG_MODEL_IP),
        env_parse::<u16>(sedge_worker_contract::env::BIG_MODEL_PORT)?,
    ) {
        (Some(ip), port) => c.offload.address = Some(format!("{ip}:{}", port.unwrap_or(5000))),
        (None, Some(port)) => {
            return Err(ConfigError::Invalid {
                origin: "environment variable BIG_MODEL_PORT".into(),
                message: format!("set to {port} but BIG_MODEL_IP is not set"),
            });
        }
        (None, None) => {}
    }
    Ok(())
}

/// Cloud worker settings as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// The cloud model (`MODEL_URL`).
    pub model: std::path::PathBuf,
    /// Inference engine.
    pub backend: crate::backend::BackendOptions,
    /// Address to serve REST and gRPC on (`BIG_MODEL_BIND_IP`:`BIG_MODEL_BIND_PORT`).
    pub listen: std::net::SocketAddr,
    /// Server settings.
    pub server: crate::server::ServerConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            model: "models/fashion-mnist/cloud-cnn.onnx".into(),
            backend: Default::default(),
            listen: ([0, 0, 0, 0], 5000).into(),
            server: Default::default(),
        }
    }
}

/// Applies Sedna's cloud-worker variables to a cloud config.
pub fn apply_cloud_env(c: &mut CloudConfig) -> Result<(), ConfigError> {
    if let Some(v) = env(sedge_worker_contract::env::MODEL_URL) {
        c.model = v.into();
    }
    if let Some(v) = env_parse("BACKEND")? {
        c.backend.kind = v;
    }
    if let Some(ip) = env_parse::<std::net::IpAddr>(sedge_worker_contract::env::BIG_MODEL_BIND_IP)?
    {
        c.listen.set_ip(ip);
    }
    if let Some(port) = env_parse::<u16>(sedge_worker_contract::env::BIG_MODEL_BIND_PORT)? {
        c.listen.set_port(port);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::EdgeConfig;

    #[test]
    fn file_overrides_defaults_and_unknown_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("edge.yaml");
        std::fs::write(&p, "batch: 8\noffload:\n  timeout_ms: 99\n").unwrap();
        let c: EdgeConfig = load(Some(&p)).unwrap();
        assert_eq!(
            (c.batch, c.offload.timeout_ms, c.offload.retries),
            (8, 99, 2)
        );
        std::fs::write(&p, "offload:\n  timout_ms: 99\n").unwrap();
        let err = load::<EdgeConfig>(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("unknown field `timout_ms`"), "{err}");
        std::fs::write(&p, "batch: many\n").unwrap();
        assert!(
            load::<EdgeConfig>(Some(&p))
                .unwrap_err()
                .to_string()
                .contains("edge.yaml")
        );
        assert!(matches!(
            load::<EdgeConfig>(Some(&dir.path().join("none.yaml"))),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&p, "").unwrap();
        assert_eq!(load::<EdgeConfig>(Some(&p)).unwrap(), EdgeConfig::default());
    }
}
