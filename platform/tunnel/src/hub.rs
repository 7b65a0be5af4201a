//! The cloud hub: accepts edge nodes over WebSocket (TCP) and QUIC (UDP), serves the join
//! endpoints, and delivers messages reliably to each node.
//!
//! One TCP port serves `/ca.crt` and `/edge.crt` (join and rotation) and `/v1/tunnel` (the
//! WebSocket), so a node that can reach the tunnel can always join (KubeEdge's separate 10002 is
//! the top cause of failed joins). QUIC listens on its own UDP port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::TunnelError;
use crate::config::HubConfig;
use crate::link::{self, Link, LinkEnd};
use crate::message::{HUB_GROUP, Message, op};
use crate::queue::{AckEffect, Enqueued, NodeQueue};
use crate::records::Records;
use crate::session::{Counters, Handler, Hello, LinkEvent, Requests, Welcome, control, serve};
use crate::tls;
use crate::token::{TokenError, TokenStore};

/// Looks up which node owns an object: `(kind, namespace, name) -> node`. Supplied by the layer
/// that knows pods and devices; the channel itself knows neither.
pub type OwnerLookup = Arc<dyn Fn(&str, &str, &str) -> Option<String> + Send + Sync>;

/// Kinds that name a node directly.
const NODE_KINDS: &[&str] = &["node", "nodestatus", "nodepatch", "lease"];

/// Whether `node` may send `msg`: it may only write about itself (its node object and lease by
/// name, anything else through `owner_of`). Queries and replies pass; the layer above checks
/// what they ask for.
pub fn authorize(node: &str, msg: &Message, owner_of: Option<&OwnerLookup>) -> Result<(), String> {
    let o = msg.route.operation.as_str();
    if matches!(o, op::QUERY | op::RESPONSE | op::ERROR) {
        return Ok(());
    }
    let parts: Vec<&str> = msg.route.resource.split('/').collect();
    if parts.len() < 3 || parts[1].is_empty() || parts[2].is_empty() {
        return Err(format!(
            "resource {:?} is not <namespace>/<kind>/<name>",
            msg.route.resource
        ));
    }
    let (ns, kind, name) = (parts[0], parts[1], parts[2]);
    if NODE_KINDS.contains(&kind) {
        return if name == node {
            Ok(())
        } else {
            Err(format!("node {node} may not write {kind} {name}"))
        };
    }
    match owner_of.and_then(|f| f(kind, ns, name)) {
        Some(owner) if owner == node => Ok(()),
        Some(owner) => Err(format!(
            "node {node} may not write {kind} {ns}/{name}: it belongs to node {owner}"
        )),
        None => Err(format!(
            "node {node} may not write {kind} {ns}/{name}: no such object is bound to it"
        )),
    }
}

struct SessionHandle {
    id: u64,
    /// SHA-256 of the node certificate the session was opened with (checked against
    /// revocations).
    fingerprint: String,
    tx: mpsc::Sender<Bytes>,
    close: watch::Sender<bool>,
}

struct Node {
    name: String,
    queue: Mutex<NodeQueue>,
    notify: Notify,
    session: Mutex<Option<SessionHandle>>,
}

