//! Saving hard examples for incremental learning: each one as a PNG with the cloud's label as a
//! pseudo-label, listed in a Sedna `txt` index (`images/NNNNNNNN.png <label>`) that a `Dataset`
//! can point at. Appends across restarts; never rewrites lines already written.
//!
//! **While the cloud cannot label** (unreachable, slow, breaker open), a hard example waits
//! unlabelled in `pending/NNNNNNNN.png` beside the index, and is labelled when the cloud answers
//! again ([`HardExampleStore::take_pending`], [`HardExampleStore::commit`]). The queue is bounded
//! ([`DEFAULT_MAX_PENDING`] examples unless configured, about 1 KB each for a 28x28 image): when
//! full, the **oldest** waiting example is dropped to make room (the newest say the most about
//! what the edge sees now), and every drop is counted ([`HardExampleStore::dropped`]) and logged.
//!
//! Exactly once: a waiting example becomes `images/pNNNNNNNN.png` (its id kept in the name), its
//! index line is appended, and only then is its pending file removed. A crash between the last
//! two steps leaves a pending file whose image the index already names; opening the store removes
//! it, so no example is lost and none is labelled twice.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use sedge_datasets::DatasetError;

fn io_error(path: &Path, source: std::io::Error) -> DatasetError {
    DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hard examples kept waiting for the cloud by default.
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// Appends hard examples to a directory.
pub struct HardExampleStore {
    dir: PathBuf,
    index_path: PathBuf,
    index: File,
    next: u64,
    rows: usize,
    cols: usize,
    pending_dir: PathBuf,
    /// Waiting ids, oldest first.
    pending: VecDeque<u64>,
    next_pending: u64,
    max_pending: usize,
    dropped: u64,
}

impl HardExampleStore {
    /// Opens (or creates) `dir/index.txt`, `dir/images/` and `dir/pending/`; a `path` ending in
    /// `.txt` is the index itself (a Dataset's index file), with `images/` beside it.
    pub fn open(path: &Path, rows: usize, cols: usize) -> Result<Self, DatasetError> {
        let (dir, index_path) = if path.extension().is_some_and(|e| e == "txt") {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        } else {
            (path.to_path_buf(), path.join("index.txt"))
        };
        let dir = dir.as_path();
        let images = dir.join("images");
        let pending_dir = dir.join("pending");
        for d in [&images, &pending_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_error(d, e))?;
        }
        let mut next = 0;
        let mut committed = HashSet::new();
        if let Ok(f) = File::open(&index_path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                next += 1;
                if let Some(id) = line
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.strip_prefix("images/p"))
                    .and_then(|p| p.strip_suffix(".png"))
                    .and_then(|p| p.parse::<u64>().ok())
                {
                    committed.insert(id);
                }
            }
        }
        let index = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&index_path)
            .map_err(|e| io_error(&index_path, e))?;
        let mut pending = Vec::new();
        let listing = std::fs::read_dir(&pending_dir).map_err(|e| io_error(&pending_dir, e))?;
        for entry in listing.flatten() {
            let path = entry.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".png"))
                .and_then(|n| n.parse::<u64>().ok());
            match id {
                // Labelled and indexed before a crash took the process: done already.
                Some(id) if committed.contains(&id) => {
                    let _ = std::fs::remove_file(&path);
                }
                Some(id) => pending.push(id),
                // A write cut short (`*.tmp`) or a stranger: not an example.
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        pending.sort_unstable();
        let next_pending = pending
            .last()
            .copied()
            .into_iter()
            .chain(committed.iter().copied())
            .max()
            .map_or(0, |m| m + 1);
        Ok(HardExampleStore {
            dir: dir.to_path_buf(),
            index_path,
            index,
            next,
            rows,
            cols,
            pending_dir,
            pending: pending.into(),
            next_pending,
            max_pending: DEFAULT_MAX_PENDING,
            dropped: 0,
        })
    }

    /// Keeps at most `max` examples waiting for the cloud (0: none wait; each is dropped).
    /// Examples already waiting beyond the bound are dropped, oldest first.
    pub fn with_max_pending(mut self, max: usize) -> Self {
        self.max_pending = max;
        while self.pending.len() > max {
            self.drop_oldest();
        }
        self
    }

    /// Saves one labelled example; the index line is written after the image, so the index never
    /// names a missing file.
    pub fn save(&mut self, pixels: &[u8], label: usize) -> Result<(), DatasetError> {
        let rel = format!("images/{:08}.png", self.next);
        self.append(&rel, pixels, label)
    }

    fn append(&mut self, rel: &str, pixels: &[u8], label: usize) -> Result<(), DatasetError> {
        sedge_datasets::export::write_png(&self.dir.join(rel), pixels, self.rows, self.cols)?;
        writeln!(self.index, "{rel} {label}")
            .and_then(|()| self.index.flush())
            .map_err(|e| io_error(&self.index_path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Keeps an example the cloud could not label yet. Returns how many waiting examples were
    /// dropped to make room (0 or 1).
    pub fn defer(&mut self, pixels: &[u8]) -> Result<u64, DatasetError> {
        if self.max_pending == 0 {
            self.dropped += 1;
            tracing::warn!(
                "hard example dropped: the cloud cannot label it and no example may wait"
            );
            return Ok(1);
        }
        let mut dropped = 0;
        while self.pending.len() >= self.max_pending {
            self.drop_oldest();
            dropped += 1;
        }
        let id = self.next_pending;
        let path = self.pending_path(id);
        // Written aside and renamed, so a pending file is always a whole image.
        let tmp = path.with_extension("png.tmp");
        sedge_datasets::export::write_png(&tmp, pixels, self.rows, self.cols)?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        self.next_pending += 1;
        self.pending.push_back(id);
        Ok(dropped)
    }

    fn drop_oldest(&mut self) {
        if let Some(old) = self.pending.pop_front() {
            let _ = std::fs::remove_file(self.pending_path(old));
            self.dropped += 1;
            tracing::warn!(
                bound = self.max_pending,
                "hard-example queue full while the cloud cannot label: the oldest waiting example was dropped"
            );
        }
    }

    fn pending_path(&self, id: u64) -> PathBuf {
        self.pending_dir.join(format!("{id:08}.png"))
    }

    /// Up to `n` waiting examples, oldest first, with their pixels. One that cannot be read back
    /// is dropped (counted) rather than retried forever.
    pub fn take_pending(&mut self, n: usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for &id in self.pending.iter() {
            if out.len() >= n {
                break;
            }
            match sedge_datasets::export::read_grey(&self.pending_path(id), self.rows, self.cols) {
                Ok(p) => out.push((id, p)),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting hard example unreadable; dropped");
                    unreadable.push(id);
                }
            }
        }
        for id in unreadable {
            self.pending.retain(|p| *p != id);
            let _ = std::fs::remove_file(self.pending_path(id));
            self.dropped += 1;
        }
        out
    }

    /// Stores a waiting example with the label the cloud gave it. False when it is no longer
    /// waiting (dropped meanwhile, or committed already): nothing is written twice.
    pub fn commit(&mut self, id: u64, pixels: &[u8], label: usize) -> Result<bool, DatasetError> {
        let Some(at) = self.pending.iter().position(|p| *p == id) else {
            return Ok(false);
        };
        self.append(&format!("images/p{id:08}.png"), pixels, label)?;
        self.pending.remove(at);
        let _ = std::fs::remove_file(self.pending_path(id));
        Ok(true)
    }

    /// Examples stored so far, including earlier runs.
    pub fn len(&self) -> u64 {
        self.next
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// Examples waiting for the cloud's label.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Waiting examples dropped since this store was opened (queue full, or unreadable).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(dir: &Path) -> Vec<(String, Option<u32>)> {
        sedge_datasets::index::read(dir.join("index.txt"))
            .unwrap()
            .into_iter()
            .map(|e| {
                let name = e.path.file_name().unwrap().to_string_lossy().to_string();
                (name, e.label)
            })
            .collect()
    }

    #[test]
    fn appends_across_reopens_and_reads_back_as_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        s.save(&[0, 1, 2, 3], 4).unwrap();
        drop(s);
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        assert_eq!(s.len(), 1);
        s.save(&[9, 9, 9, 9], 7).unwrap();
        let entries = sedge_datasets::index::read(dir.path().join("index.txt")).unwrap();
        assert_eq!(
            entries.iter().map(|e| e.label).collect::<Vec<_>>(),
            vec![Some(4), Some(7)]
        );
        assert_eq!(
            sedge_datasets::export::read_grey(&entries[1].path, 2, 2).unwrap(),
            vec![9; 4]
        );
    }

    #[test]
    fn waiting_examples_survive_a_restart_and_are_labelled_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        s.save(&[1; 4], 1).unwrap();
        s.defer(&[2; 4]).unwrap();
        s.defer(&[3; 4]).unwrap();
        assert_eq!(s.pending(), 2);
        drop(s);
        // The process restarts with the cloud still away: both still wait, in order.
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        assert_eq!((s.len(), s.pending()), (1, 2));
        let waiting = s.take_pending(10);
        assert_eq!(
            waiting.iter().map(|w| w.1[0]).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // The cloud answers for the first; the second is still out when the process dies.
        assert!(s.commit(waiting[0].0, &waiting[0].1, 5).unwrap());
        assert!(
            !s.commit(waiting[0].0, &waiting[0].1, 5).unwrap(),
            "committing twice writes nothing"
        );
        drop(s);
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        assert_eq!((s.len(), s.pending()), (2, 1));
        let w = s.take_pending(10);
        assert_eq!(w.len(), 1);
        assert!(s.commit(w[0].0, &w[0].1, 6).unwrap());
        let got = labels(dir.path());
        assert_eq!(
            got,
            vec![
                ("00000000.png".into(), Some(1)),
                ("p00000000.png".into(), Some(5)),
                ("p00000001.png".into(), Some(6)),
            ]
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("pending"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_crash_after_the_index_line_does_not_label_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        s.defer(&[7; 4]).unwrap();
        let w = s.take_pending(1);
        let pending = dir.path().join("pending/00000000.png");
        let copy = std::fs::read(&pending).unwrap();
        s.commit(w[0].0, &w[0].1, 3).unwrap();
        drop(s);
        // As if the process died between the index line and removing the pending file.
        std::fs::write(&pending, copy).unwrap();
        std::fs::write(dir.path().join("pending/00000009.png.tmp"), b"half").unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        assert_eq!((s.len(), s.pending()), (1, 0));
        assert!(s.take_pending(10).is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("pending"))
                .unwrap()
                .count(),
            0
        );
        // New ids never reuse a committed one.
        s.defer(&[8; 4]).unwrap();
        assert_eq!(s.take_pending(1)[0].0, 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2)
            .unwrap()
            .with_max_pending(3);
        for v in 0..5u8 {
            s.defer(&[v; 4]).unwrap();
        }
        assert_eq!((s.pending(), s.dropped()), (3, 2));
        let w = s.take_pending(10);
        assert_eq!(w.iter().map(|w| w.1[0]).collect::<Vec<_>>(), vec![2, 3, 4]);
        // A waiting example dropped while its label was on the way is not written.
        s.defer(&[5; 4]).unwrap();
        assert!(!s.commit(w[0].0, &w[0].1, 1).unwrap());
        // No example may wait: each is dropped and counted.
        let mut none = HardExampleStore::open(tempfile::tempdir().unwrap().path(), 2, 2)
            .unwrap()
            .with_max_pending(0);
        assert_eq!(none.defer(&[1; 4]).unwrap(), 1);
        assert_eq!((none.pending(), none.dropped()), (0, 1));
    }

    #[test]
    fn an_unreadable_waiting_example_is_dropped_not_retried_forever() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HardExampleStore::open(dir.path(), 2, 2).unwrap();
        s.defer(&[1; 4]).unwrap();
        s.defer(&[2; 4]).unwrap();
        std::fs::write(dir.path().join("pending/00000000.png"), b"not a png").unwrap();
        let w = s.take_pending(10);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1, vec![2; 4]);
        assert_eq!((s.pending(), s.dropped()), (1, 1));
    }
}
