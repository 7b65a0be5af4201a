//! Hard-example mining: decides which edge results are too uncertain to keep, so that the sample is
//! offloaded to the cloud model.
//!
//! Names and parameters follow Sedna (`HEM_NAME`, `HEM_PARAMETERS` as a JSON list of
//! `{"key": ..., "value": "..."}` with string values). Unlike Sedna, every parameter is validated
//! when the rule is built, so a typo fails at start-up with a message naming the parameter, and the
//! edge cases Sedna crashes on are defined:
//!
//! | case | decision |
//! |---|---|
//! | classifier output is empty | hard: the edge has no answer, only the cloud can give one |
//! | a probability is NaN, negative or above 1 | hard: the edge output cannot be trusted |
//! | `p = 0` in `CrossEntropy` | contributes 0 (the limit of `p ln p`), no math error |
//! | one class (`CrossEntropy`, `Margin`) | confidence 1: never hard |
//! | no detected boxes (`IBT`, `Threshold`) | not hard (as Sedna: an empty frame is common) |
//!
//! Thresholds are parsed and compared as `f64`, as Sedna's Python does, so decisions at the
//! boundary (`r >= 1 - threshold_img` with 0.9) come out the same.
//!
//! Classifier outputs fed to the box rules `IBT` and `Threshold` are read as a single box whose score
//! is the top probability, so those rules also work on Fashion-MNIST.

use std::str::FromStr;
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Why a mining rule could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MiningError {
    /// `HEM_NAME` is not one of the known rules.
    #[error("unknown hard-example mining rule {0:?}; expected one of {KNOWN}")]
    UnknownRule(String),
    /// A parameter this rule does not take.
    #[error("hard-example mining rule {rule} has no parameter {key:?}; it takes {accepted}")]
    UnknownParameter {
        /// The rule.
        rule: &'static str,
        /// The parameter given.
        key: String,
        /// The parameters it takes.
        accepted: &'static str,
    },
    /// A parameter value that is not a number in range.
    #[error("hard-example mining rule {rule}: parameter {key} = {value:?} is not {expected}")]
    BadValue {
        /// The rule.
        rule: &'static str,
        /// The parameter.
        key: String,
        /// The value given.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// `HEM_PARAMETERS` is not a JSON list of `{key, value}`.
    #[error("HEM_PARAMETERS is not a JSON list of {{\"key\": ..., \"value\": ...}} objects: {0}")]
    BadParameterList(String),
}

const KNOWN: &str =
    "CrossEntropy, Threshold, IBT, Random, EdgeOnly, CloudOnly, MaxProbability, Margin";

/// One `{key, value}` pair as Sedna's CRDs carry them (values are strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// Parameter name.
    pub key: String,
    /// Parameter value, as a string.
    pub value: String,
}

/// Parses `HEM_PARAMETERS`. Numbers and booleans given unquoted are accepted and turned into strings.
pub fn parse_parameters(json: &str) -> Result<Vec<Param>, MiningError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Loose {
        key: String,
        value: serde_json::Value,
    }
    let loose: Vec<Loose> =
        serde_json::from_str(json).map_err(|e| MiningError::BadParameterList(e.to_string()))?;
    loose
        .into_iter()
        .map(|p| {
            let value = match p.value {
                serde_json::Value::String(s) => s,
                v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => v.to_string(),
                other => {
                    return Err(MiningError::BadParameterList(format!(
                        "value of {:?} is {other}, expected a string",
                        p.key
                    )));
                }
            };
            Ok(Param { key: p.key, value })
        })
        .collect()
}

