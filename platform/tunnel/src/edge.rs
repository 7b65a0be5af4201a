//! The edge hub: joins the cloud, keeps one session up (reconnecting with jittered backoff),
//! delivers the cloud's messages to the handler and acknowledges them once handled, and flushes
//! the durable outbox to the cloud.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::TunnelError;
use crate::config::{EdgeConfig, Transport};
use crate::link::{self, Link, LinkEnd};
use crate::message::{HUB_GROUP, Message, op};
use crate::outbox::{Outbox, Policy};
use crate::session::{
    Counters, Handler, Hello, LinkEvent, Requests, Welcome, control, serve, unix_secs,
};
use crate::tls;

/// Where an edge keeps its credentials.
#[derive(Debug, Clone)]
pub struct EdgePaths {
    /// The cluster CA (pinned at join).
    pub ca: PathBuf,
    /// The node certificate.
    pub cert: PathBuf,
    /// The node key (mode 0600).
    pub key: PathBuf,
    /// The outbox database.
    pub outbox: PathBuf,
}

impl EdgePaths {
    /// The paths under `data_dir`.
    pub fn new(data_dir: &Path) -> EdgePaths {
        let pki = data_dir.join("pki");
        EdgePaths {
            ca: pki.join("ca.crt"),
            cert: pki.join("node.crt"),
            key: pki.join("node.key"),
            outbox: data_dir.join("outbox.db"),
        }
    }
}

/// A node's credentials, loaded from disk.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Node name from the certificate.
    pub node: String,
    /// CA PEM.
    pub ca_pem: String,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Key PEM.
    pub key_pem: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

impl Identity {
    /// Loads the credentials in `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Identity, TunnelError> {
        let p = EdgePaths::new(data_dir);
        let read = |f: &Path| {
            std::fs::read_to_string(f).map_err(|e| {
                TunnelError::NotJoined(format!(
                    "{}: {e}; join first with `sedge join --cloud <host:port> --token <token> --node-name <name>`",
                    f.display()
                ))
            })
        };
        let (ca_pem, cert_pem, key_pem) = (read(&p.ca)?, read(&p.cert)?, read(&p.key)?);
        let der = sedge_pki::certs_from_pem(&cert_pem, "node certificate")?;
        let node = tls::node_of_cert(&der[0]).map_err(TunnelError::NotJoined)?;
        let (not_before, not_after) = sedge_pki::validity(&der[0])?;
        Ok(Identity {
            node,
            ca_pem,
            cert_pem,
            key_pem,
            not_before,
            not_after,
        })
    }

    /// Whether the certificate has expired.
    pub fn expired(&self) -> bool {
        unix_secs() >= self.not_after
    }

    /// When to renew: `fraction` (plus up to 0.1 of jitter) into the lifetime, Unix seconds.
    pub fn renew_at(&self, fraction: f64) -> i64 {
        let life = (self.not_after - self.not_before).max(1) as f64;
        let jitter = rand::random::<f64>() * 0.1;
        self.not_before + (life * (fraction + jitter).clamp(0.05, 0.95)) as i64
    }
}

/// What a join produced.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The node name.
    pub node: String,
    /// Certificate expiry, Unix seconds.
    pub expires: i64,
    /// The pinned CA hash.
    pub ca_hash: String,
}

