//! Links shaped like real edge uplinks, for benchmarks: a TCP proxy between the edge worker and
//! the cloud worker that gives every byte a link's bandwidth, one-way delay, jitter and loss.
//!
//! - **Bandwidth**: each direction is one token bucket shared by every connection through the link
//!   (an uplink is one pipe): a chunk of `n` bytes occupies the link for `8n / bandwidth` seconds
//!   after the previous chunk's occupancy ends.
//! - **Delay and jitter**: a chunk is delivered `delay + U(-jitter, +jitter)` after it has been
//!   serialised; the delay line is pipelined (chunks in flight overlap, as on a wire) and keeps
//!   order (a chunk is never delivered before the one sent before it, as TCP's in-order delivery
//!   would hold it).
//! - **Loss**: TCP never loses bytes, it resends them; a chunk lost with probability `loss` is
//!   delivered one retransmission timeout late (`max(200 ms, 2 x (delay + jitter))`, Linux's
//!   minimum RTO), and the chunks behind it wait (head-of-line blocking).
//!
//! [`LinkProfile::check`] refuses values that cannot be a link, naming the key; [`self_check`]
//! measures a profile's delay and bandwidth through the proxy against what it should give.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A link between the edge and the cloud (testenv's `link` section, Sedge's own key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    /// A name for tables (`5g-mec`, `4g-uplink`, ...).
    #[serde(default)]
    pub name: String,
    /// Bandwidth in each direction, Mbit/s; 0 for unlimited.
    #[serde(default)]
    pub bandwidth_mbit: f64,
    /// One-way delay, milliseconds.
    #[serde(default)]
    pub delay_ms: f64,
    /// Jitter around the delay (uniform, +-), milliseconds; at most the delay.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Share of chunks that need a retransmission, from 0 to 0.5.
    #[serde(default)]
    pub loss: f64,
}

impl LinkProfile {
    /// The profile named `name`: `loopback`, `5g-mec` (100 Mbit/s, 5 ms), `4g-uplink` (10 Mbit/s,
    /// 30 ms, 5 ms jitter) or `iot-uplink` (1 Mbit/s, 80 ms, 10 ms jitter, 1% loss).
    pub fn named(name: &str) -> Result<LinkProfile, String> {
        let p = |bandwidth_mbit, delay_ms, jitter_ms, loss| LinkProfile {
            name: name.into(),
            bandwidth_mbit,
            delay_ms,
            jitter_ms,
            loss,
        };
        match name {
            "loopback" => Ok(p(0.0, 0.0, 0.0, 0.0)),
            "5g-mec" => Ok(p(100.0, 5.0, 1.0, 0.0)),
            "4g-uplink" => Ok(p(10.0, 30.0, 5.0, 0.0)),
            "iot-uplink" => Ok(p(1.0, 80.0, 10.0, 0.01)),
            other => Err(format!(
                "unknown link profile {other:?}; known: loopback, 5g-mec, 4g-uplink, iot-uplink"
            )),
        }
    }

    /// Refuses values no link has, naming the key (`link.<key>`).
    pub fn check(&self) -> Result<(), String> {
        let bad =
            |key: &str, v: f64, want: &str| Err(format!("link.{key} is {v}; expected {want}"));
        if !(self.bandwidth_mbit.is_finite() && self.bandwidth_mbit >= 0.0) {
            return bad(
                "bandwidth_mbit",
                self.bandwidth_mbit,
                "Mbit/s, 0 or more (0: unlimited)",
            );
        }
        if self.bandwidth_mbit > 0.0 && self.bandwidth_mbit < 0.001 {
            return bad(
                "bandwidth_mbit",
                self.bandwidth_mbit,
                "at least 0.001 (1 kbit/s), or 0 for unlimited",
            );
        }
        if !(self.delay_ms.is_finite() && (0.0..=10_000.0).contains(&self.delay_ms)) {
            return bad("delay_ms", self.delay_ms, "milliseconds from 0 to 10000");
        }
        if !(self.jitter_ms.is_finite() && self.jitter_ms >= 0.0 && self.jitter_ms <= self.delay_ms)
        {
            return bad(
                "jitter_ms",
                self.jitter_ms,
                "milliseconds from 0 to the delay (delay_ms)",
            );
        }
        if !(self.loss.is_finite() && (0.0..=0.5).contains(&self.loss)) {
            return bad("loss", self.loss, "a share from 0 to 0.5 (0.01 is 1%)");
        }
        Ok(())
    }

