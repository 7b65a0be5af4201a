//! Sedge's cloud-edge channel.
//!
//! Every edge node keeps one persistent, edge-initiated, mutually authenticated connection to
//! the cloud hub (WebSocket over TLS, or QUIC), and everything between cloud and edge rides on
//! it as addressed [`Message`]s. The channel knows nothing of pods or models: it moves messages,
//! reliably where asked.
//!
//! - [`message`]: the message model and its compact wire encoding.
//! - [`frame`]: length-prefixed frames with a hard cap.
//! - [`hub`]: the cloud side (sessions, per-node queues, join endpoints, authorisation).
//! - [`edge`]: the edge side (join, reconnect, outbox, certificate rotation).
//! - [`token`]: join tokens that can be listed and revoked.
//! - [`queue`], [`records`], [`outbox`]: the reliability pieces.
//! - [`stream`]: byte streams with per-stream back-pressure (exec, attach) over a session.
//! - [`fault`]: a fault-injecting TCP/UDP proxy for tests and benchmarks.

pub mod config;
pub mod edge;
pub mod fault;
pub mod frame;
pub mod hub;
pub mod link;
pub mod message;
pub mod outbox;
pub mod queue;
pub mod records;
pub mod session;
pub mod stream;
pub mod tls;
pub mod token;

pub use config::{EdgeConfig, HubConfig, Transport};
pub use edge::{EdgeHub, EdgeOptions, Inventory, join, renew};
pub use hub::{Hub, HubOptions, OwnerLookup};
pub use message::{Message, Route, op};
pub use outbox::Policy;
pub use queue::Enqueued;
pub use session::{Handler, Incoming, LinkEvent, handler};

/// Channel failures.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificates or keys.
    #[error(transparent)]
    Pki(#[from] sedge_pki::PkiError),
    /// TLS setup or handshake.
    #[error("TLS: {0}")]
    Tls(String),
    /// Reaching the peer failed.
    #[error("connecting: {0}")]
    Connect(String),
    /// Joining failed.
    #[error("join: {0}")]
    Join(String),
    /// The node has no usable credentials.
    #[error("not joined: {0}")]
    NotJoined(String),
    /// No session is up.
    #[error("not connected to the peer")]
    NotConnected,
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The peer answered with an error.
    #[error("the peer answered with an error: {0}")]
    Remote(String),
    /// A node's queue is full.
    #[error("the queue for node {node} holds {capacity} objects already; offer again later")]
    QueueFull {
        /// The node.
        node: String,
        /// Its capacity.
        capacity: usize,
    },
    /// A message larger than the frame cap (the peer would close the connection on it).
    #[error(
        "message {resource:?} encodes to {size} bytes, above the {cap}-byte frame cap (max_frame_bytes)"
    )]
    TooLarge {
        /// The message's resource.
        resource: String,
        /// Its encoded size.
        size: usize,
        /// The cap.
        cap: usize,
    },
    /// A local database failed.
    #[error("store: {0}")]
    Store(String),
}

/// Resolves once the stop flag is set, including when it was set before `rx` was made (a task
/// subscribing after the stop must still see it; `changed()` would wait forever).
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
