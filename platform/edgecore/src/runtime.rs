//! Container runtimes. Edged talks to a [`Runtime`] only: start a container from a resolved
//! spec, find a container again after an agent restart, be told when it ends (or poll it),
//! signal it, and let a pod's resources go. [`ProcessRuntime`] runs each container as a supervised host process;
//! [`crate::cri::CriRuntime`] runs real containers through a CRI runtime such as containerd
//! (start = sandbox + create + start, adopt = the CRI's listing by labels, poll = status,
//! signal = StopContainer).
//!
//! The process runtime resolves `image` through the image map ([`crate::config::ImageEntry`]):
//! an unmapped image is `ErrImagePull` with the known images listed, not a crash. Processes get
//! their own process group (signals reach shells' children), a clean environment (`PATH`,
//! `HOME`, `HOSTNAME`, `SEDGE_ROOT` plus the spec's), stdout and stderr appended to the log file,
//! and they outlive the agent: a restarted agent adopts them by pid and start time. Resource
//! limits are recorded in the pod spec but not enforced (cgroups come with the CRI runtime).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::config::ImageEntry;
use crate::store::ContainerRecord;

/// A volume mount: a directory or file of the node at a path in the container.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// The node's path (a volume's directory, or a file or directory under it for `subPath`).
    pub host_path: PathBuf,
    /// `mountPath`.
    pub container_path: String,
    /// `readOnly`.
    pub read_only: bool,
}

/// A container's security settings (pod `securityContext` overlaid with the container's), as a
/// CRI runtime applies them. The process runtime runs every container as the agent's user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Security {
    /// `runAsUser`.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `fsGroup` and `supplementalGroups`.
    pub supplemental_groups: Vec<i64>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    /// `privileged` (refused unless the node allows it).
    pub privileged: bool,
    /// `capabilities.add`.
    pub add_capabilities: Vec<String>,
    /// `capabilities.drop`.
    pub drop_capabilities: Vec<String>,
}

/// Resource limits of a container (`resources.limits`), as a runtime enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Memory in bytes, 0 for none.
    pub memory_bytes: i64,
    /// CPU in millicores, 0 for none.
    pub cpu_millis: i64,
    /// CPU requests in millicores (the container's share under contention), 0 for none.
    pub cpu_request_millis: i64,
}

/// A container, resolved by edged and ready to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// Pod UID.
    pub pod_uid: String,
    /// Pod `namespace/name`, for messages.
    pub pod: String,
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// `imagePullPolicy` (empty: Kubernetes' default for the image's tag).
    pub pull_policy: String,
    /// `command` (replaces the image's entrypoint).
    pub command: Vec<String>,
    /// `args` (replaces the image's cmd).
    pub args: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// The container's root: mounts and the working directory live under it.
    pub root: PathBuf,
    /// Working directory (already resolved under `root`).
    pub working_dir: PathBuf,
    /// Where stdout and stderr go.
    pub log_path: PathBuf,
    /// Volume mounts (the process runtime links them under `root` before it starts).
    pub mounts: Vec<Mount>,
    /// `workingDir` as the pod spec gives it (a path inside the container), if any.
    pub container_working_dir: Option<String>,
    /// `resources.limits` (and CPU requests).
    pub limits: Limits,
    /// How many times this container was started before (the CRI's `attempt`).
    pub attempt: u32,
    /// Security settings.
    pub security: Security,
}

/// A start that failed, with the reason Kubernetes users know from `kubectl get pods`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StartError {
    /// `ErrImagePull`, `RunContainerError`...
    pub reason: String,
    /// What went wrong.
    pub message: String,
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// Killed by the kernel for exceeding its memory limit (with the code it ended with).
    OomKilled(i32),
    /// Gone, but not our child any more (the agent restarted): its exit status is lost.
    Unknown,
}

impl Exit {
    /// The exit code Kubernetes reports (128 + signal for signals).
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
            Exit::OomKilled(c) => c,
            Exit::Unknown => 255,
        }
    }
}

/// A signal edged sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Please stop.
    Term,
    /// Stop now.
    Kill,
}

