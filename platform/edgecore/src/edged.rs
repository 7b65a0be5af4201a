//! Edged: the lightweight kubelet. It runs the pods the local store holds through a
//! [`Runtime`], supervises them (restart policy with crash-loop back-off, readiness probes, log
//! rotation), reports pod status and events upstream, finishes graceful deletes, and serves logs.
//!
//! Everything it needs is in the local store, so it works the same with the cloud away: a
//! restarted agent rebuilds its pods from SQLite and adopts the processes that outlived it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sedge_api::{Key, LogRequest, PodStatusReport, group, kind};
use sedge_tunnel::{Message, Policy, op};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::resolve::{self, NodeFacts};
use crate::runtime::{Container, ContainerSpec, Exit, Runtime, Signal};
use crate::store::{ContainerRecord, MetaStore};

/// Reports on their way upstream (drained into the edge hub's durable outbox; bounded, see
/// [`crate::reports`]).
pub type Reports = Arc<crate::reports::ReportQueue>;

/// Edged's settings.
#[derive(Debug, Clone)]
pub struct EdgedSettings {
    /// Where pod directories (logs, volumes, roots) live.
    pub pods_dir: PathBuf,
    /// How often pods are checked.
    pub sync_interval: Duration,
    /// First crash-loop back-off.
    pub backoff_initial: Duration,
    /// Back-off cap.
    pub backoff_max: Duration,
    /// Running this long resets the back-off.
    pub backoff_reset: Duration,
    /// Log rotation size.
    pub max_log_bytes: u64,
    /// Cap on termination grace.
    pub max_grace: Duration,
    /// Host directories a `hostPath` volume may name (see [`crate::podcheck::host_path`]).
    pub host_path_allow: Vec<PathBuf>,
    /// Each container gets its pod's token (see [`crate::podtoken`]).
    pub pod_tokens: Arc<crate::podtoken::PodTokens>,
}

struct Shared {
    store: Arc<MetaStore>,
    runtime: Arc<dyn Runtime>,
    facts: NodeFacts,
    settings: EdgedSettings,
    reports: Reports,
    counters: EdgedCounters,
}

/// What edged has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct EdgedCounters {
    /// Containers started (first starts and restarts).
    pub container_starts: std::sync::atomic::AtomicU64,
    /// Containers started again after they exited.
    pub container_restarts: std::sync::atomic::AtomicU64,
    /// Containers that could not be started (bad spec, missing image, runtime error).
    pub start_failures: std::sync::atomic::AtomicU64,
}

