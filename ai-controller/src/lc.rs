//! The local controller of incremental learning jobs on a node (Sedna's LC role for this kind).
//!
//! The controller writes each job's [`IlNodeState`] into the ConfigMap its inference worker
//! mounts; the platform delivers it here and keeps it in the node's store. Every second this
//! module reads those states and does the node's share of the stage they name:
//!
//! | job state | here |
//! |---|---|
//! | Train/Waiting | poll the Dataset's index ([`Collector`]), report the sample count, and when the train trigger fires start a round (its lists under `outputDir`) and report Ready with the train worker's input |
//! | Eval/Waiting | report Ready with the eval worker's input: the round's trained model and the deployed one, the round's eval list |
//! | Deploy/Waiting | read the round's eval results, build `m` and `m_delta` for each metric, evaluate the deploy trigger; not met: report Completed (not deployed); met, cold: copy the model over the deploy Model's file, report Ready; met, hot: report Ready |
//! | Deploy/Starting (hot) | point `model_config.json` at the new model; when the worker's counters (its reports to the LC endpoint) show it swapped the model in, report Completed; refused, or not taken within its poll period and a minute, report Failed (the old model stays) |
//!
//! The train and eval workers report their results to the LC endpoint (Sedna's
//! `/sedna/workers/<pod>/info`, `ownerKind: incrementallearningjob`); [`worker_result`] checks
//! and keeps them (the trained model must be a file under the job's `outputDir`) and forwards
//! them. Each decision is made once per job state (the state's `seq`, persisted with the rest of
//! what this module knows about a job in `<outputDir>/lc-job.json`), and every report goes
//! through the durable outbox, so a link cut loses nothing and a restart repeats nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sedge_edgecore::ModuleContext;
use sedge_tunnel::{Message, Policy, op};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::collect::Collector;
use crate::trigger::{Rule, TimeOfDay};
use crate::wire::{
    GROUP, IL_JOB_LABEL, IL_STATE_KEY, IL_WORKER_TYPE_LABEL, IlEvent, IlNodeState, IlProgress, kind,
};

/// Results one worker report may carry, metrics per result, and numbers per metric.
const MAX_RESULTS: usize = 4;
const MAX_RESULT_METRICS: usize = 32;
const MAX_METRIC_VALUES: usize = 1024;
const MAX_URL: usize = 4096;
/// How often the train trigger is checked when `trigger.checkPeriodSeconds` is not set (Sedna's
/// LC diffs the dataset every 10 s).
const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// What the LC knows about a job, kept in `<outputDir>/lc-job.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobFile {
    /// The job state (`seq`) last decided on.
    acted: Option<usize>,
    /// The model in service, when one was deployed by the job (else the deploy Model's file).
    deployed: Option<String>,
    /// Its version (`round-<n>`).
    version: Option<String>,
    /// Per round: the train list, the eval list.
    rounds: BTreeMap<u32, (String, String)>,
    /// Per round: the trained model file.
    trained: BTreeMap<u32, String>,
    /// Per round: the eval worker's results ([new, deployed]).
    evals: BTreeMap<u32, Vec<WorkerResult>>,
}

/// One of a worker's results (Sedna's `{format, url, metrics}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerResult {
    /// `onnx`.
    #[serde(default)]
    pub format: String,
    /// The model file.
    pub url: String,
    /// Lists of numbers.
    #[serde(default)]
    pub metrics: BTreeMap<String, Vec<f64>>,
}

/// What a train or eval worker reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkerOutcome {
    /// `train` or `eval`.
    pub kind: String,
    /// `completed` or `failed`.
    pub status: String,
    /// Its results.
    pub results: Vec<WorkerResult>,
    /// Why it failed.
    pub message: String,
}

struct Runner {
    /// A hot deploy written and not yet confirmed: (state seq, the worker's counters before,
    /// give up after).
    swapping: Option<(usize, (f64, f64), Instant)>,
    state: IlNodeState,
    collector: Option<Collector>,
    file: JobFile,
    last_check: Option<Instant>,
    reported_samples: Option<u64>,
}

/// The jobs of every node this process runs.
#[derive(Default)]
pub(crate) struct Jobs {
    runners: Mutex<HashMap<(String, String, String), Runner>>,
    /// The latest hot-update counters of each inference worker (ns, pod): models swapped in,
    /// models refused. How a hot deploy is confirmed.
    swaps: Mutex<HashMap<(String, String), (f64, f64)>>,
}

/// How long a hot deploy waits for the worker to take the model: its poll period and this.
const SWAP_GRACE: Duration = Duration::from_secs(60);

