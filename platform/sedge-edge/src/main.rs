//! `sedge-edge`: the edge agent alone (see the library). Parses the command line and runs it.

use anyhow::Context;
use clap::Parser;

/// Sedge's edge agent: runs this node's pods from the cloud (and from its local store while the
/// cloud is away), with Sedna's local controller for AI workers.
#[derive(Parser)]
#[command(name = "sedge-edge", version)]
struct Cli {
    #[command(flatten)]
    agent: sedge_edge::EdgeAgentArgs,
}

/// A failure is one line, `error: <what>: <why>`, and exit code 1.
fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let run = || -> anyhow::Result<()> {
        tokio::runtime::Runtime::new()
            .context("cannot start the tokio runtime")?
            .block_on(sedge_edge::run(cli.agent, sedge_edge::shutdown_signal()))
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
