//! Runs a job: expands the test cases, runs them (`--jobs N` at a time), saves each case's result
//! as soon as it finishes, and writes the leaderboard and the plot.
//!
//! A failing case is reported and recorded in `rank/failed.csv`; the others still run and are
//! saved (Ianvs loses every result when one case fails: issues #610, #621). A case may be given a
//! time limit (`case_timeout`), past which it fails with that reason. An interrupted run is
//! finished with `resume`: the cases whose `result.json` holds metrics for the same modules are
//! read back, the others run, and the leaderboard covers them all.

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
    /// Longest a test case may run; past it the case fails (the others go on).
    pub case_timeout: Option<std::time::Duration>,
    /// A run directory (`<workspace>/<name>/<run id>`) to finish instead of starting a new run.
    pub resume: Option<PathBuf>,
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
    /// Cases read back from an earlier attempt of this run (`resume`), not run again.
    pub resumed: usize,
    /// Test samples the cases run now went through (what the progress bar counted).
    pub samples: u64,
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
    progress: Arc<std::sync::atomic::AtomicU64>,
    incremental: Option<Arc<crate::paradigm::IncrementalSetting>>,
}

/// Runs a case; returns its result, preceded by one row per earlier round for incremental
/// learning (the case's own row is its last round).
async fn run_case(case: TestCase, shared: Arc<RunShared>) -> Vec<CaseResult> {
    let RunShared {
        run_dir,
        data,
        opts,
        mode,
        cache,
        metrics,
        links,
        progress,
        incremental,
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
            progress: progress.clone(),
            incremental: incremental.clone(),
        };
        match opts.case_timeout {
            None => paradigm.run(&case, &ctx).await,
            Some(limit) => tokio::time::timeout(limit, paradigm.run(&case, &ctx))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "test case timed out after {limit:?} (the case time limit)"
                    ))
                }),
        }
    }
    .await;
    let rounds = outcome
        .as_ref()
        .map(|o| o.rounds.clone())
        .unwrap_or_default();
    let compute =
        |o: &crate::metrics::Outcome| metrics.iter().map(|m| m.compute(o)).collect::<Vec<_>>();
    let metrics = outcome.map(|o| compute(&o));
    let mut result = CaseResult {
        case,
        metrics,
        time: utc_timestamp(SystemTime::now()),
        dir: dir.clone(),
    };
    // Persist at once, so a crash later loses nothing already measured.
    let key = case_key(&result.case);
    let record = match &result.metrics {
        Ok(values) => {
            serde_json::json!({"case": result.case.id, "modules": key, "time": result.time, "metrics": values})
        }
        Err(e) => {
            serde_json::json!({"case": result.case.id, "modules": key, "time": result.time, "error": e})
        }
    };
    if let Err(e) = std::fs::write(dir.join("result.json"), record.to_string()) {
        tracing::warn!(case = %result.case.id, error = %e, "cannot save the case result");
    }
    let Some((last, earlier)) = rounds.split_last() else {
        return vec![result];
    };
    let mut rows: Vec<CaseResult> = earlier
        .iter()
        .map(|r| CaseResult {
            case: with_round(
                &result.case,
                r,
                Some(format!("{}-round{}", result.case.id, r.round)),
            ),
            metrics: Ok(compute(&r.outcome)),
            time: result.time.clone(),
            dir: dir.clone(),
        })
        .collect();
    result.case = with_round(&result.case, last, None);
    rows.push(result);
    rows
}

/// The case as one round's row: `round` and `deployed` as columns of its basemodel.
fn with_round(case: &TestCase, r: &crate::metrics::RoundOutcome, id: Option<String>) -> TestCase {
    let mut c = case.clone();
    if let Some(id) = id {
        c.id = id;
    }
    if let Some(base) = c.modules.get_mut("basemodel") {
        base.hyperparameters
            .push(("round".into(), serde_yaml::Value::Number(r.round.into())));
        base.hyperparameters.push((
            "deployed".into(),
            serde_yaml::Value::String(if r.deployed { "yes" } else { "no" }.into()),
        ));
    }
    c
}

/// What a case is, for telling whether a saved result is this case's.
fn case_key(case: &TestCase) -> String {
    format!("{} {:?}", case.paradigm, case.modules)
}

