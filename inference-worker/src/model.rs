//! A model file plus the small config that says how to feed it: input name and per-sample shape,
//! pixel normalisation, output name and activation, class labels.
//!
//! The config lives next to the model as `<stem>.json` (`edge-cnn.onnx` -> `edge-cnn.json`), so a
//! `MODEL_URL` pointing at the `.onnx` file is enough to run it. An ONNX file without one is read
//! for what it says about itself ([`config_from_onnx`]): input and output names and shapes from
//! the graph, and from the model's metadata (`metadata_props`) the keys `labels` (a JSON list or
//! comma-separated), `scale`, `mean`, `std` and `activation` (`softmax` | `none`); what is not
//! there takes the documented defaults: pixels scaled by 1/255, mean 0, std 1, softmax, and the
//! labels `"0"`..`"N-1"` for an output of N classes. A Model's `model.sedge.io/<key>` annotations
//! (passed to the worker in `SEDGE_MODEL_METADATA`) override the file's metadata key by key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a model or its config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file does not exist.
    #[error("model file {0} does not exist")]
    MissingModel(PathBuf),
    /// The config file beside the model is missing or unreadable.
    #[error(
        "model config {path}: {message} (a model takes its config from `<model stem>.json` beside it, or from its own ONNX graph and metadata; see models/README.md)"
    )]
    Config {
        /// The config file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// How raw `u8` pixels become the model's input: `x = (pixel * scale - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The ONNX input name.
    pub name: String,
    /// Shape of one sample, without the batch dimension (for example `[1, 28, 28]`).
    pub shape: Vec<usize>,
    /// Multiplier applied to each `u8` pixel.
    #[serde(default = "one")]
    pub scale: f32,
    /// Subtracted after scaling.
    #[serde(default)]
    pub mean: f32,
    /// Divisor applied last.
    #[serde(default = "one")]
    pub std: f32,
}

impl InputSpec {
    /// One sample seen as a greyscale image: (rows, cols) from the last two dimensions, or one row
    /// for a flat input.
    pub fn image_dims(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [.., r, c] => (*r, *c),
            [n] => (1, *n),
            [] => (0, 0),
        }
    }
}

fn one() -> f32 {
    1.0
}

/// What the model's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// The output is logits; softmax turns them into class probabilities.
    #[default]
    Softmax,
    /// The output already holds probabilities.
    None,
}

/// The model output to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The ONNX output name.
    pub name: String,
    /// How to turn it into probabilities.
    #[serde(default)]
    pub activation: Activation,
}

/// Everything a worker needs to know about a model besides its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name the model is served under.
    pub name: String,
    /// The input tensor.
    pub input: InputSpec,
    /// The output tensor.
    pub output: OutputSpec,
    /// Class names, indexed by class id.
    pub labels: Vec<String>,
}

impl ModelConfig {
    /// Number of input values per sample.
    pub fn sample_len(&self) -> usize {
        self.input.shape.iter().product()
    }

    fn validate(&self) -> Result<(), String> {
        if self.input.shape.is_empty() || self.input.shape.contains(&0) {
            return Err(format!(
                "input.shape {:?} must be non-empty with no zero dimension",
                self.input.shape
            ));
        }
        if self.input.std == 0.0
            || !self.input.std.is_finite()
            || !self.input.scale.is_finite()
            || !self.input.mean.is_finite()
        {
            return Err(
                "input.scale, input.mean and input.std must be finite and std non-zero".into(),
            );
        }
        if self.labels.is_empty() {
            return Err("labels must list at least one class".into());
        }
        Ok(())
    }
}

/// A model file with its config.
#[derive(Debug, Clone)]
pub struct Model {
    /// The `.onnx` file.
    pub path: PathBuf,
    /// How to feed it.
    pub config: ModelConfig,
}

