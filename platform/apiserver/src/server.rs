//! Start-up and serving: the store, the CA and serving certificate, tokens, the admin kubeconfig,
//! the TLS accept loop (HTTP/1.1 and HTTP/2), and the garbage collector.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::auth::{AuthError, Authenticator, Identity, PeerIdentity, random_token};
use crate::config::ApiServerConfig;
use crate::http::{App, router};
use crate::metrics::Metrics;
use crate::ops::{self, Core};
use crate::registry::Registry;
use crate::store::{Store, StoreConfig, StoreError};
use sedge_pki::{Ca, IssueRequest, PkiError, Usage};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificates could not be loaded or issued.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The token file is unreadable or malformed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The listen address is malformed or taken.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A file around the server could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The ServiceAccount signing key.
    #[error(transparent)]
    SaKey(#[from] crate::satoken::KeyError),
    /// Seeding the built-in namespaces failed.
    #[error("cannot create the default namespaces: {0}")]
    Seed(String),
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The admin kubeconfig written at start.
    pub kubeconfig: PathBuf,
    /// `https://host:port`.
    pub url: String,
    /// The admin bearer token.
    pub admin_token: String,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The verbs, for in-process callers and tests.
    pub core: Arc<Core>,
    watch_budget: Arc<crate::watch::WatchBudget>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The server's own runtime, when started with [`ApiServer::start_isolated`].
    runtime: Option<tokio::runtime::Runtime>,
    /// What serves every request, for [`ApiServer::local_service`].
    router: axum::Router,
    /// Where requests are served.
    handle: tokio::runtime::Handle,
}

const ADMIN_USER: &str = "sedge-admin";

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn load_tokens(cfg: &ApiServerConfig) -> Result<(Authenticator, String), StartError> {
    let path = cfg
        .token_file
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("tokens.csv"));
    if !path.exists() {
        let token = random_token();
        let text = format!(
            "# token,user,uid,\"groups\" (kube-apiserver --token-auth-file format)\n{token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"
        );
        sedge_pki::write_file(&path, &text, true)?;
    }
    let auth = Authenticator::load(&path)?;
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    // The admin token is the first one for the admin user, whatever else the file holds.
    let admin = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find(|l| l.split(',').nth(1) == Some(ADMIN_USER))
        .and_then(|l| l.split(',').next())
        .unwrap_or_default()
        .to_string();
    Ok((auth, admin))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Writes a kubeconfig with two users for the same cluster: a bearer token (context `sedge`, the
/// default) and a client certificate (context `sedge-cert`).
fn write_kubeconfig(
    path: &std::path::Path,
    url: &str,
    ca_pem: &str,
    token: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), StartError> {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sedge", "cluster": {"server": url, "certificate-authority-data": b64(ca_pem)}}],
        "users": [
            {"name": ADMIN_USER, "user": {"token": token}},
            {"name": format!("{ADMIN_USER}-cert"), "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}
        ],
        "contexts": [
            {"name": "sedge", "context": {"cluster": "sedge", "user": ADMIN_USER, "namespace": "default"}},
            {"name": "sedge-cert", "context": {"cluster": "sedge", "user": format!("{ADMIN_USER}-cert"), "namespace": "default"}}
        ],
        "current-context": "sedge",
        "preferences": {},
    });
    write_yaml(path, &doc)
}

/// Writes a kubeconfig document (it holds credentials: mode 0600).
fn write_yaml(path: &std::path::Path, doc: &serde_json::Value) -> Result<(), StartError> {
    let yaml = serde_yaml::to_string(doc).map_err(|e| StartError::Io {
        path: path.into(),
        source: std::io::Error::other(e),
    })?;
    sedge_pki::write_file(path, &yaml, true)?;
    Ok(())
}

