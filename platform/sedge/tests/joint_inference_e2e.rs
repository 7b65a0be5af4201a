//! Joint inference end to end through `sedge up` and the real `kubectl`: Sedna resources applied
//! with kubectl start an edge worker on the edge node and a cloud worker on the cloud node; hard
//! examples travel edge pod -> channel -> cloud pod; the workers' counters show up in the
//! service's status and `kubectl get ji`; a deleted cloud pod comes back while the edge keeps
//! answering edge-only (visible in the counters); deleting the service removes its children.
//! Bad manifests are refused by kubectl or explained in the status.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use common::{Up, free_port, repo, up_with, wait_for};
use serde_json::Value;

/// Serves the files of `dir` over plain HTTP on a loopback port (the `http://` model URL).
fn serve_dir(dir: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
            let reply = match std::fs::read(dir.join(path.trim_start_matches('/'))) {
                Ok(body) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend(body);
                    r
                }
                Err(_) => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
            };
            let _ = s.write_all(&reply);
        }
    });
    port
}

fn ji(up: &Up, name: &str) -> Value {
    serde_json::from_str(&up.ok(&["get", "ji", name, "-o", "json"])).unwrap()
}

/// The `True` condition: (type, reason, message).
fn condition(v: &Value) -> Option<(String, String, String)> {
    let c = v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["status"] == "True")?;
    Some((
        c["type"].as_str()?.into(),
        c["reason"].as_str().unwrap_or("").into(),
        c["message"].as_str().unwrap_or("").into(),
    ))
}

fn metric(v: &Value, key: &str) -> Option<f64> {
    v["status"]["metrics"]
        .as_array()?
        .iter()
        .find(|m| m["key"] == key)?["value"]
        .as_str()?
        .parse()
        .ok()
}

