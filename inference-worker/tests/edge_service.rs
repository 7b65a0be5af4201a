//! The edge worker as a service: an Open Inference Protocol client (REST, the binary extension
//! and gRPC) against the edge worker's endpoint, with a real cloud worker behind it, with the cloud
//! gone, with a cloud too slow for the request's deadline, and with bad requests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, Backend, BackendError, BackendKind, BackendOptions};
use sedge_inference_worker::batcher::BatchConfig;
use sedge_inference_worker::client::OffloadConfig;
use sedge_inference_worker::edge::{EdgeConfig, EdgeWorker};
use sedge_inference_worker::joint::{Joint, ServeConfig};
use sedge_inference_worker::metrics::EdgeMetrics;
use sedge_inference_worker::mining::HardExampleMining;
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::pb;
use sedge_inference_worker::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use sedge_inference_worker::pipeline::{EdgePipeline, MiningMode};
use sedge_inference_worker::preprocess::{Normalizer, activate, argmax};
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};
use serde_json::{Value, json};

mod common;
use common::{Fault, fake_cloud};

const THRESHOLD: f32 = 0.8;

fn tract() -> BackendOptions {
    BackendOptions {
        kind: BackendKind::Tract,
        ..Default::default()
    }
}

/// Probabilities the model at `file` gives `pixels` (one image), computed here.
fn local(file: &str, pixels: &[u8]) -> Vec<f32> {
    let model = Model::load(models_dir().join(file)).unwrap();
    let b = backend::load(&model, &tract()).unwrap();
    let mut x = Vec::new();
    Normalizer::new(&model.config.input).extend(pixels, &mut x);
    let mut out = b.run(&x, 1).unwrap();
    activate(&mut out, model.config.output.activation);
    out
}

fn images() -> Vec<Vec<u8>> {
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    data.images.pixels.chunks(784).map(<[u8]>::to_vec).collect()
}

/// Whether the edge model is unsure of an image (MaxProbability below the threshold).
fn hard(pixels: &[u8]) -> bool {
    let p = local("fashion-mnist/edge-cnn.onnx", pixels);
    argmax(&p).unwrap().1 < THRESHOLD
}

