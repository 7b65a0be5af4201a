//! The edge agent (`sedge edge`): the channel's edge hub, the meta manager (SQLite), edged (a
//! lightweight kubelet with a process runtime), the local MetaServer, and an extension point for
//! edge modules.
//!
//! Message flow: the cloud sends objects (group `meta`) which the meta manager writes to SQLite
//! *before* the channel acknowledges them; edged runs what the store holds; reports (node
//! registration and status, lease, pod status, events) go into the edge hub's durable outbox and
//! reach the cloud whenever the link is up. See `sedge_api` for the message contract.
//!
//! # Edge modules
//! Anything that needs to run on the node next to edged plugs in as an [`EdgeModule`]: it
//! claims a message group, gets the messages of that group from the cloud, and may send reports
//! upstream and read the local store through its [`ModuleContext`]. The AI layer's edge module
//! uses this; the platform knows nothing about it.

pub mod config;
pub mod cri;
pub mod edged;
pub mod exec;
pub mod hollow;
pub mod lifecycle;
pub mod metaserver;
pub mod oci;
pub mod podcheck;
mod podrun;
pub mod podtoken;
pub mod portforward;
pub mod probe;
pub mod reports;
pub mod resolve;
pub mod runtime;
pub mod services;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sedge_api::{
    ExecRequest, Key, LeaseReport, LogRequest, PortForwardRequest, StreamOpen, group, kind,
};
use sedge_tunnel::stream::{self, Streams};
use sedge_tunnel::{EdgeHub, EdgeOptions, Incoming, LinkEvent, Message, Policy, op};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub use config::{EdgeCoreConfig, ImageEntry};
pub use edged::Edged;
pub use store::MetaStore;

/// Errors of the edge agent.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The channel.
    #[error(transparent)]
    Tunnel(#[from] sedge_tunnel::TunnelError),
    /// The local store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The MetaServer could not bind.
    #[error("MetaServer on {addr}: {source}")]
    MetaServer {
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The container runtime is not usable (`runtime: cri` and its socket does not answer).
    #[error("container runtime: {0}")]
    Runtime(String),
    /// The metrics endpoint could not bind.
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
}

/// What an edge module gets to work with.
#[derive(Clone)]
pub struct ModuleContext {
    /// This node's name.
    pub node: String,
    /// The local store (read what the cloud sent; subscribe to changes).
    pub store: Arc<MetaStore>,
    reports: edged::Reports,
    hub: Arc<std::sync::OnceLock<Arc<EdgeHub>>>,
    pod_tokens: Arc<podtoken::PodTokens>,
    streams: Streams,
}

impl ModuleContext {
    /// Whether `token` is the [`podtoken`] of the pod `namespace/name` on this node: how a
    /// node-local endpoint knows a request comes from that pod.
    pub fn verify_pod_token(&self, namespace: &str, name: &str, token: &str) -> bool {
        let uid = self
            .store
            .get(sedge_api::kind::POD, namespace, name)
            .ok()
            .flatten()
            .and_then(|p| p["metadata"]["uid"].as_str().map(String::from))
            .unwrap_or_default();
        self.pod_tokens.verify(&uid, token)
    }

    /// Sends a report upstream through the durable outbox.
    pub fn send(&self, msg: Message, policy: Policy) {
        self.reports.send((msg, policy));
    }

    fn hub(&self) -> Result<&Arc<EdgeHub>, sedge_tunnel::TunnelError> {
        self.hub
            .get()
            .ok_or(sedge_tunnel::TunnelError::NotConnected)
    }

    /// Sends a message now, without the outbox and without waiting for an acknowledgement
    /// (streamed data); fails while the link is down. Messages sent this way reach the cloud in
    /// order.
    pub async fn send_now(&self, msg: Message) -> Result<(), sedge_tunnel::TunnelError> {
        self.hub()?.send_unacked(msg).await
    }

    /// Sends a request to the cloud and waits for its reply.
    pub async fn request(
        &self,
        msg: Message,
        timeout: Duration,
    ) -> Result<Message, sedge_tunnel::TunnelError> {
        self.hub()?.request(msg, timeout).await
    }

    /// Whether the link to the cloud is up.
    pub fn connected(&self) -> bool {
        self.hub.get().is_some_and(|h| h.is_connected())
    }
}

/// A module plugged into the edge agent.
pub trait EdgeModule: Send + Sync {
    /// The message group it handles (must not be `meta`, `edged` or `cloud`).
    fn group(&self) -> &str;
    /// Called once at start.
    fn start(&self, _ctx: ModuleContext) {}
    /// Called once when the agent shuts down: stop what `start` spawned (servers, loops), so an
    /// agent stopped and started again in one process does not run two of them.
    fn stop(&self) {}
    /// Handles a message of its group from the cloud. `Ok` acknowledges it (persist first if it
    /// must survive a restart); `Ok(Some(reply))` also replies.
    fn handle(
        &self,
        ctx: &ModuleContext,
        msg: Message,
    ) -> BoxFuture<'static, Result<Option<Message>, String>>;
}

/// A running edge agent.
pub struct EdgeCore {
    /// The channel's edge hub.
    pub hub: Arc<EdgeHub>,
    /// The local store.
    pub store: Arc<MetaStore>,
    /// Edged.
    pub edged: Arc<Edged>,
    /// Where the MetaServer listens, when enabled.
    pub metaserver: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when enabled.
    pub metrics: Option<SocketAddr>,
    node: String,
    tasks: Vec<JoinHandle<()>>,
    modules: Vec<Arc<dyn EdgeModule>>,
}

impl std::fmt::Debug for EdgeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeCore")
            .field("node", &self.node)
            .finish()
    }
}

