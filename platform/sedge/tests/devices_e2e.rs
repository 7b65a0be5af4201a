//! Devices end to end on `sedge up` (in process): `kubectl apply` a KubeEdge v1beta1
//! DeviceModel and Device bound to edge-1 -> the cloud core sends both to the node -> a mapper
//! (this test, over KubeEdge's DMI on the node's Unix socket) registers for its protocol and gets
//! the device -> it reports twins and state -> `kubectl get device` shows them in the status.
//! Reports the node must refuse (another node's or an unknown device, a property the device does
//! not have, an oversize value) are refused with the reason, and nothing of them reaches the cloud.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sedge::platform::{Up, UpArgs};
use sedge_devices::twin::dmi;
use sedge_devices::twin::dmi::device_manager_service_client::DeviceManagerServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

async fn dmi_client(socket: PathBuf) -> DeviceManagerServiceClient<Channel> {
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    DeviceManagerServiceClient::new(channel)
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn twin(name: &str, value: &str) -> dmi::Twin {
    dmi::Twin {
        property_name: name.into(),
        reported: Some(dmi::TwinProperty {
            value: value.into(),
            metadata: [("type".to_string(), "integer".to_string())].into(),
        }),
        observed_desired: None,
    }
}

fn status(device: &str, twins: Vec<dmi::Twin>) -> dmi::ReportDeviceStatusRequest {
    dmi::ReportDeviceStatusRequest {
        device_name: device.into(),
        device_namespace: "default".into(),
        reported_device: Some(dmi::DeviceStatus {
            twins,
            report_to_cloud: true,
            report_cycle: 1000,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapper_reports_through_dmi_and_kubectl_shows_the_device_status() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&UpArgs {
        data_dir: dir.path().to_path_buf(),
        edges: 1,
        listen: "127.0.0.1:0".into(),
        hub_listen: "127.0.0.1:0".into(),
        metaserver_port: 0,
        metrics_port: 0,
        edge_config: None,
        cloud_config: None,
        cloud_nodes: 0,
        no_ai: true,
        ai_config: None,
        lc_port: 0,
        host_path_allow: vec![],
    })
    .await
    .unwrap();
    let kc = up.server.kubeconfig.clone();
    let manifests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../devices/tests/manifests/modbus-thermometer.yaml"
    );
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl(&k, &["apply", "-f", manifests]))
        .await
        .unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("up.json")).unwrap())
            .unwrap();
    let socket = PathBuf::from(state["edges"][0]["dmi"].as_str().unwrap());
    let mut c = dmi_client(socket).await;

    // The mapper registers for Modbus and gets the device (once the cloud has sent it).
    let register = |protocol: &str| dmi::MapperRegisterRequest {
        with_data: true,
        mapper: Some(dmi::MapperInfo {
            name: "test-mapper".into(),
            protocol: protocol.into(),
            ..Default::default()
        }),
    };
    let got = sedge_testkit::wait::until_async(
        "the node holds the device",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let mut c = c.clone();
            let req = register("modbus");
            async move {
                let r = c.mapper_register(req).await.ok()?.into_inner();
                (!r.device_list.is_empty() && !r.model_list.is_empty()).then_some(r)
            }
        },
    )
    .await;
    let dev = &got.device_list[0];
    assert_eq!(dev.name, "thermometer-1");
    let spec = dev.spec.as_ref().unwrap();
    assert_eq!(spec.device_model_reference, "thermometer-model");
    assert_eq!(spec.properties.len(), 2);
    assert!(
        spec.protocol
            .as_ref()
            .unwrap()
            .config_data
            .as_ref()
            .unwrap()
            .data["port"]
            .type_url
            .ends_with("Int64Value")
    );
    assert_eq!(got.model_list[0].name, "thermometer-model");
    // A protocol nobody on this node uses: an empty list, not an error.
    let none = c
        .mapper_register(register("opcua"))
        .await
        .unwrap()
        .into_inner();
    assert!(none.device_list.is_empty() && none.model_list.is_empty());
    let e = c.mapper_register(register("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Bad reports are refused with the reason.
    let e = c
        .report_device_status(status("no-such-device", vec![twin("temperature", "1")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("default/no-such-device"), "{e:?}");
    let e = c
        .report_device_status(status("thermometer-1", vec![twin("pressure", "1")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("pressure"), "{e:?}");
    let e = c
        .report_device_status(status(
            "thermometer-1",
            vec![twin("temperature", &"9".repeat(600))],
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("at most 512"), "{e:?}");
    let e = c
        .report_device_states(dmi::ReportDeviceStatesRequest {
            device_name: "thermometer-1".into(),
            device_namespace: "default".into(),
            state: "x".repeat(1000),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Good reports reach the Device's status.
    c.report_device_status(status(
        "thermometer-1",
        vec![twin("temperature", "23"), twin("temperature-enable", "1")],
    ))
    .await
    .unwrap();
    c.report_device_states(dmi::ReportDeviceStatesRequest {
        device_name: "thermometer-1".into(),
        device_namespace: "default".into(),
        state: "online".into(),
    })
    .await
    .unwrap();
    let k = kc.clone();
    let row = sedge_testkit::wait::until_async(
        "the device's status in kubectl",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let k = k.clone();
            async move {
                let out = tokio::task::spawn_blocking(move || {
                    kubectl(&k, &["get", "device", "thermometer-1", "--no-headers"])
                })
                .await
                .ok()?;
                (out.contains("online") && out.contains("23,1")).then_some(out)
            }
        },
    )
    .await;
    assert!(row.contains("edge-1") && row.contains("modbus"), "{row}");
    let k = kc.clone();
    let status = tokio::task::spawn_blocking(move || {
        kubectl(
            &k,
            &[
                "get",
                "device",
                "thermometer-1",
                "-o",
                "jsonpath={.status.twins[0].reported.value} {.status.lastOnlineTime}",
            ],
        )
    })
    .await
    .unwrap();
    assert!(status.starts_with("23 20"), "{status}");
    up.stop().await;
}
