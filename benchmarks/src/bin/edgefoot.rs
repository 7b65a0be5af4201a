//! Edge agent footprint and pod start-up latency.
//!
//! Runs the embedded API server and the cloud core in this process and two edge agents, each as
//! its own process (so its memory is measured alone): `sedge edge` of the all-in-one binary
//! (edge-0, the baseline) and the slim `sedge-edge` (edge-1), then:
//! 1. each agent's RSS idle, and the slim one's with 20 running pods;
//! 2. the time from creating a pod through the API to seeing it `Running` through a watch
//!    (scheduler -> cloud core -> channel -> SQLite -> edged -> process -> status back), p50/p99
//!    over `--pods` pods created one after another, against the baseline of spawning the same
//!    process directly here.
//!
//! `make bench` builds target/release/sedge and the slim agent as shipped,
//! target/edge/sedge-edge (the `edge` profile: size over speed, LTO), first (`--sedge`,
//! `--sedge-edge` for other binaries). Each agent runs its own MQTT broker on a free port.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use sedge_benchmarks::nodes::{self, agent, pct, wait_running};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Pods for the start-up latency run.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods kept running for the loaded footprint.
    #[arg(long, default_value_t = 20)]
    resident: usize,
    /// The all-in-one binary (its `sedge edge` is the baseline).
    #[arg(long, default_value = "target/release/sedge")]
    sedge: PathBuf,
    /// The slim edge agent (`make edge-agent` builds it).
    #[arg(long, default_value = "target/edge/sedge-edge")]
    sedge_edge: PathBuf,
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    for b in [&a.sedge, &a.sedge_edge] {
        if !b.exists() {
            bail!(
                "{} not found: build it with `make edge-agent` (the slim agent) or `cargo build --release -p sedge`",
                b.display()
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let (server, client, cloud) = nodes::cloud(dir.path()).await?;
    let (token, _) =
        cloud
            .hub
            .tokens()
            .create_with(Duration::from_secs(300), "edgefoot", 2, None)?;
    let hub = cloud.hub.addr().to_string();
    let all_in_one = agent(
        dir.path(),
        &hub,
        &token,
        "edge-0",
        &[a.sedge.as_os_str(), "edge".as_ref()],
        "",
    )?;
    let slim = agent(
        dir.path(),
        &hub,
        &token,
        "edge-1",
        &[a.sedge_edge.as_os_str()],
        "",
    )?;
    nodes::wait_registered(&client, &["edge-0", "edge-1"]).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_all = sedge_benchmarks::rss_kib(Some(all_in_one.id()));
    let idle = sedge_benchmarks::rss_kib(Some(slim.id()));
    // Where the idle RSS is: anonymous (heap, stacks) or file-backed (the binary's pages).
    let split = |pid: u32| {
        let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let kib = |k: &str| {
            t.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (kib("Anonymous:"), kib("Rss:") - kib("Anonymous:"))
    };
    let (anon_all, file_all) = split(all_in_one.id());
    let (anon, file) = split(slim.id());
    let size = |p: &PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(0.0)
    };

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
    let loaded = sedge_benchmarks::rss_kib(Some(slim.id()));

    let (b50, b99) = (pct(&mut base.clone(), 0.5), pct(&mut base, 0.99));
    let (l50, l99) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.99));
    let mib = |k: u64| k as f64 / 1024.0;
    println!("\nEdge agent footprint (RSS of each agent process alone, same run)\n");
    println!(
        "| agent | state | binary | agent RSS | vs `sedge edge` idle | vs KubeEdge edgecore (~70 MB advertised) |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    println!(
        "| `sedge edge` (all-in-one, baseline) | idle, joined | {:.1} MiB | {:.1} MiB | 1.00x | {:.2}x |",
        size(&a.sedge),
        mib(idle_all),
        mib(idle_all) / 70.0
    );
    println!(
        "| `sedge-edge` (slim) | idle, joined | {:.1} MiB | {:.1} MiB | {:.2}x | {:.2}x |",
        size(&a.sedge_edge),
        mib(idle),
        idle as f64 / idle_all.max(1) as f64,
        mib(idle) / 70.0
    );
    println!(
        "| `sedge-edge` (slim) | {} pods running | | {:.1} MiB | {:.2}x | {:.2}x |",
        a.resident,
        mib(loaded),
        loaded as f64 / idle_all.max(1) as f64,
        mib(loaded) / 70.0
    );
    println!(
        "\nIdle RSS split: all-in-one {anon_all:.1} MiB anonymous + {file_all:.1} MiB file-backed; slim {anon:.1} MiB anonymous + {file:.1} MiB file-backed\n"
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
    for mut c in [all_in_one, slim] {
        let _ = c.kill();
        let _ = c.wait();
    }
    cloud.shutdown().await;
    server.shutdown().await;
    Ok(())
}
