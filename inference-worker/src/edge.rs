//! The edge worker: runs the edge model over a source of samples, offloads hard examples to the
//! cloud, and writes one JSON line per sample; and serves the Open Inference Protocol to
//! applications, answering each request with joint inference ([`EdgeWorker::serve`],
//! [`crate::joint`]). Both may run at once; they share the model, the rule, the cloud client, the
//! counters and the hard-example store.
//!
//! The pipeline runs on its own thread and hands decisions to the async side through a bounded
//! channel (256 decisions; when full, the pipeline thread waits, so memory stays bounded). Hard
//! examples are offloaded with at most `offload.concurrency` in flight, and results are written in
//! input order. A cloud that is down, slow or returns garbage costs each hard example at most
//! `offload.budget_ms`, and nothing once the circuit breaker opens: the edge result is used.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{self, BackendError, BackendOptions};
use crate::client::{CloudClient, OffloadConfig, OffloadError, OffloadOutcome};
use crate::hard_examples::HardExampleStore;
use crate::hot_update::{HotUpdater, Outcome};
use crate::metrics::EdgeMetrics;
use crate::mining::{HardExampleMining, MiningError};
use crate::model::{Model, ModelError};
use crate::pipeline::{Decision, EdgePipeline, MiningMode, Prediction};
use crate::preprocess::{activate, argmax};
use crate::source::{Sample, Source};

/// Decisions buffered between the pipeline thread and the async side.
const DECISION_QUEUE: usize = 256;

/// Edge worker settings. Sedna's environment variables map onto these (see [`crate::config`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// The edge model (`MODEL_URL`).
    pub model: PathBuf,
    /// Inference engine.
    pub backend: BackendOptions,
    /// Mining rule (`HEM_NAME`).
    pub hem_name: String,
    /// Mining parameters as Sedna's JSON list (`HEM_PARAMETERS`).
    pub hem_parameters: String,
    /// `MINING_MODE`.
    pub mining_mode: MiningMode,
    /// Samples per edge inference call.
    pub batch: usize,
    /// The cloud.
    pub offload: OffloadConfig,
    /// Where to write JSON lines (`-` for stdout); none to skip.
    pub output: Option<PathBuf>,
    /// Where to save hard examples with the cloud's pseudo-labels.
    pub hard_examples_dir: Option<PathBuf>,
    /// Hard examples kept on disk while the cloud cannot label them
    /// (`SEDGE_HARD_EXAMPLES_PENDING_MAX`); when full the oldest is dropped, counted.
    pub hard_examples_pending_max: usize,
    /// Address for `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
    /// Stop after this many samples.
    pub limit: Option<usize>,
    /// Go through the input again and again (`SEDGE_REPEAT`), as a long-running service does.
    pub repeat: bool,
    /// At most this many samples per second (`SEDGE_RATE`); none means as fast as possible.
    pub rate: Option<f64>,
    /// Sedna's `model_config.json` to poll for hot model updates (`MODEL_HOT_UPDATE=true` and
    /// `MODEL_HOT_UPDATE_CONFIG`); none turns hot update off.
    pub hot_update_config: Option<PathBuf>,
    /// How often to poll it (`MODEL_POLL_PERIOD_SECONDS`).
    pub hot_update_period_seconds: f64,
    /// The Open Inference Protocol endpoint for applications (`serve.listen`).
    pub serve: crate::joint::ServeConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            model: PathBuf::from("models/fashion-mnist/edge-cnn.onnx"),
            backend: BackendOptions::default(),
            hem_name: "MaxProbability".into(),
            hem_parameters: r#"[{"key":"threshold","value":"0.8"}]"#.into(),
            mining_mode: MiningMode::default(),
            batch: 1,
            offload: OffloadConfig::default(),
            output: None,
            hard_examples_dir: None,
            hard_examples_pending_max: crate::hard_examples::DEFAULT_MAX_PENDING,
            metrics_listen: None,
            limit: None,
            repeat: false,
            rate: None,
            hot_update_config: None,
            hot_update_period_seconds: 60.0,
            serve: Default::default(),
        }
    }
}

