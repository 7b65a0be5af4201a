//! Sedge's benchmarks: the Ianvs-style benchmark runner (`sedge bench -f benchmarkingjob.yaml`)
//! and the performance benchmarks that print tables (`src/bin/`).
//!
//! The runner reads Ianvs's three YAML layers ([`job`]), expands hyperparameters into test cases
//! ([`expand`]), runs each case with a [`paradigm`], computes [`metrics`], and writes the
//! leaderboard ([`rank`]) and a plot ([`plot`]); [`runner`] ties them together. The modules
//! depend one way: `job` (files) <- `expand` (cases) <- `paradigm` (running them); [`load`] is
//! where a job's algorithms are checked against their paradigms.

pub mod expand;
pub mod job;
pub mod link;
pub mod metrics;
pub mod nodes;
pub mod paradigm;
pub mod plot;
pub mod rank;
pub mod runner;

use std::path::{Path, PathBuf};

/// Reads a benchmarking job ([`job::load`]) and checks each algorithm against its paradigm:
/// everything that can be said before anything runs.
pub fn load(path: &Path) -> Result<job::LoadedJob, BenchError> {
    let job = job::load(path)?;
    if job
        .algorithms
        .iter()
        .any(|(_, _, a)| a.paradigm_type == "incrementallearning")
        && (job.testenv.incremental_rounds.is_none() || job.train_data.is_none())
    {
        return Err(BenchError::Invalid {
            path: job.path.clone(),
            message: "incrementallearning needs incremental_rounds (2 or more) and dataset.train_index in the testenv".into(),
        });
    }
    for (_, algo_path, algo) in &job.algorithms {
        paradigm::check(algo).map_err(|message| BenchError::Invalid {
            path: algo_path.clone(),
            message,
        })?;
    }
    Ok(job)
}

/// Why a benchmark job could not be read or its results written.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A YAML file does not parse or has unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong, with the key and location.
        message: String,
    },
    /// A file parses but says something that cannot be run.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// An output could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A free TCP port on loopback (bound, then released for the caller to bind).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) of a process (`/proc/<pid>/stat`; `self` for this one), 0 when
/// it cannot be read.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    sedge_serve::cpu_seconds(pid).unwrap_or(0.0)
}

/// The whole machine's CPU time since boot, busy and in all (seconds summed over the cores,
/// from the first line of `/proc/stat`); zeros when it cannot be read.
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`; `self` for this one),
/// 0 when it cannot be read.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    sedge_serve::status_field(pid, "VmRSS:").unwrap_or(0)
}
