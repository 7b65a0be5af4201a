//! `sedge apiserver`: the embedded API server on its own.

use std::future::Future;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sedge_apiserver::store::Durability;
use sedge_apiserver::{ApiServer, ApiServerConfig};

/// Flags of `sedge apiserver` (each also readable from the environment).
#[derive(Args)]
pub struct ApiserverArgs {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Directory for the database, PKI, tokens and kubeconfig.
    #[arg(long, env = "SEDGE_APISERVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:6443 (port 0 picks a free one).
    #[arg(long, env = "SEDGE_APISERVER_LISTEN")]
    listen: Option<String>,
    /// Host written into the kubeconfig and the serving certificate.
    #[arg(long, env = "SEDGE_APISERVER_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// Extra DNS name or IP for the serving certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_san: Vec<String>,
    /// Serving certificate (PEM) instead of one issued by the cluster CA.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Extra CA (PEM) whose client certificates are accepted.
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    /// Token file (token,user,uid,"groups").
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where to write the admin kubeconfig (default <data-dir>/kubeconfig).
    #[arg(long, env = "SEDGE_KUBECONFIG_OUT")]
    kubeconfig: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long)]
    max_request_bytes: Option<usize>,
    /// Changes kept for watch replay.
    #[arg(long)]
    history_events: Option<u64>,
    /// fsync every commit (full) or only at checkpoints (normal).
    #[arg(long, value_parser = ["full", "normal"])]
    durability: Option<String>,
    /// Seconds between watch bookmarks.
    #[arg(long)]
    bookmark_interval_seconds: Option<u64>,
}

/// Builds the config: defaults < file < environment/flags.
pub fn config(a: &ApiserverArgs) -> Result<ApiServerConfig> {
    let mut c: ApiServerConfig = sedge_inference_worker::config::load(a.config.as_deref())?;
    if let Some(v) = &a.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = &a.listen {
        c.listen = v.clone();
    }
    if let Some(v) = &a.advertise_address {
        c.advertise_address = Some(v.clone());
    }
    c.extra_sans.extend(a.tls_san.iter().cloned());
    if a.tls_cert_file.is_some() {
        c.tls_cert_file = a.tls_cert_file.clone();
        c.tls_key_file = a.tls_key_file.clone();
    }
    if let Some(v) = &a.client_ca_file {
        c.client_ca_file = Some(v.clone());
    }
    if let Some(v) = &a.token_file {
        c.token_file = Some(v.clone());
    }
    if let Some(v) = &a.kubeconfig {
        c.kubeconfig = Some(v.clone());
    }
    if let Some(v) = a.max_request_bytes {
        c.max_request_bytes = v;
    }
    if let Some(v) = a.history_events {
        c.history_events = v;
    }
    if let Some(v) = &a.durability {
        c.durability = if v == "normal" {
            Durability::Normal
        } else {
            Durability::Full
        };
    }
    if let Some(v) = a.bookmark_interval_seconds {
        c.bookmark_interval_seconds = v;
    }
    Ok(c)
}

/// Runs until `shutdown` resolves.
pub async fn run(a: ApiserverArgs, shutdown: impl Future<Output = ()>) -> Result<()> {
    if a.print_default_config {
        print!("{}", serde_yaml::to_string(&ApiServerConfig::default())?);
        return Ok(());
    }
    let c = config(&a)?;
    let server = ApiServer::start(c)
        .await
        .context("cannot start the API server")?;
    eprintln!("API server ready at {}", server.url);
    eprintln!(
        "  kubectl --kubeconfig {} get nodes",
        server.kubeconfig.display()
    );
    shutdown.await;
    server.shutdown().await;
    Ok(())
}
