//! The one error type of this crate: every variant names the file and what was wrong with it.

use std::path::PathBuf;

/// Why a data file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The file does not start with the IDX magic number that was expected.
    #[error(
        "{path}: not an IDX {what} file: magic number {found:#010x}, expected {expected:#010x}"
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// "images" or "labels".
        what: &'static str,
        /// The magic number read.
        found: u32,
        /// The magic number expected.
        expected: u32,
    },
    /// The file is shorter than its header says.
    #[error("{path}: truncated: header promises {expected} bytes of data, found {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// An images file and its labels file disagree on the number of items.
    #[error("{images} has {image_count} images but {labels} has {label_count} labels")]
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// Its item count.
        image_count: usize,
        /// The labels file.
        labels: PathBuf,
        /// Its item count.
        label_count: usize,
    },
    /// A line of an index file could not be parsed.
    #[error("{path}:{line}: {message}")]
    BadIndexLine {
        /// The index file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// An image file could not be decoded, or is not the expected size.
    #[error("{path}: {message}")]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }
}
