//! `kubectl exec` through the channel: the cloud's side of exec streams
//! ([`sedge_tunnel::stream`]). The API server gets a pair of bounded channels per stream; what
//! moves between them and the node keeps each stream's back-pressure (a slow client stalls its
//! own stream, never the node's session), and a dropped link ends the node's streams with an
//! error the user reads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sedge_api::StreamOpen;
use sedge_tunnel::stream::{self, Streams};
use sedge_tunnel::{Hub, LinkEvent, Message, TunnelError, op};
use tokio::sync::mpsc;

/// Streams (exec, attach, port-forward, Service connections) one node may have open through
/// this cloud core; each holds at most two credit windows of buffer.
pub const MAX_STREAMS_PER_NODE: usize = 128;

/// Frames buffered between the API server and a stream, each way.
const RELAY_FRAMES: usize = 8;

/// Why an exec stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The node has [`MAX_STREAMS_PER_NODE`] open already.
    #[error("node {node} already has {MAX_STREAMS_PER_NODE} streams open; try again later")]
    Busy {
        /// The node.
        node: String,
    },
    /// The node refused: the pod or container is not there or not running, or the image does
    /// not allow exec.
    #[error("{0}")]
    Refused(String),
    /// The node cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

/// An open exec stream as the API server holds it: frames in Kubernetes' channel protocol.
#[derive(Debug)]
pub struct ExecChannels {
    /// Frames from the container; ends with `None` when the node closed the stream cleanly,
    /// or with one `Err` naming why it failed.
    pub from_node: mpsc::Receiver<Result<Bytes, String>>,
    /// Frames for the container (at most [`stream::MAX_FRAME`] bytes each); dropping it closes
    /// the stream, and the node kills the command.
    pub to_node: mpsc::Sender<Bytes>,
}

/// Asks `node` whether `req` could run (or connect), and runs nothing.
pub async fn check(
    hub: &Arc<Hub>,
    node: &str,
    req: &StreamOpen,
    timeout: Duration,
) -> Result<(), ExecError> {
    let req = req.as_check();
    let open = Message::new(
        stream::GROUP,
        stream::op::OPEN,
        "exec-check",
        serde_json::to_vec(&req).unwrap_or_default(),
    );
    match refusal(node, hub.request(node, open, timeout).await) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a node's answer to an open says, when it is not a yes.
fn refusal(node: &str, reply: Result<Message, TunnelError>) -> Option<ExecError> {
    match reply {
        Ok(reply) if reply.route.operation == op::ERROR => Some(ExecError::Refused(format!(
            "node {node}: {}",
            String::from_utf8_lossy(&reply.content)
        ))),
        Ok(_) => None,
        Err(TunnelError::NotConnected) => Some(ExecError::Unavailable(format!(
            "node {node} is not connected to the cloud; exec needs the link (run the command on the node itself while it is offline)"
        ))),
        Err(e) => Some(ExecError::Unavailable(format!("node {node}: {e}"))),
    }
}

/// Opens a stream to `node` (exec, attach, port-forward): the node checks the request and
/// starts the command (or connects) before this returns.
pub async fn open(
    hub: &Arc<Hub>,
    streams: &Streams,
    node: &str,
    req: &StreamOpen,
    timeout: Duration,
) -> Result<ExecChannels, ExecError> {
    if streams.count(node) >= MAX_STREAMS_PER_NODE {
        return Err(ExecError::Busy { node: node.into() });
    }
    let mut open = Message::new(
        stream::GROUP,
        stream::op::OPEN,
        "",
        serde_json::to_vec(req).unwrap_or_default(),
    );
    // The stream is named after its open request (a fresh UUID).
    let id = format!("exec-{}", open.id);
    open.route.resource = id.clone();
    let send: stream::Sender = {
        let (hub, node) = (hub.clone(), node.to_string());
        Arc::new(move |m: Message| {
            let (hub, node) = (hub.clone(), node.clone());
            Box::pin(async move { hub.send_unacked(&node, m).await })
        })
    };
    let s = streams
        .register(&id, node, send)
        .ok_or_else(|| ExecError::Unavailable("stream id collision".into()))?;
    let refused = refusal(node, hub.request(node, open, timeout).await);
    let stream::Stream { mut reader, writer } = s;
    if let Some(e) = refused {
        writer.close(None).await;
        return Err(e);
    }
    let (from_tx, from_rx) = mpsc::channel(RELAY_FRAMES);
    let (to_tx, mut to_rx) = mpsc::channel::<Bytes>(RELAY_FRAMES);
    tokio::spawn(async move {
        while let Some(r) = reader.recv().await {
            let failed = r.is_err();
            if from_tx.send(r).await.is_err() || failed {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(frame) = to_rx.recv().await {
            if writer.send(frame).await.is_err() {
                break;
            }
        }
        writer.close(None).await;
    });
    Ok(ExecChannels {
        from_node: from_rx,
        to_node: to_tx,
    })
}

/// Ends a node's exec streams when its link drops, so each user sees why at once.
pub async fn close_on_disconnect(hub: Arc<Hub>, streams: Streams) {
    let mut links = hub.subscribe();
    loop {
        match links.recv().await {
            Ok(LinkEvent::Disconnected { node, reason }) => streams.close_peer(
                &node,
                &format!("the link to node {node} dropped ({reason}); the command was stopped"),
            ),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}
