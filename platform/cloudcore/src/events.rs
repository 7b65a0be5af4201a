//! Events the nodes report, written to the API behind everything else.
//!
//! An Event (a container started, a back-off) is acknowledged to the node as soon as it is held
//! here, and written by the same background writers as the heartbeats
//! ([`crate::heartbeats`]), which give way to pod and node reports. Before, the hub handed a
//! node's messages to the handler one at a time and each Event was written first: a pod's
//! `Running` status waited behind the write of its own `Started` event.
//!
//! Events are best effort, as in Kubernetes (the kubelet drops them when its queue is full): at
//! most [`EVENTS_HELD`] wait here, and the oldest gives way to a new one (counted as dropped).
//! One held and not yet written is lost if the cloud core dies.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::Notify;

/// Events held at most; past it the oldest is dropped.
pub const EVENTS_HELD: usize = 8192;

/// An event to write: its namespace, the involved object's name, the body the node sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The namespace the Event goes to.
    pub namespace: String,
    /// The involved object's name (the Event's name is made from it).
    pub name: String,
    /// The Event as the node reported it.
    pub body: Value,
}

/// The events waiting to be written, and what became of them.
#[derive(Debug, Default)]
pub struct Events {
    queue: Mutex<VecDeque<Held>>,
    /// Woken when an event is held.
    pub wake: Notify,
    /// Events written to the API.
    pub written: AtomicU64,
    /// Events dropped unwritten: the queue was full, or the API refused them.
    pub dropped: AtomicU64,
}

impl Events {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `e` for writing; with [`EVENTS_HELD`] held already, the oldest is dropped.
    pub fn offer(&self, e: Held) {
        let mut q = self.queue();
        if q.len() >= EVENTS_HELD {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
        drop(q);
        self.wake.notify_one();
    }

    /// Puts back an event whose write failed for now, to be written after those held.
    pub fn retry(&self, e: Held) {
        self.offer(e);
    }

    /// The oldest event held.
    pub fn take(&self) -> Option<Held> {
        self.queue().pop_front()
    }

    /// Events held now.
    pub fn pending(&self) -> usize {
        self.queue().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn held(i: usize) -> Held {
        Held {
            namespace: "default".into(),
            name: format!("p{i}"),
            body: json!({"reason": "Started", "n": i}),
        }
    }

    #[test]
    fn events_are_written_in_order_and_a_flood_drops_the_oldest_not_memory() {
        let e = Events::default();
        assert_eq!(e.take(), None);
        for i in 0..EVENTS_HELD + 5 {
            e.offer(held(i));
        }
        assert_eq!(e.pending(), EVENTS_HELD, "bounded");
        assert_eq!(e.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(e.take(), Some(held(5)), "the five oldest went");
        assert_eq!(e.take(), Some(held(6)));
        // A failed write goes to the back of the line.
        e.retry(held(5));
        assert_eq!(e.pending(), EVENTS_HELD - 1);
        let mut last = None;
        while let Some(h) = e.take() {
            last = Some(h);
        }
        assert_eq!(last, Some(held(5)));
        assert_eq!(e.pending(), 0);
    }
}
