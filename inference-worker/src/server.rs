//! The cloud worker: serves one model over the Open Inference Protocol, REST and gRPC on one port
//! (gRPC is told apart by its `application/grpc` content type), plus Sedna's `POST /sedna/predict`
//! so that Sedna-style edge workers can call it unchanged.
//!
//! Requests go through the [`Batcher`]; a full queue is answered with HTTP 503 / gRPC
//! `RESOURCE_EXHAUSTED`, a malformed request with HTTP 400 / `INVALID_ARGUMENT` naming the problem.
//!
//! The edge worker serves its model with the same code ([`ServedModel::joint`]): the edge model
//! answers, and the samples its mining rule finds hard go on to the cloud within the request's
//! deadline ([`crate::joint`]). A deadline comes from the request's `timeout` parameter
//! (microseconds, as Triton's) or the gRPC deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::batcher::{BatchConfig, BatchError, Batcher};
use crate::joint::{ANSWERED_BY, Answerer, Joint, NoAnswer, TIMEOUT_PARAMETER};
use crate::metrics::CloudMetrics;
use crate::model::ModelConfig;
use crate::oip::{
    self, DataType, InferenceRequest, InferenceResponse, InvalidRequest, ModelMetadata,
    ResponseOutput, TensorData, invalid,
};
use crate::pb;
use crate::preprocess::{Normalizer, activate, argmax};

/// Name reported in server metadata.
pub const SERVER_NAME: &str = "sedge";
/// Header of Triton's binary tensor data extension.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Cloud worker settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Dynamic batching.
    pub batch: BatchConfig,
    /// Connections served at once; past this the newest is closed on accept.
    pub max_connections: usize,
    /// Deadline, in milliseconds, for a connection's first byte and each request's headers
    /// (also how long an idle keep-alive connection is kept).
    pub header_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = sedge_serve::Limits::default();
        ServerConfig {
            max_body_bytes: 32 << 20,
            batch: BatchConfig::default(),
            max_connections: limits.max_connections,
            header_timeout_ms: limits.header_timeout.as_millis() as u64,
        }
    }
}

impl ServerConfig {
    /// The listener's bounds.
    pub fn limits(&self) -> sedge_serve::Limits {
        sedge_serve::Limits {
            max_connections: self.max_connections.max(1),
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms.max(1)),
        }
    }
}

/// What the handlers share: a model behind a batcher, with joint inference after it at the edge.
pub struct ServedModel {
    config: ModelConfig,
    norm: Normalizer,
    batcher: Batcher,
    /// The server's metrics.
    pub metrics: Arc<CloudMetrics>,
    output_len: usize,
    joint: Option<Joint>,
}

/// A request's answer.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// `batch` rows of output values: the model's raw outputs, or probabilities at the edge.
    pub values: Vec<f32>,
    /// Samples.
    pub batch: usize,
    /// Who answered each sample (the edge worker's endpoint only).
    pub answered_by: Option<Vec<Answerer>>,
}

impl Inferred {
    /// The response parameters: `answered_by` at the edge, none in the cloud.
    fn parameters(&self) -> Option<(&'static str, String)> {
        self.answered_by
            .as_ref()
            .map(|by| (ANSWERED_BY, Answerer::join(by)))
    }
}

/// An inference failure, mapped onto HTTP and gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request was malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// No model of that name is served here.
    #[error("model {asked:?} is not served here; this server serves {served:?}")]
    UnknownModel {
        /// The name asked for.
        asked: String,
        /// The name served.
        served: String,
    },
    /// Batching or the backend failed.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Neither the edge model nor the cloud answered a sample.
    #[error(transparent)]
    NoAnswer(#[from] NoAnswer),
}

