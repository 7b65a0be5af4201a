//! The MetaServer: get, list and watch of the objects this node holds, in the Kubernetes REST
//! shape, served from the local SQLite store on a localhost port. Edge applications (and
//! `kubectl --server http://127.0.0.1:10550`) read them with the cloud away.
//!
//! Served: `/version`, `/healthz`, `/api`, `/apis`, `/api/v1`, and for `pods`, `configmaps`,
//! `secrets` (namespaced) and `nodes` (this node): list (all namespaces or one), get, and
//! `?watch=true` (newline-delimited watch events, starting with the current objects).
//! `labelSelector` with `key=value` terms is honoured. Read-only: writes get 405. Reads need a
//! token (see [`crate::podtoken`]): the node administrator's (`metaserver.token`) or a pod's on
//! this node (`SEDGE_POD_TOKEN`); with `metaserver_anonymous_reads` anyone local reads pods,
//! config maps and the node. Secrets always need one: the administrator's reads any, a pod's only
//! those its spec references. Discovery and health answer anyone. Requests must be addressed to
//! this server (`Host`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::store::MetaStore;

struct App {
    store: Arc<MetaStore>,
    addr: SocketAddr,
    tokens: Arc<crate::podtoken::PodTokens>,
    anonymous_reads: bool,
}

const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("pods", "pod", "Pod", true),
    ("configmaps", "configmap", "ConfigMap", true),
    ("secrets", "secret", "Secret", true),
    ("nodes", "node", "Node", false),
];

/// Starts the MetaServer on `listen`; returns the bound address and the serving task.
pub async fn start(
    listen: &str,
    store: Arc<MetaStore>,
    tokens: Arc<crate::podtoken::PodTokens>,
    anonymous_reads: bool,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind(listen).await?;
    let addr = l.local_addr()?;
    let app = Arc::new(App {
        store,
        addr,
        tokens,
        anonymous_reads,
    });
    let router = axum::Router::new().fallback(dispatch).with_state(app);
    let task = tokio::spawn(sedge_serve::serve(
        l,
        router,
        sedge_serve::Limits::default(),
        std::future::pending(),
    ));
    Ok((addr, task))
}

/// Who may read pods, config maps and the node: the node's administrator or a pod on this node
/// (anyone local, with `metaserver_anonymous_reads`).
fn read_access(app: &App, token: Option<&str>) -> Result<(), (StatusCode, &'static str, String)> {
    if app.anonymous_reads {
        return Ok(());
    }
    let Some(token) = token else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "reading from the MetaServer needs a token: a pod's SEDGE_POD_TOKEN, or the node's metaserver.token (Authorization: Bearer ...)".into(),
        ));
    };
    if app.tokens.is_admin(token) || pod_of(app, token).is_some() {
        return Ok(());
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "the token is not this node's administrator's nor any pod's on this node".into(),
    ))
}

/// The pod on this node whose token this is.
fn pod_of(app: &App, token: &str) -> Option<Value> {
    app.store
        .list(sedge_api::kind::POD, None)
        .unwrap_or_default()
        .into_iter()
        .find(|p| {
            app.tokens
                .verify(p["metadata"]["uid"].as_str().unwrap_or_default(), token)
        })
}

/// Who may read Secrets: the node's administrator (`<data_dir>/metaserver.token`) any of them;
/// a pod (its `SEDGE_POD_TOKEN`) only those its own spec references, one by name. Anyone else
/// reads pods, config maps and nodes, as before, but no Secret.
fn secret_access(
    app: &App,
    token: Option<&str>,
    ns: Option<&str>,
    name: Option<&str>,
) -> Result<(), (StatusCode, &'static str, String)> {
    let Some(token) = token else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "reading Secrets needs a token: a pod's SEDGE_POD_TOKEN, or the node's metaserver.token (Authorization: Bearer ...)".into(),
        ));
    };
    if app.tokens.is_admin(token) {
        return Ok(());
    }
    let Some(pod) = pod_of(app, token) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the token is not this node's administrator's nor any pod's on this node".into(),
        ));
    };
    let pod_ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    match (ns, name) {
        (Some(ns), Some(name))
            if ns == pod_ns && sedge_api::pod_references(&pod["spec"], "secrets", name) =>
        {
            Ok(())
        }
        _ => Err((
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "pod {pod_ns}/{pod_name} may read only the Secrets its spec references, one by name"
            ),
        )),
    }
}

