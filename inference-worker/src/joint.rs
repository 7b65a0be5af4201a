//! Joint inference as a service: what the edge worker's Open Inference Protocol endpoint does with
//! a request once the edge model has answered it.
//!
//! Every sample gets the edge model's answer first (the server batches concurrent requests into
//! one model call, see [`crate::server`]). The mining rule picks the hard ones; each hard sample is
//! sent to the cloud through the edge worker's [`CloudClient`] (deadline, retries, circuit
//! breaker) and the cloud's answer replaces the edge's. A hard sample keeps the edge answer when:
//! - no cloud is configured, or the breaker is open, or the cloud fails within its budget;
//! - the request's deadline cannot wait for the cloud: what is left of it is shorter than the
//!   cloud's recent round trip (nothing is sent), or the cloud does not answer before it (the
//!   request is answered from the edge just before its deadline);
//! - more than `offload_queue` hard examples already wait for one of the `offload_concurrency`
//!   slots (the cloud is the bottleneck; the edge answers at once rather than queue without bound).
//!
//! An offload runs as its own task, so a request that stops waiting never cuts a call short: the
//! breaker always learns the outcome, and the hard example still gets the cloud's label for
//! incremental learning when a hard-example directory is configured.
//!
//! Answers are probabilities (the model's activation applied), whichever model gave them, so rows
//! from the edge and the cloud compare; the response parameter `answered_by` says, per sample,
//! who answered (`edge` or `cloud`, comma-separated for a batch).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};

use crate::client::{CloudClient, OffloadError};
use crate::hard_examples::HardExampleStore;
use crate::metrics::EdgeMetrics;
use crate::mining::Output;
use crate::pipeline::{EdgePipeline, MiningMode};
use crate::preprocess::{activate, argmax};
use crate::server::ServerConfig;

/// The response parameter that says who answered each sample.
pub const ANSWERED_BY: &str = "answered_by";
/// The request parameter (microseconds, as Triton's) that sets a request's deadline.
pub const TIMEOUT_PARAMETER: &str = "timeout";

/// Settings of the edge worker's endpoint (the `serve` section of its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address for OIP REST and gRPC (one port); none serves no endpoint and the worker only
    /// reads its input.
    pub listen: Option<std::net::SocketAddr>,
    /// Deadline of a request that sets none (no `timeout` parameter, no gRPC deadline), in
    /// milliseconds; 0 leaves it to the offload budget.
    pub default_timeout_ms: u64,
    /// Hard examples in flight to the cloud at once (the endpoint's own bound; `offload.concurrency`
    /// bounds the file input's). Over a link with a round trip of `r` seconds the cloud can answer
    /// at most `offload_concurrency / r` hard examples a second: 64 over 4G's 60 ms is ~1,000/s.
    pub offload_concurrency: usize,
    /// Hard examples that may wait for an offload slot; past this a hard example is answered by
    /// the edge at once.
    pub offload_queue: usize,
    /// Body size, batching (the edge model's), connections: as the cloud worker's server.
    pub server: ServerConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: None,
            default_timeout_ms: 0,
            offload_concurrency: 64,
            offload_queue: 256,
            server: ServerConfig::default(),
        }
    }
}

/// Who answered a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answerer {
    /// The edge model.
    Edge,
    /// The cloud model.
    Cloud,
}

