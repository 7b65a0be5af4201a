//! A model file plus the small config that says how to feed it: input name and per-sample shape,
//! pixel normalisation, output name and activation, class labels.
//!
//! The config lives next to the model as `<stem>.json` (`edge-cnn.onnx` -> `edge-cnn.json`), so a
//! `MODEL_URL` pointing at the `.onnx` file is enough to run it.

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
        "model config {path}: {message} (each model needs a `<model stem>.json` beside it; see models/README.md)"
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
    /// Loads `path` and the config beside it. `file://` prefixes are accepted.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let raw = path.as_ref();
        let path = match raw.to_str().and_then(|s| s.strip_prefix("file://")) {
            Some(stripped) => PathBuf::from(stripped),
            None => raw.to_path_buf(),
        };
        if !path.is_file() {
            return Err(ModelError::MissingModel(path));
        }
        let config_path = path.with_extension("json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
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
    fn bad_configs_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        assert!(matches!(
            Model::load(&model),
            Err(ModelError::MissingModel(_))
        ));
        std::fs::write(&model, b"x").unwrap();
        let err = Model::load(&model).unwrap_err().to_string();
        assert!(err.contains("m.json"), "{err}");
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
