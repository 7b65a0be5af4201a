//! Edged: the lightweight kubelet. It runs the pods the local store holds through a
//! [`Runtime`], one task per pod ([`crate::podrun`]: restart policy with crash-loop back-off,
//! readiness probes, log rotation, status and events upstream, graceful deletes), cleans up
//! pods deleted while it was down, and serves logs.
//!
//! Everything it needs is in the local store, so it works the same with the cloud away: a
//! restarted agent rebuilds its pods from SQLite and adopts the processes that outlived it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sedge_api::{LogCursor, LogRequest, kind};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::podrun::{PodSpec, run_pod};
use crate::resolve::NodeFacts;
use crate::runtime::{Container, Exit, Runtime, Signal};
use crate::store::MetaStore;

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

impl EdgedSettings {
    /// Short back-offs and grace for tests, pods under `pods_dir`.
    #[cfg(test)]
    pub(crate) fn for_tests(
        pods_dir: PathBuf,
        pod_tokens: Arc<crate::podtoken::PodTokens>,
    ) -> EdgedSettings {
        EdgedSettings {
            pods_dir,
            sync_interval: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            backoff_reset: Duration::from_secs(60),
            max_log_bytes: 1 << 20,
            max_grace: Duration::from_secs(1),
            host_path_allow: Vec::new(),
            pod_tokens,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) store: Arc<MetaStore>,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) facts: NodeFacts,
    pub(crate) settings: EdgedSettings,
    pub(crate) reports: Reports,
    pub(crate) counters: EdgedCounters,
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
    /// The pod as its task follows it: one copy, shared with the task (a pod's parsed spec
    /// and its JSON are most of what an idle agent holds per pod).
    spec: watch::Sender<Arc<PodSpec>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running edged.
pub struct Edged {
    shared: Arc<Shared>,
    workers: Mutex<HashMap<String, Worker>>,
    /// Pods (by UID) whose leftover containers are being stopped.
    cleaning: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Told when a pod's task ends (a stopped pod; one that panicked is started again by the
    /// pass this wakes, or by the next [`RESYNC`] if that pass saw its task still finishing).
    ended: Arc<tokio::sync::Notify>,
}

/// How often edged looks, when nothing told it to, whether it must compare the store's pods
/// with its workers. It compares them at once on a change to a pod in the store and when a
/// pod's task ends; on this tick it does so only if a pod's task is over (one that panicked,
/// seen still finishing by the pass its end woke) or a pod with container records has no
/// task (a clean-up of leftovers that failed), which one small query tells. Listing and
/// parsing every pod on each tick was most of an idle agent's CPU with pods (10 s) and, every
/// second before that, without. Logs are checked for rotation as often, as kubelet's
/// container log manager does (10 s).
const RESYNC: Duration = Duration::from_secs(10);

/// Tells edged, when dropped (the task returned, panicked or was aborted), that a pod's task ended.
struct EndedGuard(Arc<tokio::sync::Notify>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl std::fmt::Debug for Edged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edged")
            .field("node", &self.shared.facts.node)
            .finish()
    }
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
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
            ended: Arc::default(),
        });
        tokio::spawn(e.clone().run());
        e
    }

    async fn run(self: Arc<Self>) {
        let mut changes = self.shared.store.subscribe();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut swept = false;
        let mut compare = true;
        loop {
            if !compare {
                // Changes that came during the last pass are still queued: the first wakes
                // this at once.
                compare = tokio::select! {
                    open = crate::store::next_change_of(&mut changes, kind::POD) => if !open { return } else { true },
                    _ = self.ended.notified() => true,
                    _ = tick.tick() => {
                        self.rotate_logs();
                        self.left_behind().await
                    }
                };
                continue;
            }
            compare = false;
            // The pass lists the store after them: the rest of a burst needs no pass of its own.
            if !crate::store::skip_queued(&mut changes) {
                return;
            }
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
                Ok(Ok((pods, recorded))) => {
                    if !swept {
                        // Once per start, before any pod starts (so no sandbox made meanwhile
                        // can be taken for a leftover): what the runtime holds for pods this
                        // node no longer knows at all goes (a CRI's sandbox of a pod deleted
                        // meanwhile).
                        swept = true;
                        let keep: std::collections::HashSet<String> = pods
                            .iter()
                            .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
                            .chain(recorded.iter().cloned())
                            .collect();
                        self.shared.runtime.remove_others(&keep).await;
                    }
                    self.reconcile(pods, recorded)
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot read pods from the local store"),
                Err(e) => tracing::error!(error = %e, "reading the local store failed"),
            }
        }
    }

    /// Whether a pass must compare the store's pods with the workers although nothing told
    /// edged to: a pod's task is over, or a pod with container records has no task and no
    /// clean-up under way (a clean-up that failed, to retry). An unreadable store says yes,
    /// so the pass reports it.
    async fn left_behind(&self) -> bool {
        let store = self.shared.store.clone();
        let Ok(Ok(recorded)) = tokio::task::spawn_blocking(move || store.recorded_pods()).await
        else {
            return true;
        };
        let workers = self.workers.lock().unwrap();
        let cleaning = self.cleaning.lock().unwrap();
        workers.values().any(|w| w.task.is_finished())
            || recorded
                .iter()
                .any(|uid| !workers.contains_key(uid) && !cleaning.contains(uid))
    }

    /// Rotates the logs of this node's pods that grew over `max_log_bytes` (one pass for all
    /// pods on the blocking pool, in the background).
    fn rotate_logs(&self) {
        let uids: Vec<String> = self.workers.lock().unwrap().keys().cloned().collect();
        let (dir, max) = (
            self.shared.settings.pods_dir.clone(),
            self.shared.settings.max_log_bytes,
        );
        tokio::task::spawn_blocking(move || {
            for uid in uids {
                rotate_pod_logs(&dir.join(&uid).join("logs"), max);
            }
        });
    }

    /// Starts workers for new pods (`pods`: the store's), passes updates on, stops workers of
    /// pods that are gone, and cleans up pods that went away while the agent was down
    /// (`recorded`: pods with container records).
    fn reconcile(&self, pods: Vec<Value>, recorded: Vec<String>) {
        let node = self.shared.facts.node.as_str();
        let mut workers = self.workers.lock().unwrap();
        workers.retain(|_, w| !w.task.is_finished());
        // A pod whose version its worker follows already is not parsed again: it was checked
        // when it came, and a pass after any one pod's change sees all the node's pods.
        let mut kept = std::collections::HashSet::new();
        let desired: HashMap<String, Arc<PodSpec>> = pods
            .into_iter()
            .filter(|p| p["spec"]["nodeName"].as_str() == Some(node))
            .filter(|p| {
                let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
                let follows = workers.get(uid).is_some_and(|w| {
                    w.spec.borrow().resource_version() == p["metadata"]["resourceVersion"].as_str()
                });
                if follows {
                    kept.insert(uid.to_string());
                }
                !follows
            })
            .filter_map(|p| {
                let who = format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap_or("default"),
                    p["metadata"]["name"].as_str().unwrap_or_default()
                );
                let checked = PodSpec::parse(p).and_then(|s| {
                    crate::podcheck::uid(s.uid())?;
                    Ok(s)
                });
                match checked {
                    Ok(s) => Some((s.uid().to_string(), Arc::new(s))),
                    Err(e) => {
                        tracing::warn!(pod = %who, error = %e, "pod ignored");
                        None
                    }
                }
            })
            .collect();
        for (uid, w) in workers.iter() {
            if !desired.contains_key(uid) && !kept.contains(uid) {
                let _ = w.stop.send(true);
            }
        }
        for (uid, pod) in &desired {
            match workers.get(uid) {
                Some(w) => {
                    if w.spec.borrow().resource_version() != pod.resource_version() {
                        let _ = w.spec.send(pod.clone());
                    }
                }
                None => {
                    let (spec_tx, spec_rx) = watch::channel(pod.clone());
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let (shared, ended) = (self.shared.clone(), EndedGuard(self.ended.clone()));
                    let task = tokio::spawn(async move {
                        let _ended = ended;
                        run_pod(shared, spec_rx, stop_rx).await
                    });
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

    /// The local store.
    pub fn store(&self) -> &Arc<MetaStore> {
        &self.shared.store
    }

    /// The container runtime.
    pub fn runtime(&self) -> Arc<dyn Runtime> {
        self.shared.runtime.clone()
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
            pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        } else {
            req.uid.clone()
        };
        let cri = self.shared.runtime.cri();
        let read = if req.follow { follow_log } else { read_log };
        read(
            &self.shared.settings.pods_dir,
            &uid,
            &req.container,
            req,
            cri,
        )
    }
}

/// A log request's pod UID and container name must be what they claim to be (they become a path).
fn check_names(uid: &str, container: &str) -> Result<(), String> {
    crate::podcheck::uid(uid)?;
    if !crate::podcheck::dns_label(container) {
        return Err(format!(
            "container name {container:?} is not a DNS-1123 label"
        ));
    }
    Ok(())
}

/// Where a container's log lives.
pub fn log_path(pods_dir: &Path, uid: &str, container: &str) -> PathBuf {
    pods_dir
        .join(uid)
        .join("logs")
        .join(format!("{container}.log"))
}

/// Rotates the current logs (`<container>.log`; container names have no dot) in `dir` that
/// grew over `max` bytes: the log is copied to `<container>.log.1` and emptied (the container
/// keeps its file open and appending).
fn rotate_pod_logs(dir: &Path, max: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(container) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if container.contains('.') || !e.metadata().is_ok_and(|m| m.is_file() && m.len() > max) {
            continue;
        }
        let p = e.path();
        let _ = std::fs::copy(&p, p.with_extension("log.1"));
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(0));
    }
}

