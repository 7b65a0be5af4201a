//! `sedge-modbus-mapper`: the Modbus TCP mapper (see the library). Parses flags and runs it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Drives the node's Modbus TCP devices for the edge agent over KubeEdge's DMI.
#[derive(Parser)]
#[command(name = "sedge-modbus-mapper", version)]
struct Cli {
    /// The edge agent's DMI socket (`<node data dir>/dmi.sock`; `up.json` lists it).
    #[arg(long, env = "SEDGE_DMI_SOCKET")]
    dmi_socket: PathBuf,
    /// This mapper's socket, where the agent tells it of device changes.
    #[arg(long, default_value = "/tmp/sedge-modbus-mapper.sock")]
    socket: PathBuf,
    /// The name it registers with.
    #[arg(long, default_value = "sedge-modbus-mapper")]
    name: String,
    /// Also serve a simulated Modbus TCP device on this address (for the demo).
    #[arg(long)]
    simulate: Option<std::net::SocketAddr>,
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
        rt.block_on(async {
            if let Some(addr) = cli.simulate {
                let sim = sedge_modbus_mapper::Simulator::default();
                let bound = sim
                    .start(addr)
                    .await
                    .with_context(|| format!("simulating on {addr}"))?;
                eprintln!("simulated Modbus TCP device on {bound}");
            }
            sedge_modbus_mapper::run(sedge_modbus_mapper::MapperConfig {
                name: cli.name,
                dmi_socket: cli.dmi_socket,
                socket: cli.socket,
            })
            .await?;
            Ok(())
        })
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
