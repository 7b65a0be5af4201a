//! `pods/{name}/portforward`: SPDY/3.1 streams as kubectl opens them (inside a WebSocket,
//! `SPDY/3.1+portforward.k8s.io`, for kubectl 1.31+; or by a direct `SPDY/3.1` upgrade), each
//! connection a pair of streams (`streamtype: error` and `data`, same `requestid` and `port`)
//! carried to the pod's node as a channel stream ([`ops::PodExecSource`] with a
//! [`sedge_api::PortForwardRequest`]).
//!
//! Each connection is relayed by a task of its own with bounded queues both ways, so a slow
//! local client slows its own connection; the session's reader waits only when the data a
//! client sends cannot be taken by its connection (SPDY's flow control is not used by kubectl's
//! library, as with the kubelet).

use std::collections::HashMap;

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::*;
use crate::spdy::{self, Frame, Writer};
use sedge_api::tcp_frame::{CLOSE_WRITE, DATA};

/// The WebSocket subprotocol kubectl tunnels SPDY in.
const WS_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Connections one port-forward session may have open at once.
const MAX_CONNECTIONS: usize = 64;

/// Frames queued for the client, and per connection towards the node.
const QUEUE: usize = 16;

enum Transport {
    WebSocket,
    Spdy,
}

fn transport(headers: &HeaderMap) -> ApiResult<Transport> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let offered = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| {
                let p = p.trim();
                p == WS_PROTOCOL || p == "portforward.k8s.io"
            })
    };
    if upgrade == "websocket" && headers.contains_key("sec-websocket-key") {
        if offered("sec-websocket-protocol") {
            return Ok(Transport::WebSocket);
        }
        return Err(ApiError::bad_request(format!(
            "pods/portforward over WebSocket needs the subprotocol {WS_PROTOCOL} (kubectl 1.31 or newer)"
        )));
    }
    if upgrade.starts_with("spdy/3.1") {
        return Ok(Transport::Spdy);
    }
    Err(ApiError::bad_request(
        "pods/portforward needs an upgrade to SPDY/3.1 (or a WebSocket carrying it), as kubectl port-forward does",
    ))
}

/// `GET|POST pods/{name}/portforward`.
pub(super) async fn pod_port_forward(
    app: &Arc<App>,
    rt: Arc<ResourceType>,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    upgrade: Upgrade,
) -> ApiResult<Response> {
    let transport = transport(headers)?;
    let pod = get_pod(app, rt, ns, name).await?;
    let node = bound_node(&pod, name)?;
    let source = super::exec::stream_source(app, &node, "forward ports")?;
    let on_upgrade = upgrade.on.ok_or_else(|| {
        ApiError::bad_request("this connection cannot be upgraded (HTTP/1.1 is needed)")
    })?;
    let base = sedge_api::PortForwardRequest {
        namespace: ns.to_string(),
        pod: name.to_string(),
        uid: pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        port: 1,
        check_only: true,
    };
    // The node answers for the pod before the client is: an HTTP error says why.
    (source.0)(ops::PodExecRequest {
        node: node.clone(),
        open: sedge_api::StreamOpen::PortForward(base.clone()),
    })
    .await?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    let websocket = matches!(transport, Transport::WebSocket);
    if websocket {
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        let key = headers
            .get("sec-websocket-key")
            .map(|k| tungstenite::handshake::derive_accept_key(k.as_bytes()))
            .unwrap_or_default();
        if let Ok(v) = header::HeaderValue::from_str(&key) {
            h.insert("sec-websocket-accept", v);
        }
        h.insert(
            "sec-websocket-protocol",
            header::HeaderValue::from_static(WS_PROTOCOL),
        );
    } else {
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("SPDY/3.1"),
        );
        h.insert(
            "x-stream-protocol-version",
            header::HeaderValue::from_static("portforward.k8s.io"),
        );
    }
    let mut shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                tracing::debug!(error = %e, "port-forward: the client did not complete the upgrade");
                return;
            }
        };
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let pump = async move {
            if websocket {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(spdy::MAX_FRAME + 64 * 1024))
                    .max_frame_size(Some(spdy::MAX_FRAME + 64 * 1024));
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                let (mut sink, mut source) = ws.split();
                let read = async move {
                    while let Some(Ok(m)) = source.next().await {
                        match m {
                            WsMessage::Binary(b) if in_tx.send(b.clone()).await.is_err() => return,
                            WsMessage::Close(_) => return,
                            _ => {}
                        }
                    }
                };
                let write = async move {
                    while let Some(f) = out_rx.recv().await {
                        if sink.send(WsMessage::Binary(f.into())).await.is_err() {
                            return;
                        }
                    }
                    let _ = sink.close().await;
                };
                tokio::select! { _ = read => {}, _ = write => {} }
            } else {
                let (mut rd, mut wr) = tokio::io::split(io);
                let read = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if in_tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                };
                let write = async move {
                    while let Some(f) = out_rx.recv().await {
                        if wr.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                    let _ = wr.shutdown().await;
                };
                tokio::select! { _ = read => {}, _ = write => {} }
            }
        };
        let session = session(in_rx, out_tx, source, node, base);
        tokio::select! {
            _ = async { tokio::join!(pump, session) } => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    });
    Ok(resp)
}