impl ApiServer {
    /// Opens the store, prepares certificates and tokens, binds, and starts serving.
    pub async fn start(cfg: ApiServerConfig) -> Result<ApiServer, StartError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(io_err(&cfg.data_dir))?;
        let store_cfg = StoreConfig {
            path: cfg.data_dir.join("state.db"),
            history: cfg.history_events,
            history_seconds: cfg.history_seconds,
            history_max_events: cfg.history_max_events,
            durability: cfg.durability,
        };
        let store = tokio::task::spawn_blocking(move || Store::open(&store_cfg))
            .await
            .map_err(|e| StartError::Seed(e.to_string()))??;
        let core = Arc::new(Core {
            store: Arc::new(store),
            registry: Registry::default(),
            pod_logs: Default::default(),
            pod_exec: Default::default(),
            authz: Default::default(),
            gc_sweeps: Default::default(),
        });
        {
            let c = core.clone();
            tokio::task::spawn_blocking(move || {
                ops::refresh_crds(&c);
                ops::ensure_default_namespaces(&c)?;
                ops::ensure_bootstrap_policy(&c)
            })
            .await
            .map_err(|e| StartError::Seed(e.to_string()))?
            .map_err(|e| StartError::Seed(e.to_string()))?;
        }

        let listener =
            TcpListener::bind(&cfg.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: cfg.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        let host = cfg.advertise_address.clone().unwrap_or_else(|| {
            if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            }
        });
        let url = if host.contains(':') {
            format!("https://[{host}]:{}", addr.port())
        } else {
            format!("https://{host}:{}", addr.port())
        };