async fn https(
    addr: &str,
    host: &str,
    tls_cfg: rustls::ClientConfig,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, String), TunnelError> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| TunnelError::Connect(format!("connecting to {addr} timed out")))?
    .map_err(|e| TunnelError::Connect(format!("connecting to {addr}: {e}")))?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| TunnelError::Config(format!("cloud host {host:?}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| TunnelError::Tls(format!("TLS with {addr}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TunnelError::Connect(format!("HTTP with {addr}: {e}")))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| TunnelError::Connect(format!("request to {addr}: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| TunnelError::Connect(format!("reading the reply from {addr}: {e}")))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn request(method: &str, path: &str, host: &str, body: String) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn request_cert(
    cfg: &EdgeConfig,
    tls_cfg: rustls::ClientConfig,
    token: Option<&str>,
) -> Result<(String, String), TunnelError> {
    let (csr, key) = sedge_pki::make_csr(&format!("{}{}", tls::NODE_PREFIX, cfg.node_name))?;
    let mut req = request("POST", "/edge.crt", &cfg.cloud_host(), csr);
    let h = req.headers_mut();
    h.insert(
        "NodeName",
        http::HeaderValue::from_str(&cfg.node_name)
            .map_err(|e| TunnelError::Config(format!("node name: {e}")))?,
    );
    if let Some(t) = token {
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                TunnelError::Join("the token has characters a header cannot carry".into())
            })?,
        );
    }
    let (status, body) = https(&cfg.cloud, &cfg.cloud_host(), tls_cfg, req).await?;
    if status != StatusCode::OK {
        return Err(TunnelError::Join(format!(
            "the cloud refused the certificate request ({status}): {}",
            body.trim()
        )));
    }
    Ok((body, key))
}

/// Joins the cloud with a token: fetches the CA, pins it by the token's hash, verifies the
/// hub's certificate against it, and gets a node certificate for a fresh key. Nothing is
/// written unless every step succeeds.
pub async fn join(cfg: &EdgeConfig, token: &str) -> Result<Joined, TunnelError> {
    if !tls::valid_node_name(&cfg.node_name) {
        return Err(TunnelError::Config(format!(
            "node name {:?} is not a lower-case DNS name (letters, digits, '-', '.')",
            cfg.node_name
        )));
    }
    let token = token.trim();
    let Some((pin, _)) = token.split_once('.') else {
        return Err(TunnelError::Join(
            "the token is not `<ca-hash>.<jwt>` (get one with `sedge token create`)".into(),
        ));
    };
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TunnelError::Join(format!(
            "the token's CA hash {pin:?} is not 64 hex digits"
        )));
    }
    let host = cfg.cloud_host();
    let capture = tls::CaptureVerifier::new();
    let (status, ca_pem) = https(
        &cfg.cloud,
        &host,
        capture.client_config()?,
        request("GET", "/ca.crt", &host, String::new()),
    )
    .await?;
    if status != StatusCode::OK {
        return Err(TunnelError::Join(format!(
            "fetching the CA from {} failed ({status})",
            cfg.cloud
        )));
    }
    let der = sedge_pki::certs_from_pem(&ca_pem, "CA from the cloud")?;
    let got = tls::ca_hash(&der[0]);
    if !got.eq_ignore_ascii_case(pin) {
        let why = format!(
            "the CA served by {} has hash {got}, but the token pins {pin}: wrong cloud address, an altered token, or someone in the middle; nothing was written",
            cfg.cloud
        );
        tracing::error!(reason = %why, "join refused");
        return Err(TunnelError::Join(why));
    }
    capture.verify_against(&ca_pem, &host).map_err(|e| {
        TunnelError::Join(format!(
            "{e}; if {host} is not among the hub's names, add it to the hub's advertise_addresses"
        ))
    })?;
    let (cert_pem, key_pem) = request_cert(
        cfg,
        tls::edge_client_config(&ca_pem, None, false)?,
        Some(token),
    )
    .await?;
    let p = EdgePaths::new(&cfg.data_dir);
    sedge_pki::write_file(&p.ca, &ca_pem, false)?;
    sedge_pki::write_file(&p.key, &key_pem, true)?;
    sedge_pki::write_file(&p.cert, &cert_pem, false)?;
    let id = Identity::load(&cfg.data_dir)?;
    tracing::info!(node = %id.node, cloud = %cfg.cloud, "joined");
    Ok(Joined {
        node: id.node,
        expires: id.not_after,
        ca_hash: got,
    })
}

