//! The HTTP surface: URL routing in Kubernetes' shape, content negotiation (JSON, YAML, Table,
//! PartialObjectMetadata), authentication, and the mapping from verbs to [`crate::ops`].

mod auth;
mod body;
mod exec;
mod options;
mod portforward;
mod scale;

use auth::*;
use body::*;
pub use body::{MAX_DEPTH, nesting_depth};
use options::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::{Authenticator, Identity, PeerIdentity, is_public};
use crate::authz::{Attributes, Denied};
use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::openapi;
use crate::ops::{self, Core, DeleteOpts, ListOpts, PatchType, WriteCtx};
use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::table::{self, IncludeObject};
use crate::watch::{self, WatchRequest};

/// Shared state of the HTTP layer.
#[derive(Debug)]
pub struct App {
    /// Verbs and storage.
    pub core: Arc<Core>,
    /// Bearer tokens.
    pub auth: Authenticator,
    /// ServiceAccount tokens (TokenRequest, and checking them).
    pub sa_tokens: Arc<crate::satoken::ServiceAccountTokens>,
    /// Body size limit.
    pub max_body: usize,
    /// Watch bookmark interval.
    pub bookmark_interval: Duration,
    /// Default watch duration.
    pub watch_timeout: Duration,
    /// `host:port` reported by `/api`.
    pub server_address: String,
    /// Flips to true on shutdown; watches end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Bytes queued by all watchers.
    pub watch_budget: Arc<watch::WatchBudget>,
    /// How long a watcher at its byte budget waits for its client before it is closed.
    pub slow_watch_grace: Duration,
    /// Open watches by user.
    pub watches: Arc<WatchCounts>,
    /// Open `kubectl logs -f` streams by node.
    pub log_follows: Arc<WatchCounts>,
}

/// `kubectl logs -f` streams one node may serve at once: each polls the node through the
/// channel, so they are bounded like every other per-node resource.
pub const MAX_LOG_FOLLOWS_PER_NODE: usize = 32;

/// How often a followed log asks the node for more.
pub const LOG_FOLLOW_INTERVAL: Duration = Duration::from_millis(300);

/// Watches one user may hold open at once (kubectl, controllers and nodes hold a few each).
pub const MAX_WATCHES_PER_USER: usize = 1000;

/// Open watches by user.
#[derive(Debug, Default)]
pub struct WatchCounts(std::sync::Mutex<HashMap<String, usize>>);

/// A user's open watch; dropping it closes the slot.
#[derive(Debug)]
pub struct WatchSlot {
    counts: Arc<WatchCounts>,
    user: String,
}

impl WatchCounts {
    /// A slot for `user`, unless the user holds [`MAX_WATCHES_PER_USER`] already.
    pub fn enter(self: &Arc<Self>, user: &str) -> Option<WatchSlot> {
        self.enter_max(user, MAX_WATCHES_PER_USER)
    }

    /// A slot for `key`, unless it holds `max` already.
    pub fn enter_max(self: &Arc<Self>, user: &str, max: usize) -> Option<WatchSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            counts: self.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// The router: every path goes through [`dispatch`].
pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new().fallback(dispatch).with_state(app)
}

type Params = HashMap<String, String>;

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker thread failed: {e}")))?
}

/// Entry point for every request.
pub async fn dispatch(State(app): State<Arc<App>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let upgrade = Upgrade {
        on: parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        uri: parts.uri.clone(),
    };
    let path = parts.uri.path().to_string();
    let params: Params = Query::<Params>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let peer = parts
        .extensions
        .get::<PeerIdentity>()
        .cloned()
        .unwrap_or_default();
    let identity = if is_public(&path) {
        None
    } else {
        match authenticate(&app, &parts.headers, &peer).await {
            Some(id) => Some(id),
            None => {
                app.metrics.request(parts.method.as_str(), "", 401);
                return ApiError::Unauthorized.into_response();
            }
        }
    };
    let method = parts.method.clone();
    let started = std::time::Instant::now();
    let (resource, resp) = match route(
        &app,
        &parts.method,
        &path,
        &parts.headers,
        &params,
        body,
        identity,
        upgrade,
    )
    .await
    {
        Ok((r, resp)) => (r, resp),
        Err(e) => (String::new(), e.into_response()),
    };
    let code = resp.status().as_u16();
    app.metrics.request(method.as_str(), &resource, code);
    tracing::debug!(%method, %path, code, ms = started.elapsed().as_millis() as u64, "request");
    resp
}

