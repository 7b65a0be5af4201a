//! Which cloud core serves each node, decided through the API.
//!
//! The annotation [`SERVED_BY`] on the node's Lease (`kube-node-lease/<node>`) names the core
//! serving the node. A core claims a node with the first Lease renewal it writes for the node in
//! a new session (the claim rides on a write made anyway, so it costs nothing, even when 10,000
//! nodes reconnect at once); later renewals leave the annotation alone. A core whose session has
//! claimed the node and that then sees, in its Lease informer, a newer version of the Lease
//! naming another core gives the node up: it closes its session and stops queueing for it. So
//! when a node moves while the old core still believes its connection is alive (a half-open
//! TCP connection, a partition), the old core stops within one Lease interval of the node's
//! arrival at the new one, instead of after its keepalives time out; and a node that flaps
//! between two reachable cores ends up served by the core whose claim landed last.
//!
//! "Newer" is by resourceVersion, compared with what this core's claim returned: an event from
//! before the claim, delivered late, never makes a core give up a node it has just claimed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sedge_tunnel::message::not_newer;

/// The Lease annotation naming the cloud core that serves the node.
pub const SERVED_BY: &str = "sedge.io/cloudcore";

/// This core's claims on nodes.
#[derive(Debug)]
pub struct Ownership {
    me: String,
    /// Per node: the hub session whose Lease write claimed the node, and the resourceVersion
    /// that write produced.
    claimed: Mutex<HashMap<String, (u64, String)>>,
    /// Claims written.
    pub claims: AtomicU64,
    /// Sessions closed because another core claimed the node.
    pub yielded: AtomicU64,
}

impl Ownership {
    /// Claims made as `me` (this core's identity).
    pub fn new(me: String) -> Ownership {
        Ownership {
            me,
            claimed: Mutex::default(),
            claims: AtomicU64::new(0),
            yielded: AtomicU64::new(0),
        }
    }

    /// This core's identity.
    pub fn me(&self) -> &str {
        &self.me
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, String)>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the next Lease write for `node`, arriving in hub session `session`, must claim it.
    pub fn must_claim(&self, node: &str, session: u64) -> bool {
        self.map().get(node).is_none_or(|(s, _)| *s != session)
    }

    /// The write claiming `node` in `session` succeeded and produced the Lease at `rv`.
    pub fn claimed(&self, node: &str, session: u64, rv: String) {
        self.map().insert(node.to_string(), (session, rv));
        self.claims.fetch_add(1, Ordering::Relaxed);
    }

    /// A version of `node`'s Lease was seen (`rv`, naming `owner`) while this core's live session
    /// for the node is `live`. Returns the session to close when another core claimed the node
    /// after this core's session did.
    pub fn observe(
        &self,
        node: &str,
        owner: Option<&str>,
        rv: &str,
        live: Option<u64>,
    ) -> Option<u64> {
        let owner = owner?;
        if owner == self.me {
            return None;
        }
        let live = live?;
        let mut map = self.map();
        let (session, claim_rv) = map.get(node)?;
        if *session != live || rv.is_empty() || not_newer(rv, claim_rv) {
            return None;
        }
        map.remove(node);
        self.yielded.fetch_add(1, Ordering::Relaxed);
        Some(live)
    }

    /// `node`'s Lease is gone: nothing is claimed any more.
    pub fn forget(&self, node: &str) {
        self.map().remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_gives_a_node_up_only_for_a_later_claim_by_another_core() {
        let own = Ownership::new("core-a".into());
        // Session 7 has not claimed yet: it must, and nothing makes it give the node up.
        assert!(own.must_claim("edge-1", 7));
        assert_eq!(own.observe("edge-1", Some("core-b"), "90", Some(7)), None);
        own.claimed("edge-1", 7, "100".into());
        assert!(!own.must_claim("edge-1", 7), "one claim per session");
        assert!(own.must_claim("edge-1", 8), "a new session claims again");
        // Its own claim, a Lease without the annotation, or another core's claim from before
        // this one (an event delivered late): kept.
        assert_eq!(own.observe("edge-1", Some("core-a"), "101", Some(7)), None);
        assert_eq!(own.observe("edge-1", None, "102", Some(7)), None);
        assert_eq!(own.observe("edge-1", Some("core-b"), "99", Some(7)), None);
        assert_eq!(own.observe("edge-1", Some("core-b"), "100", Some(7)), None);
        // A claim by another core after it, but this core's session has changed meanwhile (the
        // new session has not claimed): kept; no session: nothing to close.
        assert_eq!(own.observe("edge-1", Some("core-b"), "120", Some(8)), None);
        assert_eq!(own.observe("edge-1", Some("core-b"), "120", None), None);
        assert_eq!(own.yielded.load(Ordering::Relaxed), 0);
        // A later claim by another core while the claiming session is live: closed, once.
        assert_eq!(
            own.observe("edge-1", Some("core-b"), "120", Some(7)),
            Some(7)
        );
        assert_eq!(own.observe("edge-1", Some("core-b"), "121", Some(7)), None);
        assert_eq!(own.yielded.load(Ordering::Relaxed), 1);
        assert!(own.must_claim("edge-1", 7));
        // Other nodes are their own business; a deleted Lease forgets the claim.
        own.claimed("edge-2", 3, "200".into());
        assert_eq!(own.observe("edge-3", Some("core-b"), "300", Some(3)), None);
        own.forget("edge-2");
        assert_eq!(own.observe("edge-2", Some("core-b"), "300", Some(3)), None);
        assert_eq!(own.claims.load(Ordering::Relaxed), 2);
    }
}
