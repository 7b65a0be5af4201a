//! Sedna's stage triggers: a daily timer window AND a condition `metric operator threshold`.
//!
//! - **Operators**: `>`/`gt`, `>=`/`ge`, `=`/`==`/`eq`, `!=`/`ne`, `<`/`lt`, `<=`/`le`; equality
//!   with a tolerance of 1e-6, as Sedna's LC compares.
//! - **Timer**: `"HH:MM"` start and end, inclusive; a start after the end wraps past midnight
//!   (`22:00`-`02:00`). A YAML 1.1 parser turns unquoted `20:00` into the integer 1200 (base 60);
//!   such integers are read back as the time they came from.
//! - **Metrics**: a number, or a list of numbers (Sedna's eval metrics are per-class lists). Sedna
//!   compares a list as 0, so `precision_delta > 0.1` never fires there. Here a bare list metric
//!   means its **mean** over classes; `name[i]` picks class `i`; `min(name)` and `max(name)` take
//!   the smallest or largest element (`min(precision_delta) > 0` = no class got worse).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::crd::{Timer, Trigger};

/// Why a trigger is unusable or cannot be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TriggerError {
    /// The operator is not one of Sedna's.
    #[error("unknown operator {0:?}: use one of >, >=, =, ==, !=, <, <= or gt, ge, eq, ne, lt, le")]
    Operator(String),
    /// A timer bound is not `HH:MM`.
    #[error("timer {field} {value:?} is not a time of day HH:MM (00:00 to 23:59)")]
    Time {
        /// `start` or `end`.
        field: &'static str,
        /// What was given.
        value: String,
    },
    /// The metric expression cannot be parsed.
    #[error("metric {0:?} is not `name`, `name[i]`, `min(name)` or `max(name)`")]
    Metric(String),
    /// The metric is not among the stats.
    #[error("unknown metric {name:?}: this stage provides {known}")]
    UnknownMetric {
        /// The metric asked for.
        name: String,
        /// The ones available.
        known: String,
    },
    /// `name[i]` past the end of the list, or an empty list.
    #[error("metric {name:?} has {len} values; {what}")]
    Index {
        /// The metric.
        name: String,
        /// Its length.
        len: usize,
        /// What was asked.
        what: String,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
}

/// Sedna's tolerance for equality.
pub const EQ_TOLERANCE: f64 = 1e-6;

impl FromStr for Operator {
    type Err = TriggerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            ">" | "gt" => Operator::Gt,
            ">=" | "ge" => Operator::Ge,
            "=" | "==" | "eq" => Operator::Eq,
            "!=" | "ne" => Operator::Ne,
            "<" | "lt" => Operator::Lt,
            "<=" | "le" => Operator::Le,
            other => return Err(TriggerError::Operator(other.to_string())),
        })
    }
}

impl Operator {
    /// `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        let eq = (value - threshold).abs() <= EQ_TOLERANCE;
        match self {
            Operator::Gt => value > threshold && !eq,
            Operator::Ge => value > threshold || eq,
            Operator::Eq => eq,
            Operator::Ne => !eq,
            Operator::Lt => value < threshold && !eq,
            Operator::Le => value < threshold || eq,
        }
    }
}

/// How a metric expression reads a (possibly list-valued) metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricRef {
    /// The number, or the mean of the list.
    Mean(String),
    /// One element.
    Index(String, usize),
    /// The smallest element.
    Min(String),
    /// The largest element.
    Max(String),
}

fn ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl FromStr for MetricRef {
    type Err = TriggerError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let s = raw.trim();
        let bad = || TriggerError::Metric(raw.to_string());
        let inner = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(')'))
                .map(str::trim)
        };
        let m = if let Some(n) = inner("min(") {
            MetricRef::Min(n.to_string())
        } else if let Some(n) = inner("max(") {
            MetricRef::Max(n.to_string())
        } else if let Some((n, rest)) = s.split_once('[') {
            let i = rest
                .strip_suffix(']')
                .and_then(|i| i.trim().parse::<usize>().ok())
                .ok_or_else(bad)?;
            MetricRef::Index(n.trim().to_string(), i)
        } else {
            MetricRef::Mean(s.to_string())
        };
        if ident(m.name()) { Ok(m) } else { Err(bad()) }
    }
}

impl MetricRef {
    /// The metric's name.
    pub fn name(&self) -> &str {
        match self {
            MetricRef::Mean(n) | MetricRef::Index(n, _) | MetricRef::Min(n) | MetricRef::Max(n) => {
                n
            }
        }
    }