impl ServeError {
    fn result_label(&self) -> &'static str {
        match self {
            ServeError::Invalid(_) | ServeError::UnknownModel { .. } => "invalid",
            ServeError::Batch(BatchError::QueueFull(_)) => "busy",
            ServeError::Batch(_) | ServeError::NoAnswer(_) => "error",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            ServeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServeError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            ServeError::Batch(BatchError::QueueFull(_))
            | ServeError::Batch(BatchError::Stopped) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Batch(BatchError::Backend(_)) | ServeError::NoAnswer(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        let msg = e.to_string();
        match e {
            ServeError::Invalid(_) => tonic::Status::invalid_argument(msg),
            ServeError::UnknownModel { .. } => tonic::Status::not_found(msg),
            ServeError::Batch(BatchError::QueueFull(_)) => tonic::Status::resource_exhausted(msg),
            ServeError::Batch(BatchError::Stopped) => tonic::Status::unavailable(msg),
            ServeError::Batch(BatchError::Backend(_)) | ServeError::NoAnswer(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        (
            self.http_status(),
            axum::Json(json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

impl ServedModel {
    /// Starts batching for a loaded backend (needs a tokio runtime).
    pub fn new(config: ModelConfig, backend: Arc<dyn Backend>, batch: BatchConfig) -> Arc<Self> {
        let metrics = Arc::new(CloudMetrics::default());
        let output_len = backend.output_len();
        Arc::new(ServedModel {
            norm: Normalizer::new(&config.input),
            batcher: Batcher::start(backend, batch, metrics.clone()),
            config,
            metrics,
            output_len,
            joint: None,
        })
    }

    /// The edge worker's endpoint: the edge model in service (hot updates included) behind the
    /// batcher, then `joint` for the hard samples (needs a tokio runtime).
    pub fn joint(joint: Joint, batch: BatchConfig) -> Arc<Self> {
        let pipeline = joint.pipeline().clone();
        let config = pipeline.config().clone();
        let metrics = Arc::new(CloudMetrics::with_prefix("sedge_edge_server"));
        Arc::new(ServedModel {
            norm: Normalizer::new(&config.input),
            output_len: config.labels.len(),
            batcher: Batcher::start(pipeline, batch, metrics.clone()),
            config,
            metrics,
            joint: Some(joint),
        })
    }

    /// The served model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Model metadata; the edge endpoint advertises UINT8, the only input it takes.
    fn metadata(&self) -> ModelMetadata {
        let mut md = ModelMetadata::of(&self.config);
        if self.joint.is_some() {
            for i in &mut md.inputs {
                i.datatype = "UINT8".into();
            }
        }
        md
    }

    fn check_name(&self, asked: &str) -> Result<(), ServeError> {
        if asked == self.config.name {
            Ok(())
        } else {
            Err(ServeError::UnknownModel {
                asked: asked.into(),
                served: self.config.name.clone(),
            })
        }
    }

    /// Checks that a request has exactly this model's one input with a supported datatype; `fields`
    /// reads (name, datatype) from the protocol's input type.
    fn check_input<'a, T>(
        &self,
        inputs: &'a [T],
        fields: impl Fn(&'a T) -> (&'a String, &'a String),
    ) -> Result<(&'a T, DataType), ServeError> {
        let [input] = inputs else {
            return Err(invalid!(
                "expected exactly 1 input ({:?}), got {}",
                self.config.input.name,
                inputs.len()
            )
            .into());
        };
        let (name, datatype) = fields(input);
        if *name != self.config.input.name {
            return Err(invalid!(
                "unknown input {name:?}; model {:?} has input {:?}",
                self.config.name,
                self.config.input.name
            )
            .into());
        }
        Ok((input, DataType::parse(datatype)?))
    }

    /// The deadline of a request that asked for `timeout` (or none), with the served model's
    /// default; the cloud worker keeps no deadlines.
    fn deadline(&self, start: Instant, timeout: Option<Duration>) -> Option<Instant> {
        let joint = self.joint.as_ref()?;
        timeout.or(joint.default_timeout()).map(|t| start + t)
    }

    /// Runs a decoded tensor: in the cloud, the model; at the edge, the edge model and then the
    /// cloud for the hard samples, answering before `deadline`.
    pub async fn infer(
        &self,
        data: TensorData,
        shape: &[i64],
        deadline: Option<Instant>,
    ) -> Result<Inferred, ServeError> {
        let Some(joint) = &self.joint else {
            let (input, batch) = data.into_model_input(shape, &self.config, &self.norm)?;
            let values = self.batcher.infer(input, batch).await?;
            self.metrics.samples.inc_by(batch as u64);
            return Ok(Inferred {
                values,
                batch,
                answered_by: None,
            });
        };
        let TensorData::U8(pixels) = data else {
            return Err(invalid!(
                "the edge endpoint takes raw UINT8 pixels (input {:?}, datatype UINT8): a hard sample is forwarded to the cloud model, which normalises it its own way",
                self.config.input.name
            )
            .into());
        };
        let (input, batch) =
            TensorData::U8(pixels.clone()).into_model_input(shape, &self.config, &self.norm)?;
        let start = Instant::now();
        let edge = match self.batcher.infer(input, batch).await {
            Ok(out) => Ok(out),
            Err(BatchError::Backend(e)) => Err(e),
            Err(e) => return Err(e.into()),
        };
        let edge_time = start.elapsed();
        let (values, by) = joint
            .answer(&pixels, batch, edge, edge_time, deadline)
            .await?;
        self.metrics.samples.inc_by(batch as u64);
        Ok(Inferred {
            values,
            batch,
            answered_by: Some(by),
        })
    }

    async fn timed<T>(
        &self,
        protocol: &'static str,
        f: impl Future<Output = Result<T, ServeError>>,
    ) -> Result<T, ServeError> {
        let start = Instant::now();
        let result = f.await;
        self.metrics
            .request_seconds
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.metrics.count(protocol, "ok"),
            Err(e) => {
                self.metrics.count(protocol, e.result_label());
                tracing::debug!(protocol, error = %e, "request failed");
            }
        }
        result
    }
}

/// The REST and gRPC routes on one router.
pub fn router(model: Arc<ServedModel>, config: &ServerConfig) -> Router {
    let grpc = tonic::service::Routes::new(
        pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(GrpcService {
            model: model.clone(),
        })
        .max_decoding_message_size(config.max_body_bytes),
    )
    .prepare()
    .into_axum_router();
    let rest = Router::new()
        .route("/v2", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { axum::Json(json!({"live": true})) }),
        )
        .route(
            "/v2/health/ready",
            get(|| async { axum::Json(json!({"live": true, "ready": true})) }),
        )
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_versioned),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_versioned),
        )
        .route("/v2/models/{name}/infer", post(infer_rest))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_rest_versioned),
        )
        .route("/sedna/predict", post(sedna_predict))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(model);
    rest.merge(grpc)
}