/// The IP this machine uses to reach `cloud` (no packet is sent).
fn route_ip(cloud: &str) -> Option<String> {
    use std::net::ToSocketAddrs;
    let target = cloud.to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(target).ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

fn node_object(cfg: &EdgeCoreConfig, node: &str, ip: &str, runtime: &str) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_else(|| "0".into());
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let resources =
        json!({"cpu": cpus.to_string(), "memory": format!("{mem_kib}Ki"), "pods": "110"});
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cond = |t: &str, status: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let mut labels: serde_json::Map<String, Value> = cfg
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let role = cfg.labels.get(sedge_api::ROLE_LABEL).map(String::as_str);
    labels.insert(sedge_api::role_label(role), json!(""));
    labels.insert(sedge_api::AGENT_LABEL.into(), json!(""));
    labels.insert("kubernetes.io/arch".into(), json!(arch));
    if cfg.runtime == config::RuntimeKind::Hollow {
        labels.insert(hollow::LABEL.into(), json!("true"));
    }
    json!({
        "metadata": {"name": node, "labels": labels},
        "status": {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": node}],
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "sedge edged is posting ready status"),
            ],
            "nodeInfo": {
                "machineID": read("/etc/machine-id"), "systemUUID": "", "bootID": read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": read("/proc/sys/kernel/osrelease"), "osImage": "Linux",
                "containerRuntimeVersion": runtime, "kubeletVersion": "v1.33.0-sedge",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch,
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }
    })
}