/// Whether a `Host` header names this server: a loopback name or address, or the bound
/// address, with or without the port.
fn host_allowed(host: &str, addr: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == addr.ip())
}

fn json_resp(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    json_resp(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn labels_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, v, true)
        } else {
            return obj["metadata"]["labels"][term.trim()].is_string();
        };
        (obj["metadata"]["labels"][k.trim()].as_str() == Some(v.trim())) == eq
    })
}

async fn dispatch(
    State(app): State<Arc<App>>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if !host_allowed(host, app.addr) {
        // A page in a browser on this machine that resolves its own name to 127.0.0.1 (DNS
        // rebinding) sends its own name here: it gets nothing.
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("Host {host:?} is not this node's MetaServer ({})", app.addr),
        );
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the edge MetaServer is read-only; write through the cloud API server".into(),
        );
    }
    let token = crate::podtoken::bearer(req.headers()).map(String::from);
    let token = token.as_deref();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => "ok".into_response(),
        ["version"] => json_resp(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0+sedge-edge", "platform": "linux/amd64"}),
        ),
        ["api"] => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.addr.to_string()}]}),
        ),
        ["apis"] => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .map(|(plural, kind, k, namespaced)| {
                    json!({"name": plural, "singularName": kind, "namespaced": namespaced, "kind": k,
                           "verbs": ["get", "list", "watch"]})
                })
                .collect();
            json_resp(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": resources}),
            )
        }
        ["api", "v1", plural] => serve(&app, token, plural, None, None, &params).await,
        ["api", "v1", plural, name] if *plural == "nodes" => {
            serve(&app, token, plural, None, Some(name), &params).await
        }
        ["api", "v1", "namespaces", ns, plural] => {
            serve(&app, token, plural, Some(ns), None, &params).await
        }
        ["api", "v1", "namespaces", ns, plural, name] => {
            serve(&app, token, plural, Some(ns), Some(name), &params).await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        ),
    }
}

async fn serve(
    app: &Arc<App>,
    token: Option<&str>,
    plural: &str,
    ns: Option<&str>,
    name: Option<&str>,
    params: &HashMap<String, String>,
) -> Response {
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let access = if plural == "secrets" {
        secret_access(app, token, ns, name.filter(|_| !watch))
    } else {
        read_access(app, token)
    };
    if let Err((code, reason, message)) = access {
        return status(code, reason, message);
    }
    let Some(&(_, kind, k, namespaced)) = RESOURCES.iter().find(|r| r.0 == plural) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the edge MetaServer does not serve {plural:?} (it serves pods, configmaps, secrets, nodes)"
            ),
        );
    };
    let ns_key = if namespaced {
        ns
    } else {
        Some(sedge_api::CLUSTER_NS)
    };
    let selector = params.get("labelSelector");
    if watch {
        let rx = app.store.subscribe();
        let current = app.store.list(kind, ns_key).unwrap_or_default();
        let (ns, name, selector) = (
            ns.map(String::from),
            name.map(String::from),
            selector.cloned(),
        );
        let kind = kind.to_string();
        let keep = move |o: &Value| {
            name.as_ref()
                .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
                && labels_match(o, selector.as_ref())
        };
        let keep2 = keep.clone();
        let initial: Vec<Result<String, std::io::Error>> = current
            .into_iter()
            .filter(|o| keep(o))
            .map(|o| Ok(format!("{}\n", json!({"type": "ADDED", "object": o}))))
            .collect();
        let live = live_changes(rx, kind, ns, keep2);
        let body = futures::stream::iter(initial).chain(live);
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(body),
        )
            .into_response();
    }
    match name {
        Some(n) => match app.store.get(kind, ns_key.unwrap_or_default(), n) {
            Ok(Some(o)) => json_resp(StatusCode::OK, &o),
            Ok(None) => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{plural} \"{n}\" not found"),
            ),
            Err(e) => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            ),
        },
        None => match app.store.list(kind, ns_key) {
            Ok(items) => {
                let items: Vec<Value> = items
                    .into_iter()
                    .filter(|o| labels_match(o, selector))
                    .collect();
                let rv = app.store.revision().unwrap_or(0);
                json_resp(
                    StatusCode::OK,
                    &json!({"kind": format!("{k}List"), "apiVersion": "v1",
                            "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                )
            }
            Err(e) => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            ),
        },
    }
}

