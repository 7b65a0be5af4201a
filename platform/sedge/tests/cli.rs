//! The `sedge` binary as users run it: flags, Sedna's environment variables, real processes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn sedge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sedge"));
    c.current_dir(repo()).env_remove("RUST_LOG");
    for var in [
        "MODEL_URL",
        "HEM_NAME",
        "HEM_PARAMETERS",
        "MINING_MODE",
        "BIG_MODEL_IP",
        "BIG_MODEL_PORT",
        "BIG_MODEL_NAME",
        "BIG_MODEL_BIND_IP",
        "BIG_MODEL_BIND_PORT",
        "BACKEND",
    ] {
        c.env_remove(var);
    }
    c
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sample() -> String {
    repo()
        .join("datasets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz")
        .display()
        .to_string()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_names_the_commands_and_the_sedna_environment() {
    let (out, _) = text(&sedge().arg("--help").output().unwrap());
    for cmd in ["worker", "infer", "demo", "dataset"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (out, _) = text(&sedge().args(["worker", "edge", "--help"]).output().unwrap());
    assert!(
        out.contains("HEM_PARAMETERS") && out.contains("BIG_MODEL_IP"),
        "{out}"
    );
}

#[test]
fn infer_prints_predictions_and_accuracy() {
    let o = sedge()
        .args(["infer", "--summary-only", &sample()])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("500 samples, accuracy"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let o = sedge()
        .args([
            "dataset",
            "export",
            "--data",
            &repo()
                .join("datasets/fashion-mnist-sample")
                .display()
                .to_string(),
            "--limit",
            "3",
            "-o",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let png = dir.path().join("images/00000.png");
    let o = sedge()
        .args(["infer", "--backend", "ort"])
        .arg(&png)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(line["edge"]["label"].is_u64(), "{line}");
}

#[test]
fn bad_settings_fail_fast_with_the_reason() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 9] = [
        (
            &[("SEDGE_REPEAT", "1000")],
            &[],
            "SEDGE_REPEAT=\"1000\": not a boolean",
        ),
        (&[("LC_PERIOD", "soon")], &[], "LC_PERIOD=\"soon\""),
        (
            &[("HEM_NAME", "Entropy")],
            &[],
            "unknown hard-example mining rule \"Entropy\"",
        ),
        (
            &[
                ("HEM_NAME", "IBT"),
                ("HEM_PARAMETERS", r#"[{"key":"threshold_img","value":"2"}]"#),
            ],
            &[],
            "threshold_img = \"2\" is not a number between 0 and 1",
        ),
        (
            &[("BIG_MODEL_PORT", "5000")],
            &[],
            "BIG_MODEL_IP is not set",
        ),
        (
            &[("BIG_MODEL_IP", "10.0.0.1"), ("BIG_MODEL_PORT", "http")],
            &[],
            "BIG_MODEL_PORT=\"http\"",
        ),
        (&[], &["--backend", "cuda"], "unknown backend \"cuda\""),
        (
            &[("SEDGE_EDGE_WORKER_SERVE_LISTEN", "port-eighty")],
            &[],
            "SEDGE_EDGE_WORKER_SERVE_LISTEN",
        ),
        (
            &[],
            &["--listen", "nowhere"],
            "invalid value 'nowhere' for '--listen",
        ),
    ];
    for (env, flags, expect) in cases {
        let o = sedge()
            .args(["worker", "edge"])
            .args(flags)
            .arg(sample())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{env:?} {flags:?} should fail");
        assert!(err.contains(expect), "{env:?}: got {err}");
        // One line a user can read, not a backtrace (the environment sets RUST_BACKTRACE=1).
        assert!(err.contains("error: "), "{err}");
        assert!(
            !err.contains("stack backtrace") && !err.contains("Stack backtrace"),
            "{err}"
        );
    }
    // Neither an input nor an endpoint: nothing to do, and the error says both ways out.
    let (_, err) = text(&sedge().args(["worker", "edge"]).output().unwrap());
    assert!(
        err.contains("no input and no endpoint") && err.contains("--listen"),
        "{err}"
    );
    // A shell with KUBECONFIG set can still run the embedded API server.
    let o = sedge()
        .args(["cloud", "--embedded", "--print-default-config"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.yaml");
    std::fs::write(&cfg, "hem_nmae: IBT\n").unwrap();
    let (_, err) = text(
        &sedge()
            .args(["worker", "edge", "-c"])
            .arg(&cfg)
            .arg(sample())
            .output()
            .unwrap(),
    );
    assert!(err.contains("unknown field `hem_nmae`"), "{err}");
    // The edge agent's runtime: a name it does not know, and a CRI socket nobody serves.
    let (_, err) = text(
        &sedge()
            .args(["edge", "--runtime", "docker"])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("runtime \"docker\": expected \"process\", \"cri\" or \"hollow\""),
        "{err}"
    );
    let (_, err) = text(
        &sedge()
            .args([
                "up",
                "--edges",
                "1",
                "--cloud-nodes",
                "0",
                "--no-ai",
                "--listen",
                "127.0.0.1:0",
            ])
            .args([
                "--metaserver-port",
                "0",
                "--metrics-port",
                "0",
                "--mqtt-port",
                "0",
            ])
            .args([
                "--runtime",
                "cri",
                "--cri-socket",
                "/nonexistent/cri.sock",
                "--data-dir",
            ])
            .arg(dir.path().join("up"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("/nonexistent/cri.sock") && err.contains("is containerd running"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    // `sedge images build`: an image it does not make, a busybox that is not there; nothing written.
    let out = dir.path().join("images");
    let (_, err) = text(
        &sedge()
            .args(["images", "build", "--only", "nginx", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("--only \"nginx\": the images are worker, busybox and pause"),
        "{err}"
    );
    let (_, err) = text(
        &sedge()
            .args([
                "images",
                "build",
                "--only",
                "busybox",
                "--busybox",
                "/nonexistent/busybox",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("/nonexistent/busybox not found") && err.contains("busybox-static"),
        "{err}"
    );
    assert!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0);
}

#[test]
fn default_configs_print_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    for role in ["edge", "cloud"] {
        let o = sedge()
            .args(["worker", role, "--print-default-config"])
            .output()
            .unwrap();
        let (out, _) = text(&o);
        assert!(o.status.success());
        let path = dir.path().join(format!("{role}.yaml"));
        std::fs::write(&path, &out).unwrap();
        // A file written from the defaults loads: the run gets past the config and fails later,
        // on the missing input or model.
        let (args, expect): (&[&str], &str) = if role == "edge" {
            (&["/nonexistent-input"], "/nonexistent-input")
        } else {
            (
                &["--model", "/nonexistent.onnx"],
                "/nonexistent.onnx does not exist",
            )
        };
        let o = sedge()
            .args(["worker", role, "-c"])
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(err.contains(expect), "{role}: {err}");
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the cloud worker on a free port and returns it with the port it bound.
fn cloud_worker() -> (Killed, u16, mpsc::Receiver<String>) {
    let mut child = sedge()
        .args([
            "worker",
            "cloud",
            "--backend",
            "ort",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "models/fashion-mnist/cloud-cnn.onnx",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let child = Killed(child);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("cloud worker did not report its address");
        if let Some(rest) = line.split("bound=").nth(1) {
            let port = rest
                .split_whitespace()
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            return (child, port, rx);
        }
    }
}

#[test]
fn sedna_env_contract_end_to_end_and_clean_sigterm() {
    let (mut cloud, port, logs) = cloud_worker();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.jsonl");
    let o = sedge()
        .args(["worker", "edge", "--limit", "200", "-o"])
        .arg(&out)
        .arg(sample())
        .env("MODEL_URL", "file://models/fashion-mnist/edge-cnn.onnx")
        .env("HEM_NAME", "CrossEntropy")
        .env(
            "HEM_PARAMETERS",
            r#"[{"key":"threshold_cross_entropy","value":"0.7"}]"#,
        )
        .env("BIG_MODEL_IP", "127.0.0.1")
        .env("BIG_MODEL_PORT", port.to_string())
        .env("BIG_MODEL_NAME", "cloud-cnn")
        .env("BACKEND", "ort")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .expect("a summary line");
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    let hard = summary["hardExampleNumber"].as_u64().unwrap();
    assert!(hard > 0, "{summary}");
    assert_eq!(
        summary["cloud_answered"].as_u64().unwrap(),
        hard,
        "{summary}"
    );
    assert_eq!(summary["inferenceNumber"], 200);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 200);

    let pid = cloud.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = cloud.0.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    let rest: Vec<String> = logs.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("cloud worker stopped")),
        "{rest:?}"
    );
}

#[test]
fn bench_runs_a_job_and_reports_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo().join("benchmarks/examples/fashion-mnist");
    // Copy the example so that its workspace lands in the temp dir.
    for sub in ["testenv", "algorithms"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for f in std::fs::read_dir(example.join(sub)).unwrap() {
            let f = f.unwrap().path();
            let text = std::fs::read_to_string(&f)
                .unwrap()
                .replace("../../../../", &format!("{}/", repo().display()));
            std::fs::write(dir.path().join(sub).join(f.file_name().unwrap()), text).unwrap();
        }
    }
    let job = dir.path().join("job.yaml");
    std::fs::copy(example.join("benchmarkingjob-sample.yaml"), &job).unwrap();
    let o = sedge()
        .args([
            "bench",
            "--no-progress",
            "--jobs",
            "2",
            "--limit",
            "50",
            "-f",
        ])
        .arg(&job)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("rank  algorithm"), "{out}");
    assert_eq!(out.lines().count(), 2 + 14, "{out}");
    assert!(
        err.contains("selected_rank.csv") && err.contains("accuracy_vs_transfer.png"),
        "{err}"
    );
    assert!(
        dir.path()
            .join("workspace/fashion-mnist-sample/latest/rank/all_rank.csv")
            .exists()
    );

    // One algorithm's model file is missing: said before anything runs, the others' cases run,
    // and it is listed in failed.csv.
    let cloud_algo = dir.path().join("algorithms/single-task-cloud.yaml");
    let good = std::fs::read_to_string(&cloud_algo).unwrap();
    std::fs::write(
        &cloud_algo,
        good.replace("cloud-cnn.onnx", "no-such-model.onnx"),
    )
    .unwrap();
    let o = sedge()
        .args(["bench", "--no-progress", "--limit", "20", "-f"])
        .arg(&job)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(
        err.contains("algorithm \"single-task-cloud\" cannot run and is skipped")
            && err.contains("no-such-model.onnx"),
        "{err}"
    );
    assert!(
        out.contains("joint-inference") && !out.contains("single-task-cloud"),
        "{out}"
    );
    let failed = std::fs::read_to_string(
        dir.path()
            .join("workspace/fashion-mnist-sample/latest/rank/failed.csv"),
    )
    .unwrap();
    assert!(
        failed.contains("single-task-cloud") && failed.contains("no-such-model.onnx"),
        "{failed}"
    );
    std::fs::write(&cloud_algo, good).unwrap();

    std::fs::write(
        &job,
        std::fs::read_to_string(&job).unwrap().replace(
            "workspace: ./workspace",
            "workspace: ./workspace\n  jobs: 4",
        ),
    )
    .unwrap();
    let o = sedge().args(["bench", "-f"]).arg(&job).output().unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("job.yaml: benchmarkingjob: unknown field `jobs`"),
        "{err}"
    );
    let o = sedge()
        .args(["bench", "--case-timeout=-1", "-f"])
        .arg(&job)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--case-timeout -1 is not a positive number of seconds"),
        "{err}"
    );
}

#[test]
fn apiserver_refuses_bad_settings_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();

    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "listen: 127.0.0.1:0\nhistory_event: 5\n").unwrap();
    let o = sedge()
        .args(["apiserver", "--data-dir", data, "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("history_event"), "{err}");

    let o = sedge()
        .args([
            "apiserver",
            "--data-dir",
            data,
            "--listen",
            "not-an-address",
        ])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("cannot listen on not-an-address"), "{err}");

    let o = sedge()
        .args(["apiserver", "--data-dir", data, "--durability", "sometimes"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("sometimes") && err.contains("full"), "{err}");

    // The defaults a user would start from name the request limit.
    let (out, _) = text(
        &sedge()
            .args(["apiserver", "--print-default-config"])
            .output()
            .unwrap(),
    );
    assert!(out.contains("max_request_bytes: 3145728"), "{out}");
}

#[test]
fn every_daemon_reads_its_settings_from_the_environment() {
    // A bad value is an error naming the variable, for each daemon's prefix.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let cases: [(&[&str], &str, &str, &str); 6] = [
        (
            &["apiserver", "--data-dir", &data],
            "SEDGE_APISERVER_MAX_REQUEST_BYTES",
            "lots",
            "not a whole number",
        ),
        (
            &["cloud", "--embedded", "--data-dir", &data],
            "SEDGE_CLOUDCORE_LOG_TIMEOUT_MS",
            "soon",
            "not a whole number",
        ),
        (
            &["edge", "--data-dir", &data],
            "SEDGE_EDGECORE_TUNNEL_TRANSPORT",
            "quick",
            "unknown variant `quick`",
        ),
        (
            &["ai-controller"],
            "SEDGE_AI_CONTROLLER_LC_PORT",
            "99999",
            "expected u16",
        ),
        (
            &["worker", "edge", &sample()],
            "SEDGE_EDGE_WORKER_BATCH",
            "eight",
            "not a whole number",
        ),
        (
            &["worker", "cloud"],
            "SEDGE_CLOUD_WORKER_LISTEN",
            "nowhere",
            "invalid socket address",
        ),
    ];
    for (args, var, value, why) in cases {
        let o = sedge().args(args).env(var, value).output().unwrap();
        let (_, err) = text(&o);
        assert!(
            !o.status.success(),
            "{args:?} with {var}={value} should fail"
        );
        assert!(
            err.contains(&format!("environment variable {var}")) && err.contains(why),
            "{args:?} {var}={value}: {err}"
        );
    }
    // Each layer overrides the one below: file < environment < flag.
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, "limit: 9\n").unwrap();
    let samples = |env: Option<&str>, flag: Option<&str>| {
        let mut c = sedge();
        c.args(["worker", "edge", "-c"]).arg(&file).arg(sample());
        if let Some(v) = env {
            c.env("SEDGE_EDGE_WORKER_LIMIT", v);
        }
        if let Some(v) = flag {
            c.args(["--limit", v]);
        }
        let o = c.output().unwrap();
        let (_, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let line = err.lines().find(|l| l.starts_with("summary: ")).unwrap();
        let s: serde_json::Value = serde_json::from_str(&line["summary: ".len()..]).unwrap();
        s["samples"].as_u64().unwrap()
    };
    assert_eq!(samples(None, None), 9);
    assert_eq!(samples(Some("7"), None), 7);
    assert_eq!(samples(Some("7"), Some("5")), 5);
}
