//! `sedge images build`: Sedge's container images as OCI archives, made on this machine without
//! a registry or a build daemon, and optionally imported into a containerd for its CRI
//! (`ctr -n k8s.io images import`).
//!
//! - `sedge/worker:<version>` (and `:latest`): the `sedge` binary with the shared libraries it
//!   links and ONNX Runtime's library; entrypoint `sedge worker`. Models and data sets reach its
//!   containers as volumes, as Sedna mounts them.
//! - `busybox:1.36` (and `:latest`): a static busybox, for examples and tests.
//! - `localhost/pause:local`: the pod sandbox image (`sleep infinity`); containerd's
//!   `sandbox_image` names it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sedge_edgecore::oci::{self, Entry, Image};

/// `sedge images ...`.
#[derive(Subcommand)]
pub enum ImagesCmd {
    /// Build Sedge's images as OCI archives (worker, busybox, pause); import them with --import.
    Build(BuildArgs),
}

/// Flags of `sedge images build`.
#[derive(Args)]
pub struct BuildArgs {
    /// Where the archives go.
    #[arg(long, default_value = "target/images")]
    pub out: PathBuf,
    /// Also import them into the containerd at this socket (namespace `k8s.io`, the CRI's).
    #[arg(long)]
    pub import: Option<PathBuf>,
    /// The static busybox to put in the busybox and pause images.
    #[arg(long, default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// The `sedge` binary for the worker image (default: this one).
    #[arg(long)]
    pub sedge: Option<PathBuf>,
    /// ONNX Runtime's library for the worker image (default: $ORT_DYLIB_PATH; none: tract only).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub onnxruntime: Option<PathBuf>,
    /// Only these images (`worker`, `busybox`, `pause`); all when not given.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// The reference of the worker image this binary builds.
pub fn worker_reference() -> String {
    format!("docker.io/sedge/worker:{}", env!("CARGO_PKG_VERSION"))
}

/// The worker image: `sedge` (plus what it links) and ONNX Runtime.
pub fn worker_image(sedge: &Path, onnxruntime: Option<&Path>) -> Result<Image, String> {
    let mut img = Image {
        reference: worker_reference(),
        also: vec!["docker.io/sedge/worker:latest".into()],
        entrypoint: vec!["/usr/local/bin/sedge".into(), "worker".into()],
        cmd: vec!["--help".into()],
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        working_dir: "/".into(),
        ..Default::default()
    };
    img.add_binary(sedge, "/usr/local/bin/sedge")?;
    if let Some(ort) = onnxruntime.filter(|p| p.exists()) {
        let real = std::fs::canonicalize(ort).map_err(|e| format!("{}: {e}", ort.display()))?;
        img.files
            .insert("/usr/local/lib/libonnxruntime.so".into(), Entry::File(real));
        img.env
            .push("ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so".into());
    }
    // The host's CA certificates: the workers' HTTPS clients (model downloads, the LC
    // endpoint's client) load the system roots and refuse to start without any.
    let cas = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if cas.exists() {
        img.files
            .insert(cas.display().to_string(), Entry::File(cas.to_path_buf()));
    }
    for d in ["/tmp", "/proc", "/sys", "/dev", "/etc"] {
        img.files.insert(
            d.into(),
            Entry::Dir(if d == "/tmp" { 0o1777 } else { 0o755 }),
        );
    }
    Ok(img)
}

/// Imports an archive into the containerd at `socket`, for its CRI.
pub fn import(socket: &Path, archive: &Path) -> Result<(), String> {
    let out = std::process::Command::new("ctr")
        .arg("-a")
        .arg(socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(archive)
        .output()
        .map_err(|e| format!("ctr (containerd's client, package `containerd`): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ctr images import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `sedge images build`.
pub fn build(a: BuildArgs) -> Result<()> {
    let want = |n: &str| a.only.is_empty() || a.only.iter().any(|o| o == n);
    for o in &a.only {
        if !["worker", "busybox", "pause"].contains(&o.as_str()) {
            bail!("--only {o:?}: the images are worker, busybox and pause");
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let mut built = Vec::new();
    if (want("busybox") || want("pause")) && !a.busybox.exists() {
        bail!(
            "{} not found: install busybox-static (apt-get install busybox-static) or pass --busybox",
            a.busybox.display()
        );
    }
    if want("busybox") {
        let p = a.out.join("busybox.tar");
        oci::busybox_image(&a.busybox)
            .and_then(|i| i.write(&p))
            .map_err(anyhow::Error::msg)?;
        built.push(p);
    }
    if want("pause") {
        let p = a.out.join("pause.tar");
        oci::pause(&a.busybox, "localhost/pause:local")
            .and_then(|i| i.write(&p))
            .map_err(anyhow::Error::msg)?;
        built.push(p);
    }
    if want("worker") {
        let sedge = match &a.sedge {
            Some(s) => s.clone(),
            None => std::env::current_exe().context("this binary's path")?,
        };
        let p = a.out.join("worker.tar");
        worker_image(&sedge, a.onnxruntime.as_deref())
            .and_then(|i| i.write(&p))
            .map_err(anyhow::Error::msg)?;
        built.push(p);
    }
    for p in &built {
        let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        println!("{} ({:.1} MiB)", p.display(), size as f64 / 1048576.0);
        if let Some(sock) = &a.import {
            import(sock, p).map_err(anyhow::Error::msg)?;
            println!("  imported into {}", sock.display());
        }
    }
    Ok(())
}
