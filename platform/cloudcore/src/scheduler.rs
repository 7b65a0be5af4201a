//! A minimal scheduler for the embedded mode: binds pending pods to nodes by `nodeSelector`,
//! required node affinity, taints and tolerations, and resource requests against allocatable.
//! Pods it cannot place get `PodScheduled=False`, reason `Unschedulable`, and a message in
//! kube-scheduler's words ("0/3 nodes are available: ..."). Against a real cluster the cluster's
//! scheduler does this and this one stays off (`scheduler: false`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::edgecontroller::pod_node;
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
    let mut memo = Memo::default();
    let mut binder = Binder {
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(BINDS_IN_FLIGHT)),
        tasks: tokio::task::JoinSet::new(),
        stats: cache.scheduling.clone(),
        beats: cache.heartbeats.clone(),
    };
    loop {
        // Bindings that failed since the last pass: their pods are placed again.
        while let Some(done) = binder.tasks.try_join_next() {
            if let Ok(Some(uid)) = done {
                memo.assumed.remove(&uid);
            }
        }
        let changed = cache.changed.notified();
        schedule_pending(&client, &cache, &mut memo, &mut binder).await;
        let _ = tokio::time::timeout(RETRY, changed).await;
    }
}

/// What the scheduler keeps between passes, so a pass costs the pods waiting, not the cluster.
/// (Profiled with scalemark at 1,000 nodes x 5 pods, release build: 38% of the cloud process's
/// CPU went to the scheduler, nearly half of it parsing every node's allocatable again on every
/// pod or node change, even with no pod pending; see benchmarks/README.md.)
#[derive(Default)]
struct Memo {
    /// What this scheduler last wrote per pod (uid), so an unchanged verdict is not written again.
    verdicts: HashMap<String, String>,
    /// Each node's allocatable, parsed at the node's resourceVersion.
    allocatable: HashMap<String, (String, Usage)>,
    /// Each pod's requests by uid (a pod's containers and their requests do not change).
    requests: HashMap<String, Usage>,
    /// Pods bound by this scheduler that the cache does not show bound yet (uid -> node,
    /// requests, when): kube-scheduler's "assumed" pods. Without them, every pass made before
    /// the watch caught up bound them again (a 409 each); measured at 1,000 nodes and 50 pods/s
    /// that feedback loop (more wasted calls, a slower API, a later watch) left pods unbound
    /// for 54 s at p99.
    assumed: HashMap<String, (String, Usage, Instant)>,
    /// Where the next pod's search for a node starts (kube-scheduler's `nextStartNodeIndex`),
    /// so sampled searches spread over all nodes.
    start: usize,
}

/// What the scheduler did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Passes that had pods to place.
    pub passes: AtomicU64,
    /// Pods bound.
    pub bound: AtomicU64,
    /// Bindings refused because the pod was bound already (409).
    pub conflicts: AtomicU64,
}

/// How long a binding is assumed to have taken without the cache showing it.
const ASSUME: Duration = Duration::from_secs(30);

/// Bindings sent to the API at once. A pass decides every pending pod's node first (each
/// decision counts against the next), then hands the bindings to [`Binder`] and does not wait
/// for them: one at a time, each waiting its write, a pass at 10,000 heartbeating nodes bound
/// about 4 pods a second; waiting for a pass's bindings before the next pass held pods created
/// meanwhile back for the whole batch (7 passes for 10,000 pods, create to bound 416 s p50).
const BINDS_IN_FLIGHT: usize = 16;

/// How many feasible nodes a pod's search stops at, for `n` nodes: kube-scheduler's
/// `percentageOfNodesToScore` default (50% less 1% per 125 nodes, at least 5%, at least 100
/// nodes). At 10,000 nodes a pod looks at about 500 of them instead of all; profiled at 10,000
/// nodes x 1 pod, trying every node for every pending pod was 38% of the cloud's CPU.
fn feasible_to_find(n: usize) -> usize {
    const MIN: usize = 100;
    if n <= MIN {
        return n;
    }
    let percent = 50usize.saturating_sub(n / 125).max(5);
    (n * percent / 100).max(MIN)
}

/// Sends bindings to the API in the background, at most [`BINDS_IN_FLIGHT`] at once; a task
/// ends with the uid of a pod whose binding did not take, so the scheduler places it again.
/// The tasks belong to the scheduler: when it stops (this core lost the controllers' Lease),
/// the bindings not yet sent are dropped with it, not sent by a former leader.
struct Binder {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    tasks: tokio::task::JoinSet<Option<String>>,
    stats: std::sync::Arc<Stats>,
    /// Heartbeats give way to bindings ([`crate::heartbeats::Heartbeats::urgent`]).
    beats: std::sync::Arc<crate::heartbeats::Heartbeats>,
}

