//! The DaemonSet controller: one pod of the template on every node that matches it (node
//! selector, required node affinity, taints against tolerations), bound to the node directly,
//! including nodes that register after the DaemonSet was created.
//!
//! - The pods get the tolerations Kubernetes' controller adds (`not-ready`, `unreachable`,
//!   `unschedulable`, pressure conditions) with one difference for the edge: `unreachable` and
//!   `not-ready` are tolerated whatever the effect, so a site that is offline when a DaemonSet
//!   is created gets its pod when the link returns (its edge controller delivers it then).
//! - A node that no longer matches loses its pod; a failed pod is replaced; extra pods on one
//!   node are deleted.
//! - `RollingUpdate`: pods of an older template (`controller-revision-hash`) are deleted while
//!   at most `maxUnavailable` nodes lack an available pod; the next pass creates the new one.
//!   `OnDelete`: a pod is replaced only when someone deletes it.
//! - Node changes that matter (labels, taints, unschedulable, new or deleted nodes) reconcile
//!   every DaemonSet; heartbeats do not.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{
    CREATE_BURST, Error, available, controller_ref, delete_pod, is_active, is_ready, owned_pods,
    phase, pod_from_template, requeue_after_error, scaled, template_hash, write_status,
};
use crate::scheduler::{affinity_matches, tolerates};

/// The label carrying the template's hash on a DaemonSet's pods.
pub const REVISION_LABEL: &str = "controller-revision-hash";

struct Ctx {
    client: kube::Client,
    nodes: Store<Node>,
}

/// What of a node decides where daemon pods go.
fn fingerprint(n: &Node) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.labels().hash(&mut h);
    let spec = n.spec.clone().unwrap_or_default();
    serde_json::to_string(&spec.taints)
        .unwrap_or_default()
        .hash(&mut h);
    spec.unschedulable.hash(&mut h);
    n.uid().hash(&mut h);
    h.finish()
}

/// Runs the controller until aborted.
pub async fn run(client: kube::Client) {
    let (reader, writer) = reflector::store();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let node_changes = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), crate::lists::config())
            .modify(crate::lists::slim),
    )
    .default_backoff()
    .filter_map(move |ev| {
        let changed = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                let fp = fingerprint(&n);
                seen.insert(n.name_any(), fp) != Some(fp)
            }
            Ok(watcher::Event::Delete(n)) => {
                seen.remove(&n.name_any());
                true
            }
            Ok(watcher::Event::InitDone) => true,
            _ => false,
        };
        future::ready(changed.then_some(()))
    });
    let sets = Api::<DaemonSet>::all(client.clone());
    let pods = super::pods_for_owners(&client);
    Controller::new(sets, crate::lists::config())
        .owns(pods, crate::lists::config())
        .reconcile_all_on(node_changes)
        .run(
            reconcile,
            |_, e, _| requeue_after_error("DaemonSet", e),
            Arc::new(Ctx {
                client,
                nodes: reader,
            }),
        )
        .for_each(|_| async {})
        .await;
}

/// The tolerations the controller adds to every daemon pod.
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let t = |key: &str, effect: Option<&str>| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: effect.map(Into::into),
        ..Default::default()
    };
    let mut v = vec![
        t("node.kubernetes.io/not-ready", None),
        t("node.kubernetes.io/unreachable", None),
        t("node.kubernetes.io/disk-pressure", Some("NoSchedule")),
        t("node.kubernetes.io/memory-pressure", Some("NoSchedule")),
        t("node.kubernetes.io/pid-pressure", Some("NoSchedule")),
        t("node.kubernetes.io/unschedulable", Some("NoSchedule")),
    ];
    if host_network {
        v.push(t(
            "node.kubernetes.io/network-unavailable",
            Some("NoSchedule"),
        ));
    }
    v
}

/// Whether a daemon pod `p` should be on `n` (`Some(true)`), may stay but not be created
/// (`Some(false)`: an untolerated NoSchedule taint), or must go (`None`).
fn placement(p: &Pod, n: &Node) -> Option<bool> {
    if !affinity_matches(p, n) {
        return None;
    }
    let ts = p
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let taints = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let untolerated = |effect: &str| {
        taints
            .iter()
            .any(|t| t.effect == effect && !tolerates(&ts, t))
    };
    if untolerated("NoExecute") {
        return None;
    }
    Some(!untolerated("NoSchedule"))
}

