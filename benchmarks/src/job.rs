//! Ianvs's three YAML layers: `benchmarkingjob` -> `testenv` + `algorithm` files, with the same keys.
//!
//! Unlike Ianvs, an unknown key is an error naming the key and the file (Ianvs drops it silently),
//! and every path is resolved relative to the YAML file that holds it (Ianvs resolves them from the
//! working directory, which is why its examples carry developer paths: issues #515, #706, #723).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::BenchError;

/// Sort direction of one `rank.sort_by` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Smaller is better.
    Ascend,
    /// Larger is better.
    Descend,
}

/// `benchmarkingjob:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkingJob {
    /// Job name; results go to `<workspace>/<name>/<run id>/`.
    pub name: String,
    /// Output root, relative to the job file (default `./workspace`).
    #[serde(default = "default_workspace")]
    pub workspace: String,
    /// The testenv file.
    pub testenv: String,
    /// What to benchmark.
    pub test_object: TestObject,
    /// How to rank and what to show.
    pub rank: Rank,
    /// Ianvs's documentation puts the mining order here (Ianvs itself ignores it here); accepted,
    /// and overridden by the testenv's.
    #[serde(default)]
    pub hard_example_mining_mode: Option<String>,
}

fn default_workspace() -> String {
    "./workspace".into()
}

/// `test_object:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestObject {
    /// Must be `algorithms`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The algorithms, each a name and an algorithm file.
    pub algorithms: Vec<AlgorithmRef>,
}

/// One `test_object.algorithms[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmRef {
    /// Label in the leaderboard.
    pub name: String,
    /// The algorithm file.
    pub url: String,
}

/// `rank:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rank {
    /// Single-key maps `{metric: ascend|descend}`, in priority order.
    pub sort_by: Vec<BTreeMap<String, SortOrder>>,
    /// Ianvs's `visualization` (`mode: selected_only`, `method: print_table`).
    #[serde(default)]
    pub visualization: Option<Visualization>,
    /// Columns and rows of `selected_rank.csv`.
    pub selected_dataitem: SelectedDataitem,
    /// `selected_and_all` (default) or `selected_only`.
    #[serde(default)]
    pub save_mode: Option<String>,
}

/// `rank.visualization:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Visualization {
    /// `selected_only`.
    #[serde(default)]
    pub mode: Option<String>,
    /// `print_table`.
    #[serde(default)]
    pub method: Option<String>,
}

/// `rank.selected_dataitem:`; each list is names or `["all"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectedDataitem {
    /// Paradigms whose rows are kept.
    pub paradigms: Vec<String>,
    /// Module types shown.
    pub modules: Vec<String>,
    /// Hyperparameters shown.
    #[serde(default = "all")]
    pub hyperparameters: Vec<String>,
    /// Metrics shown.
    pub metrics: Vec<String>,
}

fn all() -> Vec<String> {
    vec!["all".into()]
}

/// `testenv:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestEnv {
    /// The data.
    pub dataset: DatasetSpec,
    /// Metrics to compute, by name.
    pub metrics: Vec<MetricRef>,
    /// `inference-then-mining` or `mining-then-inference` for joint inference.
    #[serde(default)]
    pub hard_example_mining_mode: Option<String>,
    /// Sedge's own key: links between the edge and the cloud worker. Each joint-inference test
    /// case runs once per link, with the link's name as the `link` hyperparameter of its
    /// `cloudmodel` (so the leaderboard has a `link` column). An entry is a profile name
    /// (`loopback`, `5g-mec`, `4g-uplink`, `iot-uplink`) or a `name` with `bandwidth_mbit`,
    /// `delay_ms`, `jitter_ms` and `loss`. None means loopback.
    #[serde(default)]
    pub link: Vec<LinkEntry>,
    /// Rounds of incremental learning (Ianvs: an int, at least 2).
    #[serde(default)]
    pub incremental_rounds: Option<usize>,
    /// When incremental learning deploys a retrained model (Ianvs's `model_eval`).
    #[serde(default)]
    pub model_eval: Option<ModelEval>,
}

/// `testenv.model_eval`: deploy the new model when `operator(new - old, threshold)` holds for
/// the metric on the round's evaluation samples.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEval {
    /// The metric.
    pub model_metric: ModelMetric,
    /// Compared with the metric's change.
    pub threshold: f64,
    /// `>`, `<`, `=`, `>=` or `<=`.
    pub operator: String,
}

/// `testenv.model_eval.model_metric`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetric {
    /// A built-in metric: `accuracy`, `f1_score`, `precision` or `recall`.
    pub name: String,
    /// Ianvs's Python metric file: refused (built-ins only).
    #[serde(default)]
    pub url: Option<String>,
    /// Ianvs's lifelong-learning sub-mode: accepted and ignored.
    #[serde(default)]
    pub mode: Option<String>,
}