fn job_file(out: &str) -> PathBuf {
    Path::new(out).join("lc-job.json")
}

fn load_file(out: &str) -> JobFile {
    std::fs::read(job_file(out))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_file(out: &str, f: &JobFile) {
    let body = serde_json::to_vec_pretty(f).expect("serialises");
    if let Err(e) = sedge_datasets::export::write_atomic(&job_file(out), &body) {
        tracing::warn!(output_dir = out, error = %e, "cannot save the local controller's job state");
    }
}

/// The job states in a node's store, with the inference worker pod each reports through.
fn states(ctx: &ModuleContext) -> Vec<(String, IlNodeState, Option<String>)> {
    let Ok(cms) = ctx.store.list(sedge_api::kind::CONFIGMAP, None) else {
        return Vec::new();
    };
    let pods = ctx
        .store
        .list(sedge_api::kind::POD, None)
        .unwrap_or_default();
    cms.into_iter()
        .filter(|cm| cm["metadata"]["labels"][IL_JOB_LABEL].is_string())
        .filter_map(|cm| {
            let ns = cm["metadata"]["namespace"].as_str()?.to_string();
            let st: IlNodeState = serde_json::from_str(cm["data"][IL_STATE_KEY].as_str()?).ok()?;
            if st.node != ctx.node {
                return None;
            }
            let pod = pods
                .iter()
                .filter(|p| p["metadata"]["namespace"].as_str() == Some(ns.as_str()))
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .find(|p| {
                    let l = &p["metadata"]["labels"];
                    l[IL_JOB_LABEL].as_str() == Some(st.job.as_str())
                        && l[IL_WORKER_TYPE_LABEL].as_str() == Some("inference")
                })
                .and_then(|p| p["metadata"]["name"].as_str().map(String::from));
            Some((ns, st, pod))
        })
        .collect()
}

/// Runs the local controller for every node in `contexts` until the task is aborted.
pub(crate) async fn run(
    jobs: Arc<Jobs>,
    contexts: impl Fn() -> Vec<ModuleContext> + Send + 'static,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for ctx in contexts() {
            let jobs = jobs.clone();
            let node = ctx.node.clone();
            let found = match tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for (ns, st, pod) in states(&ctx) {
                    let Some(pod) = pod else { continue };
                    for (kind_, body, policy) in jobs.step(&ctx.node, &ns, &pod, st) {
                        let key = format!("{ns}/{kind_}/{pod}");
                        out.push((Message::new(GROUP, op::UPDATE, &key, body), policy));
                    }
                }
                (ctx, out)
            })
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(%node, error = %e, "local controller pass failed");
                    continue;
                }
            };
            let (ctx, msgs) = found;
            for (m, p) in msgs {
                ctx.send(m, p);
            }
        }
    }
}

fn event(
    st: &IlNodeState,
    stage: &str,
    status: &str,
    seq: usize,
    round: u32,
    data: Value,
    message: String,
) -> (&'static str, Vec<u8>, Policy) {
    let ev = IlEvent {
        job: st.job.clone(),
        stage: stage.into(),
        status: status.into(),
        seq,
        round,
        data: if data.is_null() {
            String::new()
        } else {
            data.to_string()
        },
        message,
    };
    (
        kind::IL_EVENT,
        serde_json::to_vec(&ev).expect("serialises"),
        Policy::Append,
    )
}

/// What the LC decided on the job state it saw (`st.seq`).
fn decided(
    st: &IlNodeState,
    stage: &str,
    status: &str,
    round: u32,
    data: Value,
) -> (&'static str, Vec<u8>, Policy) {
    event(st, stage, status, st.seq, round, data, String::new())
}

/// `m` and `m_delta` (new minus deployed, element by element) for every metric of the eval.
pub fn deploy_stats(results: &[WorkerResult]) -> Result<BTreeMap<String, Vec<f64>>, String> {
    let [new, old] = results else {
        return Err(format!(
            "the eval reported {} results; expected 2 ([new, deployed])",
            results.len()
        ));
    };
    let mut out = BTreeMap::new();
    for (k, v) in &new.metrics {
        out.insert(k.clone(), v.clone());
        if let Some(o) = old.metrics.get(k)
            && o.len() == v.len()
        {
            out.insert(
                format!("{k}_delta"),
                v.iter().zip(o).map(|(a, b)| a - b).collect(),
            );
        }
    }
    Ok(out)
}

fn now_of_day() -> TimeOfDay {
    let t = chrono::Local::now();
    use chrono::Timelike;
    TimeOfDay((t.hour() * 60 + t.minute()) as u16)
}

