//! From `u8` pixels to model input, and from model output to probabilities and a label.

use crate::model::{Activation, InputSpec};

/// Turns `u8` pixels into normalised `f32` model input through a 256-entry lookup table, so the
/// per-pixel cost is one load.
#[derive(Debug, Clone)]
pub struct Normalizer {
    table: [f32; 256],
}

impl Normalizer {
    /// Builds the table for an input spec.
    pub fn new(spec: &InputSpec) -> Self {
        let mut table = [0f32; 256];
        for (v, slot) in table.iter_mut().enumerate() {
            *slot = (v as f32 * spec.scale - spec.mean) / spec.std;
        }
        Normalizer { table }
    }

    /// Appends the normalised pixels to `out`.
    pub fn extend(&self, pixels: &[u8], out: &mut Vec<f32>) {
        out.extend(pixels.iter().map(|&p| self.table[p as usize]));
    }
}

/// Converts one sample's raw output into probabilities, in place.
pub fn activate(values: &mut [f32], activation: Activation) {
    if activation == Activation::Softmax {
        softmax(values);
    }
}

/// Numerically stable softmax, in place. An empty slice stays empty.
pub fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        values.iter_mut().for_each(|v| *v /= sum);
    }
}

/// Index and value of the largest element (the first one on ties), or `None` for an empty slice.
pub fn argmax(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .copied()
        .enumerate()
        .fold(None, |best, (i, v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizer_applies_scale_mean_std() {
        let spec = InputSpec {
            name: "x".into(),
            shape: vec![2],
            scale: 1.0 / 255.0,
            mean: 0.5,
            std: 0.5,
        };
        let mut out = vec![];
        Normalizer::new(&spec).extend(&[0, 255], &mut out);
        assert!(
            (out[0] + 1.0).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6,
            "{out:?}"
        );
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let mut v = [1000.0, 1000.0, -1000.0];
        softmax(&mut v);
        assert!((v[0] - 0.5).abs() < 1e-6 && v[2] == 0.0);
        let mut empty: [f32; 0] = [];
        softmax(&mut empty);
    }

    #[test]
    fn argmax_first_wins_ties_and_empty_is_none() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7]), Some((1, 0.7)));
        assert_eq!(argmax(&[]), None);
    }
}