/// A case's saved result from an earlier attempt of the run: only a success for the same modules
/// and metrics counts; anything else runs again.
fn saved_result(case: &TestCase, dir: &std::path::Path, metrics: usize) -> Option<CaseResult> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v["case"] != case.id.as_str() || v["modules"] != case_key(case).as_str() {
        return None;
    }
    let values: Vec<Option<f64>> = serde_json::from_value(v["metrics"].clone()).ok()?;
    (values.len() == metrics).then(|| CaseResult {
        case: case.clone(),
        metrics: Ok(values),
        time: v["time"].as_str().unwrap_or_default().to_string(),
        dir: dir.to_path_buf(),
    })
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
    // In the testenv's order (the cases' order), then by name for the cases to look up.
    let profiles: Vec<crate::link::LinkProfile> = job
        .testenv
        .link
        .iter()
        .enumerate()
        .map(|(i, l)| l.profile(i))
        .collect::<Result<_, _>>()
        .map_err(|message| BenchError::Invalid {
            path: job.path.clone(),
            message,
        })?;
    let link_names: Vec<String> = profiles.iter().map(|p| p.name.clone()).collect();
    let links = Arc::new(
        profiles
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect::<std::collections::BTreeMap<_, _>>(),
    );
    let cases: Vec<TestCase> = per_link(
        job.algorithms
            .iter()
            .flat_map(|(name, _, algo)| expand(name, algo))
            .collect(),
        &link_names,
    );
    let (run_id, run_dir) = match &opts.resume {
        None => new_run_dir(&job.workspace)?,
        Some(dir) => {
            if !dir.is_dir() {
                return Err(BenchError::Invalid {
                    path: dir.clone(),
                    message: "is not a run directory to resume (<workspace>/<name>/<run id>)"
                        .into(),
                });
            }
            let id = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (id, dir.clone())
        }
    };
    // Cases an earlier attempt of this run finished: read back, not run again.
    let mut done: Vec<(usize, CaseResult)> = Vec::new();
    let mut todo: Vec<(usize, TestCase)> = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        let dir = run_dir.join(&case.algorithm).join(&case.id);
        match opts
            .resume
            .as_ref()
            .and_then(|_| saved_result(&case, &dir, metrics.len()))
        {
            Some(r) => done.push((i, r)),
            None => todo.push((i, case)),
        }
    }
    let resumed = done.len();
    let data = Source::from_path(&job.test_data);
    // The bar counts test samples across all cases: each case's pass over the test set.
    let bar = if opts.progress {
        let per_case = data.open(opts.limit).map(|s| s.count()).unwrap_or(0) as u64;
        ProgressBar::new(per_case * todo.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} samples ({per_sec}, eta {eta})  {msg}",
        )
        .expect("valid template"),
    );
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cases_total = todo.len();
    let cases_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.load(std::sync::atomic::Ordering::SeqCst));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    };
    let incremental = match (job.testenv.incremental_rounds, &job.train_data) {
        (Some(rounds), Some(train)) => Some(Arc::new(crate::paradigm::IncrementalSetting {
            rounds,
            train_data: train.clone(),
            test_data: job.test_data.clone(),
            model_eval: job.testenv.model_eval.clone(),
            shift: job.testenv.dataset.shift.map(|s| s.camera()),
            train_limit: job.testenv.dataset.train_limit,
            train_ratio: job
                .algorithms
                .iter()
                .filter_map(|(n, _, a)| {
                    a.incremental_learning_data_setting
                        .as_ref()
                        .map(|d| (n.clone(), d.train_ratio))
                })
                .collect(),
        })),
        _ => None,
    };
    let shared = Arc::new(RunShared {
        incremental,
        run_dir: run_dir.clone(),
        progress: progress.clone(),
        data,
        opts: opts.clone(),
        mode,
        cache: Arc::new(CloudOnlyCache::default()),
        metrics: metrics.clone(),
        links,
    });
    let mut results: Vec<(usize, Vec<CaseResult>)> = futures::stream::iter(todo)
        .map(|(i, case)| {
            let fut = run_case(case, shared.clone());
            let (bar, cases_done) = (bar.clone(), cases_done.clone());
            async move {
                let rows = fut.await;
                let r = rows.last().expect("a case has a row");
                let n = cases_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                match &r.metrics {
                    Ok(_) => {
                        bar.set_message(format!("{n}/{cases_total} test cases, {} done", r.case.id))
                    }
                    Err(e) => bar.println(format!("test case {} failed: {e}", r.case.id)),
                }
                (i, rows)
            }
        })
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    ticker.abort();
    bar.finish_and_clear();
    results.extend(done.into_iter().map(|(i, r)| (i, vec![r])));
    results.sort_by_key(|(i, _)| *i);
    let mut results: Vec<CaseResult> = results.into_iter().flat_map(|(_, r)| r).collect();
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
            .filter(|r| r.case.paradigm != "incrementallearning")
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
    if let Some(ia) = idx("accuracy") {
        let points: Vec<Point> = results
            .iter()
            .filter(|r| r.case.paradigm == "incrementallearning")
            .filter_map(|r| {
                let m = r.metrics.as_ref().ok()?;
                let round: f64 = r
                    .case
                    .modules
                    .get("basemodel")?
                    .param("round")?
                    .parse()
                    .ok()?;
                let case = r.case.id.split("-round").next().unwrap_or(&r.case.id);
                Some(Point {
                    series: case.to_string(),
                    baseline: false,
                    x: round,
                    y: m[ia]?,
                })
            })
            .collect();
        if !points.is_empty() {
            let title = format!(
                "{}: accuracy per round of incremental learning",
                job.job.name
            );
            match plot::accuracy_per_round(&points, &rank_dir.join("accuracy_per_round"), &title) {
                Ok(written) => files.extend(written),
                Err(e) => tracing::warn!("no plot: {e}"),
            }
        }
    }
    // `latest` points at this run.
    let latest = job.workspace.join("latest");
    let _ = std::fs::remove_file(&latest);
    #[cfg(unix)]
    let _ = std::os::unix::fs::symlink(&run_id, &latest);
    Ok(RunReport {
        run_dir,
        resumed,
        samples: progress.load(std::sync::atomic::Ordering::SeqCst),
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
