//! Watch streams: newline-delimited JSON events from a resourceVersion, with no gaps and no
//! duplicates.
//!
//! A watcher subscribes to the store's broadcast *before* reading anything, then replays from the
//! history table, then follows the broadcast, skipping revisions it has already sent. A watcher
//! that falls behind the broadcast buffer re-reads the history; one whose position has been
//! compacted away gets an `ERROR` event carrying `410 Expired`, as kube-apiserver sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::ops::{self, Core, ListOpts};
use crate::registry::ResourceType;
use crate::store::{Event, EventType, StoreError};
use crate::table::{self, IncludeObject};

tokio::task_local! {
    /// Set by the server around each connection it serves: notified, the connection is dropped.
    /// An HTTP/1 watch whose client does not read uses it (its connection is stuck writing, so
    /// the body's end is never polled); HTTP/2 streams are reset through the body instead.
    pub static CONN_ABORT: Arc<tokio::sync::Notify>;
}

/// Everything a watch request asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The resource.
    pub rt: Arc<ResourceType>,
    /// Version to present objects in.
    pub version: String,
    /// Namespace, or all.
    pub namespace: Option<String>,
    /// Selectors.
    pub opts: ListOpts,
    /// Start after this revision; `None` (or "0") starts with the current state as ADDED events.
    pub resource_version: Option<i64>,
    /// `sendInitialEvents=true`: initial state, then a BOOKMARK marking its end.
    pub send_initial_events: bool,
    /// Send BOOKMARK events.
    pub bookmarks: bool,
    /// Interval between bookmarks.
    pub bookmark_interval: Duration,
    /// End the stream after this long.
    pub timeout: Duration,
    /// Render objects as Table rows (`kubectl get -w`).
    pub table: Option<IncludeObject>,
    /// Send each object's metadata only (`as=PartialObjectMetadata`), as a controller that
    /// only follows owner references asks.
    pub partial: bool,
    /// How long a watcher at its byte budget waits for the client to read before it is closed.
    pub slow_grace: Duration,
}

/// Events read from the history at a time (a lagging watcher holds at most one batch).
const REPLAY_BATCH: usize = 256;
/// Objects of the initial state read from the store at a time.
const INITIAL_PAGE: usize = 1000;
const CHANNEL_BOUND: usize = 256;

/// Bytes one watcher may have queued for its client, and all watchers together. A watcher at
/// either bound waits for its client to read; one whose client has not made room within the
/// request's `slow_grace` is closed (its memory freed at once), as kube-apiserver closes
/// unresponsive watchers, and a client-go client watches again from its last resourceVersion.
/// So 2,000 watchers that never read hold at most [`WATCH_BYTES_TOTAL`].
pub const WATCH_BYTES_PER_WATCHER: usize = 8 * 1024 * 1024;
/// See [`WATCH_BYTES_PER_WATCHER`].
pub const WATCH_BYTES_TOTAL: usize = 256 * 1024 * 1024;

/// The bytes all watchers have queued and not yet handed to their connections.
#[derive(Debug, Default)]
pub struct WatchBudget {
    queued: AtomicUsize,
    /// Watchers closed for not reading.
    pub closed_slow: AtomicU64,
}

/// One watcher's share of the budget.
struct Queued {
    total: Arc<WatchBudget>,
    mine: AtomicUsize,
    slow: tokio::sync::Notify,
    drained: tokio::sync::Notify,
    /// The watcher is waiting for room (so `give` need not touch `drained` otherwise).
    waiting: AtomicBool,
    /// Closed for not reading.
    too_slow: AtomicBool,
}

impl WatchBudget {
    /// Bytes queued by all watchers now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl Queued {
    fn take(&self, n: usize) -> bool {
        use Ordering::AcqRel;
        let mine = self.mine.fetch_add(n, AcqRel) + n;
        let total = self.total.queued.fetch_add(n, AcqRel) + n;
        if mine > WATCH_BYTES_PER_WATCHER || total > WATCH_BYTES_TOTAL {
            // Back out without waking anyone: nothing was drained.
            self.mine.fetch_sub(n, AcqRel);
            self.total.queued.fetch_sub(n, AcqRel);
            return false;
        }
        true
    }

