//! `pods/{name}/exec`: the WebSocket streaming protocol kubectl speaks (`v5.channel.k8s.io`,
//! and `v4.channel.k8s.io` for older clients), relayed to the pod's node through the
//! [`ops::PodExecSource`] the cloud core installed.
//!
//! Every WebSocket binary message is one frame whose first byte names the channel (stdin 0,
//! stdout 1, stderr 2, error 3, resize 4, and in v5 close 255); frames go to the node as they
//! are, split to the channel's frame size. The two directions are relayed independently, each
//! bounded, so a client that reads slowly slows only its own command.

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::*;

/// The subprotocols served, best first.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// The largest WebSocket message taken from a client (stdin arrives in kubectl's 32 KiB reads).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// What a request asks for, from its query (`command` repeats, one value per argument).
#[derive(Debug, Default, PartialEq)]
pub(super) struct ExecQuery {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecQuery {
    /// From a request's URI (decoded as every query is, repeats kept in order).
    pub(super) fn from_uri(uri: &axum::http::Uri, attach: bool) -> ApiResult<ExecQuery> {
        let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
        ExecQuery::parse(pairs.0, attach)
    }

    fn parse(pairs: Vec<(String, String)>, attach: bool) -> ApiResult<ExecQuery> {
        let mut q = ExecQuery::default();
        for (k, v) in pairs {
            let yes = || -> ApiResult<bool> {
                match v.as_str() {
                    "true" | "1" => Ok(true),
                    "false" | "0" | "" => Ok(false),
                    _ => Err(ApiError::bad_request(format!(
                        "{k}: {v:?} is not a boolean (true or false)"
                    ))),
                }
            };
            match k.as_str() {
                "command" => q.command.push(v.clone()),
                "container" => q.container = Some(v.clone()).filter(|c| !c.is_empty()),
                "stdin" | "input" => q.stdin = yes()?,
                "stdout" | "output" => q.stdout = yes()?,
                "stderr" | "error" => q.stderr = yes()?,
                "tty" => q.tty = yes()?,
                _ => {}
            }
        }
        if q.command.is_empty() && !attach {
            return Err(ApiError::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        if q.command.len() > 1024 || q.command.iter().map(String::len).sum::<usize>() > 128 * 1024 {
            return Err(ApiError::bad_request(
                "the command is too long (at most 1024 arguments and 128 KiB in all)",
            ));
        }
        if !(q.stdin || q.stdout || q.stderr) {
            return Err(ApiError::bad_request(
                "you must specify at least 1 of stdin, stdout, stderr",
            ));
        }
        // On a terminal, standard error is the terminal too.
        if q.tty {
            q.stderr = false;
        }
        Ok(q)
    }
}

/// The subprotocol to speak: the best one of ours the client offers.
fn negotiate(headers: &HeaderMap) -> ApiResult<&'static str> {
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    PROTOCOLS
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "none of the offered streaming subprotocols [{}] is served; this server speaks {} over WebSocket (kubectl 1.30 or newer)",
                offered.join(", "),
                PROTOCOLS.join(" and ")
            ))
        })
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && headers.contains_key("sec-websocket-key")
}

/// A `meta/v1` Status for the error channel.
fn failure_status(message: &str) -> Vec<u8> {
    let mut f = vec![sedge_api::exec_channel::ERROR];
    f.extend(
        serde_json::to_vec(&json!({
            "metadata": {}, "status": "Failure", "message": message,
            "reason": "InternalError", "code": 500,
        }))
        .unwrap_or_default(),
    );
    f
}

/// Where streams to pods' nodes are opened; 503 naming what would be done on `node` when no
/// cloud core is attached.
pub(super) fn stream_source(app: &App, node: &str, what: &str) -> ApiResult<ops::PodExecSource> {
    app.core.pod_exec.get().cloned().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "cannot {what} on node {node}: no cloud core is attached to this API server (run `sedge up`, or `sedge cloud` with the embedded API server)"
        ))
    })
}

/// `GET|POST pods/{name}/exec` (or `attach`) with a WebSocket upgrade.
pub(super) async fn pod_exec(
    app: &Arc<App>,
    rt: Arc<ResourceType>,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    upgrade: Upgrade,
    attach: bool,
) -> ApiResult<Response> {
    // kubectl tries WebSocket first and falls back to SPDY on any error: a SPDY request gets
    // the same checks (running nothing), so the user reads the error that matters.
    let websocket = is_websocket(headers);
    let protocol = if websocket { negotiate(headers)? } else { "" };
    let q = ExecQuery::from_uri(&upgrade.uri, attach)?;
    let pod = get_pod(app, rt, ns, name).await?;
    let container = pick_container(&pod, q.container.as_deref(), name)?;
    let node = bound_node(&pod, name)?;
    if let Some(phase @ ("Succeeded" | "Failed")) = pod["status"]["phase"].as_str() {
        return Err(ApiError::bad_request(format!(
            "cannot {} a container in a completed pod; current phase is {phase}",
            if attach { "attach to" } else { "exec into" }
        )));
    }
    let source = stream_source(app, &node, "exec")?;
    let on_upgrade = match upgrade.on {
        Some(u) => Some(u),
        None if !websocket => None,
        None => {
            return Err(ApiError::bad_request(
                "this connection cannot be upgraded (HTTP/1.1 is needed for WebSocket)",
            ));
        }
    };
    let key = headers
        .get("sec-websocket-key")
        .map(|k| tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    // The node checks the container and starts the command before the client is answered, so
    // a refusal is an HTTP error kubectl prints as it is.
    let stream = (source.0)(ops::PodExecRequest {
        node,
        open: sedge_api::StreamOpen::Exec(sedge_api::ExecRequest {
            namespace: ns.to_string(),
            pod: name.to_string(),
            uid: pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            container,
            command: if attach { Vec::new() } else { q.command },
            attach,
            stdin: q.stdin,
            stdout: q.stdout,
            stderr: q.stderr,
            tty: q.tty,
            check_only: !websocket,
        }),
    })
    .await?;
    let Some(on_upgrade) = on_upgrade.filter(|_| websocket) else {
        return Err(ApiError::bad_request(
            "pods/exec and pods/attach are served over WebSocket (v5.channel.k8s.io), not SPDY: use kubectl 1.30 or newer",
        ));
    };
    let v5 = protocol == PROTOCOLS[0];
    let mut shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "exec: the client did not complete the upgrade");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_CLIENT_MESSAGE))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config)).await;
        tokio::select! {
            _ = relay(ws, stream, v5) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&key) {
        h.insert("sec-websocket-accept", v);
    }
    h.insert(
        "sec-websocket-protocol",
        header::HeaderValue::from_static(protocol),
    );
    Ok(resp)
}

