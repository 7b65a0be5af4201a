//! The whole cloud side at scale: `sedge cloud --embedded` in its own process (API server,
//! cloud core, hub) against thousands of hollow edge agents.
//!
//! A hollow agent is the real edge agent (`sedge_edgecore::EdgeCore`) with the hollow runtime
//! (`runtime: hollow`, kubemark's idea): it joins with a token and gets its own certificate,
//! registers its Node, posts node status and Lease heartbeats on the real intervals, receives
//! its pods (and what they reference) through the channel, stores them in its SQLite, reports
//! them `Running` and acknowledges everything; only its containers run nothing. The agents run
//! in `--fleets` processes of this binary (`scalemark fleet ...`), thousands per process.
//!
//! Phases, each timed, and one table at the end:
//! 1. a write's latency (ConfigMap create) on the idle cloud: the baseline;
//! 2. nodes joined, registered and Ready over time;
//! 3. steady heartbeats: API server writes/s, cloud CPU and RSS, and the same write's latency
//!    under that load (ratio against 1);
//! 4. pods created through the API at `--rate` per second (`--pods-per-node` each) -> `Running`
//!    in the API, seen through a watch: p50/p99/max; the scheduler places them unless `--bind`;
//! 5. `kubectl get nodes` / `kubectl get pods -A` (List + Table) at that size, the SQLite size;
//! 6. mass reconnect: the cloud process is killed (SIGKILL) and started again on the same data;
//!    the time until every agent has a session again and until every Lease was renewed after
//!    the restart, and the objects the hub sent again (only what changed should go out).
//!
//! `make bench-scale` runs 1,000 nodes x 10 pods on the release build.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use sedge_benchmarks::nodes::pct;
use sedge_benchmarks::{cpu_seconds, rss_kib};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Hollow edge nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 10)]
    pods_per_node: usize,
    /// Pods created per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Processes the hollow nodes run in.
    #[arg(long, default_value_t = 4)]
    fleets: usize,
    /// The `sedge` binary whose `sedge cloud --embedded` is measured.
    #[arg(long, default_value = "target/release/sedge")]
    sedge: PathBuf,
    /// Where everything lives (default: a temporary directory, removed at the end). Joined
    /// nodes keep their certificates there, so a second run skips the joins.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the hollow nodes keep their stores (default: `nodes` under `--dir`). On one disk,
    /// 10,000 agents' SQLite files made the fleets wait on I/O (pressure "some" 80%) so long that
    /// their sessions dropped; a tmpfs here (`/dev/shm/...`) stands for each node's own disk.
    #[arg(long)]
    nodes_dir: Option<PathBuf>,
    /// Give each pod its node (`spec.nodeName`) instead of letting the scheduler place it.
    #[arg(long)]
    bind: bool,
    /// The nodes dial the hub over QUIC, one UDP socket on the cloud for all of them, instead of
    /// WebSocket, a descriptor each: under the 20,000-descriptor limit one cloud process holds
    /// fewer than 20,000 WebSocket nodes.
    #[arg(long)]
    quic: bool,
    /// Joins the hub answers per second (`hub.joins_per_second`; 20 by default there).
    /// Raised, a large fleet joins sooner; the joins are kept in `--dir` either way.
    #[arg(long, default_value_t = 20.0)]
    join_rate: f64,
    /// The agents' Lease interval (ms; the real default).
    #[arg(long, default_value_t = 10_000)]
    lease_interval_ms: u64,
    /// Seconds of steady heartbeats measured.
    #[arg(long, default_value_t = 20)]
    steady_s: u64,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 900)]
    phase_timeout_s: u64,
    /// Record a CPU profile of the cloud process (`perf record`, DWARF call graphs) for the
    /// first `--perf-s` seconds of the `--perf-phase` into this file (`perf report -i FILE`).
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Seconds the profile covers.
    #[arg(long, default_value_t = 30)]
    perf_s: u64,
    /// The phase profiled: `nodes` (from a minute after the fleets' start: registration and
    /// turning Ready), `heartbeats` (the steady heartbeats; make `--steady-s` at least `--perf-s`),
    /// `pods` (creation at the fixed rate) or `reconnect` (from the cloud's restart; the hollow
    /// agents' processes are profiled too, as the crowd's own work shares the machine).
    #[arg(long, default_value = "pods", value_parser = ["nodes", "heartbeats", "pods", "reconnect"])]
    perf_phase: String,
}

