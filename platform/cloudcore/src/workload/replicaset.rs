//! The ReplicaSet controller: keeps `spec.replicas` pods of the template, owned by the
//! ReplicaSet. Surplus pods go unscheduled first, then not ready, then newest; status counts
//! replicas, ready and available (Ready for `minReadySeconds`) pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{
    CREATE_BURST, Error, available, controller_ref, delete_pod, is_active, is_ready, owned_pods,
    pod_from_template, requeue_after_error, write_status,
};

struct Ctx {
    client: kube::Client,
}

/// Runs the controller until aborted.
pub async fn run(client: kube::Client) {
    let sets = Api::<ReplicaSet>::all(client.clone());
    let pods = super::pods_for_owners(&client);
    Controller::new(sets, crate::lists::config())
        .owns(pods, crate::lists::config())
        .run(
            reconcile,
            |_, e, _| requeue_after_error("ReplicaSet", e),
            Arc::new(Ctx { client }),
        )
        .for_each(|_| async {})
        .await;
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if rs.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let spec = serde_json::to_value(rs.spec.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let min_ready = spec["minReadySeconds"].as_i64().unwrap_or(0);
    let pods = owned_pods(&ctx.client, &ns, &spec["selector"], &uid).await?;
    let active: Vec<&Pod> = pods.iter().filter(|p| is_active(p)).collect();

    if active.len() < replicas {
        let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
        let pod = pod_from_template(
            &spec["template"],
            &ns,
            &format!("{}-", rs.name_any()),
            &BTreeMap::new(),
            controller_ref(rs.as_ref()),
        )?;
        for _ in 0..(replicas - active.len()).min(CREATE_BURST) {
            api.create(&PostParams::default(), &pod).await?;
        }
    } else if active.len() > replicas {
        let mut doomed = active.clone();
        doomed.sort_by_key(|p| {
            (
                p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
                is_ready(p),
                std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
            )
        });
        for p in doomed.into_iter().take(active.len() - replicas) {
            delete_pod(&ctx.client, p).await?;
        }
    }

    let mut wake: Option<Duration> = None;
    let mut avail = 0;
    for p in &active {
        let (ok, later) = available(p, min_ready);
        avail += ok as i64;
        if let Some(l) = later {
            wake = Some(wake.map_or(l, |w| w.min(l)));
        }
    }
    let ready = active.iter().filter(|p| is_ready(p)).count();
    let current = serde_json::to_value(rs.status.clone()).unwrap_or(Value::Null);
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.len(),
        "readyReplicas": ready,
        "availableReplicas": avail,
        "observedGeneration": rs.meta().generation,
    });
    write_status(&ctx.client, rs.as_ref(), &current, status).await?;
    Ok(match wake {
        Some(w) => Action::requeue(w + Duration::from_millis(200)),
        None => Action::requeue(Duration::from_secs(300)),
    })
}
