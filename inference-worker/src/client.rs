//! The edge's client for the cloud model: Open Inference Protocol gRPC with raw `UINT8` bytes
//! (784 bytes per Fashion-MNIST image, against about 8 kB for Sedna's nested JSON list).
//!
//! Each call has a deadline; failed calls are retried with jittered exponential backoff while the
//! sample's overall budget lasts; a [`CircuitBreaker`] stops calls to a cloud that keeps failing.
//! The caller always gets an answer in bounded time: the cloud's, or the reason it has none.

use std::time::{Duration, Instant};

use prost::Message;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::breaker::CircuitBreaker;
use crate::pb;
use crate::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

/// How the edge reaches the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffloadConfig {
    /// `host:port` of the cloud worker (Sedna: `BIG_MODEL_IP:BIG_MODEL_PORT`); none means edge-only.
    pub address: Option<String>,
    /// The model name the cloud serves (`BIG_MODEL_NAME`).
    pub model: String,
    /// Deadline of one attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Attempts after the first.
    pub retries: u32,
    /// First backoff between attempts, in milliseconds (doubled each time, with jitter).
    pub backoff_ms: u64,
    /// Total time one sample may spend on the cloud, retries included, in milliseconds.
    pub budget_ms: u64,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open, in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Hard examples in flight at once.
    pub concurrency: usize,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            address: None,
            model: "cloud-cnn".into(),
            timeout_ms: 500,
            retries: 2,
            backoff_ms: 20,
            budget_ms: 1500,
            breaker_failures: 5,
            breaker_cooldown_ms: 2000,
            concurrency: 8,
        }
    }
}

/// Why the cloud gave no usable answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OffloadError {
    /// The breaker is open: the cloud failed repeatedly and was not called.
    #[error("circuit breaker open")]
    BreakerOpen,
    /// An attempt passed its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The cloud answered with an error status.
    #[error("cloud returned {code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// The cloud's message.
        message: String,
    },
    /// The cloud's answer was not a valid output for this model.
    #[error("cloud answer unusable: {0}")]
    Garbage(String),
    /// The address is not a valid endpoint.
    #[error("bad cloud address {0:?}")]
    BadAddress(String),
}

impl OffloadError {
    fn retryable(&self) -> bool {
        match self {
            OffloadError::Timeout(_) => true,
            OffloadError::Status { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
            ),
            _ => false,
        }
    }
}

/// What happened to one offloaded sample.
#[derive(Debug, Clone)]
pub struct OffloadOutcome {
    /// The cloud's raw output row, or why there is none.
    pub result: Result<Vec<f32>, OffloadError>,
    /// Attempts made (0 when the breaker refused).
    pub attempts: u32,
    /// Request bytes sent, summed over attempts (protobuf-encoded message size).
    pub bytes: u64,
    /// Time spent, retries and backoff included.
    pub elapsed: Duration,
}

/// gRPC client of the cloud worker.
pub struct CloudClient {
    client: GrpcInferenceServiceClient<Channel>,
    config: OffloadConfig,
    input_name: String,
    sample_shape: Vec<i64>,
    classes: usize,
    breaker: CircuitBreaker,
}

impl CloudClient {
    /// Prepares a lazily connected client: the cloud may come up after the edge.
    pub fn new(
        config: OffloadConfig,
        input_name: &str,
        sample_shape: &[usize],
        classes: usize,
    ) -> Result<Self, OffloadError> {
        let address = config.address.clone().unwrap_or_default();
        let uri = if address.contains("://") {
            address.clone()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|_| OffloadError::BadAddress(address.clone()))?
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .tcp_nodelay(true);
        Ok(CloudClient {
            client: GrpcInferenceServiceClient::new(endpoint.connect_lazy()),
            breaker: CircuitBreaker::new(
                config.breaker_failures,
                Duration::from_millis(config.breaker_cooldown_ms),
            ),
            input_name: input_name.into(),
            sample_shape: sample_shape.iter().map(|&d| d as i64).collect(),
            classes,
            config,
        })
    }