/// What the edge model produced for one sample.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// Class probabilities of a classifier.
    Probabilities(&'a [f32]),
    /// Detected boxes `[x1, y1, x2, y2, score, label]` of a detector.
    Boxes(&'a [[f32; 6]]),
}

/// A configured mining rule.
#[derive(Debug)]
pub enum HardExampleMining {
    /// Hard iff `1 - H(p)/ln N < threshold_cross_entropy`.
    CrossEntropy {
        /// `threshold_cross_entropy`, default 0.5.
        threshold: f64,
    },
    /// Hard iff the mean box score `< threshold`.
    Threshold {
        /// `threshold`, default 0.5.
        threshold: f64,
    },
    /// Image-box threshold: hard iff the share of boxes scoring `<= threshold_box` is
    /// `>= 1 - threshold_img`.
    Ibt {
        /// `threshold_img`, default 0.5.
        threshold_img: f64,
        /// `threshold_box`, default 0.5.
        threshold_box: f64,
    },
    /// Hard with probability `random_ratio`.
    Random {
        /// `random_ratio`, default 0.3.
        ratio: f64,
        /// Seeded by `seed` when given, for reproducible runs.
        rng: Box<Mutex<rand::rngs::StdRng>>,
    },
    /// Never hard.
    EdgeOnly,
    /// Always hard.
    CloudOnly,
    /// Hard iff the top class probability `< threshold` (a classifier's natural confidence).
    MaxProbability {
        /// `threshold`, default 0.8.
        threshold: f64,
    },
    /// Hard iff the gap between the top two probabilities `< threshold`.
    Margin {
        /// `threshold`, default 0.5.
        threshold: f64,
    },
}

struct Params<'a> {
    rule: &'static str,
    accepted: &'static str,
    given: &'a [Param],
}

impl Params<'_> {
    fn check_keys(&self) -> Result<(), MiningError> {
        let accepted: Vec<&str> = self.accepted.split(", ").collect();
        match self
            .given
            .iter()
            .find(|p| !accepted.contains(&p.key.as_str()))
        {
            Some(p) => Err(MiningError::UnknownParameter {
                rule: self.rule,
                key: p.key.clone(),
                accepted: self.accepted,
            }),
            None => Ok(()),
        }
    }

    fn raw(&self, key: &str) -> Option<&str> {
        self.given
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }

    fn unit(&self, key: &str, default: f64) -> Result<f64, MiningError> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
                _ => Err(MiningError::BadValue {
                    rule: self.rule,
                    key: key.into(),
                    value: v.into(),
                    expected: "a number between 0 and 1",
                }),
            },
        }
    }
}

impl HardExampleMining {
    /// Builds a rule from Sedna's name and `{key, value}` parameters.
    pub fn new(name: &str, params: &[Param]) -> Result<Self, MiningError> {
        let p = |rule, accepted| Params {
            rule,
            accepted,
            given: params,
        };
        let rule = match name {
            "CrossEntropy" => {
                let p = p("CrossEntropy", "threshold_cross_entropy");
                p.check_keys()?;
                HardExampleMining::CrossEntropy {
                    threshold: p.unit("threshold_cross_entropy", 0.5)?,
                }
            }
            "Threshold" => {
                let p = p("Threshold", "threshold");
                p.check_keys()?;
                HardExampleMining::Threshold {
                    threshold: p.unit("threshold", 0.5)?,
                }
            }
            "IBT" => {
                let p = p("IBT", "threshold_img, threshold_box");
                p.check_keys()?;
                HardExampleMining::Ibt {
                    threshold_img: p.unit("threshold_img", 0.5)?,
                    threshold_box: p.unit("threshold_box", 0.5)?,
                }
            }
            "Random" => {
                let p = p("Random", "random_ratio, seed");
                p.check_keys()?;
                let seed = match p.raw("seed") {
                    None => rand::rng().random(),
                    Some(v) => v.trim().parse::<u64>().map_err(|_| MiningError::BadValue {
                        rule: "Random",
                        key: "seed".into(),
                        value: v.into(),
                        expected: "a non-negative integer",
                    })?,
                };
                HardExampleMining::Random {
                    ratio: p.unit("random_ratio", 0.3)?,
                    rng: Box::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
                }
            }
            "EdgeOnly" | "CloudOnly" => {
                p(
                    if name == "EdgeOnly" {
                        "EdgeOnly"
                    } else {
                        "CloudOnly"
                    },
                    "",
                )
                .check_keys()?;
                if name == "EdgeOnly" {
                    HardExampleMining::EdgeOnly
                } else {
                    HardExampleMining::CloudOnly
                }
            }
            "MaxProbability" => {
                let p = p("MaxProbability", "threshold");
                p.check_keys()?;
                HardExampleMining::MaxProbability {
                    threshold: p.unit("threshold", 0.8)?,
                }
            }
            "Margin" => {
                let p = p("Margin", "threshold");
                p.check_keys()?;
                HardExampleMining::Margin {
                    threshold: p.unit("threshold", 0.5)?,
                }
            }
            other => return Err(MiningError::UnknownRule(other.into())),
        };
        Ok(rule)
    }

