//! A mapper as a pod, the way KubeEdge runs mappers: `kubectl apply` a Pod of the
//! `sedge/modbus-mapper` image on the node, with the agent's DMI directory mounted by hostPath
//! (`<node>/dmi`, which the agent allows pods to mount). It registers over DMI from inside the
//! pod, drives a simulated Modbus TCP thermometer, and kubectl shows the device's value; a desired
//! value patched with kubectl reaches the device's coil. A pod that tries to mount another host
//! directory is refused by the node.

mod common;

use std::time::Duration;

use common::{up, wait_for};
use sedge_modbus_mapper::Simulator;

/// The README's example mapper pod, pointed at this node's DMI directory, and a pod that asks
/// to mount `host_dir` instead.
fn mapper_pods(dmi_dir: &str, host_dir: &str) -> String {
    let example = include_str!("../../modbus-mapper/examples/mapper-pod.yaml")
        .replace("/tmp/sedge-up/edge-1/dmi", dmi_dir);
    format!(
        r#"{example}
---
apiVersion: v1
kind: Pod
metadata:
  name: nosy-mapper
spec:
  nodeName: edge-1
  containers:
    - name: mapper
      image: sedge/modbus-mapper
      args: ["--dmi-socket", "/etc/kubeedge/dmi.sock"]
      volumeMounts:
        - name: node
          mountPath: /etc/kubeedge
  volumes:
    - name: node
      hostPath:
        path: {host_dir}
"#
    )
}

#[test]
fn the_modbus_mapper_runs_as_a_pod_and_drives_the_device() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = Simulator::default();
    sim.set_holding(0, 23);
    sim.set_coil(3, true);
    let device = rt
        .block_on(sim.start("127.0.0.1:0".parse().unwrap()))
        .unwrap();

    let up = up();
    let state = up.state().unwrap();
    let dmi = std::path::PathBuf::from(state["edges"][0]["dmi"].as_str().unwrap());
    assert!(dmi.ends_with("dmi/dmi.sock"), "{}", dmi.display());
    let dmi_dir = dmi.parent().unwrap().to_str().unwrap().to_string();
    let broker = state["edges"][0]["mqtt"].as_str().unwrap().to_string();
    up.apply(
        &include_str!("../../devices/tests/manifests/modbus-thermometer.yaml")
            .replace("port: 1502", &format!("port: {}", device.port()))
            .replace("collectCycle: 2000", "collectCycle: 200")
            .replace("reportCycle: 5000", "reportCycle: 200")
            .replace("tcp://127.0.0.1:1883", &format!("tcp://{broker}")),
    );
    // (`sedge up` also allows /tmp, where its nodes live: the nosy pod asks for /etc.)
    up.apply(&mapper_pods(&dmi_dir, "/etc"));

    // The mapper in its pod registers and reports: the value shows in kubectl.
    let row = wait_for(
        "23 reported by the mapper pod",
        Duration::from_secs(60),
        || {
            let row = up.ok(&["get", "device", "thermometer-1", "--no-headers"]);
            (row.contains("online") && row.contains("23,true")).then_some(row)
        },
    );
    assert!(row.contains("edge-1"), "{row}");
    wait_for("the mapper pod Running", Duration::from_secs(30), || {
        up.pod("modbus-mapper")
            .filter(|p| p["status"]["phase"] == "Running")
    });

    // A desired value set with kubectl reaches the device through the pod.
    up.ok(&common::PATCH_ENABLE_OFF);
    wait_for("the coil written", Duration::from_secs(30), || {
        (!sim.coil(3)).then_some(())
    });

    // The node refuses a pod that mounts more of the host than the DMI directory.
    let why = wait_for("the nosy pod refused", Duration::from_secs(30), || {
        let p = up.pod("nosy-mapper")?;
        let s = p["status"].to_string();
        s.contains("host path is not allowed").then_some(s)
    });
    assert!(why.contains("/etc"), "{why}");
    drop(rt);
}
