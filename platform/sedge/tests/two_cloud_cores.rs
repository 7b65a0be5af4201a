//! Two cloud cores, one cluster: both run against one API server, sharing the cluster CA (and,
//! in the in-process tests that do not say otherwise, the hub's database). Nodes list both hubs (`cloud` and
//! `cloud_alternates`); one core holds the singleton controllers' Lease.
//!
//! The leading core is killed (its tasks and sessions end, nothing is released) while a config
//! map is being updated: the nodes go over to the survivor within seconds, every update reaches
//! them and none goes backwards, the survivor takes the Lease over and its scheduler places a
//! new pod, and the nodes' Leases go on being renewed, through the survivor.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use sedge_cloudcore::{CloudCore, JoinRecordsAt};
use sedge_edgecore::{EdgeCore, EdgeCoreConfig};
use serde_json::json;

fn core_config(dir: &std::path::Path, identity: &str) -> sedge_cloudcore::CloudCoreConfig {
    let mut cc = common::cloudcore_config(dir);
    cc.leader.identity = identity.into();
    cc.leader.lease_duration_ms = 3_000;
    cc.leader.renew_deadline_ms = 2_000;
    cc.leader.retry_period_ms = 300;
    cc.node_grace_seconds = 20;
    cc.node_monitor_period_ms = 500;
    cc
}

fn node_config(dir: &std::path::Path, node: &str, a: &str, b: &str) -> EdgeCoreConfig {
    serde_yaml::from_str(&format!(
        "metaserver_listen: ''\nmetrics_listen: ''\nnode_ip: 127.0.0.1\nruntime: hollow\n\
         lease_interval_ms: 500\nsync_interval_ms: 100\n\
         tunnel:\n  node_name: {node}\n  cloud: {a}\n  cloud_alternates: [{b}]\n  data_dir: {}\n  \
         keepalive_interval_ms: 300\n  backoff_initial_ms: 100\n  backoff_max_ms: 400\n  ack_timeout_ms: 500\n",
        dir.join(node).display()
    ))
    .unwrap()
}

/// The cloud core the node's Lease says serves it.
async fn served_by(node_leases: &Api<Lease>, node: &str) -> Option<String> {
    node_leases
        .get_opt(node)
        .await
        .ok()??
        .metadata
        .annotations?
        .remove(sedge_cloudcore::ownership::SERVED_BY)
}

/// Waits until the API says `core` serves each of `nodes`.
async fn wait_served_by(node_leases: &Api<Lease>, nodes: &[&str], core: &str) {
    for n in nodes {
        sedge_testkit::wait::until_async(
            &format!("{n}'s Lease names {core}"),
            Duration::from_secs(20),
            Duration::from_millis(50),
            || async { (served_by(node_leases, n).await.as_deref() == Some(core)).then_some(()) },
        )
        .await;
    }
}

/// Waits until the core's (claims, sessions yielded) counters are `want`.
async fn counted(core: &CloudCore, want: (u64, u64)) {
    let (own, _) = core.cache.served.get().expect("started");
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    sedge_testkit::wait::until_async(
        &format!("(claims, yielded) = {want:?}"),
        Duration::from_secs(5),
        Duration::from_millis(10),
        || async { ((get(&own.claims), get(&own.yielded)) == want).then_some(()) },
    )
    .await;
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("sedge-cloudcore-controllers")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Waits until `core` holds the singleton controllers' Lease.
async fn wait_leads(leases: &Api<Lease>, core: &str) {
    sedge_testkit::wait::until_async(
        &format!("{core} leads"),
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async { (holder(leases).await.as_deref() == Some(core)).then_some(()) },
    )
    .await;
}

/// A pod for `node` (by node selector: the leading core's scheduler places it) that references
/// the config map `cm`, so the node gets it.
fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1000"],
                                 "envFrom": [{"configMapRef": {"name": "cm"}}]}]}
    }))
    .unwrap()
}

