//! The AI controller's counters, served on `/metrics` by whichever process runs it (`sedge
//! ai-controller`, or `sedge up` next to the cloud core's).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Reconciles of one controller.
#[derive(Debug, Default)]
pub struct Reconciles {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Reconciles {
    /// None counted yet (usable in a `static`).
    pub const fn new() -> Self {
        Reconciles {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Counts one outcome.
    pub fn count<T, E>(&self, r: &Result<T, E>) {
        match r {
            Ok(_) => self.ok.fetch_add(1, Relaxed),
            Err(_) => self.failed.fetch_add(1, Relaxed),
        };
    }
}

/// JointInferenceService reconciles.
pub static JOINT_INFERENCE: Reconciles = Reconciles::new();
/// IncrementalLearningJob reconciles.
pub static INCREMENTAL_LEARNING: Reconciles = Reconciles::new();

/// Adds the controller's counters to `e`.
pub fn render(e: &mut sedge_serve::Exposition) {
    for (name, r) in [
        ("jointinference", &JOINT_INFERENCE),
        ("incrementallearning", &INCREMENTAL_LEARNING),
    ] {
        e.counter(
            &format!("ai_{name}_reconciles"),
            "Reconciles that finished",
            r.ok.load(Relaxed),
        )
        .counter(
            &format!("ai_{name}_reconcile_errors"),
            "Reconciles that failed (retried with back-off)",
            r.failed.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_under_their_names() {
        let r = Reconciles::new();
        r.count::<(), ()>(&Ok(()));
        r.count::<(), ()>(&Err(()));
        r.count::<(), ()>(&Ok(()));
        assert_eq!((r.ok.load(Relaxed), r.failed.load(Relaxed)), (2, 1));
        let mut e = sedge_serve::Exposition::new();
        render(&mut e);
        let text = e.encode();
        assert!(
            text.contains("sedge_ai_jointinference_reconciles_total"),
            "{text}"
        );
        assert!(
            text.contains("sedge_ai_incrementallearning_reconcile_errors_total"),
            "{text}"
        );
    }
}
