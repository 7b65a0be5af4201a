//! The Deployment controller (apps/v1), as Kubernetes does it: a Deployment owns one ReplicaSet
//! per pod template it has had, named `<deployment>-<pod-template-hash>`, and moves replicas
//! between them.
//!
//! - Revisions: the ReplicaSet of the current template carries
//!   `deployment.kubernetes.io/revision` one above the highest so far (a rollback to an older
//!   template reuses its ReplicaSet and gives it the new number); the Deployment carries the
//!   same annotation. Its other annotations (`kubernetes.io/change-cause`) are copied to the
//!   ReplicaSet, which is what `kubectl rollout history` prints and `kubectl rollout undo`
//!   copies back.
//! - `RollingUpdate`: the new ReplicaSet grows while the total stays within `replicas +
//!   maxSurge`; old ones shrink (unhealthy pods first) while at least `replicas -
//!   maxUnavailable` pods stay available. `Recreate`: old ones go to zero, and the new one
//!   grows once their pods are gone.
//! - `spec.paused`: nothing rolls; a replica change still reaches the current ReplicaSet.
//! - Old ReplicaSets scaled to zero beyond `revisionHistoryLimit` are deleted, oldest first.
//! - Status: replicas, updated, ready, available, unavailable, observedGeneration and the
//!   `Available` / `Progressing` conditions that `kubectl rollout status` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{
    Error, condition, controller_ref, delete_pod, owned_by, owned_pods, requeue_after_error,
    scaled, selector_string, write_status,
};

/// The label carrying the template hash.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation on Deployments and their ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX: &str = "deployment.kubernetes.io/max-replicas";
/// Annotations of the Deployment that are not copied to its ReplicaSets (kubectl's list).
const NOT_COPIED: [&str; 5] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    "deployment.kubernetes.io/revision-history",
    DESIRED,
    MAX,
];

struct Ctx {
    client: kube::Client,
}

/// Runs the controller until aborted.
pub async fn run(client: kube::Client) {
    let deployments = Api::<Deployment>::all(client.clone());
    let sets = Api::<ReplicaSet>::all(client.clone());
    Controller::new(deployments, crate::lists::config())
        .owns(sets, crate::lists::config())
        .run(
            reconcile,
            |_, e, _| requeue_after_error("Deployment", e),
            Arc::new(Ctx { client }),
        )
        .for_each(|_| async {})
        .await;
}

