//! What the end-to-end tests share: `sedge up` as a child process, driven with the real
//! `kubectl`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Up {
    child: Child,
    /// The test's directory (sedge up's data is under `up/`).
    pub dir: tempfile::TempDir,
    args: Vec<std::ffi::OsString>,
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sedge up log (tail):\n{}", tail(&self.log()));
            let (_, pods, _) = self.kubectl(&["get", "pods", "-o", "wide"]);
            eprintln!("--- pods:\n{pods}");
        }
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast agent timings for tests.
pub const EDGE_CONFIG: &str = "
sync_interval_ms: 200
backoff_initial_ms: 500
backoff_max_ms: 2000
lease_interval_ms: 1000
node_status_interval_ms: 5000
max_grace_seconds: 5
tunnel:
  keepalive_interval_ms: 1000
  backoff_initial_ms: 100
  backoff_max_ms: 1000
";

/// A loopback port free a moment ago, below the range the kernel picks from for `sedge up`'s own
/// listeners (see `sedge_testkit::port`).
pub fn free_port() -> u16 {
    sedge_testkit::port::free()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `sedge up` with one edge node.
pub fn up() -> Up {
    up_with(&[])
}

/// `sedge up` with one edge node and `extra` flags.
pub fn up_with(extra: &[&str]) -> Up {
    up_configured("", extra)
}

/// `sedge up` with one edge node whose config is [`EDGE_CONFIG`] plus `edge_config` (YAML keys
/// at the top level), and `extra` flags.
pub fn up_configured(edge_config: &str, extra: &[&str]) -> Up {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.yaml");
    std::fs::write(&cfg, format!("{EDGE_CONFIG}{edge_config}")).unwrap();
    let mut args: Vec<std::ffi::OsString> = [
        "up",
        "--edges",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--metaserver-port",
        "0",
        "--metrics-port",
        "0",
        "--mqtt-port",
        "0",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push("--data-dir".into());
    args.push(dir.path().join("up").into());
    args.push("--edge-config".into());
    args.push(cfg.into());
    args.extend(extra.iter().map(Into::into));
    let child = spawn_up(dir.path(), &args);
    let up = Up { child, dir, args };
    wait_for("sedge up to write up.json", Duration::from_secs(60), || {
        up.state().is_some().then_some(())
    });
    up
}

fn spawn_up(dir: &std::path::Path, args: &[std::ffi::OsString]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(args)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Up {
    /// Kills `sedge up` (cloud and agent) with SIGKILL: what it started outside itself (CRI
    /// containers) keeps running.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("up/up.json"));
    }

    /// Starts `sedge up` again on the same data, as before, and waits for it.
    pub fn start_again(&mut self) {
        self.child = spawn_up(self.dir.path(), &self.args);
        wait_for(
            "sedge up to write up.json again",
            Duration::from_secs(60),
            || self.state().is_some().then_some(()),
        );
    }

    /// See the name.
    pub fn state(&self) -> Option<Value> {
        let s = std::fs::read_to_string(self.dir.path().join("up/up.json")).ok()?;
        serde_json::from_str(&s).ok()
    }
    /// See the name.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("up/kubeconfig")
    }
    /// See the name.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }
    /// See the name.
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        run_kubectl(&self.kubeconfig(), args, None)
    }
    /// See the name.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args);
        assert!(
            ok,
            "kubectl {args:?} failed: {err}\n--- sedge up log tail:\n{}",
            tail(&self.log())
        );
        out
    }
    /// See the name.
    pub fn apply(&self, yaml: &str) {
        let f = self.dir.path().join(format!("m{}.yaml", rand_suffix()));
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()]);
    }
    /// See the name.
    pub fn pods(&self, selector: &str) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.ok(&["get", "pods", "-l", selector, "-o", "json"])).unwrap();
        v["items"].as_array().cloned().unwrap_or_default()
    }
    /// See the name.
    pub fn pod(&self, name: &str) -> Option<Value> {
        let (ok, out, _) = self.kubectl(&["get", "pod", name, "-o", "json"]);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }
}

/// The body of a 200 to a plain HTTP `GET path` at `addr`.
pub fn http_body(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(body.to_string())
}

/// See the name.
pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// See the name.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// See the name.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    sedge_testkit::wait::until(what, limit, Duration::from_millis(200), f)
}

