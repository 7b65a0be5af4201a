//! Offline autonomy: the link to the cloud is cut, the edge agent is killed with SIGKILL and
//! started again while offline; it rebuilds its pods from SQLite (adopting the process that
//! survived, restarting the one that died). Meanwhile the cloud changes a config map, deletes a
//! pod and creates another. When the link returns, the edge converges: nothing lost, nothing
//! run twice. The cloud marks the node unreachable in between and evicts nothing. Run twice: on
//! the process runtime, and on a CRI node with a private containerd.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sedge_cloudcore::CloudCore;
use sedge_testkit::containerd::Containerd;
use sedge_tunnel::fault::TcpFaultProxy;
use serde_json::{Value, json};

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(cfg: &Path, log: &Path) -> Agent {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sedge"))
            .arg("edge")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        Agent {
            child,
            log: log.to_path_buf(),
        }
    }
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let s = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            eprintln!(
                "--- edge agent log (tail):\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        self.kill9();
    }
}

/// Kills every process carrying the test's marker when the test ends, pass or fail.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in marked(&self.0) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// Processes whose environment has `MARK=<prefix>...`: (pid, the mark).
fn marked(prefix: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(m) = var.strip_prefix("MARK=")
                && m.starts_with(prefix)
            {
                out.push((pid, m.to_string()));
            }
        }
    }
    out
}

fn pids_with(prefix: &str, mark: &str) -> Vec<u32> {
    marked(prefix)
        .into_iter()
        .filter(|(_, m)| m == mark)
        .map(|(p, _)| p)
        .collect()
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    f: impl FnMut() -> F,
) -> T {
    sedge_testkit::wait::until_async(what, limit, Duration::from_millis(100), f).await
}

fn pod(name: &str, mark: &str, extra_env: Value) -> Pod {
    let mut env = vec![json!({"name": "MARK", "value": mark})];
    if let Some(a) = extra_env.as_array() {
        env.extend(a.iter().cloned());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "edge-1", "terminationGracePeriodSeconds": 2, "containers": [{
            "name": "c", "image": "busybox", "command": ["sh", "-c", "echo started $V; exec sleep 600"], "env": env,
        }]}
    }))
    .unwrap()
}

fn ready(n: &Node) -> Option<String> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_keeps_running_offline_and_converges_when_the_link_returns() {
    autonomy(None).await;
}

/// The same scenario on a CRI node: the pods are containers of a private containerd (their
/// processes, seen from the host, carry the same marks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cri_node_keeps_running_offline_and_converges_when_the_link_returns() {
    let Some(ctd) = Containerd::for_test("edge_autonomy on CRI") else {
        return;
    };
    ctd.import_test_images().unwrap();
    autonomy(Some(&ctd)).await;
}

