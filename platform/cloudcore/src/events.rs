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

use k8s_openapi::api::core::v1::Event;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Events held at most; past it the oldest is dropped.
pub const EVENTS_HELD: usize = 8192;

/// An event to write, checked when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The namespace the Event goes to.
    pub namespace: String,
    /// The Event, named `<involved object>.<random suffix>` (one name for every try, so a
    /// write retried after it landed is refused as existing, not made twice).
    pub event: Event,
}

impl Held {
    /// The Event a node reported about `name` in `namespace`, with its object metadata set
    /// here (a node does not choose its name or namespace). A body that is not an Event is
    /// refused here, before it takes a place in the queue.
    pub fn parse(namespace: &str, name: &str, mut body: Value) -> Result<Held, String> {
        if !body.is_object() {
            return Err("an event must be a JSON object".into());
        }
        let suffix: u64 = rand::random();
        body["metadata"] = json!({
            "name": format!("{name}.{suffix:016x}"),
            "namespace": namespace,
        });
        body["apiVersion"] = json!("v1");
        body["kind"] = json!("Event");
        let event: Event =
            serde_json::from_value(body).map_err(|e| format!("not an Event: {e}"))?;
        Ok(Held {
            namespace: namespace.to_string(),
            event,
        })
    }
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
        let body = json!({
            "involvedObject": {"kind": "Pod", "namespace": "default", "name": format!("p{i}")},
            "reason": "Started", "message": format!("n{i}"), "type": "Normal",
        });
        Held::parse("default", &format!("p{i}"), body).unwrap()
    }

    #[test]
    fn events_are_written_in_order_and_a_flood_drops_the_oldest_not_memory() {
        let e = Events::default();
        assert_eq!(e.take(), None);
        let all: Vec<Held> = (0..EVENTS_HELD + 5).map(held).collect();
        for h in &all {
            e.offer(h.clone());
        }
        assert_eq!(e.pending(), EVENTS_HELD, "bounded");
        assert_eq!(e.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(e.take().as_ref(), Some(&all[5]), "the five oldest went");
        assert_eq!(e.take().as_ref(), Some(&all[6]));
        // A failed write is offered again: to the back of the line.
        let again = all[5].clone();
        e.offer(again.clone());
        assert_eq!(e.pending(), EVENTS_HELD - 1);
        let mut last = None;
        while let Some(h) = e.take() {
            last = Some(h);
        }
        assert_eq!(last, Some(again));
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn a_report_that_is_not_an_event_is_refused_before_it_is_held() {
        let e = Held::parse(
            "default",
            "p1",
            json!({"involvedObject": {"name": "p1"}, "reason": "Started",
                   "metadata": {"name": "elsewhere", "namespace": "kube-system"}}),
        )
        .unwrap();
        // The node does not choose where its event goes.
        assert_eq!(e.namespace, "default");
        assert_eq!(e.event.metadata.namespace.as_deref(), Some("default"));
        let name = e.event.metadata.name.unwrap();
        assert!(
            name.starts_with("p1.") && name.len() == "p1.".len() + 16,
            "{name}"
        );

        for garbage in [
            json!("Started"),
            json!([1, 2]),
            json!(null),
            json!({"involvedObject": "p1"}),
            json!({"involvedObject": {"name": "p1"}, "count": "many"}),
        ] {
            let err = Held::parse("default", "p1", garbage.clone()).unwrap_err();
            assert!(
                err.contains("event") || err.contains("Event"),
                "{garbage}: {err}"
            );
        }
    }
}
