//! Readiness probes: `exec` (a host command in the container's root), `httpGet` (HTTP/1.1 GET,
//! 200-399 is success) and `tcpSocket` (connects). Named ports resolve through the container's
//! `ports`. With the process runtime pods share the node's network, so probes dial the node IP
//! unless the probe names a host.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn port(p: &IntOrString, container: &Container) -> Option<u16> {
    let name = match p {
        IntOrString::Int(n) => return u16::try_from(*n).ok(),
        IntOrString::String(s) => s,
    };
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    container
        .ports
        .as_ref()?
        .iter()
        .find(|x| x.name.as_deref() == Some(name))
        .and_then(|x| u16::try_from(x.container_port).ok())
}

/// Runs one probe; true on success. Every failure (timeout, refused, bad status) is false.
pub async fn run(
    probe: &Probe,
    container: &Container,
    node_ip: &str,
    root: &Path,
    timeout: Duration,
) -> bool {
    let work = async {
        if let Some(cmd) = probe.exec.as_ref().and_then(|e| e.command.as_ref()) {
            let Some((first, rest)) = cmd.split_first() else {
                return false;
            };
            return tokio::process::Command::new(first)
                .args(rest)
                .current_dir(root)
                .env("SEDGE_ROOT", root)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .is_ok_and(|s| s.success());
        }
        let (port_ref, host, path) = if let Some(h) = &probe.http_get {
            (
                &h.port,
                h.host.as_deref(),
                Some(h.path.as_deref().unwrap_or("/")),
            )
        } else if let Some(t) = &probe.tcp_socket {
            (&t.port, t.host.as_deref(), None)
        } else {
            return false;
        };
        let Some(p) = port(port_ref, container) else {
            return false;
        };
        let host = host
            .filter(|h| !h.is_empty())
            .unwrap_or(if node_ip.is_empty() {
                "127.0.0.1"
            } else {
                node_ip
            });
        let Ok(mut s) = tokio::net::TcpStream::connect((host, p)).await else {
            return false;
        };
        let Some(path) = path else {
            return true;
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{p}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c))
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    async fn run(probe: &Value, c: &Value, ip: &str, root: &Path, t: Duration) -> bool {
        let probe: Probe = serde_json::from_value(probe.clone()).unwrap();
        let c: Container = serde_json::from_value(c.clone()).unwrap();
        super::run(&probe, &c, ip, root, t).await
    }

    #[tokio::test]
    async fn exec_http_and_tcp_probes() {
        let dir = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(2);
        let c = json!({"name": "c", "ports": [{"name": "web", "containerPort": 0}]});
        assert!(
            run(
                &json!({"exec": {"command": ["true"]}}),
                &c,
                "",
                dir.path(),
                t
            )
            .await
        );
        assert!(
            !run(
                &json!({"exec": {"command": ["false"]}}),
                &c,
                "",
                dir.path(),
                t
            )
            .await
        );

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut i = 0;
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let code = if i == 0 {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
                i += 1;
            }
        });
        let c = json!({"name": "c", "ports": [{"name": "web", "containerPort": port}]});
        let probe = json!({"httpGet": {"path": "/ready", "port": "web"}});
        assert!(run(&probe, &c, "127.0.0.1", dir.path(), t).await);
        assert!(
            !run(&probe, &c, "127.0.0.1", dir.path(), t).await,
            "503 is a failure"
        );
        assert!(
            run(
                &json!({"tcpSocket": {"port": port}}),
                &c,
                "127.0.0.1",
                dir.path(),
                t
            )
            .await
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(
            !run(
                &json!({"tcpSocket": {"port": closed}}),
                &c,
                "127.0.0.1",
                dir.path(),
                t
            )
            .await
        );
    }
}
