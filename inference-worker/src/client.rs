//! The edge's client for the cloud model: Open Inference Protocol gRPC with raw `UINT8` bytes
//! (784 bytes per Fashion-MNIST image, a fraction of Sedna's nested JSON list). Sedna's
//! own wire (`POST /sedna/predict` with the image as a nested JSON list, over HTTP/1.1) is there
//! too (`protocol: sedna-json`), so benchmarks can compare the two on the same link.
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
use crate::model::Activation;
use crate::pb;
use crate::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

/// What the edge speaks to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OffloadProtocol {
    /// OIP gRPC, raw UINT8 bytes.
    #[default]
    Grpc,
    /// Sedna's `POST /sedna/predict` with `{"data": [[row], ...]}` over HTTP/1.1.
    SednaJson,
}

impl std::str::FromStr for OffloadProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(OffloadProtocol::Grpc),
            "sedna-json" => Ok(OffloadProtocol::SednaJson),
            other => Err(format!(
                "unknown offload protocol {other:?}; expected grpc or sedna-json"
            )),
        }
    }
}

/// How the edge reaches the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffloadConfig {
    /// The wire: `grpc` (default) or `sedna-json`.
    pub protocol: OffloadProtocol,
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
            protocol: OffloadProtocol::Grpc,
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
    /// `/sedna/predict` and a plain HTTP client, for `sedna-json`.
    http: Option<(String, reqwest::Client)>,
    /// How the edge reads a raw row; Sedna's probabilities are handed back in that form.
    activation: Activation,
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
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|_| OffloadError::BadAddress(address.clone()))?
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .tcp_nodelay(true);
        // reqwest needs a process-wide rustls provider, even for plain HTTP.
        if config.protocol == OffloadProtocol::SednaJson {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let http = match config.protocol {
            OffloadProtocol::Grpc => None,
            OffloadProtocol::SednaJson => Some((
                format!("{}/sedna/predict", uri.trim_end_matches('/')),
                reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .build()
                    .map_err(|_| OffloadError::BadAddress(address.clone()))?,
            )),
        };
        Ok(CloudClient {
            client: GrpcInferenceServiceClient::new(endpoint.connect_lazy()),
            http,
            activation: Activation::Softmax,
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

    /// Tells the client how the edge reads a raw output row (its model's activation), so that
    /// Sedna's probabilities come back in that form: log-probabilities under softmax (which turns
    /// them back into the same probabilities), probabilities without one.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
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

    /// One attempt over the configured wire; returns the row and the request bytes sent.
    async fn attempt(
        &self,
        pixels: &[u8],
        timeout: Duration,
    ) -> (Result<Vec<f32>, OffloadError>, u64) {
        match &self.http {
            None => {
                let req = self.request(pixels);
                let bytes = req.encoded_len() as u64;
                (self.attempt_grpc(req, timeout).await, bytes)
            }
            Some((url, http)) => {
                let cols = self.sample_shape.last().copied().unwrap_or(1).max(1) as usize;
                let rows: Vec<&[u8]> = pixels.chunks(cols).collect();
                let body = serde_json::to_vec(&serde_json::json!({ "data": [rows] }))
                    .expect("pixels serialise");
                let bytes = body.len() as u64;
                (self.attempt_sedna(url, http, body, timeout).await, bytes)
            }
        }
    }

    async fn attempt_sedna(
        &self,
        url: &str,
        http: &reqwest::Client,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<f32>, OffloadError> {
        let send = http
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .timeout(timeout)
            .send();
        let resp = match tokio::time::timeout(timeout, send).await {
            Err(_) => return Err(OffloadError::Timeout(timeout)),
            Ok(Err(e)) if e.is_timeout() => return Err(OffloadError::Timeout(timeout)),
            Ok(Err(e)) => {
                return Err(OffloadError::Status {
                    code: tonic::Code::Unavailable,
                    message: e.to_string(),
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let text = match tokio::time::timeout(timeout, resp.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return Err(OffloadError::Status {
                    code: tonic::Code::Unavailable,
                    message: e.to_string(),
                });
            }
            Err(_) => return Err(OffloadError::Timeout(timeout)),
        };
        if !status.is_success() {
            return Err(OffloadError::Status {
                code: if status.as_u16() == 503 {
                    tonic::Code::Unavailable
                } else {
                    tonic::Code::Internal
                },
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&text)),
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| OffloadError::Garbage(format!("not JSON: {e}")))?;
        let probs: Vec<f32> = v["result"][0]["probabilities"]
            .as_array()
            .ok_or_else(|| OffloadError::Garbage("no result[0].probabilities".into()))?
            .iter()
            .map(|p| p.as_f64().map(|p| p as f32))
            .collect::<Option<_>>()
            .ok_or_else(|| OffloadError::Garbage("probabilities are not numbers".into()))?;
        let row = match self.activation {
            Activation::Softmax => probs
                .iter()
                .map(|p| p.max(f32::MIN_POSITIVE).ln())
                .collect(),
            Activation::None => probs,
        };
        self.check_row(row)
    }

    async fn attempt_grpc(
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
        self.check_row(values)
    }

    fn check_row(&self, values: Vec<f32>) -> Result<Vec<f32>, OffloadError> {
        let garbage = |m: String| Err(OffloadError::Garbage(m));
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
            attempts += 1;
            let left = budget.saturating_sub(start.elapsed());
            let (result, sent) = self.attempt(pixels, per_attempt.min(left)).await;
            bytes += sent;
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
