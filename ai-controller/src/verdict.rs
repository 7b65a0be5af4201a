//! What a JointInferenceService's status says, read from its workers: the [`Verdict`] (the one
//! `True` condition, its reason and message), the workers' readiness, a crash-looping or
//! unconfigurable worker with its last log line, and the conditions list kept stable where
//! nothing changed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use kube::{Client, ResourceExt};
use std::time::Duration;

use crate::controller::WORKER_TYPE_LABEL;
use crate::crd::JointInferenceCondition;

/// What the user should see about a service: the one `True` condition, with its reason and
/// message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Its workers are on their way.
    Pending(Why),
    /// Its workers serve.
    Running(Why),
    /// It cannot work until something is changed; the message says what.
    Failed(Why),
}

/// A condition's reason and message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Why {
    pub(crate) reason: String,
    pub(crate) message: String,
}

impl Verdict {
    /// The condition types, in the order they are listed.
    pub(crate) const TYPES: [&'static str; 3] = ["Pending", "Running", "Failed"];

    pub(crate) fn pending(reason: &str, message: String) -> Verdict {
        Verdict::Pending(Why {
            reason: reason.into(),
            message,
        })
    }

    pub(crate) fn running(reason: &str, message: String) -> Verdict {
        Verdict::Running(Why {
            reason: reason.into(),
            message,
        })
    }

    pub(crate) fn failed(reason: &str, message: String) -> Verdict {
        Verdict::Failed(Why {
            reason: reason.into(),
            message,
        })
    }

    /// The condition type it sets `True`.
    pub(crate) fn type_(&self) -> &'static str {
        match self {
            Verdict::Pending(_) => "Pending",
            Verdict::Running(_) => "Running",
            Verdict::Failed(_) => "Failed",
        }
    }

    pub(crate) fn why(&self) -> &Why {
        match self {
            Verdict::Pending(w) | Verdict::Running(w) | Verdict::Failed(w) => w,
        }
    }

    pub(crate) fn why_mut(&mut self) -> &mut Why {
        match self {
            Verdict::Pending(w) | Verdict::Running(w) | Verdict::Failed(w) => w,
        }
    }

    /// When to look again: soon while pending, less often when failed, rarely when running.
    pub(crate) fn requeue(&self) -> Duration {
        Duration::from_secs(match self {
            Verdict::Running(_) => 60,
            Verdict::Failed(_) => 15,
            Verdict::Pending(_) => 3,
        })
    }
}

/// Ready/wanted pods of one worker Deployment.
pub(crate) fn readiness(d: Option<&Deployment>) -> (i32, i32) {
    let Some(d) = d else { return (0, 0) };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    (ready, want)
}

/// A crash-looping worker, if any: (pod, role, restarts, last exit code).
pub(crate) fn crash_looping(pods: &[Pod]) -> Option<(String, String, i32, Option<i32>)> {
    for p in pods {
        let role = p
            .labels()
            .get(WORKER_TYPE_LABEL)
            .cloned()
            .unwrap_or_default();
        for c in p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
        {
            let waiting = c
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone());
            // Back-off after at least one restart (so the last exit code is known), or restarting
            // again and again.
            if (waiting.as_deref() == Some("CrashLoopBackOff") && c.restart_count >= 1)
                || c.restart_count >= 3
            {
                let code = c
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| t.exit_code);
                return Some((p.name_any(), role, c.restart_count, code));
            }
        }
    }
    None
}

/// A worker the node refused to start (`CreateContainerConfigError`), if any: (pod, role,
/// the node's message).
pub(crate) fn config_error(pods: &[Pod]) -> Option<(String, String, String)> {
    pods.iter().find_map(|p| {
        let role = p
            .labels()
            .get(WORKER_TYPE_LABEL)
            .cloned()
            .unwrap_or_default();
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
            .find(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
            .map(|w| (p.name_any(), role, w.message.clone().unwrap_or_default()))
    })
}

pub(crate) async fn last_log_line(client: &Client, ns: &str, pod: &str) -> Option<String> {
    let logs = Api::<Pod>::namespaced(client.clone(), ns)
        .logs(
            pod,
            &LogParams {
                tail_lines: Some(20),
                ..Default::default()
            },
        )
        .await
        .ok()?;
    logs.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(300).collect())
}

/// Conditions with `v` the only `True` one, placed last; times kept where nothing changed.
pub(crate) fn conditions(
    old: &[JointInferenceCondition],
    v: &Verdict,
    now: &str,
) -> Vec<JointInferenceCondition> {
    let mut out: Vec<JointInferenceCondition> = Vec::new();
    for t in Verdict::TYPES {
        let prev = old.iter().find(|c| c.type_ == t);
        let status = if t == v.type_() { "True" } else { "False" };
        let (reason, message) = if t == v.type_() {
            (Some(v.why().reason.clone()), Some(v.why().message.clone()))
        } else {
            (
                prev.and_then(|c| c.reason.clone()),
                prev.and_then(|c| c.message.clone()),
            )
        };
        let same =
            prev.is_some_and(|c| c.status == status && c.reason == reason && c.message == message);
        let transition = match prev {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Some(now.to_string()),
        };
        if prev.is_none() && status == "False" {
            continue;
        }
        out.push(JointInferenceCondition {
            type_: t.into(),
            status: status.into(),
            last_heartbeat_time: if same {
                prev.and_then(|c| c.last_heartbeat_time.clone())
            } else {
                Some(now.to_string())
            },
            last_transition_time: transition,
            reason,
            message,
        });
    }
    out.sort_by_key(|c| c.status == "True");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_true_condition_last_and_times_kept() {
        let run = Verdict::running("WorkersReady", "ok".into());
        let c1 = conditions(&[], &Verdict::pending("WorkersStarting", "w".into()), "t1");
        assert_eq!(c1.len(), 1);
        let c2 = conditions(&c1, &run, "t2");
        assert_eq!(
            c2.iter()
                .map(|c| (c.type_.as_str(), c.status.as_str()))
                .collect::<Vec<_>>(),
            vec![("Pending", "False"), ("Running", "True")]
        );
        let c3 = conditions(&c2, &run, "t3");
        assert_eq!(c3, c2, "nothing changed, nothing rewritten");
        let failed = Verdict::failed("WorkerCrashLooping", "boom".into());
        let c4 = conditions(&c3, &failed, "t4");
        assert_eq!(c4.last().unwrap().type_, "Failed");
        assert_eq!(c4.iter().filter(|c| c.status == "True").count(), 1);
        let running = c4.iter().find(|c| c.type_ == "Running").unwrap();
        assert_eq!(running.last_transition_time.as_deref(), Some("t4"));
    }
}
