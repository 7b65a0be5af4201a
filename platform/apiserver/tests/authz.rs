//! Authorization and the request bounds, driven as an attacker and as users would: the real
//! `kubectl` with bearer tokens for users that hold nothing, a `view` binding, their own roles,
//! and a node identity; raw requests for the bodies no client would send.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use sedge_apiserver::ApiServer;

const TOKENS: &str = "tok-admin,sedge-admin,sedge-admin,\"system:masters\"
tok-alice,alice,2
tok-bob,bob,3,\"devs\"
tok-node,system:node:edge-1,4,\"system:nodes\"
";

async fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("users.csv");
    std::fs::write(&tokens, TOKENS).unwrap();
    let t = start_with(|c| c.token_file = Some(tokens)).await;
    drop(dir);
    t
}

async fn as_user(t: &TestServer, token: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    kubectl(&t.kubeconfig(), &all).await
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn rbac_through_kubectl() {
    let t = server().await;
    let kc = t.kubeconfig();
    // A user nobody bound holds nothing, and the 403 reads like kube-apiserver's.
    let o = as_user(&t, "tok-alice", &["get", "pods"]).await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        text(&o)
    );
    // The default roles are there to read, like Kubernetes' bootstrap policy.
    let roles = kubectl_ok(&kc, &["get", "clusterroles"]).await;
    for r in ["cluster-admin", "admin", "edit", "view"] {
        assert!(roles.contains(r), "{roles}");
    }
    // `view` for the group devs: reads, no writes, no secrets.
    kubectl_ok(
        &kc,
        &[
            "create",
            "rolebinding",
            "devs-view",
            "--clusterrole=view",
            "--group=devs",
        ],
    )
    .await;
    kubectl_ok(
        &kc,
        &["create", "configmap", "settings", "--from-literal=a=1"],
    )
    .await;
    kubectl_ok(
        &kc,
        &["create", "secret", "generic", "pw", "--from-literal=p=x"],
    )
    .await;
    let o = as_user(&t, "tok-bob", &["get", "configmaps"]).await;
    assert!(
        o.status.success() && text(&o).contains("settings"),
        "{}",
        text(&o)
    );
    let o = as_user(
        &t,
        "tok-bob",
        &["create", "configmap", "mine", "--from-literal=b=2"],
    )
    .await;
    assert!(
        text(&o).contains(
            "configmaps is forbidden: User \"bob\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        text(&o)
    );
    let o = as_user(&t, "tok-bob", &["get", "secret", "pw"]).await;
    assert!(
        text(&o).contains("cannot get resource \"secrets\""),
        "{}",
        text(&o)
    );
    // kubectl auth can-i, one question and the list.
    let o = as_user(&t, "tok-bob", &["auth", "can-i", "list", "pods"]).await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes");
    let o = as_user(&t, "tok-bob", &["auth", "can-i", "delete", "pods"]).await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no");
    let o = as_user(&t, "tok-bob", &["auth", "can-i", "--list"]).await;
    let list = text(&o);
    assert!(o.status.success(), "{list}");
    let pods = list
        .lines()
        .find(|l| l.starts_with("pods "))
        .unwrap_or_else(|| panic!("no pods row in\n{list}"));
    assert!(pods.contains("[get list watch]"), "{pods}");
    assert!(!list.lines().any(|l| l.starts_with("secrets ")), "{list}");
    // kubectl create role / rolebinding, and the user can do exactly that.
    kubectl_ok(
        &kc,
        &[
            "create",
            "role",
            "cm-writer",
            "--verb=create",
            "--verb=get",
            "--resource=configmaps",
        ],
    )
    .await;
    kubectl_ok(
        &kc,
        &[
            "create",
            "rolebinding",
            "alice-cm",
            "--role=cm-writer",
            "--user=alice",
        ],
    )
    .await;
    let o = as_user(
        &t,
        "tok-alice",
        &["create", "configmap", "alices", "--from-literal=c=3"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user(&t, "tok-alice", &["delete", "configmap", "alices"]).await;
    assert!(text(&o).contains("cannot delete resource"), "{}", text(&o));
    t.server.shutdown().await;
}

#[tokio::test]
async fn serviceaccount_tokens_through_kubectl() {
    let t = server().await;
    let kc = t.kubeconfig();
    for args in [
        &["create", "namespace", "team"][..],
        &["create", "serviceaccount", "ctl", "-n", "team"],
        &[
            "create",
            "rolebinding",
            "ctl-view",
            "--clusterrole=view",
            "--serviceaccount=team:ctl",
            "-n",
            "team",
        ],
    ] {
        kubectl_ok(&kc, args).await;
    }
    // `kubectl create token`: a signed, expiring token for the ServiceAccount.
    let token = kubectl_ok(&kc, &["create", "token", "ctl", "-n", "team"]).await;
    let token = token.trim();
    assert!(
        token.starts_with("eyJ") && token.matches('.').count() == 2,
        "{token}"
    );
    let o = as_user(&t, token, &["get", "configmaps", "-n", "team"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user(&t, token, &["create", "configmap", "x", "-n", "team"]).await;
    assert!(
        text(&o).contains(
            "configmaps is forbidden: User \"system:serviceaccount:team:ctl\" cannot create resource \"configmaps\""
        ),
        "{}",
        text(&o)
    );
    let o = as_user(
        &t,
        token,
        &["auth", "can-i", "list", "pods", "-n", "default"],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no");
    let o = as_user(&t, token, &["auth", "whoami"]).await;
    let who = text(&o);
    assert!(
        o.status.success() && who.contains("system:serviceaccount:team:ctl"),
        "{who}"
    );
    assert!(who.contains("system:serviceaccounts:team"), "{who}");
    // Too short a lifetime is refused with kube-apiserver's words.
    let o = kubectl(
        &kc,
        &["create", "token", "ctl", "-n", "team", "--duration=1m"],
    )
    .await;
    assert!(
        text(&o).contains("may not specify a duration less than 10 minutes"),
        "{}",
        text(&o)
    );
    // A token for another audience is no credential here.
    let vault = kubectl_ok(
        &kc,
        &["create", "token", "ctl", "-n", "team", "--audience=vault"],
    )
    .await;
    let o = as_user(&t, vault.trim(), &["get", "configmaps", "-n", "team"]).await;
    assert!(text(&o).contains("Unauthorized"), "{}", text(&o));
    // A token bound to a pod dies with the pod.
    kubectl_ok(
        &kc,
        &[
            "run",
            "p",
            "-n",
            "team",
            "--image=sedge/worker",
            "--restart=Never",
        ],
    )
    .await;
    let bound = kubectl_ok(
        &kc,
        &[
            "create",
            "token",
            "ctl",
            "-n",
            "team",
            "--bound-object-kind=Pod",
            "--bound-object-name=p",
        ],
    )
    .await;
    let bound = bound.trim().to_string();
    let o = as_user(&t, &bound, &["get", "configmaps", "-n", "team"]).await;
    assert!(o.status.success(), "{}", text(&o));
    // A user who may only view cannot mint tokens.
    kubectl_ok(
        &kc,
        &[
            "create",
            "rolebinding",
            "bob-view",
            "--clusterrole=view",
            "--user=bob",
            "-n",
            "team",
        ],
    )
    .await;
    let o = as_user(&t, "tok-bob", &["create", "token", "ctl", "-n", "team"]).await;
    assert!(
        text(&o).contains("cannot create resource \"serviceaccounts/token\""),
        "{}",
        text(&o)
    );
    // A forged token (claims edited, signature kept) is refused.
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    let o = as_user(&t, &forged, &["get", "configmaps", "-n", "team"]).await;
    assert!(text(&o).contains("Unauthorized"), "{}", text(&o));
    // Deleting the pod, then the ServiceAccount, revokes their tokens (within the 10 s cache).
    kubectl_ok(&kc, &["delete", "pod", "p", "-n", "team", "--wait=false"]).await;
    kubectl_ok(&kc, &["delete", "serviceaccount", "ctl", "-n", "team"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for tok in [bound.as_str(), token] {
        loop {
            let o = as_user(&t, tok, &["get", "configmaps", "-n", "team"]).await;
            if text(&o).contains("Unauthorized") {
                break;
            }
            assert!(Instant::now() < deadline, "still accepted: {}", text(&o));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_namespace_admin_cannot_escalate() {
    let t = server().await;
    let kc = t.kubeconfig();
    kubectl_ok(&kc, &["create", "namespace", "team"]).await;
    kubectl_ok(
        &kc,
        &[
            "create",
            "rolebinding",
            "alice-admin",
            "-n",
            "team",
            "--clusterrole=admin",
            "--user=alice",
        ],
    )
    .await;
    // Inside the namespace: an admin, who may grant what it holds.
    let o = as_user(
        &t,
        "tok-alice",
        &[
            "create",
            "rolebinding",
            "bob-edit",
            "-n",
            "team",
            "--clusterrole=edit",
            "--user=bob",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    // The attack: bind cluster-admin to oneself inside the namespace, or cluster-wide.
    let o = as_user(
        &t,
        "tok-alice",
        &[
            "create",
            "rolebinding",
            "me-root",
            "-n",
            "team",
            "--clusterrole=cluster-admin",
            "--user=alice",
        ],
    )
    .await;
    assert!(
        text(&o).contains("attempting to grant RBAC permissions not currently held"),
        "{}",
        text(&o)
    );
    let o = as_user(
        &t,
        "tok-alice",
        &[
            "create",
            "clusterrolebinding",
            "me-root",
            "--clusterrole=cluster-admin",
            "--user=alice",
        ],
    )
    .await;
    assert!(text(&o).contains("forbidden"), "{}", text(&o));
    // A role with more than the author holds.
    let o = as_user(
        &t,
        "tok-alice",
        &[
            "create",
            "role",
            "all",
            "-n",
            "team",
            "--verb=*",
            "--resource=nodes",
        ],
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    let o = as_user(
        &t,
        "tok-alice",
        &["auth", "can-i", "create", "rolebindings", "-n", "team"],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes");
    let bindings = kubectl_ok(&kc, &["get", "rolebindings", "-n", "team", "-o", "name"]).await;
    assert!(!bindings.contains("me-root"), "{bindings}");
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_node_identity_touches_only_its_own() {
    let t = server().await;
    let kc = t.kubeconfig();
    let client = t.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for name in ["mine", "theirs"] {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": name}, "data": {"k": "v"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    }
    kubectl_ok(
        &kc,
        &["create", "secret", "generic", "db", "--from-literal=p=x"],
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, node: &str, cm: &str| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}],
                     "volumes": [{"name": "v", "configMap": {"name": cm}}]}
        }))
        .unwrap()
    };
    pods.create(&PostParams::default(), &pod("on-1", "edge-1", "mine"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("on-2", "edge-2", "theirs"))
        .await
        .unwrap();
    // What a node needs: its pods' config, reading pods and nodes.
    let node = |args: &'static [&'static str]| as_user(&t, "tok-node", args);
    let o = node(&["get", "configmap", "mine", "-o", "name"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let o = node(&["get", "pods"]).await;
    assert!(o.status.success(), "{}", text(&o));
    // The attack surface of a stolen node credential.
    for (args, want) in [
        (
            &["get", "configmap", "theirs"][..],
            "cannot get resource \"configmaps\"",
        ),
        (
            &["get", "secrets", "-A"][..],
            "cannot list resource \"secrets\"",
        ),
        (
            &["get", "secret", "db"][..],
            "cannot get resource \"secrets\"",
        ),
        (
            &["delete", "pod", "on-2"][..],
            "cannot delete resource \"pods\"",
        ),
        (
            &["create", "namespace", "evil"][..],
            "cannot create resource \"namespaces\"",
        ),
        (
            &[
                "create",
                "clusterrolebinding",
                "x",
                "--clusterrole=cluster-admin",
                "--user=system:node:edge-1",
            ][..],
            "forbidden",
        ),
    ] {
        let o = node(args).await;
        assert!(!o.status.success(), "{args:?} was allowed");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    let o = node(&["auth", "can-i", "delete", "nodes/edge-2"]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "no",
        "{}",
        text(&o)
    );
    let o = node(&["auth", "can-i", "patch", "nodes/edge-1"]).await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes");
    // A pod bound to it may be deleted by it; another node's may not.
    let o = node(&["delete", "pod", "on-1", "--wait=false"]).await;
    assert!(o.status.success(), "{}", text(&o));
    t.server.shutdown().await;
}

#[tokio::test]
async fn pod_names_that_are_paths_are_refused() {
    let t = server().await;
    let pods: Api<Pod> = Api::namespaced(t.client().await, "default");
    for bad in ["/tmp/x/y", "../../../../tmp/z"] {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "evil"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "volumeMounts": [{"name": bad, "mountPath": "/x"}]}],
                     "volumes": [{"name": bad, "configMap": {"name": "c"}}]}
        }))
        .unwrap();
        let e = pods.create(&PostParams::default(), &p).await.unwrap_err();
        let kube::Error::Api(s) = e else {
            panic!("{e}")
        };
        assert_eq!(s.code, 422, "{s:?}");
        assert!(s.message.contains("spec.volumes[0].name"), "{}", s.message);
    }
    assert!(pods.get_opt("evil").await.unwrap().is_none());
    t.server.shutdown().await;
}

#[tokio::test]
async fn deep_bodies_are_refused_before_parsing_and_the_server_stays_up() {
    let t = server().await;
    let client = t.client().await;
    let deep = format!("a: {}", "[".repeat(100_000));
    let started = Instant::now();
    let post = |body: String| {
        http::Request::post("/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/yaml")
            .body(body.into_bytes())
            .unwrap()
    };
    let (a, b, health) = tokio::join!(
        client.request_text(post(deep.clone())),
        client.request_text(post(deep.replace('[', "{"))),
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let started = Instant::now();
            let r = client
                .request_text(http::Request::get("/healthz").body(Vec::new()).unwrap())
                .await;
            (r, started.elapsed())
        }
    );
    for r in [a, b] {
        let kube::Error::Api(s) = r.unwrap_err() else {
            panic!("expected a Status")
        };
        assert_eq!(s.code, 400);
        assert!(s.message.contains("levels deep"), "{}", s.message);
    }
    assert_eq!(health.0.unwrap(), "ok");
    // Not a timing assertion on speed, only that nothing was parsed for seconds.
    assert!(started.elapsed() < Duration::from_secs(20));
    t.server.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let t = start_with(|c| {
        c.header_timeout_seconds = 30;
        c.max_connections = 8;
    })
    .await;
    let addr = t.server.addr;
    // The attack: sockets that never send a byte, as many as the cap, far from their deadline.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Silent for longer than a client's bytes could be on their way.
    tokio::time::sleep(sedge_serve::EVICT_AFTER + Duration::from_millis(200)).await;
    // A real client is still served at once: it takes the slot of the oldest silent socket.
    let started = Instant::now();
    let c = client_for(&t.kubeconfig(), None).await;
    c.request_text(http::Request::get("/version").body(Vec::new()).unwrap())
        .await
        .expect("a client was locked out by idle sockets");
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        idle[0].read(&mut buf).await
    })
    .await
    .expect("the oldest silent socket is closed by the server");
    assert!(matches!(closed, Ok(0) | Err(_)));
    drop(idle);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_are_closed_and_their_memory_freed() {
    use sedge_apiserver::watch::{WATCH_BYTES_PER_WATCHER, WATCH_BYTES_TOTAL};
    use std::sync::atomic::Ordering;
    let t = start_with(|c| c.slow_watch_grace_seconds = 5).await;
    let client = t.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // Three watchers that never poll their streams.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let s = cms
            .watch(&kube::api::WatchParams::default().timeout(290), "0")
            .await
            .unwrap();
        idle.push(Box::pin(s));
    }
    // 40 MB of events each: more than sockets, hyper and the per-watcher budget hold.
    let big = "x".repeat(2 * 1024 * 1024);
    for i in 0..20 {
        let cm: ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": format!("big-{i}")}, "data": {"blob": big}}),
        )
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let budget = t.server.watch_budget();
    wait_for(30, "the slow watchers to be closed", || {
        let closed = budget.closed_slow.load(Ordering::Relaxed);
        async move { closed >= 3 }
    })
    .await;
    assert!(budget.queued() <= WATCH_BYTES_TOTAL);
    assert!(budget.queued() < 3 * WATCH_BYTES_PER_WATCHER);
    // Closed means closed: their streams are dropped and what they had queued is given back
    // while the clients still hold them unread.
    wait_for(10, "the slow watchers' queues to be freed", || {
        let q = budget.queued();
        async move { q == 0 }
    })
    .await;
    // A watcher that reads gets everything, 40 MB of initial events included. (Its own client:
    // over HTTP/2 the unread streams above hold their connection's flow-control window.)
    let reader: Api<ConfigMap> = Api::namespaced(t.client().await, "default");
    let mut live = Box::pin(
        reader
            .watch(&kube::api::WatchParams::default().timeout(60), "0")
            .await
            .unwrap(),
    );
    use futures::TryStreamExt;
    let mut seen = 0;
    while seen < 20 {
        match live.try_next().await.unwrap() {
            Some(kube::api::WatchEvent::Added(_)) => seen += 1,
            Some(_) => {}
            None => panic!(
                "the reading watcher was closed after {seen} events (queued {}, closed {})",
                budget.queued(),
                budget.closed_slow.load(Ordering::Relaxed)
            ),
        }
    }
    drop(idle);
    wait_for(10, "the budget to be given back", || {
        let q = budget.queued();
        async move { q == 0 }
    })
    .await;
    t.server.shutdown().await;
}

/// `start_isolated`: the server answers while the runtime that started it is blocked (in
/// `sedge up` that runtime carries the hub's keepalives and the controllers).
#[tokio::test(flavor = "current_thread")]
async fn an_isolated_server_answers_while_its_callers_runtime_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let server = sedge_apiserver::ApiServer::start_isolated(config(dir.path(), "127.0.0.1:0"), 2)
        .await
        .unwrap();
    let kubeconfig = server.kubeconfig.clone();
    let asker = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = client_for(&kubeconfig, None).await;
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                c.request_text(http::Request::get("/version").body(Vec::new()).unwrap()),
            )
            .await
        })
    });
    // Block this (current-thread) runtime until the other thread has its answer.
    let answer = asker.join().unwrap();
    assert!(
        answer
            .expect("answered in time")
            .unwrap()
            .contains("gitVersion")
    );
    server.shutdown().await;
}

