//! The node's embedded MQTT broker: MQTT 3.1.1 on a local TCP port, enough for the device
//! topics and the apps and mappers that use them (CONNECT, SUBSCRIBE with `+` and `#`,
//! UNSUBSCRIBE, PUBLISH at QoS 0 and 1, PING, DISCONNECT; packets are read and written with
//! rumqttc's codec).
//!
//! Why not rumqttd: it refuses subscriptions to topics that start with `$` ("Invalid filter
//! prefix") and drops the connection, and every KubeEdge device topic starts with `$hw/`. An
//! external broker (`mosquitto`) can be used instead (`mqtt_broker`).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] clients, [`MAX_SUBSCRIPTIONS`] filters each, packets of
//! at most [`crate::mqtt::MAX_PACKET_BYTES`], [`OUTBOX_BYTES`] of messages waiting per client (a
//! slow client loses the newest messages beyond that, counted, rather than slowing the others),
//! and a
//! client silent for one and a half keep-alives is disconnected. Not supported: QoS 2 (the
//! connection is closed), retained messages, persistent sessions, authentication (bind the
//! broker to localhost).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::mqtt::MAX_PACKET_BYTES;

/// Most clients at once.
pub const MAX_CONNECTIONS: usize = 1000;
/// Most filters one client may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Bytes of messages waiting for one client; beyond that new ones for it are dropped.
pub const OUTBOX_BYTES: usize = 8 * 1024 * 1024;

/// A client's outgoing queue, bounded by the bytes it holds.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Packet>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Outbox {
    /// Queues `p` unless the client already has [`OUTBOX_BYTES`] waiting.
    fn send(&self, p: Packet) -> bool {
        let size = p.size();
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > OUTBOX_BYTES {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        if self.tx.send(p).is_err() {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }
}

struct Sub {
    conn: u64,
    filter: String,
    qos: QoS,
    tx: Outbox,
}

#[derive(Default)]
struct State {
    subs: Mutex<Vec<Sub>>,
    conns: AtomicU64,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

/// Whether `filter` (with `+` and `#`) matches `topic`; wildcards at the first level do not
/// match topics that start with `$` (MQTT 3.1.1, 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `filter` is a valid subscription: not empty, `#` only last and alone in its level,
/// `+` alone in its level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i == levels.len() - 1))
            && (!l.contains('+') || *l == "+")
    })
}

/// Starts the broker on `listen` (port 0 picks one); returns the address it listens on.
pub fn start(listen: SocketAddr) -> Result<SocketAddr, String> {
    start_owned(listen).map(|(a, _)| a)
}

