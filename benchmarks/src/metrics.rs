//! Built-in metrics. Each is defined here, in words and in code; `docs/benchmarks.md` repeats the
//! definitions.
//!
//! Classification metrics compare the final label of each test sample with its ground truth; a
//! sample with no answer (undecodable, or no model answered) counts as wrong.
//!
//! | name | definition |
//! |---|---|
//! | `accuracy` | correct / samples with ground truth, in [0, 1] |
//! | `precision` | macro average over classes of TP / (TP + FP); a class never predicted scores 0 |
//! | `recall` | macro average over classes of TP / (TP + FN) |
//! | `f1_score` | macro average over classes of 2PR / (P + R); 0 where P + R = 0 |
//! | `samples_transfer_ratio` | samples offloaded to the cloud / samples inferred. Ianvs divides by inferred + 1; we do not, so 1.0 means everything was offloaded |
//! | `cloud_only_accuracy_gap` | accuracy of the test case's cloud model alone on the same samples minus this case's accuracy (positive: below the cloud; empty for cases without a cloud model) |
//! | `latency_p50`, `latency_p99` | median and 99th percentile time per sample in milliseconds: edge time (decode, preprocess, infer, mine) plus the cloud round trip for offloaded samples |
//! | `throughput` | samples per second over the whole test case |
//! | `bytes_offloaded` | request bytes sent to the cloud (protobuf-encoded OIP gRPC messages) |
//!
//! Classes are those present in the ground truth or in the predictions (as scikit-learn does).

use std::collections::BTreeSet;

/// Names of the built-in metrics.
pub const NAMES: [&str; 10] = [
    "accuracy",
    "f1_score",
    "precision",
    "recall",
    "samples_transfer_ratio",
    "cloud_only_accuracy_gap",
    "latency_p50",
    "latency_p99",
    "throughput",
    "bytes_offloaded",
];

/// A built-in metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Share of correct answers.
    Accuracy,
    /// Macro F1.
    F1Score,
    /// Macro precision.
    Precision,
    /// Macro recall.
    Recall,
    /// Offloaded / inferred.
    SamplesTransferRatio,
    /// Cloud-only accuracy minus this accuracy.
    CloudOnlyAccuracyGap,
    /// Median ms per sample.
    LatencyP50,
    /// 99th percentile ms per sample.
    LatencyP99,
    /// Samples per second.
    Throughput,
    /// Bytes sent to the cloud.
    BytesOffloaded,
}

impl Metric {
    /// Looks a metric up by its name.
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "accuracy" => Metric::Accuracy,
            "f1_score" => Metric::F1Score,
            "precision" => Metric::Precision,
            "recall" => Metric::Recall,
            "samples_transfer_ratio" => Metric::SamplesTransferRatio,
            "cloud_only_accuracy_gap" => Metric::CloudOnlyAccuracyGap,
            "latency_p50" => Metric::LatencyP50,
            "latency_p99" => Metric::LatencyP99,
            "throughput" => Metric::Throughput,
            "bytes_offloaded" => Metric::BytesOffloaded,
            other => {
                return Err(format!(
                    "unknown metric {other:?}; built-in metrics are {}",
                    NAMES.join(", ")
                ));
            }
        })
    }

    /// The metric's value for a finished test case, if it is defined for it.
    pub fn compute(self, o: &Outcome) -> Option<f64> {
        match self {
            Metric::Accuracy => accuracy(&o.truth, &o.predicted),
            Metric::F1Score => macro_scores(&o.truth, &o.predicted).map(|s| s.2),
            Metric::Precision => macro_scores(&o.truth, &o.predicted).map(|s| s.0),
            Metric::Recall => macro_scores(&o.truth, &o.predicted).map(|s| s.1),
            Metric::SamplesTransferRatio => {
                (o.inferred > 0).then(|| o.offloaded as f64 / o.inferred as f64)
            }
            Metric::CloudOnlyAccuracyGap => {
                Some(o.cloud_only_accuracy? - accuracy(&o.truth, &o.predicted)?)
            }
            Metric::LatencyP50 => Some(o.latency_p50_ms),
            Metric::LatencyP99 => Some(o.latency_p99_ms),
            Metric::Throughput => Some(o.throughput),
            Metric::BytesOffloaded => Some(o.bytes_offloaded as f64),
        }
    }
}

/// What a test case produced, as the metrics need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Ground truth of each labelled sample.
    pub truth: Vec<u32>,
    /// Final label of the same samples (`None`: no answer).
    pub predicted: Vec<Option<u32>>,
    /// Samples inferred.
    pub inferred: u64,
    /// Samples offloaded to the cloud.
    pub offloaded: u64,
    /// Median ms per sample.
    pub latency_p50_ms: f64,
    /// 99th percentile ms per sample.
    pub latency_p99_ms: f64,
    /// Samples per second.
    pub throughput: f64,
    /// Bytes sent to the cloud.
    pub bytes_offloaded: u64,
    /// Accuracy of the cloud model alone on the same samples, where there is one.
    pub cloud_only_accuracy: Option<f64>,
    /// Incremental learning: the test pass after each round (the case's own fields are the last
    /// round's), each a row of the leaderboard.
    pub rounds: Vec<RoundOutcome>,
}

