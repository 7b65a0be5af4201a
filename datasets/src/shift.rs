//! A reproducible domain shift: Fashion-MNIST as seen by a different camera.
//!
//! The incremental-learning benchmark and example need a stream the edge model handles badly and
//! that it can learn. [`CameraShift`] models a new sensor: lower contrast, a brightness offset
//! (the black background turns grey) and Gaussian sensor noise. The noise of image `i` depends
//! only on the seed and `i`, so the same seed gives the same images on every machine and run.

/// Parameters of the shift. `shifted = clamp(contrast * p + brightness + noise)`, noise
/// `N(0, noise_sigma²)` per pixel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CameraShift {
    /// Multiplies every pixel (1 keeps the contrast).
    pub contrast: f32,
    /// Added to every pixel, in grey levels.
    pub brightness: f32,
    /// Standard deviation of the per-pixel noise, in grey levels.
    pub noise_sigma: f32,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for CameraShift {
    /// The shift the benchmark uses: contrast 0.5, brightness +25, noise σ 10, seed 7. It takes
    /// the edge model from 91.7% to 62.8% and the cloud model from 92.9% to 79.7% (so the cloud
    /// can still teach; stronger shifts, such as a +80 offset, leave both near chance).
    fn default() -> Self {
        CameraShift {
            contrast: 0.5,
            brightness: 25.0,
            noise_sigma: 10.0,
            seed: 7,
        }
    }
}

/// SplitMix64: small, fast, and the same on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

impl CameraShift {
    /// Shifts image number `index` in place.
    pub fn apply(&self, pixels: &mut [u8], index: u64) {
        let mut rng = SplitMix(self.seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        for p in pixels {
            let noise = if self.noise_sigma > 0.0 {
                rng.normal() as f32 * self.noise_sigma
            } else {
                0.0
            };
            *p = (self.contrast * f32::from(*p) + self.brightness + noise)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }

    /// Shifts every image of a set (image `i` of the set is image number `first + i`).
    pub fn apply_all(&self, images: &mut crate::IdxImages, first: u64) {
        let per = images.rows * images.cols;
        for (i, img) in images.pixels.chunks_mut(per).enumerate() {
            self.apply(img, first + i as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_image_and_the_shift_is_what_it_says() {
        let s = CameraShift::default();
        let mut a = vec![0u8; 784];
        let mut b = vec![0u8; 784];
        s.apply(&mut a, 3);
        s.apply(&mut b, 3);
        assert_eq!(a, b);
        let mut c = vec![0u8; 784];
        s.apply(&mut c, 4);
        assert_ne!(a, c, "another image gets other noise");
        let mean = a.iter().map(|&p| f64::from(p)).sum::<f64>() / 784.0;
        assert!((mean - 25.0).abs() < 2.0, "black turns grey: mean {mean}");
        let quiet = CameraShift {
            noise_sigma: 0.0,
            ..s
        };
        let mut d = vec![200u8, 0, 255];
        quiet.apply(&mut d, 0);
        assert_eq!(d, vec![125, 25, 153]);
    }
}
