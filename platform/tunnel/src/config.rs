//! Settings of the cloud hub and of the edge hub: one serde struct each, with defaults that
//! work, printed by the daemons' `--print-default-config`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::DEFAULT_MAX_FRAME;

/// How the edge reaches the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket over TLS on the hub's TCP port (works through most proxies and firewalls).
    #[default]
    Websocket,
    /// QUIC on the hub's UDP port (one socket for any number of nodes; better on lossy links).
    Quic,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "websocket" | "ws" | "wss" => Ok(Transport::Websocket),
            "quic" => Ok(Transport::Quic),
            other => Err(format!(
                "unknown transport {other:?}: expected `websocket` or `quic`"
            )),
        }
    }
}

/// Settings of the cloud hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Where the hub database (join tokens, delivery records) lives.
    pub data_dir: PathBuf,
    /// Where the CA (`ca.crt`, `ca.key`) and the token signing key live; shared with the API
    /// server when both run on one machine.
    pub pki_dir: PathBuf,
    /// TCP address for WebSocket and for the join endpoints (`/ca.crt`, `/edge.crt`). One port
    /// for both, so a node that can reach the tunnel can also join.
    pub listen: String,
    /// UDP address for QUIC; empty disables QUIC.
    pub listen_quic: String,
    /// Names and IPs edges dial, put in the hub's serving certificate. The listen IP (when not
    /// a wildcard), `localhost` and `127.0.0.1` are always added.
    pub advertise_addresses: Vec<String>,
    /// How often keepalives are expected from each edge.
    pub keepalive_interval_ms: u64,
    /// A peer silent for this many keepalive intervals is declared dead.
    pub dead_after_intervals: u32,
    /// How long to wait for an edge's acknowledgement before sending again.
    pub ack_timeout_ms: u64,
    /// Cap on the per-object retry backoff (doubles from `ack_timeout_ms`).
    pub max_retry_backoff_ms: u64,
    /// Messages sent to one node and not yet acknowledged, at most.
    pub send_window: usize,
    /// Objects queued for one node, at most. Repeated updates of one object take one slot; when
    /// full, new objects are refused with `QueueFull` (the caller resyncs later).
    pub queue_capacity: usize,
    /// Largest frame accepted, bytes.
    pub max_frame_bytes: usize,
    /// A connection that has not finished its TLS handshake and hello in this time is closed.
    pub handshake_timeout_ms: u64,
    /// Connections still handshaking, at most; more are closed at once (keeps a flood of idle
    /// sockets from starving good nodes).
    pub max_pending_handshakes: usize,
    /// TLS handshakes worked on at once; the other pending connections wait their turn (within
    /// `handshake_timeout_ms`, else they are closed and counted as shed). Thousands at once on
    /// a few cores (every node reconnecting after a cloud restart) made each take longer than
    /// the timeout, so their work was lost and the nodes backed off.
    pub max_concurrent_handshakes: usize,
    /// Lifetime of node certificates issued on join and rotation.
    pub node_cert_days: u64,
    /// Lifetime of join tokens created without an explicit TTL.
    pub default_token_ttl_hours: u64,
    /// Joins (`/edge.crt`) answered per second on average, in bursts of up to twice that; the
    /// rest are refused with 429 and retried by the node. Keeps a flood of join requests from
    /// exhausting the CA's signing. Raise it to bring up a large fleet at once (20/s joins
    /// 100,000 nodes in 83 minutes).
    pub joins_per_second: f64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from("sedge-data/cloudhub"),
            pki_dir: PathBuf::from("sedge-data/pki"),
            listen: "0.0.0.0:10000".into(),
            listen_quic: "0.0.0.0:10001".into(),
            advertise_addresses: Vec::new(),
            keepalive_interval_ms: 15_000,
            dead_after_intervals: 3,
            ack_timeout_ms: 5_000,
            max_retry_backoff_ms: 60_000,
            send_window: 256,
            queue_capacity: 100_000,
            max_frame_bytes: DEFAULT_MAX_FRAME,
            handshake_timeout_ms: 10_000,
            max_pending_handshakes: 4_096,
            max_concurrent_handshakes: 128,
            node_cert_days: 30,
            default_token_ttl_hours: 24,
            joins_per_second: 20.0,
        }
    }
}

impl HubConfig {
    /// The keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms.max(1))
    }
    /// Silence after which a peer is dead.
    pub fn dead_after(&self) -> Duration {
        self.keepalive() * self.dead_after_intervals.max(1)
    }
}

