//! Security tests: bad tokens, a tampered CA hash, certificates for another node or expired,
//! oversize and garbage frames, and a flood of connections that never handshake. After each,
//! the hub must still serve a good node.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sedge_tunnel::edge::Identity;
use sedge_tunnel::{EdgeConfig, Hub, Message, Transport, frame, link, op, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Joining must fail with `want` in the message and leave nothing on disk.
async fn join_fails(cfg: &EdgeConfig, token: &str, want: &str) {
    let err = sedge_tunnel::join(cfg, token)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(
        !cfg.data_dir.join("pki/node.crt").exists(),
        "a failed join wrote a certificate"
    );
    assert!(
        !cfg.data_dir.join("pki/ca.crt").exists(),
        "a failed join wrote the CA"
    );
}

/// A good node still gets messages.
async fn good_node_works(hub: &Hub, store: &EdgeStore, rv: u64) {
    let key = format!("default/configmap/alive-{rv}");
    hub.send("edge-1", update(&key, rv)).await.unwrap();
    wait_for("the good node to get a message", 15, || {
        store.lock().unwrap().contains_key(&key)
    })
    .await;
}

#[tokio::test]
async fn bad_tokens_and_a_tampered_hash_are_refused_and_write_nothing() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-9", Transport::Websocket);
    let good = token(&hub);

    // Wrong token: right CA hash, a JWT signed with another key.
    let (other_hub, _) = start_hub(hub_config(&dir.path().join("other"))).await;
    let foreign = token(&other_hub);
    let forged = format!("{}.{}", hub.ca_hash(), foreign.split_once('.').unwrap().1);
    join_fails(&cfg, &forged, "signature is invalid").await;
    // Tampered CA hash: the edge refuses before sending anything.
    let mut tampered = good.clone();
    let first = if tampered.starts_with('0') { "1" } else { "0" };
    tampered.replace_range(0..1, first);
    join_fails(&cfg, &tampered, "but the token pins").await;
    join_fails(&cfg, "not-a-token", "is not `<ca-hash>.<jwt>`").await;
    // Revoked.
    let (revoked, info) = hub.tokens().create(Duration::from_secs(3600), "").unwrap();
    assert!(hub.tokens().revoke(&info.id).unwrap());
    join_fails(&cfg, &revoked, "revoked").await;
    // Expired: a one-second token, used after its second.
    let (short, info) = hub.tokens().create(Duration::from_secs(1), "").unwrap();
    wait_for("the token to expire", 5, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            > info.expires
    })
    .await;
    join_fails(&cfg, &short, "expired").await;
    // Refusals are visible in the token list's use counts: none of the bad ones counted.
    assert!(hub.tokens().list().unwrap().iter().all(|t| t.uses == 0));
    // And the good token still works.
    sedge_tunnel::join(&cfg, &good).await.unwrap();
    hub.shutdown().await;
    other_hub.shutdown().await;
}

