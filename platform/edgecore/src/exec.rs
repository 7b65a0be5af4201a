//! `kubectl exec` on the node: a command run in a container's environment, its standard streams
//! carried by a channel stream ([`sedge_tunnel::stream`]) in Kubernetes' channel protocol
//! (a first byte naming the channel, [`sedge_api::exec_channel`]).
//!
//! - **Process runtime**: the container is a host process, so the command runs on the host with
//!   that process's environment and working directory (read from `/proc`), in its own process
//!   group, killed when the stream ends. Only images the node lets run any host program
//!   (`host_commands: true` in the image map) allow it: for the others exec would hand out the
//!   node. `-t` gets a pseudo-terminal whose size follows the client's.
//! - **CRI runtime**: the CRI's `ExecSync` (no standard input or terminal yet).
//!
//! The outcome goes on the error channel as the kubelet writes it: a `Success` Status, or a
//! `Failure` with reason `NonZeroExitCode` and the code, which kubectl turns into its own exit
//! code.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sedge_api::{ExecRequest, exec_channel as ch, kind};
use sedge_tunnel::stream::{MAX_FRAME, Stream, StreamReader, StreamWriter};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::Edged;
use crate::runtime::Runtime;
use crate::store::MetaStore;

/// Streams (exec, attach, port-forward, Service connections) one node has open at once.
pub const MAX_STREAMS: usize = 256;

/// How long a CRI `ExecSync` may run.
const CRI_EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where a command runs.
#[derive(Debug)]
pub enum Target {
    /// On the host, beside the container's main process.
    Process {
        /// The main process's environment.
        env: Vec<(OsString, OsString)>,
        /// Its working directory.
        cwd: PathBuf,
    },
    /// In a CRI container.
    Cri {
        /// The runtime's container id.
        id: String,
    },
    /// No command: the running instance's output (`kubectl attach`), from its log.
    Attach {
        /// The instance attached to (its end ends the attach).
        instance: crate::store::ContainerRecord,
    },
}

/// Whether `rec` names an instance running now: a CRI container id, or a process whose pid
/// still has the start time recorded (never a recycled pid).
pub(crate) fn running(rec: &crate::store::ContainerRecord, cri: bool) -> bool {
    if cri {
        !rec.container_id.is_empty()
    } else {
        rec.pid != 0 && crate::runtime::start_ticks(rec.pid) == Some(rec.start_ticks)
    }
}

/// Checks an exec request against what the node runs: the pod by UID, the container running,
/// an image that allows it. The error says what is wrong, for the user.
pub fn resolve(
    store: &MetaStore,
    runtime: &dyn Runtime,
    req: &ExecRequest,
) -> Result<Target, String> {
    crate::podcheck::uid(&req.uid)?;
    if !crate::podcheck::dns_label(&req.container) {
        return Err(format!(
            "container name {:?} is not a DNS-1123 label",
            req.container
        ));
    }
    if req.attach {
        if req.stdin || req.tty {
            return Err(format!(
                "container {} was not started with stdin or a terminal (Sedge's runtimes start containers without them); attach without -i/-t to see its output",
                req.container
            ));
        }
    } else if req.command.is_empty() {
        return Err("you must specify at least one command for the container".into());
    }
    let (ns, name) = (&req.namespace, &req.pod);
    let pod = store
        .get(kind::POD, ns, name)
        .map_err(|e| e.to_string())?
        .filter(|p| p["metadata"]["uid"] == req.uid.as_str())
        .ok_or_else(|| format!("pod {ns}/{name} is not on this node"))?;
    let image = pod["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == req.container.as_str()))
        .map(|c| c["image"].as_str().unwrap_or_default().to_string())
        .ok_or_else(|| {
            format!(
                "container {} is not valid for pod {ns}/{name}",
                req.container
            )
        })?;
    let rec = store
        .containers(&req.uid)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|r| r.name == req.container);
    let not_running = || {
        format!(
            "unable to upgrade connection: container {} in pod {ns}/{name} is not running",
            req.container
        )
    };
    let rec = rec
        .filter(|r| running(r, runtime.cri()))
        .ok_or_else(not_running)?;
    if req.attach {
        return Ok(Target::Attach { instance: rec });
    }
    if runtime.cri() {
        if req.stdin || req.tty {
            return Err(format!(
                "exec with standard input or a terminal (-i, -t) into a CRI container is not supported yet on node runtime {}; run the command without -i/-t",
                runtime.version()
            ));
        }
        return Ok(Target::Cri {
            id: rec.container_id,
        });
    }
    if !runtime.runs_host_commands(&image) {
        return Err(format!(
            "container {} runs image {image:?}, which the process runtime runs as a host program without isolation: exec would run any command on the node. Allow it with `host_commands: true` for the image in the edge's `images` map, or run the node with `runtime: cri`",
            req.container
        ));
    }
    let environ = std::fs::read(format!("/proc/{}/environ", rec.pid)).map_err(|e| {
        format!(
            "reading the environment of container {}: {e}",
            req.container
        )
    })?;
    let env = environ
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let i = kv.iter().position(|b| *b == b'=')?;
            Some((
                OsString::from_vec(kv[..i].to_vec()),
                OsString::from_vec(kv[i + 1..].to_vec()),
            ))
        })
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", rec.pid)).map_err(|e| {
        format!(
            "reading the working directory of container {}: {e}",
            req.container
        )
    })?;
    Ok(Target::Process { env, cwd })
}