/// FNV-1a of the template's JSON, as ten hex digits: stable across restarts and versions.
pub fn template_hash(template: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in serde_json::to_vec(template).unwrap_or_default() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status
        .as_ref()
        .map(|s| {
            (
                s.replicas,
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

/// A change of one ReplicaSet's `spec.replicas` (and its annotations).
async fn scale_rs(
    client: &kube::Client,
    rs: &ReplicaSet,
    replicas: i32,
    annotations: Value,
) -> Result<(), Error> {
    let api = Api::<ReplicaSet>::namespaced(client.clone(), &rs.namespace().unwrap_or_default());
    api.patch(
        &rs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"annotations": annotations},
            "spec": {"replicas": replicas},
        })),
    )
    .await?;
    Ok(())
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if d.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let spec_v = serde_json::to_value(d.spec.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let replicas = spec_v["replicas"].as_i64().unwrap_or(1).max(0) as i32;
    let template = spec_v["template"].clone();
    let hash = template_hash(&template);
    let paused = spec_v["paused"] == true;
    let recreate = spec_v["strategy"]["type"] == "Recreate";
    let rolling = &spec_v["strategy"]["rollingUpdate"];
    let surge = scaled(&rolling["maxSurge"], replicas, 25, true)
        .map_err(|e| Error::Spec(format!("spec.strategy.rollingUpdate.maxSurge: {e}")))?;
    let unavailable = scaled(&rolling["maxUnavailable"], replicas, 25, false)
        .map_err(|e| Error::Spec(format!("spec.strategy.rollingUpdate.maxUnavailable: {e}")))?;
    let (surge, unavailable) = if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    };

    let rs_api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    let listed = rs_api
        .list(&ListParams::default().labels(&selector_string(&spec_v["selector"])))
        .await?;
    let mut sets: Vec<ReplicaSet> = listed
        .items
        .into_iter()
        .filter(|r| owned_by(r, &uid) && r.meta().deletion_timestamp.is_none())
        .collect();
    sets.sort_by_key(|r| {
        (
            revision(r),
            r.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
    });
    let max_rev = sets.iter().map(revision).max().unwrap_or(0);
    // The ReplicaSet of the current template, and the older ones (oldest first).
    let (mut current, olds): (Vec<ReplicaSet>, Vec<ReplicaSet>) = sets
        .into_iter()
        .partition(|r| r.labels().get(HASH_LABEL) == Some(&hash));
    let new_rs = current.pop();

    // Annotations the ReplicaSet of the current template carries.
    let mut annotations: BTreeMap<String, String> = d
        .annotations()
        .iter()
        .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(DESIRED.into(), replicas.to_string());
    annotations.insert(MAX.into(), (replicas + surge).to_string());

    let old_spec: i32 = olds.iter().map(spec_replicas).sum();
    let old_pods: i32 = olds.iter().map(|r| status_of(r).0).sum();
    // The size of the current template's ReplicaSet, now `cur`: `Recreate` waits for the old
    // pods to be gone; a rolling update grows within `replicas + maxSurge`; paused, it only
    // follows a scale change once nothing else is left.
    let target = |cur: i32| {
        if paused {
            if old_spec == 0 { replicas } else { cur }
        } else if recreate {
            if old_pods > 0 || old_spec > 0 {
                0
            } else {
                replicas
            }
        } else if cur > replicas {
            replicas
        } else {
            let room = replicas + surge - (old_spec + cur);
            (cur + room.max(0)).min(replicas)
        }
    };
    let mut changed = false;

    // The ReplicaSet of the current template: created, or brought back with a new revision.
    let new_rev;
    match &new_rs {
        None if !paused => {
            new_rev = max_rev + 1;
            let mut rs_template = template.clone();
            rs_template["metadata"]["labels"][HASH_LABEL] = json!(hash);
            let mut selector = spec_v["selector"].clone();
            selector["matchLabels"][HASH_LABEL] = json!(hash);
            annotations.insert(REVISION.into(), new_rev.to_string());
            let mut labels = template["metadata"]["labels"].clone();
            labels[HASH_LABEL] = json!(hash);
            let rs: ReplicaSet = serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": format!("{name}-{hash}"), "namespace": ns, "labels": labels,
                    "annotations": annotations, "ownerReferences": [controller_ref(d.as_ref())],
                },
                "spec": {
                    "replicas": target(0), "selector": selector, "template": rs_template,
                    "minReadySeconds": spec_v["minReadySeconds"],
                },
            }))
            .map_err(|e| Error::Spec(format!("spec.template: {e}")))?;
            match rs_api.create(&PostParams::default(), &rs).await {
                Ok(_) => {}
                // Created by an earlier pass whose list did not see it yet.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            changed = true;
        }
        None => new_rev = max_rev,
        Some(rs) => {
            new_rev = if revision(rs) < max_rev && !paused {
                max_rev + 1
            } else {
                revision(rs)
            };
            let want_ann = rs.annotations().get(REVISION) != Some(&new_rev.to_string())
                || annotations
                    .iter()
                    .any(|(k, v)| rs.annotations().get(k) != Some(v));
            let cur = spec_replicas(rs);
            let size = target(cur);
            if size != cur || want_ann {
                annotations.insert(REVISION.into(), new_rev.to_string());
                scale_rs(client, rs, size, json!(annotations)).await?;
                changed = true;
            }
        }
    }

    // Old ReplicaSets shrink.
    if !paused {
        if recreate {
            for r in &olds {
                if spec_replicas(r) > 0 {
                    scale_rs(client, r, 0, json!({})).await?;
                    changed = true;
                }
            }
        } else {
            let new_now = new_rs.as_ref().map(|r| (spec_replicas(r), status_of(r).2));
            let min_available = replicas - unavailable;
            let all_spec = old_spec + new_now.map_or(0, |n| n.0);
            let new_unavailable = new_now.map_or(0, |(s, a)| (s - a).max(0));
            // First the old pods that are not available anyway.
            let mut budget = (all_spec - min_available - new_unavailable).max(0);
            let mut sizes: Vec<i32> = olds.iter().map(spec_replicas).collect();
            for (k, r) in olds.iter().enumerate() {
                let unhealthy = (sizes[k] - status_of(r).2).max(0);
                let cut = unhealthy.min(budget);
                sizes[k] -= cut;
                budget -= cut;
            }
            // Then available ones, oldest first, while enough stay available.
            let all_available: i32 =
                olds.iter().map(|r| status_of(r).2).sum::<i32>() + new_now.map_or(0, |n| n.1);
            let mut budget = (all_available - min_available).max(0);
            for (k, r) in olds.iter().enumerate() {
                let cut = sizes[k].min(budget).min(status_of(r).2);
                sizes[k] -= cut;
                budget -= cut;
            }
            for (k, r) in olds.iter().enumerate() {
                if sizes[k] != spec_replicas(r) {
                    scale_rs(client, r, sizes[k], json!({})).await?;
                    changed = true;
                }
            }
        }
        // History beyond revisionHistoryLimit goes, oldest first.
        let limit = spec_v["revisionHistoryLimit"].as_i64().unwrap_or(10).max(0) as usize;
        let idle: Vec<&ReplicaSet> = olds
            .iter()
            .filter(|r| spec_replicas(r) == 0 && status_of(r).0 == 0)
            .collect();
        for r in idle.iter().take(idle.len().saturating_sub(limit)) {
            match rs_api
                .delete(&r.name_any(), &DeleteParams::background())
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                other => {
                    other?;
                }
            }
        }
    }

    // Pods an older Sedge created straight from the template, owned by the Deployment: they go
    // once the ReplicaSet has the replicas available.
    let legacy: Vec<Pod> = owned_pods(client, &ns, &spec_v["selector"], &uid).await?;
    let (updated, _, new_available) = new_rs.as_ref().map(status_of).unwrap_or_default();
    if !legacy.is_empty() && new_available >= replicas {
        for p in &legacy {
            delete_pod(client, p).await?;
        }
    }

    // The Deployment's revision annotation.
    if new_rev > 0 && d.annotations().get(REVISION) != Some(&new_rev.to_string()) {
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {REVISION: new_rev.to_string()}}}),
                ),
            )
            .await?;
    }

    // Status, from what the ReplicaSets report.
    let (mut total, mut ready, mut avail) = (legacy.len() as i32, 0, 0);
    for r in olds.iter().chain(&new_rs) {
        let (t, rd, a) = status_of(r);
        total += t;
        ready += rd;
        avail += a;
    }
    let old_left = total - updated;
    let complete = !changed
        && new_rs.is_some()
        && updated == replicas
        && new_available >= replicas
        && old_left == 0;
    let prev = serde_json::to_value(d.status.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let available_ok = avail >= replicas - unavailable;
    let rs_name = format!("{name}-{hash}");
    let progressing = if paused {
        condition(
            &prev,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused",
        )
    } else if complete {
        condition(
            &prev,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        )
    } else {
        condition(
            &prev,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{rs_name}\" is progressing."),
        )
    };
    let status = json!({
        "observedGeneration": d.meta().generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "unavailableReplicas": (replicas.max(total) - avail).max(0),
        "conditions": [
            if available_ok {
                condition(&prev, "Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            } else {
                condition(&prev, "Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
            },
            progressing,
        ],
    });
    write_status(client, d.as_ref(), &prev, status).await?;
    Ok(if complete || paused {
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(Duration::from_secs(5))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_changes_with_the_template() {
        let a = json!({"spec": {"containers": [{"name": "c", "image": "x"}]}});
        let b = json!({"spec": {"containers": [{"name": "c", "image": "y"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }
}
