//! API server benchmark: creates/s, gets/s, list latency over 10k objects, and watch fan-out to
//! 100 watchers, through HTTPS with the `kube` client (what controllers see), each next to the
//! same operation on the store directly in this process (the baseline the ratio is against).
//! Creates and gets are also made as a user bound to `edit` (every request goes through RBAC)
//! next to the same as `system:masters` (no rule is evaluated): the cost of authorization.
//! Merge patches go through HTTPS and then through the in-memory transport the embedded cloud
//! core uses (`ApiServer::local_service`), with the process's CPU per write: the transport's cost.
//!
//! `cargo run --release -p sedge-benchmarks --bin apiserver [-- --objects 10000 --watchers 100]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use sedge_apiserver::store::{Change, Durability, Store, StoreConfig, StoreError};
use sedge_apiserver::{ApiServer, ApiServerConfig};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Objects created (and then listed).
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent clients for creates and gets.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Watchers for the fan-out test.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Updates pushed to the watchers.
    #[arg(long, default_value_t = 500)]
    updates: usize,
}

struct Row {
    what: String,
    n: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    baseline: Option<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn row(what: &str, mut lat: Vec<f64>, secs: f64, baseline: Option<f64>) -> Row {
    lat.sort_by(|a, b| a.total_cmp(b));
    Row {
        what: what.into(),
        n: lat.len(),
        secs,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        baseline,
    }
}

fn cm(name: &str) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.data = Some([("payload".to_string(), "x".repeat(256))].into());
    c
}

async fn client(server: &ApiServer) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// The bearer token of the benchmark's RBAC user (`bench`, bound to `edit` in `default`).
const USER_TOKEN: &str = "bench-user-token";

async fn start(dir: &std::path::Path, durability: Durability) -> Result<ApiServer> {
    let tokens = dir.join("bench-tokens.csv");
    std::fs::write(
        &tokens,
        format!(
            "bench-admin-token,sedge-admin,sedge-admin,\"system:masters\"\n{USER_TOKEN},bench,bench\n"
        ),
    )?;
    let cfg = ApiServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        durability,
        history_events: 100_000,
        token_file: Some(tokens),
        ..ApiServerConfig::default()
    };
    Ok(ApiServer::start(cfg).await?)
}

/// A client as the `bench` user, after binding it to `edit` in `default`.
async fn rbac_client(server: &ApiServer, admin: &kube::Client) -> Result<kube::Client> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bench-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bench"}]
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &binding)
        .await?;
    let text =
        std::fs::read_to_string(&server.kubeconfig)?.replace(&server.admin_token, USER_TOKEN);
    let path = server.kubeconfig.with_extension("bench");
    std::fs::write(&path, text)?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Runs `n` operations over `conc` tasks; returns per-op latencies (ms) and wall seconds.
async fn drive<F, Fut>(n: usize, conc: usize, op: F) -> Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, t0.elapsed().as_secs_f64()))
}

