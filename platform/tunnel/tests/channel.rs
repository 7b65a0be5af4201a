//! The channel end to end on loopback: join, reliable delivery both ways, request/response,
//! connection events, offline queues, dead peers, stale sessions, certificate renewal.

mod common;

use std::time::Duration;

use common::*;
use sedge_tunnel::fault::{TcpFaultProxy, UdpFaultProxy};
use sedge_tunnel::{LinkEvent, Message, Policy, Transport, op};

async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<LinkEvent>) -> LinkEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

async fn round_trip(transport: Transport) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, inbox) = start_hub(hub_config(dir.path())).await;
    let mut events = hub.subscribe();
    let cfg = edge_config(&hub, dir.path(), "edge-1", transport);
    let joined = sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    assert_eq!(joined.node, "edge-1");
    assert_eq!(joined.ca_hash, hub.ca_hash());
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(dir.path().join("edge-1/pki/node.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    let (edge, store) = start_edge(cfg).await;
    let mut edge_events = edge.subscribe();
    match next_event(&mut events).await {
        LinkEvent::Connected {
            node, transport: t, ..
        } => {
            assert_eq!(node, "edge-1");
            assert_eq!(t, transport);
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut edge_events).await,
        LinkEvent::Connected { .. }
    ));
    assert_eq!(hub.connected(), vec!["edge-1".to_string()]);

    // Cloud -> edge, reliable: the edge's handler has them and the hub recorded the versions.
    for rv in 1..=3 {
        hub.send("edge-1", update("default/pod/web", rv))
            .await
            .unwrap();
    }
    hub.send("edge-1", update("default/configmap/c", 4))
        .await
        .unwrap();
    wait_for("objects at the edge", 10, || {
        let s = store.lock().unwrap();
        s.get("default/pod/web").map(|v| v.0.as_str()) == Some("3")
            && s.contains_key("default/configmap/c")
    })
    .await;
    wait_async("acks recorded", 10, || async {
        let a = hub.acked("edge-1").await.unwrap();
        a.get("default/pod/web").map(String::as_str) == Some("3")
            && a.get("default/configmap/c").map(String::as_str) == Some("4")
    })
    .await;
    assert_eq!(hub.pending("edge-1").await.unwrap(), 0);
    // Offering what the node has is a no-op (this is the incremental resync).
    assert_eq!(
        hub.send("edge-1", update("default/pod/web", 3))
            .await
            .unwrap(),
        sedge_tunnel::Enqueued::Skipped
    );
    // Deletes are reliable too and clear the record.
    let del = Message::new("resource", op::DELETE, "default/pod/web", "").with_version("5");
    hub.send("edge-1", del).await.unwrap();
    wait_for("delete at the edge", 10, || {
        !store.lock().unwrap().contains_key("default/pod/web")
    })
    .await;
    wait_async("delete acked", 10, || async {
        !hub.acked("edge-1")
            .await
            .unwrap()
            .contains_key("default/pod/web")
    })
    .await;

    // Edge -> cloud through the outbox.
    let status = Message::new(
        "resource",
        op::UPDATE,
        "default/podstatus/web",
        "{\"phase\":\"Running\"}",
    );
    edge.send(status, Policy::LatestWins).await.unwrap();
    wait_for("status at the cloud", 10, || {
        inbox
            .lock()
            .unwrap()
            .iter()
            .any(|i| i.node == "edge-1" && i.message.route.resource == "default/podstatus/web")
    })
    .await;
    // Status about a pod of another node is refused, counted, and not retried.
    let foreign = Message::new("resource", op::UPDATE, "default/podstatus/db", "{}");
    edge.send(foreign, Policy::LatestWins).await.unwrap();
    wait_for("refusal counted", 10, || hub.counters().get("refused") >= 1).await;
    wait_async("outbox drained", 10, || async {
        edge.outbox_len().await.unwrap() == 0
    })
    .await;
    assert!(
        !inbox
            .lock()
            .unwrap()
            .iter()
            .any(|i| i.message.route.resource == "default/podstatus/db")
    );

    // Request/response both ways.
    let q = Message::new("resource", op::QUERY, "default/configmap/c", "hello");
    let r = edge.request(q, Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.content, "pong:hello");
    let q = Message::new("resource", op::QUERY, "default/pod/web", "");
    let r = hub
        .request("edge-1", q, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r.content, "edge-pong");

    edge.shutdown().await;
    match next_event(&mut events).await {
        LinkEvent::Disconnected { node, .. } => assert_eq!(node, "edge-1"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Offline: reliable sends queue, unacked sends and requests fail fast.
    assert!(
        hub.send("edge-1", update("default/configmap/c", 6))
            .await
            .is_ok()
    );
    let q = Message::new("resource", op::QUERY, "default/pod/web", "");
    assert!(matches!(
        hub.request("edge-1", q, Duration::from_secs(1)).await,
        Err(sedge_tunnel::TunnelError::NotConnected)
    ));
    hub.shutdown().await;
}

#[tokio::test]
async fn join_deliver_and_reply_over_websocket() {
    round_trip(Transport::Websocket).await;
}

#[tokio::test]
async fn join_deliver_and_reply_over_quic() {
    round_trip(Transport::Quic).await;
}

#[tokio::test]
async fn offline_work_is_flushed_after_reconnect_and_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, inbox) = start_hub(hub_config(dir.path())).await;
    let mut cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let proxy = TcpFaultProxy::start(hub.addr()).await.unwrap();
    cfg.cloud = proxy.addr.to_string();
    let (edge, _) = start_edge(cfg.clone()).await;
    wait_for("connected", 10, || edge.is_connected()).await;

    // The link goes away; both sides work on.
    proxy.faults.set_refuse(true);
    proxy.faults.cut();
    wait_for("edge notices", 10, || !edge.is_connected()).await;
    for i in 0..5 {
        let s = Message::new(
            "resource",
            op::UPDATE,
            &format!("default/podstatus/web-{i}"),
            "{}",
        );
        edge.send(s, Policy::LatestWins).await.unwrap();
    }
    for rv in 1..=20 {
        hub.send(
            "edge-1",
            update(&format!("default/configmap/c{}", rv % 4), rv),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        hub.pending("edge-1").await.unwrap(),
        4,
        "20 updates of 4 objects coalesce to 4"
    );
    // The edge restarts while offline: its outbox is on disk.
    edge.shutdown().await;
    let (edge, store) = start_edge(cfg).await;
    assert_eq!(edge.outbox_len().await.unwrap(), 5);

    proxy.faults.heal();
    wait_for("edge reconnects", 10, || edge.is_connected()).await;
    wait_for("cloud objects at the edge", 10, || {
        let s = store.lock().unwrap();
        (17..=20).all(|rv| {
            s.get(&format!("default/configmap/c{}", rv % 4))
                .map(|v| v.0.clone())
                == Some(rv.to_string())
        })
    })
    .await;
    wait_for("offline status at the cloud", 10, || {
        let inbox = inbox.lock().unwrap();
        (0..5).all(|i| {
            inbox
                .iter()
                .any(|m| m.message.route.resource == format!("default/podstatus/web-{i}"))
        })
    })
    .await;
    wait_async("outbox empty", 10, || async {
        edge.outbox_len().await.unwrap() == 0
    })
    .await;
    edge.shutdown().await;
    hub.shutdown().await;
}

/// A cloud that dies without a word (kill -9: no CONNECTION_CLOSE reaches the node) and comes
/// back on the same UDP port: the new hub answers the node's next packet on the old connection
/// with a stateless reset the node can trust (the reset key comes from the cluster's key, not a
/// fresh random one per process), so the node reconnects at once instead of waiting out its
/// QUIC idle timeout. Measured at 20,000 nodes, that wait was most of the first 30 s of a mass
/// reconnect.
#[tokio::test]
async fn a_node_learns_at_once_that_a_restarted_hub_lost_its_quic_connection() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // Keepalives every second, a peer dead after 60 of them: the idle timeout (60 s) is far
    // beyond what the test waits, so only the reset can bring the node back in time.
    let slow = |mut c: sedge_tunnel::HubConfig| {
        c.keepalive_interval_ms = 1_000;
        c.dead_after_intervals = 60;
        c
    };
    let (hub, _) = start_hub(slow(hub_config(dir.path()))).await;
    let (tcp, quic) = (hub.addr(), hub.quic_addr().unwrap());
    let mut cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Quic);
    cfg.keepalive_interval_ms = 1_000;
    cfg.dead_after_intervals = 60;
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let proxy = UdpFaultProxy::start(quic).await.unwrap();
    cfg.cloud_quic = proxy.addr.to_string();
    let (edge, _) = start_edge(cfg).await;
    wait_for("connected", 10, || hub.is_connected("edge-1")).await;

    // The crash: nothing more gets through while the hub goes away, so its goodbye is lost.
    proxy.faults.set_down(true);
    hub.shutdown().await;
    drop(hub);
    // The old endpoint lets go of its port once its connections have drained.
    wait_for("the old hub's UDP port free", 15, || {
        std::net::UdpSocket::bind(quic).is_ok()
    })
    .await;
    let mut again = slow(hub_config(dir.path()));
    again.listen = tcp.to_string();
    again.listen_quic = quic.to_string();
    let (hub, _) = start_hub(again).await;
    assert!(edge.is_connected(), "the node has not noticed yet");
    proxy.faults.set_down(false);
    wait_for(
        "the node back on the new hub, well before its idle timeout",
        15,
        || hub.is_connected("edge-1"),
    )
    .await;
    edge.shutdown().await;
    hub.shutdown().await;
}