/// A running (or finished) container.
pub trait Container: Send {
    /// The runtime's id for it (the pid for processes).
    fn id(&self) -> String;
    /// Start time in clock ticks since boot (0 when unknown).
    fn start_ticks(&self) -> u64;
    /// Whether it has ended, without waiting.
    fn poll_exit(&mut self) -> Option<Exit>;
    /// Asks to be told on `wake` when it ends (at once when it already has; a wake may also
    /// come for nothing: [`Container::poll_exit`] says). The last `wake` given is the one
    /// told. False when this runtime cannot tell, and the caller polls instead.
    fn notify_exit(&mut self, wake: Arc<Notify>) -> bool {
        let _ = wake;
        false
    }
    /// Sends a signal to it (and, for processes, its process group).
    fn signal(&self, s: Signal);
}

/// What a command run in a container with [`Runtime::exec_sync`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecOutput {
    /// Exit code.
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// The pod a container belongs to, as a runtime needs it for the pod's sandbox.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodInfo {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Where the pod's container logs live (a directory of this node).
    pub log_dir: PathBuf,
    /// Whether the pod uses the node's network (`hostNetwork`, or a node without a pod network).
    pub host_network: bool,
    /// `hostPort`s of its containers: (protocol, container port, host port).
    pub host_ports: Vec<(String, i32, i32)>,
}

/// What edged needs from a container runtime.
pub trait Runtime: Send + Sync {
    /// Starts a container of `pod`.
    fn start<'a>(
        &'a self,
        pod: &'a PodInfo,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, StartError>>;
    /// Finds a container started before an agent restart; `None` if it is gone.
    fn adopt<'a>(&'a self, rec: &'a ContainerRecord) -> BoxFuture<'a, Option<Box<dyn Container>>>;
    /// The pod is gone from this node and its containers are stopped: release what the
    /// runtime holds for it (a CRI sandbox). Never fails; what cannot be released is logged.
    fn remove_pod<'a>(&'a self, pod_uid: &'a str) -> BoxFuture<'a, ()> {
        let _ = pod_uid;
        Box::pin(async {})
    }
    /// Removes everything the runtime holds for pods not in `keep` (UIDs): after an agent
    /// restart, what belonged to pods deleted meanwhile.
    fn remove_others<'a>(
        &'a self,
        keep: &'a std::collections::HashSet<String>,
    ) -> BoxFuture<'a, ()> {
        let _ = keep;
        Box::pin(async {})
    }
    /// Runs `cmd` in the running container `id` and waits for it (at most `timeout`): its exit
    /// code and output. `None` for a runtime whose containers are host processes (an `exec`
    /// probe then runs the command on the host, in the container's root).
    fn exec_sync<'a>(
        &'a self,
        id: &'a str,
        cmd: &'a [String],
        timeout: std::time::Duration,
    ) -> Option<BoxFuture<'a, Result<ExecOutput, String>>> {
        let _ = (id, cmd, timeout);
        None
    }
    /// Makes what a pod's containers share (a CRI sandbox) before its first container is
    /// resolved, so the pod's own IP is known for its env. Nothing to do for host processes.
    fn prepare_pod<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, Result<(), StartError>> {
        let _ = pod;
        Box::pin(async { Ok(()) })
    }
    /// The pod's own IP when it has one (a CRI sandbox on a pod network); `None`: the node's.
    fn pod_ip(&self, pod_uid: &str) -> Option<String> {
        let _ = pod_uid;
        None
    }
    /// Whether pods get a network of their own unless they ask for the host's.
    fn pod_network(&self) -> bool {
        false
    }
    /// A version string for the node status (`containerRuntimeVersion`).
    fn version(&self) -> String;
    /// The `containerID` scheme of this runtime's containers in a pod's status.
    fn id_scheme(&self) -> &'static str {
        "process"
    }
    /// Whether this is a CRI runtime: containers have their own root file system (mounts are
    /// bound by the runtime, not linked under `root`) and log in the CRI's format
    /// (`<time> <stream> <P|F> <line>`).
    fn cri(&self) -> bool {
        false
    }
    /// Whether containers of `image` may run any program of the host anyway (for them a
    /// `hostPath` grants nothing new, so the node's host-path allowlist does not apply).
    fn runs_host_commands(&self, image: &str) -> bool {
        let _ = image;
        false
    }
}