/// Moves frames between the client and the node until the command ends (its status is the
/// last frame) or the client goes away (the stream closes and the node kills the command).
async fn relay<S>(ws: WebSocketStream<S>, stream: ops::PodExecStream, v5: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ops::PodExecStream {
        mut from_node,
        to_node,
    } = stream;
    let (mut sink, mut source) = ws.split();
    let upstream = async move {
        while let Some(m) = source.next().await {
            let data = match m {
                Ok(WsMessage::Binary(b)) => b,
                Ok(WsMessage::Close(_)) | Err(_) => return,
                Ok(_) => continue,
            };
            let Some((&channel, body)) = data.split_first() else {
                continue;
            };
            // v4 has no close frames; a stray one is not passed on.
            if channel == sedge_api::exec_channel::CLOSE && !v5 {
                continue;
            }
            if body.is_empty() {
                if channel == sedge_api::exec_channel::STDIN {
                    continue;
                }
                if to_node.send(data.clone()).await.is_err() {
                    return;
                }
                continue;
            }
            for chunk in body.chunks(ops::PodExecStream::MAX_FRAME - 1) {
                let mut f = Vec::with_capacity(chunk.len() + 1);
                f.push(channel);
                f.extend_from_slice(chunk);
                if to_node.send(f.into()).await.is_err() {
                    return;
                }
            }
        }
    };
    let downstream = async move {
        let end = loop {
            match from_node.recv().await {
                Some(Ok(frame)) => {
                    if sink.send(WsMessage::Binary(frame)).await.is_err() {
                        return;
                    }
                }
                Some(Err(why)) => break Some(why),
                None => break None,
            }
        };
        if let Some(why) = end {
            let _ = sink
                .send(WsMessage::Binary(failure_status(&why).into()))
                .await;
        }
        let _ = sink
            .send(WsMessage::Close(Some(tungstenite::protocol::CloseFrame {
                code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.flush().await;
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query of a request for `/…?{q}`.
    fn query(q: &str, attach: bool) -> ApiResult<ExecQuery> {
        ExecQuery::from_uri(&format!("/exec?{q}").parse().unwrap(), attach)
    }

    #[test]
    fn a_query_keeps_every_argument_in_order() {
        let q = query(
            "command=sh&command=-c&command=echo+%24HOSTNAME%3B+exit+3&stdout=true&stderr=true&container=c1",
            false,
        )
        .unwrap();
        assert_eq!(q.command, ["sh", "-c", "echo $HOSTNAME; exit 3"]);
        assert_eq!(q.container.as_deref(), Some("c1"));
        assert!(q.stdout && q.stderr && !q.stdin && !q.tty);
    }

    #[test]
    fn bad_queries_are_refused_naming_what_is_wrong() {
        let e = |q: &str| query(q, false).unwrap_err().to_string();
        // Attach runs no command.
        assert!(query("stdout=true", true).is_ok());
        assert!(e("stdout=true").contains("at least one command"));
        assert!(e("command=ls").contains("at least 1 of stdin"));
        assert!(e("command=ls&stdout=maybe").contains("stdout"));
        let long = "command=x&".repeat(1100) + "stdout=true";
        assert!(e(&long).contains("too long"));
        // A truncated escape stays as written.
        let cmd = |q: &str| query(&format!("{q}&stdout=true"), false).unwrap().command;
        assert_eq!(cmd("command=a%2"), ["a%2"]);
        assert_eq!(cmd("command=%zz"), ["%zz"]);
    }

    #[test]
    fn the_best_offered_protocol_is_chosen() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            "v4.channel.k8s.io, v5.channel.k8s.io".parse().unwrap(),
        );
        assert_eq!(negotiate(&h).unwrap(), "v5.channel.k8s.io");
        h.insert(
            "sec-websocket-protocol",
            "base64.channel.k8s.io".parse().unwrap(),
        );
        assert!(
            negotiate(&h)
                .unwrap_err()
                .to_string()
                .contains("base64.channel.k8s.io")
        );
    }
}
