//! The one-shot commands: `sedge infer`, `sedge demo`, `sedge bench`, `sedge dataset`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use sedge_datasets::{IndexFormat, Split, fashion};
use sedge_inference_worker::backend::{self, BackendKind};
use sedge_inference_worker::edge::{EdgeConfig, EdgeSummary, EdgeWorker};
use sedge_inference_worker::report::{self, ReportOptions};
use sedge_inference_worker::source::Source;

use crate::shutdown_signal;
use crate::worker::print_summary;

/// Flags of `sedge bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The benchmarkingjob YAML file (paths inside it are relative to it).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Test cases to run at once.
    #[arg(long, short = 'j', default_value_t = 1)]
    pub jobs: usize,
    /// Use only the first N test samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Longest a test case may run, in seconds; past it the case fails and the others go on.
    #[arg(long)]
    pub case_timeout: Option<f64>,
    /// Finish an interrupted run: its directory (`<workspace>/<name>/<run id>`). Cases saved
    /// with results are read back; the rest run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Flags of `sedge infer`.
#[derive(Args)]
pub struct InferArgs {
    /// An image, an IDX file, a .txt/.csv index, or a directory of images.
    pub input: PathBuf,
    /// Model (.onnx with its .json beside it).
    #[arg(long, default_value = "models/fashion-mnist/edge-cnn.onnx")]
    pub model: PathBuf,
    /// Inference engine.
    #[arg(long, default_value = "tract")]
    pub backend: BackendKind,
    /// Samples per inference call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Stop after this many samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print only the summary, not one line per sample.
    #[arg(long)]
    pub summary_only: bool,
}

/// Flags of `sedge demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Directory with Fashion-MNIST's IDX files.
    #[arg(long, default_value = fashion::FASHION_MNIST_DIR)]
    pub data: PathBuf,
    /// Inference engine (default: ort when the ONNX Runtime library is found, else tract).
    #[arg(long)]
    pub backend: Option<BackendKind>,
    /// Mining rule of the joint run.
    #[arg(long, default_value = "MaxProbability")]
    pub hem_name: String,
    /// Its parameters.
    #[arg(long, default_value = r#"[{"key":"threshold","value":"0.8"}]"#)]
    pub hem_parameters: String,
    /// Stop after this many samples (default: all 10,000 test images).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Offloads in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Directory holding edge-cnn.onnx and cloud-cnn.onnx.
    #[arg(long, default_value = "models/fashion-mnist")]
    pub models: PathBuf,
    /// Take the joint row from this edge worker summary (JSON, e.g. from a joint inference pod's
    /// log line `summary: ...`) instead of running it here.
    #[arg(long)]
    pub joint_summary: Option<PathBuf>,
}

/// `sedge dataset ...`
#[derive(Subcommand)]
pub enum DatasetCmd {
    /// Export a Fashion-MNIST split as PNG files plus a Sedna index file.
    Export(ExportArgs),
}

/// A Fashion-MNIST split.
#[derive(Clone, Copy, ValueEnum)]
pub enum SplitArg {
    /// The 60,000 training images.
    Train,
    /// The 10,000 test images.
    Test,
}

/// The index file written.
#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Sedna's `.txt`: `path label` per line.
    Txt,
    /// CSV with a header: `image,label`.
    Csv,
}

/// Flags of `sedge dataset export`.
#[derive(Args)]
pub struct ExportArgs {
    /// Output directory (gets images/ and index.txt or index.csv).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Which split.
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// Index format.
    #[arg(long, value_enum, default_value = "txt")]
    pub format: FormatArg,
    /// Export only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Directory with Fashion-MNIST's IDX files.
    #[arg(long, default_value = fashion::FASHION_MNIST_DIR)]
    pub data: PathBuf,
}

