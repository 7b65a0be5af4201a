//! The edge worker on a device's data: a camera-like device publishes Fashion-MNIST frames on
//! KubeEdge's data topic (`$ke/events/device/<ns>/<name>/data/update`, the mapper data document
//! with the frame as base64) to the node's MQTT broker, and the worker infers on them as they
//! arrive. A message that is not a frame is reported as an error for that sample; the rest go
//! on.

use std::time::Duration;

use base64::Engine;
use sedge_datasets::{Split, fashion, idx};
use sedge_inference_worker::backend::{BackendKind, BackendOptions};
use sedge_inference_worker::edge::{EdgeConfig, EdgeWorker};
use sedge_inference_worker::model::models_dir;
use sedge_inference_worker::source::Source;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_worker_infers_on_frames_a_device_publishes() {
    let broker = sedge_devices::broker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let topic = "$ke/events/device/default/camera-1/data/update";
    let source = Source::parse(&format!("mqtt://{broker}/{topic}?property=frame")).unwrap();
    let worker = EdgeWorker::start(EdgeConfig {
        model: models_dir().join("fashion-mnist/edge-cnn.onnx"),
        backend: BackendOptions {
            kind: BackendKind::Tract,
            ..Default::default()
        },
        batch: 1,
        limit: Some(40),
        ..Default::default()
    })
    .unwrap();
    let run = tokio::spawn(async move { worker.run(&source, std::future::pending()).await });

    // The device: frames with their labels, and now and then a broken message.
    let data = idx::read_labeled(Split::Test.images_path(&fashion::sample_dir())).unwrap();
    let labels = data.labels.clone().unwrap();
    let mut opts = rumqttc::MqttOptions::new("camera-1", broker.ip().to_string(), broker.port());
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let mut i = 0usize;
    while !run.is_finished() {
        let doc = if i % 10 == 9 {
            serde_json::json!({"event_id": "e", "timestamp": 0,
                "data": {"frame": {"value": "not base64!"}}})
        } else {
            let k = i % data.images.len();
            serde_json::json!({"event_id": "e", "timestamp": 0, "data": {"frame": {
                "value": base64::engine::general_purpose::STANDARD.encode(data.images.image(k)),
                "metadata": {"label": labels[k].to_string(), "type": "bytes"}}}})
        };
        client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, doc.to_string())
            .await
            .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(i < 5_000, "the worker did not take 40 frames");
    }
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.samples, 40);
    assert!(
        summary.errors >= 1,
        "the broken messages are reported: {summary:?}"
    );
    assert!(summary.labelled >= 30, "{summary:?}");
    let accuracy = summary.correct as f64 / summary.labelled as f64;
    assert!(
        accuracy > 0.6,
        "edge accuracy on the device's frames {accuracy:.2}: {summary:?}"
    );
}
