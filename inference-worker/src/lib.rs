//! Sedge's inference workers.
//!
//! * The **edge worker** ([`edge`]) runs a small ONNX model next to the data, decides with a
//!   hard-example mining rule ([`mining`]) which results it cannot trust, and offloads only those
//!   samples to the cloud ([`client`]), falling back to its own answer when the cloud is down
//!   ([`breaker`]).
//! * The **cloud worker** ([`server`]) serves a bigger model over the Open Inference Protocol
//!   (REST and gRPC, [`oip`]) and Sedna's `/sedna/predict`, batching concurrent requests
//!   ([`batcher`]).
//!
//! * Incremental learning's **train worker** ([`train`]) fine-tunes an ONNX model with candle and
//!   writes the weights back into the graph; the **eval worker** ([`eval`]) scores models with
//!   Sedna's list metrics; the edge worker takes new models while it runs ([`hot_update`]).
//!
//! Both run ONNX models through one [`backend::Backend`] trait, with tract (pure Rust) and ONNX
//! Runtime implementations.

pub mod backend;
pub mod batcher;
pub mod breaker;
pub mod client;
pub mod config;
pub mod device_source;
pub mod edge;
pub mod eval;
pub mod fetch;
pub mod hard_examples;
pub mod hot_update;
pub mod joint;
pub mod lc;
pub mod metrics;
pub use sedge_worker_contract::mining;
pub mod model;
pub mod oip;
pub mod pipeline;
pub mod preprocess;
pub mod report;
pub mod server;
pub mod source;
pub mod train;

/// Code generated from `proto/grpc_predict_v2.proto` (package `inference`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("inference");
}
