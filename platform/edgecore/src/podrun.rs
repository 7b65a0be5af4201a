//! One pod's run on this node: one task per pod (`run_pod`) that starts its containers,
//! restarts them by the restart policy with crash-loop back-off, probes readiness, replaces
//! containers whose spec changed, stops them on delete, and reports the pod's status upstream
//! when it changes. The task sleeps until something is due: a container ended (the runtime
//! tells it, as kubelet's PLEG tells its pod workers), a new spec, a restart after back-off, a
//! probe. Only a container whose runtime cannot tell (a process adopted after an agent restart)
//! is polled, every `sync_interval`. Each container's state moves only through
//! [`crate::lifecycle::transition`]; the store and the file system are touched on the blocking
//! pool, never on the runtime's threads.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sedge_api::{Key, PodStatusReport, group, kind};
use sedge_tunnel::{Message, Policy, op};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::edged::{Shared, log_path, now, stop_container};
use crate::lifecycle::{Event, State, Termination, transition};
use crate::runtime::{Container, ContainerSpec, Exit, Limits, Mount, PodInfo, Security};
use crate::store::ContainerRecord;

/// A pod as the store holds it (`raw`: what podcheck and resolve validate, and what the
/// adoption hash covers) and as Kubernetes types.
#[derive(Debug, Clone)]
pub(crate) struct PodSpec {
    pub raw: Value,
    pub pod: k8s::Pod,
}

impl PodSpec {
    /// Reads a stored pod; an object that is not a Pod says why.
    pub fn parse(raw: Value) -> Result<PodSpec, String> {
        // From the borrowed JSON: no copy of the tree to consume.
        let pod = k8s::Pod::deserialize(&raw).map_err(|e| format!("not a Pod: {e}"))?;
        Ok(PodSpec { raw, pod })
    }

    pub fn uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap_or_default()
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.pod.metadata.resource_version.as_deref()
    }

    fn containers(&self) -> impl Iterator<Item = (k8s::Container, &Value)> {
        let typed = self
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let raw = self.raw["spec"]["containers"].as_array();
        typed.into_iter().filter_map(move |c| {
            let r = raw?.iter().find(|r| r["name"].as_str() == Some(&c.name))?;
            Some((c, r))
        })
    }
}

/// The hash of a container's spec as stored: a running container from another spec is replaced.
fn hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in v.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn time(s: &str) -> Option<Time> {
    s.parse().ok().map(Time)
}

impl Termination {
    fn from_record(t: &Value) -> Termination {
        Termination {
            code: t["exitCode"].as_i64().unwrap_or(0) as i32,
            reason: t["reason"].as_str().unwrap_or_default().into(),
            message: t["message"].as_str().map(Into::into),
            started_at: t["startedAt"].as_str().unwrap_or_default().into(),
            finished_at: t["finishedAt"].as_str().unwrap_or_default().into(),
        }
    }

    fn to_record(&self) -> Value {
        let mut v = json!({"exitCode": self.code, "reason": self.reason,
            "startedAt": self.started_at, "finishedAt": self.finished_at});
        if let Some(m) = &self.message {
            v["message"] = json!(m);
        }
        v
    }

    fn to_k8s(&self) -> k8s::ContainerStateTerminated {
        k8s::ContainerStateTerminated {
            exit_code: self.code,
            reason: Some(self.reason.clone()),
            message: self.message.clone(),
            started_at: time(&self.started_at),
            finished_at: time(&self.finished_at),
            ..Default::default()
        }
    }
}

struct Ctr {
    name: String,
    spec: k8s::Container,
    raw: Value,
    spec_hash: String,
    handle: Option<Box<dyn Container>>,
    state: State,
    restarts: i32,
    ever_started: bool,
    last_terminated: Option<Termination>,
    started: Option<Instant>,
    next_start: Instant,
    backoff: Duration,
    ready: bool,
    probe_ok: u32,
    probe_fail: u32,
    next_probe: Instant,
    /// Its runtime cannot tell when it ends: look every `sync_interval`.
    polled: bool,
}

impl Ctr {
    fn new(spec: k8s::Container, raw: &Value) -> Ctr {
        Ctr {
            name: spec.name.clone(),
            spec,
            raw: raw.clone(),
            spec_hash: hash(raw),
            handle: None,
            state: State::default(),
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
            polled: false,
        }
    }

