//! tract and ONNX Runtime load the committed models and agree on them.

use std::path::Path;

use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{
    self, BackendError, BackendKind, BackendOptions, ort_library_path,
};
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::preprocess::{Normalizer, argmax};

fn opts(kind: BackendKind) -> BackendOptions {
    BackendOptions {
        kind,
        ..Default::default()
    }
}

#[test]
fn tract_and_ort_agree_on_every_sample_image() {
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    for name in ["edge-cnn", "cloud-cnn"] {
        let model = Model::load(models_dir().join(format!("fashion-mnist/{name}.onnx"))).unwrap();
        let tract = backend::load(&model, &opts(BackendKind::Tract)).unwrap();
        let ort = backend::load(&model, &opts(BackendKind::Ort))
            .expect("ONNX Runtime must be available: run `make ort` or set ORT_DYLIB_PATH");
        let norm = Normalizer::new(&model.config.input);
        let mut input = Vec::new();
        norm.extend(&data.images.pixels, &mut input);
        let n = data.images.len();
        // One batch of 500 and batches of 1 must give the same numbers.
        let a = tract.run(&input, n).unwrap();
        let b = ort.run(&input, n).unwrap();
        assert_eq!(a.len(), n * 10);
        assert_eq!(tract.output_len(), 10);
        assert_eq!(ort.output_len(), 10);
        let max_diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-3, "{name}: logits differ by {max_diff}");
        let labels = |v: &[f32]| {
            v.chunks(10)
                .map(|r| argmax(r).unwrap().0)
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(&a), labels(&b), "{name}: predictions differ");
        let single = tract.run(&input[..784], 1).unwrap();
        assert!(
            single
                .iter()
                .zip(&a[..10])
                .all(|(x, y)| (x - y).abs() < 1e-4)
        );
        let truth = data.labels.as_ref().unwrap();
        let correct = labels(&a)
            .iter()
            .zip(truth)
            .filter(|(p, t)| **p == **t as usize)
            .count();
        assert!(
            correct as f64 / n as f64 > 0.85,
            "{name}: {correct}/{n} correct on the sample"
        );
    }
}

#[test]
fn wrong_input_size_is_an_error_not_a_panic() {
    let model = Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx")).unwrap();
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let b = backend::load(&model, &opts(kind)).unwrap();
        let err = b.run(&[0.0; 100], 1).unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::InputSize {
                    got: 100,
                    expected: 784,
                    ..
                }
            ),
            "{kind}: {err}"
        );
        assert!(b.run(&[], 0).is_err());
    }
}

#[test]
fn corrupt_model_file_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("broken.onnx");
    std::fs::write(&m, b"this is not a protobuf").unwrap();
    std::fs::copy(
        models_dir().join("fashion-mnist/edge-cnn.json"),
        dir.path().join("broken.json"),
    )
    .unwrap();
    let model = Model::load(&m).unwrap();
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        match backend::load(&model, &opts(kind)) {
            Err(BackendError::Load { path, .. }) => assert_eq!(path, m),
            Err(other) => panic!("{kind}: expected a load error, got {other}"),
            Ok(_) => panic!("{kind}: loaded garbage"),
        }
    }
}

#[test]
fn config_naming_a_missing_tensor_is_refused_by_ort() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.onnx");
    std::fs::copy(models_dir().join("fashion-mnist/edge-cnn.onnx"), &m).unwrap();
    let cfg = std::fs::read_to_string(models_dir().join("fashion-mnist/edge-cnn.json"))
        .unwrap()
        .replace("\"logits\"", "\"probs\"");
    std::fs::write(dir.path().join("m.json"), cfg).unwrap();
    let err = backend::load(&Model::load(&m).unwrap(), &opts(BackendKind::Ort))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("the model config names \"probs\""), "{err}");
}

#[test]
fn a_missing_ort_library_is_a_clear_error() {
    let err = ort_library_path(Some(Path::new("/nonexistent/libonnxruntime.so")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/libonnxruntime.so, which is not a file"),
        "{err}"
    );
    // The library the tests use is found without configuration, from the test binary's location.
    assert!(ort_library_path(None).is_ok(), "run `make ort` first");
}