/// Why the edge worker could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model or its config.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The engine.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The mining rule.
    #[error(transparent)]
    Mining(#[from] MiningError),
    /// Settings that do not fit together.
    #[error("{0}")]
    Config(String),
    /// The sample source or the hard-example directory.
    #[error(transparent)]
    Data(#[from] sedge_datasets::DatasetError),
    /// The output file or the metrics port.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// What a run did, with Sedna's counters under their Sedna names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EdgeSummary {
    /// Samples read.
    pub samples: u64,
    /// Sedna `inferenceNumber`: samples inferred, each counted once.
    #[serde(rename = "inferenceNumber")]
    pub inference_number: u64,
    /// Sedna `hardExampleNumber`.
    #[serde(rename = "hardExampleNumber")]
    pub hard_example_number: u64,
    /// Sedna `uploadCloudRatio` = hardExampleNumber / inferenceNumber.
    #[serde(rename = "uploadCloudRatio")]
    pub upload_cloud_ratio: f64,
    /// Hard examples the cloud answered.
    pub cloud_answered: u64,
    /// Hard examples that kept the edge result because the cloud gave no usable answer.
    pub cloud_fallbacks: u64,
    /// Samples that could not be processed at all (unreadable, undecodable, no answer anywhere).
    pub errors: u64,
    /// Samples with ground truth.
    pub labelled: u64,
    /// Final answers that matched the ground truth.
    pub correct: u64,
    /// Edge answers that matched the ground truth.
    pub edge_correct: u64,
    /// Request bytes sent to the cloud.
    pub bytes_sent: u64,
    /// Median time per sample (edge time plus cloud round trip), milliseconds.
    pub p50_ms: f64,
    /// 99th percentile of the same, milliseconds.
    pub p99_ms: f64,
    /// Wall-clock time of the run, seconds.
    pub wall_seconds: f64,
    /// Samples per second over the run.
    pub throughput: f64,
    /// Hard examples saved (including earlier runs into the same directory).
    pub hard_examples_saved: u64,
    /// Hard examples still waiting on disk for the cloud's label at the end of the run.
    #[serde(default)]
    pub hard_examples_pending: u64,
    /// Waiting hard examples dropped because the queue was full (or unreadable).
    #[serde(default)]
    pub hard_examples_dropped: u64,
    /// Hot model updates put in service during the run.
    #[serde(default)]
    pub model_version: u64,
}

impl EdgeSummary {
    /// Final accuracy, when the source had labels.
    pub fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }

    /// Share of samples offloaded.
    pub fn offload_share(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.hard_example_number as f64 / self.samples as f64
        }
    }
}

/// A started edge worker: its model, rule and cloud client, ready to process sources.
pub struct EdgeWorker {
    pipeline: Arc<EdgePipeline>,
    client: Option<Arc<CloudClient>>,
    config: EdgeConfig,
    /// Counters, also served on `/metrics`.
    pub metrics: Arc<EdgeMetrics>,
    store: Option<Arc<Mutex<HardExampleStore>>>,
    /// The hot-update poller and the late labeller, shared by whatever runs (input, endpoint).
    background: Mutex<Weak<Background>>,
}

/// The worker's background work: polling for hot model updates and labelling the hard examples
/// that waited for the cloud. It runs while anyone holds it; the last holder's drop stops it.
struct Background {
    stop_polling: Arc<std::sync::atomic::AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
    stop_drain: Option<tokio::sync::watch::Sender<bool>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop_polling
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(p) = &self.poller {
            p.thread().unpark();
        }
        if let Some(stop) = &self.stop_drain {
            let _ = stop.send(true);
        }
    }
}

