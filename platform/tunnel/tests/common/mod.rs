//! Shared set-up for the channel's integration tests: a hub and joined edges on loopback
//! ports chosen by the OS, with short keepalives.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sedge_tunnel::{
    EdgeConfig, EdgeHub, EdgeOptions, Hub, HubConfig, HubOptions, Incoming, Message, OwnerLookup,
    Transport, op,
};

/// Waits for `cond` with a deadline, checking every 20 ms.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, secs: u64, mut cond: F) {
    sedge_testkit::wait::until_async(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(20),
        || std::future::ready(cond().then_some(())),
    )
    .await
}

/// Like [`wait_for`] with an async condition.
pub async fn wait_async<F, Fut>(what: &str, secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    sedge_testkit::wait::until_async(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(20),
        || {
            let c = cond();
            async move { c.await.then_some(()) }
        },
    )
    .await
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn hub_config(dir: &Path) -> HubConfig {
    HubConfig {
        data_dir: dir.join("hub"),
        pki_dir: dir.join("pki"),
        listen: "127.0.0.1:0".into(),
        listen_quic: "127.0.0.1:0".into(),
        keepalive_interval_ms: 200,
        dead_after_intervals: 3,
        ack_timeout_ms: 400,
        max_retry_backoff_ms: 2_000,
        handshake_timeout_ms: 3_000,
        ..Default::default()
    }
}

/// What the cloud's handler saw.
pub type Inbox = Arc<Mutex<Vec<Incoming>>>;

/// A hub whose handler records messages and answers queries with `pong:<content>`; pods named
/// `web*` in `default` belong to edge-1.
pub async fn start_hub(cfg: HubConfig) -> (Hub, Inbox) {
    start_hub_with(cfg, None).await
}

/// [`start_hub`], with `owners_known` telling the hub whether its owner lookup is complete.
pub async fn start_hub_with(
    cfg: HubConfig,
    owners_known: Option<sedge_tunnel::hub::OwnersKnown>,
) -> (Hub, Inbox) {
    let inbox: Inbox = Arc::default();
    let seen = inbox.clone();
    let handler = sedge_tunnel::handler(move |i: Incoming| {
        let seen = seen.clone();
        async move {
            let reply = (i.message.route.operation == op::QUERY).then(|| {
                i.message.reply(
                    op::RESPONSE,
                    format!("pong:{}", String::from_utf8_lossy(&i.message.content)),
                )
            });
            seen.lock().unwrap().push(i);
            Ok(reply)
        }
    });
    let owners: OwnerLookup = Arc::new(|kind, ns, name| {
        (matches!(kind, "pod" | "podstatus") && ns == "default" && name.starts_with("web"))
            .then(|| "edge-1".to_string())
    });
    let hub = Hub::start(
        cfg,
        HubOptions {
            handler: Some(handler),
            owner_of: Some(owners),
            owners_known,
            ..Default::default()
        },
    )
    .await
    .expect("hub starts");
    (hub, inbox)
}

pub fn edge_config(hub: &Hub, dir: &Path, node: &str, transport: Transport) -> EdgeConfig {
    EdgeConfig {
        node_name: node.into(),
        cloud: hub.addr().to_string(),
        cloud_quic: hub.quic_addr().map(|a| a.to_string()).unwrap_or_default(),
        transport,
        data_dir: dir.join(node),
        keepalive_interval_ms: 200,
        dead_after_intervals: 3,
        backoff_initial_ms: 50,
        backoff_max_ms: 500,
        ack_timeout_ms: 400,
        ..Default::default()
    }
}

/// Objects an edge holds: key -> (resourceVersion, content).
pub type EdgeStore = Arc<Mutex<HashMap<String, (String, String)>>>;

/// Starts an edge whose handler keeps objects in memory and answers queries with `edge-pong`.
pub async fn start_edge(cfg: EdgeConfig) -> (EdgeHub, EdgeStore) {
    let store: EdgeStore = Arc::default();
    let s = store.clone();
    let handler = sedge_tunnel::handler(move |i: Incoming| {
        let s = s.clone();
        async move {
            let m: Message = i.message;
            let mut st = s.lock().unwrap();
            Ok(match m.route.operation.as_str() {
                op::QUERY => Some(m.reply(op::RESPONSE, "edge-pong")),
                op::DELETE => {
                    st.remove(&m.route.resource);
                    None
                }
                _ => {
                    st.insert(
                        m.route.resource.clone(),
                        (
                            m.resource_version.clone(),
                            String::from_utf8_lossy(&m.content).into_owned(),
                        ),
                    );
                    None
                }
            })
        }
    });
    let edge = EdgeHub::start(
        cfg,
        EdgeOptions {
            handler: Some(handler),
            quic_endpoint: None,
            // What it holds, sent in each hello.
            inventory: Some({
                let store = store.clone();
                Arc::new(move || {
                    let s = store.lock().unwrap();
                    Ok(s.iter()
                        .map(|(k, (rv, _))| (k.clone(), rv.clone()))
                        .collect())
                })
            }),
        },
    )
    .await
    .expect("edge starts");
    (edge, store)
}

pub fn update(key: &str, rv: u64) -> Message {
    Message::new("resource", op::UPDATE, key, format!("{{\"v\":{rv}}}"))
        .with_version(rv.to_string())
}

pub fn token(hub: &Hub) -> String {
    hub.tokens()
        .create(Duration::from_secs(3600), "test")
        .expect("token")
        .0
}
