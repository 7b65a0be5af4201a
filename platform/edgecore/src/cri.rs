//! The CRI runtime: edged's containers as real containers of a CRI runtime (containerd), over
//! CRI v1 gRPC on its Unix socket.
//!
//! One pod sandbox per pod (the node's network, or with `pod_network` a network namespace of its
//! own that the runtime's CNI configuration sets up; the pod's log directory), one CRI container per
//! container, labelled with the pod's UID, the container's name and this node, as the kubelet
//! labels them: a restarted agent finds its containers again in the CRI's own listing and
//! removes sandboxes of pods it no longer knows. Images are used when present; one that is
//! neither present nor pullable is `ErrImagePull` with the CRI's message, then
//! `ImagePullBackOff`. Limits go to the CRI as cgroup settings, so the runtime enforces them
//! (an exceeded memory limit ends in `OOMKilled`). Logs are the CRI's log files, in its format
//! (see [`crate::edged::from_cri_log`]).
//!
//! Exits are found by one poller per runtime: one `ListContainers` per interval for all
//! containers, a `ContainerStatus` only for a container that just exited (its code and reason).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Channel;

use crate::runtime::{
    Container, ContainerSpec, ExecOutput, Exit, PodInfo, Runtime, Signal, StartError,
};
use crate::store::ContainerRecord;

/// The generated CRI v1 client types (`runtime.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("runtime.v1");
}

use proto::image_service_client::ImageServiceClient;
use proto::runtime_service_client::RuntimeServiceClient;

/// The kubelet's label for the pod's UID.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// The kubelet's label for the pod's name.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// The kubelet's label for the pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// The kubelet's label for the container's name.
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// The node whose agent made a sandbox or container: agents sharing one containerd (tests, or
/// several simulated nodes on one host) never touch each other's.
pub const LABEL_NODE: &str = "io.sedge.node";

/// How long one CRI call may take (an image pull gets [`PULL_TIMEOUT`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an image pull may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Settings of the CRI runtime.
#[derive(Debug, Clone)]
pub struct CriSettings {
    /// The CRI runtime's Unix socket.
    pub socket: PathBuf,
    /// This node's name (labels every sandbox and container).
    pub node: String,
    /// How often container states are polled.
    pub poll_interval: Duration,
    /// Pods get their own network namespace through the runtime's CNI configuration (unless
    /// `hostNetwork: true`); off: every pod uses the node's network.
    pub pod_network: bool,
    /// Containers may be `privileged` (full access to the node's devices and kernel).
    pub allow_privileged: bool,
}

struct Inner {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    node: String,
    runtime_name: &'static str,
    version: String,
    /// Pod UID -> sandbox id; the async mutex makes one pod's first containers share a sandbox.
    sandboxes: tokio::sync::Mutex<HashMap<String, String>>,
    /// Container id -> how it ended, and who to tell, for containers with a live handle.
    exits: Mutex<HashMap<String, Watched>>,
    /// Images whose last pull failed (the next failure is `ImagePullBackOff`).
    pull_failed: Mutex<HashSet<String>>,
    pod_network: bool,
    allow_privileged: bool,
    /// Pod UID -> its IP on the pod network.
    pod_ips: Mutex<HashMap<String, String>>,
}

/// A container with a live handle, as the poller sees it.
#[derive(Default)]
struct Watched {
    exit: Option<Exit>,
    /// Told once the poller has seen it end.
    wake: Option<Arc<tokio::sync::Notify>>,
}

/// Runs containers through a CRI runtime.
#[derive(Clone)]
pub struct CriRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CriRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriRuntime")
            .field("version", &self.inner.version)
            .finish()
    }
}

fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// A CRI error as users read it: the runtime's message, without gRPC's framing.
fn says(e: &tonic::Status) -> String {
    if e.message().is_empty() {
        format!("{:?}", e.code())
    } else {
        e.message().to_string()
    }
}

