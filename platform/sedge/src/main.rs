//! `sedge`: one command for every Sedge role. Each subcommand parses its flags, layers them over
//! the config file and the environment, and calls a library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sedge_datasets::{IndexFormat, Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind};
use sedge_inference_worker::config::{self, CloudConfig};
use sedge_inference_worker::edge::{EdgeConfig, EdgeSummary, EdgeWorker};
use sedge_inference_worker::model::Model;
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::report::{self, ReportOptions};
use sedge_inference_worker::server::{self, CloudModel};
use sedge_inference_worker::source::Source;

mod apiserver;
mod platform;
mod tunnel;

#[derive(Parser)]
#[command(
    name = "sedge",
    version,
    about = "Sedge: Kubernetes to the edge, with edge-cloud collaborative AI",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an inference worker (the edge or the cloud half of joint inference).
    #[command(subcommand)]
    Worker(Worker),
    /// Run a model over an image, an IDX file, an index file or a directory; print predictions and accuracy.
    Infer(InferArgs),
    /// Compare edge-only, cloud-only and joint inference on Fashion-MNIST and print one table.
    Demo(DemoArgs),
    /// Run an Ianvs-style benchmarking job (benchmarkingjob.yaml) and print its leaderboard.
    Bench(BenchArgs),
    /// Work with data sets.
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Run the embedded Kubernetes-compatible API server (SQLite) and write an admin kubeconfig.
    Apiserver(apiserver::ApiserverArgs),
    /// Manage join tokens for edge nodes (create with a TTL, list, revoke).
    #[command(subcommand)]
    Token(tunnel::TokenCmd),
    /// Join this machine to the cloud as an edge node: pin the CA from the token, get a certificate.
    Join(tunnel::JoinArgs),
    /// Run the cloud side: the hub for edge nodes and the controllers (against --kubeconfig, or --embedded).
    Cloud(platform::CloudArgs),
    /// Run the edge agent on this node (joins first when given --token).
    Edge(platform::EdgeAgentArgs),
    /// Everything on one machine: the embedded API server, the cloud side and N edge agents.
    Up(platform::UpArgs),
    /// Run the AI controller: sedna.io resources (JointInferenceService, Model, Dataset, ...).
    AiController(platform::AiControllerArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// The benchmarkingjob YAML file (paths inside it are relative to it).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Test cases to run at once.
    #[arg(long, short = 'j', default_value_t = 1)]
    jobs: usize,
    /// Use only the first N test samples.
    #[arg(long)]
    limit: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Subcommand)]
enum Worker {
    /// Edge worker: infer locally, offload hard examples to the cloud worker over gRPC.
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

#[derive(Args)]
struct TrainArgs {
    /// The model to start from (.onnx with its .json beside it).
    #[arg(long, env = "BASE_MODEL_URL")]
    base_model: PathBuf,
    /// Directory the trained model is written to.
    #[arg(long, env = "MODEL_URL")]
    output: PathBuf,
    /// The round's labelled samples: a .txt/.csv index, an IDX file or a directory.
    #[arg(long, env = "TRAIN_DATASET_URL")]
    train_data: PathBuf,
    /// Original labelled data mixed in against forgetting.
    #[arg(long, env = "REPLAY_DATASET_URL")]
    replay_data: Option<PathBuf>,
    /// At most this many replay samples are read.
    #[arg(long, env = "REPLAY_LIMIT", default_value_t = 20_000)]
    replay_limit: usize,
    /// Replay samples per new sample, each epoch.
    #[arg(long, env = "REPLAY_RATIO", default_value_t = 1.0)]
    replay_ratio: f64,
    /// Passes over the data.
    #[arg(long, env = "EPOCHS", default_value_t = 3)]
    epochs: usize,
    /// Samples per step.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, env = "LEARNING_RATE", default_value_t = 5e-4)]
    learning_rate: f64,
}

#[derive(Args)]
struct EvalArgs {
    /// Models to score, `;`-separated (Sedna: [new, deployed]).
    #[arg(long, env = "MODEL_URLS")]
    models: String,
    /// Labelled samples: a .txt/.csv index, an IDX file or a directory.
    #[arg(long, env = "TEST_DATASET_URL")]
    test_data: PathBuf,
    /// Inference engine.
    #[arg(long, env = "BACKEND", default_value = "tract")]
    backend: BackendKind,
}

#[derive(Args)]
struct ConfigFlags {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    print_default_config: bool,
}

#[derive(Args)]
struct EdgeArgs {
    #[command(flatten)]
    cfg: ConfigFlags,
    /// Samples: an IDX file, a .txt/.csv index, a directory of images, or one image.
    input: Option<PathBuf>,
    /// Edge model (.onnx with its .json beside it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Inference engine.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Hard-example mining rule: CrossEntropy, Threshold, IBT, Random, EdgeOnly, CloudOnly, MaxProbability, Margin.
    #[arg(long)]
    hem_name: Option<String>,
    /// Its parameters as Sedna's JSON list, e.g. '[{"key":"threshold","value":"0.8"}]'.
    #[arg(long)]
    hem_parameters: Option<String>,
    /// inference-then-mining or mining-then-inference.
    #[arg(long)]
    mining_mode: Option<MiningMode>,
    /// Cloud worker address host:port (omit for edge-only).
    #[arg(long)]
    cloud: Option<String>,
    /// Model name the cloud serves.
    #[arg(long)]
    cloud_model: Option<String>,
    /// Samples per edge inference call.
    #[arg(long)]
    batch: Option<usize>,
    /// Write one JSON line per sample here ('-' for stdout).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Save hard examples (PNG + index.txt with the cloud's label) here.
    #[arg(long)]
    hard_examples_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Stop after this many samples.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args)]
