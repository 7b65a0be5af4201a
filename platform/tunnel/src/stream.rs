//! Byte streams multiplexed over a node's one session: what `kubectl exec` and friends ride on.
//!
//! A stream is opened by a request (the layer above says what for) and then carries frames both
//! ways as unacknowledged messages of group [`GROUP`], in order (a session delivers in order and
//! hands messages to its handler one at a time). Frames keep their boundaries: the layer above
//! may give each a meaning of its own, as exec's channel byte does.
//!
//! **Back-pressure** is per stream, by credit: each side may have at most [`WINDOW`] bytes in
//! flight that the other side has not yet taken off its buffer; the reader grants more as it
//! consumes. So the session's handler never waits on a stream (a frame always fits its buffer)
//! and a slow consumer stalls only its own stream, never the node's other traffic. A peer that
//! sends past its credit is cut off.
//!
//! A stream ends when either side closes it (with an optional error), when the link drops
//! ([`Streams::close_peer`]), or when its [`Stream`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc};

use crate::TunnelError;
use crate::message::Message;

/// The route group of stream messages.
pub const GROUP: &str = "stream";

/// Stream operations (the open itself is a request of the layer above, whose reply says
/// whether the peer accepted).
pub mod op {
    /// Opens a stream: a request; content is what the layer above needs to know.
    pub const OPEN: &str = "open";
    /// A frame of data.
    pub const DATA: &str = "data";
    /// Credit: the receiver took this many bytes (decimal text) off its buffer.
    pub const CREDIT: &str = "credit";
    /// The sender closes the stream; content, when not empty, is the reason it failed.
    pub const CLOSE: &str = "close";
}

/// Bytes a side may have in flight, unread by the other side, per stream.
pub const WINDOW: usize = 1024 * 1024;

/// The largest frame (callers split their data into frames this size or smaller).
pub const MAX_FRAME: usize = 64 * 1024;

/// How a frame goes to the peer: the session's unacknowledged, in-order send.
pub type Sender = Arc<dyn Fn(Message) -> BoxFuture<'static, Result<(), TunnelError>> + Send + Sync>;

/// What a stream's reader gets.
#[derive(Debug)]
enum Event {
    Data(Bytes),
    Closed(Option<String>),
}

struct Entry {
    peer: String,
    tx: mpsc::UnboundedSender<Event>,
    /// Bytes received and not yet taken by the reader.
    buffered: Arc<AtomicUsize>,
    credit: Arc<Credit>,
}

/// What a writer may still send.
#[derive(Default)]
struct Credit {
    avail: Mutex<usize>,
    notify: Notify,
    closed: AtomicBool,
}

impl Credit {
    fn new() -> Credit {
        Credit {
            avail: Mutex::new(WINDOW),
            ..Default::default()
        }
    }
    fn add(&self, n: usize) {
        let mut a = self.avail.lock().unwrap_or_else(|p| p.into_inner());
        *a = (*a + n).min(WINDOW);
        self.notify.notify_waiters();
    }
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    /// Waits until `n` bytes may go; false once the stream is closed.
    async fn take(&self, n: usize) -> bool {
        loop {
            let wait = self.notify.notified();
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            {
                let mut a = self.avail.lock().unwrap_or_else(|p| p.into_inner());
                if *a >= n {
                    *a -= n;
                    return true;
                }
            }
            wait.await;
        }
    }
}

/// The open streams of one side (the cloud core's, over all nodes, or an edge agent's).
#[derive(Clone, Default)]
pub struct Streams {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("open", &self.lock().len())
            .finish()
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers stream `id` with `peer` (a node on the cloud, the cloud on the edge). On the
    /// opening side, register before sending the open request; on the accepting side, register
    /// while handling it, so no frame that follows the open is missed. `None` if `id` is taken.
    pub fn register(&self, id: &str, peer: &str, send: Sender) -> Option<Stream> {
        let mut m = self.lock();
        if m.contains_key(id) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let credit = Arc::new(Credit::new());
        m.insert(
            id.to_string(),
            Entry {
                peer: peer.to_string(),
                tx,
                buffered: buffered.clone(),
                credit: credit.clone(),
            },
        );
        Some(Stream {
            reader: StreamReader {
                id: id.to_string(),
                rx,
                buffered,
                unreported: 0,
                send: send.clone(),
                done: false,
            },
            writer: StreamWriter {
                id: id.to_string(),
                credit,
                send,
                streams: self.clone(),
            },
        })
    }

