//! The `sedge` command as a library: each subcommand's flags and the function that runs it,
//! so that tests can start any role in process; `main.rs` only parses the command line.

pub mod apiserver;
pub mod images;
pub mod platform;
pub mod tools;
pub mod tunnel;
pub mod worker;

pub use sedge_edge::shutdown_signal;