/// Two hubs of one cluster (one CA, each its own delivery records, as two cloud cores on two
/// machines): the node moves to the second when the first goes away, and the second learns
/// from the node's hello what it holds, so it sends only what changed.
#[tokio::test]
async fn a_hub_that_never_served_a_node_sends_it_only_what_changed() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = start_hub(hub_config(dir.path())).await;
    let mut b_cfg = hub_config(dir.path());
    b_cfg.data_dir = dir.path().join("hub-b");
    let (b, _) = start_hub(b_cfg).await;
    let mut cfg = edge_config(&a, dir.path(), "edge-1", Transport::Websocket);
    cfg.cloud_alternates = vec![b.addr().to_string()];
    sedge_tunnel::join(&cfg, &token(&a)).await.unwrap();
    let (edge, store) = start_edge(cfg).await;
    wait_for("edge-1 on a", 10, || a.is_connected("edge-1")).await;
    for i in 0..3 {
        a.send("edge-1", update(&format!("default/configmap/c{i}"), 5))
            .await
            .unwrap();
    }
    wait_for("objects at the edge", 10, || {
        store.lock().unwrap().len() == 3
    })
    .await;
    a.shutdown().await;
    wait_for("edge-1 on b", 20, || b.is_connected("edge-1")).await;
    assert_eq!(b.counters().get("inventories_adopted"), 1);
    // What a resync offers: the same three (skipped), one changed, one new.
    let mut enqueued = Vec::new();
    for (key, rv) in [("c0", 5), ("c1", 5), ("c2", 6), ("c3", 1)] {
        let m = update(&format!("default/configmap/{key}"), rv);
        enqueued.push(b.send("edge-1", m).await.unwrap());
    }
    use sedge_tunnel::Enqueued::{Queued, Skipped};
    assert_eq!(enqueued, [Skipped, Skipped, Queued, Queued]);
    wait_for("changes at the edge", 10, || {
        let s = store.lock().unwrap();
        s.get("default/configmap/c2").map(|v| v.0.as_str()) == Some("6") && s.len() == 4
    })
    .await;
    assert_eq!(b.counters().get("messages_sent"), 2);
    edge.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn dead_peers_are_detected_and_the_link_recovers() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let mut cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let proxy = TcpFaultProxy::start(hub.addr()).await.unwrap();
    cfg.cloud = proxy.addr.to_string();
    let (edge, store) = start_edge(cfg).await;
    let mut hub_events = hub.subscribe();
    let mut edge_events = edge.subscribe();
    wait_for("connected", 10, || hub.is_connected("edge-1")).await;

    // Half-open: sockets stay up, nothing passes. Both sides must notice on their own.
    proxy.faults.set_down(true);
    let hub_saw = async {
        loop {
            if let LinkEvent::Disconnected { reason, .. } = next_event(&mut hub_events).await {
                return reason;
            }
        }
    };
    let edge_saw = async {
        loop {
            if let LinkEvent::Disconnected { reason, .. } = next_event(&mut edge_events).await {
                return reason;
            }
        }
    };
    let (h, e) = tokio::join!(hub_saw, edge_saw);
    assert!(h.contains("dead peer"), "{h}");
    assert!(e.contains("dead peer"), "{e}");
    hub.send("edge-1", update("default/configmap/x", 1))
        .await
        .unwrap();
    proxy.faults.set_down(false);
    wait_for("reconnected and delivered", 15, || {
        store.lock().unwrap().contains_key("default/configmap/x")
    })
    .await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_reconnecting_node_replaces_its_stale_session() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Quic);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let (first, _) = start_edge(cfg.clone()).await;
    wait_for("first connected", 10, || first.is_connected()).await;
    // The same node again (a restarted agent whose old connection the hub still holds).
    let (second, store) = start_edge(cfg).await;
    wait_for("replacement counted", 10, || {
        hub.counters().get("sessions_replaced") >= 1
    })
    .await;
    first.shutdown().await;
    hub.send("edge-1", update("default/configmap/y", 1))
        .await
        .unwrap();
    wait_for("delivered on the new session", 10, || {
        store.lock().unwrap().contains_key("default/configmap/y")
    })
    .await;
    second.shutdown().await;
    hub.shutdown().await;
}

