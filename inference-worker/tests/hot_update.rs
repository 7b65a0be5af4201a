//! Hot model update: Sedna's `model_config.json` contract, every round, refusals, and swaps under
//! load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::edge::{EdgeConfig, EdgeWorker};
use sedge_inference_worker::hot_update::{HotUpdater, Outcome, write_config};
use sedge_inference_worker::mining::HardExampleMining;
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::pipeline::{EdgePipeline, MiningMode};
use sedge_inference_worker::source::{Payload, Sample, Source};

fn opts() -> BackendOptions {
    BackendOptions {
        kind: BackendKind::Tract,
        ..Default::default()
    }
}

fn model(name: &str) -> Model {
    Model::load(models_dir().join(format!("fashion-mnist/{name}.onnx"))).unwrap()
}

fn pipeline() -> EdgePipeline {
    let m = model("edge-cnn");
    EdgePipeline::new(
        backend::load(&m, &opts()).unwrap(),
        m.config,
        HardExampleMining::EdgeOnly,
        MiningMode::InferenceThenMining,
    )
    .unwrap()
}

fn samples(n: usize) -> Vec<Sample> {
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    (0..n)
        .map(|i| Sample {
            id: i.to_string(),
            payload: Payload::Pixels(data.images.image(i).to_vec()),
            label: None,
        })
        .collect()
}

fn predictions(p: &EdgePipeline, n: usize) -> Vec<usize> {
    p.process(samples(n))
        .iter()
        .map(|d| d.edge.expect("an edge answer").label)
        .collect()
}

/// A copy of a committed model (with its config) under `dir`, as a deploy would place it.
fn place(dir: &Path, name: &str, as_name: &str) -> std::path::PathBuf {
    let src = models_dir().join(format!("fashion-mnist/{name}.onnx"));
    let dst = dir.join(format!("{as_name}.onnx"));
    std::fs::copy(&src, &dst).unwrap();
    std::fs::copy(src.with_extension("json"), dst.with_extension("json")).unwrap();
    dst
}

#[test]
fn every_update_time_swaps_and_a_broken_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("model_config.json");
    let p = pipeline();
    let mut u = HotUpdater::new(&cfg, opts());
    assert_eq!(u.poll(&p), Outcome::Unchanged, "no config yet");
    let edge_answers = predictions(&p, 200);
    let cloud_answers = {
        let c = model("cloud-cnn");
        let cp = EdgePipeline::new(
            backend::load(&c, &opts()).unwrap(),
            c.config,
            HardExampleMining::EdgeOnly,
            MiningMode::InferenceThenMining,
        )
        .unwrap();
        predictions(&cp, 200)
    };
    assert_ne!(
        edge_answers, cloud_answers,
        "the two models must be told apart"
    );

    // Round 1: the cloud model's weights (same input, output and labels) go in.
    let r1 = place(dir.path(), "cloud-cnn", "round1");
    write_config(&cfg, &r1, "2026-12-01T10:00:00Z").unwrap();
    match u.poll(&p) {
        Outcome::Swapped { version, model, .. } => {
            assert_eq!(version, 1);
            assert_eq!(model, r1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(predictions(&p, 200), cloud_answers);
    assert_eq!(u.poll(&p), Outcome::Unchanged, "same update time");

    // Round 2 (Sedna's poller stops after the first; this one must not), relative path.
    place(dir.path(), "edge-cnn", "round2");
    std::fs::write(
        &cfg,
        r#"{"model_config": {"model_path": "round2.onnx", "model_update_time": "t2"}}"#,
    )
    .unwrap();
    assert!(matches!(u.poll(&p), Outcome::Swapped { version: 2, .. }));
    assert_eq!(predictions(&p, 200), edge_answers);

    // Round 3: a corrupt file is refused once, and the model in service stays.
    let bad = dir.path().join("round3.onnx");
    std::fs::write(&bad, b"not a model").unwrap();
    std::fs::copy(r1.with_extension("json"), bad.with_extension("json")).unwrap();
    write_config(&cfg, &bad, "t3").unwrap();
    match u.poll(&p) {
        Outcome::Refused {
            update_time,
            message,
        } => {
            assert_eq!(update_time, "t3");
            assert!(message.contains("round3.onnx"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(u.poll(&p), Outcome::Unchanged, "not retried every poll");
    assert_eq!(p.model_version(), 2);
    assert_eq!(predictions(&p, 200), edge_answers);

    // A model with other labels would be read wrongly: refused.
    let other = place(dir.path(), "edge-cnn", "other");
    let text = std::fs::read_to_string(other.with_extension("json"))
        .unwrap()
        .replace("Ankle boot", "Boot");
    std::fs::write(other.with_extension("json"), text).unwrap();
    write_config(&cfg, &other, "t4").unwrap();
    assert!(matches!(u.poll(&p), Outcome::Refused { .. }));
    assert_eq!(p.model_version(), 2);

    // Garbage and oversized configs are refused with the file named.
    std::fs::write(&cfg, b"{\"model_config\": 5}").unwrap();
    match u.poll(&p) {
        Outcome::Refused { message, .. } => {
            assert!(message.contains("model_config.json"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(&cfg, vec![b' '; 70_000]).unwrap();
    match u.poll(&p) {
        Outcome::Refused { message, .. } => assert!(message.contains("70000 bytes"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.model_version(), 2);
}

#[test]
fn swaps_under_load_drop_no_sample() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("model_config.json");
    let p = Arc::new(pipeline());
    let a = place(dir.path(), "cloud-cnn", "a");
    let b = place(dir.path(), "edge-cnn", "b");
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let d = p.process(samples(16));
                assert!(d.iter().all(|d| d.edge.is_some() && d.error.is_none()));
                n += d.len();
            }
            n
        })
    };
    let mut u = HotUpdater::new(&cfg, opts());
    for i in 0..10 {
        write_config(&cfg, if i % 2 == 0 { &a } else { &b }, &format!("t{i}")).unwrap();
        assert!(matches!(u.poll(&p), Outcome::Swapped { .. }));
    }
    stop.store(true, Ordering::SeqCst);
    let n = worker.join().unwrap();
    assert!(n > 0);
    assert_eq!(p.model_version(), 10);
}

#[tokio::test]
async fn the_worker_polls_its_config_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("model_config.json");
    let m = place(dir.path(), "cloud-cnn", "deployed");
    write_config(&cfg, &m, "t1").unwrap();
    let worker = EdgeWorker::start(EdgeConfig {
        model: models_dir().join("fashion-mnist/edge-cnn.onnx"),
        backend: opts(),
        hem_name: "EdgeOnly".into(),
        hem_parameters: String::new(),
        hot_update_config: Some(cfg),
        hot_update_period_seconds: 0.02,
        rate: Some(1000.0),
        ..EdgeConfig::default()
    })
    .unwrap();
    let source = Source::from_path(fashion::sample_dir().join("t10k-images-idx3-ubyte.gz"));
    let summary = worker.run(&source, std::future::pending()).await.unwrap();
    assert_eq!(summary.samples, 500);
    assert_eq!(
        summary.model_version, 1,
        "the deployed model was put in service"
    );
    assert_eq!(worker.pipeline().model_version(), 1);
}