impl CriRuntime {
    /// Connects to the CRI runtime at `settings.socket` and asks its version. A socket that is
    /// not there, or a runtime that does not speak CRI v1, is an error naming the socket.
    pub async fn connect(settings: CriSettings) -> Result<CriRuntime, String> {
        let sock = settings.socket.clone();
        let channel = crate::uds_channel(&sock, Duration::from_secs(5))
            .await
            .map_err(|e| {
                format!("CRI runtime: {e} (is containerd running, and is this its socket?)")
            })?;
        let mut rt = RuntimeServiceClient::new(channel.clone());
        let v = rt
            .version(req(
                proto::VersionRequest {
                    version: "v1".into(),
                },
                CALL_TIMEOUT,
            ))
            .await
            .map_err(|e| {
                format!(
                    "the runtime at {} does not answer CRI v1 Version: {}",
                    sock.display(),
                    says(&e)
                )
            })?
            .into_inner();
        // The id scheme of containers in pod statuses (`containerd://<id>`).
        let runtime_name: &'static str = match v.runtime_name.as_str() {
            "containerd" => "containerd",
            "cri-o" => "cri-o",
            _ => "cri",
        };
        let inner = Arc::new(Inner {
            rt,
            img: ImageServiceClient::new(channel),
            node: settings.node,
            runtime_name,
            version: format!("{}://{}", v.runtime_name, v.runtime_version),
            sandboxes: Default::default(),
            exits: Default::default(),
            pull_failed: Default::default(),
            pod_network: settings.pod_network,
            allow_privileged: settings.allow_privileged,
            pod_ips: Default::default(),
        });
        tokio::spawn(poll(Arc::downgrade(&inner), settings.poll_interval));
        Ok(CriRuntime { inner })
    }
}

/// Finds exits of watched containers until the runtime is dropped.
async fn poll(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let pending: Vec<String> = inner
            .exits
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w)| w.exit.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if pending.is_empty() {
            continue;
        }
        let filter = proto::ContainerFilter {
            label_selector: [(LABEL_NODE.to_string(), inner.node.clone())].into(),
            ..Default::default()
        };
        let listed = match inner
            .rt
            .clone()
            .list_containers(req(
                proto::ListContainersRequest {
                    filter: Some(filter),
                },
                CALL_TIMEOUT,
            ))
            .await
        {
            Ok(r) => r.into_inner().containers,
            Err(e) => {
                tracing::warn!(error = %says(&e), "cannot list CRI containers");
                continue;
            }
        };
        let states: HashMap<&str, i32> = listed.iter().map(|c| (c.id.as_str(), c.state)).collect();
        for id in pending {
            let exit = match states.get(id.as_str()) {
                None => Some(Exit::Unknown),
                Some(s) if *s == proto::ContainerState::ContainerExited as i32 => {
                    Some(status_exit(&inner, &id).await)
                }
                Some(_) => None,
            };
            if let Some(e) = exit
                && let Some(w) = inner.exits.lock().unwrap().get_mut(&id)
            {
                w.exit = Some(e);
                if let Some(wake) = w.wake.take() {
                    wake.notify_one();
                }
            }
        }
    }
}

/// How an exited container ended, from its CRI status.
async fn status_exit(inner: &Inner, id: &str) -> Exit {
    match inner
        .rt
        .clone()
        .container_status(req(
            proto::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            },
            CALL_TIMEOUT,
        ))
        .await
    {
        Ok(r) => match r.into_inner().status {
            Some(s) if s.reason == "OOMKilled" => Exit::OomKilled(s.exit_code),
            Some(s) => Exit::Code(s.exit_code),
            None => Exit::Unknown,
        },
        Err(_) => Exit::Unknown,
    }
}

