//! Runs a job: expands the test cases, runs them (`--jobs N` at a time), saves each case's result
//! as soon as it finishes, and writes the leaderboard and the plot.
//!
//! A failing case is reported and recorded in `rank/failed.csv`; the others still run and are
//! saved (Ianvs loses every result when one case fails: issues #610, #621).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::source::Source;

use crate::BenchError;
use crate::expand::{TestCase, expand, per_link};
use crate::job::LoadedJob;
use crate::metrics::Metric;
use crate::paradigm::{CaseContext, CloudOnlyCache, lookup};
use crate::plot::{self, Point};
use crate::rank::{self, CaseResult};

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Test cases at once.
    pub jobs: usize,
    /// Use only the first N test samples.
    pub limit: Option<usize>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunReport {
    /// `<workspace>/<name>/<run id>`.
    pub run_dir: PathBuf,
    /// Every case, successful or not, in case order.
    pub results: Vec<CaseResult>,
    /// The selected leaderboard, rendered for the terminal.
    pub table: String,
    /// Files written under `rank/`.
    pub files: Vec<PathBuf>,
}

impl RunReport {
    /// Cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.results.iter().filter(|r| r.metrics.is_err())
    }
}

/// `YYYY-mm-dd HH:MM:SS` UTC (days-to-civil conversion after Howard Hinnant).
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn new_run_dir(base: &std::path::Path) -> Result<(String, PathBuf), BenchError> {
    let stamp: String = utc_timestamp(SystemTime::now())
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let stem = format!("{}-{}", &stamp[..8], &stamp[8..]);
    for n in 1.. {
        let id = if n == 1 {
            stem.clone()
        } else {
            format!("{stem}-{n}")
        };
        let dir = base.join(&id);
        match std::fs::create_dir_all(base).and_then(|()| std::fs::create_dir(&dir)) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(BenchError::Write {
                    path: dir,
                    source: e,
                });
            }
        }
    }
    unreachable!("some run id is free")
}

/// What every case of a run shares.
struct RunShared {
    run_dir: PathBuf,
    data: Source,
    opts: RunOptions,
    mode: Option<MiningMode>,
    cache: Arc<CloudOnlyCache>,
    metrics: Vec<Metric>,
    links: Arc<std::collections::BTreeMap<String, crate::link::LinkProfile>>,
}

async fn run_case(case: TestCase, shared: Arc<RunShared>) -> CaseResult {
    let RunShared {
        run_dir,
        data,
        opts,
        mode,
        cache,
        metrics,
        links,
    } = &*shared;
    let (data, mode, cache, links) = (data.clone(), *mode, cache.clone(), links.clone());
    let dir = run_dir.join(&case.algorithm).join(&case.id);
    let outcome = async {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let paradigm = lookup(&case.paradigm)?;
        let ctx = CaseContext {
            data,
            limit: opts.limit,
            output_dir: dir.clone(),
            mining_mode: mode,
            cloud_only: cache,
            links,
        };
        paradigm.run(&case, &ctx).await
    }
    .await;
    let metrics = outcome.map(|o| metrics.iter().map(|m| m.compute(&o)).collect::<Vec<_>>());
    let result = CaseResult {
        case,
        metrics,
        time: utc_timestamp(SystemTime::now()),
        dir: dir.clone(),
    };
    // Persist at once, so a crash later loses nothing already measured.
    let record = match &result.metrics {
        Ok(values) => {
            serde_json::json!({"case": result.case.id, "time": result.time, "metrics": values})
        }
        Err(e) => serde_json::json!({"case": result.case.id, "time": result.time, "error": e}),
    };
    if let Err(e) = std::fs::write(dir.join("result.json"), record.to_string()) {
        tracing::warn!(case = %result.case.id, error = %e, "cannot save the case result");
    }
    result
}