/// One round of incremental learning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundOutcome {
    /// 1 for the first round; 0 is the initial model before any.
    pub round: usize,
    /// Whether the round's model was deployed.
    pub deployed: bool,
    /// The test pass with the model deployed after the round, and the round's mining counts.
    pub outcome: Outcome,
}

/// Correct / labelled; `None` without labelled samples.
pub fn accuracy(truth: &[u32], predicted: &[Option<u32>]) -> Option<f64> {
    if truth.is_empty() {
        return None;
    }
    let correct = truth
        .iter()
        .zip(predicted)
        .filter(|(t, p)| Some(**t) == **p)
        .count();
    Some(correct as f64 / truth.len() as f64)
}

/// Macro (precision, recall, F1).
pub fn macro_scores(truth: &[u32], predicted: &[Option<u32>]) -> Option<(f64, f64, f64)> {
    if truth.is_empty() {
        return None;
    }
    let classes: BTreeSet<u32> = truth
        .iter()
        .copied()
        .chain(predicted.iter().flatten().copied())
        .collect();
    let (mut p_sum, mut r_sum, mut f_sum) = (0.0, 0.0, 0.0);
    for &c in &classes {
        let tp = truth
            .iter()
            .zip(predicted)
            .filter(|(t, p)| **t == c && **p == Some(c))
            .count() as f64;
        let fp = truth
            .iter()
            .zip(predicted)
            .filter(|(t, p)| **t != c && **p == Some(c))
            .count() as f64;
        let fn_ = truth
            .iter()
            .zip(predicted)
            .filter(|(t, p)| **t == c && **p != Some(c))
            .count() as f64;
        let p = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
        let r = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
        let f = if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        };
        p_sum += p;
        r_sum += r;
        f_sum += f;
    }
    let n = classes.len() as f64;
    Some((p_sum / n, r_sum / n, f_sum / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_classification_metrics() {
        // truth:     0 0 0 1 1 2
        // predicted: 0 0 1 1 2 -   (last sample unanswered)
        let truth = [0, 0, 0, 1, 1, 2];
        let pred = [Some(0), Some(0), Some(1), Some(1), Some(2), None];
        assert!(close(accuracy(&truth, &pred).unwrap(), 3.0 / 6.0));
        // class 0: tp 2 fp 0 fn 1 -> p 1, r 2/3, f 0.8
        // class 1: tp 1 fp 1 fn 1 -> p 1/2, r 1/2, f 1/2
        // class 2: tp 0 fp 1 fn 1 -> p 0, r 0, f 0
        let (p, r, f) = macro_scores(&truth, &pred).unwrap();
        assert!(close(p, (1.0 + 0.5 + 0.0) / 3.0));
        assert!(close(r, (2.0 / 3.0 + 0.5 + 0.0) / 3.0));
        assert!(close(f, (0.8 + 0.5 + 0.0) / 3.0));
    }

    #[test]
    fn perfect_and_empty() {
        let (p, r, f) = macro_scores(&[1, 2], &[Some(1), Some(2)]).unwrap();
        assert!(close(p, 1.0) && close(r, 1.0) && close(f, 1.0));
        assert_eq!(accuracy(&[], &[]), None);
        assert_eq!(macro_scores(&[], &[]), None);
    }

    #[test]
    fn system_metrics_from_the_outcome() {
        let o = Outcome {
            rounds: Vec::new(),
            truth: vec![1, 1, 0, 0],
            predicted: vec![Some(1), Some(0), Some(0), Some(0)],
            inferred: 4,
            offloaded: 1,
            latency_p50_ms: 0.5,
            latency_p99_ms: 2.0,
            throughput: 100.0,
            bytes_offloaded: 812,
            cloud_only_accuracy: Some(1.0),
        };
        assert_eq!(
            Metric::SamplesTransferRatio.compute(&o),
            Some(0.25),
            "no +1 in the denominator"
        );
        assert!(close(
            Metric::CloudOnlyAccuracyGap.compute(&o).unwrap(),
            0.25
        ));
        assert_eq!(Metric::LatencyP99.compute(&o), Some(2.0));
        assert_eq!(Metric::BytesOffloaded.compute(&o), Some(812.0));
        assert_eq!(
            Metric::CloudOnlyAccuracyGap.compute(&Outcome {
                rounds: Vec::new(),
                cloud_only_accuracy: None,
                ..o.clone()
            }),
            None
        );
        assert_eq!(
            Metric::SamplesTransferRatio.compute(&Outcome::default()),
            None
        );
    }

    #[test]
    fn every_name_parses_and_unknown_names_list_the_choices() {
        for n in NAMES {
            assert!(Metric::parse(n).is_ok(), "{n}");
        }
        let err = Metric::parse("mAP").unwrap_err();
        assert!(
            err.contains("unknown metric \"mAP\"") && err.contains("f1_score"),
            "{err}"
        );
    }
}
