//! The edge's device twin: the node's devices (sent by the cloud into the node's SQLite store)
//! served to mappers over KubeEdge's DMI (`DeviceManagerService`, gRPC on a Unix socket), and
//! the twins and states mappers report, kept in the same store (so a restarted agent has them at
//! once) and sent to the cloud through the durable outbox, the latest per device winning while
//! the link is down.
//!
//! Every report is checked before it is stored or sent: the device must be on this node, the
//! twins must name its properties, values and metadata are bounded ([`crate::check_status`]);
//! a refusal is a gRPC status naming what was wrong.
//!
//! Downward, a mapper that registered with its own socket (`MapperInfo.address`) is told when a
//! device of its protocol on this node is added, changed (a new desired value, say) or removed:
//! `RegisterDevice`, `UpdateDevice`, `RemoveDevice` of its `DeviceMapperService`. Registered
//! mappers are kept in the store, so a restarted agent still knows them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use sedge_api::{DeviceStatusReport, Key, group, kind};
use sedge_edgecore::{EdgeModule, ModuleContext};
use sedge_tunnel::{Message, Policy, op};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::record::Record;
use crate::versions::CloudUpdate;
use crate::{Device, DeviceModel, Twin, TwinProperty, check_status};

/// The DMI messages and services (KubeEdge's `v1beta1` package).
pub mod dmi {
    #![allow(missing_docs, clippy::doc_lazy_continuation)]
    tonic::include_proto!("v1beta1");
}

use dmi::device_manager_service_server::{DeviceManagerService, DeviceManagerServiceServer};

/// The store kind twins are kept under (`<ns>/<name>` of the device).
pub const TWIN_KIND: &str = "devicetwin";
/// The store kind registered mappers are kept under (by protocol).
pub const MAPPER_KIND: &str = "mapper";
/// Longest mapper socket path (a Unix socket address holds 108 bytes).
const MAX_SOCKET_BYTES: usize = 107;
/// How long a call into a mapper may take.
const MAPPER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest DMI request taken (bytes): a status of many twins fits, a flood does not.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Longest mapper name, protocol or state (bytes).
const MAX_NAME_BYTES: usize = 128;

/// Where a node's DMI socket is by default: `<data dir>/dmi/dmi.sock`. The directory holds only
/// sockets (the agent's, and mappers' beside it), so the agent lets pods mount it by hostPath
/// ([`dmi_dir_for_pods`]): that is how a mapper running as a pod reaches DMI.
pub fn default_dmi_socket(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("dmi").join("dmi.sock")
}

/// The directory pods may mount for DMI when the socket is the default one (none otherwise: an
/// operator who puts the socket elsewhere decides what pods may mount).
pub fn dmi_dir_for_pods(data_dir: &std::path::Path, socket: &std::path::Path) -> Option<PathBuf> {
    (socket == default_dmi_socket(data_dir))
        .then(|| socket.parent().map(PathBuf::from))
        .flatten()
}

/// The device twin's settings.
#[derive(Debug, Clone, Default)]
pub struct DeviceTwinConfig {
    /// The DMI socket (KubeEdge's `/etc/kubeedge/dmi.sock`); empty disables DMI.
    pub dmi_socket: PathBuf,
    /// Where the embedded MQTT broker listens (KubeEdge's internal broker is
    /// `127.0.0.1:1884`; port 0 picks one); empty runs none.
    pub mqtt_listen: String,
    /// An external broker (`host:port`, e.g. a `mosquitto`) to use instead of the embedded one.
    pub mqtt_broker: String,
}

/// The device twin as an edge-agent module.
pub struct DeviceTwin {
    cfg: DeviceTwinConfig,
    mqtt: OnceLock<String>,
    /// What `start` spawned (the broker, the bus, DMI, the device follower); aborted by `stop`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl DeviceTwin {
    /// A device twin with `cfg`.
    pub fn new(cfg: DeviceTwinConfig) -> DeviceTwin {
        DeviceTwin {
            cfg,
            mqtt: OnceLock::new(),
            tasks: Mutex::default(),
        }
    }

    /// The MQTT broker the twin uses, once started (the embedded one's bound address, or the
    /// external one's).
    pub fn mqtt_address(&self) -> Option<&str> {
        self.mqtt.get().map(String::as_str)
    }
}

impl EdgeModule for DeviceTwin {
    fn group(&self) -> &str {
        "devicetwin"
    }