fn service(name: &str, edge_model: &str, cloud_model: &str, hem: &str, cloud_port: u16) -> String {
    let sample = repo().join("datasets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
    format!(
        r#"
apiVersion: sedna.io/v1alpha1
kind: JointInferenceService
metadata: {{name: {name}}}
spec:
  edgeWorker:
    model: {{name: {edge_model}}}
    hardExampleMining: {hem}
    template:
      spec:
        nodeName: edge-1
        containers:
          - name: edge
            image: sedge/worker
            args: ["edge"]
            env:
              - {{name: SEDGE_INPUT, value: "{sample}"}}
              - {{name: SEDGE_REPEAT, value: "true"}}
              - {{name: SEDGE_RATE, value: "150"}}
              - {{name: SEDGE_CLOUD_WAIT_SECONDS, value: "30"}}
  cloudWorker:
    model: {{name: {cloud_model}}}
    template:
      spec:
        nodeSelector: {{sedge.io/role: cloud}}
        containers:
          - name: cloud
            image: sedge/worker
            args: ["cloud"]
            ports: [{{containerPort: {cloud_port}}}]
            readinessProbe:
              httpGet: {{path: /v2/health/ready, port: {cloud_port}}}
              periodSeconds: 1
"#,
        sample = sample.display()
    )
}

/// `sedge up` with the AI controller reporting every second on route ports of its own, and the
/// repository's models allowed as host paths (an edge Model is a path in this checkout, mounted
/// as a hostPath); waits for the cloud node. Returns it with the nodes' LC port.
fn ai_up(tmp: &std::path::Path) -> (Up, String) {
    let lc_port = free_port().to_string();
    let ai = tmp.join("ai.yaml");
    let route = free_port();
    std::fs::write(
        &ai,
        format!(
            "report_period_seconds: 1\nroute_ports: [{route}, {}]\n",
            route.saturating_add(20)
        ),
    )
    .unwrap();
    let up = up_with(&[
        "--lc-port",
        &lc_port,
        "--ai-config",
        ai.to_str().unwrap(),
        "--host-path-allow",
        &repo().join("models").display().to_string(),
    ]);
    up.ok(&[
        "wait",
        "--for=condition=Ready",
        "node/cloud-1",
        "--timeout=60s",
    ]);
    (up, lc_port)
}

const HEM: &str = r#"{name: MaxProbability, parameters: [{key: threshold, value: "0.8"}]}"#;

#[test]
fn joint_inference_through_kubectl() {
    let tmp = tempfile::tempdir().unwrap();
    let (up, lc_port) = ai_up(tmp.path());
    // ROLES says which node is which: the cloud node is not an edge node.
    let nodes = up.ok(&["get", "nodes"]);
    let role_of = |name: &str| {
        let line = nodes
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default();
        line.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        (role_of("cloud-1"), role_of("edge-1")),
        ("cloud".to_string(), "edge".to_string()),
        "{nodes}"
    );

    // Models: the edge one by file://, the cloud one over http:// pinned by its SHA-256.
    let models = repo().join("models/fashion-mnist");
    let http = serve_dir(models.clone());
    let sum = sedge_inference_worker::fetch::sha256_hex(
        &std::fs::read(models.join("cloud-cnn.onnx")).unwrap(),
    );
    up.apply(&format!(
        r#"
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: edge}}
spec: {{url: "file://{edge}", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata:
  name: cloud
  annotations: {{sedge.io/model-sha256: "{sum}"}}
spec: {{url: "http://127.0.0.1:{http}/cloud-cnn.onnx", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: missing-file}}
spec: {{url: /nonexistent/model.onnx, format: onnx}}
"#,
        edge = models.join("edge-cnn.onnx").display()
    ));

    // 1. A working service: Running, counters in the status, and on `kubectl get ji`.
    let cloud_port = free_port();
    up.apply(&service("fmnist", "edge", "cloud", HEM, cloud_port));
    wait_for("the service to be Running", Duration::from_secs(90), || {
        let v = ji(&up, "fmnist");
        (condition(&v)?.0 == "Running").then_some(())
    });
    let v = wait_for(
        "counters with cloud answers",
        Duration::from_secs(60),
        || {
            let v = ji(&up, "fmnist");
            (metric(&v, "cloudAnsweredNumber")? > 0.0).then_some(v)
        },
    );
    let inferences = metric(&v, "inferenceNumber").unwrap();
    let hard = metric(&v, "hardExampleNumber").unwrap();
    assert!(inferences > 0.0 && hard > 0.0 && hard < inferences, "{v}");
    let ratio = metric(&v, "uploadCloudRatio").unwrap();
    assert!((ratio - hard / inferences).abs() < 0.01, "{v}");
    let table = up.ok(&["get", "ji", "fmnist"]);
    for col in [
        "STATUS",
        "EDGE",
        "CLOUD",
        "INFERENCES",
        "HARD",
        "OFFLOAD",
        "Running",
        "1/1",
    ] {
        assert!(table.contains(col), "{col} missing from:\n{table}");
    }
    // The edge pod reaches the cloud through a local route port, not cluster DNS.
    let edge_pod = &up.pods("jointinferenceservice.sedna.io/worker-type=edge,jointinferenceservice.sedna.io/name=fmnist")[0];
    let env = edge_pod["spec"]["containers"][0]["env"].as_array().unwrap();
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(var("BIG_MODEL_IP"), Some("127.0.0.1".into()));
    assert_eq!(var("HEM_NAME"), Some("MaxProbability".into()));
    assert!(
        var("MODEL_URL")
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("/home/data/")
    );

    // The node's LC endpoint refuses garbage and reports about pods that are not there, and the
    // counters are unchanged by them.
    let lc = |path: &str, body: &str| -> String {
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", lc_port.parse::<u16>().unwrap())).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let before_garbage = metric(&ji(&up, "fmnist"), "inferenceNumber").unwrap();
    let r = lc("/sedna/workers/w/info", "{not json");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("malformed worker report"),
        "{r}"
    );
    let r = lc("/sedna/workers/w/info", r#"{"name": "other"}"#);
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("but the path names"),
        "{r}"
    );
    let r = lc(
        "/sedna/workers/ghost/info",
        r#"{"name": "ghost", "namespace": "default", "ownerKind": "jointinferenceservice", "ownerName": "fmnist", "ownerInfo": {"inferenceNumber": 1e9}}"#,
    );
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("no pod default/ghost"),
        "{r}"
    );
    // A forged report for the real edge worker, from a process that is not that pod: refused.
    let now = up.pods("jointinferenceservice.sedna.io/worker-type=edge,jointinferenceservice.sedna.io/name=fmnist");
    let worker = now[0]["metadata"]["name"].as_str().unwrap();
    let r = lc(
        &format!("/sedna/workers/{worker}/info"),
        &format!(
            r#"{{"name": "{worker}", "namespace": "default", "ownerKind": "jointinferenceservice", "ownerName": "fmnist", "ownerInfo": {{"inferenceNumber": 1e9}}}}"#
        ),
    );
    assert!(
        r.starts_with("HTTP/1.1 401") && r.contains("SEDGE_POD_TOKEN"),
        "{r}"
    );
    let after_garbage = metric(&ji(&up, "fmnist"), "inferenceNumber").unwrap();
    assert!(after_garbage >= before_garbage && after_garbage < 1e9);

    // 2. The cloud pod is deleted: the edge keeps answering, edge-only, and the counters show
    //    it; the Deployment brings the cloud back and answers resume.
    let cloud_sel = "jointinferenceservice.sedna.io/worker-type=cloud,jointinferenceservice.sedna.io/name=fmnist";
    let old_cloud = up.pods(cloud_sel)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let before = ji(&up, "fmnist");
    let fallbacks0 = metric(&before, "edgeFallbackNumber").unwrap_or(0.0);
    let inferences0 = metric(&before, "inferenceNumber").unwrap();
    up.ok(&["delete", "pod", &old_cloud, "--wait=false"]);
    let during = wait_for(
        "edge-only answers while the cloud is away",
        Duration::from_secs(60),
        || {
            let v = ji(&up, "fmnist");
            (metric(&v, "edgeFallbackNumber")? > fallbacks0).then_some(v)
        },
    );
    assert!(
        metric(&during, "inferenceNumber").unwrap() > inferences0,
        "{during}"
    );
    wait_for("a new cloud pod, ready", Duration::from_secs(60), || {
        up.pods(cloud_sel)
            .iter()
            .any(|p| p["metadata"]["name"] != old_cloud.as_str() && common::running_ready(p))
            .then_some(())
    });
    let answered = metric(&ji(&up, "fmnist"), "cloudAnsweredNumber").unwrap();
    wait_for("cloud answers again", Duration::from_secs(60), || {
        (metric(&ji(&up, "fmnist"), "cloudAnsweredNumber")? > answered).then_some(())
    });

    // 3. Children deleted by hand come back; a spec change rolls the edge worker.
    up.ok(&["delete", "service", "fmnist-cloud"]);
    up.ok(&[
        "delete",
        "deployment",
        "fmnist-deployment-edge",
        "--wait=false",
    ]);
    wait_for(
        "the Service and the edge Deployment back",
        Duration::from_secs(60),
        || {
            let (a, _, _) = up.kubectl(&["get", "service", "fmnist-cloud"]);
            let (b, _, _) = up.kubectl(&["get", "deployment", "fmnist-deployment-edge"]);
            (a && b).then_some(())
        },
    );
    up.ok(&[
        "patch",
        "ji",
        "fmnist",
        "--type=merge",
        "-p",
        r#"{"spec":{"edgeWorker":{"hardExampleMining":{"parameters":[{"key":"threshold","value":"0.9"}]}}}}"#,
    ]);
    wait_for(
        "the edge worker rolled to the new threshold",
        Duration::from_secs(60),
        || {
            let pods = up.pods("jointinferenceservice.sedna.io/worker-type=edge,jointinferenceservice.sedna.io/name=fmnist");
            (pods.len() == 1
                && common::running_ready(&pods[0])
                && pods[0]["spec"]["containers"][0]["env"]
                    .as_array()?
                    .iter()
                    .any(|e| {
                        e["name"] == "HEM_PARAMETERS"
                            && e["value"].as_str().is_some_and(|v| v.contains("0.9"))
                    }))
            .then_some(())
        },
    );

    // 4. Bad manifests: refused by the schema, or explained in the status.
    let (ok, _, err) = {
        let f = tmp.path().join("bad.yaml");
        std::fs::write(
            &f,
            service("typo", "edge", "cloud", HEM, 1).replace(
                "hardExampleMining: {name: MaxProbability, parameters: [{key: threshold, value: \"0.8\"}]}",
                "hardExampleMining: {name: MaxProbability, parameters: [{key: threshold, value: 0.8}]}",
            ),
        )
        .unwrap();
        up.kubectl(&["apply", "-f", f.to_str().unwrap()])
    };
    assert!(
        !ok && err.contains("spec.edgeWorker.hardExampleMining.parameters[0].value"),
        "{err}"
    );
    let cases = [
        (
            "no-model",
            "nope",
            "cloud",
            HEM.to_string(),
            "ModelNotFound",
            "\"nope\"",
        ),
        (
            "bad-rule",
            "edge",
            "cloud",
            "{name: Psychic}".to_string(),
            "InvalidHardExampleMining",
            "Psychic",
        ),
        (
            "bad-param",
            "edge",
            "cloud",
            r#"{name: MaxProbability, parameters: [{key: threshold, value: "high"}]}"#.to_string(),
            "InvalidHardExampleMining",
            "high",
        ),
    ];
    for (name, edge, cloud, hem, _, _) in &cases {
        up.apply(&service(name, edge, cloud, hem, free_port()));
    }
    for (name, _, _, _, reason, needle) in &cases {
        let (t, r, m) = wait_for(&format!("{name} to fail"), Duration::from_secs(30), || {
            condition(&ji(&up, name)).filter(|c| c.0 == "Failed")
        });
        assert_eq!((t.as_str(), r.as_str()), ("Failed", *reason), "{name}: {m}");
        assert!(m.contains(needle), "{name}: {m}");
        let (_, deps, _) = up.kubectl(&[
            "get",
            "deploy",
            "-l",
            &format!("jointinferenceservice.sedna.io/name={name}"),
            "-o",
            "name",
        ]);
        assert!(deps.trim().is_empty(), "{name} created workers: {deps}");
    }
    // A model file that is not there: the worker says so and the status names it.
    up.apply(&service(
        "broken",
        "missing-file",
        "cloud",
        HEM,
        free_port(),
    ));
    let (_, reason, message) = wait_for("broken to fail", Duration::from_secs(90), || {
        condition(&ji(&up, "broken")).filter(|c| c.0 == "Failed")
    });
    assert_eq!(reason, "ModelUnavailable", "{message}");
    assert!(
        message.contains("/nonexistent/model.onnx") || message.contains("model"),
        "{message}"
    );

    // Sedna's own helmet-detection manifests apply unchanged; their hpa is reported, not dropped
    // (the pods wait for Sedna's node names, which this cluster does not have).
    let sedna = repo().join("ai-controller/tests/sedna");
    let files: Vec<String> = ["models-dataset.yaml", "helmet-ji.yaml", "helmet-il.yaml"]
        .iter()
        .map(|f| sedna.join(f).display().to_string())
        .collect();
    for f in &files {
        up.ok(&["apply", "-f", f]);
    }
    let (t, _, m) = wait_for(
        "the helmet service's status",
        Duration::from_secs(30),
        || {
            let (_, out, _) = up.kubectl(&[
                "get",
                "ji",
                "helmet-detection-inference-example",
                "-o",
                "json",
            ]);
            condition(&serde_json::from_str(&out).ok()?)
        },
    );
    assert_eq!(t, "Pending", "{m}");
    assert!(
        m.contains("spec.edgeWorker.hpa") && m.contains("not supported"),
        "{m}"
    );
    up.ok(&["get", "il", "helmet-detection-demo"]);
    for f in &files {
        up.ok(&["delete", "-f", f, "--wait=false"]);
    }

    // 5. Deleting the service removes its Deployments, Service and pods.
    up.ok(&["delete", "ji", "fmnist"]);
    wait_for("the children to go", Duration::from_secs(60), || {
        let sel = "jointinferenceservice.sedna.io/name=fmnist";
        let (_, out, _) = up.kubectl(&["get", "deploy,svc,pods", "-l", sel, "-o", "name"]);
        out.trim().is_empty().then_some(())
    });
}