    /// Reads the value from `stats`.
    pub fn value(&self, stats: &BTreeMap<String, Vec<f64>>) -> Result<f64, TriggerError> {
        let name = self.name();
        let v = stats.get(name).ok_or_else(|| TriggerError::UnknownMetric {
            name: name.to_string(),
            known: stats.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let empty = |what: &str| TriggerError::Index {
            name: name.to_string(),
            len: 0,
            what: what.to_string(),
        };
        match self {
            MetricRef::Mean(_) if v.is_empty() => Err(empty("there is nothing to average")),
            MetricRef::Mean(_) => Ok(v.iter().sum::<f64>() / v.len() as f64),
            MetricRef::Index(_, i) => v.get(*i).copied().ok_or_else(|| TriggerError::Index {
                name: name.to_string(),
                len: v.len(),
                what: format!("index {i} is past the end"),
            }),
            MetricRef::Min(_) => v
                .iter()
                .copied()
                .reduce(f64::min)
                .ok_or_else(|| empty("min of nothing")),
            MetricRef::Max(_) => v
                .iter()
                .copied()
                .reduce(f64::max)
                .ok_or_else(|| empty("max of nothing")),
        }
    }
}

/// A time of day in minutes since midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(pub u16);

impl TimeOfDay {
    /// Parses `HH:MM` (a single-digit hour is accepted).
    pub fn parse(field: &'static str, s: &str) -> Result<Self, TriggerError> {
        let err = || TriggerError::Time {
            field,
            value: s.to_string(),
        };
        let (h, m) = s.trim().split_once(':').ok_or_else(err)?;
        if h.is_empty() || h.len() > 2 || m.len() != 2 {
            return Err(err());
        }
        let h: u16 = h.parse().map_err(|_| err())?;
        let m: u16 = m.parse().map_err(|_| err())?;
        if h > 23 || m > 59 {
            return Err(err());
        }
        Ok(TimeOfDay(h * 60 + m))
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

/// Reads a timer bound written either as `"HH:MM"` or as the base-60 integer a YAML 1.1 parser
/// makes of an unquoted `HH:MM` (`20:00` -> 1200).
pub fn time_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        N(u64),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::S(s) => s,
        Raw::N(n) => format!("{:02}:{:02}", n / 60, n % 60),
    })
}

/// A parsed, checked trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The window, when there is one.
    pub window: Option<(TimeOfDay, TimeOfDay)>,
    /// The metric read.
    pub metric: MetricRef,
    /// The comparison.
    pub operator: Operator,
    /// The threshold.
    pub threshold: f64,
}

impl Rule {
    /// Checks a CRD trigger; every problem is an error naming the field.
    pub fn parse(t: &Trigger) -> Result<Rule, TriggerError> {
        let window = match &t.timer {
            Some(Timer { start, end }) => Some((
                TimeOfDay::parse("start", start)?,
                TimeOfDay::parse("end", end)?,
            )),
            None => None,
        };
        Ok(Rule {
            window,
            metric: t.condition.metric.parse()?,
            operator: t.condition.operator.parse()?,
            threshold: t.condition.threshold,
        })
    }

    /// Whether `now` falls in the window (always, without one). Inclusive; wraps past midnight.
    pub fn in_window(&self, now: TimeOfDay) -> bool {
        match self.window {
            None => true,
            Some((s, e)) if s <= e => s <= now && now <= e,
            Some((s, e)) => now >= s || now <= e,
        }
    }

