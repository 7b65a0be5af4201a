//! What the edge-agent benchmarks share: the API server and cloud core in this process, agents
//! as their own processes (so each one's memory is measured alone), percentiles, and waiting for
//! a pod to be `Running` through a watch.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use sedge_apiserver::{ApiServer, ApiServerConfig};

/// The embedded API server and the cloud core (hub on a free loopback port, no QUIC), with an
/// admin client, all under `dir`.
pub async fn cloud(dir: &Path) -> Result<(ApiServer, kube::Client, sedge_cloudcore::CloudCore)> {
    let server = ApiServer::start(ApiServerConfig {
        data_dir: dir.join("apiserver"),
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await?;
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let mut cc = sedge_cloudcore::CloudCoreConfig::default();
    cc.hub.data_dir = dir.join("cloudhub");
    cc.hub.pki_dir = dir.join("apiserver/pki");
    cc.hub.listen = "127.0.0.1:0".into();
    cc.hub.listen_quic = String::new();
    let cloud = sedge_cloudcore::CloudCore::start(client.clone(), cc, Vec::new()).await?;
    Ok((server, client, cloud))
}

/// Starts an agent joined as `node` with `argv` (`[program, subcommand...]`); `extra` is added
/// to its config file (YAML keys at the top level).
pub fn agent(
    dir: &Path,
    cloud: &str,
    token: &str,
    node: &str,
    argv: &[&std::ffi::OsStr],
    extra: &str,
) -> Result<std::process::Child> {
    let cfg = dir.join(format!("{node}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "metaserver_listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\nnode_ip: 127.0.0.1\n{extra}tunnel:\n  node_name: {node}\n  cloud: {cloud}\n  data_dir: {}\n",
            dir.join(node).display()
        ),
    )?;
    Command::new(argv[0])
        .args(&argv[1..])
        .args(["--lc-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .args(["--token", token, "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {node}"))
}

/// Waits until every node of `names` is registered (at most 30 s).
pub async fn wait_registered(client: &kube::Client, names: &[&str]) -> Result<()> {
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let t0 = std::time::Instant::now();
    for node in names {
        while nodes.get_opt(node).await?.is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{node} never registered");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits until the pod `name` is `Running`, seen through a watch.
pub async fn wait_running(pods: &Api<Pod>, name: &str, limit: Duration) -> Result<()> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(pods.clone(), cfg).applied_objects();
    futures::pin_mut!(stream);
    let found = tokio::time::timeout(limit, async {
        while let Some(p) = stream.try_next().await? {
            if p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    match found {
        Ok(Ok(true)) => Ok(()),
        _ => bail!("pod {name} not Running within {limit:?}"),
    }
}
