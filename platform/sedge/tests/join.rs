//! `sedge token` and `sedge join` as users run them, against a real hub.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn sedge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("sedge runs")
}

fn dirs(d: &Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        d.join("hub").display().to_string(),
        "--pki-dir".into(),
        d.join("pki").display().to_string(),
    ]
}

fn run(args: Vec<String>) -> (bool, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = sedge(&a);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_created_listed_used_and_revoked() {
    let d = tempfile::tempdir().unwrap();
    let tok = |extra: &[&str]| {
        let mut a: Vec<String> = vec!["token".into(), extra[0].into()];
        a.extend(dirs(d.path()));
        a.extend(extra[1..].iter().map(|s| s.to_string()));
        a
    };
    let (ok, token, err) = run(tok(&["create", "--ttl", "1h", "--description", "site-a"]));
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.contains('.'), "{token}");

    // The hub uses the same database and CA.
    let hub = sedge_tunnel::Hub::start(
        sedge_tunnel::HubConfig {
            data_dir: d.path().join("hub"),
            pki_dir: d.path().join("pki"),
            listen: "127.0.0.1:0".into(),
            listen_quic: String::new(),
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let cloud = hub.addr().to_string();
    let edge_dir = d.path().join("edge").display().to_string();
    let join = |token: &str, node: &str| {
        run([
            "join",
            "--cloud",
            &cloud,
            "--token",
            token,
            "--node-name",
            node,
            "--data-dir",
            &edge_dir,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    };
    let (ok, out, err) = tokio::task::block_in_place(|| join(&token, "edge-1"));
    assert!(ok, "{err}");
    assert!(out.contains("joined as node edge-1"), "{out}");
    assert!(d.path().join("edge/pki/node.crt").exists());

    let (ok, list, _) = run(tok(&["list"]));
    assert!(ok);
    // Single use by default: spent by edge-1, refused for a second node.
    assert!(
        list.contains("site-a")
            && list.contains("used")
            && list.contains("1/1")
            && list.contains("edge-1"),
        "{list}"
    );
    let other_dir = d.path().join("edge-x").display().to_string();
    let second = run([
        "join",
        "--cloud",
        &cloud,
        "--token",
        &token,
        "--node-name",
        "edge-x",
        "--data-dir",
        &other_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect());
    let (ok, _, err) = tokio::task::block_in_place(|| second);
    assert!(!ok);
    assert!(
        err.contains("all it allows") && err.contains("--max-uses"),
        "{err}"
    );
    let id = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (ok, _, err) = run(tok(&["revoke", &id]));
    assert!(ok, "{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| join(&token, "edge-2"));
    assert!(!ok);
    assert!(err.contains("revoked"), "{err}");

    // Bad input names what was wrong.
    let (ok, _, err) = run(tok(&["create", "--ttl", "10y"]));
    assert!(!ok);
    assert!(err.contains("unit \"y\" is not one of s, m, h, d"), "{err}");
    let (ok, _, err) = run(tok(&["create", "--max-uses", "0"]));
    assert!(!ok);
    assert!(err.contains("at least 1"), "{err}");
    let (ok, _, err) = run(tok(&["create", "--max-uses", "3", "--node", "edge-1"]));
    assert!(!ok);
    assert!(err.contains("do not go together"), "{err}");
    let (ok, _, err) = run(tok(&["create", "--node", "Edge_1"]));
    assert!(!ok);
    assert!(err.contains("not a lower-case DNS name"), "{err}");
    let (ok, _, err) = run(tok(&["revoke", "nope"]));
    assert!(!ok);
    assert!(err.contains("no token \"nope\""), "{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| join("garbage", "Edge_1"));
    assert!(!ok);
    assert!(err.contains("not a lower-case DNS name"), "{err}");
    hub.shutdown().await;
}

/// A Node deleted while no cloud core is running: when one starts again, the node's certificates
/// are revoked (as `kubectl delete node` does while it runs); a node that joined but has not
/// registered its Node yet is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_the_cloud_core_was_down_is_revoked_when_it_returns() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, DeleteParams, PostParams};
    use sedge_cloudcore::{CloudCore, CloudCoreConfig};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let config = || {
        let mut cc = CloudCoreConfig::default();
        cc.hub.data_dir = dir.path().join("cloudhub");
        cc.hub.pki_dir = dir.path().join("apiserver/pki");
        cc.hub.listen = "127.0.0.1:0".into();
        cc.hub.listen_quic = String::new();
        cc
    };
    async fn until(what: &str, f: impl Fn() -> bool) {
        sedge_testkit::wait::until_async(
            what,
            Duration::from_secs(30),
            Duration::from_millis(100),
            || std::future::ready(f().then_some(())),
        )
        .await
    }
    let cloud = CloudCore::start(client.clone(), config(), Vec::new())
        .await
        .unwrap();
    // Two nodes joined (their certificates recorded as a join records them); one registers.
    for node in ["edge-1", "edge-2"] {
        let (tok, info) = cloud
            .hub
            .tokens()
            .create(Duration::from_secs(300), "t")
            .unwrap();
        cloud.hub.tokens().admit(&tok, node, false).unwrap();
        cloud
            .hub
            .tokens()
            .record_cert(format!("cert-{node}").as_bytes(), node, &info.id, i64::MAX)
            .unwrap();
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "edge-1"}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let tokens = cloud.hub.clone();
    until("edge-1 to be recorded as seen", || {
        tokens.tokens().gone(&Default::default()).unwrap() == vec!["edge-1".to_string()]
    })
    .await;
    cloud.shutdown().await;

    // Deleted while no cloud core runs.
    nodes
        .delete("edge-1", &DeleteParams::default())
        .await
        .unwrap();
    let cloud = CloudCore::start(client.clone(), config(), Vec::new())
        .await
        .unwrap();
    let hub = cloud.hub.clone();
    until("edge-1's certificate to be revoked", || {
        hub.tokens().is_revoked(b"cert-edge-1")
    })
    .await;
    assert!(
        !hub.tokens().is_revoked(b"cert-edge-2"),
        "a node that never registered its Node is not taken for a deleted one"
    );
    cloud.shutdown().await;
    server.shutdown().await;
}

#[test]
fn a_token_command_with_a_bad_kubeconfig_names_it() {
    let d = tempfile::tempdir().unwrap();
    let garbage = d.path().join("garbage.yaml");
    std::fs::write(&garbage, "clusters: [this is: not a kubeconfig\n").unwrap();
    let missing = d.path().join("missing.yaml");
    for (kubeconfig, sub) in [
        (&missing, "create"),
        (&garbage, "list"),
        (&garbage, "revoke"),
    ] {
        let mut args: Vec<String> = vec!["token".into(), sub.into()];
        if sub == "revoke" {
            args.push("0123456789ab".into());
        }
        args.extend([
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--pki-dir".into(),
            d.path().join("pki").display().to_string(),
        ]);
        let (ok, out, err) = run(args);
        assert!(!ok, "{sub} with {}: {out}", kubeconfig.display());
        assert!(
            err.contains(&format!("reading kubeconfig {}", kubeconfig.display())),
            "{sub}: {err}"
        );
        let lower = err.to_lowercase();
        assert!(
            !lower.contains("panicked") && !lower.contains("backtrace"),
            "{err}"
        );
    }
}
