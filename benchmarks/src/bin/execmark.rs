//! `kubectl exec` through the channel: round trip (command start to exit code) and stdout
//! throughput, against the same work on this machine without Sedge in the path, in one run.
//!
//! `sedge up` (one edge node, process runtime) runs as a child; a busybox pod sleeps on
//! `edge-1`. Rows:
//! - **local spawn**: `sh -c true` started and waited for by this process (what the node does
//!   at least, per exec), and `head -c N /dev/zero` read from a local pipe.
//! - **exec, kube client**: the same through the API server (WebSocket `v4`/`v5.channel.k8s.io`),
//!   the cloud core, the channel stream and the edge agent, with kube-rs's exec client.
//! - **kubectl exec**: what a user waits for, kubectl's own start included.
//! - **port-forward**: an HTTP download from a pod's server through `kubectl port-forward`
//!   (SPDY in a WebSocket, then the channel), against the same download straight from the
//!   pod's port.
//!
//! `cargo run --release -p sedge-benchmarks --bin execmark -- --sedge target/release/sedge`

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, PostParams};
use tokio::io::AsyncReadExt;

#[derive(Parser)]
struct Args {
    /// The `sedge` binary to run `sedge up` with.
    #[arg(long, default_value = "target/release/sedge")]
    sedge: PathBuf,
    /// Round trips per row.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// Round trips with the kubectl binary (each starts kubectl).
    #[arg(long, default_value_t = 30)]
    kubectl_round_trips: usize,
    /// Bytes of stdout per throughput run.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    bytes: usize,
}

