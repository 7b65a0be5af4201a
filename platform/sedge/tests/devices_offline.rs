//! Devices across a link cut and an agent restart: while the node is cut off, a mapper's
//! reports are taken and kept (in the node's SQLite store and outbox), the cloud changes a
//! desired value, and the agent is stopped and started again, serving its devices from SQLite
//! at once. When the link returns, the reported value reaches the Device's status and the new
//! desired value reaches the node.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use sedge_cloudcore::{CloudCore, CloudCoreConfig};
use sedge_devices::twin::dmi;
use sedge_devices::twin::dmi::device_manager_service_client::DeviceManagerServiceClient;
use sedge_devices::twin::{DeviceTwin, DeviceTwinConfig};
use sedge_devices::{Device, DeviceModel};
use sedge_edgecore::{EdgeCore, EdgeCoreConfig, EdgeModule};
use sedge_tunnel::fault::TcpFaultProxy;

async fn agent(cfg: &EdgeCoreConfig, dmi_socket: &std::path::Path) -> EdgeCore {
    let twin = DeviceTwin::new(DeviceTwinConfig {
        dmi_socket: dmi_socket.to_path_buf(),
        ..Default::default()
    });
    EdgeCore::start(cfg.clone(), vec![Arc::new(twin) as Arc<dyn EdgeModule>])
        .await
        .unwrap()
}

/// What the node serves a Modbus mapper: its device, if it has it.
async fn node_device(socket: &std::path::Path) -> Option<dmi::Device> {
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
    r.device_list.into_iter().next()
}

fn desired(d: &dmi::Device) -> String {
    d.spec.as_ref().unwrap().properties[1]
        .desired
        .as_ref()
        .map(|v| v.value.clone())
        .unwrap_or_default()
}

async fn report(socket: &std::path::Path, value: &str) {
    let channel = sedge_devices::twin::uds_channel(socket).await.unwrap();
    DeviceManagerServiceClient::new(channel)
        .report_device_status(dmi::ReportDeviceStatusRequest {
            device_name: "thermometer-1".into(),
            device_namespace: "default".into(),
            reported_device: Some(dmi::DeviceStatus {
                twins: vec![dmi::Twin {
                    property_name: "temperature".into(),
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
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    sedge_devices::install_crds(&client).await.unwrap();
    let mut cc = CloudCoreConfig::default();
    cc.hub.data_dir = dir.path().join("cloudhub");
    cc.hub.pki_dir = dir.path().join("apiserver/pki");
    cc.hub.listen = "127.0.0.1:0".into();
    cc.hub.listen_quic = String::new();
    cc.hub.keepalive_interval_ms = 500;
    cc.hub.ack_timeout_ms = 500;
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
    let core = agent(&cfg, &socket).await;

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
    proxy.faults.set_down(true);
    proxy.faults.set_refuse(true);
    proxy.faults.cut();
    // The mapper reports while offline: taken.
    report(&socket, "30").await;
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
    // The agent restarts while offline and serves its device from SQLite at once.
    core.shutdown(false).await;
    let core = agent(&cfg, &socket).await;
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
        status.status.map(|s| s.twins.is_empty()).unwrap_or(true),
        "offline: nothing reached the cloud yet"
    );

    // The link returns: the value reported offline reaches the cloud, the desired value the node.
    proxy.faults.heal();
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
    cloud.shutdown().await;
}
