//! The workload controllers of the embedded mode (against a real cluster, its own
//! kube-controller-manager does this: `workloads: false`):
//!
//! - [`deployment`]: Deployments own ReplicaSets, one per pod template (`pod-template-hash`),
//!   numbered by the `deployment.kubernetes.io/revision` annotation, so `kubectl rollout
//!   history/undo/pause/resume/status` work as on Kubernetes.
//! - [`replicaset`]: ReplicaSets own pods: missing ones created, surplus ones deleted.
//! - [`daemonset`]: one pod per matching node, bound to it directly, including nodes that join
//!   later; rolling replacement bounded by `maxUnavailable`, or `OnDelete`.
//! - [`job`]: pods run to completion: `completions`, `parallelism`, `backoffLimit` with
//!   Kubernetes' exponential retry delay, `activeDeadlineSeconds`, `suspend`.
//!
//! All of them own what they create (a controller owner reference), so deleting the owner
//! deletes it through the API server's garbage collector.

pub mod daemonset;
pub mod deployment;
pub mod job;
pub mod replicaset;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

pub use deployment::{HASH_LABEL, template_hash};

/// Errors of a reconcile (retried by the controller).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Spec(String),
}

/// The most pods one reconcile creates (the next pass creates more): a burst of thousands would
/// starve every other writer of the API server.
pub(crate) const CREATE_BURST: usize = 100;

/// Runs the four controllers until aborted.
pub async fn run(client: kube::Client) {
    tokio::join!(
        deployment::run(client.clone()),
        replicaset::run(client.clone()),
        daemonset::run(client.clone()),
        job::run(client),
    );
}

/// What every controller logs when a reconcile fails.
pub(crate) fn requeue_after_error(kind: &str, e: &Error) -> kube::runtime::controller::Action {
    tracing::warn!(kind, error = %e, "reconcile failed; retrying");
    kube::runtime::controller::Action::requeue(Duration::from_secs(2))
}

/// `matchLabels` as a label selector string (`a=b,c=d`) plus `matchExpressions` with `In`,
/// `NotIn`, `Exists` and `DoesNotExist`, which is what list calls take.
pub(crate) fn selector_string(selector: &Value) -> String {
    let mut parts: Vec<String> = selector["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for e in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match e["operator"].as_str().unwrap_or_default() {
            "In" => parts.push(format!("{key} in ({})", values.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    parts.join(",")
}

/// Whether the pod's Ready condition is True.
pub(crate) fn is_ready(p: &Pod) -> bool {
    ready_since(p).is_some()
}

/// When the pod last became Ready, if it is.
pub(crate) fn ready_since(p: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        })
}

/// Whether the pod has been Ready for `min_ready` seconds; if it is Ready but not yet for long
/// enough, how long until it will be.
pub(crate) fn available(p: &Pod, min_ready: i64) -> (bool, Option<Duration>) {
    let Some(since) = ready_since(p) else {
        return (false, None);
    };
    if min_ready <= 0 {
        return (true, None);
    }
    let age = k8s_openapi::jiff::Timestamp::now().as_second() - since.as_second();
    if age >= min_ready {
        (true, None)
    } else {
        (false, Some(Duration::from_secs((min_ready - age) as u64)))
    }
}

/// The pod's phase.
pub(crate) fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Neither being deleted nor finished.
pub(crate) fn is_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none() && !matches!(phase(p), "Succeeded" | "Failed")
}

/// Whether the pod's controller is the object with `uid`.
pub(crate) fn owned_by<K: Resource>(o: &K, uid: &str) -> bool {
    o.owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// A controller owner reference to `owner`.
pub(crate) fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Value {
    json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "name": owner.meta().name, "uid": owner.meta().uid,
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// A pod from `template` (a PodTemplateSpec as JSON) in `ns`, named `<prefix><random>`, with
/// `labels` added and owned by `owner` (a controller reference).
pub(crate) fn pod_from_template(
    template: &Value,
    ns: &str,
    prefix: &str,
    labels: &BTreeMap<String, String>,
    owner: Value,
) -> Result<Pod, Error> {
    let mut meta = template["metadata"].clone();
    if !meta.is_object() {
        meta = json!({});
    }
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    for (k, v) in labels {
        meta["labels"][k] = json!(v);
    }
    meta["generateName"] = json!(prefix);
    meta["namespace"] = json!(ns);
    meta["ownerReferences"] = json!([owner]);
    for k in ["name", "resourceVersion", "uid", "creationTimestamp"] {
        if let Some(m) = meta.as_object_mut() {
            m.remove(k);
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"],
    }))
    .map_err(|e| Error::Spec(format!("spec.template: {e}")))
}

/// Every pod, as the owner trigger of a controller's watch reads it: metadata only (the
/// trigger reads owner references; full pods, listed by three controllers, slowed a restart at
/// 100,000 pods).
pub(crate) fn pods_for_owners(client: &kube::Client) -> Api<kube::core::PartialObjectMeta<Pod>> {
    Api::all(client.clone())
}

/// Lists the pods in `ns` that match `selector` and whose controller is `uid`.
pub(crate) async fn owned_pods(
    client: &kube::Client,
    ns: &str,
    selector: &Value,
    uid: &str,
) -> Result<Vec<Pod>, Error> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let listed = api
        .list(&ListParams::default().labels(&selector_string(selector)))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter(|p| owned_by(p, uid))
        .collect())
}

