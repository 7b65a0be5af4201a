//! One bounded HTTP listener for Sedge's plain-TCP endpoints (the MetaServer, the
//! local-controller endpoint, the workers' inference and metrics servers).
//!
//! `axum::serve` holds every connection it accepts for as long as the peer likes: 20,000 idle
//! sockets exhaust the process's file descriptors, and a client that sends its headers at one
//! byte a second holds a task for minutes. [`serve`] bounds both, the way the API server's TLS
//! listener does:
//! - at most [`Limits::max_connections`] at once. At the cap, a new connection takes the slot of
//!   the *oldest connection that has not sent a byte yet* (the one an idle attacker holds longest),
//!   which is closed; only when every slot is serving a client is the *newest* closed instead.
//!   So idle sockets up to the cap cannot lock clients out until their deadline;
//! - a connection must send its first byte, and an HTTP/1 request its whole header block, within
//!   [`Limits::header_timeout`]; HTTP/1 keep-alive connections waiting for their next request
//!   are under the same deadline;
//! - an HTTP/2 connection (gRPC) is pinged and closed when the peer stops answering;
//! - on shutdown it stops accepting, lets requests in flight finish and then returns.
//!
//! The listener speaks HTTP/1.1 and HTTP/2 (prior knowledge, as gRPC clients use it) on one port.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Bounds on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the newest past this are closed on accept.
    pub max_connections: usize,
    /// Deadline for a connection's first byte and for each HTTP/1 request's headers (also how
    /// long an idle HTTP/1 keep-alive connection is kept), and for an HTTP/2 ping's answer.
    pub header_timeout: Duration,
}

impl Default for Limits {
    /// 1,024 connections, 10 s: generous for a node-local endpoint, far below the per-process
    /// open-file limit.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// What a listener has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    shed: AtomicU64,
    timed_out: AtomicU64,
    evicted: AtomicU64,
}

impl Stats {
    /// Connections accepted and served.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed on accept because the cap was reached.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
    /// Connections closed because their first byte did not arrive in time.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
    /// Connections that had sent nothing, closed to make room for a new one at the cap.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// Connections that hold a slot and have not sent their first byte, oldest first: the ones a
/// new connection may take the slot of.
#[derive(Default)]
struct Waiting {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, (Instant, tokio::sync::oneshot::Sender<()>)>>,
}

/// How long a connection must have been silent before a newcomer may take its slot. Younger,
/// its first bytes may well be on their way (a WAN round trip, a client busy with thousands of
/// others after a cloud restart), and closing it wastes what both sides did and sends it into
/// back-off; the newcomer is refused instead, before either side did any work. Measured at
/// 10,000 nodes reconnecting at once: 14,334 young connections evicted, each a failed handshake.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

impl Waiting {
    fn enter(&self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (Instant::now(), tx));
        (id, rx)
    }
    fn leave(&self, id: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    /// Tells the oldest waiting connection to close if it has waited `min_age`; false when none
    /// waits that long.
    fn evict_oldest(&self, min_age: Duration) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(e) = map.first_entry() {
            if e.get().1.is_closed() {
                e.remove();
                continue;
            }
            if e.get().0.elapsed() < min_age {
                return false;
            }
            if e.remove().1.send(()).is_ok() {
                return true;
            }
        }
        false
    }
}

/// The connection cap with fair shedding, for any TCP accept loop (this crate's [`serve`], the
/// API server's TLS listener): [`Admission::admit`] on accept, then [`Ticket::first_byte`] in
/// the connection's task before anything else is read.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<tokio::sync::Semaphore>,
    waiting: Arc<Waiting>,
    stats: Arc<Stats>,
    max: usize,
    evict_after: Duration,
}

/// A connection let in: it holds a slot, or will get the one of the connection it evicted.
pub struct Ticket {
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    admission: Admission,
}

/// A connection that sent its first byte in time: holds its slot until dropped.
pub struct Admitted {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Admission {
    /// At most `max` connections, counted into `stats`.
    pub fn new(max: usize, stats: Arc<Stats>) -> Self {
        Self::with_slots(
            Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            max,
            stats,
        )
    }

    /// Takes its slots from `slots` (of `max` permits), which other listeners may share.
    pub fn with_slots(slots: Arc<tokio::sync::Semaphore>, max: usize, stats: Arc<Stats>) -> Self {
        Admission {
            slots,
            waiting: Arc::default(),
            stats,
            max,
            evict_after: EVICT_AFTER,
        }
    }

    /// A silent connection may be evicted once it has been silent this long (default
    /// [`EVICT_AFTER`]).
    pub fn evict_after(mut self, d: Duration) -> Self {
        self.evict_after = d;
        self
    }