    /// Whether the link changes nothing.
    pub fn is_loopback(&self) -> bool {
        self.bandwidth_mbit == 0.0 && self.delay_ms == 0.0 && self.loss == 0.0
    }

    /// What a transfer of `bytes` in one direction should take: delay plus serialisation.
    pub fn expected_transfer(&self, bytes: usize) -> Duration {
        let serial = if self.bandwidth_mbit > 0.0 {
            bytes as f64 * 8.0 / (self.bandwidth_mbit * 1e6)
        } else {
            0.0
        };
        Duration::from_secs_f64(self.delay_ms / 1e3 + serial)
    }

    fn retransmission_timeout(&self) -> Duration {
        Duration::from_secs_f64(((self.delay_ms + self.jitter_ms) * 2.0).max(200.0) / 1e3)
    }
}

/// One direction of the link: when it is next free, and the last delivery time (order).
#[derive(Debug)]
struct Direction {
    free_at: Instant,
}

/// A running shaped link; dropping it stops accepting (connections through it end with their
/// peers).
pub struct ShapedLink {
    /// Where the edge connects.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ShapedLink {
    /// Starts a proxy on a free loopback port that carries connections to `upstream` over
    /// `profile` (which must pass [`LinkProfile::check`]).
    pub async fn start(upstream: SocketAddr, profile: LinkProfile) -> std::io::Result<ShapedLink> {
        profile.check().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let profile = Arc::new(profile);
        let up = Arc::new(Mutex::new(Direction {
            free_at: Instant::now(),
        }));
        let down = Arc::new(Mutex::new(Direction {
            free_at: Instant::now(),
        }));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (profile, up, down) = (profile.clone(), up.clone(), down.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        carry(cr, sw, profile.clone(), up),
                        carry(sr, cw, profile, down)
                    );
                });
            }
        });
        Ok(ShapedLink { addr, task })
    }
}

/// Chunks waiting in the delay line of one connection's direction; bounded, so a peer that does
/// not read holds the sender back as TCP's window would.
const IN_FLIGHT: usize = 256;

