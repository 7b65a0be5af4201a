//! Settings of the edge agent (`sedge edge --print-default-config`).

use std::collections::BTreeMap;

use sedge_tunnel::EdgeConfig;
use serde::{Deserialize, Serialize};

/// How the process runtime runs an image: Kubernetes' ENTRYPOINT/CMD split, on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ImageEntry {
    /// The image's ENTRYPOINT: replaced by a container's `command`. `@self` is this agent's own
    /// executable (the `sedge` binary), so `sedge/*` images run our workers.
    pub entrypoint: Vec<String>,
    /// The image's CMD: replaced by a container's `args`.
    pub cmd: Vec<String>,
    /// Whether a container's `command` may name any program on the host's `PATH` (images such
    /// as `busybox` whose point is a shell).
    pub host_commands: bool,
}

/// Which container runtime edged uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Containers as supervised host processes, images through the `images` map (the default:
    /// works where no container runtime is installed).
    #[default]
    Process,
    /// Real containers through a CRI runtime (containerd) at `cri_socket`.
    Cri,
    /// Containers that run nothing (kubemark's hollow node, for scale benchmarks): the node is
    /// labelled `sedge.io/hollow=true`.
    Hollow,
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "process" => Ok(RuntimeKind::Process),
            "cri" => Ok(RuntimeKind::Cri),
            "hollow" => Ok(RuntimeKind::Hollow),
            _ => Err(format!(
                "runtime {s:?}: expected \"process\", \"cri\" or \"hollow\""
            )),
        }
    }
}

/// Settings of the edge agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeCoreConfig {
    /// The channel's edge side (node name, cloud address, data directory...).
    pub tunnel: EdgeConfig,
    /// The local API (MetaServer): get/list/watch of what this node holds, served from SQLite.
    /// Empty disables it.
    pub metaserver_listen: String,
    /// Lets any local process read pods, config maps and this Node from the MetaServer without a
    /// token (KubeEdge's MetaServer does; `kubectl --server http://...` on the node needs it, as
    /// kubectl sends no token over plain HTTP). Off by default: only this node's pods (their
    /// `SEDGE_POD_TOKEN`) and its administrator (`metaserver.token`) read anything. Secrets
    /// always need a token. `sedge up` turns it on (one machine, its own user).
    pub metaserver_anonymous_reads: bool,
    /// Where `/metrics` (channel counters, outbox depth, pods, container starts and restarts,
    /// store writes), `/healthz` and `/readyz` are served. Empty disables it.
    pub metrics_listen: String,
    /// Labels the node registers with (besides `node-role.kubernetes.io/edge`).
    pub labels: BTreeMap<String, String>,
    /// The address reported as the node's and its pods' IP; empty: the address that routes to
    /// the cloud.
    pub node_ip: String,
    /// How often the full node status is sent (it is also sent on change).
    pub node_status_interval_ms: u64,
    /// How often the node lease is renewed.
    pub lease_interval_ms: u64,
    /// `Lease.spec.leaseDurationSeconds`.
    pub lease_duration_seconds: i32,
    /// How often edged looks whether a container ended when its runtime cannot say so itself
    /// (a process adopted after an agent restart; the CRI runtime's poll of the node's
    /// containers). Other exits wake the pod's task at once.
    pub sync_interval_ms: u64,
    /// Crash-loop back-off: first delay, doubling up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// Crash-loop back-off cap.
    pub backoff_max_ms: u64,
    /// A container that ran this long resets its back-off.
    pub backoff_reset_ms: u64,
    /// A container log is rotated past this size (one rotated file is kept).
    pub max_log_bytes: u64,
    /// Cap on `terminationGracePeriodSeconds` when stopping containers.
    pub max_grace_seconds: u64,
    /// The container runtime: `process` (host processes, the default) or `cri`.
    pub runtime: RuntimeKind,
    /// The CRI runtime's socket (`runtime: cri`).
    pub cri_socket: std::path::PathBuf,
    /// `runtime: cri`: pods get a network namespace of their own through containerd's CNI
    /// configuration (a bridge, say), unless `hostNetwork: true`; their status shows that IP.
    /// Off (the default): every pod uses the node's network, as with the process runtime.
    pub cri_pod_network: bool,
    /// `runtime: cri`: containers may ask for `securityContext.privileged` (the node's devices
    /// and kernel). Off by default: such a pod is `CreateContainerConfigError`, naming this key.
    pub cri_allow_privileged: bool,
    /// The process runtime's images: name (without tag, or with it for one tag) -> how to run it.
    pub images: BTreeMap<String, ImageEntry>,
    /// Host directories that a pod's `hostPath` volume may name (it or anything below). Empty,
    /// the default, allows none. Images with `host_commands` are exempt: they run any host
    /// program already.
    pub host_path_allow: Vec<std::path::PathBuf>,
    /// The program `@self` in the image map names (the `sedge` binary that runs `sedge/...`
    /// images' workers). Empty: this agent's own binary (`sedge-edge` looks for `sedge` beside
    /// itself).
    pub sedge_binary: std::path::PathBuf,
}

impl Default for EdgeCoreConfig {
    fn default() -> Self {
        let shell = ImageEntry {
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            host_commands: true,
        };
        let mut images = BTreeMap::new();
        for i in ["busybox", "alpine", "debian", "ubuntu"] {
            images.insert(i.to_string(), shell.clone());
        }
        images.insert(
            "sedge/sedge".into(),
            ImageEntry {
                entrypoint: vec!["@self".into()],
                cmd: vec!["--help".into()],
                host_commands: false,
            },
        );
        images.insert(
            "sedge/worker".into(),
            ImageEntry {
                entrypoint: vec!["@self".into(), "worker".into()],
                cmd: vec!["--help".into()],
                host_commands: false,
            },
        );
        // KubeEdge's mappers run as pods on the node; ours is in the `sedge` binary.
        images.insert(
            "sedge/modbus-mapper".into(),
            ImageEntry {
                entrypoint: vec!["@self".into(), "mapper".into(), "modbus".into()],
                cmd: vec![],
                host_commands: false,
            },
        );
        EdgeCoreConfig {
            tunnel: EdgeConfig::default(),
            metaserver_listen: "127.0.0.1:10550".into(),
            metaserver_anonymous_reads: false,
            metrics_listen: "127.0.0.1:10351".into(),
            labels: BTreeMap::new(),
            node_ip: String::new(),
            node_status_interval_ms: 60_000,
            lease_interval_ms: 10_000,
            lease_duration_seconds: 40,
            sync_interval_ms: 500,
            backoff_initial_ms: 10_000,
            backoff_max_ms: 300_000,
            backoff_reset_ms: 600_000,
            max_log_bytes: 10 * 1024 * 1024,
            max_grace_seconds: 30,
            runtime: RuntimeKind::Process,
            cri_socket: "/run/containerd/containerd.sock".into(),
            cri_pod_network: false,
            cri_allow_privileged: false,
            images,
            host_path_allow: Vec::new(),
            sedge_binary: std::path::PathBuf::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_keys_are_named() {
        let c = EdgeCoreConfig::default();
        let y = serde_json::to_string(&c).unwrap();
        let back: EdgeCoreConfig = serde_json::from_str(&y).unwrap();
        assert_eq!(back, c);
        let e = serde_json::from_str::<EdgeCoreConfig>(r#"{"lease_intervall_ms": 5}"#).unwrap_err();
        assert!(e.to_string().contains("lease_intervall_ms"), "{e}");
    }
}
