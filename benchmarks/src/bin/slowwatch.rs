//! Memory of the API server under watchers that never read: the attack that grew it from 0.6 to
//! 11.4 GB. The server runs in a child process (this binary with `--serve`), so its RSS is its
//! own; this process opens the watches (TLS, bearer tokens, HTTP/1.1, never reading a byte) and
//! writes ConfigMaps that every watcher is sent. Reported: the server's RSS before, at its peak,
//! and after the writes, with what its watch budget says (bytes queued, slow watchers closed),
//! against the budget's bounds (8 MiB per watcher, 256 MiB for all).
//!
//! `cargo run --release -p sedge-benchmarks --bin slowwatch [-- --watchers 2000 --writes 64 --size-kib 1024]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use sedge_apiserver::watch::{WATCH_BYTES_PER_WATCHER, WATCH_BYTES_TOTAL};
use sedge_apiserver::{ApiServer, ApiServerConfig};
use tokio::io::AsyncWriteExt;

#[derive(Parser)]
struct Args {
    /// Watchers that never read.
    #[arg(long, default_value_t = 2000)]
    watchers: usize,
    /// ConfigMaps written while they watch.
    #[arg(long, default_value_t = 64)]
    writes: usize,
    /// Size of each, KiB.
    #[arg(long, default_value_t = 1024)]
    size_kib: usize,
    /// Internal: run the server and report its state on stdout.
    #[arg(long, hide = true)]
    serve: Option<std::path::PathBuf>,
}

/// Users the watches are spread over (each may hold 1,000 watches).
const USERS: usize = 4;

/// The child: the API server, and a line `STAT <rss KiB> <queued bytes> <closed slow>` every
/// 100 ms until stdin closes.
async fn serve(dir: std::path::PathBuf) -> Result<()> {
    let tokens = dir.join("tokens.csv");
    // The kubeconfig's admin first, then the watchers' users.
    let lines: String = std::iter::once(
        "slowwatch-admin-token,sedge-admin,sedge-admin,\"system:masters\"\n".to_string(),
    )
    .chain((0..USERS).map(|u| format!("watch-token-{u},watcher-{u},{u},\"system:masters\"\n")))
    .collect();
    std::fs::write(&tokens, lines)?;
    let server = ApiServer::start(ApiServerConfig {
        data_dir: dir.clone(),
        listen: "127.0.0.1:0".into(),
        token_file: Some(tokens),
        max_connections: 4 * 4096,
        ..ApiServerConfig::default()
    })
    .await?;
    println!("READY {} {}", server.addr, server.kubeconfig.display());
    let budget = server.watch_budget();
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    });
    tokio::pin!(stdin_closed);
    loop {
        println!(
            "STAT {} {} {}",
            sedge_benchmarks::rss_kib(None),
            budget.queued(),
            budget
                .closed_slow
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::select! {
            _ = &mut stdin_closed => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    server.shutdown().await;
    Ok(())
}

#[derive(Clone, Copy, Default)]
struct Stat {
    rss_kib: u64,
    queued: u64,
    closed: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(dir) = a.serve {
        return serve(dir).await;
    }
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (Some("READY"), Some(addr), Some(kubeconfig)) = (words.next(), words.next(), words.next())
    else {
        bail!("the server did not start: {line:?}");
    };
    let addr: std::net::SocketAddr = addr.parse()?;
    let kubeconfig = std::path::PathBuf::from(kubeconfig);
    // The child's reports, the latest first in `stat`, the peak in `peak`.
    let stat = Arc::new(std::sync::Mutex::new((Stat::default(), Stat::default())));
    let s = stat.clone();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect();
            if let [rss_kib, queued, closed] = v[..] {
                let now = Stat {
                    rss_kib,
                    queued,
                    closed,
                };
                let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
                g.0 = now;
                g.1.rss_kib = g.1.rss_kib.max(rss_kib);
                g.1.queued = g.1.queued.max(queued);
            }
        }
    });
    let latest = |settle: Duration| {
        let stat = stat.clone();
        async move {
            tokio::time::sleep(settle).await;
            stat.lock().unwrap_or_else(|p| p.into_inner()).0
        }
    };
    let before = latest(Duration::from_millis(500)).await;

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let ca = cfg
        .root_cert
        .clone()
        .and_then(|c| c.into_iter().next())
        .context("no CA in the kubeconfig")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca))?;
    let tls = rustls::ClientConfig::builder_with_provider(sedge_pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let client = kube::Client::try_from(cfg)?;

    // The watchers: a request each, then nothing read, ever.
    let t = Instant::now();
    let mut held = Vec::with_capacity(a.watchers);
    for i in 0..a.watchers {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let mut s = connector.connect(name, tcp).await?;
        let req = format!(
            "GET /api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&timeoutSeconds=3600 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer watch-token-{}\r\nAccept: application/json\r\n\r\n",
            i % USERS
        );
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        held.push(s);
    }
    let connected = latest(Duration::from_secs(2)).await;
    let connect_s = t.elapsed().as_secs_f64();

    // The writes every watcher is sent.
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let blob = "x".repeat(a.size_kib * 1024);
    let t = Instant::now();
    for i in 0..a.writes {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("big-{i}")}, "data": {"blob": blob}
        }))?;
        cms.create(&PostParams::default(), &cm).await?;
    }
    let write_s = t.elapsed().as_secs_f64();
    // The slow watchers' grace (10 s) and then some.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = latest(Duration::from_secs(1)).await;
    while after.queued > 0 && Instant::now() < deadline {
        after = latest(Duration::from_secs(1)).await;
    }
    let peak = stat.lock().unwrap_or_else(|p| p.into_inner()).1;
    // A reader still gets an answer.
    let t = Instant::now();
    cms.get("big-0").await?;
    let get_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(held);
    let released = latest(Duration::from_secs(3)).await;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let bytes_mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let unbounded = a.watchers as f64 * a.writes as f64 * a.size_kib as f64 / 1024.0;
    println!(
        "\nAPI server under {} watchers that never read ({} ConfigMaps of {} KiB written: {:.0} MiB of events if every watcher were sent every one)\n",
        a.watchers, a.writes, a.size_kib, unbounded
    );
    println!("| moment | server RSS MiB | watch bytes queued MiB | slow watchers closed |");
    println!("|---|---|---|---|");
    for (what, s) in [
        ("started", before),
        ("watchers connected", connected),
        ("peak during and after the writes", peak),
        ("writes done, slow watchers closed", after),
        ("clients gone", released),
    ] {
        let closed = if what.starts_with("peak") {
            "-".to_string()
        } else {
            s.closed.to_string()
        };
        println!(
            "| {what} | {:.0} | {:.1} | {closed} |",
            mib(s.rss_kib),
            bytes_mib(s.queued)
        );
    }
    println!(
        "\nbudget: {} MiB per watcher, {} MiB for all; peak RSS - started = {:.0} MiB; {} watchers connected in {connect_s:.1} s, {} writes in {write_s:.1} s; a get after the writes took {get_ms:.1} ms",
        WATCH_BYTES_PER_WATCHER / (1024 * 1024),
        WATCH_BYTES_TOTAL / (1024 * 1024),
        mib(peak.rss_kib) - mib(before.rss_kib),
        a.watchers,
        a.writes,
    );
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(())
}