/// TLS to the hub's TCP port, with the node's certificate when `id` is given.
async fn tls_to_hub(
    hub: &Hub,
    ca_pem: &str,
    id: Option<&Identity>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cert = id.map(|id| (id.cert_pem.as_str(), id.key_pem.as_str()));
    let cfg = tls::edge_client_config(ca_pem, cert, false).unwrap();
    let tcp = tokio::net::TcpStream::connect(hub.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn ws_connect(hub: &Hub, id: &Identity) -> link::Link {
    let tls = tls_to_hub(hub, &id.ca_pem, Some(id)).await;
    let url = format!("wss://{}/v1/tunnel", hub.addr());
    let (ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    link::websocket(ws, hub.addr())
}

fn hello(node: &str) -> Message {
    Message::new("hub", op::HELLO, "", format!("{{\"node\":\"{node}\"}}")).unacked()
}

async fn recv(l: &mut link::Link) -> Result<Message, link::LinkEnd> {
    tokio::time::timeout(Duration::from_secs(10), l.rx.recv())
        .await
        .expect("something from the hub in time")
        .unwrap_or(Err(link::LinkEnd::Closed))
}

/// Raw HTTP over TLS with a client certificate, returning the status line and body.
async fn raw_post(hub: &Hub, id: &Identity, node: &str) -> String {
    let mut tls = tls_to_hub(hub, &id.ca_pem, Some(id)).await;
    let (csr, _) = sedge_pki::make_csr("whatever").unwrap();
    let req = format!(
        "POST /edge.crt HTTP/1.1\r\nHost: x\r\nNodeName: {node}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{csr}",
        csr.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn a_certificate_only_works_for_its_own_node() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg1 = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg1, &token(&hub)).await.unwrap();
    let (edge1, store) = start_edge(cfg1).await;
    wait_for("edge-1 up", 10, || edge1.is_connected()).await;
    let cfg2 = edge_config(&hub, dir.path(), "edge-2", Transport::Websocket);
    sedge_tunnel::join(&cfg2, &token(&hub)).await.unwrap();
    let id2 = Identity::load(&cfg2.data_dir).unwrap();

    // edge-2's certificate claiming to be edge-1: refused with the reason.
    let mut l = ws_connect(&hub, &id2).await;
    l.tx.send(hello("edge-1").encode()).await.unwrap();
    let m = recv(&mut l).await.unwrap();
    assert_eq!(m.route.operation, op::ERROR);
    let why = String::from_utf8_lossy(&m.content).to_string();
    assert!(why.contains("certificate is for node edge-2"), "{why}");
    assert!(hub.connected() == vec!["edge-1".to_string()]);
    // edge-2's certificate cannot renew edge-1's.
    let resp = raw_post(&hub, &id2, "edge-1").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("may only renew its own certificate"),
        "{resp}"
    );
    // edge-2 may not write edge-1's node status: refused and counted.
    let mut l = ws_connect(&hub, &id2).await;
    l.tx.send(hello("edge-2").encode()).await.unwrap();
    assert_eq!(recv(&mut l).await.unwrap().route.operation, op::WELCOME);
    let forged = Message::new("resource", op::UPDATE, "null/nodestatus/edge-1", "{}");
    l.tx.send(forged.encode()).await.unwrap();
    let m = loop {
        let m = recv(&mut l).await.unwrap();
        if m.route.group != "hub" {
            break m;
        }
    };
    assert_eq!(m.route.operation, op::REFUSED);
    assert_eq!(hub.counters().get("refused"), 1);
    // No client certificate at all: the tunnel endpoint says so.
    let tls = tls_to_hub(&hub, &id2.ca_pem, None).await;
    let err = tokio_tungstenite::client_async(format!("wss://{}/v1/tunnel", hub.addr()), tls)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");

    good_node_works(&hub, &store, 1).await;
    edge1.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn an_expired_node_certificate_is_refused_at_the_handshake() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-7", Transport::Websocket);
    // A certificate from the real CA that expires in a second.
    let ca = sedge_tunnel::tls::node_ca(&dir.path().join("pki")).unwrap();
    let issued = ca
        .issue(&sedge_pki::IssueRequest {
            common_name: "system:node:edge-7".into(),
            organizations: vec!["system:nodes".into()],
            sans: vec![],
            usage: sedge_pki::Usage::Client,
            valid_for: Duration::from_secs(1),
        })
        .unwrap();
    let pki = cfg.data_dir.join("pki");
    sedge_pki::write_file(&pki.join("ca.crt"), hub.ca_pem(), false).unwrap();
    sedge_pki::write_file(&pki.join("node.crt"), &issued.cert_pem, false).unwrap();
    sedge_pki::write_file(&pki.join("node.key"), &issued.key_pem, true).unwrap();
    wait_for("the certificate to expire", 5, || {
        Identity::load(&cfg.data_dir).unwrap().expired()
    })
    .await;
    let before = hub.counters().get("handshake_failures");
    let (edge, _) = start_edge(cfg).await;
    wait_for("the hub to refuse the handshake", 10, || {
        hub.counters().get("handshake_failures") > before
    })
    .await;
    assert!(!hub.is_connected("edge-7"));
    assert!(!edge.is_connected());
    edge.shutdown().await;
    hub.shutdown().await;
}

async fn quic_session(
    hub: &Hub,
    id: &Identity,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let tls = tls::edge_client_config(&id.ca_pem, Some((&id.cert_pem, &id.key_pem)), true).unwrap();
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let conn = ep
        .connect_with(
            quinn::ClientConfig::new(Arc::new(qc)),
            hub.quic_addr().unwrap(),
            "127.0.0.1",
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, &hello(&id.node).encode())
        .await
        .unwrap();
    let welcome = frame::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        Message::decode(&welcome).unwrap().route.operation,
        op::WELCOME
    );
    (conn, send, recv)
}

#[tokio::test]
async fn oversize_and_garbage_frames_close_only_that_connection() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut hcfg = hub_config(dir.path());
    hcfg.max_frame_bytes = 64 * 1024;
    let (hub, _) = start_hub(hcfg).await;
    let cfg1 = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg1, &token(&hub)).await.unwrap();
    let (edge1, store) = start_edge(cfg1).await;
    wait_for("edge-1 up", 10, || edge1.is_connected()).await;
    let cfg2 = edge_config(&hub, dir.path(), "edge-2", Transport::Quic);
    sedge_tunnel::join(&cfg2, &token(&hub)).await.unwrap();
    let id2 = Identity::load(&cfg2.data_dir).unwrap();

    // QUIC: a header announcing 4 GiB - 1 and nothing behind it.
    let (conn, mut send, _recv) = quic_session(&hub, &id2).await;
    send.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert!(
        closed
            .to_string()
            .contains("oversize frame: 4294967295 bytes announced, cap 65536"),
        "{closed}"
    );
    assert_eq!(hub.counters().get("oversize_frames"), 1);
    // QUIC: a well-framed payload that is not a message.
    let (conn, mut send, _recv) = quic_session(&hub, &id2).await;
    frame::write_frame(&mut send, &[0xff; 16]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert_eq!(hub.counters().get("garbage_frames"), 1);
    // WebSocket: a 100 KiB message over a 64 KiB cap, then garbage.
    let mut l = ws_connect(&hub, &id2).await;
    l.tx.send(hello("edge-2").encode()).await.unwrap();
    assert_eq!(recv(&mut l).await.unwrap().route.operation, op::WELCOME);
    l.tx.send(bytes::Bytes::from(vec![0u8; 100 * 1024]))
        .await
        .unwrap();
    wait_for("the oversize WebSocket message to be counted", 10, || {
        hub.counters().get("oversize_frames") == 2
    })
    .await;
    let mut l = ws_connect(&hub, &id2).await;
    l.tx.send(hello("edge-2").encode()).await.unwrap();
    assert_eq!(recv(&mut l).await.unwrap().route.operation, op::WELCOME);
    l.tx.send(bytes::Bytes::from_static(&[0xff; 16]))
        .await
        .unwrap();
    wait_for("the garbage WebSocket message to be counted", 10, || {
        hub.counters().get("garbage_frames") == 2
    })
    .await;

    // Our own side refuses to send what the peer would refuse to read, naming the cap.
    let big = Message::new(
        "resource",
        op::UPDATE,
        "default/configmap/big",
        vec![b'x'; 100 * 1024],
    );
    let e = hub.send("edge-1", big).await.unwrap_err().to_string();
    assert!(e.contains("above the 65536-byte frame cap"), "{e}");
    assert_eq!(hub.pending("edge-1").await.unwrap(), 0);

    good_node_works(&hub, &store, 2).await;
    edge1.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_does_not_stop_good_nodes() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut hcfg = hub_config(dir.path());
    hcfg.max_pending_handshakes = 200;
    hcfg.handshake_timeout_ms = 1_500;
    let (hub, _) = start_hub(hcfg).await;
    let cfg1 = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg1, &token(&hub)).await.unwrap();
    let (edge1, store) = start_edge(cfg1).await;
    wait_for("edge-1 up", 10, || edge1.is_connected()).await;

    // 1,000 TCP connections that never send a byte: past the 200 pending handshakes, each
    // newcomer takes the slot of the oldest silent one.
    let mut flood = Vec::new();
    for _ in 0..1_000 {
        flood.push(tokio::net::TcpStream::connect(hub.addr()).await.unwrap());
    }
    wait_for(
        "silent connections beyond the limit to make room",
        10,
        || hub.counters().get("handshakes_evicted") + hub.counters().get("handshakes_shed") >= 700,
    )
    .await;
    // Established sessions are untouched while the flood sits there.
    good_node_works(&hub, &store, 3).await;
    // The held ones are closed at the handshake timeout: every flood socket reads EOF.
    for mut s in flood {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    // A new node joins and connects after the flood.
    let cfg3 = edge_config(&hub, dir.path(), "edge-3", Transport::Websocket);
    sedge_tunnel::join(&cfg3, &token(&hub)).await.unwrap();
    let (edge3, _) = start_edge(cfg3).await;
    wait_for("edge-3 up", 10, || edge3.is_connected()).await;
    good_node_works(&hub, &store, 4).await;
    edge3.shutdown().await;
    edge1.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_token_cannot_take_over_a_node_and_revocation_reaches_its_certificates() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg1 = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    let (tok1, info1) = hub.tokens().create(Duration::from_secs(3600), "").unwrap();
    sedge_tunnel::join(&cfg1, &tok1).await.unwrap();
    let (edge1, _) = start_edge(cfg1.clone()).await;
    wait_for("edge-1 up", 10, || edge1.is_connected()).await;

    // The attack: a fresh token asks for the connected node's name.
    let (fresh, _) = hub.tokens().create(Duration::from_secs(3600), "").unwrap();
    let thief = edge_config(
        &hub,
        &dir.path().join("thief"),
        "edge-1",
        Transport::Websocket,
    );
    join_fails(&thief, &fresh, "is connected now").await;
    // One token, many names: only the first.
    for (i, name) in ["n-1", "n-2", "n-3", "n-4", "n-5", "n-6", "n-7"]
        .iter()
        .enumerate()
    {
        let cfg = edge_config(&hub, dir.path(), name, Transport::Websocket);
        let r = sedge_tunnel::join(&cfg, &fresh).await;
        assert_eq!(r.is_ok(), i == 0, "{name}: {r:?}");
    }
    // Not connected but registered: still refused, with the way to re-join in the message.
    edge1.shutdown().await;
    wait_for("edge-1 down", 10, || !hub.is_connected("edge-1")).await;
    let (another, _) = hub.tokens().create(Duration::from_secs(3600), "").unwrap();
    join_fails(&thief, &another, "--node edge-1").await;
    // The old certificate still connects.
    let (edge1, _) = start_edge(cfg1.clone()).await;
    wait_for("edge-1 back", 10, || edge1.is_connected()).await;

    // Revoking the token that joined it closes its session and its certificate stops working.
    assert!(hub.tokens().revoke(&info1.id).unwrap());
    wait_for("the revoked node's session to close", 15, || {
        !hub.is_connected("edge-1")
    })
    .await;
    let before = hub.counters().get("handshake_failures");
    wait_for("the revoked certificate to be refused again", 15, || {
        hub.counters().get("handshake_failures") > before
    })
    .await;
    assert!(!hub.is_connected("edge-1"));
    edge1.shutdown().await;

    // Re-join is explicit: a token bound to the name.
    let (bound, _) = hub
        .tokens()
        .create_with(Duration::from_secs(3600), "", 1, Some("edge-1"))
        .unwrap();
    let other = edge_config(&hub, dir.path(), "edge-2", Transport::Websocket);
    join_fails(&other, &bound, "bound to node").await;
    let rejoined = edge_config(
        &hub,
        &dir.path().join("rejoined"),
        "edge-1",
        Transport::Websocket,
    );
    sedge_tunnel::join(&rejoined, &bound).await.unwrap();
    let (edge1, _) = start_edge(rejoined).await;
    wait_for("edge-1 re-joined", 10, || edge1.is_connected()).await;

    // Deleting the node revokes what it holds, at once.
    assert_eq!(hub.revoke_node("edge-1").await.unwrap(), 1);
    wait_for("the deleted node to be cut off", 10, || {
        !hub.is_connected("edge-1")
    })
    .await;
    edge1.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn node_certificates_come_from_their_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let id = Identity::load(&cfg.data_dir).unwrap();
    let leaf = sedge_pki::certs_from_pem(&id.cert_pem, "node").unwrap();
    let cluster = sedge_pki::Ca::load_or_create(&dir.path().join("pki"), "sedge-ca").unwrap();
    let nodes = tls::node_ca(&dir.path().join("pki")).unwrap();
    // Verified against the node CA, not against the cluster CA the API server trusts.
    let verify = |ca_pem: &str| {
        let mut roots = rustls::RootCertStore::empty();
        for c in sedge_pki::certs_from_pem(ca_pem, "ca").unwrap() {
            roots.add(c).unwrap();
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            sedge_pki::provider(),
        )
        .build()
        .unwrap();
        v.verify_client_cert(&leaf[0], &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    };
    assert!(verify(nodes.cert_pem()));
    assert!(!verify(cluster.cert_pem()));
    hub.shutdown().await;
}

/// `n` joins at once with a well-formed, wrong token: how many the hub refused for the rate.
async fn joins_throttled(hub: &sedge_tunnel::Hub, dir: &std::path::Path, n: usize) -> usize {
    let cfg = edge_config(hub, dir, "edge-1", Transport::Websocket);
    // Well-formed enough to reach the hub, and wrong.
    let bad = format!("{}.a.b.c", hub.ca_hash());
    let tries = (0..n).map(|_| sedge_tunnel::join(&cfg, &bad));
    futures::future::join_all(tries)
        .await
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("too many"))
        })
        .count()
}