/// `sedge up` in a temporary directory; stopped on drop.
struct Up {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn start_up(sedge: &std::path::Path) -> Result<Up> {
    let dir = tempfile::tempdir()?;
    let log = std::fs::File::create(dir.path().join("up.log"))?;
    let child = Command::new(sedge)
        .args(["up", "--edges", "1", "--listen", "127.0.0.1:0"])
        .args([
            "--metaserver-port",
            "0",
            "--metrics-port",
            "0",
            "--mqtt-port",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("up"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", sedge.display()))?;
    let up = Up { child, dir };
    let t0 = Instant::now();
    while !up.dir.path().join("up/up.json").exists() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "sedge up did not start: {}",
                std::fs::read_to_string(up.dir.path().join("up.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(up)
}

/// p50, p99 and mean of `v`, in milliseconds.
fn summary(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| ms(v[((v.len() as f64 * q) as usize).min(v.len() - 1)]);
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (at(0.50), at(0.99), mean)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let up = start_up(&a.sedge)?;
    let kubeconfig = up.dir.path().join("up/kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(cfg)?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bench"},
        "spec": {"nodeName": "edge-1", "containers": [
            {"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let t0 = Instant::now();
    loop {
        let p = pods.get("bench").await?;
        let running = p
            .status
            .and_then(|s| s.container_statuses)
            .is_some_and(|c| {
                c.iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            });
        if running {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the bench pod did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Round trips.
    let mut local = Vec::new();
    for _ in 0..a.round_trips {
        let t = Instant::now();
        let st = tokio::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .await?;
        assert!(st.success());
        local.push(t.elapsed());
    }
    let ap = AttachParams::default().stdout(true).stderr(false);
    let mut via = Vec::new();
    for _ in 0..a.round_trips {
        let t = Instant::now();
        let mut p = pods.exec("bench", ["sh", "-c", "true"], &ap).await?;
        let st = p.take_status().context("no status channel")?.await;
        let ok = st.as_ref().and_then(|s| s.status.as_deref()) == Some("Success");
        if !ok {
            bail!("exec failed: {st:?}");
        }
        via.push(t.elapsed());
        p.join().await?;
    }
    let mut kubectl = Vec::new();
    for _ in 0..a.kubectl_round_trips {
        let t = Instant::now();
        let o = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "bench", "--", "sh", "-c", "true"])
            .output()?;
        if !o.status.success() {
            bail!("kubectl exec: {}", String::from_utf8_lossy(&o.stderr));
        }
        kubectl.push(t.elapsed());
    }

    // Throughput of standard output.
    let cmd = format!("head -c {} /dev/zero", a.bytes);
    let t = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .spawn()?;
    let n_local = drain(child.stdout.take().context("stdout")?).await?;
    child.wait().await?;
    let local_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // kubectl, not kube-rs: kube-rs's exec client moves stdout through a small in-memory pipe
    // and measures itself more than the path.
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["exec", "bench", "--", "sh", "-c", cmd.as_str()])
        .stdout(Stdio::piped())
        .spawn()?;
    let n_via = drain(child.stdout.take().context("stdout")?).await?;
    let st = child.wait().await?;
    let via_secs = t.elapsed().as_secs_f64();
    if n_local != a.bytes || n_via != a.bytes {
        bail!(
            "short read: local {n_local}, through the channel {n_via} of {} ({st:?})",
            a.bytes
        );
    }

    // Port-forward: an HTTP download from a pod, through `kubectl port-forward` and directly.
    let site = up.dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("blob"), vec![0x5au8; a.bytes])?;
    let web_port = sedge_benchmarks::free_port()?;
    let web: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "main", "image": "busybox:1.36",
            "command": ["python3", "-m", "http.server", "--bind", "127.0.0.1",
                        "--directory", site.display().to_string(), web_port.to_string()]}]},
    }))?;
    pods.create(&PostParams::default(), &web).await?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", web_port)).is_err() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the web pod did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fwd_port = sedge_benchmarks::free_port()?;
    let mut pf = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["port-forward", "pod/web", &format!("{fwd_port}:{web_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut pf_out = std::io::BufReader::new(pf.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut pf_out, &mut line)?;
    std::thread::spawn(move || std::io::copy(&mut pf_out, &mut std::io::sink()));
    let direct_secs = download(web_port, a.bytes).await?;
    let forwarded_secs = download(fwd_port, a.bytes).await?;
    let _ = pf.kill();
    let _ = pf.wait();

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nexec round trip (start to exit code), {} and {} runs, {cores} CPUs, one edge node on loopback\n",
        a.round_trips, a.kubectl_round_trips
    );
    println!("| path | p50 ms | p99 ms | mean ms | p50 vs local spawn |");
    println!("|---|---:|---:|---:|---:|");
    let (base50, _, _) = summary(local.clone());
    for (name, v) in [
        ("local spawn of `sh -c true` (baseline)", local),
        ("exec through API server + channel (kube-rs client)", via),
        ("kubectl exec (kubectl start included)", kubectl),
    ] {
        let (p50, p99, mean) = summary(v);
        println!(
            "| {name} | {p50:.2} | {p99:.2} | {mean:.2} | {:.1}x |",
            p50 / base50
        );
    }
    let mbs = |secs: f64| a.bytes as f64 / 1e6 / secs;
    println!("\nstdout throughput, {} MB\n", a.bytes / 1_000_000);
    println!("| path | MB/s | vs local pipe |");
    println!("|---|---:|---:|");
    println!("| local pipe (baseline) | {:.0} | 1.00 |", mbs(local_secs));
    println!(
        "| kubectl exec through API server + channel (kubectl start included) | {:.0} | {:.3} |",
        mbs(via_secs),
        local_secs / via_secs
    );
    println!(
        "\nport-forward, HTTP download of {} MB from a pod\n",
        a.bytes / 1_000_000
    );
    println!("| path | MB/s | vs direct |");
    println!("|---|---:|---:|");
    println!(
        "| direct to the pod's port on loopback (baseline) | {:.0} | 1.00 |",
        mbs(direct_secs)
    );
    println!(
        "| kubectl port-forward through API server + channel | {:.0} | {:.3} |",
        mbs(forwarded_secs),
        direct_secs / forwarded_secs
    );
    Ok(())
}

/// A loopback port free a moment ago.
/// Downloads `/blob` over HTTP/1.0 from `port`: seconds taken, after checking its size.
async fn download(port: u16, bytes: usize) -> Result<f64> {
    use tokio::io::AsyncWriteExt;
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /blob HTTP/1.0\r\n\r\n").await?;
    let n = drain(s).await?;
    if n < bytes {
        bail!("port {port}: {n} bytes, expected {bytes} and the headers");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Reads `r` to its end; the byte count.
async fn drain(mut r: impl tokio::io::AsyncRead + Unpin) -> Result<usize> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        match r.read(&mut buf).await? {
            0 => return Ok(n),
            k => n += k,
        }
    }
}
