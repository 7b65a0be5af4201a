//! The cloud worker over real sockets: OIP REST (JSON and binary extension), OIP gRPC, Sedna's
//! route, metrics, back-pressure, and clear errors for malformed requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, Backend, BackendError, BackendKind, BackendOptions};
use sedge_inference_worker::batcher::BatchConfig;
use sedge_inference_worker::model::{Model, ModelConfig, models_dir};
use sedge_inference_worker::pb;
use sedge_inference_worker::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use sedge_inference_worker::preprocess::{Normalizer, argmax};
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};
use serde_json::{Value, json};

struct Fixture {
    addr: SocketAddr,
    http: reqwest::Client,
    backend: Arc<dyn Backend>,
    config: ModelConfig,
    pixels: Vec<u8>,
}

async fn start_with(
    backend: Arc<dyn Backend>,
    config: ModelConfig,
    server_config: ServerConfig,
) -> SocketAddr {
    let model = ServedModel::new(config, backend, server_config.batch.clone());
    let (addr, _server) = server::start(
        ([127, 0, 0, 1], 0).into(),
        model,
        server_config,
        std::future::pending(),
    )
    .await
    .unwrap();
    addr
}

async fn fixture() -> Fixture {
    let model = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx")).unwrap();
    let backend = backend::load(
        &model,
        &BackendOptions {
            kind: BackendKind::Tract,
            ..Default::default()
        },
    )
    .unwrap();
    let server_config = ServerConfig {
        max_body_bytes: 1 << 20,
        ..Default::default()
    };
    let addr = start_with(backend.clone(), model.config.clone(), server_config).await;
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    Fixture {
        addr,
        http: sedge_inference_worker::fetch::http_client(std::time::Duration::from_secs(30))
            .unwrap(),
        backend,
        config: model.config,
        pixels: data.images.pixels[..4 * 784].to_vec(),
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Labels the local backend gives the first `n` images.
    fn expected(&self, n: usize) -> Vec<usize> {
        let mut x = Vec::new();
        Normalizer::new(&self.config.input).extend(&self.pixels[..n * 784], &mut x);
        self.backend
            .run(&x, n)
            .unwrap()
            .chunks(10)
            .map(|r| argmax(r).unwrap().0)
            .collect()
    }

    async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn grpc(&self) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
        GrpcInferenceServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

fn labels_of(data: &[f32]) -> Vec<usize> {
    data.chunks(10).map(|r| argmax(r).unwrap().0).collect()
}

#[tokio::test]
async fn rest_health_and_metadata() {
    let f = fixture().await;
    for (path, key) in [("/v2/health/live", "live"), ("/v2/health/ready", "ready")] {
        let v: Value = f
            .http
            .get(f.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v[key], true, "{path}");
    }
    let v: Value = f
        .http
        .get(f.url("/v2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["extensions"], json!(["binary_tensor_data"]));
    let v: Value = f
        .http
        .get(f.url("/v2/models/cloud-cnn"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["inputs"][0],
        json!({"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]})
    );
    assert_eq!(v["outputs"][0]["shape"], json!([-1, 10]));
    let v: Value = f
        .http
        .get(f.url("/v2/models/cloud-cnn/versions/1/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["ready"], true);
    let r = f.http.get(f.url("/v2/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("this server serves \"cloud-cnn\""),
        "{v}"
    );
    assert_eq!(
        f.http.get(f.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn rest_json_infer_uint8_nested_and_fp32_flat() {
    let f = fixture().await;
    let nested: Vec<Vec<Vec<u8>>> = f.pixels[..2 * 784]
        .chunks(784)
        .map(|img| img.chunks(28).map(<[u8]>::to_vec).collect())
        .collect();
    let (status, v) = f
        .post_json("/v2/models/cloud-cnn/infer", json!({"id": "r1", "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": nested}]}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "r1");
    assert_eq!(v["model_name"], "cloud-cnn");
    assert_eq!(v["outputs"][0]["shape"], json!([2, 10]));
    let data: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(labels_of(&data), f.expected(2));

    let mut x = Vec::new();
    Normalizer::new(&f.config.input).extend(&f.pixels[..784], &mut x);
    let (status, v) = f
        .post_json(
            "/v2/models/cloud-cnn/versions/1/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": x}]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let data: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(labels_of(&data), f.expected(1));
}

#[tokio::test]
async fn rest_binary_extension_both_ways() {
    let f = fixture().await;
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "x", "shape": [3, 1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 3 * 784}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&f.pixels[..3 * 784]);
    let r = f
        .http
        .post(f.url("/v2/models/cloud-cnn/infer"))
        .header("Inference-Header-Content-Length", header.len())
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        3 * 10 * 4
    );
    assert!(head["outputs"][0].get("data").is_none());
    let values: Vec<f32> = bytes[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(labels_of(&values), f.expected(3));
}

#[tokio::test]
async fn rest_rejects_malformed_requests_with_reasons() {
    let f = fixture().await;
    let img: Vec<u8> = f.pixels[..784].to_vec();
    let cases = [
        (json!({"inputs": []}), "expected exactly 1 input"),
        (
            json!({"inputs": [{"name": "y", "shape": [1, 784], "datatype": "UINT8", "data": img}]}),
            "unknown input \"y\"",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "INT64", "data": img}]}),
            "datatype \"INT64\" is not supported",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 783], "datatype": "UINT8", "data": img}]}),
            "does not fit model",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [2, 784], "datatype": "UINT8", "data": img}]}),
            "needs 1568 values, the request holds 784",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [300]}]}),
            "not an integer from 0 to 255",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8"}]}),
            "neither `data` nor a binary_data_size",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": img}], "outputs": [{"name": "probs"}]}),
            "unknown output \"probs\"",
        ),
        (json!({"inputs": "x"}), "not a valid inference request"),
    ];
    for (body, expect) in cases {
        let (status, v) = f
            .post_json("/v2/models/cloud-cnn/infer", body.clone())
            .await;
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(expect), "{body}: got {msg:?}, want {expect:?}");
    }
    // Broken JSON and a lying binary header.
    let r = f
        .http
        .post(f.url("/v2/models/cloud-cnn/infer"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = f
        .http
        .post(f.url("/v2/models/cloud-cnn/infer"))
        .header("Inference-Header-Content-Length", "9999")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("only 2 bytes"));
    let header = serde_json::to_vec(&json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}]})).unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&img[..100]);
    let r = f
        .http
        .post(f.url("/v2/models/cloud-cnn/infer"))
        .header("Inference-Header-Content-Length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("only 100 binary bytes"));
    // Over the body limit (1 MiB in this fixture).
    let r = f
        .http
        .post(f.url("/v2/models/cloud-cnn/infer"))
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // The server still serves after all that.
    let (status, _) = f
        .post_json(
            "/v2/models/cloud-cnn/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": img}]}),
        )
        .await;
    assert_eq!(status, 200);
    let metrics = f
        .http
        .get(f.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sedge_cloud_requests_total{protocol=\"rest\",result=\"invalid\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sedna_predict_compat_route() {
    let f = fixture().await;
    let nested: Vec<Vec<u8>> = f.pixels[..784].chunks(28).map(<[u8]>::to_vec).collect();
    let (status, v) = f.post_json("/sedna/predict", json!({"data": nested})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"][0]["label"], f.expected(1)[0]);
    assert!(v["result"][0]["class"].is_string());
    let (status, v) = f.post_json("/sedna/predict", json!({"image": []})).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("no `data` field"));
    let (status, v) = f
        .post_json("/sedna/predict", json!({"data": [1, 2, 3]}))
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not a whole number of 784-pixel samples"),
        "{v}"
    );
}

