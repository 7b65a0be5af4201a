//! `incrementallearning`, as Ianvs runs it, with Sedge's own workers: the training stream
//! (`dataset.train_index`, optionally seen through another camera, `dataset.shift`) is cut into
//! `incremental_rounds` slices; each slice is split by `train_ratio` into a part to mine and a
//! part to evaluate. Each round:
//!
//! 1. the deployed model infers the mined part and the mining rule picks the hard examples;
//! 2. they are labelled by the `cloudmodel` when the algorithm has one (pseudo-labels, as the
//!    IncrementalLearningJob does), else by the ground truth (as Ianvs does: shows the gap);
//! 3. the train worker's code ([`OnnxTrainer`]) fine-tunes the deployed model on them, mixed
//!    with replay of the unshifted training images when there is a shift (`replay_ratio`);
//! 4. the new and the deployed model are scored on the round's evaluation part (ground truth) and
//!    the new one is deployed when `model_eval` holds for the change of its metric;
//! 5. the deployed model runs over the test set: the round's row of the leaderboard.
//!
//! Round 0 is the initial model on the test set. The basemodel's hyperparameters `epochs`,
//! `learning_rate` and `replay_ratio` set the training.

use std::time::Instant;

use futures::future::BoxFuture;
use sedge_inference_worker::backend::BackendOptions;
use sedge_inference_worker::eval;
use sedge_inference_worker::mining::{HardExampleMining, Output};
use sedge_inference_worker::model::Model;
use sedge_inference_worker::preprocess::argmax;
use sedge_inference_worker::train::{Labelled, OnnxTrainer, TrainOptions};

use super::{CaseContext, Paradigm, backend_options, hem_parameters};
use crate::expand::{Module, TestCase};
use crate::metrics::{Metric, Outcome, RoundOutcome};

/// What the runner hands an incremental-learning case (from the testenv and the algorithm).
#[derive(Debug, Clone)]
pub struct IncrementalSetting {
    /// `incremental_rounds`.
    pub rounds: usize,
    /// `dataset.train_index`, absolute.
    pub train_data: std::path::PathBuf,
    /// `dataset.test_index`, absolute.
    pub test_data: std::path::PathBuf,
    /// `model_eval`; without one, deploy when accuracy improves (`accuracy > 0`).
    pub model_eval: Option<crate::job::ModelEval>,
    /// `dataset.shift`.
    pub shift: Option<sedge_datasets::shift::CameraShift>,
    /// `dataset.train_limit`.
    pub train_limit: Option<usize>,
    /// Each algorithm's `incremental_learning_data_setting.train_ratio` (0.8 when unset).
    pub train_ratio: std::collections::BTreeMap<String, f64>,
}

/// Mine, label, train, evaluate, deploy, round after round.
pub struct IncrementalLearning;

impl Paradigm for IncrementalLearning {
    fn name(&self) -> &'static str {
        "incrementallearning"
    }

    fn required(&self) -> &'static [&'static str] {
        &["basemodel", "hard_example_mining"]
    }

    fn optional(&self) -> &'static [&'static str] {
        &["cloudmodel"]
    }

    fn run<'a>(
        &'a self,
        case: &'a TestCase,
        ctx: &'a CaseContext,
    ) -> BoxFuture<'a, Result<Outcome, String>> {
        Box::pin(async move {
            let setting = ctx.incremental.clone().ok_or(
                "incrementallearning needs testenv's incremental_rounds and dataset.train_index",
            )?;
            let case = case.clone();
            let (limit, dir, progress) = (ctx.limit, ctx.output_dir.clone(), ctx.progress.clone());
            tokio::task::spawn_blocking(move || rounds(&case, &setting, limit, &dir, &progress))
                .await
                .map_err(|e| format!("incremental learning stopped: {e}"))?
        })
    }
}

/// Training settings from the basemodel's hyperparameters.
fn train_options(base: &Module) -> Result<TrainOptions, String> {
    let mut o = TrainOptions::default();
    let num = |k: &str| -> Result<Option<f64>, String> {
        base.param(k)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("basemodel {k} {v:?} is not a number of 0 or more"))
            })
            .transpose()
    };
    if let Some(e) = num("epochs")? {
        o.epochs = (e as usize).max(1);
    }
    if let Some(lr) = num("learning_rate")? {
        o.learning_rate = lr;
    }
    if let Some(r) = num("replay_ratio")? {
        o.replay_ratio = r;
    }
    Ok(o)
}

/// The test pass of `model`: an outcome with its predictions.
fn test_pass(model: &Model, opts: &BackendOptions, test: &[Labelled]) -> Result<Outcome, String> {
    let start = Instant::now();
    let probs = eval::probabilities(model, opts, test).map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let per_ms = secs * 1e3 / test.len().max(1) as f64;
    Ok(Outcome {
        truth: test.iter().map(|s| s.label).collect(),
        predicted: probs
            .iter()
            .map(|p| argmax(p).map(|(l, _)| l as u32))
            .collect(),
        inferred: test.len() as u64,
        // Batched inference: the time per sample, as both percentiles.
        latency_p50_ms: per_ms,
        latency_p99_ms: per_ms,
        throughput: test.len() as f64 / secs.max(1e-9),
        ..Outcome::default()
    })
}

