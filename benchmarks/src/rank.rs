//! The leaderboard: `all_rank.csv` and `selected_rank.csv` with Ianvs's columns, sorted by
//! `rank.sort_by`, plus the terminal table.
//!
//! Columns: `rank, algorithm, <metrics>, paradigm, <module types>, <type-hyperparameter>..., time,
//! url, run`. Metrics keep the testenv's order (Ianvs's come from a Python set, so their order is
//! not stable). `run` names the run: every run writes its own directory, and the file never mixes
//! rows of different runs (Ianvs appends to the old file).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::expand::{TestCase, value_text};
use crate::job::{SelectedDataitem, SortOrder};

/// A finished test case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case.
    pub case: TestCase,
    /// Metric values in testenv order (`None`: not defined for this case), or why the case failed.
    pub metrics: Result<Vec<Option<f64>>, String>,
    /// When it finished, `YYYY-mm-dd HH:MM:SS` UTC.
    pub time: String,
    /// Its output directory.
    pub dir: PathBuf,
}

/// A table: header and rows of cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Column names.
    pub header: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
}

fn format_metric(name: &str, v: Option<f64>) -> String {
    match (v, name) {
        (None, _) => String::new(),
        (Some(v), "throughput" | "bytes_offloaded") => format!("{v:.0}"),
        (Some(v), "latency_p50" | "latency_p99") => format!("{v:.3}"),
        (Some(v), _) => format!("{v:.4}"),
    }
}

fn compare(a: Option<f64>, b: Option<f64>, order: SortOrder) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => {
            let o = x.total_cmp(&y);
            if order == SortOrder::Descend {
                o.reverse()
            } else {
                o
            }
        }
        // Cases without the metric sort last, whatever the direction.
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Successful results sorted by `sort_by` (metrics not computed are skipped, as Ianvs does).
pub fn sort<'a>(
    results: &'a [CaseResult],
    metric_names: &[String],
    sort_by: &[(String, SortOrder)],
) -> Vec<&'a CaseResult> {
    let mut ok: Vec<&CaseResult> = results.iter().filter(|r| r.metrics.is_ok()).collect();
    let keys: Vec<(usize, SortOrder)> = sort_by
        .iter()
        .filter_map(|(m, o)| metric_names.iter().position(|n| n == m).map(|i| (i, *o)))
        .collect();
    ok.sort_by(|a, b| {
        let (ma, mb) = (
            a.metrics.as_ref().expect("ok"),
            b.metrics.as_ref().expect("ok"),
        );
        keys.iter()
            .map(|&(i, o)| compare(ma[i], mb[i], o))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    ok
}

/// Every module type and `<type>-<hyperparameter>` column over the results, sorted by name so that
/// columns do not move between runs.
fn module_columns(results: &[&CaseResult]) -> (Vec<String>, Vec<String>) {
    let mut types = Vec::new();
    let mut hps = Vec::new();
    for r in results {
        for (t, m) in &r.case.modules {
            if !types.contains(t) {
                types.push(t.clone());
            }
            for (k, _) in &m.hyperparameters {
                let col = format!("{t}-{k}");
                if !hps.contains(&col) {
                    hps.push(col);
                }
            }
        }
    }
    types.sort();
    hps.sort();
    (types, hps)
}

fn selected(list: &[String], all: &[String], matches: impl Fn(&str, &str) -> bool) -> Vec<String> {
    if list.iter().any(|s| s == "all") {
        all.to_vec()
    } else {
        all.iter()
            .filter(|c| list.iter().any(|s| matches(s, c)))
            .cloned()
            .collect()
    }
}

/// Builds the leaderboard. With `selection`, only its paradigms, metrics, module types and
/// hyperparameters (`<type>-<name>` or a bare `<name>`) are kept.
pub fn table(
    sorted: &[&CaseResult],
    metric_names: &[String],
    run: &str,
    selection: Option<&SelectedDataitem>,
) -> Table {
    let (all_types, all_hps) = module_columns(sorted);
    let (metrics, types, hps, rows): (Vec<String>, Vec<String>, Vec<String>, Vec<&&CaseResult>) =
        match selection {
            None => (
                metric_names.to_vec(),
                all_types,
                all_hps,
                sorted.iter().collect(),
            ),
            Some(s) => (
                // Selected metrics keep the order the selection gives.
                if s.metrics.iter().any(|m| m == "all") {
                    metric_names.to_vec()
                } else {
                    s.metrics
                        .iter()
                        .filter(|m| metric_names.contains(m))
                        .cloned()
                        .collect()
                },
                selected(&s.modules, &all_types, |s, c| s == c),
                selected(&s.hyperparameters, &all_hps, |s, c| {
                    s == c || c.ends_with(&format!("-{s}"))
                }),
                sorted
                    .iter()
                    .filter(|r| {
                        s.paradigms
                            .iter()
                            .any(|p| p == "all" || *p == r.case.paradigm)
                    })
                    .collect(),
            ),
        };
    let mut header = vec!["rank".to_string(), "algorithm".into()];
    header.extend(metrics.iter().cloned());
    header.push("paradigm".into());
    header.extend(types.iter().cloned());
    header.extend(hps.iter().cloned());
    header.extend(["time".into(), "url".into(), "run".into()]);
    let rows = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let values = r.metrics.as_ref().expect("sorted holds successes");
            let mut row = vec![(i + 1).to_string(), r.case.algorithm.clone()];
            for m in &metrics {
                let idx = metric_names
                    .iter()
                    .position(|n| n == m)
                    .expect("selected from the names");
                row.push(format_metric(m, values[idx]));
            }
            row.push(r.case.paradigm.clone());
            for t in &types {
                row.push(
                    r.case
                        .modules
                        .get(t)
                        .map(|m| m.name.clone())
                        .unwrap_or_default(),
                );
            }
            for col in &hps {
                let (t, k) = col.split_once('-').expect("columns are type-name");
                let v = r
                    .case
                    .modules
                    .get(t)
                    .and_then(|m| m.hyperparameters.iter().find(|(hk, _)| hk == k))
                    .map(|(_, v)| value_text(v));
                row.push(v.unwrap_or_default());
            }
            row.extend([r.time.clone(), r.dir.display().to_string(), run.to_string()]);
            row
        })
        .collect();
    Table { header, rows }
}

