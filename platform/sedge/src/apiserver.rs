//! `sedge apiserver`: the embedded API server on its own.

use std::future::Future;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sedge_apiserver::store::Durability;
use sedge_apiserver::{ApiServer, ApiServerConfig};
use serde::Serialize;

/// Flags of `sedge apiserver`; each is named by the config field it sets (`SEDGE_APISERVER_<FIELD>`
/// sets the same field from the environment).
#[derive(Args, Serialize)]
pub struct ApiserverArgs {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    #[serde(skip)]
    print_default_config: bool,
    /// Directory for the database, PKI, tokens and kubeconfig.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:6443 (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Host written into the kubeconfig and the serving certificate.
    #[arg(long)]
    advertise_address: Option<String>,
    /// Extra DNS name or IP for the serving certificate (repeatable).
    #[arg(long = "tls-san")]
    #[serde(rename = "extra_sans", skip_serializing_if = "Vec::is_empty")]
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
    /// Changes kept for watch replay and paginated lists, at least.
    #[arg(long)]
    history_events: Option<u64>,
    /// Changes younger than this many seconds are kept too (0: by count only).
    #[arg(long)]
    history_seconds: Option<u64>,
    /// Changes kept at most, however young.
    #[arg(long)]
    history_max_events: Option<u64>,
    /// fsync every commit (full) or only at checkpoints (normal).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Seconds between watch bookmarks.
    #[arg(long)]
    bookmark_interval_seconds: Option<u64>,
}

fn parse_durability(v: &str) -> Result<Durability, String> {
    match v {
        "full" => Ok(Durability::Full),
        "normal" => Ok(Durability::Normal),
        _ => Err("use full or normal".into()),
    }
}

/// Builds the config: defaults < file < environment (`SEDGE_APISERVER_...`) < flags.
pub fn config(a: &ApiserverArgs) -> Result<ApiServerConfig> {
    Ok(sedge_config::Loader::new("APISERVER")
        .file(a.config.as_deref())
        .load(a)?)
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