struct Worker {
    spec: watch::Sender<Value>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running edged.
pub struct Edged {
    shared: Arc<Shared>,
    workers: Mutex<HashMap<String, Worker>>,
    /// Pods (by UID) whose leftover containers are being stopped.
    cleaning: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for Edged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edged")
            .field("node", &self.shared.facts.node)
            .finish()
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn pod_name(pod: &Value) -> (String, String) {
    (
        pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in v.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

impl Edged {
    /// Starts edged over the store.
    pub fn start(
        store: Arc<MetaStore>,
        runtime: Arc<dyn Runtime>,
        facts: NodeFacts,
        settings: EdgedSettings,
        reports: Reports,
    ) -> Arc<Edged> {
        let e = Arc::new(Edged {
            shared: Arc::new(Shared {
                store,
                runtime,
                facts,
                settings,
                reports,
                counters: EdgedCounters::default(),
            }),
            workers: Mutex::new(HashMap::new()),
            cleaning: Arc::default(),
        });
        tokio::spawn(e.clone().run());
        e
    }

    async fn run(self: Arc<Self>) {
        let mut changes = self.shared.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // The store is SQLite: read it on the blocking pool, not on the runtime's threads.
            let store = self.shared.store.clone();
            match tokio::task::spawn_blocking(move || {
                Ok::<_, String>((
                    store.list(kind::POD, None).map_err(|e| e.to_string())?,
                    store.recorded_pods().unwrap_or_default(),
                ))
            })
            .await
            {
                Ok(Ok((pods, recorded))) => self.reconcile(pods, recorded),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot read pods from the local store"),
                Err(e) => tracing::error!(error = %e, "reading the local store failed"),
            }
            tokio::select! {
                r = changes.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r { return; }
                }
                _ = tick.tick() => {}
            }
        }
    }

    /// Starts workers for new pods (`pods`: the store's), passes updates on, stops workers of
    /// pods that are gone, and cleans up pods that went away while the agent was down
    /// (`recorded`: pods with container records).
    fn reconcile(&self, pods: Vec<Value>, recorded: Vec<String>) {
        let desired: HashMap<String, Value> = pods
            .into_iter()
            .filter(|p| p["spec"]["nodeName"].as_str() == Some(self.shared.facts.node.as_str()))
            .filter(|p| match crate::podcheck::uid(&uid_of(p)) {
                Ok(()) => true,
                Err(e) => {
                    let (ns, name) = pod_name(p);
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "pod ignored");
                    false
                }
            })
            .map(|p| (uid_of(&p), p))
            .collect();
        let mut workers = self.workers.lock().unwrap();
        workers.retain(|uid, w| {
            if w.task.is_finished() {
                return false;
            }
            if !desired.contains_key(uid) {
                let _ = w.stop.send(true);
            }
            true
        });
        for (uid, pod) in &desired {
            match workers.get(uid) {
                Some(w) => {
                    if w.spec.borrow()["metadata"]["resourceVersion"]
                        != pod["metadata"]["resourceVersion"]
                    {
                        let _ = w.spec.send(pod.clone());
                    }
                }
                None => {
                    let (spec_tx, spec_rx) = watch::channel(pod.clone());
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let task = tokio::spawn(run_pod(self.shared.clone(), spec_rx, stop_rx));
                    workers.insert(
                        uid.clone(),
                        Worker {
                            spec: spec_tx,
                            stop: stop_tx,
                            task,
                        },
                    );
                }
            }
        }
        // Pods deleted while the agent was down: their processes may still run.
        for uid in recorded {
            if desired.contains_key(&uid)
                || workers.contains_key(&uid)
                || !self.cleaning.lock().unwrap().insert(uid.clone())
            {
                continue;
            }
            let (shared, cleaning) = (self.shared.clone(), self.cleaning.clone());
            tokio::spawn(async move {
                cleanup_orphan(&shared, &uid).await;
                cleaning.lock().unwrap().remove(&uid);
            });
        }
    }

    /// The edged part of the agent's metrics: pods it runs, containers started and restarted.
    pub fn metrics(&self, e: &mut sedge_serve::Exposition) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters;
        let pods = self.workers.lock().unwrap_or_else(|p| p.into_inner()).len();
        e.gauge("edged_pods", "Pods this node runs", pods as i64)
            .counter(
                "edged_container_starts",
                "Containers started (first starts and restarts)",
                c.container_starts.load(Relaxed),
            )
            .counter(
                "edged_container_restarts",
                "Containers started again after they exited",
                c.container_restarts.load(Relaxed),
            )
            .counter(
                "edged_container_start_failures",
                "Containers that could not be started",
                c.start_failures.load(Relaxed),
            )
            .counter(
                "edge_store_writes",
                "Objects stored or deleted in the node's SQLite store",
                self.shared.store.writes(),
            )
            .gauge(
                "edge_reports_waiting",
                "Reports waiting to be written to the outbox",
                self.shared.reports.len() as i64,
            )
            .counter(
                "edge_reports_dropped",
                "Reports dropped because the queue to the outbox was full",
                self.shared.reports.dropped(),
            );
    }

    /// Stops every pod's containers (gracefully) and waits for it.
    pub async fn stop_all(&self) {
        let workers: Vec<Worker> = self
            .workers
            .lock()
            .unwrap()
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in &workers {
            let _ = w.stop.send(true);
        }
        for w in workers {
            let _ = w.task.await;
        }
    }