    /// Moves the state by `event`; an event the state cannot take is logged and changes nothing.
    fn apply(&mut self, pod: &str, event: Event) -> bool {
        match transition(&self.state, event) {
            Ok(s) => {
                if let State::Terminated(t) = &s {
                    self.last_terminated = Some(t.clone());
                }
                self.state = s;
                true
            }
            Err(e) => {
                tracing::error!(%pod, container = %self.name, error = %e, "container state unchanged");
                false
            }
        }
    }

    fn readiness(&self) -> Option<&k8s::Probe> {
        self.spec.readiness_probe.as_ref()
    }
}

pub(crate) struct PodRun {
    shared: Arc<Shared>,
    spec: Arc<PodSpec>,
    uid: String,
    ns: String,
    name: String,
    dir: PathBuf,
    ctrs: Vec<Ctr>,
    start_time: String,
    last_report: Option<k8s::PodStatus>,
    transitions: BTreeMap<String, (String, String)>,
    /// Told when one of its containers ends.
    ended: Arc<Notify>,
}

/// Supervises one pod until it is no longer this node's (`stop`), following new versions of
/// its spec (`spec`).
pub(crate) async fn run_pod(
    shared: Arc<Shared>,
    mut spec: watch::Receiver<Arc<PodSpec>>,
    mut stop: watch::Receiver<bool>,
) {
    let pod = spec.borrow().clone();
    let mut run = PodRun::new(shared.clone(), pod).await;
    let ended = run.ended.clone();
    let mut finished_delete = false;
    // The first pass starts the containers.
    let mut due = Some(Instant::now());
    loop {
        let sleep = async {
            match due {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = ended.notified() => {}
            r = spec.changed() => {
                if r.is_err() { break; }
                let p = spec.borrow().clone();
                run.update(p).await;
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    // Gone from the store: stop, clean up, done.
                    run.terminate("the pod is no longer assigned to this node").await;
                    shared.runtime.remove_pod(&run.uid).await;
                    let (store, uid, dir) = (shared.store.clone(), run.uid.clone(), run.dir.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = store.forget_containers(&uid);
                        let _ = std::fs::remove_dir_all(&dir);
                    })
                    .await;
                    return;
                }
            }
        }
        if run.spec.pod.metadata.deletion_timestamp.is_some() {
            if !finished_delete {
                run.terminate("the pod is being deleted").await;
                shared.runtime.remove_pod(&run.uid).await;
                run.report();
                let status = run.status();
                run.send_status(op::DELETE, status);
                finished_delete = true;
            }
            due = None;
            continue;
        }
        run.sync().await;
        run.report();
        due = run.due();
    }
}

impl PodRun {
    async fn new(shared: Arc<Shared>, spec: Arc<PodSpec>) -> PodRun {
        let uid = spec.uid().to_string();
        let ns = spec
            .pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = spec.pod.metadata.name.clone().unwrap_or_default();
        let dir = shared.settings.pods_dir.join(&uid);
        let store = shared.store.clone();
        let key = uid.clone();
        let records: HashMap<String, ContainerRecord> =
            tokio::task::spawn_blocking(move || store.containers(&key).unwrap_or_default())
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect();
        let who = format!("{ns}/{name}");
        let mut start_time = now();
        let mut ctrs = Vec::new();
        for (c, raw) in spec.containers() {
            let mut ctr = Ctr::new(c, raw);
            if let Some(r) = records.get(&ctr.name) {
                ctr.restarts = r.restarts;
                ctr.ever_started = true;
                ctr.last_terminated = r.last_terminated.as_ref().map(Termination::from_record);
                if r.started_at < start_time && !r.started_at.is_empty() {
                    start_time = r.started_at.clone();
                }
                match shared.runtime.adopt(r).await {
                    Some(h) if r.spec_hash == ctr.spec_hash => {
                        tracing::info!(pod = %who, container = %ctr.name, pid = %h.id(), "adopted a running container");
                        ctr.handle = Some(h);
                        ctr.apply(
                            &who,
                            Event::Adopted {
                                started_at: r.started_at.clone(),
                            },
                        );
                        ctr.started = Some(Instant::now());
                    }
                    Some(h) => {
                        // Started from an older spec: replace it.
                        tokio::spawn(stop_container(h, shared.settings.max_grace));
                    }
                    None if r.pid != 0 || !r.container_id.is_empty() => {
                        // It ended while the agent was away (or the machine rebooted).
                        ctr.apply(
                            &who,
                            Event::Recovered(Termination {
                                code: 255,
                                reason: "Unknown".into(),
                                message: Some("the container ended while the agent was not running; its exit status is lost".into()),
                                started_at: r.started_at.clone(),
                                finished_at: now(),
                            }),
                        );
                    }
                    None => {
                        if let Some(t) = ctr.last_terminated.clone() {
                            ctr.apply(&who, Event::Recovered(t));
                        }
                    }
                }
            }
            ctrs.push(ctr);
        }
        PodRun {
            shared,
            spec,
            uid,
            ns,
            name,
            dir,
            ctrs,
            start_time,
            last_report: None,
            transitions: BTreeMap::new(),
            ended: Arc::new(Notify::new()),
        }
        .watching_adopted()
    }