/// Deletes a pod; one already gone is fine.
pub(crate) async fn delete_pod(client: &kube::Client, p: &Pod) -> Result<(), Error> {
    let api = Api::<Pod>::namespaced(client.clone(), &p.namespace().unwrap_or_default());
    match api.delete(&p.name_any(), &DeleteParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

/// Writes `status` to `obj`'s status subresource unless every key of it already has that value
/// (so an idle controller writes nothing).
pub(crate) async fn write_status<K>(
    client: &kube::Client,
    obj: &K,
    current: &Value,
    status: Value,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let same = status
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| same_value(&current[k], v)));
    if same {
        return Ok(());
    }
    let api = Api::<K>::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Equality where an absent value equals zero/false/empty (how Kubernetes omits them).
fn same_value(a: &Value, b: &Value) -> bool {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
    };
    a == b || (empty(a) && empty(b))
}

/// A status condition, keeping `lastTransitionTime` from `prev` when the status is unchanged.
pub(crate) fn condition(prev: &Value, type_: &str, status: &str, reason: &str, msg: &str) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let old = prev["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_));
    let (since, updated) = match old {
        Some(c) if c["status"] == status && c["reason"] == reason && c["message"] == msg => {
            (c["lastTransitionTime"].clone(), c["lastUpdateTime"].clone())
        }
        Some(c) if c["status"] == status => (c["lastTransitionTime"].clone(), json!(now)),
        _ => (json!(now), json!(now)),
    };
    let mut c = json!({"type": type_, "status": status, "reason": reason, "message": msg,
                       "lastTransitionTime": since});
    if !updated.is_null() {
        c["lastUpdateTime"] = updated;
    }
    c
}

/// `maxSurge`/`maxUnavailable` against `replicas`: an integer, or a percentage rounded up
/// (surge) or down (unavailable) as Kubernetes does.
pub(crate) fn scaled(
    v: &Value,
    replicas: i32,
    default_percent: i32,
    round_up: bool,
) -> Result<i32, String> {
    match v {
        Value::Null => Ok(percent(replicas, default_percent, round_up)),
        Value::Number(n) => n
            .as_i64()
            .map(|i| i as i32)
            .ok_or_else(|| format!("{n} is not a whole number")),
        Value::String(s) => {
            let p = s
                .strip_suffix('%')
                .and_then(|p| p.parse::<i32>().ok())
                .ok_or_else(|| format!("{s:?} is neither an integer nor a percentage"))?;
            Ok(percent(replicas, p, round_up))
        }
        other => Err(format!("{other} is neither an integer nor a percentage")),
    }
}

fn percent(replicas: i32, p: i32, round_up: bool) -> i32 {
    let x = replicas as i64 * p as i64;
    (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_and_unavailable_follow_kubernetes_rounding() {
        assert_eq!(scaled(&Value::Null, 3, 25, true).unwrap(), 1);
        assert_eq!(scaled(&Value::Null, 3, 25, false).unwrap(), 0);
        assert_eq!(scaled(&json!("50%"), 5, 25, true).unwrap(), 3);
        assert_eq!(scaled(&json!(2), 5, 25, true).unwrap(), 2);
        let e = scaled(&json!("lots"), 5, 25, true).unwrap_err();
        assert!(e.contains("\"lots\""), "{e}");
    }

    #[test]
    fn selectors_become_list_strings() {
        let s = selector_string(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }));
        assert_eq!(s, "app=web,tier in (a,b),!canary");
    }

    #[test]
    fn an_unchanged_status_is_not_rewritten() {
        let cur = json!({"replicas": 2, "readyReplicas": 0});
        assert!(same_value(&cur["readyReplicas"], &json!(0)));
        assert!(same_value(&Value::Null, &json!(0)));
        assert!(!same_value(&cur["replicas"], &json!(3)));
    }
}
