//! Layered configuration: defaults < file (YAML or JSON) < environment < flags.
//!
//! The file may set any subset of fields; unknown fields are an error naming the field. The
//! environment layer is Sedna's worker contract, so Sedna-style pods configure our workers
//! unchanged: `MODEL_URL`, `HEM_NAME`, `HEM_PARAMETERS`, `MINING_MODE`, `BIG_MODEL_IP`,
//! `BIG_MODEL_PORT`, `BIG_MODEL_NAME` for the edge; `MODEL_URL`, `BIG_MODEL_BIND_IP`,
//! `BIG_MODEL_BIND_PORT` for the cloud. Flags are applied by the binary on top.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file or an environment variable holds a value of the wrong shape.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file or variable.
        origin: String,
        /// What was wrong.
        message: String,
    },
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Defaults, then the file's fields on top.
pub fn load<T: Default + Serialize + DeserializeOwned>(
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    let mut value = serde_json::to_value(T::default()).expect("defaults serialise");
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        let over: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        if !over.is_null() {
            merge(&mut value, over);
        }
        return serde_json::from_value(value).map_err(|e| ConfigError::Invalid {
            origin: path.display().to_string(),
            message: e.to_string(),
        });
    }
    Ok(serde_json::from_value(value).expect("defaults deserialise"))
}

/// Reads an environment variable, treating an empty value as unset.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Reads a boolean environment variable: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (any
/// case); anything else is an error naming the variable and what it accepts.
pub fn env_bool(name: &str) -> Result<Option<bool>, ConfigError> {
    env(name).map(|v| parse_bool(name, &v)).transpose()
}

/// The value of the boolean variable `name` (see [`env_bool`]).
pub fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            origin: format!("environment variable {name}={v:?}"),
            message: "not a boolean; use true or false (also 1/0, yes/no, on/off)".into(),
        }),
    }
}

/// Reads and parses an environment variable, naming it in the error.
pub fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    env(name)
        .map(|v| {
            v.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
                origin: format!("environment variable {name}={v:?}"),
                message: e.to_string(),
            })
        })
        .transpose()
}

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

    #[test]
    fn booleans_in_the_environment_are_strict() {
        let name = "SEDGE_REPEAT";
        for (v, want) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("off", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(name, v).unwrap(), want, "{v}");
        }
        // Taken as false before: now an error naming the variable and what it accepts.
        let e = parse_bool(name, "1000").unwrap_err().to_string();
        assert!(
            e.contains(name) && e.contains("\"1000\"") && e.contains("true or false"),
            "{e}"
        );
    }
}