    fn watching_adopted(mut self) -> PodRun {
        for i in 0..self.ctrs.len() {
            self.watch_exit(i);
        }
        self
    }

    /// Asks container `i`'s runtime to tell this pod's task when it ends.
    fn watch_exit(&mut self, i: usize) {
        let ended = self.ended.clone();
        let c = &mut self.ctrs[i];
        c.polled = c.handle.as_mut().is_some_and(|h| !h.notify_exit(ended));
    }

    /// When the next pass is due without being told: the earliest start after back-off, probe,
    /// or poll of a container whose runtime cannot tell its end; `None`: nothing is due.
    fn due(&self) -> Option<Instant> {
        let poll = Instant::now() + self.shared.settings.sync_interval;
        self.ctrs
            .iter()
            .filter_map(|c| match &c.handle {
                None => self.wants_start(c).then_some(c.next_start),
                Some(_) => {
                    let probe = c.readiness().map(|_| c.next_probe);
                    let poll = c.polled.then_some(poll);
                    probe.into_iter().chain(poll).min()
                }
            })
            .min()
    }

    fn who(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    /// The pod as a runtime's sandbox needs it.
    fn pod_info(&self, log_dir: &std::path::Path) -> PodInfo {
        PodInfo {
            uid: self.uid.clone(),
            namespace: self.ns.clone(),
            name: self.name.clone(),
            log_dir: log_dir.to_path_buf(),
            host_network: self.host_network(),
            host_ports: self
                .spec
                .pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    Some((
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        p.container_port,
                        p.host_port.filter(|h| *h > 0)?,
                    ))
                })
                .collect(),
        }
    }

    /// Whether the pod uses the node's network: it asks to, or the runtime gives pods none.
    fn host_network(&self) -> bool {
        !self.shared.runtime.pod_network()
            || self
                .spec
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false)
    }

    /// The pod's IP: its own on a pod network, the node's otherwise.
    fn pod_ip(&self) -> String {
        if self.host_network() {
            return self.shared.facts.ip.clone();
        }
        self.shared
            .runtime
            .pod_ip(&self.uid)
            .unwrap_or_else(|| self.shared.facts.ip.clone())
    }

    fn restart_policy(&self) -> &str {
        self.spec
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    /// Whether a container that ended with `code` is started again.
    fn restarts_after(&self, code: i32) -> bool {
        match self.restart_policy() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        }
    }

    /// Writes the container's record (for adoption after an agent restart) on the blocking pool.
    fn record(&self, i: usize) -> impl Future<Output = ()> + Send + 'static {
        let c = &self.ctrs[i];
        let (pid, ticks, container_id) = c
            .handle
            .as_ref()
            .map(|h| (h.id().parse().unwrap_or(0), h.start_ticks(), h.id()))
            .unwrap_or_default();
        let rec = ContainerRecord {
            pod_uid: self.uid.clone(),
            name: c.name.clone(),
            pid,
            start_ticks: ticks,
            started_at: c.state.started_at().to_string(),
            restarts: c.restarts,
            last_terminated: c.last_terminated.as_ref().map(Termination::to_record),
            spec_hash: c.spec_hash.clone(),
            container_id,
        };
        let store = self.shared.store.clone();
        async move {
            match tokio::task::spawn_blocking(move || store.save_container(&rec)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot record container"),
                Err(e) => tracing::error!(error = %e, "recording the container failed"),
            }
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
    async fn update(&mut self, spec: Arc<PodSpec>) {
        let changed: HashMap<String, (k8s::Container, Value)> = spec
            .containers()
            .map(|(c, raw)| (c.name.clone(), (c, raw.clone())))
            .collect();
        self.spec = spec;
        for i in 0..self.ctrs.len() {
            let Some((typed, raw)) = changed.get(&self.ctrs[i].name) else {
                continue;
            };
            let h = hash(raw);
            if h == self.ctrs[i].spec_hash {
                continue;
            }
            let c = &mut self.ctrs[i];
            c.spec = typed.clone();
            c.raw = raw.clone();
            c.spec_hash = h;
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
                self.exited(i, exit).await;
                self.ctrs[i].next_start = Instant::now();
            }
        }
    }

    fn grace(&self) -> Duration {
        let m = &self.spec.pod.metadata;
        let g = m
            .deletion_grace_period_seconds
            .or_else(|| {
                self.spec
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
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
                self.exited(i, exit).await;
            }
            self.ctrs[i].next_start = Instant::now() + Duration::from_secs(86400 * 365);
        }
    }

    async fn exited(&mut self, i: usize, exit: Exit) {
        let who = self.who();
        let s = &self.shared.settings;
        let c = &mut self.ctrs[i];
        c.apply(&who, Event::Exited { exit, at: now() });
        c.ready = false;
        c.handle = None;
        // Back-off doubles per failure; a long run resets it.
        let ran = c.started.map(|s| s.elapsed()).unwrap_or_default();
        c.backoff = if ran >= s.backoff_reset || c.backoff.is_zero() {
            s.backoff_initial
        } else {
            (c.backoff * 2).min(s.backoff_max)
        };
        c.next_start = Instant::now() + c.backoff;
        self.record(i).await;
    }

    fn wants_start(&self, c: &Ctr) -> bool {
        match &c.state {
            State::Terminated(t) => self.restarts_after(t.code),
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
                self.exited(i, exit).await;
                tracing::info!(pod = %self.who(), container = %name, code = exit.code(), "container exited");
            }
            // Starts and restarts.
            if self.ctrs[i].handle.is_none() && self.wants_start(&self.ctrs[i]) {
                if Instant::now() < self.ctrs[i].next_start {
                    let c = &self.ctrs[i];
                    if matches!(c.state, State::Terminated(_)) || c.state.crash_looping() {
                        let message = format!(
                            "back-off {}s restarting failed container={} pod={}_{}({})",
                            c.backoff.as_secs(),
                            c.name,
                            self.name,
                            self.ns,
                            self.uid
                        );
                        if !c.state.crash_looping() {
                            self.event(
                                "Warning",
                                "BackOff",
                                &format!("Back-off restarting failed container {}", c.name),
                            );
                        }
                        let who = self.who();
                        self.ctrs[i].apply(&who, Event::BackOff { message });
                    }
                } else {
                    self.start(i).await;
                }
            }
            // Readiness.
            self.probe(i).await;
        }
    }

    /// Checks the pod spec, resolves env, volumes and mounts from the store, and starts
    /// container `i` (the checks and the store on the blocking pool).
    async fn start(&mut self, i: usize) {
        let name = self.ctrs[i].name.clone();
        let root = self.dir.join("root").join(&name);
        let log = log_path(&self.shared.settings.pods_dir, &self.uid, &name);
        let pod = self.pod_info(log.parent().unwrap_or(&self.dir));
        // On a pod network the sandbox comes first: its IP is the pod's `status.podIP` in env.
        let mut facts = self.shared.facts.clone();
        if !pod.host_network {
            if let Err(e) = self.shared.runtime.prepare_pod(&pod).await {
                self.start_failed();
                self.wait_with(i, &e.reason, e.message);
                return;
            }
            facts.pod_ip = self.shared.runtime.pod_ip(&self.uid);
        }
        let prepared = {
            let (shared, raw_pod, raw) = (
                self.shared.clone(),
                self.spec.raw.clone(),
                self.ctrs[i].raw.clone(),
            );
            let (uid, dir, root, working_dir) = (
                self.uid.clone(),
                self.dir.clone(),
                root.clone(),
                self.ctrs[i].spec.working_dir.clone(),
            );
            tokio::task::spawn_blocking(move || {
                prepare(
                    &shared,
                    &facts,
                    &raw_pod,
                    &raw,
                    &uid,
                    &dir,
                    &root,
                    working_dir,
                )
            })
            .await
            .unwrap_or_else(|e| Err(format!("preparing the container failed: {e}")))
        };
        let Prepared {
            env,
            working_dir,
            mounts,
        } = match prepared {
            Ok(x) => x,
            Err(message) => {
                self.start_failed();
                self.wait_with(i, "CreateContainerConfigError", message);
                return;
            }
        };
        let spec = &self.ctrs[i].spec;
        let limits = match limits(spec) {
            Ok(l) => l,
            Err(message) => {
                self.start_failed();
                self.wait_with(i, "CreateContainerConfigError", message);
                return;
            }
        };
        let cs = ContainerSpec {
            pod_uid: self.uid.clone(),
            pod: self.who(),
            name: name.clone(),
            image: spec.image.clone().unwrap_or_default(),
            pull_policy: spec.image_pull_policy.clone().unwrap_or_default(),
            command: spec.command.clone().unwrap_or_default(),
            args: spec.args.clone().unwrap_or_default(),
            env,
            root,
            working_dir,
            log_path: log.clone(),
            mounts,
            container_working_dir: spec.working_dir.clone().filter(|w| !w.is_empty()),
            limits,
            attempt: self.ctrs[i].restarts as u32 + u32::from(self.ctrs[i].ever_started),
            security: security(self.spec.pod.spec.as_ref(), spec),
        };
        // The previous instance's log stays readable with `kubectl logs --previous`.
        if self.ctrs[i].ever_started && log.exists() {
            let _ = std::fs::rename(&log, log.with_extension("previous.log"));
        }
        match self.shared.runtime.start(&pod, &cs).await {
            Ok(h) => {
                let counters = &self.shared.counters;
                counters
                    .container_starts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let who = self.who();
                let c = &mut self.ctrs[i];
                if c.ever_started {
                    c.restarts += 1;
                    counters
                        .container_restarts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                c.ever_started = true;
                c.handle = Some(h);
                c.apply(&who, Event::Started { at: now() });
                c.started = Some(Instant::now());
                c.probe_ok = 0;
                c.probe_fail = 0;
                let delay = c
                    .readiness()
                    .and_then(|p| p.initial_delay_seconds)
                    .unwrap_or(0)
                    .max(0) as u64;
                c.next_probe = Instant::now() + Duration::from_secs(delay);
                self.watch_exit(i);
                self.record(i).await;
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
        let who = self.who();
        let c = &mut self.ctrs[i];
        let before = c.state.clone();
        c.apply(
            &who,
            Event::CannotStart {
                reason: reason.into(),
                message: message.clone(),
            },
        );
        c.next_start = Instant::now() + retry;
        if c.state != before {
            tracing::warn!(pod = %who, container = %c.name, %reason, %message, "container cannot start");
            // As the kubelet says it: an image problem is the CRI's message, then the reason.
            if reason.starts_with("ErrImage") || reason == "ImagePullBackOff" {
                self.event("Warning", "Failed", &message);
                self.event("Warning", "Failed", &format!("Error: {reason}"));
            } else {
                self.event("Warning", "Failed", &format!("Error: {message}"));
            }
        }
    }

    async fn probe(&mut self, i: usize) {
        let c = &self.ctrs[i];
        if c.handle.is_none() {
            self.ctrs[i].ready = false;
            return;
        }
        let Some(probe) = c.readiness().cloned() else {
            self.ctrs[i].ready = true;
            return;
        };
        if Instant::now() < c.next_probe {
            return;
        }
        let period = probe.period_seconds.unwrap_or(10).max(1) as u64;
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        // An exec probe runs inside the container when the runtime can (CRI's ExecSync).
        let id = c.handle.as_ref().map(|h| h.id()).unwrap_or_default();
        let (root, pod_ip) = (self.dir.join("root").join(&c.name), self.pod_ip());
        let spec = &self.ctrs[i].spec;
        let exec = probe
            .exec
            .as_ref()
            .and_then(|e| e.command.as_ref())
            .and_then(|cmd| self.shared.runtime.exec_sync(&id, cmd, timeout));
        let ok = match exec {
            Some(f) => f.await.is_ok_and(|o| o.code == 0),
            None => crate::probe::run(&probe, spec, &pod_ip, &root, timeout).await,
        };
        let c = &mut self.ctrs[i];
        c.next_probe = Instant::now() + Duration::from_secs(period);
        if ok {
            c.probe_ok += 1;
            c.probe_fail = 0;
            if c.probe_ok >= probe.success_threshold.unwrap_or(1).max(1) as u32 {
                c.ready = true;
            }
        } else {
            c.probe_fail += 1;
            c.probe_ok = 0;
            if c.probe_fail >= probe.failure_threshold.unwrap_or(3).max(1) as u32 {
                c.ready = false;
            }
        }
    }

    fn container_status(&self, c: &Ctr) -> k8s::ContainerStatus {
        let state = match &c.state {
            State::Waiting { reason, message } => k8s::ContainerState {
                waiting: Some(k8s::ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
            State::Running { started_at } => k8s::ContainerState {
                running: Some(k8s::ContainerStateRunning {
                    started_at: time(started_at),
                }),
                ..Default::default()
            },
            State::Terminated(t) => k8s::ContainerState {
                terminated: Some(t.to_k8s()),
                ..Default::default()
            },
        };
        let last_state = match &c.last_terminated {
            Some(t) if c.handle.is_some() || c.restarts > 0 => k8s::ContainerState {
                terminated: Some(t.to_k8s()),
                ..Default::default()
            },
            _ => k8s::ContainerState::default(),
        };
        k8s::ContainerStatus {
            name: c.name.clone(),
            image: c.spec.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready: c.ready,
            started: Some(c.handle.is_some()),
            restart_count: c.restarts,
            state: Some(state),
            last_state: Some(last_state),
            container_id: c
                .handle
                .as_ref()
                .map(|h| format!("{}://{}", self.shared.runtime.id_scheme(), h.id())),
            ..Default::default()
        }
    }

    /// The pod's phase: Succeeded or Failed when every container ended for good, Running once
    /// one has started, Pending before.
    fn phase(&self) -> &'static str {
        let done = |c: &Ctr| match &c.state {
            State::Terminated(t) => !self.restarts_after(t.code),
            _ => false,
        };
        if !self.ctrs.is_empty() && self.ctrs.iter().all(done) {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(&c.state, State::Terminated(t) if t.code == 0));
            if ok { "Succeeded" } else { "Failed" }
        } else if self
            .ctrs
            .iter()
            .any(|c| c.ever_started || c.handle.is_some())
        {
            "Running"
        } else {
            "Pending"
        }
    }

    fn status(&mut self) -> k8s::PodStatus {
        let statuses = self.ctrs.iter().map(|c| self.container_status(c)).collect();
        let all_ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready);
        let not_ready: Vec<&str> = self
            .ctrs
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
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
            conditions.push(k8s::PodCondition {
                type_: t.into(),
                status: status.into(),
                last_transition_time: time(&entry.1),
                reason: (!ok).then(|| "ContainersNotReady".into()),
                message: (!ok)
                    .then(|| format!("containers with unready status: [{}]", not_ready.join(" "))),
                ..Default::default()
            });
        }
        let ip = self.shared.facts.ip.clone();
        let pod_ip = self.pod_ip();
        k8s::PodStatus {
            phase: Some(self.phase().into()),
            conditions: Some(conditions),
            host_ip: Some(ip.clone()),
            host_ips: Some(vec![k8s::HostIP { ip }]),
            pod_ip: Some(pod_ip.clone()),
            pod_ips: Some(vec![k8s::PodIP { ip: pod_ip }]),
            start_time: time(&self.start_time),
            container_statuses: Some(statuses),
            qos_class: Some("BestEffort".into()),
            ..Default::default()
        }
    }

    fn send_status(&self, op: &str, status: k8s::PodStatus) {
        let report = PodStatusReport {
            uid: self.uid.clone(),
            status: serde_json::to_value(status).unwrap_or_default(),
        };
        let key = Key::new(Some(&self.ns), kind::POD_STATUS, &self.name);
        let msg = Message::new(
            group::CLOUD,
            op,
            &key.to_string(),
            serde_json::to_vec(&report).unwrap_or_default(),
        );
        self.shared.reports.send((msg, Policy::LatestWins));
    }

    /// Sends the status upstream when it changed (latest wins in the outbox while offline).
    fn report(&mut self) {
        let status = self.status();
        if self.last_report.as_ref() == Some(&status) {
            return;
        }
        self.last_report = Some(status.clone());
        self.send_status(op::UPDATE, status);
    }
}