/// Renews the node certificate over mTLS with the current one (no token needed).
pub async fn renew(cfg: &EdgeConfig) -> Result<Identity, TunnelError> {
    let id = Identity::load(&cfg.data_dir)?;
    let tls_cfg = tls::edge_client_config(&id.ca_pem, Some((&id.cert_pem, &id.key_pem)), false)?;
    let mut cfg = cfg.clone();
    cfg.node_name = id.node.clone();
    let (cert_pem, key_pem) = request_cert(&cfg, tls_cfg, None).await?;
    let p = EdgePaths::new(&cfg.data_dir);
    // Both are written under temporary names before either replaces the old pair, so a crash
    // cannot leave a certificate next to a key it does not belong to for long.
    let (new_key, new_cert) = (
        p.key.with_extension("key.new"),
        p.cert.with_extension("crt.new"),
    );
    sedge_pki::write_file(&new_key, &key_pem, true)?;
    sedge_pki::write_file(&new_cert, &cert_pem, false)?;
    let mv = |a: &Path, b: &Path| {
        std::fs::rename(a, b).map_err(|e| TunnelError::Store(format!("{}: {e}", b.display())))
    };
    mv(&new_key, &p.key)?;
    mv(&new_cert, &p.cert)?;
    let id = Identity::load(&cfg.data_dir)?;
    tracing::info!(node = %id.node, expires = id.not_after, "node certificate renewed");
    Ok(id)
}

struct EdgeInner {
    cfg: EdgeConfig,
    node: String,
    outbox: Arc<Outbox>,
    outbox_notify: Notify,
    unacked: Mutex<HashMap<String, Instant>>,
    events: broadcast::Sender<LinkEvent>,
    link_tx: Mutex<Option<mpsc::Sender<Bytes>>>,
    requests: Requests,
    handler: Handler,
    inventory: Option<Inventory>,
    counters: Counters,
    endpoint: Option<quinn::Endpoint>,
    shutdown: watch::Sender<bool>,
}

