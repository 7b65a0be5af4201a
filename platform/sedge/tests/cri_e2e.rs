//! Edge pods as real containers: `sedge up` with its edge node on the CRI runtime, against a
//! private containerd, driven with the real kubectl. Deploy with env, a config map volume and a
//! working directory; logs (and `--previous`); a crash loop with back-off; a bad image
//! (`ErrImagePull`, then `ImagePullBackOff`); a memory limit exceeded (`OOMKilled`); a hostPath
//! outside the allowlist refused; securityContext applied (user, group, read-only root) and
//! `privileged` refused; a delete that removes the sandbox. Then `sedge up` is killed
//! with SIGKILL and started again: running containers are adopted (same container, not started
//! twice), and one killed while the agent was down is restarted by its policy with its real exit
//! code.

mod common;

use std::time::Duration;

use common::{Up, up_configured, wait_for};
use sedge_testkit::containerd::Containerd;
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: greeting}
data: {message: "hello from a config map"}
---
apiVersion: v1
kind: Pod
metadata: {name: hello}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c"]
    args: ["echo who=$(WHO); cat /etc/greeting/message; echo; pwd; echo pid=$$$$; exec sleep 3600"]
    workingDir: /tmp
    env: [{name: WHO, value: edge}]
    volumeMounts: [{name: cfg, mountPath: /etc/greeting, readOnly: true}]
  volumes: [{name: cfg, configMap: {name: greeting}}]
---
apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c", "echo boom $(date +%s%N); exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: badimage}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: localhost/no-such-image:1
---
apiVersion: v1
kind: Pod
metadata: {name: hungry}
spec:
  nodeName: edge-1
  restartPolicy: Never
  containers:
  - name: main
    image: busybox:1.36
    # 64 MiB in a shell variable, under a 16 MiB limit.
    command: ["sh", "-c", "x=$(head -c 67108864 /dev/zero | tr '\\0' x); echo survived ${#x}"]
    resources: {limits: {memory: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: hostpath}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c", "cat /host/shadow"]
    volumeMounts: [{name: etc, mountPath: /host}]
  volumes: [{name: etc, hostPath: {path: /etc}}]
---
apiVersion: v1
kind: Pod
metadata: {name: secure}
spec:
  nodeName: edge-1
  securityContext: {runAsUser: 1000, runAsGroup: 2000}
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c", "echo uid=$(id -u) gid=$(id -g); touch /x 2>/dev/null || echo read-only; exec sleep 3600"]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Pod
metadata: {name: privileged}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: ["sleep", "3600"]
    securityContext: {privileged: true}
"#;

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: main
        image: busybox:1.36
        command: ["sh", "-c", "echo $(VERSION) $(POD_NAME); touch /tmp/ready-in-container; exec sleep 3600"]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: VERSION, value: v1}
        readinessProbe: {exec: {command: [test, -f, /tmp/ready-in-container]}, periodSeconds: 1}
"#;

fn images(ctd: &Containerd) {
    ctd.import_test_images().unwrap();
}

fn container(p: &Value) -> &Value {
    &p["status"]["containerStatuses"][0]
}

fn pod(up: &Up, name: &str) -> Value {
    up.pod(name).unwrap_or(Value::Null)
}

fn running_tasks(ctd: &Containerd) -> usize {
    ctd.tasks().iter().filter(|(_, s)| s == "RUNNING").count()
}

