//! The Job controller (batch/v1, `NonIndexed`): pods run to completion.
//!
//! - Up to `parallelism` pods run at once, never more than the completions still needed; the
//!   Job is `Complete` once `completions` pods succeeded (without `completions`: once one
//!   succeeded and none runs).
//! - A failed pod (and, with `restartPolicy: OnFailure`, a container restart) counts against
//!   `backoffLimit`; past it the Job is `Failed` with `BackoffLimitExceeded` and its running
//!   pods are deleted. Replacements wait Kubernetes' delay: 10 s doubling per failure, at most
//!   6 minutes.
//! - `activeDeadlineSeconds` from `status.startTime`: `Failed` with `DeadlineExceeded`.
//! - `suspend: true`: running pods are deleted and none are created until it is resumed.
//! - Finished pods stay (their logs are the Job's output); deleting the Job deletes them.
//!
//! Counts come from the pods that exist: a finished pod deleted by hand is forgotten (Kubernetes
//! keeps them with a finalizer; not done here).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{
    CREATE_BURST, Error, condition, controller_ref, delete_pod, is_active, is_ready, owned_pods,
    phase, pod_from_template, requeue_after_error, write_status,
};

struct Ctx {
    client: kube::Client,
}

/// Kubernetes' retry delay after `failures` failures.
pub fn backoff(failures: i64) -> Duration {
    if failures <= 0 {
        return Duration::ZERO;
    }
    let secs = 10u64.saturating_mul(1u64 << (failures - 1).min(16));
    Duration::from_secs(secs.min(360))
}

/// Runs the controller until aborted.
pub async fn run(client: kube::Client) {
    let jobs = Api::<Job>::all(client.clone());
    let pods = super::pods_for_owners(&client);
    Controller::new(jobs, crate::lists::config())
        .owns(pods, crate::lists::config())
        .run(
            reconcile,
            |_, e, _| requeue_after_error("Job", e),
            Arc::new(Ctx { client }),
        )
        .for_each(|_| async {})
        .await;
}

/// When the pod's last container ended, if it did.
fn finished_at(p: &Pod) -> Option<Timestamp> {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.finished_at.as_ref())
                .or_else(|| {
                    c.last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .and_then(|t| t.finished_at.as_ref())
                })
                .map(|t| t.0)
        })
        .max()
}

fn restarts(p: &Pod) -> i64 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.restart_count as i64)
        .sum()
}

fn has_condition(status: &Value, t: &str) -> bool {
    status["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if job.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let ns = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    let spec = serde_json::to_value(job.spec.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let prev = serde_json::to_value(job.status.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let pods = owned_pods(client, &ns, &spec["selector"], &uid).await?;
    let active: Vec<&Pod> = pods.iter().filter(|p| is_active(p)).collect();
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count() as i64;
    let failed_pods: Vec<&Pod> = pods.iter().filter(|p| phase(p) == "Failed").collect();
    let failed = failed_pods.len() as i64;
    let on_failure = spec["template"]["spec"]["restartPolicy"] == "OnFailure";
    let retries = failed
        + if on_failure {
            active.iter().map(|p| restarts(p)).sum::<i64>()
        } else {
            0
        };
    let now = Timestamp::now();
    let finished = has_condition(&prev, "Complete") || has_condition(&prev, "Failed");
    let start = prev["startTime"]
        .as_str()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or(now);
    let suspended = spec["suspend"] == true;

    let completions = spec["completions"].as_i64();
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1).max(0);
    let backoff_limit = spec["backoffLimit"].as_i64().unwrap_or(6);
    let deadline = spec["activeDeadlineSeconds"].as_i64();

    let mut conditions: Vec<Value> = prev["conditions"].as_array().cloned().unwrap_or_default();
    let mut completion_time = prev["completionTime"].clone();
    let mut wake: Option<Duration> = None;
    let mut doomed: Vec<&Pod> = Vec::new();
    let mut create = 0i64;
    if finished {
        doomed.extend(active.iter().copied());
    } else {
        let done = match completions {
            Some(c) => succeeded >= c,
            None => succeeded > 0 && active.is_empty(),
        };
        let over_deadline = deadline.filter(|d| now.as_second() - start.as_second() >= *d);
        let fail = if retries > backoff_limit {
            Some((
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit".to_string(),
            ))
        } else {
            over_deadline.map(|_| {
                (
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline".to_string(),
                )
            })
        };
        if done {
            conditions.retain(|c| c["type"] != "Complete");
            conditions.push(condition(
                &prev,
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ));
            completion_time = json!(now.to_string());
            doomed.extend(active.iter().copied());
        } else if let Some((reason, msg)) = fail {
            conditions.retain(|c| c["type"] != "Failed");
            conditions.push(condition(&prev, "Failed", "True", reason, &msg));
            doomed.extend(active.iter().copied());
        } else if suspended {
            doomed.extend(active.iter().copied());
        } else {
            let remaining = completions.map_or(parallelism, |c| (c - succeeded).max(0));
            let want = parallelism.min(remaining);
            let have = active.len() as i64;
            if have > want {
                let mut extra = active.clone();
                extra.sort_by_key(|p| {
                    (
                        is_ready(p),
                        std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
                    )
                });
                doomed.extend(extra.into_iter().take((have - want) as usize));
            } else if have < want {
                // After a failure, replacements wait.
                let last_failure = failed_pods.iter().filter_map(|p| finished_at(p)).max();
                let ready_at = last_failure
                    .map(|t| t.as_second() + backoff(retries).as_secs() as i64)
                    .unwrap_or(0);
                if ready_at > now.as_second() {
                    wake = Some(Duration::from_secs((ready_at - now.as_second()) as u64));
                } else {
                    create = (want - have).min(CREATE_BURST as i64);
                }
            }
            if let Some(d) = deadline {
                let left = (d - (now.as_second() - start.as_second())).max(1) as u64;
                wake = Some(wake.map_or(Duration::from_secs(left), |w| {
                    w.min(Duration::from_secs(left))
                }));
            }
        }
    }
    for p in &doomed {
        delete_pod(client, p).await?;
    }
    if create > 0 {
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let pod = pod_from_template(
            &spec["template"],
            &ns,
            &format!("{}-", job.name_any()),
            &BTreeMap::new(),
            controller_ref(job.as_ref()),
        )?;
        for _ in 0..create {
            api.create(&PostParams::default(), &pod).await?;
        }
    }

    let running = active.len() as i64 - doomed.iter().filter(|p| is_active(p)).count() as i64;
    let mut status = json!({
        "active": running + create,
        "ready": active.iter().filter(|p| is_ready(p) && !doomed.iter().any(|d| d.uid() == p.uid())).count(),
        "succeeded": succeeded,
        "failed": failed,
        "startTime": start.to_string(),
        "conditions": conditions,
    });
    if prev["startTime"].is_string() {
        status["startTime"] = prev["startTime"].clone();
    }
    if !completion_time.is_null() {
        status["completionTime"] = completion_time;
    }
    write_status(client, job.as_ref(), &prev, status).await?;
    Ok(match wake {
        Some(w) => Action::requeue(w + Duration::from_millis(200)),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_as_kubernetes_does() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(6), Duration::from_secs(320));
        assert_eq!(backoff(7), Duration::from_secs(360));
        assert_eq!(backoff(1000), Duration::from_secs(360));
    }
}