    /// Open streams with `peer`.
    pub fn count(&self, peer: &str) -> usize {
        self.lock().values().filter(|e| e.peer == peer).count()
    }

    /// Open streams in all.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Handles a stream message from `peer`. Frames for streams that are gone are dropped (the
    /// other side learns of the close from the close it was sent). `Err` names a peer that broke
    /// the protocol; the stream concerned is closed.
    pub fn handle(&self, peer: &str, msg: &Message) -> Result<(), String> {
        let id = msg.route.resource.as_str();
        let mut m = self.lock();
        let Some(e) = m.get(id) else {
            return Ok(());
        };
        if e.peer != peer {
            return Err(format!(
                "{peer} sent a frame for stream {id:?}, which is not its own"
            ));
        }
        match msg.route.operation.as_str() {
            op::DATA => {
                let n = msg.content.len();
                if n > MAX_FRAME || e.buffered.fetch_add(n, Ordering::SeqCst) + n > WINDOW {
                    let why = format!(
                        "{peer} sent past its credit on stream {id:?} (frame of {n} bytes; at most {MAX_FRAME} per frame and {WINDOW} unread)"
                    );
                    let e = m.remove(id).expect("present");
                    let _ = e.tx.send(Event::Closed(Some(why.clone())));
                    e.credit.close();
                    return Err(why);
                }
                let _ = e.tx.send(Event::Data(msg.content.clone()));
            }
            op::CREDIT => {
                let n = std::str::from_utf8(&msg.content)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or_else(|| format!("{peer}: malformed credit on stream {id:?}"))?;
                e.credit.add(n);
            }
            op::CLOSE => {
                let e = m.remove(id).expect("present");
                let why = (!msg.content.is_empty())
                    .then(|| String::from_utf8_lossy(&msg.content).into_owned());
                let _ = e.tx.send(Event::Closed(why));
                e.credit.close();
            }
            other => return Err(format!("{peer}: unknown stream operation {other:?}")),
        }
        Ok(())
    }

    /// Ends every stream with `peer` with `reason` (the link dropped).
    pub fn close_peer(&self, peer: &str, reason: &str) {
        let mut m = self.lock();
        let gone: Vec<String> = m
            .iter()
            .filter(|(_, e)| e.peer == peer)
            .map(|(k, _)| k.clone())
            .collect();
        for id in gone {
            if let Some(e) = m.remove(&id) {
                let _ = e.tx.send(Event::Closed(Some(reason.to_string())));
                e.credit.close();
            }
        }
    }

    /// Ends every stream (the side shuts down, or the edge lost its link).
    pub fn close_all(&self, reason: &str) {
        for (_, e) in self.lock().drain() {
            let _ = e.tx.send(Event::Closed(Some(reason.to_string())));
            e.credit.close();
        }
    }

    fn forget(&self, id: &str) -> bool {
        match self.lock().remove(id) {
            Some(e) => {
                e.credit.close();
                true
            }
            None => false,
        }
    }
}

/// Both halves of an open stream.
pub struct Stream {
    /// Frames from the peer.
    pub reader: StreamReader,
    /// Frames to the peer.
    pub writer: StreamWriter,
}

/// Frames from the peer, in order.
pub struct StreamReader {
    id: String,
    rx: mpsc::UnboundedReceiver<Event>,
    buffered: Arc<AtomicUsize>,
    unreported: usize,
    send: Sender,
    done: bool,
}

impl StreamReader {
    /// The next frame; `None` when the peer closed cleanly, `Err` with the reason when it
    /// failed or the link dropped.
    pub async fn recv(&mut self) -> Option<Result<Bytes, String>> {
        if self.done {
            return None;
        }
        match self.rx.recv().await {
            Some(Event::Data(b)) => {
                self.buffered.fetch_sub(b.len(), Ordering::SeqCst);
                self.unreported += b.len();
                // Credit goes back in batches (a quarter window), not per frame.
                if self.unreported >= WINDOW / 4 {
                    let n = std::mem::take(&mut self.unreported);
                    let m = Message::new(GROUP, op::CREDIT, &self.id, n.to_string()).unacked();
                    let _ = (self.send)(m).await;
                }
                Some(Ok(b))
            }
            Some(Event::Closed(None)) | None => {
                self.done = true;
                None
            }
            Some(Event::Closed(Some(why))) => {
                self.done = true;
                Some(Err(why))
            }
        }
    }
}

/// Frames to the peer.
pub struct StreamWriter {
    id: String,
    credit: Arc<Credit>,
    send: Sender,
    streams: Streams,
}

