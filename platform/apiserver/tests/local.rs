//! The in-memory transport (`ApiServer::local_service`): a `kube` client on it reads, writes and
//! watches like one over TLS, under the identity it was made for and that identity's role, and a
//! request cannot claim another identity through it.

mod common;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use sedge_apiserver::auth::{Identity, PeerIdentity};
use sedge_apiserver::authz::CLOUDCORE_USER;
use serde_json::json;
use tower::ServiceExt;

fn local(t: &TestServer, user: &str, groups: &[&str]) -> kube::Client {
    kube::Client::new(t.server.local_service(user, groups), "default")
}

fn forbidden(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => s.message,
        other => panic!("expected 403, got {other:?}"),
    }
}

#[tokio::test]
async fn a_local_client_reads_writes_and_watches_as_its_own_identity() {
    let t = start().await;
    let admin = local(&t, "local-admin", &["system:masters"]);
    let cms: Api<ConfigMap> = Api::default_namespaced(admin.clone());
    let mut events = cms
        .watch(&WatchParams::default().timeout(10), "0")
        .await
        .unwrap()
        .boxed();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"}, "data": {"a": "1"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // The watch streams the create through memory, as it would over a socket.
    let seen = loop {
        match events.try_next().await.unwrap() {
            Some(WatchEvent::Added(c)) => break c,
            Some(WatchEvent::Bookmark(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(seen.metadata.name.as_deref(), Some("settings"));
    // The same object through TLS: one server behind both.
    let over_tls: Api<ConfigMap> = Api::default_namespaced(t.client().await);
    let got = over_tls.get("settings").await.unwrap();
    assert_eq!(got.data.unwrap()["a"], "1");

    // The cloud core's identity has the cloud core's role: Leases yes, Secrets' writes no.
    let cloud = local(&t, CLOUDCORE_USER, &[]);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "edge-1", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "edge-1", "leaseDurationSeconds": 40},
    }))
    .unwrap();
    Api::<Lease>::namespaced(cloud.clone(), "kube-node-lease")
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "stolen"}, "stringData": {"k": "v"}}))
            .unwrap();
    let e = Api::<Secret>::default_namespaced(cloud)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_err();
    let msg = forbidden(e);
    assert!(msg.contains("sedge:cloudcore"), "{msg}");

    // A user nobody bound holds nothing.
    let nobody = local(&t, "alice", &[]);
    let e = Api::<ConfigMap>::default_namespaced(nobody)
        .list(&Default::default())
        .await
        .unwrap_err();
    let msg = forbidden(e);
    assert!(msg.contains("\"alice\""), "{msg}");
}

#[tokio::test]
async fn a_request_cannot_claim_another_identity_through_the_local_transport() {
    let t = start().await;
    let svc = t.server.local_service("alice", &[]);
    // The caller attaches an administrator's identity (and a token it does not hold) to the
    // request itself: the service's own identity wins, and alice holds nothing.
    let mut req = http::Request::get("/api/v1/namespaces/default/secrets")
        .header("authorization", "Bearer not-a-token")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut().insert(PeerIdentity(Some(Identity {
        user: "sedge-admin".into(),
        groups: vec!["system:masters".into()],
    })));
    let resp = svc.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("User \\\"alice\\\""), "{text}");
}