/// What starting a container needs from the store and the file system: the pod spec checked
/// again on the node, its env (ConfigMaps, Secrets, the pod token), its volumes and mounts.
#[allow(clippy::too_many_arguments)]
fn prepare(
    shared: &Shared,
    facts: &crate::resolve::NodeFacts,
    pod: &Value,
    container: &Value,
    uid: &str,
    dir: &std::path::Path,
    root: &std::path::Path,
    working_dir: Option<String>,
) -> Result<Prepared, String> {
    let runtime = &shared.runtime;
    crate::podcheck::pod(pod, &shared.settings.host_path_allow, |image| {
        runtime.runs_host_commands(image)
    })?;
    let mut env = crate::resolve::env(&shared.store, pod, container, facts)?;
    let token = shared.settings.pod_tokens.token(uid);
    env.retain(|(k, _)| k != crate::podtoken::ENV);
    env.push((crate::podtoken::ENV.to_string(), token));
    let vols = crate::resolve::volumes(&shared.store, pod, dir, facts)?;
    let mounts = crate::resolve::mount_list(container, &vols)?;
    // A host process finds its volumes linked under its root; a CRI container gets them bound.
    if !runtime.cri() {
        crate::resolve::link_mounts(&mounts, root)?;
    }
    let wd = match working_dir {
        Some(w) if !w.is_empty() => crate::runtime::under_root(root, &w),
        _ => root.to_path_buf(),
    };
    Ok(Prepared {
        env,
        working_dir: wd,
        mounts,
    })
}

