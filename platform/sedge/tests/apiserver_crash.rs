//! `sedge apiserver` killed with SIGKILL in the middle of a write burst: after a restart every
//! acknowledged write is there, the store is consistent, and it keeps serving.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};

fn start(dir: &Path) -> Child {
    let _ = std::fs::remove_file(dir.join("kubeconfig"));
    Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args([
            "apiserver",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "full",
            "--data-dir",
        ])
        .arg(dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sedge starts")
}

async fn client(dir: &Path) -> kube::Client {
    let path = dir.join("kubeconfig");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(kc) = kube::config::Kubeconfig::read_from(&path)
            && let Ok(cfg) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
            && let Ok(c) = kube::Client::try_from(cfg)
            && c.apiserver_version().await.is_ok()
        {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sedge apiserver did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cm(name: &str, i: usize) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.data = Some([("i".to_string(), i.to_string())].into());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let api: Api<ConfigMap> = Api::namespaced(client(dir.path()).await, "default");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let api = api.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i:05}");
                match api.create(&PostParams::default(), &cm(&name, i)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(name);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once a good number of writes are acknowledged, while writers are still going.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 2000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writers made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill().expect("SIGKILL");
    server.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();

    let mut server = start(dir.path());
    let api: Api<ConfigMap> = Api::namespaced(client(dir.path()).await, "default");
    let stored: BTreeSet<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // Each object is intact and its data matches its name.
    for c in api.list(&ListParams::default()).await.unwrap().items {
        let name = c.metadata.name.unwrap();
        let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(c.data.unwrap()["i"], i.to_string(), "{name}");
    }
    // And it keeps serving writes with revisions above everything before.
    let before = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let after = api
        .create(&PostParams::default(), &cm("after-crash", 0))
        .await
        .unwrap();
    assert!(
        after
            .metadata
            .resource_version
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > before.parse::<i64>().unwrap()
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
