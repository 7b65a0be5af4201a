//! The edge worker as a service, measured: requests per second and latency at the edge worker's
//! Open Inference Protocol endpoint (joint inference: edge model, mining rule, hard images to the
//! cloud worker) with 1, 8 and 64 concurrent clients, against the same clients sending every
//! request to the cloud worker (cloud-only) and an edge endpoint that never offloads (edge-only),
//! in one run, on loopback and over shaped links to the cloud (`--links`, profiles of
//! `sedge_benchmarks::link`: the edge endpoint's offloads and the cloud-only clients cross the
//! link; the edge-only endpoint does not need it).
//!
//! Each client is an application with its own connection, sending one Fashion-MNIST image per
//! gRPC request (raw UINT8, as tritonclient does) in a closed loop. Accuracy is against the
//! labels of the 500-image sample committed in `datasets/`. Run with `make bench-serve`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use sedge_benchmarks::link::{LinkProfile, ShapedLink, self_check};
use sedge_datasets::{Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind, BackendOptions};
use sedge_inference_worker::client::OffloadConfig;
use sedge_inference_worker::edge::{EdgeConfig, EdgeWorker, percentile};
use sedge_inference_worker::model::{Model, models_dir};
use sedge_inference_worker::pb;
use sedge_inference_worker::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use sedge_inference_worker::preprocess::argmax;
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};

#[derive(Parser)]
#[command(
    about = "Edge worker endpoint vs cloud-only vs edge-only, 1/8/64 clients (prints a table)"
)]
struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Inference engine for both models.
    #[arg(long, default_value = "tract")]
    backend: BackendKind,
    /// Concurrent clients per row, comma-separated.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Links between the edge and the cloud, comma-separated profile names.
    #[arg(long, default_value = "loopback,4g-uplink", value_delimiter = ',')]
    links: Vec<String>,
}

#[derive(Default)]
struct Cell {
    requests: usize,
    wall: f64,
    latencies_ms: Vec<f64>,
    correct: usize,
    by_cloud: usize,
    errors: usize,
}

fn request(model: &str, px: &[u8]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![px.to_vec()],
        ..Default::default()
    }
}

/// `clients` closed-loop clients against `addr` for `secs`.
async fn drive(
    addr: SocketAddr,
    model: &'static str,
    clients: usize,
    secs: f64,
    images: Arc<Vec<(Vec<u8>, u8)>>,
) -> Result<Cell> {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let images = images.clone();
        let mut g = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tasks.push(tokio::spawn(async move {
            let mut cell = Cell::default();
            let mut i = c * 37;
            while Instant::now() < until {
                let (px, label) = &images[i % images.len()];
                i += 1;
                let t = Instant::now();
                match g.model_infer(request(model, px)).await {
                    Ok(r) => {
                        cell.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        let r = r.into_inner();
                        let row: Vec<f32> = r.raw_output_contents[0]
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect();
                        cell.correct +=
                            usize::from(argmax(&row).map(|a| a.0) == Some(*label as usize));
                        let cloud = r.parameters.get("answered_by").is_some_and(|p| {
                            p.parameter_choice
                                == Some(pb::infer_parameter::ParameterChoice::StringParam(
                                    "cloud".into(),
                                ))
                        });
                        cell.by_cloud += usize::from(cloud);
                        cell.requests += 1;
                    }
                    Err(_) => cell.errors += 1,
                }
            }
            cell
        }));
    }
    let mut all = Cell::default();
    for t in tasks {
        let c = t.await?;
        all.requests += c.requests;
        all.latencies_ms.extend(c.latencies_ms);
        all.correct += c.correct;
        all.by_cloud += c.by_cloud;
        all.errors += c.errors;
    }
    all.wall = start.elapsed().as_secs_f64();
    Ok(all)
}

