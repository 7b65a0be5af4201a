//! A circuit breaker for the cloud: after `failures` consecutive failures the edge stops calling
//! the cloud for `cooldown`, then lets one probe through; the probe's outcome closes or reopens it.
//! While open, hard examples keep their edge result at once, so the worker never waits on a cloud
//! that is known to be down.
//!
//! ```text
//!   Closed --(failures in a row)--> Open --(cooldown over)--> HalfOpen (one probe)
//!     ^                              ^                              |
//!     +--------(probe succeeds)------+----------(probe fails)-------+
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state; every transition is in [`CircuitBreaker`]'s three methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; counts consecutive failures.
    Closed {
        /// Failures in a row so far.
        failures: u32,
    },
    /// Calls are refused until `until`.
    Open {
        /// When a probe may go through.
        until: Instant,
    },
    /// One probe is in flight; other calls are refused.
    HalfOpen,
}

/// Thread-safe circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    cooldown: Duration,
}

impl CircuitBreaker {
    /// Opens after `threshold` consecutive failures (at least 1), for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        *self.state.lock().expect("breaker poisoned")
    }

    /// May a call go through now? An open breaker whose cooldown is over admits one probe.
    pub fn allow(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("breaker poisoned");
        match *s {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *s = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    /// Records a successful call: the breaker closes.
    pub fn success(&self) {
        *self.state.lock().expect("breaker poisoned") = BreakerState::Closed { failures: 0 };
    }

    /// Records a failed call. Returns true when this failure opened the breaker.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("breaker poisoned");
        let next = match *s {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            BreakerState::Closed { .. } | BreakerState::HalfOpen => BreakerState::Open {
                until: now + self.cooldown,
            },
            open @ BreakerState::Open { .. } => open,
        };
        let opened =
            matches!(next, BreakerState::Open { .. }) && !matches!(*s, BreakerState::Open { .. });
        *s = next;
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown() {
        let b = CircuitBreaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert!(!b.failure(t0) && !b.failure(t0));
        assert!(b.failure(t0), "third failure in a row opens");
        assert!(!b.allow(t0 + Duration::from_secs(9)));
        assert!(
            b.allow(t0 + Duration::from_secs(10)),
            "one probe after the cooldown"
        );
        assert!(!b.allow(t0 + Duration::from_secs(10)), "only one");
        assert!(
            b.failure(t0 + Duration::from_secs(11)),
            "failed probe reopens"
        );
        assert!(!b.allow(t0 + Duration::from_secs(12)));
        assert!(b.allow(t0 + Duration::from_secs(21)));
        b.success();
        assert!(b.allow(t0 + Duration::from_secs(21)));
    }
}
