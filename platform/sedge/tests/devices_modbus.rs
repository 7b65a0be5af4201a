//! The Modbus mapper end to end on `sedge up`: a simulated Modbus TCP thermometer, the KubeEdge
//! device manifests applied with kubectl, the mapper registered with edge-1 over DMI. The
//! register's value shows in `kubectl get device` with the device `online` and on the property's
//! MQTT push topic, follows the device when it changes, and a desired value patched with kubectl
//! is written to the device's coil.

mod common;

use common::kubectl_stdin as kubectl;

use std::time::Duration;

use sedge::platform::{Up, UpArgs};
use sedge_modbus_mapper::{MapperConfig, Simulator};

async fn until_row(kc: &std::path::Path, what: &str, want: impl Fn(&str) -> bool) -> String {
    let kc = kc.to_path_buf();
    sedge_testkit::wait::until_async(
        what,
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let kc = kc.clone();
            let row = tokio::task::spawn_blocking(move || {
                kubectl(
                    &kc,
                    &["get", "device", "thermometer-1", "--no-headers"],
                    None,
                )
            });
            let ok = &want;
            async move {
                let row = row.await.ok()?;
                ok(&row).then_some(row)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_modbus_thermometer_through_the_mapper_and_kubectl() {
    let sim = Simulator::default();
    sim.set_holding(0, 21);
    sim.set_coil(3, true);
    let device = sim.start("127.0.0.1:0".parse().unwrap()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&UpArgs::local(dir.path())).await.unwrap();
    let kc = up.server.kubeconfig.clone();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("up.json")).unwrap())
            .unwrap();
    let broker = state["edges"][0]["mqtt"].as_str().unwrap().to_string();
    // KubeEdge's manifest, pointed at the simulator, with fast cycles for the test.
    let manifest = include_str!("../../devices/tests/manifests/modbus-thermometer.yaml")
        .replace("port: 1502", &format!("port: {}", device.port()))
        .replace("collectCycle: 2000", "collectCycle: 200")
        .replace("reportCycle: 5000", "reportCycle: 200")
        .replace("tcp://127.0.0.1:1883", &format!("tcp://{broker}"));
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl(&k, &["apply", "-f", "-"], Some(&manifest)))
        .await
        .unwrap();
    let dmi = std::path::PathBuf::from(state["edges"][0]["dmi"].as_str().unwrap());
    let socket = dir.path().join("modbus-mapper.sock");
    // Registered before or after the node holds the device, the mapper gets it: in the
    // registration's list, or told by RegisterDevice when it arrives.
    let mapper = tokio::spawn(sedge_modbus_mapper::run(MapperConfig {
        name: "modbus-test".into(),
        dmi_socket: dmi,
        socket,
    }));

    let row = until_row(&kc, "21 reported", |r| {
        r.contains("online") && r.contains("21,true")
    })
    .await;
    assert!(row.contains("edge-1") && row.contains("modbus"), "{row}");
    // Each reading is also pushed to the property's MQTT topic (pushMethod.mqtt), seen with
    // mosquitto_sub on the node's broker.
    let (h, p) = broker.rsplit_once(':').unwrap();
    let (h, p) = (h.to_string(), p.to_string());
    let pushed = tokio::task::spawn_blocking(move || {
        std::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                &h,
                "-p",
                &p,
                "-t",
                "thermometer/temperature",
                "-C",
                "1",
                "-W",
                "30",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let pushed = String::from_utf8_lossy(&pushed.stdout);
    assert!(
        pushed.contains(r#""temperature":{"metadata""#) && pushed.contains(r#""value":"21""#),
        "{pushed}"
    );
    // The device's value changes; the status follows.
    sim.set_holding(0, 25);
    until_row(&kc, "25 reported", |r| r.contains("25,")).await;
    // A desired value set in the cloud is written to the device.
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl(&k, &common::PATCH_ENABLE_OFF, None))
        .await
        .unwrap();
    sedge_testkit::wait::until_async(
        "the coil written",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || std::future::ready((!sim.coil(3)).then_some(())),
    )
    .await;
    until_row(&kc, "false reported", |r| r.contains("25,false")).await;
    assert!(!mapper.is_finished(), "the mapper stopped");
    mapper.abort();
    up.stop().await;
}