/// A connection's two streams as the client opened them.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<u32>,
    port: String,
    /// Data from the client, once the relay runs.
    to_relay: Option<mpsc::Sender<Bytes>>,
}

/// The SPDY session: frames in, replies and relays out, until the client goes.
async fn session(
    mut input: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
    source: ops::PodExecSource,
    node: String,
    base: sedge_api::PortForwardRequest,
) {
    let mut reader = spdy::Reader::default();
    let mut writer = Writer::default();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut by_stream: HashMap<u32, String> = HashMap::new();
    while let Some(chunk) = input.recv().await {
        reader.push(&chunk);
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "port-forward: malformed SPDY from the client; closing");
                    return;
                }
            };
            match frame {
                Frame::SynStream { id, headers, .. } => {
                    if out.send(writer.syn_reply(id)).await.is_err() {
                        return;
                    }
                    let get = |k: &str| {
                        headers
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    };
                    let (kind, port, request) = (get("streamtype"), get("port"), get("requestid"));
                    // Connections whose relay ended are forgotten.
                    pairs.retain(|_, p| p.to_relay.as_ref().is_none_or(|t| !t.is_closed()));
                    by_stream.retain(|_, r| pairs.contains_key(r));
                    if pairs.len() >= MAX_CONNECTIONS && !pairs.contains_key(&request) {
                        let _ = out.send(Writer::rst_stream(id)).await;
                        continue;
                    }
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.port = port;
                    match kind.as_str() {
                        "error" => pair.error = Some(id),
                        "data" => pair.data = Some(id),
                        _ => {
                            let _ = out.send(Writer::rst_stream(id)).await;
                            continue;
                        }
                    }
                    by_stream.insert(id, request.clone());
                    if let (Some(error), Some(data), None) = (pair.error, pair.data, &pair.to_relay)
                    {
                        let (tx, rx) = mpsc::channel(QUEUE);
                        pair.to_relay = Some(tx);
                        tokio::spawn(relay(
                            RelayEnds {
                                error,
                                data,
                                from_client: rx,
                                out: out.clone(),
                            },
                            pair.port.clone(),
                            source.clone(),
                            node.clone(),
                            base.clone(),
                        ));
                    }
                }
                Frame::Data { id, data, fin } => {
                    let Some(pair) = by_stream.get(&id).and_then(|r| pairs.get(r)) else {
                        continue;
                    };
                    // Only the data stream carries bytes for the pod; the error stream's end
                    // (kubectl closes it at once) means nothing.
                    if pair.data != Some(id) {
                        continue;
                    }
                    let Some(tx) = pair.to_relay.clone() else {
                        continue;
                    };
                    for chunk in data.chunks(ops::PodExecStream::MAX_FRAME - 1) {
                        let mut f = Vec::with_capacity(chunk.len() + 1);
                        f.push(DATA);
                        f.extend_from_slice(chunk);
                        let _ = tx.send(f.into()).await;
                    }
                    if fin {
                        let _ = tx.send(Bytes::from_static(&[CLOSE_WRITE])).await;
                    }
                }
                Frame::RstStream { id } => {
                    if let Some(request) = by_stream.remove(&id)
                        && let Some(pair) = pairs.remove(&request)
                    {
                        for s in [pair.error, pair.data].into_iter().flatten() {
                            by_stream.remove(&s);
                        }
                    }
                }
                Frame::Ping { id } => {
                    if out.send(Writer::ping(id)).await.is_err() {
                        return;
                    }
                }
                Frame::GoAway => return,
                Frame::Ignored => {}
            }
        }
    }
}