/// Creates `pod(name, node)` and waits until it runs (`by`: the core expected to place it).
async fn run_pod(pods: &Api<Pod>, name: &str, node: &str, by: &str) {
    pods.create(&PostParams::default(), &pod(name, node))
        .await
        .unwrap();
    sedge_testkit::wait::until_async(
        &format!("{name} Running (scheduled by {by})"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let p = pods.get(name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        },
    )
    .await;
}

/// Node `i`'s value of the config map `cm`, if it has it.
type ReadNode = Arc<dyn Fn(usize) -> Option<u64> + Send + Sync>;

/// The load both failover tests put on the cores: the config map `cm`, referenced by a pod on
/// each node, updated every 50 ms (60 times), and each node's view of it sampled every 20 ms.
struct Load {
    nodes: usize,
    read: ReadNode,
    updates: tokio::task::JoinHandle<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sampler: tokio::task::JoinHandle<Vec<Vec<u64>>>,
}

impl Load {
    /// Creates the config map and a pod on each of `nodes` (placed by `leader`), waits until they
    /// run and every node holds the config map, then starts updating and sampling.
    async fn start(client: &kube::Client, nodes: &[&str], leader: &str, read: ReadNode) -> Load {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "cm"}, "data": {"n": "0"}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), "default");
        for (i, n) in nodes.iter().enumerate() {
            run_pod(&pods, &format!("p{i}"), n, leader).await;
            sedge_testkit::wait::until_async(
                &format!("the config map on {n}"),
                Duration::from_secs(20),
                Duration::from_millis(50),
                || async { read(i) },
            )
            .await;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (halt, r, count) = (stop.clone(), read.clone(), nodes.len());
        let sampler = tokio::task::spawn_blocking(move || {
            let mut seen = vec![Vec::new(); count];
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, s) in seen.iter_mut().enumerate() {
                    s.extend(r(i));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let updates = tokio::spawn(async move {
            for n in 1..=60u64 {
                let patch = json!({"data": {"n": n.to_string()}});
                // The API server stays up: every update is written.
                cms.patch("cm", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Load {
            nodes: nodes.len(),
            read,
            updates,
            stop,
            sampler,
        }
    }

    /// Waits for every update and for the last one on every node; checks that no node saw the
    /// config map go backwards.
    async fn finish(self) {
        self.updates.await.unwrap();
        for i in 0..self.nodes {
            sedge_testkit::wait::until_async(
                &format!("node {i} has update 60"),
                Duration::from_secs(20),
                Duration::from_millis(50),
                || async { ((self.read)(i) == Some(60)).then_some(()) },
            )
            .await;
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for (i, s) in self.sampler.await.unwrap().iter().enumerate() {
            assert!(
                s.windows(2).all(|w| w[0] <= w[1]),
                "node {i} saw the config map go backwards: {s:?}"
            );
            assert!(s.len() > 10, "node {i}: too few samples {s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_and_singleton_controllers_move_to_the_surviving_cloud_core() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let a = CloudCore::start(
        client.clone(),
        core_config(dir.path(), "core-a"),
        Vec::new(),
    )
    .await
    .unwrap();
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-system");
    wait_leads(&leases, "core-a").await;
    let b = CloudCore::start(
        client.clone(),
        core_config(dir.path(), "core-b"),
        Vec::new(),
    )
    .await
    .unwrap();
    let (addr_a, addr_b) = (a.hub.addr().to_string(), b.hub.addr().to_string());

    // Two nodes, joined through core-a; they know both hubs.
    let (token, _) = a
        .hub
        .tokens()
        .create_with(Duration::from_secs(300), "ha", 2, None)
        .unwrap();
    let mut nodes = Vec::new();
    for name in ["edge-1", "edge-2"] {
        let cfg = node_config(dir.path(), name, &addr_a, &addr_b);
        sedge_tunnel::join(&cfg.tunnel, &token).await.unwrap();
        nodes.push(EdgeCore::start(cfg, Vec::new()).await.unwrap());
    }
    sedge_testkit::wait::until_async(
        "both nodes on core-a",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { (a.hub.is_connected("edge-1") && a.hub.is_connected("edge-2")).then_some(()) },
    )
    .await;
    assert!(a.is_leading() && !b.is_leading(), "one leader: core-a");
    // The API says which core serves each node.
    let node_leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    wait_served_by(&node_leases, &["edge-1", "edge-2"], "core-a").await;

    // A config map the pods reference, updated every 50 ms from here on; the nodes' view of it,
    // sampled from their stores.
    let stores: Vec<_> = nodes.iter().map(|n| n.store.clone()).collect();
    let read: ReadNode = Arc::new(move |i| {
        let v = stores[i].get("configmap", "default", "cm").ok()??;
        v["data"]["n"].as_str()?.parse().ok()
    });
    let load = Load::start(&client, &["edge-1", "edge-2"], "core-a", read).await;

    // core-a dies mid-stream.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Meanwhile core-b queued nothing for nodes it does not serve.
    for n in ["edge-1", "edge-2"] {
        assert_eq!(b.hub.pending(n).await.unwrap(), 0, "core-b queued for {n}");
    }
    let t_kill = Instant::now();
    a.crash().await;
    sedge_testkit::wait::until_async(
        "both nodes on core-b",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { (b.hub.is_connected("edge-1") && b.hub.is_connected("edge-2")).then_some(()) },
    )
    .await;
    let reconnected = t_kill.elapsed();
    wait_leads(&leases, "core-b").await;
    let took_over = t_kill.elapsed();
    // Its controllers run once its election loop has seen the write it made.
    sedge_testkit::wait::until_async(
        "core-b runs the singleton controllers",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { b.is_leading().then_some(()) },
    )
    .await;
    load.finish().await;

    // The survivor's scheduler places a new pod, and it runs.
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    run_pod(&pods, "p2", "edge-2", "core-b").await;
    // The nodes' Leases are renewed through core-b, which claimed them.
    wait_served_by(&node_leases, &["edge-1", "edge-2"], "core-b").await;
    let renewed = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    let before = renewed(&node_leases.get("edge-1").await.unwrap());
    // Written when the stored renewal is 3/8 of the 20 s grace old: within 7.5 s.
    sedge_testkit::wait::until_async(
        "edge-1's Lease renewed through core-b",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let (node_leases, before) = (node_leases.clone(), before.clone());
            async move {
                let now = renewed(&node_leases.get("edge-1").await.ok()?);
                (now > before).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "failover: nodes on core-b {:.2} s after the kill, controllers {:.2} s",
        reconnected.as_secs_f64(),
        took_over.as_secs_f64()
    );
    for n in nodes {
        n.shutdown(false).await;
    }
    b.shutdown().await;
}

/// A core whose node another core claims (through the node's Lease, as a core the node moved to
/// does while this one still believes its connection alive) closes its session with the node at
/// once; the node, connected to it after all, comes back and the core claims it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_gives_up_a_node_another_core_claimed_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let a = CloudCore::start(
        client.clone(),
        core_config(dir.path(), "core-a"),
        Vec::new(),
    )
    .await
    .unwrap();
    let addr = a.hub.addr().to_string();
    let (token, _) = a
        .hub
        .tokens()
        .create_with(Duration::from_secs(300), "ha", 1, None)
        .unwrap();
    let cfg = node_config(dir.path(), "edge-1", &addr, &addr);
    sedge_tunnel::join(&cfg.tunnel, &token).await.unwrap();
    let node = EdgeCore::start(cfg, Vec::new()).await.unwrap();
    let node_leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    wait_served_by(&node_leases, &["edge-1"], "core-a").await;
    let first = a.hub.session_id("edge-1").expect("a session");
    counted(&a, (1, 0)).await; // one claim, for the one session
    // Renewals after the claim leave the annotation alone and change nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.hub.session_id("edge-1"), Some(first));
    counted(&a, (1, 0)).await;

    // core-b claims the node.
    node_leases
        .patch(
            "edge-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                sedge_cloudcore::ownership::SERVED_BY: "core-b"}}})),
        )
        .await
        .unwrap();
    // core-a closes its session; the node reconnects (core-a is its only hub) and core-a claims
    // it again with the new session's first renewal.
    sedge_testkit::wait::until_async(
        "core-a closed the claimed session and the node came back",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async { a.hub.session_id("edge-1").filter(|&s| s != first).map(drop) },
    )
    .await;
    wait_served_by(&node_leases, &["edge-1"], "core-a").await;
    counted(&a, (2, 1)).await; // gave the node up once, claimed it again
    node.shutdown(false).await;
    a.shutdown().await;
}

/// Join tokens and certificate revocations are shared through the API (Secrets in
/// kube-system), each core with its own hub database as on two machines: a token made on one
/// core joins through the other and is then used up on both; a token revoked through one core
/// closes, on the other, the session of a node whose certificate the first issued, and neither
/// lets it back in. What a core's hub database held before is copied into the API at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_tokens_and_revocations_are_shared_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let cfg = |name: &str| {
        let mut c = core_config(dir.path(), name);
        c.hub.data_dir = dir.path().join(name);
        c.join_records = JoinRecordsAt::Api;
        c
    };
    // A token in core-a's own database from before.
    let old = {
        std::fs::create_dir_all(dir.path().join("core-a")).unwrap();
        let local = sedge_tunnel::token::TokenStore::open(
            &dir.path().join("core-a/hub.db"),
            &cfg("core-a").hub.pki_dir,
            "0",
        )
        .unwrap();
        local.create(Duration::from_secs(300), "before").unwrap().1
    };
    let a = CloudCore::start(client.clone(), cfg("core-a"), Vec::new())
        .await
        .unwrap();
    let b = CloudCore::start(client.clone(), cfg("core-b"), Vec::new())
        .await
        .unwrap();
    let (addr_a, addr_b) = (a.hub.addr().to_string(), b.hub.addr().to_string());
    let listed = |core: &CloudCore| -> Vec<String> {
        core.hub
            .tokens()
            .list()
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    assert!(
        listed(&b).contains(&old.id),
        "core-a's old token was copied into the API"
    );
    // Revoked in the API, it stays revoked: the database is copied once.
    assert!(b.hub.tokens().revoke(&old.id).unwrap());
    let local =
        sedge_tunnel::token::SqliteRecords::open(&dir.path().join("core-a/hub.db")).unwrap();
    let again = sedge_cloudcore::joinrecords::ApiRecords::start(client.clone())
        .await
        .unwrap();
    assert_eq!(again.import(&local).unwrap(), (0, 0));
    assert!(!listed(&a).contains(&old.id));
    // `sedge token create|list` open a handle that reads no certificate record: it lists the
    // tokens, and refuses to revoke one (that needs to know which nodes it joined).
    {
        use sedge_tunnel::token::JoinRecords;
        let tokens_only = sedge_cloudcore::joinrecords::ApiRecords::for_tokens(client.clone());
        let ids: Vec<String> = tokens_only
            .list_tokens()
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(
            ids,
            again
                .list_tokens()
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
        );
        let e = tokens_only.revoke_token("anytoken").unwrap_err();
        assert!(e.to_string().contains("opened for tokens only"), "{e}");
        assert!(tokens_only.cert("no-such-fingerprint").is_none());
    }

    // A single-use token made on core-a is a Secret in kube-system; core-b lists it.
    let (token, info) = a
        .hub
        .tokens()
        .create(Duration::from_secs(300), "shared")
        .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), "kube-system");
    let s = secrets
        .get(&format!("sedge-join-token-{}", info.id))
        .await
        .unwrap();
    assert_eq!(
        s.type_.as_deref(),
        Some(sedge_cloudcore::joinrecords::TOKEN_TYPE)
    );
    assert!(listed(&b).contains(&info.id));
    // edge-1 joins through core-b with it; then the token is used up on core-a too.
    let via_b = node_config(dir.path(), "edge-1", &addr_b, &addr_a);
    sedge_tunnel::join(&via_b.tunnel, &token).await.unwrap();
    let via_a = node_config(dir.path(), "edge-2", &addr_a, &addr_b);
    let e = sedge_tunnel::join(&via_a.tunnel, &token).await.unwrap_err();
    assert!(e.to_string().contains("has been used 1 time"), "{e}");
    let used = a.hub.tokens().list().unwrap();
    let used = used.iter().find(|t| t.id == info.id).unwrap();
    assert_eq!((used.uses, used.last_node.as_str()), (1, "edge-1"));

    // edge-1 runs against core-a, with the certificate core-b issued.
    let node = EdgeCore::start(
        node_config(dir.path(), "edge-1", &addr_a, &addr_b),
        Vec::new(),
    )
    .await
    .unwrap();
    sedge_testkit::wait::until_async(
        "edge-1 on core-a",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { a.hub.is_connected("edge-1").then_some(()) },
    )
    .await;
    // The token revoked through core-b: core-a closes edge-1's session, and neither core
    // lets the node back in.
    assert!(b.hub.tokens().revoke(&info.id).unwrap());
    let revoked = Instant::now();
    sedge_testkit::wait::until_async(
        "core-a closed the revoked node's session",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { (!a.hub.is_connected("edge-1")).then_some(()) },
    )
    .await;
    let closed = revoked.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !a.hub.is_connected("edge-1") && !b.hub.is_connected("edge-1"),
        "a revoked certificate connected again"
    );
    // The record says so, for every core (and for `kubectl get secret`).
    let rec = secrets.get("sedge-node-certs-edge-1").await.unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&rec.data.unwrap()["records.json"].0).unwrap();
    let certs = rec["certs"].as_array().unwrap();
    assert!(
        !certs.is_empty()
            && certs
                .iter()
                .all(|c| c["revoked"] == true && c["token"] == info.id.as_str()),
        "{rec}"
    );
    eprintln!(
        "a token revoked on core-b: core-a closed the session {:.2} s later",
        closed.as_secs_f64()
    );
    node.shutdown(false).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A child process killed (SIGKILL) when dropped, its stderr in `log`.
struct Proc {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], log: std::path::PathBuf) -> Proc {
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sedge"))
            .args(args)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("sedge starts");
        Proc { child, log }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- {} (tail):\n{}", self.log.display(), common::tail(&log));
        }
        self.kill9();
    }
}