/// The Status the error channel carries for an exit code.
pub fn status(code: i32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: exit status {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// A Status for a command that could not run.
fn failure(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500})
}

fn frame(channel: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + 1);
    b.put_u8(channel);
    b.put_slice(data);
    b.freeze()
}

/// Runs the command of `req` at `target`, its streams on `stream`, until it exits (then its
/// status goes out and the stream closes) or the stream ends (then it is killed).
pub async fn run(edged: Arc<Edged>, target: Target, req: ExecRequest, stream: Stream) {
    let runtime = edged.runtime();
    let Stream { reader, writer } = stream;
    let outcome = match target {
        Target::Attach { instance } => attach(&edged, instance, &req, reader, &writer).await,
        Target::Cri { id } => match runtime.exec_sync(&id, &req.command, CRI_EXEC_TIMEOUT) {
            Some(f) => match f.await {
                Ok(out) => {
                    let mut sent = Ok(());
                    for (c, data) in [(ch::STDOUT, &out.stdout), (ch::STDERR, &out.stderr)] {
                        for chunk in data.chunks(MAX_FRAME - 1) {
                            if sent.is_ok() {
                                sent = writer.send(frame(c, chunk)).await;
                            }
                        }
                    }
                    sent.map(|()| status(out.code))
                }
                Err(e) => Ok(failure(&e)),
            },
            None => Ok(failure(
                "this node's runtime cannot run commands in containers",
            )),
        },
        Target::Process { env, cwd } if req.tty => run_tty(env, cwd, &req, reader, &writer).await,
        Target::Process { env, cwd } => run_pipes(env, cwd, &req, reader, &writer).await,
    };
    match outcome {
        Ok(st) => {
            let _ = writer
                .send(frame(
                    ch::ERROR,
                    &serde_json::to_vec(&st).unwrap_or_default(),
                ))
                .await;
            writer.close(None).await;
        }
        Err(why) => {
            tracing::debug!(pod = %format!("{}/{}", req.namespace, req.pod), reason = %why, "exec stream ended before the command");
            writer.close(Some(&why)).await;
        }
    }
}

