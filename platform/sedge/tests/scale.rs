//! `kubectl scale` through the `scale` subresource (autoscaling/v1 Scale) of a Deployment on
//! `sedge up`: the real kubectl scales it up and down and the edge node runs that many pods; the
//! Scale reads back with the selector; a negative count is refused naming spec.replicas, and a
//! stale resourceVersion is refused.

mod common;

use std::time::Duration;

use common::{up, wait_for};
use serde_json::Value;

const DEPLOYMENT: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {kubernetes.io/hostname: edge-1}
      containers:
      - {name: main, image: busybox:1.36, command: [sleep, '1000']}
";

fn running(up: &common::Up) -> usize {
    up.pods("app=web")
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .count()
}

#[test]
fn kubectl_scale_moves_a_deployment_through_its_scale_subresource() {
    let up = up();
    up.apply(DEPLOYMENT);
    wait_for("1 pod running", Duration::from_secs(60), || {
        (running(&up) == 1).then_some(())
    });

    let out = up.ok(&["scale", "deployment", "web", "--replicas=3"]);
    assert!(out.contains("scaled"), "{out}");
    wait_for("3 pods running", Duration::from_secs(60), || {
        (running(&up) == 3).then_some(())
    });
    let path = "/apis/apps/v1/namespaces/default/deployments/web/scale";
    let scale: Value = serde_json::from_str(&up.ok(&["get", "--raw", path])).unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["apiVersion"], "autoscaling/v1");
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], "app=web");

    up.ok(&["scale", "deployment", "web", "--replicas=1"]);
    wait_for("back to 1 pod", Duration::from_secs(60), || {
        (running(&up) == 1 && up.pods("app=web").len() == 1).then_some(())
    });

    // Bad input: a negative count (past kubectl's own check, as a patch of the subresource),
    // and a precondition on a stale resourceVersion.
    let (ok, _, err) = up.kubectl(&[
        "patch",
        "deployment",
        "web",
        "--subresource=scale",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":-1}}"#,
    ]);
    assert!(!ok && err.contains("spec.replicas"), "{err}");
    let (ok, _, err) = up.kubectl(&[
        "patch",
        "deployment",
        "web",
        "--subresource=scale",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":"three"}}"#,
    ]);
    assert!(!ok && err.contains("must be an integer"), "{err}");
    let (ok, _, err) = up.kubectl(&[
        "scale",
        "deployment",
        "web",
        "--replicas=2",
        "--resource-version=1",
    ]);
    // (kubectl compares it with the Scale's resourceVersion, which the server fills in.)
    assert!(!ok && err.contains("resource version"), "{err}");
    let replicas = up.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas.trim(), "1", "refused writes changed nothing");
}