struct CloudArgs {
    #[command(flatten)]
    cfg: ConfigFlags,
    /// Cloud model (.onnx with its .json beside it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Inference engine.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Address for REST and gRPC (default 0.0.0.0:5000, Sedna's port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Most samples per backend call.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Longest a request waits for a batch to fill, in microseconds.
    #[arg(long)]
    max_delay_us: Option<u64>,
    /// Requests that may wait; more get 503 / RESOURCE_EXHAUSTED.
    #[arg(long)]
    queue: Option<usize>,
}

#[derive(Args)]
struct InferArgs {
    /// An image, an IDX file, a .txt/.csv index, or a directory of images.
    input: PathBuf,
    /// Model (.onnx with its .json beside it).
    #[arg(long, default_value = "models/fashion-mnist/edge-cnn.onnx")]
    model: PathBuf,
    /// Inference engine.
    #[arg(long, default_value = "tract")]
    backend: BackendKind,
    /// Samples per inference call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Stop after this many samples.
    #[arg(long)]
    limit: Option<usize>,
    /// Print only the summary, not one line per sample.
    #[arg(long)]
    summary_only: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Directory with Fashion-MNIST's IDX files.
    #[arg(long, default_value = fashion::FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Inference engine (default: ort when the ONNX Runtime library is found, else tract).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Mining rule of the joint run.
    #[arg(long, default_value = "MaxProbability")]
    hem_name: String,
    /// Its parameters.
    #[arg(long, default_value = r#"[{"key":"threshold","value":"0.8"}]"#)]
    hem_parameters: String,
    /// Stop after this many samples (default: all 10,000 test images).
    #[arg(long)]
    limit: Option<usize>,
    /// Offloads in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Directory holding edge-cnn.onnx and cloud-cnn.onnx.
    #[arg(long, default_value = "models/fashion-mnist")]
    models: PathBuf,
    /// Take the joint row from this edge worker summary (JSON, e.g. from a joint inference pod's
    /// log line `summary: ...`) instead of running it here.
    #[arg(long)]
    joint_summary: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DatasetCmd {
    /// Export a Fashion-MNIST split as PNG files plus a Sedna index file.
    Export(ExportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Test,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Txt,
    Csv,
}

#[derive(Args)]
struct ExportArgs {
    /// Output directory (gets images/ and index.txt or index.csv).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Which split.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Index format.
    #[arg(long, value_enum, default_value = "txt")]
    format: FormatArg,
    /// Export only the first N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Directory with Fashion-MNIST's IDX files.
    #[arg(long, default_value = fashion::FASHION_MNIST_DIR)]
    data: PathBuf,
}

/// Runs the command; a failure is one line on stderr, `error: <what>: <why>...` (never a
/// backtrace, whatever `RUST_BACKTRACE` says), and exit code 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // tract warns on every load of a model exported at ONNX opset 19+ (ours are) that it
            // was tested up to 18; the models are tested here (tract and ONNX Runtime agree), so
            // that line is noise by default. RUST_LOG overrides all of this.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tract_onnx::model=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Worker(Worker::Edge(a)) => worker_edge(a).await,
            Command::Worker(Worker::Cloud(a)) => worker_cloud(a).await,
            Command::Worker(Worker::Train(a)) => worker_train(a).await,
            Command::Worker(Worker::Eval(a)) => worker_eval(a).await,
            Command::Infer(a) => infer(a).await,
            Command::Demo(a) => demo(a).await,
            Command::Bench(a) => bench(a).await,
            Command::Dataset(DatasetCmd::Export(a)) => export(a),
            Command::Apiserver(a) => apiserver::run(a, shutdown_signal()).await,
            Command::Token(c) => tunnel::token(c),
            Command::Join(a) => tunnel::join(a).await,
            Command::Cloud(a) => platform::cloud(a, shutdown_signal()).await,
            Command::Edge(a) => platform::edge(a, shutdown_signal()).await,
            Command::Up(a) => platform::up(a, shutdown_signal()).await,
            Command::AiController(a) => platform::ai_controller(a, shutdown_signal()).await,
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The model named by `MODEL_URL` (path, file://, http(s)://) as a local file; a worker that
/// cannot get or load its model exits with code 3 so that the controller can say so.
async fn model_file(url: &std::path::Path) -> PathBuf {
    let sum = config::env(sedge_worker_contract::env::MODEL_SHA256);
    match sedge_inference_worker::fetch::resolve(&url.to_string_lossy(), sum.as_deref()).await {
        Ok(p) => p,
        Err(e) => model_unavailable(&e),
    }
}

fn model_unavailable(e: &dyn std::fmt::Display) -> ! {
    eprintln!("error: model unavailable: {e}");
    std::process::exit(sedge_worker_contract::exit::MODEL_UNAVAILABLE)
}

fn print_summary(s: &EdgeSummary) -> Result<()> {
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

async fn worker_edge(a: EdgeArgs) -> Result<()> {
    if a.cfg.print_default_config {
        print!("{}", serde_yaml::to_string(&EdgeConfig::default())?);
        return Ok(());
    }
    let mut c: EdgeConfig = config::load(a.cfg.config.as_deref())?;
    config::apply_edge_env(&mut c)?;
    if let Some(v) = a.model {
        c.model = v;
    }
    if let Some(v) = a.backend {
        c.backend.kind = v;
    }
    if let Some(v) = a.hem_name {
        c.hem_name = v;
    }
    if let Some(v) = a.hem_parameters {
        c.hem_parameters = v;
    }
    if let Some(v) = a.mining_mode {
        c.mining_mode = v;
    }
    if let Some(v) = a.cloud {
        c.offload.address = Some(v);
    }
    if let Some(v) = a.cloud_model {
        c.offload.model = v;
    }
    if let Some(v) = a.batch {
        c.batch = v;
    }
    if let Some(v) = a.output {
        c.output = Some(v);
    }
    if let Some(v) = a.hard_examples_dir {
        c.hard_examples_dir = Some(v);
    }
    if let Some(v) = a.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = a.limit {
        c.limit = Some(v);
    }
    let Some(input) = a
        .input
        .or_else(|| config::env("SEDGE_INPUT").map(PathBuf::from))
    else {
        bail!(
            "no input: give an IDX file, an index file, a directory or an image (or set SEDGE_INPUT)"
        );
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
    let input = sedge_inference_worker::fetch::local_path(&input.to_string_lossy());
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
    let summary = worker
        .run(&Source::from_path(&input), stopped(stop_rx.clone()))
        .await?;
    print_summary(&summary)?;
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

async fn worker_train(a: TrainArgs) -> Result<()> {
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
async fn report_result(kind: &str, result: Result<serde_json::Value>) -> Result<()> {
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

async fn worker_eval(a: EvalArgs) -> Result<()> {
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

async fn worker_cloud(a: CloudArgs) -> Result<()> {
    if a.cfg.print_default_config {
        print!("{}", serde_yaml::to_string(&CloudConfig::default())?);
        return Ok(());
    }
    let mut c: CloudConfig = config::load(a.cfg.config.as_deref())?;
    config::apply_cloud_env(&mut c)?;
    if let Some(v) = a.model {
        c.model = v;
    }
    if let Some(v) = a.backend {
        c.backend.kind = v;
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.max_batch {
        c.server.batch.max_batch = v;
    }
    if let Some(v) = a.max_delay_us {
        c.server.batch.max_delay_us = v;
    }
    if let Some(v) = a.queue {
        c.server.batch.queue = v;
    }
    c.model = model_file(&c.model).await;
    let model = Model::load(&c.model).unwrap_or_else(|e| model_unavailable(&e));
    let backend = backend::load(&model, &c.backend)?;
    let (listener, bound) = server::bind(c.listen)
        .await
        .with_context(|| format!("cannot listen on {}", c.listen))?;
    tracing::info!(model = %model.config.name, backend = %c.backend.kind, %bound, "cloud worker serving OIP REST + gRPC and /sedna/predict");
    let served = CloudModel::new(model.config, backend, c.server.batch.clone());
    server::serve(listener, served, c.server, shutdown_signal()).await?;
    tracing::info!("cloud worker stopped");
    Ok(())
}

async fn infer(a: InferArgs) -> Result<()> {
    let c = EdgeConfig {
        model: a.model,
        backend: sedge_inference_worker::backend::BackendOptions {
            kind: a.backend,
            ..Default::default()
        },
        hem_name: "EdgeOnly".into(),
        hem_parameters: String::new(),
        batch: a.batch,
        output: (!a.summary_only).then(|| PathBuf::from("-")),
        limit: a.limit,
        ..Default::default()
    };
    let summary = EdgeWorker::start(c)?
        .run(&Source::from_path(&a.input), shutdown_signal())
        .await?;
    print_summary(&summary)
}

async fn demo(a: DemoArgs) -> Result<()> {
    let images = Split::Test.images_path(&a.data);
    if !images.exists() {
        bail!(
            "{} not found: install Debian's dataset-fashion-mnist package (`make data`) or pass --data DIR",
            images.display()
        );
    }
    let kind = a.backend.unwrap_or_else(|| {
        if backend::ort_library_path(None).is_ok() {
            BackendKind::Ort
        } else {
            BackendKind::Tract
        }
    });
    let opts = ReportOptions {
        edge_model: a.models.join("edge-cnn.onnx"),
        cloud_model: a.models.join("cloud-cnn.onnx"),
        data: Source::Idx(images),
        backend: sedge_inference_worker::backend::BackendOptions {
            kind,
            ..Default::default()
        },
        hem_name: a.hem_name,
        hem_parameters: a.hem_parameters,
        limit: a.limit,
        concurrency: a.concurrency,
    };
    eprintln!(
        "Joint inference on Fashion-MNIST ({kind} backend; cloud worker on a loopback port, offload over OIP gRPC)..."
    );
    let joint = match &a.joint_summary {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let s: EdgeSummary = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an edge worker summary", p.display()))?;
            Some(report::ReportRow {
                mode: "joint: edge pod->cloud pod".into(),
                summary: s,
            })
        }
        None => None,
    };
    let rows = report::joint_report(&opts, joint).await?;
    print!("{}", report::render(&rows));
    Ok(())
}

async fn bench(a: BenchArgs) -> Result<()> {
    let job = sedge_benchmarks::job::load(&a.file)?;
    // Said before anything runs; the other algorithms' cases still run.
    for (name, why) in &job.broken {
        eprintln!("algorithm {name:?} cannot run and is skipped: {why}");
    }
    let opts = sedge_benchmarks::runner::RunOptions {
        jobs: a.jobs,
        limit: a.limit,
        progress: !a.no_progress,
    };
    let report = sedge_benchmarks::runner::run(&job, &opts).await?;
    print!("{}", report.table);
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!("results in {}", report.run_dir.display());
    for f in &report.files {
        eprintln!("  {}", f.display());
    }
    let failed: Vec<_> = report.failures().collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "test case {} failed: {}",
                r.case.id,
                r.metrics
                    .as_ref()
                    .err()
                    .map(String::as_str)
                    .unwrap_or_default()
            );
        }
        bail!(
            "{} of {} test cases failed (the others are saved above)",
            failed.len(),
            report.results.len()
        );
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::Test => Split::Test,
    };
    let format = match a.format {
        FormatArg::Txt => IndexFormat::Txt,
        FormatArg::Csv => IndexFormat::Csv,
    };
    let data = fashion::load(&a.data, split)?;
    let index = sedge_datasets::export::export(&data, &a.out, format, a.limit)?;
    println!("{}", index.display());
    Ok(())
}
