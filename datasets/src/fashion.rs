//! Fashion-MNIST specifics: where Debian installs it, the file names, the class names.

use std::path::{Path, PathBuf};

use crate::{DatasetError, LabeledImages, idx};

/// Where Debian's `dataset-fashion-mnist` package installs the data.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Class names, indexed by label.
pub const LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Which half of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 training images.
    Train,
    /// 10,000 test images.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    /// Path of this split's images file in `dir` (the `.gz` name if present, else the plain one).
    pub fn images_path(self, dir: &Path) -> PathBuf {
        let base = dir.join(format!("{}-images-idx3-ubyte", self.prefix()));
        let gz = base.with_extension("gz");
        if gz.exists() { gz } else { base }
    }
}

/// Loads a split with its labels from `dir`.
pub fn load(dir: &Path, split: Split) -> Result<LabeledImages, DatasetError> {
    idx::read_labeled(split.images_path(dir))
}

/// The committed 500-image sample of the test split, for tests that must not depend on apt.
pub fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fashion-mnist-sample")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_sample_loads_with_labels() {
        let data = load(&sample_dir(), Split::Test).unwrap();
        assert_eq!(data.images.len(), 500);
        assert_eq!((data.images.rows, data.images.cols), (28, 28));
        let labels = data.labels.unwrap();
        assert_eq!(labels.len(), 500);
        assert!(labels.iter().all(|&l| (l as usize) < LABELS.len()));
        // Every class appears in the first 500 test images.
        for class in 0..10u8 {
            assert!(labels.contains(&class), "class {class} missing");
        }
    }
}
