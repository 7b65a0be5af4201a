//! The contract between the cloud core and the edge core, on top of the channel (`sedge-tunnel`).
//!
//! Every message names a resource as `<namespace>/<kind>/<name>` (cluster-scoped objects use the
//! namespace `null`, as KubeEdge does) and a group that picks the module that handles it on the
//! receiving side. Objects travel as their Kubernetes JSON; the payloads that are ours are here.
//!
//! | direction | group | operation | resource | content |
//! |---|---|---|---|---|
//! | cloud -> edge | `meta` | `update` | `<ns>/pod|configmap|secret/<name>` | the object (resourceVersion on the message) |
//! | cloud -> edge | `meta` | `delete` | same | empty |
//! | cloud -> edge | `edged` | `query` | `<ns>/podlog/<name>` | [`LogRequest`]; reply: the log bytes (after a [`LogCursor`] when following) |
//! | edge -> cloud | `cloud` | `insert` | `null/node/<node>` | the Node the edge registers (labels, status) |
//! | edge -> cloud | `cloud` | `update` | `null/nodestatus/<node>` | `NodeStatus` |
//! | edge -> cloud | `cloud` | `update` | `kube-node-lease/lease/<node>` | [`LeaseReport`] |
//! | edge -> cloud | `cloud` | `update` | `<ns>/podstatus/<name>` | [`PodStatusReport`] |
//! | edge -> cloud | `cloud` | `delete` | `<ns>/podstatus/<name>` | [`PodStatusReport`]: containers stopped, finish the delete |
//! | edge -> cloud | `cloud` | `insert` | `<ns>/event/<pod>` | a core/v1 `Event` |
//!
//! Other groups are free for edge modules (see `sedge_edgecore::EdgeModule`); the cloud side hands
//! them to whoever registered the group.

pub mod quantity;

use serde::{Deserialize, Serialize};

/// Message groups.
pub mod group {
    /// Objects for the edge's meta manager.
    pub const META: &str = "meta";
    /// Requests for edged (logs).
    pub const EDGED: &str = "edged";
    /// Reports from the edge for the cloud core.
    pub const CLOUD: &str = "cloud";
}

/// Resource kinds in message routes.
pub mod kind {
    /// A pod.
    pub const POD: &str = "pod";
    /// A config map.
    pub const CONFIGMAP: &str = "configmap";
    /// A secret.
    pub const SECRET: &str = "secret";
    /// A Service of a namespace the node has pods in.
    pub const SERVICE: &str = "service";
    /// Node registration.
    pub const NODE: &str = "node";
    /// Node status.
    pub const NODE_STATUS: &str = "nodestatus";
    /// Node lease heartbeat.
    pub const LEASE: &str = "lease";
    /// Pod status.
    pub const POD_STATUS: &str = "podstatus";
    /// An event about a pod.
    pub const EVENT: &str = "event";
    /// A pod log request.
    pub const POD_LOG: &str = "podlog";
    /// A command run in a pod's container (`kubectl exec`, `attach`).
    pub const POD_EXEC: &str = "podexec";
    /// A device (`devices.kubeedge.io` Device).
    pub const DEVICE: &str = "device";
    /// A device model.
    pub const DEVICE_MODEL: &str = "devicemodel";
    /// A device's twins and state, reported by its node.
    pub const DEVICE_STATUS: &str = "devicestatus";
}

/// The label every edge node carries (KubeEdge's).
pub const EDGE_LABEL: &str = "node-role.kubernetes.io/edge";

/// The label every node registered through the channel carries, whatever its role (an edge node,
/// or a node in the cloud running the agent to host cloud workers).
pub const AGENT_LABEL: &str = "sedge.io/agent";

/// The label naming a node's role (`edge` unless set, `cloud` for cloud nodes); shown as
/// `node-role.kubernetes.io/<role>`, so `kubectl get nodes` lists it under ROLES.
pub const ROLE_LABEL: &str = "sedge.io/role";

