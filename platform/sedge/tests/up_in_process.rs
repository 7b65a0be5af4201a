//! `sedge up` started in process through the library (no binary): the embedded API server, the
//! cloud core and one edge agent, each on a port the OS picks; the node registers and reports
//! Ready, `up.json` names every endpoint, and stopping releases them.

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use sedge::platform::{Up, UpArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_in_process_and_its_node_turns_ready() {
    let dir = tempfile::tempdir().unwrap();
    let args = UpArgs::local(dir.path());
    let up = Up::start(&args).await.unwrap();
    let client = sedge::platform::client_from(&up.server.kubeconfig)
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client);
    sedge_testkit::wait::until_async(
        "edge-1 Ready",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get_opt("edge-1").await.ok()??;
                let conds = n.status?.conditions?;
                conds
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())
            }
        },
    )
    .await;
    // The cloud core caches the Node without its field managers' records (lists::slim): the
    // API server keeps them, the cache has no use for them.
    let stored = nodes.get("edge-1").await.unwrap();
    assert!(
        stored
            .metadata
            .managed_fields
            .as_ref()
            .is_some_and(|m| !m.is_empty()),
        "the API server records the node's field managers: {:?}",
        stored.metadata
    );
    let cached = up
        .cloud
        .cache
        .nodes
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some("edge-1"))
        .expect("the cloud core caches edge-1");
    assert_eq!(cached.metadata.managed_fields, None);
    assert_eq!(cached.metadata.labels, stored.metadata.labels);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("up.json")).unwrap())
            .unwrap();
    assert_eq!(state["edges"][0]["node"], "edge-1");
    let metrics = state["edges"][0]["metrics"].as_str().unwrap();
    let addr = metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let body = get(addr, "/metrics").await;
    assert!(body.contains("edged_pods"), "{body}");
    // KubeEdge's device resources are served: a v1beta1 DeviceModel and Device apply unchanged
    // and `kubectl get devices` answers "is it alive?" in its columns.
    let kubeconfig = up.server.kubeconfig.clone();
    let manifests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../devices/tests/manifests/modbus-thermometer.yaml"
    );
    let kubectl = move |args: &[&str]| common::kubectl_at(&kubeconfig, args);
    let applied = tokio::task::spawn_blocking(move || {
        (
            kubectl(&["apply", "-f", manifests]),
            kubectl(&["get", "devices"]),
        )
    })
    .await
    .unwrap();
    assert!(
        applied
            .0
            .contains("device.devices.kubeedge.io/thermometer-1 created"),
        "{}",
        applied.0
    );
    let header = applied.1.lines().next().unwrap_or_default().to_string();
    for column in [
        "NAME",
        "NODE",
        "PROTOCOL",
        "STATE",
        "LAST-ONLINE",
        "REPORTED",
        "AGE",
    ] {
        assert!(header.contains(column), "{}", applied.1);
    }
    assert!(
        applied.1.contains("thermometer-1")
            && applied.1.contains("edge-1")
            && applied.1.contains("modbus"),
        "{}",
        applied.1
    );
    let hub = state["hub"].as_str().unwrap().to_string();
    up.stop().await;
    // Stopped means the hub's port is closed.
    assert!(tokio::net::TcpStream::connect(&hub).await.is_err());
}

async fn get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
