//! `kubectl port-forward` through the channel against `sedge up`, with the real kubectl (SPDY/3.1
//! inside a WebSocket): an HTTP server in a pod answers through the forward, 20 connections at
//! once do not wait on one that never reads, and a closed port gives kubectl's error.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Up, free_port, up, wait_for};

/// `kubectl port-forward pod/<pod> <local>:<remote>`, once it says it listens; killed on drop.
struct Forward(Child, u16);

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn forward(up: &Up, pod: &str, remote: u16) -> Forward {
    let local = free_port();
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(up.kubeconfig())
        .args([
            "port-forward",
            &format!("pod/{pod}"),
            &format!("{local}:{remote}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("Forwarding from 127.0.0.1:{local}")),
        "{line}"
    );
    // kubectl writes a line per connection: keep its stdout open and drained.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Forward(child, local)
}

/// `GET path` over HTTP/1.0 through `port`: the body.
fn get(port: u16, path: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&all)));
    assert!(
        all.starts_with(b"HTTP/1.0 200"),
        "{:?}",
        String::from_utf8_lossy(&all[..at])
    );
    all[at + 4..].to_vec()
}

#[test]
fn port_forward_reaches_a_pod_server_and_one_slow_reader_stalls_nobody() {
    let up = up();
    let site = up.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello through the channel\n").unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(site.join("big.bin"), &big).unwrap();
    std::fs::write(site.join("huge.bin"), vec![7u8; 32_000_000]).unwrap();
    let port = free_port();
    up.apply(&format!(
        "
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: [python3, -m, http.server, --bind, 127.0.0.1, --directory, '{dir}', '{port}']
    ports: [{{containerPort: {port}}}]
",
        dir = site.display()
    ));
    wait_for("web serving", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    wait_for("web running", Duration::from_secs(60), || {
        up.pod("web")
            .filter(|p| p["status"]["phase"] == "Running")
            .map(|_| ())
    });

    let fwd = forward(&up, "web", port);
    assert_eq!(get(fwd.1, "/hello.txt"), b"hello through the channel\n");

    // One client that asks for 32 MB and never reads, through a kubectl of its own.
    let slow_fwd = forward(&up, "web", port);
    let mut slow = TcpStream::connect(("127.0.0.1", slow_fwd.1)).unwrap();
    write!(slow, "GET /huge.bin HTTP/1.0\r\n\r\n").unwrap();

    // Meanwhile 20 connections at once each get their megabyte, intact.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let p = fwd.1;
            std::thread::spawn(move || get(p, "/big.bin"))
        })
        .collect();
    for h in handles {
        assert!(
            h.join().unwrap() == big,
            "a forwarded download came back different"
        );
    }
    // The slow one was held back, not cut: it still reads its whole file.
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    slow.read_to_end(&mut got).unwrap();
    assert!(
        got.ends_with(&[7u8; 1000]) && got.len() > 32_000_000,
        "{}",
        got.len()
    );

    // A port nobody listens on: kubectl reports the node's error and the connection closes.
    let closed = free_port();
    let mut bad = forward(&up, "web", closed);
    let mut s = TcpStream::connect(("127.0.0.1", bad.1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let _ = bad.0.kill();
    let mut err = String::new();
    bad.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.to_lowercase().contains("connection refused") && err.contains("error forwarding port"),
        "{err}"
    );
}
