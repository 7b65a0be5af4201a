//! Services for the node's pods, without cluster DNS or a mesh: Kubernetes' environment
//! variables (`<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT`, the Docker-link `<SVC>_PORT...`), and a
//! proxy on the node that listens on each Service's address and carries every connection to the
//! cloud as a channel stream ([`sedge_api::ServiceConnectRequest`]); the cloud core joins it to
//! one of the Service's ready endpoints, wherever that runs.
//!
//! A Service's address is a loopback address of its own, `127.a.b.c` from a hash of its
//! namespace and name (Linux routes all of 127/8 to the loopback interface), and each of its
//! ports a proxy port in 30000-32767 from a hash too (see [`proxy_port`]): the variables carry
//! both, so `<SVC>_SERVICE_PORT` is the proxy's port, not the Service's. Pods on the node's network reach it (the process runtime's, and CRI
//! pods with `hostNetwork`); a CRI pod network does not reach the node's loopback. Offline, a
//! connection is refused at once: the endpoints are known to the cloud only.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sedge_api::tcp_frame::{CLOSE_WRITE, DATA};
use sedge_api::{ServiceConnectRequest, StreamOpen, kind};
use sedge_tunnel::stream;
use sedge_tunnel::{Message, op};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::ModuleContext;
use crate::portforward::Pumped;
use crate::store::MetaStore;

/// How often the proxy compares its listeners with the Services the node holds when no Service
/// changed (it compares them at once on a change). Every second, this listing was, with edged's,
/// an idle agent's main cost.
const RESYNC: Duration = Duration::from_secs(10);

/// How soon a listener that could not be opened is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// How long the cloud may take to accept a connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// FNV-1a: stable across builds and restarts.
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (i, p) in parts.iter().enumerate() {
        for b in p.bytes().chain((i + 1 < parts.len()).then_some(b'/')) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// The port the node's proxy serves a Service port on: one of 30000-32767 (Kubernetes'
/// NodePort range), not the Service's own port. Pods on the node's network bind their ports on
/// all addresses, and a listener of ours on the same port, even on another loopback address,
/// would keep them from it.
pub fn proxy_port(namespace: &str, name: &str, port: u16) -> u16 {
    30000 + (fnv(&[namespace, name, &port.to_string()]) % 2768) as u16
}

/// The node-local address of Service `namespace/name`.
pub fn address(namespace: &str, name: &str) -> Ipv4Addr {
    let [a, b, c, _] = fnv(&[namespace, name]).to_be_bytes();
    // Never 127.0.x.x (127.0.0.1 is the node's own) nor a .0 or .255 host.
    Ipv4Addr::new(127, 1 + a % 254, b, 1 + c % 254)
}

/// Whether a Service gets an address and variables: not headless, not ExternalName.
fn proxied(svc: &Value) -> bool {
    svc["spec"]["clusterIP"] != "None" && svc["spec"]["type"] != "ExternalName"
}

fn tcp_ports(svc: &Value) -> Vec<(u16, String)> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p["port"].as_u64()?).ok()?;
            Some((port, p["name"].as_str().unwrap_or_default().to_string()))
        })
        .collect()
}