#[test]
fn pods_run_as_containers_on_a_cri_node_and_survive_an_agent_kill() {
    let Some(ctd) = Containerd::for_test("cri_e2e") else {
        return;
    };
    images(&ctd);
    let cfg = format!("runtime: cri\ncri_socket: {}\n", ctd.socket.display());
    let mut up = up_configured(&cfg, &["--cloud-nodes", "0"]);
    let long = Duration::from_secs(90);

    // The node says which runtime it runs.
    let node: Value =
        serde_json::from_str(&up.ok(&["get", "node", "edge-1", "-o", "json"])).unwrap();
    let rtv = node["status"]["nodeInfo"]["containerRuntimeVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(rtv.starts_with("containerd://1."), "{rtv}");

    up.apply(PODS);

    // Deploy: env expanded, the config map mounted, the working directory set, logs read.
    let hello = wait_for("hello to run", long, || {
        let p = pod(&up, "hello");
        common::running_ready(&p).then_some(p)
    });
    let id = container(&hello)["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("containerd://"), "{id}");
    let logs = wait_for("hello's log", long, || {
        let (ok, out, _) = up.kubectl(&["logs", "hello"]);
        (ok && out.contains("pid=")).then_some(out)
    });
    assert!(logs.contains("who=edge\n"), "{logs}");
    assert!(logs.contains("hello from a config map\n"), "{logs}");
    assert!(logs.contains("/tmp\n"), "{logs}");
    // Its own PID namespace: the shell is process 1 of the container, not a host pid.
    assert!(logs.contains("pid=1\n"), "{logs}");
    assert_eq!(up.ok(&["logs", "hello", "--tail", "1"]), "pid=1\n");

    // kubectl exec runs in the container (CRI ExecSync): its file system, its exit code.
    let o = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(up.kubeconfig())
        .args([
            "exec",
            "hello",
            "--",
            "sh",
            "-c",
            "cat /etc/hostname >/dev/null; echo in-ctr; exit 4",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in-ctr\n");
    // Standard input is not there yet on CRI: refused with the reason.
    let (ok, _, err) = up.kubectl(&["exec", "-i", "hello", "--", "cat"]);
    assert!(!ok && err.contains("not supported yet"), "{err}");

    // A crash loop: exit code 3, restarts with back-off, the previous instance's log.
    let crash = wait_for("crash to restart twice", long, || {
        let p = pod(&up, "crash");
        (container(&p)["restartCount"].as_i64().unwrap_or(0) >= 2).then_some(p)
    });
    let last = &container(&crash)["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 3, "{crash}");
    assert_eq!(last["reason"], "Error", "{crash}");
    wait_for("CrashLoopBackOff", long, || {
        let p = pod(&up, "crash");
        (container(&p)["state"]["waiting"]["reason"] == "CrashLoopBackOff").then_some(())
    });
    let prev = up.ok(&["logs", "crash", "--previous"]);
    assert!(prev.starts_with("boom "), "{prev}");

    // A bad image: the CRI's pull error, then the back-off.
    let bad = wait_for("ImagePullBackOff", long, || {
        let p = pod(&up, "badimage");
        (container(&p)["state"]["waiting"]["reason"] == "ImagePullBackOff").then_some(p)
    });
    let msg = container(&bad)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("localhost/no-such-image:1"), "{msg}");
    // Events are written behind the status reports (best effort, like the kubelet's).
    wait_for("the ErrImagePull event", Duration::from_secs(30), || {
        let events = up.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=badimage",
        ]);
        events.contains("ErrImagePull").then_some(())
    });

    // The memory limit is enforced by the kernel, and said so.
    let hungry = wait_for("hungry to be OOMKilled", long, || {
        let p = pod(&up, "hungry");
        let t = &container(&p)["state"]["terminated"];
        t.is_object().then(|| p.clone())
    });
    let t = &container(&hungry)["state"]["terminated"];
    assert_eq!(t["reason"], "OOMKilled", "{hungry}");
    assert_eq!(hungry["status"]["phase"], "Failed");

    // A hostPath outside the node's allowlist never reaches the runtime.
    let hp = wait_for("hostpath refused", long, || {
        let p = pod(&up, "hostpath");
        let w = &container(&p)["state"]["waiting"];
        (w["reason"] == "CreateContainerConfigError").then(|| w["message"].clone())
    });
    assert!(hp.to_string().contains("/etc"), "{hp}");

    // securityContext is applied: the user and group, a read-only root; privileged is refused.
    let secure = wait_for("secure's log", long, || {
        let (ok, out, _) = up.kubectl(&["logs", "secure"]);
        (ok && out.contains("uid=")).then_some(out)
    });
    assert_eq!(secure, "uid=1000 gid=2000\nread-only\n");
    let pr = wait_for("privileged refused", long, || {
        let p = pod(&up, "privileged");
        let w = &container(&p)["state"]["waiting"];
        (w["reason"] == "CreateContainerConfigError").then(|| w["message"].clone())
    });
    assert!(pr.to_string().contains("cri_allow_privileged"), "{pr}");

    // A Deployment: ready by an exec probe that runs inside the container (the file exists only
    // there), healed when a pod is deleted, rolled on a template change.
    up.apply(WEB);
    let web = |want: &str| {
        let want = want.to_string();
        wait_for(&format!("2 web pods of {want} ready"), long, || {
            let pods = up.pods("app=web");
            let ok = pods.len() == 2
                && pods.iter().all(|p| {
                    common::running_ready(p)
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && p["spec"]["containers"][0]["env"][1]["value"] == want.as_str()
                });
            ok.then_some(pods)
        })
    };
    let pods = web("v1");
    let victim = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    up.ok(&["delete", "pod", &victim, "--wait=false"]);
    let healed = web("v1");
    assert!(
        healed
            .iter()
            .all(|p| p["metadata"]["name"] != victim.as_str())
    );
    up.ok(&["set", "env", "deployment/web", "VERSION=v2"]);
    let rolled = web("v2");
    let name = rolled[0]["metadata"]["name"].as_str().unwrap();
    wait_for("the rolled pod's log", long, || {
        up.ok(&["logs", name]).contains("v2 ").then_some(())
    });
    up.ok(&["delete", "deployment", "web", "--wait=true"]);

    // Delete: the container and its sandbox go.
    let before = running_tasks(&ctd);
    up.ok(&["delete", "pod", "crash", "--wait=true", "--timeout=60s"]);
    wait_for("crash's sandbox to go", long, || {
        (running_tasks(&ctd) < before).then_some(())
    });

    // The agent is killed with SIGKILL; the container keeps running.
    let tasks_before = running_tasks(&ctd);
    let hello_log_lines = up.ok(&["logs", "hello"]).lines().count();
    up.kill9();
    assert_eq!(
        running_tasks(&ctd),
        tasks_before,
        "containers outlive the agent"
    );
    up.start_again();
    wait_for("hello adopted", long, || {
        let p = pod(&up, "hello");
        (common::running_ready(&p) && container(&p)["containerID"].as_str() == Some(id.as_str()))
            .then_some(())
    });
    // Adopted, not started twice: same container, no restart, no second task, the log not rerun.
    let p = pod(&up, "hello");
    assert_eq!(container(&p)["restartCount"], 0, "{p}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running_tasks(&ctd), tasks_before);
    assert_eq!(up.ok(&["logs", "hello"]).lines().count(), hello_log_lines);

    // Killed while the agent is down: restarted after it comes back, the exit recorded.
    let cid = id.trim_start_matches("containerd://").to_string();
    up.kill9();
    ctd.kill_task(&cid).unwrap();
    up.start_again();
    let p = wait_for("hello restarted", long, || {
        let p = pod(&up, "hello");
        (common::running_ready(&p) && container(&p)["restartCount"] == 1).then_some(p)
    });
    assert_eq!(
        container(&p)["lastState"]["terminated"]["exitCode"],
        137,
        "{p}"
    );
    assert_ne!(container(&p)["containerID"].as_str(), Some(id.as_str()));

    // Delete after the restart: the adopted container and its sandbox go.
    let running = running_tasks(&ctd);
    up.ok(&["delete", "pod", "hello", "--wait=true", "--timeout=60s"]);
    wait_for("hello's sandbox removed", long, || {
        (running_tasks(&ctd) < running).then_some(())
    });
}

/// The joint-inference example, unchanged, with both workers as containers of the `sedge/worker`
/// image on CRI nodes (the edge node and the cloud node): the edge worker reads the dataset through
/// its hostPath volume and the model through the mount the AI controller adds, and offloads hard
/// examples to the cloud container through the channel.
#[test]
fn the_joint_inference_example_runs_unchanged_on_cri_nodes() {
    const FASHION: &str = "/usr/share/datasets/fashion-mnist";
    if !std::path::Path::new(FASHION).is_dir() {
        let required = std::env::var("SEDGE_REQUIRE_CRI").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{FASHION} missing: `make data` installs dataset-fashion-mnist"
        );
        eprintln!("\n*** SKIPPED: {FASHION} missing (make data) ***\n");
        return;
    }
    let Some(ctd) = Containerd::for_test("cri_e2e joint inference") else {
        return;
    };
    let dir = ctd.dir().join("images");
    let sedge = std::path::Path::new(env!("CARGO_BIN_EXE_sedge"));
    let ort = std::env::var_os("ORT_DYLIB_PATH").map(std::path::PathBuf::from);
    sedge::images::worker_image(sedge, ort.as_deref())
        .and_then(|i| i.write(&dir.join("worker.tar")))
        .unwrap();
    ctd.import(&dir.join("worker.tar")).unwrap();
    images(&ctd);

    // What the demo script does: the Model manifests name /tmp/sedge-demo/models.
    let models = std::path::Path::new("/tmp/sedge-demo/models");
    std::fs::create_dir_all(models).unwrap();
    for f in [
        "edge-cnn.onnx",
        "edge-cnn.json",
        "cloud-cnn.onnx",
        "cloud-cnn.json",
    ] {
        let tmp = models.join(format!(".{f}.{}", common::rand_suffix()));
        std::fs::copy(common::repo().join("models/fashion-mnist").join(f), &tmp).unwrap();
        std::fs::rename(&tmp, models.join(f)).unwrap();
    }
    let lc_port = common::free_port().to_string();
    let route = common::free_port();
    let ai = ctd.dir().join("ai.yaml");
    std::fs::write(
        &ai,
        format!(
            "report_period_seconds: 1\nroute_ports: [{route}, {}]\n",
            route.saturating_add(20)
        ),
    )
    .unwrap();
    let cfg = format!("runtime: cri\ncri_socket: {}\n", ctd.socket.display());
    let up = up_configured(
        &cfg,
        &[
            "--lc-port",
            &lc_port,
            "--ai-config",
            ai.to_str().unwrap(),
            "--host-path-allow",
            "/tmp",
            "--host-path-allow",
            FASHION,
        ],
    );
    up.ok(&[
        "wait",
        "--for=condition=Ready",
        "node/cloud-1",
        "node/edge-1",
        "--timeout=60s",
    ]);
    let example = common::repo().join("ai-controller/examples/joint-inference");
    up.ok(&["apply", "-f", example.to_str().unwrap()]);
    let long = Duration::from_secs(120);
    wait_for("the service to be Running", long, || {
        up.ok(&[
            "get",
            "ji",
            "fashion-mnist",
            "-o",
            "jsonpath={.status.conditions[?(@.status==\"True\")].type}",
        ])
        .contains("Running")
        .then_some(())
    });
    let cloud_answered = wait_for("cloud answers counted", long, || {
        let n: f64 = up
            .ok(&[
                "get",
                "ji",
                "fashion-mnist",
                "-o",
                "jsonpath={.status.metrics[?(@.key==\"cloudAnsweredNumber\")].value}",
            ])
            .trim()
            .parse()
            .ok()?;
        (n > 0.0).then_some(n)
    });
    assert!(cloud_answered > 0.0);
    // Both workers are containers of containerd, not host processes.
    let pods = wait_for("two workers with containerd ids", long, || {
        let pods: Value = serde_json::from_str(&up.ok(&["get", "pods", "-o", "json"])).unwrap();
        let items = pods["items"].as_array()?.clone();
        (items.len() == 2
            && items.iter().all(|p| {
                container(p)["containerID"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("containerd://"))
            }))
        .then_some(items)
    });
    for p in &pods {
        assert_eq!(container(p)["restartCount"], 0, "{p}");
    }
    // The edge worker's log comes from the CRI log file, in the worker's own words.
    let log = up.ok(&[
        "logs",
        "-l",
        "jointinferenceservice.sedna.io/worker-type=edge",
        "--tail=5",
    ]);
    assert!(
        !log.contains(" stdout F ") && !log.contains(" stderr F "),
        "{log}"
    );
    up.ok(&["delete", "-f", example.to_str().unwrap(), "--wait=true"]);
    wait_for("the workers' containers to go", long, || {
        (running_tasks(&ctd) == 0).then_some(())
    });
}

/// A CRI node with a pod network (`cri_pod_network`, a CNI bridge in containerd's config): a pod
/// gets its own IP (also in its downward-API env) and hostname, its httpGet readiness probe reaches it there, the host reaches
/// its server at that IP, and a `hostNetwork: true` pod keeps the node's IP.
#[test]
fn pods_get_their_own_network_through_cni() {
    let Some(ctd) = Containerd::for_test_with("cri_e2e pod network", true) else {
        return;
    };
    images(&ctd);
    let (_, subnet) = ctd.pod_network.clone().unwrap();
    let prefix = subnet.rsplit_once('.').unwrap().0.to_string();
    // The runtime and its socket as `sedge up` flags; the pod network from the edge config.
    let sock = ctd.socket.display().to_string();
    let up = up_configured(
        "cri_pod_network: true\n",
        &[
            "--cloud-nodes",
            "0",
            "--runtime",
            "cri",
            "--cri-socket",
            &sock,
        ],
    );
    up.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c", "mkdir -p /www && echo hi from $(hostname) at $POD_IP > /www/index.html && exec httpd -f -p 8080 -h /www"]
    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
    ports: [{containerPort: 8080}]
    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet}
spec:
  nodeName: edge-1
  hostNetwork: true
  containers:
  - name: main
    image: busybox:1.36
    command: ["sleep", "3600"]
"#,
    );
    let long = Duration::from_secs(90);
    let web = wait_for("web ready (its probe reaches the pod IP)", long, || {
        let p = pod(&up, "web");
        common::running_ready(&p).then_some(p)
    });
    let ip = web["status"]["podIP"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with(&format!("{prefix}.")),
        "{ip} not in {subnet}"
    );
    assert_eq!(web["status"]["hostIP"], "127.0.0.1");
    // The host reaches the pod's server at its IP; the pod's hostname is its name.
    let mut s = std::net::TcpStream::connect((ip.as_str(), 8080)).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    // Its downward-API `status.podIP` is that IP, not the node's.
    assert!(
        reply.ends_with(&format!("hi from web at {ip}\n")),
        "{reply}"
    );
    let hostnet = wait_for("hostnet running", long, || {
        let p = pod(&up, "hostnet");
        common::running_ready(&p).then_some(p)
    });
    assert_eq!(hostnet["status"]["podIP"], "127.0.0.1");
    up.ok(&["delete", "pod", "web", "hostnet", "--wait=true"]);
    wait_for("sandboxes gone", long, || {
        (running_tasks(&ctd) == 0).then_some(())
    });
}