/// The edge hub.
pub struct EdgeHub {
    inner: Arc<EdgeInner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EdgeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHub")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

/// How to build an edge hub besides its config.
#[derive(Default)]
pub struct EdgeOptions {
    /// Receives the cloud's messages (default: acknowledge and drop).
    pub handler: Option<Handler>,
    /// A QUIC client endpoint to share (simulators run thousands of nodes on one socket).
    pub quic_endpoint: Option<quinn::Endpoint>,
    /// What the node holds (object key -> resourceVersion), read at each connect and sent in
    /// the hello, so any cloud core knows what not to send again (see `Hello::held`). Called
    /// on a blocking thread. An error is logged and the hello goes without.
    pub inventory: Option<Inventory>,
}

/// Reads the node's inventory; see [`EdgeOptions::inventory`].
pub type Inventory =
    Arc<dyn Fn() -> Result<HashMap<String, String>, String> + Send + Sync + 'static>;

impl EdgeHub {
    /// Starts the edge hub. The node must have joined.
    pub async fn start(cfg: EdgeConfig, opts: EdgeOptions) -> Result<EdgeHub, TunnelError> {
        let id = Identity::load(&cfg.data_dir)?;
        if !cfg.node_name.is_empty() && cfg.node_name != id.node {
            return Err(TunnelError::Config(format!(
                "node_name is {:?} but the certificate in {} is for {:?}; join again with the new name",
                cfg.node_name,
                cfg.data_dir.display(),
                id.node
            )));
        }
        let path = EdgePaths::new(&cfg.data_dir).outbox;
        let cap = cfg.outbox_capacity;
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(&path, cap))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))??;
        let endpoint = match (cfg.transport, opts.quic_endpoint) {
            (_, Some(ep)) => Some(ep),
            (Transport::Quic, None) => Some(
                quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal address"))
                    .map_err(|e| TunnelError::Connect(format!("QUIC socket: {e}")))?,
            ),
            _ => None,
        };
        let inner = Arc::new(EdgeInner {
            node: id.node,
            cfg,
            outbox: Arc::new(outbox),
            outbox_notify: Notify::new(),
            unacked: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
            link_tx: Mutex::new(None),
            requests: Requests::default(),
            handler: opts
                .handler
                .unwrap_or_else(|| crate::session::handler(|_| async { Ok(None) })),
            inventory: opts.inventory,
            counters: Counters::default(),
            endpoint,
            shutdown: watch::channel(false).0,
        });
        let task = tokio::spawn(run(inner.clone()));
        Ok(EdgeHub { inner, task })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Connection events.
    pub fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.inner.events.subscribe()
    }

    /// Whether a session is up.
    pub fn is_connected(&self) -> bool {
        self.inner.tx().is_some()
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Sends a message to the cloud reliably: stored in the outbox first (so it survives being
    /// offline and restarts), removed when the cloud acknowledges it.
    pub async fn send(&self, mut msg: Message, policy: Policy) -> Result<(), TunnelError> {
        msg.check_size(self.inner.cfg.max_frame_bytes)?;
        msg.no_ack = false;
        let ob = self.inner.outbox.clone();
        tokio::task::spawn_blocking(move || ob.push(&msg, policy))
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))??;
        self.inner.outbox_notify.notify_one();
        Ok(())
    }

    /// Sends a message now without acknowledgement; fails when offline.
    pub async fn send_unacked(&self, mut msg: Message) -> Result<(), TunnelError> {
        msg.check_size(self.inner.cfg.max_frame_bytes)?;
        msg.no_ack = true;
        let tx = self.inner.tx().ok_or(TunnelError::NotConnected)?;
        tx.send(msg.encode())
            .await
            .map_err(|_| TunnelError::NotConnected)
    }

    /// Sends a request to the cloud and waits for the reply. Fails fast when offline.
    pub async fn request(&self, msg: Message, timeout: Duration) -> Result<Message, TunnelError> {
        let rx = self.inner.requests.register(&msg.id);
        let id = msg.id.clone();
        if let Err(e) = self.send_unacked(msg).await {
            self.inner.requests.forget(&id);
            return Err(e);
        }
        self.inner.requests.wait(&id, rx, timeout).await
    }

    /// The edge side's metrics: its counters (`sedge_edge_*_total`), whether it is connected,
    /// and the outbox's depth.
    pub async fn metrics(&self, e: &mut sedge_serve::Exposition) {
        for (name, help, v) in self.counters().described() {
            e.counter(&format!("edge_{name}"), help, v);
        }
        e.gauge(
            "edge_connected",
            "1 while the session to the cloud is up",
            i64::from(self.is_connected()),
        );
        if let Ok(n) = self.outbox_len().await {
            e.gauge(
                "edge_outbox_depth",
                "Messages waiting in the durable outbox for the cloud",
                n as i64,
            );
        }
    }

    /// Messages in the outbox.
    pub async fn outbox_len(&self) -> Result<usize, TunnelError> {
        let ob = self.inner.outbox.clone();
        tokio::task::spawn_blocking(move || ob.len())
            .await
            .map_err(|e| TunnelError::Store(e.to_string()))?
    }

    /// Stops: closes the session; the outbox keeps what was not delivered.
    pub async fn shutdown(self) {
        self.inner.shutdown.send_replace(true);
        let _ = self.task.await;
    }

    /// Tells the link to stop (close the session, stop reconnecting) without waiting for it:
    /// for an owner that cannot take the hub back from everyone holding it.
    pub fn stop(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

impl EdgeInner {
    fn tx(&self) -> Option<mpsc::Sender<Bytes>> {
        self.link_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

fn jitter(d: Duration) -> Duration {
    // Uniform in [d/2, d]: spreads a crowd of nodes reconnecting after a cloud restart.
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

async fn run(inner: Arc<EdgeInner>) {
    let initial = Duration::from_millis(inner.cfg.backoff_initial_ms.max(1));
    let max = Duration::from_millis(inner.cfg.backoff_max_ms.max(1)).max(initial);
    let mut backoff = initial;
    let mut stop = inner.shutdown.subscribe();
    // The hub addresses in turn: a failed one moves on to the next; once every one failed in a
    // row, the back-off applies.
    let addresses = inner.cfg.cloud_addresses();
    let (mut at, mut failed_in_a_row) = (0usize, 0usize);
    while !inner.stopping() {
        let addr = addresses
            .get(at % addresses.len().max(1))
            .cloned()
            .unwrap_or_else(|| inner.cfg.cloud.clone());
        let established = match Identity::load(&inner.cfg.data_dir) {
            Err(e) => {
                tracing::error!(error = %e, "cannot load the node credentials");
                false
            }
            Ok(mut id) => {
                if id.expired() {
                    tracing::error!(node = %inner.node, expired = id.not_after, "the node certificate has expired; the cloud will refuse it. Join again with a new token: `sedge join --token ...`");
                } else if unix_secs() >= id.renew_at(inner.cfg.rotate_after_fraction) {
                    match renew(&inner.cfg).await {
                        Ok(new) => {
                            Counters::inc(&inner.counters.certificates_issued);
                            id = new;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "certificate renewal failed; will retry")
                        }
                    }
                }
                // The hello is ready before the dial: the hub gives a new link
                // `handshake_timeout_ms` to say hello, and reading the node's store can wait
                // behind its other disk work (measured at 10,000 nodes: thousands of sessions
                // refused for "no hello in time", each a full reconnect).
                let hello = hello(&inner).await;
                match connect(&inner, &id, &addr).await {
                    // Stopped while connecting: no session (it would take the node's from
                    // whoever runs the node now).
                    Ok(_) if inner.stopping() => false,
                    Ok(link) => session(&inner, link, &id, hello).await,
                    Err(e) => {
                        tracing::warn!(node = %inner.node, cloud = %addr, transport = ?inner.cfg.transport, error = %e, retry_in = ?backoff, "connecting to the cloud failed");
                        false
                    }
                }
            }
        };
        if established {
            backoff = initial;
            failed_in_a_row = 0;
        } else {
            failed_in_a_row += 1;
            at += 1;
            if failed_in_a_row % addresses.len().max(1) != 0 {
                // Another hub of the cluster to try: at once.
                continue;
            }
        }
        let wait = jitter(backoff);
        backoff = (backoff * 2).min(max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::stopped(&mut stop) => {}
        }
    }
}

async fn connect(inner: &Arc<EdgeInner>, id: &Identity, addr: &str) -> Result<Link, TunnelError> {
    let cfg = &inner.cfg;
    let host = crate::config::host_of(addr);
    let name = ServerName::try_from(host.clone())
        .map_err(|e| TunnelError::Config(format!("cloud host {host:?}: {e}")))?;
    let identity = Some((id.cert_pem.as_str(), id.key_pem.as_str()));
    match cfg.transport {
        Transport::Websocket => {
            let tls_cfg = tls::edge_client_config(&id.ca_pem, identity, false)?;
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .map_err(|_| TunnelError::Connect("TCP connect timed out".into()))?
            .map_err(|e| TunnelError::Connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let remote = tcp
                .peer_addr()
                .map_err(|e| TunnelError::Connect(e.to_string()))?;
            let hs = async {
                let stream = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| TunnelError::Tls(e.to_string()))?;
                let url = format!("wss://{addr}/v1/tunnel");
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    url,
                    stream,
                    Some(link::ws_config(cfg.max_frame_bytes)),
                )
                .await
                .map_err(|e| TunnelError::Connect(format!("WebSocket: {e}")))?;
                Ok::<_, TunnelError>(ws)
            };
            let ws = tokio::time::timeout(Duration::from_secs(15), hs)
                .await
                .map_err(|_| TunnelError::Connect("TLS/WebSocket handshake timed out".into()))??;
            Ok(link::websocket(ws, remote))
        }
        Transport::Quic => {
            let ep = inner
                .endpoint
                .clone()
                .ok_or_else(|| TunnelError::Config("no QUIC endpoint".into()))?;
            let addr = tokio::net::lookup_host(cfg.quic_address())
                .await
                .map_err(|e| TunnelError::Connect(format!("{}: {e}", cfg.quic_address())))?
                .next()
                .ok_or_else(|| {
                    TunnelError::Connect(format!("{}: no address", cfg.quic_address()))
                })?;
            let tls_cfg = tls::edge_client_config(&id.ca_pem, identity, true)?;
            let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg)
                .map_err(|e| TunnelError::Tls(e.to_string()))?;
            let mut cc = quinn::ClientConfig::new(Arc::new(qc));
            let mut tc = quinn::TransportConfig::default();
            tc.keep_alive_interval(Some(cfg.keepalive()))
                .max_idle_timeout(quinn::IdleTimeout::try_from(cfg.dead_after()).ok());
            cc.transport_config(Arc::new(tc));
            let hs = async {
                let conn = ep
                    .connect_with(cc, addr, &host)
                    .map_err(|e| TunnelError::Connect(e.to_string()))?
                    .await
                    .map_err(|e| TunnelError::Connect(format!("QUIC: {e}")))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| TunnelError::Connect(e.to_string()))?;
                Ok::<_, TunnelError>(link::quic(conn, send, recv, cfg.max_frame_bytes))
            };
            tokio::time::timeout(Duration::from_secs(15), hs)
                .await
                .map_err(|_| TunnelError::Connect("QUIC handshake timed out".into()))?
        }
    }
}