/// Who is asking: a static token or client certificate, or a ServiceAccount token (checked
/// against the store off the runtime). None: no credentials, or wrong ones.
async fn authenticate(
    app: &Arc<App>,
    headers: &HeaderMap,
    peer: &PeerIdentity,
) -> Option<Identity> {
    if let Ok(Some(token)) = crate::auth::bearer(headers)
        && !app.auth.knows(&token)
        && crate::satoken::ServiceAccountTokens::is_jwt(&token)
    {
        let (core, tokens) = (app.core.clone(), app.sa_tokens.clone());
        let id = blocking(move || Ok(tokens.authenticate(&core.store, &token)))
            .await
            .ok()?;
        return match id {
            Ok(id) => Some(crate::auth::authenticated(id)),
            Err(why) => {
                tracing::debug!(%why, "ServiceAccount token refused");
                None
            }
        };
    }
    app.auth.authenticate(headers, peer).ok().flatten()
}

fn only_get(method: &Method) -> ApiResult<()> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(format!(
            "the server does not allow this method ({method}) on this path"
        )))
    }
}

#[allow(clippy::too_many_arguments)]
async fn route(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &Params,
    body: Body,
    identity: Option<Identity>,
    upgrade: Upgrade,
) -> ApiResult<(String, Response)> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resource_request = matches!(
        segs.as_slice(),
        ["api", "v1", _, ..] | ["apis", _, _, _, ..]
    );
    if !resource_request && let Some(id) = &identity {
        let attrs = Attributes {
            verb: method.as_str().to_ascii_lowercase().replace("head", "get"),
            path: path.to_string(),
            ..Default::default()
        };
        authorize(app, id, attrs).await?;
    }
    let snap = app.core.registry.snapshot();
    let ok = |v: Value| Ok((String::new(), json_response(StatusCode::OK, &v)));
    match segs.as_slice() {
        [] => {
            only_get(method)?;
            let mut paths = vec![
                "/api".to_string(),
                "/api/v1".into(),
                "/apis".into(),
                "/healthz".into(),
                "/livez".into(),
                "/metrics".into(),
                "/openapi/v3".into(),
                "/readyz".into(),
                "/version".into(),
            ];
            for (g, vs) in snap.groups() {
                paths.push(format!("/apis/{g}"));
                paths.extend(vs.iter().map(|v| format!("/apis/{g}/{v}")));
            }
            paths.sort();
            ok(json!({"paths": paths}))
        }
        ["version"] => {
            only_get(method)?;
            ok(discovery::version())
        }
        ["healthz"] | ["livez"] | ["readyz"] => {
            only_get(method)?;
            if *app.shutdown.borrow() && segs[0] == "readyz" {
                return Err(ApiError::Unavailable("shutting down".into()));
            }
            Ok((String::new(), (StatusCode::OK, "ok").into_response()))
        }
        ["metrics"] => {
            only_get(method)?;
            let text = app.metrics.render(&app.core);
            Ok((
                String::new(),
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response(),
            ))
        }
        ["openapi", "v2"] => {
            only_get(method)?;
            if accept(headers).contains("protobuf") {
                let body = openapi::v2_protobuf();
                return Ok((
                    String::new(),
                    ([(header::CONTENT_TYPE, openapi::V2_PROTOBUF)], body).into_response(),
                ));
            }
            ok(openapi::v2_json())
        }
        ["openapi", "v3"] => {
            only_get(method)?;
            ok(openapi::root(&snap))
        }
        ["openapi", "v3", rest @ ..] => {
            only_get(method)?;
            let gv = rest.join("/");
            openapi::group_version(&snap, &gv)
                .map(|d| (String::new(), json_response(StatusCode::OK, &d)))
                .ok_or(ApiError::NoRoute)
        }
        ["api"] => {
            only_get(method)?;
            ok(discovery::core_versions(&app.server_address))
        }
        ["api", "v1"] => {
            only_get(method)?;
            ok(discovery::resources(&snap, "", "v1").ok_or(ApiError::NoRoute)?)
        }
        ["api", "v1", rest @ ..] => {
            resource(
                app, method, headers, params, body, "", "v1", rest, identity, upgrade,
            )
            .await
        }
        ["apis"] => {
            only_get(method)?;
            ok(discovery::groups(&snap))
        }
        ["apis", g] => {
            only_get(method)?;
            ok(discovery::group(&snap, g).ok_or(ApiError::NoRoute)?)
        }
        ["apis", g, v] => {
            only_get(method)?;
            ok(discovery::resources(&snap, g, v).ok_or(ApiError::NoRoute)?)
        }
        ["apis", g, v, rest @ ..] => {
            resource(
                app, method, headers, params, body, g, v, rest, identity, upgrade,
            )
            .await
        }
        _ => Err(ApiError::NoRoute),
    }
}

