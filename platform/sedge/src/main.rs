//! `sedge`: one command for every Sedge role. This file parses the command line and hands each
//! subcommand to the library (`sedge::...`), where its flags are layered over the config file
//! and the environment.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sedge::{apiserver, images, platform, shutdown_signal, tools, tunnel, worker};

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
    Worker(worker::Worker),
    /// Run a model over an image, an IDX file, an index file or a directory; print predictions and accuracy.
    Infer(tools::InferArgs),
    /// Compare edge-only, cloud-only and joint inference on Fashion-MNIST and print one table.
    Demo(tools::DemoArgs),
    /// Run an Ianvs-style benchmarking job (benchmarkingjob.yaml) and print its leaderboard.
    Bench(tools::BenchArgs),
    /// Work with data sets.
    #[command(subcommand)]
    Dataset(tools::DatasetCmd),
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
    Edge(sedge_edge::EdgeAgentArgs),
    /// Everything on one machine: the embedded API server, the cloud side and N edge agents.
    Up(platform::UpArgs),
    /// Run the AI controller: sedna.io resources (JointInferenceService, Model, Dataset, ...).
    AiController(platform::AiControllerArgs),
    /// Container images for CRI nodes: build Sedge's as OCI archives and import them.
    #[command(subcommand)]
    Images(images::ImagesCmd),
    /// Run a device mapper (what the `sedge/modbus-mapper` image runs as a pod on a node).
    #[command(subcommand)]
    Mapper(Mapper),
}

#[derive(Subcommand)]
enum Mapper {
    /// Modbus TCP devices, over the edge agent's DMI (as `sedge-modbus-mapper`).
    Modbus(sedge_modbus_mapper::MapperArgs),
}

/// jemalloc, not glibc malloc: under the cloud's many threads glibc's per-thread arenas held
/// about twice the memory in use (2,000 nodes: 987 MiB steady, 496 MiB with two arenas; see
/// benchmarks/README.md, "the cloud's memory").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
            Command::Worker(w) => worker::run(w).await,
            Command::Infer(a) => tools::infer(a).await,
            Command::Demo(a) => tools::demo(a).await,
            Command::Bench(a) => tools::bench(a).await,
            Command::Dataset(tools::DatasetCmd::Export(a)) => tools::export(a),
            Command::Apiserver(a) => apiserver::run(a, shutdown_signal()).await,
            Command::Token(c) => tunnel::token(c).await,
            Command::Join(a) => tunnel::join(a).await,
            Command::Cloud(a) => platform::cloud(a, shutdown_signal()).await,
            Command::Edge(a) => sedge_edge::run(a, shutdown_signal()).await,
            Command::Up(a) => platform::up(a, shutdown_signal()).await,
            Command::AiController(a) => platform::ai_controller(a, shutdown_signal()).await,
            Command::Images(images::ImagesCmd::Build(a)) => images::build(a),
            Command::Mapper(Mapper::Modbus(a)) => sedge_modbus_mapper::run_args(a).await,
        }
    })
}