impl EdgeWorker {
    /// Loads the model and checks every setting; all configuration errors surface here.
    pub fn start(config: EdgeConfig) -> Result<Self, WorkerError> {
        let mining = HardExampleMining::from_env_strings(&config.hem_name, &config.hem_parameters)?;
        let model = Model::load(&config.model)?;
        let backend = backend::load(&model, &config.backend)?;
        let client = match &config.offload.address {
            Some(_) => Some(Arc::new(
                CloudClient::new(
                    config.offload.clone(),
                    &model.config.input.name,
                    &model.config.input.shape,
                    model.config.labels.len(),
                )
                .map_err(|e| WorkerError::Config(e.to_string()))?
                .with_activation(model.config.output.activation),
            )),
            None => None,
        };
        let (rows, cols) = model.config.input.image_dims();
        let pipeline = EdgePipeline::new(backend, model.config, mining, config.mining_mode)
            .map_err(WorkerError::Config)?;
        let store = match &config.hard_examples_dir {
            Some(dir) => Some(Arc::new(Mutex::new(
                HardExampleStore::open(dir, rows, cols)?
                    .with_max_pending(config.hard_examples_pending_max),
            ))),
            None => None,
        };
        Ok(EdgeWorker {
            pipeline: Arc::new(pipeline),
            client,
            config,
            metrics: Arc::new(EdgeMetrics::default()),
            store,
            background: Mutex::new(Weak::new()),
        })
    }

    /// Joins the background work, starting it if nothing runs it yet (needs a tokio runtime).
    fn background(&self) -> Result<Arc<Background>, WorkerError> {
        let mut slot = self.background.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.upgrade() {
            return Ok(running);
        }
        let stop_polling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = self.spawn_hot_update(stop_polling.clone())?;
        // Labels the examples that waited for the cloud, in the background, as it answers again.
        let stop_drain = match (&self.store, &self.client) {
            (Some(store), Some(client)) => {
                self.publish_store(&store.lock().unwrap_or_else(|p| p.into_inner()));
                let (stop, stopped) = tokio::sync::watch::channel(false);
                tokio::spawn(drain_loop(
                    store.clone(),
                    client.clone(),
                    self.metrics.clone(),
                    activation_of(&self.pipeline),
                    stopped,
                ));
                Some(stop)
            }
            _ => None,
        };
        let running = Arc::new(Background {
            stop_polling,
            poller,
            stop_drain,
        });
        *slot = Arc::downgrade(&running);
        Ok(running)
    }

    /// The endpoint's model: the edge model in service behind a batcher, then joint inference.
    pub fn service(&self) -> Arc<crate::server::ServedModel> {
        let joint = crate::joint::Joint::new(
            self.pipeline.clone(),
            self.client.clone(),
            self.metrics.clone(),
            self.store.clone(),
            &self.config.serve,
        );
        crate::server::ServedModel::joint(joint, self.config.serve.server.batch.clone())
    }