impl Args {
    /// Thousands of nodes (at least 1): how far apart the checks that read every Node or
    /// Lease are spaced, so the benchmark does not load the cloud it measures.
    fn per_thousand_nodes(&self) -> u64 {
        (self.nodes as u64 / 1000).max(1)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs hollow edge nodes (started by the benchmark itself).
    Fleet(FleetArgs),
}

#[derive(clap::Args, Clone)]
struct FleetArgs {
    /// The hub's address.
    #[arg(long)]
    cloud: String,
    /// A join token good for every node of the fleet.
    #[arg(long)]
    token: String,
    /// Where the nodes keep their data.
    #[arg(long)]
    dir: PathBuf,
    /// The first node's number.
    #[arg(long)]
    from: usize,
    /// Nodes in this fleet.
    #[arg(long)]
    count: usize,
    /// Lease interval (ms).
    #[arg(long, default_value_t = 10_000)]
    lease_interval_ms: u64,
    /// The hub's QUIC address: dial it instead of the WebSocket.
    #[arg(long)]
    quic: Option<String>,
}

fn node_name(i: usize) -> String {
    format!("hollow-{i:06}")
}

const HOLLOW: &str = "sedge.io/hollow=true";

fn hollow_config(f: &FleetArgs, node: &str) -> Result<sedge_edgecore::config::EdgeCoreConfig> {
    let yaml = format!(
        "metaserver_listen: ''\nmetrics_listen: ''\nnode_ip: 127.0.0.1\nruntime: hollow\n\
         lease_interval_ms: {}\ntunnel:\n  node_name: {node}\n  cloud: {}\n  data_dir: {}\n{}",
        f.lease_interval_ms,
        f.cloud,
        f.dir.join(node).display(),
        match &f.quic {
            Some(q) => format!("  transport: quic\n  cloud_quic: {q}\n"),
            None => String::new(),
        }
    );
    Ok(serde_yaml::from_str(&yaml)?)
}

/// Joins (unless it did before) and starts the fleet's nodes, then runs until killed.
async fn fleet(f: FleetArgs) -> Result<()> {
    let names: Vec<String> = (f.from..f.from + f.count).map(node_name).collect();
    // Each node starts as soon as it has joined, so one node's trouble holds back no other.
    // The hub admits `--join-rate` certificate requests a second: one refused for the rate waits and
    // retries; one refused for good (a name that joined before but whose identity is gone from
    // `--dir`, a spent token) ends the fleet with the hub's reason.
    let cores = futures::stream::iter(names.iter().cloned())
        .map(|node| {
            let f = f.clone();
            async move {
                let cfg = hollow_config(&f, &node)?;
                let mut tries = 0;
                while sedge_tunnel::edge::Identity::load(&cfg.tunnel.data_dir).is_err() {
                    match sedge_tunnel::join(&cfg.tunnel, &f.token).await {
                        Ok(_) => break,
                        Err(e) if ["(401", "(403", "(409"].iter().any(|c| e.to_string().contains(c)) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "joining {node}: refused for good (delete --dir to start the fleet over)"
                            )));
                        }
                        Err(e) if tries < 600 => {
                            tries += 1;
                            tracing::debug!(%node, error = %e, "join refused; retrying");
                            tokio::time::sleep(Duration::from_millis(
                                500 + rand::random::<u64>() % 1000,
                            ))
                            .await;
                        }
                        Err(e) => return Err(e).with_context(|| format!("joining {node}")),
                    }
                }
                sedge_edgecore::EdgeCore::start(cfg, Vec::new())
                    .await
                    .with_context(|| format!("starting {node}"))
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    println!("started {}", cores.len());
    std::future::pending::<()>().await;
    Ok(())
}

/// `sedge cloud --embedded` as its own process.
struct Cloud {
    child: Child,
    dir: PathBuf,
    metrics: String,
}

