//! Reports to the node's local controller (Sedna's `LC_SERVER` contract): every `LC_PERIOD`
//! seconds, and only when something changed, `POST {LC_SERVER}/sedna/workers/{WORKER_NAME}/info`
//! with the counters in `ownerInfo`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::breaker::BreakerState;
use crate::client::CloudClient;
use crate::metrics::EdgeMetrics;

/// Where and how often to report.
#[derive(Debug, Clone, PartialEq)]
pub struct LcReporter {
    /// `LC_SERVER`.
    pub server: String,
    /// `WORKER_NAME` (the pod's name).
    pub worker: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `SERVICE_NAME`: the owning service.
    pub service: String,
    /// `LC_PERIOD`.
    pub period: Duration,
    /// The pod's token (`SEDGE_POD_TOKEN`, set by Sedge's edge agent): the local controller
    /// takes reports only from the pod they name.
    pub token: Option<String>,
}

/// The variable the edge agent puts a pod's token in (`sedge_edgecore::podtoken::ENV`).
pub const POD_TOKEN_ENV: &str = sedge_worker_contract::env::POD_TOKEN;

impl LcReporter {
    /// From Sedna's environment; `None` unless `LC_SERVER` and `WORKER_NAME` are set. An
    /// `LC_PERIOD` that is not a positive number of seconds is an error naming it.
    pub fn from_env() -> Result<Option<LcReporter>, crate::config::ConfigError> {
        let env = crate::config::env;
        let period = match crate::config::env_parse::<f64>(sedge_worker_contract::env::LC_PERIOD)? {
            None => 30.0,
            Some(p) if p > 0.0 && p.is_finite() => p,
            Some(p) => {
                return Err(crate::config::ConfigError::Invalid {
                    origin: format!("environment variable LC_PERIOD={p}"),
                    message: "must be a positive number of seconds".into(),
                });
            }
        };
        let (Some(server), Some(worker)) = (
            env(sedge_worker_contract::env::LC_SERVER),
            env(sedge_worker_contract::env::WORKER_NAME),
        ) else {
            return Ok(None);
        };
        Ok(Some(LcReporter {
            server: server.trim_end_matches('/').to_string(),
            worker,
            namespace: env(sedge_worker_contract::env::NAMESPACE)
                .unwrap_or_else(|| "default".into()),
            service: env(sedge_worker_contract::env::SERVICE_NAME).unwrap_or_default(),
            period: Duration::from_secs_f64(period),
            token: env(POD_TOKEN_ENV),
        }))
    }

    /// The owner a report names: the joint inference service (`SERVICE_NAME`), else the
    /// incremental learning job (`JOB_NAME`).
    fn owner(&self) -> (String, &'static str) {
        match crate::config::env(sedge_worker_contract::env::JOB_NAME) {
            Some(job) if self.service.is_empty() => (job, "incrementallearningjob"),
            _ => (self.service.clone(), "jointinferenceservice"),
        }
    }

    /// Reports a train or eval worker's outcome once (Sedna's `kind: train|eval`, `status:
    /// completed|failed`, `results: [{format, url, metrics}]`), trying a few times while the
    /// local controller is not reachable.
    pub async fn report_result(
        &self,
        kind: &str,
        outcome: Result<serde_json::Value, String>,
    ) -> Result<(), String> {
        let http = crate::fetch::http_client(Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let (status, results, message) = match outcome {
            Ok(r) => ("completed", r, String::new()),
            Err(m) => ("failed", json!([]), m),
        };
        let body = json!({
            "name": self.worker, "namespace": self.namespace,
            "ownerName": self.owner().0, "ownerKind": self.owner().1,
            "kind": kind, "status": status, "results": results, "message": message,
        });
        let url = format!("{}/sedna/workers/{}/info", self.server, self.worker);
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            let mut req = http.post(&url).json(&body);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                // Refused (a 4xx) is final: the LC said why.
                Ok(r) if r.status().is_client_error() => {
                    let code = r.status();
                    return Err(format!(
                        "{url}: {code}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                Ok(r) => last = format!("{url}: {}", r.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(last)
    }

    /// Reports until the task is aborted.
    pub fn spawn(
        self,
        metrics: Arc<EdgeMetrics>,
        client: Option<Arc<CloudClient>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let http = match crate::fetch::http_client(Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => {
                    // reqwest's Display hides the cause (no CA certificates, ...): say it.
                    let mut why = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(c) = src {
                        why = format!("{why}: {c}");
                        src = c.source();
                    }
                    tracing::error!(error = %why, "no HTTP client; counters are not reported");
                    return;
                }
            };
            let start = chrono::Utc::now().to_rfc3339();
            let mut last = None;
            let mut tick = tokio::time::interval(self.period);
            loop {
                tick.tick().await;
                let body = self.body(&metrics, client.as_deref(), &start);
                let mut counters = body["ownerInfo"].clone();
                if let Some(o) = counters.as_object_mut() {
                    o.remove("updateTime");
                }
                if last.as_ref() == Some(&counters) {
                    continue;
                }
                let url = format!("{}/sedna/workers/{}/info", self.server, self.worker);
                let mut req = http.post(&url).json(&body);
                if let Some(t) = &self.token {
                    req = req.bearer_auth(t);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => last = Some(counters),
                    Ok(r) => {
                        tracing::warn!(%url, status = %r.status(), "local controller refused the report")
                    }
                    Err(e) => tracing::debug!(%url, error = %e, "local controller not reachable"),
                }
            }
        })
    }

    fn body(
        &self,
        m: &EdgeMetrics,
        client: Option<&CloudClient>,
        start: &str,
    ) -> serde_json::Value {
        let inferences = m.inference_number.get();
        let hard = m.hard_example_number.get();
        let ratio = if inferences == 0 {
            0.0
        } else {
            hard as f64 / inferences as f64
        };
        let reachable = match client {
            None => "false",
            Some(c) => match c.breaker().state() {
                BreakerState::Open { .. } => "false",
                _ => "true",
            },
        };
        json!({
            "name": self.worker, "namespace": self.namespace,
            "ownerName": self.owner().0, "ownerKind": self.owner().1,
            "kind": "inference", "status": "running",
            "ownerInfo": {
                "startTime": start, "updateTime": chrono::Utc::now().to_rfc3339(),
                "inferenceNumber": inferences, "hardExampleNumber": hard,
                "uploadCloudRatio": ratio,
                "cloudAnsweredNumber": m.cloud_answered.get(),
                "edgeFallbackNumber": m.cloud_fallbacks.get(),
                "cloudReachable": reachable,
                // Hot updates: models swapped in and refused (the local controller confirms a
                // deploy by these).
                "modelVersion": m.model_version.get(),
                "modelUpdateRefused": m.model_update_refused.get(),
                // Hard examples waiting on disk for the cloud, and dropped from that queue.
                "hardExamplesPending": m.hard_examples_pending.get(),
                "hardExamplesDropped": m.hard_examples_dropped.get(),
            },
            "results": [],
        })
    }
}