/// A cloud worker serving the cloud model; stops when the sender is dropped.
async fn real_cloud() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let model = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx")).unwrap();
    let backend = backend::load(&model, &tract()).unwrap();
    let served = ServedModel::new(model.config, backend, Default::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _task) = server::start(
        ([127, 0, 0, 1], 0).into(),
        served,
        ServerConfig::default(),
        async {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    (addr, stop)
}

fn edge_config(cloud: Option<SocketAddr>, offload: OffloadConfig) -> EdgeConfig {
    EdgeConfig {
        model: models_dir().join("fashion-mnist/edge-cnn.onnx"),
        backend: tract(),
        hem_name: "MaxProbability".into(),
        hem_parameters: format!(r#"[{{"key":"threshold","value":"{THRESHOLD}"}}]"#),
        offload: OffloadConfig {
            address: cloud.map(|a| a.to_string()),
            ..offload
        },
        ..Default::default()
    }
}

/// Offload settings with room for a loaded test machine: a slow answer is still the cloud's.
fn patient() -> OffloadConfig {
    OffloadConfig {
        timeout_ms: 10_000,
        budget_ms: 20_000,
        ..Default::default()
    }
}

/// Starts an edge worker's endpoint on a free port.
async fn serve(config: EdgeConfig) -> (SocketAddr, Arc<EdgeWorker>) {
    let worker = Arc::new(EdgeWorker::start(config).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let w = worker.clone();
    tokio::spawn(async move { w.serve(listener, std::future::pending()).await });
    (addr, worker)
}

fn http() -> reqwest::Client {
    sedge_inference_worker::fetch::http_client(Duration::from_secs(60)).unwrap()
}

/// One REST request of `batch` images as JSON; returns the status and the body.
async fn rest(addr: SocketAddr, pixels: &[u8], batch: usize, params: Value) -> (u16, Value) {
    let body = json!({
        "id": "r1",
        "parameters": params,
        "inputs": [{"name": "x", "shape": [batch, 1, 28, 28], "datatype": "UINT8", "data": pixels}]
    });
    let r = http()
        .post(format!("http://{addr}/v2/models/edge-cnn/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn answered_by(v: &Value) -> Vec<String> {
    v["parameters"]["answered_by"]
        .as_str()
        .unwrap_or_else(|| panic!("no answered_by in {v}"))
        .split(',')
        .map(String::from)
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect::<Vec<_>>()
        .chunks(10)
        .map(<[f32]>::to_vec)
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

fn grpc_request(pixels: &[u8], batch: i64) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "edge-cnn".into(),
        id: "g1".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![batch, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![pixels.to_vec()],
        ..Default::default()
    }
}

fn grpc_answered_by(r: &pb::ModelInferResponse) -> String {
    match r
        .parameters
        .get("answered_by")
        .and_then(|p| p.parameter_choice.clone())
    {
        Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => s,
        other => panic!("answered_by is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn easy_samples_are_answered_by_the_edge_and_hard_ones_by_the_cloud() {
    let (cloud, _stop) = real_cloud().await;
    let (addr, worker) = serve(edge_config(Some(cloud), patient())).await;
    let images = images();
    let (mut edge, mut by_cloud) = (0, 0);
    // One by one over REST JSON: each answer is the model the rule says, as computed here.
    for px in images.iter().take(60) {
        let (status, v) = rest(addr, px, 1, json!({})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["id"], "r1");
        let row = &rows(&v)[0];
        match answered_by(&v)[..] {
            [ref who] if who == "edge" => {
                assert!(
                    !hard(px),
                    "an image the edge is unsure of was answered by it"
                );
                assert!(close(row, &local("fashion-mnist/edge-cnn.onnx", px)));
                edge += 1;
            }
            [ref who] if who == "cloud" => {
                assert!(hard(px), "an easy image went to the cloud");
                assert!(close(row, &local("fashion-mnist/cloud-cnn.onnx", px)));
                by_cloud += 1;
            }
            ref other => panic!("answered_by {other:?}"),
        }
    }
    assert!(edge > 0 && by_cloud > 0, "edge {edge}, cloud {by_cloud}");

    // A batch of 16 in one request: one word per sample, in order.
    let batch: Vec<u8> = images[60..76].concat();
    let (status, v) = rest(addr, &batch, 16, json!({})).await;
    assert_eq!(status, 200, "{v}");
    let expected: Vec<&str> = images[60..76]
        .iter()
        .map(|p| if hard(p) { "cloud" } else { "edge" })
        .collect();
    assert_eq!(answered_by(&v), expected);
    assert_eq!(v["outputs"][0]["shape"], json!([16, 10]));

    // gRPC with raw bytes, the way tritonclient sends them.
    let mut g = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let hard_one = images.iter().find(|p| hard(p)).unwrap();
    let easy_one = images.iter().find(|p| !hard(p)).unwrap();
    let r = g
        .model_infer(grpc_request(hard_one, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (grpc_answered_by(&r), r.id.as_str()),
        ("cloud".into(), "g1")
    );
    let r = g
        .model_infer(grpc_request(easy_one, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc_answered_by(&r), "edge");
    let md = g
        .model_metadata(pb::ModelMetadataRequest {
            name: "edge-cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        md.inputs[0].datatype, "UINT8",
        "the edge endpoint takes pixels"
    );

    // Sedna's route answers from the same stage.
    let r = http()
        .post(format!("http://{addr}/sedna/predict"))
        .json(&json!({"data": [hard_one]}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let cloud_label = argmax(&local("fashion-mnist/cloud-cnn.onnx", hard_one))
        .unwrap()
        .0;
    assert_eq!(v["result"][0]["label"], json!(cloud_label), "{v}");

    // Counters count served requests as Sedna counts samples.
    let m = &worker.metrics;
    let samples = 60 + 16 + 2 + 1;
    let hard_seen = by_cloud + expected.iter().filter(|w| **w == "cloud").count() as u64 + 2;
    assert_eq!(m.inference_number.get(), samples);
    assert_eq!(m.hard_example_number.get(), hard_seen);
    assert_eq!(m.cloud_answered.get(), hard_seen);
    assert_eq!(m.cloud_fallbacks.get(), 0);
    let text = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!("sedge_inference_number_total {samples}")),
        "{text}"
    );
    assert!(text.contains("sedge_edge_server_requests_total"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "one exposition: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cloud_gone_answers_continue_from_the_edge() {
    let (cloud, stop) = real_cloud().await;
    let offload = OffloadConfig {
        timeout_ms: 1000,
        budget_ms: 2000,
        breaker_failures: 2,
        breaker_cooldown_ms: 60_000,
        ..Default::default()
    };
    let (addr, worker) = serve(edge_config(Some(cloud), offload)).await;
    let images = images();
    let hard_ones: Vec<&Vec<u8>> = images.iter().filter(|p| hard(p)).take(6).collect();
    let (_, v) = rest(addr, hard_ones[0], 1, json!({})).await;
    assert_eq!(answered_by(&v), ["cloud"]);
    drop(stop);
    // The cloud worker is gone: every hard image now gets the edge model's answer.
    for px in &hard_ones[1..] {
        let (status, v) = rest(addr, px, 1, json!({})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(answered_by(&v), ["edge"]);
        assert!(close(
            &rows(&v)[0],
            &local("fashion-mnist/edge-cnn.onnx", px)
        ));
    }
    let m = &worker.metrics;
    assert_eq!(m.cloud_answered.get(), 1);
    assert_eq!(m.cloud_fallbacks.get(), 5);
    assert!(
        m.breaker_skipped.get() > 0,
        "after two failures the breaker spares the cloud"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_cannot_wait_for_the_cloud_gets_the_edge_answer() {
    // A cloud that takes 30 s, and an offload budget that would wait for it: only the request's
    // deadline can explain an answer within seconds.
    let cloud = fake_cloud(Fault::Slow(Duration::from_secs(30))).await;
    let offload = OffloadConfig {
        timeout_ms: 60_000,
        budget_ms: 60_000,
        retries: 0,
        ..Default::default()
    };
    let (addr, worker) = serve(edge_config(Some(cloud), offload)).await;
    let images = images();
    let hard_one = images.iter().find(|p| hard(p)).unwrap();

    let t = Instant::now();
    let (status, v) = rest(addr, hard_one, 1, json!({"timeout": 2_000_000})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(answered_by(&v), ["edge"]);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

    let mut g = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(grpc_request(hard_one, 1));
    req.set_timeout(Duration::from_secs(5));
    let t = Instant::now();
    let r = g.model_infer(req).await.unwrap().into_inner();
    assert_eq!(grpc_answered_by(&r), "edge");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(worker.metrics.deadline_fallbacks.get(), 2);
    assert_eq!(worker.metrics.cloud_answered.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_clouds_round_trip_sends_nothing() {
    let (cloud, _stop) = real_cloud().await;
    let (addr, worker) = serve(edge_config(Some(cloud), patient())).await;
    let images = images();
    let hard_one = images.iter().find(|p| hard(p)).unwrap();
    let (_, v) = rest(addr, hard_one, 1, json!({})).await;
    assert_eq!(answered_by(&v), ["cloud"]);
    let sent = worker.metrics.offload_bytes.get();
    // One microsecond is gone before the edge model has answered.
    let (status, v) = rest(addr, hard_one, 1, json!({"timeout": 1})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(answered_by(&v), ["edge"]);
    assert_eq!(
        worker.metrics.offload_bytes.get(),
        sent,
        "nothing went to the cloud"
    );
    assert_eq!(worker.metrics.deadline_fallbacks.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_cloud_workers_clear_errors() {
    let (addr, _worker) = serve(edge_config(None, OffloadConfig::default())).await;
    let post = |body: Value| async move {
        let r = http()
            .post(format!("http://{addr}/v2/models/edge-cnn/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let input = |name: &str, shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]});
    let cases = [
        (
            input("x", json!([1, 784]), "FP32", json!(vec![0.5; 784])),
            "takes raw UINT8 pixels",
        ),
        (
            input("x", json!([1, 783]), "UINT8", json!(vec![0; 783])),
            "does not fit model",
        ),
        (
            input("pixels", json!([1, 784]), "UINT8", json!(vec![0; 784])),
            "unknown input \"pixels\"",
        ),
        (
            input("x", json!([1, 784]), "UINT8", json!(vec![300; 784])),
            "not an integer from 0 to 255",
        ),
        (
            json!({"parameters": {"timeout": "soon"}, "inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": vec![0; 784]}]}),
            "parameter timeout is \"soon\"",
        ),
    ];
    for (body, want) in cases {
        let (status, v) = post(body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{want}: {v}");
    }
    let r = http()
        .post(format!("http://{addr}/v2/models/cloud-cnn/infer"))
        .json(&input("x", json!([1, 784]), "UINT8", json!(vec![0; 784])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    let mut g = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = grpc_request(&[0; 784], 1);
    req.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                "soon".into(),
            )),
        },
    );
    let e = g.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("timeout"), "{}", e.message());
    // Without a cloud every sample is the edge's, and the server still answers.
    let r = g
        .model_infer(grpc_request(&[0; 784], 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!grpc_answered_by(&r).is_empty());
}

/// The edge model held back by a gate, so requests pile up in the edge's batching queue.
struct Gated {
    inner: Arc<dyn Backend>,
    gate: Mutex<()>,
}

impl Backend for Gated {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn output_len(&self) -> usize {
        self.inner.output_len()
    }
    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        let _g = self.gate.lock().unwrap();
        self.inner.run(input, batch)
    }
}

// The held lock is the point: it stalls the edge model (on the blocking pool) so the queue fills.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_edge_queue_answers_503_and_resource_exhausted() {
    let model = Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx")).unwrap();
    let gated = Arc::new(Gated {
        inner: backend::load(&model, &tract()).unwrap(),
        gate: Mutex::new(()),
    });
    let pipeline = Arc::new(
        EdgePipeline::new(
            gated.clone(),
            model.config.clone(),
            HardExampleMining::EdgeOnly,
            MiningMode::InferenceThenMining,
        )
        .unwrap(),
    );
    let joint = Joint::new(
        pipeline,
        None,
        Arc::new(EdgeMetrics::default()),
        None,
        &ServeConfig::default(),
    );
    let served = ServedModel::joint(
        joint,
        BatchConfig {
            max_batch: 1,
            max_delay_us: 0,
            queue: 2,
        },
    );
    let (addr, _task) = server::start(
        ([127, 0, 0, 1], 0).into(),
        served,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let guard = gated.gate.lock().unwrap();
    let g = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut calls: Vec<tokio::task::JoinHandle<String>> = (0..8)
        .map(|_| {
            tokio::spawn(async move { rest(addr, &[0; 784], 1, json!({})).await.0.to_string() })
        })
        .collect();
    calls.extend((0..8).map(|_| {
        let mut g = g.clone();
        tokio::spawn(async move {
            match g.model_infer(grpc_request(&[0; 784], 1)).await {
                Ok(_) => "ok".to_string(),
                Err(s) => format!("{:?}", s.code()),
            }
        })
    }));
    // One request runs (held at the gate) and the queue holds 2: the other 13 are refused at
    // once. The gate opens when they are.
    let deadline = Instant::now() + Duration::from_secs(30);
    while calls.iter().filter(|c| c.is_finished()).count() < 13 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(guard);
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let refused = results
        .iter()
        .filter(|r| *r == "503" || *r == "ResourceExhausted")
        .count();
    assert_eq!(refused, 13, "{results:?}");
    assert_eq!(
        results.iter().filter(|r| *r == "200" || *r == "ok").count(),
        3,
        "{results:?}"
    );
    let mut g = g;
    assert!(g.server_live(pb::ServerLiveRequest {}).await.is_ok());
}
