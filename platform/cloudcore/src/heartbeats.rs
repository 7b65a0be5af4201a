//! Node heartbeats (Lease renewals and node status) on their own lane.
//!
//! A heartbeat is acknowledged to the node as soon as it is held here, and written to the API by
//! a pool of writers of its own. Each carries the node's whole state, so only the newest per
//! (node, kind) is kept: one that arrives while an older one waits replaces it (counted as
//! replaced), and under a backlog the API gets one write per node per turn, in the order the
//! nodes first had one waiting, instead of every heartbeat sent meanwhile.
//!
//! Why a lane: the hub hands a node's messages to the handler one at a time. When the handler
//! wrote heartbeats itself, a node's pod status report waited behind its own heartbeats for the
//! same 64 write slots that every node's heartbeats queued for; with 2,000 nodes renewing every
//! 2 s (more than the API wrote) pods took 37 s from bound to Running (p50), measured. Now
//! heartbeats never hold a session up, and other reports have the 64 slots to themselves.
//!
//! Heartbeats also give way. While a write a user waits for (a pod or node report, a binding)
//! is in flight or waiting ([`Heartbeats::urgent`]), only a few heartbeats and events are written
//! at once, not 32, since they share the API server's CPU; unless the heartbeat first in line has
//! waited 15 s, when another cloud core, which judges the node by its Lease alone, would soon
//! see it late.
//!
//! The cost: a heartbeat acknowledged and not yet written is lost if the cloud core dies. The
//! node's next one (10 s for Leases, 60 s for status, by default) carries the same state again.
//!
//! A heartbeat held is proof of life even before it is written: the lane keeps when each node's
//! newest one arrived ([`Heartbeats::heard`]), and the node lifecycle counts that as well as the
//! Lease. At 10,000 nodes renewing every 10 s the API wrote 536 to 661 heartbeats a second, so
//! about 11,000 waited here and Leases aged past the 40 s grace: up to 123 connected nodes,
//! heard from seconds earlier, were marked `Ready=Unknown` (measured).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio::sync::Notify;

/// (node, kind): `nodestatus` or `lease`.
pub type BeatKey = (String, String);

#[derive(Debug, Default)]
struct Slot {
    /// The newest heartbeat not yet taken by a writer.
    waiting: Option<Value>,
    /// A writer is writing an older one now (never two at once for a key: the older could land
    /// last).
    busy: bool,
}

#[derive(Debug, Default)]
struct Lane {
    slots: HashMap<BeatKey, Slot>,
    /// Keys with a heartbeat waiting and no writer on them, oldest first, with when each
    /// became ready.
    ready: VecDeque<(BeatKey, Instant)>,
    /// When each node's newest heartbeat (of either kind) arrived here. One entry per node that
    /// ever sent one to this core, as a session's node name is authenticated.
    heard: HashMap<String, Timestamp>,
}

/// The heartbeats waiting to be written, and what became of them.
#[derive(Debug, Default)]
pub struct Heartbeats {
    lane: Mutex<Lane>,
    /// Woken when a heartbeat becomes ready to write.
    pub wake: Notify,
    /// Heartbeats written to the API.
    pub written: AtomicU64,
    /// Heartbeats dropped unwritten because a newer one from the same node arrived meanwhile.
    pub replaced: AtomicU64,
    /// Writes the API refused or failed (a transient failure is tried again).
    pub failed: AtomicU64,
    /// Writes a user waits for (pod and node reports, bindings) in flight or waiting for a
    /// slot: while there are any, heartbeats give way.
    urgent: AtomicUsize,
}

/// Counts an urgent write while it lives ([`Heartbeats::urgent`]).
#[derive(Debug)]
pub struct Urgent(Arc<Heartbeats>);

