//! Node lifecycle: an edge node not heard from for longer than the grace (neither a Lease
//! renewal nor a node status heartbeat, written or still waiting in this core's heartbeat lane)
//! is marked `Ready=Unknown` and tainted `node.kubernetes.io/unreachable`; once it reports Ready
//! again the taint goes.
//!
//! The lane counts because under load the API writes heartbeats later than nodes send them: a
//! node whose heartbeat this core holds is alive however old its Lease object is. With several
//! cloud cores, a node served by another core than the one running the lifecycle is judged by
//! its Lease and status alone (that core's lane is not visible here).
//!
//! Pods on an unreachable edge node are not deleted by default: the taint's effect is
//! `NoSchedule`, so new pods go elsewhere while the node keeps running what it has (an edge that
//! loses its uplink is still doing its job; KubeEdge users fought evictions in issues #3941,
//! #4048 and #2128). With [`TaintEffect::NoExecute`] the taint is Kubernetes' own and pods that do
//! not tolerate it are deleted after their `tolerationSeconds` (300 unless the pod says otherwise).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::{Cache, TaintEffect};

/// The taint key Kubernetes uses for unreachable nodes.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Lifecycle settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lease age after which a node is unreachable.
    pub grace: Duration,
    /// How often to check.
    pub period: Duration,
    /// The taint's effect.
    pub effect: TaintEffect,
}

fn effect_name(e: TaintEffect) -> &'static str {
    match e {
        TaintEffect::NoSchedule => "NoSchedule",
        TaintEffect::NoExecute => "NoExecute",
    }
}

/// Revokes a node's certificates when its Node object is deleted (`kubectl delete node`), and
/// closes its session: the machine comes back only by joining with a new token. Deletions made
/// while no cloud core was watching are found on every (re)list: a node whose Node object was
/// seen once (recorded in the hub's token store) and is missing from the full list is revoked
/// the same way. A node that joined but has not registered its Node yet is left alone.
pub async fn revoke_deleted_nodes(client: kube::Client, hub: std::sync::Arc<sedge_tunnel::Hub>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let stream = watcher(Api::<Node>::all(client), crate::lists::config()).default_backoff();
    futures::pin_mut!(stream);
    // Names recorded as seen by this process (each is written once), and the list in progress.
    let mut recorded = std::collections::HashSet::new();
    let mut listing: Option<std::collections::HashSet<String>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Delete(n)) => {
                if let Err(e) = hub.revoke_node(&n.name_any()).await {
                    tracing::error!(node = %n.name_any(), error = %e, "cannot revoke a deleted node's certificates");
                }
                recorded.remove(&n.name_any());
            }
            Ok(watcher::Event::Init) => listing = Some(Default::default()),
            Ok(watcher::Event::InitApply(n)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(n.name_any());
                }
            }
            Ok(watcher::Event::InitDone) => {
                let present = listing.take().unwrap_or_default();
                match hub.revoke_gone(present.clone()).await {
                    Ok(gone) if !gone.is_empty() => {
                        tracing::warn!(nodes = ?gone, "revoked nodes whose Node was deleted while no cloud core was watching");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "cannot check for nodes deleted while the cloud core was down")
                    }
                }
                let new: Vec<String> = present
                    .into_iter()
                    .filter(|n| !recorded.contains(n))
                    .collect();
                if let Err(e) = hub.nodes_seen(new.clone()).await {
                    tracing::warn!(error = %e, "cannot record the nodes seen");
                } else {
                    recorded.extend(new);
                }
            }
            Ok(watcher::Event::Apply(n)) => {
                let name = n.name_any();
                if !recorded.contains(&name) {
                    if let Err(e) = hub.nodes_seen(vec![name.clone()]).await {
                        tracing::warn!(error = %e, "cannot record a node as seen");
                    } else {
                        recorded.insert(name);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "node watch failed; retrying"),
        }
    }
}

/// Checks leases every `period` until aborted.
pub async fn run(client: kube::Client, cache: Cache, s: Settings) {
    if !cache.ready().await {
        return;
    }
    let mut tick = tokio::time::interval(s.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = check(&client, &cache, &s).await {
            tracing::warn!(error = %e, "node lifecycle check failed");
        }
    }
}

