//! `sedge worker ...`: the processes a pod runs (edge and cloud inference, training,
//! evaluation), each configured by Sedna's worker environment on top of the layered config.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sedge_inference_worker::backend::{self, BackendKind};
use sedge_inference_worker::config::{self, CloudConfig};
use sedge_inference_worker::edge::{EdgeConfig, EdgeSummary, EdgeWorker};
use sedge_inference_worker::model::Model;
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::server::{self, ServedModel};
use sedge_inference_worker::source::Source;
use serde::Serialize;

use crate::shutdown_signal;

/// `sedge worker ...`
#[derive(Subcommand)]
pub enum Worker {
    /// Edge worker: infer locally, offload hard examples to the cloud worker over gRPC; over an
    /// input, or as an Open Inference Protocol endpoint for applications (--listen), or both.
    ///
    /// Reads Sedna's worker environment: MODEL_URL, HEM_NAME, HEM_PARAMETERS, MINING_MODE,
    /// BIG_MODEL_IP, BIG_MODEL_PORT (and BIG_MODEL_NAME, BACKEND).
    Edge(EdgeArgs),
    /// Cloud worker: serve a model over the Open Inference Protocol (REST + gRPC on one port) and /sedna/predict.
    ///
    /// Reads MODEL_URL, BIG_MODEL_BIND_IP, BIG_MODEL_BIND_PORT and BACKEND.
    Cloud(CloudArgs),
    /// Train worker (incremental learning): fine-tune an ONNX model on labelled samples in Rust
    /// (candle) and write the trained ONNX model.
    ///
    /// Reads Sedna's BASE_MODEL_URL, MODEL_URL (output directory) and TRAIN_DATASET_URL, and
    /// Sedge's REPLAY_DATASET_URL; prints the result as JSON.
    Train(TrainArgs),
    /// Eval worker: score every model in MODEL_URLS (`;`-separated) on TEST_DATASET_URL and print
    /// Sedna's metrics (accuracy, per-class precision and recall) as JSON.
    Eval(EvalArgs),
}

/// Flags of `sedge worker train` (each also read from Sedna's variable).
#[derive(Args)]
pub struct TrainArgs {
    /// The model to start from (.onnx with its .json beside it).
    #[arg(long, env = "BASE_MODEL_URL")]
    pub base_model: PathBuf,
    /// Directory the trained model is written to.
    #[arg(long, env = "MODEL_URL")]
    pub output: PathBuf,
    /// The round's labelled samples: a .txt/.csv index, an IDX file or a directory.
    #[arg(long, env = "TRAIN_DATASET_URL")]
    pub train_data: PathBuf,
    /// Original labelled data mixed in against forgetting.
    #[arg(long, env = "REPLAY_DATASET_URL")]
    pub replay_data: Option<PathBuf>,
    /// At most this many replay samples are read.
    #[arg(long, env = "REPLAY_LIMIT", default_value_t = 20_000)]
    pub replay_limit: usize,
    /// Replay samples per new sample, each epoch.
    #[arg(long, env = "REPLAY_RATIO", default_value_t = 1.0)]
    pub replay_ratio: f64,
    /// Passes over the data.
    #[arg(long, env = "EPOCHS", default_value_t = 3)]
    pub epochs: usize,
    /// Samples per step.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, env = "LEARNING_RATE", default_value_t = 5e-4)]
    pub learning_rate: f64,
}

/// Flags of `sedge worker eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Models to score, `;`-separated (Sedna: [new, deployed]).
    #[arg(long, env = "MODEL_URLS")]
    pub models: String,
    /// Labelled samples: a .txt/.csv index, an IDX file or a directory.
    #[arg(long, env = "TEST_DATASET_URL")]
    pub test_data: PathBuf,
    /// Inference engine.
    #[arg(long, env = "BACKEND", default_value = "tract")]
    pub backend: BackendKind,
}