    /// Called on accept. At the cap, the oldest connection that has sent nothing for
    /// [`Admission::evict_after`] is told to close and this one will take its slot; if every
    /// slot serves a client or waits for a first byte that may be on its way, `None`: close
    /// this one.
    pub fn admit(&self, peer: std::net::SocketAddr) -> Option<Ticket> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if self.waiting.evict_oldest(self.evict_after) => {
                let evicted = self.stats.evicted.fetch_add(1, Ordering::Relaxed) + 1;
                if evicted.is_power_of_two() {
                    tracing::warn!(%peer, evicted, max = self.max, "connection limit reached; closing the oldest connections that sent nothing");
                }
                None
            }
            Err(_) => {
                let shed = self.stats.shed.fetch_add(1, Ordering::Relaxed) + 1;
                if shed.is_power_of_two() {
                    tracing::warn!(%peer, shed, max = self.max, "connection limit reached with every connection busy; closing new connections");
                }
                return None;
            }
        };
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            slot,
            admission: self.clone(),
        })
    }
}

/// The next connection `admission` lets in. A failed accept (usually out of file descriptors)
/// backs off 50 ms instead of spinning; a connection shed at the cap is closed here. Safe in
/// `select!`: nothing is lost when it is dropped.
pub async fn accept(
    listener: &TcpListener,
    admission: &Admission,
) -> (tokio::net::TcpStream, std::net::SocketAddr, Ticket) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => match admission.admit(peer) {
                Some(ticket) => {
                    let _ = tcp.set_nodelay(true);
                    return (tcp, peer, ticket);
                }
                None => drop(tcp),
            },
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Ticket {
    /// Waits (within `deadline`) for the slot if it is being handed over, then for the peer's
    /// first byte, during which a newer connection may evict this one. `None`: close it (silent
    /// past the deadline, evicted, or the peer went away).
    pub async fn first_byte(
        self,
        tcp: &tokio::net::TcpStream,
        deadline: Duration,
    ) -> Option<Admitted> {
        let a = &self.admission;
        let slot = match self.slot {
            Some(s) => s,
            None => tokio::time::timeout(deadline, a.slots.clone().acquire_owned())
                .await
                .ok()?
                .ok()?,
        };
        let (id, evicted) = a.waiting.enter();
        let mut probe = [0u8; 1];
        let first = tokio::select! {
            r = tokio::time::timeout(deadline, tcp.peek(&mut probe)) => Some(r),
            _ = evicted => None,
        };
        a.waiting.leave(id);
        match first {
            Some(Ok(Ok(n))) if n > 0 => Some(Admitted { _slot: slot }),
            Some(Ok(_)) => None,
            Some(Err(_)) => {
                a.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("no request in time; closing");
                None
            }
            None => {
                tracing::debug!("sent nothing and a new connection needed the slot; closing");
                None
            }
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then waits for the
/// requests in flight. Errors of single connections are logged, never returned.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve_with_stats(listener, app, limits, Arc::default(), shutdown).await
}

/// [`serve`], counting into `stats`.
pub async fn serve_with_stats(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admission = Admission::new(limits.max_connections, stats);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(limits.header_timeout);
    let mut conns = tokio::task::JoinSet::new();
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            (tcp, peer, ticket) = accept(&listener, &admission) => {
                let builder = builder.clone();
                let svc = TowerToHyperService::new(app.clone());
                let mut stop = stop_rx.clone();
                conns.spawn(async move {
                    // hyper's header deadline starts once it knows the protocol; a peer that
                    // never sends a byte would otherwise sit in protocol detection forever.
                    let Some(_admitted) = ticket.first_byte(&tcp, limits.header_timeout).await else {
                        return;
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        },
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// Metrics as a daemon reads them off its counters at scrape time: counters and gauges with
/// their help text, in Prometheus' text format (through prometheus-client), under `sedge_`.
#[derive(Default)]
pub struct Exposition {
    registry: prometheus_client::registry::Registry,
}

impl Exposition {
    /// An empty exposition; names get the `sedge_` prefix.
    pub fn new() -> Self {
        Exposition {
            registry: prometheus_client::registry::Registry::with_prefix("sedge"),
        }
    }

    /// A counter (exported as `sedge_<name>_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.registry.register(
            name,
            help,
            prometheus_client::metrics::counter::ConstCounter::new(value),
        );
        self
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> &mut Self {
        self.registry.register(
            name,
            help,
            prometheus_client::metrics::gauge::ConstGauge::new(value),
        );
        self
    }

    /// A counter of seconds (exported as `sedge_<name>_total`).
    pub fn counter_seconds(&mut self, name: &str, help: &str, seconds: f64) -> &mut Self {
        self.registry.register(
            name,
            help,
            prometheus_client::metrics::counter::ConstCounter::new(seconds),
        );
        self
    }

    /// The process's own figures, as Prometheus' process collector has them (under `sedge_`):
    /// resident memory, CPU time, threads and open files, read from `/proc/self` at scrape
    /// time. Nothing where `/proc` cannot be read.
    pub fn process(&mut self) -> &mut Self {
        let Some(p) = ProcessStats::read() else {
            return self;
        };
        self.gauge(
            "process_resident_memory_bytes",
            "Resident memory of this process",
            p.resident_bytes as i64,
        )
        .counter_seconds(
            "process_cpu_seconds",
            "CPU time of this process, user and system",
            p.cpu_seconds,
        )
        .gauge(
            "process_threads",
            "Threads of this process",
            p.threads as i64,
        )
        .gauge(
            "process_open_fds",
            "Open file descriptors of this process",
            p.open_fds as i64,
        )
    }

    /// The text to serve.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A process's figures from `/proc/self` (Linux).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// `VmRSS`.
    pub resident_bytes: u64,
    /// User and system time.
    pub cpu_seconds: f64,
    /// `Threads`.
    pub threads: u64,
    /// Entries of `/proc/self/fd`.
    pub open_fds: u64,
}

impl ProcessStats {
    /// This process's figures; `None` where `/proc/self` cannot be read.
    pub fn read() -> Option<Self> {
        Some(ProcessStats {
            resident_bytes: status_field(None, "VmRSS:")? * 1024,
            cpu_seconds: cpu_seconds(None)?,
            threads: status_field(None, "Threads:").unwrap_or(0),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count() as u64)
                .unwrap_or(0),
        })
    }
}

/// `/proc/<pid>/<file>`, or `/proc/self/<file>` for this process.
fn proc_file(pid: Option<u32>, file: &str) -> Option<String> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    };
    std::fs::read_to_string(path).ok()
}

/// CPU seconds, user and system, of a process (`self` for this one), from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    // utime and stime, the 14th and 15th fields, counted after the command name (which may hold
    // spaces and parentheses), in USER_HZ ticks: 100 a second on Linux's user ABI.
    let stat = proc_file(pid, "stat")?;
    let mut ticks = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let mut next = || ticks.next()?.parse::<u64>().ok();
    Some((next()? + next()?) as f64 / 100.0)
}

/// The number of a `/proc/<pid>/status` line (`self` for this process): `VmRSS:` in KiB,
/// `Threads:`.
pub fn status_field(pid: Option<u32>, name: &str) -> Option<u64> {
    proc_file(pid, "status")?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// How a daemon renders its metrics at scrape time.
pub type MetricsFn =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// What a daemon's operations endpoint serves: `/metrics` from `metrics` (called per scrape),
/// `/healthz` (the process answers), `/readyz` (`ready` says it can do its work).
pub fn ops_router(metrics: MetricsFn, ready: Arc<dyn Fn() -> bool + Send + Sync>) -> axum::Router {
    use axum::http::{StatusCode, header};
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = metrics();
                async move {
                    let text = text.await;
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ok = ready();
                async move {
                    if ok {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
}

/// Serves [`ops_router`] on `listen` (bounded like every listener here) until the task is
/// aborted; returns the bound address.
pub async fn serve_ops(
    listen: &str,
    metrics: MetricsFn,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind(listen).await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(serve(
        l,
        ops_router(metrics, ready),
        Limits {
            max_connections: 64,
            ..Limits::default()
        },
        std::future::pending(),
    ));
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Stats>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stats = Arc::new(Stats::default());
        tokio::spawn(serve_with_stats(
            l,
            app,
            limits,
            stats.clone(),
            std::future::pending(),
        ));
        (addr, stats)
    }

    async fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Reads until EOF or `within`; true when the server closed the connection.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn accepted(stats: &Stats, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stats.accepted() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the connections were not accepted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn at_the_cap_a_client_takes_the_slot_of_the_oldest_connection_silent_for_evict_after() {
        let (addr, stats) = start(Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(30),
        })
        .await;
        // The attack: connections that never send a byte, as many as the cap, long before
        // their 30 s deadline.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
            accepted(&stats, idle.len() as u64).await;
        }
        // Silent for less than EVICT_AFTER, they may be clients whose bytes are on the way:
        // the newcomer is refused instead.
        let served = get(addr).await.is_ok_and(|r| r.ends_with("ok"));
        assert!(!served, "a young silent connection was evicted");
        assert_eq!((stats.evicted(), stats.shed()), (0, 1));
        tokio::time::sleep(EVICT_AFTER + Duration::from_millis(100)).await;
        // Silent for longer: a client is served at once; the oldest silent connection paid.
        let r = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .expect("the client was locked out")
            .unwrap();
        assert!(r.ends_with("ok"), "{r}");
        assert_eq!((stats.evicted(), stats.shed()), (1, 1));
        assert!(closed_within(&mut idle[0], Duration::from_secs(5)).await);
        assert!(
            !closed_within(&mut idle[3], Duration::from_millis(200)).await,
            "a younger silent connection was closed instead"
        );
        // Round after round of clients: each is served, the attacker's sockets go in turn.
        for _ in 0..6 {
            assert!(get(addr).await.unwrap().ends_with("ok"));
        }
    }

    #[tokio::test]
    async fn past_the_cap_with_every_slot_busy_the_newest_is_shed_and_served_again_once_one_closes()
    {
        let (addr, stats) = start(Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(30),
        })
        .await;
        // Four clients in the middle of their headers: busy, not silent.
        let mut busy = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            busy.push(s);
            accepted(&stats, busy.len() as u64).await;
        }
        // Their first bytes have been seen (they left the silent set) once hyper reads them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_secs(10)).await,
            "the connection past the cap was kept"
        );
        assert!(stats.shed() >= 1);
        assert_eq!(stats.evicted(), 0);
        drop(busy.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = get(addr).await
                && r.ends_with("ok")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a freed slot was not reused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn silent_slow_and_idle_keep_alive_connections_are_closed_at_the_deadline() {
        let (addr, stats) = start(Limits {
            max_connections: 16,
            header_timeout: Duration::from_millis(300),
        })
        .await;
        // Never a byte.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
        assert!(stats.timed_out() >= 1);
        // Headers a byte at a time, slower than the deadline allows.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let mut closed = false;
        for b in
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
        {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            closed || closed_within(&mut slow, Duration::from_secs(10)).await,
            "the slow-header client was held"
        );
        // A keep-alive connection after its answer: closed once idle past the deadline.
        let mut ka = TcpStream::connect(addr).await.unwrap();
        ka.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = ka.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        assert!(
            closed_within(&mut ka, Duration::from_secs(10)).await,
            "an idle keep-alive connection was held"
        );
        // And an ordinary request still works.
        assert!(get(addr).await.unwrap().ends_with("ok"));
    }

    #[tokio::test]
    async fn the_ops_endpoint_serves_metrics_health_and_readiness() {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let (addr, task) = serve_ops(
            "127.0.0.1:0",
            Arc::new(|| {
                Box::pin(async {
                    let mut e = Exposition::new();
                    e.counter("widgets", "Widgets made", 3).gauge(
                        "queue_depth",
                        "Items waiting",
                        7,
                    );
                    e.encode()
                })
            }),
            Arc::new(move || r.load(Ordering::Relaxed)),
        )
        .await
        .unwrap();
        let m = get_path(addr, "/metrics").await;
        assert!(m.contains("# HELP sedge_widgets Widgets made"), "{m}");
        assert!(m.contains("sedge_widgets_total 3"), "{m}");
        assert!(m.contains("sedge_queue_depth 7"), "{m}");
        assert!(get_path(addr, "/healthz").await.ends_with("ok"));
        assert!(get_path(addr, "/readyz").await.contains(" 503 "));
        ready.store(true, Ordering::Relaxed);
        assert!(get_path(addr, "/readyz").await.ends_with("ok"));
        task.abort();
    }

    async fn get_path(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let entered = entered.clone();
                async move {
                    if let Some(tx) = entered.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "done"
                }
            }),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(l, app, Limits::default(), async {
            let _ = stop_rx.await;
        }));
        let req = tokio::spawn(get(addr));
        entered_rx.await.unwrap();
        stop_tx.send(()).unwrap();
        assert!(req.await.unwrap().unwrap().ends_with("done"));
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returned after shutdown")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }

    #[test]
    fn the_process_figures_are_this_processs() {
        // Burn some CPU and hold some memory, then read them back.
        let held: Vec<u8> = vec![1; 32 << 20];
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let p = ProcessStats::read().expect("/proc/self is readable on Linux");
        assert!(p.resident_bytes >= 32 << 20, "{p:?}");
        assert!(p.cpu_seconds >= 0.2, "{p:?}");
        assert!(p.threads >= 1, "{p:?}");
        assert!(p.open_fds >= 4, "stdin/out/err and the file held: {p:?}");
        drop((held, f));
        let text = Exposition::new().process().encode();
        for name in [
            "sedge_process_resident_memory_bytes ",
            "sedge_process_cpu_seconds_total ",
            "sedge_process_threads ",
            "sedge_process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }
}