/// An agent stopped as soon as it started (before its link task ran, or while it connects)
/// stays stopped: before, the stop was lost when nothing listened yet, and the stopped agent
/// went on connecting, taking the node's session from its successor every few hundred ms.
#[tokio::test]
async fn an_edge_stopped_right_after_it_starts_never_connects() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    // On this single-threaded runtime the link task has not run yet when `stop` is called.
    let (stopped, _) = start_edge(cfg.clone()).await;
    stopped.stop();
    // One stopped mid-connect: the session it may open ends at once.
    let (mid_connect, _) = start_edge(cfg.clone()).await;
    tokio::task::yield_now().await;
    mid_connect.stop();
    // The node's agent that stays: it keeps its session.
    let (kept, store) = start_edge(cfg).await;
    wait_for("the kept agent connected", 10, || kept.is_connected()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!stopped.is_connected(), "the stopped agent connected");
    assert!(
        !mid_connect.is_connected(),
        "the agent stopped mid-connect connected"
    );
    assert!(kept.is_connected(), "the kept agent lost its session");
    let opened = hub.counters().get("sessions_opened");
    assert!(
        opened <= 2,
        "{opened} sessions opened for two agents that stopped and one that stayed"
    );
    hub.send("edge-1", update("default/configmap/z", 1))
        .await
        .unwrap();
    wait_for("delivered to the kept agent", 10, || {
        store.lock().unwrap().contains_key("default/configmap/z")
    })
    .await;
    kept.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn certificates_renew_over_mtls_without_a_token() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(hub_config(dir.path())).await;
    let cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let before = std::fs::read_to_string(dir.path().join("edge-1/pki/node.crt")).unwrap();
    let id = sedge_tunnel::renew(&cfg).await.unwrap();
    assert_eq!(id.node, "edge-1");
    let after = std::fs::read_to_string(dir.path().join("edge-1/pki/node.crt")).unwrap();
    assert_ne!(before, after);
    assert_eq!(hub.counters().get("certificates_issued"), 2);
    // The renewed certificate works.
    let (edge, _) = start_edge(cfg).await;
    wait_for("connected with the renewed certificate", 10, || {
        edge.is_connected()
    })
    .await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_connecting_at_once_waits_for_handshake_slots_instead_of_being_shed() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut hcfg = hub_config(dir.path());
    // Two TLS handshakes at a time for 30 nodes arriving together: the others wait their
    // turn, and every slot comes back (a slot kept by a finished handshake would leave the
    // last nodes waiting until they are shed).
    hcfg.max_concurrent_handshakes = 2;
    let (hub, _) = start_hub(hcfg).await;
    let (t, _) = hub
        .tokens()
        .create_with(Duration::from_secs(3600), "crowd", 30, None)
        .unwrap();
    let mut cfgs = Vec::new();
    for i in 0..30 {
        let cfg = edge_config(
            &hub,
            dir.path(),
            &format!("crowd-{i}"),
            Transport::Websocket,
        );
        sedge_tunnel::join(&cfg, &t).await.unwrap();
        cfgs.push(cfg);
    }
    let sessions_before = hub.counters().get("sessions_opened");
    let edges = futures::future::join_all(cfgs.into_iter().map(start_edge)).await;
    wait_for("all 30 nodes connected", 20, || hub.connected().len() == 30).await;
    assert_eq!(hub.counters().get("handshakes_shed"), 0);
    assert_eq!(hub.counters().get("handshake_failures"), 0);
    assert_eq!(hub.counters().get("sessions_opened") - sessions_before, 30);
    for (e, _) in edges {
        e.shutdown().await;
    }
    hub.shutdown().await;
}