/// The config file flags every worker has.
#[derive(Args)]
pub struct ConfigFlags {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// Flags of `sedge worker edge`, each named by the config field it sets.
#[derive(Args, Serialize)]
pub struct EdgeArgs {
    /// --config and --print-default-config.
    #[command(flatten)]
    #[serde(skip)]
    pub cfg: ConfigFlags,
    /// Samples: an IDX file, a .txt/.csv index, a directory of images, or one image.
    #[serde(skip)]
    pub input: Option<PathBuf>,
    /// Edge model (.onnx with its .json beside it).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Inference engine.
    #[arg(long)]
    #[serde(rename = "backend.kind")]
    pub backend: Option<BackendKind>,
    /// Hard-example mining rule: CrossEntropy, Threshold, IBT, Random, EdgeOnly, CloudOnly, MaxProbability, Margin.
    #[arg(long)]
    pub hem_name: Option<String>,
    /// Its parameters as Sedna's JSON list, e.g. '[{"key":"threshold","value":"0.8"}]'.
    #[arg(long)]
    pub hem_parameters: Option<String>,
    /// inference-then-mining or mining-then-inference.
    #[arg(long)]
    pub mining_mode: Option<MiningMode>,
    /// Cloud worker address host:port (omit for edge-only).
    #[arg(long)]
    #[serde(rename = "offload.address")]
    pub cloud: Option<String>,
    /// Model name the cloud serves.
    #[arg(long)]
    #[serde(rename = "offload.model")]
    pub cloud_model: Option<String>,
    /// Samples per edge inference call.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Write one JSON line per sample here ('-' for stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Save hard examples (PNG + index.txt with the cloud's label) here.
    #[arg(long)]
    pub hard_examples_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the Open Inference Protocol (REST and gRPC, one port) here: each request is answered
    /// by the edge model, its hard samples by the cloud.
    #[arg(long)]
    #[serde(rename = "serve.listen")]
    pub listen: Option<SocketAddr>,
    /// Stop after this many samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Flags of `sedge worker cloud`, each named by the config field it sets.
#[derive(Args, Serialize)]
pub struct CloudArgs {
    /// --config and --print-default-config.
    #[command(flatten)]
    #[serde(skip)]
    pub cfg: ConfigFlags,
    /// Cloud model (.onnx with its .json beside it).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Inference engine.
    #[arg(long)]
    #[serde(rename = "backend.kind")]
    pub backend: Option<BackendKind>,
    /// Address for REST and gRPC (default 0.0.0.0:5000, Sedna's port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Most samples per backend call.
    #[arg(long)]
    #[serde(rename = "server.batch.max_batch")]
    pub max_batch: Option<usize>,
    /// Longest a request waits for a batch to fill, in microseconds.
    #[arg(long)]
    #[serde(rename = "server.batch.max_delay_us")]
    pub max_delay_us: Option<u64>,
    /// Requests that may wait; more get 503 / RESOURCE_EXHAUSTED.
    #[arg(long)]
    #[serde(rename = "server.batch.queue")]
    pub queue: Option<usize>,
}

/// The model named by `MODEL_URL` (path, file://, http(s)://) as a local file; a worker that
/// cannot get or load its model exits with code 3 so that the controller can say so.
pub async fn model_file(url: &std::path::Path) -> PathBuf {
    let sum = config::env(sedge_worker_contract::env::MODEL_SHA256);
    match sedge_inference_worker::fetch::resolve(&url.to_string_lossy(), sum.as_deref()).await {
        Ok(p) => p,
        Err(e) => model_unavailable(&e),
    }
}

/// Says the model cannot be had and exits with the worker contract's code for it.
pub fn model_unavailable(e: &dyn std::fmt::Display) -> ! {
    eprintln!("error: model unavailable: {e}");
    std::process::exit(sedge_worker_contract::exit::MODEL_UNAVAILABLE)
}

/// Prints an edge worker's summary: one JSON line for scripts, then the readable form.
pub fn print_summary(s: &EdgeSummary) -> Result<()> {
    // One line for scripts (`kubectl logs ... | grep '^summary: '`), then the readable form.
    eprintln!("summary: {}", serde_json::to_string(s)?);
    eprintln!("{}", serde_json::to_string_pretty(s)?);
    if let Some(acc) = s.accuracy() {
        eprintln!(
            "{} samples, accuracy {:.2}% (edge alone {:.2}%), {:.1}% offloaded, p50 {:.3} ms, p99 {:.3} ms, {:.0} samples/s",
            s.samples,
            acc * 100.0,
            s.edge_correct as f64 / s.labelled as f64 * 100.0,
            s.offload_share() * 100.0,
            s.p50_ms,
            s.p99_ms,
            s.throughput
        );
    }
    Ok(())
}

/// Runs the edge worker over its input (`sedge worker edge`).
pub async fn edge(a: EdgeArgs) -> Result<()> {
    if a.cfg.print_default_config {
        print!("{}", serde_yaml::to_string(&EdgeConfig::default())?);
        return Ok(());
    }
    let mut c: EdgeConfig = config::Loader::new("EDGE_WORKER")
        .file(a.cfg.config.as_deref())
        .load_with(&a, config::apply_edge_env)?;
    let input = a
        .input
        .or_else(|| config::env("SEDGE_INPUT").map(PathBuf::from));
    let serve = c.serve.listen;
    if input.is_none() && serve.is_none() {
        bail!(
            "no input and no endpoint: give an IDX file, an index file, a directory, an image or a device topic mqtt://<host>:<port>/<topic> (or set SEDGE_INPUT), or --listen <addr> (SEDGE_EDGE_WORKER_SERVE_LISTEN) to answer applications' requests"
        );
    }
    // A device topic is checked now, before the model loads; a path is found later.
    let input = input.map(|i| i.to_string_lossy().into_owned());
    let device = match &input {
        Some(i) if i.starts_with("mqtt://") => {
            Some(Source::parse(i).map_err(|e| anyhow::anyhow!("input {e}"))?)
        }
        _ => None,
    };
    c.model = model_file(&c.model).await;
    let listen = c.metrics_listen;
    let worker = match EdgeWorker::start(c) {
        Ok(w) => w,
        Err(e @ sedge_inference_worker::edge::WorkerError::Model(_)) => model_unavailable(&e),
        Err(e) => return Err(e.into()),
    };
    // Running as a Sedna-style pod: report counters to the node's local controller.
    let reporter = sedge_inference_worker::lc::LcReporter::from_env()?
        .map(|r| r.spawn(worker.metrics.clone(), worker.client().cloned()));
    let _metrics = match listen {
        Some(addr) => {
            let (l, bound) = server::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%bound, "serving /metrics");
            Some(worker.serve_metrics(l))
        }
        None => None,
    };
    let source = match (device, &input) {
        (Some(d), _) => Some(d),
        (None, Some(i)) => Some(Source::from_path(
            sedge_inference_worker::fetch::local_path(i),
        )),
        (None, None) => None,
    };
    // Started together with the cloud worker: give it a moment before the first sample.
    if let (Some(c), Some(secs)) = (
        worker.client(),
        config::env_parse::<f64>("SEDGE_CLOUD_WAIT_SECONDS")?,
    ) && !c
        .wait_ready(std::time::Duration::from_secs_f64(secs.max(0.0)))
        .await
    {
        eprintln!(
            "cloud worker not ready after {secs} s; starting anyway (hard examples answered edge-only until it is)"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let worker = std::sync::Arc::new(worker);
    let endpoint = match serve {
        Some(addr) => {
            let (l, bound) = server::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the inference endpoint"))?;
            eprintln!("serving the Open Inference Protocol (REST and gRPC) on {bound}");
            let w = worker.clone();
            let until = stopped(stop_rx.clone());
            Some(tokio::spawn(async move { w.serve(l, until).await }))
        }
        None => None,
    };
    if let Some(source) = source {
        let summary = worker.run(&source, stopped(stop_rx.clone())).await?;
        print_summary(&summary)?;
    }
    if let Some(endpoint) = endpoint {
        endpoint.await??;
    }
    // A pod's worker stays up after its input (a Deployment would restart it and count again):
    // counters keep being reported and served until it is told to stop.
    if let Some(r) = reporter {
        if !*stop_rx.borrow() {
            eprintln!("input done; serving counters until stopped");
            stopped(stop_rx).await;
        }
        r.abort();
    }
    Ok(())
}

/// Trains a model (`sedge worker train`) and reports the result.
pub async fn train(a: TrainArgs) -> Result<()> {
    let job = sedge_inference_worker::train::TrainJob {
        base_model: a.base_model,
        output_dir: a.output,
        train_data: a.train_data,
        replay_data: a.replay_data,
        replay_limit: a.replay_limit,
        options: sedge_inference_worker::train::TrainOptions {
            epochs: a.epochs,
            batch_size: a.batch_size,
            learning_rate: a.learning_rate,
            replay_ratio: a.replay_ratio,
            ..Default::default()
        },
    };
    let result = tokio::task::spawn_blocking(move || sedge_inference_worker::train::run(&job))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"));
    let result = result.and_then(|r| Ok(serde_json::to_value([r])?));
    report_result("train", result).await
}

/// Prints a train or eval worker's results and, in a pod (LC_SERVER and WORKER_NAME set),
/// reports them to the node's local controller, failures included.
pub async fn report_result(kind: &str, result: Result<serde_json::Value>) -> Result<()> {
    if let Ok(r) = &result {
        println!("{r}");
    }
    if let Some(lc) = sedge_inference_worker::lc::LcReporter::from_env()? {
        let outcome = result
            .as_ref()
            .map(Clone::clone)
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = lc.report_result(kind, outcome).await {
            eprintln!("the local controller did not take the {kind} result: {e}");
            if result.is_ok() {
                bail!("{kind} finished, but its result could not be reported: {e}");
            }
        }
    }
    result.map(|_| ())
}

/// Scores models (`sedge worker eval`) and reports the metrics.
pub async fn eval(a: EvalArgs) -> Result<()> {
    let opts = sedge_inference_worker::backend::BackendOptions {
        kind: a.backend,
        ..Default::default()
    };
    let results = tokio::task::spawn_blocking(move || {
        sedge_inference_worker::eval::run(&a.models, &a.test_data, &opts)
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{e}"));
    let results = results.and_then(|r| Ok(serde_json::to_value(r)?));
    report_result("eval", results).await
}

/// Serves the cloud model until stopped (`sedge worker cloud`).
pub async fn cloud(a: CloudArgs) -> Result<()> {
    if a.cfg.print_default_config {
        print!("{}", serde_yaml::to_string(&CloudConfig::default())?);
        return Ok(());
    }
    let mut c: CloudConfig = config::Loader::new("CLOUD_WORKER")
        .file(a.cfg.config.as_deref())
        .load_with(&a, config::apply_cloud_env)?;
    c.model = model_file(&c.model).await;
    let model = Model::load(&c.model).unwrap_or_else(|e| model_unavailable(&e));
    let backend = backend::load(&model, &c.backend)?;
    let (listener, bound) = server::bind(c.listen)
        .await
        .with_context(|| format!("cannot listen on {}", c.listen))?;
    tracing::info!(model = %model.config.name, backend = %c.backend.kind, %bound, "cloud worker serving OIP REST + gRPC and /sedna/predict");
    let served = ServedModel::new(model.config, backend, c.server.batch.clone());
    server::serve(listener, served, c.server, shutdown_signal()).await?;
    tracing::info!("cloud worker stopped");
    Ok(())
}

/// Runs one worker until its input is done or it is told to stop.
pub async fn run(w: Worker) -> Result<()> {
    match w {
        Worker::Edge(a) => edge(a).await,
        Worker::Cloud(a) => cloud(a).await,
        Worker::Train(a) => train(a).await,
        Worker::Eval(a) => eval(a).await,
    }
}