/// Runs containers as host processes.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    images: BTreeMap<String, ImageEntry>,
    self_exe: PathBuf,
}

impl ProcessRuntime {
    /// A runtime with this image map; `@self` resolves to `self_exe`.
    pub fn new(images: BTreeMap<String, ImageEntry>, self_exe: PathBuf) -> ProcessRuntime {
        ProcessRuntime { images, self_exe }
    }

    fn entry(&self, image: &str) -> Option<&ImageEntry> {
        // Exact reference first, then without the tag or digest.
        if let Some(e) = self.images.get(image) {
            return Some(e);
        }
        let no_digest = image.split('@').next().unwrap_or(image);
        let last_slash = no_digest.rfind('/').map_or(0, |i| i + 1);
        let name = match no_digest[last_slash..].find(':') {
            Some(i) => &no_digest[..last_slash + i],
            None => no_digest,
        };
        self.images.get(name).or_else(|| {
            // `docker.io/library/busybox` and `library/busybox` are `busybox`.
            let short = name
                .trim_start_matches("docker.io/")
                .trim_start_matches("library/");
            self.images.get(short)
        })
    }

    /// The argv a container runs, after the ENTRYPOINT/CMD rules and `@self`.
    pub fn argv(&self, spec: &ContainerSpec) -> Result<Vec<String>, StartError> {
        let entry = self.entry(&spec.image).ok_or_else(|| StartError {
            reason: "ErrImagePull".into(),
            message: format!(
                "image {:?} is not in the process runtime's image map (known: {}); add it under `images` in the edge config",
                spec.image,
                self.images.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
        let mut argv: Vec<String> = if !spec.command.is_empty() {
            let first = &spec.command[0];
            let allowed = entry.host_commands || entry.entrypoint.first() == Some(first);
            if !allowed {
                return Err(StartError {
                    reason: "RunContainerError".into(),
                    message: format!(
                        "image {:?} does not allow host commands, and command {first:?} is not its entrypoint",
                        spec.image
                    ),
                });
            }
            let mut v = spec.command.clone();
            v.extend(spec.args.iter().cloned());
            v
        } else {
            let mut v = entry.entrypoint.clone();
            v.extend(if spec.args.is_empty() {
                entry.cmd.iter().cloned()
            } else {
                spec.args.iter().cloned()
            });
            v
        };
        if argv.is_empty() {
            return Err(StartError {
                reason: "RunContainerError".into(),
                message: format!(
                    "image {:?} has no entrypoint and the container no command",
                    spec.image
                ),
            });
        }
        if argv[0] == "@self" {
            argv[0] = self.self_exe.display().to_string();
        }
        // `$(VAR)` expansion, as the kubelet does for command and args.
        let env: BTreeMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Ok(argv.into_iter().map(|a| expand(&a, &env)).collect())
    }
}

/// Kubernetes' `$(VAR)` expansion: unknown references stay as written, `$$` escapes.
pub fn expand(s: &str, env: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('(')
            && let Some(end) = a.find(')')
        {
            let name = &a[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &a[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn which(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field 22 is index 19.
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

struct Process {
    pid: u32,
    ticks: u64,
    /// Filled by the task that waits for the child; `None` for an adopted process (not our
    /// child any more: it is looked for in `/proc`).
    ended: Option<Arc<Mutex<Ended>>>,
}

/// How a child process ended, and who to tell.
#[derive(Default)]
struct Ended {
    exit: Option<Exit>,
    wake: Option<Arc<Notify>>,
}

/// Waits for a child to end (tokio reaps it on SIGCHLD; nothing polls), records how, and tells
/// whoever asked.
async fn wait_child(mut child: tokio::process::Child, ended: Arc<Mutex<Ended>>) {
    use std::os::unix::process::ExitStatusExt;
    let exit = match child.wait().await {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            _ => Exit::Unknown,
        },
        Err(_) => Exit::Unknown,
    };
    let mut e = ended.lock().unwrap_or_else(|p| p.into_inner());
    e.exit = Some(exit);
    if let Some(w) = e.wake.take() {
        w.notify_one();
    }
}

impl Container for Process {
    fn id(&self) -> String {
        self.pid.to_string()
    }
    fn start_ticks(&self) -> u64 {
        self.ticks
    }
    fn poll_exit(&mut self) -> Option<Exit> {
        match &self.ended {
            Some(e) => e.lock().unwrap_or_else(|p| p.into_inner()).exit,
            // Adopted: alive while the same process (same start time) is there.
            None => (start_ticks(self.pid) != Some(self.ticks)).then_some(Exit::Unknown),
        }
    }
    fn notify_exit(&mut self, wake: Arc<Notify>) -> bool {
        let Some(e) = &self.ended else { return false };
        let mut e = e.lock().unwrap_or_else(|p| p.into_inner());
        if e.exit.is_some() {
            wake.notify_one();
        } else {
            e.wake = Some(wake);
        }
        true
    }
    fn signal(&self, s: Signal) {
        use nix::sys::signal::{Signal as S, killpg};
        use nix::unistd::Pid;
        let sig = match s {
            Signal::Term => S::SIGTERM,
            Signal::Kill => S::SIGKILL,
        };
        // Only while it is still the process we started (never a recycled pid).
        if start_ticks(self.pid) == Some(self.ticks) {
            let _ = killpg(Pid::from_raw(self.pid as i32), sig);
        }
    }
}

impl ProcessRuntime {
    fn start_process(&self, spec: &ContainerSpec) -> Result<Box<dyn Container>, StartError> {
        let argv = self.argv(spec)?;
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
            });
        let exe = which(&argv[0], &path).ok_or_else(|| StartError {
            reason: "RunContainerError".into(),
            message: format!("exec: {:?}: executable file not found in $PATH", argv[0]),
        })?;
        let run_err = |what: &str, e: std::io::Error| StartError {
            reason: "RunContainerError".into(),
            message: format!("{what}: {e}"),
        };
        std::fs::create_dir_all(&spec.working_dir).map_err(|e| run_err("working directory", e))?;
        if let Some(d) = spec.log_path.parent() {
            std::fs::create_dir_all(d).map_err(|e| run_err("log directory", e))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|e| run_err("log file", e))?;
        let log2 = log.try_clone().map_err(|e| run_err("log file", e))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", &path)
            .env("HOME", &spec.root)
            .env("SEDGE_ROOT", &spec.root)
            .env("HOSTNAME", spec.pod.rsplit('/').next().unwrap_or_default())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| StartError {
            reason: "RunContainerError".into(),
            message: format!("starting {}: {e}", exe.display()),
        })?;
        let pid = child.id().unwrap_or(0);
        let ticks = start_ticks(pid).unwrap_or(0);
        let ended = Arc::new(Mutex::new(Ended::default()));
        tokio::spawn(wait_child(child, ended.clone()));
        Ok(Box::new(Process {
            pid,
            ticks,
            ended: Some(ended),
        }))
    }
}

impl Runtime for ProcessRuntime {
    fn start<'a>(
        &'a self,
        _pod: &'a PodInfo,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, StartError>> {
        Box::pin(async move { self.start_process(spec) })
    }

    fn adopt<'a>(&'a self, rec: &'a ContainerRecord) -> BoxFuture<'a, Option<Box<dyn Container>>> {
        Box::pin(async move {
            if rec.pid == 0 || start_ticks(rec.pid) != Some(rec.start_ticks) {
                return None;
            }
            Some(Box::new(Process {
                pid: rec.pid,
                ticks: rec.start_ticks,
                ended: None,
            }) as Box<dyn Container>)
        })
    }

    fn version(&self) -> String {
        format!("process://sedge-{}", env!("CARGO_PKG_VERSION"))
    }

    fn runs_host_commands(&self, image: &str) -> bool {
        self.entry(image).is_some_and(|e| e.host_commands)
    }
}

/// Resolves a path the pod gives (`mountPath`, `workingDir`) under the container's root.
pub fn under_root(root: &Path, p: &str) -> PathBuf {
    let rel: PathBuf = Path::new(p)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    root.join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> ProcessRuntime {
        ProcessRuntime::new(
            crate::config::EdgeCoreConfig::default().images,
            PathBuf::from("/opt/sedge"),
        )
    }

    fn spec(image: &str, command: &[&str], args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            pod_uid: "u".into(),
            pod: "default/p".into(),
            name: "c".into(),
            image: image.into(),
            pull_policy: String::new(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![("WHO".into(), "edge".into())],
            root: "/r".into(),
            working_dir: "/r".into(),
            log_path: "/r/log".into(),
            mounts: vec![],
            container_working_dir: None,
            limits: Limits::default(),
            attempt: 0,
            security: Security::default(),
        }
    }

    #[test]
    fn entrypoint_and_cmd_follow_kubernetes_rules() {
        let r = rt();
        assert_eq!(
            r.argv(&spec("busybox:1.36", &["sh", "-c", "echo $(WHO)"], &[]))
                .unwrap(),
            ["sh", "-c", "echo edge"]
        );
        assert_eq!(
            r.argv(&spec("docker.io/library/busybox", &[], &[]))
                .unwrap(),
            ["sh"]
        );
        assert_eq!(
            r.argv(&spec("sedge/worker:latest", &[], &["edge", "--x"]))
                .unwrap(),
            ["/opt/sedge", "worker", "edge", "--x"]
        );
        assert_eq!(
            r.argv(&spec("sedge/worker", &[], &[])).unwrap(),
            ["/opt/sedge", "worker", "--help"]
        );
        let e = r.argv(&spec("nginx:1.27", &[], &[])).unwrap_err();
        assert_eq!(e.reason, "ErrImagePull");
        assert!(
            e.message.contains("\"nginx:1.27\"") && e.message.contains("busybox"),
            "{e}"
        );
        let e = r
            .argv(&spec("sedge/worker", &["rm", "-rf", "/"], &[]))
            .unwrap_err();
        assert_eq!(e.reason, "RunContainerError");
    }

    #[test]
    fn expansion_matches_the_kubelet() {
        let env: BTreeMap<&str, &str> = [("A", "1")].into_iter().collect();
        assert_eq!(expand("x$(A)y $(B) $$(A) $", &env), "x1y $(B) $(A) $");
    }

    #[test]
    fn paths_stay_under_the_root() {
        let root = Path::new("/data/pods/u/c");
        assert_eq!(
            under_root(root, "/etc/config"),
            Path::new("/data/pods/u/c/etc/config")
        );
        assert_eq!(
            under_root(root, "../../etc/passwd"),
            Path::new("/data/pods/u/c/etc/passwd")
        );
    }

    #[test]
    fn runs_reports_exit_codes_and_adopts() {
        let dir = tempfile::tempdir().unwrap();
        let r = rt();
        let rtm = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rtm.block_on(async {
            let mut s = spec("busybox", &["sh", "-c", "echo hello-$(WHO); exit 3"], &[]);
            s.root = dir.path().into();
            s.working_dir = dir.path().into();
            s.log_path = dir.path().join("c.log");
            let mut c = r.start_process(&s).unwrap();
            let exit = loop {
                if let Some(e) = c.poll_exit() {
                    break e;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            };
            assert_eq!(exit, Exit::Code(3));
            assert_eq!(
                std::fs::read_to_string(&s.log_path).unwrap(),
                "hello-edge\n"
            );

            let mut s2 = s.clone();
            s2.command = vec!["sleep".into(), "30".into()];
            let c = r.start_process(&s2).unwrap();
            let rec = ContainerRecord {
                pod_uid: "u".into(),
                name: "c".into(),
                pid: c.id().parse().unwrap(),
                start_ticks: c.start_ticks(),
                started_at: String::new(),
                restarts: 0,
                last_terminated: None,
                spec_hash: String::new(),
                container_id: String::new(),
            };
            let mut adopted = r.adopt(&rec).await.expect("running process is adopted");
            assert_eq!(adopted.poll_exit(), None);
            adopted.signal(Signal::Kill);
            drop(c);
            let mut stale = rec.clone();
            stale.start_ticks += 1;
            assert!(
                r.adopt(&stale).await.is_none(),
                "a recycled pid is not adopted"
            );
            let t0 = std::time::Instant::now();
            while adopted.poll_exit().is_none() {
                assert!(t0.elapsed().as_secs() < 5, "killed process never went away");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let e = r
                .start_process(&spec("busybox", &["no-such-program-x"], &[]))
                .err()
                .unwrap();
            assert!(e.message.contains("executable file not found"), "{e}");
        });
    }
}