#[tokio::test]
async fn a_flood_of_join_requests_is_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    // 300 at once: more than the burst (40) plus what 20/s refills even on a slow machine.
    let throttled = joins_throttled(&hub, dir.path(), 300).await;
    assert!(throttled > 0, "none of 300 throttled");
    assert!(hub.counters().get("joins_throttled") as usize >= throttled);
    hub.shutdown().await;
}

#[tokio::test]
async fn the_join_rate_is_the_operators_and_a_rate_that_would_shut_joins_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // One join a second: a burst of two, then refusals.
    let mut cfg = hub_config(dir.path());
    cfg.joins_per_second = 1.0;
    let (hub, _) = start_hub(cfg).await;
    let throttled = joins_throttled(&hub, dir.path(), 10).await;
    // Two from the bucket, and at most a few more refilled while the ten ran.
    assert!(throttled >= 5, "{throttled} of 10 throttled at 1/s");
    hub.shutdown().await;

    // A slow rate still admits joins: the first of a hundred seconds' worth.
    let slow = tempfile::tempdir().unwrap();
    let mut cfg = hub_config(slow.path());
    cfg.joins_per_second = 0.01;
    let (hub, _) = start_hub(cfg).await;
    assert_eq!(joins_throttled(&hub, slow.path(), 1).await, 0, "at 0.01/s");
    assert_eq!(joins_throttled(&hub, slow.path(), 1).await, 1, "at 0.01/s");
    hub.shutdown().await;

    for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = hub_config(d.path());
        cfg.joins_per_second = rate;
        let err = sedge_tunnel::Hub::start(cfg, Default::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("a hub started with joins_per_second {rate}"));
        assert!(
            err.to_string().contains("joins_per_second"),
            "{rate}: {err}"
        );
    }
}