impl ModelEval {
    /// Whether a change of `delta` in the metric deploys the new model.
    pub fn holds(&self, delta: f64) -> bool {
        let t = self.threshold;
        match self.operator.as_str() {
            ">" => delta > t,
            "<" => delta < t,
            ">=" => delta >= t,
            "<=" => delta <= t,
            _ => (delta - t).abs() < 1e-12,
        }
    }

    fn check(&self) -> Result<(), String> {
        if !matches!(self.operator.as_str(), ">" | "<" | "=" | ">=" | "<=") {
            return Err(format!(
                "model_eval.operator {:?} is not one of >, <, =, >=, <=",
                self.operator
            ));
        }
        if self.model_metric.url.is_some() {
            return Err("model_eval.model_metric.url: Python metric files are not supported; use accuracy, f1_score, precision or recall".into());
        }
        if !matches!(
            self.model_metric.name.as_str(),
            "accuracy" | "f1_score" | "precision" | "recall"
        ) {
            return Err(format!(
                "model_eval.model_metric.name {:?} is not one of accuracy, f1_score, precision, recall",
                self.model_metric.name
            ));
        }
        if !self.threshold.is_finite() {
            return Err("model_eval.threshold is not a number".into());
        }
        Ok(())
    }
}

/// Sedge's own `testenv.dataset.shift`: the test and training images as a different camera sees
/// them ([`sedge_datasets::shift::CameraShift`]).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftSpec {
    /// Multiplies every pixel.
    pub contrast: f32,
    /// Added to every pixel, grey levels.
    pub brightness: f32,
    /// Per-pixel Gaussian noise, grey levels.
    pub noise_sigma: f32,
    /// Seed of the noise.
    #[serde(default)]
    pub seed: u64,
}

impl ShiftSpec {
    /// The shift.
    pub fn camera(&self) -> sedge_datasets::shift::CameraShift {
        sedge_datasets::shift::CameraShift {
            contrast: self.contrast,
            brightness: self.brightness,
            noise_sigma: self.noise_sigma,
            seed: self.seed,
        }
    }
}

/// One `testenv.link[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub enum LinkEntry {
    /// A named profile.
    Named(String),
    /// A link given value by value.
    Custom(crate::link::LinkProfile),
}

impl TryFrom<serde_yaml::Value> for LinkEntry {
    type Error = String;
    // By hand rather than `untagged`, so that a misspelt key is named in the error.
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        match v {
            serde_yaml::Value::String(s) => Ok(LinkEntry::Named(s)),
            m @ serde_yaml::Value::Mapping(_) => serde_yaml::from_value(m)
                .map(LinkEntry::Custom)
                .map_err(|e| format!("link: {e}")),
            other => Err(format!(
                "link entries are profile names or maps of name, bandwidth_mbit, delay_ms, jitter_ms, loss; got {other:?}"
            )),
        }
    }
}

impl LinkEntry {
    /// The profile, checked; errors name the entry's key.
    pub fn profile(&self, i: usize) -> Result<crate::link::LinkProfile, String> {
        let p = match self {
            LinkEntry::Named(n) => crate::link::LinkProfile::named(n),
            LinkEntry::Custom(p) if p.name.is_empty() => Err(
                "a link given by its values needs a name (for the leaderboard's link column)"
                    .into(),
            ),
            LinkEntry::Custom(p) => p.check().map(|()| p.clone()),
        };
        p.map_err(|e| format!("link[{i}]: {e}"))
    }
}

/// `testenv.dataset:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Training index; the built-in paradigms evaluate given models and do not train, so it is
    /// read only by paradigms that train.
    #[serde(default)]
    pub train_index: Option<String>,
    /// Test samples: a Sedna/Ianvs `txt` index, a `csv` index, or a Fashion-MNIST IDX file.
    pub test_index: String,
    /// Sedge's own: see the images through another camera (incremental learning's stream).
    #[serde(default)]
    pub shift: Option<ShiftSpec>,
    /// Sedge's own: read only the first N samples of `train_index` (incremental learning's
    /// stream).
    #[serde(default)]
    pub train_limit: Option<usize>,
}

/// `testenv.metrics[]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRef {
    /// Built-in metric name.
    pub name: String,
    /// Ianvs's Python metric file; not supported (built-in metrics only).
    #[serde(default)]
    pub url: Option<String>,
}

