//! The edge worker end to end: with a real cloud worker, and with scripted fake clouds that are
//! down, slow or return garbage. The worker must always finish, with the edge result where the
//! cloud gives none, in bounded time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sedge_datasets::{IndexFormat, Split, export, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::client::OffloadConfig;
use sedge_inference_worker::edge::{EdgeConfig, EdgeSummary, EdgeWorker, WorkerError};
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};
use sedge_inference_worker::source::Source;
use serde_json::Value;

mod common;
use common::{Fault, fake_cloud};

fn sample_idx() -> PathBuf {
    Split::Test.images_path(&fashion::sample_dir())
}

fn edge_config(cloud: Option<SocketAddr>) -> EdgeConfig {
    EdgeConfig {
        model: models_dir().join("fashion-mnist/edge-cnn.onnx"),
        backend: BackendOptions {
            kind: BackendKind::Tract,
            ..Default::default()
        },
        offload: OffloadConfig {
            address: cloud.map(|a| a.to_string()),
            timeout_ms: 200,
            budget_ms: 500,
            backoff_ms: 10,
            breaker_failures: 3,
            breaker_cooldown_ms: 60_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn real_cloud() -> SocketAddr {
    let model = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx")).unwrap();
    let backend = backend::load(
        &model,
        &BackendOptions {
            kind: BackendKind::Tract,
            ..Default::default()
        },
    )
    .unwrap();
    let served = ServedModel::new(model.config, backend, Default::default());
    let (addr, _server) = server::start(
        ([127, 0, 0, 1], 0).into(),
        served,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    addr
}

async fn run(config: EdgeConfig, source: &Source) -> EdgeSummary {
    EdgeWorker::start(config)
        .unwrap()
        .run(source, std::future::pending())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joint_inference_beats_the_edge_and_saves_hard_examples() {
    let cloud = real_cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.jsonl");
    let he = dir.path().join("hard");
    let source = Source::Idx(sample_idx());
    let edge_only = run(
        EdgeConfig {
            hem_name: "EdgeOnly".into(),
            hem_parameters: String::new(),
            ..edge_config(None)
        },
        &source,
    )
    .await;
    let joint = run(
        EdgeConfig {
            output: Some(out.clone()),
            hard_examples_dir: Some(he.clone()),
            ..edge_config(Some(cloud))
        },
        &source,
    )
    .await;

    assert_eq!((edge_only.samples, joint.samples), (500, 500));
    assert_eq!(edge_only.hard_example_number, 0);
    assert!(
        joint.hard_example_number > 0 && joint.hard_example_number < 250,
        "{joint:?}"
    );
    assert_eq!(
        joint.cloud_answered, joint.hard_example_number,
        "a healthy cloud answers every hard example"
    );
    assert_eq!(joint.cloud_fallbacks, 0);
    assert_eq!(
        joint.edge_correct, edge_only.correct,
        "the edge model is the same in both runs"
    );
    assert!(
        joint.correct > edge_only.correct,
        "offloading fixes some answers: {} vs {}",
        joint.correct,
        edge_only.correct
    );
    // Sedna's ratio, each sample counted once.
    assert_eq!(joint.inference_number, 500);
    assert!((joint.upload_cloud_ratio - joint.hard_example_number as f64 / 500.0).abs() < 1e-12);
    assert!(joint.bytes_sent >= joint.hard_example_number * 784);

    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 500);
    assert_eq!(lines[0]["sample"], "t10k-images-idx3-ubyte.gz#0");
    let hard: Vec<&Value> = lines.iter().filter(|l| l["hard"] == true).collect();
    assert_eq!(hard.len() as u64, joint.hard_example_number);
    assert!(hard.iter().all(|l| l["cloud"]["label"] == l["final"]));
    assert!(
        lines
            .iter()
            .filter(|l| l["hard"] == false)
            .all(|l| l["cloud"].is_null() && l["edge"]["label"] == l["final"])
    );

    // Hard examples come back as a Sedna index with the cloud's pseudo-labels.
    let saved = sedge_datasets::index::read(he.join("index.txt")).unwrap();
    assert_eq!(saved.len() as u64, joint.hard_example_number);
    for (entry, line) in saved.iter().zip(&hard) {
        assert_eq!(Value::from(entry.label.unwrap()), line["cloud"]["label"]);
        assert_eq!(
            sedge_datasets::export::read_grey(&entry.path, 28, 28)
                .unwrap()
                .len(),
            784
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_down_falls_back_to_the_edge_quickly() {
    // A port that was free a moment ago, outside the ephemeral range: connections are refused.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], sedge_testkit::port::free()));
    let worker = EdgeWorker::start(edge_config(Some(dead))).unwrap();
    let t = Instant::now();
    let s = worker
        .run(&Source::Idx(sample_idx()), std::future::pending())
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(s.samples, 500);
    assert!(s.hard_example_number > 0);
    assert_eq!(s.cloud_answered, 0);
    assert_eq!(s.cloud_fallbacks, s.hard_example_number);
    assert_eq!(
        s.correct, s.edge_correct,
        "every final answer is the edge's"
    );
    assert_eq!(s.errors, 0);
    assert!(
        worker.metrics.breaker_skipped.get() > 0,
        "the breaker opened and spared the later hard examples"
    );
    let text = worker.metrics.encode();
    assert!(text.contains("sedge_hard_example_number_total"), "{text}");
    assert!(text.contains("sedge_upload_cloud_ratio"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_cloud_times_out_and_the_edge_answers() {
    let cloud = fake_cloud(Fault::Slow(Duration::from_secs(30))).await;
    let t = Instant::now();
    let s = run(
        EdgeConfig {
            limit: Some(200),
            ..edge_config(Some(cloud))
        },
        &Source::Idx(sample_idx()),
    )
    .await;
    // Three failures open the breaker; each costs at most the 500 ms budget, with 8 in flight.
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(s.samples, 200);
    assert_eq!(s.cloud_answered, 0);
    assert_eq!(s.cloud_fallbacks, s.hard_example_number);
    assert_eq!(s.correct, s.edge_correct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_cloud_is_not_trusted() {
    let cloud = fake_cloud(Fault::Garbage).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jsonl");
    let s = run(
        EdgeConfig {
            limit: Some(100),
            output: Some(out.clone()),
            ..edge_config(Some(cloud))
        },
        &Source::Idx(sample_idx()),
    )
    .await;
    assert!(s.hard_example_number > 0);
    assert_eq!(s.cloud_answered, 0);
    assert_eq!(s.correct, s.edge_correct);
    let text = std::fs::read_to_string(out).unwrap();
    assert!(
        text.contains("cloud answer unusable: raw output of 7 bytes is not FP32"),
        "{text}"
    );
}

/// Sedna's JSON wire from a cloud that answers garbage: each hard example keeps the edge's answer,
/// with the reason, and the real cloud's JSON answers are used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_over_sednas_json_is_not_trusted_either() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cases = [
        ("not json", "not JSON"),
        (r#"{"result": []}"#, "no result[0].probabilities"),
        (
            r#"{"result": [{"probabilities": ["x"]}]}"#,
            "probabilities are not numbers",
        ),
        (
            r#"{"result": [{"probabilities": [0.5, 0.5]}]}"#,
            "2 values for one sample, expected 10 classes",
        ),
    ];
    for (body, want) in cases {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cloud = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = s.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        let mut config = EdgeConfig {
            limit: Some(60),
            output: Some(out.clone()),
            ..edge_config(Some(cloud))
        };
        config.offload.protocol = sedge_inference_worker::client::OffloadProtocol::SednaJson;
        let s = run(config, &Source::Idx(sample_idx())).await;
        assert!(s.hard_example_number > 0, "{want}");
        assert_eq!(s.cloud_answered, 0, "{want}");
        assert_eq!(s.correct, s.edge_correct, "{want}");
        let text = std::fs::read_to_string(out).unwrap();
        assert!(text.contains(want), "{want}: {text}");
    }
    // The real cloud worker over the same wire answers every hard example.
    let cloud = real_cloud().await;
    let mut config = EdgeConfig {
        limit: Some(60),
        ..edge_config(Some(cloud))
    };
    config.offload.protocol = sedge_inference_worker::client::OffloadProtocol::SednaJson;
    let s = run(config, &Source::Idx(sample_idx())).await;
    assert!(s.hard_example_number > 0);
    assert_eq!(s.cloud_answered, s.hard_example_number);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_starts_after_the_edge_is_used_once_up() {
    // Reserve a port, start the edge worker pointing at it, then bring the cloud up there.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sedge_testkit::port::free()));
    let mut config = edge_config(Some(addr));
    // No cooldown: an open breaker lets the next hard example probe at once.
    config.offload.breaker_cooldown_ms = 0;
    let worker = EdgeWorker::start(config).unwrap();
    let early = worker
        .run(&Source::Idx(sample_idx()), std::future::pending())
        .await
        .unwrap();
    assert_eq!(early.cloud_answered, 0);

    let model = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx")).unwrap();
    let backend = backend::load(&model, &BackendOptions::default()).unwrap();
    let served = ServedModel::new(model.config, backend, Default::default());
    server::start(
        addr,
        served,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let later = worker
        .run(&Source::Idx(sample_idx()), std::future::pending())
        .await
        .unwrap();
    assert_eq!(later.cloud_answered, later.hard_example_number, "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_files_and_directories_with_a_bad_image() {
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let index = export::export(&data, dir.path(), IndexFormat::Csv, Some(30)).unwrap();
    let by_index = run(
        EdgeConfig {
            hem_name: "EdgeOnly".into(),
            hem_parameters: String::new(),
            ..edge_config(None)
        },
        &Source::from_path(&index),
    )
    .await;
    assert_eq!((by_index.samples, by_index.labelled), (30, 30));
    let by_idx = run(
        EdgeConfig {
            limit: Some(30),
            hem_name: "EdgeOnly".into(),
            hem_parameters: String::new(),
            ..edge_config(None)
        },
        &Source::Idx(sample_idx()),
    )
    .await;
    assert_eq!(
        by_index.correct, by_idx.correct,
        "PNG round trip changes nothing"
    );

    let images = dir.path().join("images");
    std::fs::write(images.join("zzz-broken.png"), b"not a png").unwrap();
    let out = dir.path().join("r.jsonl");
    let s = run(
        EdgeConfig {
            output: Some(out.clone()),
            hem_name: "EdgeOnly".into(),
            hem_parameters: String::new(),
            ..edge_config(None)
        },
        &Source::from_path(&images),
    )
    .await;
    assert_eq!((s.samples, s.errors, s.labelled), (31, 1, 0));
    let last: Value = serde_json::from_str(
        std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("cannot decode image"),
        "{last}"
    );
}

#[tokio::test]
async fn configuration_errors_stop_the_worker_at_start() {
    let cases = [
        (
            EdgeConfig {
                hem_name: "Entropy".into(),
                ..edge_config(None)
            },
            "unknown hard-example mining rule \"Entropy\"",
        ),
        (
            EdgeConfig {
                hem_name: "CrossEntropy".into(),
                hem_parameters: r#"[{"key":"threshold_cross_entropy","value":"lots"}]"#.into(),
                ..edge_config(None)
            },
            "is not a number between 0 and 1",
        ),
        (
            EdgeConfig {
                hem_parameters: "[{".into(),
                ..edge_config(None)
            },
            "HEM_PARAMETERS is not a JSON list",
        ),
        (
            EdgeConfig {
                mining_mode: MiningMode::MiningThenInference,
                ..edge_config(None)
            },
            "cannot run before inference",
        ),
        (
            EdgeConfig {
                model: "/nonexistent/m.onnx".into(),
                ..edge_config(None)
            },
            "/nonexistent/m.onnx does not exist",
        ),
    ];
    for (config, expect) in cases {
        let err = EdgeWorker::start(config)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(expect), "got {err:?}, want {expect:?}");
    }
    let missing = EdgeWorker::start(edge_config(None))
        .unwrap()
        .run(
            &Source::Idx("/nonexistent/x-idx3".into()),
            std::future::pending(),
        )
        .await;
    assert!(matches!(missing, Err(WorkerError::Data(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mining_then_inference_sends_hard_samples_only_to_the_cloud() {
    let cloud = real_cloud().await;
    let config = EdgeConfig {
        hem_name: "Random".into(),
        hem_parameters: r#"[{"key":"random_ratio","value":"0.3"},{"key":"seed","value":"1"}]"#
            .into(),
        mining_mode: MiningMode::MiningThenInference,
        limit: Some(200),
        ..edge_config(Some(cloud))
    };
    let s = run(config, &Source::Idx(sample_idx())).await;
    assert!((30..90).contains(&s.hard_example_number), "{s:?}");
    assert_eq!(s.cloud_answered, s.hard_example_number);
    assert_eq!(s.inference_number, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_run_early() {
    let worker = EdgeWorker::start(EdgeConfig {
        hem_name: "EdgeOnly".into(),
        hem_parameters: String::new(),
        ..edge_config(None)
    })
    .unwrap();
    let s = worker
        .run(&Source::Idx(sample_idx()), std::future::ready(()))
        .await
        .unwrap();
    assert!(s.samples < 500, "{}", s.samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_during_collection_loses_no_hard_example() {
    let cloud = real_cloud().await;
    let proxy = sedge_tunnel::fault::TcpFaultProxy::start(cloud)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let he = dir.path().join("hard");
    let worker = EdgeWorker::start(EdgeConfig {
        hard_examples_dir: Some(he.clone()),
        offload: OffloadConfig {
            breaker_cooldown_ms: 200,
            ..edge_config(Some(proxy.addr)).offload
        },
        ..edge_config(None)
    })
    .unwrap();
    // Paced samples; the link to the cloud is cut (open connections closed, new ones refused)
    // at the 100th and comes back at the 300th.
    let faults = proxy.faults.clone();
    let samples = Source::Idx(sample_idx())
        .open(None)
        .unwrap()
        .enumerate()
        .map(move |(i, s)| {
            if i == 100 {
                faults.set_refuse(true);
                faults.cut();
            }
            if i == 300 {
                faults.heal();
            }
            std::thread::sleep(Duration::from_millis(5));
            s
        });
    let s = worker
        .run_samples(Box::new(samples), std::future::pending())
        .await
        .unwrap();
    assert_eq!(s.samples, 500);
    assert!(
        s.cloud_fallbacks > 0,
        "the cut kept the cloud from answering some: {s:?}"
    );
    assert_eq!(
        worker.metrics.hard_examples_labelled_late.get(),
        s.cloud_fallbacks,
        "each hard example the cloud missed waited and was labelled when it came back"
    );
    assert_eq!(
        (
            s.hard_examples_saved,
            s.hard_examples_pending,
            s.hard_examples_dropped
        ),
        (s.hard_example_number, 0, 0),
        "every hard example is in the index, once"
    );
    let saved = sedge_datasets::index::read(he.join("index.txt")).unwrap();
    assert_eq!(saved.len() as u64, s.hard_example_number);
    let names: std::collections::HashSet<_> = saved.iter().map(|e| e.path.clone()).collect();
    assert_eq!(names.len(), saved.len(), "no image listed twice");
    assert_eq!(
        saved
            .iter()
            .filter(|e| e
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with('p'))
            .count() as u64,
        s.cloud_fallbacks
    );
    // The late labels are the cloud model's answers, asked again here directly.
    let model = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx")).unwrap();
    let direct = sedge_inference_worker::client::CloudClient::new(
        OffloadConfig {
            address: Some(cloud.to_string()),
            ..Default::default()
        },
        &model.config.input.name,
        &model.config.input.shape,
        model.config.labels.len(),
    )
    .unwrap();
    for e in &saved {
        let pixels = sedge_datasets::export::read_grey(&e.path, 28, 28).unwrap();
        let row = direct.offload(&pixels).await.result.unwrap();
        let label = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(Some(label as u32), e.label, "{}", e.path.display());
    }
    assert_eq!(std::fs::read_dir(he.join("pending")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_examples_wait_across_runs_until_the_cloud_is_back() {
    // A cloud that is not there yet: every hard example waits, bounded.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], sedge_testkit::port::free()));
    let dir = tempfile::tempdir().unwrap();
    let he = dir.path().join("hard");
    let source = Source::Idx(sample_idx());
    let first = run(
        EdgeConfig {
            hard_examples_dir: Some(he.clone()),
            hard_examples_pending_max: 20,
            ..edge_config(Some(dead))
        },
        &source,
    )
    .await;
    assert!(first.hard_example_number > 20, "{first:?}");
    assert_eq!(
        (first.hard_examples_saved, first.hard_examples_pending),
        (0, 20)
    );
    assert_eq!(
        first.hard_examples_dropped,
        first.hard_example_number - 20,
        "drops are counted, never silent"
    );
    // The next run (the pod restarted) finds the cloud back: the 20 that waited are labelled,
    // alongside the new ones.
    let cloud = real_cloud().await;
    let second = run(
        EdgeConfig {
            hard_examples_dir: Some(he.clone()),
            limit: Some(50),
            ..edge_config(Some(cloud))
        },
        &source,
    )
    .await;
    assert_eq!(second.hard_examples_pending, 0);
    assert_eq!(
        second.hard_examples_saved,
        20 + second.hard_example_number,
        "{second:?}"
    );
}