/// An upgrade: a bootstrap ClusterRole stored by an older version (fewer rules) gains the new
/// rules on the next start and keeps what an administrator added; one whose `autoupdate`
/// annotation was set to false is left exactly as it is.
#[tokio::test]
async fn stored_bootstrap_roles_gain_new_rules_on_restart_unless_opted_out() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let t = start().await;
    let roles: Api<ClusterRole> = Api::all(t.client().await);
    let mut cc = roles.get("sedge:cloudcore").await.unwrap();
    let full = cc.rules.clone().unwrap();
    // An older version's role: without the workload rules, plus a rule the administrator added.
    let mut old: Vec<_> = full
        .iter()
        .filter(|r| !r.api_groups.iter().flatten().any(|g| g == "batch"))
        .cloned()
        .collect();
    assert!(
        old.len() < full.len(),
        "the cloud core's role has a batch rule"
    );
    let extra: k8s_openapi::api::rbac::v1::PolicyRule = serde_json::from_value(
        serde_json::json!({"verbs": ["get"], "apiGroups": ["example.com"], "resources": ["things"]}),
    )
    .unwrap();
    old.push(extra.clone());
    cc.rules = Some(old.clone());
    roles
        .replace("sedge:cloudcore", &PostParams::default(), &cc)
        .await
        .unwrap();
    let mut view = roles.get("view").await.unwrap();
    view.annotations_mut().insert(
        "rbac.authorization.kubernetes.io/autoupdate".into(),
        "false".into(),
    );
    let view_rules = vec![extra.clone()];
    view.rules = Some(view_rules.clone());
    roles
        .replace("view", &PostParams::default(), &view)
        .await
        .unwrap();

    let dir = t.dir;
    t.server.shutdown().await;
    let server = ApiServer::start(config(dir.path(), "127.0.0.1:0"))
        .await
        .unwrap();
    let roles: Api<ClusterRole> = Api::all(client_for(&server.kubeconfig, None).await);
    let rules = roles.get("sedge:cloudcore").await.unwrap().rules.unwrap();
    for r in &full {
        assert!(rules.contains(r), "{r:?} was not restored");
    }
    assert!(rules.contains(&extra), "the administrator's rule stays");
    assert_eq!(roles.get("view").await.unwrap().rules.unwrap(), view_rules);
    server.shutdown().await;
}
