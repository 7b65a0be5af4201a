//! Mutations of seed inputs: bit flips, boundary bytes, insertions, deletions, repeats (deep
//! nesting and long runs), truncation and splices of two seeds. The same seed (default fixed,
//! `SEDGE_FUZZ_SEED` to vary it) gives the same inputs, so a failure reproduces; iterations
//! default to the caller's number and `SEDGE_FUZZ_ITERS` scales a longer run.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Inputs tried.
    pub inputs: usize,
    /// Inputs the decoder accepted (the check returned true).
    pub accepted: usize,
    /// Largest input tried, bytes.
    pub largest: usize,
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// One mutation of `input`, with `other` available for splices.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0u8, 0xff, 0x7f, 0x80, b'[', b'{', b'"', b'\n'][rng.random_range(0..8)];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 64));
                out.drain(i..j);
            }
            4 if len > 0 => {
                // A run repeated many times: nesting, long strings, huge counts.
                let i = rng.random_range(0..len);
                let j = rng.random_range(i + 1..=len.min(i + 8));
                let chunk = out[i..j].to_vec();
                let times = rng.random_range(2..2000);
                let rep: Vec<u8> = chunk
                    .iter()
                    .copied()
                    .cycle()
                    .take(chunk.len() * times)
                    .collect();
                out.splice(i..i, rep);
            }
            5 if len > 0 => out.truncate(rng.random_range(0..len)),
            6 if !other.is_empty() => {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                let i = rng.random_range(0..=len);
                out.insert(i, rng.random());
            }
        }
    }
    out
}

/// Runs `check` on every seed and on `iterations` mutations of them. `check` returns whether
/// the decoder accepted the input; it must not panic. A panic fails the run with the input's
/// length and first bytes (hex) and the seed that reproduces it.
pub fn run(seeds: &[&[u8]], iterations: usize, mut check: impl FnMut(&[u8]) -> bool) -> Stats {
    assert!(!seeds.is_empty(), "a fuzz run needs at least one seed");
    let seed = env_number("SEDGE_FUZZ_SEED").unwrap_or(0x5ed6e);
    let iterations = env_number("SEDGE_FUZZ_ITERS").map_or(iterations, |n| n as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let inputs = seeds
        .iter()
        .map(|s| s.to_vec())
        .chain((0..iterations).map(|_| {
            let a = seeds[rng.random_range(0..seeds.len())];
            let b = seeds[rng.random_range(0..seeds.len())];
            mutate(&mut rng, a, b)
        }));
    for input in inputs {
        stats.inputs += 1;
        stats.largest = stats.largest.max(input.len());
        match catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(true) => stats.accepted += 1,
            Ok(false) => {}
            Err(_) => {
                let head: String = input.iter().take(64).map(|b| format!("{b:02x}")).collect();
                panic!(
                    "the decoder panicked on input {} of {} bytes (SEDGE_FUZZ_SEED={seed}); first bytes: {head}",
                    stats.inputs,
                    input.len()
                );
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_deterministic_and_a_panic_names_the_input() {
        let mut a = Vec::new();
        run(&[b"hello"], 50, |i| {
            a.push(i.to_vec());
            true
        });
        let mut b = Vec::new();
        let stats = run(&[b"hello"], 50, |i| {
            b.push(i.to_vec());
            i.starts_with(b"h")
        });
        assert_eq!(a, b);
        assert_eq!(stats.inputs, 51);
        assert!(stats.accepted >= 1 && stats.accepted < 51);
        let e = catch_unwind(|| run(&[b"x"], 10, |i| i.len() < 2 || panic!("boom"))).unwrap_err();
        let msg = e.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("SEDGE_FUZZ_SEED") && msg.contains("bytes"),
            "{msg}"
        );
    }
}
