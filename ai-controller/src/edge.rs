//! The AI edge module, plugged into the edge agent (`sedge_edgecore::EdgeModule`).
//!
//! - **Local controller endpoint** (Sedna's LC API, `LC_SERVER`): `POST
//!   /sedna/workers/<worker>/info` with Sedna's body. The report of a pod on this node goes
//!   upstream through the durable outbox (latest per pod wins), so counters survive an offline
//!   period and reach the cloud when the link returns.
//! - **Routes to the cloud**: for every pod on the node annotated with
//!   `sedge.io/route-listen: <port>` and `sedge.io/route-service: <service>:<port>`, a listener on
//!   `127.0.0.1:<port>`. Each accepted connection is opened in the cloud (`query` on
//!   `<ns>/route/<service>`) and its bytes are carried both ways in `<ns>/stream/<id>` messages.
//!   While the link is down, opening fails at once and the connection is closed, so the worker
//!   falls back to edge-only immediately instead of waiting on a timeout.
//!
//! - **Incremental learning**: the local controller of the jobs whose data is on this node
//!   ([`crate::lc`]); their train and eval workers report results to the same endpoint.
//!
//! One module value may serve several agents in one process (`sedge up` runs several edge nodes
//! on one machine): the endpoint and each listener are bound once, and a report or a connection
//! goes through the agent whose node holds the pod.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use sedge_edgecore::{EdgeModule, ModuleContext};
use sedge_tunnel::{Message, Policy, op};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::wire::{
    GROUP, ROUTE_LISTEN_ANNOTATION, ROUTE_SERVICE_ANNOTATION, RouteOpen, STREAM_BUFFER,
    WorkerReport, kind,
};

/// Settings of the AI edge module (the `ai` section of the edge agent's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeAiConfig {
    /// Address of the local-controller endpoint (`LC_SERVER`); empty disables it.
    pub lc_listen: String,
    /// How long opening a route in the cloud may take, in milliseconds.
    pub route_open_timeout_ms: u64,
}

impl Default for EdgeAiConfig {
    fn default() -> Self {
        EdgeAiConfig {
            lc_listen: "127.0.0.1:9100".into(),
            route_open_timeout_ms: 3000,
        }
    }
}

/// A route a pod asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    namespace: String,
    service: String,
    port: u16,
    node: String,
}

struct Shared {
    cfg: EdgeAiConfig,
    nodes: Mutex<BTreeMap<String, ModuleContext>>,
    streams: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
    changed: Notify,
    started: std::sync::Once,
    lc_addr: Mutex<Option<SocketAddr>>,
    jobs: Arc<crate::lc::Jobs>,
}

/// The AI edge module.
#[derive(Clone)]
pub struct EdgeAiModule {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EdgeAiModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeAiModule")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl EdgeAiModule {
    /// A module; share one value among the agents of a process.
    pub fn new(cfg: EdgeAiConfig) -> EdgeAiModule {
        EdgeAiModule {
            shared: Arc::new(Shared {
                cfg,
                nodes: Mutex::new(BTreeMap::new()),
                streams: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                started: std::sync::Once::new(),
                lc_addr: Mutex::new(None),
                jobs: Arc::default(),
            }),
        }
    }