        let pki_dir = cfg.data_dir.join("pki");
        let ca = Ca::load_or_create(&pki_dir, "sedge-ca")?;
        let (cert_pem, key_pem) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(c), Some(k)) => (
                std::fs::read_to_string(c).map_err(io_err(c))?,
                std::fs::read_to_string(k).map_err(io_err(k))?,
            ),
            _ => {
                let mut sans = vec![
                    "localhost".to_string(),
                    "127.0.0.1".into(),
                    "::1".into(),
                    host.clone(),
                ];
                if !addr.ip().is_unspecified() {
                    sans.push(addr.ip().to_string());
                }
                sans.extend(cfg.extra_sans.iter().cloned());
                sans.sort();
                sans.dedup();
                let issued = ca.issue(&IssueRequest {
                    common_name: "sedge-apiserver".into(),
                    organizations: vec![],
                    sans,
                    usage: Usage::Server,
                    valid_for: Duration::from_secs(365 * 86400),
                })?;
                sedge_pki::write_file(&pki_dir.join("apiserver.crt"), &issued.cert_pem, false)?;
                sedge_pki::write_file(&pki_dir.join("apiserver.key"), &issued.key_pem, true)?;
                (issued.cert_pem, issued.key_pem)
            }
        };
        let mut client_cas = ca.cert_pem().to_string();
        if let Some(extra) = &cfg.client_ca_file {
            client_cas.push_str(&std::fs::read_to_string(extra).map_err(io_err(extra))?);
        }
        let tls = sedge_pki::server_config(&cert_pem, &key_pem, Some(&client_cas), false)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (auth, admin_token) = load_tokens(&cfg)?;
        let sa_tokens = Arc::new(crate::satoken::ServiceAccountTokens::load_or_create(
            &cfg.data_dir.join("sa.key"),
        )?);
        let admin_cert = ca.issue(&IssueRequest {
            common_name: ADMIN_USER.into(),
            organizations: vec!["system:masters".into()],
            sans: vec![],
            usage: Usage::Client,
            valid_for: Duration::from_secs(365 * 86400),
        })?;
        let kubeconfig = cfg
            .kubeconfig
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("kubeconfig"));
        write_kubeconfig(
            &kubeconfig,
            &url,
            ca.cert_pem(),
            &admin_token,
            &admin_cert.cert_pem,
            &admin_cert.key_pem,
        )?;

        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let watch_budget = Arc::new(crate::watch::WatchBudget::default());
        let app = Arc::new(App {
            core: core.clone(),
            auth,
            sa_tokens,
            max_body: cfg.max_request_bytes,
            bookmark_interval: Duration::from_secs(cfg.bookmark_interval_seconds.max(1)),
            watch_timeout: Duration::from_secs(cfg.watch_timeout_seconds.max(1)),
            server_address: format!("{host}:{}", addr.port()),
            shutdown: shutdown_rx.clone(),
            metrics: Metrics::default(),
            watch_budget: watch_budget.clone(),
            slow_watch_grace: Duration::from_secs(cfg.slow_watch_grace_seconds.max(1)),
            watches: Default::default(),
            log_follows: Default::default(),
        });
        let gc = tokio::spawn(crate::gc::run(core.clone(), shutdown_rx.clone()));
        let limits = ConnLimits {
            max: cfg.max_connections.max(1),
            header_timeout: Duration::from_secs(cfg.header_timeout_seconds.max(1)),
        };
        let router = router(app);
        let serve = tokio::spawn(accept_loop(
            listener,
            acceptor,
            router.clone(),
            limits,
            shutdown_rx,
        ));
        tracing::info!(%url, kubeconfig = %kubeconfig.display(), "API server listening");
        Ok(ApiServer {
            addr,
            kubeconfig,
            url,
            admin_token,
            ca_pem: ca.cert_pem().to_string(),
            core,
            watch_budget,
            shutdown,
            tasks: vec![gc, serve],
            runtime: None,
            router,
            handle: tokio::runtime::Handle::current(),
        })
    }

    /// Starts the server on a runtime of its own (`threads` workers, and its own blocking
    /// pool), so that whatever a request costs, the caller's runtime (the hub's keepalives, the
    /// controllers) is not the one that waits. `sedge up` and `sedge cloud --embedded` start it
    /// this way.
    pub async fn start_isolated(
        cfg: ApiServerConfig,
        threads: usize,
    ) -> Result<ApiServer, StartError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("apiserver")
            .enable_all()
            .build()
            .map_err(|source| StartError::Io {
                path: cfg.data_dir.clone(),
                source,
            })?;
        let started = rt.spawn(ApiServer::start(cfg)).await;
        match started {
            Ok(Ok(mut server)) => {
                server.runtime = Some(rt);
                Ok(server)
            }
            Ok(Err(e)) => {
                rt.shutdown_background();
                Err(e)
            }
            Err(e) => {
                rt.shutdown_background();
                Err(StartError::Seed(format!(
                    "the API server's runtime failed: {e}"
                )))
            }
        }
    }

    /// A client transport to this server in memory, as `user` in `groups` (the identity a client
    /// certificate with CN `user` and O `groups` would prove): see [`crate::local`]. `sedge up`
    /// gives its components their own identities this way, not the administrator's.
    pub fn local_service(&self, user: &str, groups: &[&str]) -> crate::local::LocalService {
        crate::local::LocalService::new(self.router.clone(), user, groups, self.handle.clone())
    }

    /// What the watchers have queued for their clients, and how many were closed as too slow.
    pub fn watch_budget(&self) -> Arc<crate::watch::WatchBudget> {
        self.watch_budget.clone()
    }

    /// Stops accepting, ends watches and connections, and waits for the tasks.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime blocks; from inside another runtime it must not.
            rt.shutdown_background();
        }
        // Connections and calls on the blocking pool that are still ending hold the store (and
        // its lock file) a moment longer: a server started next on the same data would find
        // it locked. Wait for them, a bounded time.
        let store = Arc::downgrade(&self.core.store);
        drop(self);
        let t0 = std::time::Instant::now();
        while store.strong_count() > 0 {
            if t0.elapsed() > Duration::from_secs(5) {
                tracing::warn!("the API server's store is still in use 5 s after shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Bounds on the listener.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    max: usize,
    header_timeout: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    let admission = sedge_serve::Admission::new(limits.max, Arc::default());
    loop {
        tokio::select! {
            // At the cap the oldest connection that has sent nothing makes room (idle sockets
            // cannot lock clients out); with every slot busy the newest is closed, so the ones
            // already served (nodes' controllers, kubectl) keep working.
            (tcp, peer, ticket) = sedge_serve::accept(&listener, &admission) => {
                let acceptor = acceptor.clone();
                let app = app.clone();
                let mut stop = shutdown.clone();
                conns.spawn(async move {
                    let started = tokio::time::Instant::now();
                    let Some(_admitted) = ticket.first_byte(&tcp, limits.header_timeout).await else {
                        return;
                    };
                    let left = limits.header_timeout.saturating_sub(started.elapsed());
                    let tls = match tokio::time::timeout(left, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| sedge_pki::identity(c).ok())
                        .map(|(user, groups, _)| Identity { user, groups });
                    let peer_id = PeerIdentity(identity);
                    let svc = app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(peer_id.clone());
                        req
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(limits.header_timeout);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc));
                    let abort = Arc::new(tokio::sync::Notify::new());
                    let conn = crate::watch::CONN_ABORT.scope(abort.clone(), conn);
                    tokio::select! {
                        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with an error") },
                        _ = stop.changed() => {}
                        _ = abort.notified() => tracing::debug!(%peer, "connection dropped: its watch client does not read"),
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    conns.shutdown().await;
}