/// Whether a node's labels say it is registered through the channel (managed by the hub).
/// Nodes registered before [`AGENT_LABEL`] existed carry only [`EDGE_LABEL`].
pub fn is_agent_node<'a>(mut labels: impl Iterator<Item = &'a String>) -> bool {
    labels.any(|k| k == AGENT_LABEL || k == EDGE_LABEL)
}

/// The `node-role.kubernetes.io/...` label for a node whose role is `role` (`edge` when unset).
pub fn role_label(role: Option<&str>) -> String {
    format!(
        "node-role.kubernetes.io/{}",
        role.filter(|r| !r.is_empty()).unwrap_or("edge")
    )
}

/// The namespace part of a cluster-scoped object's key.
pub const CLUSTER_NS: &str = "null";

/// A parsed resource key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Namespace, or [`CLUSTER_NS`].
    pub namespace: String,
    /// Kind (see [`kind`]).
    pub kind: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// A key from its parts; `None` namespace means cluster-scoped.
    pub fn new(namespace: Option<&str>, kind: &str, name: &str) -> Key {
        Key {
            namespace: namespace.unwrap_or(CLUSTER_NS).to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
        }
    }

    /// Parses `<ns>/<kind>/<name>`.
    pub fn parse(s: &str) -> Result<Key, String> {
        let mut it = s.splitn(3, '/');
        match (it.next(), it.next(), it.next()) {
            (Some(ns), Some(kind), Some(name))
                if !ns.is_empty()
                    && !kind.is_empty()
                    && !name.is_empty()
                    && !name.contains('/') =>
            {
                Ok(Key::new(Some(ns), kind, name))
            }
            _ => Err(format!("resource {s:?} is not <namespace>/<kind>/<name>")),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind, self.name)
    }
}

/// What the cloud asks edged for when a user runs `kubectl logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogRequest {
    /// The pod's UID (a recreated pod of the same name is another pod).
    pub uid: String,
    /// The container.
    pub container: String,
    /// Only the last N lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_lines: Option<u64>,
    /// At most this many bytes (from the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// The previous (terminated) instance's log.
    #[serde(default)]
    pub previous: bool,
    /// `kubectl logs -f`: the reply starts with a [`LogCursor`] ([`LogCursor::LEN`] bytes) saying where the
    /// next request continues. Without `cursor`, the log so far (with `tailLines`/`limitBytes`);
    /// with one, only what was written after it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Where a follow continues (from the previous reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<LogCursor>,
}

/// What the cloud asks a node for when a user runs `kubectl exec` or `kubectl attach`: sent as
/// the open request of a channel stream (`sedge_tunnel::stream`), whose frames then carry
/// Kubernetes' channel protocol (`v5.channel.k8s.io`): a first byte naming the channel
/// ([`exec_channel`]), the data after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID (a recreated pod of the same name is another pod).
    pub uid: String,
    /// The container.
    pub container: String,
    /// The command and its arguments (empty for attach).
    #[serde(default)]
    pub command: Vec<String>,
    /// Attach to the container's main process instead of running a command.
    #[serde(default)]
    pub attach: bool,
    /// The client sends standard input.
    #[serde(default)]
    pub stdin: bool,
    /// The client wants standard output.
    #[serde(default)]
    pub stdout: bool,
    /// The client wants standard error (not with `tty`).
    #[serde(default)]
    pub stderr: bool,
    /// Run the command on a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Only check that the command could run (pod, container, image), and run nothing: how
    /// the API server answers a client that asks in a protocol it does not serve with the
    /// error the user needs to see first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_only: bool,
}

/// What the cloud asks a node for when a user runs `kubectl port-forward`: a TCP connection to
/// the pod's port, carried by a channel stream whose frames are `[0, data...]` (bytes for the
/// pod) and `[255]` (the client sends no more: the node shuts down its side of the connection
/// for writing); bytes from the pod come back as `[0, data...]` and the stream closes when the
/// pod closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardRequest {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub uid: String,
    /// The pod's TCP port.
    pub port: u16,
    /// Only check that the pod is there and running; connect nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_only: bool,
}