/// `algorithm:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Algorithm {
    /// `singletasklearning` or `jointinference`.
    pub paradigm_type: String,
    /// Ianvs's starting model; used as the `basemodel` url when that module has none.
    #[serde(default)]
    pub initial_model_url: Option<String>,
    /// Incremental learning: how each round's slice is split between inference (mining) and
    /// evaluation.
    #[serde(default)]
    pub incremental_learning_data_setting: Option<IncrementalDataSetting>,
    /// The modules.
    pub modules: Vec<ModuleSpec>,
}

/// `algorithm.incremental_learning_data_setting`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalDataSetting {
    /// Share of each round's slice mined (the rest evaluates); default 0.8.
    #[serde(default = "default_train_ratio")]
    pub train_ratio: f64,
    /// Only `default` (in order).
    #[serde(default)]
    pub splitting_method: Option<String>,
}

fn default_train_ratio() -> f64 {
    0.8
}

/// One `algorithm.modules[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    /// `basemodel`, `edgemodel`, `cloudmodel` or `hard_example_mining`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A label for models; the Sedna rule name for hard-example mining.
    pub name: String,
    /// The model file (models only).
    #[serde(default)]
    pub url: Option<String>,
    /// `- <name>: {values: [...]}` entries, expanded as a Cartesian product.
    #[serde(default)]
    pub hyperparameters: Vec<BTreeMap<String, HyperValues>>,
}

/// `{values: [...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperValues {
    /// The values to sweep.
    pub values: Vec<serde_yaml::Value>,
}

/// A job with its files read and every path made absolute.
#[derive(Debug, Clone)]
pub struct LoadedJob {
    /// The job file.
    pub path: PathBuf,
    /// The job.
    pub job: BenchmarkingJob,
    /// `<workspace>/<name>`, absolute.
    pub workspace: PathBuf,
    /// The testenv.
    pub testenv: TestEnv,
    /// The test samples, absolute.
    pub test_data: PathBuf,
    /// The training samples (`dataset.train_index`), absolute, where given.
    pub train_data: Option<PathBuf>,
    /// Each algorithm's name, file and content (module urls made absolute).
    pub algorithms: Vec<(String, PathBuf, Algorithm)>,
    /// Algorithms that cannot run (a model file they name is missing), with the reason: the
    /// others run, and these are listed in `failed.csv`.
    pub broken: Vec<(String, String)>,
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path, top: &str) -> Result<T, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| BenchError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let serde_yaml::Value::Mapping(map) = value else {
        return Err(BenchError::Parse {
            path: path.to_path_buf(),
            message: format!("expected a mapping with the single key `{top}`"),
        });
    };
    if let Some(other) = map.keys().find(|k| k.as_str() != Some(top)) {
        return Err(BenchError::Parse {
            path: path.to_path_buf(),
            message: format!(
                "unknown top-level key {}; this file holds `{top}:`",
                serde_yaml::to_string(other).unwrap_or_default().trim()
            ),
        });
    }
    let inner = map.get(top).cloned().ok_or_else(|| BenchError::Parse {
        path: path.to_path_buf(),
        message: format!("missing top-level key `{top}`"),
    })?;
    serde_yaml::from_value(inner).map_err(|e| BenchError::Parse {
        path: path.to_path_buf(),
        message: format!("{top}: {e}"),
    })
}

/// Resolves `p` against the directory of `file` (absolute paths and `~/` stay as they are, `~`
/// expanded).
pub fn resolve(file: &Path, p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    let path = Path::new(p);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(path)
    };
    // Drop `.` components so that paths in the leaderboard read cleanly.
    joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn must_exist(path: PathBuf, what: &str, file: &Path) -> Result<PathBuf, BenchError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(BenchError::Invalid {
            path: file.to_path_buf(),
            message: format!("{what} {} does not exist", path.display()),
        })
    }
}

