//! Where the edge worker's samples come from: an IDX file, a Sedna index file (`.txt`/`.csv`), a
//! directory of images, or a device's data topic over MQTT ([`crate::device_source`]). Image files are read here and decoded later, in the pipeline, so that
//! decoding is measured as part of the edge's work.

use std::path::{Path, PathBuf};

use sedge_datasets::{DatasetError, idx, index};

/// A sample's content.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Raw pixels, ready for preprocessing.
    Pixels(Vec<u8>),
    /// An encoded image file (PNG/JPEG) still to decode.
    Encoded {
        /// Where it came from.
        path: PathBuf,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The file could not be read; the pipeline reports it for this sample and goes on.
    Unreadable(String),
}

/// One input sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Stable identifier: `<file>#<index>` for IDX, the image path otherwise.
    pub id: String,
    /// Its content.
    pub payload: Payload,
    /// Ground truth, when the source has it.
    pub label: Option<u32>,
}

/// A source of samples.
#[derive(Debug, Clone)]
pub enum Source {
    /// An IDX images file (labels are read from the file beside it when present).
    Idx(PathBuf),
    /// A Sedna index file.
    Index(PathBuf),
    /// Every `.png`, `.jpg` and `.jpeg` in a directory, in name order.
    Dir(PathBuf),
    /// One image file.
    Image(PathBuf),
    /// A device's data topic (`mqtt://<host>:<port>/<topic>`): frames as they arrive.
    Device(crate::device_source::DeviceTopic),
}

impl Source {
    /// Picks the kind from the path: a directory, a `.txt`/`.csv` index, a `.png`/`.jpg`/`.jpeg`
    /// image, else IDX. An `mqtt://` input is a device topic, checked by [`Source::parse`].
    pub fn from_path(path: impl AsRef<Path>) -> Source {
        let path = path.as_ref().to_path_buf();
        if let Some(Ok(t)) = path
            .to_str()
            .filter(|p| p.starts_with("mqtt://"))
            .map(crate::device_source::DeviceTopic::parse)
        {
            return Source::Device(t);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_dir() {
            Source::Dir(path)
        } else if matches!(ext.as_deref(), Some("txt" | "csv")) {
            Source::Index(path)
        } else if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            Source::Image(path)
        } else {
            Source::Idx(path)
        }
    }

    /// The input as a user wrote it: a device topic (`mqtt://...`, whose errors are named here)
    /// or a path ([`Source::from_path`]).
    pub fn parse(input: &str) -> Result<Source, String> {
        if input.starts_with("mqtt://") {
            return crate::device_source::DeviceTopic::parse(input).map(Source::Device);
        }
        Ok(Source::from_path(input))
    }

    /// Loads the listing (and, for IDX, the pixels); image files are read lazily by the iterator.
    pub fn open(
        &self,
        limit: Option<usize>,
    ) -> Result<Box<dyn Iterator<Item = Sample> + Send>, DatasetError> {
        let limit = limit.unwrap_or(usize::MAX);
        match self {
            Source::Device(t) => Ok(t.open(Some(limit))),
            Source::Idx(path) => {
                let data = idx::read_labeled(path)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let n = data.images.len().min(limit);
                Ok(Box::new((0..n).map(move |i| Sample {
                    id: format!("{name}#{i}"),
                    payload: Payload::Pixels(data.images.image(i).to_vec()),
                    label: data.labels.as_ref().map(|l| u32::from(l[i])),
                })))
            }
            Source::Index(path) => {
                let entries = index::read(path)?;
                Ok(Box::new(
                    entries
                        .into_iter()
                        .take(limit)
                        .map(|e| file_sample(e.path, e.label)),
                ))
            }
            Source::Dir(dir) => {
                let read = std::fs::read_dir(dir).map_err(|e| DatasetError::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                let mut files: Vec<PathBuf> = read
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                        })
                    })
                    .collect();
                files.sort();
                Ok(Box::new(
                    files.into_iter().take(limit).map(|p| file_sample(p, None)),
                ))
            }
            Source::Image(path) => {
                if !path.is_file() {
                    return Err(DatasetError::Io {
                        path: path.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    });
                }
                Ok(Box::new(
                    std::iter::once(file_sample(path.clone(), None)).take(limit),
                ))
            }
        }
    }
}

fn file_sample(path: PathBuf, label: Option<u32>) -> Sample {
    let payload = match std::fs::read(&path) {
        Ok(bytes) => Payload::Encoded {
            path: path.clone(),
            bytes,
        },
        Err(e) => Payload::Unreadable(format!("{}: {e}", path.display())),
    };
    Sample {
        id: path.display().to_string(),
        payload,
        label,
    }
}
