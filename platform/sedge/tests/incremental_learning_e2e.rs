//! Incremental learning end to end through `sedge up` and the real `kubectl`: an
//! IncrementalLearningJob written the way Sedna's are starts its inference worker on the
//! Dataset's node; the worker's hard examples, labelled by a real cloud model server, grow the
//! Dataset; the node's local controller fires the train trigger; real train and eval pods
//! (`sedge worker train|eval`, candle and tract) run; the new model is deployed hot (the worker
//! swaps it without its pod restarting) or cold (the file is replaced and the pod restarted),
//! round after round; `kubectl get il` shows it. A train worker that fails leaves the job
//! recoverable with the reason in its conditions; a job naming a missing Dataset says so.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Up, free_port, repo, up_with, wait_for};
use serde_json::Value;

struct Labeller(Child);

impl Drop for Labeller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cloud model server that labels hard examples: the real `sedge worker cloud`.
fn labeller(port: u16) -> Labeller {
    let model = repo().join("models/fashion-mnist/cloud-cnn.onnx");
    let child = Command::new(env!("CARGO_BIN_EXE_sedge"))
        .args(["worker", "cloud", "--model"])
        .arg(&model)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let l = Labeller(child);
    wait_for("the labeller to listen", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    l
}

fn il(up: &Up, name: &str) -> Value {
    serde_json::from_str(&up.ok(&["get", "il", name, "-o", "json"])).unwrap()
}

fn conditions(v: &Value) -> Vec<(String, String, String, String)> {
    v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("stage"), s("type"), s("reason"), s("message"))
        })
        .collect()
}

/// Writes the models and dataset directory of one job under `dir`, returns its manifests.
fn job(dir: &Path, name: &str, hot: bool, labeller: u16, train_env: &str) -> String {
    job_with(dir, name, hot, labeller, train_env, 30)
}

