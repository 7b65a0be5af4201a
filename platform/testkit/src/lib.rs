//! Test support shared by Sedge's crates; a dev-dependency only, never linked into a binary.
//!
//! [`fuzz`]: a small, deterministic mutation fuzzer run by `make test` over every decoder that
//! takes bytes from across a trust boundary (channel frames, request bodies, OIP requests, index
//! files). It is not a replacement for coverage-guided fuzzing (cargo-fuzz needs a nightly
//! toolchain these machines do not have); it is the bounded corpus run the suite can afford on
//! every change, and a failure prints the input that broke the decoder.
//!
//! [`port`]: loopback ports for a test's servers, picked below the kernel's ephemeral range.
//!
//! [`wait`]: waiting for a condition with a deadline (blocking and async), which every crate's
//! tests use.

pub mod containerd;
pub mod fuzz;
pub mod port;
pub mod wait;