fn rounds(
    case: &TestCase,
    s: &IncrementalSetting,
    limit: Option<usize>,
    dir: &std::path::Path,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<Outcome, String> {
    let base = &case.modules["basemodel"];
    let hem = &case.modules["hard_example_mining"];
    let cloud = case.modules.get("cloudmodel");
    let opts = backend_options(base)?;
    let train = train_options(base)?;
    let rule = HardExampleMining::from_env_strings(&hem.name, &hem_parameters(hem))
        .map_err(|e| e.to_string())?;
    let train_ratio = s.train_ratio.get(&case.algorithm).copied().unwrap_or(0.8);
    let initial =
        Model::load(base.url.as_ref().ok_or("basemodel has no url")?).map_err(|e| e.to_string())?;
    let labeller = match cloud {
        Some(c) => Some((
            Model::load(c.url.as_ref().ok_or("cloudmodel has no url")?)
                .map_err(|e| e.to_string())?,
            backend_options(c)?,
        )),
        None => None,
    };
    let (rows, cols) = initial.config.input.image_dims();
    let load = |path: &std::path::Path, limit, first: u64| -> Result<Vec<Labelled>, String> {
        let mut v = eval::load_labelled(path, rows, cols, limit).map_err(|e| e.to_string())?;
        if let Some(shift) = &s.shift {
            for (i, x) in v.iter_mut().enumerate() {
                shift.apply(&mut x.pixels, first + i as u64);
            }
        }
        Ok(v)
    };
    let stream = load(&s.train_data, s.train_limit, 0)?;
    // Replay: the training images as the original camera saw them (none without a shift).
    let replay = match s.shift {
        Some(_) => eval::load_labelled(&s.train_data, rows, cols, s.train_limit)
            .map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let test = load(&s.test_data, limit, 1_000_000)?;
    let per_round = stream.len() / s.rounds;
    if per_round == 0 {
        return Err(format!(
            "dataset.train_index has {} samples, fewer than the {} rounds",
            stream.len(),
            s.rounds
        ));
    }
    let deploy_rule = s.model_eval.clone();
    // The leaderboard's own metric of that name, so a deploy decision and a row agree.
    let metric = Metric::parse(
        deploy_rule
            .as_ref()
            .map_or("accuracy", |m| m.model_metric.name.as_str()),
    )?;

    let mut deployed = initial.clone();
    let mut out = Vec::new();
    let first = test_pass(&deployed, &opts, &test)?;
    progress.fetch_add(test.len() as u64, std::sync::atomic::Ordering::SeqCst);
    out.push(RoundOutcome {
        round: 0,
        deployed: true,
        outcome: first,
    });
    for round in 1..=s.rounds {
        let slice = &stream[(round - 1) * per_round..round * per_round];
        let cut = ((slice.len() as f64) * train_ratio).round() as usize;
        let (mine, evaluate) = slice.split_at(cut.min(slice.len()));
        let probs = eval::probabilities(&deployed, &opts, mine).map_err(|e| e.to_string())?;
        let hard: Vec<&Labelled> = mine
            .iter()
            .zip(&probs)
            .filter(|(_, p)| rule.is_hard(Output::Probabilities(p)))
            .map(|(x, _)| x)
            .collect();
        let labelled: Vec<Labelled> = match &labeller {
            Some((model, o)) => {
                let owned: Vec<Labelled> = hard.iter().map(|x| (*x).clone()).collect();
                let p = eval::probabilities(model, o, &owned).map_err(|e| e.to_string())?;
                owned
                    .into_iter()
                    .zip(&p)
                    .map(|(x, p)| Labelled {
                        label: argmax(p).map_or(0, |(l, _)| l as u32),
                        pixels: x.pixels,
                    })
                    .collect()
            }
            None => hard.iter().map(|x| (*x).clone()).collect(),
        };
        let mut promoted = false;
        if !labelled.is_empty() && !evaluate.is_empty() {
            let mut trainer = OnnxTrainer::load(&deployed).map_err(|e| e.to_string())?;
            trainer
                .train(
                    &labelled,
                    &replay,
                    &TrainOptions {
                        seed: round as u64,
                        ..train.clone()
                    },
                )
                .map_err(|e| format!("round {round}: training: {e}"))?;
            let path = dir.join(format!("round-{round}")).join("model.onnx");
            std::fs::create_dir_all(path.parent().expect("has a parent"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            trainer.save(&path).map_err(|e| e.to_string())?;
            let candidate = Model::load(&path).map_err(|e| e.to_string())?;
            let score = |m: &Model| -> Result<f64, String> {
                metric
                    .compute(&test_pass(m, &opts, evaluate)?)
                    .ok_or_else(|| format!("round {round}: no evaluation samples to score"))
            };
            let delta = score(&candidate)? - score(&deployed)?;
            promoted = match &deploy_rule {
                Some(m) => m.holds(delta),
                None => delta > 0.0,
            };
            if promoted {
                deployed = candidate;
            }
        }
        let mut o = test_pass(&deployed, &opts, &test)?;
        progress.fetch_add(test.len() as u64, std::sync::atomic::Ordering::SeqCst);
        o.offloaded = hard.len() as u64;
        o.inferred = mine.len() as u64;
        out.push(RoundOutcome {
            round,
            deployed: promoted,
            outcome: o,
        });
    }
    // The case's own row is its last round, with that round's numbers like every other row.
    let mut last = out.last().map(|r| r.outcome.clone()).unwrap_or_default();
    last.rounds = out;
    Ok(last)
}
