//! Incremental learning under a domain shift, with zero human labels. Prints one table.
//!
//! The stream is Fashion-MNIST's training images seen through a new camera
//! ([`CameraShift::default`]: contrast 0.5, brightness +25, noise σ 10, seed 7). Each round:
//!
//! 1. the deployed edge model runs on the round's slice of the stream; the mining rule
//!    (`MaxProbability`, threshold 0.8 by default) picks the hard examples;
//! 2. the cloud model labels them (pseudo-labels: no ground truth is read, unless
//!    `--truth-labels` asks for it to show the gap);
//! 3. the samples are split by `trainProb` into train and eval, as the local controller does;
//! 4. the train worker's code fine-tunes the deployed model on the round's train samples, mixed
//!    with replay of the original (unshifted) training images;
//! 5. the eval worker's code scores the new and the deployed model on all eval samples so far
//!    (pseudo-labelled too), and the deploy trigger (`accuracy_delta > 0` by default, the
//!    trigger module's rules) decides whether the new model replaces the deployed one.
//!
//! Reported on the 10,000 test images, shifted (noise from another seed range) and original:
//! the edge model before, the cloud model, and the deployed edge model after every round, with
//! each round's time to train, evaluate and deploy (load the model into a backend).
//!
//! Run: `make bench-learning` (release build; data from `make data`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use sedge_ai_controller::crd::{Trigger, TriggerCondition};
use sedge_ai_controller::trigger::{Rule, TimeOfDay};
use sedge_datasets::shift::CameraShift;
use sedge_datasets::{FASHION_MNIST_DIR, Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::eval::{self, Scores};
use sedge_inference_worker::mining::{HardExampleMining, Output};
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::preprocess::argmax;
use sedge_inference_worker::train::{Labelled, OnnxTrainer, TrainOptions};

#[derive(Parser)]
#[command(about = "Incremental learning under a domain shift (prints a table)")]
struct Args {
    /// Rounds of the loop.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Shifted stream images per round.
    #[arg(long, default_value_t = 4000)]
    per_round: usize,
    /// Share of each round's hard examples used for training (the rest evaluate).
    #[arg(long, default_value_t = 0.8)]
    train_prob: f64,
    /// MaxProbability threshold of the mining rule.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// Train epochs per round.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Replay samples of original data per new sample.
    #[arg(long, default_value_t = 1.0)]
    replay_ratio: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-4)]
    learning_rate: f64,
    /// Deploy trigger metric (`accuracy_delta`, `precision_delta`, `min(recall_delta)`, ...).
    #[arg(long, default_value = "accuracy_delta")]
    deploy_metric: String,
    /// Deploy trigger operator.
    #[arg(long, default_value = ">")]
    deploy_operator: String,
    /// Deploy trigger threshold.
    #[arg(long, default_value_t = 0.0)]
    deploy_threshold: f64,
    /// Label hard examples with the ground truth instead of the cloud model (shows the gap).
    #[arg(long)]
    truth_labels: bool,
    /// Camera shift: contrast factor.
    #[arg(long)]
    contrast: Option<f32>,
    /// Camera shift: brightness offset (grey levels).
    #[arg(long)]
    brightness: Option<f32>,
    /// Camera shift: noise standard deviation (grey levels).
    #[arg(long)]
    noise: Option<f32>,
    /// Where Fashion-MNIST is.
    /// Hot swaps in the swap-under-load measurement (0 skips it).
    #[arg(long, default_value_t = 200)]
    swaps: usize,
    #[arg(long, default_value = FASHION_MNIST_DIR)]
    data: PathBuf,
}

fn opts() -> BackendOptions {
    BackendOptions {
        kind: BackendKind::Tract,
        ..Default::default()
    }
}