    /// Where the local-controller endpoint listens, once bound.
    pub fn lc_addr(&self) -> Option<SocketAddr> {
        *self
            .shared
            .lc_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    fn ctx(&self, node: &str) -> Option<ModuleContext> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    fn contexts(&self) -> Vec<ModuleContext> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The agent whose node holds pod `ns/name`.
    fn owner_of_pod(&self, ns: &str, name: &str) -> Option<ModuleContext> {
        self.contexts().into_iter().find(|c| {
            c.store
                .get(sedge_api::kind::POD, ns, name)
                .ok()
                .flatten()
                .is_some()
        })
    }

    /// Routes wanted by the pods of every node here: local port -> route.
    fn wanted_routes(&self) -> BTreeMap<u16, Route> {
        let mut out = BTreeMap::new();
        for c in self.contexts() {
            let pods = c.store.list(sedge_api::kind::POD, None).unwrap_or_default();
            for p in pods {
                let a = &p["metadata"]["annotations"];
                let (Some(listen), Some(svc)) = (
                    a[ROUTE_LISTEN_ANNOTATION].as_str(),
                    a[ROUTE_SERVICE_ANNOTATION].as_str(),
                ) else {
                    continue;
                };
                let Ok(listen) = listen.parse::<u16>() else {
                    tracing::warn!(
                        annotation = ROUTE_LISTEN_ANNOTATION,
                        value = listen,
                        "not a port; route ignored"
                    );
                    continue;
                };
                let Some((service, port)) = svc
                    .rsplit_once(':')
                    .and_then(|(s, p)| Some((s.to_string(), p.parse::<u16>().ok()?)))
                else {
                    tracing::warn!(
                        annotation = ROUTE_SERVICE_ANNOTATION,
                        value = svc,
                        "not <service>:<port>; route ignored"
                    );
                    continue;
                };
                let r = Route {
                    namespace: p["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .into(),
                    service,
                    port,
                    node: c.node.clone(),
                };
                match out.get(&listen) {
                    Some(prev) if !same_target(prev, &r) => tracing::warn!(
                        port = listen,
                        "two services want local route port {listen}; keeping {}/{}",
                        prev.namespace,
                        prev.service
                    ),
                    Some(_) => {}
                    None => {
                        out.insert(listen, r);
                    }
                }
            }
        }
        out
    }
}

fn same_target(a: &Route, b: &Route) -> bool {
    a.namespace == b.namespace && a.service == b.service && a.port == b.port
}

impl EdgeModule for EdgeAiModule {
    fn group(&self) -> &str {
        GROUP
    }

    fn start(&self, ctx: ModuleContext) {
        let shared = self.shared.clone();
        shared
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.node.clone(), ctx.clone());
        // Pod changes on this node may change the routes.
        {
            let shared = shared.clone();
            let mut changes = ctx.store.subscribe();
            tokio::spawn(async move {
                loop {
                    // Only pods carry routes; node status and config writes do not.
                    match changes.recv().await {
                        Ok(c) if c.kind != sedge_api::kind::POD => {}
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            shared.changed.notify_one()
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        shared.changed.notify_one();
        let once = shared.clone();
        shared.started.call_once(move || {
            if !once.cfg.lc_listen.is_empty() {
                tokio::spawn(serve_lc(once.clone()));
            }
            let lc = once.clone();
            tokio::spawn(crate::lc::run(once.jobs.clone(), move || lc.contexts()));
            tokio::spawn(manage_routes(once));
        });
    }

    fn handle(
        &self,
        _ctx: &ModuleContext,
        msg: Message,
    ) -> BoxFuture<'static, Result<Option<Message>, String>> {
        let shared = self.shared.clone();
        async move {
            let parts: Vec<&str> = msg.route.resource.splitn(3, '/').collect();
            if parts.len() != 3 || parts[1] != kind::STREAM {
                tracing::debug!(resource = %msg.route.resource, "not a stream message; dropped");
                return Ok(None);
            }
            let id = parts[2];
            let tx = shared
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned();
            let closed = match (msg.route.operation.as_str(), tx) {
                (op::UPDATE, Some(tx)) => tx.send(msg.content.clone()).await.is_err(),
                (op::DELETE, _) => true,
                _ => false,
            };
            if closed {
                shared
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
            }
            Ok(None)
        }
        .boxed()
    }
}

/// Sedna's worker report body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LcBody {
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    owner_name: String,
    #[serde(default)]
    owner_kind: String,
    #[serde(default)]
    owner_info: BTreeMap<String, Value>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    results: Vec<crate::lc::WorkerResult>,
    #[serde(default)]
    message: String,
}

/// Most counters one report may carry, and the longest counter name.
const MAX_METRICS: usize = 32;
const MAX_METRIC_NAME: usize = 64;
/// Largest report body read (Sedna's reports are a few hundred bytes).
const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The counters of a report (`ownerInfo` less its times), each a number or a boolean: what
/// reaches `kubectl get ji` must be a count, not text a local process chose.
fn report_metrics(info: BTreeMap<String, Value>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in info {
        if k == "startTime" || k == "updateTime" {
            continue;
        }
        if k.is_empty()
            || k.len() > MAX_METRIC_NAME
            || !k.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(format!(
                "ownerInfo key {k:?}: expected 1 to {MAX_METRIC_NAME} letters or digits"
            ));
        }
        let value = match &v {
            Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::String(s) if s == "true" || s == "false" => s.clone(),
            Value::String(s) if s.parse::<f64>().is_ok_and(f64::is_finite) => s.clone(),
            other => {
                return Err(format!(
                    "ownerInfo.{k}: {other} is not a number or a boolean"
                ));
            }
        };
        out.insert(k, value);
        if out.len() > MAX_METRICS {
            return Err(format!("ownerInfo: more than {MAX_METRICS} counters"));
        }
    }
    Ok(out)
}

fn lc_reply(code: StatusCode, message: String) -> (StatusCode, axum::Json<Value>) {
    (
        code,
        axum::Json(json!({"Status": code.as_u16(), "Message": message})),
    )
}

async fn worker_info(
    State(shared): State<Arc<Shared>>,
    Path(worker): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let b: LcBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return lc_reply(
                StatusCode::BAD_REQUEST,
                format!("malformed worker report: {e}"),
            );
        }
    };
    if b.name != worker {
        return lc_reply(
            StatusCode::BAD_REQUEST,
            format!(
                "the body names worker {:?} but the path names {worker:?}",
                b.name
            ),
        );
    }
    let ns = if b.namespace.is_empty() {
        "default".to_string()
    } else {
        b.namespace.clone()
    };
    let Some(ctx) = shared.owner_of_pod(&ns, &worker) else {
        return lc_reply(
            StatusCode::NOT_FOUND,
            format!("no pod {ns}/{worker} runs on this node (WORKER_NAME must be the pod's name)"),
        );
    };
    // Only the pod itself may report as itself: its token proves it.
    let token = sedge_edgecore::podtoken::bearer(&headers).unwrap_or_default();
    if !ctx.verify_pod_token(&ns, &worker, token) {
        return lc_reply(
            StatusCode::UNAUTHORIZED,
            format!(
                "a report for pod {ns}/{worker} must carry that pod's token (Authorization: Bearer $SEDGE_POD_TOKEN)"
            ),
        );
    }
    if b.owner_kind.eq_ignore_ascii_case("incrementallearningjob")
        && matches!(b.status.as_str(), "completed" | "failed")
    {
        return il_result(&shared, &ctx, &ns, &worker, b);
    }
    let metrics = match report_metrics(b.owner_info) {
        Ok(m) => m,
        Err(why) => return lc_reply(StatusCode::BAD_REQUEST, why),
    };
    // An incremental learning job's inference worker: its counters confirm hot deploys here;
    // the cloud has no use for them (it would drop them), so they do not cross the link.
    if b.owner_kind.eq_ignore_ascii_case("incrementallearningjob") {
        shared.jobs.worker_counters(&ns, &worker, &metrics);
        return lc_reply(StatusCode::OK, "OK".into());
    }
    let report = WorkerReport {
        owner_kind: b.owner_kind.to_lowercase(),
        owner_name: b.owner_name,
        kind: b.kind,
        status: b.status,
        metrics,
    };
    let key = format!("{ns}/{}/{worker}", kind::REPORT);
    let body = serde_json::to_vec(&report).expect("a report serialises");
    ctx.send(
        Message::new(GROUP, op::UPDATE, &key, body),
        Policy::LatestWins,
    );
    lc_reply(StatusCode::OK, "OK".into())
}

/// A train or eval worker of an incremental learning job finished: its results go to the
/// node's local controller, which keeps them and tells the cloud.
fn il_result(
    shared: &Shared,
    ctx: &ModuleContext,
    ns: &str,
    worker: &str,
    b: LcBody,
) -> (StatusCode, axum::Json<Value>) {
    let job = ctx
        .store
        .get(sedge_api::kind::POD, ns, worker)
        .ok()
        .flatten()
        .and_then(|p| {
            p["metadata"]["labels"][crate::wire::IL_JOB_LABEL]
                .as_str()
                .map(String::from)
        });
    if job.as_deref() != Some(b.owner_name.as_str()) {
        return lc_reply(
            StatusCode::FORBIDDEN,
            format!(
                "pod {ns}/{worker} is not a worker of incremental learning job {:?}",
                b.owner_name
            ),
        );
    }
    let message: String = b.message.chars().take(1024).collect();
    let outcome = crate::lc::WorkerOutcome {
        kind: b.kind,
        status: b.status,
        results: b.results,
        message,
    };
    match shared
        .jobs
        .worker_result(&ctx.node, ns, &b.owner_name, worker, outcome)
    {
        Ok((k, body, policy)) => {
            let key = format!("{ns}/{k}/{worker}");
            ctx.send(Message::new(GROUP, op::UPDATE, &key, body), policy);
            lc_reply(StatusCode::OK, "OK".into())
        }
        Err(why) => lc_reply(StatusCode::BAD_REQUEST, why),
    }
}

async fn serve_lc(shared: Arc<Shared>) {
    let addr = shared.cfg.lc_listen.clone();
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve the local-controller endpoint; worker reports on this node will not reach the cloud");
            return;
        }
    };
    *shared.lc_addr.lock().unwrap_or_else(|p| p.into_inner()) = listener.local_addr().ok();
    tracing::info!(addr = ?listener.local_addr().ok(), "local-controller endpoint for workers");
    let app = axum::Router::new()
        .route("/sedna/workers/{worker}/info", post(worker_info))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(shared);
    sedge_serve::serve(
        listener,
        app,
        sedge_serve::Limits::default(),
        std::future::pending(),
    )
    .await;
}

