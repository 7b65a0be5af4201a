//! Services at the edge against `sedge up`: a pod on the edge node reaches a Service whose
//! endpoint runs on the cloud node, by the Service's environment variables, through the edge's
//! service proxy and the channel.

mod common;

use std::time::Duration;

use common::{free_port, up, wait_for};

#[test]
fn an_edge_pod_calls_a_cloud_service_by_name() {
    let up = up();
    let site = up.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello from the cloud\n").unwrap();
    let port = free_port();
    up.apply(&format!(
        "
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 8080, targetPort: web}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  nodeName: cloud-1
  containers:
  - name: main
    image: busybox:1.36
    command: [python3, -m, http.server, --bind, 127.0.0.1, --directory, '{dir}', '{port}']
    ports: [{{name: web, containerPort: {port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: anchor}}
spec:
  nodeName: edge-1
  containers:
  - name: main
    image: busybox:1.36
    command: [sleep, '3600']
",
        dir = site.display()
    ));
    wait_for("web and anchor running", Duration::from_secs(60), || {
        ["web", "anchor"]
            .iter()
            .all(|n| up.pod(n).is_some_and(|p| common::running_ready(&p)))
            .then_some(())
    });
    // The client starts once the Service is on the node (as on Kubernetes, a pod sees the
    // Services that existed when its container started: a start without them fails and is
    // retried with the variables).
    up.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeName: edge-1
  restartPolicy: OnFailure
  containers:
  - name: main
    image: busybox:1.36
    command:
    - sh
    - -c
    - |
      test -n "$WEB_SERVICE_HOST" || exit 1
      echo "web is $WEB_SERVICE_HOST:$WEB_SERVICE_PORT_HTTP"
      for i in $(seq 50); do
        python3 -c 'import os, urllib.request; print(urllib.request.urlopen("http://%s:%s/hello.txt" % (os.environ["WEB_SERVICE_HOST"], os.environ["WEB_SERVICE_PORT"]), timeout=10).read().decode(), end="")' && exit 0
        sleep 0.2
      done
      exit 2
"#,
    );
    let logs = wait_for("the client's answer", Duration::from_secs(90), || {
        let (ok, out, _) = up.kubectl(&["logs", "client"]);
        (ok && out.contains("hello from the cloud")).then_some(out)
    });
    assert!(logs.contains("web is 127."), "{logs}");
    wait_for("the client to succeed", Duration::from_secs(30), || {
        up.pod("client")
            .filter(|p| p["status"]["phase"] == "Succeeded")
            .map(|_| ())
    });
}