/// What a streaming subresource (exec) needs beyond the parsed request: the connection's
/// upgrade, and the URI (exec's `command` parameter repeats, which [`Params`] cannot hold).
pub(crate) struct Upgrade {
    on: Option<hyper::upgrade::OnUpgrade>,
    uri: axum::http::Uri,
}

/// A parsed resource URL.
struct Target {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    watch_path: bool,
}

fn parse_target(app: &App, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let snap = app.core.registry.snapshot();
    let mut segs = rest;
    let mut watch_path = false;
    if segs.first() == Some(&"watch") {
        watch_path = true;
        segs = &segs[1..];
    }
    let lookup = |plural: &str| snap.get(group, version, plural);
    let (rt, namespace, name, sub) = match segs {
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|t| t.namespaced) => {
            let rt = lookup(plural).expect("checked");
            match tail {
                [] => (rt, Some(ns.to_string()), None, None),
                [name] => (rt, Some(ns.to_string()), Some(name.to_string()), None),
                [name, sub] => (
                    rt,
                    Some(ns.to_string()),
                    Some(name.to_string()),
                    Some(sub.to_string()),
                ),
                _ => return Err(ApiError::NoRoute),
            }
        }
        [plural, tail @ ..] => {
            let rt = lookup(plural).ok_or(ApiError::NoRoute)?;
            match tail {
                [] => (rt, None, None, None),
                [name] if !rt.namespaced => (rt, None, Some(name.to_string()), None),
                [name, sub] if !rt.namespaced => {
                    (rt, None, Some(name.to_string()), Some(sub.to_string()))
                }
                _ => return Err(ApiError::NoRoute),
            }
        }
        [] => return Err(ApiError::NoRoute),
    };
    let pod_sub = |s: &str| {
        rt.kind == "Pod"
            && rt.group.is_empty()
            && matches!(s, "log" | "binding" | "exec" | "attach" | "portforward")
    };
    let sa_sub = |s: &str| rt.kind == "ServiceAccount" && rt.group.is_empty() && s == "token";
    if let Some(s) = &sub
        && !(s == "status" && rt.status_subresource)
        && !(s == "scale" && ops::scale::has_scale(&rt))
        && !pod_sub(s)
        && !sa_sub(s)
    {
        return Err(ApiError::NoRoute);
    }
    if let Some(n) = &name
        && n.is_empty()
    {
        return Err(ApiError::NoRoute);
    }
    Ok(Target {
        rt,
        version: version.to_string(),
        namespace,
        name,
        sub,
        watch_path,
    })
}

/// `GET pods/{name}/log`: resolves the container and forwards to the pod's node through the
/// [`ops::PodLogSource`] the cloud core installed.
async fn pod_log(
    app: &Arc<App>,
    rt: Arc<ResourceType>,
    ns: &str,
    name: &str,
    params: &Params,
) -> ApiResult<Response> {
    let pod = get_pod(app, rt, ns, name).await?;
    let container = pick_container(&pod, params.get("container").map(String::as_str), name)?;
    let node = bound_node(&pod, name)?;
    let node = node.as_str();
    let number = |k: &str| -> ApiResult<Option<u64>> {
        match params.get(k).filter(|v| !v.is_empty()) {
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!("{k}: {v:?} is not a non-negative integer"))
            }),
            None => Ok(None),
        }
    };
    let req = ops::PodLogRequest {
        namespace: ns.to_string(),
        pod: name.to_string(),
        node: node.to_string(),
        log: sedge_api::LogRequest {
            uid: pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            container,
            tail_lines: number("tailLines")?,
            limit_bytes: number("limitBytes")?,
            previous: flag(params, "previous"),
            follow: false,
            cursor: None,
        },
    };
    let source = app.core.pod_logs.get().cloned().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "cannot get logs from node {node}: no cloud core is attached to this API server (run `sedge up`, or `sedge cloud` with the embedded API server)"
        ))
    })?;
    if flag(params, "follow")
        && !req.log.previous
        && let Some(start) = container_state(&pod, &req.log.container).filter(|s| !s.ended)
    {
        return follow_log(app, pod, req, source, start).await;
    }
    let text = (source.0)(req).await.map_err(ApiError::Unavailable)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text).into_response())
}

