//! The edge's synchronous work on a batch of samples: decode, preprocess, infer, mine.
//!
//! It runs on a dedicated thread (never on the async runtime) and is what the pipeline benchmark
//! measures against the raw backend call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::mining::{HardExampleMining, Output};
use crate::model::ModelConfig;
use crate::preprocess::{Normalizer, activate, argmax};
use crate::source::{Payload, Sample};

/// When mining happens relative to edge inference (Sedna's `MINING_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MiningMode {
    /// Infer on the edge, then mine the edge output; hard samples are re-inferred in the cloud.
    #[default]
    InferenceThenMining,
    /// Mine the input first; a hard sample goes only to the cloud, an easy one only to the edge.
    MiningThenInference,
}

impl std::str::FromStr for MiningMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inference-then-mining" => Ok(MiningMode::InferenceThenMining),
            "mining-then-inference" => Ok(MiningMode::MiningThenInference),
            other => Err(format!(
                "unknown mining mode {other:?}; expected inference-then-mining or mining-then-inference"
            )),
        }
    }
}

/// A label with its probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// Class id.
    pub label: usize,
    /// Its probability.
    pub confidence: f32,
}

/// The edge's verdict on one sample.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The sample's id.
    pub id: String,
    /// Ground truth, when known.
    pub truth: Option<u32>,
    /// Decoded pixels (kept for offloading and for saving hard examples).
    pub pixels: Vec<u8>,
    /// The edge model's answer (`None` when the sample skipped edge inference or failed).
    pub edge: Option<Prediction>,
    /// Whether the sample goes to the cloud.
    pub hard: bool,
    /// Why the sample could not be processed.
    pub error: Option<String>,
    /// Edge time for this sample (a batch's time is shared equally by its samples).
    pub edge_time: Duration,
}

/// Decode, preprocess, infer, mine.
pub struct EdgePipeline {
    /// The model in service; a batch takes one reference at its start, so a swap never waits for
    /// a batch and no batch mixes two models.
    backend: RwLock<Arc<dyn Backend>>,
    /// How many times the model was swapped.
    version: AtomicU64,
    config: ModelConfig,
    norm: Normalizer,
    mining: HardExampleMining,
    mode: MiningMode,
}

impl EdgePipeline {
    /// Builds the pipeline. Mining before inference only works with rules that do not read the
    /// edge output (`Random`, `EdgeOnly`, `CloudOnly`); others are refused here.
    pub fn new(
        backend: Arc<dyn Backend>,
        config: ModelConfig,
        mining: HardExampleMining,
        mode: MiningMode,
    ) -> Result<Self, String> {
        if mode == MiningMode::MiningThenInference
            && !matches!(
                mining,
                HardExampleMining::Random { .. }
                    | HardExampleMining::EdgeOnly
                    | HardExampleMining::CloudOnly
            )
        {
            return Err(format!(
                "hard-example mining rule {} reads the edge model's output, so it cannot run before inference; use MINING_MODE=inference-then-mining, or Random, EdgeOnly or CloudOnly",
                mining.name()
            ));
        }
        Ok(EdgePipeline {
            norm: Normalizer::new(&config.input),
            backend: RwLock::new(backend),
            version: AtomicU64::new(0),
            config,
            mining,
            mode,
        })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Puts another model in service from the next batch on (hot update). Its config must feed
    /// and read it the same way (input, output and labels), else it is refused and the model in
    /// service stays. Returns the new version (1 after the first swap).
    pub fn swap_model(
        &self,
        backend: Arc<dyn Backend>,
        config: &ModelConfig,
    ) -> Result<u64, String> {
        if config.input != self.config.input
            || config.output != self.config.output
            || config.labels != self.config.labels
        {
            return Err(format!(
                "model {:?} is fed or read differently from the model in service {:?} (input, output or labels differ)",
                config.name, self.config.name
            ));
        }
        let old = std::mem::replace(
            &mut *self.backend.write().unwrap_or_else(|p| p.into_inner()),
            backend,
        );
        // Freed after the lock is released: tearing a model down is not part of the pause.
        drop(old);
        Ok(self.version.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Swaps so far.
    pub fn model_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The mining rule.
    pub fn mining(&self) -> &HardExampleMining {
        &self.mining
    }

    /// When mining happens.
    pub fn mining_mode(&self) -> MiningMode {
        self.mode
    }

    /// The model in service now.
    fn current(&self) -> Arc<dyn Backend> {
        self.backend
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn decode(&self, sample: Sample) -> (Decision, bool) {
        let (rows, cols) = self.config.input.image_dims();
        let mut d = Decision {
            id: sample.id,
            truth: sample.label,
            pixels: Vec::new(),
            edge: None,
            hard: false,
            error: None,
            edge_time: Duration::ZERO,
        };
        match sample.payload {
            Payload::Pixels(p) if p.len() == self.config.sample_len() => d.pixels = p,
            Payload::Pixels(p) => {
                d.error = Some(format!(
                    "sample has {} pixels, the model expects {}",
                    p.len(),
                    self.config.sample_len()
                ))
            }
            Payload::Encoded { path, bytes } => {
                match sedge_datasets::export::decode_grey(&bytes, &path, rows, cols) {
                    Ok(p) => d.pixels = p,
                    Err(e) => d.error = Some(e.to_string()),
                }
            }
            Payload::Unreadable(e) => d.error = Some(e),
        }
        let ok = d.error.is_none();
        (d, ok)
    }

    /// Processes a batch; a sample that cannot be decoded gets an error and does not stop the rest.
    pub fn process(&self, samples: Vec<Sample>) -> Vec<Decision> {
        let start = Instant::now();
        let mut decisions = Vec::with_capacity(samples.len());
        let mut to_infer = Vec::with_capacity(samples.len());
        for sample in samples {
            let (mut d, ok) = self.decode(sample);
            if ok
                && self.mode == MiningMode::MiningThenInference
                && self.mining.is_hard(Output::Probabilities(&[]))
            {
                d.hard = true;
            } else if ok {
                to_infer.push(decisions.len());
            }
            decisions.push(d);
        }
        if !to_infer.is_empty() {
            let mut input = Vec::with_capacity(to_infer.len() * self.config.sample_len());
            for &i in &to_infer {
                self.norm.extend(&decisions[i].pixels, &mut input);
            }
            match self.current().run(&input, to_infer.len()) {
                Ok(mut out) => {
                    let per = out.len() / to_infer.len();
                    for (row, &i) in out.chunks_mut(per.max(1)).zip(&to_infer) {
                        activate(row, self.config.output.activation);
                        let d = &mut decisions[i];
                        d.edge =
                            argmax(row).map(|(label, confidence)| Prediction { label, confidence });
                        d.hard = self.mode == MiningMode::InferenceThenMining
                            && self.mining.is_hard(Output::Probabilities(row));
                    }
                }
                Err(e) => {
                    // No edge answer: the cloud is the only source of one.
                    for &i in &to_infer {
                        decisions[i].error = Some(e.to_string());
                        decisions[i].hard = true;
                    }
                }
            }
        }
        let each = start.elapsed() / decisions.len().max(1) as u32;
        for d in &mut decisions {
            d.edge_time = each;
        }
        decisions
    }
}

/// The pipeline as an engine runs whichever model is in service when a batch starts, so a server
/// batching over it (the edge worker's endpoint) follows hot updates.
impl Backend for EdgePipeline {
    fn kind(&self) -> crate::backend::BackendKind {
        self.current().kind()
    }

    fn output_len(&self) -> usize {
        self.current().output_len()
    }

    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, crate::backend::BackendError> {
        self.current().run(input, batch)
    }
}