impl Node {
    fn queue(&self) -> std::sync::MutexGuard<'_, NodeQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn session(&self) -> std::sync::MutexGuard<'_, Option<SessionHandle>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A node proven by its client certificate.
#[derive(Clone)]
struct Peer {
    node: String,
    der: Vec<u8>,
}

/// Joins allowed per second on average (bursts up to twice that), and refusal warnings logged
/// per second at most (the rest are counted in the next warning): a flood of join requests can
/// neither exhaust the CA's signing nor fill the log.
const JOINS_PER_SECOND: f64 = 20.0;

/// A token bucket and a log limiter for the join endpoint.
struct JoinGate {
    tokens: f64,
    last: Instant,
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl JoinGate {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let burst = JOINS_PER_SECOND * 2.0;
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * JOINS_PER_SECOND)
            .min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// `Some(suppressed since the last warning)` when a warning may be logged now.
    fn warn(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last_warn = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct Inner {
    cfg: HubConfig,
    ca: sedge_pki::Ca,
    node_ca: sedge_pki::Ca,
    join_gate: Mutex<JoinGate>,
    ca_hash: String,
    tokens: Arc<TokenStore>,
    records: Arc<Records>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    loading: tokio::sync::Mutex<()>,
    events: broadcast::Sender<LinkEvent>,
    handler: Handler,
    owner_of: Option<OwnerLookup>,
    requests: Requests,
    counters: Counters,
    next_session: AtomicU64,
    shutdown: watch::Sender<bool>,
}

/// The cloud hub.
pub struct Hub {
    inner: Arc<Inner>,
    addr: SocketAddr,
    quic_addr: Option<SocketAddr>,
    endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("addr", &self.addr)
            .field("quic_addr", &self.quic_addr)
            .finish_non_exhaustive()
    }
}

/// How to build a hub besides its config.
#[derive(Default)]
pub struct HubOptions {
    /// Receives the nodes' messages (default: acknowledge and drop).
    pub handler: Option<Handler>,
    /// Object ownership, for authorising what nodes send.
    pub owner_of: Option<OwnerLookup>,
}

fn sans(cfg: &HubConfig, listen: &SocketAddr) -> Vec<String> {
    let mut out: Vec<String> = cfg.advertise_addresses.clone();
    if !listen.ip().is_unspecified() {
        out.push(listen.ip().to_string());
    }
    for s in ["localhost", "127.0.0.1"] {
        out.push(s.into());
    }
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if tls::valid_node_name(h) {
            out.push(h.into());
        }
    }
    out.sort();
    out.dedup();
    out
}

impl Hub {
    /// Starts the hub: loads or creates the CA, opens the database, binds the ports.
    pub async fn start(cfg: HubConfig, opts: HubOptions) -> Result<Hub, TunnelError> {
        let mkdir = |d: &std::path::Path| {
            std::fs::create_dir_all(d)
                .map_err(|e| TunnelError::Config(format!("{}: {e}", d.display())))
        };
        mkdir(&cfg.data_dir)?;
        mkdir(&cfg.pki_dir)?;
        let ca = sedge_pki::Ca::load_or_create(&cfg.pki_dir, "sedge-ca")?;
        let node_ca = tls::node_ca(&cfg.pki_dir)?;
        let ca_hash = tls::ca_hash(&ca.cert_der()?);
        let db = cfg.data_dir.join("hub.db");
        let tokens = Arc::new(TokenStore::open(&db, &cfg.pki_dir, &ca_hash)?);
        let records = Arc::new(Records::open(&db)?);
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| TunnelError::Config(format!("listen {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let names = sans(&cfg, &addr);
        let serving = ca.issue(&sedge_pki::IssueRequest {
            common_name: "sedge-cloudhub".into(),
            organizations: vec!["sedge".into()],
            sans: names.clone(),
            usage: sedge_pki::Usage::Server,
            valid_for: Duration::from_secs(365 * 24 * 3600),
        })?;
        let tcp_tls = tls::hub_tcp_config(node_ca.cert_pem(), &serving.cert_pem, &serving.key_pem)?;
        let handler = opts
            .handler
            .unwrap_or_else(|| crate::session::handler(|_| async { Ok(None) }));
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            ca,
            node_ca,
            join_gate: Mutex::new(JoinGate {
                tokens: JOINS_PER_SECOND * 2.0,
                last: Instant::now(),
                last_warn: None,
                suppressed: 0,
            }),
            ca_hash,
            tokens,
            records,
            nodes: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            events: broadcast::channel(4096).0,
            handler,
            owner_of: opts.owner_of,
            requests: Requests::default(),
            counters: Counters::default(),
            next_session: AtomicU64::new(1),
            shutdown,
        });
        let sem = Arc::new(Semaphore::new(cfg.max_pending_handshakes.max(1)));
        tokio::spawn(accept_tcp(
            inner.clone(),
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tcp_tls)),
            sem.clone(),
        ));
        let (endpoint, quic_addr) = if cfg.listen_quic.is_empty() {
            (None, None)
        } else {
            let qtls = tls::hub_quic_config(
                inner.node_ca.cert_pem(),
                &serving.cert_pem,
                &serving.key_pem,
            )?;
            let qcrypto = quinn::crypto::rustls::QuicServerConfig::try_from(qtls)
                .map_err(|e| TunnelError::Tls(format!("QUIC TLS: {e}")))?;
            let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qcrypto));
            let mut tc = quinn::TransportConfig::default();
            tc.max_concurrent_bidi_streams(2u32.into())
                .max_concurrent_uni_streams(0u32.into())
                .max_idle_timeout(quinn::IdleTimeout::try_from(cfg.dead_after()).ok())
                .stream_receive_window((4u32 * 1024 * 1024).into())
                .receive_window((8u32 * 1024 * 1024).into());
            sc.transport_config(Arc::new(tc));
            let quic_listen: SocketAddr = cfg.listen_quic.parse().map_err(|e| {
                TunnelError::Config(format!("listen_quic {:?}: {e}", cfg.listen_quic))
            })?;
            let ep = quinn::Endpoint::server(sc, quic_listen)
                .map_err(|e| TunnelError::Config(format!("listen_quic {quic_listen}: {e}")))?;
            let qaddr = ep.local_addr().ok();
            tokio::spawn(accept_quic(inner.clone(), ep.clone(), sem));
            (Some(ep), qaddr)
        };
        tokio::spawn(sweep_revoked(inner.clone()));
        tracing::info!(%addr, quic = ?quic_addr, sans = ?names, "cloud hub listening");
        Ok(Hub {
            inner,
            addr,
            quic_addr,
            endpoint,
        })
    }

    /// Revokes every certificate issued for `node` and closes its session (the Node was
    /// deleted). It can come back only by joining with a new token.
    pub async fn revoke_node(&self, node: &str) -> Result<usize, TunnelError> {
        let tokens = self.inner.tokens.clone();
        let owned = node.to_string();
        let n = tokio::task::spawn_blocking(move || tokens.revoke_node(&owned))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))??;
        self.inner.close_session(node);
        tracing::info!(%node, certificates = n, "revoked the node's certificates");
        Ok(n)
    }

    /// Notes that these nodes' Node objects exist (see [`TokenStore::mark_seen`]).
    pub async fn nodes_seen(&self, nodes: Vec<String>) -> Result<(), TunnelError> {
        let tokens = self.inner.tokens.clone();
        tokio::task::spawn_blocking(move || tokens.mark_seen(&nodes))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))?
    }

    /// Revokes the nodes whose Node object was seen once and is missing from `present` (the
    /// complete list): deletions made while no cloud core was watching. Returns their names.
    pub async fn revoke_gone(
        &self,
        present: std::collections::HashSet<String>,
    ) -> Result<Vec<String>, TunnelError> {
        let tokens = self.inner.tokens.clone();
        let gone = tokio::task::spawn_blocking(move || tokens.gone(&present))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))??;
        for n in &gone {
            self.revoke_node(n).await?;
        }
        Ok(gone)
    }

    /// The TCP address (WebSocket and join).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The QUIC address, if enabled.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.inner.ca.cert_pem()
    }

    /// The CA hash that starts every join token.
    pub fn ca_hash(&self) -> &str {
        &self.inner.ca_hash
    }

    /// The join tokens.
    pub fn tokens(&self) -> &TokenStore {
        &self.inner.tokens
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Connection events.
    pub fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.inner.events.subscribe()
    }

    /// Nodes with a live session.
    pub fn connected(&self) -> Vec<String> {
        let nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = nodes
            .values()
            .filter(|n| n.session().is_some())
            .map(|n| n.name.clone())
            .collect();
        v.sort();
        v
    }

    /// The hub's metrics: its counters (`sedge_hub_*_total`), nodes known and connected, and
    /// objects waiting in the nodes' queues.
    pub fn metrics(&self, e: &mut sedge_serve::Exposition) {
        for (name, help, v) in self.inner.counters.described() {
            e.counter(&format!("hub_{name}"), help, v);
        }
        let nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let connected = nodes.values().filter(|n| n.session().is_some()).count();
        let queued: usize = nodes.values().map(|n| n.queue().len()).sum();
        e.gauge("hub_nodes", "Nodes the hub knows", nodes.len() as i64)
            .gauge(
                "hub_nodes_connected",
                "Nodes with a live session",
                connected as i64,
            )
            .gauge(
                "hub_queued_objects",
                "Objects waiting for a node's acknowledgement, all nodes",
                queued as i64,
            );
    }

    /// Whether `node` has a live session.
    pub fn is_connected(&self, node: &str) -> bool {
        self.inner
            .known(node)
            .is_some_and(|n| n.session().is_some())
    }

    /// Queues a message for reliable delivery to `node` (coalescing by the route's resource).
    /// Works while the node is offline; delivered when it connects.
    pub async fn send(&self, node: &str, msg: Message) -> Result<Enqueued, TunnelError> {
        msg.check_size(self.inner.cfg.max_frame_bytes)?;
        if msg.no_ack {
            self.send_unacked(node, msg).await?;
            return Ok(Enqueued::Queued);
        }
        let n = self.inner.node(node).await?;
        let r = n.queue().offer(msg, self.inner.cfg.queue_capacity);
        match r {
            Ok(e) => {
                if e != Enqueued::Skipped {
                    n.notify.notify_one();
                }
                Ok(e)
            }
            Err(_) => {
                Counters::inc(&self.inner.counters.queue_full);
                Err(TunnelError::QueueFull {
                    node: node.into(),
                    capacity: self.inner.cfg.queue_capacity,
                })
            }
        }
    }

    /// Sends a message that needs no acknowledgement, now; fails if the node is offline.
    pub async fn send_unacked(&self, node: &str, mut msg: Message) -> Result<(), TunnelError> {
        msg.check_size(self.inner.cfg.max_frame_bytes)?;
        msg.no_ack = true;
        let tx = self
            .inner
            .known(node)
            .and_then(|n| n.session().as_ref().map(|s| s.tx.clone()));
        let tx = tx.ok_or(TunnelError::NotConnected)?;
        tx.send(msg.encode())
            .await
            .map_err(|_| TunnelError::NotConnected)?;
        Counters::inc(&self.inner.counters.messages_sent);
        Ok(())
    }

    /// Sends a request to `node` and waits for its reply.
    pub async fn request(
        &self,
        node: &str,
        msg: Message,
        timeout: Duration,
    ) -> Result<Message, TunnelError> {
        let rx = self.inner.requests.register(&msg.id);
        let id = msg.id.clone();
        if let Err(e) = self.send_unacked(node, msg).await {
            self.inner.requests.forget(&id);
            return Err(e);
        }
        self.inner.requests.wait(&id, rx, timeout).await
    }

    /// What `node` has acknowledged: object key -> resourceVersion.
    pub async fn acked(&self, node: &str) -> Result<HashMap<String, String>, TunnelError> {
        Ok(self.inner.node(node).await?.queue().acked().clone())
    }

    /// Objects waiting for `node` (queued or unacknowledged).
    pub async fn pending(&self, node: &str) -> Result<usize, TunnelError> {
        Ok(self.inner.node(node).await?.queue().len())
    }

    /// Stops accepting, closes every session and flushes the delivery records.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        if let Some(ep) = &self.endpoint {
            ep.close(0u32.into(), b"hub shutting down");
        }
        let records = self.inner.records.clone();
        let _ = tokio::task::spawn_blocking(move || records.flush()).await;
    }
}

