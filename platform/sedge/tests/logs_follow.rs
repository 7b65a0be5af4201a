//! `kubectl logs -f` through the channel against `sedge up`: the log so far, then lines the
//! container writes after the follow started, and the stream ends by itself when the container
//! ends.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{up, wait_for};

#[test]
fn logs_follow_streams_new_lines_and_ends_with_the_container() {
    let up = up();
    let marker = up.dir.path().join("go");
    up.apply(&format!(
        "
apiVersion: v1
kind: Pod
metadata: {{name: talker}}
spec:
  restartPolicy: Never
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: [sh, -c, 'echo before; while [ ! -f {m} ]; do sleep 0.1; done; echo after-1; sleep 1; echo after-2']
",
        m = marker.display()
    ));
    wait_for("talker running", Duration::from_secs(60), || {
        up.pod("talker")
            .filter(|p| p["status"]["phase"] == "Running")
            .map(|_| ())
    });

    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(up.kubeconfig())
        .args(["logs", "-f", "talker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "before");
    // Only now may the container go on: what follows was written after the follow started.
    std::fs::write(&marker, "").unwrap();
    let t0 = Instant::now();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(rest, ["after-1", "after-2"], "{err}");
    assert!(status.success(), "kubectl logs -f: {err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the stream ended with the container"
    );

    // A finished container's log is returned at once, followed or not.
    let out = up.ok(&["logs", "-f", "talker"]);
    assert_eq!(out, "before\nafter-1\nafter-2\n");
}
