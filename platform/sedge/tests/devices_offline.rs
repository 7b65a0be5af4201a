//! Devices across a link cut and an agent restart: while the node is cut off, a mapper's
//! reports are taken and kept (in the node's SQLite store and outbox), the cloud changes a
//! desired value, and the agent is stopped and started again, serving its devices from SQLite
//! at once. When the link returns, the reported value reaches the Device's status and the new
//! desired value reaches the node.
//!
//! And KubeEdge's conflict rule for desired values: a value a local app sets over MQTT reaches
//! the mapper and the Device's status; set on the node and in the cloud at once (across a link
//! cut), the node's newer value stays; the cloud's next value, once it has seen the node's, wins.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use sedge_cloudcore::CloudCore;
use sedge_devices::twin::dmi;
use sedge_devices::twin::dmi::device_manager_service_client::DeviceManagerServiceClient;
use sedge_devices::twin::{DeviceTwin, DeviceTwinConfig};
use sedge_devices::{Device, DeviceModel};
use sedge_edgecore::{EdgeCore, EdgeCoreConfig, EdgeModule};
use sedge_tunnel::fault::TcpFaultProxy;

async fn agent(cfg: &EdgeCoreConfig, dmi_socket: &std::path::Path) -> (EdgeCore, Arc<DeviceTwin>) {
    let twin = Arc::new(DeviceTwin::new(DeviceTwinConfig {
        dmi_socket: dmi_socket.to_path_buf(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }));
    let core = EdgeCore::start(cfg.clone(), vec![twin.clone() as Arc<dyn EdgeModule>])
        .await
        .unwrap();
    (core, twin)
}

/// A cloud core on its own API server, a fault proxy in front of its hub, and a joined agent
/// (DMI socket and embedded MQTT broker) behind the proxy.
struct Site {
    dir: tempfile::TempDir,
    client: kube::Client,
    cloud: CloudCore,
    proxy: TcpFaultProxy,
    cfg: EdgeCoreConfig,
    socket: std::path::PathBuf,
    _server: sedge_apiserver::ApiServer,
}

async fn site() -> (Site, EdgeCore, Arc<DeviceTwin>) {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    sedge_devices::install_crds(&client).await.unwrap();
    let cc = common::cloudcore_config(dir.path());
    let cloud = CloudCore::start(client.clone(), cc, Vec::new())
        .await
        .unwrap();
    let proxy = TcpFaultProxy::start(cloud.hub.addr()).await.unwrap();
    let edge_dir = dir.path().join("edge-1");
    let cfg: EdgeCoreConfig = serde_yaml::from_str(&format!(
        "metaserver_listen: ''\nmetrics_listen: ''\nnode_ip: 127.0.0.1\nlease_interval_ms: 500\n\
         tunnel:\n  node_name: edge-1\n  cloud: {}\n  data_dir: {}\n  keepalive_interval_ms: 500\n  backoff_initial_ms: 100\n  backoff_max_ms: 300\n  ack_timeout_ms: 500\n",
        proxy.addr,
        edge_dir.display()
    ))
    .unwrap();
    let (token, _) = cloud
        .hub
        .tokens()
        .create(Duration::from_secs(300), "test")
        .unwrap();
    sedge_tunnel::join(&cfg.tunnel, &token).await.unwrap();
    let socket = dir.path().join("dmi.sock");
    let (core, twin) = agent(&cfg, &socket).await;
    let site = Site {
        dir,
        client,
        cloud,
        proxy,
        cfg,
        socket,
        _server: server,
    };
    (site, core, twin)
}

impl Site {
    fn cut(&self) {
        self.proxy.faults.set_down(true);
        self.proxy.faults.set_refuse(true);
        self.proxy.faults.cut();
    }
}

/// What the node serves a Modbus mapper: its devices.
async fn node_devices(socket: &std::path::Path) -> Option<Vec<dmi::Device>> {
    let channel = sedge_devices::twin::uds_channel(socket).await.ok()?;
    let r = DeviceManagerServiceClient::new(channel)
        .mapper_register(dmi::MapperRegisterRequest {
            with_data: true,
            mapper: Some(dmi::MapperInfo {
                name: "m".into(),
                protocol: "modbus".into(),
                ..Default::default()
            }),
        })
        .await
        .ok()?
        .into_inner();
    Some(r.device_list)
}

/// The first device the node serves a Modbus mapper, if it has one.
async fn node_device(socket: &std::path::Path) -> Option<dmi::Device> {
    node_devices(socket).await?.into_iter().next()
}

fn desired(d: &dmi::Device) -> String {
    d.spec.as_ref().unwrap().properties[1]
        .desired
        .as_ref()
        .map(|v| v.value.clone())
        .unwrap_or_default()
}

async fn report(socket: &std::path::Path, device: &str, prop: &str, value: &str) {
    let channel = sedge_devices::twin::uds_channel(socket).await.unwrap();
    DeviceManagerServiceClient::new(channel)
        .report_device_status(dmi::ReportDeviceStatusRequest {
            device_name: device.into(),
            device_namespace: "default".into(),
            reported_device: Some(dmi::DeviceStatus {
                twins: vec![dmi::Twin {
                    property_name: prop.into(),
                    reported: Some(dmi::TwinProperty {
                        value: value.into(),
                        metadata: Default::default(),
                    }),
                    observed_desired: None,
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_and_desired_values_cross_a_link_cut_and_an_agent_restart() {
    let (site, core, twin) = site().await;
    let (client, socket, cfg) = (site.client.clone(), site.socket.clone(), site.cfg.clone());
    let first_broker = twin.mqtt_address().unwrap().to_string();

    // The KubeEdge manifests, created in the cloud.
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(include_str!(
        "../../devices/tests/manifests/modbus-thermometer.yaml"
    ))
    .map(|d| serde_yaml::with::singleton_map_recursive::deserialize(d).unwrap())
    .collect();
    let models = Api::<DeviceModel>::namespaced(client.clone(), "default");
    let devices = Api::<Device>::namespaced(client.clone(), "default");
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(docs[0].clone()).unwrap(),
        )
        .await
        .unwrap();
    let mut dev: Device = serde_json::from_value(docs[1].clone()).unwrap();
    dev.status = None;
    devices.create(&PostParams::default(), &dev).await.unwrap();
    let held = sedge_testkit::wait::until_async(
        "the node holds the device",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || node_device(&socket),
    )
    .await;
    assert_eq!(desired(&held), "true");

    // The link goes down (cut, and new connections black-holed).
    site.cut();
    // The mapper reports while offline: taken.
    report(&socket, "thermometer-1", "temperature", "30").await;
    // The cloud changes a desired value meanwhile.
    devices
        .patch(
            "thermometer-1",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(serde_json::json!([
                    {"op": "replace", "path": "/spec/properties/1/desired/value", "value": "false"}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    // The agent restarts while offline and serves its device from SQLite at once. Stopped, it
    // stopped its modules too: its broker takes no more connections.
    core.shutdown(false).await;
    sedge_testkit::wait::until_async(
        "the stopped agent's broker closed",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            tokio::net::TcpStream::connect(&first_broker)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let (core, _twin) = agent(&cfg, &socket).await;
    let again = sedge_testkit::wait::until_async(
        "the restarted node serves its device",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || node_device(&socket),
    )
    .await;
    assert_eq!(
        desired(&again),
        "true",
        "offline: the cloud's change has not arrived"
    );
    let status = devices.get_status("thermometer-1").await.unwrap();
    assert!(
        status
            .status
            .map(|s| s.twins.iter().all(|t| t.reported.is_none()))
            .unwrap_or(true),
        "offline: no report reached the cloud yet"
    );

    // The link returns: the value reported offline reaches the cloud, the desired value the node.
    site.proxy.faults.heal();
    sedge_testkit::wait::until_async(
        "the offline report in the cloud",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let devices = devices.clone();
            async move {
                let d = devices.get_status("thermometer-1").await.ok()?;
                let v = d.status?.twins.first()?.reported.clone()?.value;
                (v == "30").then_some(())
            }
        },
    )
    .await;
    sedge_testkit::wait::until_async(
        "the new desired value on the node",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { node_device(&socket).await.filter(|d| desired(d) == "false") },
    )
    .await;
    core.shutdown(false).await;
    site.cloud.shutdown().await;
    drop(site.dir);
}

/// What the node tells a mapper the desired value of `prop` of `device` is.
async fn node_desired(socket: &std::path::Path, device: &str, prop: &str) -> Option<String> {
    let d = node_devices(socket)
        .await?
        .into_iter()
        .find(|d| d.name == device)?;
    d.spec?
        .properties
        .into_iter()
        .find(|p| p.name == prop)?
        .desired
        .map(|v| v.value)
}

/// A local app sets `value` as the desired (`expected`) value of `prop`, with mosquitto_pub.
fn app_sets(broker: &str, device: &str, prop: &str, value: &str) {
    let (h, p) = broker.rsplit_once(':').unwrap();
    let payload = serde_json::json!({"event_id": "e1", "timestamp": 0,
        "twin": {prop: {"expected": {"value": value}}}})
    .to_string();
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", h, "-p", p, "-q", "1", "-m", &payload, "-t"])
        .arg(format!("$hw/events/device/default/{device}/twin/update"))
        .status()
        .expect("mosquitto_pub (make test installs mosquitto-clients)");
    assert!(status.success());
}

/// The desired value in force the node reported for `prop`: `(value, source, edgeVersion)`.
async fn observed(
    devices: &Api<Device>,
    device: &str,
    prop: &str,
) -> Option<(String, String, String)> {
    let d = devices.get_status(device).await.ok()?;
    let o = d
        .status?
        .twins
        .into_iter()
        .find(|t| t.property_name == prop)?
        .observed_desired?;
    Some((
        o.value,
        o.metadata.get("source").cloned().unwrap_or_default(),
        o.metadata.get("edgeVersion").cloned().unwrap_or_default(),
    ))
}

async fn wait_observed(devices: &Api<Device>, want: (&str, &str, &str)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = observed(devices, "valve-1", "setpoint").await;
        if seen
            .as_ref()
            .is_some_and(|o| (o.0.as_str(), o.1.as_str(), o.2.as_str()) == want)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Device status does not show {want:?} in force: it shows {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_node_desired(socket: &std::path::Path, want: &str) {
    let what = format!("the mapper is told setpoint {want}");
    sedge_testkit::wait::until_async(
        &what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            node_desired(socket, "valve-1", "setpoint")
                .await
                .filter(|v| v == want)
        },
    )
    .await;
}

fn set_desired(value: &str) -> Patch<()> {
    Patch::Json::<()>(
        serde_json::from_value(serde_json::json!([
            {"op": "replace", "path": "/spec/properties/0/desired/value", "value": value}
        ]))
        .unwrap(),
    )
}

/// Creates the valve's model and the valve (`setpoint`, desired 20) on edge-1.
async fn valve(client: &kube::Client) -> Api<Device> {
    let models = Api::<DeviceModel>::namespaced(client.clone(), "default");
    let devices = Api::<Device>::namespaced(client.clone(), "default");
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
                "metadata": {"name": "valve-model", "namespace": "default"},
                "spec": {"protocol": "modbus", "properties": [
                    {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    devices
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
                "metadata": {"name": "valve-1", "namespace": "default"},
                "spec": {"deviceModelRef": {"name": "valve-model"}, "nodeName": "edge-1",
                         "protocol": {"protocolName": "modbus"},
                         "properties": [{"name": "setpoint", "desired": {"value": "20"}}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_value_set_on_the_node_and_in_the_cloud_at_once_keeps_the_nodes_newer_one() {
    let (site, core, twin) = site().await;
    let broker = twin
        .mqtt_address()
        .expect("the embedded broker")
        .to_string();
    let devices = valve(&site.client).await;
    wait_node_desired(&site.socket, "20").await;
    wait_observed(&devices, ("20", "cloud", "0")).await;

    // A local app sets 25: the mapper is told, the cloud sees it (edge version 1).
    app_sets(&broker, "valve-1", "setpoint", "25");
    wait_node_desired(&site.socket, "25").await;
    wait_observed(&devices, ("25", "edge", "1")).await;

    // Across a link cut, the app sets 26 and the cloud 30, neither seeing the other.
    site.cut();
    app_sets(&broker, "valve-1", "setpoint", "26");
    wait_node_desired(&site.socket, "26").await;
    devices
        .patch("valve-1", &PatchParams::default(), &set_desired("30"))
        .await
        .unwrap();
    site.proxy.faults.heal();
    // The cloud's change arrives (generation 2) and is ignored: the node's change is newer
    // than any the cloud had seen. The node's value is what the cloud is told.
    let store = core.store.clone();
    sedge_testkit::wait::until_async(
        "the cloud's change on the node",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let store = store.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    store.get(sedge_api::kind::DEVICE, "default", "valve-1")
                })
                .await
                .ok()?
                .ok()
                .flatten()
                .filter(|d| d["metadata"]["generation"] == 2)
            }
        },
    )
    .await;
    wait_observed(&devices, ("26", "edge", "2")).await;
    assert_eq!(
        node_desired(&site.socket, "valve-1", "setpoint")
            .await
            .as_deref(),
        Some("26"),
        "the node's newer value stays"
    );

    // The cloud, having seen the node's change, sets 31: it wins.
    devices
        .patch("valve-1", &PatchParams::default(), &set_desired("31"))
        .await
        .unwrap();
    wait_node_desired(&site.socket, "31").await;
    wait_observed(&devices, ("31", "cloud", "2")).await;
    core.shutdown(false).await;
    site.cloud.shutdown().await;
}

/// The agent as its own process (`sedge edge`), from `cfg`, its broker on `mqtt`.
fn agent_process(
    cfg: &EdgeCoreConfig,
    dir: &std::path::Path,
    socket: &std::path::Path,
    mqtt: &str,
) -> std::process::Child {
    let file = dir.join("edge-1.yaml");
    std::fs::write(&file, serde_yaml::to_string(cfg).unwrap()).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(["edge", "--lc-listen", "127.0.0.1:0", "--mqtt-listen", mqtt])
        .arg("--dmi-socket")
        .arg(socket)
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::options()
                .append(true)
                .create(true)
                .open(dir.join("agent.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_offline_loses_no_answered_report_and_keeps_its_versions() {
    // The in-process agent joined the node; it stops, and the node runs as its own process.
    let (site, core, _twin) = site().await;
    core.shutdown(false).await;
    let port = sedge_testkit::port::free();
    let broker = format!("127.0.0.1:{port}");
    let mut agent = agent_process(&site.cfg, site.dir.path(), &site.socket, &broker);
    let devices = valve(&site.client).await;
    wait_node_desired(&site.socket, "20").await;

    // Offline: a local app sets 25 (edge version 1), the mapper streams readings 1..=30, each
    // answered; the agent is SIGKILLed right after the last answer.
    site.cut();
    app_sets(&broker, "valve-1", "setpoint", "25");
    wait_node_desired(&site.socket, "25").await;
    for v in 1..=30 {
        report(&site.socket, "valve-1", "setpoint", &v.to_string()).await;
    }
    agent.kill().unwrap();
    agent.wait().unwrap();

    // Restarted, still offline: the node's value is served from SQLite at once.
    let mut agent = agent_process(&site.cfg, site.dir.path(), &site.socket, &broker);
    wait_node_desired(&site.socket, "25").await;

    // The link returns: the last answered reading and the node's value, with its versions,
    // are in the cloud.
    site.proxy.faults.heal();
    sedge_testkit::wait::until_async(
        "reading 30 in the cloud",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let devices = devices.clone();
            async move {
                let d = devices.get_status("valve-1").await.ok()?;
                let v = d
                    .status?
                    .twins
                    .into_iter()
                    .find(|t| t.property_name == "setpoint")?
                    .reported?
                    .value;
                (v == "30").then_some(())
            }
        },
    )
    .await;
    wait_observed(&devices, ("25", "edge", "1")).await;
    // And the cloud, having seen edge version 1, sets 31: it wins.
    devices
        .patch("valve-1", &PatchParams::default(), &set_desired("31"))
        .await
        .unwrap();
    wait_node_desired(&site.socket, "31").await;
    wait_observed(&devices, ("31", "cloud", "1")).await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    site.cloud.shutdown().await;
}

/// A Lease renewal is liveness, not state: across a link cut none is stored in the node's
/// outbox (each would cost the node two SQLite commits, stored and then removed on the ack,
/// every interval), and the first one after the link returns renews the Lease at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewals_are_never_stored_and_resume_when_the_link_returns() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (site, _core, _twin) = site().await;
    let leases = Api::<Lease>::namespaced(site.client.clone(), "kube-node-lease");
    let renewed = |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| std::time::SystemTime::from(t.0))
    };
    sedge_testkit::wait::until_async(
        "the node's Lease",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            leases
                .get_opt("edge-1")
                .await
                .ok()
                .flatten()
                .and_then(|l| renewed(&l))
        },
    )
    .await;
    site.cut();
    // Four renewals (500 ms apart) come due while the link is down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outbox =
        sedge_tunnel::outbox::Outbox::open(&site.cfg.tunnel.data_dir.join("outbox.db"), 1000)
            .unwrap();
    let waiting = outbox.after(0, 1000).unwrap();
    let stored: Vec<&str> = waiting
        .iter()
        .map(|(_, m)| m.route.resource.as_str())
        .filter(|r| r.contains("/lease/"))
        .collect();
    assert!(
        stored.is_empty(),
        "renewals stored in the outbox: {stored:?}"
    );
    let healed = std::time::SystemTime::now();
    site.proxy.faults.heal();
    sedge_testkit::wait::until_async(
        "the Lease renewed after the link returned",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let l = leases.get_opt("edge-1").await.ok().flatten()?;
            renewed(&l).filter(|&t| t >= healed)
        },
    )
    .await;
}