impl Inner {
    /// The node's state if it has been loaded.
    fn known(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Closes the node's session, if it has one (its certificate was revoked).
    fn close_session(&self, node: &str) {
        if let Some(state) = self.known(node)
            && let Some(s) = state.session().as_ref()
        {
            let _ = s.close.send(true);
        }
    }

    /// The node's state, loading its delivery records on first use.
    async fn node(&self, name: &str) -> Result<Arc<Node>, TunnelError> {
        if let Some(n) = self.known(name) {
            return Ok(n);
        }
        // One loader at a time; whoever waited may find the node loaded by the one before.
        let _one_loader = self.loading.lock().await;
        if let Some(n) = self.known(name) {
            return Ok(n);
        }
        let records = self.records.clone();
        let owned = name.to_string();
        let acked = tokio::task::spawn_blocking(move || records.load(&owned))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))??;
        let n = Arc::new(Node {
            name: name.into(),
            queue: Mutex::new(NodeQueue::with_acked(acked)),
            notify: Notify::new(),
            session: Mutex::new(None),
        });
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), n.clone());
        Ok(n)
    }
}

async fn accept_tcp(
    inner: Arc<Inner>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sem: Arc<Semaphore>,
) {
    let mut stop = inner.shutdown.subscribe();
    let admission_stats = Arc::new(sedge_serve::Stats::default());
    let admission = sedge_serve::Admission::with_slots(
        sem,
        inner.cfg.max_pending_handshakes,
        admission_stats.clone(),
    );
    loop {
        let (sock, remote) = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the cap on pending handshakes, a socket that has sent nothing yet gives its slot
        // to the newcomer (idle sockets cannot lock nodes out); if all are handshaking, the
        // newcomer is shed.
        let evicted_before = admission_stats.evicted();
        let Some(ticket) = admission.admit(remote) else {
            Counters::inc(&inner.counters.handshakes_shed);
            drop(sock);
            continue;
        };
        if admission_stats.evicted() > evicted_before {
            Counters::inc(&inner.counters.handshakes_evicted);
        }
        let inner = inner.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let hs = inner.cfg.handshake_timeout_ms;
            let Some(permit) = ticket.first_byte(&sock, Duration::from_millis(hs)).await else {
                Counters::inc(&inner.counters.handshake_failures);
                return;
            };
            let accept = async { acceptor.accept(sock).await.map_err(|e| e.to_string()) };
            let Some(tls) = handshake(&inner, remote, "TLS handshake", accept).await else {
                return;
            };
            drop(permit);
            let der = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let peer = match der {
                Some(der) => Some(peer_of(&inner, der).await),
                None => None,
            };
            let svc_inner = inner.clone();
            let svc = hyper::service::service_fn(move |req| {
                route(svc_inner.clone(), peer.clone(), remote, req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(hs))
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// The node a verified client certificate names, unless the certificate has been revoked.
async fn peer_of(inner: &Arc<Inner>, der: Vec<u8>) -> Result<Peer, String> {
    let node = tls::node_of_cert(&der)?;
    let tokens = inner.tokens.clone();
    let (revoked, der) = tokio::task::spawn_blocking(move || (tokens.is_revoked(&der), der))
        .await
        .map_err(|e| e.to_string())?;
    if revoked {
        return Err(format!(
            "the certificate of node {node} has been revoked (its join token was revoked or the node deleted); join again with a new token"
        ));
    }
    Ok(Peer { node, der })
}

/// Closes the sessions whose certificate was revoked, by this hub or by `sedge token revoke`
/// in another process: whenever the store's revocation generation moves.
async fn sweep_revoked(inner: Arc<Inner>) {
    let mut stop = inner.shutdown.subscribe();
    let mut seen = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let tokens = inner.tokens.clone();
        let Ok(generation) =
            tokio::task::spawn_blocking(move || tokens.revocation_generation()).await
        else {
            continue;
        };
        if seen.replace(generation).is_none_or(|g| g == generation) {
            continue;
        }
        let sessions: Vec<(Arc<Node>, String)> = inner
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|n| {
                let fp = n.session().as_ref()?.fingerprint.clone();
                Some((n.clone(), fp))
            })
            .collect();
        let tokens = inner.tokens.clone();
        let revoked = tokio::task::spawn_blocking(move || {
            sessions
                .into_iter()
                .filter(|(_, fp)| tokens.is_revoked_fingerprint(fp))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (n, fp) in revoked {
            if let Some(s) = n.session().as_ref()
                && s.fingerprint == fp
            {
                tracing::warn!(node = %n.name, "closing the session of a revoked certificate");
                let _ = s.close.send(true);
            }
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn route(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    Ok(match (req.method().as_str(), path.as_str()) {
        ("GET", "/healthz") | ("GET", "/readyz") => text(StatusCode::OK, "ok"),
        ("GET", "/ca.crt") => {
            let mut r = text(StatusCode::OK, inner.ca.cert_pem());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-pem-file"),
            );
            r
        }
        ("POST", "/edge.crt") | ("GET", "/edge.crt") => sign(inner, peer, remote, req).await,
        ("GET", "/v1/tunnel") => upgrade(inner, peer, remote, req),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    })
}

async fn sign(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Response<Full<Bytes>> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let node = header("nodename").unwrap_or_default();
    let bearer =
        header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let refuse = |status: StatusCode, why: String| {
        let warn = inner
            .join_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn();
        if let Some(suppressed) = warn {
            tracing::warn!(%remote, node = %node, reason = %why, suppressed, "certificate request refused");
        }
        text(status, why)
    };
    if !inner
        .join_gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow()
    {
        Counters::inc(&inner.counters.joins_throttled);
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many certificate requests (more than {JOINS_PER_SECOND}/s); retry in a second"
            ),
        );
    }
    if !tls::valid_node_name(&node) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("NodeName header {node:?} is not a valid node name (lower-case DNS name)"),
        );
    }
    // Renewal over mTLS needs the current certificate for the same node; otherwise a token
    // that admits this name (single use, never a connected or registered name unless bound to
    // it). `token` is what the new certificate is recorded under, so that revoking the token
    // revokes it too.
    let connected = inner.known(&node).is_some_and(|n| n.session().is_some());
    let (how, token, rejoin) = match (&peer, &bearer) {
        (Some(Ok(current)), _) if current.node == node => {
            let tokens = inner.tokens.clone();
            let der = current.der.clone();
            let token = tokio::task::spawn_blocking(move || tokens.token_of_cert(&der))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            ("renewal".to_string(), token, false)
        }
        (_, Some(token)) => {
            let tokens = inner.tokens.clone();
            let (t, n) = (token.clone(), node.clone());
            match tokio::task::spawn_blocking(move || tokens.admit(&t, &n, connected)).await {
                Ok(Ok(a)) => (format!("token {}", a.token), a.token, a.rejoin),
                Ok(Err(e)) if e.is_conflict() => {
                    return refuse(StatusCode::CONFLICT, e.to_string());
                }
                Ok(Err(e @ TokenError::BoundElsewhere { .. })) => {
                    return refuse(StatusCode::FORBIDDEN, e.to_string());
                }
                Ok(Err(e)) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
                Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (Some(Ok(current)), None) => {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate is for node {}, not {node}; a node may only renew its own certificate",
                    current.node
                ),
            );
        }
        _ => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "a join token (Authorization: Bearer <token>) or the node's current certificate is required".into(),
            );
        }
    };
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("reading the CSR: {e}")),
    };
    let csr = String::from_utf8_lossy(&body);
    let issued = inner.node_ca.sign_csr(
        &csr,
        &sedge_pki::IssueRequest {
            common_name: format!("{}{node}", tls::NODE_PREFIX),
            organizations: vec![tls::NODES_GROUP.into()],
            sans: Vec::new(),
            usage: sedge_pki::Usage::Client,
            valid_for: Duration::from_secs(inner.cfg.node_cert_days.max(1) * 24 * 3600),
        },
    );
    match issued {
        Ok(i) => {
            let recorded = record_issued(&inner, &i.cert_pem, &node, &token, rejoin).await;
            if let Err(e) = recorded {
                return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            Counters::inc(&inner.counters.certificates_issued);
            tracing::info!(%remote, %node, via = %how, rejoin, "issued node certificate");
            text(StatusCode::OK, i.cert_pem)
        }
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Records an issued certificate; a re-join first revokes the node's earlier certificates and
/// closes the session they hold.
async fn record_issued(
    inner: &Arc<Inner>,
    cert_pem: &str,
    node: &str,
    token: &str,
    rejoin: bool,
) -> Result<(), TunnelError> {
    let der = sedge_pki::certs_from_pem(cert_pem, "issued certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| TunnelError::Tls("the issued certificate is empty".into()))?;
    let (_, not_after) = sedge_pki::validity(&der)?;
    let tokens = inner.tokens.clone();
    let (n, t) = (node.to_string(), token.to_string());
    tokio::task::spawn_blocking(move || {
        if rejoin {
            tokens.revoke_node(&n)?;
        }
        tokens.record_cert(&der, &n, &t, not_after)
    })
    .await
    .map_err(|e| TunnelError::Store(e.to_string()))??;
    if rejoin {
        inner.close_session(node);
    }
    Ok(())
}

fn upgrade(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Response<Full<Bytes>> {
    let (node, fingerprint) = match peer {
        Some(Ok(p)) => (p.node, tls::ca_hash(&p.der)),
        Some(Err(why)) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, reason = %why, "tunnel refused");
            return text(StatusCode::FORBIDDEN, why);
        }
        None => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, "tunnel refused: no client certificate");
            return text(
                StatusCode::UNAUTHORIZED,
                "the tunnel needs a node client certificate: join first",
            );
        }
    };
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket upgrade request");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let max = inner.cfg.max_frame_bytes;
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    Some(link::ws_config(max)),
                )
                .await;
                run_session(inner, node, fingerprint, link::websocket(ws, remote)).await;
            }
            Err(e) => tracing::warn!(%remote, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

async fn accept_quic(inner: Arc<Inner>, ep: quinn::Endpoint, sem: Arc<Semaphore>) {
    let mut stop = inner.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            _ = stop.changed() => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            Counters::inc(&inner.counters.handshakes_shed);
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let setup = async {
                let conn = incoming.await.map_err(|e| e.to_string())?;
                let node = conn
                    .peer_identity()
                    .and_then(|id| {
                        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .and_then(|certs| certs.first().map(|c| c.to_vec()));
                let node = match node {
                    Some(der) => peer_of(&inner, der).await,
                    None => Err("no client certificate".into()),
                };
                let (node, fingerprint) = match node {
                    Ok(p) => (p.node, tls::ca_hash(&p.der)),
                    Err(why) => {
                        conn.close(2u32.into(), why.as_bytes());
                        return Err(why);
                    }
                };
                let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, node, fingerprint, send, recv))
            };
            let Some((conn, node, fingerprint, send, recv)) =
                handshake(&inner, remote, "QUIC handshake", setup).await
            else {
                return;
            };
            drop(permit);
            let max = inner.cfg.max_frame_bytes;
            run_session(inner, node, fingerprint, link::quic(conn, send, recv, max)).await;
        });
    }
}