/// Runs every test case of `job`.
pub async fn run(job: &LoadedJob, opts: &RunOptions) -> Result<RunReport, BenchError> {
    let metric_names: Vec<String> = job.testenv.metrics.iter().map(|m| m.name.clone()).collect();
    let metrics: Vec<Metric> = metric_names
        .iter()
        .map(|n| Metric::parse(n).expect("checked at load"))
        .collect();
    let mode = match job
        .testenv
        .hard_example_mining_mode
        .as_ref()
        .or(job.job.hard_example_mining_mode.as_ref())
    {
        Some(m) => Some(
            m.parse::<MiningMode>()
                .map_err(|message| BenchError::Invalid {
                    path: job.path.clone(),
                    message,
                })?,
        ),
        None => None,
    };
    let links = job
        .testenv
        .link
        .iter()
        .enumerate()
        .map(|(i, l)| l.profile(i).map(|p| (p.name.clone(), p)))
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
        .map_err(|message| BenchError::Invalid {
            path: job.path.clone(),
            message,
        })?;
    let link_names: Vec<String> = job
        .testenv
        .link
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.profile(i).ok().map(|p| p.name))
        .collect();
    let links = Arc::new(links);
    let cases: Vec<TestCase> = per_link(
        job.algorithms
            .iter()
            .flat_map(|(name, _, algo)| expand(name, algo))
            .collect(),
        &link_names,
    );
    let (run_id, run_dir) = new_run_dir(&job.workspace)?;
    let bar = if opts.progress {
        ProgressBar::new(cases.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} test cases  {msg}",
        )
        .expect("valid template"),
    );
    let shared = Arc::new(RunShared {
        run_dir: run_dir.clone(),
        data: Source::from_path(&job.test_data),
        opts: opts.clone(),
        mode,
        cache: Arc::new(CloudOnlyCache::default()),
        metrics: metrics.clone(),
        links,
    });
    let mut results: Vec<(usize, CaseResult)> =
        futures::stream::iter(cases.into_iter().enumerate())
            .map(|(i, case)| {
                let fut = run_case(case, shared.clone());
                let bar = bar.clone();
                async move {
                    let r = fut.await;
                    match &r.metrics {
                        Ok(_) => bar.set_message(format!("{} done", r.case.id)),
                        Err(e) => bar.println(format!("test case {} failed: {e}", r.case.id)),
                    }
                    bar.inc(1);
                    (i, r)
                }
            })
            .buffer_unordered(opts.jobs.max(1))
            .collect()
            .await;
    bar.finish_and_clear();
    results.sort_by_key(|(i, _)| *i);
    let mut results: Vec<CaseResult> = results.into_iter().map(|(_, r)| r).collect();
    // Algorithms that could not be loaded: one failed row each, nothing run.
    for (name, why) in &job.broken {
        results.push(CaseResult {
            case: TestCase {
                id: format!("{name}-not-loaded"),
                algorithm: name.clone(),
                paradigm: String::new(),
                modules: Default::default(),
            },
            metrics: Err(why.clone()),
            time: utc_timestamp(SystemTime::now()),
            dir: run_dir.join(name),
        });
    }

    let rank_dir = run_dir.join("rank");
    std::fs::create_dir_all(&rank_dir).map_err(|e| BenchError::Write {
        path: rank_dir.clone(),
        source: e,
    })?;
    let sort_by: Vec<_> = job
        .job
        .rank
        .sort_by
        .iter()
        .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), *v)))
        .collect();
    let sorted = rank::sort(&results, &metric_names, &sort_by);
    let mut files = Vec::new();
    if job.job.rank.save_mode.as_deref() != Some("selected_only") {
        let all = rank::table(&sorted, &metric_names, &run_id, None);
        let p = rank_dir.join("all_rank.csv");
        rank::write_csv(&all, &p)?;
        files.push(p);
    }
    let selected = rank::table(
        &sorted,
        &metric_names,
        &run_id,
        Some(&job.job.rank.selected_dataitem),
    );
    let p = rank_dir.join("selected_rank.csv");
    rank::write_csv(&selected, &p)?;
    files.push(p);
    let failed: Vec<&CaseResult> = results.iter().filter(|r| r.metrics.is_err()).collect();
    if !failed.is_empty() {
        let t = rank::Table {
            header: vec![
                "case".into(),
                "algorithm".into(),
                "error".into(),
                "time".into(),
                "url".into(),
            ],
            rows: failed
                .iter()
                .map(|r| {
                    vec![
                        r.case.id.clone(),
                        r.case.algorithm.clone(),
                        r.metrics.clone().err().unwrap_or_default(),
                        r.time.clone(),
                        r.dir.display().to_string(),
                    ]
                })
                .collect(),
        };
        let p = rank_dir.join("failed.csv");
        rank::write_csv(&t, &p)?;
        files.push(p);
    }
    let idx = |name: &str| metric_names.iter().position(|n| n == name);
    if let (Some(ia), Some(it)) = (idx("accuracy"), idx("samples_transfer_ratio")) {
        let points: Vec<Point> = sorted
            .iter()
            .filter_map(|r| {
                let m = r.metrics.as_ref().ok()?;
                let series = match r.case.modules.get("hard_example_mining") {
                    Some(hem) => format!("{} ({})", r.case.algorithm, hem.name),
                    None => r.case.algorithm.clone(),
                };
                Some(Point {
                    series,
                    baseline: r.case.paradigm == "singletasklearning",
                    x: m[it]?,
                    y: m[ia]?,
                })
            })
            .collect();
        let title = format!("{}: accuracy vs samples transfer ratio", job.job.name);
        match plot::accuracy_vs_transfer(&points, &rank_dir.join("accuracy_vs_transfer"), &title) {
            Ok(written) => files.extend(written),
            Err(e) => tracing::warn!("no plot: {e}"),
        }
    }
    // `latest` points at this run.
    let latest = job.workspace.join("latest");
    let _ = std::fs::remove_file(&latest);
    #[cfg(unix)]
    let _ = std::os::unix::fs::symlink(&run_id, &latest);
    Ok(RunReport {
        run_dir,
        table: rank::render(&selected),
        results,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00");
        assert_eq!(
            utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00"
        );
        assert_eq!(
            utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_374_061)),
            "2026-11-22 19:01:01"
        );
    }
}