    /// Stops supervising (the processes keep running, to be adopted by the next start).
    pub fn detach(&self) {
        for (_, w) in self.workers.lock().unwrap().drain() {
            w.task.abort();
        }
    }

    /// Reads a container log for `kubectl logs`.
    pub fn logs(&self, ns: &str, name: &str, req: &LogRequest) -> Result<Vec<u8>, String> {
        let pod = self
            .shared
            .store
            .get(kind::POD, ns, name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("pod {ns}/{name} is not on this node"))?;
        let uid = if req.uid.is_empty() {
            uid_of(&pod)
        } else {
            req.uid.clone()
        };
        read_log(&self.shared.settings.pods_dir, &uid, &req.container, req)
    }
}

/// Where a container's log lives.
pub fn log_path(pods_dir: &Path, uid: &str, container: &str) -> PathBuf {
    pods_dir
        .join(uid)
        .join("logs")
        .join(format!("{container}.log"))
}

/// A container's log, honouring `previous`, `tailLines` and `limitBytes`.
pub fn read_log(
    pods_dir: &Path,
    uid: &str,
    container: &str,
    req: &LogRequest,
) -> Result<Vec<u8>, String> {
    crate::podcheck::uid(uid)?;
    if !crate::podcheck::dns_label(container) {
        return Err(format!(
            "container name {container:?} is not a DNS-1123 label"
        ));
    }
    let current = log_path(pods_dir, uid, container);
    let mut out = Vec::new();
    if req.previous {
        let p = current.with_extension("previous.log");
        out = std::fs::read(&p).map_err(|_| {
            format!("previous terminated container \"{container}\" in pod not found")
        })?;
    } else {
        if let Ok(b) = std::fs::read(current.with_extension("log.1")) {
            out.extend(b);
        }
        match std::fs::read(&current) {
            Ok(b) => out.extend(b),
            Err(_) if !out.is_empty() => {}
            Err(_) => {
                return Err(format!(
                    "container \"{container}\" has not written a log yet (not started?)"
                ));
            }
        }
    }
    if let Some(n) = req.tail_lines {
        let text = out;
        let mut lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        let keep = lines.len().saturating_sub(n as usize);
        lines.drain(..keep);
        out = lines.concat();
    }
    if let Some(n) = req.limit_bytes {
        let n = n as usize;
        if out.len() > n {
            out.drain(..out.len() - n);
        }
    }
    Ok(out)
}

async fn cleanup_orphan(shared: &Shared, uid: &str) {
    if let Err(e) = crate::podcheck::uid(uid) {
        tracing::warn!(error = %e, "recorded pod not cleaned up");
        return;
    }
    let Ok(recs) = shared.store.containers(uid) else {
        return;
    };
    for r in &recs {
        if let Some(c) = shared.runtime.adopt(r) {
            tracing::info!(pod_uid = uid, container = %r.name, "stopping a container of a pod deleted while the agent was down");
            stop_container(c, shared.settings.max_grace).await;
        }
    }
    let _ = shared.store.forget_containers(uid);
    let _ = std::fs::remove_dir_all(shared.settings.pods_dir.join(uid));
}

