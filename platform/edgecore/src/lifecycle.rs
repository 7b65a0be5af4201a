//! A container's lifecycle as one state machine: the states Kubernetes reports
//! (`waiting`, `running`, `terminated`) and the one function, [`transition`], that moves between
//! them. Edged feeds it what happened (an adoption, a start, an exit, a reason it cannot start,
//! a back-off); an event that makes no sense in the current state is refused, not applied.
//!
//! ```text
//!                 Adopted / Started                Exited
//!   Waiting ------------------------> Running --------------> Terminated
//!    ^  |  \____ Recovered (agent restart) _______________________^  |
//!    |  '-- CannotStart / BackOff --> Waiting <-- CannotStart / BackOff
//!    '---------------------------- Started (restart) <---------------'
//! ```

use crate::runtime::Exit;

/// Why a container is waiting when it was just created.
pub const CREATING: &str = "ContainerCreating";
/// Why a container is waiting out its restart back-off.
pub const CRASH_LOOP: &str = "CrashLoopBackOff";

/// How a container ended, as `lastState.terminated` and `state.terminated` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// The exit code (128 + signal; 255 when unknown).
    pub code: i32,
    /// `Completed`, `Error` or `Unknown`.
    pub reason: String,
    /// Said when the reason needs it.
    pub message: Option<String>,
    /// When it started (RFC 3339; empty when never known).
    pub started_at: String,
    /// When it ended.
    pub finished_at: String,
}

/// Where a container is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not running: being created, cannot start (`reason` says why), or backing off.
    Waiting {
        /// `ContainerCreating`, `CrashLoopBackOff`, `CreateContainerConfigError`, ...
        reason: String,
        /// The detail, or empty.
        message: String,
    },
    /// Its process runs.
    Running {
        /// When it started.
        started_at: String,
    },
    /// Its process ended.
    Terminated(Termination),
}

impl Default for State {
    fn default() -> Self {
        State::Waiting {
            reason: CREATING.into(),
            message: String::new(),
        }
    }
}

impl State {
    /// Whether the container waits out a crash-loop back-off.
    pub fn crash_looping(&self) -> bool {
        matches!(self, State::Waiting { reason, .. } if reason == CRASH_LOOP)
    }

    /// When the running container started, or empty.
    pub fn started_at(&self) -> &str {
        match self {
            State::Running { started_at } => started_at,
            _ => "",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            State::Waiting { .. } => "waiting",
            State::Running { .. } => "running",
            State::Terminated(_) => "terminated",
        }
    }
}

/// What happened to a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process from before the agent's restart still runs and was adopted.
    Adopted {
        /// When it started, from the record.
        started_at: String,
    },
    /// The agent restarted and the record says how the container last ended (or that it ended
    /// while the agent was away).
    Recovered(Termination),
    /// The runtime started it.
    Started {
        /// Now.
        at: String,
    },
    /// Its process ended.
    Exited {
        /// How.
        exit: Exit,
        /// Now.
        at: String,
    },
    /// It cannot start (bad spec, missing image, runtime error); tried again later.
    CannotStart {
        /// Kubernetes' reason (`CreateContainerConfigError`, `ErrImagePull`, ...).
        reason: String,
        /// What was wrong.
        message: String,
    },
    /// It ended and waits out its back-off before the next start.
    BackOff {
        /// `back-off 10s restarting failed container=...`.
        message: String,
    },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Adopted { .. } => "Adopted",
            Event::Recovered(_) => "Recovered",
            Event::Started { .. } => "Started",
            Event::Exited { .. } => "Exited",
            Event::CannotStart { .. } => "CannotStart",
            Event::BackOff { .. } => "BackOff",
        }
    }
}

/// An event the current state cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} container cannot take {event}")]
pub struct Illegal {
    /// The state.
    pub state: &'static str,
    /// The event.
    pub event: &'static str,
}