#[tokio::test]
async fn grpc_health_metadata_and_infer() {
    let f = fixture().await;
    let mut c = f.grpc().await;
    assert!(
        c.server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        c.model_ready(pb::ModelReadyRequest {
            name: "cloud-cnn".into(),
            version: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
    assert!(
        !c.model_ready(pb::ModelReadyRequest {
            name: "other".into(),
            version: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
    assert_eq!(
        c.server_metadata(pb::ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        "sedge"
    );
    let md = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "cloud-cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.inputs[0].shape, vec![-1, 1, 28, 28]);

    // raw_input_contents with UINT8 pixels: the edge worker's path.
    let req = pb::ModelInferRequest {
        model_name: "cloud-cnn".into(),
        id: "g1".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![4, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![f.pixels.clone()],
        ..Default::default()
    };
    let resp = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(resp.id, "g1");
    assert_eq!(resp.outputs[0].shape, vec![4, 10]);
    let values: Vec<f32> = resp.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(labels_of(&values), f.expected(4));

    // Typed contents (FP32) work too.
    let mut x = Vec::new();
    Normalizer::new(&f.config.input).extend(&f.pixels[..784], &mut x);
    let req = pb::ModelInferRequest {
        model_name: "cloud-cnn".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 784],
            contents: Some(pb::InferTensorContents {
                fp32_contents: x,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let resp = c.model_infer(req).await.unwrap().into_inner();
    let values: Vec<f32> = resp.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(labels_of(&values), f.expected(1));
}

#[tokio::test]
async fn grpc_errors_carry_codes_and_reasons() {
    let f = fixture().await;
    let mut c = f.grpc().await;
    let base = pb::ModelInferRequest {
        model_name: "cloud-cnn".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0; 784]],
        ..Default::default()
    };
    let mut unknown = base.clone();
    unknown.model_name = "big".into();
    let mut short = base.clone();
    short.raw_input_contents = vec![vec![0; 10]];
    let mut none = base.clone();
    none.raw_input_contents.clear();
    let mut two = base.clone();
    two.raw_input_contents.push(vec![0; 784]);
    for (req, code, expect) in [
        (unknown, tonic::Code::NotFound, "not served here"),
        (
            short,
            tonic::Code::InvalidArgument,
            "needs 784 values, the request holds 10",
        ),
        (none, tonic::Code::InvalidArgument, "carries no data"),
        (two, tonic::Code::InvalidArgument, "2 entries for 1 input"),
    ] {
        let status = c.model_infer(req).await.unwrap_err();
        assert_eq!(status.code(), code);
        assert!(status.message().contains(expect), "{}", status.message());
    }
    assert!(c.model_infer(base).await.is_ok(), "still serving");
}

/// A backend that takes a while, to fill the queue.
struct Slow(Duration);

impl Backend for Slow {
    fn kind(&self) -> BackendKind {
        BackendKind::Tract
    }
    fn output_len(&self) -> usize {
        10
    }
    fn run(&self, _input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        std::thread::sleep(self.0);
        Ok(vec![0.1; batch * 10])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_resource_exhausted() {
    let config = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx"))
        .unwrap()
        .config;
    let server_config = ServerConfig {
        batch: BatchConfig {
            max_batch: 1,
            max_delay_us: 0,
            queue: 2,
        },
        ..Default::default()
    };
    let addr = start_with(
        Arc::new(Slow(Duration::from_millis(100))),
        config,
        server_config,
    )
    .await;
    let http =
        sedge_inference_worker::fetch::http_client(std::time::Duration::from_secs(30)).unwrap();
    let body = json!({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": vec![0u8; 784]}]});
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (http, body) = (http.clone(), body.clone());
            tokio::spawn(async move {
                http.post(format!("http://{addr}/v2/models/cloud-cnn/infer"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = pb::ModelInferRequest {
        model_name: "cloud-cnn".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0; 784]],
        ..Default::default()
    };
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (mut g, r) = (grpc.clone(), req.clone());
            tokio::spawn(async move { g.model_infer(r).await.err().map(|s| s.code()) })
        })
        .collect();
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap());
    }
    assert!(
        codes.contains(&Some(tonic::Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert!(grpc.server_live(pb::ServerLiveRequest {}).await.is_ok());
}

/// The OIP decoders under mutated requests, over the real server: REST bodies (JSON and the
/// binary extension) and gRPC requests. Every answer is a success or a 4xx naming the problem,
/// never a 5xx, and the server answers a good request afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_oip_requests_get_clear_errors_and_the_server_stays_up() {
    let f = fixture().await;
    let json_body = serde_json::to_vec(&json!({"id": "f", "inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": f.pixels[..784].to_vec()}]})).unwrap();
    let header = serde_json::to_vec(&json!({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}]})).unwrap();
    let mut binary = header.clone();
    binary.extend_from_slice(&f.pixels[..784]);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let rt = tokio::runtime::Handle::current();
    let url = f.url("/v2/models/cloud-cnn/infer");
    let stats = tokio::task::block_in_place(|| {
        sedge_testkit::fuzz::run(&[&json_body, &binary], 1500, |body| {
            let req = f.http.post(&url).body(body.to_vec());
            // Half the inputs claim the binary extension's header length.
            let req = if body.len() % 2 == 0 {
                req.header(
                    "Inference-Header-Content-Length",
                    header.len().min(body.len()),
                )
            } else {
                req.header("content-type", "application/json")
            };
            let status = rt
                .block_on(req.send())
                .expect("the server answers")
                .status();
            *statuses.entry(status.as_u16()).or_default() += 1;
            assert!(
                !status.is_server_error(),
                "{status} for a request of {} bytes",
                body.len()
            );
            status.is_success()
        })
    });
    eprintln!("REST: {stats:?}, statuses {statuses:?}");
    assert!(statuses.keys().any(|s| *s == 400), "{statuses:?}");

    let mut c = f.grpc().await;
    let good = pb::ModelInferRequest {
        model_name: "cloud-cnn".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![f.pixels[..784].to_vec()],
        ..Default::default()
    };
    let seed = prost::Message::encode_to_vec(&good);
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let stats = tokio::task::block_in_place(|| {
        sedge_testkit::fuzz::run(&[&seed], 1500, |bytes| {
            let Ok(req) = <pb::ModelInferRequest as prost::Message>::decode(bytes) else {
                return false;
            };
            let code = match rt.block_on(c.model_infer(req)) {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            };
            *codes.entry(format!("{code:?}")).or_default() += 1;
            assert!(
                !matches!(
                    code,
                    tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Unavailable
                ),
                "{code:?}"
            );
            code == tonic::Code::Ok
        })
    });
    eprintln!("gRPC: {stats:?}, codes {codes:?}");
    assert_eq!(
        f.grpc()
            .await
            .model_infer(good)
            .await
            .unwrap()
            .into_inner()
            .outputs[0]
            .shape,
        vec![1, 10]
    );
}