async fn stop_container(mut c: Box<dyn Container>, grace: Duration) -> Exit {
    c.signal(Signal::Term);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(e) = c.poll_exit() {
            return e;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.signal(Signal::Kill);
    for _ in 0..100 {
        if let Some(e) = c.poll_exit() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Exit::Unknown
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        code: i32,
        reason: String,
        started_at: String,
        finished_at: String,
    },
}

struct Ctr {
    name: String,
    spec: Value,
    spec_hash: String,
    handle: Option<Box<dyn Container>>,
    state: State,
    restarts: i32,
    ever_started: bool,
    last_terminated: Option<Value>,
    started: Option<Instant>,
    next_start: Instant,
    backoff: Duration,
    ready: bool,
    probe_ok: u32,
    probe_fail: u32,
    next_probe: Instant,
}

struct PodRun {
    shared: Arc<Shared>,
    pod: Value,
    uid: String,
    ns: String,
    name: String,
    dir: PathBuf,
    ctrs: Vec<Ctr>,
    start_time: String,
    last_report: Value,
    transitions: BTreeMap<String, (String, String)>,
}

async fn run_pod(
    shared: Arc<Shared>,
    mut spec: watch::Receiver<Value>,
    mut stop: watch::Receiver<bool>,
) {
    let pod = spec.borrow().clone();
    let mut run = PodRun::new(shared.clone(), pod);
    let mut tick = tokio::time::interval(shared.settings.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finished_delete = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = spec.changed() => {
                if r.is_err() { break; }
                let p = spec.borrow().clone();
                run.update(p).await;
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    // Gone from the store: stop, clean up, done.
                    run.terminate("the pod is no longer assigned to this node").await;
                    let _ = shared.store.forget_containers(&run.uid);
                    let _ = std::fs::remove_dir_all(&run.dir);
                    return;
                }
            }
        }
        if run.pod["metadata"]["deletionTimestamp"].is_string() {
            if !finished_delete {
                run.terminate("the pod is being deleted").await;
                run.report();
                let report = PodStatusReport {
                    uid: run.uid.clone(),
                    status: run.status(),
                };
                let key = Key::new(Some(&run.ns), kind::POD_STATUS, &run.name);
                let msg = Message::new(
                    group::CLOUD,
                    op::DELETE,
                    &key.to_string(),
                    serde_json::to_vec(&report).unwrap_or_default(),
                );
                shared.reports.send((msg, Policy::LatestWins));
                finished_delete = true;
            }
            continue;
        }
        run.sync().await;
        run.report();
    }
}

