//! A minimal scheduler for the embedded mode: binds pending pods to nodes by `nodeSelector`,
//! required node affinity, taints and tolerations, and resource requests against allocatable.
//! Pods it cannot place get `PodScheduled=False`, reason `Unschedulable`, and a message in
//! kube-scheduler's words ("0/3 nodes are available: ..."). Against a real cluster the cluster's
//! scheduler does this and this one stays off (`scheduler: false`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{Cache, quantity};

/// The scheduler names this scheduler answers to.
pub const NAMES: &[&str] = &["", "default-scheduler", "sedge-scheduler"];

/// How often pending pods are retried without any change.
const RETRY: Duration = Duration::from_secs(5);

/// Schedules until aborted.
pub async fn run(client: kube::Client, cache: Cache) {
    if !cache.ready().await {
        return;
    }
    // What this scheduler last wrote per pod, so an unchanged verdict is not written again.
    let mut verdicts: HashMap<String, String> = HashMap::new();
    loop {
        let changed = cache.changed.notified();
        schedule_pending(&client, &cache, &mut verdicts).await;
        let _ = tokio::time::timeout(RETRY, changed).await;
    }
}

#[derive(Default, Clone, Copy)]
struct Usage {
    cpu: f64,
    memory: f64,
    pods: f64,
}

fn requests(p: &Pod) -> Usage {
    let mut u = Usage {
        pods: 1.0,
        ..Default::default()
    };
    for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
        let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        if let Some(r) = req {
            u.cpu += r
                .get("cpu")
                .and_then(|q| quantity::parse(&q.0).ok())
                .unwrap_or(0.0);
            u.memory += r
                .get("memory")
                .and_then(|q| quantity::parse(&q.0).ok())
                .unwrap_or(0.0);
        }
    }
    u
}

fn allocatable(n: &Node) -> Usage {
    let a = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |k: &str, default: f64| {
        a.and_then(|a| a.get(k))
            .and_then(|q| quantity::parse(&q.0).ok())
            .unwrap_or(default)
    };
    Usage {
        cpu: get("cpu", f64::INFINITY),
        memory: get("memory", f64::INFINITY),
        pods: get("pods", 110.0),
    }
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(x)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|x| x.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > x } else { v < x }
        }
        _ => false,
    }
}

pub(crate) fn affinity_matches(p: &Pod, n: &Node) -> bool {
    let labels = n.labels();
    let spec = p.spec.as_ref();
    if let Some(sel) = spec.and_then(|s| s.node_selector.as_ref())
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    let required = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let Some(required) = required else {
        return true;
    };
    // Terms are ORed; the requirements inside a term are ANDed.
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.iter().flatten();
        let fields = term.match_fields.iter().flatten();
        let name = n.name_any();
        exprs
            .clone()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields
                .clone()
                .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name.as_str())))
            && (exprs.count() + fields.count() > 0)
    })
}

pub(crate) fn tolerates(ts: &[Toleration], taint: &Taint) -> bool {
    ts.iter().any(|t| {
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => {
                t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
            }
        };
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        key_ok && value_ok && effect_ok
    })
}

fn untolerated_taint(p: &Pod, n: &Node) -> Option<String> {
    let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref())?;
    let ts = p
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(ts, t))
        .map(|t| match &t.value {
            Some(v) if !v.is_empty() => format!("{{{}: {}}}", t.key, v),
            _ => format!("{{{}: }}", t.key),
        })
}

/// Why a node does not fit a pod, in kube-scheduler's words; `None` when it fits. `want` is
/// the pod's [`requests`], `have` the node's [`allocatable`] (computed once, not per pair).
fn misfit(p: &Pod, n: &Node, used: Usage, want: Usage, have: Usage) -> Option<String> {
    if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some("node(s) were unschedulable".into());
    }
    if !affinity_matches(p, n) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    if let Some(t) = untolerated_taint(p, n) {
        return Some(format!("node(s) had untolerated taint {t}"));
    }
    if used.pods + 1.0 > have.pods {
        return Some("Too many pods".into());
    }
    if want.cpu > 0.0 && used.cpu + want.cpu > have.cpu + 1e-9 {
        return Some("Insufficient cpu".into());
    }
    if want.memory > 0.0 && used.memory + want.memory > have.memory {
        return Some("Insufficient memory".into());
    }
    None
}

/// A node as the scheduler sees it in one pass: its name and allocatable resources, parsed
/// once per pass instead of twice per (pod, node) pair. (Measured with scalemark at 1,000
/// nodes, this alone did not change pod start-up: see benchmarks/README.md.)
struct Candidate {
    node: std::sync::Arc<Node>,
    name: String,
    have: Usage,
}

impl Candidate {
    fn all(nodes: Vec<std::sync::Arc<Node>>) -> Vec<Candidate> {
        nodes
            .into_iter()
            .map(|node| Candidate {
                name: node.name_any(),
                have: allocatable(&node),
                node,
            })
            .collect()
    }
}

