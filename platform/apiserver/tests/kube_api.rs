//! The API server driven by the `kube` crate, the way Sedge's controllers use it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy, WatchEvent,
    WatchParams,
};
use kube::core::Status as ErrorResponse;
use kube::runtime::watcher;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    if !labels.is_empty() {
        c.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    c.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    c
}

fn api_err(e: kube::Error) -> Box<ErrorResponse> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_with_optimistic_concurrency() {
    let s = start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    let created = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let rv1 = created.resource_version().unwrap();
    assert!(created.uid().is_some());
    assert!(created.metadata.creation_timestamp.is_some());

    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.data = Some(BTreeMap::from([("k".into(), "new".into())]));
    let updated = api
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert!(
        updated.resource_version().unwrap().parse::<i64>().unwrap() > rv1.parse::<i64>().unwrap()
    );

    stale.data = Some(BTreeMap::from([("k".into(), "lost update".into())]));
    let e = api_err(
        api.replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["k"], "new");

    let e = api_err(
        api.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    // An update that changes nothing does not move the resourceVersion.
    let same = api
        .replace("a", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(same.resource_version(), updated.resource_version());

    let mut gen_cm = cm("", &[]);
    gen_cm.metadata.generate_name = Some("gen-".into());
    let g = api.create(&PostParams::default(), &gen_cm).await.unwrap();
    assert!(
        g.name_any().starts_with("gen-") && g.name_any().len() == 9,
        "{}",
        g.name_any()
    );

    api.delete("a", &DeleteParams::default()).await.unwrap();
    let e = api_err(api.get("a").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    let e = api_err(
        Api::<ConfigMap>::namespaced(s.client().await, "nope")
            .create(&PostParams::default(), &cm("x", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e.code, 404,
        "creating in a missing namespace: {}",
        e.message
    );
}

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "Gadget",
    namespaced,
    status = "GadgetStatus",
    shortname = "gd"
)]
#[kube(printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size"}"#)]
/// A test custom resource.
pub struct GadgetSpec {
    size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
}

/// Its status.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, Default)]
pub struct GadgetStatus {
    ready: bool,
}

async fn install_gadget_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Gadget::crd())
        .await
        .unwrap();
    let crd = crds.get("gadgets.example.com").await.unwrap();
    let conds = crd.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_custom_resource_round_trips() {
    let s = start().await;
    let client = s.client().await;
    install_gadget_crd(&client).await;
    let api: Api<Gadget> = Api::namespaced(client.clone(), "default");
    let g = Gadget::new(
        "g1",
        GadgetSpec {
            size: 3,
            color: Some("red".into()),
        },
    );
    let created = api.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(created.spec.size, 3);
    assert!(
        created.status.is_none(),
        "status is reset on create when /status is a subresource"
    );

    // Status goes through the subresource; a spec write cannot change it.
    let st = api
        .patch_status(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .unwrap();
    assert!(st.status.as_ref().unwrap().ready);
    assert_eq!(
        st.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );
    let spec = api
        .patch(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 4}, "status": {"ready": false}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.spec.size, 4);
    assert!(spec.status.unwrap().ready);
    assert_eq!(spec.metadata.generation, Some(2));

    // Schema: wrong type is a 422 naming the field; unknown fields are pruned.
    let bad = api
        .patch(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "big"}})),
        )
        .await
        .unwrap_err();
    let e = api_err(bad);
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(e.message.contains("spec.size"), "{}", e.message);
    let pruned = api
        .patch(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"extra": 1}})),
        )
        .await
        .unwrap();
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<Gadget>(&()),
    );
    let obj = raw.get("g1").await.unwrap();
    assert!(obj.data["spec"].get("extra").is_none(), "{:?}", obj.data);
    let _ = pruned;

    // Discovery knows the new kind with its short name.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "example.com",
            "v1",
            "Gadget",
        ))
        .unwrap();
    assert_eq!(ar.plural, "gadgets");
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));

    // Deleting the CRD removes its objects and stops serving it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("gadgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let e = api_err(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_consistent_and_selectors_filter() {
    let s = start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    for i in 0..25 {
        let tier = if i % 2 == 0 { "front" } else { "back" };
        let mut labels = vec![("tier", tier)];
        if i % 5 == 0 {
            labels.push(("special", "yes"));
        }
        api.create(&PostParams::default(), &cm(&format!("cm-{i:02}"), &labels))
            .await
            .unwrap();
    }
    let first = api.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    let token = first.metadata.continue_.clone().expect("continue token");
    // Changes after the first page do not leak into the rest of this list.
    api.delete("cm-15", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &cm("cm-99", &[]))
        .await
        .unwrap();
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut next = Some(token);
    while let Some(t) = next {
        let page = api
            .list(&ListParams::default().limit(10).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.name_any()));
        next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
    }
    assert_eq!(
        names,
        (0..25).map(|i| format!("cm-{i:02}")).collect::<Vec<_>>()
    );

    let count = |sel: &'static str| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    assert_eq!(count("tier=front").await, 13);
    assert_eq!(
        count("tier!=front").await,
        12,
        "includes cm-99 without the label, minus deleted cm-15"
    );
    assert_eq!(count("tier in (front,back),special").await, 4);
    assert_eq!(
        count("tier notin (front),!special").await,
        11,
        "odd, not 5 or 15, plus cm-99"
    );
    let one = api
        .list(&ListParams::default().fields("metadata.name=cm-03"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    let e = api_err(
        api.list(&ListParams::default().fields("spec.nodeName=x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    assert!(
        e.message
            .contains("field label not supported: spec.nodeName"),
        "{}",
        e.message
    );
    // A list at an exact past revision sees the deleted object again.
    let exact = api
        .list(
            &ListParams::default()
                .at(first.metadata.resource_version.as_deref().unwrap())
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert!(exact.items.iter().any(|c| c.name_any() == "cm-15"));
    assert!(!exact.items.iter().any(|c| c.name_any() == "cm-99"));
    // deletecollection honours the selector.
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tier=back"),
    )
    .await
    .unwrap();
    assert_eq!(count("tier=back").await, 0);
    assert_eq!(count("tier=front").await, 13);
    let e = api_err(
        api.list(&ListParams::default().labels("tier in front"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_version_has_no_gaps_and_sends_bookmarks() {
    let s = start().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    let start_rv = api
        .create(&PostParams::default(), &cm("w", &[]))
        .await
        .unwrap()
        .resource_version()
        .unwrap();
    for i in 0..50 {
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"i": i.to_string()}})),
        )
        .await
        .unwrap();
    }
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &start_rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    let mut bookmark = false;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        match ev {
            WatchEvent::Modified(c) => {
                seen.push(c.data.unwrap()["i"].parse::<i64>().unwrap());
                if seen.len() == 50 {
                    // Now changes arrive live.
                    api.patch(
                        "w",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"data": {"i": "50"}})),
                    )
                    .await
                    .unwrap();
                }
            }
            WatchEvent::Bookmark(_) if seen.len() == 51 => {
                bookmark = true;
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (0..=50).collect::<Vec<_>>());
    assert!(bookmark);
}

