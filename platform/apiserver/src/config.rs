//! API server settings: one serde struct, printed by `sedge apiserver --print-default-config`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::Durability;

/// Settings of the embedded API server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiServerConfig {
    /// Where the database, PKI, token file and kubeconfig live.
    pub data_dir: PathBuf,
    /// Listen address (`127.0.0.1:6443`; port 0 picks a free port).
    pub listen: String,
    /// Host written into the kubeconfig and the serving certificate (default: the listen IP, or
    /// 127.0.0.1 when listening on all interfaces).
    pub advertise_address: Option<String>,
    /// Extra DNS names / IPs for the serving certificate.
    pub extra_sans: Vec<String>,
    /// Serving certificate (PEM). Default: issued by the cluster CA at every start.
    pub tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM), with `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Extra CA (PEM) whose client certificates are accepted, besides the cluster CA.
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens (`token,user,uid,"groups"`). Default: `<data_dir>/tokens.csv`, created with
    /// an admin token on first start.
    pub token_file: Option<PathBuf>,
    /// Where to write the admin kubeconfig. Default: `<data_dir>/kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// Largest accepted request body, bytes (413 above it). etcd's limit is 3 MiB.
    pub max_request_bytes: usize,
    /// Changes kept for watch replay and consistent pagination, at least.
    pub history_events: u64,
    /// Changes younger than this are kept too, so a paginated list (kubectl's `get -A` pages
    /// through 100,000 pods in about 40 s) or a paused watch does not expire under heavy writes.
    /// 0 keeps by count only. etcd's compaction under Kubernetes keeps 5 minutes.
    pub history_seconds: u64,
    /// Changes kept at most, however young (bounds the history's disk use).
    pub history_max_events: u64,
    /// `full` (fsync every commit) or `normal` (survives kill -9, not power loss).
    pub durability: Durability,
    /// Interval between watch BOOKMARK events for watchers that allow them.
    pub bookmark_interval_seconds: u64,
    /// Watch duration when the client sets no `timeoutSeconds`.
    pub watch_timeout_seconds: u64,
    /// Open connections at most; past it new connections are closed at once (the file
    /// descriptors of a flood of idle sockets cannot take the server down).
    pub max_connections: usize,
    /// A connection whose TLS handshake or request headers take longer than this is closed
    /// (a client sending headers a byte a second is not held for minutes).
    pub header_timeout_seconds: u64,
    /// A watch whose client leaves 8 MiB of events unread (or all watches 256 MiB) waits this
    /// long for it to read, then is closed and its memory freed.
    pub slow_watch_grace_seconds: u64,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            data_dir: PathBuf::from("sedge-data/apiserver"),
            listen: "127.0.0.1:6443".into(),
            advertise_address: None,
            extra_sans: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            token_file: None,
            kubeconfig: None,
            max_request_bytes: 3 * 1024 * 1024,
            history_events: 20_000,
            history_seconds: 300,
            history_max_events: 500_000,
            durability: Durability::Full,
            bookmark_interval_seconds: 30,
            watch_timeout_seconds: 1800,
            max_connections: 8_192,
            header_timeout_seconds: 10,
            slow_watch_grace_seconds: 10,
        }
    }
}