    /// Serves the Open Inference Protocol (REST and gRPC on one port, `/metrics` beside them) on
    /// `listener` until `shutdown` resolves, answering each request with joint inference. Hot
    /// updates and late labelling run meanwhile.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WorkerError> {
        let _background = self.background()?;
        let model = self.service();
        crate::server::serve(listener, model, self.config.serve.server.clone(), shutdown)
            .await
            .map_err(|e| WorkerError::Io {
                what: "serving the inference endpoint".into(),
                source: e,
            })
    }

    /// Polls the hot-update config on its own thread until `stop` is set (none without one).
    fn spawn_hot_update(
        &self,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, WorkerError> {
        let Some(path) = self.config.hot_update_config.clone() else {
            return Ok(None);
        };
        let period = Duration::from_secs_f64(self.config.hot_update_period_seconds.max(0.01));
        let mut updater = HotUpdater::new(path, self.config.backend.clone());
        let pipeline = self.pipeline.clone();
        let metrics = self.metrics.clone();
        std::thread::Builder::new()
            .name("model-hot-update".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match updater.poll(&pipeline) {
                        Outcome::Unchanged => {}
                        Outcome::Swapped {
                            model,
                            version,
                            load,
                            pause,
                        } => {
                            metrics.model_version.set(version as i64);
                            tracing::info!(model = %model.display(), version, load_ms = load.as_secs_f64() * 1e3, pause_us = pause.as_secs_f64() * 1e6, "hot update: new model in service");
                        }
                        Outcome::Refused {
                            update_time,
                            message,
                        } => {
                            metrics.model_update_refused.inc();
                            tracing::warn!(update_time, error = %message, "hot update refused; the model in service stays");
                        }
                    }
                    std::thread::park_timeout(period);
                }
            })
            .map(Some)
            .map_err(|e| WorkerError::Io {
                what: "cannot start the hot-update thread".into(),
                source: e,
            })
    }

    /// The pipeline (model in service, mining rule).
    pub fn pipeline(&self) -> &Arc<EdgePipeline> {
        &self.pipeline
    }

    /// The cloud client, when a cloud is configured.
    pub fn client(&self) -> Option<&Arc<CloudClient>> {
        self.client.as_ref()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the returned task is aborted.
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let metrics = self.metrics.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || async move { metrics.encode() }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(sedge_serve::serve(
            listener,
            app,
            sedge_serve::Limits::default(),
            std::future::pending(),
        ))
    }

    /// Processes every sample of `source` (or until `shutdown` resolves), then returns the summary.
    pub async fn run(
        &self,
        source: &Source,
        shutdown: impl Future<Output = ()>,
    ) -> Result<EdgeSummary, WorkerError> {
        let limit = self.config.limit;
        let mut samples = source.open(limit)?;
        if self.config.repeat {
            let again = source.clone();
            samples = Box::new(
                samples.chain(
                    std::iter::repeat_with(move || again.open(limit).ok())
                        .map_while(|s| s)
                        .flatten(),
                ),
            );
        }
        if let Some(rate) = self.config.rate.filter(|r| *r > 0.0) {
            // Paced on the pipeline thread, which pulls the samples.
            let every = Duration::from_secs_f64(1.0 / rate);
            let start = Instant::now();
            samples = Box::new(samples.enumerate().map(move |(i, s)| {
                let due = start + every.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                s
            }));
        }
        self.run_samples(samples, shutdown).await
    }

    /// Like [`EdgeWorker::run`], over any iterator of samples.
    pub async fn run_samples(
        &self,
        samples: Box<dyn Iterator<Item = Sample> + Send>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<EdgeSummary, WorkerError> {
        let mut out: Option<Box<dyn Write + Send>> = match &self.config.output {
            None => None,
            Some(p) if p.as_os_str() == "-" => {
                Some(Box::new(std::io::BufWriter::new(std::io::stdout())))
            }
            Some(p) => Some(Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| WorkerError::Io {
                    what: format!("cannot create {}", p.display()),
                    source: e,
                })?,
            ))),
        };
        let store = self.store.clone();
        let background = self.background()?;

        let (tx, rx) = tokio::sync::mpsc::channel::<Decision>(DECISION_QUEUE);
        let pipeline = self.pipeline.clone();
        let batch = self.config.batch.max(1);
        let producer = std::thread::Builder::new()
            .name("edge-pipeline".into())
            .spawn(move || {
                let mut samples = samples;
                loop {
                    let chunk: Vec<Sample> = samples.by_ref().take(batch).collect();
                    if chunk.is_empty() {
                        return;
                    }
                    for d in pipeline.process(chunk) {
                        if tx.blocking_send(d).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| WorkerError::Io {
                what: "cannot start the pipeline thread".into(),
                source: e,
            })?;

        let client = self.client.clone();
        let concurrency = self.config.offload.concurrency.max(1);
        let mut results = ReceiverStream::new(rx)
            .map(|d| {
                let client = client.clone();
                async move {
                    let outcome = match (&client, d.hard && !d.pixels.is_empty()) {
                        (Some(c), true) => Some(c.offload(&d.pixels).await),
                        (None, true) => Some(OffloadOutcome {
                            result: Err(OffloadError::BadAddress("no cloud configured".into())),
                            attempts: 0,
                            bytes: 0,
                            elapsed: Duration::ZERO,
                        }),
                        _ => None,
                    };
                    (d, outcome)
                }
            })
            .buffered(concurrency);

        let start = Instant::now();
        let mut summary = EdgeSummary::default();
        let mut latencies = Vec::new();
        let activation = self.pipeline.config().output.activation;
        let m = &self.metrics;
        let mut stopped_early = false;
        tokio::pin!(shutdown);
        loop {
            let next = tokio::select! {
                next = results.next() => next,
                _ = &mut shutdown => {
                    tracing::info!("shutdown requested; stopping after the samples in flight");
                    stopped_early = true;
                    None
                }
            };
            let Some((d, outcome)) = next else { break };
            summary.samples += 1;
            let edge_ok = d.edge.is_some();
            if edge_ok || d.hard {
                summary.inference_number += 1;
                m.inference_number.inc();
            }
            m.edge_seconds.observe(d.edge_time.as_secs_f64());
            let mut cloud: Option<Prediction> = None;
            let mut cloud_error = None;
            let mut cloud_time = Duration::ZERO;
            if d.hard {
                summary.hard_example_number += 1;
                m.hard_example_number.inc();
            }
            if let Some(o) = outcome {
                summary.bytes_sent += o.bytes;
                m.offload_bytes.inc_by(o.bytes);
                cloud_time = o.elapsed;
                m.cloud_seconds.observe(o.elapsed.as_secs_f64());
                match o.result {
                    Ok(mut row) => {
                        activate(&mut row, activation);
                        cloud = argmax(&row)
                            .map(|(label, confidence)| Prediction { label, confidence });
                        summary.cloud_answered += 1;
                        m.cloud_answered.inc();
                    }
                    Err(e) => {
                        if e == OffloadError::BreakerOpen {
                            m.breaker_skipped.inc();
                        }
                        summary.cloud_fallbacks += 1;
                        m.cloud_fallbacks.inc();
                        cloud_error = Some(e.to_string());
                    }
                }
            }
            let final_pred = cloud.or(d.edge);
            if final_pred.is_none() {
                summary.errors += 1;
            }
            if let Some(truth) = d.truth {
                summary.labelled += 1;
                summary.correct += u64::from(final_pred.is_some_and(|p| p.label as u32 == truth));
                summary.edge_correct += u64::from(d.edge.is_some_and(|p| p.label as u32 == truth));
            }
            if let Some(store) = &store
                && d.hard
                && !d.pixels.is_empty()
            {
                let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                let saved = match cloud {
                    Some(c) => s.save(&d.pixels, c.label),
                    // Labelled when the cloud is back; only where there is a cloud to ask.
                    None if self.client.is_some() => s.defer(&d.pixels).map(|_| ()),
                    None => Ok(()),
                };
                if let Err(e) = saved {
                    tracing::warn!(error = %e, "cannot save hard example");
                }
                self.publish_store(&s);
            }
            let total = d.edge_time + cloud_time;
            latencies.push(total.as_secs_f64() * 1e3);
            if let Some(w) = out.as_mut() {
                let line = json!({
                    "sample": d.id,
                    "truth": d.truth,
                    "edge": d.edge,
                    "hard": d.hard,
                    "cloud": cloud,
                    "cloud_error": cloud_error,
                    "final": final_pred.map(|p| p.label),
                    "error": d.error,
                    "edge_ms": d.edge_time.as_secs_f64() * 1e3,
                    "cloud_ms": cloud_time.as_secs_f64() * 1e3,
                });
                writeln!(w, "{line}").map_err(|e| WorkerError::Io {
                    what: "cannot write results".into(),
                    source: e,
                })?;
            }
        }
        m.update_ratio();
        drop(results);
        let _ = producer.join();
        drop(background);
        // A finite input: one last pass for what still waits (stops at the first failure, so
        // a cloud that is still away costs one offload budget at most).
        if !stopped_early && let (Some(store), Some(client)) = (&store, &self.client) {
            drain_once(store, client, &self.metrics, activation, usize::MAX).await;
        }
        summary.model_version = self.pipeline.model_version();
        if let Some(w) = out.as_mut() {
            w.flush().map_err(|e| WorkerError::Io {
                what: "cannot write results".into(),
                source: e,
            })?;
        }
        summary.wall_seconds = start.elapsed().as_secs_f64();
        summary.throughput = if summary.wall_seconds > 0.0 {
            summary.samples as f64 / summary.wall_seconds
        } else {
            0.0
        };
        summary.upload_cloud_ratio = if summary.inference_number == 0 {
            0.0
        } else {
            summary.hard_example_number as f64 / summary.inference_number as f64
        };
        (summary.p50_ms, summary.p99_ms) = (
            percentile(&mut latencies, 0.50),
            percentile(&mut latencies, 0.99),
        );
        if let Some(store) = &store {
            let s = store.lock().unwrap_or_else(|p| p.into_inner());
            summary.hard_examples_saved = s.len();
            summary.hard_examples_pending = s.pending() as u64;
            summary.hard_examples_dropped = s.dropped();
        }
        Ok(summary)
    }

    /// The queue's size and drops, on `/metrics`.
    fn publish_store(&self, s: &HardExampleStore) {
        publish(&self.metrics, s);
    }
}

/// The hard-example queue's size and drops, on `/metrics`.
pub(crate) fn publish(m: &EdgeMetrics, s: &HardExampleStore) {
    m.hard_examples_pending.set(s.pending() as i64);
    let dropped = s.dropped();
    let seen = m.hard_examples_dropped.get();
    if dropped > seen {
        m.hard_examples_dropped.inc_by(dropped - seen);
    }
}

fn activation_of(p: &EdgePipeline) -> crate::model::Activation {
    p.config().output.activation
}

/// How often the background pass looks for waiting hard examples.
const DRAIN_PERIOD: Duration = Duration::from_secs(1);
/// Waiting hard examples labelled per pass.
const DRAIN_BATCH: usize = 32;

async fn drain_loop(
    store: Arc<Mutex<HardExampleStore>>,
    client: Arc<CloudClient>,
    metrics: Arc<EdgeMetrics>,
    activation: crate::model::Activation,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_PERIOD) => {}
            _ = stop.changed() => return,
        }
        // Keep going while the cloud answers and examples wait; back to sleep at a failure.
        while drain_once(&store, &client, &metrics, activation, DRAIN_BATCH).await == DRAIN_BATCH {
            if *stop.borrow() {
                return;
            }
        }
    }
}