/// What [`prepare`] resolved for a container.
struct Prepared {
    env: Vec<(String, String)>,
    working_dir: PathBuf,
    mounts: Vec<Mount>,
}

/// The container's security settings: its `securityContext` over the pod's.
fn security(pod: Option<&k8s::PodSpec>, c: &k8s::Container) -> Security {
    let p = pod.and_then(|p| p.security_context.as_ref());
    let s = c.security_context.as_ref();
    let mut groups: Vec<i64> = p
        .and_then(|p| p.supplemental_groups.clone())
        .unwrap_or_default();
    if let Some(g) = p.and_then(|p| p.fs_group) {
        groups.push(g);
    }
    let caps = s.and_then(|s| s.capabilities.as_ref());
    Security {
        run_as_user: s
            .and_then(|s| s.run_as_user)
            .or(p.and_then(|p| p.run_as_user)),
        run_as_group: s
            .and_then(|s| s.run_as_group)
            .or(p.and_then(|p| p.run_as_group)),
        supplemental_groups: groups,
        read_only_root: s.and_then(|s| s.read_only_root_filesystem) == Some(true),
        no_new_privileges: s.and_then(|s| s.allow_privilege_escalation) == Some(false),
        privileged: s.and_then(|s| s.privileged) == Some(true),
        add_capabilities: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        drop_capabilities: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
    }
}

/// `resources.limits` (and the CPU request) as a runtime enforces them; a quantity that does not
/// parse says which.
fn limits(c: &k8s::Container) -> Result<Limits, String> {
    let get =
        |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         key: &str,
         scale: f64|
         -> Result<i64, String> {
            match m.and_then(|m| m.get(key)) {
                Some(q) => sedge_api::quantity::parse(&q.0)
                    .map(|v| (v * scale).ceil() as i64)
                    .map_err(|e| format!("resources of container {:?}: {key}: {e}", c.name)),
                None => Ok(0),
            }
        };
    let r = c.resources.as_ref();
    Ok(Limits {
        memory_bytes: get(r.and_then(|r| r.limits.as_ref()), "memory", 1.0)?,
        cpu_millis: get(r.and_then(|r| r.limits.as_ref()), "cpu", 1000.0)?,
        cpu_request_millis: get(r.and_then(|r| r.requests.as_ref()), "cpu", 1000.0)?,
    })
}