/// A container's log, honouring `previous`, `tailLines` and `limitBytes`; `cri`: the files are in
/// the CRI's format (what the container wrote is returned).
pub fn read_log(
    pods_dir: &Path,
    uid: &str,
    container: &str,
    req: &LogRequest,
    cri: bool,
) -> Result<Vec<u8>, String> {
    check_names(uid, container)?;
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
    if cri {
        out = from_cri_log(&out);
    }
    limit_log(&mut out, req);
    Ok(out)
}

/// The most one follow reply carries; the rest comes with the next request.
pub const FOLLOW_CHUNK: u64 = 1 << 20;

/// One step of `kubectl logs -f`: the reply is a [`LogCursor`] then log bytes. The first step
/// (no cursor) is the log so far, as [`read_log`] gives it, and a cursor at the current file's
/// end; later steps are what was written after the cursor (at most [`FOLLOW_CHUNK`]), across a
/// rotation. In the CRI's format only whole lines are sent (a partial last line waits).
pub fn follow_log(
    pods_dir: &Path,
    uid: &str,
    container: &str,
    req: &LogRequest,
    cri: bool,
) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    check_names(uid, container)?;
    let current = log_path(pods_dir, uid, container);
    let identity = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.ino(), m.len()));
    // The reply: the cursor, then the bytes (converted from the CRI's format).
    let reply = |next: LogCursor, raw: Vec<u8>, convert: bool| {
        let mut out = next.to_bytes().to_vec();
        out.extend(if convert { from_cri_log(&raw) } else { raw });
        out
    };
    let Some(cursor) = req.cursor else {
        let (file, len) = identity(&current).unwrap_or((0, 0));
        let body = match read_log(pods_dir, uid, container, req, cri) {
            Ok(b) => b,
            // Not started yet: the follow waits for it.
            Err(_) if file == 0 => Vec::new(),
            Err(e) => return Err(e),
        };
        return Ok(reply(LogCursor { file, offset: len }, body, false));
    };
    let read_from = |p: &Path, offset: u64, max: u64| -> Vec<u8> {
        let mut buf = Vec::new();
        if let Ok(mut f) = std::fs::File::open(p)
            && f.seek(SeekFrom::Start(offset)).is_ok()
        {
            let _ = f.take(max).read_to_end(&mut buf);
        }
        buf
    };
    // What is left of a rotated file the cursor was in, then the current file from `from`.
    let mut tail = Vec::new();
    let (file, from) = match identity(&current) {
        None => return Ok(cursor.to_bytes().to_vec()),
        // Same file, shorter than the cursor: rotated by copy and truncate (edged's
        // rotation); the rest is in `.log.1` at the same offsets.
        Some((file, len)) if file == cursor.file && len < cursor.offset => {
            tail = read_from(&current.with_extension("log.1"), cursor.offset, u64::MAX);
            (file, 0)
        }
        Some((file, _)) if file == cursor.file => (file, cursor.offset),
        Some((file, _)) => {
            let rotated = current.with_extension("log.1");
            if identity(&rotated).is_some_and(|(f, _)| f == cursor.file) {
                tail = read_from(&rotated, cursor.offset, FOLLOW_CHUNK);
                if tail.len() as u64 >= FOLLOW_CHUNK {
                    // Still inside the rotated file.
                    let next = LogCursor {
                        file: cursor.file,
                        offset: cursor.offset + tail.len() as u64,
                    };
                    return Ok(reply(next, tail, cri));
                }
            }
            (file, 0)
        }
    };
    let room = FOLLOW_CHUNK.saturating_sub(tail.len() as u64).max(1);
    let mut fresh = read_from(&current, from, room);
    if cri {
        // Whole lines only: a partial last line waits for the next request.
        let keep = fresh.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        fresh.truncate(keep);
    }
    let next = LogCursor {
        file,
        offset: from + fresh.len() as u64,
    };
    tail.extend(fresh);
    Ok(reply(next, tail, cri))
}