/// See the name.
pub fn running_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The embedded API server in this process, with its data under `dir`, and an admin client.
pub async fn apiserver(dir: &std::path::Path) -> (sedge_apiserver::ApiServer, kube::Client) {
    let server = sedge_apiserver::ApiServer::start(sedge_apiserver::ApiServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    (server, client)
}

/// `kubectl --kubeconfig <kubeconfig> <args>`, with `stdin` piped in if given: (success, stdout,
/// stderr).
pub fn run_kubectl(
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    use std::io::Write;
    let mut c = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_kubectl`] that must succeed (the panic says what kubectl said); its stdout.
pub fn kubectl_at(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    kubectl_stdin(kubeconfig, args, None)
}

/// [`kubectl_at`] with `stdin` piped in.
pub fn kubectl_stdin(kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out, err) = run_kubectl(kubeconfig, args, stdin);
    assert!(ok, "kubectl {args:?}: {out}{err}");
    out
}

/// A cloud core for a test under `dir` (beside `common::apiserver`'s PKI in `dir/apiserver`):
/// its hub on a free port, WebSocket only, keepalive and ack timeouts of 500 ms so link cuts are
/// noticed fast.
pub fn cloudcore_config(dir: &std::path::Path) -> sedge_cloudcore::CloudCoreConfig {
    let mut cc = sedge_cloudcore::CloudCoreConfig::default();
    cc.hub.data_dir = dir.join("cloudhub");
    cc.hub.pki_dir = dir.join("apiserver/pki");
    cc.hub.listen = "127.0.0.1:0".into();
    cc.hub.listen_quic = String::new();
    cc.hub.keepalive_interval_ms = 500;
    cc.hub.ack_timeout_ms = 500;
    cc
}

/// The JSON patch that turns the KubeEdge example thermometer's `temperature-enable` off.
pub const ENABLE_OFF: &str =
    r#"[{"op":"replace","path":"/spec/properties/1/desired/value","value":"false"}]"#;

/// kubectl's arguments that patch the example thermometer's `temperature-enable` off.
pub const PATCH_ENABLE_OFF: [&str; 6] = [
    "patch",
    "device",
    "thermometer-1",
    "--type=json",
    "-p",
    ENABLE_OFF,
];

/// The KubeEdge example thermometer's manifests (its DeviceModel and Device on edge-1).
pub const THERMOMETER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../devices/tests/manifests/modbus-thermometer.yaml"
);

/// `sedge up` in this process with `args`, the example thermometer applied with kubectl; its
/// kubeconfig and what it wrote to up.json.
pub async fn up_with_thermometer(
    args: &sedge::platform::UpArgs,
) -> (sedge::platform::Up, PathBuf, Value) {
    let up = sedge::platform::Up::start(args).await.unwrap();
    let kc = up.server.kubeconfig.clone();
    let k = kc.clone();
    tokio::task::spawn_blocking(move || kubectl_at(&k, &["apply", "-f", THERMOMETER]))
        .await
        .unwrap();
    let state = std::fs::read_to_string(args.data_dir.join("up.json")).unwrap();
    (up, kc, serde_json::from_str(&state).unwrap())
}

/// Another edge agent joining `up`'s hub as `name`, a process of its own; killed on drop.
pub struct Edge {
    child: Option<Child>,
    /// `sedge edge` arguments, without the join token (used once).
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Edge {
    /// Kills the agent with SIGKILL (its pods' processes keep running, as on a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again on its data (joined already).
    pub fn start_again(&mut self) {
        self.kill9();
        self.child = Some(spawn_edge(&self.args, &[], &self.log));
    }
}

fn spawn_edge(args: &[std::ffi::OsString], extra: &[&str], log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(args)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Joins a new edge node `name` to `up` with a fresh token and starts its agent.
pub fn join_edge(up: &Up, name: &str) -> Edge {
    let data = up.dir.path().join("up");
    let token = Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(["token", "create", "--ttl", "1h", "--data-dir"])
        .arg(data.join("cloudhub"))
        .arg("--pki-dir")
        .arg(data.join("apiserver/pki"))
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap();
    let cfg = up.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&cfg, EDGE_CONFIG).unwrap();
    let hub = up.state().unwrap()["hub"].as_str().unwrap().to_string();
    let log = up.dir.path().join(format!("{name}.log"));
    let mut args: Vec<std::ffi::OsString> = vec!["edge".into(), "-c".into(), cfg.into()];
    args.push("--data-dir".into());
    args.push(up.dir.path().join(name).into());
    for a in [
        "--cloud",
        &hub,
        "--node-name",
        name,
        "--metaserver",
        "",
        "--mqtt-listen",
        "",
        "--lc-listen",
        "",
        "--dmi-socket",
        "-",
    ] {
        args.push(a.into());
    }
    let child = spawn_edge(&args, &["--token", token.trim()], &log);
    Edge {
        child: Some(child),
        args,
        log,
    }
}
