//! The joint-inference Pareto front: for each mining rule, the lowest share of images offloaded at
//! which joint accuracy is at least the cloud model's, and joint accuracy at 5/10/20% offloaded;
//! with the edge model's confidences as they are and temperature-calibrated.
//!
//! Both models run once over the test set; a rule then offloads the images whose score (top
//! probability for MaxProbability, top-two gap for Margin, `1 - H/ln N` for CrossEntropy) is
//! lowest, so every threshold is covered exactly, not by a coarse sweep: offloading the `k`
//! lowest-scoring images is the rule at a threshold between the `k`-th and `k+1`-th score. The
//! threshold found is checked against the rule itself (`HardExampleMining::is_hard`).
//!
//! Calibration: one temperature `T` for the edge model's logits (`softmax(ln p / T)`), fitted by
//! the negative log-likelihood on 5,000 images of the training split, never on the test set.
//!
//! Run with `make bench-pareto` (Debian's 10,000 test images; `--sample` for the committed 500).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::mining::{HardExampleMining, Output};
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::preprocess::{Normalizer, activate, argmax, softmax};

#[derive(Parser)]
#[command(about = "Joint-inference Pareto front per mining rule (prints a table)")]
struct Args {
    /// Directory with Fashion-MNIST's IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Use the 500-image sample committed in datasets/ (no calibration split there: T is fitted
    /// on nothing and stays 1).
    #[arg(long)]
    sample: bool,
    /// Inference engine.
    #[arg(long, default_value = "tract")]
    backend: BackendKind,
    /// Training images used to fit the temperature.
    #[arg(long, default_value_t = 5000)]
    calibration: usize,
}

/// Probabilities of `model` for `n` images of `pixels`, one row each.
fn probabilities(model: &str, pixels: &[u8], opts: &BackendOptions) -> Result<Vec<Vec<f32>>> {
    let m = Model::load(models_dir().join(model))?;
    let b = backend::load(&m, opts)?;
    let norm = Normalizer::new(&m.config.input);
    let per = m.config.sample_len();
    let mut rows = Vec::new();
    for chunk in pixels.chunks(per * 64) {
        let mut x = Vec::with_capacity(chunk.len());
        norm.extend(chunk, &mut x);
        let n = chunk.len() / per;
        let out = b.run(&x, n)?;
        for r in out.chunks(out.len() / n) {
            let mut r = r.to_vec();
            activate(&mut r, m.config.output.activation);
            rows.push(r);
        }
    }
    Ok(rows)
}

/// `softmax(ln p / t)`.
fn temper(p: &[f32], t: f64) -> Vec<f32> {
    let mut v: Vec<f32> = p
        .iter()
        .map(|&x| (f64::from(x.max(1e-30)).ln() / t) as f32)
        .collect();
    softmax(&mut v);
    v
}

/// The temperature with the least negative log-likelihood of the true labels (grid 0.5 .. 5).
fn fit_temperature(rows: &[Vec<f32>], labels: &[u8]) -> f64 {
    let nll = |t: f64| -> f64 {
        rows.iter()
            .zip(labels)
            .map(|(p, &y)| -f64::from(temper(p, t)[y as usize].max(1e-30)).ln())
            .sum::<f64>()
    };
    (10..=100)
        .map(|i| f64::from(i) * 0.05)
        .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
        .unwrap_or(1.0)
}

#[derive(Clone, Copy)]
enum Rule {
    MaxProbability,
    Margin,
    CrossEntropy,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::MaxProbability => "MaxProbability",
            Rule::Margin => "Margin",
            Rule::CrossEntropy => "CrossEntropy",
        }
    }

    /// The score the rule compares with its threshold (hard iff score < threshold).
    fn score(self, p: &[f32]) -> f64 {
        let mut s: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        match self {
            Rule::MaxProbability => s[0],
            Rule::Margin => s[0] - s.get(1).copied().unwrap_or(0.0),
            Rule::CrossEntropy => {
                let h: f64 = s.iter().filter(|&&v| v > 0.0).map(|&v| -v * v.ln()).sum();
                1.0 - h / (s.len() as f64).ln()
            }
        }
    }

    fn at(self, threshold: f64) -> HardExampleMining {
        match self {
            Rule::MaxProbability => HardExampleMining::MaxProbability { threshold },
            Rule::Margin => HardExampleMining::Margin { threshold },
            Rule::CrossEntropy => HardExampleMining::CrossEntropy { threshold },
        }
    }
}

/// The curve of one rule: images sorted by score, and joint correct counts for offloading the
/// first `k` of them.
struct Curve {
    scores: Vec<f64>,
    correct: Vec<usize>,
}

fn curve(rule: Rule, edge: &[Vec<f32>], edge_ok: &[bool], cloud_ok: &[bool]) -> Curve {
    let mut order: Vec<(f64, usize)> = edge
        .iter()
        .enumerate()
        .map(|(i, p)| (rule.score(p), i))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut correct = Vec::with_capacity(order.len() + 1);
    let mut c = edge_ok.iter().filter(|&&b| b).count();
    correct.push(c);
    for &(_, i) in &order {
        c = c + usize::from(cloud_ok[i]) - usize::from(edge_ok[i]);
        correct.push(c);
    }
    Curve {
        scores: order.iter().map(|o| o.0).collect(),
        correct,
    }
}

