//! The IDX format of (Fashion-)MNIST: a big-endian header followed by raw `u8` data.
//!
//! Files may be gzipped (Debian ships `*.gz`); gzip is recognised by its magic bytes, not by the
//! file name. A header that promises more data than the file holds is an error, and nothing is
//! allocated from the header's claim before the data is known to be there.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DatasetError;

/// Magic number of an IDX file of unsigned-byte 3-D data (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte 1-D data (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// A set of equally sized greyscale images, stored contiguously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Rows of each image.
    pub rows: usize,
    /// Columns of each image.
    pub cols: usize,
    /// `count * rows * cols` pixels, image after image, row-major.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels
            .len()
            .checked_div(self.rows * self.cols)
            .unwrap_or(0)
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The first `n` images (all of them if there are fewer).
    pub fn take(&self, n: usize) -> IdxImages {
        let n = n.min(self.len());
        IdxImages {
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..n * self.rows * self.cols].to_vec(),
        }
    }
}

/// Images with their labels, if a labels file was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledImages {
    /// The images.
    pub images: IdxImages,
    /// One label per image, when known.
    pub labels: Option<Vec<u8>>,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DatasetError> {
    let raw = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DatasetError::io(path, e))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(data: &[u8], at: usize, path: &Path, header_len: usize) -> Result<u32, DatasetError> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| DatasetError::Truncated {
            path: path.to_path_buf(),
            expected: header_len,
            found: data.len(),
        })
}

fn check_magic(
    data: &[u8],
    path: &Path,
    what: &'static str,
    expected: u32,
    header_len: usize,
) -> Result<(), DatasetError> {
    let found = be_u32(data, 0, path, header_len)?;
    if found != expected {
        return Err(DatasetError::BadMagic {
            path: path.to_path_buf(),
            what,
            found,
            expected,
        });
    }
    Ok(())
}

/// Parses IDX image data already in memory; `path` is only used in error messages.
pub fn parse_images(data: &[u8], path: &Path) -> Result<IdxImages, DatasetError> {
    check_magic(data, path, "images", IMAGES_MAGIC, 16)?;
    let count = be_u32(data, 4, path, 16)? as usize;
    let rows = be_u32(data, 8, path, 16)? as usize;
    let cols = be_u32(data, 12, path, 16)? as usize;
    let expected = count
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .unwrap_or(usize::MAX);
    let body = &data[16..];
    if body.len() < expected {
        return Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: body.len(),
        });
    }
    Ok(IdxImages {
        rows,
        cols,
        pixels: body[..expected].to_vec(),
    })
}

/// Parses IDX label data already in memory; `path` is only used in error messages.
pub fn parse_labels(data: &[u8], path: &Path) -> Result<Vec<u8>, DatasetError> {
    check_magic(data, path, "labels", LABELS_MAGIC, 8)?;
    let count = be_u32(data, 4, path, 8)? as usize;
    let body = &data[8..];
    if body.len() < count {
        return Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected: count,
            found: body.len(),
        });
    }
    Ok(body[..count].to_vec())
}

/// Reads an IDX images file (gzipped or not).
pub fn read_images(path: impl AsRef<Path>) -> Result<IdxImages, DatasetError> {
    let path = path.as_ref();
    parse_images(&read_maybe_gz(path)?, path)
}

/// Reads an IDX labels file (gzipped or not).
pub fn read_labels(path: impl AsRef<Path>) -> Result<Vec<u8>, DatasetError> {
    let path = path.as_ref();
    parse_labels(&read_maybe_gz(path)?, path)
}

/// The labels file that belongs to an images file by the (Fashion-)MNIST naming convention
/// (`t10k-images-idx3-ubyte[.gz]` -> `t10k-labels-idx1-ubyte[.gz]`), if it exists.
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    if !name.contains("images-idx3") {
        return None;
    }
    let candidate = images.with_file_name(name.replace("images-idx3", "labels-idx1"));
    candidate.exists().then_some(candidate)
}