/// The pod `ns/name`, read off the runtime (for its subresources served by its node).
async fn get_pod(app: &Arc<App>, rt: Arc<ResourceType>, ns: &str, name: &str) -> ApiResult<Value> {
    let core = app.core.clone();
    let (ns, name) = (ns.to_string(), name.to_string());
    blocking(move || ops::get(&core, &rt, "v1", Some(&ns), &name)).await
}

/// The node pod `name` is bound to: its log, exec and port-forward are served there.
fn bound_node(pod: &Value, name: &str) -> ApiResult<String> {
    match pod["spec"]["nodeName"].as_str().unwrap_or_default() {
        "" => Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        ))),
        node => Ok(node.to_string()),
    }
}

/// The container a pod subresource (log, exec) names with `?container=`, or the pod's only one.
fn pick_container(pod: &Value, container: Option<&str>, name: &str) -> ApiResult<String> {
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    match container.filter(|c| !c.is_empty()) {
        Some(c) if containers.iter().any(|x| x == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// What a follow watches of a container in the pod's status.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ContainerState {
    restarts: i64,
    ended: bool,
}

/// The container's state in `pod`'s status; `None` when the pod reports nothing of it yet
/// (a follow then waits for it to start).
fn container_state(pod: &Value, container: &str) -> Option<ContainerState> {
    let st = pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?;
    Some(ContainerState {
        restarts: st["restartCount"].as_i64().unwrap_or(0),
        ended: st["state"]["terminated"].is_object(),
    })
}

/// `kubectl logs -f`: the log so far, then what the container writes, asked from the node every
/// [`LOG_FOLLOW_INTERVAL`] through the channel (one request at a time per stream, so a client
/// that reads slowly only slows its own stream). It ends when the container ends (once the node
/// has nothing more to send), when the pod is deleted or replaced, or when the client goes away;
/// a node that cannot be reached ends it with an error.
async fn follow_log(
    app: &Arc<App>,
    pod: Value,
    mut req: ops::PodLogRequest,
    source: ops::PodLogSource,
    start: ContainerState,
) -> ApiResult<Response> {
    let slot = app
        .log_follows
        .enter_max(&req.node, MAX_LOG_FOLLOWS_PER_NODE)
        .ok_or_else(|| {
            ApiError::TooManyRequests(format!(
                "node {} already serves {MAX_LOG_FOLLOWS_PER_NODE} followed logs; try again later",
                req.node
            ))
        })?;
    req.log.follow = true;
    let first = (source.0)(req.clone())
        .await
        .map_err(ApiError::Unavailable)?;
    let (cursor, _) = sedge_api::LogCursor::split(&first)
        .ok_or_else(|| ApiError::Unavailable(format!("node {}: malformed log reply", req.node)))?;
    req.log.cursor = Some(cursor);
    req.log.tail_lines = None;
    req.log.limit_bytes = None;
    let uid = pod["metadata"]["uid"].clone();
    let rt = app
        .core
        .registry
        .snapshot()
        .get("", "v1", "pods")
        .ok_or_else(|| ApiError::internal("pods are not served"))?;
    struct Follow {
        core: Arc<Core>,
        rt: Arc<ResourceType>,
        req: ops::PodLogRequest,
        source: ops::PodLogSource,
        first: Option<bytes::Bytes>,
        /// The container ended: read until the node has nothing more, then stop.
        ending: bool,
        /// Stop now (the node failed).
        done: bool,
        _slot: WatchSlot,
    }
    let state = Follow {
        core: app.core.clone(),
        rt,
        req,
        source,
        first: Some(first.slice(sedge_api::LogCursor::LEN..)),
        ending: false,
        done: false,
        _slot: slot,
    };
    let shutdown = app.shutdown.clone();
    let stream = futures::stream::unfold(state, move |mut f| {
        let uid = uid.clone();
        let mut shutdown = shutdown.clone();
        async move {
            if let Some(b) = f.first.take() {
                return Some((Ok::<_, std::io::Error>(b), f));
            }
            loop {
                if f.done {
                    return None;
                }
                if !f.ending {
                    tokio::select! {
                        _ = tokio::time::sleep(LOG_FOLLOW_INTERVAL) => {}
                        _ = shutdown.changed() => return None,
                    }
                    // Has the container ended, or the pod gone? Then read what is left.
                    let (core, rt) = (f.core.clone(), f.rt.clone());
                    let (ns, name) = (f.req.namespace.clone(), f.req.pod.clone());
                    let now = blocking(move || ops::get(&core, &rt, "v1", Some(&ns), &name)).await;
                    f.ending = match &now {
                        Ok(p) if p["metadata"]["uid"] == uid => {
                            container_state(p, &f.req.log.container)
                                .is_some_and(|s| s.ended || s.restarts != start.restarts)
                        }
                        _ => true,
                    };
                }
                match (f.source.0)(f.req.clone()).await {
                    Ok(reply) => {
                        let Some((cursor, body)) = sedge_api::LogCursor::split(&reply) else {
                            f.done = true;
                            return Some((Err(std::io::Error::other("malformed log reply")), f));
                        };
                        f.req.log.cursor = Some(cursor);
                        if !body.is_empty() {
                            let b = reply.slice(sedge_api::LogCursor::LEN..);
                            return Some((Ok(b), f));
                        }
                        if f.ending {
                            return None;
                        }
                    }
                    Err(e) => {
                        f.done = true;
                        tracing::info!(node = %f.req.node, error = %e, "followed log ended");
                        return Some((Err(std::io::Error::other(e)), f));
                    }
                }
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    params: &Params,
    body: Body,
    group: &str,
    version: &str,
    rest: &[&str],
    identity: Option<Identity>,
    upgrade: Upgrade,
) -> ApiResult<(String, Response)> {
    let t = parse_target(app, group, version, rest)?;
    let label = t.rt.qualified();
    check_acceptable(headers)?;
    let is_watch = t.watch_path || flag(params, "watch");
    if let Some(id) = &identity {
        let streaming = t.rt.kind == "Pod" && matches!(t.sub.as_deref(), Some("exec" | "attach"));
        let verb = match (method.clone(), t.name.is_some()) {
            // Kubernetes asks for `create` on pods/exec, attach and portforward whatever the method
            // (a WebSocket upgrade is a GET).
            (Method::GET | Method::POST, true) if streaming => "create",
            (Method::GET | Method::HEAD, _) if is_watch => "watch",
            (Method::GET | Method::HEAD, true) => "get",
            (Method::GET | Method::HEAD, false) => "list",
            (Method::POST, _) => "create",
            (Method::PUT, _) => "update",
            (Method::PATCH, _) => "patch",
            (Method::DELETE, true) => "delete",
            (Method::DELETE, false) => "deletecollection",
            (m, _) => {
                return Err(ApiError::MethodNotAllowed(format!(
                    "the server does not allow this method ({m}) on the requested resource"
                )));
            }
        };
        let attrs = Attributes {
            verb: verb.into(),
            group: t.rt.group.clone(),
            resource: t.rt.plural.clone(),
            subresource: t.sub.clone().unwrap_or_default(),
            namespace: t.namespace.clone().unwrap_or_default(),
            name: t.name.clone().unwrap_or_default(),
            path: String::new(),
        };
        authorize(app, id, attrs).await?;
    }
    if t.rt.group == "authentication.k8s.io" {
        // SelfSubjectReview (`kubectl auth whoami`): who the server thinks the caller is.
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed(format!(
                "{} supports only create",
                t.rt.qualified()
            )));
        }
        let id = identity.ok_or(ApiError::Unauthorized)?;
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
            "metadata": {"creationTimestamp": null},
            "status": {"userInfo": {"username": id.user, "groups": id.groups}},
        });
        return Ok((label, json_response(StatusCode::CREATED, &review)));
    }
    if t.rt.group == "authorization.k8s.io" {
        let resp = self_review(app, method, headers, body, &t.rt, identity).await?;
        return Ok((label, resp));
    }
    let core = app.core.clone();
    let rt = t.rt.clone();
    let version = t.version.clone();
    let ns = t.namespace.clone();
    let sub = t.sub.clone();
    if let (Some("token"), Some(name), Some(ns)) = (sub.as_deref(), t.name.clone(), ns.clone()) {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed(
                "serviceaccounts/token supports only create".into(),
            ));
        }
        let bytes = read_body(headers, body, app.max_body).await?;
        let req = parse(headers, bytes).await?;
        let tokens = app.sa_tokens.clone();
        let issued = blocking(move || {
            let sa = core
                .store
                .get("/serviceaccounts", &ns, &name)
                .map_err(ApiError::internal)?
                .ok_or(ApiError::NotFound {
                    resource: "serviceaccounts".into(),
                    name,
                })?;
            tokens.request(&core.store, &ns, &sa, req)
        })
        .await?;
        return Ok((
            format!("{label}/token"),
            json_response(StatusCode::CREATED, &issued),
        ));
    }
    if let (Some("scale"), Some(name)) = (sub.as_deref(), t.name.clone()) {
        let resp = scale::serve(
            app,
            rt,
            version,
            ns,
            name,
            method.clone(),
            headers,
            body,
            params,
            &identity,
        )
        .await?;
        return Ok((format!("{label}/scale"), resp));
    }
    if let (Some("portforward"), Some(name), Some(ns)) =
        (sub.as_deref(), t.name.clone(), ns.clone())
    {
        let resp = portforward::pod_port_forward(app, rt, &ns, &name, headers, upgrade).await?;
        return Ok((format!("{label}/portforward"), resp));
    }
    if let (Some(s @ ("exec" | "attach")), Some(name), Some(ns)) =
        (sub.as_deref(), t.name.clone(), ns.clone())
    {
        let resp = exec::pod_exec(app, rt, &ns, &name, headers, upgrade, s == "attach").await?;
        return Ok((format!("{label}/{s}"), resp));
    }
    if let (Some(s), Some(name), Some(ns)) = (sub.as_deref(), t.name.clone(), ns.clone())
        && (s == "log" || s == "binding")
    {
        let resp = if s == "log" {
            only_get(method)?;
            pod_log(app, rt.clone(), &ns, &name, params).await?
        } else {
            if method != Method::POST {
                return Err(ApiError::MethodNotAllowed(
                    "pods/binding supports only POST".into(),
                ));
            }
            let bytes = read_body(headers, body, app.max_body).await?;
            let binding = parse(headers, bytes).await?;
            let ctx = write_ctx(headers, params, &identity)?;
            let bound =
                blocking(move || ops::bind_pod(&core, &rt, &ns, &name, &binding, &ctx)).await?;
            json_response(StatusCode::CREATED, &bound)
        };
        return Ok((format!("{label}/{s}"), resp));
    }
    let resp = match (method.clone(), t.name.clone()) {
        (Method::GET, _) if is_watch => {
            let mut opts = list_opts(&rt, params)?;
            if let Some(n) = &t.name {
                let by_name = FieldSelector::parse(&format!("metadata.name={n}"), |_| true)
                    .map_err(ApiError::BadRequest)?;
                let mut f = opts.fields.take().unwrap_or_default();
                f.0.extend(by_name.0);
                opts.fields = Some(f);
            }
            let resource_version = match params.get("resourceVersion").filter(|s| !s.is_empty()) {
                Some(rv) => Some(ops::parse_rv(rv)?),
                None => None,
            };
            let timeout = match params.get("timeoutSeconds").filter(|s| !s.is_empty()) {
                Some(s) => Duration::from_secs(s.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "timeoutSeconds: {s:?} is not a non-negative integer"
                    ))
                })?),
                None => app.watch_timeout,
            };
            let req = WatchRequest {
                rt: rt.clone(),
                version: version.clone(),
                namespace: ns.clone(),
                opts,
                resource_version,
                send_initial_events: flag(params, "sendInitialEvents"),
                bookmarks: flag(params, "allowWatchBookmarks"),
                bookmark_interval: app.bookmark_interval,
                timeout,
                table: table_requested(headers, params)?,
                partial: partial_requested(headers),
                slow_grace: app.slow_watch_grace,
            };
            let user = identity
                .as_ref()
                .map(|i| i.user.clone())
                .unwrap_or_default();
            let slot = app.watches.enter(&user).ok_or_else(|| {
                ApiError::TooManyRequests(format!(
                    "user {user:?} has {} watches open, the most allowed; close some",
                    MAX_WATCHES_PER_USER
                ))
            })?;
            app.metrics.watchers.inc();
            let metrics = app.metrics.clone();
            watch::start(
                core,
                req,
                app.watch_budget.clone(),
                app.shutdown.clone(),
                move || {
                    metrics.watchers.dec();
                    drop(slot);
                },
            )?
        }
        (Method::GET, Some(name)) => {
            let obj =
                blocking(move || ops::get(&core, &rt, &version, ns.as_deref(), &name)).await?;
            json_response(StatusCode::OK, &present_one(&t.rt, obj, headers, params)?)
        }
        (Method::GET, None) => {
            let opts = list_opts(&rt, params)?;
            let (rt2, v2) = (rt.clone(), version.clone());
            let listed =
                blocking(move || ops::list(&core, &rt2, &v2, ns.as_deref(), &opts)).await?;
            if let Some(include) = table_requested(headers, params)? {
                let meta = ops::list_meta(&listed);
                json_response(
                    StatusCode::OK,
                    &table::render(&rt, listed.items, meta, include, true),
                )
            } else if partial_requested(headers) {
                let meta = ops::list_meta(&listed);
                let items: Vec<Value> = listed
                    .items
                    .into_iter()
                    .map(ops::partial_metadata)
                    .collect();
                json_response(
                    StatusCode::OK,
                    &ops::object([
                        ("kind", json!("PartialObjectMetadataList")),
                        ("apiVersion", json!("meta.k8s.io/v1")),
                        ("metadata", meta),
                        ("items", Value::Array(items)),
                    ]),
                )
            } else {
                json_response(StatusCode::OK, &ops::list_body(&rt, &version, listed))
            }
        }
        (Method::POST, None) => {
            let bytes = read_body(headers, body, app.max_body).await?;
            let obj = parse(headers, bytes).await?;
            escalation(app, &identity, &rt, ns.as_deref(), &obj).await?;
            let ctx = write_ctx(headers, params, &identity)?;
            let created =
                blocking(move || ops::create(&core, &rt, &version, ns.as_deref(), obj, &ctx))
                    .await?;
            json_response(StatusCode::CREATED, &created)
        }
        (Method::PUT, Some(name)) => {
            let bytes = read_body(headers, body, app.max_body).await?;
            let obj = parse(headers, bytes).await?;
            escalation(app, &identity, &rt, ns.as_deref(), &obj).await?;
            let ctx = write_ctx(headers, params, &identity)?;
            let updated = blocking(move || {
                ops::update(
                    &core,
                    &rt,
                    &version,
                    ns.as_deref(),
                    &name,
                    obj,
                    sub.as_deref(),
                    &ctx,
                )
            })
            .await?;
            json_response(StatusCode::OK, &updated)
        }
        (Method::PATCH, Some(name)) => {
            let ct = content_type(headers);
            let kind = if ct.starts_with("application/merge-patch+json") {
                PatchType::Merge
            } else if ct.starts_with("application/json-patch+json") {
                PatchType::Json
            } else if ct.starts_with("application/strategic-merge-patch+json") {
                PatchType::Strategic
            } else if ct.starts_with("application/apply-patch") {
                PatchType::Apply {
                    force: flag(params, "force"),
                }
            } else {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format ({ct}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
                )));
            };
            if matches!(kind, PatchType::Apply { .. })
                && params.get("fieldManager").is_none_or(|m| m.is_empty())
            {
                return Err(ApiError::bad_request(
                    "PATCH: fieldManager is required for apply requests",
                ));
            }
            let bytes = read_body(headers, body, app.max_body).await?;
            let apply = matches!(kind, PatchType::Apply { .. });
            let patch = decode(bytes, move |bytes| {
                check_depth(bytes)?;
                if apply {
                    serde_yaml::from_slice::<Value>(bytes).map_err(|e| {
                        ApiError::bad_request(format!(
                            "the apply configuration is not valid YAML or JSON: {e}"
                        ))
                    })
                } else {
                    serde_json::from_slice::<Value>(bytes).map_err(|e| {
                        ApiError::bad_request(format!("the patch is not valid JSON: {e}"))
                    })
                }
            })
            .await?;
            let ctx = write_ctx(headers, params, &identity)?;
            if rt.group == crate::authz::RBAC_GROUP && !ctx.dry_run {
                // What the patch would store is what the escalation check must see.
                let (core2, rt2, v2, ns2, name2, patch2) = (
                    core.clone(),
                    rt.clone(),
                    version.clone(),
                    ns.clone(),
                    name.clone(),
                    patch.clone(),
                );
                let mut dry = ctx.clone();
                dry.dry_run = true;
                let sub2 = sub.clone();
                let (would, _) = blocking(move || {
                    ops::patch(
                        &core2,
                        &rt2,
                        &v2,
                        ns2.as_deref(),
                        &name2,
                        kind,
                        patch2,
                        sub2.as_deref(),
                        &dry,
                    )
                })
                .await?;
                escalation(app, &identity, &rt, ns.as_deref(), &would).await?;
            }
            let (obj, created) = blocking(move || {
                ops::patch(
                    &core,
                    &rt,
                    &version,
                    ns.as_deref(),
                    &name,
                    kind,
                    patch,
                    sub.as_deref(),
                    &ctx,
                )
            })
            .await?;
            json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &obj,
            )
        }
        (Method::DELETE, Some(name)) => {
            if sub.is_some() {
                return Err(ApiError::MethodNotAllowed(
                    "the status subresource cannot be deleted".into(),
                ));
            }
            let options = optional_body(headers, body, app.max_body).await?;
            let opts = delete_opts(params, options.as_ref())?;
            let (obj, gone) =
                blocking(move || ops::delete(&core, &rt, &version, ns.as_deref(), &name, &opts))
                    .await?;
            json_response(
                if gone {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                },
                &obj,
            )
        }
        (Method::DELETE, None) => {
            let options = optional_body(headers, body, app.max_body).await?;
            let opts = delete_opts(params, options.as_ref())?;
            let lopts = list_opts(&rt, params)?;
            let (rt2, v2) = (rt.clone(), version.clone());
            let deleted = blocking(move || {
                let listed = ops::list(&core, &rt2, &v2, ns.as_deref(), &lopts)?;
                let mut out = Vec::new();
                for obj in listed.items {
                    let ons = obj["metadata"]["namespace"].as_str().map(String::from);
                    let name = obj["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    match ops::delete(&core, &rt2, &v2, ons.as_deref(), &name, &opts) {
                        Ok((o, _)) => out.push(o),
                        Err(ApiError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
            json_response(
                StatusCode::OK,
                &ops::object([
                    ("kind", json!(format!("{}List", rt.kind))),
                    ("apiVersion", json!(rt.api_version(&version))),
                    ("metadata", json!({})),
                    ("items", Value::Array(deleted)),
                ]),
            )
        }
        (m, _) => {
            return Err(ApiError::MethodNotAllowed(format!(
                "the server does not allow this method ({m}) on the requested resource"
            )));
        }
    };
    Ok((label, resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_per_user_are_capped_and_given_back() {
        let counts = Arc::new(WatchCounts::default());
        let mut held: Vec<WatchSlot> = (0..MAX_WATCHES_PER_USER)
            .map(|_| counts.enter("bob").unwrap())
            .collect();
        assert!(counts.enter("bob").is_none());
        assert!(
            counts.enter("alice").is_some(),
            "another user is not affected"
        );
        held.pop();
        assert!(counts.enter("bob").is_some());
        drop(held);
        assert!(counts.0.lock().unwrap().get("bob").is_none());
    }

    #[test]
    fn nesting_is_measured_before_parsing() {
        let manifest = b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p # a [comment\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [\"sh\", \"-c\", \"echo '[[[['\"]\n    args: [it's, {a: [1]}]\n";
        let d = nesting_depth(manifest);
        assert!((2..10).contains(&d), "{d}");
        assert_eq!(nesting_depth(br#"{"a": {"b": ["[[[", "\"[{"]}}"#), 3);
        // The attacks: flow nesting, one-line block sequences, nesting hidden behind a quote.
        let flow = "[".repeat(100_000);
        assert!(nesting_depth(flow.as_bytes()) > MAX_DEPTH);
        let dashes = "- ".repeat(100_000);
        assert!(nesting_depth(dashes.as_bytes()) > MAX_DEPTH);
        let hidden = format!("a: it's\n{}", "{".repeat(500));
        assert!(nesting_depth(hidden.as_bytes()) > MAX_DEPTH);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/yaml".parse().unwrap());
        let e = parse_body(&h, flow.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("at most 100"), "{e}");
        assert!(parse_body(&h, manifest).is_ok());
    }
}
