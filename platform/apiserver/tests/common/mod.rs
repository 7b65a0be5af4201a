//! Shared helpers: an in-process server on a free port, a `kube` client from its kubeconfig, the
//! real `kubectl`, and waiting on conditions with a deadline.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sedge_apiserver::store::Durability;
use sedge_apiserver::{ApiServer, ApiServerConfig};

pub struct TestServer {
    pub server: ApiServer,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &Path, listen: &str) -> ApiServerConfig {
    ApiServerConfig {
        data_dir: dir.to_path_buf(),
        listen: listen.to_string(),
        durability: Durability::Normal,
        bookmark_interval_seconds: 1,
        ..ApiServerConfig::default()
    }
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut ApiServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), "127.0.0.1:0");
    tweak(&mut cfg);
    let server = ApiServer::start(cfg).await.expect("server starts");
    TestServer { server, dir }
}

impl TestServer {
    pub fn kubeconfig(&self) -> PathBuf {
        self.server.kubeconfig.clone()
    }

    pub async fn client(&self) -> kube::Client {
        client_for(&self.server.kubeconfig, None).await
    }
}

pub async fn client_for(kubeconfig: &Path, context: Option<&str>) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig parses");
    let opts = kube::config::KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let cfg = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .expect("kubeconfig usable");
    kube::Client::try_from(cfg).expect("client")
}

/// The kubectl to test with: $KUBECTL, else the one on PATH.
pub fn kubectl_bin() -> PathBuf {
    if let Ok(k) = std::env::var("KUBECTL") {
        return PathBuf::from(k);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("kubectl");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "kubectl is not on PATH: these tests drive the real kubectl (set KUBECTL=/path/to/kubectl)"
    );
}

/// The exact versioned binary behind google-cloud-cli's dispatcher, if there is one.
pub fn exact_kubectl(minor: u32) -> Option<PathBuf> {
    let real = std::fs::canonicalize(kubectl_bin()).ok()?;
    let p = real.parent()?.join(format!("kubectl.1.{minor}"));
    p.is_file().then_some(p)
}

pub async fn kubectl_with(
    bin: &Path,
    kubeconfig: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.env(
        "KUBECACHEDIR",
        kubeconfig.parent().expect("dir").join("kube-cache"),
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("kubectl finishes")
        .expect("kubectl runs")
}

pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    kubectl_with(&kubectl_bin(), kubeconfig, args, &[]).await
}

/// Runs kubectl and returns stdout, failing the test (with stderr) if it exits non-zero.
pub async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kubectl expecting failure; returns stderr.
pub async fn kubectl_err(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args).await;
    assert!(
        !out.status.success(),
        "kubectl {args:?} should fail but printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `cond` until it holds or `secs` pass.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    sedge_testkit::wait::until_async(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(50),
        || {
            let c = cond();
            async move { c.await.then_some(()) }
        },
    )
    .await
}
