//! The cloud worker: serves one model over the Open Inference Protocol, REST and gRPC on one port
//! (gRPC is told apart by its `application/grpc` content type), plus Sedna's `POST /sedna/predict`
//! so that Sedna-style edge workers can call it unchanged.
//!
//! Requests go through the [`Batcher`]; a full queue is answered with HTTP 503 / gRPC
//! `RESOURCE_EXHAUSTED`, a malformed request with HTTP 400 / `INVALID_ARGUMENT` naming the problem.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::batcher::{BatchConfig, BatchError, Batcher};
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

/// What the handlers share.
pub struct CloudModel {
    config: ModelConfig,
    norm: Normalizer,
    batcher: Batcher,
    /// The server's metrics.
    pub metrics: Arc<CloudMetrics>,
    output_len: usize,
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
}

impl ServeError {
    fn result_label(&self) -> &'static str {
        match self {
            ServeError::Invalid(_) | ServeError::UnknownModel { .. } => "invalid",
            ServeError::Batch(BatchError::QueueFull(_)) => "busy",
            ServeError::Batch(_) => "error",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            ServeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServeError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            ServeError::Batch(BatchError::QueueFull(_))
            | ServeError::Batch(BatchError::Stopped) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Batch(BatchError::Backend(_)) => StatusCode::INTERNAL_SERVER_ERROR,
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
            ServeError::Batch(BatchError::Backend(_)) => tonic::Status::internal(msg),
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

impl CloudModel {
    /// Starts batching for a loaded backend (needs a tokio runtime).
    pub fn new(config: ModelConfig, backend: Arc<dyn Backend>, batch: BatchConfig) -> Arc<Self> {
        let metrics = Arc::new(CloudMetrics::default());
        let output_len = backend.output_len();
        Arc::new(CloudModel {
            norm: Normalizer::new(&config.input),
            batcher: Batcher::start(backend, batch, metrics.clone()),
            config,
            metrics,
            output_len,
        })
    }

    /// The served model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
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

    /// Runs a decoded tensor; returns the raw outputs and the batch size.
    pub async fn infer(
        &self,
        data: TensorData,
        shape: &[i64],
    ) -> Result<(Vec<f32>, usize), ServeError> {
        let (input, batch) = data.into_model_input(shape, &self.config, &self.norm)?;
        let out = self.batcher.infer(input, batch).await?;
        self.metrics.samples.inc_by(batch as u64);
        Ok((out, batch))
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
pub fn router(model: Arc<CloudModel>, config: &ServerConfig) -> Router {
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
    model: Arc<CloudModel>,
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
    model: Arc<CloudModel>,
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
    State(m): State<Arc<CloudModel>>,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelMetadata>, ServeError> {
    m.check_name(&name)?;
    Ok(axum::Json(ModelMetadata::of(&m.config)))
}

async fn model_metadata_versioned(
    s: State<Arc<CloudModel>>,
    Path((name, _v)): Path<(String, String)>,
) -> Result<axum::Json<ModelMetadata>, ServeError> {
    model_metadata(s, Path(name)).await
}

async fn model_ready(
    State(m): State<Arc<CloudModel>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ServeError> {
    m.check_name(&name)?;
    Ok(axum::Json(json!({"name": name, "ready": true})))
}

async fn model_ready_versioned(
    s: State<Arc<CloudModel>>,
    Path((name, _v)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ServeError> {
    model_ready(s, Path(name)).await
}

async fn metrics(State(m): State<Arc<CloudModel>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.metrics.encode(),
    )
}

async fn infer_rest_versioned(
    s: State<Arc<CloudModel>>,
    Path((name, _v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_rest(s, Path(name), headers, body).await
}

async fn infer_rest(
    State(m): State<Arc<CloudModel>>,
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
    m: &CloudModel,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ServeError> {
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
    let (values, batch) = m.infer(data, &input.shape).await?;
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
async fn sedna_predict(State(m): State<Arc<CloudModel>>, body: Bytes) -> Response {
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
            let (values, batch) = m.infer(tensor, &[total / per_sample, per_sample]).await?;
            Ok(predictions(&m.config, values, batch, m.output_len))
        })
        .await;
    match r {
        Ok(results) => axum::Json(json!({ "result": results })).into_response(),
        Err(e) => e.into_response(),
    }
}

fn predictions(
    config: &ModelConfig,
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
            activate(p, config.output.activation);
            let (label, confidence) = argmax(p).unwrap_or((0, 0.0));
            json!({"label": label, "class": config.labels.get(label), "confidence": confidence, "probabilities": p})
        })
        .collect()
}

struct GrpcService {
    model: Arc<CloudModel>,
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
        let md = ModelMetadata::of(&self.model.config);
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
        let req = req.into_inner();
        let m = &self.model;
        let resp = m.timed("grpc", async {
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
            let (values, batch) = m.infer(data, &input.shape).await?;
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok(pb::ModelInferResponse {
                model_name: m.config.name.clone(),
                model_version: "1".into(),
                id: req.id.clone(),
                parameters: Default::default(),
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