fn command(
    argv: &[String],
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

fn spawn_error(argv: &[String], e: &std::io::Error) -> Value {
    if e.kind() == std::io::ErrorKind::NotFound {
        failure(&format!(
            "exec: {:?}: executable file not found in $PATH",
            argv[0]
        ))
    } else {
        failure(&format!("starting {:?}: {e}", argv[0]))
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().or(st.signal().map(|s| 128 + s)).unwrap_or(255)
}

/// The command's status once `output` (its output sent, then its exit code) ends. If the
/// client goes first (`client` ends with the reason) or the output cannot be sent, the
/// command's process group is killed.
async fn until_exit(
    pid: Option<u32>,
    output: impl std::future::Future<Output = Result<i32, String>>,
    client: impl std::future::Future<Output = String>,
) -> Result<Value, String> {
    let r = tokio::select! {
        code = output => code.map(status),
        e = client => Err(e),
    };
    if r.is_err() {
        kill_group(pid);
    }
    r
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Copies `out` into frames of `channel` until it ends.
async fn pump(
    mut out: impl AsyncRead + Unpin,
    channel: u8,
    writer: &StreamWriter,
) -> Result<(), String> {
    let mut buf = vec![0u8; MAX_FRAME - 1];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => writer.send(frame(channel, &buf[..n])).await?,
        }
    }
}

/// What the client sent, as the command sees it.
enum Input {
    Stdin(Bytes),
    EndOfStdin,
    Resize(u16, u16),
}

/// The next input from the client; `Err` once the stream is gone (the client left, the link
/// dropped, or it broke the protocol).
async fn input(reader: &mut StreamReader) -> Result<Input, String> {
    loop {
        let f = match reader.recv().await {
            Some(Ok(f)) => f,
            Some(Err(why)) => return Err(why),
            None => return Err("the client closed the stream".into()),
        };
        match f.first() {
            Some(&ch::STDIN) => return Ok(Input::Stdin(f.slice(1..))),
            Some(&ch::CLOSE) if f.get(1) == Some(&ch::STDIN) => return Ok(Input::EndOfStdin),
            Some(&ch::RESIZE) => {
                let v: Value = serde_json::from_slice(&f[1..]).unwrap_or_default();
                let dim = |k: &str| v[k].as_u64().map(|x| x.min(u16::MAX as u64) as u16);
                if let (Some(w), Some(h)) = (dim("Width"), dim("Height")) {
                    return Ok(Input::Resize(w, h));
                }
            }
            // Anything else (a close of another channel, an empty frame) changes nothing.
            _ => {}
        }
    }
}

async fn run_pipes(
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    req: &ExecRequest,
    mut reader: StreamReader,
    writer: &StreamWriter,
) -> Result<Value, String> {
    let mut cmd = command(&req.command, env, cwd);
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(if req.stdout {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stderr(if req.stderr {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(spawn_error(&req.command, &e)),
    };
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let output = async {
        let out = async {
            match stdout {
                Some(o) => pump(o, ch::STDOUT, writer).await,
                None => Ok(()),
            }
        };
        let err = async {
            match stderr {
                Some(e) => pump(e, ch::STDERR, writer).await,
                None => Ok(()),
            }
        };
        let (a, b) = tokio::join!(out, err);
        a?;
        b?;
        child
            .wait()
            .await
            .map(exit_code)
            .map_err(|e| format!("waiting for the command: {e}"))
    };
    let client = async {
        loop {
            let next = match input(&mut reader).await {
                Ok(i) => i,
                Err(e) => return e,
            };
            match next {
                Input::Stdin(data) => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Input::EndOfStdin => stdin = None,
                Input::Resize(..) => {}
            }
        }
    };
    until_exit(pid, output, client).await
}

/// How often an attach looks for new output.
const ATTACH_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// `kubectl attach`: what the container writes from now on (its log, so stdout and stderr
/// arrive together on stdout), until it ends or the client leaves.
async fn attach(
    edged: &Arc<Edged>,
    instance: crate::store::ContainerRecord,
    req: &ExecRequest,
    mut reader: StreamReader,
    writer: &StreamWriter,
) -> Result<Value, String> {
    let mut log = sedge_api::LogRequest {
        uid: req.uid.clone(),
        container: req.container.clone(),
        tail_lines: Some(0),
        follow: true,
        ..Default::default()
    };
    let read = |log: sedge_api::LogRequest| {
        let (edged, ns, pod) = (edged.clone(), req.namespace.clone(), req.pod.clone());
        async move {
            tokio::task::spawn_blocking(move || edged.logs(&ns, &pod, &log))
                .await
                .map_err(|e| e.to_string())?
        }
    };
    let cri = edged.runtime().cri();
    let same_instance = |edged: &Arc<Edged>| {
        edged
            .store()
            .containers(&instance.pod_uid)
            .ok()
            .and_then(|rs| rs.into_iter().find(|r| r.name == instance.name))
            .is_some_and(|r| {
                r.pid == instance.pid
                    && r.container_id == instance.container_id
                    && r.started_at == instance.started_at
                    && running(&r, cri)
            })
    };
    let output = async {
        loop {
            let running = same_instance(edged);
            let reply = read(log.clone()).await?;
            let (cursor, data) = sedge_api::LogCursor::split(&reply)
                .ok_or_else(|| "malformed log reply".to_string())?;
            log.cursor = Some(cursor);
            log.tail_lines = None;
            for chunk in data.chunks(MAX_FRAME - 1) {
                writer.send(frame(ch::STDOUT, chunk)).await?;
            }
            // Once it has ended, what it wrote last has just been read.
            if !running {
                return Ok(status(0));
            }
            if data.is_empty() {
                tokio::time::sleep(ATTACH_POLL).await;
            }
        }
    };
    let client = async {
        loop {
            if let Err(e) = input(&mut reader).await {
                return e;
            }
        }
    };
    tokio::select! {
        r = output => r,
        e = client => Err(e),
    }
}

/// A pseudo-terminal: the master side for us, the slave for the command.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::fs::File,
}

fn open_pty() -> std::io::Result<Pty> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    Ok(Pty { master, slave })
}

fn resize(master: &std::os::fd::OwnedFd, w: u16, h: u16) {
    let _ = rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: h,
            ws_col: w,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    );
}

async fn run_tty(
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    req: &ExecRequest,
    mut reader: StreamReader,
    writer: &StreamWriter,
) -> Result<Value, String> {
    let pty = open_pty().map_err(|e| format!("allocating a terminal: {e}"))?;
    let slave = |what: &str| {
        pty.slave
            .try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("terminal for {what}: {e}"))
    };
    let mut cmd = command(&req.command, env, cwd);
    cmd.stdin(slave("stdin")?)
        .stdout(slave("stdout")?)
        .stderr(slave("stderr")?);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(spawn_error(&req.command, &e)),
    };
    // Only the command may hold the terminal now (the reader ends when it lets go).
    drop(cmd);
    drop(pty.slave);
    let pid = child.id();
    let master = Arc::new(pty.master);
    // The master is read and written by blocking threads: few streams, bounded per node.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let mut rd = std::fs::File::from(master.try_clone().map_err(|e| e.to_string())?);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_FRAME - 1];
        loop {
            match rd.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let mut wr = std::fs::File::from(master.try_clone().map_err(|e| e.to_string())?);
    std::thread::spawn(move || {
        while let Some(b) = in_rx.blocking_recv() {
            if wr.write_all(&b).is_err() {
                return;
            }
        }
    });
    let output = async {
        // The reader ends (EIO) once the command and whatever it left holding the terminal
        // have closed it.
        while let Some(b) = out_rx.recv().await {
            writer.send(frame(ch::STDOUT, &b)).await?;
        }
        child
            .wait()
            .await
            .map(exit_code)
            .map_err(|e| format!("waiting for the command: {e}"))
    };
    let client = async {
        let mut input_open = true;
        loop {
            let next = match input(&mut reader).await {
                Ok(i) => i,
                Err(e) => return e,
            };
            match next {
                Input::Stdin(data) if input_open => {
                    input_open = in_tx.send(data).await.is_ok();
                }
                Input::Stdin(_) => {}
                // End of input on a terminal: ^D, as a terminal user would type it.
                Input::EndOfStdin => {
                    let _ = in_tx.send(Bytes::from_static(&[4])).await;
                    input_open = false;
                }
                Input::Resize(w, h) => resize(&master, w, h),
            }
        }
    };
    until_exit(pid, output, client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_kubelets() {
        assert_eq!(status(0)["status"], "Success");
        let f = status(3);
        assert_eq!(f["reason"], "NonZeroExitCode");
        assert_eq!(f["details"]["causes"][0]["message"], "3");
    }
}