#[tokio::test]
async fn an_inventory_in_the_hello_is_bounded_and_only_speaks_for_its_own_node() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-2", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let id = Identity::load(&cfg.data_dir).unwrap();
    let hello_holding = |held: serde_json::Value| {
        let h = serde_json::json!({"node": "edge-2", "held": held});
        Message::new("hub", op::HELLO, "", h.to_string()).unacked()
    };
    let too_many: serde_json::Map<String, serde_json::Value> = (0..200_001)
        .map(|i| (format!("default/configmap/c{i}"), "1".into()))
        .collect();
    // Bad inventories: the session is served, the inventory is ignored and counted.
    let bad = [
        serde_json::json!({"x".repeat(600): "1"}),
        serde_json::json!({"default/configmap/a": "1\n2"}),
        serde_json::json!({"default/configmap/a": "9".repeat(65)}),
        serde_json::json!({"": "1"}),
        serde_json::Value::Object(too_many),
    ];
    for (i, held) in bad.into_iter().enumerate() {
        let mut l = ws_connect(&hub, &id).await;
        l.tx.send(hello_holding(held).encode()).await.unwrap();
        assert_eq!(recv(&mut l).await.unwrap().route.operation, op::WELCOME);
        assert_eq!(hub.counters().get("inventories_refused"), i as u64 + 1);
        assert!(hub.acked("edge-2").await.unwrap().is_empty());
    }
    assert_eq!(hub.counters().get("inventories_adopted"), 0);
    // A good one becomes the node's records: what it holds is not sent again, newer is.
    let mut l = ws_connect(&hub, &id).await;
    let held = serde_json::json!({"default/configmap/cfg": "7"});
    l.tx.send(hello_holding(held).encode()).await.unwrap();
    assert_eq!(recv(&mut l).await.unwrap().route.operation, op::WELCOME);
    assert_eq!(hub.counters().get("inventories_adopted"), 1);
    let acked = hub.acked("edge-2").await.unwrap();
    assert_eq!(
        acked.get("default/configmap/cfg").map(String::as_str),
        Some("7")
    );
    let sent = hub.send("edge-2", update("default/configmap/cfg", 7)).await;
    assert_eq!(sent.unwrap(), sedge_tunnel::Enqueued::Skipped);
    let sent = hub.send("edge-2", update("default/configmap/cfg", 8)).await;
    assert_eq!(sent.unwrap(), sedge_tunnel::Enqueued::Queued);
    // It speaks for edge-2 only: another node's records are untouched.
    assert!(hub.acked("edge-1").await.unwrap().is_empty());
    hub.shutdown().await;
}
