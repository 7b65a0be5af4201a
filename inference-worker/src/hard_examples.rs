//! Saving hard examples for incremental learning: each one as a PNG with the cloud's label as a
//! pseudo-label, listed in a Sedna `txt` index (`images/NNNNNNNN.png <label>`) that a `Dataset`
//! can point at. Appends across restarts; never rewrites lines already written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use sedge_datasets::DatasetError;

/// Appends hard examples to a directory.
pub struct HardExampleStore {
    dir: PathBuf,
    index_path: PathBuf,
    index: File,
    next: u64,
    rows: usize,
    cols: usize,
}

impl HardExampleStore {
    /// Opens (or creates) `dir/index.txt` and `dir/images/`; a `path` ending in `.txt` is the
    /// index itself (a Dataset's index file), with `images/` beside it.
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
        std::fs::create_dir_all(&images).map_err(|e| DatasetError::Io {
            path: images.clone(),
            source: e,
        })?;
        let next = match File::open(&index_path) {
            Ok(f) => BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .count() as u64,
            Err(_) => 0,
        };
        let index = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&index_path)
            .map_err(|e| DatasetError::Io {
                path: index_path.clone(),
                source: e,
            })?;
        Ok(HardExampleStore {
            dir: dir.to_path_buf(),
            index_path: index_path.clone(),
            index,
            next,
            rows,
            cols,
        })
    }

    /// Saves one example; the index line is written after the image, so the index never names a
    /// missing file.
    pub fn save(&mut self, pixels: &[u8], label: usize) -> Result<(), DatasetError> {
        let rel = format!("images/{:08}.png", self.next);
        sedge_datasets::export::write_png(&self.dir.join(&rel), pixels, self.rows, self.cols)?;
        let path = self.index_path.clone();
        writeln!(self.index, "{rel} {label}").map_err(|e| DatasetError::Io { path, source: e })?;
        self.next += 1;
        Ok(())
    }

    /// Examples stored so far, including earlier runs.
    pub fn len(&self) -> u64 {
        self.next
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.next == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