    fn start(&self, ctx: ModuleContext) {
        let twins = Twins {
            ctx,
            writes: Arc::default(),
            desired: tokio::sync::broadcast::channel(DESIRED_CHANGES).0,
        };
        let mut tasks = vec![tokio::spawn(follow_devices(twins.clone()))];
        let broker = if !self.cfg.mqtt_broker.is_empty() {
            Some(self.cfg.mqtt_broker.clone())
        } else if !self.cfg.mqtt_listen.is_empty() {
            match self
                .cfg
                .mqtt_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("mqtt_listen {:?}: {e}", self.cfg.mqtt_listen))
                .and_then(crate::broker::start_owned)
            {
                Ok((bound, accept)) => {
                    tasks.push(accept);
                    Some(bound.to_string())
                }
                Err(e) => {
                    tracing::error!("{e}; the MQTT event bus is off");
                    None
                }
            }
        } else {
            None
        };
        if let Some(b) = broker {
            let _ = self.mqtt.set(b.clone());
            tasks.push(tokio::spawn(crate::mqtt::run(twins.clone(), b)));
        }
        if !self.cfg.dmi_socket.as_os_str().is_empty() {
            let path = self.cfg.dmi_socket.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = serve_dmi(&path, Dmi { twins }).await {
                    tracing::error!(socket = %path.display(), error = %e, "DMI server stopped");
                }
            }));
        }
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tasks);
    }

    fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    fn handle(
        &self,
        _ctx: &ModuleContext,
        _msg: Message,
    ) -> BoxFuture<'static, Result<Option<Message>, String>> {
        // Devices come through the store; nothing is sent to this group yet.
        Box::pin(async { Ok(None) })
    }
}

/// Serves DMI on a Unix socket (replacing a stale socket file) until the task is dropped.
async fn serve_dmi(path: &std::path::Path, dmi: Dmi) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Only this machine's user (mappers run as pods on the node) reaches it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    tracing::info!(socket = %path.display(), "DMI (DeviceManagerService) serving");
    let incoming = futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    });
    tonic::transport::Server::builder()
        .add_service(
            DeviceManagerServiceServer::new(dmi)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(16 * 1024 * 1024),
        )
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| e.to_string())
}

/// The node's twins: the devices the cloud sent, the twins and states reported for them, and the
/// way up to the cloud. Shared by the DMI server and the MQTT bus.
#[derive(Clone)]
pub struct Twins {
    ctx: ModuleContext,
    /// Held while a twin is read, changed and written back.
    writes: Arc<Mutex<()>>,
    /// Desired values in force that changed.
    desired: tokio::sync::broadcast::Sender<DesiredChange>,
}

/// Desired-value changes waiting for their listeners (mappers, the MQTT bus); one that lags
/// further misses changes and catches up at the next one of the device.
const DESIRED_CHANGES: usize = 1024;

/// A device whose desired values in force changed.
#[derive(Debug, Clone)]
pub struct DesiredChange {
    /// The device's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Set by a local app (the MQTT bus has answered it already), not by the cloud.
    pub from_edge: bool,
}

struct Dmi {
    twins: Twins,
}

/// A gRPC channel over the Unix socket at `socket` (DMI runs on Unix sockets both ways).
pub async fn uds_channel(socket: &std::path::Path) -> Result<tonic::transport::Channel, String> {
    sedge_edgecore::uds_channel(socket, MAPPER_CALL_TIMEOUT).await
}

/// A mapper's `DeviceMapperService` on its Unix socket.
async fn mapper_client(
    socket: &str,
) -> Result<
    dmi::device_mapper_service_client::DeviceMapperServiceClient<tonic::transport::Channel>,
    String,
> {
    let channel = uds_channel(std::path::Path::new(socket)).await?;
    Ok(dmi::device_mapper_service_client::DeviceMapperServiceClient::new(channel))
}