/// Asks the cloud to label up to `n` waiting examples, oldest first, one at a time; stops at
/// the first that gets no answer. Returns how many were labelled.
async fn drain_once(
    store: &Mutex<HardExampleStore>,
    client: &CloudClient,
    metrics: &EdgeMetrics,
    activation: crate::model::Activation,
    n: usize,
) -> usize {
    let lock = || store.lock().unwrap_or_else(|p| p.into_inner());
    let mut done = 0;
    while done < n {
        // One at a time: the store lock is never held across the network.
        let Some((id, pixels)) = lock().take_pending(1).pop() else {
            break;
        };
        let outcome = client.offload(&pixels).await;
        metrics.offload_bytes.inc_by(outcome.bytes);
        let Ok(mut row) = outcome.result else { break };
        activate(&mut row, activation);
        let Some((label, _)) = argmax(&row) else {
            break;
        };
        let mut s = lock();
        match s.commit(id, &pixels, label) {
            Ok(true) => {
                metrics.hard_examples_labelled_late.inc();
                done += 1;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot save a hard example the cloud labelled late");
                break;
            }
        }
        publish(metrics, &s);
    }
    if done > 0 {
        tracing::info!(
            labelled = done,
            waiting = lock().pending(),
            "hard examples that waited for the cloud are labelled"
        );
    }
    done
}

/// The `q` quantile (nearest rank) of `values`; 0 for none.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
    }
}
