//! The train worker: fine-tunes an ONNX classifier on labelled samples with candle and writes the
//! trained weights back into the same ONNX graph.
//!
//! The graph is read from the file itself (no second definition of the network in Rust): every
//! node of the supported operator set (`Conv`, `Relu`, `MaxPool`, `Reshape`, `Flatten`, `Gemm`,
//! `MatMul`, `Add`, `Identity`, `Constant`) becomes the candle operation that computes the same
//! thing, every FP32 initializer used as a weight or bias becomes a trainable variable, and after
//! training each initializer's data is replaced by the trained values. Everything else in the
//! file (opset, names, shapes, metadata) is kept byte for byte, so tract and ONNX Runtime load the
//! result exactly as they loaded the base model.
//!
//! Forgetting is kept in check with replay: each epoch mixes the new samples with a random sample
//! of the original training data (`replay_ratio` times as many), as Sedna's examples do with the
//! base dataset.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use prost::Message;
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto, tensor_proto::DataType};

use crate::model::{Model, ModelConfig};
use crate::preprocess::Normalizer;
use sedge_datasets::export::write_atomic;

/// Why training could not run or could not write its model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The ONNX file could not be read or parsed.
    #[error("cannot read ONNX model {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The graph uses something the trainer cannot differentiate.
    #[error("model {path} cannot be trained: {message}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The node or attribute in question.
        message: String,
    },
    /// The samples are unusable.
    #[error("training data: {0}")]
    Data(String),
    /// candle failed while computing.
    #[error("training failed: {0}")]
    Compute(String),
    /// The trained model could not be written.
    #[error("cannot write trained model {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Compute(e.to_string())
    }
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Passes over the mixed training set.
    pub epochs: usize,
    /// Samples per optimiser step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Replay samples drawn from the original data per new sample, each epoch.
    pub replay_ratio: f64,
    /// Seed for shuffling and replay draws.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 3,
            batch_size: 64,
            learning_rate: 5e-4,
            weight_decay: 1e-4,
            replay_ratio: 1.0,
            seed: 0,
        }
    }
}

/// One labelled sample: raw pixels and its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// Pixels as stored (`u8`, one sample's worth).
    pub pixels: Vec<u8>,
    /// Class index.
    pub label: u32,
}

/// What a training run did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainReport {
    /// New samples trained on.
    pub samples: usize,
    /// Replay samples per epoch.
    pub replay: usize,
    /// Mean cross-entropy of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Trainable values updated.
    pub parameters: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Conv {
        x: String,
        w: String,
        b: Option<String>,
        pad: usize,
        stride: usize,
        dilation: usize,
        group: usize,
    },
    Relu(String),
    MaxPool {
        x: String,
        kernel: (usize, usize),
        stride: (usize, usize),
    },
    Reshape {
        x: String,
        shape: String,
    },
    Flatten {
        x: String,
        axis: usize,
    },
    Gemm {
        a: String,
        b: String,
        c: Option<String>,
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul(String, String),
    Add(String, String),
    Identity(String),
}

