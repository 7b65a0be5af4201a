//! A fault-injecting proxy for TCP and UDP, put between an edge and the hub in tests and
//! benchmarks: the only fake in the channel's tests, and only for faults.
//!
//! Faults, switchable at any time through [`Faults`]:
//! - `down`: silence. TCP bytes are held (not lost: TCP would retransmit them) and UDP
//!   datagrams are dropped, while sockets stay open (a half-open link: neither side sees a
//!   close, only silence).
//! - `refuse`: new TCP connections are closed at once (the cloud is unreachable).
//! - `cut()`: every current connection is closed now (TCP RST-like; UDP forgets its flows, so
//!   the next datagram arrives from a new port).
//! - `delay`: every chunk/datagram waits this long (order kept).
//! - `drop` / `duplicate`: per-datagram probabilities (UDP only; TCP cannot lose or repeat bytes
//!   without breaking TLS, which is not a fault real links produce).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// The fault switches, shared by a proxy and the test driving it.
#[derive(Debug)]
pub struct Faults {
    down: AtomicBool,
    refuse: AtomicBool,
    delay_ms: AtomicU64,
    drop_ppm: AtomicU64,
    duplicate_ppm: AtomicU64,
    generation: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            down: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            drop_ppm: AtomicU64::new(0),
            duplicate_ppm: AtomicU64::new(0),
            generation: watch::channel(0).0,
        }
    }
}

impl Faults {
    /// Black-holes traffic (true) or lets it through (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// Refuses new TCP connections.
    pub fn set_refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }
    /// Delays every chunk or datagram.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    /// Drops this fraction of datagrams (UDP).
    pub fn set_drop(&self, p: f64) {
        self.drop_ppm.store((p * 1e6) as u64, Ordering::SeqCst);
    }
    /// Sends this fraction of datagrams twice (UDP).
    pub fn set_duplicate(&self, p: f64) {
        self.duplicate_ppm.store((p * 1e6) as u64, Ordering::SeqCst);
    }
    /// Closes every current connection.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
    /// Back to a healthy link.
    pub fn heal(&self) {
        self.set_down(false);
        self.set_refuse(false);
        self.set_delay(Duration::ZERO);
        self.set_drop(0.0);
        self.set_duplicate(0.0);
    }
    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }
    fn chance(ppm: &AtomicU64) -> bool {
        let p = ppm.load(Ordering::Relaxed);
        p > 0 && rand::random::<u64>() % 1_000_000 < p
    }
}

/// A TCP proxy.
#[derive(Debug)]
pub struct TcpFaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The switches.
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.faults.cut();
    }
}

impl TcpFaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpFaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if f.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let mut gen_rx = f.generation.subscribe();
                    gen_rx.mark_unchanged();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, f.clone()) => {}
                        _ = pipe(sr, cw, f.clone()) => {}
                        _ = gen_rx.changed() => {}
                    }
                });
            }
        });
        Ok(TcpFaultProxy { addr, faults, task })
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Down: hold the bytes, as a real outage does (TCP retransmits; it never skips bytes).
        while f.is_down() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = f.delay();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A UDP proxy (for QUIC).
#[derive(Debug)]
pub struct UdpFaultProxy {
    /// Where clients send.
    pub addr: SocketAddr,
    /// The switches.
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.faults.cut();
    }
}

impl UdpFaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<UdpFaultProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let task = tokio::spawn(async move {
            let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
            let mut gen_rx = f.generation.subscribe();
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, client) = tokio::select! {
                    r = front.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                    _ = gen_rx.changed() => {
                        flows.lock().unwrap_or_else(|p| p.into_inner()).clear();
                        continue;
                    }
                };
                let back = {
                    let mut fl = flows.lock().unwrap_or_else(|p| p.into_inner());
                    match fl.get(&client) {
                        Some(s) => s.clone(),
                        None => {
                            let Ok(std_sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
                                continue;
                            };
                            if std_sock.connect(upstream).is_err()
                                || std_sock.set_nonblocking(true).is_err()
                            {
                                continue;
                            }
                            let Ok(s) = UdpSocket::from_std(std_sock) else {
                                continue;
                            };
                            let s = Arc::new(s);
                            fl.insert(client, s.clone());
                            // Replies from upstream go back to this client until the flow is cut.
                            let (front2, s2, f2, mut g2) = (
                                front.clone(),
                                s.clone(),
                                f.clone(),
                                f.generation.subscribe(),
                            );
                            g2.mark_unchanged();
                            tokio::spawn(async move {
                                let mut b = vec![0u8; 65_536];
                                loop {
                                    let n = tokio::select! {
                                        r = s2.recv(&mut b) => match r { Ok(n) => n, Err(_) => continue },
                                        _ = g2.changed() => return,
                                    };
                                    forward(&f2, &front2, &b[..n], Some(client)).await;
                                }
                            });
                            s
                        }
                    }
                };
                forward(&f, &back, &buf[..n], None).await;
            }
        });
        Ok(UdpFaultProxy { addr, faults, task })
    }
}

async fn forward(f: &Faults, sock: &UdpSocket, data: &[u8], to: Option<SocketAddr>) {
    if f.is_down() || Faults::chance(&f.drop_ppm) {
        return;
    }
    let copies = if Faults::chance(&f.duplicate_ppm) {
        2
    } else {
        1
    };
    let d = f.delay();
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
    for _ in 0..copies {
        let _ = match to {
            Some(a) => sock.send_to(data, a).await,
            None => sock.send(data).await,
        };
    }
}
