//! Data for Sedge's workers and benchmarks: Fashion-MNIST in IDX form (as Debian's
//! `dataset-fashion-mnist` installs it) and Sedna-compatible dataset index files.
//!
//! Workers read samples from three kinds of source, all handled here: an IDX file (gzipped or not),
//! an index file (`txt` or `csv`, paths relative to the index file, the way Sedna workers read them),
//! or a directory of images.

pub mod error;
pub mod export;
pub mod fashion;
pub mod idx;
pub mod index;
pub mod shift;

pub use error::DatasetError;
pub use fashion::{FASHION_MNIST_DIR, LABELS, Split};
pub use idx::{IdxImages, LabeledImages};
pub use index::{IndexEntry, IndexFormat};