impl Binder {
    /// Binds `ns/name` (uid `uid`) to `node` once a slot is free; the caller does not wait.
    fn bind(&mut self, api: Api<Pod>, ns: String, name: String, uid: String, node: String) {
        let (slots, stats) = (self.slots.clone(), self.stats.clone());
        let urgent = self.beats.urgent();
        self.tasks.spawn(async move {
            let _urgent = urgent;
            let Ok(_slot) = slots.acquire_owned().await else {
                return Some(uid);
            };
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            let bound: Result<serde_json::Value, _> = api
                .create_subresource("binding", &name, &PostParams::default(), &binding)
                .await;
            let pod = format!("{ns}/{name}");
            match bound {
                Ok(_) => {
                    tracing::info!(%pod, %node, "scheduled");
                    stats.bound.fetch_add(1, Ordering::Relaxed);
                    None
                }
                // Bound already (by an earlier pass whose assumption expired, or another
                // scheduler): the cache shows where once it catches up.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%pod, "already bound");
                    Some(uid)
                }
                Err(e) => {
                    tracing::warn!(%pod, error = %e, "binding failed");
                    Some(uid)
                }
            }
        });
    }
}

#[derive(Default, Clone, Copy)]
struct Usage {
    cpu: f64,
    memory: f64,
    pods: f64,
}

