//! A private containerd for one test: its own root, state, socket and config (the CRI plugin with
//! `restrict_oom_score_adj`, runc, overlayfs, a local pause image), started as root, waited for,
//! and torn down on drop: its containers killed, the daemon stopped by pid, the shims of its
//! socket stopped, its mounts and cgroups removed.
//!
//! [`Containerd::start`] returns `Err` with what is missing when containerd cannot run here
//! (not installed, not root); tests call [`Containerd::for_test`], which skips with a loud line
//! unless `SEDGE_REQUIRE_CRI=1` (set by `make test`, which installs containerd), then fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pause image's reference in the config (a local image: nothing can be pulled).
pub const PAUSE_IMAGE: &str = "localhost/pause:local";

/// A running private containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its CRI (and containerd API) socket.
    pub socket: PathBuf,
    /// The pod network's bridge and subnet, when started with one.
    pub pod_network: Option<(String, String)>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .finish()
    }
}

fn which(p: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

impl Containerd {
    /// What this machine lacks to run containerd, if anything.
    pub fn missing() -> Option<String> {
        for (bin, pkg) in [
            ("containerd", "containerd"),
            ("ctr", "containerd"),
            ("runc", "runc"),
            ("containerd-shim-runc-v2", "containerd"),
        ] {
            if !which(bin) {
                return Some(format!(
                    "{bin} is not installed (apt-get install {pkg} runc busybox-static)"
                ));
            }
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Some("containerd needs root".into());
        }
        None
    }

    /// A containerd for the test `name`, or `None` (after saying why on stderr) when this
    /// machine cannot run one and `SEDGE_REQUIRE_CRI` is not `1`. With it set, a machine that
    /// cannot is a failure.
    pub fn for_test(name: &str) -> Option<Containerd> {
        Containerd::for_test_with(name, false)
    }

    /// [`Containerd::for_test`], with a pod network (a CNI bridge of its own) when `cni`.
    pub fn for_test_with(name: &str, cni: bool) -> Option<Containerd> {
        let required = std::env::var("SEDGE_REQUIRE_CRI").is_ok_and(|v| v == "1");
        match Containerd::start_with(cni) {
            Ok(c) => Some(c),
            Err(e) if required => {
                panic!("{name}: containerd is required (SEDGE_REQUIRE_CRI=1): {e}")
            }
            Err(e) => {
                eprintln!(
                    "\n*** SKIPPED {name}: {e}; `make test` installs containerd and runs it ***\n"
                );
                None
            }
        }
    }

    /// Starts one and waits for its socket.
    pub fn start() -> Result<Containerd, String> {
        Containerd::start_with(false)
    }

    /// Starts one, with a pod network when `cni`: a bridge of its own (`sedge` + 6 hex digits)
    /// with a /24 of 10.200.0.0/13 picked at random, host-local addresses, and portmap for
    /// `hostPort`s.
    pub fn start_with(cni: bool) -> Result<Containerd, String> {
        if let Some(m) = Containerd::missing() {
            return Err(m);
        }
        // Short paths: the socket path must fit in sun_path.
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        let socket = d.join("c.sock");
        std::fs::create_dir_all(d.join("net.d")).map_err(|e| e.to_string())?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{netd}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            netd = d.join("net.d").display(),
        );
        let cfg = d.join("config.toml");
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let pod_network = if cni {
            let r = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos() as u64)
                .unwrap_or(0)
                ^ (std::process::id() as u64) << 20;
            let bridge = format!("sedge{:06x}", r & 0xff_ffff);
            let subnet = format!("10.{}.{}.0/24", 200 + (r >> 8) % 8, r % 256);
            let conf = format!(
                r#"{{"cniVersion": "0.4.0", "name": "sedge-test", "plugins": [
  {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]], "dataDir": "{ipam}"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#,
                ipam = d.join("ipam").display()
            );
            std::fs::write(d.join("net.d/10-sedge.conflist"), conf).map_err(|e| e.to_string())?;
            Some((bridge, subnet))
        } else {
            None
        };
        let log = std::fs::File::create(d.join("containerd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting containerd: {e}"))?;
        let mut c = Containerd {
            dir,
            child: Some(child),
            socket,
            pod_network,
        };
        let t0 = Instant::now();
        loop {
            if c.socket.exists() && c.ctr(&["version"]).is_ok() {
                return Ok(c);
            }
            if let Some(ch) = c.child.as_mut()
                && let Ok(Some(st)) = ch.try_wait()
            {
                return Err(format!("containerd exited ({st}): {}", c.log_tail()));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "containerd did not answer within 30 s: {}",
                    c.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Its directory (root, state, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `ctr -a <socket> -n k8s.io <args>` and returns its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI archive for the CRI.
    pub fn import(&self, archive: &Path) -> Result<(), String> {
        let a = archive.display().to_string();
        self.ctr(&["images", "import", &a]).map(|_| ())
    }

    /// Builds the busybox (`busybox:1.36` and `:latest`) and pause images from this host's
    /// busybox and imports them.
    pub fn import_test_images(&self) -> Result<(), String> {
        let dir = self.dir.path().join("images");
        let bb = Path::new("/bin/busybox");
        let busybox = dir.join("busybox.tar");
        let pause = dir.join("pause.tar");
        sedge_edgecore::oci::busybox_image(bb).and_then(|i| i.write(&busybox))?;
        sedge_edgecore::oci::pause(bb, PAUSE_IMAGE).and_then(|i| i.write(&pause))?;
        self.import(&busybox)?;
        self.import(&pause)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Pids of its shims (one per sandbox; they name its socket).
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket.display().to_string();
        let mut out = Vec::new();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("containerd-shim") && cmd.contains(&sock) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Ids of its tasks (running or stopped containers, sandboxes included).
    pub fn tasks(&self) -> Vec<(String, String)> {
        self.ctr(&["tasks", "ls"])
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let id = w.next()?.to_string();
                let _pid = w.next()?;
                Some((id, w.next().unwrap_or_default().to_string()))
            })
            .collect()
    }

    /// Kills one task (a container's process) with SIGKILL, as if it crashed.
    pub fn kill_task(&self, id: &str) -> Result<(), String> {
        self.ctr(&["tasks", "kill", "-s", "SIGKILL", id])
            .map(|_| ())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let ids: Vec<String> = self
            .ctr(&["containers", "ls", "-q"])
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        for id in &ids {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        for id in &ids {
            for _ in 0..20 {
                if self.ctr(&["tasks", "delete", "-f", id]).is_ok()
                    || !self.tasks().iter().any(|(t, _)| t == id)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.ctr(&["containers", "delete", id]);
        }
        if let Some(mut ch) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(ch.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = ch.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = ch.kill();
            let _ = ch.wait();
        }
        // Shims of this daemon that outlived it.
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Mounts under its directory (rootfs overlays, sandbox shm), deepest first.
        let dir = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        // Its pod network's bridge (the veths went with the sandboxes' namespaces).
        if let Some((bridge, _)) = &self.pod_network {
            let _ = Command::new("ip").args(["link", "del", bridge]).status();
        }
        // Its containers' cgroups (`k8s.io/<id>` in each hierarchy); `k8s.io` itself goes when
        // no other containerd uses it.
        if let Ok(hiers) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hiers.flatten() {
                let base = h.path().join("k8s.io");
                for id in &ids {
                    let _ = std::fs::remove_dir(base.join(id));
                }
                let _ = std::fs::remove_dir(&base);
            }
        }
    }
}
