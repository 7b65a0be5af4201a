//! The per-node reliable queue on the cloud side.
//!
//! Keyed by object (the route's resource string), so repeated updates of one object coalesce to
//! the newest, and bounded by the number of distinct objects. A message leaves the queue only
//! when the node acknowledges that exact message; until then it is re-sent after the ack
//! timeout (doubling, capped) and after every reconnect. Messages older than what the node
//! already acknowledged are dropped on entry, which is what makes resync incremental.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::message::{Message, not_newer, op};

/// What happened to an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued as a new entry.
    Queued,
    /// Replaced an older queued version of the same object.
    Coalesced,
    /// Not newer than what the node has acknowledged or what is queued: nothing to do.
    Skipped,
}

#[derive(Debug)]
struct Sent {
    id: String,
    rv: String,
    delete: bool,
    deadline: Instant,
    attempts: u32,
}

#[derive(Debug)]
struct Item {
    msg: Message,
    sent: Option<Sent>,
    queued: bool,
}

/// The queue holds its capacity of objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// An acknowledgement's effect on the delivery records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckEffect {
    /// The node now has `key` at `rv`.
    Set(String, String),
    /// The node has deleted `key`.
    Removed(String),
}

/// One node's queue.
#[derive(Debug, Default)]
pub struct NodeQueue {
    items: HashMap<String, Item>,
    ready: VecDeque<String>,
    inflight: HashMap<String, String>,
    acked: HashMap<String, String>,
}

impl NodeQueue {
    /// A queue that knows what the node has acknowledged before.
    pub fn with_acked(acked: HashMap<String, String>) -> NodeQueue {
        NodeQueue {
            acked,
            ..Default::default()
        }
    }

    /// Objects waiting (queued or in flight).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Messages sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// What the node has acknowledged: object key -> resourceVersion.
    pub fn acked(&self) -> &HashMap<String, String> {
        &self.acked
    }

    /// Takes `held`, what the node says it holds, as what it has acknowledged: the node's own
    /// store is newer than any record a hub kept (another core may have served it since).
    pub fn adopt(&mut self, held: HashMap<String, String>) {
        self.acked = held;
    }

    /// Offers a message; `Err(QueueFull)` when the queue holds `capacity` objects already.
    pub fn offer(&mut self, msg: Message, capacity: usize) -> Result<Enqueued, QueueFull> {
        let key = msg.route.resource.clone();
        let delete = msg.route.operation == op::DELETE;
        match self.acked.get(&key) {
            Some(rv)
                if !delete
                    && !msg.resource_version.is_empty()
                    && not_newer(&msg.resource_version, rv) =>
            {
                return Ok(Enqueued::Skipped);
            }
            // A delete for something the node never acknowledged and that is not queued: the
            // node does not have it.
            None if delete && !self.items.contains_key(&key) => return Ok(Enqueued::Skipped),
            _ => {}
        }
        if let Some(item) = self.items.get_mut(&key) {
            let older = !msg.resource_version.is_empty()
                && not_newer(&msg.resource_version, &item.msg.resource_version)
                && msg.resource_version != item.msg.resource_version;
            if older
                || (msg.resource_version == item.msg.resource_version
                    && msg.route.operation == item.msg.route.operation
                    && !msg.resource_version.is_empty())
            {
                return Ok(Enqueued::Skipped);
            }
            item.msg = msg;
            if !item.queued {
                item.queued = true;
                self.ready.push_back(key);
            }
            return Ok(Enqueued::Coalesced);
        }
        if self.items.len() >= capacity {
            return Err(QueueFull);
        }
        self.items.insert(
            key.clone(),
            Item {
                msg,
                sent: None,
                queued: true,
            },
        );
        self.ready.push_back(key);
        Ok(Enqueued::Queued)
    }

    /// Takes the messages to send now (at most `window` in flight), re-queueing timed-out ones.
    /// Returns them and the next retry deadline.
    pub fn take(
        &mut self,
        window: usize,
        now: Instant,
        ack_timeout: Duration,
        max_backoff: Duration,
    ) -> (Vec<Message>, Option<Instant>, usize) {
        let mut retried = 0;
        let expired: Vec<String> = self
            .inflight
            .values()
            .filter(|k| {
                self.items
                    .get(*k)
                    .and_then(|i| i.sent.as_ref())
                    .is_some_and(|s| s.deadline <= now)
            })
            .cloned()
            .collect();
        for key in expired {
            if let Some(item) = self.items.get_mut(&key)
                && !item.queued
            {
                item.queued = true;
                self.ready.push_back(key);
                retried += 1;
            }
        }
        let mut out = Vec::new();
        while self.inflight.len() < window {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(item) = self.items.get_mut(&key) else {
                continue;
            };
            if !item.queued {
                continue;
            }
            item.queued = false;
            let attempts = match item.sent.take() {
                Some(prev) => {
                    self.inflight.remove(&prev.id);
                    if prev.id == item.msg.id {
                        prev.attempts + 1
                    } else {
                        0
                    }
                }
                None => 0,
            };
            let backoff = ack_timeout
                .saturating_mul(1 << attempts.min(16))
                .min(max_backoff.max(ack_timeout));
            item.sent = Some(Sent {
                id: item.msg.id.clone(),
                rv: item.msg.resource_version.clone(),
                delete: item.msg.route.operation == op::DELETE,
                deadline: now + backoff,
                attempts,
            });
            self.inflight.insert(item.msg.id.clone(), key);
            out.push(item.msg.clone());
        }
        let next = self
            .inflight
            .values()
            .filter_map(|k| self.items.get(k)?.sent.as_ref().map(|s| s.deadline))
            .min();
        (out, next, retried)
    }