    /// The timer AND the condition.
    pub fn fires(
        &self,
        now: TimeOfDay,
        stats: &BTreeMap<String, Vec<f64>>,
    ) -> Result<bool, TriggerError> {
        if !self.in_window(now) {
            return Ok(false);
        }
        Ok(self
            .operator
            .holds(self.metric.value(stats)?, self.threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TriggerCondition;

    fn trig(metric: &str, op: &str, threshold: f64, timer: Option<(&str, &str)>) -> Trigger {
        Trigger {
            check_period_seconds: None,
            timer: timer.map(|(s, e)| Timer {
                start: s.into(),
                end: e.into(),
            }),
            condition: TriggerCondition {
                operator: op.into(),
                threshold,
                metric: metric.into(),
            },
        }
    }

    fn stats(pairs: &[(&str, &[f64])]) -> BTreeMap<String, Vec<f64>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    fn t(s: &str) -> TimeOfDay {
        TimeOfDay::parse("start", s).unwrap()
    }

    #[test]
    fn every_operator_and_its_word_form() {
        let cases = [
            (">", "gt", [false, false, true]),
            (">=", "ge", [false, true, true]),
            ("==", "eq", [false, true, false]),
            ("!=", "ne", [true, false, true]),
            ("<", "lt", [true, false, false]),
            ("<=", "le", [true, true, false]),
        ];
        for (sym, word, want) in cases {
            for op in [sym, word] {
                let o: Operator = op.parse().unwrap();
                let got = [
                    o.holds(4.0, 5.0),
                    o.holds(5.0 + 1e-9, 5.0),
                    o.holds(6.0, 5.0),
                ];
                assert_eq!(got, want, "{op}");
            }
        }
        assert_eq!("=".parse::<Operator>().unwrap(), Operator::Eq);
        let e = "=>".parse::<Operator>().unwrap_err().to_string();
        assert!(e.contains("\"=>\"") && e.contains(">="), "{e}");
    }

    #[test]
    fn timer_window_inclusive_and_wrapping_past_midnight() {
        let day = Rule::parse(&trig("n", ">", 0.0, Some(("02:00", "20:00")))).unwrap();
        assert!(day.in_window(t("02:00")));
        assert!(day.in_window(t("20:00")));
        assert!(!day.in_window(t("20:01")));
        assert!(!day.in_window(t("01:59")));
        let night = Rule::parse(&trig("n", ">", 0.0, Some(("22:00", "02:00")))).unwrap();
        for inside in ["22:00", "23:59", "00:00", "02:00"] {
            assert!(night.in_window(t(inside)), "{inside}");
        }
        for outside in ["02:01", "12:00", "21:59"] {
            assert!(!night.in_window(t(outside)), "{outside}");
        }
        let none = Rule::parse(&trig("n", ">", 0.0, None)).unwrap();
        assert!(none.in_window(t("13:37")));
        let s = stats(&[("n", &[1.0])]);
        assert!(!night.fires(t("12:00"), &s).unwrap(), "outside the window");
        assert!(night.fires(t("23:00"), &s).unwrap());
    }

    #[test]
    fn bad_times_are_named() {
        for bad in ["24:00", "7", "12:60", "ab:cd", "1:5", "", "123:00"] {
            let e = Rule::parse(&trig("n", ">", 0.0, Some((bad, "10:00")))).unwrap_err();
            assert!(
                matches!(e, TriggerError::Time { field: "start", .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("HH:MM"), "{e}");
        }
        assert_eq!(t("7:05").to_string(), "07:05");
    }

    #[test]
    fn unquoted_times_as_kubectl_and_yaml_1_1_send_them() {
        // kubectl (YAML 1.2) keeps an unquoted 20:00 a string; PyYAML turns it into 1200.
        let yaml: Timer = serde_yaml::from_str("start: 02:00\nend: 20:00\n").unwrap();
        assert_eq!((yaml.start.as_str(), yaml.end.as_str()), ("02:00", "20:00"));
        let json: Timer = serde_json::from_str(r#"{"start": 120, "end": 1200}"#).unwrap();
        assert_eq!((json.start.as_str(), json.end.as_str()), ("02:00", "20:00"));
    }

    #[test]
    fn list_metrics_mean_index_min_max() {
        let s = stats(&[
            ("precision_delta", &[0.3, -0.1, 0.1]),
            ("num_of_samples", &[500.0]),
        ]);
        let v = |m: &str| m.parse::<MetricRef>().unwrap().value(&s).unwrap();
        assert!((v("precision_delta") - 0.1).abs() < 1e-12, "mean");
        assert_eq!(v("precision_delta[0]"), 0.3);
        assert_eq!(v("min(precision_delta)"), -0.1);
        assert_eq!(v("max( precision_delta )"), 0.3);
        assert_eq!(v("num_of_samples"), 500.0);
        let past = "precision_delta[3]".parse::<MetricRef>().unwrap().value(&s);
        assert!(past.unwrap_err().to_string().contains("has 3 values"));
        let unknown = "recall"
            .parse::<MetricRef>()
            .unwrap()
            .value(&s)
            .unwrap_err();
        assert!(
            unknown
                .to_string()
                .contains("num_of_samples, precision_delta"),
            "{unknown}"
        );
        for bad in ["", "x[", "x[a]", "min(", "a b", "x]"] {
            assert!(bad.parse::<MetricRef>().is_err(), "{bad:?}");
        }
        let rule = Rule::parse(&trig("num_of_samples", ">=", 500.0, None)).unwrap();
        assert!(rule.fires(t("00:00"), &s).unwrap());
        let unknown = Rule::parse(&trig("samples", ">", 1.0, None)).unwrap();
        assert!(unknown.fires(t("00:00"), &s).is_err());
    }
}
