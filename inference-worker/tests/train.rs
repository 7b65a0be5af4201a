//! The train and eval workers on the committed edge model and the 500 sample images.

use sedge_datasets::shift::CameraShift;
use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::eval;
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::preprocess::{Normalizer, argmax};
use sedge_inference_worker::train::{Labelled, OnnxTrainer, TrainError, TrainOptions};

fn opts(kind: BackendKind) -> BackendOptions {
    BackendOptions {
        kind,
        ..Default::default()
    }
}

fn edge() -> Model {
    Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx")).unwrap()
}

fn samples(shift: Option<CameraShift>) -> Vec<Labelled> {
    let data = fashion::load(&fashion::sample_dir(), Split::Test).unwrap();
    let labels = data.labels.unwrap();
    (0..data.images.len())
        .map(|i| {
            let mut pixels = data.images.image(i).to_vec();
            if let Some(s) = shift {
                s.apply(&mut pixels, i as u64);
            }
            Labelled {
                pixels,
                label: u32::from(labels[i]),
            }
        })
        .collect()
}

fn logits(model: &Model, kind: BackendKind, s: &[Labelled]) -> Vec<f32> {
    let b = backend::load(model, &opts(kind)).unwrap();
    let norm = Normalizer::new(&model.config.input);
    let mut input = Vec::new();
    for x in s {
        norm.extend(&x.pixels, &mut input);
    }
    b.run(&input, s.len()).unwrap()
}

fn labels(v: &[f32]) -> Vec<usize> {
    v.chunks(10).map(|r| argmax(r).unwrap().0).collect()
}

#[test]
fn candle_computes_what_tract_computes_on_the_base_graph() {
    let model = edge();
    let trainer = OnnxTrainer::load(&model).unwrap();
    assert_eq!(trainer.parameter_count(), 52_138);
    let s = &samples(None)[..64];
    let norm = Normalizer::new(&model.config.input);
    let mut input = Vec::new();
    for x in s {
        norm.extend(&x.pixels, &mut input);
    }
    let x =
        candle_core::Tensor::from_vec(input, (64, 1, 28, 28), &candle_core::Device::Cpu).unwrap();
    let ours: Vec<f32> = trainer
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let tract = logits(&model, BackendKind::Tract, s);
    let diff = ours
        .iter()
        .zip(&tract)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "candle and tract differ by {diff}");
}

#[test]
fn fine_tuning_on_shifted_images_helps_and_both_engines_load_the_result() {
    let model = edge();
    let shift = CameraShift::default();
    let shifted = samples(Some(shift));
    let (train, test) = shifted.split_at(300);
    let replay = samples(None);
    let before = eval::score(&model, &opts(BackendKind::Tract), test).unwrap();

    let mut trainer = OnnxTrainer::load(&model).unwrap();
    let report = trainer
        .train(
            train,
            &replay,
            &TrainOptions {
                epochs: 4,
                ..TrainOptions::default()
            },
        )
        .unwrap();
    assert_eq!(report.epoch_loss.len(), 4);
    assert_eq!(report.replay, 300);
    assert!(
        report.epoch_loss[3] < report.epoch_loss[0],
        "loss must fall: {:?}",
        report.epoch_loss
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edge-cnn-r1.onnx");
    trainer.save(&out).unwrap();
    let trained = Model::load(&out).unwrap();
    assert_eq!(
        trained.config, model.config,
        "the config travels with the model"
    );
    assert_ne!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&model.path).unwrap(),
        "weights changed"
    );

    let a = logits(&trained, BackendKind::Tract, test);
    let b = logits(&trained, BackendKind::Ort, test);
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-3,
        "tract and ORT differ by {diff} on the trained model"
    );
    assert_eq!(labels(&a), labels(&b), "tract and ORT disagree");

    let after = eval::score(&trained, &opts(BackendKind::Tract), test).unwrap();
    assert_eq!(after.samples, 200);
    assert!(
        after.accuracy > before.accuracy,
        "shifted accuracy {:.3} -> {:.3}",
        before.accuracy,
        after.accuracy
    );
}

#[test]
fn bad_training_input_is_named() {
    let model = edge();
    let mut trainer = OnnxTrainer::load(&model).unwrap();
    let none = trainer
        .train(&[], &[], &TrainOptions::default())
        .unwrap_err();
    assert!(none.to_string().contains("no training samples"), "{none}");
    let short = [Labelled {
        pixels: vec![0; 10],
        label: 1,
    }];
    let e = trainer
        .train(&short, &[], &TrainOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("10 values"), "{e}");
    let bad_label = [Labelled {
        pixels: vec![0; 784],
        label: 10,
    }];
    let e = trainer
        .train(&bad_label, &[], &TrainOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("label 10"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("m.onnx");
    std::fs::write(&corrupt, b"\x08\x01garbage that is not protobuf\xff\xff").unwrap();
    std::fs::copy(model.path.with_extension("json"), dir.path().join("m.json")).unwrap();
    let e = OnnxTrainer::load(&Model::load(&corrupt).unwrap())
        .err()
        .unwrap();
    assert!(matches!(e, TrainError::Read { .. }), "{e}");
    assert!(e.to_string().contains("m.onnx"), "{e}");
}

#[test]
fn bad_eval_input_is_named() {
    let sample = fashion::sample_dir().join("t10k-images-idx3-ubyte.gz");
    let e = eval::run(" ; ", &sample, &opts(BackendKind::Tract)).unwrap_err();
    assert!(e.to_string().contains("MODEL_URLS names no model"), "{e}");
    let edge = models_dir().join("fashion-mnist/edge-cnn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let unlabelled = dir.path().join("index.txt");
    sedge_datasets::export::write_png(&dir.path().join("a.png"), &[0; 784], 28, 28).unwrap();
    std::fs::write(&unlabelled, "a.png\n").unwrap();
    let e = eval::run(
        edge.to_str().unwrap(),
        &unlabelled,
        &opts(BackendKind::Tract),
    )
    .unwrap_err();
    assert!(e.to_string().contains("has no label"), "{e}");
    let missing = dir.path().join("none.onnx");
    let e = eval::run(
        missing.to_str().unwrap(),
        &sample,
        &opts(BackendKind::Tract),
    )
    .unwrap_err();
    assert!(e.to_string().contains("none.onnx"), "{e}");
    let ok = eval::run(
        &format!("{};{}", edge.display(), edge.display()),
        &sample,
        &opts(BackendKind::Tract),
    )
    .unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[0].metrics, ok[1].metrics);
    assert_eq!(ok[0].metrics["precision"].len(), 10);
}