async fn manage_routes(shared: Arc<Shared>) {
    let mut running: BTreeMap<u16, (Route, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let wanted = shared.wanted_routes();
        running.retain(|port, (r, task)| {
            let keep = wanted.get(port).is_some_and(|w| same_target(w, r));
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, r) in wanted {
            if let Some((cur, _)) = running.get_mut(&port) {
                cur.node = r.node.clone();
                continue;
            }
            let task = tokio::spawn(listen_route(shared.clone(), port, r.clone()));
            running.insert(port, (r, task));
        }
        shared.changed.notified().await;
    }
}

/// Routed connections open at once on one port.
const MAX_ROUTE_STREAMS: usize = 256;

async fn listen_route(shared: Arc<Shared>, port: u16, route: Route) {
    let listener = loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(port, error = %e, service = %route.service, "cannot listen for the route to the cloud; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    tracing::info!(port, namespace = %route.namespace, service = %route.service, "routing local connections to the cloud service through the channel");
    // Each local connection is a stream over the node's one session: bounded, so a local
    // process opening sockets in a loop cannot flood the channel (the newest is closed).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ROUTE_STREAMS));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(port, %peer, max = MAX_ROUTE_STREAMS, "too many routed connections; closing the newest");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (shared, route) = (shared.clone(), route.clone());
        tokio::spawn(async move {
            let _slot = slot;
            carry(shared, route, sock).await;
        });
    }
}

/// Opens the connection in the cloud and pumps bytes both ways until either side closes.
async fn carry(shared: Arc<Shared>, route: Route, sock: TcpStream) {
    let Some(ctx) = shared.ctx(&route.node) else {
        return;
    };
    let id = uuid::Uuid::new_v4().to_string();
    let open = RouteOpen {
        stream: id.clone(),
        port: route.port,
    };
    let req = Message::new(
        GROUP,
        op::QUERY,
        &format!("{}/{}/{}", route.namespace, kind::ROUTE, route.service),
        serde_json::to_vec(&open).expect("serialises"),
    );
    let timeout = Duration::from_millis(shared.cfg.route_open_timeout_ms);
    if let Err(e) = ctx.request(req, timeout).await {
        tracing::debug!(service = %route.service, error = %e, "route to the cloud not opened; closing the local connection");
        return;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    shared
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), tx);
    let key = format!("{}/{}/{id}", route.namespace, kind::STREAM);
    crate::wire::pump(sock, rx, &key, |m| {
        let ctx = ctx.clone();
        async move { ctx.send_now(m).await.is_ok() }
    })
    .await;
    shared
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let _ = ctx
        .send_now(Message::new(GROUP, op::DELETE, &key, Vec::new()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_carry_numbers_only() {
        let info = |v: Value| -> BTreeMap<String, Value> {
            serde_json::from_value(json!({"startTime": "x", "inferenceNumber": 10, "uploadCloudRatio": "0.25", "cloudReachable": "true", "extra": v})).unwrap()
        };
        let m = report_metrics(info(json!(false))).unwrap();
        assert_eq!(m["inferenceNumber"], "10");
        assert_eq!(m["uploadCloudRatio"], "0.25");
        assert!(!m.contains_key("startTime"));
        // The attack: text that would show in `kubectl get ji`.
        for bad in [
            json!("<script>"),
            json!("NaN"),
            json!({"a": 1}),
            json!([1]),
            json!(null),
        ] {
            let e = report_metrics(info(bad.clone())).unwrap_err();
            assert!(e.contains("ownerInfo.extra"), "{bad}: {e}");
        }
        let many: BTreeMap<String, Value> = (0..40).map(|i| (format!("c{i}"), json!(i))).collect();
        assert!(report_metrics(many).unwrap_err().contains("more than"));
        let odd: BTreeMap<String, Value> = [("a b".to_string(), json!(1))].into();
        assert!(report_metrics(odd).is_err());
    }
}