fn node_of(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default()
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ds.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let _ = ctx.nodes.wait_until_ready().await;
    let client = &ctx.client;
    let ns = ds.namespace().unwrap_or_default();
    let uid = ds.uid().unwrap_or_default();
    let spec = serde_json::to_value(ds.spec.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let hash = template_hash(&spec["template"]);
    let min_ready = spec["minReadySeconds"].as_i64().unwrap_or(0);
    let on_delete = spec["updateStrategy"]["type"] == "OnDelete";

    // The template as the pods will be, for matching against nodes.
    let mut template = spec["template"].clone();
    let host_network = template["spec"]["hostNetwork"] == true;
    let mut tolerations: Vec<Value> = template["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for t in daemon_tolerations(host_network) {
        let t = serde_json::to_value(t).unwrap_or(Value::Null);
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    template["spec"]["tolerations"] = json!(tolerations);
    let probe = pod_from_template(&template, &ns, "", &BTreeMap::new(), json!({}))?;

    let nodes = ctx.nodes.state();
    let mut wanted: BTreeMap<String, bool> = BTreeMap::new(); // node -> may create
    for n in &nodes {
        if let Some(create) = placement(&probe, n) {
            wanted.insert(n.name_any(), create);
        }
    }
    let desired: Vec<&String> = wanted.iter().filter(|(_, c)| **c).map(|(n, _)| n).collect();

    let pods = owned_pods(client, &ns, &spec["selector"], &uid).await?;
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        by_node.entry(node_of(p).to_string()).or_default().push(p);
    }

    let mut doomed: Vec<&Pod> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut misscheduled = 0;
    for (node, ps) in &by_node {
        if !wanted.contains_key(node) {
            misscheduled += ps.iter().filter(|p| is_active(p)).count();
            doomed.extend(ps.iter().copied());
            continue;
        }
        // Failed pods are replaced; beyond one running pod per node, the newest go.
        let (live, dead): (Vec<&Pod>, Vec<&Pod>) = ps.iter().partition(|p| is_active(p));
        doomed.extend(dead.iter().filter(|p| phase(p) == "Failed"));
        let mut live = live;
        live.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        doomed.extend(live.iter().skip(1));
    }
    for node in &desired {
        let has = by_node
            .get(*node)
            .is_some_and(|ps| ps.iter().any(|p| is_active(p)));
        if !has {
            missing.push((*node).clone());
        }
    }

    // Rolling replacement of old-template pods.
    let mut wake: Option<Duration> = None;
    let mut counts = (0usize, 0usize, 0usize, 0usize); // current, ready, available, updated
    let mut unavailable_nodes = missing.len() as i32;
    let mut old_pods: Vec<(&Pod, bool)> = Vec::new(); // with whether it is available
    for node in wanted.keys() {
        let Some(p) = by_node
            .get(node)
            .and_then(|ps| ps.iter().find(|p| is_active(p)))
        else {
            continue;
        };
        counts.0 += 1;
        counts.1 += is_ready(p) as usize;
        let (ok, later) = available(p, min_ready);
        counts.2 += ok as usize;
        if let Some(l) = later {
            wake = Some(wake.map_or(l, |w| w.min(l)));
        }
        if !ok {
            unavailable_nodes += 1;
        }
        if p.labels().get(REVISION_LABEL) == Some(&hash) {
            counts.3 += 1;
        } else {
            old_pods.push((p, ok));
        }
    }
    if !on_delete {
        let max_unavailable = scaled(
            &spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            desired.len() as i32,
            0,
            true,
        )
        .map_err(|e| {
            Error::Spec(format!(
                "spec.updateStrategy.rollingUpdate.maxUnavailable: {e}"
            ))
        })?
        .max(1);
        let mut budget = max_unavailable - unavailable_nodes;
        // Old pods that are not available anyway go at once.
        doomed.extend(old_pods.iter().filter(|(_, ok)| !ok).map(|(p, _)| *p));
        for (p, _) in old_pods.iter().filter(|(_, ok)| *ok) {
            if budget > 0 {
                doomed.push(p);
                budget -= 1;
            }
        }
    }
    for p in &doomed {
        delete_pod(client, p).await?;
    }

    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let generation = ds.meta().generation.unwrap_or(1);
    for node in missing.iter().take(CREATE_BURST) {
        let mut labels = BTreeMap::new();
        labels.insert(REVISION_LABEL.to_string(), hash.clone());
        labels.insert(
            "pod-template-generation".to_string(),
            generation.to_string(),
        );
        let mut pod = pod_from_template(
            &template,
            &ns,
            &format!("{}-", ds.name_any()),
            &labels,
            controller_ref(ds.as_ref()),
        )?;
        if let Some(s) = pod.spec.as_mut() {
            s.node_name = Some(node.clone());
        }
        api.create(&PostParams::default(), &pod).await?;
    }

    let current = serde_json::to_value(ds.status.clone()).unwrap_or(Value::Null);
    let status = json!({
        "desiredNumberScheduled": desired.len(),
        "currentNumberScheduled": counts.0,
        "numberMisscheduled": misscheduled,
        "numberReady": counts.1,
        "numberAvailable": counts.2,
        "numberUnavailable": desired.len().saturating_sub(counts.2),
        "updatedNumberScheduled": counts.3,
        "observedGeneration": ds.meta().generation,
    });
    write_status(client, ds.as_ref(), &current, status).await?;
    let busy = !doomed.is_empty() || !missing.is_empty() || counts.3 < desired.len();
    Ok(match wake {
        Some(w) => Action::requeue(w + Duration::from_millis(200)),
        None if busy => Action::requeue(Duration::from_secs(5)),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: Value, taints: Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": labels},
            "spec": {"taints": taints},
        }))
        .unwrap()
    }

    fn pod(spec: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn placement_follows_selectors_and_taint_effects() {
        let mut p = pod(json!({"containers": [], "nodeSelector": {"site": "a"}}));
        let tolerations = daemon_tolerations(false);
        p.spec.as_mut().unwrap().tolerations = Some(tolerations);
        let a = node(json!({"site": "a"}), json!([]));
        let b = node(json!({"site": "b"}), json!([]));
        assert_eq!(placement(&p, &a), Some(true));
        assert_eq!(placement(&p, &b), None);
        // An offline edge node (the lifecycle controller's taint) still gets its daemon pod.
        let offline = node(
            json!({"site": "a"}),
            json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}]),
        );
        assert_eq!(placement(&p, &offline), Some(true));
        // A NoSchedule taint: no new pod, an existing one stays; NoExecute: it goes.
        let reserved = node(
            json!({"site": "a"}),
            json!([{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]),
        );
        assert_eq!(placement(&p, &reserved), Some(false));
        let evicting = node(
            json!({"site": "a"}),
            json!([{"key": "dedicated", "value": "x", "effect": "NoExecute"}]),
        );
        assert_eq!(placement(&p, &evicting), None);
    }
}