async fn autonomy(cri: Option<&Containerd>) {
    let dir = tempfile::tempdir().unwrap();
    // Both variants run in this process at once: their marks must differ.
    let variant = if cri.is_some() { "cri" } else { "process" };
    let prefix = format!("autonomy-{}-{variant}-", std::process::id());
    let _reaper = Reaper(prefix.clone());
    let (server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let mut cc = common::cloudcore_config(dir.path());
    cc.hub.max_retry_backoff_ms = 1_000;
    cc.node_grace_seconds = 3;
    cc.node_monitor_period_ms = 300;
    let cloud = CloudCore::start(client.clone(), cc, Vec::new())
        .await
        .unwrap();
    let proxy = TcpFaultProxy::start(cloud.hub.addr()).await.unwrap();

    // Join through the proxy, then run the agent as its own process.
    let edge_dir = dir.path().join("edge-1");
    let tcfg = sedge_tunnel::EdgeConfig {
        node_name: "edge-1".into(),
        cloud: proxy.addr.to_string(),
        data_dir: edge_dir.clone(),
        ..Default::default()
    };
    let (token, _) = cloud
        .hub
        .tokens()
        .create(Duration::from_secs(300), "test")
        .unwrap();
    sedge_tunnel::join(&tcfg, &token).await.unwrap();
    let ms_port = sedge_testkit::port::free();
    let cfg = dir.path().join("edge.yaml");
    std::fs::write(
        &cfg,
        format!(
            "metaserver_listen: 127.0.0.1:{ms_port}\nmetrics_listen: 127.0.0.1:0\nnode_ip: 127.0.0.1\nsync_interval_ms: 200\nbackoff_initial_ms: 300\nlease_interval_ms: 500\n\
             tunnel:\n  node_name: edge-1\n  cloud: {}\n  data_dir: {}\n  keepalive_interval_ms: 500\n  backoff_initial_ms: 100\n  backoff_max_ms: 300\n  ack_timeout_ms: 500\n{}",
            proxy.addr,
            edge_dir.display(),
            cri.map(|c| format!("runtime: cri\ncri_socket: {}\n", c.socket.display()))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    let log = dir.path().join("edge.log");
    let mut agent = Agent::start(&cfg, &log);

    let nodes = Api::<Node>::all(client.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
    wait_for("edge-1 Ready", Duration::from_secs(30), || async {
        (ready(&nodes.get_opt("edge-1").await.ok()??)? == "True").then_some(())
    })
    .await;

    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"V": "v1"}}))
            .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let from_cm =
        json!([{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "V"}}}]);
    let (mark_a, mark_b, mark_c) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
    );
    pods.create(&PostParams::default(), &pod("a", &mark_a, from_cm.clone()))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b", &mark_b, json!([])))
        .await
        .unwrap();
    let running = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get_opt(name).await.ok()??;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        }
    };
    wait_for("a and b Running", Duration::from_secs(30), || async {
        running("a").await.and(running("b").await)
    })
    .await;
    let (a0, b0) = (pids_with(&prefix, &mark_a), pids_with(&prefix, &mark_b));
    assert_eq!((a0.len(), b0.len()), (1, 1), "one process per pod");

    // Outage: the link goes, the agent is SIGKILLed, and a's process dies with it (as after a
    // power cut); b's process survives the agent.
    proxy.faults.set_refuse(true);
    proxy.faults.cut();
    agent.kill9();
    let _ = Command::new("kill")
        .arg("-9")
        .arg(a0[0].to_string())
        .status();
    wait_for("a's process gone", Duration::from_secs(5), || async {
        pids_with(&prefix, &mark_a).is_empty().then_some(())
    })
    .await;

    // The cloud moves on meanwhile.
    cms.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"V": "v2"}})),
    )
    .await
    .unwrap();
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    pods.create(&PostParams::default(), &pod("c", &mark_c, from_cm.clone()))
        .await
        .unwrap();
    // The node goes Unknown and tainted; its pods stay bound (no eviction by default).
    wait_for("edge-1 unreachable", Duration::from_secs(15), || async {
        let n = nodes.get_opt("edge-1").await.ok()??;
        let tainted = n
            .spec
            .as_ref()?
            .taints
            .as_ref()?
            .iter()
            .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoSchedule");
        (ready(&n)? == "Unknown" && tainted).then_some(())
    })
    .await;
    assert!(
        pods.get_opt("a").await.unwrap().is_some(),
        "pods on an unreachable edge are not evicted"
    );

    // The agent comes back offline: pods from SQLite, b adopted (same process), a restarted.
    let mut agent = Agent::start(&cfg, &log);
    let a1 = wait_for("a restarted offline", Duration::from_secs(15), || async {
        let p = pids_with(&prefix, &mark_a);
        (p.len() == 1).then(|| p[0])
    })
    .await;
    assert_ne!(a1, a0[0]);
    assert_eq!(
        pids_with(&prefix, &mark_b),
        b0,
        "b's process was adopted, not started twice"
    );
    assert!(
        pids_with(&prefix, &mark_c).is_empty(),
        "c is not known offline"
    );
    let admin = std::fs::read_to_string(edge_dir.join("metaserver.token")).unwrap();
    let listed: Value = reqwest_get(
        &format!("http://127.0.0.1:{ms_port}/api/v1/namespaces/default/pods"),
        admin.trim(),
    )
    .await;
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "the local API serves the pods offline");

    // The link returns: b is deleted for good, c starts, the config map is v2, the node is Ready.
    let t0 = Instant::now();
    proxy.faults.set_refuse(false);
    wait_for("convergence", Duration::from_secs(30), || async {
        let b_gone =
            pods.get_opt("b").await.ok()?.is_none() && pids_with(&prefix, &mark_b).is_empty();
        let c = pids_with(&prefix, &mark_c);
        let cm: Value = reqwest_get(
            &format!("http://127.0.0.1:{ms_port}/api/v1/namespaces/default/configmaps/settings"),
            admin.trim(),
        )
        .await;
        (b_gone && c.len() == 1 && cm["data"]["V"] == "v2").then_some(())
    })
    .await;
    let converged = t0.elapsed();
    wait_for(
        "edge-1 Ready again, untainted",
        Duration::from_secs(15),
        || async {
            let n = nodes.get_opt("edge-1").await.ok()??;
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| !t.is_empty());
            (ready(&n)? == "True" && !tainted).then_some(())
        },
    )
    .await;
    // Status made offline reached the cloud: a's restart is counted; c runs with the new value.
    wait_for("a's restart reported", Duration::from_secs(10), || async {
        let p = pods.get_opt("a").await.ok()??;
        let s = p.status?.container_statuses?.first()?.clone();
        (s.restart_count >= 1 && s.ready).then_some(())
    })
    .await;
    let c = pids_with(&prefix, &mark_c)[0];
    let env = String::from_utf8_lossy(&std::fs::read(format!("/proc/{c}/environ")).unwrap())
        .replace('\0', "\n");
    assert!(env.contains("V=v2"), "{env}");
    assert_eq!(pids_with(&prefix, &mark_a).len(), 1, "a runs once");
    assert_eq!(pids_with(&prefix, &mark_c).len(), 1, "c runs once");
    eprintln!(
        "converged {:.2} s after the link returned (keepalive 0.5 s, reconnect backoff <= 0.3 s)",
        converged.as_secs_f64()
    );
    agent.kill9();
    cloud.shutdown().await;
    server.shutdown().await;
}

/// GET a JSON document over plain HTTP (the MetaServer, as the node's administrator), `Null`
/// on any failure.
async fn reqwest_get(url: &str, token: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let Ok(mut s) = tokio::net::TcpStream::connect(host).await else {
        return Value::Null;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return Value::Null;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}