impl Usage {
    /// Counts one more pod asking for `r`.
    fn add(&mut self, r: Usage) {
        self.cpu += r.cpu;
        self.memory += r.memory;
        self.pods += 1.0;
    }
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

/// A node as the scheduler sees it in one pass: the node and its allocatable resources, parsed
/// once per node version instead of twice per (pod, node) pair.
struct Candidate {
    node: std::sync::Arc<Node>,
    have: Usage,
}

impl Candidate {
    fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    /// The candidates, the allocatable of each taken from `memo` while the node's version is
    /// the one it was parsed at; `memo` keeps only the nodes that still exist.
    fn remembered(
        nodes: Vec<std::sync::Arc<Node>>,
        memo: &mut HashMap<String, (String, Usage)>,
    ) -> Vec<Candidate> {
        let mut next = HashMap::with_capacity(nodes.len());
        let out = nodes
            .into_iter()
            .map(|node| {
                let name = node.name_any();
                let rv = node.resource_version().unwrap_or_default();
                let have = match memo.remove(&name) {
                    Some((at, have)) if at == rv => have,
                    _ => allocatable(&node),
                };
                next.insert(name, (rv, have));
                Candidate { node, have }
            })
            .collect();
        *memo = next;
        out
    }
}

/// Picks a node for `p` (its index in `nodes`), or says why none fits. `want` is the pod's
/// [`requests`]. The search starts at node `*start` and stops once it has found `enough` nodes
/// that fit ([`feasible_to_find`]), the best of those winning; `*start` moves past the nodes
/// looked at. A pod no node fits has looked at them all, so its message counts every node.
fn choose(
    p: &Pod,
    want: Usage,
    nodes: &[Candidate],
    usage: &HashMap<&str, Usage>,
    start: &mut usize,
    enough: usize,
) -> Result<usize, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str, usize)> = None;
    let n_nodes = nodes.len();
    let first = if n_nodes == 0 { 0 } else { *start % n_nodes };
    let (mut feasible, mut looked) = (0, 0);
    for i in (first..n_nodes).chain(0..first) {
        if feasible == enough {
            break;
        }
        looked += 1;
        let c = &nodes[i];
        let (n, name, have) = (&c.node, c.name(), c.have);
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
                feasible += 1;
                let score = free(used.cpu, want.cpu, have.cpu)
                    + free(used.memory, want.memory, have.memory)
                    + free(used.pods, 1.0, have.pods);
                if best
                    .as_ref()
                    .is_none_or(|(s, b, _)| score > *s || (score == *s && name < *b))
                {
                    best = Some((score, name, i));
                }
            }
        }
    }
    if n_nodes > 0 {
        *start = (first + looked) % n_nodes;
    }
    match best {
        Some((_, _, i)) => Ok(i),
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
    memo: &mut Memo,
    binder: &mut Binder,
) {
    // The pods waiting come from the cache's index: scanning every pod on each pass (woken by
    // every node heartbeat) was 12% of the cloud's CPU at 10,000 nodes with 20,000 pods.
    let waiting = cache.unplaced_pods();
    let mut pending: Vec<_> = waiting
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
    let live: std::collections::HashSet<&str> = pending
        .iter()
        .filter_map(|p| p.metadata.uid.as_deref())
        .collect();
    memo.verdicts.retain(|uid, _| live.contains(uid.as_str()));
    // Bound by us but not yet seen bound: not placed again (until the assumption expires).
    memo.assumed
        .retain(|uid, (_, _, at)| live.contains(uid.as_str()) && at.elapsed() < ASSUME);
    pending.retain(|p| {
        !memo
            .assumed
            .contains_key(p.metadata.uid.as_deref().unwrap_or_default())
    });
    // Most passes follow a status change with nothing to place: they end here.
    if pending.is_empty() {
        return;
    }
    cache.scheduling.passes.fetch_add(1, Ordering::Relaxed);
    pending.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let pods = cache.pods.state();
    let nodes = Candidate::remembered(cache.nodes.state(), &mut memo.allocatable);
    let mut known = HashMap::with_capacity(pods.len());
    let mut usage: HashMap<&str, Usage> = HashMap::new();
    for p in &pods {
        let uid = p.metadata.uid.as_deref().unwrap_or_default();
        let r = match memo.requests.remove(uid) {
            Some(r) => r,
            None => requests(p),
        };
        known.insert(uid.to_string(), r);
        let node = pod_node(p);
        let done = matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !node.is_empty() && !done {
            usage.entry(node).or_default().add(r);
        }
    }
    memo.requests = known;
    let by_name: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name(), i))
        .collect();
    for (node, r, _) in memo.assumed.values() {
        if let Some(&i) = by_name.get(node.as_str()) {
            usage.entry(nodes[i].name()).or_default().add(*r);
        }
    }
    // How many fitting nodes each pod's search stops at: the same for every pod of the pass.
    let enough = feasible_to_find(nodes.len());
    for p in pending {
        let ns = p.namespace().unwrap_or_default();
        let name = p.name_any();
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let want = memo
            .requests
            .get(&uid)
            .copied()
            .unwrap_or_else(|| requests(p));
        match choose(p, want, &nodes, &usage, &mut memo.start, enough) {
            Ok(i) => {
                // Assumed on its node from the decision on, so the next pod sees it there.
                let node = nodes[i].name();
                usage.entry(node).or_default().add(want);
                memo.verdicts.remove(&uid);
                memo.assumed
                    .insert(uid.clone(), (node.to_string(), want, Instant::now()));
                binder.bind(api, ns, name, uid, node.to_string());
            }
            Err(why) => {
                if memo.verdicts.get(&uid) == Some(&why) {
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
                        memo.verdicts.insert(uid, why);
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

    fn name_of(nodes: &[Candidate], i: usize) -> &str {
        nodes[i].name()
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn places_by_selector_affinity_taints_and_room() {
        let nodes = Candidate::remembered(
            vec![
                node("a", json!({"zone": "x"}), json!([]), "1"),
                node(
                    "b",
                    json!({"zone": "y"}),
                    json!([{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]),
                    "4",
                ),
                node("c", json!({"zone": "y"}), json!([]), "500m"),
            ],
            &mut HashMap::new(),
        );
        let usage = HashMap::new();
        let c = |cpu: &str| json!({"name": "c", "resources": {"requests": {"cpu": cpu}}});
        // Selector: only zone y; b is tainted, so c.
        let p = pod(json!({"nodeSelector": {"zone": "y"}, "containers": [c("100m")]}));
        assert_eq!(
            name_of(
                &nodes,
                choose(&p, requests(&p), &nodes, &usage, &mut 0, 3).unwrap()
            ),
            "c"
        );
        // Tolerating the taint makes b (more room) the best.
        let p = pod(
            json!({"nodeSelector": {"zone": "y"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}], "containers": [c("100m")]}),
        );
        assert_eq!(
            name_of(
                &nodes,
                choose(&p, requests(&p), &nodes, &usage, &mut 0, 3).unwrap()
            ),
            "b"
        );
        // Required affinity with NotIn.
        let p = pod(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["y"]}]}]}}}, "containers": [c("100m")]}),
        );
        assert_eq!(
            name_of(
                &nodes,
                choose(&p, requests(&p), &nodes, &usage, &mut 0, 3).unwrap()
            ),
            "a"
        );
        // Too big for anything untainted: a clear message counting each reason.
        let p = pod(json!({"containers": [c("2")]}));
        let e = choose(&p, requests(&p), &nodes, &usage, &mut 0, 3).unwrap_err();
        assert_eq!(
            e,
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: ml}."
        );
        let e = choose(&p, requests(&p), &[], &usage, &mut 0, 0).unwrap_err();
        assert!(e.contains("no nodes"), "{e}");
    }

    #[test]
    fn a_search_looks_at_a_share_of_the_nodes_and_moves_on() {
        // kube-scheduler's numbers: all of a small cluster, then a falling share, at least 5%.
        let shares: Vec<usize> = [50, 100, 1_000, 5_000, 10_000, 100_000]
            .into_iter()
            .map(feasible_to_find)
            .collect();
        assert_eq!(shares, [50, 100, 420, 500, 500, 5_000]);
        let nodes = Candidate::remembered(
            (0..1_000)
                .map(|i| node(&format!("n{i:04}"), json!({}), json!([]), "1"))
                .collect(),
            &mut HashMap::new(),
        );
        let mut usage = HashMap::new();
        // Every node but the last one looked at holds a pod: the search picks the emptiest of
        // the 420 nodes it looks at, which is that one, and the next search starts after them.
        for c in &nodes[..419] {
            usage.insert(
                c.name(),
                Usage {
                    cpu: 0.5,
                    memory: 0.0,
                    pods: 1.0,
                },
            );
        }
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let mut start = 0;
        let i = choose(&p, requests(&p), &nodes, &usage, &mut start, 420).unwrap();
        assert_eq!((name_of(&nodes, i), start), ("n0419", 420));
        // From there on, the next 420: the first of them (all equal, the smallest name wins).
        let i = choose(&p, requests(&p), &nodes, &usage, &mut start, 420).unwrap();
        assert_eq!((name_of(&nodes, i), start), ("n0420", 840));
        // Wrapping around the end: n0840..n0999 are empty, n0000..n0259 are not.
        let i = choose(&p, requests(&p), &nodes, &usage, &mut start, 420).unwrap();
        assert_eq!((name_of(&nodes, i), start), ("n0840", 260));
        // A pod nothing fits looks at every node, and the message counts them all.
        let big =
            pod(json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "2"}}}]}));
        let e = choose(&big, requests(&big), &nodes, &usage, &mut start, 420).unwrap_err();
        assert_eq!(e, "0/1000 nodes are available: 1000 Insufficient cpu.");
        assert_eq!(start, 260);
    }

    /// One pass's cost, every node tried per pod (before) against kube-scheduler's share
    /// (after), in the same process: `cargo test --release -p sedge-cloudcore --lib
    /// scheduler::tests::pass_cost -- --ignored --nocapture`. Also how evenly the pods landed
    /// (most pods on one node), since a sampled search no longer sees the emptiest node.
    #[test]
    #[ignore = "a benchmark: prints a table"]
    fn pass_cost() {
        println!(
            "| nodes | pending pods | nodes looked at per pod | pass | per pod | most pods on a node | ratio |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (n, pending) in [(1_000, 1_000), (5_000, 5_000), (10_000, 10_000)] {
            let nodes = Candidate::remembered(
                (0..n)
                    .map(|i| node(&format!("n{i:05}"), json!({"zone": "a"}), json!([]), "4"))
                    .collect(),
                &mut HashMap::new(),
            );
            let p = pod(json!({"nodeSelector": {"zone": "a"},
                "containers": [{"name": "c", "resources": {"requests": {"cpu": "100m"}}}]}));
            let want = requests(&p);
            let mut base = None;
            for (label, enough) in [("all", n), ("sampled", feasible_to_find(n))] {
                let mut usage: HashMap<&str, Usage> = HashMap::new();
                let mut start = 0;
                let t = Instant::now();
                for _ in 0..pending {
                    let i = choose(&p, want, &nodes, &usage, &mut start, enough).unwrap();
                    usage.entry(nodes[i].name()).or_default().add(want);
                }
                let took = t.elapsed();
                let most = usage.values().map(|u| u.pods as u64).max().unwrap_or(0);
                let ratio = match base {
                    None => {
                        base = Some(took);
                        "baseline".to_string()
                    }
                    Some(b) => format!("{:.1}x faster", b.as_secs_f64() / took.as_secs_f64()),
                };
                println!(
                    "| {n} | {pending} | {label} ({enough}) | {:.2} s | {:.1} us | {most} | {ratio} |",
                    took.as_secs_f64(),
                    took.as_secs_f64() * 1e6 / pending as f64
                );
            }
        }
    }

    #[test]
    fn allocatable_is_parsed_again_only_when_the_node_changes() {
        let at = |name: &str, rv: &str, cpu: &str| {
            let mut n = node(name, json!({}), json!([]), cpu);
            Arc::make_mut(&mut n).metadata.resource_version = Some(rv.into());
            n
        };
        let mut memo = HashMap::new();
        let c = Candidate::remembered(vec![at("a", "1", "1"), at("b", "1", "2")], &mut memo);
        assert_eq!((c[0].have.cpu, c[1].have.cpu), (1.0, 2.0));
        // A remembered value is used while the version holds: poison it to see that it is.
        memo.get_mut("a").unwrap().1.cpu = 7.0;
        let c = Candidate::remembered(vec![at("a", "1", "1"), at("b", "2", "4")], &mut memo);
        assert_eq!((c[0].have.cpu, c[1].have.cpu), (7.0, 4.0));
        // A new version is parsed again; a node gone is forgotten.
        let c = Candidate::remembered(vec![at("a", "3", "1")], &mut memo);
        assert_eq!(c[0].have.cpu, 1.0);
        assert_eq!(memo.len(), 1);
    }
}