/// `GET path` from the edge MetaServer at `addr` (plain HTTP, anonymous reads): the JSON body of
/// a 200.
fn metaserver_get(addr: &str, path: &str) -> Option<serde_json::Value> {
    let body = common::http_body(addr, path)?;
    // The body may be chunked: the JSON object is between the first '{' and the last '}'.
    let (a, b) = (body.find('{')?, body.rfind('}')?);
    serde_json::from_str(&body[a..=b]).ok()
}

/// Two `sedge cloud --kubeconfig` processes against one `sedge apiserver`, sharing the PKI
/// directory but each with its own hub database (as on two machines), two `sedge edge` agents
/// that list both hubs. The leading core is killed with SIGKILL while a config map is updated
/// every 50 ms: the nodes' Leases name the survivor (they reconnected and it claimed them), the
/// survivor took each node's inventory from its hello as the node's delivery records, it takes
/// the controllers' Lease over, every update reaches both nodes and none goes backwards (sampled
/// from the nodes' MetaServers), and the survivor's scheduler places a new pod, which runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cloud_processes_survive_kill_9_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let arg = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let _api = Proc::spawn(
        &[
            "apiserver",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &arg(&d.join("api")),
        ],
        d.join("apiserver.log"),
    );
    let kubeconfig = d.join("api/kubeconfig");
    let client = sedge_testkit::wait::until_async(
        "sedge apiserver up",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).ok()?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .ok()?;
            let c = kube::Client::try_from(cfg).ok()?;
            c.apiserver_version().await.ok()?;
            Some(c)
        },
    )
    .await;
    let hubs = [common::free_port(), common::free_port()];
    let metrics = [common::free_port(), common::free_port()];
    let core_args = |name: &str, port: u16, metrics: u16| -> Vec<String> {
        let cfg = d.join(format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "hub:\n  listen: 127.0.0.1:{port}\n  listen_quic: ''\n  data_dir: {}\n  pki_dir: {}\n  \
                 keepalive_interval_ms: 300\n  ack_timeout_ms: 500\n\
                 metrics_listen: 127.0.0.1:{metrics}\nnode_grace_seconds: 20\nnode_monitor_period_ms: 500\n\
                 leader:\n  identity: {name}\n  lease_duration_ms: 3000\n  renew_deadline_ms: 2000\n  \
                 retry_period_ms: 300\n",
                d.join("cloud").join(name).display(),
                d.join("cloud/pki").display()
            ),
        )
        .unwrap();
        vec![
            "cloud".into(),
            "--kubeconfig".into(),
            arg(&kubeconfig),
            "-c".into(),
            arg(&cfg),
        ]
    };
    let spawn_core = |name: &str, port: u16, metrics: u16| {
        let args = core_args(name, port, metrics);
        Proc::spawn(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            d.join(format!("{name}.log")),
        )
    };
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-system");
    let mut core_a = spawn_core("core-a", hubs[0], metrics[0]);
    wait_leads(&leases, "core-a").await;
    let _core_b = spawn_core("core-b", hubs[1], metrics[1]);

    // Two nodes, joined through core-a; they list both hubs.
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(["token", "create", "--ttl", "1h", "--max-uses", "2"])
        .args(["--kubeconfig", &arg(&kubeconfig)])
        .args(["--pki-dir", &arg(&d.join("cloud/pki"))])
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let meta = [common::free_port(), common::free_port()];
    let mut edges = Vec::new();
    for (i, name) in ["edge-1", "edge-2"].iter().enumerate() {
        let cfg = d.join(format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "runtime: hollow\nmetaserver_anonymous_reads: true\nmetrics_listen: ''\n\
                 lease_interval_ms: 500\nsync_interval_ms: 100\n\
                 tunnel:\n  cloud_alternates: ['127.0.0.1:{}']\n  keepalive_interval_ms: 300\n  \
                 backoff_initial_ms: 100\n  backoff_max_ms: 400\n  ack_timeout_ms: 500\n",
                hubs[1]
            ),
        )
        .unwrap();
        let (hub_a, ms) = (
            format!("127.0.0.1:{}", hubs[0]),
            format!("127.0.0.1:{}", meta[i]),
        );
        edges.push(Proc::spawn(
            &[
                "edge",
                "-c",
                &arg(&cfg),
                "--data-dir",
                &arg(&d.join(name)),
                "--cloud",
                &hub_a,
                "--node-name",
                name,
                "--token",
                &token,
                "--metaserver",
                &ms,
                "--mqtt-listen",
                "",
                "--lc-listen",
                "",
                "--dmi-socket",
                "-",
            ],
            d.join(format!("{name}.log")),
        ));
    }
    let node_leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    wait_served_by(&node_leases, &["edge-1", "edge-2"], "core-a").await;

    // A config map the pods reference, updated every 50 ms from here on; the nodes' view of it,
    // sampled from their MetaServers.
    let read: ReadNode = Arc::new(move |i| {
        let v = metaserver_get(
            &format!("127.0.0.1:{}", meta[i]),
            "/api/v1/namespaces/default/configmaps/cm",
        )?;
        v["data"]["n"].as_str()?.parse().ok()
    });
    let load = Load::start(&client, &["edge-1", "edge-2"], "core-a", read).await;

    // core-a is killed mid-stream.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t_kill = Instant::now();
    core_a.kill9();
    wait_served_by(&node_leases, &["edge-1", "edge-2"], "core-b").await;
    let moved = t_kill.elapsed();
    wait_leads(&leases, "core-b").await;
    let took_over = t_kill.elapsed();
    load.finish().await;
    // core-b never served the nodes and has its own database: what it knows they hold came from
    // their hellos.
    let text =
        common::http_body(&format!("127.0.0.1:{}", metrics[1]), "/metrics").unwrap_or_default();
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        counter("sedge_hub_inventories_adopted_total ") >= 2,
        "core-b took both nodes' inventories:\n{text}"
    );
    assert_eq!(counter("sedge_hub_inventories_refused_total "), 0);
    // The survivor's scheduler places a new pod, and it runs.
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    run_pod(&pods, "p2", "edge-2", "core-b").await;
    eprintln!(
        "kill -9: both nodes claimed by core-b {:.2} s after the kill, controllers {:.2} s",
        moved.as_secs_f64(),
        took_over.as_secs_f64()
    );
    // The token is in the cluster: revoked there, the survivor closes both nodes' sessions,
    // though their certificates were issued by the core that died.
    let revoke = std::process::Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(["token", "revoke", token.as_str()])
        .args(["--kubeconfig", &arg(&kubeconfig)])
        .args(["--pki-dir", &arg(&d.join("cloud/pki"))])
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let connected = || {
        common::http_body(&format!("127.0.0.1:{}", metrics[1]), "/metrics")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("sedge_hub_nodes_connected ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    sedge_testkit::wait::until_async(
        "core-b closed the revoked nodes' sessions",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { (connected() == Some(0)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connected(), Some(0), "a revoked node connected again");
}

/// The embedded API server streams a watch's initial state, so a cloud core against it takes
/// its informers' first lists as streaming watches (`lists::probe`), and a reflector configured
/// that way fills with every object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informers_list_by_streaming_watch_against_the_embedded_server() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = common::apiserver(&dir.path().join("apiserver")).await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
    for i in 0..30 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    assert!(sedge_cloudcore::lists::probe(&client).await);
    let config = sedge_cloudcore::lists::config();
    assert_eq!(
        config.initial_list_strategy,
        watcher::InitialListStrategy::StreamingList
    );
    let (store, writer) = reflector::store::<ConfigMap>();
    let stream = reflector::reflector(writer, watcher(cms, config).default_backoff());
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready())
        .await
        .expect("the store filled in time")
        .unwrap();
    let mut names: Vec<String> = store
        .state()
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    task.abort();
}