    /// Whether one more event may be built: this watcher and all of them under their bounds.
    fn has_room(&self) -> bool {
        self.mine.load(Ordering::Acquire) < WATCH_BYTES_PER_WATCHER
            && self.total.queued.load(Ordering::Acquire) < WATCH_BYTES_TOTAL
    }

    fn give(&self, n: usize) {
        use Ordering::AcqRel;
        self.mine.fetch_sub(n, AcqRel);
        self.total.queued.fetch_sub(n, AcqRel);
        if self.waiting.load(Ordering::Acquire) {
            self.drained.notify_one();
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Whatever was still queued when the stream was dropped goes back.
        let left = self.mine.load(Ordering::Acquire);
        self.total.queued.fetch_sub(left, Ordering::AcqRel);
    }
}

/// Starts a watch; the response streams until timeout, shutdown, client disconnect, or the
/// client falling behind by more than the [`WatchBudget`] allows.
pub fn start(
    core: Arc<Core>,
    req: WatchRequest,
    budget: Arc<WatchBudget>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    on_end: impl FnOnce() + Send + 'static,
) -> ApiResult<Response> {
    if let Some(rv) = req.resource_version
        && rv < core.store.compacted_rev()
        && !req.send_initial_events
    {
        // Still a 200 with an ERROR event, as clients expect from a watch.
        let status = ApiError::Expired(format!(
            "too old resource version: {rv} ({})",
            core.store.compacted_rev()
        ))
        .status();
        let line =
            serde_json::to_vec(&json!({"type": "ERROR", "object": status})).unwrap_or_default();
        on_end();
        return Ok(stream_response(Body::from([line, b"\n".to_vec()].concat())));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_BOUND);
    let broadcast = core.store.subscribe();
    let queued = Arc::new(Queued {
        total: budget,
        mine: Default::default(),
        slow: tokio::sync::Notify::new(),
        drained: tokio::sync::Notify::new(),
        waiting: Default::default(),
        too_slow: Default::default(),
    });
    let q = queued.clone();
    let conn_abort = CONN_ABORT.try_with(Arc::clone).ok();
    tokio::spawn(async move {
        let mut w = Watcher {
            core,
            req,
            tx,
            sent_header: false,
            queued: q,
        };
        let result = tokio::select! {
            r = w.run(broadcast) => r,
            _ = shutdown.changed() => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "watch ended with an error");
            if matches!(e, Stop::TooSlow)
                && let Some(a) = conn_abort
            {
                a.notify_one();
            }
        }
        on_end();
    });
    // The stream gives bytes back as the connection takes them. When the watcher is closed as
    // too slow it ends with an error, so the connection itself is dropped (an HTTP/1 connection
    // closed, an HTTP/2 stream reset) and everything queued on it is freed at once, instead of
    // waiting on a client that does not read for the last chunk.
    let slow = queued.clone();
    let ended_slow = queued.clone();
    let events = ReceiverStream::new(rx).map(move |b| {
        queued.give(b.len());
        Ok::<_, std::io::Error>(b)
    });
    let events = futures::StreamExt::take_until(events, async move { slow.slow.notified().await });
    let abort = futures::stream::once(async move {
        ended_slow.too_slow.load(Ordering::Acquire).then(|| {
            Err(std::io::Error::other(
                "watch closed: the client is not reading",
            ))
        })
    });
    let abort = futures::StreamExt::filter_map(abort, std::future::ready);
    let body = Body::from_stream(futures::StreamExt::chain(events, abort));
    Ok(stream_response(body))
}

fn stream_response(body: Body) -> Response {
    Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(body)
        .expect("static headers")
}

struct Watcher {
    core: Arc<Core>,
    req: WatchRequest,
    tx: mpsc::Sender<Bytes>,
    sent_header: bool,
    queued: Arc<Queued>,
}

#[derive(Debug)]
enum Stop {
    ClientGone,
    TooSlow,
    Store(StoreError),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::ClientGone => write!(f, "client went away"),
            Stop::TooSlow => write!(f, "client too slow: its queued events passed the budget"),
            Stop::Store(e) => write!(f, "{e}"),
        }
    }
}