struct CriContainer {
    id: String,
    inner: Arc<Inner>,
    stopping: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl CriContainer {
    fn watch(inner: &Arc<Inner>, id: String, exit: Option<Exit>) -> CriContainer {
        inner
            .exits
            .lock()
            .unwrap()
            .insert(id.clone(), Watched { exit, wake: None });
        CriContainer {
            id,
            inner: inner.clone(),
            stopping: Mutex::new(None),
        }
    }
}

impl Container for CriContainer {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn start_ticks(&self) -> u64 {
        0
    }
    fn poll_exit(&mut self) -> Option<Exit> {
        self.inner
            .exits
            .lock()
            .unwrap()
            .get(&self.id)
            .and_then(|w| w.exit)
    }
    /// The poller (every `poll_interval`, one listing for the node) tells it.
    fn notify_exit(&mut self, wake: Arc<tokio::sync::Notify>) -> bool {
        let mut exits = self.inner.exits.lock().unwrap();
        let w = exits.entry(self.id.clone()).or_default();
        if w.exit.is_some() {
            wake.notify_one();
        } else {
            w.wake = Some(wake);
        }
        true
    }
    fn signal(&self, s: Signal) {
        // CRI stops with a grace period (TERM, then KILL when it runs out); edged keeps the
        // time itself and asks for KILL with a zero period when the grace is over.
        let timeout = match s {
            Signal::Term => 3600,
            Signal::Kill => 0,
        };
        let (mut rt, id) = (self.inner.rt.clone(), self.id.clone());
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = handle.spawn(async move {
            let r = rt
                .stop_container(req(
                    proto::StopContainerRequest {
                        container_id: id.clone(),
                        timeout,
                    },
                    Duration::from_secs(timeout as u64) + CALL_TIMEOUT,
                ))
                .await;
            if let Err(e) = r {
                tracing::warn!(container = %id, error = %says(&e), "CRI StopContainer failed");
            }
        });
        if let Some(old) = self.stopping.lock().unwrap().replace(task)
            && matches!(s, Signal::Kill)
        {
            old.abort();
        }
    }
}

impl Drop for CriContainer {
    fn drop(&mut self) {
        let exit = self
            .inner
            .exits
            .lock()
            .unwrap()
            .remove(&self.id)
            .and_then(|w| w.exit);
        // An ended container is removed (its log file stays: edged keeps it as `--previous`);
        // a running one stays for the next agent to adopt.
        if exit.is_some()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let (mut rt, id) = (self.inner.rt.clone(), self.id.clone());
            handle.spawn(async move {
                let _ = rt
                    .remove_container(req(
                        proto::RemoveContainerRequest { container_id: id },
                        CALL_TIMEOUT,
                    ))
                    .await;
            });
        }
    }
}

