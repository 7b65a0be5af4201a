//! A minimal Deployment controller (apps/v1): pods straight from the template (no ReplicaSets),
//! labelled with `pod-template-hash`, owned by the Deployment (so deleting it deletes them).
//!
//! - Missing pods are created, surplus ones deleted: a deleted pod comes back.
//! - A changed template rolls: `RollingUpdate` creates new pods up to `maxSurge` above the
//!   replica count and deletes old ones while at least `replicas - maxUnavailable` are ready;
//!   `Recreate` deletes the old pods first.
//! - Status: replicas, updated, ready, available, unavailable, observedGeneration and the
//!   `Available` / `Progressing` conditions that `kubectl rollout status` reads.
//!
//! Against a real cluster its own controller does this (`workloads: false`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

/// The label carrying the template hash.
pub const HASH_LABEL: &str = "pod-template-hash";

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Spec(String),
}

struct Ctx {
    client: kube::Client,
}

/// Runs the controller until aborted.
pub async fn run(client: kube::Client) {
    let deployments = Api::<Deployment>::all(client.clone());
    let pods = Api::<Pod>::all(client.clone());
    let ctx = Arc::new(Ctx { client });
    Controller::new(deployments, watcher::Config::default())
        .owns(pods, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "deployment reconcile");
            }
        })
        .await;
}