fn pct(s: &Scores) -> String {
    format!("{:.2}", s.accuracy * 100.0)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let d = CameraShift::default();
    let shift = CameraShift {
        contrast: a.contrast.unwrap_or(d.contrast),
        brightness: a.brightness.unwrap_or(d.brightness),
        noise_sigma: a.noise.unwrap_or(d.noise_sigma),
        seed: d.seed,
    };
    let train = fashion::load(&a.data, Split::Train).context("run `make data` first")?;
    let test = fashion::load(&a.data, Split::Test)?;
    let labelled = |set: &sedge_datasets::LabeledImages,
                    range: std::ops::Range<usize>,
                    shift_from: Option<u64>| {
        let labels = set.labels.as_ref().expect("labels");
        range
            .map(|i| {
                let mut pixels = set.images.image(i).to_vec();
                if let Some(first) = shift_from {
                    shift.apply(&mut pixels, first + i as u64);
                }
                Labelled {
                    pixels,
                    label: u32::from(labels[i]),
                }
            })
            .collect::<Vec<_>>()
    };
    let stream_len = a.rounds * a.per_round;
    anyhow::ensure!(
        stream_len <= 30_000,
        "rounds x per_round must be at most 30,000"
    );
    let stream = labelled(&train, 0..stream_len, Some(0));
    // Replay comes from the other half of the original training set, unshifted, with its labels.
    let replay = labelled(&train, 30_000..60_000, None);
    let test_shifted = labelled(&test, 0..test.images.len(), Some(1_000_000));
    let test_original = labelled(&test, 0..test.images.len(), None);

    let edge0 = Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx"))?;
    let cloud = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx"))?;
    let rule = HardExampleMining::MaxProbability {
        threshold: a.threshold,
    };
    let deploy = Rule::parse(&Trigger {
        check_period_seconds: None,
        timer: None,
        condition: TriggerCondition {
            operator: a.deploy_operator.clone(),
            threshold: a.deploy_threshold,
            metric: a.deploy_metric.clone(),
        },
    })?;

    let score = |m: &Model, s: &[Labelled]| eval::score(m, &opts(), s);
    let mut rows: Vec<[String; 9]> = Vec::new();
    for (name, m) in [
        ("edge model before", &edge0),
        ("cloud model (the labeller)", &cloud),
    ] {
        let mut row: [String; 9] = std::array::from_fn(|_| "-".to_string());
        row[0] = name.into();
        row[1] = pct(&score(m, &test_shifted)?);
        row[2] = pct(&score(m, &test_original)?);
        rows.push(row);
    }

    let dir = tempfile::tempdir()?;
    let mut trained: Vec<Model> = Vec::new();
    let mut deployed = edge0.clone();
    let mut eval_set: Vec<Labelled> = Vec::new();
    let mut pseudo_wrong = 0usize;
    let mut pseudo_total = 0usize;
    for round in 1..=a.rounds {
        let slice = &stream[(round - 1) * a.per_round..round * a.per_round];
        let edge_p = eval::probabilities(&deployed, &opts(), slice)?;
        let hard: Vec<Labelled> = slice
            .iter()
            .zip(&edge_p)
            .filter(|(_, p)| rule.is_hard(Output::Probabilities(p)))
            .map(|(s, _)| s.clone())
            .collect();
        let n_hard = hard.len();
        let cloud_p = eval::probabilities(&cloud, &opts(), &hard)?;
        let mut round_train = Vec::new();
        for (i, (s, p)) in hard.into_iter().zip(&cloud_p).enumerate() {
            let pseudo = argmax(p).map(|(l, _)| l as u32).unwrap_or(0);
            pseudo_total += 1;
            if pseudo != s.label {
                pseudo_wrong += 1;
            }
            let sample = Labelled {
                label: if a.truth_labels { s.label } else { pseudo },
                pixels: s.pixels,
            };
            // The LC's split: the first trainProb share of every 100 goes to train.
            if (i % 100) as f64 / 100.0 < a.train_prob {
                round_train.push(sample);
            } else {
                eval_set.push(sample);
            }
        }

        let t = Instant::now();
        let mut trainer = OnnxTrainer::load(&deployed)?;
        let report = trainer.train(
            &round_train,
            &replay,
            &TrainOptions {
                epochs: a.epochs,
                learning_rate: a.learning_rate,
                replay_ratio: a.replay_ratio,
                seed: round as u64,
                ..TrainOptions::default()
            },
        )?;
        let candidate_path = dir.path().join(format!("edge-cnn-round{round}.onnx"));
        trainer.save(&candidate_path)?;
        let train_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let candidate = Model::load(&candidate_path)?;
        trained.push(candidate.clone());
        let new = score(&candidate, &eval_set)?;
        let old = score(&deployed, &eval_set)?;
        let mut stats: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (k, v) in new.sedna_metrics() {
            let o = &old.sedna_metrics()[&k];
            stats.insert(
                format!("{k}_delta"),
                v.iter().zip(o).map(|(a, b)| a - b).collect(),
            );
            stats.insert(k, v);
        }
        let eval_s = t.elapsed().as_secs_f64();
        let fire = deploy.fires(TimeOfDay(0), &stats)?;

        let t = Instant::now();
        if fire {
            backend::load(&candidate, &opts())?;
            deployed = candidate;
        }
        let deploy_s = t.elapsed().as_secs_f64();
        let s = score(&deployed, &test_shifted)?;
        let o = score(&deployed, &test_original)?;
        rows.push([
            format!("after round {round}{}", if fire { "" } else { " (kept)" }),
            pct(&s),
            pct(&o),
            format!("{n_hard} / {}", slice.len()),
            format!(
                "{:.3} -> {:.3}",
                report.epoch_loss[0],
                report.epoch_loss.last().unwrap()
            ),
            format!("{train_s:.1}"),
            format!("{eval_s:.2}"),
            format!("{deploy_s:.3}"),
            format!("{:+.2}", (new.accuracy - old.accuracy) * 100.0),
        ]);
    }

    println!(
        "\nIncremental learning on Fashion-MNIST through a new camera ({} rounds of {} images, {} labels, trainProb {}, MaxProbability {}, {} epochs, replay {}x, deploy when {} {} {})\n",
        a.rounds,
        a.per_round,
        if a.truth_labels {
            "ground-truth"
        } else {
            "cloud pseudo-"
        },
        a.train_prob,
        a.threshold,
        a.epochs,
        a.replay_ratio,
        a.deploy_metric,
        a.deploy_operator,
        a.deploy_threshold
    );
    println!(
        "| model | shifted test acc % | original test acc % | hard examples | train loss | train s | eval s | deploy s | eval delta (points) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("| {} |", r.join(" | "));
    }
    println!(
        "\nPseudo-labels wrong (cloud model vs ground truth, measured only to report it): {:.1}% of {}",
        100.0 * pseudo_wrong as f64 / pseudo_total.max(1) as f64,
        pseudo_total
    );
    if a.swaps > 0 {
        trained.insert(0, edge0.clone());
        swap_under_load(&trained, &test_shifted, a.swaps)?;
    }
    Ok(())
}