/// The Service variables of a pod in `namespace`, as the kubelet writes them (before the
/// container's own `env`, which wins). None when the pod sets `enableServiceLinks: false`.
pub fn env(store: &MetaStore, pod: &Value) -> Vec<(String, String)> {
    if pod["spec"]["enableServiceLinks"] == false {
        return Vec::new();
    }
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let mut out = Vec::new();
    for svc in store.list(kind::SERVICE, Some(ns)).unwrap_or_default() {
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let ports = tcp_ports(&svc);
        if !proxied(&svc) || ports.is_empty() || name.is_empty() {
            continue;
        }
        let ip = address(ns, name);
        let up = name.to_ascii_uppercase().replace('-', "_");
        let at = |port: u16| proxy_port(ns, name, port);
        out.push((format!("{up}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{up}_SERVICE_PORT"), at(ports[0].0).to_string()));
        for (port, pname) in &ports {
            if !pname.is_empty() {
                let p = pname.to_ascii_uppercase().replace('-', "_");
                out.push((format!("{up}_SERVICE_PORT_{p}"), at(*port).to_string()));
            }
        }
        out.push((
            format!("{up}_PORT"),
            format!("tcp://{ip}:{}", at(ports[0].0)),
        ));
        // Named by the Service's port, as Kubernetes names them; the values are the proxy's.
        for (port, _) in &ports {
            let base = format!("{up}_PORT_{port}_TCP");
            out.push((base.clone(), format!("tcp://{ip}:{}", at(*port))));
            out.push((format!("{base}_PROTO"), "tcp".into()));
            out.push((format!("{base}_PORT"), at(*port).to_string()));
            out.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// Runs the node's service proxy until the agent stops.
pub async fn run(ctx: ModuleContext) {
    let mut listeners: HashMap<(String, String, u16), JoinHandle<()>> = HashMap::new();
    let mut changes = ctx.store.subscribe();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            open = crate::store::next_change_of(&mut changes, kind::SERVICE) => if !open { return },
            _ = tokio::time::sleep(wait) => {}
        }
        if !crate::store::skip_queued(&mut changes) {
            return;
        }
        wait = RESYNC;
        let store = ctx.store.clone();
        let services = tokio::task::spawn_blocking(move || store.list(kind::SERVICE, None))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut want = HashMap::new();
        for svc in services.iter().filter(|s| proxied(s)) {
            let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = svc["metadata"]["name"].as_str().unwrap_or_default();
            for (port, _) in tcp_ports(svc) {
                want.insert((ns.to_string(), name.to_string(), port), ());
            }
        }
        listeners.retain(|k, task| {
            let keep = want.contains_key(k) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for key in want.into_keys() {
            if listeners.contains_key(&key) {
                continue;
            }
            let addr =
                SocketAddr::from((address(&key.0, &key.1), proxy_port(&key.0, &key.1, key.2)));
            match listen(addr) {
                Ok(l) => {
                    tracing::debug!(service = %format!("{}/{}", key.0, key.1), %addr, "service proxy listening");
                    listeners.insert(key.clone(), tokio::spawn(serve(l, ctx.clone(), key)));
                }
                Err(e) => {
                    wait = RETRY;
                    tracing::warn!(service = %format!("{}/{}", key.0, key.1), %addr, error = %e, "service proxy cannot listen; retrying")
                }
            }
        }
    }
}

/// A listener that shares its address with the other agents of this machine (`sedge up` runs
/// several): the kernel spreads connections over them, and each carries its own to the cloud.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

async fn serve(l: tokio::net::TcpListener, ctx: ModuleContext, key: (String, String, u16)) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let req = ServiceConnectRequest {
            namespace: key.0.clone(),
            service: key.1.clone(),
            port: key.2,
        };
        tokio::spawn(connect(conn, ctx.clone(), req));
    }
}

/// One pod connection: a stream to the cloud, relayed both ways.
async fn connect(conn: tokio::net::TcpStream, ctx: ModuleContext, req: ServiceConnectRequest) {
    let who = format!("{}/{}:{}", req.namespace, req.service, req.port);
    let mut open = Message::new(
        stream::GROUP,
        stream::op::OPEN,
        "",
        serde_json::to_vec(&StreamOpen::Service(req)).unwrap_or_default(),
    );
    let id = format!("svc-{}", open.id);
    open.route.resource = id.clone();
    let send: stream::Sender = {
        let ctx = ctx.clone();
        Arc::new(move |msg| {
            let ctx = ctx.clone();
            Box::pin(async move { ctx.send_now(msg).await })
        })
    };
    if ctx.streams.len() >= crate::exec::MAX_STREAMS {
        tracing::warn!(service = %who, "too many streams open; connection refused");
        return;
    }
    let Some(s) = ctx.streams.register(&id, crate::CLOUD_PEER, send) else {
        return;
    };
    let stream::Stream { mut reader, writer } = s;
    match ctx.request(open, OPEN_TIMEOUT).await {
        Ok(r) if r.route.operation != op::ERROR => {}
        Ok(r) => {
            tracing::info!(service = %who, reason = %String::from_utf8_lossy(&r.content), "service connection refused by the cloud");
            return writer.close(None).await;
        }
        Err(e) => {
            tracing::info!(service = %who, error = %e, "service connection needs the cloud");
            return writer.close(None).await;
        }
    }
    let _ = conn.set_nodelay(true);
    let (mut rd, mut wr) = conn.into_split();
    let out = async {
        match crate::portforward::tcp_to_stream(&mut rd, &writer).await {
            Pumped::StreamClosed => {}
            Pumped::Eof | Pumped::ReadFailed(_) => {
                // The pod sends no more; the answer may still come.
                let _ = writer.send(bytes::Bytes::from_static(&[CLOSE_WRITE])).await;
                std::future::pending::<()>().await;
            }
        }
    };
    let back = async {
        while let Some(Ok(f)) = reader.recv().await {
            if f.first() == Some(&DATA) && wr.write_all(&f[1..]).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        () = out => {}
        () = back => {}
    }
    writer.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stable_loopback_and_not_the_nodes_own() {
        let a = address("default", "web");
        assert_eq!(a, address("default", "web"));
        assert_ne!(a, address("default", "api"));
        assert!(a.is_loopback() && a.octets()[1] != 0);
        assert!(a.octets()[3] != 0 && a.octets()[3] != 255);
    }

    #[test]
    fn variables_follow_the_kubelet() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("m.db")).unwrap();
        let svc = serde_json::json!({"metadata": {"name": "my-web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80}, {"port": 81, "protocol": "UDP"}]}});
        store
            .upsert(kind::SERVICE, "default", "my-web", "1", &svc)
            .unwrap();
        let headless = serde_json::json!({"metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}});
        store
            .upsert(kind::SERVICE, "default", "db", "1", &headless)
            .unwrap();
        let pod = serde_json::json!({"metadata": {"namespace": "default"}, "spec": {}});
        let env: HashMap<String, String> = env(&store, &pod).into_iter().collect();
        let ip = address("default", "my-web").to_string();
        let port = proxy_port("default", "my-web", 80);
        assert!((30000..=32767).contains(&port));
        assert_eq!(env["MY_WEB_SERVICE_HOST"], ip);
        assert_eq!(env["MY_WEB_SERVICE_PORT"], port.to_string());
        assert_eq!(env["MY_WEB_SERVICE_PORT_HTTP"], port.to_string());
        assert_eq!(env["MY_WEB_PORT"], format!("tcp://{ip}:{port}"));
        assert_eq!(env["MY_WEB_PORT_80_TCP_ADDR"], ip);
        assert!(!env.contains_key("DB_SERVICE_HOST"));
        assert!(!env.keys().any(|k| k.contains("81")));
        let off = serde_json::json!({"metadata": {"namespace": "default"}, "spec": {"enableServiceLinks": false}});
        assert!(super::env(&store, &off).is_empty());
    }
}