/// Runs a connection's handshake under the handshake timeout; a failure or timeout is counted
/// and logged (failures as warnings: they name a certificate or protocol problem).
async fn handshake<T>(
    inner: &Inner,
    remote: SocketAddr,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Option<T> {
    let limit = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(why)) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, reason = %why, "{what} failed");
            None
        }
        Err(_) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::debug!(%remote, "{what} timed out");
            None
        }
    }
}

async fn send_now(tx: &mpsc::Sender<Bytes>, m: &Message) -> bool {
    tx.send(m.encode()).await.is_ok()
}

/// One session, from hello to close.
async fn run_session(inner: Arc<Inner>, node: String, fingerprint: String, mut link: Link) {
    let remote = link.remote;
    let transport = link.transport;
    let hs = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    // Hello: the edge says who it thinks it is; the certificate decides who it is.
    let hello = match tokio::time::timeout(hs, link.rx.recv()).await {
        Ok(Some(Ok(m))) if m.route.group == HUB_GROUP && m.route.operation == op::HELLO => m,
        other => {
            Counters::inc(&inner.counters.handshake_failures);
            let why = match other {
                Err(_) => "no hello in time".to_string(),
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => "closed".into(),
                Ok(Some(Ok(m))) => format!("expected hello, got {}", m.route.operation),
            };
            tracing::warn!(%node, %remote, reason = %why, "session refused");
            return;
        }
    };
    let claimed = serde_json::from_slice::<Hello>(&hello.content)
        .map(|h| h.node)
        .unwrap_or_default();
    if claimed != node {
        Counters::inc(&inner.counters.handshake_failures);
        let why = format!(
            "the client certificate is for node {node}, but the edge says it is {claimed:?}: a certificate only works for its own node; join {claimed:?} with a token"
        );
        tracing::warn!(%remote, reason = %why, "session refused");
        let mut e = control(op::ERROR, why);
        e.parent_id = hello.id;
        let _ = send_now(&link.tx, &e).await;
        return;
    }
    let n = match inner.node(&node).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(%node, error = %e, "loading delivery records failed");
            return;
        }
    };
    let sid = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let welcome = Welcome {
        session: sid,
        keepalive_ms: inner.cfg.keepalive_interval_ms,
    };
    let mut w = control(
        op::WELCOME,
        serde_json::to_vec(&welcome).unwrap_or_default(),
    );
    w.parent_id = hello.id;
    if !send_now(&link.tx, &w).await {
        return;
    }
    let (close_tx, mut close_rx) = watch::channel(false);
    let old = n.session().replace(SessionHandle {
        id: sid,
        fingerprint,
        tx: link.tx.clone(),
        close: close_tx,
    });
    if let Some(old) = old {
        Counters::inc(&inner.counters.sessions_replaced);
        tracing::info!(%node, old = old.id, new = sid, "replacing the node's previous session");
        let _ = old.close.send(true);
    }
    n.queue().reset();
    Counters::inc(&inner.counters.sessions_opened);
    tracing::info!(%node, %remote, ?transport, session = sid, "edge connected");
    let _ = inner.events.send(LinkEvent::Connected {
        node: node.clone(),
        transport,
        remote,
    });

    let pump = tokio::spawn(pump(
        inner.clone(),
        n.clone(),
        link.tx.clone(),
        close_rx.clone(),
    ));
    let (work_tx, work_rx) = mpsc::channel::<Message>(1024);
    let worker = tokio::spawn(serve(
        inner.handler.clone(),
        node.clone(),
        work_rx,
        link.tx.clone(),
    ));

    let dead_after = inner.cfg.dead_after();
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(inner.cfg.keepalive());
    let mut stop = inner.shutdown.subscribe();
    let reason = loop {
        tokio::select! {
            _ = close_rx.changed() => break "replaced by a newer session".to_string(),
            _ = stop.changed() => break "hub shutting down".to_string(),
            _ = tick.tick() => {
                if last_seen.elapsed() > dead_after {
                    break format!("no traffic for {dead_after:?} (dead peer)");
                }
            }
            m = link.rx.recv() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(end)) => {
                        match end {
                            LinkEnd::Oversize(_) => Counters::inc(&inner.counters.oversize_frames),
                            LinkEnd::Garbage(_) => Counters::inc(&inner.counters.garbage_frames),
                            _ => {}
                        }
                        match end {
                            LinkEnd::Oversize(_) | LinkEnd::Garbage(_) => {
                                tracing::warn!(%node, %remote, reason = %end, "closing the connection")
                            }
                            _ => tracing::debug!(%node, %remote, reason = %end, "connection ended"),
                        }
                        break end.to_string();
                    }
                    None => break "closed".to_string(),
                };
                last_seen = Instant::now();
                if m.route.group == HUB_GROUP {
                    match m.route.operation.as_str() {
                        op::KEEPALIVE => {
                            let _ = link.tx.try_send(control(op::KEEPALIVE, "pong").encode());
                        }
                        op::ACK => {
                            Counters::inc(&inner.counters.acks_received);
                            let effect = n.queue().ack(&m.parent_id);
                            match effect {
                                Some(AckEffect::Set(k, rv)) => inner.records.set(&node, &k, &rv),
                                Some(AckEffect::Removed(k)) => inner.records.remove(&node, &k),
                                None => {}
                            }
                            n.notify.notify_one();
                        }
                        _ => {}
                    }
                    continue;
                }
                Counters::inc(&inner.counters.messages_received);
                if !m.parent_id.is_empty()
                    && matches!(m.route.operation.as_str(), op::RESPONSE | op::ERROR | op::REFUSED)
                {
                    let is_error = m.route.operation == op::ERROR;
                    let (parent, content) = (m.parent_id.clone(), m.content.clone());
                    if !inner.requests.complete(m) && is_error {
                        // A reliable message the edge failed to persist: retried on the timeout.
                        tracing::warn!(%node, %parent, reason = %String::from_utf8_lossy(&content), "edge reported an error");
                    }
                    continue;
                }
                if let Err(why) = authorize(&node, &m, inner.owner_of.as_ref()) {
                    Counters::inc(&inner.counters.refused);
                    tracing::warn!(%node, resource = %m.route.resource, operation = %m.route.operation, reason = %why, "message refused");
                    let r = m.reply(op::REFUSED, why);
                    let _ = link.tx.send(r.encode()).await;
                    continue;
                }
                if work_tx.send(m).await.is_err() {
                    break "handler stopped".into();
                }
            }
        }
    };
    pump.abort();
    drop(work_tx);
    let _ = worker.await;
    let current = {
        let mut s = n.session();
        if s.as_ref().is_some_and(|s| s.id == sid) {
            s.take();
            true
        } else {
            false
        }
    };
    Counters::inc(&inner.counters.sessions_closed);
    tracing::info!(%node, session = sid, %reason, "edge session ended");
    if current {
        n.queue().reset();
        let _ = inner.events.send(LinkEvent::Disconnected {
            node: node.clone(),
            reason,
        });
    }
}