/// Reads an images file and, when its labels file sits beside it, the labels too.
pub fn read_labeled(images: impl AsRef<Path>) -> Result<LabeledImages, DatasetError> {
    let images_path = images.as_ref();
    let images = read_images(images_path)?;
    let labels = match labels_path_for(images_path) {
        Some(labels_path) => {
            let labels = read_labels(&labels_path)?;
            if labels.len() != images.len() {
                return Err(DatasetError::CountMismatch {
                    images: images_path.to_path_buf(),
                    image_count: images.len(),
                    labels: labels_path,
                    label_count: labels.len(),
                });
            }
            Some(labels)
        }
        None => None,
    };
    Ok(LabeledImages { images, labels })
}

/// Encodes images as IDX bytes.
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    for v in [
        IMAGES_MAGIC,
        images.len() as u32,
        images.rows as u32,
        images.cols as u32,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Encodes labels as IDX bytes.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

/// Writes `data` to `path`, gzipped when the name ends in `.gz`.
pub fn write_file(path: impl AsRef<Path>, data: &[u8]) -> Result<(), DatasetError> {
    use std::io::Write;
    let path = path.as_ref();
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).map_err(|e| DatasetError::io(path, e))?;
        enc.finish().map_err(|e| DatasetError::io(path, e))?
    } else {
        data.to_vec()
    };
    std::fs::write(path, bytes).map_err(|e| DatasetError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IdxImages {
        IdxImages {
            rows: 2,
            cols: 3,
            pixels: (0..12).collect(),
        }
    }

    #[test]
    fn images_round_trip() {
        let imgs = sample();
        let parsed = parse_images(&encode_images(&imgs), Path::new("x")).unwrap();
        assert_eq!(parsed, imgs);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed.image(1), &[6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn labels_round_trip() {
        let parsed = parse_labels(&encode_labels(&[3, 1, 4]), Path::new("x")).unwrap();
        assert_eq!(parsed, vec![3, 1, 4]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = encode_images(&sample());
        for cut in 0..bytes.len() {
            let err = parse_images(&bytes[..cut], Path::new("imgs")).unwrap_err();
            assert!(
                matches!(err, DatasetError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
            assert!(err.to_string().starts_with("imgs: truncated"), "{err}");
        }
        let labels = encode_labels(&[1, 2, 3]);
        for cut in 0..labels.len() {
            assert!(parse_labels(&labels[..cut], Path::new("l")).is_err());
        }
    }

    #[test]
    fn wrong_magic_names_both_numbers() {
        let err = parse_images(&encode_labels(&[1]), Path::new("f")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f: not an IDX images file: magic number 0x00000801, expected 0x00000803"
        );
    }

    #[test]
    fn huge_header_claim_does_not_allocate() {
        let mut bytes = encode_images(&sample());
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        bytes[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = parse_images(&bytes, Path::new("f")).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { .. }));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = parse_images(&bytes, Path::new("g"));
            let _ = parse_labels(&bytes, Path::new("g"));
        }
    }

    #[test]
    fn gzip_files_are_detected_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("t10k-images-idx3-ubyte.gz");
        write_file(&gz, &encode_images(&sample())).unwrap();
        write_file(
            dir.path().join("t10k-labels-idx1-ubyte.gz"),
            &encode_labels(&[7, 9]),
        )
        .unwrap();
        let plain = dir.path().join("plain-name");
        std::fs::copy(&gz, &plain).unwrap();
        assert_eq!(read_images(&plain).unwrap(), sample());
        let both = read_labeled(&gz).unwrap();
        assert_eq!(both.labels, Some(vec![7, 9]));
    }

    #[test]
    fn label_count_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = dir.path().join("a-images-idx3-ubyte");
        write_file(&imgs, &encode_images(&sample())).unwrap();
        write_file(
            dir.path().join("a-labels-idx1-ubyte"),
            &encode_labels(&[1, 2, 3]),
        )
        .unwrap();
        let err = read_labeled(&imgs).unwrap_err();
        assert!(err.to_string().contains("has 2 images but"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_images("/nonexistent/t10k-images-idx3-ubyte.gz").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/t10k-images-idx3-ubyte.gz: "),
            "{err}"
        );
    }
}