impl EdgeCore {
    /// Starts the agent: store, edged (which rebuilds pods from the store at once, cloud or
    /// not), the edge hub, reports, and the MetaServer. The node must have joined.
    pub async fn start(
        cfg: EdgeCoreConfig,
        modules: Vec<Arc<dyn EdgeModule>>,
    ) -> Result<EdgeCore, EdgeError> {
        let id = sedge_tunnel::edge::Identity::load(&cfg.tunnel.data_dir)?;
        let node = id.node.clone();
        if !cfg.tunnel.node_name.is_empty() && cfg.tunnel.node_name != node {
            return Err(EdgeError::Config(format!(
                "node_name is {:?} but {} holds the identity of {node:?}",
                cfg.tunnel.node_name,
                cfg.tunnel.data_dir.display()
            )));
        }
        for m in &modules {
            if [group::META, group::EDGED, group::CLOUD, stream::GROUP].contains(&m.group()) {
                return Err(EdgeError::Config(format!(
                    "an edge module may not claim the built-in group {:?}",
                    m.group()
                )));
            }
        }
        // Settings first: a bad one leaves nothing on disk.
        podcheck::allowlist(&cfg.host_path_allow).map_err(EdgeError::Config)?;
        let data = cfg.tunnel.data_dir.clone();
        let db = data.join("meta.db");
        let store = Arc::new(
            tokio::task::spawn_blocking(move || MetaStore::open(&db))
                .await
                .map_err(|e| EdgeError::Config(e.to_string()))??,
        );
        let ip = if cfg.node_ip.is_empty() {
            route_ip(&cfg.tunnel.cloud).unwrap_or_else(|| "127.0.0.1".into())
        } else {
            cfg.node_ip.clone()
        };
        let self_exe = if cfg.sedge_binary.as_os_str().is_empty() {
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("sedge"))
        } else {
            cfg.sedge_binary.clone()
        };
        let runtime: Arc<dyn runtime::Runtime> = match cfg.runtime {
            config::RuntimeKind::Process => {
                Arc::new(runtime::ProcessRuntime::new(cfg.images.clone(), self_exe))
            }
            config::RuntimeKind::Cri => Arc::new(
                cri::CriRuntime::connect(cri::CriSettings {
                    socket: cfg.cri_socket.clone(),
                    node: node.clone(),
                    poll_interval: Duration::from_millis(cfg.sync_interval_ms.clamp(100, 1000)),
                    pod_network: cfg.cri_pod_network,
                    allow_privileged: cfg.cri_allow_privileged,
                })
                .await
                .map_err(EdgeError::Runtime)?,
            ),
            config::RuntimeKind::Hollow => Arc::new(hollow::HollowRuntime::default()),
        };
        let pod_tokens =
            Arc::new(podtoken::PodTokens::load_or_create(&data).map_err(|e| {
                EdgeError::Config(format!("pod tokens in {}: {e}", data.display()))
            })?);
        let reports: edged::Reports = Arc::default();
        let facts = resolve::NodeFacts {
            node: node.clone(),
            ip: ip.clone(),
            pod_ip: None,
        };
        let edged = Edged::start(
            store.clone(),
            runtime.clone(),
            facts,
            edged::EdgedSettings {
                pods_dir: data.join("pods"),
                sync_interval: Duration::from_millis(cfg.sync_interval_ms.max(10)),
                backoff_initial: Duration::from_millis(cfg.backoff_initial_ms),
                backoff_max: Duration::from_millis(cfg.backoff_max_ms),
                backoff_reset: Duration::from_millis(cfg.backoff_reset_ms),
                max_log_bytes: cfg.max_log_bytes,
                max_grace: Duration::from_secs(cfg.max_grace_seconds),
                host_path_allow: cfg.host_path_allow.clone(),
                pod_tokens: pod_tokens.clone(),
            },
            reports.clone(),
        );
        let ctx = ModuleContext {
            node: node.clone(),
            store: store.clone(),
            reports: reports.clone(),
            hub: Arc::new(std::sync::OnceLock::new()),
            pod_tokens: pod_tokens.clone(),
            streams: Streams::default(),
        };
        let modules: HashMap<String, Arc<dyn EdgeModule>> = modules
            .into_iter()
            .map(|m| (m.group().to_string(), m))
            .collect();
        for m in modules.values() {
            m.start(ctx.clone());
        }
        let started: Vec<Arc<dyn EdgeModule>> = modules.values().cloned().collect();
        let handler = {
            let (store, edged, ctx) = (store.clone(), edged.clone(), ctx.clone());
            sedge_tunnel::handler(move |i: Incoming| {
                let (store, edged, ctx, modules) =
                    (store.clone(), edged.clone(), ctx.clone(), modules.clone());
                async move { route(i, &store, &edged, &ctx, &modules).await }
            })
        };
        let hub = Arc::new(
            EdgeHub::start(
                cfg.tunnel.clone(),
                EdgeOptions {
                    handler: Some(handler),
                    quic_endpoint: None,
                    inventory: Some({
                        let store = store.clone();
                        Arc::new(move || store.inventory().map_err(|e| e.to_string()))
                    }),
                },
            )
            .await?,
        );
        let _ = ctx.hub.set(hub.clone());
        let mut tasks = Vec::new();
        // The node's service proxy: Services by their address, connections through the cloud.
        tasks.push(tokio::spawn(services::run(ctx.clone())));
        // Exec streams do not outlive the link they ride on: their commands are killed.
        {
            let (mut links, streams) = (hub.subscribe(), ctx.streams.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    match links.recv().await {
                        Ok(LinkEvent::Disconnected { reason, .. }) => {
                            streams.close_all(&format!("the link to the cloud dropped: {reason}"))
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        {
            let (hub, reports) = (hub.clone(), reports.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let (msg, policy) = reports.recv().await;
                    if let Err(e) = hub.send(msg, policy).await {
                        tracing::warn!(error = %e, "report not queued");
                    }
                }
            }));
        }
        // Registration, status and lease heartbeats; sent again at once on every reconnect.
        {
            let (hub, node, reports, store, ip) = (
                hub.clone(),
                node.clone(),
                reports.clone(),
                store.clone(),
                ip.clone(),
            );
            let version = runtime.version();
            let cfg = cfg.clone();
            tasks.push(tokio::spawn(async move {
                let mut links = hub.subscribe();
                let mut status_tick = tokio::time::interval(Duration::from_millis(
                    cfg.node_status_interval_ms.max(100),
                ));
                let mut lease_tick =
                    tokio::time::interval(Duration::from_millis(cfg.lease_interval_ms.max(100)));
                let node_message = |op_: &str, k: &str, body: Value| {
                    let key = Key::new(None, k, &node);
                    Message::new(group::CLOUD, op_, &key.to_string(), body.to_string())
                };
                let send_node = |op_: &str, k: &str, body: Value| {
                    reports.send((node_message(op_, k, body), Policy::LatestWins));
                };
                let mut first = true;
                loop {
                    let mut status = false;
                    let mut lease = false;
                    tokio::select! {
                        _ = status_tick.tick() => status = true,
                        _ = lease_tick.tick() => lease = true,
                        ev = links.recv() => match ev {
                            Ok(LinkEvent::Connected { .. }) => { status = true; lease = true; }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                            Err(_) => {}
                        },
                    }
                    if status {
                        let obj = node_object(&cfg, &node, &ip, &version);
                        let rv = chrono::Utc::now().timestamp_millis().to_string();
                        let _ = store.upsert(kind::NODE, sedge_api::CLUSTER_NS, &node, &rv, &obj);
                        if first {
                            send_node(op::INSERT, kind::NODE, obj);
                            first = false;
                        } else {
                            send_node(op::UPDATE, kind::NODE_STATUS, obj["status"].clone());
                        }
                    }
                    if lease {
                        let r = LeaseReport {
                            renew_time: chrono::Utc::now()
                                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                            duration_seconds: cfg.lease_duration_seconds,
                        };
                        // A renewal is liveness, not state: sent while connected and never
                        // stored or resent (the next one replaces it, and one is sent on every
                        // reconnect). Through the durable outbox each cost the node two SQLite
                        // commits (stored, then removed on the ack) every 10 s, for good.
                        let msg = node_message(
                            op::UPDATE,
                            kind::LEASE,
                            serde_json::to_value(r).unwrap_or_default(),
                        );
                        if let Err(e) = hub.send_unacked(msg).await {
                            tracing::debug!(error = %e, "lease renewal not sent");
                        }
                    }
                }
            }));
        }
        let metaserver = if cfg.metaserver_listen.is_empty() {
            None
        } else {
            let (addr, t) = metaserver::start(
                &cfg.metaserver_listen,
                store.clone(),
                pod_tokens,
                cfg.metaserver_anonymous_reads,
            )
            .await
            .map_err(|source| EdgeError::MetaServer {
                addr: cfg.metaserver_listen.clone(),
                source,
            })?;
            tasks.push(t);
            Some(addr)
        };
        let metrics = if cfg.metrics_listen.is_empty() {
            None
        } else {
            let (hub, edged) = (hub.clone(), edged.clone());
            let render: sedge_serve::MetricsFn = Arc::new(move || {
                let (hub, edged) = (hub.clone(), edged.clone());
                Box::pin(async move {
                    let mut e = sedge_serve::Exposition::new();
                    hub.metrics(&mut e).await;
                    edged.metrics(&mut e);
                    e.process();
                    e.encode()
                })
            });
            // Up means able to work: pods run from the local store with or without the cloud.
            let (addr, t) = sedge_serve::serve_ops(&cfg.metrics_listen, render, Arc::new(|| true))
                .await
                .map_err(|source| EdgeError::Metrics {
                    addr: cfg.metrics_listen.clone(),
                    source,
                })?;
            tasks.push(t);
            Some(addr)
        };
        tracing::info!(%node, %ip, metaserver = ?metaserver, metrics = ?metrics, "edge agent running");
        Ok(EdgeCore {
            hub,
            store,
            edged,
            metaserver,
            metrics,
            node,
            tasks,
            modules: started,
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stops the agent. With `stop_pods`, the pods' processes are stopped too (what `sedge up`
    /// does on Ctrl-C); without, they keep running and the next start adopts them (what a
    /// kubelet restart does).
    pub async fn shutdown(self, stop_pods: bool) {
        if stop_pods {
            self.edged.stop_all().await;
        } else {
            self.edged.detach();
        }
        for m in &self.modules {
            m.stop();
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // Modules' tasks may still hold the hub: then it is told to stop rather than awaited
        // (before, it went on running, a second agent of the node in this process).
        match Arc::try_unwrap(self.hub) {
            Ok(hub) => hub.shutdown().await,
            Err(hub) => hub.stop(),
        }
    }
}

async fn route(
    i: Incoming,
    store: &Arc<MetaStore>,
    edged: &Arc<Edged>,
    ctx: &ModuleContext,
    modules: &HashMap<String, Arc<dyn EdgeModule>>,
) -> Result<Option<Message>, String> {
    let m = i.message;
    match m.route.group.as_str() {
        group::META => {
            let key = match Key::parse(&m.route.resource) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!("malformed message from the cloud: {e}; dropped");
                    return Ok(None);
                }
            };
            let store = store.clone();
            let op_ = m.route.operation.clone();
            let rv = m.resource_version.clone();
            let content = m.content.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                if op_ == op::DELETE {
                    store.delete(&key.kind, &key.namespace, &key.name).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                let obj: Value = match serde_json::from_slice(&content) {
                    Ok(v @ Value::Object(_)) => v,
                    Ok(_) | Err(_) => {
                        // Acknowledged and dropped: retrying a malformed message helps nobody.
                        tracing::warn!(resource = %key, "malformed object from the cloud (not a JSON object); dropped");
                        return Ok(());
                    }
                };
                store.upsert(&key.kind, &key.namespace, &key.name, &rv, &obj).map_err(|e| e.to_string())?;
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())??;
            Ok(None)
        }
        group::EDGED => {
            let key = Key::parse(&m.route.resource)?;
            if key.kind != kind::POD_LOG {
                return Err(format!("edged does not answer {:?}", key.kind));
            }
            let req: LogRequest = serde_json::from_slice(&m.content)
                .map_err(|e| format!("malformed log request: {e}"))?;
            let edged = edged.clone();
            let bytes =
                tokio::task::spawn_blocking(move || edged.logs(&key.namespace, &key.name, &req))
                    .await
                    .map_err(|e| e.to_string())??;
            Ok(Some(m.reply(op::RESPONSE, bytes)))
        }
        sedge_tunnel::stream::GROUP => open_stream(m, edged, ctx).await,
        g => match modules.get(g) {
            Some(module) => module.handle(ctx, m).await,
            None => {
                tracing::warn!(group = g, "message for a group no module handles; dropped");
                Ok(None)
            }
        },
    }
}

/// A stream message from the cloud: frames of an open stream, or an open (exec) to accept.
async fn open_stream(
    m: Message,
    edged: &Arc<Edged>,
    ctx: &ModuleContext,
) -> Result<Option<Message>, String> {
    if m.route.operation != stream::op::OPEN {
        if let Err(e) = ctx.streams.handle(CLOUD_PEER, &m) {
            tracing::warn!(error = %e, "stream frame refused");
        }
        return Ok(None);
    }
    let refuse = |why: String| Ok(Some(m.reply(op::ERROR, why)));
    let open: StreamOpen = match serde_json::from_slice(&m.content) {
        Ok(r) => r,
        Err(e) => return refuse(format!("malformed stream request: {e}")),
    };
    if ctx.streams.len() >= exec::MAX_STREAMS {
        return refuse(format!(
            "node {} already serves {} exec and port-forward streams; try again later",
            ctx.node,
            exec::MAX_STREAMS
        ));
    }
    let (store, runtime) = (ctx.store.clone(), edged.runtime());
    enum Target {
        Exec(exec::Target, ExecRequest),
        Port(std::net::SocketAddr, PortForwardRequest),
    }
    let target = {
        let (open, runtime) = (open.clone(), runtime.clone());
        tokio::task::spawn_blocking(move || match open {
            StreamOpen::Exec(r) => {
                exec::resolve(&store, runtime.as_ref(), &r).map(|t| Target::Exec(t, r))
            }
            StreamOpen::PortForward(r) => {
                portforward::resolve(&store, runtime.as_ref(), &r).map(|a| Target::Port(a, r))
            }
            StreamOpen::Service(_) => {
                Err("a node opens Service streams; it does not accept them".into())
            }
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let target = match target {
        Ok(t) => t,
        Err(why) => return refuse(why),
    };
    if open.check_only() {
        return Ok(Some(m.reply(op::RESPONSE, "")));
    }
    let send: stream::Sender = {
        let ctx = ctx.clone();
        Arc::new(move |msg| {
            let ctx = ctx.clone();
            Box::pin(async move { ctx.send_now(msg).await })
        })
    };
    let Some(s) = ctx.streams.register(&m.route.resource, CLOUD_PEER, send) else {
        return refuse(format!("stream {:?} is open already", m.route.resource));
    };
    match target {
        Target::Exec(t, r) => tokio::spawn(exec::run(edged.clone(), t, r, s)),
        // Connecting happens in the stream's task: the session's handler never waits on a pod.
        Target::Port(addr, r) => tokio::spawn(portforward::run(addr, r, s)),
    };
    Ok(Some(m.reply(op::RESPONSE, "")))
}

/// The peer name of the cloud in the edge's streams.
pub(crate) const CLOUD_PEER: &str = "cloud";

/// A gRPC channel over a Unix socket (CRI to containerd, DMI between the agent and mappers); the
/// error names the socket and says why, down to the cause.
pub async fn uds_channel(
    socket: &std::path::Path,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://localhost")
        .map_err(|e| e.to_string())?
        .connect_timeout(connect_timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| {
            let mut s = format!("cannot reach {}: {e}", socket.display());
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s = format!("{s}: {c}");
                src = c.source();
            }
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_cloud_messages_are_dropped_and_the_store_stays_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MetaStore::open(&dir.path().join("meta.db")).unwrap());
        let pod_tokens = Arc::new(podtoken::PodTokens::load_or_create(dir.path()).unwrap());
        let tx: edged::Reports = Arc::default();
        let runtime = Arc::new(runtime::ProcessRuntime::new(
            EdgeCoreConfig::default().images,
            PathBuf::from("/bin/true"),
        ));
        let facts = resolve::NodeFacts {
            node: "edge-1".into(),
            ip: "127.0.0.1".into(),
            pod_ip: None,
        };
        let settings = edged::EdgedSettings::for_tests(dir.path().join("pods"), pod_tokens.clone());
        let edged = Edged::start(store.clone(), runtime, facts, settings, tx.clone());
        let ctx = ModuleContext {
            node: "edge-1".into(),
            store: store.clone(),
            reports: tx,
            hub: Arc::new(std::sync::OnceLock::new()),
            pod_tokens,
            streams: Streams::default(),
        };
        let modules = HashMap::new();
        // Delivers one message from the cloud to the agent's router.
        let send = async |group: &str, op_: &str, res: &str, content: &str, rv: &str| {
            let i = Incoming {
                node: "edge-1".into(),
                message: Message::new(group, op_, res, content.to_string()).with_version(rv),
            };
            route(i, &store, &edged, &ctx, &modules).await
        };
        let good = r#"{"metadata": {"name": "cfg", "namespace": "default"}, "data": {"k": "v1"}}"#;
        let r = send(group::META, op::UPDATE, "default/configmap/cfg", good, "5").await;
        assert!(r.unwrap().is_none());
        // Not JSON, not an object, a bad key, an unknown group: acknowledged, dropped, nothing changed.
        for (g, res, content) in [
            (group::META, "default/configmap/cfg", "not json"),
            (group::META, "default/configmap/cfg", "[1, 2]"),
            (group::META, "no-slashes", "{}"),
            ("nobody", "default/thing/x", "{}"),
        ] {
            let r = send(g, op::UPDATE, res, content, "9").await;
            assert!(r.unwrap().is_none(), "{g} {res} {content}");
        }
        // An older version of what is held is ignored.
        let old = r#"{"metadata": {"name": "cfg", "namespace": "default"}, "data": {"k": "v0"}}"#;
        send(group::META, op::UPDATE, "default/configmap/cfg", old, "3")
            .await
            .unwrap();
        let held = store.get("configmap", "default", "cfg").unwrap().unwrap();
        assert_eq!(held["data"]["k"], "v1");
        assert_eq!(
            store.revision().unwrap(),
            1,
            "nothing but the first write happened"
        );
        // Log requests: malformed, and for a pod the node does not hold, fail with the reason.
        let e = send(group::EDGED, op::QUERY, "default/podlog/p", "{", "")
            .await
            .unwrap_err();
        assert!(e.contains("malformed log request"), "{e}");
        let req = r#"{"uid": "", "container": "c"}"#;
        let e = send(group::EDGED, op::QUERY, "default/podlog/p", req, "")
            .await
            .unwrap_err();
        assert_eq!(e, "pod default/p is not on this node");
    }
}