/// Follows the node's devices: applies each cloud change to the desired values in force (the
/// version rule, [`crate::versions`]) and tells the mapper of the device's protocol about it,
/// and tells it too when a local app changes a desired value. A deleted device's twin goes.
async fn follow_devices(twins: Twins) {
    let mut changes = twins.ctx.store.subscribe();
    let mut desired = twins.desired.subscribe();
    // Devices that arrived while no one was following (idempotent: applied values stay), and
    // every twin's status once more (a report answered just before the agent was killed may not
    // have reached the outbox).
    for dev in twins.devices().await {
        let _ = twins.apply_cloud(&dev).await;
        twins.resend_status(&dev).await;
    }
    loop {
        let (dev, ns, name, what) = tokio::select! {
            change = changes.recv() => {
                let change = match change {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "device changes missed; mappers catch up when they register again");
                        continue;
                    }
                    Err(_) => return,
                };
                if change.kind != kind::DEVICE {
                    continue;
                }
                let Ok(dev) = serde_json::from_value::<Device>(change.object.clone()) else {
                    continue;
                };
                if change.kind_of_change == "DELETED" {
                    let (store, n, k) = (twins.ctx.store.clone(), change.namespace.clone(), change.name.clone());
                    let _ = tokio::task::spawn_blocking(move || store.delete(TWIN_KIND, &n, &k)).await;
                } else if let Err(e) = twins.apply_cloud(&dev).await {
                    tracing::warn!(device = %format!("{}/{}", change.namespace, change.name), "desired values not applied: {}", e.message());
                }
                (dev, change.namespace.clone(), change.name.clone(), change.kind_of_change)
            }
            d = desired.recv() => {
                let d = match d {
                    Ok(d) if d.from_edge => d,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let Ok(dev) = twins.device(&d.namespace, &d.name).await else { continue };
                (dev, d.namespace, d.name, "MODIFIED")
            }
        };
        let protocol = dev.spec.protocol.protocol_name.clone();
        let store = twins.ctx.store.clone();
        let mapper = tokio::task::spawn_blocking(move || store.get(MAPPER_KIND, "", &protocol))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let Some(socket) = mapper.and_then(|m| m["address"].as_str().map(String::from)) else {
            continue;
        };
        let dev = twins.effective(&dev).await;
        let who = format!("{ns}/{name}");
        let call = async {
            let mut c = mapper_client(&socket).await?;
            let r = match what {
                "ADDED" => c
                    .register_device(dmi::RegisterDeviceRequest {
                        device: Some(crate::dmiconv::device(&dev)),
                    })
                    .await
                    .map(drop),
                "DELETED" => c
                    .remove_device(dmi::RemoveDeviceRequest {
                        device_name: name.clone(),
                        device_namespace: ns.clone(),
                    })
                    .await
                    .map(drop),
                _ => c
                    .update_device(dmi::UpdateDeviceRequest {
                        device: Some(crate::dmiconv::device(&dev)),
                    })
                    .await
                    .map(drop),
            };
            r.map_err(|s| format!("the mapper refused: {}", s.message()))
        };
        if let Err(e) = call.await {
            tracing::warn!(device = %who, mapper = %socket, change = what, "{e}");
        }
    }
}

fn bounded(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; at most {MAX_NAME_BYTES}",
            v.len()
        )));
    }
    Ok(())
}