struct RelayEnds {
    error: u32,
    data: u32,
    from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
}

/// One forwarded connection: a channel stream to the pod's port and back.
async fn relay(
    ends: RelayEnds,
    port: String,
    source: ops::PodExecSource,
    node: String,
    base: sedge_api::PortForwardRequest,
) {
    let RelayEnds {
        error,
        data,
        mut from_client,
        out,
    } = ends;
    let fail = |why: String| {
        let out = out.clone();
        async move {
            let _ = out.send(Writer::data(error, why.as_bytes(), true)).await;
            let _ = out.send(Writer::data(data, &[], true)).await;
        }
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return fail(format!("invalid port {port:?}: expected 1-65535")).await,
    };
    let stream = (source.0)(ops::PodExecRequest {
        node,
        open: sedge_api::StreamOpen::PortForward(sedge_api::PortForwardRequest {
            port,
            check_only: false,
            ..base
        }),
    })
    .await;
    let ops::PodExecStream {
        mut from_node,
        to_node,
    } = match stream {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()).await,
    };
    // Ends when the client resets the connection or leaves; a stream the node closed
    // leaves the last word (its error, or the end) to `down`.
    let up = async {
        while let Some(f) = from_client.recv().await {
            if to_node.send(f).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let down = async {
        loop {
            match from_node.recv().await {
                Some(Ok(f)) if f.first() == Some(&DATA) => {
                    if out.send(Writer::data(data, &f[1..], false)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(why)) => return fail(why).await,
                None => {
                    let _ = out.send(Writer::data(data, &[], true)).await;
                    let _ = out.send(Writer::data(error, &[], true)).await;
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `port` header that is not a port (from kubectl's side of the trust boundary) ends that
    /// pair of streams with the reason on the error stream; nothing is asked of the node.
    #[tokio::test]
    async fn a_port_header_that_is_not_a_port_is_refused_on_the_error_stream() {
        for bad in ["http", "0", "65536", "-1", "", "80 81"] {
            let (out_tx, mut out_rx) = mpsc::channel(8);
            let (_client_tx, from_client) = mpsc::channel(1);
            let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = asked.clone();
            let source = ops::PodExecSource(Arc::new(move |_| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async { Err(ApiError::BadRequest("not to be called".into())) })
            }));
            relay(
                RelayEnds {
                    error: 1,
                    data: 3,
                    from_client,
                    out: out_tx,
                },
                bad.to_string(),
                source,
                "edge-1".into(),
                sedge_api::PortForwardRequest::default(),
            )
            .await;
            let error = out_rx.recv().await.unwrap();
            let text = String::from_utf8_lossy(&error[8..]).into_owned();
            assert_eq!(
                &error[..4],
                &1u32.to_be_bytes(),
                "{bad:?}: the error stream"
            );
            assert!(
                text.contains(&format!("invalid port {bad:?}")) && text.contains("1-65535"),
                "{bad:?}: {text}"
            );
            let data = out_rx.recv().await.unwrap();
            assert_eq!(
                data,
                Writer::data(3, &[], true),
                "{bad:?}: data stream closed"
            );
            assert!(!asked.load(std::sync::atomic::Ordering::SeqCst), "{bad:?}");
        }
    }
}
