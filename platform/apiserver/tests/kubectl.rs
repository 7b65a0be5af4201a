//! The API server driven by the real `kubectl` with the kubeconfig the server writes.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const CRD_AND_WIDGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [all]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: Desired state of the widget.
            required: [size]
            properties:
              size: {type: integer, minimum: 1, description: "How big the widget is, in units."}
              color: {type: string, enum: [red, blue]}
          status:
            type: object
            properties:
              phase: {type: string}
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: small}
spec: {size: 1, color: red}
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: large}
spec: {size: 9}
"#;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {mode: "fast"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: main
        image: sedge/worker:v1
        env: [{name: A, value: "1"}]
---
apiVersion: v1
kind: Pod
metadata: {name: cashier, namespace: shop, labels: {app: cashier}}
spec:
  containers: [{name: c, image: busybox:1.36, command: [sleep, "1000"]}]
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_with_kubectl() {
    let s = start().await;
    let kc = s.kubeconfig();
    let file = write(s.dir.path(), "widgets.yaml", CRD_AND_WIDGETS);
    // kubectl resolves every document before creating any, so objects of a CRD created in the same
    // run are refused on the first pass, exactly as against kube-apiserver; the second pass applies.
    let first = kubectl(&kc, &["apply", "-f", &file]).await;
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        String::from_utf8_lossy(&first.stdout)
            .contains("customresourcedefinition.apiextensions.k8s.io/widgets.example.com created")
    );
    assert!(err.contains("ensure CRDs are installed first"), "{err}");
    let second = kubectl_ok(&kc, &["apply", "-f", &file]).await;
    assert!(
        second.contains("widget.example.com/small created")
            && second.contains("widget.example.com/large created"),
        "{second}"
    );

    let table = kubectl_ok(&kc, &["get", "wd"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["NAME", "SIZE", "PHASE", "AGE"]),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("large") && l.contains(" 9 ")),
        "{table}"
    );
    assert!(
        kubectl_ok(&kc, &["get", "all"])
            .await
            .contains("widget.example.com/small")
    );

    let yaml = kubectl_ok(&kc, &["get", "widget", "small", "-o", "yaml"]).await;
    assert!(
        yaml.contains("kind: Widget")
            && yaml.contains("color: red")
            && yaml.contains("resourceVersion:"),
        "{yaml}"
    );
    let explain = kubectl_ok(&kc, &["explain", "widgets.spec.size"]).await;
    assert!(
        explain.contains("How big the widget is, in units."),
        "{explain}"
    );
    let resources = kubectl_ok(&kc, &["api-resources", "--api-group=example.com"]).await;
    assert!(
        resources.contains("widgets") && resources.contains("wd") && resources.contains("Widget"),
        "{resources}"
    );

    // Status through the subresource, spec untouched.
    kubectl_ok(
        &kc,
        &[
            "patch",
            "widget",
            "small",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Ready"}}"#,
        ],
    )
    .await;
    let row = kubectl_ok(&kc, &["get", "wd", "small", "--no-headers"]).await;
    assert!(row.contains("Ready"), "{row}");

    // Schema violations and unknown fields name the field.
    let bad = write(
        s.dir.path(),
        "bad.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 0, color: green}\n",
    );
    let err = kubectl_err(&kc, &["apply", "-f", &bad]).await;
    assert!(
        err.contains("spec.size") && err.contains("spec.color") && err.contains("green"),
        "{err}"
    );
    let unknown = write(
        s.dir.path(),
        "unknown.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: odd}\nspec: {size: 2, shape: round}\n",
    );
    let err = kubectl_err(&kc, &["apply", "-f", &unknown]).await;
    assert!(err.contains("unknown field \"spec.shape\""), "{err}");
    kubectl_ok(&kc, &["apply", "--validate=false", "-f", &unknown]).await;
    let odd = kubectl_ok(&kc, &["get", "wd", "odd", "-o", "jsonpath={.spec}"]).await;
    assert_eq!(odd, r#"{"size":2}"#, "pruned without strict validation");

    // The CRD goes first and takes its objects with it, so the later documents are already gone.
    kubectl_ok(&kc, &["delete", "--ignore-not-found", "-f", &file]).await;
    let err = kubectl_err(&kc, &["get", "widgets"]).await;
    // Depending on kubectl's discovery cache: unknown type, or the resource no longer served.
    assert!(
        err.contains("doesn't have a resource type \"widgets\"")
            || err.contains("could not find the requested resource"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyday_kubectl_commands() {
    let s = start().await;
    let kc = s.kubeconfig();
    let app = write(s.dir.path(), "app.yaml", APP);
    let out = kubectl_ok(&kc, &["apply", "-f", &app]).await;
    for line in [
        "namespace/shop created",
        "configmap/settings created",
        "deployment.apps/web created",
        "pod/cashier created",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert!(
        kubectl_ok(&kc, &["apply", "-f", &app])
            .await
            .contains("deployment.apps/web unchanged")
    );

    let wide = kubectl_ok(&kc, &["-n", "shop", "get", "pods", "-o", "wide"]).await;
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .take(5)
            .eq(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
        "{wide}"
    );
    assert!(
        wide.contains("cashier") && wide.contains("Pending"),
        "{wide}"
    );
    let deploy = kubectl_ok(&kc, &["-n", "shop", "get", "deploy"]).await;
    assert!(deploy.contains("web") && deploy.contains("0/2"), "{deploy}");
    let describe = kubectl_ok(&kc, &["-n", "shop", "describe", "pod", "cashier"]).await;
    assert!(
        describe.contains("Name:         cashier") && describe.contains("busybox:1.36"),
        "{describe}"
    );

    kubectl_ok(
        &kc,
        &["-n", "shop", "label", "pod", "cashier", "tier=front"],
    )
    .await;
    kubectl_ok(
        &kc,
        &["-n", "shop", "annotate", "pod", "cashier", "owner=ops"],
    )
    .await;
    let labels = kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "get",
            "pods",
            "-l",
            "tier=front",
            "--show-labels",
        ],
    )
    .await;
    assert!(labels.contains("app=cashier,tier=front"), "{labels}");
    let err = kubectl_err(&kc, &["-n", "shop", "label", "pod", "cashier", "tier=back"]).await;
    assert!(err.contains("already has a value"), "{err}");

    kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "patch",
            "deploy",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":3}}"#,
        ],
    )
    .await;
    kubectl_ok(&kc, &["-n", "shop", "patch", "deploy", "web", "--type", "json", "-p", r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"sedge/worker:v2"}]"#]).await;
    kubectl_ok(&kc, &["-n", "shop", "patch", "deploy", "web", "--type", "strategic", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"main","env":[{"name":"B","value":"2"}]}]}}}}"#]).await;
    let got = kubectl_ok(&kc, &["-n", "shop", "get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[*].name} {.metadata.generation}"]).await;
    assert_eq!(got, "3 sedge/worker:v2 A B 4");

    let editor = s.dir.path().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/mode: fast/mode: careful/' \"$1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ed = editor.display().to_string();
    let out = kubectl_with(
        &kubectl_bin(),
        &kc,
        &["-n", "shop", "edit", "configmap", "settings"],
        &[
            ("KUBECTL_EDITOR", &ed),
            ("KUBE_EDITOR", &ed),
            ("EDITOR", &ed),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "-n",
                "shop",
                "get",
                "cm",
                "settings",
                "-o",
                "jsonpath={.data.mode}"
            ]
        )
        .await,
        "careful"
    );

    // Typed create commands send protobuf.
    kubectl_ok(&kc, &["create", "namespace", "typed"]).await;
    kubectl_ok(
        &kc,
        &[
            "-n",
            "typed",
            "create",
            "configmap",
            "lit",
            "--from-literal=a=1",
        ],
    )
    .await;
    kubectl_ok(
        &kc,
        &[
            "-n",
            "typed",
            "create",
            "secret",
            "generic",
            "pw",
            "--from-literal=password=s3cret",
        ],
    )
    .await;
    kubectl_ok(&kc, &["-n", "typed", "create", "serviceaccount", "robot"]).await;
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "-n",
                "typed",
                "get",
                "cm",
                "lit",
                "-o",
                "jsonpath={.data.a}"
            ]
        )
        .await,
        "1"
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "-n",
                "typed",
                "get",
                "secret",
                "pw",
                "-o",
                "jsonpath={.data.password}"
            ]
        )
        .await,
        "czNjcmV0"
    );
    let err = kubectl_err(
        &kc,
        &["-n", "typed", "create", "deployment", "d", "--image=x"],
    )
    .await;
    assert!(err.contains("JSON or YAML"), "{err}");

    kubectl_ok(&kc, &["-n", "shop", "delete", "pod", "cashier"]).await;
    let err = kubectl_err(&kc, &["-n", "shop", "get", "pod", "cashier"]).await;
    assert!(err.contains("pods \"cashier\" not found"), "{err}");

    // The exact versioned binary behind the dispatcher agrees.
    if let Some(exact) = exact_kubectl(33) {
        let out = kubectl_with(
            &exact,
            &kc,
            &["-n", "shop", "get", "deploy", "web", "-o", "name"],
            &[],
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "deployment.apps/web"
        );
    }
    kubectl_ok(&kc, &["delete", "namespace", "shop"]).await;
    let err = kubectl_err(&kc, &["get", "namespace", "shop"]).await;
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_with_kubectl() {
    let s = start().await;
    let kc = s.kubeconfig();
    let file = write(
        s.dir.path(),
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {alpha: \"1\", beta: \"2\"}\n",
    );
    assert!(
        kubectl_ok(&kc, &["apply", "--server-side", "-f", &file])
            .await
            .contains("serverside-applied")
    );
    kubectl_ok(
        &kc,
        &[
            "patch",
            "cm",
            "shared",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"alpha":"9"}}"#,
        ],
    )
    .await;
    let err = kubectl_err(&kc, &["apply", "--server-side", "-f", &file]).await;
    assert!(
        err.contains("conflict with \"kubectl-patch\"") && err.contains(".data.alpha"),
        "{err}"
    );
    kubectl_ok(
        &kc,
        &["apply", "--server-side", "--force-conflicts", "-f", &file],
    )
    .await;
    assert_eq!(
        kubectl_ok(
            &kc,
            &["get", "cm", "shared", "-o", "jsonpath={.data.alpha}"]
        )
        .await,
        "1"
    );
    // Dropping a field from the applied configuration removes it.
    let smaller = write(
        s.dir.path(),
        "cm2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {alpha: \"1\"}\n",
    );
    kubectl_ok(&kc, &["apply", "--server-side", "-f", &smaller]).await;
    assert_eq!(
        kubectl_ok(&kc, &["get", "cm", "shared", "-o", "jsonpath={.data}"]).await,
        r#"{"alpha":"1"}"#
    );
    let managed = kubectl_ok(
        &kc,
        &["get", "cm", "shared", "-o", "yaml", "--show-managed-fields"],
    )
    .await;
    assert!(
        managed.contains("manager: kubectl") && managed.contains("operation: Apply"),
        "{managed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_cascading_delete_with_kubectl() {
    let s = start().await;
    let kc = s.kubeconfig();
    kubectl_ok(&kc, &["apply", "-f", &write(s.dir.path(), "app.yaml", APP)]).await;
    let mut child = tokio::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(&kc)
        .args([
            "-n",
            "shop",
            "get",
            "configmaps",
            "-w",
            "--output-watch-events",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert!(next().await.starts_with("EVENT"));
    assert!(next().await.starts_with("ADDED      settings"));
    kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "create",
            "-f",
            &write(
                s.dir.path(),
                "b.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\n",
            ),
        ],
    )
    .await;
    assert!(next().await.starts_with("ADDED      extra"));
    kubectl_ok(&kc, &["-n", "shop", "label", "cm", "extra", "x=y"]).await;
    assert!(next().await.starts_with("MODIFIED   extra"));
    kubectl_ok(&kc, &["-n", "shop", "delete", "cm", "extra"]).await;
    assert!(next().await.starts_with("DELETED    extra"));
    drop(child);

    // Foreground cascade: the dependent goes, then the owner, and kubectl waits for both.
    let uid = kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .await;
    let dep = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-config\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: Deployment, name: web, uid: {uid}}}\n"
    );
    kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "apply",
            "-f",
            &write(s.dir.path(), "dep.yaml", &dep),
        ],
    )
    .await;
    kubectl_ok(
        &kc,
        &[
            "-n",
            "shop",
            "delete",
            "deploy",
            "web",
            "--cascade=foreground",
            "--timeout=20s",
        ],
    )
    .await;
    assert!(
        kubectl_err(&kc, &["-n", "shop", "get", "cm", "web-config"])
            .await
            .contains("not found")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_resumes_after_a_restart_from_a_version_taken_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = sedge_apiserver::ApiServer::start(config(dir.path(), "127.0.0.1:0"))
        .await
        .unwrap();
    let addr = server.addr;
    let kc = server.kubeconfig.clone();
    kubectl_ok(
        &kc,
        &[
            "create",
            "-f",
            &write(
                dir.path(),
                "a.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
            ),
        ],
    )
    .await;
    let rv = kubectl_ok(
        &kc,
        &[
            "get",
            "cm",
            "a",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
    )
    .await;
    server.shutdown().await;
    let server = sedge_apiserver::ApiServer::start(config(dir.path(), &addr.to_string()))
        .await
        .unwrap();
    kubectl_ok(
        &kc,
        &[
            "create",
            "-f",
            &write(
                dir.path(),
                "b.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
            ),
        ],
    )
    .await;
    // Revisions survive restarts: a watch from before the restart gets exactly what came after.
    let raw = kubectl_ok(&kc, &["get", "--raw", &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=1")]).await;
    let events: Vec<serde_json::Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{raw}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "b");
    let names = kubectl_ok(&kc, &["get", "cm", "-o", "name"]).await;
    assert!(
        names.contains("configmap/a") && names.contains("configmap/b"),
        "{names}"
    );
    server.shutdown().await;
}