/// [`start`], also returning the accept loop: aborting it closes the listener (connections
/// already open run until their clients go).
pub fn start_owned(
    listen: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let std = std::net::TcpListener::bind(listen)
        .map_err(|e| format!("MQTT broker cannot listen on {listen}: {e}"))?;
    std.set_nonblocking(true).map_err(|e| e.to_string())?;
    let bound = std.local_addr().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(std).map_err(|e| e.to_string())?;
    let state = Arc::new(State::default());
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if state.conns.load(Ordering::Relaxed) as usize >= MAX_CONNECTIONS {
                tracing::warn!(%peer, "MQTT broker full; connection refused");
                continue;
            }
            state.conns.fetch_add(1, Ordering::Relaxed);
            let st = state.clone();
            tokio::spawn(async move {
                let id = st.next_id.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = serve(&st, id, stream).await {
                    tracing::debug!(%peer, "MQTT client closed: {e}");
                }
                st.subs.lock().unwrap().retain(|s| s.conn != id);
                st.conns.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    tracing::info!(%bound, "MQTT broker listening");
    Ok((bound, accept))
}

/// Reads one packet, reading more from `r` as needed; `None` at end of stream.
async fn next_packet(
    r: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<Packet>, String> {
    loop {
        match Packet::read(buf, MAX_PACKET_BYTES) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        if r.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Ok(None);
        }
    }
}

async fn serve(state: &Arc<State>, id: u64, stream: TcpStream) -> Result<(), String> {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(Duration::from_secs(10), next_packet(&mut rd, &mut buf))
        .await
        .map_err(|_| "no CONNECT within 10 s".to_string())??;
    let Some(Packet::Connect(connect)) = first else {
        return Err("the first packet was not CONNECT".into());
    };
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive).max(1) * 3 / 2 + 1);
    let (raw_tx, mut rx) = mpsc::unbounded_channel::<Packet>();
    let tx = Outbox {
        tx: raw_tx,
        queued: Arc::default(),
    };
    let queued = tx.queued.clone();
    // One writer per client: replies and routed messages in order.
    let writer = tokio::spawn(async move {
        let mut out = BytesMut::new();
        let mut pkid: u16 = 0;
        while let Some(mut p) = rx.recv().await {
            queued.fetch_sub(p.size(), Ordering::Relaxed);
            if let Packet::Publish(publish) = &mut p
                && publish.qos != QoS::AtMostOnce
            {
                pkid = pkid.wrapping_add(1).max(1);
                publish.pkid = pkid;
            }
            out.clear();
            if p.write(&mut out, MAX_PACKET_BYTES).is_err() || wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let send = |p: Packet| {
        tx.send(p)
            .then_some(())
            .ok_or_else(|| "the client is not reading".to_string())
    };
    send(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )))?;
    let result = loop {
        let packet = match tokio::time::timeout(keep_alive, next_packet(&mut rd, &mut buf)).await {
            Err(_) => break Err("keep-alive expired".to_string()),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(None)) | Ok(Ok(Some(Packet::Disconnect))) => break Ok(()),
            Ok(Ok(Some(p))) => p,
        };
        match packet {
            Packet::PingReq => send(Packet::PingResp)?,
            Packet::Subscribe(s) => {
                let mut codes = Vec::new();
                let mut subs = state.subs.lock().unwrap();
                let mine = subs.iter().filter(|x| x.conn == id).count();
                for (i, f) in s.filters.iter().enumerate() {
                    if !valid_filter(&f.path) || mine + i >= MAX_SUBSCRIPTIONS {
                        codes.push(SubscribeReasonCode::Failure);
                        continue;
                    }
                    let qos = if f.qos == QoS::AtMostOnce {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    subs.retain(|x| !(x.conn == id && x.filter == f.path));
                    subs.push(Sub {
                        conn: id,
                        filter: f.path.clone(),
                        qos,
                        tx: tx.clone(),
                    });
                    codes.push(SubscribeReasonCode::Success(qos));
                }
                drop(subs);
                send(Packet::SubAck(SubAck::new(s.pkid, codes)))?;
            }
            Packet::Unsubscribe(u) => {
                state
                    .subs
                    .lock()
                    .unwrap()
                    .retain(|x| !(x.conn == id && u.topics.contains(&x.filter)));
                send(Packet::UnsubAck(UnsubAck::new(u.pkid)))?;
            }
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    break Err("QoS 2 is not supported".into());
                }
                if p.topic.is_empty() || p.topic.contains(['+', '#', '\0']) {
                    break Err(format!("cannot publish to {:?}", p.topic));
                }
                if p.qos == QoS::AtLeastOnce {
                    send(Packet::PubAck(PubAck::new(p.pkid)))?;
                }
                route(state, &p);
            }
            // Acknowledgements of what we sent at QoS 1: nothing is kept to resend.
            Packet::PubAck(_) => {}
            other => break Err(format!("unexpected packet {other:?}")),
        }
    };
    drop(tx);
    writer.abort();
    result
}