/// The hello of the next session, with the node's inventory read now.
async fn hello(inner: &Arc<EdgeInner>) -> Message {
    let node = inner.node.clone();
    let held = match inner.inventory.clone() {
        None => None,
        Some(read) => match tokio::task::spawn_blocking(move || read()).await {
            Ok(Ok(held)) => Some(held),
            Ok(Err(e)) => {
                tracing::warn!(%node, error = %e, "cannot read what the node holds; connecting without an inventory");
                None
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "reading the inventory failed");
                None
            }
        },
    };
    let hello = Hello { node, held };
    control(op::HELLO, serde_json::to_vec(&hello).unwrap_or_default())
}

/// Runs one session; returns whether it was established.
async fn session(inner: &Arc<EdgeInner>, mut link: Link, id: &Identity, hello: Message) -> bool {
    let node = inner.node.clone();
    if link.tx.send(hello.encode()).await.is_err() {
        return false;
    }
    let welcome = tokio::time::timeout(Duration::from_secs(15), link.rx.recv()).await;
    match welcome {
        Ok(Some(Ok(m))) if m.route.operation == op::WELCOME => {
            let w: Option<Welcome> = serde_json::from_slice(&m.content).ok();
            tracing::debug!(session = ?w.map(|w| w.session), "welcomed");
        }
        Ok(Some(Ok(m))) if m.route.operation == op::ERROR => {
            tracing::error!(%node, reason = %String::from_utf8_lossy(&m.content), "the cloud refused the session");
            return false;
        }
        other => {
            let why = match other {
                Err(_) => "no welcome in time".to_string(),
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => "closed".into(),
                Ok(Some(Ok(m))) => format!("unexpected {}", m.route.operation),
            };
            tracing::warn!(%node, reason = %why, "session setup failed (a refused certificate shows here as a closed connection; the cloud logs the reason)");
            return false;
        }
    }
    *inner.link_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.tx.clone());
    Counters::inc(&inner.counters.sessions_opened);
    tracing::info!(%node, remote = %link.remote, transport = ?link.transport, "connected to the cloud");
    let _ = inner.events.send(LinkEvent::Connected {
        node: node.clone(),
        transport: link.transport,
        remote: link.remote,
    });
    let (closed_tx, closed_rx) = watch::channel(false);
    let flusher = tokio::spawn(flush_outbox(inner.clone(), link.tx.clone(), closed_rx));
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
    let renew_at = id.renew_at(inner.cfg.rotate_after_fraction);
    let reason = loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => break "shutting down".to_string(),
            _ = tick.tick() => {
                if last_seen.elapsed() > dead_after {
                    break format!("no traffic from the cloud for {dead_after:?} (dead peer)");
                }
                if unix_secs() >= renew_at {
                    break "certificate due for renewal".to_string();
                }
                let _ = link.tx.try_send(control(op::KEEPALIVE, "ping").encode());
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
                        break end.to_string();
                    }
                    None => break "closed".to_string(),
                };
                last_seen = Instant::now();
                if m.route.group == HUB_GROUP {
                    if m.route.operation == op::ACK {
                        Counters::inc(&inner.counters.acks_received);
                        outbox_done(inner, &m.parent_id).await;
                    }
                    continue;
                }
                Counters::inc(&inner.counters.messages_received);
                if !m.parent_id.is_empty()
                    && matches!(m.route.operation.as_str(), op::RESPONSE | op::ERROR | op::REFUSED)
                {
                    if m.route.operation == op::REFUSED {
                        // A permanent refusal of something from the outbox: never retried.
                        tracing::error!(%node, resource = %m.route.resource, reason = %String::from_utf8_lossy(&m.content), "the cloud refused a message");
                        outbox_done(inner, &m.parent_id).await;
                    }
                    inner.requests.complete(m);
                    continue;
                }
                if work_tx.send(m).await.is_err() {
                    break "handler stopped".into();
                }
            }
        }
    };
    let _ = closed_tx.send(true);
    *inner.link_tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
    drop(work_tx);
    let _ = worker.await;
    let _ = flusher.await;
    inner.requests.fail_all();
    inner
        .unacked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    Counters::inc(&inner.counters.sessions_closed);
    tracing::info!(%node, %reason, "disconnected from the cloud");
    let _ = inner.events.send(LinkEvent::Disconnected { node, reason });
    true
}