fn store_creates(
    dir: &std::path::Path,
    n: usize,
    durability: Durability,
) -> Result<(Vec<f64>, f64)> {
    let store = Store::open(&StoreConfig::by_count(
        dir.join("direct.db"),
        100_000,
        durability,
    ))?;
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let name = format!("cm-{i:06}");
        store.modify::<StoreError>("/configmaps", "default", &name, |_, _| {
            Ok(Change::Put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default", "uid": name}, "data": {"payload": "x".repeat(256)}})))
        })?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((lat, t0.elapsed().as_secs_f64()))
}

/// `n` creates from `threads` threads on the store alone with fsync. `one_at_a_time` holds a lock
/// across each whole write, fsync included: how the store wrote before group commit, where the
/// writer connection's lock was held through the fsync. Without it, writers that commit while an
/// fsync runs share the next one.
fn store_creates_parallel(
    dir: &std::path::Path,
    n: usize,
    threads: usize,
    one_at_a_time: bool,
) -> Result<(Vec<f64>, f64, u64)> {
    let store = Arc::new(Store::open(&StoreConfig::by_count(
        dir.join("parallel.db"),
        100_000,
        Durability::Full,
    ))?);
    let serial = Arc::new(std::sync::Mutex::new(()));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (store, serial) = (store.clone(), serial.clone());
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let mut lat = Vec::new();
                for i in (t..n).step_by(threads) {
                    let name = format!("cm-{i:06}");
                    let t = Instant::now();
                    let _one = one_at_a_time.then(|| serial.lock().unwrap());
                    store.modify::<StoreError>("/configmaps", "default", &name, |_, _| {
                        Ok(Change::Put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default", "uid": name}, "data": {"payload": "x".repeat(256)}})))
                    })?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    for w in workers {
        lat.extend(w.join().expect("writer thread panicked")?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let (commits, syncs) = store.commit_stats();
    assert_eq!(commits as usize, n);
    Ok((lat, secs, syncs))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let n = a.objects;
    let mut rows = Vec::new();
    let tmp = std::env::temp_dir().join(format!("sedge-apiserver-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;

    // Group commit: concurrent writers on the store alone, one fsync each in turn (before) vs
    // shared fsyncs (now).
    let threads = a.concurrency;
    let mut base = None;
    for (label, one_at_a_time) in [
        ("one write and fsync at a time (before group commit)", true),
        ("group commit", false),
    ] {
        let dir = tmp.join(format!("parallel-{one_at_a_time}"));
        std::fs::create_dir_all(&dir)?;
        let (lat, secs, syncs) = store_creates_parallel(&dir, n, threads, one_at_a_time)?;
        rows.push(row(
            &format!(
                "create, store only x{threads} threads, {label}: {:.1} commits per fsync",
                n as f64 / syncs.max(1) as f64
            ),
            lat,
            secs,
            base,
        ));
        base.get_or_insert(n as f64 / secs);
    }

    // Creates: the store alone, then through HTTPS, for both durabilities.
    for (label, d) in [
        ("fsync each commit", Durability::Full),
        ("no fsync per commit", Durability::Normal),
    ] {
        let dir = tmp.join(format!("{d:?}"));
        std::fs::create_dir_all(&dir)?;
        let (lat, secs) = store_creates(&dir, n, d)?;
        let base = n as f64 / secs;
        rows.push(row(
            &format!("create, store only, {label}"),
            lat,
            secs,
            None,
        ));
        let server = start(&dir, d).await?;
        let api: Api<ConfigMap> = Api::namespaced(client(&server).await?, "default");
        let api2 = api.clone();
        let (lat, secs) = drive(n, a.concurrency, move |i| {
            let api = api2.clone();
            async move {
                api.create(&PostParams::default(), &cm(&format!("cm-{i:06}")))
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(row(
            &format!("create, HTTPS+kube x{}, {label}", a.concurrency),
            lat,
            secs,
            Some(base),
        ));

        if d == Durability::Normal {
            // Gets.
            let store = server.core.store.clone();
            let t0 = Instant::now();
            let mut lat = Vec::new();
            for i in 0..n {
                let t = Instant::now();
                store.get("/configmaps", "default", &format!("cm-{i:06}"))?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let secs = t0.elapsed().as_secs_f64();
            let base = n as f64 / secs;
            rows.push(row("get, store only", lat, secs, None));
            let api2 = api.clone();
            let (lat, secs) = drive(n, a.concurrency, move |i| {
                let api = api2.clone();
                async move {
                    api.get(&format!("cm-{i:06}")).await?;
                    Ok(())
                }
            })
            .await?;
            rows.push(row(
                &format!("get, HTTPS+kube x{}", a.concurrency),
                lat,
                secs,
                Some(base),
            ));

            // Lists of all n objects.
            let mut lat = Vec::new();
            let t0 = Instant::now();
            for _ in 0..5 {
                let t = Instant::now();
                let page = store.list("/configmaps", Some("default"), None, None, None)?;
                assert_eq!(page.items.len(), n);
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let secs = t0.elapsed().as_secs_f64();
            let base = 5.0 / secs;
            rows.push(row(&format!("list {n}, store only"), lat, secs, None));
            let mut lat = Vec::new();
            let t0 = Instant::now();
            for _ in 0..5 {
                let t = Instant::now();
                let l = api.list(&ListParams::default()).await?;
                assert_eq!(l.items.len(), n);
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            rows.push(row(
                &format!("list {n}, HTTPS+kube, one page"),
                lat,
                t0.elapsed().as_secs_f64(),
                Some(base),
            ));
            let mut lat = Vec::new();
            let t0 = Instant::now();
            for _ in 0..5 {
                let t = Instant::now();
                let mut total = 0;
                let mut token: Option<String> = None;
                loop {
                    let mut lp = ListParams::default().limit(500);
                    if let Some(t) = &token {
                        lp = lp.continue_token(t);
                    }
                    let page = api.list(&lp).await?;
                    total += page.items.len();
                    token = page.metadata.continue_.filter(|c| !c.is_empty());
                    if token.is_none() {
                        break;
                    }
                }
                assert_eq!(total, n);
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            rows.push(row(
                &format!("list {n}, HTTPS+kube, pages of 500"),
                lat,
                t0.elapsed().as_secs_f64(),
                Some(base),
            ));

            // Watch fan-out: every watcher must see every update; latency from the write's start.
            api.create(&PostParams::default(), &cm("hot")).await?;
            let rv = api
                .get("hot")
                .await?
                .metadata
                .resource_version
                .unwrap_or_default();
            let epoch = Instant::now();
            let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Vec<f64>>(a.watchers);
            for _ in 0..a.watchers {
                let api = api.clone();
                let rv = rv.clone();
                let done = done_tx.clone();
                let updates = a.updates;
                let mut stream = api
                    .watch(
                        &WatchParams::default()
                            .fields("metadata.name=hot")
                            .timeout(290),
                        &rv,
                    )
                    .await?
                    .boxed();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(updates);
                    while let Ok(Some(ev)) = stream.try_next().await {
                        if let WatchEvent::Modified(c) = ev {
                            let sent: f64 = c
                                .data
                                .unwrap_or_default()
                                .get("t")
                                .and_then(|t| t.parse().ok())
                                .unwrap_or(0.0);
                            lat.push(epoch.elapsed().as_secs_f64() * 1e3 - sent);
                            if lat.len() == updates {
                                break;
                            }
                        }
                    }
                    let _ = done.send(lat).await;
                });
            }
            drop(done_tx);
            let t0 = Instant::now();
            for i in 0..a.updates {
                let t = epoch.elapsed().as_secs_f64() * 1e3;
                let patch = json!({"data": {"t": format!("{t:.3}"), "i": i.to_string()}});
                api.patch("hot", &Default::default(), &kube::api::Patch::Merge(patch))
                    .await?;
            }
            let mut lat = Vec::new();
            let mut complete = 0;
            while let Some(l) =
                tokio::time::timeout(Duration::from_secs(120), done_rx.recv()).await?
            {
                if l.len() == a.updates {
                    complete += 1;
                }
                lat.extend(l);
            }
            let secs = t0.elapsed().as_secs_f64();
            anyhow::ensure!(
                complete == a.watchers,
                "only {complete} of {} watchers saw every update",
                a.watchers
            );
            rows.push(row(
                &format!(
                    "watch fan-out: {} updates x {} watchers (events delivered)",
                    a.updates, a.watchers
                ),
                lat,
                secs,
                None,
            ));

            // The cost of authorization: the same creates and gets as a user whose every request
            // RBAC decides, next to system:masters (allowed before any rule is looked at).
            let admin = client(&server).await?;
            let user: Api<ConfigMap> =
                Api::namespaced(rbac_client(&server, &admin).await?, "default");
            let mut auth_rows = Vec::new();
            for (who, api) in [("system:masters", api.clone()), ("RBAC user (edit)", user)] {
                let prefix = if who.starts_with("RBAC") { "u" } else { "m" };
                let api2 = api.clone();
                let (lat, secs) = drive(n / 2, a.concurrency, move |i| {
                    let api = api2.clone();
                    async move {
                        api.create(&PostParams::default(), &cm(&format!("{prefix}-{i:06}")))
                            .await?;
                        Ok(())
                    }
                })
                .await?;
                auth_rows.push((format!("create as {who}, x{}", a.concurrency), lat, secs));
                let api2 = api.clone();
                let (lat, secs) = drive(n / 2, a.concurrency, move |i| {
                    let api = api2.clone();
                    async move {
                        api.get(&format!("{prefix}-{i:06}")).await?;
                        Ok(())
                    }
                })
                .await?;
                auth_rows.push((format!("get as {who}, x{}", a.concurrency), lat, secs));
            }
            // Each RBAC row's baseline is the masters row of the same operation.
            let masters_rates: Vec<f64> = auth_rows[..2]
                .iter()
                .map(|(_, l, s)| l.len() as f64 / s)
                .collect();
            for (i, (what, lat, secs)) in auth_rows.into_iter().enumerate() {
                let baseline = (i >= 2).then(|| masters_rates[i - 2]);
                rows.push(row(&what, lat, secs, baseline));
            }

            // The transport: merge patches (a heartbeat's shape) from a client over HTTPS, then
            // from one in memory (`local_service`, what the embedded cloud core uses), as the
            // same identity. Both ends are this process, so its CPU per write is the whole cost.
            let local = kube::Client::new(
                server.local_service("sedge-admin", &["system:masters"]),
                "default",
            );
            let mut https_rate = None;
            for (how, client) in [("HTTPS+kube", admin.clone()), ("in memory", local)] {
                let api: Api<ConfigMap> = Api::namespaced(client, "default");
                let cpu0 = sedge_benchmarks::cpu_seconds(None);
                let (lat, secs) = drive(n, a.concurrency, move |i| {
                    let api = api.clone();
                    async move {
                        let p = json!({"metadata": {"annotations": {"renewed": i.to_string()}}});
                        api.patch(
                            &format!("cm-{i:06}"),
                            &PatchParams::default(),
                            &Patch::Merge(p),
                        )
                        .await?;
                        Ok(())
                    }
                })
                .await?;
                let cpu_ms = (sedge_benchmarks::cpu_seconds(None) - cpu0) * 1e3 / n as f64;
                let rate = lat.len() as f64 / secs;
                rows.push(row(
                    &format!(
                        "merge patch, {how} x{}: {cpu_ms:.2} ms of CPU per write",
                        a.concurrency
                    ),
                    lat,
                    secs,
                    https_rate,
                ));
                https_rate.get_or_insert(rate);
            }
        }
        server.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&tmp);

    println!("| operation | n | seconds | per second | p50 ms | p99 ms | vs baseline |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let rate = r.n as f64 / r.secs;
        let ratio = r
            .baseline
            .map(|b| format!("{:.2}x", rate / b))
            .unwrap_or_else(|| "baseline".into());
        let ratio = if r.what.starts_with("watch") {
            "-".to_string()
        } else {
            ratio
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.3} | {:.3} | {} |",
            r.what, r.n, r.secs, rate, r.p50_ms, r.p99_ms, ratio
        );
    }
    Ok(())
}
