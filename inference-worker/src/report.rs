//! The joint-inference report: the same samples run edge-only, cloud-only and jointly (edge model
//! plus hard-example mining plus cloud), through a real cloud worker on a loopback port, printed
//! as one table.

use std::path::PathBuf;

use crate::backend::{self, BackendOptions};
use crate::client::OffloadConfig;
use crate::edge::{EdgeConfig, EdgeSummary, EdgeWorker, WorkerError};
use crate::model::Model;
use crate::pipeline::MiningMode;
use crate::server::{self, ServedModel, ServerConfig};
use crate::source::Source;

/// What to compare.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The edge model.
    pub edge_model: PathBuf,
    /// The cloud model.
    pub cloud_model: PathBuf,
    /// The samples (with labels, for accuracy).
    pub data: Source,
    /// Engine for both models.
    pub backend: BackendOptions,
    /// Mining rule of the joint row.
    pub hem_name: String,
    /// Its parameters (Sedna's JSON list).
    pub hem_parameters: String,
    /// Stop after this many samples.
    pub limit: Option<usize>,
    /// Offloads in flight at once.
    pub concurrency: usize,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct ReportRow {
    /// `edge-only`, `cloud-only` or `joint (<rule>)`.
    pub mode: String,
    /// What the run did.
    pub summary: EdgeSummary,
}

/// Runs the three modes. The cloud worker serves on 127.0.0.1 on a port the OS picks. With
/// `joint`, that row is what a deployed edge worker measured and only the two baselines run here.
pub async fn joint_report(
    opts: &ReportOptions,
    joint: Option<ReportRow>,
) -> Result<Vec<ReportRow>, WorkerError> {
    let cloud = Model::load(&opts.cloud_model)?;
    let backend = backend::load(&cloud, &opts.backend)?;
    let server_config = ServerConfig::default();
    let model = ServedModel::new(cloud.config.clone(), backend, server_config.batch.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = server::start(([127, 0, 0, 1], 0).into(), model, server_config, async {
        let _ = stopped.await;
    })
    .await
    .map_err(|e| WorkerError::Io {
        what: "cannot bind the cloud worker".into(),
        source: e,
    })?;

    let base = EdgeConfig {
        model: opts.edge_model.clone(),
        backend: opts.backend.clone(),
        offload: OffloadConfig {
            address: Some(addr.to_string()),
            model: cloud.config.name.clone(),
            concurrency: opts.concurrency,
            ..Default::default()
        },
        limit: opts.limit,
        ..Default::default()
    };
    let runs = [
        (
            "edge-only".to_string(),
            EdgeConfig {
                hem_name: "EdgeOnly".into(),
                hem_parameters: String::new(),
                offload: OffloadConfig {
                    address: None,
                    ..base.offload.clone()
                },
                ..base.clone()
            },
        ),
        (
            "cloud-only".to_string(),
            EdgeConfig {
                hem_name: "CloudOnly".into(),
                hem_parameters: String::new(),
                mining_mode: MiningMode::MiningThenInference,
                ..base.clone()
            },
        ),
        (
            format!("joint ({})", opts.hem_name),
            EdgeConfig {
                hem_name: opts.hem_name.clone(),
                hem_parameters: opts.hem_parameters.clone(),
                ..base.clone()
            },
        ),
    ];
    let mut rows = Vec::new();
    let runs = runs.into_iter().take(if joint.is_some() { 2 } else { 3 });
    for (mode, config) in runs {
        let worker = EdgeWorker::start(config)?;
        let summary = worker.run(&opts.data, std::future::pending()).await?;
        rows.push(ReportRow { mode, summary });
    }
    rows.extend(joint);
    let _ = stop.send(());
    let _ = server.await;
    Ok(rows)
}

/// Renders rows as a fixed-width table.
pub fn render(rows: &[ReportRow]) -> String {
    let mut out = format!(
        "{:<28} {:>9} {:>9} {:>10} {:>12} {:>9} {:>9} {:>11}\n",
        "mode", "samples", "accuracy", "offloaded", "bytes sent", "p50 ms", "p99 ms", "samples/s"
    );
    for r in rows {
        let s = &r.summary;
        out.push_str(&format!(
            "{:<28} {:>9} {:>8.2}% {:>9.1}% {:>12} {:>9.3} {:>9.3} {:>11.0}\n",
            r.mode,
            s.samples,
            s.accuracy().unwrap_or(f64::NAN) * 100.0,
            s.offload_share() * 100.0,
            s.bytes_sent,
            s.p50_ms,
            s.p99_ms,
            s.throughput
        ));
    }
    out
}
