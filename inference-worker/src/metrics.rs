//! Prometheus metrics of the workers, served on `/metrics`.
//!
//! The edge counters carry Sedna's meaning under Prometheus names: `inferenceNumber` is
//! `sedge_inference_number_total`, `hardExampleNumber` is `sedge_hard_example_number_total`, and
//! `uploadCloudRatio` is `sedge_upload_cloud_ratio` (hard examples / inferences, each sample counted
//! once: Sedna counts a hard example twice in `inferenceNumber`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

fn latency_histogram() -> Histogram {
    // 10 us .. ~10 s
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

/// The edge worker's metrics.
pub struct EdgeMetrics {
    registry: Registry,
    /// Samples inferred on the edge.
    pub inference_number: Counter,
    /// Samples found hard.
    pub hard_example_number: Counter,
    /// Hard examples the cloud answered.
    pub cloud_answered: Counter,
    /// Hard examples that fell back to the edge result (cloud down, slow, garbage, or breaker open).
    pub cloud_fallbacks: Counter,
    /// Hard examples not sent because the circuit breaker was open.
    pub breaker_skipped: Counter,
    /// Bytes of tensor payload sent to the cloud.
    pub offload_bytes: Counter,
    /// `hardExampleNumber / inferenceNumber`.
    pub upload_cloud_ratio: Gauge<f64, AtomicU64>,
    /// Edge inference time per sample (decode, preprocess, infer, mine).
    pub edge_seconds: Histogram,
    /// Cloud round trip per offloaded sample, retries included.
    pub cloud_seconds: Histogram,
    /// Hot model updates put in service (0: the model the worker started with).
    pub model_version: Gauge,
    /// Hot model updates refused (the model did not load or did not fit).
    pub model_update_refused: Counter,
    /// Hard examples waiting on disk for the cloud's label.
    pub hard_examples_pending: Gauge,
    /// Waiting hard examples dropped (queue full or unreadable).
    pub hard_examples_dropped: Counter,
    /// Hard examples labelled after waiting for the cloud.
    pub hard_examples_labelled_late: Counter,
    /// Hard examples of served requests answered by the edge because the request's deadline
    /// could not wait for the cloud.
    pub deadline_fallbacks: Counter,
    /// Hard examples of served requests answered by the edge because too many already waited
    /// for an offload slot.
    pub offload_busy: Counter,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sedge");
        let m = EdgeMetrics {
            inference_number: Counter::default(),
            hard_example_number: Counter::default(),
            cloud_answered: Counter::default(),
            cloud_fallbacks: Counter::default(),
            breaker_skipped: Counter::default(),
            offload_bytes: Counter::default(),
            upload_cloud_ratio: Gauge::default(),
            edge_seconds: latency_histogram(),
            cloud_seconds: latency_histogram(),
            model_version: Gauge::default(),
            model_update_refused: Counter::default(),
            hard_examples_pending: Gauge::default(),
            hard_examples_dropped: Counter::default(),
            hard_examples_labelled_late: Counter::default(),
            deadline_fallbacks: Counter::default(),
            offload_busy: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "inference_number",
            "Samples inferred (Sedna inferenceNumber)",
            m.inference_number.clone(),
        );
        registry.register(
            "hard_example_number",
            "Hard examples found (Sedna hardExampleNumber)",
            m.hard_example_number.clone(),
        );
        registry.register(
            "cloud_answered",
            "Hard examples answered by the cloud",
            m.cloud_answered.clone(),
        );
        registry.register(
            "cloud_fallbacks",
            "Hard examples that kept the edge result",
            m.cloud_fallbacks.clone(),
        );
        registry.register(
            "breaker_skipped",
            "Hard examples not sent while the circuit breaker was open",
            m.breaker_skipped.clone(),
        );
        registry.register(
            "offload_bytes",
            "Tensor bytes sent to the cloud",
            m.offload_bytes.clone(),
        );
        registry.register(
            "upload_cloud_ratio",
            "Hard examples / inferences (Sedna uploadCloudRatio)",
            m.upload_cloud_ratio.clone(),
        );
        registry.register(
            "edge_inference_seconds",
            "Edge time per sample",
            m.edge_seconds.clone(),
        );
        registry.register(
            "cloud_round_trip_seconds",
            "Cloud round trip per hard example",
            m.cloud_seconds.clone(),
        );
        registry.register(
            "model_version",
            "Hot model updates put in service",
            m.model_version.clone(),
        );
        registry.register(
            "model_update_refused",
            "Hot model updates refused",
            m.model_update_refused.clone(),
        );
        registry.register(
            "hard_examples_pending",
            "Hard examples waiting on disk for the cloud's label",
            m.hard_examples_pending.clone(),
        );
        registry.register(
            "hard_examples_dropped",
            "Waiting hard examples dropped (queue full or unreadable)",
            m.hard_examples_dropped.clone(),
        );
        registry.register(
            "hard_examples_labelled_late",
            "Hard examples labelled after waiting for the cloud",
            m.hard_examples_labelled_late.clone(),
        );
        registry.register(
            "deadline_fallbacks",
            "Hard examples answered by the edge because the request's deadline could not wait for the cloud",
            m.deadline_fallbacks.clone(),
        );
        registry.register(
            "offload_busy",
            "Hard examples answered by the edge because the offload queue was full",
            m.offload_busy.clone(),
        );
        EdgeMetrics { registry, ..m }
    }
}

impl EdgeMetrics {
    /// Recomputes `uploadCloudRatio` from the counters.
    pub fn update_ratio(&self) {
        let n = self.inference_number.get();
        let ratio = if n == 0 {
            0.0
        } else {
            self.hard_example_number.get() as f64 / n as f64
        };
        self.upload_cloud_ratio.set(ratio);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// Labels of a cloud request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `rest`, `grpc` or `sedna`.
    pub protocol: &'static str,
    /// `ok`, `invalid`, `busy` or `error`.
    pub result: &'static str,
}

/// The cloud worker's metrics.
pub struct CloudMetrics {
    registry: Registry,
    /// Requests by protocol and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Samples per backend call.
    pub batch_size: Histogram,
    /// Time from request to response.
    pub request_seconds: Histogram,
    /// Samples inferred.
    pub samples: Counter,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        CloudMetrics::with_prefix("sedge_cloud")
    }
}

impl CloudMetrics {
    /// The metrics with names starting `prefix` (`sedge_cloud` for the cloud worker,
    /// `sedge_edge_server` for the edge worker's endpoint).
    pub fn with_prefix(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<RequestLabels, Counter>::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let request_seconds = latency_histogram();
        let samples = Counter::default();
        registry.register(
            "requests",
            "Inference requests by protocol and result",
            requests.clone(),
        );
        registry.register("batch_size", "Samples per backend call", batch_size.clone());
        registry.register(
            "request_seconds",
            "Request latency",
            request_seconds.clone(),
        );
        registry.register("samples", "Samples inferred", samples.clone());
        CloudMetrics {
            registry,
            requests,
            batch_size,
            request_seconds,
            samples,
        }
    }

    /// Counts one request.
    pub fn count(&self, protocol: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { protocol, result })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