/// Copies `model` (and its `.json`) over `target` (and its `.json`), each by a rename, so the
/// worker never reads half a file.
fn copy_model(model: &str, target: &str) -> std::io::Result<()> {
    let (m, t) = (Path::new(model), Path::new(target));
    let json_of = |p: &Path| p.with_extension("json");
    if json_of(m).exists() {
        sedge_datasets::export::write_atomic(&json_of(t), &std::fs::read(json_of(m))?)?;
    }
    sedge_datasets::export::write_atomic(t, &std::fs::read(m)?)
}

impl Jobs {
    /// One pass over one job; returns the messages to send upstream.
    fn step(
        &self,
        node: &str,
        ns: &str,
        pod: &str,
        st: IlNodeState,
    ) -> Vec<(&'static str, Vec<u8>, Policy)> {
        let swaps = self
            .swaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ns.to_string(), pod.to_string()))
            .copied();
        let mut all = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.to_string(), ns.to_string(), st.job.clone());
        let r = all.entry(key).or_insert_with(|| Runner {
            file: load_file(&st.output_dir),
            state: st.clone(),
            collector: None,
            last_check: None,
            reported_samples: None,
            swapping: None,
        });
        if r.state.output_dir != st.output_dir || r.state.dataset != st.dataset {
            r.collector = None;
            r.file = load_file(&st.output_dir);
        }
        r.state = st;
        let before = r.file.clone();
        let out = r.advance(swaps);
        if r.file != before {
            save_file(&r.state.output_dir, &r.file);
        }
        out
    }

    /// An inference worker's counters (its periodic report to the LC endpoint).
    pub(crate) fn worker_counters(&self, ns: &str, pod: &str, metrics: &BTreeMap<String, String>) {
        let get = |k: &str| metrics.get(k).and_then(|v| v.parse::<f64>().ok());
        if let (Some(v), Some(r)) = (get("modelVersion"), get("modelUpdateRefused")) {
            self.swaps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((ns.to_string(), pod.to_string()), (v, r));
        }
    }

    /// A train or eval worker's report (through the LC endpoint) of pod `ns/pod`, which runs on
    /// `node` and carries the job's label. Returns what to send upstream, or why it was refused.
    pub(crate) fn worker_result(
        &self,
        node: &str,
        ns: &str,
        job: &str,
        pod: &str,
        outcome: WorkerOutcome,
    ) -> Result<(&'static str, Vec<u8>, Policy), String> {
        let WorkerOutcome {
            kind: stage_kind,
            status,
            results,
            message,
        } = outcome;
        let (stage_kind, status) = (stage_kind.as_str(), status.as_str());
        let stage = match stage_kind {
            "train" => "Train",
            "eval" => "Eval",
            other => {
                return Err(format!(
                    "kind {other:?}: an incremental learning worker reports train or eval"
                ));
            }
        };
        let round: u32 = pod
            .rsplit('-')
            .next()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| {
                format!(
                    "pod {pod:?} is not a round's {stage_kind} worker (<job>-{stage_kind}-<round>)"
                )
            })?;
        let mut all = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        let r = all
            .get_mut(&(node.to_string(), ns.to_string(), job.to_string()))
            .ok_or_else(|| format!("job {ns}/{job} is not known on this node yet"))?;
        if results.len() > MAX_RESULTS {
            return Err(format!("{} results; at most {MAX_RESULTS}", results.len()));
        }
        for res in &results {
            if res.url.len() > MAX_URL {
                return Err(format!("results[].url is longer than {MAX_URL} bytes"));
            }
            if res.metrics.len() > MAX_RESULT_METRICS
                || res
                    .metrics
                    .values()
                    .any(|v| v.len() > MAX_METRIC_VALUES || v.iter().any(|x| !x.is_finite()))
            {
                return Err(format!(
                    "results[].metrics: at most {MAX_RESULT_METRICS} metrics of at most {MAX_METRIC_VALUES} finite numbers"
                ));
            }
        }
        let out_dir = r.state.output_dir.clone();
        if status == "completed" {
            match stage {
                "Train" => {
                    let url = results
                        .first()
                        .map(|r| r.url.clone())
                        .ok_or("a completed train reports its model in results[0].url")?;
                    // The model a later stage deploys must be this job's own output, not any
                    // file a local process names.
                    let real = std::fs::canonicalize(&url)
                        .map_err(|e| format!("results[0].url {url:?}: {e}"))?;
                    let root = std::fs::canonicalize(&out_dir)
                        .map_err(|e| format!("outputDir {out_dir:?}: {e}"))?;
                    if !real.starts_with(&root) || !real.is_file() {
                        return Err(format!(
                            "results[0].url {url:?} is not a file under the job's outputDir {out_dir:?}"
                        ));
                    }
                    r.file.trained.insert(round, real.display().to_string());
                }
                _ => {
                    r.file.evals.insert(round, results.clone());
                }
            }
            save_file(&out_dir, &r.file);
        }
        let data = json!({"round": round, "results": results});
        Ok(event(
            &r.state,
            stage,
            if status == "completed" {
                "completed"
            } else {
                "failed"
            },
            0,
            round,
            data,
            message,
        ))
    }
}

