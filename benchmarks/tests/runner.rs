//! The Ianvs-style runner end to end: the shipped example job on the committed sample, bad job
//! files, and a failing test case that must not lose the others.

use std::path::{Path, PathBuf};

use sedge_benchmarks::job::LoadedJob;
use sedge_benchmarks::runner::{self, RunOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example() -> PathBuf {
    repo().join("benchmarks/examples/fashion-mnist/benchmarkingjob-sample.yaml")
}

fn into_temp(mut job: LoadedJob, dir: &Path) -> LoadedJob {
    job.workspace = dir.join(&job.job.name);
    job
}

fn opts(jobs: usize, limit: Option<usize>) -> RunOptions {
    RunOptions {
        jobs,
        limit,
        progress: false,
        case_timeout: None,
        resume: None,
    }
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_job_runs_and_ranks_on_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let job = into_temp(sedge_benchmarks::load(&example()).unwrap(), dir.path());
    let report = runner::run(&job, &opts(2, None)).await.unwrap();
    assert_eq!(
        report.results.len(),
        14,
        "2 single-task + 2 rules x 6 thresholds"
    );
    assert_eq!(report.failures().count(), 0);

    let rank = report.run_dir.join("rank");
    let (header, rows) = read_csv(&rank.join("all_rank.csv"));
    assert_eq!(
        &header[..12],
        [
            "rank",
            "algorithm",
            "accuracy",
            "f1_score",
            "precision",
            "recall",
            "samples_transfer_ratio",
            "cloud_only_accuracy_gap",
            "latency_p50",
            "latency_p99",
            "throughput",
            "bytes_offloaded"
        ]
    );
    assert!(header.ends_with(&["time".to_string(), "url".into(), "run".into()]));
    assert!(header.contains(&"hard_example_mining-threshold".to_string()));
    assert_eq!(rows.len(), 14);
    let run_id = report.run_dir.file_name().unwrap().to_str().unwrap();
    assert!(
        rows.iter().all(|r| r.last().unwrap() == run_id),
        "every row names this run"
    );
    // Sorted by accuracy, descending, then transfer ratio ascending.
    let acc: Vec<f64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(acc.windows(2).all(|w| w[0] >= w[1]), "{acc:?}");
    let by_alg = |name: &str| rows.iter().find(|r| r[1] == name).unwrap().clone();
    let edge = by_alg("single-task-edge");
    let cloud = by_alg("single-task-cloud");
    assert_eq!(edge[6], "0.0000");
    assert!(cloud[2].parse::<f64>().unwrap() > edge[2].parse::<f64>().unwrap());
    // A joint case with a high threshold offloads more than one with a low threshold, and every
    // joint case is within reach of the cloud model.
    let joint: Vec<&Vec<String>> = rows.iter().filter(|r| r[1] == "joint-inference").collect();
    assert_eq!(joint.len(), 12);
    let ratio_at = |t: &str| {
        joint
            .iter()
            .find(|r| r.contains(&t.to_string()) && r.contains(&"MaxProbability".to_string()))
            .unwrap()[6]
            .parse::<f64>()
            .unwrap()
    };
    assert!(ratio_at("0.95") > ratio_at("0.5"));
    assert!(
        joint.iter().all(|r| !r[7].is_empty()),
        "joint rows have a cloud gap"
    );
    assert!(edge[7].is_empty(), "single-task rows have none");

    let (sel_header, sel_rows) = read_csv(&rank.join("selected_rank.csv"));
    assert_eq!(
        &sel_header[..4],
        ["rank", "algorithm", "accuracy", "f1_score"]
    );
    assert!(!sel_header.contains(&"precision".to_string()));
    assert_eq!(sel_rows.len(), 14);
    assert!(rank.join("accuracy_vs_transfer.svg").exists());
    assert!(
        std::fs::read(rank.join("accuracy_vs_transfer.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    assert!(report.table.contains("single-task-edge"));
    // Each case saved its own result and per-sample output.
    let case_dir = report.run_dir.join("joint-inference/joint-inference-01");
    assert!(case_dir.join("result.json").exists());
    assert_eq!(
        std::fs::read_to_string(case_dir.join("inference.jsonl"))
            .unwrap()
            .lines()
            .count(),
        500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_never_mix_and_concurrency_changes_no_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let job = into_temp(sedge_benchmarks::load(&example()).unwrap(), dir.path());
    let a = runner::run(&job, &opts(1, Some(100))).await.unwrap();
    let b = runner::run(&job, &opts(4, Some(100))).await.unwrap();
    assert_ne!(a.run_dir, b.run_dir);
    let (_, rows_b) = read_csv(&b.run_dir.join("rank/all_rank.csv"));
    assert_eq!(
        rows_b.len(),
        14,
        "the second run's file holds only its own rows"
    );
    let acc = |r: &runner::RunReport| {
        r.results
            .iter()
            .map(|c| c.metrics.as_ref().unwrap()[0])
            .collect::<Vec<_>>()
    };
    assert_eq!(acc(&a), acc(&b));
    assert_eq!(
        std::fs::read_link(job.workspace.join("latest")).unwrap(),
        PathBuf::from(b.run_dir.file_name().unwrap())
    );
}

/// Writes a small job in `dir` whose files can be edited per test.
fn write_job(dir: &Path, job_extra: &str, testenv_extra: &str, algorithm: &str) -> PathBuf {
    let models = repo().join("models/fashion-mnist");
    let sample = repo().join("datasets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
    std::fs::write(
        dir.join("job.yaml"),
        format!(
            "benchmarkingjob:\n  name: t\n  workspace: ./ws\n  testenv: ./testenv.yaml\n  test_object:\n    type: algorithms\n    algorithms:\n      - {{name: a, url: ./algo.yaml}}\n      - {{name: edge, url: ./edge.yaml}}\n  rank:\n    sort_by: [{{accuracy: descend}}]\n    selected_dataitem: {{paradigms: [all], modules: [all], hyperparameters: [all], metrics: [all]}}\n{job_extra}"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("testenv.yaml"), format!("testenv:\n  dataset:\n    test_index: {}\n  metrics:\n    - name: accuracy\n    - name: samples_transfer_ratio\n{testenv_extra}", sample.display())).unwrap();
    std::fs::write(
        dir.join("algo.yaml"),
        algorithm.replace("MODELS", &models.display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.join("edge.yaml"), format!("algorithm:\n  paradigm_type: singletasklearning\n  modules:\n    - {{type: basemodel, name: edge, url: {}/edge-cnn.onnx}}\n", models.display())).unwrap();
    dir.join("job.yaml")
}

const JOINT: &str = "algorithm:\n  paradigm_type: jointinference\n  modules:\n    - {type: edgemodel, name: e, url: MODELS/edge-cnn.onnx}\n    - {type: cloudmodel, name: c, url: MODELS/cloud-cnn.onnx}\n    - {type: hard_example_mining, name: MaxProbability, hyperparameters: [{threshold: {values: [0.8]}}]}\n";

#[test]
fn bad_job_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: Vec<(String, String, String, &str, &str)> = vec![
        (
            "  worksapce: x\n".into(),
            String::new(),
            JOINT.into(),
            "job.yaml",
            "unknown field `worksapce`",
        ),
        (
            String::new(),
            "  incremental_round: 3\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "unknown field `incremental_round`",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("paradigm_type", "paradigm"),
            "algo.yaml",
            "unknown field `paradigm`",
        ),
        (
            String::new(),
            "    - name: mAP\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "unknown metric \"mAP\"",
        ),
        (
            String::new(),
            "    - {name: f1, url: ./f1.py}\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "Python metric files are not supported",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("jointinference", "lifelonglearning"),
            "algo.yaml",
            "paradigm_type \"lifelonglearning\" is not supported; supported: singletasklearning, jointinference, incrementallearning",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("values: [0.8]", "values: [0.8, 1.5]"),
            "algo.yaml",
            "threshold = \"1.5\" is not a number between 0 and 1",
        ),
        (
            String::new(),
            "  link:\n    - {name: slow, bandwidth_mbit: -3}\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "link[0]: link.bandwidth_mbit is -3",
        ),
        (
            String::new(),
            "  link: [dialup]\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "link[0]: unknown link profile \"dialup\"",
        ),
        (
            String::new(),
            "  link:\n    - {name: x, bandwith_mbit: 3}\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "unknown field `bandwith_mbit`",
        ),
        (
            String::new(),
            "  link: [4g-uplink, 4g-uplink]\n".into(),
            JOINT.into(),
            "testenv.yaml",
            "link[1]: the name \"4g-uplink\" is used twice",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace(
                "name: c, url: MODELS/cloud-cnn.onnx}",
                "name: c, url: MODELS/cloud-cnn.onnx, hyperparameters: [{protocol: {values: [pigeon]}}]}",
            ),
            "algo.yaml",
            "unknown offload protocol \"pigeon\"",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("name: MaxProbability", "name: Entropy"),
            "algo.yaml",
            "unknown hard-example mining rule \"Entropy\"",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("type: cloudmodel", "type: basemodel"),
            "algo.yaml",
            "module type \"basemodel\" does not belong to jointinference",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace(
                "    - {type: cloudmodel, name: c, url: MODELS/cloud-cnn.onnx}\n",
                "",
            ),
            "algo.yaml",
            "jointinference needs a cloudmodel module",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace(
                "name: e, url",
                "name: e, hyperparameters: [{backend: {values: [cuda]}}], url",
            ),
            "algo.yaml",
            "unknown backend \"cuda\"",
        ),
        (
            String::new(),
            String::new(),
            JOINT.replace("values: [0.8]", "values: 0.8"),
            "algo.yaml",
            "invalid type",
        ),
        (
            "    save_mode: everything\n".into(),
            String::new(),
            JOINT.into(),
            "job.yaml",
            "rank.save_mode \"everything\" is not supported",
        ),
        (
            String::new(),
            String::new(),
            "algorithm: [1, 2]\n".into(),
            "algo.yaml",
            "invalid type",
        ),
        (
            String::new(),
            String::new(),
            "algorithm:\n  paradigm_type: jointinference\nextra: 1\n".into(),
            "algo.yaml",
            "unknown top-level key extra",
        ),
    ];
    for (job_extra, testenv_extra, algo, file, expect) in cases {
        let path = write_job(d, &job_extra, &testenv_extra, &algo);
        let err = sedge_benchmarks::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(file) && err.contains(expect),
            "want {expect:?} in {file}, got {err}"
        );
    }
    let err = sedge_benchmarks::load(&d.join("missing.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.yaml"), "{err}");
    // A missing model file breaks only its algorithm: named, and the others load.
    let path = write_job(d, "", "", &JOINT.replace("edge-cnn.onnx", "nope.onnx"));
    let loaded = sedge_benchmarks::load(&path).unwrap();
    assert_eq!(loaded.broken.len(), 1, "{:?}", loaded.broken);
    let (name, why) = &loaded.broken[0];
    assert!(
        name == "a" && why.contains("algo.yaml") && why.contains("nope.onnx does not exist"),
        "{why}"
    );
    assert!(loaded.algorithms.iter().all(|(n, _, _)| n != "a"));
    assert!(!loaded.algorithms.is_empty());
}

#[test]
fn paths_resolve_relative_to_each_file_whatever_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_job(dir.path(), "", "", JOINT);
    let job = sedge_benchmarks::load(&path).unwrap();
    assert_eq!(job.workspace, dir.path().join("ws/t"));
    assert!(
        job.algorithms
            .iter()
            .all(|(_, p, _)| p.starts_with(dir.path()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_case_is_reported_and_the_others_are_saved() {
    let dir = tempfile::tempdir().unwrap();
    // A model file that exists but is not a model: the case fails when it runs, not at load.
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"garbage").unwrap();
    std::fs::copy(
        repo().join("models/fashion-mnist/edge-cnn.json"),
        dir.path().join("broken.json"),
    )
    .unwrap();
    let algo = JOINT
        .replace("values: [0.8]", "values: [0.7, 0.9]")
        .replace("MODELS/cloud-cnn.onnx", &broken.display().to_string());
    let path = write_job(dir.path(), "", "", &algo);
    let job = sedge_benchmarks::load(&path).unwrap();
    let report = runner::run(&job, &opts(2, Some(50))).await.unwrap();
    assert_eq!(report.results.len(), 3);
    assert_eq!(report.failures().count(), 2);
    let rank = report.run_dir.join("rank");
    let (_, ok) = read_csv(&rank.join("all_rank.csv"));
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0][1], "edge");
    let (header, failed) = read_csv(&rank.join("failed.csv"));
    assert_eq!(header, ["case", "algorithm", "error", "time", "url"]);
    assert_eq!(failed.len(), 2);
    assert!(failed[0][2].contains("broken.onnx"), "{:?}", failed[0]);
    for case in &report.results {
        let saved = std::fs::read_to_string(case.dir.join("result.json")).unwrap();
        assert!(saved.contains(&case.case.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_model_url_is_the_base_model_when_the_module_names_none() {
    let dir = tempfile::tempdir().unwrap();
    let algo = "algorithm:\n  paradigm_type: singletasklearning\n  initial_model_url: MODELS/cloud-cnn.onnx\n  modules:\n    - {type: basemodel, name: from-initial}\n";
    let job = sedge_benchmarks::load(&write_job(dir.path(), "", "", algo)).unwrap();
    let report = runner::run(&job, &opts(1, Some(100))).await.unwrap();
    assert_eq!(report.failures().count(), 0);
    let acc = |name: &str| {
        report
            .results
            .iter()
            .find(|r| r.case.algorithm == name)
            .unwrap()
            .metrics
            .as_ref()
            .unwrap()[0]
            .unwrap()
    };
    // The cloud model, not the edge model, ran under algorithm "a".
    assert_ne!(acc("a"), acc("edge"));
    assert_eq!(
        std::fs::read_to_string(report.run_dir.join("a/a-01/inference.jsonl"))
            .unwrap()
            .lines()
            .count(),
        100
    );
}

/// Testenv's links: each joint case runs once per link, with Sedna's JSON and our raw gRPC side
/// by side; the leaderboard has both as columns, JSON costs more bytes, and the slow link's
/// delay is in the p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joint_cases_run_once_per_link_and_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let algo = JOINT.replace(
        "name: c, url: MODELS/cloud-cnn.onnx}",
        "name: c, url: MODELS/cloud-cnn.onnx, hyperparameters: [{protocol: {values: [grpc, sedna-json]}}]}",
    );
    let path = write_job(
        dir.path(),
        "",
        "    - name: bytes_offloaded\n    - name: latency_p99\n  link:\n    - loopback\n    - {name: slow, bandwidth_mbit: 20, delay_ms: 10}\n",
        &algo,
    );
    let job = sedge_benchmarks::load(&path).unwrap();
    let report = runner::run(&job, &opts(2, Some(60))).await.unwrap();
    assert_eq!(report.failures().count(), 0, "{:?}", report.results);
    assert_eq!(
        report.results.len(),
        5,
        "2 protocols x 2 links + the edge model"
    );
    let (header, rows) = read_csv(&report.run_dir.join("rank/all_rank.csv"));
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name} in {header:?}"))
    };
    let (link, protocol, bytes, p99) = (
        col("cloudmodel-link"),
        col("cloudmodel-protocol"),
        col("bytes_offloaded"),
        col("latency_p99"),
    );
    let row = |l: &str, p: &str| {
        rows.iter()
            .find(|r| r[link] == l && r[protocol] == p)
            .unwrap_or_else(|| panic!("no {l}/{p} row in {rows:?}"))
    };
    let num = |r: &Vec<String>, i: usize| r[i].parse::<f64>().unwrap();
    for l in ["loopback", "slow"] {
        let (grpc, json) = (row(l, "grpc"), row(l, "sedna-json"));
        assert!(num(grpc, bytes) > 0.0);
        assert!(
            num(json, bytes) > 2.0 * num(grpc, bytes),
            "{l}: JSON {} bytes, gRPC {}",
            json[bytes],
            grpc[bytes]
        );
    }
    // Two crossings of 10 ms each for every offloaded sample, and more than 1% are offloaded.
    assert!(num(row("slow", "grpc"), p99) >= 20.0, "{rows:?}");
}

/// A case past its time limit fails with that reason; `resume` then finishes the run in the same
/// directory, reading back what succeeded and running what failed, is missing or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_and_interrupted_runs_are_finished_by_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_job(dir.path(), "", "", JOINT);
    let job = sedge_benchmarks::load(&path).unwrap();
    let first = runner::run(
        &job,
        &RunOptions {
            case_timeout: Some(std::time::Duration::from_millis(1)),
            ..opts(1, Some(30))
        },
    )
    .await
    .unwrap();
    assert_eq!(first.results.len(), 2);
    for r in &first.results {
        let e = r.metrics.as_ref().unwrap_err();
        assert!(e.contains("timed out after 1ms"), "{e}");
    }
    let (_, failed) = read_csv(&first.run_dir.join("rank/failed.csv"));
    assert_eq!(failed.len(), 2);

    // Resume without the limit: failed cases run again, in the same run directory.
    let resume = |run_dir: &Path| RunOptions {
        resume: Some(run_dir.to_path_buf()),
        ..opts(1, Some(30))
    };
    let second = runner::run(&job, &resume(&first.run_dir)).await.unwrap();
    assert_eq!(second.run_dir, first.run_dir);
    assert_eq!(second.resumed, 0, "failures are not results");
    assert_eq!(second.failures().count(), 0);
    assert_eq!(
        second.samples, 60,
        "the progress counts each case's 30 samples"
    );
    let accuracy: Vec<f64> = second
        .results
        .iter()
        .map(|r| r.metrics.as_ref().unwrap()[0].unwrap())
        .collect();

    // An interrupted run: one case's result is missing. Only that case runs.
    let lost = &second.results[0];
    std::fs::remove_file(lost.dir.join("result.json")).unwrap();
    let third = runner::run(&job, &resume(&first.run_dir)).await.unwrap();
    assert_eq!(third.resumed, 1);
    assert_eq!(third.failures().count(), 0);
    assert_eq!(third.samples, 30, "only the lost case ran");
    let again: Vec<f64> = third
        .results
        .iter()
        .map(|r| r.metrics.as_ref().unwrap()[0].unwrap())
        .collect();
    assert_eq!(again, accuracy, "the same cases, the same numbers");
    assert!(lost.dir.join("result.json").exists());
    let (_, rows) = read_csv(&first.run_dir.join("rank/all_rank.csv"));
    assert_eq!(
        rows.len(),
        2,
        "the leaderboard covers read-back and new cases"
    );

    // The job changed since: a case whose modules differ is not read back.
    let changed = write_job(
        dir.path(),
        "",
        "",
        &JOINT.replace("values: [0.8]", "values: [0.9]"),
    );
    let job = sedge_benchmarks::load(&changed).unwrap();
    let fourth = runner::run(&job, &resume(&first.run_dir)).await.unwrap();
    assert_eq!(
        fourth.resumed, 1,
        "only the unchanged edge case is read back"
    );

    // Not a run directory.
    let e = runner::run(&job, &resume(&dir.path().join("nope")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a run directory"), "{e}");
}

/// Writes an incremental-learning job: the committed sample as both the stream and the test set,
/// seen through the shifted camera, `testenv_extra` appended to the testenv.
fn write_incremental_job(dir: &Path, testenv_extra: &str, algorithms: &[(&str, &str)]) -> PathBuf {
    let models = repo().join("models/fashion-mnist");
    let sample = repo().join("datasets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
    let list: String = algorithms
        .iter()
        .map(|(name, _)| format!("      - {{name: {name}, url: ./{name}.yaml}}\n"))
        .collect();
    std::fs::write(
        dir.join("job.yaml"),
        format!(
            "benchmarkingjob:\n  name: il\n  workspace: ./ws\n  testenv: ./testenv.yaml\n  test_object:\n    type: algorithms\n    algorithms:\n{list}  rank:\n    sort_by: [{{accuracy: descend}}]\n    selected_dataitem: {{paradigms: [all], modules: [all], hyperparameters: [all], metrics: [all]}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("testenv.yaml"),
        format!(
            "testenv:\n  dataset:\n    train_index: {s}\n    test_index: {s}\n    shift: {{contrast: 0.5, brightness: 25, noise_sigma: 10, seed: 7}}\n  metrics:\n    - name: accuracy\n    - name: samples_transfer_ratio\n{testenv_extra}",
            s = sample.display()
        ),
    )
    .unwrap();
    for (name, body) in algorithms {
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            body.replace("MODELS", &models.display().to_string()),
        )
        .unwrap();
    }
    dir.join("job.yaml")
}

const INCREMENTAL: &str = "algorithm:\n  paradigm_type: incrementallearning\n  incremental_learning_data_setting: {train_ratio: 0.8}\n  modules:\n    - {type: basemodel, name: edge, url: MODELS/edge-cnn.onnx, hyperparameters: [{epochs: {values: [1]}}]}\n    - {type: cloudmodel, name: cloud, url: MODELS/cloud-cnn.onnx}\n    - {type: hard_example_mining, name: MaxProbability, hyperparameters: [{threshold: {values: [0.8]}}]}\n";

/// Two rounds on the committed sample: mine with the deployed model, label with the cloud model
/// (or the ground truth without one), train with the train worker's code, evaluate, deploy; one
/// leaderboard row per round and a plot of accuracy per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_learning_runs_round_by_round() {
    let dir = tempfile::tempdir().unwrap();
    let truth = INCREMENTAL.replace(
        "    - {type: cloudmodel, name: cloud, url: MODELS/cloud-cnn.onnx}\n",
        "",
    );
    let path = write_incremental_job(
        dir.path(),
        "  incremental_rounds: 2\n  model_eval:\n    model_metric: {name: accuracy}\n    threshold: 0.0\n    operator: \">\"\n",
        &[("pseudo", INCREMENTAL), ("truth", &truth)],
    );
    let job = sedge_benchmarks::load(&path).unwrap();
    let report = runner::run(&job, &opts(1, Some(200))).await.unwrap();
    assert_eq!(report.failures().count(), 0, "{:?}", report.results);
    assert_eq!(report.results.len(), 6, "rounds 0, 1, 2 of two algorithms");
    let (header, rows) = read_csv(&report.run_dir.join("rank/all_rank.csv"));
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name} in {header:?}"))
    };
    let (alg, round, deployed, acc, ratio) = (
        col("algorithm"),
        col("basemodel-round"),
        col("basemodel-deployed"),
        col("accuracy"),
        col("samples_transfer_ratio"),
    );
    for a in ["pseudo", "truth"] {
        let mut mine: Vec<&Vec<String>> = rows.iter().filter(|r| r[alg] == a).collect();
        mine.sort_by_key(|r| r[round].parse::<u32>().unwrap());
        let rounds: Vec<&str> = mine.iter().map(|r| r[round].as_str()).collect();
        assert_eq!(rounds, ["0", "1", "2"], "{a}");
        for w in mine.windows(2) {
            // A round that keeps the deployed model scores exactly as the round before it.
            if w[1][deployed] == "no" {
                assert_eq!(w[1][acc], w[0][acc], "{a}: {w:?}");
            }
        }
        // The shifted camera makes the initial model unsure: rounds mine hard examples.
        assert!(
            mine[1][ratio].parse::<f64>().unwrap() > 0.0,
            "{a}: {mine:?}"
        );
    }
    let case_dir = report
        .results
        .iter()
        .find(|r| r.case.algorithm == "pseudo")
        .unwrap();
    let deployed_any = rows.iter().any(|r| r[deployed] == "yes" && r[round] != "0");
    if deployed_any {
        assert!(
            std::fs::read_dir(&case_dir.dir).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("round-")),
            "trained models are kept in the case's directory"
        );
    }
    assert!(
        report
            .files
            .iter()
            .any(|f| f.ends_with("accuracy_per_round.png")),
        "{:?}",
        report.files
    );
    assert_eq!(
        report.samples,
        2 * 3 * 200,
        "three test passes of 200 per case"
    );

    // Bad settings are refused before anything runs, naming the key.
    for (extra, want) in [
        (
            "  incremental_rounds: 1\n",
            "incremental_rounds is 1; it must be at least 2",
        ),
        (
            "  incremental_rounds: 2\n  model_eval: {model_metric: {name: accuracy}, threshold: 0, operator: \"!=\"}\n",
            "model_eval.operator \"!=\"",
        ),
        (
            "  incremental_rounds: 2\n  model_eval: {model_metric: {name: mAP}, threshold: 0, operator: \">\"}\n",
            "model_eval.model_metric.name \"mAP\"",
        ),
        ("", "incrementallearning needs incremental_rounds"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let p = write_incremental_job(d.path(), extra, &[("pseudo", INCREMENTAL)]);
        let e = sedge_benchmarks::load(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let d = tempfile::tempdir().unwrap();
    let p = write_incremental_job(
        d.path(),
        "  incremental_rounds: 2\n",
        &[(
            "pseudo",
            &INCREMENTAL.replace("train_ratio: 0.8", "train_ratio: 1.5"),
        )],
    );
    let e = sedge_benchmarks::load(&p).unwrap_err().to_string();
    assert!(e.contains("train_ratio is 1.5"), "{e}");
}
