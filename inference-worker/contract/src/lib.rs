//! The contract between the AI controller (which writes pod specs and files) and the workers
//! (which read them): Sedna's environment variables and Sedge's additions, the workers' exit
//! codes, the hard-example mining rules and their parameters, and the hot-update file. Both sides
//! use these names and parsers, so neither spells them on its own, and the controller checks a
//! mining rule without linking a model backend.

pub mod env;
pub mod hot_update;
pub mod mining;
pub mod model;

/// Exit codes of the workers that the controller reads.
pub mod exit {
    /// The worker cannot get or load its model (the controller reports `ModelUnavailable`).
    pub const MODEL_UNAVAILABLE: i32 = 3;
}