/// The first byte of each frame of a TCP connection carried by a channel stream (port-forward
/// and Service connections, see [`PortForwardRequest`]).
pub mod tcp_frame {
    /// Bytes for the other end: `[DATA, bytes...]`.
    pub const DATA: u8 = 0;
    /// `[CLOSE_WRITE]`: this side sends no more (the other end shuts down its writing side).
    pub const CLOSE_WRITE: u8 = 255;
}

/// What a node asks the cloud for when a pod connects to a Service through the node's service
/// proxy: a connection to one of the Service's ready endpoints, wherever it runs, carried with
/// the frames of [`PortForwardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConnectRequest {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The Service's port (`spec.ports[].port`).
    pub port: u16,
}

/// The open request of a channel stream: what the node is asked to run or connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum StreamOpen {
    /// `kubectl exec` or `attach`.
    Exec(ExecRequest),
    /// `kubectl port-forward`.
    PortForward(PortForwardRequest),
    /// A pod's connection to a Service (edge to cloud).
    Service(ServiceConnectRequest),
}

impl StreamOpen {
    /// Whether nothing should run or connect, only be checked.
    pub fn check_only(&self) -> bool {
        match self {
            StreamOpen::Exec(r) => r.check_only,
            StreamOpen::PortForward(r) => r.check_only,
            StreamOpen::Service(_) => false,
        }
    }

    /// The same request, marked as a check.
    pub fn as_check(&self) -> StreamOpen {
        let mut s = self.clone();
        match &mut s {
            StreamOpen::Exec(r) => r.check_only = true,
            StreamOpen::PortForward(r) => r.check_only = true,
            StreamOpen::Service(_) => {}
        }
        s
    }
}

/// Channel numbers of Kubernetes' streaming protocol, as exec stream frames carry them.
pub mod exec_channel {
    /// Standard input, client to container.
    pub const STDIN: u8 = 0;
    /// Standard output.
    pub const STDOUT: u8 = 1;
    /// Standard error.
    pub const STDERR: u8 = 2;
    /// The outcome: a `meta/v1` Status (Success, or Failure with the exit code).
    pub const ERROR: u8 = 3;
    /// Terminal size changes: `{"Width": w, "Height": h}`.
    pub const RESIZE: u8 = 4;
    /// `v5.channel.k8s.io`: `[255, channel]` closes that channel (stdin's end of file).
    pub const CLOSE: u8 = 255;
}

/// A position in a container's log on the node: the current file's identity (inode) and the
/// byte offset in it. A rotation changes the identity; the node then sends the rest of the
/// rotated file and the new one from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LogCursor {
    /// The file's inode.
    pub file: u64,
    /// Bytes of it already sent.
    pub offset: u64,
}

impl LogCursor {
    /// Its length at the head of a follow reply.
    pub const LEN: usize = 16;

    /// The cursor as it leads a follow reply (big-endian file, then offset).
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.file.to_be_bytes());
        b[8..].copy_from_slice(&self.offset.to_be_bytes());
        b
    }

    /// Splits a follow reply into its cursor and the log bytes.
    pub fn split(reply: &[u8]) -> Option<(LogCursor, &[u8])> {
        if reply.len() < Self::LEN {
            return None;
        }
        let file = u64::from_be_bytes(reply[..8].try_into().ok()?);
        let offset = u64::from_be_bytes(reply[8..Self::LEN].try_into().ok()?);
        Some((LogCursor { file, offset }, &reply[Self::LEN..]))
    }
}

/// A pod's status as the edge sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusReport {
    /// The pod's UID: a report for an older pod of the same name is ignored.
    pub uid: String,
    /// A core/v1 `PodStatus`.
    pub status: serde_json::Value,
}

/// A device's twins and state as its node reports them (the Device's `status`, in KubeEdge's
/// field names: `twins`, `state`, `lastOnlineTime`). Values are bounded by the node before it
/// sends them and checked again by the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatusReport {
    /// The Device's UID: a report for an older device of the same name is ignored.
    pub uid: String,
    /// The status fields to set.
    pub status: serde_json::Value,
}

