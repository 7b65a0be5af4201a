//! The CRI runtime on its own, against a private containerd: limits reach the container's cgroups,
//! an absent image with `imagePullPolicy: Never` is `ErrImageNeverPull`, an exited container is
//! adopted with its real exit code, and `remove_others` (what an agent does once after a restart)
//! removes the sandboxes of pods the node no longer has while keeping the others.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use sedge_edgecore::cri::{CriRuntime, CriSettings};
use sedge_edgecore::runtime::{ContainerSpec, Exit, Limits, PodInfo, Runtime};
use sedge_edgecore::store::ContainerRecord;
use sedge_testkit::containerd::Containerd;

fn pod(dir: &std::path::Path, uid: &str) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        log_dir: dir.join(uid),
        host_network: true,
        host_ports: vec![],
    }
}

fn spec(dir: &std::path::Path, uid: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        pod_uid: uid.into(),
        pod: format!("default/pod-{uid}"),
        name: "c".into(),
        image: "busybox:1.36".into(),
        pull_policy: String::new(),
        command: command.iter().map(|s| s.to_string()).collect(),
        args: vec![],
        env: vec![],
        root: dir.join(uid).join("root"),
        working_dir: PathBuf::from("/"),
        log_path: dir.join(uid).join("c.log"),
        mounts: vec![],
        container_working_dir: None,
        limits: Limits::default(),
        attempt: 0,
        security: Default::default(),
    }
}

/// The value of a cgroup v1 file of container `id` (`<hierarchy>/.../<id>/<file>`), if found.
fn cgroup_value(id: &str, file: &str) -> Option<String> {
    fn find(dir: &std::path::Path, id: &str, file: &str, depth: usize) -> Option<PathBuf> {
        if depth > 4 {
            return None;
        }
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == id) && p.join(file).exists() {
                return Some(p.join(file));
            }
            if let Some(f) = find(&p, id, file, depth + 1) {
                return Some(f);
            }
        }
        None
    }
    let path = find(std::path::Path::new("/sys/fs/cgroup"), id, file, 0)?;
    Some(std::fs::read_to_string(path).ok()?.trim().to_string())
}

async fn exit_of(c: &mut Box<dyn sedge_edgecore::runtime::Container>) -> Exit {
    for _ in 0..200 {
        if let Some(e) = c.poll_exit() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the container never exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_pull_policy_adoption_and_removal() {
    let Some(ctd) = Containerd::for_test("cri_runtime") else {
        return;
    };
    ctd.import_test_images().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = CriRuntime::connect(CriSettings {
        socket: ctd.socket.clone(),
        node: "n1".into(),
        poll_interval: Duration::from_millis(100),
        pod_network: false,
        allow_privileged: false,
    })
    .await
    .unwrap();
    assert!(
        rt.version().starts_with("containerd://"),
        "{}",
        rt.version()
    );

    // Limits become the container's cgroup settings.
    let mut s = spec(dir.path(), "a", &["sleep", "3600"]);
    s.limits = Limits {
        memory_bytes: 32 << 20,
        cpu_millis: 500,
        cpu_request_millis: 250,
    };
    let a = rt.start(&pod(dir.path(), "a"), &s).await.unwrap();
    let id = a.id();
    assert_eq!(
        cgroup_value(&id, "memory.limit_in_bytes").as_deref(),
        Some("33554432")
    );
    assert_eq!(
        cgroup_value(&id, "cpu.cfs_quota_us").as_deref(),
        Some("50000")
    );
    assert_eq!(
        cgroup_value(&id, "cpu.cfs_period_us").as_deref(),
        Some("100000")
    );
    assert_eq!(cgroup_value(&id, "cpu.shares").as_deref(), Some("256"));

    // Never pull an absent image: the kubelet's reason.
    let mut s = spec(dir.path(), "b", &["true"]);
    s.image = "localhost/absent:1".into();
    s.pull_policy = "Never".into();
    let e = rt.start(&pod(dir.path(), "b"), &s).await.err().unwrap();
    assert_eq!(e.reason, "ErrImageNeverPull", "{e}");

    // A container that ended while nobody watched is adopted with its exit code.
    let mut c = rt
        .start(
            &pod(dir.path(), "c"),
            &spec(dir.path(), "c", &["sh", "-c", "exit 7"]),
        )
        .await
        .unwrap();
    let cid = c.id();
    assert_eq!(exit_of(&mut c).await, Exit::Code(7));
    std::mem::forget(c); // not removed, as if the agent had died
    let rec = ContainerRecord {
        pod_uid: "c".into(),
        name: "c".into(),
        pid: 0,
        start_ticks: 0,
        started_at: String::new(),
        restarts: 0,
        last_terminated: None,
        spec_hash: String::new(),
        container_id: cid.clone(),
    };
    let mut adopted = rt.adopt(&rec).await.expect("the exited container is found");
    assert_eq!(exit_of(&mut adopted).await, Exit::Code(7));
    // Another node's agent on the same containerd sees nothing of this node.
    let other = CriRuntime::connect(CriSettings {
        socket: ctd.socket.clone(),
        node: "n2".into(),
        poll_interval: Duration::from_millis(100),
        pod_network: false,
        allow_privileged: false,
    })
    .await
    .unwrap();
    assert!(other.adopt(&rec).await.is_none());
    other.remove_others(&HashSet::new()).await;
    assert_eq!(
        ctd.tasks().iter().filter(|(_, s)| s == "RUNNING").count(),
        3,
        "n2's sweep touched n1's sandboxes: {:?}",
        ctd.tasks()
    );

    // After a restart: pods "a" and "c" are gone from the node, "b" stays.
    let keep: HashSet<String> = ["b".to_string()].into();
    rt.remove_others(&keep).await;
    let running: Vec<_> = ctd
        .tasks()
        .into_iter()
        .filter(|(_, s)| s == "RUNNING")
        .collect();
    assert!(running.is_empty(), "{running:?}");
    drop(a);
}
