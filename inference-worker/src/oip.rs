//! Open Inference Protocol (KServe v2 / Triton) types for the REST API, and the tensor checks that
//! REST and gRPC share.
//!
//! Inputs are accepted as `UINT8` (raw pixels, normalised on the server with the model's config:
//! the compact form, 4x smaller than FP32) or `FP32` (already normalised). The shape is
//! `[batch, ...sample]`, where the sample part may be the model's own (`[1,28,28]`), flattened
//! (`[784]`), or any other shape with the same number of values.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::ModelConfig;
use crate::preprocess::Normalizer;

/// A request the server cannot act on; the message says what was wrong and is sent to the client
/// (HTTP 400, gRPC `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// Builds an [`InvalidRequest`] from format arguments.
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::oip::InvalidRequest(format!($($arg)*)) };
}
pub(crate) use invalid;

/// Tensor element types the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// Raw pixels.
    Uint8,
    /// Normalised model input.
    Fp32,
}

impl DataType {
    /// Parses an OIP datatype string, naming what is accepted when it is not supported.
    pub fn parse(s: &str) -> Result<Self, InvalidRequest> {
        match s {
            "UINT8" => Ok(DataType::Uint8),
            "FP32" => Ok(DataType::Fp32),
            other => Err(invalid!(
                "datatype {other:?} is not supported; send UINT8 (raw pixels) or FP32 (normalised input)"
            )),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Uint8 => 1,
            DataType::Fp32 => 4,
        }
    }
}

/// Input tensor values, before normalisation.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// `UINT8` values.
    U8(Vec<u8>),
    /// `FP32` values.
    F32(Vec<f32>),
}

impl TensorData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            TensorData::U8(v) => v.len(),
            TensorData::F32(v) => v.len(),
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes little-endian raw bytes (gRPC `raw_input_contents`, the REST binary extension).
    pub fn from_raw(datatype: DataType, bytes: &[u8]) -> Result<Self, InvalidRequest> {
        match datatype {
            DataType::Uint8 => Ok(TensorData::U8(bytes.to_vec())),
            DataType::Fp32 => {
                if !bytes.len().is_multiple_of(4) {
                    return Err(invalid!(
                        "FP32 raw data has {} bytes, not a multiple of 4",
                        bytes.len()
                    ));
                }
                Ok(TensorData::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
        }
    }

    /// Decodes JSON `data`: flat or nested arrays of numbers.
    pub fn from_json(datatype: DataType, data: &Value) -> Result<Self, InvalidRequest> {
        let mut flat = Vec::new();
        flatten(data, &mut flat, 0)?;
        match datatype {
            DataType::Uint8 => flat
                .into_iter()
                .map(|v| {
                    if v.fract() == 0.0 && (0.0..=255.0).contains(&v) {
                        Ok(v as u8)
                    } else {
                        Err(invalid!(
                            "UINT8 data holds {v}, which is not an integer from 0 to 255"
                        ))
                    }
                })
                .collect::<Result<_, _>>()
                .map(TensorData::U8),
            DataType::Fp32 => Ok(TensorData::F32(
                flat.into_iter().map(|v| v as f32).collect(),
            )),
        }
    }

    /// Checks the shape against the model and returns the normalised model input and batch size.
    pub fn into_model_input(
        self,
        shape: &[i64],
        config: &ModelConfig,
        norm: &Normalizer,
    ) -> Result<(Vec<f32>, usize), InvalidRequest> {
        let per_sample = config.sample_len();
        let dims: Vec<usize> = shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| invalid!("shape {shape:?} has a negative dimension"))
            })
            .collect::<Result<_, _>>()?;
        let Some((&batch, rest)) = dims.split_first() else {
            return Err(invalid!(
                "shape is empty; expected [batch, ...] with {per_sample} values per sample"
            ));
        };
        let declared = rest
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        if batch == 0 || declared != per_sample {
            return Err(invalid!(
                "shape {shape:?} does not fit model {:?}: expected [batch, ...] with batch >= 1 and {per_sample} values per sample (e.g. [1, {}])",
                config.name,
                config
                    .input
                    .shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.len() != batch * per_sample {
            return Err(invalid!(
                "shape {shape:?} needs {} values, the request holds {}",
                batch * per_sample,
                self.len()
            ));
        }
        let input = match self {
            TensorData::F32(v) => v,
            TensorData::U8(pixels) => {
                let mut out = Vec::with_capacity(pixels.len());
                norm.extend(&pixels, &mut out);
                out
            }
        };
        Ok((input, batch))
    }
}

fn flatten(v: &Value, out: &mut Vec<f64>, depth: usize) -> Result<(), InvalidRequest> {
    if depth > 8 {
        return Err(invalid!("data is nested more than 8 levels deep"));
    }
    match v {
        Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out, depth + 1)),
        Value::Number(n) => {
            out.push(
                n.as_f64()
                    .ok_or_else(|| invalid!("data holds {n}, which is not a finite number"))?,
            );
            Ok(())
        }
        other => Err(invalid!(
            "data holds {other}, expected numbers or arrays of numbers"
        )),
    }
}

/// Tensor metadata, as in model metadata responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// OIP datatype.
    pub datatype: String,
    /// Shape; `-1` for a variable dimension.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Versions served.
    pub versions: Vec<String>,
    /// Model platform.
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