/// A watch's events after its initial list: the changes of `kind` (in `ns`, if given) that
/// `keep` picks, one JSON line each. A watcher that fell more than
/// [`crate::store::CHANGES_QUEUED`] changes behind has missed some: its watch ends there, and
/// its client lists again (as after any ended watch) instead of going on without them.
fn live_changes(
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::store::Change>>,
    kind: String,
    ns: Option<String>,
    keep: impl Fn(&Value) -> bool + Clone + Send + 'static,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::unfold(rx, move |mut rx| {
        let (ns, kind, keep) = (ns.clone(), kind.clone(), keep.clone());
        async move {
            loop {
                let c = rx.recv().await.ok()?;
                if c.kind == kind
                    && ns.as_ref().is_none_or(|n| *n == c.namespace)
                    && keep(&c.object)
                {
                    let line = format!(
                        "{}\n",
                        json!({"type": c.kind_of_change, "object": c.object})
                    );
                    return Some((Ok(line), rx));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_servers_names_are_accepted_as_host() {
        let addr: SocketAddr = "127.0.0.1:10550".parse().unwrap();
        for ok in [
            "127.0.0.1:10550",
            "localhost:10550",
            "LOCALHOST",
            "[::1]:10550",
            "127.0.0.2",
        ] {
            assert!(host_allowed(ok, addr), "{ok}");
        }
        for bad in [
            "evil.example:10550",
            "",
            "10.0.0.1:10550",
            "localhost.evil.example",
        ] {
            assert!(!host_allowed(bad, addr), "{bad}");
        }
        let lan: SocketAddr = "10.0.0.1:10550".parse().unwrap();
        assert!(host_allowed("10.0.0.1:10550", lan));
    }

    #[tokio::test]
    async fn a_watch_that_fell_behind_ends_instead_of_skipping_changes() {
        use crate::store::Change;
        use futures::StreamExt;
        let change = |kind: &str, ns: &str, n: usize| {
            Arc::new(Change {
                kind_of_change: "ADDED",
                kind: kind.into(),
                namespace: ns.into(),
                name: format!("cm-{n}"),
                object: json!({"metadata": {"name": format!("cm-{n}"), "namespace": ns}}),
                revision: n as u64,
            })
        };
        let keep = |_: &Value| true;
        // A watcher keeping up sees each change of its kind and namespace, in order.
        let (tx, rx) = tokio::sync::broadcast::channel(4);
        tx.send(change("configmap", "other", 9)).unwrap();
        tx.send(change("pod", "ml", 9)).unwrap();
        for n in 0..2 {
            tx.send(change("configmap", "ml", n)).unwrap();
        }
        let live = live_changes(rx, "configmap".into(), Some("ml".into()), keep);
        let lines: Vec<String> = live.take(2).map(Result::unwrap).collect().await;
        for (n, line) in lines.iter().enumerate() {
            let ev: Value = serde_json::from_str(line).unwrap();
            assert_eq!(ev["type"], "ADDED");
            assert_eq!(ev["object"]["metadata"]["name"], format!("cm-{n}"));
        }
        // One that fell more than the queue behind gets no later change: its watch ends
        // (with the sender alive, a watch that skipped on would wait here for more).
        let rx = tx.subscribe();
        for n in 0..6 {
            tx.send(change("configmap", "ml", n)).unwrap();
        }
        let live = live_changes(rx, "configmap".into(), Some("ml".into()), keep);
        let lines =
            tokio::time::timeout(std::time::Duration::from_secs(5), live.collect::<Vec<_>>())
                .await
                .expect("the watch ended");
        assert!(lines.is_empty(), "{} changes after a gap", lines.len());
        drop(tx);
    }

    async fn get(addr: SocketAddr, path: &str, host: &str, token: Option<&str>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn secrets_only_to_the_pods_that_use_them_and_the_node_admin() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(MetaStore::open(&d.path().join("meta.db")).unwrap());
        let tokens = Arc::new(crate::podtoken::PodTokens::load_or_create(d.path()).unwrap());
        store
            .upsert("pod", "default", "app", "1", &json!({"metadata": {"name": "app", "namespace": "default", "uid": "u-app"},
                "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}}]}]}}))
            .unwrap();
        for name in ["db", "other"] {
            store
                .upsert("secret", "default", name, "1", &json!({"metadata": {"name": name, "namespace": "default"}, "data": {"p": "eA=="}}))
                .unwrap();
        }
        let (addr, task) = start("127.0.0.1:0", store.clone(), tokens.clone(), false)
            .await
            .unwrap();
        let host = addr.to_string();
        let app = tokens.token("u-app");
        let admin = std::fs::read_to_string(d.path().join("metaserver.token")).unwrap();
        let secret = |n: &str| format!("/api/v1/namespaces/default/secrets/{n}");
        // The attack: any local process reading Secrets.
        let r = get(addr, &secret("db"), &host, None).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let r = get(addr, "/api/v1/secrets", &host, Some(&"0".repeat(64))).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        // The pod: its own Secret by name, nothing else.
        let r = get(addr, &secret("db"), &host, Some(&app)).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("eA=="), "{r}");
        for path in [
            secret("other"),
            "/api/v1/namespaces/default/secrets".into(),
            "/api/v1/secrets?watch=true".into(),
        ] {
            let r = get(addr, &path, &host, Some(&app)).await;
            assert!(
                r.starts_with("HTTP/1.1 403") && r.contains("only the Secrets its spec references"),
                "{path}: {r}"
            );
        }
        // The node's administrator reads them all.
        let r = get(
            addr,
            "/api/v1/namespaces/default/secrets",
            &host,
            Some(admin.trim()),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("other"), "{r}");
        // Pods, config maps and the node: this node's pods and its administrator, no one else.
        for path in [
            "/api/v1/pods",
            "/api/v1/namespaces/default/configmaps",
            "/api/v1/nodes",
        ] {
            let r = get(addr, path, &host, None).await;
            assert!(r.starts_with("HTTP/1.1 401"), "{path}: {r}");
            let r = get(addr, path, &host, Some(&tokens.token("u-gone"))).await;
            assert!(
                r.starts_with("HTTP/1.1 401"),
                "a pod not on this node: {path}: {r}"
            );
            for t in [app.as_str(), admin.trim()] {
                let r = get(addr, path, &host, Some(t)).await;
                assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
            }
        }
        // Discovery and health answer anyone (kubectl asks before it lists).
        for path in ["/version", "/api", "/api/v1", "/healthz"] {
            let r = get(addr, path, &host, None).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        }
        // DNS rebinding: another name for this address gets nothing.
        let r = get(addr, "/api/v1/pods", "evil.example", Some(admin.trim())).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        task.abort();

        // Anonymous reads, when the node is configured for them: no Secret still.
        let (addr, task) = start("127.0.0.1:0", store, tokens.clone(), true)
            .await
            .unwrap();
        let host = addr.to_string();
        let r = get(addr, "/api/v1/pods", &host, None).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("u-app"), "{r}");
        let r = get(addr, &secret("db"), &host, None).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        task.abort();
    }
}
