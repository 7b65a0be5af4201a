//! The local controller's sample collection for an IncrementalLearningJob (Sedna's LC
//! `dataset` and train-trigger bookkeeping), as a node-local library.
//!
//! The job's Dataset is an index file (`txt`: `path label` per line; paths relative to the index)
//! that the inference worker appends hard examples to. Each [`Collector::poll`] reads the lines
//! added since the last one and splits them as Sedna does: of `n` new lines, the first
//! `round(trainProb * n)` go to the train bucket and the rest to eval. [`Collector::stats`] gives
//! the trigger its `num_of_samples` (train samples since the last round). When the trigger fires,
//! [`Collector::start_round`] writes the round's lists under the job's `outputDir`:
//! `data/train/<round>/data.txt` and `data/eval/<round>/data.txt`, with absolute paths, and empties
//! the train bucket (eval samples accumulate, so later rounds are scored on more).
//!
//! The state (lines seen, round, buckets) is written to `<outputDir>/lc-state.json` after every
//! change (temporary file, then rename), so a restarted agent neither loses a sample nor counts
//! one twice. An index that became shorter than the lines already seen was replaced: it is read
//! from the start again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sedge_datasets::export::write_atomic;
use serde::{Deserialize, Serialize};

/// Lines read from one index at most (a runaway writer cannot exhaust the agent's memory).
pub const MAX_INDEX_LINES: usize = 1_000_000;

/// Why collection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// `trainProb` is not a probability.
    #[error("trainProb {0} is outside [0, 1]")]
    TrainProb(f64),
    /// The output directory cannot be written.
    #[error("outputDir {path} is not writable: {source}")]
    OutputDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The dataset index cannot be read.
    #[error("dataset index {path}: {message}")]
    Index {
        /// The index.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The state file is unreadable or cannot be written.
    #[error("collection state {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct CollectState {
    lines_seen: usize,
    round: u32,
    train: Vec<String>,
    eval: Vec<String>,
}

/// One round's sample lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// The round number (1 for the first).
    pub round: u32,
    /// `<outputDir>/data/train/<round>/data.txt`.
    pub train: PathBuf,
    /// `<outputDir>/data/eval/<round>/data.txt`.
    pub eval: PathBuf,
    /// Lines in each.
    pub counts: (usize, usize),
}

/// Collects a job's samples on the node.
pub struct Collector {
    index: PathBuf,
    output: PathBuf,
    train_prob: f64,
    state: CollectState,
}

impl Collector {
    /// Checks the settings and loads the saved state, if any.
    pub fn open(index: &Path, output_dir: &Path, train_prob: f64) -> Result<Self, CollectError> {
        if !(0.0..=1.0).contains(&train_prob) {
            return Err(CollectError::TrainProb(train_prob));
        }
        let out_err = |source| CollectError::OutputDir {
            path: output_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(output_dir).map_err(out_err)?;
        let probe = output_dir.join(".sedge-write-probe");
        std::fs::write(&probe, b"").map_err(out_err)?;
        let _ = std::fs::remove_file(&probe);
        let state_path = output_dir.join("lc-state.json");
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CollectError::State {
                path: state_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CollectState::default(),
            Err(e) => {
                return Err(CollectError::State {
                    path: state_path,
                    message: e.to_string(),
                });
            }
        };
        Ok(Collector {
            index: index.to_path_buf(),
            output: output_dir.to_path_buf(),
            train_prob,
            state,
        })
    }

    fn save(&self) -> Result<(), CollectError> {
        let path = self.output.join("lc-state.json");
        write_atomic(
            &path,
            &serde_json::to_vec(&self.state).expect("state serialises"),
        )
        .map_err(|e| CollectError::State {
            path,
            message: e.to_string(),
        })
    }

    /// Resolves a line's path against the index's directory (kept as written when absolute).
    fn absolute(&self, line: &str) -> String {
        let mut parts = line.splitn(2, char::is_whitespace);
        let path = parts.next().unwrap_or_default();
        let rest = parts.next().map(str::trim).unwrap_or_default();
        let p = Path::new(path);
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.index.parent().unwrap_or(Path::new(".")).join(p)
        };
        if rest.is_empty() {
            abs.display().to_string()
        } else {
            format!("{} {rest}", abs.display())
        }
    }