fn error_policy(_d: Arc<Deployment>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "deployment reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
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

fn scaled(
    v: Option<&IntOrString>,
    replicas: i32,
    default_percent: i32,
    round_up: bool,
) -> Result<i32, String> {
    match v {
        None => Ok(percent(replicas, default_percent, round_up)),
        Some(IntOrString::Int(i)) => Ok(*i),
        Some(IntOrString::String(s)) => {
            let p = s
                .strip_suffix('%')
                .and_then(|p| p.parse::<i32>().ok())
                .ok_or_else(|| format!("{s:?} is neither an integer nor a percentage"))?;
            Ok(percent(replicas, p, round_up))
        }
    }
}

fn percent(replicas: i32, p: i32, round_up: bool) -> i32 {
    let x = replicas as i64 * p as i64;
    (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn owned_by(p: &Pod, uid: &str) -> bool {
    p.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if d.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let template = serde_json::to_value(&spec.template).unwrap_or(Value::Null);
    let hash = template_hash(&template);
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);

    let selector = spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let listed = api.list(&ListParams::default().labels(&selector)).await?;
    let mine: Vec<Pod> = listed
        .items
        .into_iter()
        .filter(|p| owned_by(p, &uid) && p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    let (current, old): (Vec<&Pod>, Vec<&Pod>) = mine
        .iter()
        .partition(|p| p.labels().get(HASH_LABEL) == Some(&hash));

    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let surge = scaled(
        rolling.and_then(|r| r.max_surge.as_ref()),
        replicas,
        25,
        true,
    )
    .map_err(|e| Error::Spec(format!("spec.strategy.rollingUpdate.maxSurge: {e}")))?;
    let unavailable = scaled(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        25,
        false,
    )
    .map_err(|e| Error::Spec(format!("spec.strategy.rollingUpdate.maxUnavailable: {e}")))?;
    let (surge, unavailable) = if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    };

    let ready_current = current.iter().filter(|p| is_ready(p)).count() as i32;
    let ready_old = old.iter().filter(|p| is_ready(p)).count() as i32;
    let total = (current.len() + old.len()) as i32;

    // Old pods out.
    let mut deleting: Vec<&Pod> = Vec::new();
    if recreate {
        deleting.extend(old.iter());
    } else {
        // Not-ready old pods go at once; ready ones while enough stay ready.
        let min_ready = replicas - unavailable;
        let mut ready_total = ready_current + ready_old;
        for p in &old {
            if !is_ready(p) {
                deleting.push(p);
            } else if ready_total > min_ready || ready_current >= replicas {
                deleting.push(p);
                ready_total -= 1;
            }
        }
    }
    // Surplus current pods out (scale down): not-ready and newest first.
    if current.len() as i32 > replicas {
        let mut c = current.clone();
        c.sort_by_key(|p| {
            (
                is_ready(p),
                std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
            )
        });
        deleting.extend(c.into_iter().take(current.len() - replicas as usize));
    }
    for p in &deleting {
        match api.delete(&p.name_any(), &DeleteParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            other => {
                other?;
            }
        }
    }

    // New pods in.
    let old_left = old.len() as i32
        - deleting
            .iter()
            .filter(|p| p.labels().get(HASH_LABEL) != Some(&hash))
            .count() as i32;
    let room = if recreate && old_left > 0 {
        0
    } else {
        (replicas + surge - (total - deleting.len() as i32)).max(0)
    };
    let missing = (replicas - current.len() as i32).max(0).min(room);
    for _ in 0..missing {
        let mut meta = template["metadata"].clone();
        if !meta.is_object() {
            meta = json!({});
        }
        meta["labels"][HASH_LABEL] = json!(hash);
        meta["generateName"] = json!(format!("{name}-{hash}-"));
        meta["namespace"] = json!(ns);
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
            "controller": true, "blockOwnerDeletion": true,
        }]);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"],
        }))
        .map_err(|e| Error::Spec(format!("spec.template: {e}")))?;
        api.create(&PostParams::default(), &pod).await?;
    }

    // Status.
    let updated = current.len() as i32
        - deleting
            .iter()
            .filter(|p| p.labels().get(HASH_LABEL) == Some(&hash))
            .count() as i32
        + missing;
    let ready = ready_current + ready_old - deleting.iter().filter(|p| is_ready(p)).count() as i32;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let available = ready >= replicas - unavailable;
    let complete = updated == replicas && ready_current >= replicas && old_left == 0;
    let prev = d.status.clone().unwrap_or_default();
    let cond = |t: &str, ok: bool, reason: &str, msg: String| {
        let same = prev
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .filter(|c| {
                c.status == if ok { "True" } else { "False" } && c.reason.as_deref() == Some(reason)
            });
        let since = same
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0.to_string()))
            .unwrap_or_else(|| now.clone());
        json!({"type": t, "status": if ok {"True"} else {"False"}, "reason": reason, "message": msg,
               "lastUpdateTime": since, "lastTransitionTime": since})
    };
    let status = json!({
        "observedGeneration": d.meta().generation,
        "replicas": total - deleting.len() as i32 + missing,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": (replicas - ready).max(0),
        "conditions": [
            cond("Available", available,
                 if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                 if available { "Deployment has minimum availability.".into() } else { "Deployment does not have minimum availability.".into() }),
            cond("Progressing", true,
                 if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                 if complete { format!("Deployment \"{name}\" has successfully progressed.") } else { format!("Deployment \"{name}\" is progressing.") }),
        ],
    });
    let before = serde_json::to_value(&prev).unwrap_or(Value::Null);
    let unchanged = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "unavailableReplicas",
    ]
    .iter()
    .all(|k| before[*k].as_i64().unwrap_or(0) == status[*k].as_i64().unwrap_or(0))
        && before["conditions"].as_array().map(|c| c.len()) == Some(2)
        && prev.conditions.iter().flatten().all(|c| {
            status["conditions"].as_array().unwrap().iter().any(|n| {
                n["type"] == c.type_.as_str()
                    && n["status"] == c.status.as_str()
                    && n["reason"] == json!(c.reason)
            })
        });
    if !unchanged {
        Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    Ok(if complete && deleting.is_empty() && missing == 0 {
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

    #[test]
    fn surge_and_unavailable_follow_kubernetes_rounding() {
        assert_eq!(scaled(None, 3, 25, true).unwrap(), 1);
        assert_eq!(scaled(None, 3, 25, false).unwrap(), 0);
        assert_eq!(
            scaled(Some(&IntOrString::String("50%".into())), 5, 25, true).unwrap(),
            3
        );
        assert_eq!(scaled(Some(&IntOrString::Int(2)), 5, 25, true).unwrap(), 2);
        let e = scaled(Some(&IntOrString::String("lots".into())), 5, 25, true).unwrap_err();
        assert!(e.contains("\"lots\""), "{e}");
    }
}
