//! Devices end to end on `sedge up` (in process): `kubectl apply` a KubeEdge v1beta1
//! DeviceModel and Device bound to edge-1 -> the cloud core sends both to the node -> a mapper
//! (this test, over KubeEdge's DMI on the node's Unix socket) registers for its protocol and gets
//! the device -> it reports twins and state -> `kubectl get device` shows them in the status.
//! Reports the node must refuse (another node's or an unknown device, a property the device does
//! not have, an oversize value) are refused with the reason, and nothing of them reaches the cloud.

mod common;

use common::kubectl_at as kubectl;

use std::path::PathBuf;
use std::time::Duration;

use sedge::platform::UpArgs;
use sedge_devices::twin::dmi;
use sedge_devices::twin::dmi::device_manager_service_client::DeviceManagerServiceClient;
use sedge_devices::twin::dmi::device_mapper_service_server::{
    DeviceMapperService, DeviceMapperServiceServer,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// A mapper's side of DMI for the test: it records what the agent tells it.
struct FakeMapper(mpsc::UnboundedSender<(String, dmi::Device)>);

#[tonic::async_trait]
impl DeviceMapperService for FakeMapper {
    async fn register_device(
        &self,
        r: Request<dmi::RegisterDeviceRequest>,
    ) -> Result<Response<dmi::RegisterDeviceResponse>, Status> {
        let d = r.into_inner().device.unwrap_or_default();
        let _ = self.0.send(("register".into(), d.clone()));
        Ok(Response::new(dmi::RegisterDeviceResponse {
            device_name: d.name,
            device_namespace: d.namespace,
        }))
    }
    async fn remove_device(
        &self,
        r: Request<dmi::RemoveDeviceRequest>,
    ) -> Result<Response<dmi::RemoveDeviceResponse>, Status> {
        let r = r.into_inner();
        let d = dmi::Device {
            name: r.device_name,
            namespace: r.device_namespace,
            ..Default::default()
        };
        let _ = self.0.send(("remove".into(), d));
        Ok(Response::new(dmi::RemoveDeviceResponse {}))
    }
    async fn update_device(
        &self,
        r: Request<dmi::UpdateDeviceRequest>,
    ) -> Result<Response<dmi::UpdateDeviceResponse>, Status> {
        let _ = self
            .0
            .send(("update".into(), r.into_inner().device.unwrap_or_default()));
        Ok(Response::new(dmi::UpdateDeviceResponse {}))
    }
    async fn create_device_model(
        &self,
        _: Request<dmi::CreateDeviceModelRequest>,
    ) -> Result<Response<dmi::CreateDeviceModelResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn remove_device_model(
        &self,
        _: Request<dmi::RemoveDeviceModelRequest>,
    ) -> Result<Response<dmi::RemoveDeviceModelResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn update_device_model(
        &self,
        _: Request<dmi::UpdateDeviceModelRequest>,
    ) -> Result<Response<dmi::UpdateDeviceModelResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn get_device(
        &self,
        _: Request<dmi::GetDeviceRequest>,
    ) -> Result<Response<dmi::GetDeviceResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves the fake mapper on `socket`; what the agent tells it arrives on the receiver.
fn fake_mapper(socket: &std::path::Path) -> mpsc::UnboundedReceiver<(String, dmi::Device)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DeviceMapperServiceServer::new(FakeMapper(tx)))
            .serve_with_incoming(incoming),
    );
    rx
}

async fn dmi_client(socket: PathBuf) -> DeviceManagerServiceClient<Channel> {
    DeviceManagerServiceClient::new(sedge_devices::twin::uds_channel(&socket).await.unwrap())
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
    let (up, kc, state) = common::up_with_thermometer(&UpArgs::local(dir.path())).await;
    let socket = PathBuf::from(state["edges"][0]["dmi"].as_str().unwrap());
    let mut c = dmi_client(socket).await;

    // The mapper registers for Modbus, with its own socket, and gets the device (once the
    // cloud has sent it).
    let mapper_socket = dir.path().join("mapper.sock");
    let mut told = fake_mapper(&mapper_socket);
    let address = mapper_socket.display().to_string().into_bytes();
    let register = |protocol: &str| dmi::MapperRegisterRequest {
        with_data: true,
        mapper: Some(dmi::MapperInfo {
            name: "test-mapper".into(),
            protocol: protocol.into(),
            address: if protocol == "modbus" {
                address.clone()
            } else {
                Vec::new()
            },
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
    let mut relative = register("modbus");
    relative.mapper.as_mut().unwrap().address = b"mapper.sock".to_vec();
    let e = c.mapper_register(relative).await.unwrap_err();
    assert!(e.message().contains("absolute path"), "{e:?}");

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

    // A desired value set in the cloud reaches the mapper: UpdateDevice with the new value.
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl(&k, &common::PATCH_ENABLE_OFF))
        .await
        .unwrap();
    let desired = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (what, d) = told.recv().await.expect("the fake mapper stopped");
            let value = d
                .spec
                .as_ref()
                .and_then(|s| s.properties.iter().find(|p| p.name == "temperature-enable"))
                .and_then(|p| p.desired.as_ref())
                .map(|v| v.value.clone());
            if what == "update" && value.as_deref() == Some("false") {
                return d;
            }
        }
    })
    .await
    .expect("the mapper was told of the new desired value");
    assert_eq!(desired.name, "thermometer-1");
    // Deleting the device tells the mapper to let it go.
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl(&k, &["delete", "device", "thermometer-1"]))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((what, d)) = told.recv().await {
            if what == "remove" && d.name == "thermometer-1" {
                return;
            }
        }
    })
    .await
    .expect("the mapper was told the device went away");
    up.stop().await;
}