async fn edge_endpoint(config: EdgeConfig) -> Result<SocketAddr> {
    let worker = Arc::new(EdgeWorker::start(config)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { worker.serve(listener, std::future::pending()).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let data = fashion::load(&fashion::sample_dir(), Split::Test)?;
    let labels = data.labels.clone().context("the sample has labels")?;
    let images: Arc<Vec<(Vec<u8>, u8)>> = Arc::new(
        data.images
            .pixels
            .chunks(784)
            .map(<[u8]>::to_vec)
            .zip(labels)
            .collect(),
    );
    let opts = BackendOptions {
        kind: args.backend,
        ..Default::default()
    };
    let cloud = Model::load(models_dir().join("fashion-mnist/cloud-cnn.onnx"))?;
    let served = ServedModel::new(
        cloud.config.clone(),
        backend::load(&cloud, &opts)?,
        Default::default(),
    );
    let (cloud_addr, _cloud) = server::start(
        ([127, 0, 0, 1], 0).into(),
        served,
        ServerConfig::default(),
        std::future::pending(),
    )
    .await?;
    let edge = |hem: &str, cloud: Option<SocketAddr>| EdgeConfig {
        model: models_dir().join("fashion-mnist/edge-cnn.onnx"),
        backend: opts.clone(),
        hem_name: hem.into(),
        hem_parameters: match hem {
            "EdgeOnly" => String::new(),
            _ => r#"[{"key":"threshold","value":"0.8"}]"#.into(),
        },
        offload: OffloadConfig {
            address: cloud.map(|a| a.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    let edge_only = edge_endpoint(edge("EdgeOnly", None)).await?;

    println!(
        "Edge worker endpoint (OIP gRPC, one 28x28 UINT8 image per request, closed loop), {} backend, {} s per cell, {} cores",
        args.backend,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for name in &args.links {
        let profile = LinkProfile::named(name).map_err(anyhow::Error::msg)?;
        // The cloud as the edge sees it: straight, or across the shaped link.
        let (_link, cloud_seen) = if profile.is_loopback() {
            (None, cloud_addr)
        } else {
            let link = ShapedLink::start(cloud_addr, profile.clone()).await?;
            let addr = link.addr;
            (Some(link), addr)
        };
        println!();
        if profile.is_loopback() {
            println!("link: loopback");
        } else {
            let c = self_check(&profile, 100_000).await?;
            println!(
                "link: {} ({} Mbit/s, {} ms one way, +-{} ms jitter, {}% loss); self-check: ping {:.1} ms (expected {:.1}), 100 kB {:.1} ms (expected {:.1})",
                profile.name,
                profile.bandwidth_mbit,
                profile.delay_ms,
                profile.jitter_ms,
                profile.loss * 100.0,
                c.rtt.as_secs_f64() * 1e3,
                c.expected_rtt.as_secs_f64() * 1e3,
                c.transfer.as_secs_f64() * 1e3,
                c.expected_transfer.as_secs_f64() * 1e3
            );
        }
        let joint = edge_endpoint(edge("MaxProbability", Some(cloud_seen))).await?;
        table(
            &args,
            [
                ("joint (edge endpoint)", joint, "edge-cnn"),
                ("cloud-only (cloud worker)", cloud_seen, "cloud-cnn"),
                ("edge-only (edge endpoint)", edge_only, "edge-cnn"),
            ],
            &images,
        )
        .await?;
    }
    Ok(())
}

async fn table(
    args: &Args,
    paths: [(&str, SocketAddr, &'static str); 3],
    images: &Arc<Vec<(Vec<u8>, u8)>>,
) -> Result<()> {
    println!(
        "{:<26} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "path", "clients", "req/s", "p50 ms", "p99 ms", "accuracy", "by cloud", "errors"
    );
    for &clients in &args.clients {
        for (name, addr, model) in paths {
            // Warm the connections and the models.
            drive(addr, model, clients.min(4), 0.3, images.clone()).await?;
            let mut c = drive(addr, model, clients, args.seconds, images.clone()).await?;
            let n = c.requests.max(1) as f64;
            let by_cloud = if model == "cloud-cnn" {
                100.0
            } else {
                c.by_cloud as f64 * 100.0 / n
            };
            println!(
                "{:<26} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>8.1}% {:>8.1}% {:>7}",
                name,
                clients,
                c.requests as f64 / c.wall,
                percentile(&mut c.latencies_ms, 0.50),
                percentile(&mut c.latencies_ms, 0.99),
                c.correct as f64 * 100.0 / n,
                by_cloud,
                c.errors
            );
        }
    }
    Ok(())
}