impl Twins {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.ctx.node
    }

    /// Changes of the desired values in force (from the cloud or a local app).
    pub fn desired_changes(&self) -> tokio::sync::broadcast::Receiver<DesiredChange> {
        self.desired.subscribe()
    }

    /// The devices on this node.
    pub async fn devices(&self) -> Vec<Device> {
        let store = self.ctx.store.clone();
        tokio::task::spawn_blocking(move || store.list(kind::DEVICE, None).unwrap_or_default())
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| serde_json::from_value(d).ok())
            .collect()
    }

    /// The stored twin of `ns/name` (an empty record if none).
    pub async fn twin(&self, ns: &str, name: &str) -> Record {
        let store = self.ctx.store.clone();
        let (n, k) = (ns.to_string(), name.to_string());
        Record::from_value(
            tokio::task::spawn_blocking(move || store.get(TWIN_KIND, &n, &k).ok().flatten())
                .await
                .ok()
                .flatten(),
        )
    }

    /// `dev` with the desired values in force on the node.
    pub async fn effective(&self, dev: &Device) -> Device {
        let ns = dev.metadata.namespace.clone().unwrap_or_default();
        let name = dev.metadata.name.clone().unwrap_or_default();
        self.twin(&ns, &name).await.effective(dev)
    }

    /// Reported values (`(property, value, metadata)`), checked against the device, merged
    /// into its twin by property, stored and sent up; the twin before and after.
    pub async fn report(
        &self,
        dev: &Device,
        reported: Vec<(String, String, std::collections::HashMap<String, String>)>,
    ) -> Result<(Record, Record), Status> {
        self.edge_update(dev, reported, Vec::new()).await
    }

    /// A local app's update: reported values (as [`Twins::report`]) and desired values
    /// (`(property, value)`, KubeEdge's `expected`), taken in one step; each desired value bumps
    /// the property's edge version and goes to the device's mapper. The twin before and after.
    pub async fn edge_update(
        &self,
        dev: &Device,
        reported: Vec<(String, String, std::collections::HashMap<String, String>)>,
        expected: Vec<(String, String)>,
    ) -> Result<(Record, Record), Status> {
        let twins: Vec<Twin> = reported
            .into_iter()
            .map(|(p, v, m)| Twin {
                property_name: p,
                reported: Some(TwinProperty {
                    value: v,
                    metadata: m.into_iter().collect(),
                }),
                observed_desired: None,
            })
            .collect();
        let asked: Vec<Twin> = expected
            .iter()
            .map(|(p, v)| Twin {
                property_name: p.clone(),
                reported: None,
                observed_desired: Some(TwinProperty {
                    value: v.clone(),
                    metadata: Default::default(),
                }),
            })
            .collect();
        check_status(dev, &json!({"twins": asked})).map_err(Status::invalid_argument)?;
        check_status(dev, &json!({"twins": twins})).map_err(Status::invalid_argument)?;
        let now = chrono::Utc::now().timestamp_millis();
        let any_expected = !expected.is_empty();
        let (before, after, ()) = self
            .update(dev, move |r| {
                r.merge(twins);
                for (p, v) in &expected {
                    r.set_expected(p, v, now);
                }
            })
            .await?;
        if any_expected {
            let _ = self.desired.send(DesiredChange {
                namespace: dev.metadata.namespace.clone().unwrap_or_default(),
                name: dev.metadata.name.clone().unwrap_or_default(),
                from_edge: true,
            });
        }
        Ok((before, after))
    }

    /// Applies the cloud's desired values of `dev` under the version rule (see
    /// [`crate::versions`]), and tells the listeners when a value in force changed.
    pub async fn apply_cloud(&self, dev: &Device) -> Result<(), Status> {
        let now = chrono::Utc::now().timestamp_millis();
        let d = dev.clone();
        let (_, _, outcome) = self.update(dev, move |r| r.apply_cloud(&d, now)).await?;
        let who = format!(
            "{}/{}",
            dev.metadata.namespace.clone().unwrap_or_default(),
            dev.metadata.name.clone().unwrap_or_default()
        );
        let mut applied = false;
        for (prop, what) in outcome {
            match what {
                CloudUpdate::Applied => applied = true,
                CloudUpdate::EdgeNewer => tracing::info!(device = %who, property = %prop,
                    "the cloud's desired value is ignored: the node changed it since the cloud last heard (set it again once the node's value shows in the status)"),
                CloudUpdate::Stale => {
                    tracing::debug!(device = %who, property = %prop, "an older cloud desired value is ignored")
                }
                CloudUpdate::Unchanged => {}
            }
        }
        if applied {
            let _ = self.desired.send(DesiredChange {
                namespace: dev.metadata.namespace.clone().unwrap_or_default(),
                name: dev.metadata.name.clone().unwrap_or_default(),
                from_edge: false,
            });
        }
        Ok(())
    }

    /// Twins a mapper reported, checked against the device, merged by property, stored, sent up.
    async fn merge_twins(&self, dev: &Device, twins: Vec<Twin>) -> Result<(), Status> {
        check_status(dev, &json!({"twins": twins})).map_err(Status::invalid_argument)?;
        self.update(dev, move |r| r.merge(twins)).await.map(drop)
    }

    /// Sets the device's state (and `lastOnlineTime` when it is online), stored and sent up.
    pub async fn set_state(&self, dev: &Device, state: &str) -> Result<(), Status> {
        bounded("state", state)?;
        let online = state.eq_ignore_ascii_case("online") || state.eq_ignore_ascii_case("ok");
        let state = state.to_string();
        self.update(dev, move |r| {
            r.state = state;
            if online {
                r.last_online_time = now();
            }
        })
        .await
        .map(drop)
    }

    /// The device `ns/name` from the node's store, or NotFound naming it.
    pub async fn device(&self, ns: &str, name: &str) -> Result<Device, Status> {
        bounded("deviceName", name)?;
        bounded("deviceNamespace", ns)?;
        if name.is_empty() {
            return Err(Status::invalid_argument("deviceName is empty"));
        }
        let ns = if ns.is_empty() { "default" } else { ns };
        let store = self.ctx.store.clone();
        let (n, k) = (ns.to_string(), name.to_string());
        let obj = tokio::task::spawn_blocking(move || store.get(kind::DEVICE, &n, &k))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "device {ns}/{name} is not on node {}",
                    self.ctx.node
                ))
            })?;
        serde_json::from_value(obj).map_err(|e| Status::internal(format!("stored device: {e}")))
    }

    /// Applies `change` to the stored twin of `dev` (read, changed and written in one blocking
    /// section, so the DMI and MQTT paths never lose each other's properties), stores it and
    /// sends the status up if it changed; the twin before and after.
    async fn update<T: Send + 'static>(
        &self,
        dev: &Device,
        change: impl FnOnce(&mut Record) -> T + Send + 'static,
    ) -> Result<(Record, Record, T), Status> {
        let ns = dev.metadata.namespace.clone().unwrap_or_default();
        let name = dev.metadata.name.clone().unwrap_or_default();
        let (store, writes) = (self.ctx.store.clone(), self.writes.clone());
        let (n, k) = (ns.clone(), name.clone());
        let d = dev.clone();
        let (before, after, out) = tokio::task::spawn_blocking(move || {
            let _one = writes.lock().unwrap_or_else(|p| p.into_inner());
            let before =
                Record::from_value(store.get(TWIN_KIND, &n, &k).map_err(|e| e.to_string())?);
            let mut r = before.clone();
            r.own(&d);
            let out = change(&mut r);
            if r != before {
                store_local(&store, TWIN_KIND, &n, &k, &r.to_value())?;
            }
            Ok::<_, String>((before, r, out))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::unavailable)?;
        if before.status() != after.status() {
            self.send_status(dev, &after);
        }
        Ok((before, after, out))
    }

    /// Sends `dev`'s status from `record` up through the outbox (the latest per device wins
    /// while the link is down).
    fn send_status(&self, dev: &Device, record: &Record) {
        let ns = dev.metadata.namespace.clone().unwrap_or_default();
        let name = dev.metadata.name.clone().unwrap_or_default();
        let report = DeviceStatusReport {
            uid: dev.metadata.uid.clone().unwrap_or_default(),
            status: serde_json::to_value(record.status()).unwrap_or_default(),
        };
        let key = Key::new(Some(&ns), kind::DEVICE_STATUS, &name);
        self.ctx.send(
            Message::new(
                group::CLOUD,
                op::UPDATE,
                &key.to_string(),
                serde_json::to_vec(&report).unwrap_or_default(),
            ),
            Policy::LatestWins,
        );
    }

    /// Sends the stored status of `dev` up again. A report is answered once it is in SQLite; its
    /// way into the outbox is a queue, so an agent killed in between would lose it but for this,
    /// at start, for every device with a twin.
    async fn resend_status(&self, dev: &Device) {
        let ns = dev.metadata.namespace.clone().unwrap_or_default();
        let name = dev.metadata.name.clone().unwrap_or_default();
        let r = self.twin(&ns, &name).await;
        if r.uid == dev.metadata.uid.clone().unwrap_or_default() && r.status() != Default::default()
        {
            self.send_status(dev, &r);
        }
    }
}

