//! Messages between the AI edge module and the AI cloud module, in the channel's group
//! [`GROUP`]. Resources follow the platform's `<namespace>/<kind>/<name>` keys.
//!
//! | direction | operation | resource | content |
//! |---|---|---|---|
//! | edge -> cloud | `update` (reliable, latest wins) | `<ns>/workerreport/<pod>` | [`WorkerReport`] |
//! | edge -> cloud | `query` | `<ns>/route/<service>` | [`RouteOpen`]; reply `response` or `error` |
//! | both ways | `update` (unacknowledged, in order) | `<ns>/stream/<id>` | bytes of the connection |
//! | both ways | `delete` (unacknowledged) | `<ns>/stream/<id>` | empty: the connection closed |
//!
//! A node may only report on pods bound to it and only write to streams it opened (checked by
//! the hub through [`crate::cloud::CloudAiModule`]'s owner lookup).

use std::collections::BTreeMap;

use bytes::Bytes;
use sedge_tunnel::{Message, op};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The message group of the AI modules.
pub const GROUP: &str = "sedna";

/// Resource kinds in [`GROUP`].
pub mod kind {
    /// A worker's report.
    pub const REPORT: &str = "workerreport";
    /// A request to open a routed connection to a Service.
    pub const ROUTE: &str = "route";
    /// The bytes of a routed connection.
    pub const STREAM: &str = "stream";
}

/// Pod annotation: the local port the edge module listens on for this pod's route.
pub const ROUTE_LISTEN_ANNOTATION: &str = "sedge.io/route-listen";
/// Pod annotation: `<service>:<port>` the route leads to (in the pod's namespace).
pub const ROUTE_SERVICE_ANNOTATION: &str = "sedge.io/route-service";
/// Service annotation: edge nodes may open routes to this Service.
pub const EDGE_ROUTABLE_ANNOTATION: &str = "sedge.io/edge-routable";

/// What a worker reported to the local controller endpoint (Sedna's `/sedna/workers/<name>/info`
/// body, reduced to what the cloud uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// Kind of the owner (`jointinferenceservice`).
    pub owner_kind: String,
    /// Name of the owner.
    pub owner_name: String,
    /// `inference`, `train`, ...
    pub kind: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// Sedna's `ownerInfo` without its time keys, values as strings
    /// (`inferenceNumber`, `hardExampleNumber`, `uploadCloudRatio`, ...).
    pub metrics: BTreeMap<String, String>,
}

/// Opens a routed connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteOpen {
    /// The stream id the edge chose (a UUID).
    pub stream: String,
    /// The Service port.
    pub port: u16,
}

/// Chunks buffered per routed connection towards its socket; a full buffer holds the channel's
/// reader back (back-pressure), it never drops bytes.
pub const STREAM_BUFFER: usize = 64;

/// Carries one routed connection until either side ends: what `sock` yields leaves as `update`
/// messages on `key` through `send` (which says whether the link took it), and the chunks
/// arriving on `rx` are written to `sock`. Both modules use it, on their own side.
pub(crate) async fn pump<F, Fut>(sock: TcpStream, mut rx: mpsc::Receiver<Bytes>, key: &str, send: F)
where
    F: Fn(Message) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut rd, mut wr) = sock.into_split();
    let out = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let m = Message::new(GROUP, op::UPDATE, key, Bytes::copy_from_slice(&buf[..n]));
                    if !send(m).await {
                        break;
                    }
                }
            }
        }
    };
    let into = async {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = out => {}
        _ = into => {}
    }
}