    /// Builds a rule from the `HEM_NAME` and `HEM_PARAMETERS` strings.
    pub fn from_env_strings(name: &str, parameters_json: &str) -> Result<Self, MiningError> {
        HardExampleMining::new(name, &parse_parameters(parameters_json)?)
    }

    /// Sedna's name of this rule.
    pub fn name(&self) -> &'static str {
        match self {
            HardExampleMining::CrossEntropy { .. } => "CrossEntropy",
            HardExampleMining::Threshold { .. } => "Threshold",
            HardExampleMining::Ibt { .. } => "IBT",
            HardExampleMining::Random { .. } => "Random",
            HardExampleMining::EdgeOnly => "EdgeOnly",
            HardExampleMining::CloudOnly => "CloudOnly",
            HardExampleMining::MaxProbability { .. } => "MaxProbability",
            HardExampleMining::Margin { .. } => "Margin",
        }
    }

    /// True when the sample should go to the cloud.
    pub fn is_hard(&self, output: Output<'_>) -> bool {
        match self {
            HardExampleMining::EdgeOnly => false,
            HardExampleMining::CloudOnly => true,
            HardExampleMining::Random { ratio, rng } => {
                rng.lock().expect("rng poisoned").random::<f64>() < *ratio
            }
            HardExampleMining::Threshold { threshold } => match output {
                Output::Boxes(boxes) => {
                    !boxes.is_empty() && mean(boxes.iter().map(|b| f64::from(b[4]))) < *threshold
                }
                Output::Probabilities(p) => {
                    top_probability(p).is_none_or(|top| f64::from(top) < *threshold)
                }
            },
            HardExampleMining::Ibt {
                threshold_img,
                threshold_box,
            } => {
                let ratio_low = match output {
                    Output::Boxes([]) => return false,
                    Output::Boxes(boxes) => {
                        boxes
                            .iter()
                            .filter(|b| f64::from(b[4]) <= *threshold_box)
                            .count() as f64
                            / boxes.len() as f64
                    }
                    Output::Probabilities(p) => match top_probability(p) {
                        None => return true,
                        Some(top) => f64::from(u8::from(f64::from(top) <= *threshold_box)),
                    },
                };
                ratio_low >= 1.0 - threshold_img
            }
            HardExampleMining::CrossEntropy { threshold } => match probabilities(output) {
                Some(p) => f64::from(cross_entropy_confidence(p)) < *threshold,
                None => true,
            },
            HardExampleMining::MaxProbability { threshold } => {
                match probabilities(output).and_then(top_probability) {
                    Some(top) => f64::from(top) < *threshold,
                    None => true,
                }
            }
            HardExampleMining::Margin { threshold } => match probabilities(output) {
                Some(p) => f64::from(margin(p)) < *threshold,
                None => true,
            },
        }
    }
}

impl FromStr for HardExampleMining {
    type Err = MiningError;
    /// Parses a bare rule name with default parameters.
    fn from_str(s: &str) -> Result<Self, MiningError> {
        HardExampleMining::new(s, &[])
    }
}

fn mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = values.len() as f64;
    values.sum::<f64>() / n
}

/// Valid probabilities, or `None` when the vector is empty or holds an invalid value.
fn probabilities(output: Output<'_>) -> Option<&[f32]> {
    match output {
        Output::Probabilities(p)
            if !p.is_empty() && p.iter().all(|v| (0.0..=1.0 + 1e-4).contains(v)) =>
        {
            Some(p)
        }
        Output::Probabilities(_) => None,
        // A detector's output has no class distribution: read the box scores as one.
        Output::Boxes(_) => None,
    }
}

fn top_probability(p: &[f32]) -> Option<f32> {
    probabilities(Output::Probabilities(p)).map(|p| p.iter().copied().fold(0.0, f32::max))
}

