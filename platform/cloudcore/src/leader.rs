//! Leader election for the controllers only one cloud core may run at a time (node lifecycle,
//! workloads, scheduler), with a `coordination.k8s.io` Lease as client-go's `leaderelection`
//! does it:
//! - the Lease `kube-system/<name>` names its holder (`spec.holderIdentity`, this core's
//!   identity) and is renewed every `retry_period`;
//! - another core takes it over only when it has seen the same record, unchanged, for a whole
//!   `lease_duration` by its own clock (so the cores' clocks need not agree), writing with the
//!   record's resourceVersion (so two cores cannot both win);
//! - a leader that could not renew for `renew_deadline` stops its controllers before anyone
//!   may take over (`renew_deadline < lease_duration`), so two cores never run them at once.
//!
//! The controllers run in a task started on winning and aborted on losing; they start from the
//! API's state each time, as on a restart.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;

/// How a cloud core elects the leader of its singleton controllers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderConfig {
    /// This core's name in the Lease (empty: `<hostname>-<pid>`). Two cores must differ.
    pub identity: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// How long a silent leader keeps the Lease (ms).
    pub lease_duration_ms: u64,
    /// A leader that could not renew for this long stops its controllers (ms).
    pub renew_deadline_ms: u64,
    /// How often the Lease is renewed or tried (ms).
    pub retry_period_ms: u64,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            identity: String::new(),
            namespace: "kube-system".into(),
            lease_name: "sedge-cloudcore-controllers".into(),
            lease_duration_ms: 15_000,
            renew_deadline_ms: 10_000,
            retry_period_ms: 2_000,
        }
    }
}

impl LeaderConfig {
    /// The identity, or `<hostname>-<pid>` when none is set.
    pub fn identity(&self) -> String {
        if !self.identity.is_empty() {
            return self.identity.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "cloudcore".into());
        format!("{host}-{}", std::process::id())
    }

    /// The settings are usable: a renew deadline shorter than the lease, a retry period shorter
    /// than the deadline.
    pub fn check(&self) -> Result<(), String> {
        if self.retry_period_ms == 0
            || self.retry_period_ms >= self.renew_deadline_ms
            || self.renew_deadline_ms >= self.lease_duration_ms
        {
            return Err(format!(
                "leader: need 0 < retry_period_ms ({}) < renew_deadline_ms ({}) < lease_duration_ms ({})",
                self.retry_period_ms, self.renew_deadline_ms, self.lease_duration_ms
            ));
        }
        if self.namespace.is_empty() || self.lease_name.is_empty() {
            return Err("leader: namespace and lease_name may not be empty".into());
        }
        Ok(())
    }
}

/// What this core last saw of the Lease, and when (by its own clock).
struct Observed {
    resource_version: String,
    at: Instant,
}

/// Aborts the task it holds when dropped (the election task aborted by a shutdown takes the
/// controllers with it).
struct Leading(JoinHandle<()>);

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One round: creates, renews or takes over the Lease. `Ok(true)`: this core holds it now.
async fn try_hold(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
    me: &str,
    seen: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration_s = cfg.lease_duration_ms.div_ceil(1000) as i32;
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": cfg.lease_name, "namespace": cfg.namespace},
            "spec": {"holderIdentity": me, "leaseDurationSeconds": duration_s,
                     "acquireTime": now(), "renewTime": now(), "leaseTransitions": 0}
        }))
        .expect("a lease");
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if seen.as_ref().is_none_or(|s| s.resource_version != rv) {
        *seen = Some(Observed {
            resource_version: rv,
            at: Instant::now(),
        });
    }
    let expired = seen
        .as_ref()
        .is_some_and(|s| s.at.elapsed() >= Duration::from_millis(cfg.lease_duration_ms));
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != me {
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        tracing::info!(lease = %cfg.lease_name, previous = %holder, identity = %me, "taking over the controllers' lease");
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(duration_s);
    match api
        .replace(&cfg.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(l) => {
            *seen = Some(Observed {
                resource_version: l.metadata.resource_version.unwrap_or_default(),
                at: Instant::now(),
            });
            Ok(true)
        }
        // Someone else wrote it first (a renewal, or another core taking over).
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs `work` while this core holds the Lease: started each time it wins, stopped when it
/// loses or cannot renew in time. `leading` reports whether it runs them now.
pub async fn run_while_leading<F, Fut>(
    client: kube::Client,
    cfg: LeaderConfig,
    leading: tokio::sync::watch::Sender<bool>,
    work: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api = Api::<Lease>::namespaced(client, &cfg.namespace);
    let me = cfg.identity();
    let mut seen = None;
    let mut task: Option<Leading> = None;
    let mut renewed: Option<Instant> = None;
    let period = Duration::from_millis(cfg.retry_period_ms.max(1));
    loop {
        // `renewed_now`: this round wrote the Lease. A failed round never moves the deadline.
        let (held, renewed_now) = match try_hold(&api, &cfg, &me, &mut seen).await {
            Ok(h) => (h, h),
            Err(e) => {
                tracing::warn!(lease = %cfg.lease_name, error = %e, "leader election: the Lease could not be read or written");
                // A leader keeps leading until its deadline; then it stops, before anyone else
                // may take over.
                let within = task.is_some()
                    && renewed.is_some_and(|r| {
                        r.elapsed() < Duration::from_millis(cfg.renew_deadline_ms)
                    });
                (within, false)
            }
        };
        if renewed_now {
            renewed = Some(Instant::now());
        }
        if held {
            if task.as_ref().is_none_or(|t| t.0.is_finished()) {
                tracing::info!(identity = %me, lease = %cfg.lease_name, "leading: starting the singleton controllers");
                task = Some(Leading(tokio::spawn(work())));
            }
        } else if task.take().is_some() {
            tracing::warn!(identity = %me, lease = %cfg.lease_name, "no longer leading: singleton controllers stopped");
            renewed = None;
        }
        leading.send_replace(task.is_some());
        tokio::time::sleep(period).await;
    }
}

/// Gives the Lease up if this core holds it (a clean shutdown), so another core takes over at
/// once instead of after `lease_duration`.
pub async fn release(client: kube::Client, cfg: &LeaderConfig) {
    let api = Api::<Lease>::namespaced(client, &cfg.namespace);
    let me = cfg.identity();
    let Ok(Some(mut lease)) = api.get_opt(&cfg.lease_name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me.as_str()) {
        return;
    }
    spec.holder_identity = None;
    let _ = api
        .replace(&cfg.lease_name, &PostParams::default(), &lease)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_could_let_two_leaders_overlap_are_refused() {
        assert!(LeaderConfig::default().check().is_ok());
        let bad = LeaderConfig {
            renew_deadline_ms: 20_000,
            ..Default::default()
        };
        let e = bad.check().unwrap_err();
        assert!(e.contains("renew_deadline_ms (20000)"), "{e}");
        let bad = LeaderConfig {
            retry_period_ms: 0,
            ..Default::default()
        };
        assert!(bad.check().is_err());
        let a = LeaderConfig::default().identity();
        assert!(a.ends_with(&format!("-{}", std::process::id())), "{a}");
    }
}
