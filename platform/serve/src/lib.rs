//! One bounded HTTP listener for Sedge's plain-TCP endpoints (the MetaServer, the
//! local-controller endpoint, the workers' inference and metrics servers).
//!
//! `axum::serve` holds every connection it accepts for as long as the peer likes: 20,000 idle
//! sockets exhaust the process's file descriptors, and a client that sends its headers at one
//! byte a second holds a task for minutes. [`serve`] bounds both, the way the API server's TLS
//! listener does:
//! - at most [`Limits::max_connections`] at once; past that the *newest* connection is closed at
//!   once (the ones already served keep working, and a slot frees as soon as any closes);
//! - a connection must send its first byte, and an HTTP/1 request its whole header block, within
//!   [`Limits::header_timeout`]; HTTP/1 keep-alive connections waiting for their next request
//!   are under the same deadline;
//! - an HTTP/2 connection (gRPC) is pinged and closed when the peer stops answering;
//! - on shutdown it stops accepting, lets requests in flight finish and then returns.
//!
//! The listener speaks HTTP/1.1 and HTTP/2 (prior knowledge, as gRPC clients use it) on one port.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Bounds on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the newest past this are closed on accept.
    pub max_connections: usize,
    /// Deadline for a connection's first byte and for each HTTP/1 request's headers (also how
    /// long an idle HTTP/1 keep-alive connection is kept), and for an HTTP/2 ping's answer.
    pub header_timeout: Duration,
}

impl Default for Limits {
    /// 1,024 connections, 10 s: generous for a node-local endpoint, far below the per-process
    /// open-file limit.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// What a listener has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    shed: AtomicU64,
    timed_out: AtomicU64,
}

impl Stats {
    /// Connections accepted and served.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed on accept because the cap was reached.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
    /// Connections closed because their first byte did not arrive in time.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then waits for the
/// requests in flight. Errors of single connections are logged, never returned.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve_with_stats(listener, app, limits, Arc::default(), shutdown).await
}

/// [`serve`], counting into `stats`.
pub async fn serve_with_stats(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(limits.header_timeout);
    let mut conns = tokio::task::JoinSet::new();
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (tcp, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let shed = stats.shed.fetch_add(1, Ordering::Relaxed) + 1;
                    if shed.is_power_of_two() {
                        tracing::warn!(%peer, shed, max = limits.max_connections, "connection limit reached; closing new connections");
                    }
                    drop(tcp);
                    continue;
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                let builder = builder.clone();
                let svc = TowerToHyperService::new(app.clone());
                let mut stop = stop_rx.clone();
                let stats = stats.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    // hyper's header deadline starts once it knows the protocol; a peer that
                    // never sends a byte would otherwise sit in protocol detection forever.
                    let mut probe = [0u8; 1];
                    match tokio::time::timeout(limits.header_timeout, tcp.peek(&mut probe)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return,
                        Err(_) => {
                            stats.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "no request in time; closing");
                            return;
                        }
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        },
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Stats>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stats = Arc::new(Stats::default());
        tokio::spawn(serve_with_stats(
            l,
            app,
            limits,
            stats.clone(),
            std::future::pending(),
        ));
        (addr, stats)
    }

    async fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Reads until EOF or `within`; true when the server closed the connection.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn past_the_cap_new_connections_are_shed_and_served_again_once_one_closes() {
        let (addr, stats) = start(Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(30),
        })
        .await;
        // The attack: idle connections that never send a request, as many as the cap.
        let mut idle = Vec::new();
        for _ in 0..4 {
            let s = TcpStream::connect(addr).await.unwrap();
            idle.push(s);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stats.accepted() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle connections were not accepted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_secs(10)).await,
            "the connection past the cap was kept"
        );
        assert!(stats.shed() >= 1);
        drop(idle.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = get(addr).await
                && r.ends_with("ok")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a freed slot was not reused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn silent_slow_and_idle_keep_alive_connections_are_closed_at_the_deadline() {
        let (addr, stats) = start(Limits {
            max_connections: 16,
            header_timeout: Duration::from_millis(300),
        })
        .await;
        // Never a byte.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
        assert!(stats.timed_out() >= 1);
        // Headers a byte at a time, slower than the deadline allows.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let mut closed = false;
        for b in
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
        {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            closed || closed_within(&mut slow, Duration::from_secs(10)).await,
            "the slow-header client was held"
        );
        // A keep-alive connection after its answer: closed once idle past the deadline.
        let mut ka = TcpStream::connect(addr).await.unwrap();
        ka.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = ka.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        assert!(
            closed_within(&mut ka, Duration::from_secs(10)).await,
            "an idle keep-alive connection was held"
        );
        // And an ordinary request still works.
        assert!(get(addr).await.unwrap().ends_with("ok"));
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let entered = entered.clone();
                async move {
                    if let Some(tx) = entered.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "done"
                }
            }),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(l, app, Limits::default(), async {
            let _ = stop_rx.await;
        }));
        let req = tokio::spawn(get(addr));
        entered_rx.await.unwrap();
        stop_tx.send(()).unwrap();
        assert!(req.await.unwrap().unwrap().ends_with("done"));
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returned after shutdown")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }
}