/// Writes a table as CSV.
pub fn write_csv(table: &Table, path: &Path) -> Result<(), crate::BenchError> {
    let io = |e: std::io::Error| crate::BenchError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut w = csv::Writer::from_path(path).map_err(|e| io(e.into()))?;
    w.write_record(&table.header).map_err(|e| io(e.into()))?;
    for row in &table.rows {
        w.write_record(row).map_err(|e| io(e.into()))?;
    }
    w.flush().map_err(io)
}

/// Renders a table as aligned text, leaving out the `url` column (long, and in the CSV).
pub fn render(table: &Table) -> String {
    let keep: Vec<usize> = (0..table.header.len())
        .filter(|&i| table.header[i] != "url")
        .collect();
    let widths: Vec<usize> = keep
        .iter()
        .map(|&i| {
            table
                .rows
                .iter()
                .map(|r| r[i].len())
                .chain([table.header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &Vec<String>| -> String {
        keep.iter()
            .zip(&widths)
            .map(|(&i, w)| format!("{:<w$}", cells[i], w = w))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(&table.header);
    out.push_str(
        &(widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
            + "\n"),
    );
    for row in &table.rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expand::Module;
    use std::collections::BTreeMap;

    fn result(alg: &str, hp: f64, metrics: Result<Vec<Option<f64>>, String>) -> CaseResult {
        let hem = Module {
            kind: "hard_example_mining".into(),
            name: "MaxProbability".into(),
            url: None,
            hyperparameters: vec![("threshold".into(), hp.into())],
        };
        CaseResult {
            case: TestCase {
                id: format!("{alg}-{hp}"),
                algorithm: alg.into(),
                paradigm: "jointinference".into(),
                modules: BTreeMap::from([("hard_example_mining".to_string(), hem)]),
            },
            metrics,
            time: "2026-11-22 19:00:00".into(),
            dir: PathBuf::from(format!("/ws/{alg}-{hp}")),
        }
    }

    #[test]
    fn sorts_by_priority_with_missing_values_last_and_failures_out() {
        let names = vec!["accuracy".to_string(), "samples_transfer_ratio".to_string()];
        let results = vec![
            result("a", 0.5, Ok(vec![Some(0.90), Some(0.1)])),
            result("b", 0.6, Ok(vec![Some(0.92), Some(0.3)])),
            result("c", 0.7, Ok(vec![Some(0.92), Some(0.2)])),
            result("d", 0.8, Ok(vec![None, Some(0.0)])),
            result("e", 0.9, Err("boom".into())),
        ];
        let sort_by = vec![
            ("accuracy".to_string(), SortOrder::Descend),
            ("samples_transfer_ratio".to_string(), SortOrder::Ascend),
            ("mAP".to_string(), SortOrder::Descend),
        ];
        let order: Vec<&str> = sort(&results, &names, &sort_by)
            .iter()
            .map(|r| r.case.algorithm.as_str())
            .collect();
        assert_eq!(order, vec!["c", "b", "a", "d"]);
    }

    #[test]
    fn all_and_selected_columns() {
        let names = vec!["accuracy".to_string(), "latency_p50".to_string()];
        let results = vec![result(
            "joint",
            0.8,
            Ok(vec![Some(0.9123456), Some(0.01234)]),
        )];
        let sorted = sort(&results, &names, &[]);
        let all = table(&sorted, &names, "run-1", None);
        assert_eq!(
            all.header,
            vec![
                "rank",
                "algorithm",
                "accuracy",
                "latency_p50",
                "paradigm",
                "hard_example_mining",
                "hard_example_mining-threshold",
                "time",
                "url",
                "run"
            ]
        );
        assert_eq!(
            all.rows[0],
            vec![
                "1",
                "joint",
                "0.9123",
                "0.012",
                "jointinference",
                "MaxProbability",
                "0.8",
                "2026-11-22 19:00:00",
                "/ws/joint-0.8",
                "run-1"
            ]
        );
        let sel = SelectedDataitem {
            paradigms: vec!["all".into()],
            modules: vec!["all".into()],
            hyperparameters: vec!["threshold".into()],
            metrics: vec!["latency_p50".into()],
        };
        let t = table(&sorted, &names, "run-1", Some(&sel));
        assert_eq!(
            t.header,
            vec![
                "rank",
                "algorithm",
                "latency_p50",
                "paradigm",
                "hard_example_mining",
                "hard_example_mining-threshold",
                "time",
                "url",
                "run"
            ]
        );
        let none = SelectedDataitem {
            paradigms: vec!["singletasklearning".into()],
            ..sel
        };
        assert!(table(&sorted, &names, "run-1", Some(&none)).rows.is_empty());
        let text = render(&all);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .starts_with("rank  algorithm  accuracy"),
            "{text}"
        );
        assert!(
            !text.contains("/ws/"),
            "url is left out of the terminal table"
        );
    }

    #[test]
    fn csv_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table {
            header: vec!["a".into(), "b".into()],
            rows: vec![vec!["1".into(), "x,y".into()]],
        };
        let p = dir.path().join("t.csv");
        write_csv(&t, &p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a,b\n1,\"x,y\"\n");
    }
}