/// The edge worker as a service on `sedge up`: applications on the node send requests to the
/// edge pod's port (OIP gRPC, as tritonclient does, and REST); easy images are answered by the
/// edge, hard ones by the cloud pod through the channel; with the cloud pod deleted, answers go
/// on from the edge; the served requests are counted in `kubectl get ji`.
#[test]
fn the_edge_worker_serves_applications_on_its_node() {
    use sedge_inference_worker::pb;
    use sedge_inference_worker::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

    let tmp = tempfile::tempdir().unwrap();
    let (up, _lc_port) = ai_up(tmp.path());
    let models = repo().join("models/fashion-mnist");
    let (cloud_port, edge_port) = (free_port(), free_port());
    up.apply(&format!(
        r#"
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: edge}}
spec: {{url: "{edge}", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: cloud}}
spec: {{url: "{cloud}", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: JointInferenceService
metadata: {{name: serving}}
spec:
  edgeWorker:
    model: {{name: edge}}
    hardExampleMining: {HEM}
    template:
      spec:
        nodeName: edge-1
        containers:
          - name: edge
            image: sedge/worker
            args: ["edge"]
            env:
              - {{name: SEDGE_EDGE_WORKER_SERVE_LISTEN, value: "127.0.0.1:{edge_port}"}}
              # Room for a loaded test machine: an offload that is slow is still the cloud's.
              - {{name: SEDGE_EDGE_WORKER_OFFLOAD_TIMEOUT_MS, value: "3000"}}
              - {{name: SEDGE_EDGE_WORKER_OFFLOAD_BUDGET_MS, value: "6000"}}
            ports: [{{containerPort: {edge_port}, hostPort: {edge_port}}}]
            readinessProbe:
              httpGet: {{path: /v2/health/ready, port: {edge_port}}}
              periodSeconds: 1
  cloudWorker:
    model: {{name: cloud}}
    template:
      spec:
        nodeSelector: {{sedge.io/role: cloud}}
        containers:
          - name: cloud
            image: sedge/worker
            args: ["cloud"]
            ports: [{{containerPort: {cloud_port}}}]
            readinessProbe:
              httpGet: {{path: /v2/health/ready, port: {cloud_port}}}
              periodSeconds: 1
"#,
        edge = models.join("edge-cnn.onnx").display(),
        cloud = models.join("cloud-cnn.onnx").display(),
    ));
    wait_for("the service to be Running", Duration::from_secs(90), || {
        (condition(&ji(&up, "serving"))?.0 == "Running").then_some(())
    });
    let edge_sel = "jointinferenceservice.sedna.io/worker-type=edge,jointinferenceservice.sedna.io/name=serving";
    let cloud_sel = "jointinferenceservice.sedna.io/worker-type=cloud,jointinferenceservice.sedna.io/name=serving";
    wait_for("both workers ready", Duration::from_secs(90), || {
        (up.pods(edge_sel).iter().any(common::running_ready)
            && up.pods(cloud_sel).iter().any(common::running_ready))
        .then_some(())
    });

    // Which images the edge model is unsure of, computed here with the same model and rule.
    let edge_model =
        sedge_inference_worker::model::Model::load(models.join("edge-cnn.onnx")).unwrap();
    let backend = sedge_inference_worker::backend::load(&edge_model, &Default::default()).unwrap();
    let norm = sedge_inference_worker::preprocess::Normalizer::new(&edge_model.config.input);
    let data = sedge_datasets::fashion::load(
        &sedge_datasets::fashion::sample_dir(),
        sedge_datasets::Split::Test,
    )
    .unwrap();
    let images: Vec<Vec<u8>> = data.images.pixels.chunks(784).map(<[u8]>::to_vec).collect();
    let hard = |px: &[u8]| {
        let mut x = Vec::new();
        norm.extend(px, &mut x);
        let mut p = backend.run(&x, 1).unwrap();
        sedge_inference_worker::preprocess::activate(&mut p, edge_model.config.output.activation);
        sedge_inference_worker::preprocess::argmax(&p).unwrap().1 < 0.8
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut grpc = rt
        .block_on(GrpcInferenceServiceClient::connect(format!(
            "http://127.0.0.1:{edge_port}"
        )))
        .unwrap();
    let request = |px: &[u8], timeout_us: Option<i64>| {
        let mut r = pb::ModelInferRequest {
            model_name: "edge-cnn".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "UINT8".into(),
                shape: vec![1, 1, 28, 28],
                ..Default::default()
            }],
            raw_input_contents: vec![px.to_vec()],
            ..Default::default()
        };
        if let Some(us) = timeout_us {
            r.parameters.insert(
                "timeout".into(),
                pb::InferParameter {
                    parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(us)),
                },
            );
        }
        r
    };
    let mut ask = |px: &[u8], timeout_us: Option<i64>| -> String {
        let r = rt
            .block_on(grpc.model_infer(request(px, timeout_us)))
            .unwrap_or_else(|e| panic!("the edge endpoint failed: {e}\n{}", up.log()))
            .into_inner();
        match r
            .parameters
            .get("answered_by")
            .and_then(|p| p.parameter_choice.clone())
        {
            Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => s,
            other => panic!("answered_by is {other:?}"),
        }
    };

    // The workers are ready; the node's route to the cloud worker may still be coming up.
    let hard_one = images.iter().find(|p| hard(p)).unwrap().clone();
    let mut asked_hard = 0u32;
    wait_for(
        "the cloud answering through the node's route",
        Duration::from_secs(60),
        || {
            asked_hard += 1;
            (ask(&hard_one, None) == "cloud").then_some(())
        },
    );

    // 1. 100 images: each answered by the model the rule says.
    let mut cloud_answers = 0;
    for px in &images[..100] {
        let who = ask(px, None);
        let want = if hard(px) { "cloud" } else { "edge" };
        assert_eq!(who, want);
        cloud_answers += u32::from(who == "cloud");
    }
    assert!(cloud_answers > 0 && cloud_answers < 100, "{cloud_answers}");
    // A deadline already spent cannot wait for the cloud: the edge answers.
    assert_eq!(ask(&hard_one, Some(1)), "edge");
    // REST on the same port, with Triton's binary extension.
    let rest = {
        let header = br#"{"inputs":[{"name":"x","shape":[1,784],"datatype":"UINT8","parameters":{"binary_data_size":784}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&hard_one);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", edge_port)).unwrap();
        write!(
            s,
            "POST /v2/models/edge-cnn/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            header.len(),
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.contains(r#""answered_by":"cloud""#),
        "{rest}"
    );

    // 2. The served requests are counted in the service's status, as Sedna counts samples.
    let served = f64::from(100 + 2 + asked_hard);
    let hard_served = f64::from(cloud_answers + 2 + asked_hard);
    wait_for(
        "the served requests in kubectl get ji",
        Duration::from_secs(30),
        || {
            let v = ji(&up, "serving");
            (metric(&v, "inferenceNumber")? == served
                && metric(&v, "hardExampleNumber")? == hard_served)
                .then_some(())
        },
    );

    // 3. The cloud pod is deleted: hard images are answered by the edge, every request succeeds.
    let old_cloud = up.pods(cloud_sel)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    up.ok(&["delete", "pod", &old_cloud, "--wait=false"]);
    wait_for(
        "a hard image answered by the edge with the cloud pod gone",
        Duration::from_secs(60),
        || (ask(&hard_one, None) == "edge").then_some(()),
    );
    wait_for("the cloud answering again", Duration::from_secs(90), || {
        (ask(&hard_one, None) == "cloud").then_some(())
    });
    let table = up.ok(&["get", "ji", "serving"]);
    assert!(table.contains("Running"), "{table}");
}