/// The one place a container's state changes: `from` after `event`, or why not.
pub fn transition(from: &State, event: Event) -> Result<State, Illegal> {
    use State::*;
    let illegal = |e: &Event| Illegal {
        state: from.name(),
        event: e.name(),
    };
    match (from, event) {
        // A process runs only after a start, or an adoption when the agent starts.
        (Waiting { .. }, Event::Adopted { started_at }) => Ok(Running { started_at }),
        (Waiting { .. } | Terminated(_), Event::Started { at }) => Ok(Running { started_at: at }),
        // Only a running process can end; its start time carries over.
        (Running { started_at }, Event::Exited { exit, at }) => {
            let code = exit.code();
            let reason = match exit {
                Exit::Unknown => "Unknown",
                Exit::OomKilled(_) => "OOMKilled",
                _ if code == 0 => "Completed",
                _ => "Error",
            };
            Ok(Terminated(Termination {
                code,
                reason: reason.into(),
                message: None,
                started_at: started_at.clone(),
                finished_at: at,
            }))
        }
        // What a record says is known only before anything else happened.
        (Waiting { reason, .. }, Event::Recovered(t)) if reason == CREATING => Ok(Terminated(t)),
        (Waiting { .. } | Terminated(_), Event::CannotStart { reason, message }) => {
            Ok(Waiting { reason, message })
        }
        (Waiting { .. } | Terminated(_), Event::BackOff { message }) => Ok(Waiting {
            reason: CRASH_LOOP.into(),
            message,
        }),
        (_, e) => Err(illegal(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> State {
        State::Running {
            started_at: "t0".into(),
        }
    }

    fn terminated(code: i32) -> State {
        transition(
            &running(),
            Event::Exited {
                exit: Exit::Code(code),
                at: "t1".into(),
            },
        )
        .unwrap()
    }

    fn cannot_start() -> Event {
        Event::CannotStart {
            reason: "CreateContainerConfigError".into(),
            message: "configmap \"x\" not found".into(),
        }
    }

    fn backoff() -> Event {
        Event::BackOff {
            message: "back-off 10s".into(),
        }
    }

    #[test]
    fn a_new_container_is_being_created() {
        assert_eq!(
            State::default(),
            State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new()
            }
        );
    }

    #[test]
    fn started_runs_from_waiting_and_from_terminated() {
        for from in [State::default(), terminated(1), terminated(0)] {
            let s = transition(&from, Event::Started { at: "t2".into() }).unwrap();
            assert_eq!(s.started_at(), "t2");
        }
        let e = transition(&running(), Event::Started { at: "t2".into() }).unwrap_err();
        assert_eq!(e.to_string(), "a running container cannot take Started");
    }

    #[test]
    fn adopted_runs_only_from_waiting() {
        let s = transition(
            &State::default(),
            Event::Adopted {
                started_at: "t0".into(),
            },
        )
        .unwrap();
        assert_eq!(s, running());
        for from in [running(), terminated(0)] {
            assert!(
                transition(
                    &from,
                    Event::Adopted {
                        started_at: "t0".into()
                    }
                )
                .is_err()
            );
        }
    }

    #[test]
    fn exited_keeps_the_start_time_and_names_the_reason() {
        let cases = [
            (Exit::Code(0), 0, "Completed"),
            (Exit::Code(2), 2, "Error"),
            (Exit::Signal(9), 137, "Error"),
            (Exit::Unknown, 255, "Unknown"),
        ];
        for (exit, code, reason) in cases {
            let s = transition(
                &running(),
                Event::Exited {
                    exit,
                    at: "t1".into(),
                },
            )
            .unwrap();
            let State::Terminated(t) = s else {
                panic!("{s:?}")
            };
            assert_eq!((t.code, t.reason.as_str()), (code, reason));
            assert_eq!(
                (t.started_at.as_str(), t.finished_at.as_str()),
                ("t0", "t1")
            );
        }
        // Nothing runs, so nothing can exit.
        for from in [State::default(), terminated(0)] {
            let ev = Event::Exited {
                exit: Exit::Code(0),
                at: "t1".into(),
            };
            assert!(transition(&from, ev).is_err());
        }
    }

    #[test]
    fn recovered_applies_only_to_a_container_being_created() {
        let t = Termination {
            code: 255,
            reason: "Unknown".into(),
            message: Some("ended while the agent was away".into()),
            started_at: "t0".into(),
            finished_at: "t1".into(),
        };
        assert_eq!(
            transition(&State::default(), Event::Recovered(t.clone())).unwrap(),
            State::Terminated(t.clone())
        );
        let backing_off = transition(&terminated(1), backoff()).unwrap();
        for from in [running(), terminated(1), backing_off] {
            assert!(transition(&from, Event::Recovered(t.clone())).is_err());
        }
    }

    #[test]
    fn cannot_start_waits_with_the_reason() {
        for from in [State::default(), terminated(1)] {
            let s = transition(&from, cannot_start()).unwrap();
            assert_eq!(
                s,
                State::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: "configmap \"x\" not found".into()
                }
            );
        }
        // A running container does not fail to start.
        assert!(transition(&running(), cannot_start()).is_err());
    }

    #[test]
    fn backoff_is_a_crash_loop_after_an_exit_or_a_failed_start() {
        let s = transition(&terminated(1), backoff()).unwrap();
        assert!(s.crash_looping());
        let again = transition(&s, backoff()).unwrap();
        assert_eq!(s, again);
        let after_failure = transition(&State::default(), cannot_start()).unwrap();
        assert!(
            transition(&after_failure, backoff())
                .unwrap()
                .crash_looping()
        );
        assert!(transition(&running(), backoff()).is_err());
    }
}
