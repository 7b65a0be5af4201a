//! A device mapper for Modbus TCP, in the shape of KubeEdge's mappers: it registers with the
//! node's edge agent over DMI (`MapperRegister`, protocol `modbus`, with its own socket), gets
//! the node's Modbus devices, and for each one connects to the device (`configData`: `ip`,
//! `port`, `slaveID`), reads every property on its `collectCycle` (visitor `configData`:
//! `register` = `HoldingRegister`, `InputRegister`, `CoilRegister` or `DiscreteInputRegister`,
//! `offset`, optional `scale`), reports the twins on its `reportCycle` and the device state
//! (`online` while reads succeed, `offline` when they fail), and writes desired values of
//! holding registers and coils to the device, at start and whenever the agent says a device
//! changed (`UpdateDevice`). A property with `pushMethod.mqtt` also has each reading published
//! there (its `topic`, or KubeEdge's `$ke/events/device/<ns>/<name>/data/update`).
//!
//! [`Simulator`] is a Modbus TCP device in memory (holding registers, input registers, coils)
//! for tests and the demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sedge_devices::twin::dmi;
use sedge_devices::twin::dmi::device_manager_service_client::DeviceManagerServiceClient;
use sedge_devices::twin::dmi::device_mapper_service_server::{
    DeviceMapperService, DeviceMapperServiceServer,
};
use serde_json::Value;
use tokio::sync::watch;
use tokio_modbus::client::{Reader, Writer};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The protocol this mapper serves.
pub const PROTOCOL: &str = "modbus";
/// Read cycle when a property names none (ms).
pub const DEFAULT_CYCLE_MS: i64 = 1000;
/// Shortest cycle taken (ms): a device is not polled in a busy loop.
pub const MIN_CYCLE_MS: i64 = 100;

/// Why the mapper stopped.
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    /// The agent's DMI socket could not be reached or refused the mapper.
    #[error("the edge agent's DMI at {socket}: {message}")]
    Agent {
        /// The socket.
        socket: String,
        /// Why.
        message: String,
    },
    /// The mapper's own socket could not be served.
    #[error("cannot serve DeviceMapperService on {socket}: {message}")]
    Serve {
        /// The socket.
        socket: String,
        /// Why.
        message: String,
    },
}

/// The mapper's command line (`sedge-modbus-mapper`, and `sedge mapper modbus` for the
/// `sedge/modbus-mapper` image that runs it as a pod on the node).
#[derive(clap::Args, Debug, Clone)]
pub struct MapperArgs {
    /// The edge agent's DMI socket (`<node data dir>/dmi/dmi.sock`; `up.json` lists it). In a
    /// pod: where the hostPath of the agent's DMI directory is mounted, e.g.
    /// `/etc/kubeedge/dmi.sock`.
    #[arg(long, env = "SEDGE_DMI_SOCKET")]
    pub dmi_socket: PathBuf,
    /// This mapper's socket, where the agent tells it of device changes (in a pod: beside the
    /// DMI socket, e.g. `/etc/kubeedge/modbus-mapper.sock`).
    #[arg(long, default_value = "/tmp/sedge-modbus-mapper.sock")]
    pub socket: PathBuf,
    /// The name it registers with.
    #[arg(long, default_value = "sedge-modbus-mapper")]
    pub name: String,
    /// Also serve a simulated Modbus TCP device on this address (for the demo).
    #[arg(long)]
    pub simulate: Option<std::net::SocketAddr>,
}

/// Runs the mapper as its command line says (the simulator first, when asked for).
pub async fn run_args(args: MapperArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(addr) = args.simulate {
        let sim = Simulator::default();
        let bound = sim
            .start(addr)
            .await
            .with_context(|| format!("simulating on {addr}"))?;
        eprintln!("simulated Modbus TCP device on {bound}");
    }
    run(MapperConfig {
        name: args.name,
        dmi_socket: pod_path(&args.dmi_socket),
        socket: pod_path(&args.socket),
    })
    .await?;
    Ok(())
}