/// Applies `tailLines` and `limitBytes` to a log.
fn limit_log(out: &mut Vec<u8>, req: &LogRequest) {
    if let Some(n) = req.tail_lines {
        let text = std::mem::take(out);
        let mut lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        let keep = lines.len().saturating_sub(n as usize);
        lines.drain(..keep);
        *out = lines.concat();
    }
    if let Some(n) = req.limit_bytes {
        let n = n as usize;
        if out.len() > n {
            out.drain(..out.len() - n);
        }
    }
}

/// A log in the CRI's format (`<RFC 3339 time> <stdout|stderr> <P|F> <text>` per line, `P` for
/// a line the runtime split) as the container wrote it. A line not in that format is kept as it is.
pub fn from_cri_log(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for line in raw.split_inclusive(|b| *b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let mut parts = body.splitn(4, |b| *b == b' ');
        let (Some(_time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            out.extend_from_slice(line);
            continue;
        };
        if !(stream == b"stdout" || stream == b"stderr") || !(tag == b"P" || tag == b"F") {
            out.extend_from_slice(line);
            continue;
        }
        out.extend_from_slice(parts.next().unwrap_or_default());
        if tag == b"F" {
            out.push(b'\n');
        }
    }
    out
}

async fn cleanup_orphan(shared: &Shared, uid: &str) {
    if let Err(e) = crate::podcheck::uid(uid) {
        tracing::warn!(error = %e, "recorded pod not cleaned up");
        return;
    }
    let (store, key) = (shared.store.clone(), uid.to_string());
    let Ok(Ok(recs)) = tokio::task::spawn_blocking(move || store.containers(&key)).await else {
        return;
    };
    for r in &recs {
        if let Some(c) = shared.runtime.adopt(r).await {
            tracing::info!(pod_uid = uid, container = %r.name, "stopping a container of a pod deleted while the agent was down");
            stop_container(c, shared.settings.max_grace).await;
        }
    }
    shared.runtime.remove_pod(uid).await;
    let (store, key) = (shared.store.clone(), uid.to_string());
    let dir = shared.settings.pods_dir.join(uid);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = store.forget_containers(&key);
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

/// Stops a container: TERM, then KILL once `grace` is over, and how it ended (`Unknown` when it
/// is still there 2 s after the KILL). Waits on the runtime's word where it gives one, and
/// polls where it does not.
pub(crate) async fn stop_container(mut c: Box<dyn Container>, grace: Duration) -> Exit {
    let wake = Arc::new(tokio::sync::Notify::new());
    let step = if c.notify_exit(wake.clone()) {
        Duration::MAX
    } else {
        Duration::from_millis(20)
    };
    for (signal, wait) in [
        (Signal::Term, grace),
        (Signal::Kill, Duration::from_secs(2)),
    ] {
        c.signal(signal);
        let deadline = Instant::now() + wait;
        loop {
            if let Some(e) = c.poll_exit() {
                return e;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = tokio::time::timeout(left.min(step), wake.notified()).await;
        }
    }
    Exit::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f4c3b1e-1111-2222-3333-444455556666";

    fn step(dir: &Path, cursor: Option<LogCursor>, cri: bool) -> (LogCursor, String) {
        let req = LogRequest {
            uid: UID.into(),
            container: "main".into(),
            follow: true,
            cursor,
            ..Default::default()
        };
        let out = follow_log(dir, UID, "main", &req, cri).unwrap();
        let (c, body) = LogCursor::split(&out).unwrap();
        (c, String::from_utf8(body.to_vec()).unwrap())
    }

    fn append(p: &Path, s: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn a_follow_sees_each_line_once_across_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let log = log_path(d.path(), UID, "main");
        // Before the container wrote anything: an empty start, then its first lines.
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let (c, body) = step(d.path(), None, false);
        assert_eq!(body, "");
        append(&log, "one\ntwo\n");
        let (c, body) = step(d.path(), Some(c), false);
        assert_eq!(body, "one\ntwo\n");
        let (c, body) = step(d.path(), Some(c), false);
        assert_eq!(body, "", "nothing new");
        append(&log, "three\n");
        // edged's rotation: copy to .log.1, truncate; then more lines.
        std::fs::copy(&log, log.with_extension("log.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "four\n");
        let (c, body) = step(d.path(), Some(c), false);
        assert_eq!(body, "three\nfour\n");
        append(&log, "five\n");
        let (_, body) = step(d.path(), Some(c), false);
        assert_eq!(body, "five\n");
    }

    #[test]
    fn a_cri_follow_waits_for_whole_lines() {
        let d = tempfile::tempdir().unwrap();
        let log = log_path(d.path(), UID, "main");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        append(&log, "2026-01-01T00:00:00Z stdout F old\n");
        let (c, body) = step(d.path(), None, true);
        assert_eq!(body, "old\n");
        append(
            &log,
            "2026-01-01T00:00:01Z stdout F new\n2026-01-01T00:00:02Z stdout P par",
        );
        let (c, body) = step(d.path(), Some(c), true);
        assert_eq!(body, "new\n");
        append(&log, "tial\n");
        let (_, body) = step(d.path(), Some(c), true);
        assert_eq!(body, "partial", "the P line comes once it is whole");
    }

    #[test]
    fn a_bad_container_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let req = LogRequest {
            follow: true,
            cursor: Some(LogCursor::default()),
            ..Default::default()
        };
        let e = follow_log(d.path(), UID, "../../etc", &req, false).unwrap_err();
        assert!(e.contains("DNS-1123"), "{e}");
        // The first step too, before it looks at any file.
        let first = LogRequest {
            cursor: None,
            ..req
        };
        let e = follow_log(d.path(), "../x", "main", &first, false).unwrap_err();
        assert!(e.contains("uid") || e.contains("UID"), "{e}");
    }

    #[test]
    fn only_current_logs_over_the_limit_are_rotated() {
        let d = tempfile::tempdir().unwrap();
        let big = "x".repeat(100);
        for f in ["main.log", "main.previous.log", "side.log"] {
            std::fs::write(
                d.path().join(f),
                if f == "side.log" { "small" } else { &big },
            )
            .unwrap();
        }
        rotate_pod_logs(d.path(), 50);
        let read = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(read("main.log"), "", "the current log is emptied");
        assert_eq!(read("main.log.1"), big, "and its content kept as .log.1");
        assert_eq!(
            read("main.previous.log"),
            big,
            "the previous instance's log is left"
        );
        assert_eq!(read("side.log"), "small", "a log under the limit is left");
        assert!(!d.path().join("side.log.1").exists());
        // A pod without a logs directory is nothing to do.
        rotate_pod_logs(&d.path().join("nope"), 50);
    }

    /// With polling out of the picture (a `sync_interval` of an hour), a container that exits is
    /// seen at once and started again after its back-off: the runtime tells the pod's task.
    #[tokio::test]
    async fn an_exit_wakes_the_pod_task_without_polling() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MetaStore::open(&dir.path().join("meta.db")).unwrap());
        let runtime = Arc::new(crate::runtime::ProcessRuntime::new(
            crate::config::EdgeCoreConfig::default().images,
            PathBuf::from("/bin/true"),
        ));
        let facts = NodeFacts {
            node: "edge-1".into(),
            ip: "127.0.0.1".into(),
            pod_ip: None,
        };
        let settings = EdgedSettings {
            sync_interval: Duration::from_secs(3600),
            ..EdgedSettings::for_tests(
                dir.path().join("pods"),
                Arc::new(crate::podtoken::PodTokens::load_or_create(dir.path()).unwrap()),
            )
        };
        let edged = Edged::start(store.clone(), runtime, facts, settings, Reports::default());
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "exits", "namespace": "default", "uid": UID},
            "spec": {"nodeName": "edge-1", "restartPolicy": "Always",
                     "containers": [{"name": "main", "image": "busybox",
                                     "command": ["sh", "-c", "exit 3"]}]}
        });
        store.upsert("pod", "default", "exits", "1", &pod).unwrap();
        // Back-offs of 0.1, 0.2 and 0.4 s: three restarts in well under a minute, none of them
        // found by a poll.
        let c = &edged.shared.counters;
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.container_restarts.load(Relaxed) < 3 {
            assert!(
                Instant::now() < deadline,
                "restarts: {}",
                c.container_restarts.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(c.container_starts.load(Relaxed) >= 4);
        assert_eq!(c.start_failures.load(Relaxed), 0);
    }

    /// An edged for node `edge-1` on the hollow runtime, its store in `dir`.
    fn hollow_edged(dir: &Path) -> (Arc<MetaStore>, Arc<Edged>) {
        let store = Arc::new(MetaStore::open(&dir.join("meta.db")).unwrap());
        let facts = NodeFacts {
            node: "edge-1".into(),
            ip: "127.0.0.1".into(),
            pod_ip: None,
        };
        let settings = EdgedSettings::for_tests(
            dir.join("pods"),
            Arc::new(crate::podtoken::PodTokens::load_or_create(dir).unwrap()),
        );
        let runtime = Arc::new(crate::hollow::HollowRuntime::default());
        let edged = Edged::start(store.clone(), runtime, facts, settings, Reports::default());
        (store, edged)
    }

    /// Stores pod `default/name` of node `edge-1`: one container `main` running `image`.
    fn store_pod(store: &MetaStore, name: &str, uid: &str, rv: &str, image: &str) {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": rv},
            "spec": {"nodeName": "edge-1",
                     "containers": [{"name": "main", "image": image}]}
        });
        store.upsert("pod", "default", name, rv, &pod).unwrap();
    }

    /// Waits until `ok`, 20 s at most; then fails saying `what` did not happen.
    async fn eventually(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pods stored one after another while passes run all get their tasks: a change that
    /// comes during a pass wakes the next one (a pass that dropped them left a pod unstarted
    /// until some other pod of the node changed).
    #[tokio::test]
    async fn pods_stored_during_a_pass_all_start() {
        let dir = tempfile::tempdir().unwrap();
        let (store, edged) = hollow_edged(dir.path());
        const N: usize = 60;
        let writer = store.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..N {
                let (name, uid) = (format!("p{i}"), format!("0f4c3b1e-0000-0000-0000-{i:012}"));
                store_pod(&writer, &name, &uid, "1", "a");
                std::thread::sleep(Duration::from_micros(300 * (i as u64 % 7)));
            }
        })
        .await
        .unwrap();
        eventually("every pod stored has a task", || {
            edged.workers.lock().unwrap().len() == N
        })
        .await;
    }

    /// A pass after one pod's change parses only that pod: the others keep the very spec
    /// their tasks share (one copy per pod), a new version reaches its task, a pod gone from
    /// the store stops; the tick's question (anything left behind?) says no until a pod with
    /// container records has no task.
    #[tokio::test]
    async fn a_change_to_one_pod_parses_that_pod_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, edged) = hollow_edged(dir.path());
        let uids = [
            "0f4c3b1e-0000-0000-0000-000000000001",
            "0f4c3b1e-0000-0000-0000-000000000002",
            "0f4c3b1e-0000-0000-0000-000000000003",
        ];
        for (i, uid) in uids.iter().enumerate() {
            let name = format!("p{i}");
            store_pod(&store, &name, uid, "1", "a");
        }
        let specs = |e: &Edged| -> HashMap<String, Arc<PodSpec>> {
            let w = e.workers.lock().unwrap();
            w.iter()
                .map(|(u, w)| (u.clone(), w.spec.borrow().clone()))
                .collect()
        };
        eventually("three workers", || specs(&edged).len() == 3).await;
        eventually("the containers recorded", || {
            store.recorded_pods().unwrap().len() == 3
        })
        .await;
        let before = specs(&edged);
        assert!(!edged.left_behind().await, "nothing is left behind");

        // p1 changes: its task gets the new version; p0 and p2 are not parsed again.
        store_pod(&store, "p1", uids[1], "2", "b");
        eventually("p1's new version", || {
            specs(&edged)[uids[1]].resource_version() == Some("2")
        })
        .await;
        let after = specs(&edged);
        for u in [uids[0], uids[2]] {
            assert!(Arc::ptr_eq(&before[u], &after[u]), "{u} was parsed again");
        }

        // p2 leaves the store: its worker stops and goes at the next pass.
        store.delete("pod", "default", "p2").unwrap();
        store_pod(&store, "p0", uids[0], "3", "a");
        eventually("p2's worker gone", || !specs(&edged).contains_key(uids[2])).await;

        // A pod with container records and no task (a clean-up that failed) is left behind.
        store
            .save_container(&crate::store::ContainerRecord {
                pod_uid: "0f4c3b1e-0000-0000-0000-00000000000f".into(),
                name: "main".into(),
                pid: 0,
                start_ticks: 0,
                started_at: now(),
                restarts: 0,
                last_terminated: None,
                spec_hash: String::new(),
                container_id: String::new(),
            })
            .unwrap();
        assert!(
            edged.left_behind().await,
            "an orphan's records call for a pass"
        );
    }
}
