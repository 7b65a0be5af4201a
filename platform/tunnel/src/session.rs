//! What both ends of a session share: the hello exchange, acknowledgements, request/response
//! bookkeeping, connection events and the handler type the layers above plug in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::TunnelError;
use crate::config::Transport;
use crate::message::{HUB_GROUP, Message, op};

/// A message delivered to a handler.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The edge node it came from (on the cloud) or this node (on the edge).
    pub node: String,
    /// The message.
    pub message: Message,
}

/// What the layer above does with incoming messages. `Ok` means handled and, for messages that
/// need one, *persisted*: the channel acknowledges only then. `Ok(Some(reply))` also sends the
/// reply (its `parent_id` is set to the request's id). `Err(reason)` is sent back as an `error`
/// reply and the sender retries reliable messages later. Delivery is at-least-once: a handler
/// may see a message twice and should compare resourceVersions.
pub type Handler =
    Arc<dyn Fn(Incoming) -> BoxFuture<'static, Result<Option<Message>, String>> + Send + Sync>;

/// A handler from an async closure.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Option<Message>, String>> + Send + 'static,
{
    Arc::new(move |i| Box::pin(f(i)))
}

/// Connection events, published to local subscribers on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A session with `node` is up.
    Connected {
        /// The node.
        node: String,
        /// Transport used.
        transport: Transport,
        /// Peer address.
        remote: SocketAddr,
    },
    /// The session with `node` ended.
    Disconnected {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
}

/// The edge's first message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub node: String,
    /// What the node holds (object key -> resourceVersion), when its application keeps a store
    /// ([`crate::EdgeOptions::inventory`]). A hub that has never served the node (another cloud
    /// core served it until that core died) learns from it what not to send again and what was
    /// deleted while the node was away: the node is the one record no core can lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<std::collections::HashMap<String, String>>,
}

/// The most objects a hello's inventory may list.
pub const MAX_HELD: usize = 200_000;

/// Why a hello's inventory cannot be used, or `None` when it can: at most [`MAX_HELD`]
/// entries, keys of 1 to 512 bytes, versions of 1 to 64 bytes, no control characters.
pub(crate) fn check_held(held: &std::collections::HashMap<String, String>) -> Option<String> {
    if held.len() > MAX_HELD {
        return Some(format!(
            "the inventory lists {} objects, more than {MAX_HELD}",
            held.len()
        ));
    }
    let bad = |s: &str, max: usize| s.len() > max || s.chars().any(char::is_control);
    held.iter().find_map(|(k, rv)| {
        if bad(k, 512) || k.is_empty() {
            Some(format!(
                "inventory key {:?} is empty, longer than 512 bytes or has control characters",
                k.chars().take(80).collect::<String>()
            ))
        } else if bad(rv, 64) || rv.is_empty() {
            Some(format!(
                "inventory version {:?} of {k:?} is not a resourceVersion",
                rv.chars().take(80).collect::<String>()
            ))
        } else {
            None
        }
    })
}

/// The hub's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Welcome {
    pub session: u64,
    pub keepalive_ms: u64,
}

pub(crate) fn control(operation: &str, content: impl Into<bytes::Bytes>) -> Message {
    Message::new(HUB_GROUP, operation, "", content).unacked()
}

/// The acknowledgement of `m`: the receiver has persisted it.
pub(crate) fn ack_for(m: &Message) -> Message {
    let mut a = Message::new(HUB_GROUP, op::ACK, &m.route.resource, "").unacked();
    a.parent_id = m.id.clone();
    a.resource_version = m.resource_version.clone();
    a
}

