//! Accepting edges: the TCP port's HTTP router (join endpoints and the WebSocket upgrade), QUIC
//! connections, the handshake that names the node from its certificate.

use super::*;

pub(super) async fn accept_tcp(
    inner: Arc<Inner>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sem: Arc<Semaphore>,
) {
    let mut stop = inner.shutdown.subscribe();
    let admission_stats = Arc::new(sedge_serve::Stats::default());
    let admission = sedge_serve::Admission::with_slots(
        sem,
        inner.cfg.max_pending_handshakes,
        admission_stats.clone(),
    );
    loop {
        let (sock, remote) = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the cap on pending handshakes, a socket that has sent nothing yet gives its slot
        // to the newcomer (idle sockets cannot lock nodes out); if all are handshaking, the
        // newcomer is shed.
        let evicted_before = admission_stats.evicted();
        let Some(ticket) = admission.admit(remote) else {
            Counters::inc(&inner.counters.handshakes_shed);
            drop(sock);
            continue;
        };
        if admission_stats.evicted() > evicted_before {
            Counters::inc(&inner.counters.handshakes_evicted);
        }
        let inner = inner.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let hs = inner.cfg.handshake_timeout_ms;
            let Some(permit) = ticket.first_byte(&sock, Duration::from_millis(hs)).await else {
                Counters::inc(&inner.counters.handshake_failures);
                return;
            };
            let Some(working) = work_slot(&inner).await else {
                return;
            };
            let accept = async { acceptor.accept(sock).await.map_err(|e| e.to_string()) };
            let Some(tls) = handshake(&inner, remote, "TLS handshake", accept).await else {
                return;
            };
            drop((permit, working));
            let der = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let peer = match der {
                Some(der) => Some(peer_of(&inner, der).await),
                None => None,
            };
            let svc_inner = inner.clone();
            let svc = hyper::service::service_fn(move |req| {
                route(svc_inner.clone(), peer.clone(), remote, req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(hs))
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// The node a verified client certificate names, unless the certificate has been revoked.
pub(super) async fn peer_of(inner: &Arc<Inner>, der: Vec<u8>) -> Result<Peer, String> {
    let node = tls::node_of_cert(&der)?;
    let tokens = inner.tokens.clone();
    let (revoked, der) = tokio::task::spawn_blocking(move || (tokens.is_revoked(&der), der))
        .await
        .map_err(|e| e.to_string())?;
    if revoked {
        return Err(format!(
            "the certificate of node {node} has been revoked (its join token was revoked or the node deleted); join again with a new token"
        ));
    }
    Ok(Peer { node, der })
}

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) async fn route(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    Ok(match (req.method().as_str(), path.as_str()) {
        ("GET", "/healthz") | ("GET", "/readyz") => text(StatusCode::OK, "ok"),
        ("GET", "/ca.crt") => {
            let mut r = text(StatusCode::OK, inner.ca.cert_pem());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-pem-file"),
            );
            r
        }
        ("POST", "/edge.crt") | ("GET", "/edge.crt") => sign(inner, peer, remote, req).await,
        ("GET", "/v1/tunnel") => upgrade(inner, peer, remote, req),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    })
}

pub(super) fn upgrade(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Response<Full<Bytes>> {
    let (node, fingerprint) = match peer {
        Some(Ok(p)) => (p.node, tls::ca_hash(&p.der)),
        Some(Err(why)) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, reason = %why, "tunnel refused");
            return text(StatusCode::FORBIDDEN, why);
        }
        None => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, "tunnel refused: no client certificate");
            return text(
                StatusCode::UNAUTHORIZED,
                "the tunnel needs a node client certificate: join first",
            );
        }
    };
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket upgrade request");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let max = inner.cfg.max_frame_bytes;
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    Some(link::ws_config(max)),
                )
                .await;
                run_session(inner, node, fingerprint, link::websocket(ws, remote)).await;
            }
            Err(e) => tracing::warn!(%remote, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

pub(super) async fn accept_quic(inner: Arc<Inner>, ep: quinn::Endpoint, sem: Arc<Semaphore>) {
    let mut stop = inner.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            Counters::inc(&inner.counters.handshakes_shed);
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let Some(working) = work_slot(&inner).await else {
                incoming.refuse();
                return;
            };
            let setup = async {
                let conn = incoming.await.map_err(|e| e.to_string())?;
                let node = conn
                    .peer_identity()
                    .and_then(|id| {
                        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .and_then(|certs| certs.first().map(|c| c.to_vec()));
                let node = match node {
                    Some(der) => peer_of(&inner, der).await,
                    None => Err("no client certificate".into()),
                };
                let (node, fingerprint) = match node {
                    Ok(p) => (p.node, tls::ca_hash(&p.der)),
                    Err(why) => {
                        conn.close(2u32.into(), why.as_bytes());
                        return Err(why);
                    }
                };
                let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, node, fingerprint, send, recv))
            };
            let Some((conn, node, fingerprint, send, recv)) =
                handshake(&inner, remote, "QUIC handshake", setup).await
            else {
                return;
            };
            drop((permit, working));
            let max = inner.cfg.max_frame_bytes;
            run_session(inner, node, fingerprint, link::quic(conn, send, recv, max)).await;
        });
    }
}

/// A slot to work on one more handshake (`max_concurrent_handshakes`), waited for within the
/// handshake timeout; `None` (counted as shed): close the connection, the node tries again later.
pub(super) async fn work_slot(inner: &Inner) -> Option<OwnedSemaphorePermit> {
    let limit = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    match tokio::time::timeout(limit, inner.working.clone().acquire_owned()).await {
        Ok(Ok(slot)) => Some(slot),
        _ => {
            Counters::inc(&inner.counters.handshakes_shed);
            None
        }
    }
}

/// Runs a connection's handshake under the handshake timeout; a failure or timeout is counted
/// and logged (failures as warnings: they name a certificate or protocol problem).
pub(super) async fn handshake<T>(
    inner: &Inner,
    remote: SocketAddr,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Option<T> {
    let limit = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(why)) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::warn!(%remote, reason = %why, "{what} failed");
            None
        }
        Err(_) => {
            Counters::inc(&inner.counters.handshake_failures);
            tracing::debug!(%remote, "{what} timed out");
            None
        }
    }
}