/// Delivers `p` to every matching subscription (a client subscribed twice gets it once).
fn route(state: &State, p: &Publish) {
    let subs = state.subs.lock().unwrap();
    let mut sent = std::collections::HashSet::new();
    for s in subs.iter() {
        if !matches(&s.filter, &p.topic) || !sent.insert(s.conn) {
            continue;
        }
        let qos = if s.qos == QoS::AtMostOnce || p.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let out = Publish::new(p.topic.clone(), qos, p.payload.clone());
        if !s.tx.send(Packet::Publish(out)) {
            let dropped = state.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "an MQTT client is not reading; messages for it dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{Connect, Subscribe};

    async fn write(s: &mut TcpStream, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 20).unwrap();
        s.write_all(&b).await.unwrap();
    }

    async fn read(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(5), next_packet(s, buf))
            .await
            .expect("an answer or a close")
            .ok()
            .flatten()
    }

    async fn connected(addr: SocketAddr) -> (TcpStream, BytesMut) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = BytesMut::new();
        write(&mut s, Packet::Connect(Connect::new("t"))).await;
        assert!(matches!(
            read(&mut s, &mut buf).await,
            Some(Packet::ConnAck(_))
        ));
        (s, buf)
    }

    #[tokio::test]
    async fn attacks_close_only_the_attackers_connection() {
        let addr = start("127.0.0.1:0".parse().unwrap()).unwrap();
        // A subscriber that must keep working throughout.
        let (mut sub, mut sbuf) = connected(addr).await;
        write(
            &mut sub,
            Packet::Subscribe(Subscribe::new("$hw/#", QoS::AtMostOnce)),
        )
        .await;
        assert!(matches!(
            read(&mut sub, &mut sbuf).await,
            Some(Packet::SubAck(_))
        ));
        // Garbage instead of CONNECT: closed.
        let mut g = TcpStream::connect(addr).await.unwrap();
        g.write_all(&[0xff; 64]).await.unwrap();
        assert!(read(&mut g, &mut BytesMut::new()).await.is_none());
        // A publish over the packet limit: closed before it is read whole.
        let (mut big, mut bbuf) = connected(addr).await;
        let huge = Publish::new("$hw/x", QoS::AtMostOnce, vec![b'x'; MAX_PACKET_BYTES + 1]);
        let mut b = BytesMut::new();
        Packet::Publish(huge).write(&mut b, 1 << 20).unwrap();
        let _ = big.write_all(&b).await;
        assert!(read(&mut big, &mut bbuf).await.is_none());
        // A wildcard in a publish topic, and QoS 2: closed.
        for p in [
            Publish::new("$hw/+/x", QoS::AtMostOnce, "v"),
            Publish::new("$hw/x", QoS::ExactlyOnce, "v"),
        ] {
            let (mut c, mut cbuf) = connected(addr).await;
            let mut p = p;
            p.pkid = 1;
            write(&mut c, Packet::Publish(p)).await;
            assert!(read(&mut c, &mut cbuf).await.is_none());
        }
        // An invalid filter is refused in the SUBACK, the connection stays.
        let (mut c, mut cbuf) = connected(addr).await;
        write(
            &mut c,
            Packet::Subscribe(Subscribe::new("a/#/b", QoS::AtMostOnce)),
        )
        .await;
        match read(&mut c, &mut cbuf).await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.return_codes, [SubscribeReasonCode::Failure])
            }
            other => panic!("{other:?}"),
        }
        // The subscriber still gets what is published.
        write(
            &mut c,
            Packet::Publish(Publish::new("$hw/ok", QoS::AtMostOnce, "v")),
        )
        .await;
        match read(&mut sub, &mut sbuf).await {
            Some(Packet::Publish(p)) => {
                assert_eq!((p.topic.as_str(), &p.payload[..]), ("$hw/ok", &b"v"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        for (f, t, want) in [
            (
                "$hw/events/device/+/+/twin/update",
                "$hw/events/device/default/d/twin/update",
                true,
            ),
            (
                "$hw/events/device/+/+/twin/update",
                "$hw/events/device/default/d/twin/get",
                false,
            ),
            ("$hw/#", "$hw/events/x", true),
            ("#", "$hw/events/x", false),
            ("+/events/x", "$hw/events/x", false),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/b", "a/b", true),
        ] {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
        for (f, ok) in [
            ("a/#", true),
            ("a/#/b", false),
            ("a+/b", false),
            ("", false),
            ("+", true),
        ] {
            assert_eq!(valid_filter(f), ok, "{f}");
        }
    }
}