/// A streaming list (`sendInitialEvents`, what the cloud core's informers use) sends the
/// initial state read in pages at one revision: every object once, then the bookmark that ends
/// it, then live changes. A metadata watch (`as=PartialObjectMetadata`) carries metadata only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_list_sends_every_object_once_and_metadata_watches_carry_metadata_only() {
    let s = start().await;
    let client = s.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // More than two of the server's pages of 1,000.
    let n = 2_050;
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &cm(&format!("s{i:05}"), &[]))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut stream = api
        .watch(&WatchParams::streaming_lists().timeout(30), "0")
        .await
        .unwrap()
        .boxed();
    let mut initial = Vec::new();
    let end_rv = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .expect("the initial state in time")
            .unwrap()
            .expect("the stream ended before the initial state did");
        match ev {
            WatchEvent::Added(c) => initial.push(c.name_any()),
            WatchEvent::Bookmark(b)
                if b.metadata.annotations.get("k8s.io/initial-events-end")
                    == Some(&"true".to_string()) =>
            {
                break b.metadata.resource_version;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?} in the initial state"),
        }
    };
    let want: Vec<String> = (0..n).map(|i| format!("s{i:05}")).collect();
    assert_eq!(initial, want, "every object once, in order");
    api.create(&PostParams::default(), &cm("live", &[]))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("the live change in time")
            .unwrap()
            .expect("the stream ended")
        {
            WatchEvent::Added(c) => {
                assert_eq!(c.name_any(), "live");
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?} after the initial state"),
        }
    }

    // Metadata only, from the end of the initial state: the change to `s00007`.
    api.patch(
        "s00007",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"seen": "yes"}}, "data": {"secret": "x"}})),
    )
    .await
    .unwrap();
    let req = http::Request::builder()
        .uri(format!(
            "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1&resourceVersion={end_rv}"
        ))
        .header(
            "accept",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        )
        .body(Vec::new())
        .unwrap();
    let text = client.request_text(req).await.unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["type"] != "BOOKMARK")
        .collect();
    assert_eq!(events.len(), 2, "the live create and the patch: {text}");
    let patched = &events[1];
    assert_eq!(patched["type"], "MODIFIED");
    assert_eq!(patched["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(patched["object"]["metadata"]["name"], "s00007");
    assert_eq!(patched["object"]["metadata"]["labels"]["seen"], "yes");
    assert!(
        patched["object"].get("data").is_none(),
        "a metadata watch carries no data: {patched}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_versions_are_gone() {
    let s = start_with(|c| {
        c.history_events = 10;
        c.history_seconds = 0;
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    api.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("d", &[]))
        .await
        .unwrap();
    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    for i in 0..20 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[]))
            .await
            .unwrap();
    }
    s.server.core.store.compact().unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    let token = first.metadata.continue_.unwrap();
    let e = api_err(
        api.list(&ListParams::default().limit(1).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
    // The runtime watcher recovers from 410 by relisting.
    let events = watcher(api.clone(), watcher::Config::default())
        .take(3)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert!(matches!(events[0], watcher::Event::Init));
}

/// Heartbeats past the event count do not expire a list paused for less than the retention
/// time: kubectl's `get pods -A` pages through 100,000 pods in about 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_young_continue_token_outlives_the_event_count() {
    let s = start_with(|c| {
        c.history_events = 10;
        c.history_seconds = 300;
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    for n in ["a", "b", "c"] {
        api.create(&PostParams::default(), &cm(n, &[]))
            .await
            .unwrap();
    }
    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    for i in 0..30 {
        api.create(&PostParams::default(), &cm(&format!("z{i}"), &[]))
            .await
            .unwrap();
    }
    s.server.core.store.compact().unwrap();
    let token = first.metadata.continue_.unwrap();
    let rest = api
        .list(&ListParams::default().limit(5).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<_> = rest.items.iter().map(|c| c.name_any()).collect();
    // The snapshot the first page was taken at: none of the 30 written since.
    assert_eq!(names, ["b", "c"]);
}

async fn collect_until<S>(stream: &mut S, want: usize) -> Vec<(String, String)>
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let mut out = Vec::new();
    while out.len() < want {
        let ev = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("watch event in time");
        match ev.expect("stream open").expect("no watch error") {
            watcher::Event::Apply(c) | watcher::Event::InitApply(c) => out.push((
                c.name_any(),
                c.data
                    .unwrap_or_default()
                    .get("k")
                    .cloned()
                    .unwrap_or_default(),
            )),
            watcher::Event::Delete(c) => out.push((c.name_any(), "<deleted>".into())),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_watcher_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = sedge_apiserver::ApiServer::start(config(dir.path(), "127.0.0.1:0"))
        .await
        .unwrap();
    let addr = server.addr;
    let kubeconfig = server.kubeconfig.clone();
    let api: Api<ConfigMap> = Api::namespaced(client_for(&kubeconfig, None).await, "default");
    api.create(&PostParams::default(), &cm("before", &[]))
        .await
        .unwrap();
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    assert_eq!(
        collect_until(&mut stream, 1).await,
        vec![("before".into(), "v".into())]
    );

    server.shutdown().await;
    let server = sedge_apiserver::ApiServer::start(config(dir.path(), &addr.to_string()))
        .await
        .unwrap();
    let api2: Api<ConfigMap> = Api::namespaced(client_for(&kubeconfig, None).await, "default");
    api2.create(&PostParams::default(), &cm("after", &[]))
        .await
        .unwrap();
    api2.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    let got = collect_until(&mut stream, 2).await;
    assert_eq!(
        got,
        vec![
            ("after".into(), "v".into()),
            ("before".into(), "<deleted>".into())
        ]
    );
    server.shutdown().await;
}

fn owned_by(name: &str, owner: &ConfigMap) -> ConfigMap {
    let mut c = cm(name, &[]);
    c.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: owner.name_any(),
            uid: owner.uid().unwrap(),
            ..Default::default()
        },
    ]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_propagation_and_finalizers() {
    let s = start().await;
    let client = s.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let exists = |name: &'static str| {
        let api = api.clone();
        async move { api.get_opt(name).await.unwrap().is_some() }
    };

    // Background: the owner goes at once, the garbage collector takes the dependent.
    let owner = api
        .create(&PostParams::default(), &cm("bg-owner", &[]))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned_by("bg-dep", &owner))
        .await
        .unwrap();
    api.delete("bg-owner", &DeleteParams::background())
        .await
        .unwrap();
    wait_for(10, "background dependent collected", || async {
        !exists("bg-dep").await
    })
    .await;

    // Foreground: the dependent goes first, then the owner.
    let owner = api
        .create(&PostParams::default(), &cm("fg-owner", &[]))
        .await
        .unwrap();
    let mut dep = owned_by("fg-dep", &owner);
    dep.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &dep).await.unwrap();
    api.delete("fg-owner", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for(10, "dependent marked for deletion", || async {
        api.get("fg-dep")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    })
    .await;
    let held = api.get("fg-owner").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        held.finalizers()
            .contains(&"foregroundDeletion".to_string())
    );
    api.patch(
        "fg-dep",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_for(
        10,
        "foreground owner removed after its dependent",
        || async { !exists("fg-owner").await },
    )
    .await;
    assert!(!exists("fg-dep").await);

    // Orphan: the dependent stays, without the owner reference.
    let owner = api
        .create(&PostParams::default(), &cm("or-owner", &[]))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned_by("or-dep", &owner))
        .await
        .unwrap();
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    api.delete("or-owner", &dp).await.unwrap();
    wait_for(10, "orphaning owner removed", || async {
        !exists("or-owner").await
    })
    .await;
    assert!(
        api.get("or-dep")
            .await
            .unwrap()
            .metadata
            .owner_references
            .is_none_or(|r| r.is_empty())
    );

    // Preconditions.
    let e = api_err(
        api.delete(
            "or-dep",
            &DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some("wrong".into()),
                    resource_version: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);

    // A namespace is emptied, then removed.
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("doomed".into());
    nss.create(&PostParams::default(), &ns).await.unwrap();
    let in_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    in_ns
        .create(&PostParams::default(), &cm("x", &[]))
        .await
        .unwrap();
    nss.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let e = api_err(
        in_ns
            .create(&PostParams::default(), &cm("y", &[]))
            .await
            .unwrap_err(),
    );
    assert!(
        e.code == 403 || e.code == 404,
        "no new content in a terminating namespace: {}",
        e.message
    );
    wait_for(10, "namespace removed", || async {
        nss.get_opt("doomed").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_and_anonymous_is_refused() {
    let s = start().await;
    let by_cert: Api<ConfigMap> = Api::namespaced(
        client_for(&s.kubeconfig(), Some("sedge-cert")).await,
        "default",
    );
    by_cert
        .create(&PostParams::default(), &cm("by-cert", &[]))
        .await
        .unwrap();

    // A kubeconfig with the right CA but no credentials.
    let kc = kube::config::Kubeconfig::read_from(s.kubeconfig()).unwrap();
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    cfg.auth_info = Default::default();
    let anon: Api<ConfigMap> =
        Api::namespaced(kube::Client::try_from(cfg.clone()).unwrap(), "default");
    let e = api_err(anon.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    cfg.auth_info.token = Some("not-a-token".to_string().into());
    let wrong: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(cfg).unwrap(), "default");
    assert_eq!(
        api_err(wrong.list(&ListParams::default()).await.unwrap_err()).code,
        401
    );
    // /version stays public, as on kube-apiserver.
    let v = kube::Client::try_from({
        let kc = kube::config::Kubeconfig::read_from(s.kubeconfig()).unwrap();
        let mut c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        c.auth_info = Default::default();
        c
    })
    .unwrap()
    .apiserver_version()
    .await
    .unwrap();
    assert_eq!(v.minor, "33");
}

async fn raw(
    client: &kube::Client,
    method: &str,
    uri: &str,
    ct: &str,
    body: Vec<u8>,
) -> Result<String, Box<ErrorResponse>> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", ct)
        .body(body)
        .unwrap();
    client.request_text(req).await.map_err(|e| match e {
        kube::Error::Api(s) => s,
        other => panic!("{method} {uri} ({ct}): expected an API error, got {other:?}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let s = start_with(|c| c.max_request_bytes = 64 * 1024).await;
    let client = s.client().await;
    let uri = "/api/v1/namespaces/default/configmaps";
    let rev_before = s.server.core.store.current_rev();
    let count_before = s.server.core.store.count().unwrap();

    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        b"{\"apiVersion\": \"v1\", \"kind\": ".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("not valid JSON") && e.message.contains("line 1"),
        "{}",
        e.message
    );

    let e = raw(
        &client,
        "POST",
        uri,
        "application/yaml",
        b"apiVersion: v1\nkind: [unclosed\n".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(e.message.contains("not valid YAML"), "{}", e.message);

    let body = json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        body.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(e.message.contains("apps/v1"), "{}", e.message);

    let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        body.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("Pod") && e.message.contains("ConfigMap"),
        "{}",
        e.message
    );

    let body =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_A_DNS_Name"}});
    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        body.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains("metadata.name") && e.message.contains("Not_A_DNS_Name"),
        "{}",
        e.message
    );

    let nameless = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}});
    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        nameless.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains("name or generateName is required"),
        "{}",
        e.message
    );
    // A dry run with generateName answers with a generated name and stores nothing.
    let dry =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "dry-"}});
    let out = raw(
        &client,
        "POST",
        &format!("{uri}?dryRun=All"),
        "application/json",
        dry.to_string().into_bytes(),
    )
    .await
    .unwrap();
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        out["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("dry-"),
        "{out}"
    );

    let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": "three"}});
    let e = raw(
        &client,
        "POST",
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
        dep.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("spec.replicas: invalid type: string"),
        "{}",
        e.message
    );

    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"k": "x".repeat(100 * 1024)}});
    let e = raw(
        &client,
        "POST",
        uri,
        "application/json",
        big.to_string().into_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!((e.code, e.reason.as_str()), (413, "RequestEntityTooLarge"));

    let e = raw(
        &client,
        "GET",
        &format!("{uri}?watch=true&resourceVersion=banana"),
        "application/json",
        vec![],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 422);
    assert!(e.message.contains("banana"), "{}", e.message);

    let e = raw(
        &client,
        "PATCH",
        &format!("{uri}/missing"),
        "application/merge-patch+json",
        b"{}".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 404);

    let e = raw(
        &client,
        "POST",
        uri,
        "application/vnd.kubernetes.protobuf",
        b"\x00".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 400);
    assert!(e.message.contains("protobuf"), "{}", e.message);

    assert_eq!(
        s.server.core.store.current_rev(),
        rev_before,
        "no write happened"
    );
    assert_eq!(s.server.core.store.count().unwrap(), count_before);
}