/// [`job`] with the train trigger's sample threshold.
fn job_with(
    dir: &Path,
    name: &str,
    hot: bool,
    labeller: u16,
    train_env: &str,
    threshold: u32,
) -> String {
    let models = repo().join("models/fashion-mnist");
    for sub in ["initial", "deployed", "hard"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for sub in ["initial", "deployed"] {
        for ext in ["onnx", "json"] {
            std::fs::copy(
                models.join(format!("edge-cnn.{ext}")),
                dir.join(sub).join(format!("edge-cnn.{ext}")),
            )
            .unwrap();
        }
    }
    let stream = repo().join("datasets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
    let d = dir.display();
    format!(
        r#"
apiVersion: sedna.io/v1alpha1
kind: Dataset
metadata: {{name: {name}-hard}}
spec: {{url: "{d}/hard/index.txt", format: txt, nodeName: edge-1}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: {name}-initial}}
spec: {{url: "{d}/initial/edge-cnn.onnx", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: {name}-deployed}}
spec: {{url: "{d}/deployed/edge-cnn.onnx", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: IncrementalLearningJob
metadata:
  name: {name}
  annotations: {{sedge.io/big-model-address: "127.0.0.1:{labeller}"}}
spec:
  initialModel: {{name: {name}-initial}}
  dataset: {{name: {name}-hard, trainProb: 0.8}}
  trainSpec:
    template:
      spec:
        containers:
          - name: train
            image: sedge/worker
            args: ["train"]
            env: [{{name: EPOCHS, value: "1"}}, {{name: BATCH_SIZE, value: "16"}}{train_env}]
    trigger:
      checkPeriodSeconds: 1
      timer: {{start: 00:00, end: 23:59}}
      condition: {{operator: ">=", threshold: {threshold}, metric: num_of_samples}}
  evalSpec:
    template:
      spec:
        containers:
          - name: eval
            image: sedge/worker
            args: ["eval"]
  deploySpec:
    model: {{name: {name}-deployed, hotUpdateEnabled: {hot}, pollPeriodSeconds: 1}}
    trigger:
      condition: {{operator: ge, threshold: -1.0, metric: accuracy_delta}}
    hardExampleMining: {{name: MaxProbability, parameters: [{{key: threshold, value: "0.8"}}]}}
    template:
      spec:
        containers:
          - name: infer
            image: sedge/worker
            args: ["edge"]
            env:
              - {{name: SEDGE_INPUT, value: "{stream}"}}
              - {{name: SEDGE_REPEAT, value: "true"}}
              - {{name: SEDGE_RATE, value: "100"}}
              - {{name: SEDGE_CLOUD_WAIT_SECONDS, value: "30"}}
  outputDir: "{d}/out"
"#,
        stream = stream.display()
    )
}

fn inference_pod(up: &Up, job: &str) -> Option<(String, String, i64)> {
    let pods = up.pods(&format!(
        "incrementallearningjob.sedna.io/name={job},incrementallearningjob.sedna.io/worker-type=inference"
    ));
    let p = pods.iter().find(|p| common::running_ready(p))?;
    Some((
        p["metadata"]["name"].as_str()?.to_string(),
        p["metadata"]["uid"].as_str()?.to_string(),
        p["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0),
    ))
}

#[test]
fn incremental_learning_through_kubectl() {
    let lc_port = free_port().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let ai = tmp.path().join("ai.yaml");
    std::fs::write(&ai, "report_period_seconds: 1\n").unwrap();
    let port = free_port();
    let _labeller = labeller(port);
    let up = up_with(&[
        "--lc-port",
        &lc_port,
        "--ai-config",
        ai.to_str().unwrap(),
        "--host-path-allow",
        tmp.path().to_str().unwrap(),
    ]);
    up.ok(&[
        "wait",
        "--for=condition=Ready",
        "node/edge-1",
        "--timeout=60s",
    ]);

    // Bad input first: a missing Dataset is named in a Failed condition and nothing starts.
    up.apply(
        r#"
apiVersion: sedna.io/v1alpha1
kind: IncrementalLearningJob
metadata: {name: nodata}
spec:
  initialModel: {name: x}
  dataset: {name: nope, trainProb: 0.8}
  trainSpec:
    template: {spec: {containers: [{name: t, image: sedge/worker, args: [train]}]}}
    trigger: {condition: {operator: ">", threshold: 1, metric: num_of_samples}}
  deploySpec:
    model: {name: x}
    trigger: {condition: {operator: ">", threshold: 0, metric: accuracy_delta}}
    hardExampleMining: {name: IBT}
    template: {spec: {containers: [{name: i, image: sedge/worker, args: [edge]}]}}
  outputDir: /tmp/nodata
"#,
    );

    link_cut_loses_no_hard_example(&up, tmp.path(), port);

    let hot_dir = tmp.path().join("hot");
    let cold_dir = tmp.path().join("cold");
    let bad_dir = tmp.path().join("bad");
    up.apply(&job(&hot_dir, "hot", true, port, ""));
    up.apply(&job(&cold_dir, "cold", false, port, ""));
    // Its train worker is told to start from a model that is not there: it fails every round.
    up.apply(&job(
        &bad_dir,
        "bad",
        true,
        port,
        r#", {name: BASE_MODEL_URL, value: "/nonexistent/base.onnx"}"#,
    ));

    wait_for(
        "the missing Dataset to be named",
        Duration::from_secs(30),
        || {
            let c = conditions(&il(&up, "nodata"));
            c.iter()
                .find(|c| c.1 == "Failed" && c.2 == "DatasetNotFound" && c.3.contains("\"nope\""))
                .map(|_| ())
        },
    );
    assert!(
        up.pods("incrementallearningjob.sedna.io/name=nodata")
            .is_empty(),
        "nothing is created for a job that refers to a missing Dataset"
    );

    let (cold0, _, _) = wait_for(
        "the cold job's inference worker",
        Duration::from_secs(90),
        || inference_pod(&up, "cold"),
    );
    // The hot job: the worker is up, samples come in, the train trigger fires.
    let (pod0, uid0, _) = wait_for(
        "the hot job's inference worker",
        Duration::from_secs(90),
        || inference_pod(&up, "hot"),
    );
    let v = wait_for(
        "the hot job to deploy round 1",
        Duration::from_secs(240),
        || {
            let v = il(&up, "hot");
            (v["status"]["modelVersion"] == "round-1").then_some(v)
        },
    );
    let c = conditions(&v);
    let path: Vec<String> = c.iter().map(|c| format!("{}/{}", c.0, c.1)).collect();
    for step in [
        "Train/Waiting",
        "Train/Ready",
        "Train/Starting",
        "Train/Completed",
        "Eval/Waiting",
        "Eval/Ready",
        "Eval/Starting",
        "Eval/Completed",
        "Deploy/Waiting",
        "Deploy/Ready",
        "Deploy/Starting",
        "Deploy/Completed",
    ] {
        assert!(
            path.contains(&step.to_string()),
            "{step} missing from {path:?}"
        );
    }
    let eval: Value = serde_json::from_str(v["status"]["lastEval"].as_str().unwrap()).unwrap();
    assert!(eval["accuracy_delta"][0].is_f64(), "{eval}");
    assert_eq!(eval["precision"].as_array().unwrap().len(), 10);
    let trained = v["status"]["modelUrl"].as_str().unwrap().to_string();
    assert!(
        trained.starts_with(&hot_dir.join("out/models/1").display().to_string()),
        "{trained}"
    );
    // The worker swapped it in, without a restart.
    wait_for(
        "the worker to serve the round-1 model",
        Duration::from_secs(30),
        || {
            let (_, log, _) = up.kubectl(&["logs", &pod0]);
            log.contains("hot update: new model in service")
                .then_some(())
        },
    );
    let (pod1, uid1, restarts) = inference_pod(&up, "hot").unwrap();
    assert_eq!(
        (pod1.as_str(), uid1.as_str(), restarts),
        (pod0.as_str(), uid0.as_str(), 0)
    );
    // And again: the second round deploys too (Sedna's hot update stops after one).
    wait_for(
        "the hot job to deploy round 2",
        Duration::from_secs(240),
        || {
            let v = il(&up, "hot")["status"]["modelVersion"]
                .as_str()?
                .to_string();
            (v != "round-1" && v.starts_with("round-")).then_some(())
        },
    );
    let (pod2, _, restarts) = inference_pod(&up, "hot").unwrap();
    assert_eq!(
        (pod2.as_str(), restarts),
        (pod0.as_str(), 0),
        "hot: the same pod, never restarted"
    );
    let (_, log, _) = up.kubectl(&["logs", &pod0]);
    assert!(
        log.matches("hot update: new model in service").count() >= 2,
        "{}",
        common::tail(&log)
    );

    // The cold job: the deploy Model's file was replaced and the worker restarted (each
    // round deploys: the trigger always holds here).
    wait_for("the cold job to deploy", Duration::from_secs(240), || {
        let v = il(&up, "cold");
        v["status"]["modelVersion"]
            .as_str()?
            .starts_with("round-")
            .then_some(())
    });
    let deployed = std::fs::read(cold_dir.join("deployed/edge-cnn.onnx")).unwrap();
    let initial = std::fs::read(cold_dir.join("initial/edge-cnn.onnx")).unwrap();
    assert_ne!(
        deployed, initial,
        "the trained weights were copied over the deployed model"
    );
    let trained: Vec<Vec<u8>> = std::fs::read_dir(cold_dir.join("out/models"))
        .unwrap()
        .filter_map(|d| std::fs::read(d.ok()?.path().join("edge-cnn.onnx")).ok())
        .collect();
    assert!(
        trained.contains(&deployed),
        "the deployed file is one of the job's trained models"
    );
    let c = conditions(&il(&up, "cold"));
    assert!(
        c.iter().any(|c| c.0 == "Deploy" && c.2 == "ColdUpdate"),
        "{c:?}"
    );
    wait_for(
        "the cold job's worker to restart",
        Duration::from_secs(120),
        || {
            let (p, _, _) = inference_pod(&up, "cold")?;
            (p != cold0).then_some(())
        },
    );

    // The failing train worker: the job records why, backs off and comes back to Train/Waiting.
    let v = wait_for(
        "the bad job to fail and retry",
        Duration::from_secs(240),
        || {
            let v = il(&up, "bad");
            let c = conditions(&v);
            let failed = c.iter().position(|c| c.0 == "Train" && c.1 == "Failed")?;
            c[failed..].iter().any(|c| c.2 == "Retrying").then_some(v)
        },
    );
    let c = conditions(&v);
    let failed = c.iter().find(|c| c.1 == "Failed").unwrap();
    assert!(
        failed.3.contains("/nonexistent/base.onnx"),
        "the reason names the model: {failed:?}"
    );
    assert!(
        v["status"]["modelVersion"] == "initial",
        "nothing was deployed"
    );

    // `kubectl get il` answers "is it learning?".
    let table = up.ok(&["get", "il"]);
    let header = table.lines().next().unwrap();
    for col in ["STAGE", "PHASE", "ROUND", "SAMPLES", "MODEL"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hot ") && l.contains("round-")),
        "{table}"
    );

    // Deleting a job removes its worker and state.
    up.ok(&["delete", "il", "cold"]);
    wait_for(
        "the cold job's children to go",
        Duration::from_secs(60),
        || {
            let (_, out, _) = up.kubectl(&[
                "get",
                "deploy,cm,pods",
                "-l",
                "incrementallearningjob.sedna.io/name=cold",
                "-o",
                "name",
            ]);
            out.trim().is_empty().then_some(())
        },
    );
}

fn lines(index: &Path) -> Vec<String> {
    std::fs::read_to_string(index)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn waiting(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("pending")).map_or(0, |d| d.count())
}

/// The link between the inference worker and its labeller is cut while hard examples come in:
/// they wait on the node, and when the link returns each is labelled, once. Waiting examples get
/// ids in order, so "none lost" is: the index lists ids 0..n without a gap, and none waits.
fn link_cut_loses_no_hard_example(up: &Up, tmp: &Path, labeller: u16) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = rt
        .block_on(sedge_tunnel::fault::TcpFaultProxy::start(
            ([127, 0, 0, 1], labeller).into(),
        ))
        .unwrap();
    let dir = tmp.join("offline");
    // It never trains: this part is about collecting.
    up.apply(&job_with(
        &dir,
        "offline",
        true,
        proxy.addr.port(),
        "",
        1_000_000,
    ));
    let index = dir.join("hard/index.txt");
    wait_for(
        "hard examples labelled live",
        Duration::from_secs(120),
        || (lines(&index).len() >= 5).then_some(()),
    );
    proxy.faults.set_refuse(true);
    proxy.faults.cut();
    let during = wait_for(
        "hard examples to wait on the node",
        Duration::from_secs(60),
        || {
            let n = waiting(&dir.join("hard"));
            (n >= 20).then_some(n)
        },
    );
    proxy.faults.heal();
    wait_for(
        "the waiting hard examples to be labelled",
        Duration::from_secs(120),
        || (waiting(&dir.join("hard")) == 0).then_some(()),
    );
    let all = lines(&index);
    let mut late: Vec<u64> = all
        .iter()
        .filter_map(|l| {
            l.strip_prefix("images/p")?
                .split_once(".png")?
                .0
                .parse()
                .ok()
        })
        .collect();
    late.sort_unstable();
    assert!(
        late.len() >= during,
        "{} labelled late, {during} were waiting",
        late.len()
    );
    assert_eq!(
        late,
        (0..late.len() as u64).collect::<Vec<_>>(),
        "every waiting example was labelled, once"
    );
    let names: std::collections::HashSet<&str> = all
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names.len(), all.len(), "no image listed twice");
    up.ok(&["delete", "il", "offline"]);
}
