//! The eval worker: scores models on labelled samples and reports Sedna's metric shape (every
//! metric a list of numbers: per-class `precision` and `recall`, and `accuracy` as a one-element
//! list).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{self, BackendOptions};
use crate::model::Model;
use crate::preprocess::{Normalizer, activate, argmax};
use crate::source::{Payload, Source};
use crate::train::Labelled;

/// Why samples could not be loaded or a model not scored.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] sedge_datasets::DatasetError),
    /// A sample is unusable.
    #[error("{0}")]
    Sample(String),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The model could not be run.
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

/// Loads up to `limit` labelled samples from an IDX file, a Sedna index (`.txt`/`.csv`, paths
/// relative to the index) or an image directory. Every sample must carry a label and decode to
/// `rows x cols` pixels; the first that does not is an error naming it.
pub fn load_labelled(
    path: &Path,
    rows: usize,
    cols: usize,
    limit: Option<usize>,
) -> Result<Vec<Labelled>, EvalError> {
    let mut out = Vec::new();
    for s in Source::from_path(path).open(limit)? {
        let label = s
            .label
            .ok_or_else(|| EvalError::Sample(format!("sample {} has no label", s.id)))?;
        let pixels = match s.payload {
            Payload::Pixels(p) => p,
            Payload::Encoded { path, bytes } => {
                sedge_datasets::export::decode_grey(&bytes, &path, rows, cols)?
            }
            Payload::Unreadable(e) => return Err(EvalError::Sample(e)),
        };
        if pixels.len() != rows * cols {
            return Err(EvalError::Sample(format!(
                "sample {} has {} pixels, expected {}",
                s.id,
                pixels.len(),
                rows * cols
            )));
        }
        out.push(Labelled { pixels, label });
    }
    Ok(out)
}

/// Scores of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Samples scored.
    pub samples: usize,
    /// Share answered correctly.
    pub accuracy: f64,
    /// Per class: correct among predicted as that class (0 when never predicted).
    pub precision: Vec<f64>,
    /// Per class: correct among samples of that class (0 when the class is absent).
    pub recall: Vec<f64>,
}

impl Scores {
    /// From predicted and true classes.
    pub fn from_predictions(predicted: &[usize], truth: &[u32], classes: usize) -> Scores {
        let mut tp = vec![0usize; classes];
        let mut pred = vec![0usize; classes];
        let mut actual = vec![0usize; classes];
        for (&p, &t) in predicted.iter().zip(truth) {
            let t = t as usize;
            if p < classes {
                pred[p] += 1;
            }
            if t < classes {
                actual[t] += 1;
            }
            if p == t && p < classes {
                tp[p] += 1;
            }
        }
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Scores {
            samples: predicted.len(),
            accuracy: ratio(tp.iter().sum(), predicted.len()),
            precision: (0..classes).map(|c| ratio(tp[c], pred[c])).collect(),
            recall: (0..classes).map(|c| ratio(tp[c], actual[c])).collect(),
        }
    }

    /// Sedna's shape: every metric a list of numbers.
    pub fn sedna_metrics(&self) -> BTreeMap<String, Vec<f64>> {
        BTreeMap::from([
            ("accuracy".to_string(), vec![self.accuracy]),
            ("precision".to_string(), self.precision.clone()),
            ("recall".to_string(), self.recall.clone()),
        ])
    }
}

/// Class probabilities (the model's output after its activation) of every sample, run in
/// batches of 256.
pub fn probabilities(
    model: &Model,
    opts: &BackendOptions,
    samples: &[Labelled],
) -> Result<Vec<Vec<f32>>, EvalError> {
    let backend = backend::load(model, opts)?;
    let norm = Normalizer::new(&model.config.input);
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(256) {
        let mut input = Vec::with_capacity(chunk.len() * model.config.sample_len());
        for s in chunk {
            norm.extend(&s.pixels, &mut input);
        }
        let mut y = backend.run(&input, chunk.len())?;
        let per = y.len() / chunk.len();
        for row in y.chunks_mut(per.max(1)) {
            activate(row, model.config.output.activation);
            out.push(row.to_vec());
        }
    }
    Ok(out)
}

/// Runs `model` on `samples` and scores it.
pub fn score(
    model: &Model,
    opts: &BackendOptions,
    samples: &[Labelled],
) -> Result<Scores, EvalError> {
    let predicted: Vec<usize> = probabilities(model, opts, samples)?
        .iter()
        .map(|row| argmax(row).map(|(l, _)| l).unwrap_or(usize::MAX))
        .collect();
    let truth: Vec<u32> = samples.iter().map(|s| s.label).collect();
    Ok(Scores::from_predictions(
        &predicted,
        &truth,
        model.config.labels.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_and_recall_per_class() {
        // truth 0 0 1 1 2, predicted 0 1 1 1 0
        let s = Scores::from_predictions(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], 3);
        assert_eq!(s.samples, 5);
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        assert_eq!(s.precision, vec![0.5, 2.0 / 3.0, 0.0]);
        assert_eq!(s.recall, vec![0.5, 1.0, 0.0]);
        let m = s.sedna_metrics();
        assert_eq!(m["accuracy"], vec![0.6]);
        assert_eq!(m["precision"].len(), 3);
    }
}

/// One model's result, in Sedna's shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// `onnx`.
    pub format: String,
    /// The model scored.
    pub url: String,
    /// `accuracy`, per-class `precision` and `recall`.
    pub metrics: BTreeMap<String, Vec<f64>>,
}

/// Runs an eval job (`MODEL_URLS` split on `;`, `TEST_DATASET_URL`): every model on the same
/// samples, in the order given (Sedna's deploy decision reads them as `[new, old]`).
pub fn run(
    model_urls: &str,
    test_data: &Path,
    opts: &BackendOptions,
) -> Result<Vec<EvalResult>, EvalError> {
    let urls: Vec<&str> = model_urls
        .split(';')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(EvalError::Sample("MODEL_URLS names no model".into()));
    }
    let mut out = Vec::with_capacity(urls.len());
    let mut samples: Option<Vec<Labelled>> = None;
    for url in urls {
        let model = Model::load(url)?;
        let (rows, cols) = model.config.input.image_dims();
        let s = match &samples {
            Some(s) => s,
            None => samples.insert(load_labelled(test_data, rows, cols, None)?),
        };
        if s.is_empty() {
            return Err(EvalError::Sample(format!(
                "{} holds no samples",
                test_data.display()
            )));
        }
        let scores = score(&model, opts, s)?;
        out.push(EvalResult {
            format: "onnx".into(),
            url: model.path.display().to_string(),
            metrics: scores.sedna_metrics(),
        });
    }
    Ok(out)
}
