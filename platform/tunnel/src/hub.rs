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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

mod accept;
mod join;
mod link_session;

use accept::*;
use join::*;
use link_session::*;

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

/// Whether an [`OwnerLookup`] knows every object yet (a cloud core filling its cache after a
/// start does not): until it does, "no such object is bound to it" may be wrong.
pub type OwnersKnown = Arc<dyn Fn() -> bool + Send + Sync>;

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
    // Stream frames name a stream, not an object: the stream layer checks that the stream
    // belongs to the node that writes into it.
    if msg.route.group == crate::stream::GROUP {
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
    fn new(name: &str, acked: HashMap<String, String>) -> Arc<Node> {
        Arc::new(Node {
            name: name.into(),
            queue: Mutex::new(NodeQueue::with_acked(acked)),
            notify: Notify::new(),
            session: Mutex::new(None),
        })
    }
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
    /// Slots for handshakes being worked on (`max_concurrent_handshakes`).
    working: Arc<Semaphore>,
    events: broadcast::Sender<LinkEvent>,
    handler: Handler,
    owner_of: Option<OwnerLookup>,
    owners_known: Option<OwnersKnown>,
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
    /// Whether `owner_of` knows every object yet; a message it cannot place before then gets
    /// an `error` reply (the node retries) instead of a refusal (the node drops it).
    pub owners_known: Option<OwnersKnown>,
    /// Where join tokens and certificate records are kept (default: the hub's database,
    /// `data_dir/hub.db`); cloud cores sharing a cluster share one store.
    pub join_records: Option<Arc<dyn crate::token::JoinRecords>>,
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

/// The hub's QUIC endpoint settings, the same in every process of the cluster: the key of
/// its stateless reset tokens and the key that marks its connection IDs as its own, both
/// derived from the token signing key beside the CA (`<pki_dir>/token.key`).
///
/// quinn makes both at random per endpoint by default. Then a hub restarted after a crash (no
/// CONNECTION_CLOSE sent) drops a node's packets on the old connection as not its own, or
/// answers with a reset that does not match the token the node holds; the node waits out its
/// idle timeout (45 s by default) before it dials again. With stable keys the node's next
/// packet (a keepalive at most) is answered with a reset it trusts and it reconnects at once;
/// so does a node a load balancer moves to the other core.
fn quic_endpoint_config(tokens: &TokenStore) -> quinn::EndpointConfig {
    use ring::hmac;
    let reset = tokens.derived_key(b"sedge QUIC stateless reset key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(
        &tokens
            .derived_key(b"sedge QUIC connection ID key v1")
            .as_ref()[..8],
    );
    let cid_key = u64::from_le_bytes(cid_key);
    let mut ec =
        quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    ec.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // quinn sends at most one reset per 20 ms (50 a second): 5,000 nodes took 100 s to hear,
    // most of them timing out first (measured). A reset is smaller than the packet that
    // prompts it, so it amplifies nothing; 4,000 a second is cheap (an HMAC and a send each).
    ec.min_reset_interval(Duration::from_micros(250));
    ec
}

impl Hub {
    /// Starts the hub: loads or creates the CA, opens the database, binds the ports.
    pub async fn start(cfg: HubConfig, opts: HubOptions) -> Result<Hub, TunnelError> {
        let join_rate = check_rate(cfg.joins_per_second)?;
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
        let tokens = Arc::new(match opts.join_records.clone() {
            Some(r) => TokenStore::with_records(r, &cfg.pki_dir, &ca_hash)?,
            None => TokenStore::open(&db, &cfg.pki_dir, &ca_hash)?,
        });
        let records = Arc::new(Records::open(&db)?);
        // Every node's delivery records in one read: after a restart all nodes reconnect at
        // once, and loading each one's records as it connects went one node at a time.
        let preloaded = {
            let records = records.clone();
            tokio::task::spawn_blocking(move || records.load_all())
                .await
                .map_err(|e| TunnelError::Store(e.to_string()))??
        };
        let nodes: HashMap<String, Arc<Node>> = preloaded
            .into_iter()
            .map(|(name, acked)| {
                let n = Node::new(&name, acked);
                (name, n)
            })
            .collect();
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
            join_gate: Mutex::new(JoinGate::new(join_rate)),
            ca_hash,
            tokens,
            records,
            nodes: Mutex::new(nodes),
            loading: tokio::sync::Mutex::new(()),
            working: Arc::new(Semaphore::new(cfg.max_concurrent_handshakes.max(1))),
            events: broadcast::channel(4096).0,
            handler,
            owner_of: opts.owner_of,
            owners_known: opts.owners_known,
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
            let socket = std::net::UdpSocket::bind(quic_listen)
                .map_err(|e| TunnelError::Config(format!("listen_quic {quic_listen}: {e}")))?;
            let ep = quinn::Endpoint::new(
                quic_endpoint_config(&inner.tokens),
                Some(sc),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
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

    /// The id of `node`'s live session, if it has one (ids grow with every session this hub
    /// opens).
    pub fn session_id(&self, node: &str) -> Option<u64> {
        self.inner.known(node)?.session().as_ref().map(|s| s.id)
    }

    /// Closes `node`'s session `session` if it is still the live one (another cloud core serves
    /// the node now). Returns whether it was.
    pub fn close_session(&self, node: &str, session: u64) -> bool {
        let Some(n) = self.inner.known(node) else {
            return false;
        };
        let s = n.session();
        match s.as_ref() {
            Some(s) if s.id == session => s.close.send(true).is_ok(),
            _ => false,
        }
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
        self.inner.shutdown.send_replace(true);
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
        let n = Node::new(name, acked);
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), n.clone());
        Ok(n)
    }
}

/// Closes the sessions whose certificate was revoked, by this hub or by `sedge token revoke`
/// in another process: whenever the store's revocation generation moves.
async fn sweep_revoked(inner: Arc<Inner>) {
    let mut stop = inner.shutdown.subscribe();
    let mut seen = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
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