/// An ONNX classifier whose weights candle can train.
pub struct OnnxTrainer {
    path: PathBuf,
    proto: ModelProto,
    input: String,
    output: String,
    nodes: Vec<(Op, String)>,
    /// FP32 initializers: the trained weights, written back by [`OnnxTrainer::to_onnx`].
    params: BTreeMap<String, Var>,
    /// FP32 `Constant` nodes: read, never trained.
    fixed: HashMap<String, Tensor>,
    /// INT64 initializers and constants (shapes).
    constants: HashMap<String, Vec<i64>>,
    config: ModelConfig,
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn int(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map(|a| a.i).unwrap_or(default)
}

fn float(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map(|a| a.f).unwrap_or(default)
}

fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    Some(
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn i64_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != DataType::Int64 as i32 {
        return None;
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    Some(
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// One symmetric number for ONNX `pads`/`strides`-style lists, or an error naming the node.
fn uniform(
    node: &NodeProto,
    name: &str,
    v: Option<Vec<i64>>,
    default: usize,
) -> Result<usize, String> {
    let Some(v) = v else { return Ok(default) };
    match v.first() {
        None => Ok(default),
        Some(&first) if v.iter().all(|&x| x == first) && first >= 0 => Ok(first as usize),
        _ => Err(format!(
            "node {:?} ({}) has {name} {v:?}; only equal values on every side are supported",
            node.name, node.op_type
        )),
    }
}

fn pair(v: Option<Vec<i64>>, default: usize) -> (usize, usize) {
    match v.as_deref() {
        Some([a, b]) => (*a as usize, *b as usize),
        _ => (default, default),
    }
}

impl OnnxTrainer {
    /// Reads the model (and its config beside it) and maps its graph onto candle.
    pub fn load(model: &Model) -> Result<Self, TrainError> {
        let path = model.path.clone();
        let bytes = std::fs::read(&path).map_err(|e| TrainError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let proto = ModelProto::decode(bytes.as_slice()).map_err(|e| TrainError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let unsupported = |message: String| TrainError::Unsupported {
            path: path.clone(),
            message,
        };
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| unsupported("the file has no graph".into()))?;
        let mut params = BTreeMap::new();
        let mut fixed = HashMap::new();
        let mut constants = HashMap::new();
        for init in &graph.initializer {
            if !init.external_data.is_empty() {
                return Err(unsupported(format!(
                    "initializer {:?} is stored outside the file",
                    init.name
                )));
            }
            if let Some(values) = f32_values(init) {
                let dims: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
                let t = Tensor::from_vec(values, dims, &Device::Cpu)?;
                params.insert(init.name.clone(), Var::from_tensor(&t)?);
            } else if let Some(values) = i64_values(init) {
                constants.insert(init.name.clone(), values);
            } else {
                return Err(unsupported(format!(
                    "initializer {:?} has data type {}, only FP32 weights and INT64 shapes are supported",
                    init.name, init.data_type
                )));
            }
        }
        let initialised: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|i| i.name.as_str()).collect();
        let input = graph
            .input
            .iter()
            .map(|i| i.name.clone())
            .find(|n| !initialised.contains(n.as_str()))
            .ok_or_else(|| unsupported("the graph has no data input".into()))?;
        let output = graph
            .output
            .first()
            .map(|o| o.name.clone())
            .ok_or_else(|| unsupported("the graph has no output".into()))?;
        let mut nodes = Vec::new();
        for n in &graph.node {
            let arg = |i: usize| -> Result<String, TrainError> {
                n.input
                    .get(i)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .ok_or_else(|| {
                        unsupported(format!("node {:?} ({}) lacks input {i}", n.name, n.op_type))
                    })
            };
            let opt = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).cloned();
            let op = match n.op_type.as_str() {
                "Conv" => {
                    if let Some(a) =
                        attr(n, "auto_pad").filter(|a| !a.s.is_empty() && a.s != b"NOTSET")
                    {
                        return Err(unsupported(format!(
                            "node {:?} (Conv) uses auto_pad {}; only explicit pads are supported",
                            n.name,
                            String::from_utf8_lossy(&a.s)
                        )));
                    }
                    Op::Conv {
                        x: arg(0)?,
                        w: arg(1)?,
                        b: opt(2),
                        pad: uniform(n, "pads", ints(n, "pads"), 0).map_err(unsupported)?,
                        stride: uniform(n, "strides", ints(n, "strides"), 1)
                            .map_err(unsupported)?,
                        dilation: uniform(n, "dilations", ints(n, "dilations"), 1)
                            .map_err(unsupported)?,
                        group: int(n, "group", 1).max(1) as usize,
                    }
                }
                "Relu" => Op::Relu(arg(0)?),
                "MaxPool" => {
                    if uniform(n, "pads", ints(n, "pads"), 0).map_err(unsupported)? != 0
                        || int(n, "ceil_mode", 0) != 0
                    {
                        return Err(unsupported(format!(
                            "node {:?} (MaxPool) pads or uses ceil_mode",
                            n.name
                        )));
                    }
                    let kernel = pair(ints(n, "kernel_shape"), 1);
                    let stride = pair(ints(n, "strides"), 1);
                    if kernel != stride {
                        return Err(unsupported(format!(
                            "node {:?} (MaxPool) has kernel {kernel:?} and stride {stride:?}; only non-overlapping pools can be trained",
                            n.name
                        )));
                    }
                    Op::MaxPool {
                        x: arg(0)?,
                        kernel,
                        stride,
                    }
                }
                "Reshape" => Op::Reshape {
                    x: arg(0)?,
                    shape: arg(1)?,
                },
                "Flatten" => Op::Flatten {
                    x: arg(0)?,
                    axis: int(n, "axis", 1).max(0) as usize,
                },
                "Gemm" => Op::Gemm {
                    a: arg(0)?,
                    b: arg(1)?,
                    c: opt(2),
                    alpha: f64::from(float(n, "alpha", 1.0)),
                    beta: f64::from(float(n, "beta", 1.0)),
                    trans_a: int(n, "transA", 0) != 0,
                    trans_b: int(n, "transB", 0) != 0,
                },
                "MatMul" => Op::MatMul(arg(0)?, arg(1)?),
                "Add" => Op::Add(arg(0)?, arg(1)?),
                "Identity" | "Dropout" => Op::Identity(arg(0)?),
                "Constant" => {
                    let value = attr(n, "value").and_then(|a| a.t.as_ref());
                    let name = n.output.first().cloned().unwrap_or_default();
                    if let Some(v) = value.and_then(i64_values) {
                        constants.insert(name, v);
                        continue;
                    }
                    if let Some(t) = value
                        && let Some(v) = f32_values(t)
                    {
                        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                        fixed.insert(name, Tensor::from_vec(v, dims, &Device::Cpu)?);
                        continue;
                    }
                    return Err(unsupported(format!(
                        "Constant node {:?} holds neither FP32 nor INT64 data",
                        n.name
                    )));
                }
                other => {
                    return Err(unsupported(format!(
                        "node {:?} uses {other}, which the trainer does not support (Conv, Relu, MaxPool, Reshape, Flatten, Gemm, MatMul, Add, Identity, Constant)",
                        n.name
                    )));
                }
            };
            let out = n.output.first().cloned().ok_or_else(|| {
                unsupported(format!("node {:?} ({}) has no output", n.name, n.op_type))
            })?;
            nodes.push((op, out));
        }
        Ok(OnnxTrainer {
            path,
            proto,
            input,
            output,
            nodes,
            params,
            fixed,
            constants,
            config: model.config.clone(),
        })
    }

    /// Trainable values (FP32 initializers).
    pub fn parameter_count(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    fn lookup<'a>(
        &'a self,
        values: &'a HashMap<String, Tensor>,
        name: &str,
    ) -> Result<&'a Tensor, TrainError> {
        values
            .get(name)
            .or_else(|| self.params.get(name).map(|v| v.as_tensor()))
            .or_else(|| self.fixed.get(name))
            .ok_or_else(|| TrainError::Unsupported {
                path: self.path.clone(),
                message: format!("value {name:?} is used before it is computed"),
            })
    }

    /// Runs the graph on a batch `[n, ...input shape]`, returning the output (logits).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let mut values: HashMap<String, Tensor> = HashMap::new();
        values.insert(self.input.clone(), x.clone());
        for (op, out) in &self.nodes {
            let get = |name: &str| self.lookup(&values, name);
            let y = match op {
                Op::Conv {
                    x,
                    w,
                    b,
                    pad,
                    stride,
                    dilation,
                    group,
                } => {
                    let y = get(x)?.conv2d(get(w)?, *pad, *stride, *dilation, *group)?;
                    match b {
                        Some(b) => {
                            let b = get(b)?;
                            y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?
                        }
                        None => y,
                    }
                }
                Op::Relu(x) => get(x)?.relu()?,
                Op::MaxPool { x, kernel, stride } => {
                    get(x)?.max_pool2d_with_stride(*kernel, *stride)?
                }
                Op::Reshape { x, shape } => {
                    let x = get(x)?;
                    let spec =
                        self.constants
                            .get(shape)
                            .ok_or_else(|| TrainError::Unsupported {
                                path: self.path.clone(),
                                message: format!("Reshape shape {shape:?} is not a constant"),
                            })?;
                    let dims = x.dims();
                    let mut out: Vec<usize> = Vec::with_capacity(spec.len());
                    let mut hole = None;
                    for (i, &d) in spec.iter().enumerate() {
                        match d {
                            -1 => {
                                hole = Some(i);
                                out.push(1);
                            }
                            0 => out.push(dims.get(i).copied().unwrap_or(1)),
                            d => out.push(d as usize),
                        }
                    }
                    if let Some(i) = hole {
                        let known: usize = out.iter().product();
                        out[i] = x.elem_count() / known.max(1);
                    }
                    x.reshape(out)?
                }
                Op::Flatten { x, axis } => {
                    let x = get(x)?;
                    let lead: usize = x.dims()[..*axis].iter().product();
                    x.reshape((lead, x.elem_count() / lead.max(1)))?
                }
                Op::Gemm {
                    a,
                    b,
                    c,
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => {
                    let a = if *trans_a {
                        get(a)?.t()?
                    } else {
                        get(a)?.clone()
                    };
                    let b = if *trans_b {
                        get(b)?.t()?
                    } else {
                        get(b)?.clone()
                    };
                    let mut y = a.matmul(&b)?;
                    if *alpha != 1.0 {
                        y = y.affine(*alpha, 0.0)?;
                    }
                    match c {
                        Some(c) => {
                            let c = get(c)?;
                            let c = if *beta != 1.0 {
                                c.affine(*beta, 0.0)?
                            } else {
                                c.clone()
                            };
                            y.broadcast_add(&c)?
                        }
                        None => y,
                    }
                }
                Op::MatMul(a, b) => get(a)?.broadcast_matmul(get(b)?)?,
                Op::Add(a, b) => get(a)?.broadcast_add(get(b)?)?,
                Op::Identity(x) => get(x)?.clone(),
            };
            values.insert(out.clone(), y);
        }
        values
            .remove(&self.output)
            .ok_or_else(|| TrainError::Unsupported {
                path: self.path.clone(),
                message: format!("output {:?} is never computed", self.output),
            })
    }

    fn batch(&self, samples: &[&Labelled]) -> Result<(Tensor, Tensor), TrainError> {
        let norm = Normalizer::new(&self.config.input);
        let per = self.config.sample_len();
        let mut x = Vec::with_capacity(samples.len() * per);
        let mut y = Vec::with_capacity(samples.len());
        for s in samples {
            if s.pixels.len() != per {
                return Err(TrainError::Data(format!(
                    "a sample has {} values, the model takes {per}",
                    s.pixels.len()
                )));
            }
            if s.label as usize >= self.config.labels.len() {
                return Err(TrainError::Data(format!(
                    "label {} is outside the model's {} classes",
                    s.label,
                    self.config.labels.len()
                )));
            }
            norm.extend(&s.pixels, &mut x);
            y.push(s.label);
        }
        let mut shape = vec![samples.len()];
        shape.extend(self.config.input.shape.iter().copied());
        Ok((
            Tensor::from_vec(x, shape, &Device::Cpu)?,
            Tensor::from_vec(y, samples.len(), &Device::Cpu)?,
        ))
    }

    /// Fine-tunes on `new` (mixed with a fresh draw from `replay` each epoch).
    pub fn train(
        &mut self,
        new: &[Labelled],
        replay: &[Labelled],
        opts: &TrainOptions,
    ) -> Result<TrainReport, TrainError> {
        if new.is_empty() {
            return Err(TrainError::Data("no training samples".into()));
        }
        if opts.batch_size == 0 || opts.epochs == 0 {
            return Err(TrainError::Data(
                "epochs and batch_size must be at least 1".into(),
            ));
        }
        if !(opts.replay_ratio >= 0.0 && opts.replay_ratio.is_finite()) {
            return Err(TrainError::Data(format!(
                "replay_ratio {} is not a non-negative number",
                opts.replay_ratio
            )));
        }
        let start = Instant::now();
        let mut opt = AdamW::new(
            self.params.values().cloned().collect(),
            ParamsAdamW {
                lr: opts.learning_rate,
                weight_decay: opts.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let replay_n = ((new.len() as f64 * opts.replay_ratio).round() as usize).min(replay.len());
        let mut epoch_loss = Vec::with_capacity(opts.epochs);
        for _ in 0..opts.epochs {
            let mut mixed: Vec<&Labelled> = new.iter().collect();
            mixed.extend(replay.choose_multiple(&mut rng, replay_n));
            mixed.shuffle(&mut rng);
            let (mut sum, mut count) = (0.0, 0usize);
            for chunk in mixed.chunks(opts.batch_size) {
                let (x, y) = self.batch(chunk)?;
                let logits = self.forward(&x)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                opt.backward_step(&loss)?;
                sum += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
                count += chunk.len();
            }
            epoch_loss.push(sum / count.max(1) as f64);
        }
        Ok(TrainReport {
            samples: new.len(),
            replay: replay_n,
            epoch_loss,
            seconds: start.elapsed().as_secs_f64(),
            parameters: self.parameter_count(),
        })
    }

    /// The ONNX file with the current weights, everything else as read.
    pub fn to_onnx(&self) -> Result<Vec<u8>, TrainError> {
        let mut proto = self.proto.clone();
        if let Some(graph) = proto.graph.as_mut() {
            for init in &mut graph.initializer {
                if let Some(var) = self.params.get(&init.name) {
                    let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    init.float_data.clear();
                    init.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                }
            }
        }
        Ok(proto.encode_to_vec())
    }

    /// Writes the trained model to `path` with the base model's config beside it (same stem,
    /// `.json`), each written to a temporary name first and renamed, so a reader never sees half
    /// a model.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let write = |p: &Path, data: &[u8]| {
            write_atomic(p, data).map_err(|source| TrainError::Write {
                path: p.to_path_buf(),
                source,
            })
        };
        let config = serde_json::to_vec_pretty(&self.config)
            .map_err(|e| TrainError::Compute(e.to_string()))?;
        write(&path.with_extension("json"), &config)?;
        write(path, &self.to_onnx()?)
    }
}

/// A train worker's job (Sedna's train worker environment).
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The model to start from (`BASE_MODEL_URL`).
    pub base_model: PathBuf,
    /// Where the trained model goes (`MODEL_URL`, a directory): `<dir>/<base stem>.onnx` and its
    /// `.json` config.
    pub output_dir: PathBuf,
    /// The round's samples (`TRAIN_DATASET_URL`): an index with labels, an IDX file or images.
    pub train_data: PathBuf,
    /// Original data mixed in against forgetting (`REPLAY_DATASET_URL`, Sedge's own); none
    /// trains on the new samples alone.
    pub replay_data: Option<PathBuf>,
    /// At most this many replay samples are read.
    pub replay_limit: usize,
    /// How to train.
    pub options: TrainOptions,
}

/// What a train worker produced, in Sedna's result shape (`format`, `url`, `metrics` as lists).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainResult {
    /// `onnx`.
    pub format: String,
    /// The trained model file.
    pub url: String,
    /// `loss` per epoch, `samples`, `replay`, `train_seconds`.
    pub metrics: BTreeMap<String, Vec<f64>>,
}

