//! End to end through `sedge up` and the real `kubectl`: a Deployment pinned to an edge node runs
//! as processes there, heals, rolls on a template change, serves `kubectl logs`, and stops when
//! deleted; bad pods get clear reasons while the agent keeps running; the edge's local API
//! answers `kubectl --server`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{running_ready, up, wait_for};
use serde_json::Value;

fn pid_of(p: &Value) -> u32 {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("process://"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

const DEPLOYMENT: &str = "
apiVersion: v1
kind: ConfigMap
metadata: {name: greeting}
data: {GREETING: hello, app.conf: 'mode=edge'}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {kubernetes.io/hostname: edge-1}
      containers:
      - name: main
        image: busybox:1.36
        command: [sh, -c, 'echo \"$GREETING from $POD_NAME on $NODE, conf $(cat etc/app/app.conf)\"; exec sleep 1000']
        env:
        - {name: GREETING, valueFrom: {configMapKeyRef: {name: greeting, key: GREETING}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
        volumeMounts: [{name: conf, mountPath: /etc/app}]
        readinessProbe: {exec: {command: [test, -f, etc/app/app.conf]}, periodSeconds: 1}
      volumes: [{name: conf, configMap: {name: greeting}}]
";

#[test]
fn deployment_on_an_edge_node_through_kubectl() {
    let up = up();
    // The node registers itself through the channel, with the edge label, and turns Ready.
    wait_for("edge-1 Ready", Duration::from_secs(30), || {
        let (ok, out, _) = up.kubectl(&["get", "node", "edge-1", "-o", "json"]);
        let n: Value = if ok {
            serde_json::from_str(&out).ok()?
        } else {
            return None;
        };
        let ready = n["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && n["metadata"]["labels"]["node-role.kubernetes.io/edge"].is_string()).then_some(())
    });
    let (ok, _, _) = up.kubectl(&["get", "lease", "edge-1", "-n", "kube-node-lease"]);
    assert!(ok, "the node lease exists");

    // Apply: the scheduler places both replicas on edge-1 and the processes run.
    up.apply(DEPLOYMENT);
    let pods = wait_for(
        "2 web pods Running and Ready",
        Duration::from_secs(60),
        || {
            let p = up.pods("app=web");
            (p.len() == 2 && p.iter().all(running_ready)).then_some(p)
        },
    );
    for p in &pods {
        assert_eq!(p["spec"]["nodeName"], "edge-1");
        let pid = pid_of(p);
        assert!(alive(pid), "pod process {pid} runs");
        let env = environ(pid);
        assert!(
            env.contains("GREETING=hello") && env.contains("NODE=edge-1"),
            "{env}"
        );
    }
    let first = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    let first_pid = pid_of(&pods[0]);

    // kubectl logs, through the API server, the cloud core and the channel.
    let logs = up.ok(&["logs", &first]);
    assert_eq!(
        logs.trim(),
        format!("hello from {first} on edge-1, conf mode=edge")
    );
    let (ok, _, err) = up.kubectl(&["logs", &first, "-c", "nope"]);
    assert!(
        !ok && err.contains("container nope is not valid for pod"),
        "{err}"
    );

    // A deleted pod comes back (a new one), and the old process stops.
    up.ok(&["delete", "pod", &first, "--wait=true", "--timeout=30s"]);
    assert!(!alive(first_pid), "the deleted pod's process was stopped");
    wait_for("a replacement pod", Duration::from_secs(60), || {
        let p = up.pods("app=web");
        (p.len() == 2
            && p.iter().all(running_ready)
            && p.iter().all(|p| p["metadata"]["name"] != first.as_str()))
        .then_some(())
    });

    // A template change rolls the pods: new hash, new processes with the new env.
    let before: Vec<u32> = up.pods("app=web").iter().map(pid_of).collect();
    up.ok(&["set", "env", "deployment/web", "EXTRA=rolled"]);
    let rolled = wait_for("rolled pods", Duration::from_secs(90), || {
        let p = up.pods("app=web");
        let done = p.len() == 2
            && p.iter().all(running_ready)
            && p.iter().all(|p| {
                !before.contains(&pid_of(p)) && environ(pid_of(p)).contains("EXTRA=rolled")
            });
        done.then_some(p)
    });
    for pid in before {
        assert!(!alive(pid), "old process {pid} stopped after the roll");
    }
    let d: Value =
        serde_json::from_str(&up.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    wait_for("deployment status", Duration::from_secs(30), || {
        let d: Value =
            serde_json::from_str(&up.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
        (d["status"]["readyReplicas"] == 2 && d["status"]["updatedReplicas"] == 2).then_some(())
    });
    let _ = d;

    // The edge's local API answers from SQLite.
    let ms = up.state().unwrap()["edges"][0]["metaserver"]
        .as_str()
        .unwrap()
        .to_string();
    let out = Command::new("kubectl")
        .args([
            "--kubeconfig",
            "/dev/null",
            "--server",
            &ms,
            "get",
            "pods",
            "-A",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for p in &rolled {
        assert!(
            listed.contains(p["metadata"]["name"].as_str().unwrap()),
            "metaserver lists the pods: {listed} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every daemon has /metrics: the cloud core (with the AI controller's) and the edge agent.
    let state = up.state().unwrap();
    let cloud = http_get(state["metrics"].as_str().unwrap());
    for want in [
        "sedge_hub_nodes_connected 2",
        "sedge_hub_sessions_opened_total",
        "sedge_cloudcore_agent_nodes_ready 2",
        "sedge_ai_jointinference_reconciles_total",
        "# HELP sedge_hub_queued_objects",
    ] {
        assert!(cloud.contains(want), "{want} missing from\n{cloud}");
    }
    // The process's own figures and its allocator's: what the program holds allocated fits in
    // what jemalloc counts resident (an upper bound: it may count pages never touched, so it is
    // not compared with the process's resident memory).
    let figure = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
    };
    let allocated = figure(&cloud, "sedge_allocator_allocated_bytes");
    let resident = figure(&cloud, "sedge_allocator_resident_bytes");
    let rss = figure(&cloud, "sedge_process_resident_memory_bytes");
    assert!(
        allocated > 1 << 20 && allocated <= resident && rss > 1 << 20,
        "allocated {allocated}, allocator resident {resident}, process resident {rss}"
    );
    assert!(figure(&cloud, "sedge_process_threads") > 1);
    assert!(figure(&cloud, "sedge_process_open_fds") > 3);
    assert!(figure(&cloud, "sedge_process_cpu_seconds_total") < 3_600);
    // The Deployment's pods were placed by the embedded scheduler.
    let bound = figure(&cloud, "sedge_cloudcore_scheduler_bindings_total");
    assert!(
        bound >= rolled.len() as u64,
        "{bound} bindings for {} pods",
        rolled.len()
    );
    let edge = http_get(state["edges"][0]["metrics"].as_str().unwrap());
    for want in [
        "sedge_edge_connected 1",
        "sedge_edge_outbox_depth",
        "sedge_edged_container_starts_total",
        "sedge_edge_store_writes_total",
        "sedge_process_resident_memory_bytes",
    ] {
        assert!(edge.contains(want), "{want} missing from\n{edge}");
    }
    let pods = figure(&edge, "sedge_edged_pods");
    assert!(pods >= 2, "the two web pods run on edge-1:\n{edge}");

    // Bad pods: clear reasons; the agent keeps running the good ones.
    up.apply(
        "
apiVersion: v1
kind: Pod
metadata: {name: bad-image}
spec: {nodeName: edge-1, containers: [{name: c, image: nginx:1.27}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-config}
spec: {nodeName: edge-1, containers: [{name: c, image: busybox, command: [sleep, '100'], env: [{name: X, valueFrom: {configMapKeyRef: {name: missing, key: k}}}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: exits}
spec: {nodeName: edge-1, containers: [{name: c, image: busybox, command: [sh, -c, 'echo bye; exit 1']}]}
---
apiVersion: v1
kind: Pod
metadata: {name: too-big}
spec: {containers: [{name: c, image: busybox, command: [sleep, '1'], resources: {requests: {cpu: '512'}}}]}
",
    );
    let waiting = |name: &str| -> Option<(String, String)> {
        let p = up.pod(name)?;
        let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
        Some((
            w["reason"].as_str()?.to_string(),
            w["message"].as_str().unwrap_or_default().to_string(),
        ))
    };
    let (r, m) = wait_for("bad-image reason", Duration::from_secs(30), || {
        waiting("bad-image")
    });
    assert_eq!(r, "ErrImagePull");
    assert!(
        m.contains("\"nginx:1.27\" is not in the process runtime's image map"),
        "{m}"
    );
    let (r, m) = wait_for("bad-config reason", Duration::from_secs(30), || {
        waiting("bad-config")
    });
    assert_eq!(r, "CreateContainerConfigError");
    assert_eq!(m, "configmap \"missing\" not found");
    wait_for("exits to crash-loop", Duration::from_secs(30), || {
        let p = up.pod("exits")?;
        let s = &p["status"]["containerStatuses"][0];
        (s["restartCount"].as_i64()? >= 1 && s["lastState"]["terminated"]["exitCode"] == 1)
            .then_some(())
    });
    let previous = up.ok(&["logs", "exits", "--previous"]);
    assert_eq!(previous.trim(), "bye");
    wait_for("too-big unschedulable", Duration::from_secs(30), || {
        let p = up.pod("too-big")?;
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (c["status"] == "False"
            && c["reason"] == "Unschedulable"
            && c["message"].as_str()?.contains("Insufficient cpu"))
        .then_some(())
    });
    assert!(
        up.pods("app=web").iter().all(|p| alive(pid_of(p))),
        "good pods kept running"
    );

    // Deleting the Deployment stops its processes.
    let pids: Vec<u32> = up.pods("app=web").iter().map(pid_of).collect();
    up.ok(&["delete", "deployment", "web"]);
    wait_for("web pods gone", Duration::from_secs(60), || {
        up.pods("app=web").is_empty().then_some(())
    });
    wait_for("web processes gone", Duration::from_secs(10), || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    up.ok(&[
        "delete",
        "pod",
        "bad-image",
        "bad-config",
        "exits",
        "too-big",
        "--wait=true",
        "--timeout=30s",
    ]);
    assert!(Path::new(&up.kubeconfig()).exists());
}

/// The body of `GET url` (plain HTTP), which must answer 200.
fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    common::http_body(host, path).unwrap_or_else(|| panic!("{url}: no 200"))
}
