//! Edge pipeline and offload benchmark. Prints, on the same models and inputs, in one run:
//!
//! 1. per-sample latency and throughput of the raw backend call and of the whole edge pipeline
//!    (decode, preprocess, infer, mine), for tract and ONNX Runtime, at batch 1 and 32, with the
//!    pipeline's overhead over the raw call;
//! 2. bytes and round-trip time per offloaded sample: OIP gRPC with raw UINT8 bytes, OIP REST JSON,
//!    and Sedna's `/sedna/predict` with a nested JSON list, against one cloud worker on loopback.
//!
//! Data: the 500-image Fashion-MNIST sample committed in `datasets/`. Run with
//! `make bench` (release build; needs `make ort` for the ONNX Runtime rows).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use sedge_datasets::{Split, export, fashion};
use sedge_inference_worker::backend::{self, Backend, BackendKind, BackendOptions};
use sedge_inference_worker::client::{CloudClient, OffloadConfig};
use sedge_inference_worker::edge::percentile;
use sedge_inference_worker::mining::HardExampleMining;
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::pipeline::{EdgePipeline, MiningMode};
use sedge_inference_worker::preprocess::Normalizer;
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};
use sedge_inference_worker::source::{Payload, Sample};

#[derive(Parser)]
#[command(about = "Edge pipeline and offload benchmark (prints tables)")]
struct Args {
    /// Seconds to spend on each measurement.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Sequential requests per offload protocol.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
}

/// Calls `f` (which processes `per_call` samples) repeatedly for `secs`; returns µs per sample.
fn measure(secs: f64, per_call: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / (calls as f64 * per_call as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let data = fashion::load(&fashion::sample_dir(), Split::Test)?;
    let n = data.images.len();
    let pngs: Vec<Vec<u8>> = (0..n)
        .map(|i| export::encode_png(data.images.image(i), 28, 28))
        .collect::<Result<_, _>>()?;
    let edge = Model::load(models_dir().join("fashion-mnist/edge-cnn.onnx"))?;
    let norm = Normalizer::new(&edge.config.input);

    println!(
        "Edge pipeline vs raw backend call, edge-cnn, {n} Fashion-MNIST images, {}s per cell",
        args.seconds
    );
    println!(
        "{:<7} {:>5}  {:>12} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "backend",
        "batch",
        "raw us/smp",
        "pipe us/smp",
        "+PNG us/smp",
        "pipe overhead",
        "raw smp/s",
        "pipe smp/s"
    );
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let backend = match backend::load(
            &edge,
            &BackendOptions {
                kind,
                ..Default::default()
            },
        ) {
            Ok(b) => b,
            Err(e) => {
                println!("{kind:<7} skipped: {e}");
                continue;
            }
        };
        let mining = || {
            HardExampleMining::from_env_strings(
                "MaxProbability",
                r#"[{"key":"threshold","value":"0.8"}]"#,
            )
            .expect("valid rule")
        };
        let pipeline = EdgePipeline::new(
            backend.clone(),
            edge.config.clone(),
            mining(),
            MiningMode::InferenceThenMining,
        )
        .map_err(anyhow::Error::msg)?;
        for batch in [1usize, 32] {
            let mut input = Vec::new();
            for i in 0..batch {
                norm.extend(data.images.image(i % n), &mut input);
            }
            let raw = measure(args.seconds, batch, || {
                std::hint::black_box(backend.run(&input, batch).expect("raw run"));
            });
            let mut next = 0usize;
            let mut batch_of = |png: bool| -> Vec<Sample> {
                (0..batch)
                    .map(|_| {
                        let i = next % n;
                        next += 1;
                        let payload = if png {
                            Payload::Encoded {
                                path: "bench.png".into(),
                                bytes: pngs[i].clone(),
                            }
                        } else {
                            Payload::Pixels(data.images.image(i).to_vec())
                        };
                        Sample {
                            id: String::new(),
                            payload,
                            label: None,
                        }
                    })
                    .collect()
            };
            let pipe = measure(args.seconds, batch, || {
                std::hint::black_box(pipeline.process(batch_of(false)));
            });
            let with_png = measure(args.seconds, batch, || {
                std::hint::black_box(pipeline.process(batch_of(true)));
            });
            println!(
                "{:<7} {:>5}  {:>12.2} {:>12.2} {:>12.2} {:>13.1}% {:>14.0} {:>12.0}",
                kind.to_string(),
                batch,
                raw,
                pipe,
                with_png,
                (pipe / raw - 1.0) * 100.0,
                1e6 / raw,
                1e6 / pipe
            );
        }
    }

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(offload_table(&args, &data.images))
}