/// Longest Unix socket path (a socket address holds 108 bytes with the final NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A path as a container sees it, on the host. Under edged's process runtime a container's
/// files live under `$SEDGE_ROOT` and its volume mounts are links there (a hostPath links to the
/// host directory); where the path's directory exists under the root, the path is that
/// directory with its links followed (a socket's address must be short and real), else the path
/// as given (the mapper runs outside a pod).
pub fn pod_path(p: &std::path::Path) -> PathBuf {
    let root = std::env::var_os("SEDGE_ROOT").filter(|r| !r.is_empty());
    pod_path_in(root.as_deref().map(std::path::Path::new), p)
}

/// [`pod_path`] with the container's root given.
pub fn pod_path_in(root: Option<&std::path::Path>, p: &std::path::Path) -> PathBuf {
    let Some(root) = root else {
        return p.to_path_buf();
    };
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let under = root.join(rel);
    match (under.parent().map(std::fs::canonicalize), under.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => p.to_path_buf(),
    }
}

/// The mapper's settings.
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// The mapper's name, as registered.
    pub name: String,
    /// The agent's DMI socket (`<node data dir>/dmi/dmi.sock`).
    pub dmi_socket: PathBuf,
    /// The mapper's own socket, where the agent tells it of device changes.
    pub socket: PathBuf,
}

/// A config value packed as DMI's `Any` of a well-known wrapper, back to JSON.
pub fn unpack(a: &prost_types::Any) -> Value {
    use prost::Message;
    let kind = a.type_url.rsplit('.').next().unwrap_or_default();
    let v = a.value.as_slice();
    match kind {
        "StringValue" => String::decode(v).map(Value::from).unwrap_or(Value::Null),
        "Int64Value" => i64::decode(v).map(Value::from).unwrap_or(Value::Null),
        "Int32Value" => i32::decode(v).map(Value::from).unwrap_or(Value::Null),
        "DoubleValue" => f64::decode(v).map(Value::from).unwrap_or(Value::Null),
        "FloatValue" => f32::decode(v)
            .map(|f| Value::from(f as f64))
            .unwrap_or(Value::Null),
        "BoolValue" => bool::decode(v).map(Value::from).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn config(c: &Option<dmi::CustomizedValue>) -> HashMap<String, Value> {
    c.as_ref()
        .map(|c| c.data.iter().map(|(k, v)| (k.clone(), unpack(v))).collect())
        .unwrap_or_default()
}

fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Where a property lives on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    /// Read/write 16-bit words.
    Holding,
    /// Read-only 16-bit words.
    Input,
    /// Read/write bits.
    Coil,
    /// Read-only bits.
    DiscreteInput,
}

/// One property of one device, as the mapper reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// The property name.
    pub name: String,
    /// Which register table.
    pub register: Register,
    /// Its address.
    pub offset: u16,
    /// Value = word x scale.
    pub scale: f64,
    /// Read cycle (ms).
    pub collect_ms: i64,
    /// The desired value the cloud set, if any.
    pub desired: Option<String>,
    /// Where each read value is also published (`pushMethod.mqtt`): broker `host:port` and topic.
    pub push_mqtt: Option<(String, String)>,
}

/// A device as the mapper drives it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Modbus TCP address.
    pub address: SocketAddr,
    /// The slave (unit) id.
    pub slave: u8,
    /// Report cycle (ms): the shortest of its properties'.
    pub report_ms: i64,
    /// Its properties.
    pub properties: Vec<Property>,
}

