//! Pods as containers against pods as processes, in one run: pod start-up (create through the API
//! -> `Running` seen by a watch) p50/p99 over `--pods` pods one after another on a CRI node (a
//! private containerd) and on a process-runtime node, then each agent's RSS with `--resident` pods
//! running, and containerd's own RSS (the daemon and its shims) next to it.
//!
//! Needs root and containerd (`make cri`); `make bench-cri` builds the agent and runs it. The API
//! server and the cloud core run in this process; each agent is its own process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sedge_benchmarks::nodes::{self, agent, pct, wait_running};
use sedge_testkit::containerd::Containerd;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Pods for the start-up latency run, per runtime.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods kept running per node for the footprint.
    #[arg(long, default_value_t = 20)]
    resident: usize,
    /// The edge agent (`sedge-edge`, or `sedge` with `--subcommand edge`).
    #[arg(long, default_value = "target/release/sedge-edge")]
    agent: PathBuf,
    /// A subcommand to put before the agent's flags (`edge` for the all-in-one `sedge`).
    #[arg(long)]
    subcommand: Option<String>,
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"bench": node}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "3600"]}]}
    }))
    .unwrap()
}

/// Start-up latencies (ms) of `n` pods on `node`, one at a time; the first `resident` stay.
async fn run(pods: &Api<Pod>, node: &str, n: usize, resident: usize) -> Result<Vec<f64>> {
    let mut lat = Vec::new();
    for i in 0..n {
        let name = format!("{node}-p{i}");
        let t = Instant::now();
        pods.create(&PostParams::default(), &pod(&name, node))
            .await?;
        wait_running(pods, &name, Duration::from_secs(60)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if i >= resident {
            pods.delete(&name, &DeleteParams::default()).await?;
        }
    }
    // Let the deletes finish, leaving `resident` pods running.
    let t0 = Instant::now();
    let lp = ListParams::default().labels(&format!("bench={node}"));
    while pods.list(&lp).await?.items.len() > resident && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(lat)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if !a.agent.exists() {
        bail!(
            "{} not found: `cargo build --release -p sedge-edge` (or pass --agent)",
            a.agent.display()
        );
    }
    let ctd = Containerd::start().map_err(|e| anyhow::anyhow!("containerd: {e}"))?;
    ctd.import_test_images().map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let (server, client, cloud) = nodes::cloud(dir.path()).await?;
    let (token, _) =
        cloud
            .hub
            .tokens()
            .create_with(Duration::from_secs(300), "crimark", 2, None)?;
    let hub = cloud.hub.addr().to_string();
    let mut argv: Vec<&std::ffi::OsStr> = vec![a.agent.as_os_str()];
    if let Some(s) = &a.subcommand {
        argv.push(s.as_ref());
    }
    let mut proc_agent = agent(dir.path(), &hub, &token, "edge-proc", &argv, "")?;
    let mut cri_agent = agent(
        dir.path(),
        &hub,
        &token,
        "edge-cri",
        &argv,
        &format!("runtime: cri\ncri_socket: {}\n", ctd.socket.display()),
    )?;
    nodes::wait_registered(&client, &["edge-proc", "edge-cri"]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = (
        sedge_benchmarks::rss_kib(Some(proc_agent.id())),
        sedge_benchmarks::rss_kib(Some(cri_agent.id())),
    );
    let ctd_idle = ctd
        .pid()
        .map(|p| sedge_benchmarks::rss_kib(Some(p)))
        .unwrap_or(0);

    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let mut proc_lat = run(&pods, "edge-proc", a.pods, a.resident).await?;
    let mut cri_lat = run(&pods, "edge-cri", a.pods, a.resident).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = (
        sedge_benchmarks::rss_kib(Some(proc_agent.id())),
        sedge_benchmarks::rss_kib(Some(cri_agent.id())),
    );
    let ctd_loaded = ctd
        .pid()
        .map(|p| sedge_benchmarks::rss_kib(Some(p)))
        .unwrap_or(0);
    let shims = ctd.shim_pids();
    let shims_kib: u64 = shims
        .iter()
        .map(|p| sedge_benchmarks::rss_kib(Some(*p)))
        .sum();

    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "\nPod start-up: create through the API -> `Running` seen by a watch ({} pods per runtime, one at a time, busybox `sleep`)\n",
        a.pods
    );
    println!("| runtime | p50 | p99 | max | p50 vs process runtime |");
    println!("|---|---:|---:|---:|---:|");
    let (p50, p99, pmax) = (
        pct(&mut proc_lat.clone(), 0.5),
        pct(&mut proc_lat.clone(), 0.99),
        pct(&mut proc_lat, 1.0),
    );
    let (c50, c99, cmax) = (
        pct(&mut cri_lat.clone(), 0.5),
        pct(&mut cri_lat.clone(), 0.99),
        pct(&mut cri_lat, 1.0),
    );
    println!("| process (baseline) | {p50:.1} ms | {p99:.1} ms | {pmax:.1} ms | 1.00x |");
    println!(
        "| CRI ({}) | {c50:.1} ms | {c99:.1} ms | {cmax:.1} ms | {:.2}x |",
        Api::<Node>::all(client.clone())
            .get("edge-cri")
            .await?
            .status
            .and_then(|s| s.node_info)
            .map(|i| i.container_runtime_version)
            .unwrap_or_default(),
        c50 / p50.max(1e-6)
    );
    println!("\nMemory (RSS), same run\n");
    println!("| process | idle | {} pods running |", a.resident);
    println!("|---|---:|---:|");
    println!(
        "| agent, process runtime | {:.1} MiB | {:.1} MiB |",
        mib(idle.0),
        mib(loaded.0)
    );
    println!(
        "| agent, CRI runtime | {:.1} MiB | {:.1} MiB |",
        mib(idle.1),
        mib(loaded.1)
    );
    println!(
        "| containerd (daemon) | {:.1} MiB | {:.1} MiB |",
        mib(ctd_idle),
        mib(ctd_loaded)
    );
    println!(
        "| containerd shims ({} processes, one per sandbox) | | {:.1} MiB ({:.1} MiB each) |",
        shims.len(),
        mib(shims_kib),
        mib(shims_kib) / shims.len().max(1) as f64
    );

    let _ = pods
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let t0 = Instant::now();
    while !pods.list(&Default::default()).await?.items.is_empty()
        && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in [&mut proc_agent, &mut cri_agent] {
        let _ = c.kill();
        let _ = c.wait();
    }
    cloud.shutdown().await;
    server.shutdown().await;
    drop(ctd);
    Ok(())
}