impl Answerer {
    /// `edge` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            Answerer::Edge => "edge",
            Answerer::Cloud => "cloud",
        }
    }

    /// The `answered_by` parameter for a batch: one word per sample, comma-separated.
    pub fn join(all: &[Answerer]) -> String {
        all.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// Why a request got no answer at all.
#[derive(Debug, thiserror::Error)]
#[error("sample {sample} has no answer: the edge model failed ({edge}) and the cloud gave none")]
pub struct NoAnswer {
    /// Index of the sample in the request.
    pub sample: usize,
    /// The edge model's error.
    pub edge: String,
}

/// The joint-inference stage behind a served edge model.
pub struct Joint {
    pipeline: Arc<EdgePipeline>,
    client: Option<Arc<CloudClient>>,
    metrics: Arc<EdgeMetrics>,
    store: Option<Arc<Mutex<HardExampleStore>>>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    /// Recent successful cloud round trips (exponential moving average), microseconds.
    cloud_rtt_us: Arc<AtomicU64>,
    default_timeout: Option<Duration>,
}

impl Joint {
    /// The stage for `pipeline`'s model and mining rule, offloading through `client`.
    pub fn new(
        pipeline: Arc<EdgePipeline>,
        client: Option<Arc<CloudClient>>,
        metrics: Arc<EdgeMetrics>,
        store: Option<Arc<Mutex<HardExampleStore>>>,
        config: &ServeConfig,
    ) -> Self {
        Joint {
            pipeline,
            client,
            metrics,
            store,
            slots: Arc::new(Semaphore::new(config.offload_concurrency.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: config.offload_queue,
            cloud_rtt_us: Arc::new(AtomicU64::new(0)),
            default_timeout: (config.default_timeout_ms > 0)
                .then(|| Duration::from_millis(config.default_timeout_ms)),
        }
    }

    /// The pipeline: the model in service (hot updates included) and the mining rule.
    pub fn pipeline(&self) -> &Arc<EdgePipeline> {
        &self.pipeline
    }

    /// The counters (Sedna's inferenceNumber, hardExampleNumber, ...).
    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        &self.metrics
    }

    /// The deadline of a request that sets none.
    pub fn default_timeout(&self) -> Option<Duration> {
        self.default_timeout
    }

    /// Answers `batch` samples (`pixels`, raw) given the edge model's raw output for them (or
    /// why it failed) and how long it took. Returns one row of probabilities per sample and who
    /// answered each.
    pub async fn answer(
        &self,
        pixels: &[u8],
        batch: usize,
        edge: Result<Vec<f32>, String>,
        edge_time: Duration,
        deadline: Option<Instant>,
    ) -> Result<(Vec<f32>, Vec<Answerer>), NoAnswer> {
        let config = self.pipeline.config();
        let per_sample = pixels.len() / batch.max(1);
        let activation = config.output.activation;
        let mining = self.pipeline.mining();
        let mine_first = self.pipeline.mining_mode() == MiningMode::MiningThenInference;
        let m = &self.metrics;
        let each = edge_time / batch.max(1) as u32;
        let mut rows: Vec<Option<Vec<f32>>> = match &edge {
            Ok(out) => {
                let per = out.len() / batch.max(1);
                out.chunks(per.max(1))
                    .map(|r| {
                        let mut r = r.to_vec();
                        activate(&mut r, activation);
                        Some(r)
                    })
                    .collect()
            }
            Err(_) => vec![None; batch],
        };
        let mut hard = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            m.inference_number.inc();
            m.edge_seconds.observe(each.as_secs_f64());
            // As the pipeline decides: no edge answer means only the cloud can give one.
            let is_hard = match row {
                None => true,
                Some(_) if mine_first => mining.is_hard(Output::Probabilities(&[])),
                Some(r) => mining.is_hard(Output::Probabilities(r)),
            };
            if is_hard {
                m.hard_example_number.inc();
                hard.push(i);
            }
        }
        let answers = futures::future::join_all(
            hard.iter()
                .map(|&i| self.offload(&pixels[i * per_sample..(i + 1) * per_sample], deadline)),
        )
        .await;
        let mut by = vec![Answerer::Edge; batch];
        for (&i, answer) in hard.iter().zip(answers) {
            match answer {
                Some(row) => {
                    m.cloud_answered.inc();
                    rows[i] = Some(row);
                    by[i] = Answerer::Cloud;
                }
                None => {
                    m.cloud_fallbacks.inc();
                }
            }
        }
        m.update_ratio();
        let mut values = Vec::with_capacity(batch * config.labels.len());
        for (i, row) in rows.into_iter().enumerate() {
            match row {
                Some(r) => values.extend(r),
                None => {
                    return Err(NoAnswer {
                        sample: i,
                        edge: edge.err().unwrap_or_default(),
                    });
                }
            }
        }
        Ok((values, by))
    }

    /// The cloud's probabilities for one hard sample, or none when the edge answer stands.
    async fn offload(&self, sample: &[u8], deadline: Option<Instant>) -> Option<Vec<f32>> {
        let client = self.client.clone()?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let expected = Duration::from_micros(self.cloud_rtt_us.load(Ordering::Relaxed));
        if left.is_some_and(|left| left.is_zero() || left < expected) {
            self.metrics.deadline_fallbacks.inc();
            return None;
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.offload_busy.inc();
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let task = Offload {
            client,
            sample: sample.to_vec(),
            slots: self.slots.clone(),
            waiting: self.waiting.clone(),
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            rtt_us: self.cloud_rtt_us.clone(),
            activation: self.pipeline.config().output.activation,
        };
        tokio::spawn(task.run(tx));
        let answer = match left {
            None => rx.await.ok(),
            Some(left) => {
                // Answer a little before the deadline, so that the response reaches the client
                // (whose clock started when it sent the request) in time.
                let margin = (left / 10).min(Duration::from_millis(50));
                match tokio::time::timeout(left - margin, rx).await {
                    Ok(answer) => answer.ok(),
                    Err(_) => {
                        self.metrics.deadline_fallbacks.inc();
                        return None;
                    }
                }
            }
        };
        answer.flatten()
    }
}

/// One hard sample on its way to the cloud.
struct Offload {
    client: Arc<CloudClient>,
    sample: Vec<u8>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<EdgeMetrics>,
    store: Option<Arc<Mutex<HardExampleStore>>>,
    rtt_us: Arc<AtomicU64>,
    activation: crate::model::Activation,
}

impl Offload {
    async fn run(self, reply: oneshot::Sender<Option<Vec<f32>>>) {
        let permit = self.slots.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let Ok(_permit) = permit else { return };
        // The requester gave up while this waited: only worth sending for the label.
        if reply.is_closed() && self.store.is_none() {
            return;
        }
        let outcome = self.client.offload(&self.sample).await;
        let m = &self.metrics;
        m.offload_bytes.inc_by(outcome.bytes);
        if outcome.result == Err(OffloadError::BreakerOpen) {
            m.breaker_skipped.inc();
        } else {
            m.cloud_seconds.observe(outcome.elapsed.as_secs_f64());
        }
        let row = outcome.result.ok().map(|mut row| {
            activate(&mut row, self.activation);
            let us = outcome.elapsed.as_micros() as u64;
            // Moving average with weight 1/8 for the newest round trip.
            let old = self.rtt_us.load(Ordering::Relaxed);
            let new = if old == 0 { us } else { (old * 7 + us) / 8 };
            self.rtt_us.store(new, Ordering::Relaxed);
            row
        });
        if let Some(store) = &self.store {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            let saved = match row.as_deref().and_then(argmax) {
                Some((label, _)) => s.save(&self.sample, label),
                None => s.defer(&self.sample).map(|_| ()),
            };
            if let Err(e) = saved {
                tracing::warn!(error = %e, "cannot save hard example");
            }
            crate::edge::publish(m, &s);
        }
        let _ = reply.send(row);
    }
}