/// Picks a node for `p`, or says why none fits.
fn choose(p: &Pod, nodes: &[Candidate], usage: &HashMap<String, Usage>) -> Result<String, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str)> = None;
    let want = requests(p);
    for c in nodes {
        let (n, name, have) = (&c.node, c.name.as_str(), c.have);
        let used = usage.get(name).copied().unwrap_or_default();
        match misfit(p, n, used, want, have) {
            Some(r) => *reasons.entry(r).or_default() += 1,
            None => {
                // Least allocated: the node with the most room left after placing the pod wins.
                let free = |u: f64, w: f64, h: f64| {
                    if h.is_finite() && h > 0.0 {
                        1.0 - (u + w) / h
                    } else {
                        1.0
                    }
                };
                let score = free(used.cpu, want.cpu, have.cpu)
                    + free(used.memory, want.memory, have.memory)
                    + free(used.pods, 1.0, have.pods);
                if best
                    .as_ref()
                    .is_none_or(|(s, b)| score > *s || (score == *s && name < *b))
                {
                    best = Some((score, name));
                }
            }
        }
    }
    match best {
        Some((_, n)) => Ok(n.to_string()),
        None => {
            let parts: Vec<String> = reasons.iter().map(|(r, c)| format!("{c} {r}")).collect();
            Err(if nodes.is_empty() {
                "0/0 nodes are available: no nodes registered.".into()
            } else {
                format!(
                    "0/{} nodes are available: {}.",
                    nodes.len(),
                    parts.join(", ")
                )
            })
        }
    }
}

async fn schedule_pending(
    client: &kube::Client,
    cache: &Cache,
    verdicts: &mut HashMap<String, String>,
) {
    let pods = cache.pods.state();
    let nodes = Candidate::all(cache.nodes.state());
    let mut usage: HashMap<String, Usage> = HashMap::new();
    for p in &pods {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        let done = matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !node.is_empty() && !done {
            let r = requests(p);
            let u = usage.entry(node.to_string()).or_default();
            u.cpu += r.cpu;
            u.memory += r.memory;
            u.pods += 1.0;
        }
    }
    let mut pending: Vec<_> = pods
        .iter()
        .filter(|p| {
            let s = p.spec.as_ref();
            s.and_then(|s| s.node_name.as_deref())
                .unwrap_or_default()
                .is_empty()
                && p.metadata.deletion_timestamp.is_none()
                && NAMES.contains(
                    &s.and_then(|s| s.scheduler_name.as_deref())
                        .unwrap_or_default(),
                )
        })
        .collect();
    pending.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let live: std::collections::HashSet<String> = pending
        .iter()
        .map(|p| p.metadata.uid.clone().unwrap_or_default())
        .collect();
    verdicts.retain(|uid, _| live.contains(uid));
    for p in pending {
        let ns = p.namespace().unwrap_or_default();
        let name = p.name_any();
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        match choose(p, &nodes, &usage) {
            Ok(node) => {
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name, "namespace": ns, "uid": uid},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                });
                let bound: Result<serde_json::Value, _> = api
                    .create_subresource("binding", &name, &PostParams::default(), &binding)
                    .await;
                match bound {
                    Ok(_) => {
                        tracing::info!(pod = %format!("{ns}/{name}"), %node, "scheduled");
                        let r = requests(p);
                        let u = usage.entry(node).or_default();
                        u.cpu += r.cpu;
                        u.memory += r.memory;
                        u.pods += 1.0;
                        verdicts.remove(&uid);
                    }
                    // The cache had not yet seen our own earlier binding of this pod.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        tracing::debug!(pod = %format!("{ns}/{name}"), "already bound")
                    }
                    Err(e) => {
                        tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "binding failed")
                    }
                }
            }
            Err(why) => {
                if verdicts.get(&uid) == Some(&why) {
                    continue;
                }
                let cond = json!({
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": why,
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                });
                let r = api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(
                            json!({"status": {"phase": "Pending", "conditions": [cond]}}),
                        ),
                    )
                    .await;
                match r {
                    Ok(_) => {
                        tracing::info!(pod = %format!("{ns}/{name}"), %why, "unschedulable");
                        verdicts.insert(uid, why);
                    }
                    Err(e) => {
                        tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot record unschedulable")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn node(
        name: &str,
        labels: serde_json::Value,
        taints: serde_json::Value,
        cpu: &str,
    ) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"taints": taints},
                "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"}},
            }))
            .unwrap(),
        )
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn places_by_selector_affinity_taints_and_room() {
        let nodes = Candidate::all(vec![
            node("a", json!({"zone": "x"}), json!([]), "1"),
            node(
                "b",
                json!({"zone": "y"}),
                json!([{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]),
                "4",
            ),
            node("c", json!({"zone": "y"}), json!([]), "500m"),
        ]);
        let usage = HashMap::new();
        let c = |cpu: &str| json!({"name": "c", "resources": {"requests": {"cpu": cpu}}});
        // Selector: only zone y; b is tainted, so c.
        let p = pod(json!({"nodeSelector": {"zone": "y"}, "containers": [c("100m")]}));
        assert_eq!(choose(&p, &nodes, &usage).unwrap(), "c");
        // Tolerating the taint makes b (more room) the best.
        let p = pod(
            json!({"nodeSelector": {"zone": "y"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}], "containers": [c("100m")]}),
        );
        assert_eq!(choose(&p, &nodes, &usage).unwrap(), "b");
        // Required affinity with NotIn.
        let p = pod(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["y"]}]}]}}}, "containers": [c("100m")]}),
        );
        assert_eq!(choose(&p, &nodes, &usage).unwrap(), "a");
        // Too big for anything untainted: a clear message counting each reason.
        let p = pod(json!({"containers": [c("2")]}));
        let e = choose(&p, &nodes, &usage).unwrap_err();
        assert_eq!(
            e,
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: ml}."
        );
        let e = choose(&p, &[], &usage).unwrap_err();
        assert!(e.contains("no nodes"), "{e}");
    }
}