async fn carry(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    profile: Arc<LinkProfile>,
    dir: Arc<Mutex<Direction>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            let sent = {
                let mut d = dir.lock().unwrap_or_else(|p| p.into_inner());
                let start = d.free_at.max(now);
                let serial = if profile.bandwidth_mbit > 0.0 {
                    Duration::from_secs_f64(n as f64 * 8.0 / (profile.bandwidth_mbit * 1e6))
                } else {
                    Duration::ZERO
                };
                d.free_at = start + serial;
                d.free_at
            };
            let (jitter, lost) = {
                let mut rng = rand::rng();
                let j = if profile.jitter_ms > 0.0 {
                    rng.random_range(-profile.jitter_ms..=profile.jitter_ms)
                } else {
                    0.0
                };
                (j, profile.loss > 0.0 && rng.random_bool(profile.loss))
            };
            let mut at = sent + Duration::from_secs_f64((profile.delay_ms + jitter).max(0.0) / 1e3);
            if lost {
                at += profile.retransmission_timeout();
            }
            // In order: never before the chunk sent ahead of it.
            at = at.max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// What [`self_check`] measured.
#[derive(Debug, Clone)]
pub struct SelfCheck {
    /// Round trip of a 1-byte ping, against 2 x delay.
    pub rtt: Duration,
    /// What the round trip should be.
    pub expected_rtt: Duration,
    /// Time to carry `bytes` one way and a 1-byte answer back.
    pub transfer: Duration,
    /// What that should take.
    pub expected_transfer: Duration,
    /// Bytes sent for the bandwidth measure.
    pub bytes: usize,
}

impl SelfCheck {
    /// Measured over expected, for the round trip and the transfer (1.0 is exact).
    pub fn ratios(&self) -> (f64, f64) {
        let r = |a: Duration, b: Duration| {
            if b.is_zero() {
                1.0
            } else {
                a.as_secs_f64() / b.as_secs_f64()
            }
        };
        (
            r(self.rtt, self.expected_rtt),
            r(self.transfer, self.expected_transfer),
        )
    }
}

/// Measures `profile` through a [`ShapedLink`] to a local echo-ish peer: the median of 5 ping
/// round trips (1 byte each way), and the time for `bytes` one way plus a 1-byte answer. The
/// payload is chosen so that serialisation dominates on slow links.
pub async fn self_check(profile: &LinkProfile, bytes: usize) -> std::io::Result<SelfCheck> {
    let peer = TcpListener::bind("127.0.0.1:0").await?;
    let peer_addr = peer.local_addr()?;
    // The peer answers each 1-byte ping with a byte, and a payload's last byte with a byte.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = peer.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if buf[n - 1] == b'!' && s.write_all(b"!").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let link = ShapedLink::start(peer_addr, profile.clone()).await?;
    let mut s = TcpStream::connect(link.addr).await?;
    s.set_nodelay(true)?;
    let mut one = [0u8; 1];
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        s.write_all(b"!").await?;
        s.read_exact(&mut one).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let mut payload = vec![b'.'; bytes.max(1)];
    *payload.last_mut().expect("not empty") = b'!';
    let t = Instant::now();
    s.write_all(&payload).await?;
    s.read_exact(&mut one).await?;
    let transfer = t.elapsed();
    Ok(SelfCheck {
        rtt: rtts[2],
        expected_rtt: profile.expected_transfer(1) * 2,
        transfer,
        expected_transfer: profile.expected_transfer(bytes) + profile.expected_transfer(1),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let ok = LinkProfile::named("4g-uplink").unwrap();
        assert_eq!(ok.check(), Ok(()));
        let cases = [
            (
                LinkProfile {
                    bandwidth_mbit: -1.0,
                    ..ok.clone()
                },
                "link.bandwidth_mbit",
            ),
            (
                LinkProfile {
                    bandwidth_mbit: f64::NAN,
                    ..ok.clone()
                },
                "link.bandwidth_mbit",
            ),
            (
                LinkProfile {
                    delay_ms: 20_000.0,
                    ..ok.clone()
                },
                "link.delay_ms",
            ),
            (
                LinkProfile {
                    jitter_ms: 31.0,
                    ..ok.clone()
                },
                "link.jitter_ms",
            ),
            (
                LinkProfile {
                    loss: 0.9,
                    ..ok.clone()
                },
                "link.loss",
            ),
        ];
        for (p, key) in cases {
            let e = p.check().unwrap_err();
            assert!(e.starts_with(key), "{key}: {e}");
        }
        assert!(
            LinkProfile::named("dialup")
                .unwrap_err()
                .contains("4g-uplink")
        );
        let e = serde_yaml::from_str::<LinkProfile>("bandwith_mbit: 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bandwith_mbit"), "{e}");
    }

    /// The proxy gives the profile's delay and bandwidth: each measured within 20% of what the
    /// profile says a known payload should take (the benchmark's own self-check).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shaped_link_gives_its_profiles_delay_and_bandwidth() {
        let profile = LinkProfile {
            name: "test".into(),
            bandwidth_mbit: 8.0,
            delay_ms: 40.0,
            jitter_ms: 0.0,
            loss: 0.0,
        };
        // 400 kB at 8 Mbit/s: 400 ms of serialisation, plus 2 x 40 ms.
        let c = self_check(&profile, 400_000).await.unwrap();
        let (rtt, transfer) = c.ratios();
        assert!((0.8..1.2).contains(&rtt), "round trip {c:?}");
        assert!((0.8..1.2).contains(&transfer), "transfer {c:?}");
        // Loopback is a pass-through.
        let c = self_check(&LinkProfile::named("loopback").unwrap(), 1000)
            .await
            .unwrap();
        assert!(c.expected_rtt.is_zero());
    }

    /// Bandwidth is the link's, not each connection's: two transfers at once take twice as long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_share_the_links_bandwidth() {
        let profile = LinkProfile {
            name: "shared".into(),
            bandwidth_mbit: 16.0,
            delay_ms: 1.0,
            jitter_ms: 0.0,
            loss: 0.0,
        };
        let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = peer.accept().await {
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                    let _ = s.write_all(&(sink.len() as u64).to_le_bytes()).await;
                });
            }
        });
        let link = ShapedLink::start(peer_addr, profile.clone()).await.unwrap();
        let send = |addr| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&vec![7u8; 200_000]).await.unwrap();
            s.shutdown().await.unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).await.unwrap();
            u64::from_le_bytes(n)
        };
        let t = Instant::now();
        let (a, b) = tokio::join!(send(link.addr), send(link.addr));
        let took = t.elapsed();
        assert_eq!((a, b), (200_000, 200_000), "every byte arrives");
        // 400 kB over one 16 Mbit/s link: 200 ms; per-connection shaping would give 100 ms.
        let expected = profile.expected_transfer(400_000);
        let ratio = took.as_secs_f64() / expected.as_secs_f64();
        assert!((0.8..1.3).contains(&ratio), "{took:?} vs {expected:?}");
    }
}