/// A node lease heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseReport {
    /// When the edge renewed it (RFC 3339 with microseconds, as `Lease.spec.renewTime`).
    pub renew_time: String,
    /// `Lease.spec.leaseDurationSeconds`.
    pub duration_seconds: i32,
}

/// Whether `s` is a DNS-1123 label (lower-case alphanumerics and `-`, 1 to 63, alphanumeric at
/// both ends): the rule for container, volume and port names, checked by the API server and
/// again by the node, which turns them into directory names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether a path from a pod spec climbs with a `..` component.
pub fn climbs(p: &str) -> bool {
    std::path::Path::new(p)
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// kube-apiserver's `validateLocalDescendingPath` (`subPath`, item paths): relative and without
/// `..`; the error is its text.
pub fn local_descending(p: &str) -> Result<(), &'static str> {
    if std::path::Path::new(p).is_absolute() {
        Err("must be a relative path")
    } else if climbs(p) {
        Err("must not contain '..'")
    } else {
        Ok(())
    }
}

/// Whether a pod spec references a secret or config map by name (volumes, projected sources,
/// env, envFrom, image pull secrets).
pub fn pod_references(spec: &serde_json::Value, kind: &str, name: &str) -> bool {
    let secret = kind == "secrets";
    let mut found = false;
    let mut check = |v: &serde_json::Value| found |= v.as_str() == Some(name);
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if secret {
            check(&v["secret"]["secretName"]);
        } else {
            check(&v["configMap"]["name"]);
        }
        for s in v["projected"]["sources"].as_array().into_iter().flatten() {
            check(&s[if secret { "secret" } else { "configMap" }]["name"]);
        }
    }
    let containers = spec["containers"].as_array().into_iter().flatten();
    let inits = spec["initContainers"].as_array().into_iter().flatten();
    for c in containers.chain(inits) {
        for e in c["env"].as_array().into_iter().flatten() {
            check(
                &e["valueFrom"][if secret {
                    "secretKeyRef"
                } else {
                    "configMapKeyRef"
                }]["name"],
            );
        }
        for e in c["envFrom"].as_array().into_iter().flatten() {
            check(&e[if secret { "secretRef" } else { "configMapRef" }]["name"]);
        }
    }
    if secret {
        for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
            check(&s["name"]);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_agent_nodes() {
        assert_eq!(role_label(None), "node-role.kubernetes.io/edge");
        assert_eq!(role_label(Some("")), "node-role.kubernetes.io/edge");
        assert_eq!(role_label(Some("cloud")), "node-role.kubernetes.io/cloud");
        let l = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert!(is_agent_node(
            l(&[AGENT_LABEL, "node-role.kubernetes.io/cloud"]).iter()
        ));
        // Registered before the agent label existed.
        assert!(is_agent_node(l(&[EDGE_LABEL]).iter()));
        assert!(!is_agent_node(
            l(&["node-role.kubernetes.io/control-plane"]).iter()
        ));
    }

    #[test]
    fn names_and_paths_from_a_pod_spec() {
        for ok in ["a", "web-1", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "../x", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert_eq!(local_descending("a/b"), Ok(()));
        assert_eq!(local_descending("/etc"), Err("must be a relative path"));
        assert_eq!(local_descending("a/../../b"), Err("must not contain '..'"));
        assert!(climbs("/x/../y") && !climbs("/x/..y"));
    }

    #[test]
    fn keys_round_trip_and_reject_malformed() {
        let k = Key::new(Some("default"), kind::POD, "web-1");
        assert_eq!(k.to_string(), "default/pod/web-1");
        assert_eq!(Key::parse("default/pod/web-1").unwrap(), k);
        assert_eq!(
            Key::new(None, kind::NODE, "edge-1").to_string(),
            "null/node/edge-1"
        );
        for bad in ["", "a/b", "a//c", "/pod/x", "ns/pod/a/b"] {
            let e = Key::parse(bad).unwrap_err();
            assert!(e.contains("<namespace>/<kind>/<name>"), "{bad}: {e}");
        }
    }
}