impl StreamWriter {
    /// Sends one frame (at most [`MAX_FRAME`] bytes), waiting for credit first. Fails once the
    /// stream is closed or the link is down.
    pub async fn send(&self, frame: Bytes) -> Result<(), String> {
        if frame.len() > MAX_FRAME {
            return Err(format!(
                "a frame of {} bytes is above the {MAX_FRAME}-byte limit",
                frame.len()
            ));
        }
        if !self.credit.take(frame.len()).await {
            return Err("the stream is closed".into());
        }
        let m = Message::new(GROUP, op::DATA, &self.id, frame).unacked();
        (self.send)(m).await.map_err(|e| e.to_string())
    }

    /// Closes the stream for both sides, telling the peer why when `error` is set. Closing
    /// twice, or a stream the peer closed already, does nothing.
    pub async fn close(&self, error: Option<&str>) {
        if self.streams.forget(&self.id) {
            let m = Message::new(
                GROUP,
                op::CLOSE,
                &self.id,
                error.unwrap_or_default().to_string(),
            )
            .unacked();
            let _ = (self.send)(m).await;
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        // A stream dropped without a close still tells the peer (best effort, in order).
        if self.streams.forget(&self.id) {
            let m = Message::new(GROUP, op::CLOSE, &self.id, "closed").unacked();
            let send = self.send.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = send(m).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sides joined by in-memory senders that feed each other's `handle`, in order.
    fn pair() -> (Streams, Streams, Stream, Stream) {
        let (a, b) = (Streams::default(), Streams::default());
        let to = |dst: Streams, from: &'static str| -> Sender {
            Arc::new(move |m: Message| {
                let dst = dst.clone();
                Box::pin(async move {
                    let _ = dst.handle(from, &m);
                    Ok(())
                })
            })
        };
        let sa = a.register("s1", "b", to(b.clone(), "a")).unwrap();
        let sb = b.register("s1", "a", to(a.clone(), "b")).unwrap();
        (a, b, sa, sb)
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_a_close_ends_the_reader() {
        let (_a, b, sa, mut sb) = pair();
        for i in 0..10u8 {
            sa.writer.send(Bytes::from(vec![i; 100])).await.unwrap();
        }
        sa.writer.close(None).await;
        for i in 0..10u8 {
            assert_eq!(sb.reader.recv().await.unwrap().unwrap()[0], i);
        }
        assert!(sb.reader.recv().await.is_none());
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn a_writer_waits_for_credit_and_resumes_when_the_reader_consumes() {
        let (_a, _b, sa, mut sb) = pair();
        let frame = Bytes::from(vec![7u8; MAX_FRAME]);
        for _ in 0..WINDOW / MAX_FRAME {
            sa.writer.send(frame.clone()).await.unwrap();
        }
        // The window is full: the next frame waits.
        let writer = sa.writer;
        let blocked = tokio::spawn({
            let frame = frame.clone();
            async move {
                writer.send(frame).await.unwrap();
                writer
            }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        // Reading a quarter window returns credit.
        for _ in 0..WINDOW / 4 / MAX_FRAME {
            sb.reader.recv().await.unwrap().unwrap();
        }
        let _writer = tokio::time::timeout(std::time::Duration::from_secs(5), blocked)
            .await
            .expect("credit came back")
            .unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_sends_past_its_credit_or_into_another_peers_stream_is_cut_off() {
        let b = Streams::default();
        let noop: Sender = Arc::new(|_| Box::pin(async { Ok(()) }));
        let mut s = b.register("s1", "node-a", noop).unwrap();
        let frame = |n: usize| Message::new(GROUP, op::DATA, "s1", vec![0u8; n]);
        let e = b.handle("node-b", &frame(10)).unwrap_err();
        assert!(e.contains("not its own"), "{e}");
        let e = b.handle("node-a", &frame(MAX_FRAME + 1)).unwrap_err();
        assert!(e.contains("past its credit"), "{e}");
        assert!(s.reader.recv().await.unwrap().is_err());
        assert!(b.is_empty());
        assert!(s.writer.send(Bytes::from_static(b"x")).await.is_err());
    }

    #[tokio::test]
    async fn a_dropped_link_ends_its_streams_with_the_reason() {
        let (a, _b, mut sa, _sb) = pair();
        a.close_peer("b", "node b disconnected");
        assert_eq!(
            sa.reader.recv().await.unwrap().unwrap_err(),
            "node b disconnected"
        );
        assert!(sa.writer.send(Bytes::from_static(b"x")).await.is_err());
    }
}