/// Feeds incoming messages to the handler in order and answers each: an ack once handled (for
/// messages that need one), the handler's reply, or an `error` reply the sender retries on.
/// Used by both ends of a session.
pub(crate) async fn serve(
    handler: Handler,
    node: String,
    mut rx: tokio::sync::mpsc::Receiver<Message>,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
) {
    while let Some(m) = rx.recv().await {
        let result = handler(Incoming {
            node: node.clone(),
            message: m.clone(),
        })
        .await;
        let out = match result {
            Ok(reply) => {
                if !m.no_ack && tx.send(ack_for(&m).encode()).await.is_err() {
                    return;
                }
                reply.map(|mut r| {
                    if r.parent_id.is_empty() {
                        r.parent_id = m.id.clone();
                    }
                    r.no_ack = true;
                    r
                })
            }
            Err(why) => {
                tracing::warn!(%node, resource = %m.route.resource, reason = %why, "handler failed; the sender will retry");
                Some(m.reply(op::ERROR, why))
            }
        };
        if let Some(o) = out
            && tx.send(o.encode()).await.is_err()
        {
            return;
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Outstanding requests waiting for replies, by request id.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    waiting: Mutex<HashMap<String, oneshot::Sender<Message>>>,
}

impl Requests {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Message>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, id: &str) -> oneshot::Receiver<Message> {
        let (tx, rx) = oneshot::channel();
        self.map().insert(id.to_string(), tx);
        rx
    }

    /// Routes a reply to its waiter; false if nobody waits for it.
    pub fn complete(&self, reply: Message) -> bool {
        match self.map().remove(&reply.parent_id) {
            Some(tx) => {
                let _ = tx.send(reply);
                true
            }
            None => false,
        }
    }

    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    /// Drops every waiter (their requests fail with "connection lost").
    pub fn fail_all(&self) {
        self.map().clear();
    }

    /// Waits for the reply to `id`.
    pub async fn wait(
        &self,
        id: &str,
        rx: oneshot::Receiver<Message>,
        timeout: Duration,
    ) -> Result<Message, TunnelError> {
        let r = tokio::time::timeout(timeout, rx).await;
        self.forget(id);
        match r {
            Err(_) => Err(TunnelError::Timeout(timeout)),
            Ok(Err(_)) => Err(TunnelError::NotConnected),
            Ok(Ok(m)) if m.route.operation == op::ERROR || m.route.operation == op::REFUSED => Err(
                TunnelError::Remote(String::from_utf8_lossy(&m.content).into_owned()),
            ),
            Ok(Ok(m)) => Ok(m),
        }
    }
}

/// A per-side message counter set, rendered for `/metrics` by the daemons.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions established.
    pub sessions_opened: std::sync::atomic::AtomicU64,
    /// Sessions ended.
    pub sessions_closed: std::sync::atomic::AtomicU64,
    /// Sessions replaced by a newer one from the same node (hub only).
    pub sessions_replaced: std::sync::atomic::AtomicU64,
    /// Messages written (acks and keepalives excluded).
    pub messages_sent: std::sync::atomic::AtomicU64,
    /// Messages read (acks and keepalives excluded).
    pub messages_received: std::sync::atomic::AtomicU64,
    /// Acknowledgements received.
    pub acks_received: std::sync::atomic::AtomicU64,
    /// Reliable messages sent again after a timeout.
    pub retries: std::sync::atomic::AtomicU64,
    /// Messages refused by authorisation (hub only).
    pub refused: std::sync::atomic::AtomicU64,
    /// Connections closed for an oversize frame.
    pub oversize_frames: std::sync::atomic::AtomicU64,
    /// Connections closed for a frame that is not a message.
    pub garbage_frames: std::sync::atomic::AtomicU64,
    /// TLS handshakes or hellos that failed or timed out.
    pub handshake_failures: std::sync::atomic::AtomicU64,
    /// Connections closed at once because too many were still handshaking (hub only).
    pub handshakes_shed: std::sync::atomic::AtomicU64,
    /// Connections that had sent nothing, closed to make room for a new one at the cap (hub only).
    pub handshakes_evicted: std::sync::atomic::AtomicU64,
    /// Offers refused because a node's queue was full (hub only).
    pub queue_full: std::sync::atomic::AtomicU64,
    /// Certificates issued (hub) or renewed (edge).
    pub certificates_issued: std::sync::atomic::AtomicU64,
    /// Certificate requests refused by the join rate limit (hub only).
    pub joins_throttled: std::sync::atomic::AtomicU64,
    /// Hellos whose inventory the hub took as the node's delivery records (hub only).
    pub inventories_adopted: std::sync::atomic::AtomicU64,
    /// Hellos whose inventory was malformed or too large and was ignored (hub only).
    pub inventories_refused: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub(crate) fn inc(c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counters as (name, value) pairs, for metrics and tests.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("sessions_opened", self.sessions_opened.load(Relaxed)),
            ("sessions_closed", self.sessions_closed.load(Relaxed)),
            ("sessions_replaced", self.sessions_replaced.load(Relaxed)),
            ("messages_sent", self.messages_sent.load(Relaxed)),
            ("messages_received", self.messages_received.load(Relaxed)),
            ("acks_received", self.acks_received.load(Relaxed)),
            ("retries", self.retries.load(Relaxed)),
            ("refused", self.refused.load(Relaxed)),
            ("oversize_frames", self.oversize_frames.load(Relaxed)),
            ("garbage_frames", self.garbage_frames.load(Relaxed)),
            ("handshake_failures", self.handshake_failures.load(Relaxed)),
            ("handshakes_shed", self.handshakes_shed.load(Relaxed)),
            ("handshakes_evicted", self.handshakes_evicted.load(Relaxed)),
            ("queue_full", self.queue_full.load(Relaxed)),
            (
                "certificates_issued",
                self.certificates_issued.load(Relaxed),
            ),
            ("joins_throttled", self.joins_throttled.load(Relaxed)),
            (
                "inventories_adopted",
                self.inventories_adopted.load(Relaxed),
            ),
            (
                "inventories_refused",
                self.inventories_refused.load(Relaxed),
            ),
        ]
    }

    /// Each counter with its help text, for `/metrics`.
    pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.snapshot()
            .into_iter()
            .map(|(name, v)| {
                let help = match name {
                    "sessions_opened" => "Sessions opened",
                    "sessions_closed" => "Sessions closed",
                    "sessions_replaced" => "Sessions replaced by a newer one of the same node",
                    "messages_sent" => "Messages sent",
                    "messages_received" => "Messages received",
                    "acks_received" => "Acknowledgements received",
                    "retries" => "Messages sent again after no acknowledgement",
                    "refused" => "Messages refused (not allowed for the sender)",
                    "oversize_frames" => "Connections closed for an oversize frame",
                    "garbage_frames" => "Connections closed for a frame that is not a message",
                    "handshake_failures" => "TLS handshakes or hellos that failed or timed out",
                    "handshakes_shed" => {
                        "Connections closed at once with every handshake slot busy"
                    }
                    "handshakes_evicted" => "Silent connections closed to make room for a new one",
                    "queue_full" => "Offers refused because a node's queue was full",
                    "certificates_issued" => "Certificates issued or renewed",
                    "joins_throttled" => "Certificate requests refused by the join rate limit",
                    "inventories_adopted" => {
                        "Hellos whose inventory of held objects became the node's delivery records"
                    }
                    "inventories_refused" => {
                        "Hellos with a malformed or oversized inventory, ignored"
                    }
                    _ => "",
                };
                (name, help, v)
            })
            .collect()
    }

    /// One counter by name (0 if unknown).
    pub fn get(&self, name: &str) -> u64 {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or(0)
    }
}
