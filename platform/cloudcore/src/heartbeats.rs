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
//!
//! Not every heartbeat is written ([`renewal`], [`status_update`]). A node renews its Lease every
//! 10 s and posts its status every 60 s, and at 10,000 nodes those 1,170 writes a second were
//! more than the API server, on the same two cores as everything else, could write while pods
//! started. As kubelet does with `nodeStatusReportFrequency`, a status that changes nothing but
//! its heartbeat times is written only once the stored one is 5 minutes old; and a Lease is
//! written once the stored renewal is 3/8 of the grace old (15 s of 40), so every other renewal:
//! the Lease another core judges the node by is at most about half the grace old. This core
//! hears every renewal anyway ([`Heartbeats::heard`]).

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
    /// Heartbeats not written because the stored object already said enough: a Lease renewed
    /// recently, or a status with nothing new but its heartbeat times.
    pub skipped: AtomicU64,
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

/// How often an unchanged node status is written (kubelet's `nodeStatusReportFrequency`).
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);

/// What to do with a node's Lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Not newer than the stored one (an old renewal flushed on reconnect): never written.
    Stale,
    /// Newer, but the stored one is recent enough: written only to claim the node.
    Recent,
    /// Written.
    Due,
}

/// How a renewal at `new` compares with the stored one renewed at `stored`, the Lease being
/// written when the stored renewal is at least 3/8 of `grace` old (the node lifecycle's grace,
/// or the Lease's own duration if shorter).
pub fn renewal(stored: Option<Timestamp>, new: Timestamp, grace: Duration) -> Renewal {
    let Some(stored) = stored else {
        return Renewal::Due;
    };
    if new <= stored {
        return Renewal::Stale;
    }
    let age = new.duration_since(stored).unsigned_abs();
    if age >= grace * 3 / 8 {
        Renewal::Due
    } else {
        Renewal::Recent
    }
}

/// The status to write for a node reporting `reported`, the stored one being `stored`: `None`
/// when the write would change nothing but the conditions' heartbeat times and the stored Ready
/// heartbeat is less than [`STATUS_REFRESH`] old at `now`. A condition whose status is unchanged
/// keeps its stored `lastTransitionTime` (the node stamps every report with its own clock).
pub fn status_update(stored: &Value, mut reported: Value, now: Timestamp) -> Option<Value> {
    if let Some(conds) = reported.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            let before = stored_condition(stored, &c["type"]);
            if let Some(b) = before
                && b["status"] == c["status"]
                && let Some(t) = b.get("lastTransitionTime")
                && let Some(o) = c.as_object_mut()
            {
                o.insert("lastTransitionTime".into(), t.clone());
            }
        }
    }
    let mut merged = stored.clone();
    json_patch::merge(&mut merged, &reported);
    if without_heartbeats(merged) != without_heartbeats(stored.clone()) {
        return Some(reported);
    }
    let beat = stored_condition(stored, &Value::from("Ready"))
        .and_then(|c| c["lastHeartbeatTime"].as_str())
        .and_then(|t| t.parse::<Timestamp>().ok());
    match beat {
        Some(t) if now.duration_since(t).unsigned_abs() < STATUS_REFRESH => None,
        _ => Some(reported),
    }
}

fn stored_condition<'a>(status: &'a Value, kind: &Value) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| &c["type"] == kind)
}

fn without_heartbeats(mut status: Value) -> Value {
    if let Some(conds) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds.iter_mut().filter_map(Value::as_object_mut) {
            c.remove("lastHeartbeatTime");
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn a_lease_is_written_when_the_stored_renewal_is_three_eighths_of_the_grace_old() {
        let grace = Duration::from_secs(40);
        let t0 = at("2026-12-03T10:00:00.000001Z");
        assert_eq!(renewal(None, t0, grace), Renewal::Due, "no Lease yet");
        assert_eq!(renewal(Some(t0), t0, grace), Renewal::Stale);
        let earlier = at("2026-12-03T09:59:59Z");
        assert_eq!(renewal(Some(t0), earlier, grace), Renewal::Stale);
        // Renewals every 10 s: every other one is written.
        assert_eq!(
            renewal(Some(t0), at("2026-12-03T10:00:10Z"), grace),
            Renewal::Recent
        );
        assert_eq!(
            renewal(Some(t0), at("2026-12-03T10:00:20Z"), grace),
            Renewal::Due
        );
        assert_eq!(
            renewal(Some(t0), at("2026-12-03T10:00:15.000001Z"), grace),
            Renewal::Due,
            "15 s is 3/8 of 40"
        );
        // A short grace (tests, or a Lease shorter than the grace) writes more often.
        assert_eq!(
            renewal(Some(t0), at("2026-12-03T10:00:02Z"), Duration::from_secs(4)),
            Renewal::Due
        );
    }

    fn status(ready: &str, beat: &str, changed: &str) -> Value {
        json!({
            "capacity": {"cpu": "2", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "lastHeartbeatTime": beat, "lastTransitionTime": changed},
                {"type": "Ready", "status": ready, "reason": "KubeletReady",
                 "lastHeartbeatTime": beat, "lastTransitionTime": changed},
            ],
            "nodeInfo": {"kubeletVersion": "v1.33.0-sedge"},
        })
    }

    #[test]
    fn an_unchanged_node_status_is_written_every_five_minutes_a_change_at_once() {
        let t0 = "2026-12-03T10:00:00Z";
        let stored = status("True", t0, "2026-12-03T09:00:00Z");
        // A minute later, nothing but the node's clock changed: not written.
        let t1 = "2026-12-03T10:01:00Z";
        assert_eq!(status_update(&stored, status("True", t1, t1), at(t1)), None);
        // Fields the node does not report (set by others) are no change either.
        let mut more = stored.clone();
        more["images"] = json!([{"names": ["busybox"]}]);
        assert_eq!(status_update(&more, status("True", t1, t1), at(t1)), None);
        // Five minutes after the stored heartbeat it is written, keeping the transition time.
        let t5 = "2026-12-03T10:05:00Z";
        let w = status_update(&stored, status("True", t5, t5), at(t5)).unwrap();
        assert_eq!(w["conditions"][1]["lastHeartbeatTime"], t5);
        assert_eq!(
            w["conditions"][1]["lastTransitionTime"],
            "2026-12-03T09:00:00Z"
        );
        // The lifecycle marked it Unknown: Ready again is written at once, from now.
        let unknown = status("Unknown", t0, t0);
        let w = status_update(&unknown, status("True", t1, t1), at(t1)).unwrap();
        assert_eq!(w["conditions"][1]["status"], "True");
        assert_eq!(w["conditions"][1]["lastTransitionTime"], t1);
        assert_eq!(w["conditions"][0]["lastTransitionTime"], t0, "unchanged");
        // Any other field that changed is written at once.
        let mut grown = status("True", t1, t1);
        grown["capacity"]["cpu"] = json!("4");
        assert!(status_update(&stored, grown, at(t1)).is_some());
        // A stored status without a Ready heartbeat is written.
        let bare = json!({"capacity": {"cpu": "2"}});
        assert!(status_update(&bare, json!({"capacity": {"cpu": "2"}}), at(t1)).is_some());
    }

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