/// Runs a model over the input and prints predictions and accuracy.
pub async fn infer(a: InferArgs) -> Result<()> {
    let c = EdgeConfig {
        model: a.model,
        backend: sedge_inference_worker::backend::BackendOptions {
            kind: a.backend,
            ..Default::default()
        },
        hem_name: "EdgeOnly".into(),
        hem_parameters: String::new(),
        batch: a.batch,
        output: (!a.summary_only).then(|| PathBuf::from("-")),
        limit: a.limit,
        ..Default::default()
    };
    let summary = EdgeWorker::start(c)?
        .run(&Source::from_path(&a.input), shutdown_signal())
        .await?;
    print_summary(&summary)
}

/// Prints the edge-only / cloud-only / joint table on Fashion-MNIST.
pub async fn demo(a: DemoArgs) -> Result<()> {
    let images = Split::Test.images_path(&a.data);
    if !images.exists() {
        bail!(
            "{} not found: install Debian's dataset-fashion-mnist package (`make data`) or pass --data DIR",
            images.display()
        );
    }
    let kind = a.backend.unwrap_or_else(|| {
        if backend::ort_library_path(None).is_ok() {
            BackendKind::Ort
        } else {
            BackendKind::Tract
        }
    });
    let opts = ReportOptions {
        edge_model: a.models.join("edge-cnn.onnx"),
        cloud_model: a.models.join("cloud-cnn.onnx"),
        data: Source::Idx(images),
        backend: sedge_inference_worker::backend::BackendOptions {
            kind,
            ..Default::default()
        },
        hem_name: a.hem_name,
        hem_parameters: a.hem_parameters,
        limit: a.limit,
        concurrency: a.concurrency,
    };
    eprintln!(
        "Joint inference on Fashion-MNIST ({kind} backend; cloud worker on a loopback port, offload over OIP gRPC)..."
    );
    let joint = match &a.joint_summary {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let s: EdgeSummary = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an edge worker summary", p.display()))?;
            Some(report::ReportRow {
                mode: "joint: edge pod->cloud pod".into(),
                summary: s,
            })
        }
        None => None,
    };
    let rows = report::joint_report(&opts, joint).await?;
    print!("{}", report::render(&rows));
    Ok(())
}

/// Runs an Ianvs-style benchmarking job and prints its leaderboard.
pub async fn bench(a: BenchArgs) -> Result<()> {
    let case_timeout = match a.case_timeout {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
        Some(s) => bail!("--case-timeout {s} is not a positive number of seconds"),
    };
    let job = sedge_benchmarks::load(&a.file)?;
    // Said before anything runs; the other algorithms' cases still run.
    for (name, why) in &job.broken {
        eprintln!("algorithm {name:?} cannot run and is skipped: {why}");
    }
    let opts = sedge_benchmarks::runner::RunOptions {
        jobs: a.jobs,
        limit: a.limit,
        progress: !a.no_progress,
        case_timeout,
        resume: a.resume,
    };
    let report = sedge_benchmarks::runner::run(&job, &opts).await?;
    if report.resumed > 0 {
        eprintln!(
            "resumed {}: {} of {} test cases read back, the others run now",
            report.run_dir.display(),
            report.resumed,
            report.results.len()
        );
    }
    print!("{}", report.table);
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!("results in {}", report.run_dir.display());
    for f in &report.files {
        eprintln!("  {}", f.display());
    }
    let failed: Vec<_> = report.failures().collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "test case {} failed: {}",
                r.case.id,
                r.metrics
                    .as_ref()
                    .err()
                    .map(String::as_str)
                    .unwrap_or_default()
            );
        }
        bail!(
            "{} of {} test cases failed (the others are saved above)",
            failed.len(),
            report.results.len()
        );
    }
    Ok(())
}

/// Writes a Fashion-MNIST split as PNG files and an index.
pub fn export(a: ExportArgs) -> Result<()> {
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::Test => Split::Test,
    };
    let format = match a.format {
        FormatArg::Txt => IndexFormat::Txt,
        FormatArg::Csv => IndexFormat::Csv,
    };
    let data = fashion::load(&a.data, split)?;
    let index = sedge_datasets::export::export(&data, &a.out, format, a.limit)?;
    println!("{}", index.display());
    Ok(())
}