/// Runs a train job: loads the data, fine-tunes, and writes the model (the config beside it).
pub fn run(job: &TrainJob) -> Result<TrainResult, Box<dyn std::error::Error + Send + Sync>> {
    let model = Model::load(&job.base_model)?;
    let (rows, cols) = model.config.input.image_dims();
    let new = crate::eval::load_labelled(&job.train_data, rows, cols, None)?;
    let replay = match &job.replay_data {
        Some(p) => crate::eval::load_labelled(p, rows, cols, Some(job.replay_limit))?,
        None => Vec::new(),
    };
    let mut trainer = OnnxTrainer::load(&model)?;
    let report = trainer.train(&new, &replay, &job.options)?;
    let stem = model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let out = job.output_dir.join(format!("{stem}.onnx"));
    trainer.save(&out)?;
    // What was written must load: a model no engine can read is never reported as trained.
    let written = Model::load(&out)?;
    crate::backend::load(&written, &crate::backend::BackendOptions::default())?;
    Ok(TrainResult {
        format: "onnx".into(),
        url: out.display().to_string(),
        metrics: BTreeMap::from([
            ("loss".to_string(), report.epoch_loss.clone()),
            ("samples".to_string(), vec![report.samples as f64]),
            ("replay".to_string(), vec![report.replay as f64]),
            ("train_seconds".to_string(), vec![report.seconds]),
        ]),
    })
}