impl Model {
    /// Loads `path` and the config beside it. `file://` prefixes are accepted. Without a config
    /// file, the model's own metadata is used, overridden by the worker's
    /// `SEDGE_MODEL_METADATA` (the Model's annotations).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let over = match std::env::var(sedge_worker_contract::env::MODEL_METADATA) {
            Ok(v) if !v.trim().is_empty() => {
                sedge_worker_contract::model::parse(&v).map_err(|message| ModelError::Config {
                    path: PathBuf::from(format!(
                        "environment variable {}",
                        sedge_worker_contract::env::MODEL_METADATA
                    )),
                    message,
                })?
            }
            _ => Default::default(),
        };
        Model::load_with(path, &over)
    }

    /// As [`Model::load`], with `over` (keys as in the file's metadata) laid over the file's
    /// metadata when there is no config file.
    pub fn load_with(
        path: impl AsRef<Path>,
        over: &std::collections::BTreeMap<String, String>,
    ) -> Result<Model, ModelError> {
        let raw = path.as_ref();
        let path = match raw.to_str().and_then(|s| s.strip_prefix("file://")) {
            Some(stripped) => PathBuf::from(stripped),
            None => raw.to_path_buf(),
        };
        if !path.is_file() {
            return Err(ModelError::MissingModel(path));
        }
        let config_path = path.with_extension("json");
        let text = match std::fs::read_to_string(&config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No sidecar: what the ONNX file says about itself, and the defaults.
                let config = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| config_from_onnx(&path, &bytes, over))
                    .and_then(|c| c.validate().map(|()| c))
                    .map_err(|message| ModelError::Config {
                        path: config_path.clone(),
                        message: format!(
                            "absent, and the model does not describe itself: {message}"
                        ),
                    })?;
                return Ok(Model { path, config });
            }
            Err(e) => {
                return Err(ModelError::Config {
                    path: config_path.clone(),
                    message: e.to_string(),
                });
            }
        };
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ModelError::Config {
            path: config_path,
            message,
        })?;
        Ok(Model { path, config })
    }
}