impl Runner {
    fn fail(&mut self, stage: &str, why: String) -> Vec<(&'static str, Vec<u8>, Policy)> {
        tracing::warn!(job = %self.state.job, stage, %why, "incremental learning stage cannot go on");
        self.file.acted = Some(self.state.seq);
        vec![event(
            &self.state,
            stage,
            "failed",
            self.state.seq,
            self.current_round(),
            Value::Null,
            why,
        )]
    }

    fn current_round(&self) -> u32 {
        self.file.rounds.keys().next_back().copied().unwrap_or(0)
    }

    fn deployed(&self) -> String {
        self.file
            .deployed
            .clone()
            .unwrap_or_else(|| self.state.deploy_model.clone())
    }

    fn advance(&mut self, swaps: Option<(f64, f64)>) -> Vec<(&'static str, Vec<u8>, Policy)> {
        let st = self.state.clone();
        let fresh = self.file.acted != Some(st.seq);
        let mut out = Vec::new();
        match (st.stage.as_str(), st.phase.as_str()) {
            ("Train", "Waiting") => {
                let period = st
                    .train_trigger
                    .check_period_seconds
                    .filter(|p| *p > 0)
                    .map_or(DEFAULT_CHECK_PERIOD, |p| Duration::from_secs(p as u64));
                if self.last_check.is_some_and(|t| t.elapsed() < period) {
                    return out;
                }
                self.last_check = Some(Instant::now());
                if self.collector.is_none() {
                    match Collector::open(
                        Path::new(&st.dataset),
                        Path::new(&st.output_dir),
                        st.train_prob,
                    ) {
                        Ok(c) => self.collector = Some(c),
                        Err(e) if fresh => return self.fail("Train", e.to_string()),
                        Err(_) => return out,
                    }
                }
                let c = self.collector.as_mut().expect("opened");
                if let Err(e) = c.poll() {
                    return if fresh {
                        self.fail("Train", e.to_string())
                    } else {
                        out
                    };
                }
                let stats = c.stats();
                let samples = stats["num_of_samples"][0] as u64;
                if self.reported_samples != Some(samples) {
                    self.reported_samples = Some(samples);
                    let p = IlProgress {
                        job: st.job.clone(),
                        samples,
                    };
                    out.push((
                        kind::IL_PROGRESS,
                        serde_json::to_vec(&p).expect("serialises"),
                        Policy::LatestWins,
                    ));
                }
                if !fresh {
                    return out;
                }
                let rule = match Rule::parse(&st.train_trigger) {
                    Ok(r) => r,
                    Err(e) => return self.fail("Train", format!("spec.trainSpec.trigger: {e}")),
                };
                match rule.fires(now_of_day(), &stats) {
                    Ok(true) => {}
                    Ok(false) => return out,
                    Err(e) => return self.fail("Train", format!("spec.trainSpec.trigger: {e}")),
                }
                let round = match c.start_round() {
                    Ok(r) => r,
                    Err(e) => return self.fail("Train", e.to_string()),
                };
                let model_dir = Path::new(&st.output_dir)
                    .join("models")
                    .join(round.round.to_string());
                if let Err(e) = std::fs::create_dir_all(&model_dir) {
                    return self.fail("Train", format!("{}: {e}", model_dir.display()));
                }
                let (train, eval) = (
                    round.train.display().to_string(),
                    round.eval.display().to_string(),
                );
                self.file
                    .rounds
                    .insert(round.round, (train.clone(), eval.clone()));
                self.file.acted = Some(st.seq);
                self.reported_samples = Some(0);
                let base = self
                    .file
                    .deployed
                    .clone()
                    .unwrap_or_else(|| st.initial_model.clone());
                let data = json!({
                    "round": round.round, "baseModelUrl": base, "outputUrl": model_dir.display().to_string(),
                    "trainDatasetUrl": train, "testDatasetUrl": eval,
                    "samples": {"train": round.counts.0, "eval": round.counts.1},
                });
                tracing::info!(job = %st.job, round = round.round, train = round.counts.0, eval = round.counts.1, "train trigger fired");
                out.push(decided(&st, "Train", "ready", round.round, data));
            }
            ("Eval", "Waiting") if fresh => {
                let round = self.current_round();
                let Some(trained) = self.file.trained.get(&round).cloned() else {
                    return self.fail("Eval", format!("round {round} has no trained model (the train worker did not report one)"));
                };
                let old = if st.eval_model.is_empty() {
                    self.deployed()
                } else {
                    st.eval_model.clone()
                };
                let eval = self
                    .file
                    .rounds
                    .get(&round)
                    .map(|r| r.1.clone())
                    .unwrap_or_default();
                self.file.acted = Some(st.seq);
                let data = json!({"round": round, "modelUrls": format!("{trained};{old}"), "testDatasetUrl": eval});
                out.push(decided(&st, "Eval", "ready", round, data));
            }
            ("Deploy", "Waiting") if fresh => {
                let round = self.current_round();
                let Some(results) = self.file.evals.get(&round).cloned() else {
                    return self.fail("Deploy", format!("round {round} has no eval results (the eval worker did not report them)"));
                };
                let stats = match deploy_stats(&results) {
                    Ok(s) => s,
                    Err(e) => return self.fail("Deploy", e),
                };
                let last_eval = serde_json::to_value(&stats).expect("serialises");
                let fires = Rule::parse(&st.deploy_trigger)
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.fires(now_of_day(), &stats).map_err(|e| e.to_string()));
                let fires = match fires {
                    Ok(f) => f,
                    Err(e) => return self.fail("Deploy", format!("spec.deploySpec.trigger: {e}")),
                };
                self.file.acted = Some(st.seq);
                let version = format!("round-{round}");
                if !fires {
                    let data = json!({"round": round, "deployed": false, "lastEval": last_eval});
                    out.push(decided(&st, "Deploy", "completed", round, data));
                    return out;
                }
                let Some(trained) = self.file.trained.get(&round).cloned() else {
                    return self.fail("Deploy", format!("round {round} has no trained model"));
                };
                if st.hot_update_config.is_empty() {
                    if let Err(e) = copy_model(&trained, &st.deploy_model) {
                        return self.fail(
                            "Deploy",
                            format!("copying {trained} over {}: {e}", st.deploy_model),
                        );
                    }
                    self.file.deployed = Some(st.deploy_model.clone());
                    self.file.version = Some(version.clone());
                    let data = json!({"round": round, "lastEval": last_eval, "modelVersion": version, "modelUrl": st.deploy_model});
                    out.push(decided(&st, "Deploy", "ready", round, data));
                } else {
                    let data = json!({"round": round, "lastEval": last_eval, "model": trained});
                    out.push(decided(&st, "Deploy", "ready", round, data));
                }
            }
            ("Deploy", "Starting") if fresh && !st.hot_update_config.is_empty() => {
                let round = self.current_round();
                let Some(trained) = self.file.trained.get(&round).cloned() else {
                    return self.fail("Deploy", format!("round {round} has no trained model"));
                };
                let version = format!("round-{round}");
                match self.swapping {
                    Some((seq, before, deadline)) if seq == st.seq => {
                        // Written; the worker's own counters say whether it took it.
                        let Some((swapped, refused)) = swaps else {
                            return out;
                        };
                        if refused > before.1 {
                            self.swapping = None;
                            return self.fail(
                                "Deploy",
                                format!("the inference worker refused {trained} (its log says why); the model in service stays"),
                            );
                        }
                        if swapped > before.0 {
                            self.swapping = None;
                            self.file.deployed = Some(trained.clone());
                            self.file.version = Some(version.clone());
                            self.file.acted = Some(st.seq);
                            let data = json!({"round": round, "modelVersion": version, "modelUrl": trained});
                            out.push(decided(&st, "Deploy", "completed", round, data));
                        } else if Instant::now() > deadline {
                            self.swapping = None;
                            return self.fail(
                                "Deploy",
                                format!("the inference worker did not report taking {trained} in time; is it running?"),
                            );
                        }
                    }
                    _ => {
                        let now = chrono::Utc::now().to_rfc3339();
                        if let Err(e) = sedge_worker_contract::hot_update::write_config(
                            Path::new(&st.hot_update_config),
                            Path::new(&trained),
                            &now,
                        ) {
                            return self
                                .fail("Deploy", format!("writing {}: {e}", st.hot_update_config));
                        }
                        let wait = SWAP_GRACE + 2 * Duration::from_secs(st.hot_update_poll_seconds);
                        self.swapping =
                            Some((st.seq, swaps.unwrap_or_default(), Instant::now() + wait));
                    }
                }
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(url: &str, acc: f64, prec: &[f64]) -> WorkerResult {
        WorkerResult {
            format: "onnx".into(),
            url: url.into(),
            metrics: BTreeMap::from([
                ("accuracy".to_string(), vec![acc]),
                ("precision".to_string(), prec.to_vec()),
            ]),
        }
    }

    #[test]
    fn deploy_stats_are_the_new_metrics_and_their_deltas() {
        let s =
            deploy_stats(&[res("new", 0.8, &[0.9, 0.5]), res("old", 0.7, &[0.8, 0.6])]).unwrap();
        assert_eq!(s["accuracy"], vec![0.8]);
        assert!((s["accuracy_delta"][0] - 0.1).abs() < 1e-9);
        assert!((s["precision_delta"][1] + 0.1).abs() < 1e-9);
        assert!(
            deploy_stats(&[res("new", 0.8, &[])])
                .unwrap_err()
                .contains("expected 2")
        );
    }

    fn state(dir: &Path, stage: &str, phase: &str, seq: usize, hot: bool) -> IlNodeState {
        IlNodeState {
            job: "fm".into(),
            node: "edge-1".into(),
            dataset: dir.join("hard/index.txt").display().to_string(),
            train_prob: 1.0,
            train_trigger: serde_json::from_value(json!({"checkPeriodSeconds": 1, "condition": {"operator": ">=", "threshold": 2, "metric": "num_of_samples"}})).unwrap(),
            deploy_trigger: serde_json::from_value(json!({"condition": {"operator": ">", "threshold": 0.0, "metric": "accuracy_delta"}})).unwrap(),
            output_dir: dir.join("out").display().to_string(),
            initial_model: dir.join("m/initial.onnx").display().to_string(),
            deploy_model: dir.join("m/deployed.onnx").display().to_string(),
            eval_model: String::new(),
            hot_update_poll_seconds: 1,
            hot_update_config: if hot { dir.join("out/hot-update/model_config.json").display().to_string() } else { String::new() },
            stage: stage.into(),
            phase: phase.into(),
            seq,
        }
    }

    impl Jobs {
        /// One pass over the test job `fm` on `edge-1`.
        fn at(&self, st: IlNodeState) -> Vec<(&'static str, Vec<u8>, Policy)> {
            self.step("edge-1", "default", "fm-inference", st)
        }
    }

    fn events(out: &[(&'static str, Vec<u8>, Policy)]) -> Vec<IlEvent> {
        out.iter()
            .filter(|(k, _, _)| *k == kind::IL_EVENT)
            .map(|(_, b, _)| serde_json::from_slice(b).unwrap())
            .collect()
    }

    /// A whole round on the node's side, hot: trigger, train input, a forged result refused, the
    /// real one kept, eval input, the deploy decision, the model config written; each decision
    /// once per state.
    #[test]
    fn one_round_on_the_node_hot() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("hard")).unwrap();
        std::fs::create_dir_all(d.join("m")).unwrap();
        let jobs = Jobs::default();
        // Too few samples: only progress.
        std::fs::write(d.join("hard/index.txt"), "images/0.png 1\n").unwrap();
        let out = jobs.at(state(d, "Train", "Waiting", 1, true));
        assert!(events(&out).is_empty());
        assert_eq!(out[0].0, kind::IL_PROGRESS);
        std::fs::write(d.join("hard/index.txt"), "images/0.png 1\nimages/1.png 2\n").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let out = jobs.at(state(d, "Train", "Waiting", 1, true));
        let ev = events(&out);
        assert_eq!(ev.len(), 1, "{out:?}");
        assert_eq!(
            (
                ev[0].stage.as_str(),
                ev[0].status.as_str(),
                ev[0].seq,
                ev[0].round
            ),
            ("Train", "ready", 1, 1)
        );
        let data: Value = serde_json::from_str(&ev[0].data).unwrap();
        assert_eq!(
            data["baseModelUrl"],
            d.join("m/initial.onnx").display().to_string()
        );
        let train_list =
            std::fs::read_to_string(data["trainDatasetUrl"].as_str().unwrap()).unwrap();
        assert_eq!(train_list.lines().count(), 2);
        // The same state again: nothing new.
        std::thread::sleep(Duration::from_millis(1100));
        assert!(events(&jobs.at(state(d, "Train", "Waiting", 1, true))).is_empty());
        // The train worker reports a model outside outputDir: refused.
        std::fs::write(d.join("m/evil.onnx"), b"x").unwrap();
        let evil = jobs.worker_result(
            "edge-1",
            "default",
            "fm",
            "fm-train-1",
            WorkerOutcome {
                kind: "train".into(),
                status: "completed".into(),
                results: vec![res(&d.join("m/evil.onnx").display().to_string(), 0.0, &[])],
                message: String::new(),
            },
        );
        assert!(evil.unwrap_err().contains("outputDir"));
        let model = d.join("out/models/1/edge.onnx");
        std::fs::write(&model, b"model").unwrap();
        let ok = jobs
            .worker_result(
                "edge-1",
                "default",
                "fm",
                "fm-train-1",
                WorkerOutcome {
                    kind: "train".into(),
                    status: "completed".into(),
                    results: vec![res(&model.display().to_string(), 0.0, &[])],
                    message: String::new(),
                },
            )
            .unwrap();
        let ev: IlEvent = serde_json::from_slice(&ok.1).unwrap();
        assert_eq!(
            (ev.stage.as_str(), ev.status.as_str(), ev.seq),
            ("Train", "completed", 0)
        );
        // Eval input: the trained model and the deployed one.
        let ev = events(&jobs.at(state(d, "Eval", "Waiting", 5, true)));
        let data: Value = serde_json::from_str(&ev[0].data).unwrap();
        let urls = data["modelUrls"].as_str().unwrap();
        assert!(
            urls.ends_with(&format!(";{}", d.join("m/deployed.onnx").display())),
            "{urls}"
        );
        assert!(urls.starts_with(&std::fs::canonicalize(&model).unwrap().display().to_string()));
        jobs.worker_result(
            "edge-1",
            "default",
            "fm",
            "fm-eval-1",
            WorkerOutcome {
                kind: "eval".into(),
                status: "completed".into(),
                results: vec![res("new", 0.8, &[0.9]), res("old", 0.7, &[0.8])],
                message: String::new(),
            },
        )
        .unwrap();
        // Deploy: better, hot: Ready, then the config is written at Starting.
        let ev = events(&jobs.at(state(d, "Deploy", "Waiting", 8, true)));
        assert_eq!(
            (ev[0].stage.as_str(), ev[0].status.as_str()),
            ("Deploy", "ready")
        );
        let m = |v: u32, r: u32| {
            BTreeMap::from([
                ("modelVersion".to_string(), v.to_string()),
                ("modelUpdateRefused".to_string(), r.to_string()),
            ])
        };
        jobs.worker_counters("default", "fm-inference", &m(0, 0));
        // The config is written; nothing is reported until the worker says it took the model.
        assert!(events(&jobs.at(state(d, "Deploy", "Starting", 10, true))).is_empty());
        let cfg: Value = serde_json::from_slice(
            &std::fs::read(d.join("out/hot-update/model_config.json")).unwrap(),
        )
        .unwrap();
        assert!(
            cfg["model_config"]["model_path"]
                .as_str()
                .unwrap()
                .ends_with("models/1/edge.onnx")
        );
        assert!(events(&jobs.at(state(d, "Deploy", "Starting", 10, true))).is_empty());
        jobs.worker_counters("default", "fm-inference", &m(1, 0));
        let ev = events(&jobs.at(state(d, "Deploy", "Starting", 10, true)));
        assert_eq!(
            (ev[0].stage.as_str(), ev[0].status.as_str()),
            ("Deploy", "completed")
        );
        let data: Value = serde_json::from_str(&ev[0].data).unwrap();
        assert_eq!(data["modelVersion"], "round-1");
        let cfg: Value = serde_json::from_slice(
            &std::fs::read(d.join("out/hot-update/model_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["model_config"]["model_path"], data["modelUrl"]);
        // A new LC (agent restart) remembers what it decided and what is deployed.
        let again = Jobs::default();
        assert!(events(&again.at(state(d, "Deploy", "Starting", 10, true))).is_empty());
        std::thread::sleep(Duration::from_millis(10));
        let out = again.at(state(d, "Train", "Waiting", 12, true));
        assert!(
            events(&out).is_empty(),
            "no samples since the round started"
        );
        // A model the worker refuses fails the deploy, named.
        again.worker_counters("default", "fm-inference", &m(1, 0));
        let mut f = load_file(&d.join("out").display().to_string());
        f.rounds.insert(2, ("t".into(), "e".into()));
        f.trained.insert(2, model.display().to_string());
        save_file(&d.join("out").display().to_string(), &f);
        let again = Jobs::default();
        again.worker_counters("default", "fm-inference", &m(1, 0));
        assert!(events(&again.at(state(d, "Deploy", "Starting", 20, true))).is_empty());
        again.worker_counters("default", "fm-inference", &m(1, 1));
        let ev = events(&again.at(state(d, "Deploy", "Starting", 20, true)));
        assert_eq!(ev[0].status, "failed");
        assert!(ev[0].message.contains("refused"), "{}", ev[0].message);
    }

    #[test]
    fn worker_reports_out_of_bounds_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("hard")).unwrap();
        let jobs = Jobs::default();
        jobs.at(state(d, "Train", "Waiting", 1, true));
        let before = load_file(&d.join("out").display().to_string());
        let report = |pod: &str, kind: &str, results: Vec<WorkerResult>| {
            let o = WorkerOutcome {
                kind: kind.into(),
                status: "completed".into(),
                results,
                message: String::new(),
            };
            jobs.worker_result("edge-1", "default", "fm", pod, o)
                .unwrap_err()
        };
        let r = res("m", 0.5, &[]);
        assert!(report("fm-deploy-1", "deploy", vec![r.clone()]).contains("train or eval"));
        assert!(report("fm-train-x", "train", vec![r.clone()]).contains("<job>-train-<round>"));
        assert!(report("fm-eval-1", "eval", vec![r.clone(); 5]).contains("at most 4"));
        let long = res("m", 0.5, &vec![0.1; MAX_METRIC_VALUES + 1]);
        assert!(report("fm-eval-1", "eval", vec![long, r.clone()]).contains("finite numbers"));
        let url = res(&"x".repeat(MAX_URL + 1), 0.5, &[]);
        assert!(report("fm-eval-1", "eval", vec![url]).contains("longer than"));
        assert!(report("fm-train-1", "train", vec![]).contains("results[0].url"));
        let unknown = jobs.worker_result(
            "edge-1",
            "default",
            "other",
            "other-train-1",
            WorkerOutcome {
                kind: "train".into(),
                status: "completed".into(),
                results: vec![r],
                message: String::new(),
            },
        );
        assert!(unknown.unwrap_err().contains("not known on this node"));
        assert_eq!(load_file(&d.join("out").display().to_string()), before);
    }

    #[test]
    fn cold_deploy_copies_and_a_worse_model_is_not_deployed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("hard")).unwrap();
        std::fs::create_dir_all(d.join("m")).unwrap();
        std::fs::create_dir_all(d.join("out/models/1")).unwrap();
        std::fs::write(d.join("m/deployed.onnx"), b"old").unwrap();
        let model = d.join("out/models/1/edge.onnx");
        std::fs::write(&model, b"new").unwrap();
        std::fs::write(model.with_extension("json"), b"{}").unwrap();
        let mut f = JobFile::default();
        f.rounds.insert(1, ("t".into(), "e".into()));
        f.trained.insert(1, model.display().to_string());
        f.evals
            .insert(1, vec![res("new", 0.6, &[]), res("old", 0.7, &[])]);
        std::fs::create_dir_all(d.join("out")).unwrap();
        save_file(&d.join("out").display().to_string(), &f);
        let jobs = Jobs::default();
        let ev = events(&jobs.at(state(d, "Deploy", "Waiting", 3, false)));
        assert_eq!((ev[0].status.as_str()), "completed", "worse: not deployed");
        assert_eq!(std::fs::read(d.join("m/deployed.onnx")).unwrap(), b"old");
        f.evals
            .insert(1, vec![res("new", 0.9, &[]), res("old", 0.7, &[])]);
        save_file(&d.join("out").display().to_string(), &f);
        let jobs = Jobs::default();
        let ev = events(&jobs.at(state(d, "Deploy", "Waiting", 3, false)));
        assert_eq!(ev[0].status, "ready");
        assert_eq!(std::fs::read(d.join("m/deployed.onnx")).unwrap(), b"new");
        assert!(d.join("m/deployed.json").exists());
    }

    #[test]
    fn an_unwritable_output_dir_fails_the_stage_once_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let mut st = state(dir.path(), "Train", "Waiting", 1, false);
        st.output_dir = blocker.join("out").display().to_string();
        let jobs = Jobs::default();
        let ev = events(&jobs.at(st.clone()));
        assert_eq!(ev[0].status, "failed");
        assert!(ev[0].message.contains("out"), "{}", ev[0].message);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(events(&jobs.at(st)).is_empty(), "once per state");
    }
}
