//! The reliability test from issue #4: 10,000 updates across 1,000 objects pushed from the hub
//! to an edge process through a fault-injecting proxy that flaps the link every few hundred ms,
//! (cuts, refused connections, delays, and silences some longer than the dead-peer timeout)
//! while the edge process is killed (SIGKILL) and restarted twice. At the end the edge's SQLite
//! must hold exactly the cloud's final state, and no update may have been applied out of order.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rand::Rng;
use sedge_tunnel::fault::{Faults, TcpFaultProxy, UdpFaultProxy};
use sedge_tunnel::{Message, Transport, op};

const OBJECTS: usize = 1_000;
const UPDATES: u64 = 10_000;

/// Kills the edge process however the test ends, so no orphan holds the test's pipes.
struct Edge(Child);

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_edge(dir: &Path, cloud: &str, quic: &str, transport: &str) -> Edge {
    Edge(
        Command::new(env!("CARGO_BIN_EXE_tunnel-edge"))
            .args(["--data-dir", dir.to_str().unwrap(), "--cloud", cloud])
            .args([
                "--cloud-quic",
                quic,
                "--transport",
                transport,
                "--keepalive-ms",
                "200",
            ])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tunnel-edge starts"),
    )
}

/// Flaps the link until told to stop: cuts, half-open periods, refused connections, delays.
async fn chaos(
    faults: std::sync::Arc<Faults>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> u32 {
    let mut flaps = 0;
    while !*stop.borrow() {
        let pause = Duration::from_millis(rand::rng().random_range(150..400));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
        flaps += 1;
        match flaps % 4 {
            0 => faults.cut(),
            1 => faults.set_down(true),
            2 => {
                faults.set_refuse(true);
                faults.cut();
            }
            _ => faults.set_delay(Duration::from_millis(30)),
        }
        let outage = Duration::from_millis(rand::rng().random_range(100..900));
        tokio::time::sleep(outage).await;
        faults.heal();
    }
    faults.heal();
    flaps
}

async fn run(transport: Transport) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut hcfg = hub_config(dir.path());
    hcfg.keepalive_interval_ms = 200;
    hcfg.ack_timeout_ms = 500;
    hcfg.max_retry_backoff_ms = 1_000;
    let (hub, _) = start_hub(hcfg).await;
    let ecfg = edge_config(&hub, dir.path(), "edge-1", transport);
    sedge_tunnel::join(&ecfg, &token(&hub)).await.unwrap();
    let tcp = TcpFaultProxy::start(hub.addr()).await.unwrap();
    let udp = UdpFaultProxy::start(hub.quic_addr().unwrap())
        .await
        .unwrap();
    let faults = match transport {
        Transport::Websocket => tcp.faults.clone(),
        Transport::Quic => udp.faults.clone(),
    };
    let (cloud, quic) = (tcp.addr.to_string(), udp.addr.to_string());
    let tname = match transport {
        Transport::Websocket => "websocket",
        Transport::Quic => "quic",
    };
    let edge_dir = ecfg.data_dir.clone();
    let mut child = spawn_edge(&edge_dir, &cloud, &quic, tname);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let chaos_task = tokio::spawn(chaos(faults.clone(), stop_rx));

    // The cloud's truth: key -> Some((rv, content)) or None when deleted.
    let mut truth: HashMap<String, Option<(u64, String)>> = HashMap::new();
    let mut kills = 0;
    for rv in 1..=UPDATES {
        let (pick, delete) = {
            let mut rng = rand::rng();
            (rng.random_range(0..OBJECTS), rng.random_bool(0.05))
        };
        let key = format!("default/configmap/obj-{pick}");
        let exists = matches!(truth.get(&key), Some(Some(_)));
        let msg = if exists && delete {
            truth.insert(key.clone(), None);
            Message::new("resource", op::DELETE, &key, "").with_version(rv.to_string())
        } else {
            let content = format!("{{\"rv\":{rv}}}");
            truth.insert(key.clone(), Some((rv, content.clone())));
            Message::new("resource", op::UPDATE, &key, content).with_version(rv.to_string())
        };
        hub.send("edge-1", msg).await.unwrap();
        if rv % 50 == 0 {
            // Pace the stream so that the flaps land in the middle of it (about 10 s in all).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if rv == 3_000 || rv == 7_000 {
            drop(child); // SIGKILL
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            child = spawn_edge(&edge_dir, &cloud, &quic, tname);
        }
    }
    stop_tx.send(true).unwrap();
    let flaps = chaos_task.await.unwrap();
    assert_eq!(kills, 2);
    assert!(flaps >= 8, "only {flaps} flaps happened");

    // Converge: the hub has nothing pending and its records match the truth.
    let want: HashMap<String, String> = truth
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|(rv, _)| (k.clone(), rv.to_string())))
        .collect();
    wait_async("the edge to acknowledge the final state", 60, || async {
        hub.pending("edge-1").await.unwrap() == 0 && hub.acked("edge-1").await.unwrap() == want
    })
    .await;
    drop(child);

    let db = rusqlite::Connection::open(edge_dir.join("state.db")).unwrap();
    let violations: i64 = db
        .query_row("SELECT count(*) FROM violations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(violations, 0, "updates applied out of order");
    let mut st = db.prepare("SELECT key, rv, content FROM objects").unwrap();
    let held: HashMap<String, (u64, String)> = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (
                    r.get::<_, i64>(1)? as u64,
                    String::from_utf8_lossy(&r.get::<_, Vec<u8>>(2)?).into_owned(),
                ),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let expected: HashMap<String, (u64, String)> = truth
        .into_iter()
        .filter_map(|(k, v)| v.map(|x| (k, x)))
        .collect();
    assert_eq!(held.len(), expected.len());
    assert!(
        held == expected,
        "the edge's state differs from the cloud's"
    );
    let (applied, duplicates): (i64, i64) = db
        .query_row("SELECT applied, duplicates FROM stats", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let c = hub.counters();
    eprintln!(
        "{tname}: {UPDATES} updates, {flaps} flaps, {kills} kills -> edge applied {applied} (coalesced), duplicates {duplicates}, hub sessions {}, retries {}",
        c.get("sessions_opened"),
        c.get("retries")
    );
    assert!(
        c.get("sessions_opened") >= 3,
        "the edge reconnected after kills"
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_state_survives_flaps_and_kills_over_websocket() {
    run(Transport::Websocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_state_survives_flaps_and_kills_over_quic() {
    run(Transport::Quic).await;
}