impl PodRun {
    fn new(shared: Arc<Shared>, pod: Value) -> PodRun {
        let uid = uid_of(&pod);
        let (ns, name) = pod_name(&pod);
        let dir = shared.settings.pods_dir.join(&uid);
        let records: HashMap<String, ContainerRecord> = shared
            .store
            .containers(&uid)
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let mut start_time = now();
        let ctrs = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let name = c["name"].as_str().unwrap_or_default().to_string();
                let mut ctr = Ctr {
                    name: name.clone(),
                    spec: c.clone(),
                    spec_hash: hash(c),
                    handle: None,
                    state: State::Waiting { reason: "ContainerCreating".into(), message: String::new() },
                    restarts: 0,
                    ever_started: false,
                    last_terminated: None,
                    started: None,
                    next_start: Instant::now(),
                    backoff: Duration::ZERO,
                    ready: false,
                    probe_ok: 0,
                    probe_fail: 0,
                    next_probe: Instant::now(),
                };
                if let Some(r) = records.get(&name) {
                    ctr.restarts = r.restarts;
                    ctr.ever_started = true;
                    ctr.last_terminated = r.last_terminated.clone();
                    if r.started_at < start_time && !r.started_at.is_empty() {
                        start_time = r.started_at.clone();
                    }
                    match shared.runtime.adopt(r) {
                        Some(h) if r.spec_hash == ctr.spec_hash => {
                            tracing::info!(pod = %format!("{ns}/{name}"), container = %ctr.name, pid = %h.id(), "adopted a running container");
                            ctr.handle = Some(h);
                            ctr.state = State::Running { started_at: r.started_at.clone() };
                            ctr.started = Some(Instant::now());
                        }
                        Some(h) => {
                            // Started from an older spec: replace it.
                            tokio::spawn(stop_container(h, shared.settings.max_grace));
                        }
                        None if r.pid != 0 => {
                            // It ended while the agent was away (or the machine rebooted).
                            let t = json!({"exitCode": 255, "reason": "Unknown",
                                "message": "the container ended while the agent was not running; its exit status is lost",
                                "startedAt": r.started_at, "finishedAt": now()});
                            ctr.last_terminated = Some(t.clone());
                            ctr.state = State::Terminated { code: 255, reason: "Unknown".into(), started_at: r.started_at.clone(), finished_at: now() };
                        }
                        None => {
                            if let Some(t) = &r.last_terminated {
                                ctr.state = State::Terminated {
                                    code: t["exitCode"].as_i64().unwrap_or(0) as i32,
                                    reason: t["reason"].as_str().unwrap_or_default().into(),
                                    started_at: t["startedAt"].as_str().unwrap_or_default().into(),
                                    finished_at: t["finishedAt"].as_str().unwrap_or_default().into(),
                                };
                            }
                        }
                    }
                }
                ctr
            })
            .collect();
        PodRun {
            shared,
            pod,
            uid,
            ns,
            name,
            dir,
            ctrs,
            start_time,
            last_report: Value::Null,
            transitions: BTreeMap::new(),
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
    }

    fn record(&self, c: &Ctr) {
        let (pid, ticks) = c
            .handle
            .as_ref()
            .map(|h| (h.id().parse().unwrap_or(0), h.start_ticks()))
            .unwrap_or((0, 0));
        let started_at = match &c.state {
            State::Running { started_at } => started_at.clone(),
            _ => String::new(),
        };
        let rec = ContainerRecord {
            pod_uid: self.uid.clone(),
            name: c.name.clone(),
            pid,
            start_ticks: ticks,
            started_at,
            restarts: c.restarts,
            last_terminated: c.last_terminated.clone(),
            spec_hash: c.spec_hash.clone(),
        };
        if let Err(e) = self.shared.store.save_container(&rec) {
            tracing::error!(error = %e, "cannot record container");
        }
    }

    fn event(&self, type_: &str, reason: &str, message: &str) {
        let ev = json!({
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": self.ns, "name": self.name, "uid": self.uid},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": "sedge-edged", "host": self.shared.facts.node},
            "reportingComponent": "sedge-edged", "reportingInstance": self.shared.facts.node,
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        });
        let key = Key::new(Some(&self.ns), kind::EVENT, &self.name);
        let msg = Message::new(
            group::CLOUD,
            op::INSERT,
            &key.to_string(),
            serde_json::to_vec(&ev).unwrap_or_default(),
        );
        self.shared.reports.send((msg, Policy::Append));
    }

    /// A new version of the pod from the cloud: containers whose spec changed are replaced.
    async fn update(&mut self, pod: Value) {
        let specs: HashMap<String, Value> = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c.clone(),
                )
            })
            .collect();
        self.pod = pod;
        for i in 0..self.ctrs.len() {
            let Some(spec) = specs.get(&self.ctrs[i].name) else {
                continue;
            };
            let h = hash(spec);
            if h == self.ctrs[i].spec_hash {
                continue;
            }
            self.ctrs[i].spec = spec.clone();
            self.ctrs[i].spec_hash = h;
            if let Some(handle) = self.ctrs[i].handle.take() {
                self.event(
                    "Normal",
                    "Killing",
                    &format!(
                        "Container {} definition changed, will be restarted",
                        self.ctrs[i].name
                    ),
                );
                let exit = stop_container(handle, self.grace()).await;
                self.exited(i, exit);
                self.ctrs[i].next_start = Instant::now();
            }
        }
    }

    fn grace(&self) -> Duration {
        let g = self.pod["metadata"]["deletionGracePeriodSeconds"]
            .as_u64()
            .or_else(|| self.pod["spec"]["terminationGracePeriodSeconds"].as_u64())
            .unwrap_or(30);
        Duration::from_secs(g).min(self.shared.settings.max_grace)
    }

    async fn terminate(&mut self, why: &str) {
        let grace = self.grace();
        for i in 0..self.ctrs.len() {
            if let Some(h) = self.ctrs[i].handle.take() {
                self.event(
                    "Normal",
                    "Killing",
                    &format!("Stopping container {}: {why}", self.ctrs[i].name),
                );
                let exit = stop_container(h, grace).await;
                self.exited(i, exit);
            }
            self.ctrs[i].next_start = Instant::now() + Duration::from_secs(86400 * 365);
        }
    }

    fn exited(&mut self, i: usize, exit: Exit) {
        let started_at = match &self.ctrs[i].state {
            State::Running { started_at } => started_at.clone(),
            _ => String::new(),
        };
        let code = exit.code();
        let reason = match exit {
            Exit::Unknown => "Unknown",
            _ if code == 0 => "Completed",
            _ => "Error",
        };
        let t = json!({"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now()});
        let c = &mut self.ctrs[i];
        c.last_terminated = Some(t);
        c.state = State::Terminated {
            code,
            reason: reason.into(),
            started_at,
            finished_at: now(),
        };
        c.ready = false;
        c.handle = None;
        // Back-off doubles per failure; a long run resets it.
        let ran = c.started.map(|s| s.elapsed()).unwrap_or_default();
        let s = &self.shared.settings;
        c.backoff = if ran >= s.backoff_reset || c.backoff.is_zero() {
            s.backoff_initial
        } else {
            (c.backoff * 2).min(s.backoff_max)
        };
        c.next_start = Instant::now() + c.backoff;
        let c = &self.ctrs[i];
        self.record(c);
    }

    fn wants_restart(&self, c: &Ctr) -> bool {
        match &c.state {
            State::Terminated { code, .. } => match self.restart_policy() {
                "Never" => false,
                "OnFailure" => *code != 0,
                _ => true,
            },
            _ => true,
        }
    }

    async fn sync(&mut self) {
        for i in 0..self.ctrs.len() {
            // Exits.
            if let Some(h) = self.ctrs[i].handle.as_mut()
                && let Some(exit) = h.poll_exit()
            {
                let name = self.ctrs[i].name.clone();
                self.exited(i, exit);
                tracing::info!(pod = %format!("{}/{}", self.ns, self.name), container = %name, code = exit.code(), "container exited");
            }
            // Starts and restarts.
            if self.ctrs[i].handle.is_none() && self.wants_restart(&self.ctrs[i]) {
                if Instant::now() < self.ctrs[i].next_start {
                    if matches!(self.ctrs[i].state, State::Terminated { .. })
                        || self.crashlooping(i)
                    {
                        let c = &self.ctrs[i];
                        let msg = format!(
                            "back-off {}s restarting failed container={} pod={}_{}({})",
                            c.backoff.as_secs(),
                            c.name,
                            self.name,
                            self.ns,
                            self.uid
                        );
                        if !matches!(&c.state, State::Waiting { reason, .. } if reason == "CrashLoopBackOff")
                        {
                            self.event(
                                "Warning",
                                "BackOff",
                                &format!("Back-off restarting failed container {}", c.name),
                            );
                        }
                        self.ctrs[i].state = State::Waiting {
                            reason: "CrashLoopBackOff".into(),
                            message: msg,
                        };
                    }
                } else {
                    self.start(i);
                }
            }
            // Readiness.
            self.probe(i).await;
        }
        // Log rotation.
        for c in &self.ctrs {
            let p = log_path(&self.shared.settings.pods_dir, &self.uid, &c.name);
            if std::fs::metadata(&p).is_ok_and(|m| m.len() > self.shared.settings.max_log_bytes) {
                let _ = std::fs::copy(&p, p.with_extension("log.1"));
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(0));
            }
        }
    }

    fn crashlooping(&self, i: usize) -> bool {
        matches!(&self.ctrs[i].state, State::Waiting { reason, .. } if reason == "CrashLoopBackOff")
    }

    fn start(&mut self, i: usize) {
        let facts = self.shared.facts.clone();
        let spec = self.ctrs[i].spec.clone();
        let name = self.ctrs[i].name.clone();
        let root = self.dir.join("root").join(&name);
        let log = log_path(&self.shared.settings.pods_dir, &self.uid, &name);
        let config = (|| -> Result<(Vec<(String, String)>, PathBuf), String> {
            let runtime = &self.shared.runtime;
            crate::podcheck::pod(&self.pod, &self.shared.settings.host_path_allow, |image| {
                runtime.runs_host_commands(image)
            })?;
            let mut env = resolve::env(&self.shared.store, &self.pod, &spec, &facts)?;
            let token = self.shared.settings.pod_tokens.token(&self.uid);
            env.retain(|(k, _)| k != crate::podtoken::ENV);
            env.push((crate::podtoken::ENV.to_string(), token));
            let vols = resolve::volumes(&self.shared.store, &self.pod, &self.dir, &facts)?;
            resolve::mounts(&spec, &vols, &root)?;
            let wd = match spec["workingDir"].as_str() {
                Some(w) if !w.is_empty() => crate::runtime::under_root(&root, w),
                _ => root.clone(),
            };
            Ok((env, wd))
        })();
        let (env, working_dir) = match config {
            Ok(x) => x,
            Err(message) => {
                self.start_failed();
                self.wait_with(i, "CreateContainerConfigError", message);
                return;
            }
        };
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let cs = ContainerSpec {
            pod_uid: self.uid.clone(),
            pod: format!("{}/{}", self.ns, self.name),
            name: name.clone(),
            image: spec["image"].as_str().unwrap_or_default().to_string(),
            command: strs(&spec["command"]),
            args: strs(&spec["args"]),
            env,
            root,
            working_dir,
            log_path: log.clone(),
        };
        // The previous instance's log stays readable with `kubectl logs --previous`.
        if self.ctrs[i].ever_started && log.exists() {
            let _ = std::fs::rename(&log, log.with_extension("previous.log"));
        }
        match self.shared.runtime.start(&cs) {
            Ok(h) => {
                let counters = &self.shared.counters;
                counters
                    .container_starts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let c = &mut self.ctrs[i];
                if c.ever_started {
                    c.restarts += 1;
                    counters
                        .container_restarts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                c.ever_started = true;
                c.handle = Some(h);
                c.state = State::Running { started_at: now() };
                c.started = Some(Instant::now());
                c.probe_ok = 0;
                c.probe_fail = 0;
                let delay = c.spec["readinessProbe"]["initialDelaySeconds"]
                    .as_u64()
                    .unwrap_or(0);
                c.next_probe = Instant::now() + Duration::from_secs(delay);
                let c = &self.ctrs[i];
                self.record(c);
                self.event("Normal", "Started", &format!("Started container {name}"));
            }
            Err(e) => {
                self.start_failed();
                self.wait_with(i, &e.reason, e.message)
            }
        }
    }

    fn start_failed(&self) {
        self.shared
            .counters
            .start_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The container cannot start yet: say why, and try again after the initial back-off.
    fn wait_with(&mut self, i: usize, reason: &str, message: String) {
        let retry = self.shared.settings.backoff_initial;
        let c = &mut self.ctrs[i];
        let changed = !matches!(&c.state, State::Waiting { reason: r, message: m } if r == reason && *m == message);
        c.state = State::Waiting {
            reason: reason.into(),
            message: message.clone(),
        };
        c.next_start = Instant::now() + retry;
        if changed {
            tracing::warn!(pod = %format!("{}/{}", self.ns, self.name), container = %self.ctrs[i].name, %reason, %message, "container cannot start");
            self.event("Warning", "Failed", &format!("Error: {message}"));
        }
    }

    async fn probe(&mut self, i: usize) {
        let c = &self.ctrs[i];
        let running = c.handle.is_some();
        let probe = c.spec["readinessProbe"].clone();
        if !running {
            self.ctrs[i].ready = false;
            return;
        }
        if !probe.is_object() {
            self.ctrs[i].ready = true;
            return;
        }
        if Instant::now() < c.next_probe {
            return;
        }
        let period = probe["periodSeconds"].as_u64().unwrap_or(10).max(1);
        let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
        let ok = crate::probe::run(
            &probe,
            &c.spec,
            &self.shared.facts.ip,
            &self.dir.join("root").join(&c.name),
            timeout,
        )
        .await;
        let c = &mut self.ctrs[i];
        c.next_probe = Instant::now() + Duration::from_secs(period);
        if ok {
            c.probe_ok += 1;
            c.probe_fail = 0;
            if c.probe_ok >= probe["successThreshold"].as_u64().unwrap_or(1) as u32 {
                c.ready = true;
            }
        } else {
            c.probe_fail += 1;
            c.probe_ok = 0;
            if c.probe_fail >= probe["failureThreshold"].as_u64().unwrap_or(3) as u32 {
                c.ready = false;
            }
        }
    }

    fn status(&mut self) -> Value {
        let policy = self.restart_policy().to_string();
        let mut statuses = Vec::new();
        let (mut running, mut waiting, mut all_done, mut all_ok) = (0, 0, true, true);
        for c in &self.ctrs {
            let state = match &c.state {
                State::Waiting { reason, message } => {
                    waiting += 1;
                    all_done = false;
                    let mut w = json!({"reason": reason});
                    if !message.is_empty() {
                        w["message"] = json!(message);
                    }
                    json!({"waiting": w})
                }
                State::Running { started_at } => {
                    running += 1;
                    all_done = false;
                    json!({"running": {"startedAt": started_at}})
                }
                State::Terminated {
                    code,
                    reason,
                    started_at,
                    finished_at,
                } => {
                    let restarts = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => *code != 0,
                        _ => true,
                    };
                    if restarts {
                        all_done = false;
                    }
                    if *code != 0 {
                        all_ok = false;
                    }
                    json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at}})
                }
            };
            let mut s = json!({
                "name": c.name,
                "image": c.spec["image"],
                "imageID": "",
                "ready": c.ready,
                "started": c.handle.is_some(),
                "restartCount": c.restarts,
                "state": state,
                "lastState": match &c.last_terminated { Some(t) if c.handle.is_some() || c.restarts > 0 => json!({"terminated": t}), _ => json!({}) },
            });
            if let Some(h) = &c.handle {
                s["containerID"] = json!(format!("process://{}", h.id()));
            }
            statuses.push(s);
        }
        let phase = if all_done && !self.ctrs.is_empty() {
            if all_ok { "Succeeded" } else { "Failed" }
        } else if running > 0 || self.ctrs.iter().any(|c| c.ever_started) {
            "Running"
        } else {
            "Pending"
        };
        let _ = waiting;
        let all_ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready);
        let mut conditions = Vec::new();
        for (t, ok) in [
            ("PodReadyToStartContainers", true),
            ("Initialized", true),
            ("Ready", all_ready),
            ("ContainersReady", all_ready),
            ("PodScheduled", true),
        ] {
            let status = if ok { "True" } else { "False" };
            let entry = self
                .transitions
                .entry(t.to_string())
                .or_insert_with(|| (status.to_string(), now()));
            if entry.0 != status {
                *entry = (status.to_string(), now());
            }
            let mut c = json!({"type": t, "status": status, "lastTransitionTime": entry.1});
            if !ok {
                let not_ready: Vec<&str> = self
                    .ctrs
                    .iter()
                    .filter(|c| !c.ready)
                    .map(|c| c.name.as_str())
                    .collect();
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
            conditions.push(c);
        }
        let ip = &self.shared.facts.ip;
        json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": ip, "hostIPs": [{"ip": ip}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        })
    }

    /// Sends the status upstream when it changed (latest wins in the outbox while offline).
    fn report(&mut self) {
        let status = self.status();
        if status == self.last_report {
            return;
        }
        self.last_report = status.clone();
        let report = PodStatusReport {
            uid: self.uid.clone(),
            status,
        };
        let key = Key::new(Some(&self.ns), kind::POD_STATUS, &self.name);
        let msg = Message::new(
            group::CLOUD,
            op::UPDATE,
            &key.to_string(),
            serde_json::to_vec(&report).unwrap_or_default(),
        );
        self.shared.reports.send((msg, Policy::LatestWins));
    }
}