/// Sends the node's queue: up to the window in flight, retries on the ack timeout.
async fn pump(
    inner: Arc<Inner>,
    n: Arc<Node>,
    tx: mpsc::Sender<Bytes>,
    mut closed: watch::Receiver<bool>,
) {
    let ack_timeout = Duration::from_millis(inner.cfg.ack_timeout_ms.max(1));
    let max_backoff = Duration::from_millis(inner.cfg.max_retry_backoff_ms);
    loop {
        let (msgs, next, retried) = n.queue().take(
            inner.cfg.send_window.max(1),
            Instant::now(),
            ack_timeout,
            max_backoff,
        );
        inner
            .counters
            .retries
            .fetch_add(retried as u64, Ordering::Relaxed);
        for m in msgs {
            if tx.send(m.encode()).await.is_err() {
                return;
            }
            Counters::inc(&inner.counters.messages_sent);
        }
        let wait = next.map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = n.notify.notified() => {}
            _ = async { match wait { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
            _ = closed.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(resource: &str, operation: &str) -> Message {
        Message::new("resource", operation, resource, "")
    }

    #[test]
    fn nodes_write_only_about_themselves() {
        assert!(authorize("edge-1", &msg("null/nodestatus/edge-1", op::UPDATE), None).is_ok());
        let e = authorize("edge-1", &msg("null/nodestatus/edge-2", op::UPDATE), None).unwrap_err();
        assert!(e.contains("may not write nodestatus edge-2"), "{e}");
        let owners: OwnerLookup = Arc::new(|kind, ns, name| {
            (kind == "podstatus" && ns == "default" && name == "web").then(|| "edge-1".to_string())
        });
        assert!(
            authorize(
                "edge-1",
                &msg("default/podstatus/web", op::UPDATE),
                Some(&owners)
            )
            .is_ok()
        );
        let e = authorize(
            "edge-2",
            &msg("default/podstatus/web", op::UPDATE),
            Some(&owners),
        )
        .unwrap_err();
        assert!(e.contains("belongs to node edge-1"), "{e}");
        let e = authorize(
            "edge-1",
            &msg("default/podstatus/db", op::UPDATE),
            Some(&owners),
        )
        .unwrap_err();
        assert!(e.contains("no such object is bound to it"), "{e}");
        let e = authorize("edge-1", &msg("bogus", op::UPDATE), None).unwrap_err();
        assert!(e.contains("is not <namespace>/<kind>/<name>"), "{e}");
        // Queries are for the layer above to judge.
        assert!(authorize("edge-1", &msg("default/configmap/x", op::QUERY), None).is_ok());
    }
}