fn namespaces(host_network: bool) -> proto::NamespaceOption {
    proto::NamespaceOption {
        network: if host_network {
            proto::NamespaceMode::Node as i32
        } else {
            proto::NamespaceMode::Pod as i32
        },
        pid: proto::NamespaceMode::Container as i32,
        ipc: proto::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl Inner {
    fn labels(&self, pod: &PodInfo, container: Option<&str>) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = [
            (LABEL_POD_UID.to_string(), pod.uid.clone()),
            (LABEL_POD_NAME.to_string(), pod.name.clone()),
            (LABEL_POD_NAMESPACE.to_string(), pod.namespace.clone()),
            (LABEL_NODE.to_string(), self.node.clone()),
        ]
        .into();
        if let Some(c) = container {
            l.insert(LABEL_CONTAINER_NAME.into(), c.into());
        }
        l
    }

    fn sandbox_config(&self, pod: &PodInfo) -> proto::PodSandboxConfig {
        proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // A host-network sandbox must not set a hostname (runc: "unable to set hostname
            // without a private UTS namespace").
            hostname: if pod.host_network {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: pod.log_dir.display().to_string(),
            port_mappings: pod
                .host_ports
                .iter()
                .map(|(proto_, c, h)| proto::PortMapping {
                    protocol: match proto_.as_str() {
                        "UDP" => proto::Protocol::Udp as i32,
                        "SCTP" => proto::Protocol::Sctp as i32,
                        _ => proto::Protocol::Tcp as i32,
                    },
                    container_port: *c,
                    host_port: *h,
                    host_ip: String::new(),
                })
                .collect(),
            labels: self.labels(pod, None),
            linux: Some(proto::LinuxPodSandboxConfig {
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(pod.host_network)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Sandboxes of this node, optionally only those of one pod.
    async fn sandboxes_of(&self, pod_uid: Option<&str>) -> Result<Vec<proto::PodSandbox>, String> {
        let mut labels: HashMap<String, String> =
            [(LABEL_NODE.to_string(), self.node.clone())].into();
        if let Some(u) = pod_uid {
            labels.insert(LABEL_POD_UID.into(), u.into());
        }
        let r = self
            .rt
            .clone()
            .list_pod_sandbox(req(
                proto::ListPodSandboxRequest {
                    filter: Some(proto::PodSandboxFilter {
                        label_selector: labels,
                        ..Default::default()
                    }),
                },
                CALL_TIMEOUT,
            ))
            .await
            .map_err(|e| says(&e))?;
        Ok(r.into_inner().items)
    }

    /// The pod's ready sandbox: the one this agent made, one a previous agent made, or a new one.
    async fn sandbox(&self, pod: &PodInfo) -> Result<String, StartError> {
        let fail = |message: String| StartError {
            reason: "CreatePodSandboxError".into(),
            message,
        };
        let mut map = self.sandboxes.lock().await;
        if let Some(id) = map.get(&pod.uid) {
            return Ok(id.clone());
        }
        let existing = self.sandboxes_of(Some(&pod.uid)).await.map_err(fail)?;
        let ready = proto::PodSandboxState::SandboxReady as i32;
        if let Some(s) = existing.iter().find(|s| s.state == ready) {
            map.insert(pod.uid.clone(), s.id.clone());
            self.learn_ip(pod, &s.id).await;
            return Ok(s.id.clone());
        }
        // Sandboxes left not ready (a failed start, a reboot) go first.
        for s in existing {
            self.drop_sandbox(&s.id).await;
        }
        std::fs::create_dir_all(&pod.log_dir)
            .map_err(|e| fail(format!("log directory {}: {e}", pod.log_dir.display())))?;
        let id = self
            .rt
            .clone()
            .run_pod_sandbox(req(
                proto::RunPodSandboxRequest {
                    config: Some(self.sandbox_config(pod)),
                    runtime_handler: String::new(),
                },
                CALL_TIMEOUT,
            ))
            .await
            .map_err(|e| fail(format!("Failed to create pod sandbox: {}", says(&e))))?
            .into_inner()
            .pod_sandbox_id;
        map.insert(pod.uid.clone(), id.clone());
        self.learn_ip(pod, &id).await;
        Ok(id)
    }

    /// Remembers the sandbox's IP on the pod network (none on the host network: nothing to ask).
    async fn learn_ip(&self, pod: &PodInfo, sandbox: &str) {
        let pod_uid = pod.uid.as_str();
        if pod.host_network {
            self.pod_ips.lock().unwrap().remove(pod_uid);
            return;
        }
        let status = self
            .rt
            .clone()
            .pod_sandbox_status(req(
                proto::PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.into(),
                    verbose: false,
                },
                CALL_TIMEOUT,
            ))
            .await;
        let ip = status.ok().and_then(|r| {
            let s = r.into_inner().status?;
            let host = s
                .linux
                .and_then(|l| l.namespaces)
                .and_then(|n| n.options)
                .is_none_or(|o| o.network == proto::NamespaceMode::Node as i32);
            let ip = s.network?.ip;
            (!host && !ip.is_empty()).then_some(ip)
        });
        let mut ips = self.pod_ips.lock().unwrap();
        match ip {
            Some(ip) => ips.insert(pod_uid.to_string(), ip),
            None => ips.remove(pod_uid),
        };
    }

    async fn drop_sandbox(&self, id: &str) {
        let mut rt = self.rt.clone();
        if let Err(e) = rt
            .stop_pod_sandbox(req(
                proto::StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
                CALL_TIMEOUT,
            ))
            .await
        {
            tracing::warn!(sandbox = %id, error = %says(&e), "CRI StopPodSandbox failed");
        }
        if let Err(e) = rt
            .remove_pod_sandbox(req(
                proto::RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
                CALL_TIMEOUT,
            ))
            .await
        {
            tracing::warn!(sandbox = %id, error = %says(&e), "CRI RemovePodSandbox failed");
        }
    }

    /// Makes sure `image` is there: used when present (pulled when `always`), pulled otherwise.
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), StartError> {
        let spec = proto::ImageSpec {
            image: image.into(),
            ..Default::default()
        };
        let present = self
            .img
            .clone()
            .image_status(req(
                proto::ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                },
                CALL_TIMEOUT,
            ))
            .await
            .map_err(|e| StartError {
                reason: "ErrImageInspect".into(),
                message: format!("Failed to inspect image {image:?}: {}", says(&e)),
            })?
            .into_inner()
            .image
            .is_some();
        match policy {
            PullPolicy::Never if !present => {
                return Err(StartError {
                    reason: "ErrImageNeverPull".into(),
                    message: format!(
                        "Container image {image:?} is not present with pull policy of Never"
                    ),
                });
            }
            PullPolicy::Never | PullPolicy::IfNotPresent if present => return Ok(()),
            _ => {}
        }
        let pulled = self
            .img
            .clone()
            .pull_image(req(
                proto::PullImageRequest {
                    image: Some(spec),
                    auth: None,
                    sandbox_config: None,
                },
                PULL_TIMEOUT,
            ))
            .await;
        match pulled {
            Ok(_) => {
                self.pull_failed.lock().unwrap().remove(image);
                Ok(())
            }
            // An edge node keeps running from what it has when its registry is out of reach.
            Err(e) if present => {
                tracing::warn!(%image, error = %says(&e), "pull failed; using the image present on the node");
                Ok(())
            }
            Err(e) => {
                let again = !self.pull_failed.lock().unwrap().insert(image.to_string());
                Err(if again {
                    StartError {
                        reason: "ImagePullBackOff".into(),
                        message: format!("Back-off pulling image {image:?}: {}", says(&e)),
                    }
                } else {
                    StartError {
                        reason: "ErrImagePull".into(),
                        message: format!("Failed to pull image {image:?}: {}", says(&e)),
                    }
                })
            }
        }
    }

    fn container_config(&self, pod: &PodInfo, spec: &ContainerSpec) -> proto::ContainerConfig {
        let env: std::collections::BTreeMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let expand = |v: &[String]| -> Vec<String> {
            v.iter().map(|a| crate::runtime::expand(a, &env)).collect()
        };
        let l = spec.limits;
        let resources = proto::LinuxContainerResources {
            memory_limit_in_bytes: l.memory_bytes,
            cpu_period: if l.cpu_millis > 0 { 100_000 } else { 0 },
            cpu_quota: if l.cpu_millis > 0 {
                l.cpu_millis * 100
            } else {
                0
            },
            // The kubelet's shares: 1024 per core requested, at least 2.
            cpu_shares: if l.cpu_request_millis > 0 {
                (l.cpu_request_millis * 1024 / 1000).max(2)
            } else {
                2
            },
            ..Default::default()
        };
        proto::ContainerConfig {
            metadata: Some(proto::ContainerMetadata {
                name: spec.name.clone(),
                attempt: spec.attempt,
            }),
            image: Some(proto::ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: expand(&spec.command),
            args: expand(&spec.args),
            working_dir: spec.container_working_dir.clone().unwrap_or_default(),
            envs: spec
                .env
                .iter()
                .map(|(k, v)| proto::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| proto::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.display().to_string(),
                    readonly: m.read_only,
                    ..Default::default()
                })
                .collect(),
            labels: self.labels(pod, Some(&spec.name)),
            // Relative to the sandbox's log directory: where edged reads logs.
            log_path: spec
                .log_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            linux: Some(proto::LinuxContainerConfig {
                resources: Some(resources),
                security_context: Some(security(&spec.security, pod.host_network)),
            }),
            ..Default::default()
        }
    }
}

fn security(
    s: &crate::runtime::Security,
    host_network: bool,
) -> proto::LinuxContainerSecurityContext {
    let caps = |v: &[String]| -> Vec<String> {
        // Kubernetes names them without the prefix; CRI runtimes accept both.
        v.iter()
            .map(|c| {
                if c.starts_with("CAP_") {
                    c.clone()
                } else {
                    format!("CAP_{c}")
                }
            })
            .collect()
    };
    proto::LinuxContainerSecurityContext {
        namespace_options: Some(namespaces(host_network)),
        run_as_user: s.run_as_user.map(|value| proto::Int64Value { value }),
        run_as_group: s.run_as_group.map(|value| proto::Int64Value { value }),
        supplemental_groups: s.supplemental_groups.clone(),
        readonly_rootfs: s.read_only_root,
        no_new_privs: s.no_new_privileges,
        privileged: s.privileged,
        capabilities: Some(proto::Capability {
            add_capabilities: caps(&s.add_capabilities),
            drop_capabilities: caps(&s.drop_capabilities),
            add_ambient_capabilities: vec![],
        }),
        ..Default::default()
    }
}

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// Kubernetes' default: `Always` for `:latest` or no tag, `IfNotPresent` otherwise.
    fn of(policy: &str, image: &str) -> PullPolicy {
        match policy {
            "Always" => PullPolicy::Always,
            "Never" => PullPolicy::Never,
            "IfNotPresent" => PullPolicy::IfNotPresent,
            _ => {
                let no_digest = image.split('@').next().unwrap_or(image);
                let tag = no_digest
                    .rsplit('/')
                    .next()
                    .and_then(|last| last.split_once(':').map(|(_, t)| t));
                if image.contains('@') || tag.is_some_and(|t| t != "latest") {
                    PullPolicy::IfNotPresent
                } else {
                    PullPolicy::Always
                }
            }
        }
    }
}

impl Runtime for CriRuntime {
    fn start<'a>(
        &'a self,
        pod: &'a PodInfo,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, StartError>> {
        Box::pin(async move {
            let inner = &self.inner;
            if spec.security.privileged && !inner.allow_privileged {
                return Err(StartError {
                    reason: "CreateContainerConfigError".into(),
                    message: format!(
                        "container {:?}: securityContext.privileged is not allowed on this node (the edge agent's `cri_allow_privileged`)",
                        spec.name
                    ),
                });
            }
            inner
                .ensure_image(&spec.image, PullPolicy::of(&spec.pull_policy, &spec.image))
                .await?;
            let sandbox = inner.sandbox(pod).await?;
            let mut rt = inner.rt.clone();
            let created = rt
                .create_container(req(
                    proto::CreateContainerRequest {
                        pod_sandbox_id: sandbox.clone(),
                        config: Some(inner.container_config(pod, spec)),
                        sandbox_config: Some(inner.sandbox_config(pod)),
                    },
                    CALL_TIMEOUT,
                ))
                .await;
            let id = match created {
                Ok(r) => r.into_inner().container_id,
                Err(e) => {
                    // A sandbox that went away under us is made again next time.
                    if e.message().contains("not found") || e.message().contains("not ready") {
                        inner.sandboxes.lock().await.remove(&pod.uid);
                    }
                    return Err(StartError {
                        reason: "CreateContainerError".into(),
                        message: says(&e),
                    });
                }
            };
            if let Err(e) = rt
                .start_container(req(
                    proto::StartContainerRequest {
                        container_id: id.clone(),
                    },
                    CALL_TIMEOUT,
                ))
                .await
            {
                let _ = rt
                    .remove_container(req(
                        proto::RemoveContainerRequest { container_id: id },
                        CALL_TIMEOUT,
                    ))
                    .await;
                return Err(StartError {
                    reason: "RunContainerError".into(),
                    message: says(&e),
                });
            }
            Ok(Box::new(CriContainer::watch(&self.inner, id, None)) as Box<dyn Container>)
        })
    }

    fn adopt<'a>(&'a self, rec: &'a ContainerRecord) -> BoxFuture<'a, Option<Box<dyn Container>>> {
        Box::pin(async move {
            if rec.container_id.is_empty() {
                return None;
            }
            let filter = proto::ContainerFilter {
                id: rec.container_id.clone(),
                label_selector: [
                    (LABEL_NODE.to_string(), self.inner.node.clone()),
                    (LABEL_POD_UID.to_string(), rec.pod_uid.clone()),
                    (LABEL_CONTAINER_NAME.to_string(), rec.name.clone()),
                ]
                .into(),
                ..Default::default()
            };
            let listed = self
                .inner
                .rt
                .clone()
                .list_containers(req(
                    proto::ListContainersRequest {
                        filter: Some(filter),
                    },
                    CALL_TIMEOUT,
                ))
                .await
                .ok()?
                .into_inner()
                .containers;
            let c = listed.into_iter().find(|c| c.id == rec.container_id)?;
            // One that ended while the agent was away is adopted with its real exit, so the
            // pod's status says how it ended and the restart policy decides.
            let exit = if c.state == proto::ContainerState::ContainerExited as i32 {
                Some(status_exit(&self.inner, &c.id).await)
            } else if c.state == proto::ContainerState::ContainerRunning as i32 {
                None
            } else {
                Some(Exit::Unknown)
            };
            Some(Box::new(CriContainer::watch(&self.inner, c.id, exit)) as Box<dyn Container>)
        })
    }

    fn remove_pod<'a>(&'a self, pod_uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.inner.sandboxes.lock().await.remove(pod_uid);
            self.inner.pod_ips.lock().unwrap().remove(pod_uid);
            match self.inner.sandboxes_of(Some(pod_uid)).await {
                Ok(list) => {
                    for s in list {
                        self.inner.drop_sandbox(&s.id).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(%pod_uid, error = %e, "cannot list the pod's CRI sandboxes")
                }
            }
        })
    }

    fn remove_others<'a>(&'a self, keep: &'a HashSet<String>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match self.inner.sandboxes_of(None).await {
                Ok(list) => {
                    for s in list {
                        let uid = s.labels.get(LABEL_POD_UID).cloned().unwrap_or_default();
                        if !keep.contains(&uid) {
                            tracing::info!(pod_uid = %uid, sandbox = %s.id, "removing the sandbox of a pod this node no longer has");
                            self.inner.drop_sandbox(&s.id).await;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list CRI sandboxes"),
            }
        })
    }

    fn exec_sync<'a>(
        &'a self,
        id: &'a str,
        cmd: &'a [String],
        timeout: Duration,
    ) -> Option<BoxFuture<'a, Result<ExecOutput, String>>> {
        Some(Box::pin(async move {
            let r = self
                .inner
                .rt
                .clone()
                .exec_sync(req(
                    proto::ExecSyncRequest {
                        container_id: id.into(),
                        cmd: cmd.to_vec(),
                        timeout: timeout.as_secs().max(1) as i64,
                    },
                    timeout + Duration::from_secs(5),
                ))
                .await
                .map_err(|e| says(&e))?
                .into_inner();
            Ok(ExecOutput {
                code: r.exit_code,
                stdout: r.stdout,
                stderr: r.stderr,
            })
        }))
    }

    fn version(&self) -> String {
        self.inner.version.clone()
    }

    fn prepare_pod<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, Result<(), StartError>> {
        Box::pin(async move { self.inner.sandbox(pod).await.map(|_| ()) })
    }

    fn pod_ip(&self, pod_uid: &str) -> Option<String> {
        self.inner.pod_ips.lock().unwrap().get(pod_uid).cloned()
    }

    fn pod_network(&self) -> bool {
        self.inner.pod_network
    }

    fn id_scheme(&self) -> &'static str {
        self.inner.runtime_name
    }

    fn cri(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaults_as_kubernetes_does() {
        assert_eq!(PullPolicy::of("", "busybox"), PullPolicy::Always);
        assert_eq!(PullPolicy::of("", "busybox:latest"), PullPolicy::Always);
        assert_eq!(PullPolicy::of("", "busybox:1.36"), PullPolicy::IfNotPresent);
        assert_eq!(
            PullPolicy::of("", "localhost:5000/busybox"),
            PullPolicy::Always
        );
        assert_eq!(
            PullPolicy::of("", "busybox@sha256:abc"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(PullPolicy::of("Never", "busybox"), PullPolicy::Never);
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let e = CriRuntime::connect(CriSettings {
            socket: "/nonexistent/containerd.sock".into(),
            node: "n".into(),
            poll_interval: Duration::from_millis(100),
            pod_network: false,
            allow_privileged: false,
        })
        .await
        .unwrap_err();
        assert!(
            e.contains("/nonexistent/containerd.sock") && e.contains("containerd running"),
            "{e}"
        );
    }
}