    /// The breaker, for inspection.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Whether the cloud answers OIP `ServerReady` with ready, within `timeout`.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut client = self.client.clone();
        let ask = client.server_ready(pb::ServerReadyRequest {});
        matches!(tokio::time::timeout(timeout, ask).await, Ok(Ok(r)) if r.get_ref().ready)
    }

    /// Waits up to `limit` for the cloud to be ready (asking every 200 ms); false if it never was.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.ready(Duration::from_millis(500)).await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn request(&self, pixels: &[u8]) -> pb::ModelInferRequest {
        let mut shape = vec![1];
        shape.extend(&self.sample_shape);
        pb::ModelInferRequest {
            model_name: self.config.model.clone(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: self.input_name.clone(),
                datatype: "UINT8".into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: vec![pixels.to_vec()],
            ..Default::default()
        }
    }

    async fn attempt(
        &self,
        req: pb::ModelInferRequest,
        timeout: Duration,
    ) -> Result<Vec<f32>, OffloadError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let resp = match tokio::time::timeout(timeout, client.model_infer(request)).await {
            Err(_) => return Err(OffloadError::Timeout(timeout)),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(OffloadError::Timeout(timeout));
            }
            Ok(Err(status)) => {
                return Err(OffloadError::Status {
                    code: status.code(),
                    message: status.message().into(),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        self.validate(resp)
    }

    fn validate(&self, resp: pb::ModelInferResponse) -> Result<Vec<f32>, OffloadError> {
        let garbage = |m: String| Err(OffloadError::Garbage(m));
        let values: Vec<f32> = match (resp.raw_output_contents.first(), resp.outputs.first()) {
            (Some(raw), _) if raw.len().is_multiple_of(4) => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            (Some(raw), _) => {
                return garbage(format!("raw output of {} bytes is not FP32", raw.len()));
            }
            (None, Some(out)) => out
                .contents
                .as_ref()
                .map(|c| c.fp32_contents.clone())
                .unwrap_or_default(),
            (None, None) => return garbage("no outputs".into()),
        };
        if values.len() != self.classes {
            return garbage(format!(
                "{} values for one sample, expected {} classes",
                values.len(),
                self.classes
            ));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return garbage("non-finite values".into());
        }
        Ok(values)
    }

    /// Sends one sample's pixels, with retries inside the budget, unless the breaker is open.
    pub async fn offload(&self, pixels: &[u8]) -> OffloadOutcome {
        let start = Instant::now();
        if !self.breaker.allow(start) {
            return OffloadOutcome {
                result: Err(OffloadError::BreakerOpen),
                attempts: 0,
                bytes: 0,
                elapsed: Duration::ZERO,
            };
        }
        let budget = Duration::from_millis(self.config.budget_ms);
        let per_attempt = Duration::from_millis(self.config.timeout_ms);
        let mut backoff = Duration::from_millis(self.config.backoff_ms);
        let mut attempts = 0;
        let mut bytes = 0;
        loop {
            let req = self.request(pixels);
            bytes += req.encoded_len() as u64;
            attempts += 1;
            let left = budget.saturating_sub(start.elapsed());
            let result = self.attempt(req, per_attempt.min(left)).await;
            let retry = match &result {
                Ok(_) => false,
                Err(e) => {
                    e.retryable()
                        && attempts <= self.config.retries
                        && start.elapsed() + backoff < budget
                }
            };
            if !retry {
                match &result {
                    Ok(_) => self.breaker.success(),
                    Err(e) => {
                        if self.breaker.failure(Instant::now()) {
                            tracing::warn!(error = %e, cooldown_ms = self.config.breaker_cooldown_ms, "cloud keeps failing; circuit breaker open, using edge results");
                        }
                    }
                }
                return OffloadOutcome {
                    result,
                    attempts,
                    bytes,
                    elapsed: start.elapsed(),
                };
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff *= 2;
        }
    }
}