    /// Reads the lines added to the index since the last poll and splits them; returns how many
    /// were new. A missing index is not an error (the worker has not saved anything yet).
    pub fn poll(&mut self) -> Result<usize, CollectError> {
        let text = match std::fs::read_to_string(&self.index) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(CollectError::Index {
                    path: self.index.clone(),
                    message: e.to_string(),
                });
            }
        };
        // Only whole lines: a line still being written has no newline yet.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        let lines: Vec<&str> = complete
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(MAX_INDEX_LINES)
            .collect();
        if lines.len() < self.state.lines_seen {
            tracing::warn!(index = %self.index.display(), "dataset index shrank; reading it from the start");
            self.state.lines_seen = 0;
        }
        let new: Vec<String> = lines[self.state.lines_seen..]
            .iter()
            .map(|l| self.absolute(l))
            .collect();
        if new.is_empty() {
            return Ok(0);
        }
        let n_train = (self.train_prob * new.len() as f64).round() as usize;
        let n = new.len();
        let mut it = new.into_iter();
        self.state.train.extend(it.by_ref().take(n_train));
        self.state.eval.extend(it);
        self.state.lines_seen = lines.len();
        self.save()?;
        Ok(n)
    }

    /// The train trigger's stats: `num_of_samples` (train samples since the last round).
    pub fn stats(&self) -> BTreeMap<String, Vec<f64>> {
        BTreeMap::from([(
            "num_of_samples".to_string(),
            vec![self.state.train.len() as f64],
        )])
    }

    /// Rounds started so far.
    pub fn round(&self) -> u32 {
        self.state.round
    }

    /// Writes the next round's lists and empties the train bucket.
    pub fn start_round(&mut self) -> Result<Round, CollectError> {
        let round = self.state.round + 1;
        let dir = |kind: &str| self.output.join("data").join(kind).join(round.to_string());
        let train = dir("train").join("data.txt");
        let eval = dir("eval").join("data.txt");
        let body = |v: &[String]| {
            let mut s = v.join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            s
        };
        let out_err = |source| CollectError::OutputDir {
            path: self.output.clone(),
            source,
        };
        write_atomic(&train, body(&self.state.train).as_bytes()).map_err(out_err)?;
        write_atomic(&eval, body(&self.state.eval).as_bytes()).map_err(out_err)?;
        let counts = (self.state.train.len(), self.state.eval.len());
        self.state.round = round;
        self.state.train.clear();
        self.save()?;
        Ok(Round {
            round,
            train,
            eval,
            counts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, lines: &[&str]) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    #[test]
    fn splits_new_lines_by_train_prob_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("hard/index.txt");
        std::fs::create_dir_all(index.parent().unwrap()).unwrap();
        let out = dir.path().join("out");
        let mut c = Collector::open(&index, &out, 0.8).unwrap();
        assert_eq!(c.poll().unwrap(), 0, "no index yet");
        let lines: Vec<String> = (0..10)
            .map(|i| format!("images/{i}.png {}", i % 3))
            .collect();
        append(
            &index,
            &lines.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(c.poll().unwrap(), 10);
        assert_eq!(c.stats()["num_of_samples"], vec![8.0]);
        assert_eq!(c.poll().unwrap(), 0, "nothing counted twice");
        drop(c);

        // A restarted agent picks up where it was.
        let mut c = Collector::open(&index, &out, 0.8).unwrap();
        assert_eq!(c.stats()["num_of_samples"], vec![8.0]);
        append(&index, &["images/10.png 1", "images/11.png 2"]);
        // A half-written line (no newline yet) waits for the next poll.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&index)
            .unwrap()
            .write_all(b"images/12.p")
            .unwrap();
        assert_eq!(c.poll().unwrap(), 2);
        assert_eq!(c.stats()["num_of_samples"], vec![10.0]);

        let r = c.start_round().unwrap();
        assert_eq!(r.round, 1);
        assert_eq!(r.counts, (10, 2));
        assert_eq!(r.train, out.join("data/train/1/data.txt"));
        let train = std::fs::read_to_string(&r.train).unwrap();
        let first = train.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "{} 0",
                index.parent().unwrap().join("images/0.png").display()
            ),
            "paths are made absolute, labels kept"
        );
        assert_eq!(c.stats()["num_of_samples"], vec![0.0]);
        // The datasets crate reads the round's list back with its labels.
        let entries = sedge_datasets::index::read(&r.train).unwrap();
        assert_eq!(entries.len(), 10);
        assert_eq!(entries[1].label, Some(1));

        std::fs::OpenOptions::new()
            .append(true)
            .open(&index)
            .unwrap()
            .write_all(b"ng 0\n")
            .unwrap();
        assert_eq!(c.poll().unwrap(), 1);
        let r2 = c.start_round().unwrap();
        assert_eq!((r2.round, r2.counts.0), (2, 1));
        let eval2 = std::fs::read_to_string(&r2.eval).unwrap();
        assert_eq!(eval2.lines().count(), 2, "eval samples accumulate");
    }

    #[test]
    fn a_replaced_index_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.txt");
        append(&index, &["a.png 1", "b.png 2", "c.png 3"]);
        let mut c = Collector::open(&index, &dir.path().join("o"), 1.0).unwrap();
        assert_eq!(c.poll().unwrap(), 3);
        std::fs::write(&index, "d.png 4\n").unwrap();
        assert_eq!(c.poll().unwrap(), 1);
        assert_eq!(c.stats()["num_of_samples"], vec![4.0]);
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.txt");
        for p in [-0.1, 1.5, f64::NAN] {
            let e = Collector::open(&index, dir.path(), p).err().unwrap();
            assert!(e.to_string().contains("trainProb"), "{e}");
        }
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = Collector::open(&index, &file.join("out"), 0.5)
            .err()
            .unwrap();
        assert!(e.to_string().contains("outputDir"), "{e}");
        std::fs::write(dir.path().join("lc-state.json"), b"{broken").unwrap();
        let e = Collector::open(&index, dir.path(), 0.5).err().unwrap();
        assert!(e.to_string().contains("lc-state.json"), "{e}");
    }
}