async fn offload_table(args: &Args, images: &sedge_datasets::IdxImages) -> Result<()> {
    let cloud = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx"))?;
    let kind = if backend::ort_library_path(None).is_ok() {
        BackendKind::Ort
    } else {
        BackendKind::Tract
    };
    let backend: Arc<dyn Backend> = backend::load(
        &cloud,
        &BackendOptions {
            kind,
            ..Default::default()
        },
    )?;
    let model = ServedModel::new(cloud.config.clone(), backend, Default::default());
    let (addr, _server) = server::start(
        ([127, 0, 0, 1], 0).into(),
        model,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await?;
    let http =
        sedge_inference_worker::fetch::http_client(std::time::Duration::from_secs(30)).unwrap();
    let n = images.len();

    let client = CloudClient::new(
        OffloadConfig {
            address: Some(addr.to_string()),
            model: cloud.config.name.clone(),
            ..Default::default()
        },
        "x",
        &[1, 28, 28],
        10,
    )
    .map_err(anyhow::Error::msg)?;
    let mut rows = Vec::new();
    // gRPC, raw UINT8 bytes (what the edge worker sends).
    let mut lat = Vec::new();
    let mut bytes = 0u64;
    for i in 0..args.requests + 50 {
        let o = client.offload(images.image(i % n)).await;
        o.result.context("gRPC offload failed")?;
        if i >= 50 {
            lat.push(o.elapsed.as_secs_f64() * 1e3);
            bytes += o.bytes;
        }
    }
    rows.push((
        "OIP gRPC, raw UINT8 (sedge)",
        bytes as f64 / args.requests as f64,
        lat,
    ));

    // OIP REST JSON, FP32 normalised values (what a generic KServe client sends).
    let url = format!("http://{addr}/v2/models/{}/infer", cloud.config.name);
    let norm = Normalizer::new(&cloud.config.input);
    let (bytes, lat) = http_round_trips(&http, &url, args.requests, |i| {
        let mut x = Vec::new();
        norm.extend(images.image(i % n), &mut x);
        serde_json::json!({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x}]})
    })
    .await?;
    rows.push(("OIP REST JSON, FP32", bytes, lat));

    // Sedna's /sedna/predict with the image as a nested JSON list (ndarray.tolist()).
    let url = format!("http://{addr}/sedna/predict");
    let (bytes, lat) = http_round_trips(&http, &url, args.requests, |i| {
        let nested: Vec<Vec<u8>> = images.image(i % n).chunks(28).map(<[u8]>::to_vec).collect();
        serde_json::json!({ "data": [nested] })
    })
    .await?;
    rows.push(("Sedna /sedna/predict, JSON list", bytes, lat));

    println!();
    println!(
        "Offload per hard example, cloud-cnn on {kind}, loopback, {} sequential requests each",
        args.requests
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10} {:>12}",
        "protocol", "bytes/req", "p50 ms", "p99 ms", "bytes ratio"
    );
    let base = rows[0].1;
    for (name, b, mut lat) in rows {
        println!(
            "{:<34} {:>12.0} {:>10.3} {:>10.3} {:>11.1}x",
            name,
            b,
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            b / base
        );
    }
    Ok(())
}

/// Sends `requests` JSON bodies one after another (after 50 warm-up requests); returns the mean
/// body size and the round-trip times in milliseconds.
async fn http_round_trips(
    http: &reqwest::Client,
    url: &str,
    requests: usize,
    body: impl Fn(usize) -> serde_json::Value,
) -> Result<(f64, Vec<f64>)> {
    let mut lat = Vec::with_capacity(requests);
    let mut bytes = 0u64;
    for i in 0..requests + 50 {
        let body = serde_json::to_vec(&body(i))?;
        let len = body.len() as u64;
        let t = Instant::now();
        let r = http
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "{url}: status {}", r.status());
        r.bytes().await?;
        if i >= 50 {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            bytes += len;
        }
    }
    Ok((bytes as f64 / requests as f64, lat))
}
