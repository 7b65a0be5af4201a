//! Edgemark-like channel benchmark: N simulated edge nodes hold sessions to one cloud hub.
//!
//! For each configuration a fresh `--role cloud` process runs the hub (so its RSS is the cloud's
//! alone) and `--role edges` processes run the simulated nodes (QUIC: one UDP socket per
//! process for all its nodes; WebSocket: one TCP socket per node, spread over processes because
//! of the 20,000 open-file limit). Each simulated node speaks the real protocol (mTLS with its
//! own `system:node:<n>` certificate, hello, keepalives, an ack per reliable message), like
//! KubeEdge's hollow edge nodes with a fake runtime.
//!
//! Printed per configuration: nodes held, connect rate, cloud RSS per node, reliable messages/s
//! delivered and acknowledged, and p50/p99 delivery latency (hub enqueue -> node receive). The
//! ratio column compares messages/s with the first row, run by the same script.
//!
//! `cargo run --release -p sedge-benchmarks --bin edgemark [-- --suite quick|full]`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sedge_tunnel::{Hub, HubConfig, HubOptions, Message, Transport, frame, link, op, tls};
use serde::{Deserialize, Serialize};

#[derive(Parser, Clone)]
struct Args {
    /// `suite` (default) runs every configuration; `cloud` and `edges` are its children.
    #[arg(long, default_value = "suite")]
    role: String,
    /// `quick` (1k WS, 10k QUIC) or `full` (1k and 10k WS, 10k and 100k QUIC).
    #[arg(long, default_value = "full")]
    suite: String,
    #[arg(long, default_value = "websocket")]
    transport: String,
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Reliable messages per node in the throughput phase.
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// First node index (edges role).
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// Hub TCP address (edges role).
    #[arg(long, default_value = "")]
    hub: String,
    /// Hub QUIC address (edges role).
    #[arg(long, default_value = "")]
    hub_quic: String,
    /// PKI directory holding the CA (edges role issues its nodes' certificates from it).
    #[arg(long, default_value = "")]
    pki: String,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
struct Result1 {
    transport: String,
    nodes: usize,
    held: usize,
    connect_secs: f64,
    rss_mib: f64,
    kib_per_node: f64,
    messages: usize,
    msgs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.role.as_str() {
        "suite" => suite(&args),
        "cloud" => tokio::runtime::Runtime::new()?.block_on(cloud(args)),
        "edges" => tokio::runtime::Runtime::new()?.block_on(edges(args)),
        r => bail!("unknown --role {r:?}: expected suite, cloud or edges"),
    }
}

fn suite(args: &Args) -> Result<()> {
    let configs: Vec<(&str, usize, usize)> = match args.suite.as_str() {
        "quick" => vec![("websocket", 1_000, 20), ("quic", 10_000, 5)],
        "full" => vec![
            ("websocket", 1_000, 20),
            ("websocket", 10_000, 5),
            ("quic", 10_000, 5),
            ("quic", 100_000, 2),
        ],
        s => bail!("unknown --suite {s:?}: expected quick or full"),
    };
    let me = std::env::current_exe()?;
    let mut rows = Vec::new();
    println!(
        "| transport | nodes | held | connect (nodes/s) | cloud RSS | per node | reliable msgs | msgs/s (acked) | vs first row | p50 | p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (t, n, m) in configs {
        eprintln!("edgemark: {t} with {n} nodes ...");
        let out = Command::new(&me)
            .args(["--role", "cloud", "--transport", t])
            .args(["--nodes", &n.to_string(), "--messages", &m.to_string()])
            .stderr(Stdio::inherit())
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        let r: Result1 = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
            .with_context(|| format!("{t} {n}: no result (exit {:?})", out.status))?;
        rows.push(r);
        let base = rows[0].msgs_per_sec;
        let r = rows.last().expect("just pushed");
        println!(
            "| {} | {} | {} | {:.0} | {:.0} MiB | {:.1} KiB | {} | {:.0} | {:.2}x | {:.1} ms | {:.1} ms |",
            r.transport,
            r.nodes,
            r.held,
            r.nodes as f64 / r.connect_secs.max(1e-9),
            r.rss_mib,
            r.kib_per_node,
            r.messages,
            r.msgs_per_sec,
            r.msgs_per_sec / base,
            r.p50_ms,
            r.p99_ms
        );
    }
    Ok(())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

async fn cloud(args: Args) -> Result<()> {
    let transport: Transport = args.transport.parse().map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let base_rss = sedge_benchmarks::rss_kib(None);
    let cfg = HubConfig {
        data_dir: dir.path().join("hub"),
        pki_dir: dir.path().join("pki"),
        listen: "127.0.0.1:0".into(),
        listen_quic: "127.0.0.1:0".into(),
        max_pending_handshakes: 8_192,
        handshake_timeout_ms: 120_000,
        ..Default::default()
    };
    let hub = Hub::start(cfg, HubOptions::default()).await?;
    // WebSocket needs a socket per node on each side: at most 5,000 nodes per edges process.
    let per_proc = match transport {
        Transport::Websocket => 5_000,
        Transport::Quic => 50_000,
    };
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut from = 0;
    while from < args.nodes {
        let count = per_proc.min(args.nodes - from);
        let child = Command::new(&me)
            .args(["--role", "edges", "--transport", &args.transport])
            .args(["--from", &from.to_string(), "--nodes", &count.to_string()])
            .args(["--messages", &args.messages.to_string()])
            .args(["--hub", &hub.addr().to_string()])
            .args([
                "--hub-quic",
                &hub.quic_addr().map(|a| a.to_string()).unwrap_or_default(),
            ])
            .args(["--pki", dir.path().join("pki").to_str().unwrap_or_default()])
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        children.push(child);
        from += count;
    }
    // Children issue certificates first, then connect; time from the first connection.
    let mut lines: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("piped")).lines())
        .collect();
    for l in &mut lines {
        let line = l.next().context("edges process ended")??;
        anyhow::ensure!(line == "certs-ready", "unexpected {line}");
    }
    for c in &mut children {
        writeln!(c.stdin.as_mut().expect("piped"), "connect")?;
    }
    let t0 = Instant::now();
    let (mut best, mut progress) = (0, Instant::now());
    loop {
        let held = hub.connected().len();
        if held >= args.nodes {
            break;
        }
        if held > best {
            (best, progress) = (held, Instant::now());
        }
        if progress.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "only {held} of {} nodes connected; no progress for 60 s",
                args.nodes
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Let the dust settle, then hold: every node must still be there one keepalive later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = sedge_benchmarks::rss_kib(None).saturating_sub(base_rss);
    let held = hub.connected().len();
    // Throughput: `messages` reliable messages to every node, all acknowledged.
    let targets = hub.connected();
    let total = targets.len() * args.messages;
    let acks0 = hub.counters().get("acks_received");
    let t1 = Instant::now();
    let body = vec![b'x'; 256];
    for m in 0..args.messages {
        for n in &targets {
            let msg = Message::new(
                "resource",
                op::UPDATE,
                &format!("default/configmap/obj-{m}"),
                body.clone(),
            )
            .with_version((m + 1).to_string());
            hub.send(n, msg).await?;
        }
    }
    while hub.counters().get("acks_received") - acks0 < total as u64 {
        if t1.elapsed() > Duration::from_secs(600) {
            eprintln!("not every message was acknowledged in 600 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t1.elapsed().as_secs_f64();
    let acked = (hub.counters().get("acks_received") - acks0) as usize;
    // Collect latencies from the children.
    let mut lat: Vec<u64> = Vec::with_capacity(total);
    for (c, l) in children.iter_mut().zip(lines.iter_mut()) {
        writeln!(c.stdin.as_mut().expect("piped"), "report")?;
        let line = l.next().context("edges process ended")??;
        let v: Vec<u64> = serde_json::from_str(&line)?;
        lat.extend(v);
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    lat.sort_unstable();
    let r = Result1 {
        transport: args.transport.clone(),
        nodes: args.nodes,
        held,
        connect_secs,
        rss_mib: rss as f64 / 1024.0,
        kib_per_node: rss as f64 / args.nodes.max(1) as f64,
        messages: acked,
        msgs_per_sec: acked as f64 / secs.max(1e-9),
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
    };
    hub.shutdown().await;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Simulated nodes: real mTLS identity and protocol, no runtime behind them.
async fn edges(args: Args) -> Result<()> {
    let transport: Transport = args.transport.parse().map_err(anyhow::Error::msg)?;
    let ca = sedge_tunnel::tls::node_ca(std::path::Path::new(&args.pki))?;
    // One key for all simulated nodes (key generation is not what is measured); one
    // certificate per node, so the hub sees N distinct identities.
    let (csr, key_pem) = sedge_pki::make_csr("sim")?;
    let mut certs = Vec::with_capacity(args.nodes);
    for i in args.from..args.from + args.nodes {
        let c = ca.sign_csr(
            &csr,
            &sedge_pki::IssueRequest {
                common_name: format!("system:node:n{i}"),
                organizations: vec!["system:nodes".into()],
                sans: vec![],
                usage: sedge_pki::Usage::Client,
                valid_for: Duration::from_secs(24 * 3600),
            },
        )?;
        certs.push((i, c.cert_pem));
    }
    let ca_pem = ca.cert_pem().to_string();
    println!("certs-ready");
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut cmd = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut cmd).await?;

    let lat = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let endpoint = match transport {
        Transport::Quic => {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls::edge_client_config(
                    &ca_pem, None, true,
                )?)?,
            )));
            Some(ep)
        }
        Transport::Websocket => None,
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let up = Arc::new(AtomicUsize::new(0));
    let (retry, mut retries) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    // The parent's commands: `report` prints the latencies seen so far.
    let reporter = lat.clone();
    tokio::spawn(async move {
        loop {
            cmd.clear();
            match tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut cmd).await {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
            if cmd.trim() == "report" {
                let v = std::mem::take(&mut *reporter.lock().unwrap_or_else(|p| p.into_inner()));
                println!("{}", serde_json::to_string(&v).unwrap_or_default());
            }
        }
    });
    let mut fresh = certs.into_iter();
    loop {
        let (i, cert) = match fresh.next() {
            Some(x) => x,
            None => match retries.recv().await {
                Some(x) => x,
                None => return Ok(()),
            },
        };
        let permit = sem.clone().acquire_owned().await?;
        let retry = retry.clone();
        let (ca_pem, key_pem, lat, args, endpoint, up) = (
            ca_pem.clone(),
            key_pem.clone(),
            lat.clone(),
            args.clone(),
            endpoint.clone(),
            up.clone(),
        );
        tokio::spawn(async move {
            let node = format!("n{i}");
            let quic = transport == Transport::Quic;
            let link = async {
                let cfg = tls::edge_client_config(&ca_pem, Some((&cert, &key_pem)), quic)?;
                let l = if let Some(ep) = endpoint {
                    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
                    let conn = ep
                        .connect_with(
                            quinn::ClientConfig::new(Arc::new(qc)),
                            args.hub_quic.parse()?,
                            "127.0.0.1",
                        )?
                        .await?;
                    let (send, recv) = conn.open_bi().await?;
                    link::quic(conn, send, recv, frame::DEFAULT_MAX_FRAME)
                } else {
                    let tcp = tokio::net::TcpStream::connect(&args.hub).await?;
                    tcp.set_nodelay(true)?;
                    let remote = tcp.peer_addr()?;
                    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                        .connect(name, tcp)
                        .await?;
                    let (ws, _) = tokio_tungstenite::client_async(
                        format!("wss://{}/v1/tunnel", args.hub),
                        tls,
                    )
                    .await?;
                    link::websocket(ws, remote)
                };
                Ok::<_, anyhow::Error>(l)
            };
            let mut l = match link.await {
                Ok(l) => l,
                Err(e) => {
                    // A real edge backs off and retries; so does a simulated one.
                    eprintln!("{node}: {e}; retrying");
                    drop(permit);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = retry.send((i, cert));
                    return;
                }
            };
            let hello =
                Message::new("hub", op::HELLO, "", format!("{{\"node\":\"{node}\"}}")).unacked();
            if l.tx.send(hello.encode()).await.is_err() {
                return;
            }
            match l.rx.recv().await {
                Some(Ok(m)) if m.route.operation == op::WELCOME => {}
                other => {
                    eprintln!("{node}: no welcome: {other:?}; retrying");
                    drop(permit);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = retry.send((i, cert));
                    return;
                }
            }
            drop(permit);
            up.fetch_add(1, Ordering::Relaxed);
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = l.tx.try_send(Message::new("hub", op::KEEPALIVE, "", "ping").unacked().encode());
                    }
                    m = l.rx.recv() => {
                        let Some(Ok(m)) = m else { return };
                        if m.route.group == "hub" {
                            continue;
                        }
                        let us = now_us().saturating_sub(m.timestamp_ms as u64 * 1000);
                        lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                        let mut ack = Message::new("hub", op::ACK, &m.route.resource, "").unacked();
                        ack.parent_id = m.id.clone();
                        ack.resource_version = m.resource_version.clone();
                        if l.tx.send(ack.encode()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