/// Reads a DMI device into what the mapper needs; the error names the field that is wrong.
pub fn device_config(d: &dmi::Device) -> Result<DeviceConfig, String> {
    let spec = d.spec.as_ref().ok_or("the device has no spec")?;
    let proto = spec.protocol.as_ref().ok_or("the device has no protocol")?;
    let c = config(&proto.config_data);
    let ip = c
        .get("ip")
        .and_then(Value::as_str)
        .ok_or("protocol.configData.ip is missing")?;
    let port = number(c.get("port")).unwrap_or(502.0);
    let address: SocketAddr = format!("{ip}:{}", port as u16)
        .parse()
        .map_err(|e| format!("protocol.configData ip/port: {e}"))?;
    let slave = number(c.get("slaveID")).unwrap_or(1.0) as u8;
    let mut properties = Vec::new();
    let mut report_ms = i64::MAX;
    for p in &spec.properties {
        let v = config(&p.visitors.as_ref().and_then(|v| v.config_data.clone()));
        let register = match v.get("register").and_then(Value::as_str) {
            Some("HoldingRegister") => Register::Holding,
            Some("InputRegister") => Register::Input,
            Some("CoilRegister") => Register::Coil,
            Some("DiscreteInputRegister") => Register::DiscreteInput,
            other => {
                return Err(format!(
                    "property {}: visitors.configData.register {other:?} is not HoldingRegister, InputRegister, CoilRegister or DiscreteInputRegister",
                    p.name
                ));
            }
        };
        let offset = number(v.get("offset"))
            .filter(|o| (0.0..=65535.0).contains(o))
            .ok_or_else(|| {
                format!(
                    "property {}: visitors.configData.offset must be 0..65535",
                    p.name
                )
            })? as u16;
        let cycle = |c: i64| {
            if c <= 0 {
                DEFAULT_CYCLE_MS
            } else {
                c.max(MIN_CYCLE_MS)
            }
        };
        report_ms = report_ms.min(cycle(p.report_cycle));
        properties.push(Property {
            name: p.name.clone(),
            register,
            offset,
            scale: number(v.get("scale")).unwrap_or(1.0),
            collect_ms: cycle(p.collect_cycle),
            desired: p
                .desired
                .as_ref()
                .map(|d| d.value.clone())
                .filter(|v| !v.is_empty()),
            push_mqtt: p
                .push_method
                .as_ref()
                .and_then(|m| m.mqtt.as_ref())
                .map(|m| {
                    let broker = m
                        .address
                        .trim_start_matches("tcp://")
                        .trim_start_matches("mqtt://")
                        .to_string();
                    let topic = if m.topic.is_empty() {
                        data_topic(&d.namespace, &d.name)
                    } else {
                        m.topic.clone()
                    };
                    (broker, topic)
                })
                .filter(|(b, _)| !b.is_empty()),
        });
    }
    Ok(DeviceConfig {
        namespace: d.namespace.clone(),
        name: d.name.clone(),
        address,
        slave,
        report_ms: if report_ms == i64::MAX {
            DEFAULT_CYCLE_MS
        } else {
            report_ms
        },
        properties,
    })
}

/// KubeEdge's topic for a device's property data (`TopicDataUpdate`).
pub fn data_topic(ns: &str, name: &str) -> String {
    format!("$ke/events/device/{ns}/{name}/data/update")
}

/// MQTT clients by broker, for `pushMethod.mqtt`.
#[derive(Default)]
struct Pushers(HashMap<String, rumqttc::AsyncClient>);