impl Cloud {
    /// `quic`: the hub's UDP address, empty for none.
    fn start(
        sedge: &Path,
        dir: &Path,
        hub: &str,
        quic: &str,
        metrics: &str,
        join_rate: f64,
    ) -> Result<Cloud> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("cloud.log"))?;
        let child = Command::new(sedge)
            .args([
                "cloud",
                "--embedded",
                "--listen",
                hub,
                "--listen-quic",
                quic,
            ])
            .arg("--data-dir")
            .arg(dir.join("cloud"))
            .env("SEDGE_CLOUDCORE_METRICS_LISTEN", metrics)
            .env(
                "SEDGE_CLOUDCORE_HUB_JOINS_PER_SECOND",
                join_rate.to_string(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} cloud", sedge.display()))?;
        Ok(Cloud {
            child,
            dir: dir.to_path_buf(),
            metrics: metrics.into(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("cloud/apiserver/kubeconfig")
    }

    /// A client once the API server answers (the kubeconfig is written at start).
    async fn client(&self, limit: Duration) -> Result<kube::Client> {
        let t0 = Instant::now();
        loop {
            if let Ok(kc) = kube::config::Kubeconfig::read_from(self.kubeconfig())
                && let Ok(cfg) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
                && let Ok(c) = kube::Client::try_from(cfg)
                && c.apiserver_version().await.is_ok()
                && self.metric("sedge_hub_nodes").await.is_some()
            {
                return Ok(c);
            }
            if t0.elapsed() > limit {
                bail!(
                    "the cloud did not come up in {limit:?}; see {}",
                    self.dir.join("cloud.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The cloud's `/metrics` page.
    async fn metrics_text(&self) -> Option<String> {
        metrics_text(&self.metrics).await
    }

    /// One value of the cloud's `/metrics`.
    async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics_text().await?, name)
    }

    /// Several values of the cloud's `/metrics`, from one read of it (0 for a missing one).
    async fn metrics<const N: usize>(&self, names: [&str; N]) -> [f64; N] {
        metrics_at(&self.metrics, names).await
    }

    /// The heartbeat lane: written, replaced by a newer one while waiting, skipped as the
    /// stored object said enough (all since start), waiting now.
    async fn heartbeat_lane(&self) -> [f64; 4] {
        self.metrics([
            "sedge_cloudcore_heartbeats_written_total",
            "sedge_cloudcore_heartbeats_replaced_total",
            "sedge_cloudcore_heartbeats_skipped_total",
            "sedge_cloudcore_heartbeats_pending",
        ])
        .await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hub's reconnect counters since the cloud started: nodes connected, sessions opened,
/// handshakes failed (TLS or hello), connections shed and evicted at the handshake cap.
async fn reconnect_counters(metrics: &str) -> [f64; 5] {
    metrics_at(
        metrics,
        [
            "sedge_hub_nodes_connected",
            "sedge_hub_sessions_opened_total",
            "sedge_hub_handshake_failures_total",
            "sedge_hub_handshakes_shed_total",
            "sedge_hub_handshakes_evicted_total",
        ],
    )
    .await
}

/// Whatever the benchmark ends with, its processes go with it.
impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Fleets(Vec<Child>);

impl Drop for Fleets {
    fn drop(&mut self) {
        for f in &mut self.0 {
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// p50 / p99 / max (ms) of `v` (seconds), as a table cell.
fn dist(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        pct(v, 0.5) * 1e3,
        pct(v, 0.99) * 1e3,
        max * 1e3
    )
}

/// Where the CPU goes during a phase: the cloud process, the hollow agents' fleets and the whole
/// machine (the agents share it with the cloud, so a busy machine slows pods on both sides).
struct CpuShares {
    cloud: f64,
    fleets: f64,
    machine: (f64, f64),
    at: Instant,
}

impl CpuShares {
    fn now(cloud: u32, fleets: &[u32]) -> CpuShares {
        CpuShares {
            cloud: cpu_seconds(Some(cloud)),
            fleets: fleets.iter().map(|&p| cpu_seconds(Some(p))).sum(),
            machine: sedge_benchmarks::machine_cpu_seconds(),
            at: Instant::now(),
        }
    }

    /// `cloud / agents` as % of a core, and the machine's busy share, since `self`.
    fn since(&self, cloud: u32, fleets: &[u32]) -> String {
        let now = CpuShares::now(cloud, fleets);
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let (busy, total) = (
            now.machine.0 - self.machine.0,
            (now.machine.1 - self.machine.1).max(1e-9),
        );
        format!(
            "{:.0}% / {:.0}% of a core; machine {:.0}% busy (all {} cores)",
            (now.cloud - self.cloud) / secs * 100.0,
            (now.fleets - self.fleets) / secs * 100.0,
            busy / total * 100.0,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )
    }
}

/// The cloud's load over `secs`: `writes` API writes, `cpu_s` CPU seconds, and its RSS.
fn load(writes: u64, cpu_s: f64, secs: f64, rss_mib: f64) -> String {
    format!(
        "{:.0}/s, {:.0}% of a core ({:.2} ms of CPU per write), {rss_mib:.0} MiB",
        writes as f64 / secs,
        cpu_s / secs * 100.0,
        cpu_s * 1000.0 / (writes.max(1) as f64)
    )
}

/// `perf record` of process `pid` for `a.perf_s` seconds into `a.perf`, if profiling `phase`.
fn profile(a: &Args, phase: &str, pids: &[u32]) -> Result<Option<Child>> {
    let Some(out) = a.perf.as_ref().filter(|_| a.perf_phase == phase) else {
        return Ok(None);
    };
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args(["record", "-F", "99", "--call-graph", "dwarf,16384", "-p"])
        .arg(pids.join(","))
        .arg("-o")
        .arg(out)
        .args(["--", "sleep", &a.perf_s.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf record (install linux-perf)")?;
    Ok(Some(child))
}

/// `n` ConfigMap creates one after another: their latencies (s); the objects are deleted.
async fn write_latency(client: &kube::Client, tag: &str, n: usize) -> Result<Vec<f64>> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": format!("probe-{tag}-{i}")}, "data": {"k": "v"}
        }))?;
        let t = Instant::now();
        cms.create(&PostParams::default(), &cm).await?;
        out.push(t.elapsed().as_secs_f64());
        cms.delete(&format!("probe-{tag}-{i}"), &DeleteParams::default())
            .await?;
    }
    Ok(out)
}

fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The API server's current revision (every write bumps it).
async fn revision(client: &kube::Client) -> Result<u64> {
    let l = Api::<ConfigMap>::namespaced(client.clone(), "default")
        .list_metadata(&ListParams::default().limit(1))
        .await?;
    Ok(l.metadata
        .resource_version
        .unwrap_or_default()
        .parse()
        .unwrap_or(0))
}

/// Cloud process samples: (peak RSS KiB, CPU seconds at the start of the window).
struct Sampler {
    peak_kib: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak_kib = Arc::new(Mutex::new(0));
        let p = peak_kib.clone();
        let task = tokio::spawn(async move {
            loop {
                let r = rss_kib(Some(pid));
                {
                    let mut m = p.lock().unwrap();
                    *m = (*m).max(r);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Sampler { peak_kib, task }
    }
    fn peak_mib(&self) -> f64 {
        *self.peak_kib.lock().unwrap() as f64 / 1024.0
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".db"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The `/metrics` page served at `addr`.
async fn metrics_text(addr: &str) -> Option<String> {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Several values of the `/metrics` page at `addr`, from one read of it (0 for a missing one).
async fn metrics_at<const N: usize>(addr: &str, names: [&str; N]) -> [f64; N] {
    let text = metrics_text(addr).await.unwrap_or_default();
    names.map(|name| metric_value(&text, name).unwrap_or(0.0))
}

/// The value of `name` in a Prometheus text page.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// The API server's store counters from its `/metrics` (through kubectl): writes committed and
/// WAL fsyncs; zeros without kubectl.
fn store_counts(kubeconfig: &Path) -> (f64, f64) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "--raw", "/metrics"])
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return (0.0, 0.0),
    };
    let value = |name| metric_value(&text, name).unwrap_or(0.0);
    (
        value("sedge_apiserver_store_commits_total"),
        value("sedge_apiserver_store_fsyncs_total"),
    )
}

/// "N commits per fsync" between two [`store_counts`].
fn per_fsync(before: (f64, f64), after: (f64, f64)) -> String {
    let (commits, syncs) = (after.0 - before.0, after.1 - before.1);
    format!(
        "{:.0} commits, {:.0} fsyncs: {:.1} commits per fsync",
        commits,
        syncs,
        commits / syncs.max(1.0)
    )
}

/// Median seconds of `kubectl ARGS` (3 runs) and the lines it printed, or why it could not run.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<(f64, usize), String> {
    let mut times = Vec::new();
    let mut lines = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .map_err(|e| format!("kubectl not found ({e})"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            eprintln!("kubectl {}: {why}", args.join(" "));
            return Err(format!("failed: {}", why.lines().last().unwrap_or("")));
        }
        times.push(t.elapsed().as_secs_f64());
        lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    }
    Ok((pct(&mut times, 0.5), lines))
}

struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, what: &str, value: String) {
        println!("  {what}: {value}");
        self.0.push((what.into(), value));
    }
}

/// Phase 4: `nodes x pods_per_node` pods created at `a.rate`; how long each took to run.
async fn pods_phase(
    a: &Args,
    client: &kube::Client,
    cloud: &Cloud,
    sampler: &Sampler,
    fleets: &[u32],
    limit: Duration,
    t: &mut Table,
) -> Result<()> {
    let kc = &cloud.kubeconfig();
    let total = a.nodes * a.pods_per_node;
    // A namespace of its own: a --dir kept from an earlier run still holds that run's pods.
    let ns = format!(
        "scale-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let running: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let bound: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    // Wall clocks (the agents run on this machine): when the binding was seen, the pod's
    // `status.startTime` (set by its node when it started the pod, whole seconds) and when
    // `Running` was seen. They split bound -> Running into delivery and the report back.
    let walls: Arc<Mutex<std::collections::HashMap<String, [Option<f64>; 3]>>> = Arc::default();
    let (seen, seen_bound, seen_walls) = (running.clone(), bound.clone(), walls.clone());
    let w = tokio::spawn({
        let pods = pods.clone();
        async move {
            let stream = watcher(pods, watcher::Config::default().labels("bench=scale"))
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(p)) = stream.next().await {
                let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                let wall = |w: &mut Option<f64>| {
                    w.get_or_insert_with(|| {
                        SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64()
                    });
                };
                if on_node.is_some_and(|n| !n.is_empty()) {
                    seen_bound
                        .lock()
                        .unwrap()
                        .entry(p.metadata.name.clone().unwrap_or_default())
                        .or_insert_with(Instant::now);
                    let mut walls = seen_walls.lock().unwrap();
                    let w = walls
                        .entry(p.metadata.name.clone().unwrap_or_default())
                        .or_default();
                    wall(&mut w[0]);
                }
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    let mut walls = seen_walls.lock().unwrap();
                    let w = walls
                        .entry(p.metadata.name.clone().unwrap_or_default())
                        .or_default();
                    if let Some(t) = p.status.as_ref().and_then(|s| s.start_time.as_ref()) {
                        w[1].get_or_insert(t.0.as_second() as f64);
                    }
                    wall(&mut w[2]);
                    drop(walls);
                    let name = p.metadata.name.unwrap_or_default();
                    seen.lock()
                        .unwrap()
                        .entry(name)
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let created: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let store0 = store_counts(kc);
    let (rv0, cpu0, t_pods) = (
        revision(client).await?,
        cpu_seconds(Some(cloud.pid())),
        Instant::now(),
    );
    let profiler = profile(a, "pods", &[cloud.pid()])?;
    let shares = CpuShares::now(cloud.pid(), fleets);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut errors = 0usize;
    let mut creates = Vec::with_capacity(total);
    for i in 0..total {
        let at = t_pods + Duration::from_secs_f64(i as f64 / a.rate);
        tokio::time::sleep_until(at.into()).await;
        let permit = sem.clone().acquire_owned().await?;
        let (pods, created, bind) = (pods.clone(), created.clone(), a.bind);
        let node = node_name(i % a.nodes);
        creates.push(tokio::spawn(async move {
            let _p = permit;
            let name = format!("scale-{i:07}");
            let mut spec = json!({"terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]});
            if bind {
                spec["nodeName"] = json!(node);
            }
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"bench": "scale"}}, "spec": spec
            }))
            .expect("a pod");
            let t = Instant::now();
            let r = pods.create(&PostParams::default(), &pod).await;
            created.lock().unwrap().push((name, t));
            r.map(drop)
        }));
    }
    for c in creates {
        if !matches!(c.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    let create_s = t_pods.elapsed().as_secs_f64();
    let _ = wait_until(
        "every pod Running",
        limit,
        Duration::from_millis(250),
        || {
            let n = running.lock().unwrap().len();
            async move { Ok(n + errors >= total) }
        },
    )
    .await;
    let all_s = t_pods.elapsed().as_secs_f64();
    if let Some(mut p) = profiler {
        tokio::task::spawn_blocking(move || p.wait()).await??;
    }
    let (rv1, cpu1) = (revision(client).await?, cpu_seconds(Some(cloud.pid())));
    let cpu_where = shares.since(cloud.pid(), fleets);
    w.abort();
    let (mut lat, mut to_bind, mut to_run) = {
        let (run, bound) = (running.lock().unwrap(), bound.lock().unwrap());
        let created = created.lock().unwrap();
        let since = |at: &std::collections::HashMap<String, Instant>,
                     from: &dyn Fn(&str) -> Option<Instant>|
         -> Vec<f64> {
            created
                .iter()
                .filter_map(|(n, _)| {
                    Some(at.get(n)?.saturating_duration_since(from(n)?).as_secs_f64())
                })
                .collect()
        };
        let created_at: std::collections::HashMap<&str, Instant> =
            created.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        (
            since(&run, &|n| created_at.get(n).copied()),
            since(&bound, &|n| created_at.get(n).copied()),
            since(&run, &|n| bound.get(n).copied()),
        )
    };
    t.row(
        "pods created (achieved rate), create errors",
        format!(
            "{total} in {create_s:.1} s ({:.1}/s), {errors}",
            total as f64 / create_s
        ),
    );
    t.row(
        &format!(
            "pod start-up, create -> Running (p50 / p99 / max; {})",
            if a.bind { "bound" } else { "scheduled" }
        ),
        format!("{} ({} of {total} Running)", dist(&mut lat), lat.len()),
    );
    if !a.bind {
        t.row(
            "  of which create -> bound / bound -> Running (p50 / p99 / max)",
            format!("{} / {}", dist(&mut to_bind), dist(&mut to_run)),
        );
    }
    // bound -> Running split at the node's start time (whole seconds: +-1 s).
    let (mut deliver, mut report): (Vec<f64>, Vec<f64>) = walls
        .lock()
        .unwrap()
        .values()
        .filter_map(|w| match w {
            [Some(b), Some(s), Some(r)] => Some(((s - b.floor()).max(0.0), (r - s).max(0.0))),
            _ => None,
        })
        .unzip();
    t.row(
        "  bound -> started on the node / started -> Running seen (p50 / p99 / max; 1 s resolution)",
        format!("{} / {}", dist(&mut deliver), dist(&mut report)),
    );
    t.row(
        "while creating: API writes/s, cloud CPU, cloud peak RSS",
        load(rv1 - rv0, cpu1 - cpu0, all_s, sampler.peak_mib()),
    );
    t.row("  CPU while creating: cloud / hollow agents", cpu_where);
    t.row(
        "  API server store while creating (group commit)",
        per_fsync(store0, store_counts(kc)),
    );
    if !a.bind {
        let [passes, bound, conflicts] = cloud
            .metrics([
                "sedge_cloudcore_scheduler_passes_total",
                "sedge_cloudcore_scheduler_bindings_total",
                "sedge_cloudcore_scheduler_binding_conflicts_total",
            ])
            .await;
        t.row(
            "scheduler: passes with pods to place, bindings, refused as bound already",
            format!("{passes:.0}, {bound:.0}, {conflicts:.0}"),
        );
    }
    Ok(())
}

/// Checks `done` every `every` until it holds; how long that took.
async fn wait_until<F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: F,
) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let t0 = Instant::now();
    loop {
        if done().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(Cmd::Fleet(f)) = a.cmd {
        return fleet(f).await;
    }
    if !a.sedge.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p sedge` (or pass --sedge)",
            a.sedge.display()
        );
    }
    if a.nodes == 0 || a.fleets == 0 || a.rate <= 0.0 {
        bail!("--nodes, --fleets and --rate must be positive");
    }
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let limit = Duration::from_secs(a.phase_timeout_s);
    let hub = format!("127.0.0.1:{}", sedge_benchmarks::free_port()?);
    let metrics = format!("127.0.0.1:{}", sedge_benchmarks::free_port()?);
    let quic = if a.quic {
        format!("127.0.0.1:{}", sedge_benchmarks::free_port()?)
    } else {
        String::new()
    };
    let mut cloud = Cloud::start(&a.sedge, &dir, &hub, &quic, &metrics, a.join_rate)?;
    let client = cloud.client(Duration::from_secs(60)).await?;
    let mut t = Table(Vec::new());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scalemark: {} hollow nodes over {} in {} processes, {} pods each at {}/s, {} CPUs; data in {}",
        a.nodes,
        if a.quic { "QUIC" } else { "WebSocket" },
        a.fleets,
        a.pods_per_node,
        a.rate,
        cores,
        dir.display()
    );

    // 1. The baseline: a write on the idle cloud.
    let mut idle = write_latency(&client, "idle", 30).await?;
    t.row("write (ConfigMap create), idle cloud", dist(&mut idle));

    // 2. Nodes join, register and turn Ready.
    let out = Command::new(&a.sedge)
        .args([
            "token",
            "create",
            "--ttl",
            "4h",
            "--description",
            "scalemark",
        ])
        .arg("--max-uses")
        .arg(a.nodes.to_string())
        .arg("--data-dir")
        .arg(dir.join("cloud/cloudhub"))
        .arg("--pki-dir")
        .arg(dir.join("cloud/apiserver/pki"))
        .output()?;
    if !out.status.success() {
        bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let me = std::env::current_exe()?;
    let per = a.nodes.div_ceil(a.fleets);
    let mut fleets = Fleets(Vec::new());
    let t_nodes = Instant::now();
    for k in 0..a.fleets {
        let from = k * per;
        let count = per.min(a.nodes.saturating_sub(from));
        if count == 0 {
            break;
        }
        fleets.0.push(
            Command::new(&me)
                .args(["fleet", "--cloud", &hub, "--token", &token])
                .arg("--dir")
                .arg(a.nodes_dir.clone().unwrap_or_else(|| dir.join("nodes")))
                .args(["--from", &from.to_string(), "--count", &count.to_string()])
                .args(["--lease-interval-ms", &a.lease_interval_ms.to_string()])
                .args(if a.quic {
                    vec!["--quic", &quic]
                } else {
                    vec![]
                })
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("fleet-{k}.log")))?,
                )
                .spawn()?,
        );
    }
    // The node phase's profile starts after the first minute: past the joins' handshakes, at
    // what keeps nodes from turning Ready.
    let mut nodes_profiler = None;
    let nodes_api = Api::<Node>::all(client.clone());
    let hollow = ListParams::default().labels(HOLLOW);
    // Every minute, where the node phase stands (a slow phase says where it is slow).
    let mut next_progress = Duration::from_secs(60);
    let mut written_before = 0.0;
    let mut marks = [(0.25, None), (0.5, None), (0.75, None), (1.0, None)];
    let mut all_ready = None;
    // The Nodes are listed every `every` only: listing 10,000 Nodes (35 MB of JSON) each second
    // took 40% of the cloud's CPU in this phase's profile, taking it from the heartbeats measured.
    // The hub's count of connected nodes (a metric) is read each second.
    let every = Duration::from_secs(a.per_thousand_nodes());
    let (mut registered, mut ready_n, mut listed) = (0, 0, None::<Instant>);
    while all_ready.is_none() {
        if listed.is_none_or(|at| at.elapsed() >= every) {
            let list = nodes_api.list(&hollow).await?;
            registered = list.items.len();
            ready_n = list.items.iter().filter(|n| ready(n)).count();
            listed = Some(Instant::now());
        }
        for (f, at) in marks.iter_mut() {
            if at.is_none() && registered as f64 >= *f * a.nodes as f64 {
                *at = Some(t_nodes.elapsed());
                println!(
                    "  {:.0}% registered after {:.1} s ({ready_n} Ready)",
                    *f * 100.0,
                    t_nodes.elapsed().as_secs_f64()
                );
            }
        }
        for (k, fleet) in fleets.0.iter_mut().enumerate() {
            if let Some(status) = fleet.try_wait()? {
                let log = dir.join(format!("fleet-{k}.log"));
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "fleet {k} (its nodes: {}) exited ({status}) with {registered} of {} nodes registered; {}:\n{}",
                    node_name(k * per),
                    a.nodes,
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        // With a --dir kept from an earlier run, the Nodes are still Ready from then: only
        // every node connected to this cloud counts.
        let connected = cloud
            .metric("sedge_hub_nodes_connected")
            .await
            .unwrap_or(0.0);
        if t_nodes.elapsed() >= next_progress {
            let [written, replaced, _, waiting] = cloud.heartbeat_lane().await;
            println!(
                "  after {:.0} s: {registered} registered, {ready_n} Ready, {connected:.0} connected; heartbeats written {:.0}/s over the last minute, replaced {replaced:.0} (since start), waiting {waiting:.0}",
                t_nodes.elapsed().as_secs_f64(),
                (written - written_before) / 60.0
            );
            written_before = written;
            next_progress += Duration::from_secs(60);
            if nodes_profiler.is_none() {
                nodes_profiler = profile(&a, "nodes", &[cloud.pid()])?;
            }
        }
        if ready_n == a.nodes && connected >= a.nodes as f64 {
            all_ready = Some(t_nodes.elapsed());
        } else if t_nodes.elapsed() > limit {
            let (commits, fsyncs) = store_counts(&cloud.kubeconfig());
            let [written, replaced, _, waiting] = cloud.heartbeat_lane().await;
            println!(
                "  at the limit: heartbeats written {written:.0}, replaced while waiting {replaced:.0}, waiting now {waiting:.0}; API store {commits:.0} commits, {fsyncs:.0} fsyncs",
            );
            // Nearly there: the later phases are still worth measuring (and say so).
            if ready_n * 100 >= a.nodes * 99 && connected * 100.0 >= a.nodes as f64 * 99.0 {
                t.row(
                    "NODE PHASE INCOMPLETE: at its limit, Ready / connected",
                    format!("{ready_n} / {connected:.0} of {}", a.nodes),
                );
                break;
            }
            bail!(
                "{registered} of {} nodes registered, {ready_n} Ready after {limit:?}",
                a.nodes
            );
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if let Some(mut p) = nodes_profiler {
        let _ = p.wait();
    }
    let half = marks[1].1.unwrap_or_default().as_secs_f64();
    t.row(
        "nodes registered: 50% / 100%; all Ready",
        format!(
            "{half:.1} s / {:.1} s; {} (joins throttled to {}/s by the hub; Nodes listed every {} s)",
            marks[3].1.unwrap_or_default().as_secs_f64(),
            match all_ready {
                Some(d) => format!("{:.1} s", d.as_secs_f64()),
                None => "not within the phase's limit".into(),
            },
            a.join_rate,
            every.as_secs()
        ),
    );

    // 3. Steady heartbeats.
    let sampler = Sampler::start(cloud.pid());
    let hb_profiler = profile(&a, "heartbeats", &[cloud.pid()])?;
    let kc = cloud.kubeconfig();
    let store0 = store_counts(&kc);
    let pids: Vec<u32> = fleets.0.iter().map(Child::id).collect();
    let shares = CpuShares::now(cloud.pid(), &pids);
    let (rv0, cpu0, w0) = (
        revision(&client).await?,
        cpu_seconds(Some(cloud.pid())),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(a.steady_s)).await;
    if let Some(mut p) = hb_profiler {
        let _ = p.wait();
    }
    let (rv1, cpu1, dt) = (
        revision(&client).await?,
        cpu_seconds(Some(cloud.pid())),
        w0.elapsed().as_secs_f64(),
    );
    t.row(
        "steady heartbeats: API writes/s, cloud CPU, cloud RSS",
        load(
            rv1 - rv0,
            cpu1 - cpu0,
            dt,
            rss_kib(Some(cloud.pid())) as f64 / 1024.0,
        ),
    );
    t.row(
        "  CPU during those heartbeats: cloud / hollow agents",
        shares.since(cloud.pid(), &pids),
    );
    t.row(
        "  API server store during those heartbeats (group commit)",
        per_fsync(store0, store_counts(&kc)),
    );
    let [written, replaced, skipped, waiting] = cloud.heartbeat_lane().await;
    t.row(
        "  heartbeats written / replaced by a newer one while waiting / not written, the stored one said enough (since start)",
        format!("{written:.0} / {replaced:.0} / {skipped:.0}"),
    );
    let [allocated, active, resident, retained, rss] = cloud
        .metrics([
            "sedge_allocator_allocated_bytes",
            "sedge_allocator_active_bytes",
            "sedge_allocator_resident_bytes",
            "sedge_allocator_retained_bytes",
            "sedge_process_resident_memory_bytes",
        ])
        .await;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    t.row(
        "  cloud memory: RSS / jemalloc allocated / active / resident / retained (MiB), heartbeats waiting",
        format!(
            "{:.0} / {:.0} / {:.0} / {:.0} / {:.0}, {:.0}",
            mib(rss),
            mib(allocated),
            mib(active),
            mib(resident),
            mib(retained),
            waiting
        ),
    );
    let mut loaded = write_latency(&client, "loaded", 30).await?;
    let (p_idle, p_loaded) = (pct(&mut idle, 0.5), pct(&mut loaded, 0.5));
    t.row(
        "write under heartbeats (x idle p50)",
        format!(
            "{} ({:.2}x)",
            dist(&mut loaded),
            p_loaded / p_idle.max(1e-9)
        ),
    );
    let fleets_rss = || {
        let kib: u64 = fleets.0.iter().map(|c| rss_kib(Some(c.id()))).sum();
        format!(
            "{:.0} MiB, {:.0} KiB",
            kib as f64 / 1024.0,
            kib as f64 / a.nodes as f64
        )
    };
    t.row("hollow agents' RSS (all fleets, per node)", fleets_rss());

    // 4. Pods at a fixed rate.
    if a.pods_per_node > 0 {
        pods_phase(&a, &client, &cloud, &sampler, &pids, limit, &mut t).await?;
        // Every pod running and nothing changing: what the pods alone cost the agents (a
        // pod's task that woke every 500 ms to poll was most of it).
        let shares = CpuShares::now(cloud.pid(), &pids);
        tokio::time::sleep(Duration::from_secs(a.steady_s)).await;
        t.row(
            "CPU with every pod running, heartbeats only: cloud / hollow agents",
            shares.since(cloud.pid(), &pids),
        );
        t.row(
            "hollow agents' RSS with every pod running (all fleets, per node)",
            fleets_rss(),
        );
    } else {
        t.row("pods", "none created (--pods-per-node 0)".into());
    }

    // 5. Reading it back at that size.
    // kubectl lists in pages of 500 and throttles itself to 5 requests a second after a
    // burst of 10 (client-go's defaults, whatever the server): at 50,000 pods that wait is
    // most of `get pods -A`, and at 20,000 nodes most of `get nodes` (measured: 6.7 s, of
    // which the server's 40 pages are 0.9 s). One page is the server's whole cost.
    for args in [
        &["get", "nodes"][..],
        &["get", "nodes", "--chunk-size=0"],
        &["get", "pods", "-A"],
        &["get", "pods", "-A", "--chunk-size=0"],
    ] {
        let value = match kubectl(&kc, args) {
            Ok((secs, lines)) => format!("{secs:.2} s ({lines} lines)"),
            Err(why) => why,
        };
        t.row(&format!("kubectl {} (median of 3)", args.join(" ")), value);
    }
    t.row(
        "API server SQLite",
        format!(
            "{:.0} MiB",
            dir_size(&dir.join("cloud/apiserver")) as f64 / 1048576.0
        ),
    );

    // 6. Mass reconnect after the cloud is killed.
    drop(sampler);
    cloud.kill();
    let restarted_wall = SystemTime::now();
    let t_restart = Instant::now();
    cloud = Cloud::start(&a.sedge, &dir, &hub, &quic, &metrics, a.join_rate)?;
    let reconnect_profiler = profile(&a, "reconnect", &[&[cloud.pid()], &pids[..]].concat())?;
    let client = cloud.client(Duration::from_secs(120)).await?;
    let up = t_restart.elapsed();
    let n = a.nodes as f64;
    // What the hub did with the crowd, printed every 10 s while it reconnects: sessions opened,
    // handshakes that failed or timed out (hellos included), connections shed or evicted at the
    // cap on pending handshakes.
    let progress = {
        let metrics = cloud.metrics.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let [c, opened, failed, shed, evicted] = reconnect_counters(&metrics).await;
                eprintln!(
                    "  reconnect {:>4.0} s: {c:.0} connected; sessions opened {opened:.0}, \
                     handshakes failed {failed:.0}, shed {shed:.0}, evicted {evicted:.0}",
                    started.elapsed().as_secs_f64() + up.as_secs_f64()
                );
            }
        })
    };
    let connected = wait_until(
        "every node connected again",
        limit,
        Duration::from_millis(250),
        || {
            let c = &cloud;
            async move { Ok(c.metric("sedge_hub_nodes_connected").await.unwrap_or(0.0) >= n) }
        },
    )
    .await?
        + up;
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    // Every Lease is read each time: at 10,000 nodes (7 MB of JSON) every 250 ms would load the
    // cloud whose recovery is measured, so the check runs every 250 ms per 1,000 nodes.
    let every = Duration::from_millis(250 * a.per_thousand_nodes());
    let renewed = wait_until(
        "every Lease renewed after the restart",
        limit,
        every,
        || {
            let leases = leases.clone();
            async move {
                let l = leases.list(&ListParams::default()).await?;
                let after = l
                    .items
                    .iter()
                    .filter(|l| {
                        l.metadata
                            .name
                            .as_deref()
                            .is_some_and(|n| n.starts_with("hollow-"))
                    })
                    .filter(|l| {
                        l.spec
                            .as_ref()
                            .and_then(|s| s.renew_time.as_ref())
                            .is_some_and(|r| SystemTime::from(r.0) >= restarted_wall)
                    })
                    .count();
                Ok(after >= a.nodes)
            }
        },
    )
    .await?
        + connected; // counted from the restart, as the other two
    progress.abort();
    if let Some(mut p) = reconnect_profiler {
        let _ = p.wait();
    }
    let [_, opened, failed, shed, evicted] = reconnect_counters(&cloud.metrics).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = cloud
        .metric("sedge_hub_messages_sent_total")
        .await
        .unwrap_or(-1.0);
    t.row(
        "mass reconnect after kill -9: cloud up / all connected / all Leases renewed",
        format!(
            "{:.1} s / {:.1} s / {:.1} s",
            up.as_secs_f64(),
            connected.as_secs_f64(),
            renewed.as_secs_f64()
        ),
    );
    t.row(
        "reconnect: sessions opened / handshakes failed / shed / evicted",
        format!("{opened:.0} / {failed:.0} / {shed:.0} / {evicted:.0}"),
    );
    t.row(
        "objects the hub sent again after the restart (of the nodes' pods)",
        format!("{sent:.0} (of {})", a.nodes * a.pods_per_node),
    );

    drop(cloud);
    drop(fleets);
    println!();
    println!("| measure | {} nodes x {} pods |", a.nodes, a.pods_per_node);
    println!("|---|---|");
    for (k, v) in &t.0 {
        println!("| {k} | {v} |");
    }
    Ok(())
}
