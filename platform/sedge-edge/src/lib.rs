//! The edge agent as a library and as its own slim binary, `sedge-edge`: the edge core (edged,
//! the SQLite store, the MetaServer, the edge hub) with the device twin (KubeEdge's DMI for
//! mappers) and the AI layer's edge module (Sedna's local-controller endpoint and the offload
//! routes), and nothing else: no model runtime, no
//! API server, no benchmarks. `sedge edge` runs the same code inside the all-in-one binary.
//!
//! Like `platform/sedge`, this crate is a composition root: it is the one place on the edge
//! where the platform and the AI layer meet, through the `EdgeModule` extension point.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use sedge_ai_controller::edge::{EdgeAiConfig, EdgeAiModule};
use sedge_config::Loader;
use sedge_devices::twin::{DeviceTwin, DeviceTwinConfig};
use sedge_edgecore::{EdgeCore, EdgeCoreConfig, EdgeModule};
use serde::Serialize;

/// The edge agent's environment prefix: `SEDGE_EDGECORE_...` (see `sedge_config`).
pub const EDGECORE: &str = "EDGECORE";

/// Flags of `sedge edge` and `sedge-edge`, each named by the config field it sets.
#[derive(Args, Serialize)]
pub struct EdgeAgentArgs {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_default_config: bool,
    /// Where the node keeps its credentials, store and pods.
    #[arg(long, env = "SEDGE_EDGE_DATA_DIR")]
    #[serde(rename = "tunnel.data_dir")]
    data_dir: Option<PathBuf>,
    /// The cloud hub (host:port); needed to join, read from the config otherwise.
    #[arg(long, env = "SEDGE_CLOUD")]
    #[serde(rename = "tunnel.cloud")]
    cloud: Option<String>,
    /// Join first with this token if the node has no credentials yet.
    #[arg(long, env = "SEDGE_JOIN_TOKEN")]
    #[serde(skip)]
    token: Option<String>,
    /// This node's name (needed to join).
    #[arg(long, env = "SEDGE_NODE_NAME")]
    #[serde(rename = "tunnel.node_name")]
    node_name: Option<String>,
    /// `websocket` or `quic`.
    #[arg(long)]
    #[serde(rename = "tunnel.transport")]
    transport: Option<sedge_tunnel::config::Transport>,
    /// The local MetaServer address (empty disables it).
    #[arg(long)]
    #[serde(rename = "metaserver_listen")]
    metaserver: Option<String>,
    /// The container runtime: `process` (host processes) or `cri` (real containers through
    /// containerd at `--cri-socket`).
    #[arg(long)]
    #[serde(rename = "runtime")]
    runtime: Option<sedge_edgecore::config::RuntimeKind>,
    /// The CRI runtime's socket (default `/run/containerd/containerd.sock`).
    #[arg(long)]
    #[serde(rename = "cri_socket")]
    cri_socket: Option<PathBuf>,
    /// KubeEdge's DMI socket mappers talk to (default `<data dir>/dmi/dmi.sock`, a directory pods
    /// may mount by hostPath; `-` disables it).
    #[arg(long)]
    #[serde(skip)]
    dmi_socket: Option<PathBuf>,
    /// Where the embedded MQTT broker listens for device topics (empty: none).
    #[arg(long, default_value = "127.0.0.1:1884")]
    #[serde(skip)]
    mqtt_listen: String,
    /// Use this MQTT broker (`host:port`, e.g. a mosquitto) instead of the embedded one.
    #[arg(long)]
    #[serde(skip)]
    mqtt_broker: Option<String>,
    /// Address of the local-controller endpoint AI workers report to (`LC_SERVER`; empty disables it).
    #[arg(long, default_value = "127.0.0.1:9100")]
    #[serde(skip)]
    lc_listen: String,
}

/// The agent's config: defaults < file < `SEDGE_EDGECORE_...` < flags.
pub fn config(a: &EdgeAgentArgs) -> Result<EdgeCoreConfig> {
    Ok(Loader::new(EDGECORE).file(a.config.as_deref()).load(a)?)
}

/// Runs `sedge edge` until `shutdown` resolves. Pods keep running when it stops (as with a
/// kubelet restart) and are adopted by the next start.
pub async fn run(a: EdgeAgentArgs, shutdown: impl Future<Output = ()>) -> Result<()> {
    if a.print_default_config {
        print!("{}", serde_yaml::to_string(&EdgeCoreConfig::default())?);
        return Ok(());
    }
    let mut cfg = config(&a)?;
    if cfg.sedge_binary.as_os_str().is_empty() {
        cfg.sedge_binary = sedge_binary();
    }
    let joined = sedge_tunnel::edge::Identity::load(&cfg.tunnel.data_dir).is_ok();
    if !joined {
        let Some(token) = &a.token else {
            bail!(
                "{} holds no node credentials: run `sedge join --cloud <host:port> --token <token> --node-name <name> --data-dir {}` first, or pass --token",
                cfg.tunnel.data_dir.display(),
                cfg.tunnel.data_dir.display()
            );
        };
        if cfg.tunnel.node_name.is_empty() {
            bail!("joining needs --node-name");
        }
        let j = sedge_tunnel::join(&cfg.tunnel, token).await?;
        eprintln!("joined as node {}", j.node);
    }
    let ai = EdgeAiModule::new(EdgeAiConfig {
        lc_listen: a.lc_listen.clone(),
        ..Default::default()
    });
    let dmi_socket = match &a.dmi_socket {
        Some(p) if p.as_os_str() == "-" => PathBuf::new(),
        Some(p) => p.clone(),
        None => sedge_devices::twin::default_dmi_socket(&cfg.tunnel.data_dir),
    };
    // Mappers run as pods mount the DMI directory.
    if let Some(d) = sedge_devices::twin::dmi_dir_for_pods(&cfg.tunnel.data_dir, &dmi_socket) {
        cfg.host_path_allow.push(d);
    }
    let devices = DeviceTwin::new(DeviceTwinConfig {
        dmi_socket: dmi_socket.clone(),
        mqtt_listen: a.mqtt_listen.clone(),
        mqtt_broker: a.mqtt_broker.clone().unwrap_or_default(),
    });
    let core = EdgeCore::start(
        cfg,
        vec![
            Arc::new(ai) as Arc<dyn EdgeModule>,
            Arc::new(devices) as Arc<dyn EdgeModule>,
        ],
    )
    .await
    .context("cannot start the edge agent")?;
    eprintln!(
        "edge agent {} running; local API {}; DMI {}",
        core.node(),
        core.metaserver
            .map(|a| format!("http://{a}"))
            .unwrap_or_else(|| "off".into()),
        if dmi_socket.as_os_str().is_empty() {
            "off".to_string()
        } else {
            dmi_socket.display().to_string()
        }
    );
    shutdown.await;
    core.shutdown(false).await;
    Ok(())
}

/// The `sedge` binary that runs `sedge/...` images' workers: this one when it is `sedge`, else a
/// `sedge` beside it (the slim agent ships next to the all-in-one binary), else `sedge` from
/// `PATH`.
fn sedge_binary() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    if me.file_stem().is_some_and(|n| n == "sedge") {
        return me;
    }
    let beside = me.with_file_name("sedge");
    if beside.is_file() {
        return beside;
    }
    tracing::warn!(
        "no `sedge` binary beside {}: pods of sedge/* images run `sedge` from PATH (set sedge_binary to choose one)",
        me.display()
    );
    PathBuf::from("sedge")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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