/// `1 - H(p) / ln N`: 1 for a one-hot vector, 0 for a uniform one, 1 when there is one class.
pub fn cross_entropy_confidence(p: &[f32]) -> f32 {
    if p.len() <= 1 {
        return 1.0;
    }
    let sum_plogp: f32 = p.iter().filter(|&&v| v > 0.0).map(|&v| v * v.ln()).sum();
    1.0 + sum_plogp / (p.len() as f32).ln()
}

/// Gap between the two largest probabilities; 1 when there is one class.
pub fn margin(p: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in p {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    if second.is_finite() {
        first - second
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, params: &[(&str, &str)]) -> HardExampleMining {
        let params: Vec<Param> = params
            .iter()
            .map(|(k, v)| Param {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect();
        HardExampleMining::new(name, &params).unwrap()
    }

    fn hard(r: &HardExampleMining, p: &[f32]) -> bool {
        r.is_hard(Output::Probabilities(p))
    }

    #[test]
    fn cross_entropy_confidence_matches_the_formula() {
        assert!((cross_entropy_confidence(&[1.0, 0.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cross_entropy_confidence(&[0.25; 4]).abs() < 1e-6);
        // 1 + (0.5 ln 0.5 * 2) / ln 4 = 0.5
        assert!((cross_entropy_confidence(&[0.5, 0.5, 0.0, 0.0]) - 0.5).abs() < 1e-6);
        assert_eq!(cross_entropy_confidence(&[1.0]), 1.0);
    }

    #[test]
    fn cross_entropy_rule() {
        let r = rule("CrossEntropy", &[("threshold_cross_entropy", "0.6")]);
        assert!(hard(&r, &[0.5, 0.5, 0.0, 0.0]));
        assert!(!hard(&r, &[0.97, 0.01, 0.01, 0.01]));
        assert!(!hard(&r, &[1.0]), "one class is certain");
        assert!(hard(&r, &[]), "empty output has no edge answer");
        assert!(hard(&r, &[f32::NAN, 0.5]));
        assert!(hard(&r, &[1.5, -0.5]));
        assert!(!hard(&r, &[1.0, 0.0, 0.0, 0.0]), "p = 0 is no math error");
    }

    #[test]
    fn max_probability_and_margin() {
        let r = rule("MaxProbability", &[("threshold", "0.8")]);
        assert!(hard(&r, &[0.79, 0.21]));
        assert!(!hard(&r, &[0.8, 0.2]));
        assert!(hard(&r, &[]));
        let m = rule("Margin", &[("threshold", "0.3")]);
        assert!(hard(&m, &[0.6, 0.35, 0.05]));
        assert!(!hard(&m, &[0.7, 0.2, 0.1]));
        assert!(!hard(&m, &[1.0]));
        assert!((margin(&[0.1, 0.6, 0.3]) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn threshold_on_boxes_and_probabilities() {
        let r = rule("Threshold", &[("threshold", "0.5")]);
        let boxes = [[0., 0., 1., 1., 0.4, 0.], [0., 0., 1., 1., 0.5, 1.]];
        assert!(r.is_hard(Output::Boxes(&boxes)));
        assert!(!r.is_hard(Output::Boxes(&[[0., 0., 1., 1., 0.9, 0.]])));
        assert!(
            !r.is_hard(Output::Boxes(&[])),
            "no detections is never hard"
        );
        assert!(hard(&r, &[0.45, 0.55 - 0.11, 0.11]));
        assert!(!hard(&r, &[0.9, 0.1]));
    }

    #[test]
    fn ibt_follows_sedna() {
        // r = share of boxes with score <= threshold_box; hard iff r >= 1 - threshold_img.
        let r = rule("IBT", &[("threshold_img", "0.5"), ("threshold_box", "0.5")]);
        let b = |s: f32| [0., 0., 1., 1., s, 0.];
        assert!(
            r.is_hard(Output::Boxes(&[b(0.3), b(0.9)])),
            "r = 0.5 >= 0.5"
        );
        assert!(
            !r.is_hard(Output::Boxes(&[b(0.3), b(0.9), b(0.8)])),
            "r = 1/3 < 0.5"
        );
        assert!(!r.is_hard(Output::Boxes(&[])));
        let strict = rule("IBT", &[("threshold_img", "0.9"), ("threshold_box", "0.9")]);
        assert!(strict.is_hard(Output::Boxes(&[
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.95),
            b(0.5)
        ])));
        // A classifier is one box scored by its top probability.
        assert!(hard(&r, &[0.4, 0.35, 0.25]));
        assert!(!hard(&r, &[0.9, 0.1]));
    }

    #[test]
    fn random_is_seedable_and_honours_the_ratio() {
        let a = rule("Random", &[("random_ratio", "0.25"), ("seed", "7")]);
        let b = rule("Random", &[("random_ratio", "0.25"), ("seed", "7")]);
        let da: Vec<bool> = (0..1000).map(|_| hard(&a, &[])).collect();
        let db: Vec<bool> = (0..1000).map(|_| hard(&b, &[])).collect();
        assert_eq!(da, db);
        let share = da.iter().filter(|&&h| h).count();
        assert!((200..300).contains(&share), "{share} of 1000");
        let never = rule("Random", &[("random_ratio", "0")]);
        assert!((0..100).all(|_| !hard(&never, &[0.1])));
    }

    #[test]
    fn edge_and_cloud_only() {
        assert!(!hard(&rule("EdgeOnly", &[]), &[0.1, 0.9]));
        assert!(hard(&rule("CloudOnly", &[]), &[1.0, 0.0]));
    }

    #[test]
    fn bad_parameters_fail_at_build_time_with_clear_messages() {
        let err = HardExampleMining::from_env_strings("Cross_Entropy", "[]").unwrap_err();
        assert!(err.to_string().contains(
            "unknown hard-example mining rule \"Cross_Entropy\"; expected one of CrossEntropy"
        ));
        let err = HardExampleMining::from_env_strings(
            "CrossEntropy",
            r#"[{"key":"threshold","value":"0.5"}]"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hard-example mining rule CrossEntropy has no parameter \"threshold\"; it takes threshold_cross_entropy"
        );
        let err = HardExampleMining::from_env_strings(
            "IBT",
            r#"[{"key":"threshold_img","value":"high"}]"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hard-example mining rule IBT: parameter threshold_img = \"high\" is not a number between 0 and 1"
        );
        let err = HardExampleMining::from_env_strings(
            "Random",
            r#"[{"key":"random_ratio","value":"1.5"}]"#,
        )
        .unwrap_err();
        assert!(matches!(err, MiningError::BadValue { .. }));
        let err = HardExampleMining::from_env_strings(
            "EdgeOnly",
            r#"[{"key":"threshold","value":"0.5"}]"#,
        )
        .unwrap_err();
        assert!(matches!(err, MiningError::UnknownParameter { .. }));
        for garbage in [
            "{",
            r#"{"key":"a"}"#,
            r#"[{"key":"a"}]"#,
            r#"[{"key":"a","value":[1]}]"#,
            r#"[{"key":"a","value":"1","x":2}]"#,
        ] {
            assert!(
                matches!(
                    HardExampleMining::from_env_strings("IBT", garbage),
                    Err(MiningError::BadParameterList(_))
                ),
                "{garbage}"
            );
        }
    }

    #[test]
    fn sedna_parameter_lists_parse_with_loose_values() {
        let p = parse_parameters(
            r#"[{"key":"threshold_img","value":"0.9"},{"key":"threshold_box","value":0.8}]"#,
        )
        .unwrap();
        assert_eq!(
            p[1],
            Param {
                key: "threshold_box".into(),
                value: "0.8".into()
            }
        );
        assert!(parse_parameters("  ").unwrap().is_empty());
        let r = HardExampleMining::from_env_strings(
            "IBT",
            r#"[{"key":"threshold_img","value":"0.9"},{"key":"threshold_box","value":0.8}]"#,
        )
        .unwrap();
        assert!(
            matches!(r, HardExampleMining::Ibt { threshold_img, threshold_box } if threshold_img == 0.9 && threshold_box == 0.8)
        );
        assert_eq!(r.name(), "IBT");
    }
}