impl Pushers {
    /// Publishes `{"event_id","timestamp","data":{"<prop>":{"value","metadata":{"timestamp"}}}}`
    /// (QoS 0: a missed reading is followed by the next).
    fn publish(&mut self, broker: &str, topic: &str, property: &str, value: &str) {
        let client = self.0.entry(broker.to_string()).or_insert_with(|| {
            let (h, p) = broker.rsplit_once(':').unwrap_or((broker, "1883"));
            let mut o = rumqttc::MqttOptions::new(
                format!("sedge-modbus-{}", std::process::id()),
                h,
                p.parse().unwrap_or(1883),
            );
            o.set_max_packet_size(64 * 1024, 64 * 1024);
            let (c, mut ev) = rumqttc::AsyncClient::new(o, 1024);
            tokio::spawn(async move {
                loop {
                    if ev.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
            c
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let doc = serde_json::json!({"event_id": "", "timestamp": now,
            "data": {property: {"value": value, "metadata": {"timestamp": now.to_string()}}}});
        let _ = client.try_publish(topic, rumqttc::QoS::AtMostOnce, false, doc.to_string());
    }
}

fn format_word(w: u16, scale: f64) -> String {
    let v = w as f64 * scale;
    if v.fract() == 0.0 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "on" => Some(true),
        "false" | "0" | "off" => Some(false),
        _ => None,
    }
}

/// One device's loop: connect, read on each collect cycle, report on the report cycle, write
/// desired values when they change; stops when `updates` closes.
async fn drive(
    agent: DeviceManagerServiceClient<Channel>,
    mut updates: watch::Receiver<DeviceConfig>,
) {
    let mut last: HashMap<String, String> = HashMap::new();
    let mut written: HashMap<String, String> = HashMap::new();
    let mut online: Option<bool> = None;
    let mut ctx: Option<tokio_modbus::client::Context> = None;
    let mut pushers = Pushers::default();
    let mut report = tokio::time::interval(Duration::from_millis(DEFAULT_CYCLE_MS as u64));
    let mut read = tokio::time::interval(Duration::from_millis(DEFAULT_CYCLE_MS as u64));
    loop {
        let cfg = updates.borrow().clone();
        let collect_ms = cfg
            .properties
            .iter()
            .map(|p| p.collect_ms)
            .min()
            .unwrap_or(DEFAULT_CYCLE_MS);
        if read.period() != Duration::from_millis(collect_ms as u64) {
            read = tokio::time::interval(Duration::from_millis(collect_ms as u64));
        }
        if report.period() != Duration::from_millis(cfg.report_ms as u64) {
            report = tokio::time::interval(Duration::from_millis(cfg.report_ms as u64));
        }
        tokio::select! {
            r = updates.changed() => {
                if r.is_err() { return; }
                written.clear();
                continue;
            }
            _ = read.tick() => {}
            _ = report.tick() => {
                if !last.is_empty() {
                    let twins = cfg.properties.iter().filter_map(|p| {
                        last.get(&p.name).map(|v| dmi::Twin {
                            property_name: p.name.clone(),
                            reported: Some(dmi::TwinProperty { value: v.clone(), metadata: HashMap::new() }),
                            observed_desired: p.desired.clone().map(|d| dmi::TwinProperty { value: d, metadata: HashMap::new() }),
                        })
                    }).collect();
                    let mut a = agent.clone();
                    if let Err(e) = a.report_device_status(dmi::ReportDeviceStatusRequest {
                        device_name: cfg.name.clone(),
                        device_namespace: cfg.namespace.clone(),
                        reported_device: Some(dmi::DeviceStatus { twins, report_to_cloud: true, report_cycle: cfg.report_ms }),
                    }).await {
                        tracing::warn!(device = %cfg.name, "the agent refused the report: {}", e.message());
                    }
                }
                continue;
            }
        }
        if ctx.is_none() {
            ctx = tokio::time::timeout(
                Duration::from_secs(3),
                tokio_modbus::client::tcp::connect_slave(
                    cfg.address,
                    tokio_modbus::Slave(cfg.slave),
                ),
            )
            .await
            .ok()
            .and_then(Result::ok);
        }
        let mut ok = ctx.is_some();
        if let Some(c) = ctx.as_mut() {
            for p in &cfg.properties {
                // Desired values first, once per value.
                if let Some(d) = &p.desired
                    && written.get(&p.name) != Some(d)
                {
                    let w = match p.register {
                        Register::Coil => match parse_bool(d) {
                            Some(b) => c.write_single_coil(p.offset, b).await.map(|r| r.is_ok()),
                            None => Ok(false),
                        },
                        Register::Holding => match d.trim().parse::<f64>() {
                            Ok(v) if p.scale != 0.0 => {
                                let word = (v / p.scale).round().clamp(0.0, 65535.0) as u16;
                                c.write_single_register(p.offset, word)
                                    .await
                                    .map(|r| r.is_ok())
                            }
                            _ => Ok(false),
                        },
                        _ => Ok(false),
                    };
                    match w {
                        Ok(true) => {
                            written.insert(p.name.clone(), d.clone());
                        }
                        Ok(false) => {
                            tracing::warn!(device = %cfg.name, property = %p.name, desired = %d, "desired value not written: read-only register or not a value it takes");
                            written.insert(p.name.clone(), d.clone());
                        }
                        Err(_) => ok = false,
                    }
                }
                let value = match p.register {
                    Register::Holding => c.read_holding_registers(p.offset, 1).await.map(|r| {
                        r.ok()
                            .and_then(|w| w.first().map(|w| format_word(*w, p.scale)))
                    }),
                    Register::Input => c.read_input_registers(p.offset, 1).await.map(|r| {
                        r.ok()
                            .and_then(|w| w.first().map(|w| format_word(*w, p.scale)))
                    }),
                    Register::Coil => c
                        .read_coils(p.offset, 1)
                        .await
                        .map(|r| r.ok().and_then(|b| b.first().map(|b| b.to_string()))),
                    Register::DiscreteInput => c
                        .read_discrete_inputs(p.offset, 1)
                        .await
                        .map(|r| r.ok().and_then(|b| b.first().map(|b| b.to_string()))),
                };
                match value {
                    Ok(Some(v)) => {
                        if let Some((broker, topic)) = &p.push_mqtt {
                            pushers.publish(broker, topic, &p.name, &v);
                        }
                        last.insert(p.name.clone(), v);
                    }
                    Ok(None) => {}
                    Err(_) => ok = false,
                }
            }
        }
        if !ok {
            ctx = None;
        }
        if online != Some(ok) {
            online = Some(ok);
            let mut a = agent.clone();
            let _ = a
                .report_device_states(dmi::ReportDeviceStatesRequest {
                    device_name: cfg.name.clone(),
                    device_namespace: cfg.namespace.clone(),
                    state: if ok { "online" } else { "offline" }.into(),
                })
                .await;
        }
    }
}

/// The devices being driven, by `namespace/name`.
#[derive(Clone)]
struct Devices {
    agent: DeviceManagerServiceClient<Channel>,
    running: Arc<Mutex<HashMap<String, watch::Sender<DeviceConfig>>>>,
}

impl Devices {
    /// Starts or updates the device's loop; an unusable config is refused with the reason.
    fn upsert(&self, d: &dmi::Device) -> Result<(), String> {
        let cfg = device_config(d)?;
        let key = format!("{}/{}", cfg.namespace, cfg.name);
        let mut running = self.running.lock().unwrap();
        if let Some(tx) = running.get(&key) {
            let _ = tx.send(cfg);
            return Ok(());
        }
        let (tx, rx) = watch::channel(cfg);
        tokio::spawn(drive(self.agent.clone(), rx));
        running.insert(key, tx);
        Ok(())
    }

    fn remove(&self, ns: &str, name: &str) {
        self.running.lock().unwrap().remove(&format!("{ns}/{name}"));
    }
}

#[tonic::async_trait]
impl DeviceMapperService for Devices {
    async fn register_device(
        &self,
        r: Request<dmi::RegisterDeviceRequest>,
    ) -> Result<Response<dmi::RegisterDeviceResponse>, Status> {
        let d = r
            .into_inner()
            .device
            .ok_or_else(|| Status::invalid_argument("device is missing"))?;
        self.upsert(&d).map_err(Status::invalid_argument)?;
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
        self.remove(&r.device_namespace, &r.device_name);
        Ok(Response::new(dmi::RemoveDeviceResponse {}))
    }

    async fn update_device(
        &self,
        r: Request<dmi::UpdateDeviceRequest>,
    ) -> Result<Response<dmi::UpdateDeviceResponse>, Status> {
        let d = r
            .into_inner()
            .device
            .ok_or_else(|| Status::invalid_argument("device is missing"))?;
        self.upsert(&d).map_err(Status::invalid_argument)?;
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
        Err(Status::unimplemented(
            "GetDevice: read the Device from the cloud or the twin",
        ))
    }
}

/// Serves the mapper's socket, registers with the agent, and drives the node's Modbus devices
/// until the task is dropped.
pub async fn run(cfg: MapperConfig) -> Result<(), MapperError> {
    let socket = cfg.socket.display().to_string();
    let agent_socket = cfg.dmi_socket.display().to_string();
    let agent_err = |message: String| MapperError::Agent {
        socket: agent_socket.clone(),
        message,
    };
    if socket.len() > MAX_SOCKET_PATH {
        return Err(MapperError::Serve {
            message: format!(
                "the path is {} bytes; a Unix socket's is at most {MAX_SOCKET_PATH} (give --socket a shorter one)",
                socket.len()
            ),
            socket,
        });
    }
    let channel = sedge_devices::twin::uds_channel(&cfg.dmi_socket)
        .await
        .map_err(agent_err)?;
    let mut agent = DeviceManagerServiceClient::new(channel);
    let devices = Devices {
        agent: agent.clone(),
        running: Arc::default(),
    };
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = tokio::net::UnixListener::bind(&cfg.socket).map_err(|e| MapperError::Serve {
        socket: socket.clone(),
        message: e.to_string(),
    })?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DeviceMapperServiceServer::new(devices.clone()))
            .serve_with_incoming(incoming),
    );
    let registered = agent
        .mapper_register(dmi::MapperRegisterRequest {
            with_data: true,
            mapper: Some(dmi::MapperInfo {
                name: cfg.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                api_version: "v1beta1".into(),
                protocol: PROTOCOL.into(),
                address: socket.clone().into_bytes(),
                state: "ok".into(),
            }),
        })
        .await
        .map_err(|s| agent_err(s.message().to_string()))?
        .into_inner();
    tracing::info!(
        devices = registered.device_list.len(),
        "registered with the edge agent"
    );
    for d in &registered.device_list {
        if let Err(e) = devices.upsert(d) {
            tracing::warn!(device = %format!("{}/{}", d.namespace, d.name), "not driven: {e}");
        }
    }
    server.await.ok();
    Ok(())
}

/// A Modbus TCP device in memory: holding registers, input registers and coils.
#[derive(Clone, Default)]
pub struct Simulator {
    holding: Arc<Mutex<HashMap<u16, u16>>>,
    input: Arc<Mutex<HashMap<u16, u16>>>,
    coils: Arc<Mutex<HashMap<u16, bool>>>,
}

impl tokio_modbus::server::Service for Simulator {
    type Request = tokio_modbus::Request<'static>;
    type Response = tokio_modbus::Response;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        use tokio_modbus::{Request as Q, Response as R};
        let words = |m: &Mutex<HashMap<u16, u16>>, a: u16, n: u16| {
            let m = m.lock().unwrap();
            (a..a.saturating_add(n))
                .map(|i| *m.get(&i).unwrap_or(&0))
                .collect::<Vec<_>>()
        };
        let r = match req {
            Q::ReadHoldingRegisters(a, n) => {
                Ok(R::ReadHoldingRegisters(words(&self.holding, a, n)))
            }
            Q::ReadInputRegisters(a, n) => Ok(R::ReadInputRegisters(words(&self.input, a, n))),
            Q::ReadCoils(a, n) => {
                let c = self.coils.lock().unwrap();
                Ok(R::ReadCoils(
                    (a..a.saturating_add(n))
                        .map(|i| *c.get(&i).unwrap_or(&false))
                        .collect(),
                ))
            }
            Q::WriteSingleRegister(a, w) => {
                self.holding.lock().unwrap().insert(a, w);
                Ok(R::WriteSingleRegister(a, w))
            }
            Q::WriteSingleCoil(a, b) => {
                self.coils.lock().unwrap().insert(a, b);
                Ok(R::WriteSingleCoil(a, b))
            }
            _ => Err(tokio_modbus::ExceptionCode::IllegalFunction),
        };
        std::future::ready(r)
    }
}

impl Simulator {
    /// Serves the device on `listen` (port 0 picks one); returns the address.
    pub async fn start(&self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let me = self.clone();
        tokio::spawn(async move {
            let on_connected = |stream, _addr| {
                let me = me.clone();
                async move { Ok(Some((me, stream))) }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        });
        Ok(addr)
    }

    /// Sets a holding register.
    pub fn set_holding(&self, addr: u16, v: u16) {
        self.holding.lock().unwrap().insert(addr, v);
    }

    /// A holding register.
    pub fn holding(&self, addr: u16) -> u16 {
        *self.holding.lock().unwrap().get(&addr).unwrap_or(&0)
    }

    /// Sets a coil.
    pub fn set_coil(&self, addr: u16, v: bool) {
        self.coils.lock().unwrap().insert(addr, v);
    }

    /// A coil.
    pub fn coil(&self, addr: u16) -> bool {
        *self.coils.lock().unwrap().get(&addr).unwrap_or(&false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_paths_resolve_under_the_root_through_the_mount_link() {
        let host = std::env::temp_dir().join(format!("sedge-mapper-test-{}", std::process::id()));
        let dmi = host.join("dmi");
        let root = host.join("root");
        std::fs::create_dir_all(&dmi).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // The runtime's volume mount: <root>/etc/kubeedge -> the node's DMI directory.
        std::os::unix::fs::symlink(&dmi, root.join("etc/kubeedge")).unwrap();
        let p = std::path::Path::new("/etc/kubeedge/dmi.sock");
        let real = std::fs::canonicalize(&dmi).unwrap().join("dmi.sock");
        assert_eq!(pod_path_in(Some(&root), p), real);
        // Outside a pod, or where the pod has no such directory: as given.
        assert_eq!(pod_path_in(None, p), p);
        let elsewhere = std::path::Path::new("/nowhere/m.sock");
        assert_eq!(pod_path_in(Some(&root), elsewhere), elsewhere);
        std::fs::remove_dir_all(&host).unwrap();
    }

    #[tokio::test]
    async fn a_socket_path_too_long_for_unix_is_named() {
        let e = run(MapperConfig {
            name: "m".into(),
            dmi_socket: "/nonexistent/dmi.sock".into(),
            socket: format!("/tmp/{}.sock", "x".repeat(120)).into(),
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most 107"), "{e}");
    }

    fn device(protocol: Value, visitor: Value) -> dmi::Device {
        let pack = |v: &Value| dmi::CustomizedValue {
            data: v
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), sedge_devices::dmiconv::any(v)))
                .collect(),
        };
        dmi::Device {
            name: "d".into(),
            namespace: "default".into(),
            spec: Some(dmi::DeviceSpec {
                protocol: Some(dmi::ProtocolConfig {
                    protocol_name: "modbus".into(),
                    config_data: Some(pack(&protocol)),
                }),
                properties: vec![dmi::DeviceProperty {
                    name: "t".into(),
                    visitors: Some(dmi::VisitorConfig {
                        protocol_name: "modbus".into(),
                        config_data: Some(pack(&visitor)),
                    }),
                    collect_cycle: 5,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn a_good_device_reads_and_bad_configs_name_the_field() {
        let ok = device(
            serde_json::json!({"ip": "127.0.0.1", "port": 1502, "slaveID": 2}),
            serde_json::json!({"register": "CoilRegister", "offset": 3}),
        );
        let c = device_config(&ok).unwrap();
        assert_eq!(c.address.port(), 1502);
        assert_eq!(c.slave, 2);
        assert_eq!(c.properties[0].register, Register::Coil);
        assert_eq!(c.properties[0].offset, 3);
        assert_eq!(
            c.properties[0].collect_ms, MIN_CYCLE_MS,
            "a 5 ms cycle is raised"
        );
        for (protocol, visitor, want) in [
            (
                serde_json::json!({"port": 502}),
                serde_json::json!({"register": "CoilRegister", "offset": 0}),
                "configData.ip is missing",
            ),
            (
                serde_json::json!({"ip": "not an ip"}),
                serde_json::json!({"register": "CoilRegister", "offset": 0}),
                "ip/port",
            ),
            (
                serde_json::json!({"ip": "127.0.0.1"}),
                serde_json::json!({"register": "Fancy", "offset": 0}),
                "is not HoldingRegister",
            ),
            (
                serde_json::json!({"ip": "127.0.0.1"}),
                serde_json::json!({"register": "CoilRegister", "offset": 70000}),
                "offset must be 0..65535",
            ),
            (
                serde_json::json!({"ip": "127.0.0.1"}),
                serde_json::json!({"register": "CoilRegister"}),
                "offset must be 0..65535",
            ),
        ] {
            let e = device_config(&device(protocol, visitor)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(
            device_config(&dmi::Device::default())
                .unwrap_err()
                .contains("no spec")
        );
    }
}