impl Curve {
    /// The fewest images offloaded for at least `target` correct (ties in score go together).
    fn fewest_for(&self, target: usize) -> Option<usize> {
        (0..self.correct.len())
            .filter(|&k| k == 0 || k == self.scores.len() || self.scores[k - 1] < self.scores[k])
            .find(|&k| self.correct[k] >= target)
    }

    /// The threshold that offloads exactly the first `k` (k < n).
    fn threshold(&self, k: usize) -> f64 {
        match k {
            0 => self.scores[0],
            k if k >= self.scores.len() => self.scores[k - 1] + 1e-9,
            k => (self.scores[k - 1] + self.scores[k]) / 2.0,
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = if args.sample {
        fashion::sample_dir()
    } else {
        args.data.clone()
    };
    let test = fashion::load(&dir, Split::Test).with_context(|| {
        format!(
            "no Fashion-MNIST test split in {} (make data)",
            dir.display()
        )
    })?;
    let labels = test.labels.clone().context("the test split has labels")?;
    let opts = BackendOptions {
        kind: args.backend,
        ..Default::default()
    };
    let n = labels.len();
    let edge = probabilities("fashion-mnist/edge-cnn.onnx", &test.images.pixels, &opts)?;
    let cloud = probabilities("fashion-mnist/cloud-cnn.onnx", &test.images.pixels, &opts)?;
    if edge.len() != n || cloud.len() != n {
        bail!(
            "{} edge and {} cloud rows for {n} images",
            edge.len(),
            cloud.len()
        );
    }
    let edge_ok: Vec<bool> = edge
        .iter()
        .zip(&labels)
        .map(|(p, &y)| argmax(p).map(|(l, _)| l) == Some(y as usize))
        .collect();
    let cloud_ok: Vec<bool> = cloud
        .iter()
        .zip(&labels)
        .map(|(p, &y)| argmax(p).map(|(l, _)| l) == Some(y as usize))
        .collect();
    let cloud_correct = cloud_ok.iter().filter(|&&b| b).count();
    let edge_correct = edge_ok.iter().filter(|&&b| b).count();
    let oracle = edge_ok
        .iter()
        .zip(&cloud_ok)
        .filter(|(e, c)| !**e && **c)
        .count();

    let t = if args.sample {
        1.0
    } else {
        let train = fashion::load(&dir, Split::Train)?;
        let m = args.calibration.min(train.images.len());
        let rows = probabilities(
            "fashion-mnist/edge-cnn.onnx",
            &train.images.pixels[..m * 784],
            &opts,
        )?;
        fit_temperature(&rows, &train.labels.context("train labels")?[..m])
    };
    let calibrated: Vec<Vec<f32>> = edge.iter().map(|p| temper(p, t)).collect();

    let pct = |c: usize| c as f64 * 100.0 / n as f64;
    println!(
        "Joint-inference Pareto front, {n} Fashion-MNIST test images, {} backend: edge alone {:.2}%, cloud alone {:.2}%",
        args.backend,
        pct(edge_correct),
        pct(cloud_correct)
    );
    println!(
        "oracle (offload exactly the images the edge gets wrong and the cloud right): {:.2}% offloaded for {:.2}%",
        pct(oracle),
        pct(edge_correct + oracle)
    );
    println!(
        "temperature fitted on {} training images: T = {t:.2}",
        if args.sample { 0 } else { args.calibration }
    );
    println!();
    println!(
        "{:<15} {:<12} {:>22} {:>10} {:>10} {:>10} {:>10}",
        "rule",
        "confidences",
        "offload for >= cloud",
        "threshold",
        "acc @5%",
        "acc @10%",
        "acc @20%"
    );
    for rule in [Rule::MaxProbability, Rule::Margin, Rule::CrossEntropy] {
        for (label, rows) in [("raw", &edge), ("calibrated", &calibrated)] {
            let c = curve(rule, rows, &edge_ok, &cloud_ok);
            let at = |share: f64| pct(c.correct[((n as f64) * share).round() as usize]);
            let (offload, threshold) = match c.fewest_for(cloud_correct) {
                Some(k) => {
                    let th = c.threshold(k);
                    // The rule itself, at that threshold, offloads exactly those k images.
                    let rule_k = rows
                        .iter()
                        .filter(|p| rule.at(th).is_hard(Output::Probabilities(p)))
                        .count();
                    if rule_k != k {
                        bail!(
                            "{} at {th}: the rule offloads {rule_k}, the curve says {k}",
                            rule.name()
                        );
                    }
                    (format!("{:.2}%", pct(k)), format!("{th:.4}"))
                }
                None => ("never".to_string(), "-".to_string()),
            };
            println!(
                "{:<15} {:<12} {:>22} {:>10} {:>9.2}% {:>9.2}% {:>9.2}%",
                rule.name(),
                label,
                offload,
                threshold,
                at(0.05),
                at(0.10),
                at(0.20)
            );
        }
    }
    Ok(())
}