/// A model's config read from its ONNX file (see the module documentation for the keys and the
/// defaults). The first graph input that is not an initializer is the input; its shape without
/// the batch dimension must be fixed. The first output is the output.
pub fn config_from_onnx(
    path: &Path,
    bytes: &[u8],
    over: &std::collections::BTreeMap<String, String>,
) -> Result<ModelConfig, String> {
    use prost::Message;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    use tract_onnx::pb::type_proto::Value as Type;
    let proto =
        tract_onnx::pb::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.as_ref().ok_or("the file has no graph")?;
    let dims = |v: &tract_onnx::pb::ValueInfoProto| -> Vec<Option<usize>> {
        match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Type::TensorType(t)) => t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(Dim::DimValue(n)) if *n > 0 => Some(*n as usize),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        }
    };
    let weights: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = graph
        .input
        .iter()
        .find(|i| !weights.contains(i.name.as_str()))
        .ok_or("the graph has no input")?;
    let output = graph.output.first().ok_or("the graph has no output")?;
    let in_dims = dims(input);
    let shape: Vec<usize> = match in_dims.split_first() {
        Some((_batch, rest)) if !rest.is_empty() => rest
            .iter()
            .map(|d| {
                d.ok_or_else(|| {
                    format!(
                        "input {:?} has a dimension that is not fixed: {in_dims:?}",
                        input.name
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(format!(
                "input {:?} has no per-sample shape (dims {in_dims:?})",
                input.name
            ));
        }
    };
    let mut meta: std::collections::HashMap<&str, &str> = proto
        .metadata_props
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    meta.extend(over.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let number = |key: &str, default: f32| -> Result<f32, String> {
        meta.get(key).map_or(Ok(default), |v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| format!("metadata {key} = {v:?} is not a number"))
        })
    };
    let classes = dims(output).last().copied().flatten();
    let labels: Vec<String> = match meta.get("labels") {
        Some(v) if v.trim_start().starts_with('[') => serde_json::from_str(v)
            .map_err(|e| format!("metadata labels is not a JSON list of strings: {e}"))?,
        Some(v) => v.split(',').map(|l| l.trim().to_string()).collect(),
        None => {
            let classes = classes.ok_or_else(|| {
                format!(
                    "output {:?} has no fixed class dimension, and the metadata names no labels",
                    output.name
                )
            })?;
            (0..classes).map(|i| i.to_string()).collect()
        }
    };
    if let Some(n) = classes
        && labels.len() != n
    {
        return Err(format!(
            "labels name {} classes but output {:?} has {n}",
            labels.len(),
            output.name
        ));
    }
    let activation = match meta.get("activation").map(|a| a.trim()) {
        None | Some("softmax") => Activation::Softmax,
        Some("none") => Activation::None,
        Some(other) => {
            return Err(format!(
                "metadata activation {other:?} is not softmax or none"
            ));
        }
    };
    Ok(ModelConfig {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        input: InputSpec {
            name: input.name.clone(),
            shape,
            scale: number("scale", 1.0 / 255.0)?,
            mean: number("mean", 0.0)?,
            std: number("std", 1.0)?,
        },
        output: OutputSpec {
            name: output.name.clone(),
            activation,
        },
        labels,
    })
}

/// Where the committed models live in a source checkout (used by tests, benches and the demo).
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_models_have_valid_configs() {
        for name in ["edge-cnn", "cloud-cnn"] {
            let m = Model::load(models_dir().join(format!("fashion-mnist/{name}.onnx"))).unwrap();
            assert_eq!(m.config.name, name);
            assert_eq!(m.config.sample_len(), 784);
            assert_eq!(m.config.labels.len(), 10);
        }
    }

    #[test]
    fn an_onnx_file_without_a_config_describes_itself() {
        use prost::Message;
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(models_dir().join("fashion-mnist/edge-cnn.onnx")).unwrap();
        let bare = dir.path().join("bare.onnx");
        std::fs::write(&bare, &bytes).unwrap();
        let m = Model::load(&bare).unwrap();
        let with_json = Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx")).unwrap();
        // Names and shapes from the graph, the defaults for the rest (ours match them).
        assert_eq!(m.config.name, "bare");
        assert_eq!(m.config.input, with_json.config.input);
        assert_eq!(m.config.output, with_json.config.output);
        assert_eq!(
            m.config.labels,
            (0..10).map(|i| i.to_string()).collect::<Vec<_>>()
        );
        // It runs, and answers as the described model does.
        let opts = crate::backend::BackendOptions {
            kind: crate::backend::BackendKind::Tract,
            ..Default::default()
        };
        let a = crate::backend::load(&m, &opts).unwrap();
        let b = crate::backend::load(&with_json, &opts).unwrap();
        let x = vec![0.5f32; 784];
        assert_eq!(a.run(&x, 1).unwrap(), b.run(&x, 1).unwrap());

        // Labels and normalisation from the model's metadata.
        let mut proto = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
        for (k, v) in [
            ("labels", r#"["a","b","c","d","e","f","g","h","i","j"]"#),
            ("mean", "0.5"),
            ("activation", "none"),
        ] {
            proto
                .metadata_props
                .push(tract_onnx::pb::StringStringEntryProto {
                    key: k.into(),
                    value: v.into(),
                });
        }
        let tagged = dir.path().join("tagged.onnx");
        std::fs::write(&tagged, proto.encode_to_vec()).unwrap();
        let m = Model::load(&tagged).unwrap();
        assert_eq!(m.config.labels[9], "j");
        assert_eq!(m.config.input.mean, 0.5);
        assert_eq!(m.config.output.activation, Activation::None);
        // Bad metadata is named.
        proto
            .metadata_props
            .push(tract_onnx::pb::StringStringEntryProto {
                key: "std".into(),
                value: "wide".into(),
            });
        std::fs::write(&tagged, proto.encode_to_vec()).unwrap();
        let err = Model::load(&tagged).unwrap_err().to_string();
        assert!(
            err.contains("metadata std = \"wide\" is not a number"),
            "{err}"
        );
        // The Model's annotations override the file's metadata key by key.
        let over = |kv: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let m = Model::load_with(
            &tagged,
            &over(&[("std", "0.25"), ("labels", "0,1,2,3,4,5,6,7,8,nine")]),
        )
        .unwrap();
        assert_eq!(m.config.input.std, 0.25);
        assert_eq!(m.config.input.mean, 0.5, "not overridden: the file's");
        assert_eq!(m.config.labels[9], "nine");
        // Labels that do not match the output's classes are refused, not indexed past.
        let err = Model::load_with(&tagged, &over(&[("std", "1"), ("labels", "cat,dog")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels name 2 classes but output"), "{err}");
    }

    #[test]
    fn bad_configs_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        assert!(matches!(
            Model::load(&model),
            Err(ModelError::MissingModel(_))
        ));
        std::fs::write(&model, b"x").unwrap();
        let err = Model::load(&model).unwrap_err().to_string();
        assert!(
            err.contains("m.json") && err.contains("does not describe itself"),
            "{err}"
        );
        std::fs::write(dir.path().join("m.json"), r#"{"name":"m","input":{"name":"x","shape":[1,28,28],"colour":1},"output":{"name":"y"},"labels":["a"]}"#).unwrap();
        let err = Model::load(&model).unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        std::fs::write(
            dir.path().join("m.json"),
            r#"{"name":"m","input":{"name":"x","shape":[0]},"output":{"name":"y"},"labels":["a"]}"#,
        )
        .unwrap();
        let err = Model::load(&model).unwrap_err().to_string();
        assert!(err.contains("input.shape [0]"), "{err}");
        let url = format!("file://{}", model.display());
        assert!(
            Model::load(url)
                .unwrap_err()
                .to_string()
                .contains("input.shape")
        );
    }
}
