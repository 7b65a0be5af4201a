//! The workload kinds through the real kubectl against `sedge up`: a Deployment's ReplicaSets
//! and `kubectl rollout history/undo/pause/resume`; a DaemonSet that lands on a node joining
//! after it was created and rolls to a new template; Jobs that complete, and one that fails
//! until its backoffLimit; bad specs refused naming the field.

mod common;

use std::time::Duration;

use common::{Up, up, wait_for};
use serde_json::Value;

fn deployment(version: &str) -> String {
    format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  annotations: {{kubernetes.io/change-cause: 'release {version}'}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: edge-1}}
      containers:
      - name: main
        image: busybox:1.36
        command: [sleep, '1000']
        env: [{{name: VERSION, value: {version}}}]
"
    )
}

fn json(up: &Up, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&up.ok(&a)).unwrap()
}

/// The ReplicaSets of Deployment `web`: (name, revision, spec.replicas).
fn replica_sets(up: &Up) -> Vec<(String, String, i64)> {
    let mut v: Vec<(String, String, i64)> = json(up, &["get", "rs", "-l", "app=web"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metadata"]["name"].as_str().unwrap().to_string(),
                r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["spec"]["replicas"].as_i64().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|r| r.1.parse::<i64>().unwrap_or(0));
    v
}

/// The VERSION of each live pod of `web`.
fn versions(up: &Up) -> Vec<String> {
    up.pods("app=web")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["env"][0]["value"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn rollout_done(up: &Up, what: &str) {
    let out = up.ok(&["rollout", "status", what, "--timeout=120s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
}

#[test]
fn deployments_keep_replica_sets_for_rollout_history_undo_pause_and_resume() {
    let up = up();
    up.apply(&deployment("v1"));
    rollout_done(&up, "deployment/web");
    let rs = replica_sets(&up);
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!((rs[0].1.as_str(), rs[0].2), ("1", 2));
    let table = up.ok(&["get", "rs"]);
    assert!(
        table.contains("DESIRED") && table.contains("CURRENT") && table.contains(&rs[0].0),
        "{table}"
    );
    let owner = json(&up, &["get", "rs", &rs[0].0])["metadata"]["ownerReferences"][0].clone();
    assert_eq!(owner["kind"], "Deployment");
    assert_eq!(owner["name"], "web");
    for p in up.pods("app=web") {
        let o = &p["metadata"]["ownerReferences"][0];
        assert_eq!(
            (o["kind"].as_str(), o["name"].as_str()),
            (Some("ReplicaSet"), Some(rs[0].0.as_str()))
        );
    }

    // A new template: a second ReplicaSet takes over, the first is kept at zero.
    up.apply(&deployment("v2"));
    rollout_done(&up, "deployment/web");
    wait_for("only v2 pods", Duration::from_secs(60), || {
        (versions(&up) == ["v2", "v2"]).then_some(())
    });
    let rs = replica_sets(&up);
    assert_eq!(rs.len(), 2, "{rs:?}");
    assert_eq!((rs[0].1.as_str(), rs[0].2), ("1", 0));
    assert_eq!((rs[1].1.as_str(), rs[1].2), ("2", 2));
    let history = up.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("release v1") && history.contains("release v2"),
        "{history}"
    );
    let detail = up.ok(&["rollout", "history", "deployment/web", "--revision=1"]);
    assert!(detail.contains("VERSION:\tv1"), "{detail}");

    // Undo: back to the v1 template, through its own ReplicaSet, which becomes revision 3.
    let out = up.ok(&["rollout", "undo", "deployment/web"]);
    assert!(out.contains("rolled back"), "{out}");
    rollout_done(&up, "deployment/web");
    wait_for("only v1 pods again", Duration::from_secs(60), || {
        (versions(&up) == ["v1", "v1"]).then_some(())
    });
    let rs = replica_sets(&up);
    assert_eq!(rs.len(), 2, "the v1 ReplicaSet is reused: {rs:?}");
    assert_eq!((rs[1].1.as_str(), rs[1].2), ("3", 2));
    let d = json(&up, &["get", "deployment", "web"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
        "v1"
    );

    // Paused: a template change waits; resumed, it rolls.
    up.ok(&["rollout", "pause", "deployment/web"]);
    up.ok(&["set", "env", "deployment/web", "VERSION=v3"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(replica_sets(&up).len(), 2, "nothing rolls while paused");
    assert_eq!(versions(&up), ["v1", "v1"]);
    let (ok, _, err) = up.kubectl(&["rollout", "undo", "deployment/web"]);
    assert!(!ok && err.contains("paused"), "{err}");
    up.ok(&["rollout", "resume", "deployment/web"]);
    rollout_done(&up, "deployment/web");
    wait_for("only v3 pods", Duration::from_secs(60), || {
        (versions(&up) == ["v3", "v3"]).then_some(())
    });
    assert_eq!(replica_sets(&up).len(), 3);

    // Scaling a ReplicaSet through its scale subresource works as for Deployments.
    let rs = replica_sets(&up);
    let path = format!(
        "/apis/apps/v1/namespaces/default/replicasets/{}/scale",
        rs[2].0
    );
    let scale: Value = serde_json::from_str(&up.ok(&["get", "--raw", &path])).unwrap();
    assert_eq!(scale["spec"]["replicas"], 2);

    // Deleting the Deployment deletes its ReplicaSets and their pods.
    up.ok(&["delete", "deployment", "web"]);
    wait_for("ReplicaSets and pods gone", Duration::from_secs(60), || {
        (replica_sets(&up).is_empty() && up.pods("app=web").is_empty()).then_some(())
    });
}

const DAEMONSET: &str = "
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers:
      - name: main
        image: busybox:1.36
        command: [sleep, '1000']
        env: [{name: GEN, value: one}]
";

/// The pods of DaemonSet `agent`: (node, GEN, running and ready).
fn daemon_pods(up: &Up) -> Vec<(String, String, bool)> {
    let mut v: Vec<(String, String, bool)> = up
        .pods("app=agent")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["containers"][0]["env"][0]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                common::running_ready(p),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_daemon_set_lands_on_a_node_that_joins_later_and_rolls_node_by_node() {
    let up = up();
    up.apply(DAEMONSET);
    // `sedge up` has two nodes: edge-1 and the cloud node cloud-1.
    wait_for("a daemon pod on each node", Duration::from_secs(60), || {
        (daemon_pods(&up)
            == [
                ("cloud-1".into(), "one".into(), true),
                ("edge-1".into(), "one".into(), true),
            ])
        .then_some(())
    });

    let _edge2 = common::join_edge(&up, "edge-2");
    wait_for("edge-2 registered", Duration::from_secs(60), || {
        up.kubectl(&["get", "node", "edge-2"]).0.then_some(())
    });
    wait_for(
        "a daemon pod on the new node too",
        Duration::from_secs(90),
        || {
            (daemon_pods(&up)
                == [
                    ("cloud-1".into(), "one".into(), true),
                    ("edge-1".into(), "one".into(), true),
                    ("edge-2".into(), "one".into(), true),
                ])
            .then_some(())
        },
    );
    rollout_done(&up, "daemonset/agent");
    let table = up.ok(&["get", "ds", "agent"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..6], ["agent", "3", "3", "3", "3", "3"], "{table}");
    let pod = &up.pods("app=agent")[0];
    let tolerations = pod["spec"]["tolerations"].to_string();
    assert!(
        tolerations.contains("node.kubernetes.io/unreachable"),
        "{tolerations}"
    );

    // A new template replaces the pods (maxUnavailable 1: node by node).
    up.ok(&["set", "env", "daemonset/agent", "GEN=two"]);
    rollout_done(&up, "daemonset/agent");
    wait_for(
        "every pod on the new template",
        Duration::from_secs(60),
        || {
            (daemon_pods(&up)
                == [
                    ("cloud-1".into(), "two".into(), true),
                    ("edge-1".into(), "two".into(), true),
                    ("edge-2".into(), "two".into(), true),
                ])
            .then_some(())
        },
    );

    // A node selector that only edge-2 matches takes the pods off the others.
    up.ok(&["label", "node", "edge-2", "site=b"]);
    up.ok(&[
        "patch",
        "daemonset",
        "agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"site":"b"}}}}}"#,
    ]);
    wait_for(
        "only edge-2 keeps a daemon pod",
        Duration::from_secs(60),
        || {
            let p = daemon_pods(&up);
            (p.len() == 1 && p[0].0 == "edge-2" && p[0].2).then_some(())
        },
    );
    wait_for("status says 1 desired", Duration::from_secs(30), || {
        let ds = json(&up, &["get", "ds", "agent"]);
        (ds["status"]["desiredNumberScheduled"] == 1 && ds["status"]["numberReady"] == 1)
            .then_some(())
    });

    // Bad input: a daemon pod must restart always.
    let (ok, _, err) = up.kubectl(&[
        "patch",
        "daemonset",
        "agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"restartPolicy":"Never"}}}}"#,
    ]);
    assert!(
        !ok && err.contains("spec.template.spec.restartPolicy"),
        "{err}"
    );
}

fn job(name: &str, command: &str, extra: &str) -> String {
    format!(
        "
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  {extra}
  template:
    spec:
      restartPolicy: Never
      nodeSelector: {{kubernetes.io/hostname: edge-1}}
      containers:
      - {{name: main, image: busybox:1.36, command: [sh, -c, '{command}']}}
"
    )
}

fn job_pods(up: &Up, name: &str) -> Vec<Value> {
    up.pods(&format!("batch.kubernetes.io/job-name={name}"))
}

#[test]
fn jobs_complete_or_fail_after_their_backoff_limit() {
    let up = up();
    up.apply(&job(
        "sum",
        "echo finished $((20 + 22))",
        "completions: 3\n  parallelism: 2",
    ));
    up.apply(&job("broken", "echo trying; exit 3", "backoffLimit: 1"));

    up.ok(&[
        "wait",
        "--for=condition=complete",
        "job/sum",
        "--timeout=120s",
    ]);
    let pods = job_pods(&up, "sum");
    assert_eq!(pods.len(), 3, "{pods:?}");
    assert!(pods.iter().all(|p| p["status"]["phase"] == "Succeeded"));
    let table = up.ok(&["get", "job", "sum"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["sum", "Complete", "3/3"], "{table}");
    let logs = up.ok(&["logs", "job/sum"]);
    assert!(logs.contains("finished 42"), "{logs}");
    let j = json(&up, &["get", "job", "sum"]);
    assert_eq!(j["status"]["succeeded"], 3);
    assert!(j["status"]["completionTime"].is_string(), "{j}");

    // Failing: the first pod fails, a second is tried after the backoff delay, then the Job
    // fails with BackoffLimitExceeded.
    up.ok(&[
        "wait",
        "--for=condition=failed",
        "job/broken",
        "--timeout=120s",
    ]);
    let j = json(&up, &["get", "job", "broken"]);
    assert_eq!(j["status"]["failed"], 2, "{j}");
    let cond = j["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap()
        .clone();
    assert_eq!(cond["reason"], "BackoffLimitExceeded");
    let mut pods = job_pods(&up, "broken");
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().all(|p| p["status"]["phase"] == "Failed"));
    pods.sort_by_key(|p| {
        p["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let ts = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let first_end =
        ts(&pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]);
    let retry = ts(&pods[1]["metadata"]["creationTimestamp"]);
    assert!(
        (retry - first_end).num_seconds() >= 9,
        "the retry waited {}s, not Kubernetes' 10s",
        (retry - first_end).num_seconds()
    );
    let table = up.ok(&["get", "job", "broken"]);
    assert!(table.contains("Failed") && table.contains("0/1"), "{table}");

    // Bad input: a Job's pods must not restart always; counts are not negative.
    let bad = job("bad", "true", "backoffLimit: -1")
        .replace("restartPolicy: Never", "restartPolicy: Always");
    let (ok, _, err) = common::run_kubectl(&up.kubeconfig(), &["apply", "-f", "-"], Some(&bad));
    assert!(!ok, "{err}");
    assert!(
        err.contains("spec.template.spec.restartPolicy") && err.contains("spec.backoffLimit"),
        "{err}"
    );

    // Deleting a Job deletes its pods.
    up.ok(&["delete", "job", "sum"]);
    wait_for("the Job's pods gone", Duration::from_secs(60), || {
        job_pods(&up, "sum").is_empty().then_some(())
    });
}