impl Drop for Urgent {
    fn drop(&mut self) {
        self.0.urgent.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Heartbeats {
    fn lane(&self) -> std::sync::MutexGuard<'_, Lane> {
        self.lane.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `body`, the newest heartbeat of `kind` from `node`, for writing.
    pub fn offer(&self, node: &str, kind: &str, body: Value) {
        self.offer_at(node, kind, body, Timestamp::now());
    }

    /// [`Heartbeats::offer`], arrived at `at`.
    fn offer_at(&self, node: &str, kind: &str, body: Value, at: Timestamp) {
        let key = (node.to_string(), kind.to_string());
        let mut lane = self.lane();
        match lane.heard.get_mut(node) {
            Some(t) => *t = at.max(*t),
            None => {
                lane.heard.insert(node.to_string(), at);
            }
        }
        let slot = lane.slots.entry(key.clone()).or_default();
        let was_waiting = slot.waiting.replace(body).is_some();
        let busy = slot.busy;
        if was_waiting {
            self.replaced.fetch_add(1, Ordering::Relaxed);
        } else if !busy {
            lane.ready.push_back((key, Instant::now()));
        }
        drop(lane);
        if !was_waiting && !busy {
            self.wake.notify_one();
        }
    }

    /// Puts a heartbeat whose write failed back, unless a newer one arrived meanwhile; the key
    /// stays busy until [`Heartbeats::done`].
    pub fn retry(&self, key: &BeatKey, body: Value) {
        let mut lane = self.lane();
        if let Some(slot) = lane.slots.get_mut(key)
            && slot.waiting.is_none()
        {
            slot.waiting = Some(body);
        }
    }

    /// The oldest heartbeat ready to write; its key is busy until [`Heartbeats::done`].
    pub fn take(&self) -> Option<(BeatKey, Value)> {
        let mut lane = self.lane();
        while let Some((key, _)) = lane.ready.pop_front() {
            if let Some(slot) = lane.slots.get_mut(&key)
                && let Some(body) = slot.waiting.take()
            {
                slot.busy = true;
                return Some((key, body));
            }
        }
        None
    }

    /// The write of `key`'s heartbeat ended: a newer one that arrived meanwhile becomes ready.
    pub fn done(&self, key: &BeatKey) {
        let mut lane = self.lane();
        let Some(slot) = lane.slots.get_mut(key) else {
            return;
        };
        slot.busy = false;
        if slot.waiting.is_some() {
            lane.ready.push_back((key.clone(), Instant::now()));
            drop(lane);
            self.wake.notify_one();
        } else {
            lane.slots.remove(key);
        }
    }

    /// Nodes' heartbeats waiting or being written now.
    pub fn pending(&self) -> usize {
        self.lane().slots.len()
    }

    /// Counts a write a user waits for until the guard is dropped.
    pub fn urgent(self: &Arc<Self>) -> Urgent {
        self.urgent.fetch_add(1, Ordering::Relaxed);
        Urgent(self.clone())
    }

    /// Urgent writes in flight or waiting now.
    pub fn urgent_writes(&self) -> usize {
        self.urgent.load(Ordering::Relaxed)
    }

    /// How long the heartbeat first in line has waited for a writer at `now` (`None`: none
    /// waits).
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        let lane = self.lane();
        lane.ready
            .front()
            .map(|(_, since)| now.saturating_duration_since(*since))
    }

    /// When `node`'s newest heartbeat reached this core, written to the API or not (`None`: it
    /// sent none here since this core started).
    pub fn heard(&self, node: &str) -> Option<Timestamp> {
        self.lane().heard.get(node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: &str, k: &str) -> BeatKey {
        (n.to_string(), k.to_string())
    }

    #[test]
    fn the_newest_heartbeat_per_node_and_kind_is_written_in_turn_never_two_at_once() {
        let b = Heartbeats::default();
        b.offer("n1", "lease", json!(1));
        b.offer("n1", "nodestatus", json!("s1"));
        b.offer("n2", "lease", json!(1));
        // A newer one replaces the one waiting, and keeps its turn.
        b.offer("n1", "lease", json!(2));
        assert_eq!(b.replaced.load(Ordering::Relaxed), 1);
        assert_eq!(b.pending(), 3);
        let (k, v) = b.take().unwrap();
        assert_eq!((k.clone(), v), (key("n1", "lease"), json!(2)));
        // While n1's lease is written, a newer one waits: it is not handed to another writer.
        b.offer("n1", "lease", json!(3));
        assert_eq!(b.take().unwrap(), (key("n1", "nodestatus"), json!("s1")));
        assert_eq!(b.take().unwrap(), (key("n2", "lease"), json!(1)));
        assert_eq!(b.take(), None, "n1's lease is busy");
        // The write fails: the newer one is kept, not the failed older one.
        b.retry(&k, json!(2));
        b.done(&k);
        assert_eq!(b.take().unwrap(), (key("n1", "lease"), json!(3)));
        // It fails too, with nothing newer: it is tried again after the others.
        b.retry(&k, json!(3));
        b.done(&k);
        b.done(&key("n1", "nodestatus"));
        b.done(&key("n2", "lease"));
        assert_eq!(b.take().unwrap(), (key("n1", "lease"), json!(3)));
        b.done(&k);
        assert_eq!(b.take(), None);
        assert_eq!(b.pending(), 0, "nothing is kept once written");
        assert_eq!(b.replaced.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn urgent_writes_are_counted_while_they_last_and_the_wait_is_the_oldest_ready() {
        let b = Arc::new(Heartbeats::default());
        assert_eq!(b.urgent_writes(), 0);
        let (u1, u2) = (b.urgent(), b.urgent());
        assert_eq!(b.urgent_writes(), 2);
        drop(u1);
        assert_eq!(b.urgent_writes(), 1);
        drop(u2);
        assert_eq!(b.urgent_writes(), 0);

        let now = Instant::now();
        assert_eq!(b.oldest_wait(now), None);
        b.offer("n1", "lease", json!(1));
        b.offer("n2", "lease", json!(1));
        let later = now + Duration::from_secs(20);
        let w = b.oldest_wait(later).unwrap();
        assert!(w > Duration::from_secs(19), "{w:?}");
        // Taken and being written, it no longer counts; n2 is first now.
        let (k, _) = b.take().unwrap();
        assert_eq!(k, key("n1", "lease"));
        assert!(b.oldest_wait(later).is_some());
        b.take().unwrap();
        assert_eq!(b.oldest_wait(later), None, "being written is not waiting");
    }

    #[test]
    fn a_node_is_heard_when_its_heartbeat_arrives_not_when_it_is_written() {
        let b = Heartbeats::default();
        let (t1, t2): (Timestamp, Timestamp) = (
            "2026-12-03T10:00:00Z".parse().unwrap(),
            "2026-12-03T10:00:10Z".parse().unwrap(),
        );
        assert_eq!(b.heard("n1"), None);
        b.offer_at("n1", "lease", json!(1), t1);
        assert_eq!(b.heard("n1"), Some(t1), "held, not written yet");
        b.offer_at("n1", "nodestatus", json!("s"), t2);
        assert_eq!(b.heard("n1"), Some(t2), "either kind counts");
        // A clock stepping back does not make a node older than it was heard.
        b.offer_at("n1", "lease", json!(2), t1);
        assert_eq!(b.heard("n1"), Some(t2));
        // Written and gone from the lane, the time stays.
        while let Some((k, _)) = b.take() {
            b.done(&k);
        }
        assert_eq!(b.pending(), 0);
        assert_eq!(b.heard("n1"), Some(t2));
        assert_eq!(b.heard("n2"), None);
    }
}