/// Writes an object only this node keeps (twins, registered mappers) into its store, with the
/// store's next revision as its version.
fn store_local(
    store: &sedge_edgecore::store::MetaStore,
    kind: &str,
    ns: &str,
    name: &str,
    obj: &Value,
) -> Result<(), String> {
    let rev = store.revision().map_err(|e| e.to_string())? + 1;
    store
        .upsert(kind, ns, name, &rev.to_string(), obj)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn twin_property(p: &Option<dmi::TwinProperty>) -> Option<TwinProperty> {
    p.as_ref().map(|p| TwinProperty {
        value: p.value.clone(),
        metadata: p.metadata.clone().into_iter().collect(),
    })
}

#[tonic::async_trait]
impl DeviceManagerService for Dmi {
    async fn mapper_register(
        &self,
        req: Request<dmi::MapperRegisterRequest>,
    ) -> Result<Response<dmi::MapperRegisterResponse>, Status> {
        let req = req.into_inner();
        let mapper = req
            .mapper
            .ok_or_else(|| Status::invalid_argument("mapper is missing"))?;
        bounded("mapper.name", &mapper.name)?;
        bounded("mapper.protocol", &mapper.protocol)?;
        if mapper.protocol.is_empty() {
            return Err(Status::invalid_argument(
                "mapper.protocol is empty: say which protocol the mapper serves",
            ));
        }
        // Where the mapper serves DeviceMapperService, if it does: told of device changes.
        if !mapper.address.is_empty() {
            let address = String::from_utf8(mapper.address.clone())
                .ok()
                .filter(|a| {
                    a.starts_with('/') && a.len() <= MAX_SOCKET_BYTES && !a.contains('\0')
                })
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "mapper.address must be the absolute path of a Unix socket, at most {MAX_SOCKET_BYTES} bytes"
                    ))
                })?;
            let store = self.twins.ctx.store.clone();
            let record = json!({"name": mapper.name, "protocol": mapper.protocol, "address": address, "version": mapper.version});
            let protocol = mapper.protocol.clone();
            tokio::task::spawn_blocking(move || {
                store_local(&store, MAPPER_KIND, "", &protocol, &record)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        }
        let store = self.twins.ctx.store.clone();
        let (devices, models) = tokio::task::spawn_blocking(move || {
            (
                store.list(kind::DEVICE, None).unwrap_or_default(),
                store.list(kind::DEVICE_MODEL, None).unwrap_or_default(),
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let devices: Vec<Device> = devices
            .into_iter()
            .filter_map(|d| serde_json::from_value(d).ok())
            .filter(|d: &Device| d.spec.protocol.protocol_name == mapper.protocol)
            .collect();
        if devices.is_empty() {
            tracing::info!(mapper = %mapper.name, protocol = %mapper.protocol, "a mapper registered for a protocol no device on this node uses");
        } else {
            tracing::info!(mapper = %mapper.name, protocol = %mapper.protocol, devices = devices.len(), "mapper registered");
        }
        if !req.with_data {
            return Ok(Response::new(dmi::MapperRegisterResponse::default()));
        }
        let used: std::collections::HashSet<(String, String)> = devices
            .iter()
            .filter_map(|d| {
                Some((
                    d.metadata.namespace.clone().unwrap_or_default(),
                    d.spec.device_model_ref.as_ref()?.name.clone(),
                ))
            })
            .collect();
        let model_list = models
            .into_iter()
            .filter_map(|m| serde_json::from_value::<DeviceModel>(m).ok())
            .filter(|m| {
                used.contains(&(
                    m.metadata.namespace.clone().unwrap_or_default(),
                    m.metadata.name.clone().unwrap_or_default(),
                ))
            })
            .map(|m| crate::dmiconv::model(&m))
            .collect();
        let mut device_list = Vec::with_capacity(devices.len());
        for d in &devices {
            device_list.push(crate::dmiconv::device(&self.twins.effective(d).await));
        }
        Ok(Response::new(dmi::MapperRegisterResponse {
            model_list,
            device_list,
        }))
    }

    async fn report_device_status(
        &self,
        req: Request<dmi::ReportDeviceStatusRequest>,
    ) -> Result<Response<dmi::ReportDeviceStatusResponse>, Status> {
        let req = req.into_inner();
        let dev = self
            .twins
            .device(&req.device_namespace, &req.device_name)
            .await?;
        let reported = req.reported_device.unwrap_or_default();
        let twins: Vec<Twin> = reported
            .twins
            .iter()
            .map(|t| Twin {
                property_name: t.property_name.clone(),
                reported: twin_property(&t.reported),
                observed_desired: twin_property(&t.observed_desired),
            })
            .collect();
        self.twins.merge_twins(&dev, twins).await?;
        Ok(Response::new(dmi::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        req: Request<dmi::ReportDeviceStatesRequest>,
    ) -> Result<Response<dmi::ReportDeviceStatesResponse>, Status> {
        let req = req.into_inner();
        bounded("state", &req.state)?;
        if req.state.is_empty() {
            return Err(Status::invalid_argument("state is empty"));
        }
        let dev = self
            .twins
            .device(&req.device_namespace, &req.device_name)
            .await?;
        self.twins.set_state(&dev, &req.state).await?;
        Ok(Response::new(dmi::ReportDeviceStatesResponse {}))
    }
}