/// Reads a job and everything it references (files, keys, model paths); [`crate::load`] also
/// checks each algorithm against its paradigm.
pub fn load(path: &Path) -> Result<LoadedJob, BenchError> {
    let job: BenchmarkingJob = read_yaml(path, "benchmarkingjob")?;
    let invalid = |message: String| BenchError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    if job.test_object.kind != "algorithms" {
        return Err(invalid(format!(
            "test_object.type is {:?}; the only type is \"algorithms\"",
            job.test_object.kind
        )));
    }
    if job.test_object.algorithms.is_empty() {
        return Err(invalid("test_object.algorithms is empty".into()));
    }
    if let Some(mode) = &job.rank.save_mode
        && !matches!(mode.as_str(), "selected_and_all" | "selected_only")
    {
        return Err(invalid(format!(
            "rank.save_mode {mode:?} is not supported; use selected_and_all or selected_only"
        )));
    }
    if let Some(method) = job
        .rank
        .visualization
        .as_ref()
        .and_then(|v| v.method.as_deref())
        && method != "print_table"
    {
        return Err(invalid(format!(
            "rank.visualization.method {method:?} is not supported; use print_table"
        )));
    }
    for entry in &job.rank.sort_by {
        if entry.len() != 1 {
            return Err(invalid(format!(
                "each rank.sort_by entry is one `metric: ascend|descend` pair, got {} keys",
                entry.len()
            )));
        }
    }
    let testenv_path = must_exist(resolve(path, &job.testenv), "testenv file", path)?;
    let testenv: TestEnv = read_yaml(&testenv_path, "testenv")?;
    if testenv.metrics.is_empty() {
        return Err(BenchError::Invalid {
            path: testenv_path,
            message: "metrics is empty; list at least one".into(),
        });
    }
    for m in &testenv.metrics {
        if m.url.is_some() {
            return Err(BenchError::Invalid {
                path: testenv_path.clone(),
                message: format!(
                    "metric {:?} has a url: Python metric files are not supported; use a built-in metric ({})",
                    m.name,
                    crate::metrics::NAMES.join(", ")
                ),
            });
        }
        crate::metrics::Metric::parse(&m.name).map_err(|message| BenchError::Invalid {
            path: testenv_path.clone(),
            message,
        })?;
    }
    let mut link_names = std::collections::BTreeSet::new();
    for (i, entry) in testenv.link.iter().enumerate() {
        let profile = entry.profile(i).map_err(|message| BenchError::Invalid {
            path: testenv_path.clone(),
            message,
        })?;
        if !link_names.insert(profile.name.clone()) {
            return Err(BenchError::Invalid {
                path: testenv_path.clone(),
                message: format!("link[{i}]: the name {:?} is used twice", profile.name),
            });
        }
    }
    if let Some(r) = testenv.incremental_rounds
        && r < 2
    {
        return Err(BenchError::Invalid {
            path: testenv_path.clone(),
            message: format!("incremental_rounds is {r}; it must be at least 2"),
        });
    }
    if let Some(m) = &testenv.model_eval {
        m.check().map_err(|message| BenchError::Invalid {
            path: testenv_path.clone(),
            message,
        })?;
    }
    let train_data = match &testenv.dataset.train_index {
        Some(t) => Some(must_exist(
            resolve(&testenv_path, t),
            "dataset.train_index",
            &testenv_path,
        )?),
        None => None,
    };
    let test_data = must_exist(
        resolve(&testenv_path, &testenv.dataset.test_index),
        "dataset.test_index",
        &testenv_path,
    )?;
    let mut names = std::collections::BTreeSet::new();
    let mut algorithms = Vec::new();
    let mut broken = Vec::new();
    for a in &job.test_object.algorithms {
        if !names.insert(a.name.clone()) {
            return Err(invalid(format!(
                "algorithm name {:?} is used twice",
                a.name
            )));
        }
        let algo_path = must_exist(
            resolve(path, &a.url),
            &format!("algorithm {:?} file", a.name),
            path,
        )?;
        let mut algo: Algorithm = read_yaml(&algo_path, "algorithm")?;
        // A model file that is not there breaks this algorithm only: the others still run.
        match resolve_models(&mut algo, &algo_path) {
            Ok(()) => {}
            Err(e) => {
                broken.push((a.name.clone(), e.to_string()));
                continue;
            }
        }
        algorithms.push((a.name.clone(), algo_path, algo));
    }
    if algorithms.is_empty()
        && let Some((_, why)) = broken.first()
    {
        return Err(invalid(format!("no algorithm can run: {why}")));
    }
    let workspace = resolve(path, &job.workspace).join(&job.name);
    Ok(LoadedJob {
        path: path.to_path_buf(),
        job,
        workspace,
        testenv,
        test_data,
        train_data,
        algorithms,
        broken,
    })
}

/// Makes an algorithm's model paths absolute, each checked to exist.
fn resolve_models(algo: &mut Algorithm, algo_path: &Path) -> Result<(), BenchError> {
    if let Some(u) = &algo.initial_model_url {
        algo.initial_model_url = Some(
            must_exist(resolve(algo_path, u), "initial_model_url", algo_path)?
                .display()
                .to_string(),
        );
    }
    for m in &mut algo.modules {
        if let Some(u) = &m.url {
            m.url = Some(
                must_exist(
                    resolve(algo_path, u),
                    &format!("module {:?} url", m.name),
                    algo_path,
                )?
                .display()
                .to_string(),
            );
        } else if m.kind == "basemodel" {
            // Ianvs's initial_model_url is the base model when the module names none.
            m.url.clone_from(&algo.initial_model_url);
        }
    }
    Ok(())
}