async fn outbox_done(inner: &Arc<EdgeInner>, id: &str) {
    let known = inner
        .unacked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id)
        .is_some();
    if known {
        let ob = inner.outbox.clone();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || ob.remove(&id)).await;
        inner.outbox_notify.notify_one();
    }
}

/// Sends the outbox in order, a window at a time; resends everything unacknowledged when
/// acknowledgements stop coming for `ack_timeout`.
async fn flush_outbox(
    inner: Arc<EdgeInner>,
    tx: mpsc::Sender<Bytes>,
    mut closed: watch::Receiver<bool>,
) {
    const WINDOW: usize = 256;
    let ack_timeout = Duration::from_millis(inner.cfg.ack_timeout_ms.max(1));
    let mut cursor = 0i64;
    loop {
        let room = WINDOW.saturating_sub(
            inner
                .unacked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
        );
        if room > 0 {
            let ob = inner.outbox.clone();
            let rows = tokio::task::spawn_blocking(move || ob.after(cursor, room)).await;
            let rows = match rows {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading the outbox failed");
                    Vec::new()
                }
                Err(_) => return,
            };
            for (seq, m) in rows {
                cursor = seq;
                inner
                    .unacked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(m.id.clone(), Instant::now());
                if tx.send(m.encode()).await.is_err() {
                    return;
                }
                Counters::inc(&inner.counters.messages_sent);
            }
        }
        // Nothing unacknowledged: nothing can time out, so wait for the outbox to be written
        // (before, an idle session read the outbox every `ack_timeout` all the same).
        let idle = inner
            .unacked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        tokio::select! {
            _ = inner.outbox_notify.notified() => {}
            _ = tokio::time::sleep(ack_timeout), if !idle => {
                let mut un = inner.unacked.lock().unwrap_or_else(|p| p.into_inner());
                if un.values().any(|t| t.elapsed() >= ack_timeout) {
                    let n = un.len() as u64;
                    un.clear();
                    cursor = 0;
                    inner.counters.retries.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ = closed.changed() => return,
        }
    }
}
