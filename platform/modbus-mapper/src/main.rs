//! `sedge-modbus-mapper`: the Modbus TCP mapper (see the library). Parses flags and runs it.

use anyhow::Context;
use clap::Parser;

/// Drives the node's Modbus TCP devices for the edge agent over KubeEdge's DMI.
#[derive(Parser)]
#[command(name = "sedge-modbus-mapper", version)]
struct Cli {
    #[command(flatten)]
    args: sedge_modbus_mapper::MapperArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let run = || -> anyhow::Result<()> {
        let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
        rt.block_on(sedge_modbus_mapper::run_args(cli.args))
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
