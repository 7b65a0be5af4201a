//! A connection, whatever the transport, as two channels of encoded messages.
//!
//! The hub and the edge speak only in [`Link`]s, so sessions, keepalives and reliable delivery
//! are written once for WebSocket and QUIC. Each link has a reader task and a writer task; the
//! writer's queue is bounded (`WRITE_QUEUE` frames), so a slow peer slows its senders rather
//! than growing memory.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, protocol::WebSocketConfig};

use crate::config::Transport;
use crate::frame;
use crate::message::Message;

/// Frames waiting to be written on one link, at most.
pub const WRITE_QUEUE: usize = 1024;

/// Why a link stopped reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    /// The peer closed it.
    Closed,
    /// A frame above the cap: the connection is closed without reading it.
    Oversize(String),
    /// A frame that is not a message.
    Garbage(String),
    /// Transport error.
    Error(String),
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Closed => f.write_str("closed by peer"),
            LinkEnd::Oversize(s) => write!(f, "oversize frame: {s}"),
            LinkEnd::Garbage(s) => write!(f, "garbage frame: {s}"),
            LinkEnd::Error(s) => write!(f, "transport error: {s}"),
        }
    }
}

/// A connection as channels.
#[derive(Debug)]
pub struct Link {
    /// Messages to write (already encoded).
    pub tx: mpsc::Sender<Bytes>,
    /// Messages read; the last item is the reason the link ended.
    pub rx: mpsc::Receiver<Result<Message, LinkEnd>>,
    /// The peer's address.
    pub remote: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

/// The WebSocket limits for a frame cap.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    // Small buffers: the defaults (128 KiB read buffer per connection) would cost a hub with
    // 10,000 nodes over a gigabyte for idle sessions. Buffers still grow for large messages.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

fn decode(buf: &[u8]) -> Result<Message, LinkEnd> {
    Message::decode(buf).map_err(|e| LinkEnd::Garbage(e.to_string()))
}

/// A link over a WebSocket. Binary frames carry protobuf messages; text frames carry JSON
/// messages (handy with a debugging client).
pub fn websocket<S>(ws: WebSocketStream<S>, remote: SocketAddr) -> Link
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (in_tx, in_rx) = mpsc::channel(WRITE_QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    tokio::spawn(async move {
        let end = loop {
            let item = match stream.next().await {
                None => break LinkEnd::Closed,
                Some(Ok(tungstenite::Message::Binary(b))) => decode(&b),
                Some(Ok(tungstenite::Message::Text(t))) => serde_json::from_str::<Message>(&t)
                    .map_err(|e| LinkEnd::Garbage(format!("JSON message: {e}"))),
                Some(Ok(tungstenite::Message::Close(_))) => break LinkEnd::Closed,
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    break LinkEnd::Oversize(e.to_string());
                }
                Some(Err(e)) => break LinkEnd::Error(e.to_string()),
            };
            match item {
                Ok(m) => {
                    if in_tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                Err(e) => break e,
            }
        };
        let _ = in_tx.send(Err(end)).await;
    });
    tokio::spawn(async move {
        // Queue everything already waiting, then flush once: one write for a burst.
        while let Some(b) = out_rx.recv().await {
            if sink.feed(tungstenite::Message::Binary(b)).await.is_err() {
                return;
            }
            while let Ok(b) = out_rx.try_recv() {
                if sink.feed(tungstenite::Message::Binary(b)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    Link {
        tx: out_tx,
        rx: in_rx,
        remote,
        transport: Transport::Websocket,
    }
}

/// A link over one bidirectional QUIC stream with length-prefixed frames. One stream keeps the
/// order of messages, which per-object ordering relies on.
pub fn quic(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    max_frame: usize,
) -> Link {
    let remote = conn.remote_address();
    let (in_tx, in_rx) = mpsc::channel(WRITE_QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let reader_conn = conn.clone();
    tokio::spawn(async move {
        let end = loop {
            match frame::read_frame(&mut recv, max_frame).await {
                Ok(Some(buf)) => match decode(&buf) {
                    Ok(m) => {
                        if in_tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break e,
                },
                Ok(None) => break LinkEnd::Closed,
                Err(frame::FrameError::TooLarge { claimed, cap }) => {
                    break LinkEnd::Oversize(format!("{claimed} bytes announced, cap {cap}"));
                }
                Err(e) => break LinkEnd::Error(e.to_string()),
            }
        };
        if !matches!(end, LinkEnd::Closed) {
            reader_conn.close(1u32.into(), end.to_string().as_bytes());
        }
        let _ = in_tx.send(Err(end)).await;
    });
    tokio::spawn(async move {
        // Frames already waiting go out in one write, so QUIC packs them into full packets.
        let mut batch = Vec::new();
        while let Some(b) = out_rx.recv().await {
            batch.clear();
            frame::append_frame(&mut batch, &b);
            while batch.len() < 256 * 1024 {
                match out_rx.try_recv() {
                    Ok(b) => frame::append_frame(&mut batch, &b),
                    Err(_) => break,
                }
            }
            if send.write_all(&batch).await.is_err() {
                return;
            }
        }
        // Let the last frames (often an error reply) reach the peer before closing.
        let _ = send.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
        conn.close(0u32.into(), b"bye");
    });
    Link {
        tx: out_tx,
        rx: in_rx,
        remote,
        transport: Transport::Quic,
    }
}
