//! Layered configuration for every Sedge daemon: defaults < file < environment < flags.
//!
//! Each daemon has one serde struct whose `Default` is the default config (printed by
//! `--print-default-config`). [`Loader::load`] builds it in four layers:
//!
//! 1. the defaults;
//! 2. the file (YAML or JSON; any subset of fields; an unknown field is an error naming it);
//! 3. the environment: every field, however deep, is read from `SEDGE_<DAEMON>_<PATH>`, the
//!    path's segments joined by `_` and upper-cased (`hub.listen_quic` of the cloud core is
//!    `SEDGE_CLOUDCORE_HUB_LISTEN_QUIC`). The value is read as the field's type: numbers,
//!    booleans (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`), lists as `a,b,c` or a JSON
//!    list, maps as a JSON object; an empty value counts as unset. A variable with the daemon's
//!    prefix that names no field is logged as a warning, so a typo does not pass in silence;
//! 4. the flags: a `Serialize` struct whose set fields are named by their config path
//!    (`#[serde(rename = "hub.listen")]`), unset ones skipped.
//!
//! An error names the layer and the field (the file, the variable, or the flag's path) and says
//! what was wrong. Workers layer Sedna's own environment contract on top of the generic one
//! through [`Loader::load_with`].

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

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
    /// The file, an environment variable or a flag holds a value of the wrong shape.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file, variable or flag.
        origin: String,
        /// What was wrong.
        message: String,
    },
}

/// Builds one daemon's config from its four layers.
#[derive(Debug, Clone)]
pub struct Loader<'a> {
    prefix: String,
    file: Option<&'a Path>,
}

impl<'a> Loader<'a> {
    /// A loader for `daemon` (e.g. `CLOUDCORE`): its variables are `SEDGE_<DAEMON>_...`.
    pub fn new(daemon: &str) -> Self {
        Loader {
            prefix: format!("SEDGE_{}_", daemon.to_ascii_uppercase().replace('-', "_")),
            file: None,
        }
    }

    /// Reads this file (YAML or JSON) as the second layer, if given.
    pub fn file(mut self, file: Option<&'a Path>) -> Self {
        self.file = file;
        self
    }

    /// The variable prefix, e.g. `SEDGE_CLOUDCORE_`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Defaults < file < environment < `flags`.
    pub fn load<T: Default + Serialize + DeserializeOwned>(
        &self,
        flags: &impl Serialize,
    ) -> Result<T, ConfigError> {
        self.load_with(flags, |_| Ok(()))
    }

    /// As [`Loader::load`], with `more_env` applied after the generic environment layer and
    /// before the flags (a worker's Sedna variables).
    pub fn load_with<T: Default + Serialize + DeserializeOwned>(
        &self,
        flags: &impl Serialize,
        more_env: impl FnOnce(&mut T) -> Result<(), ConfigError>,
    ) -> Result<T, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(&self.prefix))
            .collect();
        self.load_from(&vars, flags, more_env)
    }

    /// [`Loader::load_with`] with the environment given as a list (tests use this).
    pub fn load_from<T: Default + Serialize + DeserializeOwned>(
        &self,
        vars: &[(String, String)],
        flags: &impl Serialize,
        more_env: impl FnOnce(&mut T) -> Result<(), ConfigError>,
    ) -> Result<T, ConfigError> {
        let defaults = to_value(&T::default(), "the defaults")?;
        let mut value = defaults.clone();
        if let Some(path) = self.file {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: origin.clone(),
                source: e,
            })?;
            let over: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
            if !over.is_null() {
                merge(&mut value, over);
            }
            from_value::<T>(&value, |p| format!("{origin} (field {p})"))?;
        }
        let leaves = self.leaves(&defaults);
        let mut set = Vec::new();
        for (name, v) in vars {
            if !name.starts_with(&self.prefix) || v.trim().is_empty() {
                continue;
            }
            match leaves.iter().find(|l| &l.var == name) {
                Some(leaf) => {
                    let parsed = parse_env(name, v, &leaf.default)?;
                    set_path(&mut value, &leaf.path, parsed);
                    set.push(leaf);
                }
                None => tracing::warn!(
                    variable = %name,
                    "names no setting (see --print-default-config); ignored"
                ),
            }
        }
        let mut config = from_value::<T>(&value, |p| {
            let var = set
                .iter()
                .filter(|l| p.starts_with(&l.path.join(".")))
                .max_by_key(|l| l.path.join(".").len())
                .map(|l| l.var.clone())
                .unwrap_or_else(|| format!("{}{}", self.prefix, p.to_ascii_uppercase()));
            format!("environment variable {var}")
        })?;
        more_env(&mut config)?;
        let flags = to_value(flags, "the flags")?;
        let Value::Object(flags) = flags else {
            return Ok(config);
        };
        if flags.is_empty() {
            return Ok(config);
        }
        let mut value = to_value(&config, "the config")?;
        for (path, v) in flags {
            if !v.is_null() {
                let path: Vec<String> = path.split('.').map(str::to_owned).collect();
                set_path(&mut value, &path, v);
            }
        }
        config = from_value::<T>(&value, |p| format!("flag setting {p}"))?;
        Ok(config)
    }

    /// Every environment variable this daemon reads, with the field's path, in config order.
    pub fn variables<T: Default + Serialize>(&self) -> Vec<(String, String)> {
        let defaults = serde_json::to_value(T::default()).unwrap_or(Value::Null);
        self.leaves(&defaults)
            .into_iter()
            .map(|l| (l.var, l.path.join(".")))
            .collect()
    }

    fn leaves(&self, defaults: &Value) -> Vec<Leaf> {
        let mut out = Vec::new();
        collect(defaults, &mut Vec::new(), &self.prefix, &mut out);
        out
    }
}