/// Settings of the edge hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// This node's name (the certificate says `system:node:<node_name>`).
    pub node_name: String,
    /// The hub's TCP address (`host:port`): WebSocket and join.
    pub cloud: String,
    /// Other cloud cores' hubs (`host:port`, WebSocket) of the same cluster: when the current
    /// address cannot be reached, the next is tried (then `cloud` again), so a node follows a
    /// failover without a load balancer. Each must present a certificate of the cluster CA.
    pub cloud_alternates: Vec<String>,
    /// The hub's UDP address for QUIC (`host:port`); default: the `cloud` host, port 10001.
    pub cloud_quic: String,
    /// Which transport to use.
    pub transport: Transport,
    /// Where the CA, node certificate and key, and the outbox database live.
    pub data_dir: PathBuf,
    /// Keepalive interval.
    pub keepalive_interval_ms: u64,
    /// The cloud is declared dead after this many silent intervals.
    pub dead_after_intervals: u32,
    /// First reconnect delay; doubles per failure, with jitter.
    pub backoff_initial_ms: u64,
    /// Reconnect delay cap.
    pub backoff_max_ms: u64,
    /// Messages kept for the cloud while offline, at most (see [`crate::outbox`] for the drop
    /// policy).
    pub outbox_capacity: usize,
    /// How long to wait for the cloud's acknowledgement before sending again.
    pub ack_timeout_ms: u64,
    /// Largest frame accepted, bytes.
    pub max_frame_bytes: usize,
    /// Renew the node certificate after this fraction of its lifetime (jittered by up to 0.1).
    pub rotate_after_fraction: f64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            node_name: String::new(),
            cloud: "127.0.0.1:10000".into(),
            cloud_alternates: Vec::new(),
            cloud_quic: String::new(),
            transport: Transport::Websocket,
            data_dir: PathBuf::from("sedge-data/edge"),
            keepalive_interval_ms: 15_000,
            dead_after_intervals: 3,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            outbox_capacity: 10_000,
            ack_timeout_ms: 5_000,
            max_frame_bytes: DEFAULT_MAX_FRAME,
            rotate_after_fraction: 0.75,
        }
    }
}

impl EdgeConfig {
    /// The keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms.max(1))
    }
    /// Silence after which the cloud is dead.
    pub fn dead_after(&self) -> Duration {
        self.keepalive() * self.dead_after_intervals.max(1)
    }
    /// The QUIC address to dial.
    pub fn quic_address(&self) -> String {
        if !self.cloud_quic.is_empty() {
            return self.cloud_quic.clone();
        }
        let host = self
            .cloud
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.cloud);
        format!("{host}:10001")
    }
    /// The cloud host name (for TLS server name checks).
    pub fn cloud_host(&self) -> String {
        host_of(&self.cloud)
    }
    /// The hub addresses to dial in turn: `cloud`, then `cloud_alternates`.
    pub fn cloud_addresses(&self) -> Vec<String> {
        std::iter::once(self.cloud.clone())
            .chain(self.cloud_alternates.iter().cloned())
            .filter(|a| !a.trim().is_empty())
            .collect()
    }
}

/// The host of `host:port` (without IPv6 brackets), for TLS server name checks.
pub fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named() {
        let e = "carrier-pigeon".parse::<Transport>().unwrap_err();
        assert!(e.contains("expected `websocket` or `quic`"), "{e}");
        let e = serde_json::from_str::<HubConfig>(r#"{"keepalive_interval": 5}"#).unwrap_err();
        assert!(
            e.to_string().contains("unknown field `keepalive_interval`"),
            "{e}"
        );
        let e = serde_json::from_str::<EdgeConfig>(r#"{"transport": "udp"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `udp`"), "{e}");
    }

    #[test]
    fn the_hubs_are_dialled_in_order_and_blank_alternates_are_skipped() {
        let cfg = EdgeConfig {
            cloud: "a.example:10000".into(),
            cloud_alternates: vec!["".into(), "  ".into(), "[::1]:10000".into()],
            ..Default::default()
        };
        assert_eq!(cfg.cloud_addresses(), ["a.example:10000", "[::1]:10000"]);
        assert_eq!(host_of("[::1]:10000"), "::1");
        // An address without a port is its own host (the dial then fails with the reason).
        assert_eq!(host_of("nonsense"), "nonsense");
    }

    #[test]
    fn quic_address_defaults_to_the_cloud_host() {
        let cfg = EdgeConfig {
            cloud: "hub.example:10000".into(),
            ..Default::default()
        };
        assert_eq!(cfg.quic_address(), "hub.example:10001");
        assert_eq!(cfg.cloud_host(), "hub.example");
        let v6 = EdgeConfig {
            cloud: "[::1]:10000".into(),
            ..Default::default()
        };
        assert_eq!(v6.cloud_host(), "::1");
        assert_eq!(v6.dead_after(), Duration::from_secs(45));
    }
}
