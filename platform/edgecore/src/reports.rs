//! Reports on their way upstream: what edged and the edge modules hand over, drained by one task
//! into the edge hub's durable outbox (SQLite, off the producers' path).
//!
//! Bounded at [`CAPACITY`] entries with the outbox's own rules: a `LatestWins` report replaces a
//! waiting one for the same object (only the newest status matters), and when full the oldest
//! `Append` entry (an event) goes first, then the oldest of any kind; each drop is counted
//! ([`ReportQueue::dropped`], `sedge_edge_reports_dropped_total`) and logged. Producers never
//! wait, so a slow disk cannot stall a pod's task.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sedge_tunnel::{Message, Policy};

/// Reports waiting for the outbox at most.
pub const CAPACITY: usize = 4096;

/// The queue between the producers and the outbox.
#[derive(Debug)]
pub struct ReportQueue {
    items: Mutex<VecDeque<(Message, Policy)>>,
    ready: tokio::sync::Notify,
    dropped: AtomicU64,
    capacity: usize,
}

impl Default for ReportQueue {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl ReportQueue {
    /// A queue of at most `capacity` reports.
    pub fn with_capacity(capacity: usize) -> Self {
        ReportQueue {
            items: Mutex::new(VecDeque::new()),
            ready: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    /// Queues a report; never waits.
    pub fn send(&self, (msg, policy): (Message, Policy)) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if policy == Policy::LatestWins {
            items.retain(|(m, p)| {
                !(*p == Policy::LatestWins && m.route.resource == msg.route.resource)
            });
        }
        if items.len() >= self.capacity {
            let at = items
                .iter()
                .position(|(_, p)| *p == Policy::Append)
                .unwrap_or(0);
            items.remove(at);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    capacity = self.capacity,
                    "reports waiting for the outbox are full: dropped the oldest"
                );
            }
        }
        items.push_back((msg, policy));
        drop(items);
        self.ready.notify_one();
    }

    /// The oldest report, waiting for one.
    pub async fn recv(&self) -> (Message, Policy) {
        loop {
            if let Some(x) = self
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return x;
            }
            self.ready.notified().await;
        }
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reports dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(resource: &str, body: &str) -> Message {
        Message::new("cloud", "update", resource, body.to_string())
    }

    fn body(m: &Message) -> String {
        String::from_utf8_lossy(&m.content).into_owned()
    }

    #[tokio::test]
    async fn latest_wins_coalesces_and_a_full_queue_drops_events_first() {
        let q = ReportQueue::with_capacity(3);
        q.send((msg("ns/pod/a", "a1"), Policy::LatestWins));
        q.send((msg("ns/event/e", "e1"), Policy::Append));
        q.send((msg("ns/pod/a", "a2"), Policy::LatestWins));
        // a1 was replaced by a2, which goes to the back.
        assert_eq!(q.len(), 2);
        q.send((msg("ns/pod/b", "b1"), Policy::LatestWins));
        // Full: the event goes first, the statuses stay.
        q.send((msg("ns/pod/c", "c1"), Policy::LatestWins));
        assert_eq!((q.len(), q.dropped()), (3, 1));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(body(&q.recv().await.0));
        }
        assert_eq!(got, ["a2", "b1", "c1"]);
        // No events left: the oldest of any kind goes.
        for b in ["x1", "x2", "x3", "x4"] {
            q.send((msg(&format!("ns/pod/{b}"), b), Policy::LatestWins));
        }
        assert_eq!((q.len(), q.dropped()), (3, 2));
        assert_eq!(body(&q.recv().await.0), "x2");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let q = std::sync::Arc::new(ReportQueue::default());
        let r = q.clone();
        let t = tokio::spawn(async move { body(&r.recv().await.0) });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        q.send((msg("ns/pod/a", "late"), Policy::Append));
        assert_eq!(t.await.unwrap(), "late");
    }
}