/// Serves REST and gRPC on `listener` until `shutdown` resolves, then lets requests in flight
/// finish. The listener is bounded (`sedge_serve`: connection cap, header deadline) and sets
/// TCP_NODELAY, without which small responses wait out the peer's delayed ACK (~40 ms a call).
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<ServedModel>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(model, &config);
    sedge_serve::serve(listener, app, config.limits(), shutdown).await;
    Ok(())
}

/// Binds a listener (port 0 picks a free port) and returns it with its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Binds `addr` and serves `model` on a spawned task until `shutdown` resolves; returns the bound
/// address (port 0 picks a free one) and the task.
pub async fn start(
    addr: SocketAddr,
    model: Arc<ServedModel>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let (listener, bound) = bind(addr).await?;
    Ok((
        bound,
        tokio::spawn(serve(listener, model, config, shutdown)),
    ))
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(
        json!({"name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}),
    )
}

async fn model_metadata(
    State(m): State<Arc<ServedModel>>,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelMetadata>, ServeError> {
    m.check_name(&name)?;
    Ok(axum::Json(m.metadata()))
}

async fn model_metadata_versioned(
    s: State<Arc<ServedModel>>,
    Path((name, _v)): Path<(String, String)>,
) -> Result<axum::Json<ModelMetadata>, ServeError> {
    model_metadata(s, Path(name)).await
}

async fn model_ready(
    State(m): State<Arc<ServedModel>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ServeError> {
    m.check_name(&name)?;
    Ok(axum::Json(json!({"name": name, "ready": true})))
}

async fn model_ready_versioned(
    s: State<Arc<ServedModel>>,
    Path((name, _v)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ServeError> {
    model_ready(s, Path(name)).await
}

async fn metrics(State(m): State<Arc<ServedModel>>) -> impl IntoResponse {
    let mut text = m.metrics.encode();
    if let Some(j) = &m.joint {
        // One exposition: the server's families, then the edge worker's, then one `# EOF`.
        let end = text.trim_end().strip_suffix("# EOF").map(str::len);
        if let Some(end) = end {
            text.truncate(end);
        }
        text.push_str(&j.metrics().encode());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn infer_rest_versioned(
    s: State<Arc<ServedModel>>,
    Path((name, _v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_rest(s, Path(name), headers, body).await
}

async fn infer_rest(
    State(m): State<Arc<ServedModel>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match m
        .timed("rest", infer_rest_inner(&m, &name, &headers, &body))
        .await
    {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Splits a body under the binary extension into its JSON header and binary tail.
fn split_binary<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), InvalidRequest> {
    match headers.get(HEADER_LENGTH) {
        None => Ok((body, &[])),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| invalid!("{HEADER_LENGTH} header {v:?} is not a byte count"))?;
            if n > body.len() {
                return Err(invalid!(
                    "{HEADER_LENGTH} is {n} but the body has only {} bytes",
                    body.len()
                ));
            }
            Ok(body.split_at(n))
        }
    }
}

async fn infer_rest_inner(
    m: &ServedModel,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ServeError> {
    let start = Instant::now();
    m.check_name(name)?;
    let (json_part, mut binary) = split_binary(headers, body)?;
    let req: InferenceRequest = serde_json::from_slice(json_part)
        .map_err(|e| invalid!("request body is not a valid inference request: {e}"))?;
    let (input, datatype) = m.check_input(&req.inputs, |i| (&i.name, &i.datatype))?;
    let data = match (input.parameters.get("binary_data_size"), &input.data) {
        (Some(size), _) => {
            let size = size
                .as_u64()
                .ok_or_else(|| invalid!("binary_data_size {size} is not a byte count"))?
                as usize;
            if size > binary.len() {
                return Err(invalid!(
                    "binary_data_size is {size} but only {} binary bytes follow the JSON header",
                    binary.len()
                )
                .into());
            }
            let (mine, rest) = binary.split_at(size);
            binary = rest;
            TensorData::from_raw(datatype, mine)?
        }
        (None, Some(data)) => TensorData::from_json(datatype, data)?,
        (None, None) => {
            return Err(invalid!(
                "input {:?} has neither `data` nor a binary_data_size parameter",
                input.name
            )
            .into());
        }
    };
    if !binary.is_empty() {
        return Err(invalid!(
            "{} bytes of binary data follow the JSON header but no input claims them",
            binary.len()
        )
        .into());
    }
    let timeout = match req.parameters.get(TIMEOUT_PARAMETER) {
        None => None,
        Some(v) => Some(Duration::from_micros(v.as_u64().ok_or_else(|| {
            invalid!(
                "parameter {TIMEOUT_PARAMETER} is {v}; expected a whole number of microseconds"
            )
        })?)),
    };
    let output_name = &m.config.output.name;
    let mut want_binary = oip::param_true(&req.parameters, "binary_data_output");
    if let Some(outputs) = &req.outputs {
        for o in outputs {
            if &o.name != output_name {
                return Err(invalid!(
                    "unknown output {:?}; model {:?} has output {:?}",
                    o.name,
                    m.config.name,
                    output_name
                )
                .into());
            }
            want_binary |= oip::param_true(&o.parameters, "binary_data");
        }
    }
    let deadline = m.deadline(start, timeout);
    let inferred = m.infer(data, &input.shape, deadline).await?;
    let parameters: serde_json::Map<String, Value> = inferred
        .parameters()
        .map(|(k, v)| (k.to_string(), Value::String(v)))
        .into_iter()
        .collect();
    let Inferred { values, batch, .. } = inferred;
    let shape = vec![batch as i64, (values.len() / batch) as i64];
    let mut out = ResponseOutput {
        name: output_name.clone(),
        shape,
        datatype: "FP32".into(),
        parameters: Default::default(),
        data: None,
    };
    let resp_of = |out| InferenceResponse {
        model_name: m.config.name.clone(),
        model_version: "1".into(),
        id: req.id.clone(),
        parameters: parameters.clone(),
        outputs: vec![out],
    };
    if want_binary {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.parameters
            .insert("binary_data_size".into(), json!(raw.len()));
        let mut body = serde_json::to_vec(&resp_of(out)).expect("response serialises");
        let json_len = body.len();
        body.extend_from_slice(&raw);
        let mut resp = (StatusCode::OK, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        resp.headers_mut()
            .insert(HEADER_LENGTH, HeaderValue::from(json_len));
        Ok(resp)
    } else {
        out.data = Some(values);
        Ok(axum::Json(resp_of(out)).into_response())
    }
}

/// Sedna's big-model API: `{"data": <nested list of raw pixel values>}` -> `{"result": [...]}`,
/// one result per sample with label, class name, confidence and probabilities.
async fn sedna_predict(State(m): State<Arc<ServedModel>>, body: Bytes) -> Response {
    let r = m
        .timed("sedna", async {
            let v: Value =
                serde_json::from_slice(&body).map_err(|e| invalid!("body is not JSON: {e}"))?;
            let data = v.get("data").ok_or_else(|| {
                invalid!("body has no `data` field; expected {{\"data\": [...pixels...]}}")
            })?;
            let tensor = TensorData::from_json(DataType::Uint8, data)?;
            let per_sample = m.config.sample_len() as i64;
            let total = tensor.len() as i64;
            if total == 0 || total % per_sample != 0 {
                return Err(invalid!(
                    "`data` holds {total} values, not a whole number of {per_sample}-pixel samples"
                )
                .into());
            }
            let start = Instant::now();
            let inferred = m
                .infer(
                    tensor,
                    &[total / per_sample, per_sample],
                    m.deadline(start, None),
                )
                .await?;
            // The edge endpoint's rows are probabilities already.
            let activation = match inferred.answered_by {
                Some(_) => crate::model::Activation::None,
                None => m.config.output.activation,
            };
            Ok(predictions(
                &m.config,
                activation,
                inferred.values,
                inferred.batch,
                m.output_len,
            ))
        })
        .await;
    match r {
        Ok(results) => axum::Json(json!({ "result": results })).into_response(),
        Err(e) => e.into_response(),
    }
}

fn predictions(
    config: &ModelConfig,
    activation: crate::model::Activation,
    mut values: Vec<f32>,
    batch: usize,
    output_len: usize,
) -> Vec<Value> {
    let per = if output_len > 0 {
        output_len
    } else {
        values.len() / batch
    };
    values
        .chunks_mut(per)
        .map(|p| {
            activate(p, activation);
            let (label, confidence) = argmax(p).unwrap_or((0, 0.0));
            json!({"label": label, "class": config.labels.get(label), "confidence": confidence, "probabilities": p})
        })
        .collect()
}

struct GrpcService {
    model: Arc<ServedModel>,
}

type GrpcResult<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: tonic::Request<pb::ServerLiveRequest>,
    ) -> GrpcResult<pb::ServerLiveResponse> {
        Ok(tonic::Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: tonic::Request<pb::ServerReadyRequest>,
    ) -> GrpcResult<pb::ServerReadyResponse> {
        Ok(tonic::Response::new(pb::ServerReadyResponse {
            ready: true,
        }))
    }

    async fn model_ready(
        &self,
        req: tonic::Request<pb::ModelReadyRequest>,
    ) -> GrpcResult<pb::ModelReadyResponse> {
        Ok(tonic::Response::new(pb::ModelReadyResponse {
            ready: req.get_ref().name == self.model.config.name,
        }))
    }

    async fn server_metadata(
        &self,
        _: tonic::Request<pb::ServerMetadataRequest>,
    ) -> GrpcResult<pb::ServerMetadataResponse> {
        Ok(tonic::Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into()],
        }))
    }

    async fn model_metadata(
        &self,
        req: tonic::Request<pb::ModelMetadataRequest>,
    ) -> GrpcResult<pb::ModelMetadataResponse> {
        self.model.check_name(&req.get_ref().name)?;
        let md = self.model.metadata();
        let conv = |t: oip::TensorMetadata| pb::model_metadata_response::TensorMetadata {
            name: t.name,
            datatype: t.datatype,
            shape: t.shape,
        };
        Ok(tonic::Response::new(pb::ModelMetadataResponse {
            name: md.name,
            versions: md.versions,
            platform: md.platform,
            inputs: md.inputs.into_iter().map(conv).collect(),
            outputs: md.outputs.into_iter().map(conv).collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: tonic::Request<pb::ModelInferRequest>,
    ) -> GrpcResult<pb::ModelInferResponse> {
        let start = Instant::now();
        let grpc_deadline = grpc_timeout(req.metadata());
        let req = req.into_inner();
        let m = &self.model;
        let resp = m.timed("grpc", async {
            let timeout = match req.parameters.get(TIMEOUT_PARAMETER) {
                None => grpc_deadline?,
                Some(p) => match p.parameter_choice {
                    Some(pb::infer_parameter::ParameterChoice::Int64Param(us)) if us >= 0 => {
                        Some(Duration::from_micros(us as u64))
                    }
                    Some(pb::infer_parameter::ParameterChoice::Uint64Param(us)) => {
                        Some(Duration::from_micros(us))
                    }
                    _ => {
                        return Err(invalid!(
                            "parameter {TIMEOUT_PARAMETER} is {p:?}; expected a whole number of microseconds (int64_param)"
                        )
                        .into());
                    }
                },
            };
            m.check_name(&req.model_name)?;
            let (input, datatype) = m.check_input(&req.inputs, |i| (&i.name, &i.datatype))?;
            let data = match (req.raw_input_contents.as_slice(), &input.contents) {
                ([raw], None) => TensorData::from_raw(datatype, raw)?,
                ([], Some(c)) => match datatype {
                    DataType::Fp32 => TensorData::F32(c.fp32_contents.clone()),
                    DataType::Uint8 => TensorData::U8(
                        c.uint_contents
                            .iter()
                            .map(|&v| {
                                u8::try_from(v)
                                    .map_err(|_| invalid!("UINT8 contents hold {v}, above 255"))
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                },
                ([], None) => {
                    return Err(invalid!(
                        "input {:?} carries no data: set raw_input_contents or contents",
                        input.name
                    )
                    .into());
                }
                (raw, Some(_)) if !raw.is_empty() => {
                    return Err(invalid!("set raw_input_contents or contents, not both").into());
                }
                (raw, _) => {
                    return Err(invalid!(
                        "raw_input_contents has {} entries for 1 input",
                        raw.len()
                    )
                    .into());
                }
            };
            let inferred = m.infer(data, &input.shape, m.deadline(start, timeout)).await?;
            let parameters = inferred
                .parameters()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        pb::InferParameter {
                            parameter_choice: Some(
                                pb::infer_parameter::ParameterChoice::StringParam(v),
                            ),
                        },
                    )
                })
                .into_iter()
                .collect();
            let Inferred { values, batch, .. } = inferred;
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok(pb::ModelInferResponse {
                model_name: m.config.name.clone(),
                model_version: "1".into(),
                id: req.id.clone(),
                parameters,
                outputs: vec![pb::model_infer_response::InferOutputTensor {
                    name: m.config.output.name.clone(),
                    datatype: "FP32".into(),
                    shape: vec![batch as i64, (values.len() / batch) as i64],
                    parameters: Default::default(),
                    contents: None,
                }],
                raw_output_contents: vec![raw],
            })
        });
        Ok(tonic::Response::new(resp.await?))
    }
}

/// The deadline a gRPC client set (`grpc-timeout`: up to 8 digits and a unit, H M S m u n), or
/// none; a malformed header is refused naming it.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, ServeError> {
    let Some(v) = meta.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad =
        || invalid!("grpc-timeout {v:?} is not up to 8 digits followed by H, M, S, m, u or n");
    let s = v.to_str().map_err(|_| bad())?;
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad().into());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad().into()),
    };
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    fn parse(v: &str) -> Result<Option<Duration>, String> {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn grpc_deadlines_are_read_and_bad_ones_named() {
        assert_eq!(parse("250m"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse("3S"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(
            parse("99999999n"),
            Ok(Some(Duration::from_nanos(99_999_999)))
        );
        assert_eq!(parse("2H"), Ok(Some(Duration::from_secs(7200))));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("grpc-timeout"), "{bad:?}: {e}");
        }
        assert_eq!(
            grpc_timeout(&tonic::metadata::MetadataMap::new()).unwrap(),
            None
        );
    }
}