    /// Applies an acknowledgement of message `id`.
    pub fn ack(&mut self, id: &str) -> Option<AckEffect> {
        let key = self.inflight.remove(id)?;
        let item = self.items.get_mut(&key)?;
        let sent = item.sent.take()?;
        if item.msg.id == sent.id {
            // Acknowledged as sent; a queued retry of the same message is no longer needed.
            self.items.remove(&key);
        }
        if sent.delete {
            self.acked.remove(&key);
            Some(AckEffect::Removed(key))
        } else {
            self.acked.insert(key.clone(), sent.rv.clone());
            Some(AckEffect::Set(key, sent.rv))
        }
    }

    /// The session ended: everything in flight goes back to the front of the queue.
    pub fn reset(&mut self) {
        let mut back = Vec::new();
        for key in self.inflight.values() {
            if let Some(item) = self.items.get_mut(key) {
                item.sent = None;
                if !item.queued {
                    item.queued = true;
                    back.push(key.clone());
                }
            }
        }
        self.inflight.clear();
        for k in back.into_iter().rev() {
            self.ready.push_front(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(60);

    fn upd(key: &str, rv: u64) -> Message {
        Message::new("resource", op::UPDATE, key, format!("v{rv}")).with_version(rv.to_string())
    }
    fn del(key: &str, rv: u64) -> Message {
        Message::new("resource", op::DELETE, key, "").with_version(rv.to_string())
    }

    #[test]
    fn updates_coalesce_and_old_versions_are_skipped() {
        let mut q = NodeQueue::default();
        assert_eq!(q.offer(upd("a", 1), 10), Ok(Enqueued::Queued));
        assert_eq!(q.offer(upd("a", 3), 10), Ok(Enqueued::Coalesced));
        assert_eq!(q.offer(upd("a", 2), 10), Ok(Enqueued::Skipped));
        let (out, _, _) = q.take(8, Instant::now(), T, MAX);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resource_version, "3");
        assert_eq!(
            q.ack(&out[0].id),
            Some(AckEffect::Set("a".into(), "3".into()))
        );
        assert!(q.is_empty());
        // The node has 3: offering 3 again (a resync) sends nothing.
        assert_eq!(q.offer(upd("a", 3), 10), Ok(Enqueued::Skipped));
        assert_eq!(q.offer(upd("a", 4), 10), Ok(Enqueued::Queued));
    }

    #[test]
    fn an_update_while_in_flight_is_sent_after_and_kept_until_acked() {
        let mut q = NodeQueue::default();
        q.offer(upd("a", 1), 10).unwrap();
        let (first, _, _) = q.take(8, Instant::now(), T, MAX);
        q.offer(upd("a", 2), 10).unwrap();
        let (second, _, _) = q.take(8, Instant::now(), T, MAX);
        assert_eq!(second[0].resource_version, "2");
        // The ack for version 1 is stale (its id left the in-flight set when 2 went out).
        assert_eq!(q.ack(&first[0].id), None);
        assert_eq!(q.len(), 1);
        assert_eq!(
            q.ack(&second[0].id),
            Some(AckEffect::Set("a".into(), "2".into()))
        );
        assert!(q.is_empty());
    }

    #[test]
    fn timeouts_and_resets_resend_the_same_message() {
        let mut q = NodeQueue::default();
        q.offer(upd("a", 1), 10).unwrap();
        let t0 = Instant::now();
        let (out, next, _) = q.take(8, t0, T, MAX);
        assert_eq!(next, Some(t0 + T));
        let (none, _, _) = q.take(8, t0 + T / 2, T, MAX);
        assert!(none.is_empty());
        let (again, next, retried) = q.take(8, t0 + T, T, MAX);
        assert_eq!(retried, 1);
        assert_eq!(again[0].id, out[0].id);
        assert_eq!(next, Some(t0 + T + 2 * T), "backoff doubles");
        q.reset();
        let (after_reset, _, _) = q.take(8, t0, T, MAX);
        assert_eq!(after_reset[0].id, out[0].id);
    }

    #[test]
    fn deletes_replace_updates_and_clear_the_record() {
        let mut q = NodeQueue::with_acked([("a".to_string(), "1".to_string())].into());
        q.offer(upd("a", 2), 10).unwrap();
        assert_eq!(q.offer(del("a", 3), 10), Ok(Enqueued::Coalesced));
        let (out, _, _) = q.take(8, Instant::now(), T, MAX);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].route.operation, op::DELETE);
        assert_eq!(q.ack(&out[0].id), Some(AckEffect::Removed("a".into())));
        assert!(q.acked().is_empty());
        // A delete for an object the node never had is nothing to do.
        assert_eq!(q.offer(del("b", 4), 10), Ok(Enqueued::Skipped));
    }

    #[test]
    fn capacity_counts_objects_and_window_limits_in_flight() {
        let mut q = NodeQueue::default();
        q.offer(upd("a", 1), 2).unwrap();
        q.offer(upd("b", 1), 2).unwrap();
        assert_eq!(q.offer(upd("a", 2), 2), Ok(Enqueued::Coalesced));
        assert_eq!(q.offer(upd("c", 1), 2), Err(QueueFull));
        let (out, _, _) = q.take(1, Instant::now(), T, MAX);
        assert_eq!(out.len(), 1);
        assert_eq!(q.inflight(), 1);
    }
}