impl ModelMetadata {
    /// Metadata of a served model: the input is advertised as FP32 (UINT8 is accepted too).
    pub fn of(config: &ModelConfig) -> Self {
        let mut in_shape = vec![-1];
        in_shape.extend(config.input.shape.iter().map(|&d| d as i64));
        ModelMetadata {
            name: config.name.clone(),
            versions: vec!["1".into()],
            platform: "onnx_onnxv1".into(),
            inputs: vec![TensorMetadata {
                name: config.input.name.clone(),
                datatype: "FP32".into(),
                shape: in_shape,
            }],
            outputs: vec![TensorMetadata {
                name: config.output.name.clone(),
                datatype: "FP32".into(),
                shape: vec![-1, config.labels.len() as i64],
            }],
        }
    }
}

/// One input of a REST inference request.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestInput {
    /// Tensor name.
    pub name: String,
    /// Shape including the batch dimension.
    pub shape: Vec<i64>,
    /// OIP datatype.
    pub datatype: String,
    /// Per-tensor parameters (`binary_data_size` for the binary extension).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// JSON data; absent when the binary extension carries it.
    #[serde(default)]
    pub data: Option<Value>,
}

/// One requested output of a REST inference request.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestOutput {
    /// Output name.
    pub name: String,
    /// Per-output parameters (`binary_data: true` asks for binary output).
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// `POST /v2/models/{name}/infer` request body (the JSON part, under the binary extension).
#[derive(Debug, Clone, Deserialize)]
pub struct InferenceRequest {
    /// Echoed back.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (`binary_data_output: true` asks for binary outputs).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Exactly one input for the models served here.
    pub inputs: Vec<RequestInput>,
    /// Outputs wanted; all when absent.
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One output of a REST inference response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseOutput {
    /// Output name.
    pub name: String,
    /// Shape including the batch dimension.
    pub shape: Vec<i64>,
    /// OIP datatype.
    pub datatype: String,
    /// `binary_data_size` when the data follows in binary.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    /// JSON data, unless sent in binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
}

/// `POST /v2/models/{name}/infer` response body (the JSON part, under the binary extension).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferenceResponse {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// The request's id, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Response parameters (the edge endpoint's `answered_by`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    /// The outputs.
    pub outputs: Vec<ResponseOutput>,
}

/// Reads a parameter as a boolean (`true`, or Triton's habit of sending `"true"`).
pub fn param_true(params: &Map<String, Value>, key: &str) -> bool {
    matches!(params.get(key), Some(Value::Bool(true)))
        || matches!(params.get(key), Some(Value::String(s)) if s == "true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, InputSpec, OutputSpec};

    fn config() -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            input: InputSpec {
                name: "x".into(),
                shape: vec![1, 2, 2],
                scale: 1.0 / 255.0,
                mean: 0.0,
                std: 1.0,
            },
            output: OutputSpec {
                name: "y".into(),
                activation: Activation::Softmax,
            },
            labels: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn accepts_model_flat_and_nested_shapes() {
        let cfg = config();
        let norm = Normalizer::new(&cfg.input);
        for shape in [vec![2, 1, 2, 2], vec![2, 4], vec![2, 2, 2]] {
            let data = TensorData::U8(vec![0, 255, 0, 255, 255, 0, 255, 0]);
            let (x, n) = data.into_model_input(&shape, &cfg, &norm).unwrap();
            assert_eq!((n, x.len(), x[1]), (2, 8, 1.0));
        }
        let nested = serde_json::json!([[[0.5, 0.5], [0.5, 0.5]]]);
        let data = TensorData::from_json(DataType::Fp32, &nested).unwrap();
        assert_eq!(
            data.into_model_input(&[1, 1, 2, 2], &cfg, &norm).unwrap().0,
            vec![0.5; 4]
        );
    }

    #[test]
    fn rejects_bad_tensors_with_reasons() {
        let cfg = config();
        let norm = Normalizer::new(&cfg.input);
        let err = TensorData::U8(vec![0; 4])
            .into_model_input(&[1, 3], &cfg, &norm)
            .unwrap_err();
        assert!(err.0.contains("does not fit model \"m\""), "{err}");
        let err = TensorData::U8(vec![0; 3])
            .into_model_input(&[1, 4], &cfg, &norm)
            .unwrap_err();
        assert_eq!(err.0, "shape [1, 4] needs 4 values, the request holds 3");
        assert!(
            TensorData::U8(vec![])
                .into_model_input(&[0, 4], &cfg, &norm)
                .is_err()
        );
        assert!(
            TensorData::U8(vec![0; 4])
                .into_model_input(&[-1, 4], &cfg, &norm)
                .is_err()
        );
        assert!(
            TensorData::U8(vec![0; 4])
                .into_model_input(&[], &cfg, &norm)
                .is_err()
        );
        assert!(
            TensorData::U8(vec![0; 4])
                .into_model_input(&[i64::MAX, i64::MAX, 4], &cfg, &norm)
                .is_err()
        );
        let err = TensorData::from_json(DataType::Uint8, &serde_json::json!([1, 256])).unwrap_err();
        assert!(err.0.contains("256"), "{err}");
        assert!(TensorData::from_json(DataType::Fp32, &serde_json::json!([1, "a"])).is_err());
        assert!(TensorData::from_raw(DataType::Fp32, &[0; 5]).is_err());
        assert!(DataType::parse("INT64").unwrap_err().0.contains("UINT8"));
        let deep = serde_json::from_str::<Value>(&format!("{}1{}", "[".repeat(20), "]".repeat(20)))
            .unwrap();
        assert!(TensorData::from_json(DataType::Fp32, &deep).is_err());
    }

    #[test]
    fn raw_fp32_is_little_endian() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            TensorData::from_raw(DataType::Fp32, &bytes).unwrap(),
            TensorData::F32(vec![1.5, -2.0])
        );
    }
}