/// What one sample costs while nothing happens, and while models are swapped in under it: a
/// thread feeds samples one at a time (batch 1, as a paced worker does) through the worker's own
/// pipeline; another swaps the models of the rounds in, `swaps` times, with the worker's hot-update
/// code path (load off the inference path, then `swap_model`). Reported: the swap's pause (the
/// write lock held) and the per-sample latency without and with swaps, in the same process.
fn swap_under_load(models: &[Model], samples: &[Labelled], swaps: usize) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use sedge_inference_worker::edge::percentile;
    use sedge_inference_worker::pipeline::{EdgePipeline, MiningMode};
    use sedge_inference_worker::source::{Payload, Sample};

    let first = &models[0];
    let pipeline = Arc::new(
        EdgePipeline::new(
            backend::load(first, &opts())?,
            first.config.clone(),
            HardExampleMining::MaxProbability { threshold: 0.8 },
            MiningMode::InferenceThenMining,
        )
        .map_err(anyhow::Error::msg)?,
    );
    let images: Arc<Vec<Vec<u8>>> = Arc::new(samples.iter().map(|s| s.pixels.clone()).collect());
    // Runs samples until `stop` or `max`; returns per-sample latency (ms) and how many were
    // answered.
    let feed = |stop: Arc<AtomicBool>, max: usize| {
        let p = pipeline.clone();
        let images = images.clone();
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut answered = 0usize;
            for i in 0..max {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let s = Sample {
                    id: i.to_string(),
                    payload: Payload::Pixels(images[i % images.len()].clone()),
                    label: None,
                };
                let t = Instant::now();
                let d = p.process(vec![s]);
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                answered += d.iter().filter(|d| d.edge.is_some()).count();
            }
            (lat, answered)
        })
    };
    let n = 5_000;
    let (mut base, base_ok) = feed(Arc::new(AtomicBool::new(false)), n)
        .join()
        .expect("feeder");

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(stop.clone(), usize::MAX / 2);
    let mut pauses = Vec::with_capacity(swaps);
    let mut loads = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let m = &models[(i + 1) % models.len()];
        let t = Instant::now();
        let b = backend::load(m, &opts())?;
        loads.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        pipeline
            .swap_model(b, &m.config)
            .map_err(anyhow::Error::msg)?;
        pauses.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    let (mut under, under_ok) = feeder.join().expect("feeder");

    let row = |name: &str, lat: &mut Vec<f64>, ok: usize| {
        let p50 = percentile(lat, 0.5);
        let p99 = percentile(lat, 0.99);
        let max = lat.iter().copied().fold(0.0, f64::max);
        println!(
            "| {name} | {} | {} | {p50:.3} | {p99:.3} | {max:.3} |",
            lat.len(),
            lat.len() - ok,
        );
        (p50, p99)
    };
    println!(
        "\nHot swap under load ({swaps} swaps of {} models, tract, batch 1)\n",
        models.len()
    );
    println!("| run | samples | unanswered | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    let (b50, b99) = row("no swaps (baseline)", &mut base, base_ok);
    let (u50, u99) = row(&format!("{swaps} swaps meanwhile"), &mut under, under_ok);
    println!(
        "\nratio with swaps / baseline: p50 {:.2}x, p99 {:.2}x",
        u50 / b50,
        u99 / b99
    );
    let (p50, p99) = (percentile(&mut pauses, 0.5), percentile(&mut pauses, 0.99));
    let (l50, l99) = (percentile(&mut loads, 0.5), percentile(&mut loads, 0.99));
    println!(
        "swap pause (write lock held): p50 {p50:.1} us, p99 {p99:.1} us; model load off the inference path: p50 {l50:.1} ms, p99 {l99:.1} ms; version now {}",
        pipeline.model_version()
    );
    Ok(())
}