/// One settable field: where it is, its variable, and its default (which types the variable).
#[derive(Debug)]
struct Leaf {
    path: Vec<String>,
    var: String,
    default: Value,
}

fn collect(v: &Value, path: &mut Vec<String>, prefix: &str, out: &mut Vec<Leaf>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(k.clone());
                collect(child, path, prefix, out);
                path.pop();
            }
        }
        _ if !path.is_empty() => out.push(Leaf {
            path: path.clone(),
            var: format!(
                "{prefix}{}",
                path.join("_").to_ascii_uppercase().replace('-', "_")
            ),
            default: v.clone(),
        }),
        _ => {}
    }
}

fn invalid(name: &str, v: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: format!("environment variable {name}={v:?}"),
        message: message.into(),
    }
}

/// `v` read as the type of `default`.
fn parse_env(name: &str, v: &str, default: &Value) -> Result<Value, ConfigError> {
    let t = v.trim();
    Ok(match default {
        Value::String(_) => Value::String(v.to_owned()),
        Value::Bool(_) => Value::Bool(parse_bool(name, v)?),
        Value::Number(n) => {
            let number = if n.is_f64() {
                t.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .and_then(serde_json::Number::from_f64)
            } else if let Ok(i) = t.parse::<u64>() {
                Some(i.into())
            } else {
                t.parse::<i64>().ok().map(Into::into)
            };
            Value::Number(number.ok_or_else(|| {
                invalid(
                    name,
                    v,
                    if n.is_f64() {
                        "not a number"
                    } else {
                        "not a whole number"
                    },
                )
            })?)
        }
        Value::Array(items) => {
            if t.starts_with('[') {
                serde_json::from_str(t)
                    .map_err(|e| invalid(name, v, format!("not a JSON list: {e}")))?
            } else {
                let element = items
                    .first()
                    .cloned()
                    .unwrap_or(Value::String(String::new()));
                Value::Array(
                    t.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| parse_env(name, s, &element))
                        .collect::<Result<_, _>>()?,
                )
            }
        }
        Value::Object(_) => {
            let parsed: Value = serde_json::from_str(t)
                .map_err(|e| invalid(name, v, format!("not a JSON object: {e}")))?;
            if !parsed.is_object() {
                return Err(invalid(name, v, "not a JSON object"));
            }
            parsed
        }
        // An optional field without a default: a JSON number, boolean, list or object as
        // such, anything else as text.
        Value::Null => match serde_json::from_str::<Value>(t) {
            Ok(j) if !j.is_string() && !j.is_null() => j,
            _ => Value::String(v.to_owned()),
        },
    })
}

fn to_value(v: &impl Serialize, what: &str) -> Result<Value, ConfigError> {
    serde_json::to_value(v).map_err(|e| ConfigError::Invalid {
        origin: what.into(),
        message: e.to_string(),
    })
}

/// Deserialises `value`, naming the origin of the field that was wrong.
fn from_value<T: DeserializeOwned>(
    value: &Value,
    origin: impl Fn(&str) -> String,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Invalid {
            origin: origin(&path),
            message: e.into_inner().to_string(),
        }
    })
}

fn set_path(root: &mut Value, path: &[String], v: Value) {
    let mut slot = root;
    for seg in path {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot = slot
            .as_object_mut()
            .expect("made an object above")
            .entry(seg.clone())
            .or_insert(Value::Null);
    }
    *slot = v;
}