/// Before the cloud knows every object's owner (its cache filling after a restart), a report it
/// cannot place is answered "try again", stays in the node's outbox and is not counted refused;
/// once the owners are known the same report is refused for good.
#[tokio::test]
async fn a_report_the_hub_cannot_place_yet_is_retried_not_refused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let known = Arc::new(AtomicBool::new(false));
    let k = known.clone();
    let (hub, inbox) = start_hub_with(
        hub_config(dir.path()),
        Some(Arc::new(move || k.load(Ordering::SeqCst))),
    )
    .await;
    let cfg = edge_config(&hub, dir.path(), "edge-1", Transport::Websocket);
    sedge_tunnel::join(&cfg, &token(&hub)).await.unwrap();
    let (edge, _store) = start_edge(cfg).await;
    let unplaced = Message::new("resource", op::UPDATE, "default/podstatus/db", "{}");
    edge.send(unplaced, Policy::LatestWins).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hub.counters().get("refused"), 0);
    assert_eq!(edge.outbox_len().await.unwrap(), 1, "kept for another try");
    known.store(true, Ordering::SeqCst);
    wait_for("refused once the owners are known", 15, || {
        hub.counters().get("refused") >= 1
    })
    .await;
    wait_async("outbox drained", 10, || async {
        edge.outbox_len().await.unwrap() == 0
    })
    .await;
    assert!(
        inbox.lock().unwrap().is_empty(),
        "never handed to the handler"
    );
}