impl Watcher {
    fn present(&mut self, obj: Value) -> Value {
        let obj = ops::present(&self.req.rt, &self.req.version, obj);
        match self.req.table {
            None if self.req.partial => ops::partial_metadata(obj),
            None => obj,
            Some(include) => {
                let rv = obj["metadata"]["resourceVersion"].clone();
                let headers = !self.sent_header;
                self.sent_header = true;
                table::render(
                    &self.req.rt,
                    vec![obj],
                    json!({"resourceVersion": rv}),
                    include,
                    headers,
                )
            }
        }
    }

    /// Waits until `fits` says the queue has room (this client reading, or any watcher for the
    /// shared bound), at most the slow grace; past it the watch is closed as too slow.
    async fn wait_room(&self, fits: impl Fn(&Queued) -> bool) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + self.req.slow_grace;
        while !fits(&self.queued) {
            if tokio::time::Instant::now() >= deadline {
                self.queued
                    .total
                    .closed_slow
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(resource = %self.req.rt.qualified(), "closing a watch whose client is not reading");
                self.queued.too_slow.store(true, Ordering::Release);
                self.queued.slow.notify_one();
                return Err(Stop::TooSlow);
            }
            self.queued.waiting.store(true, Ordering::Release);
            tokio::select! {
                _ = self.queued.drained.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            self.queued.waiting.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Waits for room *before* anything is built: a watcher whose client does not read holds no
    /// encoded event while it waits.
    async fn before_encoding(&self) -> Result<(), Stop> {
        self.wait_room(Queued::has_room).await
    }

    /// Queues `parts` as one event line.
    async fn queue(&self, parts: &[Bytes]) -> Result<(), Stop> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        self.wait_room(|q| q.take(len)).await?;
        let mut sent = 0;
        for p in parts {
            if self.tx.send(p.clone()).await.is_err() {
                // What was not handed over goes back; what was is the stream's to give back.
                self.queued.give(len - sent);
                return Err(Stop::ClientGone);
            }
            sent += p.len();
        }
        Ok(())
    }

    async fn send(&self, v: Value) -> Result<(), Stop> {
        self.before_encoding().await?;
        self.encode_and_queue(v).await
    }

    /// Encodes `v` as one line and queues it (room was waited for before it was built).
    async fn encode_and_queue(&self, v: Value) -> Result<(), Stop> {
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        drop(v);
        line.push(b'\n');
        self.queue(&[Bytes::from(line)]).await
    }

    /// Sends `obj` as an event of `kind`, presented for this watcher (it is not copied again:
    /// `json!` would, and the initial events of a 100,000-pod list are all sent this way).
    async fn send_event(&mut self, kind: &str, obj: Value) -> Result<(), Stop> {
        self.before_encoding().await?;
        let object = self.present(obj);
        self.encode_and_queue(ops::object([("type", json!(kind)), ("object", object)]))
            .await
    }

    /// A change from the store: its object is encoded once for every watcher presenting it in
    /// the same version (a table watcher renders its own rows).
    async fn send_change(&mut self, kind: &str, ev: &Event) -> Result<(), Stop> {
        if self.req.table.is_some() {
            return self.send_event(kind, (*ev.object).clone()).await;
        }
        if self.req.partial {
            // Only the metadata goes out: copy that, not the whole object (three controllers
            // follow every pod this way).
            let meta = ops::object([("metadata", ev.object["metadata"].clone())]);
            return self.send_event(kind, meta).await;
        }
        self.before_encoding().await?;
        let encoded = match ev.encoded.get() {
            Some((v, b)) if *v == self.req.version => b.clone(),
            _ => {
                let obj = ops::present(&self.req.rt, &self.req.version, (*ev.object).clone());
                let b = Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
                // The first version asked for is the one shared; others encode their own.
                let _ = ev.encoded.set((self.req.version.clone(), b.clone()));
                b
            }
        };
        let head = Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":"));
        self.queue(&[head, encoded, Bytes::from_static(b"}\n")])
            .await
    }

    async fn bookmark(&self, rev: i64, initial_end: bool) -> Result<(), Stop> {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.req.rt.kind, "apiVersion": self.req.rt.api_version(&self.req.version), "metadata": meta});
        self.send(json!({"type": "BOOKMARK", "object": obj})).await
    }

    async fn expired(&self, e: StoreError) -> Result<(), Stop> {
        let status = ApiError::from(e).status();
        self.send(json!({"type": "ERROR", "object": status})).await
    }

    fn in_scope(&self, ev: &Event) -> bool {
        ev.resource == self.req.rt.storage_key()
            && self
                .req
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == ev.namespace)
    }

    /// Sends what a change means for this watcher's selectors.
    async fn deliver(&mut self, ev: &Event) -> Result<(), Stop> {
        if !self.in_scope(ev) {
            return Ok(());
        }
        let now = self.req.opts.matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(|p| self.req.opts.matches(p));
        let kind = match ev.kind {
            EventType::Added if now => "ADDED",
            EventType::Modified if now && before => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            EventType::Deleted if before || now => "DELETED",
            _ => return Ok(()),
        };
        self.send_change(kind, ev).await
    }

    async fn replay(&mut self, after: i64) -> Result<i64, Stop> {
        let mut last = after;
        loop {
            let core = self.core.clone();
            let key = self.req.rt.storage_key();
            let events = tokio::task::spawn_blocking(move || {
                core.store.events_since(Some(&key), last, REPLAY_BATCH)
            })
            .await
            .map_err(|e| {
                Stop::Store(StoreError::Corrupt {
                    key: "replay".into(),
                    source: serde_json::Error::io(std::io::Error::other(e.to_string())),
                })
            })?
            .map_err(Stop::Store)?;
            let n = events.len();
            for ev in events {
                last = ev.rev;
                self.deliver(&ev).await?;
            }
            if n < REPLAY_BATCH {
                return Ok(last);
            }
        }
    }

    /// Reads one page of the initial state on the blocking pool.
    fn list_page(&self, opts: ListOpts) -> tokio::task::JoinHandle<ApiResult<ops::Listed>> {
        let core = self.core.clone();
        let rt = self.req.rt.clone();
        let version = self.req.version.clone();
        let ns = self.req.namespace.clone();
        tokio::task::spawn_blocking(move || ops::list(&core, &rt, &version, ns.as_deref(), &opts))
    }

    async fn run(&mut self, mut rx: broadcast::Receiver<Arc<Event>>) -> Result<(), Stop> {
        let initial =
            self.req.send_initial_events || self.req.resource_version.is_none_or(|rv| rv == 0);
        let mut last = if initial {
            // The initial state in pages at one revision, the next page read while this one is
            // sent: the client parses while the store reads, and memory holds two pages, not
            // every object (a reflector's streaming list of 100,000 pods).
            let mut opts = self.req.opts.clone();
            opts.limit = Some(INITIAL_PAGE);
            opts.continue_token = None;
            opts.resource_version = None;
            let mut next = Some(self.list_page(opts.clone()));
            let mut rev = 0;
            while let Some(page) = next.take() {
                let listed = match page.await.map_err(|_| Stop::ClientGone)? {
                    Ok(l) => l,
                    Err(e) => {
                        self.send(json!({"type": "ERROR", "object": e.status()}))
                            .await?;
                        return Ok(());
                    }
                };
                rev = listed.rev;
                if let Some(token) = listed.continue_token {
                    opts.continue_token = Some(token);
                    next = Some(self.list_page(opts.clone()));
                }
                for obj in listed.items {
                    self.send_event("ADDED", obj).await?;
                }
            }
            if self.req.send_initial_events {
                self.bookmark(rev, true).await?;
            }
            rev
        } else {
            self.req.resource_version.unwrap_or(0)
        };
        last = match self.replay(last).await {
            Ok(l) => l,
            Err(Stop::Store(e @ StoreError::Compacted { .. })) => return self.expired(e).await,
            Err(e) => return Err(e),
        };
        let deadline = tokio::time::sleep(self.req.timeout);
        tokio::pin!(deadline);
        let mut ticker =
            tokio::time::interval(self.req.bookmark_interval.max(Duration::from_millis(100)));
        ticker.tick().await;
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) => {
                        if ev.rev <= last {
                            continue;
                        }
                        last = ev.rev;
                        self.deliver(&ev).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        last = match self.replay(last).await {
                            Ok(l) => l,
                            Err(Stop::Store(e @ StoreError::Compacted { .. })) => return self.expired(e).await,
                            Err(e) => return Err(e),
                        };
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = ticker.tick(), if self.req.bookmarks => self.bookmark(last, false).await?,
                _ = &mut deadline => return Ok(()),
                _ = self.tx.closed() => return Err(Stop::ClientGone),
            }
        }
    }
}
