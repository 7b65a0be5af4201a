//! `kubectl exec` through the channel against `sedge up`, with the real kubectl (WebSocket,
//! `v5.channel.k8s.io`): output, exit codes, standard input, a terminal, RBAC, a slow reader
//! that stalls only itself, and a link cut in the middle of a command.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, up, wait_for};

fn shell_pod(up: &Up, name: &str, node: &str) {
    up.apply(&format!(
        "
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: busybox:1.36
    command: [sleep, '3600']
    env: [{{name: GREETING, value: hello}}]
  - name: side
    image: busybox:1.36
    command: [sleep, '3600']
"
    ));
    wait_for(&format!("{name} running"), Duration::from_secs(60), || {
        up.pod(name)
            .filter(|p| p["status"]["phase"] == "Running")
            .filter(|p| {
                p["status"]["containerStatuses"]
                    .as_array()
                    .is_some_and(|c| c.iter().all(|c| c["state"]["running"].is_object()))
            })
            .map(|_| ())
    });
}

fn kubectl(up: &Up) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig").arg(up.kubeconfig());
    c
}

/// Runs kubectl with `stdin`: (exit code, stdout, stderr).
fn run(up: &Up, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = kubectl(up)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut w, &data);
        });
    }
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn exec_returns_output_exit_codes_and_stdin_and_only_to_users_allowed_it() {
    let up = up();
    shell_pod(&up, "shell", "edge-1");

    // Output on both streams, the container's environment, and the exit code.
    let (code, out, err) = run(
        &up,
        &[
            "exec",
            "shell",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo $HOSTNAME $GREETING; echo oops >&2; exit 3",
        ],
        None,
    );
    assert_eq!(code, 3, "{out}{err}");
    assert_eq!(out, "shell hello\n");
    assert!(err.contains("oops"), "{err}");

    // Standard input piped in; its end reaches the command (v5's close frame).
    let (code, out, err) = run(
        &up,
        &[
            "exec", "-i", "shell", "-c", "main", "--", "tr", "a-z", "A-Z",
        ],
        Some(b"piped in\n"),
    );
    assert_eq!((code, out.as_str()), (0, "PIPED IN\n"), "{err}");

    // 4 MB of input and 4 MB of output through the credit windows, intact.
    let input: Vec<u8> = (0..4_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (code, out, err) = run(
        &up,
        &[
            "exec",
            "-i",
            "shell",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "cat | wc -c; head -c 4000000 /dev/zero | tr '\\0' x",
        ],
        Some(&input),
    );
    assert_eq!(code, 0, "{err}");
    let (count, rest) = out.split_once('\n').unwrap();
    assert_eq!(count.trim(), "4000000");
    assert_eq!(rest.len(), 4_000_000);
    assert!(rest.bytes().all(|b| b == b'x'));

    // A terminal: kubectl uses one only on a terminal of its own, so it runs under `script`.
    // The command sees a terminal, which takes the size kubectl's has (kubectl sends it just
    // after the start, as to the kubelet, so the command waits for it), and its output comes
    // back through it.
    let o = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty cols 91 rows 27; kubectl --kubeconfig {} exec -it shell -c side -- sh -c 'test -t 0 && test -t 1 && echo on-a-tty; while [ \"$(stty size)\" = \"0 0\" ]; do sleep 0.1; done; stty size'",
            up.kubeconfig().display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    // (`script` may echo what it feeds the terminal when its own input ends, so the two
    // lines are looked for separately.)
    assert!(out.contains("on-a-tty\r\n"), "{out:?}");
    assert!(out.contains("27 91\r\n"), "{out:?}");

    // Errors the user can act on.
    let (code, _, err) = run(
        &up,
        &["exec", "shell", "-c", "main", "--", "no-such-cmd"],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("executable file not found"), "{err}");
    let (code, _, err) = run(&up, &["exec", "shell", "-c", "nope", "--", "true"], None);
    assert_ne!(code, 0);
    assert!(err.contains("container nope is not valid"), "{err}");

    // Only users allowed `create` on pods/exec get in: `view` does not allow it, `edit` does.
    for args in [
        &["create", "serviceaccount", "viewer"][..],
        &[
            "create",
            "rolebinding",
            "viewer",
            "--clusterrole=view",
            "--serviceaccount=default:viewer",
        ],
        &["create", "serviceaccount", "editor"],
        &[
            "create",
            "rolebinding",
            "editor",
            "--clusterrole=edit",
            "--serviceaccount=default:editor",
        ],
    ] {
        up.ok(args);
    }
    let token = |sa: &str| up.ok(&["create", "token", sa]).trim().to_string();
    let viewer = token("viewer");
    let (code, _, err) = run(
        &up,
        &[
            "--token", &viewer, "exec", "shell", "-c", "main", "--", "true",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("forbidden") && err.contains("pods/exec"),
        "{err}"
    );
    let editor = token("editor");
    let (code, out, err) = run(
        &up,
        &[
            "--token", &editor, "exec", "shell", "-c", "main", "--", "echo", "editor",
        ],
        None,
    );
    assert_eq!((code, out.as_str()), (0, "editor\n"), "{err}");
}

#[test]
fn a_slow_reader_stalls_only_its_own_exec() {
    let up = up();
    shell_pod(&up, "shell", "edge-1");
    // One client never reads: its command fills the stream's window and waits there.
    let mut stuck = kubectl(&up)
        .args([
            "exec",
            "shell",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "yes exec-output-that-nobody-reads",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Meanwhile 10 other commands on the same node finish, each with 1 MB of output.
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let kc = up.kubeconfig();
            std::thread::spawn(move || {
                let o = Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(kc)
                    .args([
                        "exec",
                        "shell",
                        "-c",
                        "main",
                        "--",
                        "sh",
                        "-c",
                        "head -c 1000000 /dev/zero; echo",
                    ])
                    .output()
                    .unwrap();
                (i, o)
            })
        })
        .collect();
    for h in handles {
        let (i, o) = h.join().unwrap();
        assert!(
            o.status.success() && o.stdout.len() == 1_000_001,
            "exec {i}: {} bytes, {}",
            o.stdout.len(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // And the stuck one was still there, stuck, not cut off.
    assert!(stuck.try_wait().unwrap().is_none());
    let mut line = String::new();
    BufReader::new(stuck.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "exec-output-that-nobody-reads\n");
    let _ = stuck.kill();
    let _ = stuck.wait();
}

#[test]
fn a_link_cut_during_exec_ends_it_with_an_error_and_the_node_keeps_working() {
    let up = up();
    let mut edge = common::join_edge(&up, "edge-2");
    wait_for("edge-2 Ready", Duration::from_secs(60), || {
        let (ok, out, _) = up.kubectl(&["get", "node", "edge-2"]);
        (ok && out.contains(" Ready")).then_some(())
    });
    shell_pod(&up, "far", "edge-2");
    let mut child = kubectl(&up)
        .args([
            "exec",
            "far",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo started; sleep 60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    edge.kill9();
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "kubectl ended with the link, not with the command"
    );
    assert!(err.contains("link to node edge-2 dropped"), "{err}");

    // Offline, exec says why.
    let (code, _, err) = run(&up, &["exec", "far", "-c", "main", "--", "true"], None);
    assert_ne!(code, 0);
    assert!(err.contains("not connected"), "{err}");

    // The agent comes back; its pod and exec work again.
    edge.start_again();
    wait_for("exec on edge-2 again", Duration::from_secs(60), || {
        let (code, out, _) = run(
            &up,
            &["exec", "far", "-c", "main", "--", "echo", "back"],
            None,
        );
        (code == 0 && out == "back\n").then_some(())
    });
}

#[test]
fn attach_shows_what_the_container_writes_from_then_on_and_ends_with_it() {
    let up = up();
    up.apply(
        "
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  restartPolicy: Never
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, 'i=0; while [ $i -lt 80 ]; do echo line-$i; i=$((i+1)); sleep 0.1; done; echo last >&2']
",
    );
    wait_for(
        "talker to have written line-5",
        Duration::from_secs(60),
        || {
            up.kubectl(&["logs", "talker"])
                .1
                .contains("line-5\n")
                .then_some(())
        },
    );
    let (code, out, err) = run(&up, &["attach", "talker"], None);
    assert_eq!(code, 0, "{err}");
    // What came after the attach, in order, from both streams, and the attach ended with the
    // container.
    let lines: Vec<&str> = out.lines().collect();
    let first: usize = lines[0].strip_prefix("line-").unwrap().parse().unwrap();
    assert!(first > 5, "the attach began at the log's start: {out}");
    let expected: Vec<String> = (first..80)
        .map(|i| format!("line-{i}"))
        .chain(["last".to_string()])
        .collect();
    assert_eq!(lines, expected);

    // Standard input cannot be attached to: the runtimes start containers without it.
    shell_pod(&up, "shell", "edge-1");
    let (code, _, err) = run(&up, &["attach", "-i", "shell", "-c", "main"], Some(b""));
    assert_ne!(code, 0);
    assert!(err.contains("not started with stdin"), "{err}");
}
