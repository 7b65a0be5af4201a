//! Edge agent footprint and pod start-up latency.
//!
//! Runs the embedded API server and the cloud core in this process and one `sedge edge` agent as
//! its own process (so its memory is measured alone), then:
//! 1. the agent's RSS idle, and with 20 running pods;
//! 2. the time from creating a pod through the API to seeing it `Running` through a watch
//!    (scheduler -> cloud core -> channel -> SQLite -> edged -> process -> status back), p50/p99
//!    over `--pods` pods created one after another, against the baseline of spawning the same
//!    process directly here.
//!
//! `cargo run --release -p sedge-benchmarks --bin edgefoot` (builds and uses target/release/sedge;
//! `--sedge <path>` for another binary).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use sedge_apiserver::{ApiServer, ApiServerConfig};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Pods for the start-up latency run.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods kept running for the loaded footprint.
    #[arg(long, default_value_t = 20)]
    resident: usize,
    /// The sedge binary to run the agent with.
    #[arg(long, default_value = "target/release/sedge")]
    sedge: PathBuf,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"bench": "edgefoot"}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "edge-1"}, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}
    }))
    .unwrap()
}

async fn wait_running(pods: &Api<Pod>, name: &str, limit: Duration) -> Result<()> {
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if !a.sedge.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p sedge`",
            a.sedge.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let server = ApiServer::start(ApiServerConfig {
        data_dir: dir.path().join("apiserver"),
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await?;
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let mut cc = sedge_cloudcore::CloudCoreConfig::default();
    cc.hub.data_dir = dir.path().join("cloudhub");
    cc.hub.pki_dir = dir.path().join("apiserver/pki");
    cc.hub.listen = "127.0.0.1:0".into();
    cc.hub.listen_quic = String::new();
    let cloud = sedge_cloudcore::CloudCore::start(client.clone(), cc, Vec::new()).await?;
    let (token, _) = cloud
        .hub
        .tokens()
        .create(Duration::from_secs(300), "edgefoot")?;
    let edge_dir = dir.path().join("edge-1");
    let cfg = dir.path().join("edge.yaml");
    std::fs::write(
        &cfg,
        format!(
            "metaserver_listen: 127.0.0.1:0\nnode_ip: 127.0.0.1\ntunnel:\n  node_name: edge-1\n  cloud: {}\n  data_dir: {}\n",
            cloud.hub.addr(),
            edge_dir.display()
        ),
    )?;
    let mut agent = Command::new(&a.sedge)
        .args(["edge", "--token", &token, "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the edge agent")?;
    let nodes = Api::<Node>::all(client.clone());
    let t0 = Instant::now();
    while nodes.get_opt("edge-1").await?.is_none() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("edge-1 never registered");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = sedge_benchmarks::rss_kib(Some(agent.id()));

    // Baseline: spawning the same process directly.
    let mut base = Vec::new();
    for _ in 0..a.pods {
        let t = Instant::now();
        let mut c = Command::new("sleep")
            .arg("3600")
            .stdout(Stdio::null())
            .spawn()?;
        base.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = c.kill();
        let _ = c.wait();
    }

    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let mut lat = Vec::new();
    for i in 0..a.pods {
        let name = format!("p{i}");
        let t = Instant::now();
        pods.create(&PostParams::default(), &pod(&name)).await?;
        wait_running(&pods, &name, Duration::from_secs(30)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if i >= a.resident {
            pods.delete(&name, &DeleteParams::default()).await?;
        }
    }
    // Let the deletes finish, leaving `resident` pods running.
    let t0 = Instant::now();
    loop {
        let n = pods.list(&Default::default()).await?.items.len();
        if n <= a.resident || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = sedge_benchmarks::rss_kib(Some(agent.id()));

    let (b50, b99) = (pct(&mut base.clone(), 0.5), pct(&mut base, 0.99));
    let (l50, l99) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.99));
    println!("\nEdge agent footprint (RSS of the `sedge edge` process alone)\n");
    println!("| state | agent RSS | vs KubeEdge edgecore (~70 MB advertised) |");
    println!("|---|---:|---:|");
    println!(
        "| idle, joined | {:.1} MiB | {:.2}x |",
        idle as f64 / 1024.0,
        idle as f64 / 1024.0 / 70.0
    );
    println!(
        "| {} pods running | {:.1} MiB | {:.2}x |",
        a.resident,
        loaded as f64 / 1024.0,
        loaded as f64 / 1024.0 / 70.0
    );
    println!(
        "\nPod start-up: create through the API -> `Running` seen by a watch ({} pods, one at a time)\n",
        a.pods
    );
    println!("| path | p50 | p99 | p50 vs bare spawn |");
    println!("|---|---:|---:|---:|");
    println!("| bare `spawn()` of the same process (baseline) | {b50:.2} ms | {b99:.2} ms | 1x |");
    println!(
        "| API -> scheduler -> cloud core -> channel -> SQLite -> edged -> status | {l50:.1} ms | {l99:.1} ms | {:.0}x |",
        l50 / b50.max(1e-6)
    );

    // Delete everything and let the agent stop the processes before it goes.
    let _ = pods
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let t0 = Instant::now();
    while !pods.list(&Default::default()).await?.items.is_empty()
        && t0.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    cloud.shutdown().await;
    server.shutdown().await;
    Ok(())
}