/// `over` on top of `base`, objects field by field, anything else replaced.
pub fn merge(base: &mut Value, over: Value) {
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

/// Defaults, then the file's fields on top (no environment, no flags).
pub fn load<T: Default + Serialize + DeserializeOwned>(
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    Loader::new("").file(file).load_from(&[], &(), |_| Ok(()))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Hub {
        listen: String,
        listen_quic: String,
        advertise: Vec<String>,
        ports: Vec<u16>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Daemon {
        hub: Hub,
        workers: usize,
        ratio: f64,
        verbose: bool,
        cert: Option<String>,
        timeout_ms: Option<u64>,
        labels: BTreeMap<String, String>,
    }

    impl Default for Daemon {
        fn default() -> Self {
            Daemon {
                hub: Hub {
                    listen: "0.0.0.0:10000".into(),
                    listen_quic: "0.0.0.0:10001".into(),
                    advertise: vec![],
                    ports: vec![1],
                },
                workers: 4,
                ratio: 0.5,
                verbose: false,
                cert: None,
                timeout_ms: None,
                labels: BTreeMap::new(),
            }
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(rename = "hub.listen", skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        #[serde(rename = "workers", skip_serializing_if = "Option::is_none")]
        workers: Option<usize>,
        #[serde(skip)]
        _print: bool,
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_t(
        file: Option<&Path>,
        env: &[(&str, &str)],
        flags: &Flags,
    ) -> Result<Daemon, ConfigError> {
        Loader::new("test")
            .file(file)
            .load_from(&vars(env), flags, |_| Ok(()))
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.yaml");
        std::fs::write(
            &p,
            "hub:\n  listen: file:1\n  listen_quic: file:2\nworkers: 8\n",
        )
        .unwrap();
        let env = [
            ("SEDGE_TEST_HUB_LISTEN_QUIC", "env:2"),
            ("SEDGE_TEST_WORKERS", "16"),
            ("SEDGE_TEST_HUB_LISTEN", "env:1"),
        ];
        let flags = Flags {
            listen: Some("flag:1".into()),
            ..Default::default()
        };
        let c = load_t(Some(&p), &env, &flags).unwrap();
        assert_eq!(
            (c.hub.listen.as_str(), c.hub.listen_quic.as_str(), c.workers),
            ("flag:1", "env:2", 16)
        );
        // Without the flag the variable wins; without the variable the file; then the default.
        let c = load_t(Some(&p), &env[..1], &Flags::default()).unwrap();
        assert_eq!(
            (c.hub.listen.as_str(), c.hub.listen_quic.as_str(), c.workers),
            ("file:1", "env:2", 8)
        );
        let c = load_t(None, &[], &Flags::default()).unwrap();
        assert_eq!(c, Daemon::default());
    }

    #[test]
    fn variables_are_read_as_their_fields_types() {
        let c = load_t(
            None,
            &[
                ("SEDGE_TEST_RATIO", "0.25"),
                ("SEDGE_TEST_VERBOSE", "yes"),
                ("SEDGE_TEST_CERT", "/etc/x.pem"),
                ("SEDGE_TEST_TIMEOUT_MS", "250"),
                ("SEDGE_TEST_HUB_ADVERTISE", "a.example, 10.0.0.1"),
                ("SEDGE_TEST_HUB_PORTS", "[80, 443]"),
                ("SEDGE_TEST_LABELS", r#"{"zone":"a"}"#),
                ("SEDGE_TEST_WORKERS", ""),
            ],
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(c.ratio, 0.25);
        assert!(c.verbose);
        assert_eq!(c.cert.as_deref(), Some("/etc/x.pem"));
        assert_eq!(c.timeout_ms, Some(250));
        assert_eq!(c.hub.advertise, ["a.example", "10.0.0.1"]);
        assert_eq!(c.hub.ports, [80, 443]);
        assert_eq!(c.labels["zone"], "a");
        assert_eq!(c.workers, 4, "an empty value counts as unset");
    }

    #[test]
    fn bad_values_name_the_layer_and_the_field() {
        for (var, v, want) in [
            ("SEDGE_TEST_WORKERS", "many", "not a whole number"),
            ("SEDGE_TEST_WORKERS", "-3", "SEDGE_TEST_WORKERS"),
            ("SEDGE_TEST_VERBOSE", "1000", "true or false"),
            ("SEDGE_TEST_RATIO", "NaN", "not a number"),
            ("SEDGE_TEST_LABELS", "zone=a", "not a JSON object"),
            ("SEDGE_TEST_HUB_PORTS", "80,http", "SEDGE_TEST_HUB_PORTS"),
        ] {
            let e = load_t(None, &[(var, v)], &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(var) && e.contains(want), "{var}={v}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.yaml");
        std::fs::write(&p, "hub:\n  listn: x\n").unwrap();
        let e = load_t(Some(&p), &[], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.yaml") && e.contains("unknown field `listn`"),
            "{e}"
        );
        std::fs::write(&p, "workers: many\n").unwrap();
        let e = load_t(Some(&p), &[], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.yaml") && e.contains("workers"), "{e}");
        assert!(matches!(
            load_t(Some(&dir.path().join("none.yaml")), &[], &Flags::default()),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&p, "").unwrap();
        assert_eq!(
            load_t(Some(&p), &[], &Flags::default()).unwrap(),
            Daemon::default()
        );
    }

    #[test]
    fn a_variable_naming_no_field_is_ignored_and_others_of_other_daemons_too() {
        let c = load_t(
            None,
            &[("SEDGE_TEST_HUB_LISTN", "x"), ("SEDGE_OTHER_WORKERS", "9")],
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(c, Daemon::default());
    }

    #[test]
    fn variables_lists_every_field_once() {
        let v = Loader::new("test").variables::<Daemon>();
        let names: Vec<_> = v.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"SEDGE_TEST_HUB_LISTEN_QUIC"));
        assert!(names.contains(&"SEDGE_TEST_LABELS"));
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len());
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
        let e = parse_bool(name, "1000").unwrap_err().to_string();
        assert!(
            e.contains(name) && e.contains("\"1000\"") && e.contains("true or false"),
            "{e}"
        );
    }
}