async fn check(client: &kube::Client, cache: &Cache, s: &Settings) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let api = Api::<Node>::all(client.clone());
    for node in cache.nodes.state() {
        if !sedge_api::is_agent_node(node.labels().keys()) {
            continue;
        }
        let name = node.name_any();
        let renewed = cache.lease_renewed(&name);
        let held = cache.heartbeats.heard(&name);
        let Some(since) = last_heard(&node, renewed, held) else {
            continue;
        };
        let age = now.as_second() - since.as_second();
        let stale = age > s.grace.as_secs() as i64;
        let taints: Vec<Value> = node
            .spec
            .as_ref()
            .and_then(|sp| sp.taints.as_ref())
            .map(|t| {
                t.iter()
                    .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                    .collect()
            })
            .unwrap_or_default();
        let tainted = taints.iter().any(|t| t["key"] == UNREACHABLE);
        let conditions = node
            .status
            .as_ref()
            .and_then(|st| st.conditions.clone())
            .unwrap_or_default();
        let ready = conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.clone());
        if stale {
            if ready.as_deref() != Some("Unknown") {
                tracing::warn!(node = %name, lease_age_s = age, "edge node unreachable: marking Ready=Unknown");
                let ts = now.to_string();
                let mut conds: Vec<Value> = conditions
                    .iter()
                    .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
                    .collect();
                if !conds.iter().any(|c| c["type"] == "Ready") {
                    conds.push(json!({"type": "Ready"}));
                }
                for c in &mut conds {
                    c["status"] = json!("Unknown");
                    c["reason"] = json!("NodeStatusUnknown");
                    c["message"] = json!("Kubelet stopped posting node status.");
                    c["lastTransitionTime"] = json!(ts);
                }
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"conditions": conds}})),
                )
                .await?;
            }
            if !tainted {
                let mut t = taints.clone();
                t.push(json!({"key": UNREACHABLE, "effect": effect_name(s.effect), "timeAdded": now.to_string()}));
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"taints": t}})),
                )
                .await?;
            }
            if s.effect == TaintEffect::NoExecute {
                evict(client, cache, &name, age).await?;
            }
        } else if tainted && ready.as_deref() == Some("True") {
            tracing::info!(node = %name, "edge node reachable again: removing the unreachable taint");
            let t: Vec<Value> = taints
                .into_iter()
                .filter(|t| t["key"] != UNREACHABLE)
                .collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"spec": {"taints": if t.is_empty() { Value::Null } else { json!(t) }}}),
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// When `node` was last heard from: its Lease renewal, its Ready condition's heartbeat or the
/// arrival of a heartbeat `held` in this core's lane, whichever is newest (kube-controller-manager's
/// node lifecycle counts the first two); a node never heard from counts from its creation. With
/// the Lease alone, a node that reported Ready after a link cut, seen before its renewal reached
/// the cache, was marked Unknown again and stayed so until its next status, 60 s later.
fn last_heard(
    node: &Node,
    renewed: Option<k8s_openapi::jiff::Timestamp>,
    held: Option<k8s_openapi::jiff::Timestamp>,
) -> Option<k8s_openapi::jiff::Timestamp> {
    let beat = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    renewed
        .max(beat)
        .max(held)
        .or_else(|| node.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// With `NoExecute`: deletes the node's pods that do not tolerate the taint for long enough.
async fn evict(
    client: &kube::Client,
    cache: &Cache,
    node: &str,
    unreachable_for: i64,
) -> Result<(), kube::Error> {
    for p in cache.pods.state() {
        if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node)
            || p.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        if tolerated_seconds(&p).is_none_or(|t| unreachable_for > t) {
            let ns = p.namespace().unwrap_or_default();
            tracing::warn!(pod = %p.name_any(), %node, "evicting pod from unreachable node");
            match Api::<Pod>::namespaced(client.clone(), &ns)
                .delete(&p.name_any(), &DeleteParams::default())
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}

/// How long a pod tolerates the unreachable taint. A pod that says nothing about it gets 300 s,
/// as Kubernetes' DefaultTolerationSeconds admission gives it.
fn tolerated_seconds(p: &Pod) -> Option<i64> {
    let tolerations = p.spec.as_ref().and_then(|s| s.tolerations.as_ref());
    for t in tolerations.into_iter().flatten() {
        let key_ok = t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == UNREACHABLE);
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == "NoExecute");
        if key_ok && effect_ok {
            return Some(t.toleration_seconds.unwrap_or(i64::MAX));
        }
    }
    Some(300)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(heartbeat: Option<&str>) -> Node {
        let mut n = json!({
            "metadata": {"name": "n", "creationTimestamp": "2026-12-03T10:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        if let Some(t) = heartbeat {
            n["status"]["conditions"][0]["lastHeartbeatTime"] = json!(t);
        }
        serde_json::from_value(n).unwrap()
    }

    fn at(t: &str) -> k8s_openapi::jiff::Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn a_node_is_last_heard_at_its_newest_lease_renewal_or_status_heartbeat() {
        let (older, newer) = ("2026-12-03T10:01:00Z", "2026-12-03T10:02:00Z");
        // A status newer than the Lease (the renewal not seen yet) counts.
        assert_eq!(
            last_heard(&node(Some(newer)), Some(at(older)), None),
            Some(at(newer))
        );
        // A renewal newer than the status counts.
        assert_eq!(
            last_heard(&node(Some(older)), Some(at(newer)), None),
            Some(at(newer))
        );
        assert_eq!(
            last_heard(&node(None), Some(at(older)), None),
            Some(at(older))
        );
        assert_eq!(last_heard(&node(Some(older)), None, None), Some(at(older)));
        // A heartbeat held in the lane, not yet written, is newer than both.
        let held = "2026-12-03T10:03:00Z";
        assert_eq!(
            last_heard(&node(Some(older)), Some(at(newer)), Some(at(held))),
            Some(at(held))
        );
        assert_eq!(
            last_heard(&node(None), None, Some(at(held))),
            Some(at(held))
        );
        // ...and never makes a node older than its Lease says.
        assert_eq!(
            last_heard(&node(None), Some(at(newer)), Some(at(older))),
            Some(at(newer))
        );
        // Never heard from: from its creation.
        assert_eq!(
            last_heard(&node(None), None, None),
            Some(at("2026-12-03T10:00:00Z"))
        );
    }
}
