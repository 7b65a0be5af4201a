//! The lifecycle of an IncrementalLearningJob, as one explicit state machine (Sedna's
//! `transitJobState`, with its failure path fixed).
//!
//! The state is the stage (`Train`, `Eval`, `Deploy`) and phase (`Waiting`, `Ready`, `Starting`,
//! `Running`, `Completed`, `Failed`) of the job's last condition. [`next`] is the only place that
//! decides a transition; the controller feeds it what it observed (an [`Event`]) and appends the
//! condition of the returned [`Transition`], then carries out its [`Action`].
//!
//! | from | event | to | action |
//! |---|---|---|---|
//! | (none) | — | Train/Waiting | create the inference worker |
//! | S/Waiting | the LC's trigger fired for S | S/Ready | — |
//! | Deploy/Waiting | the LC decided not to deploy | Deploy/Completed | — |
//! | S/Waiting | the LC cannot do S (data missing, outputDir not writable, ...) | S/Failed | — |
//! | Train or Eval/Ready | reconcile | S/Starting | create the stage's pod |
//! | Deploy/Ready, cold | reconcile | Deploy/Completed | restart the inference worker |
//! | Deploy/Ready, hot | reconcile | Deploy/Starting | — (the LC swaps the model) |
//! | S/Starting | pod running | S/Running | — |
//! | S/Starting or Running | pod succeeded, or its worker reported completion | S/Completed | — |
//! | S/Starting or Running | pod failed, or its worker reported failure | S/Failed | — |
//! | S/Completed | reconcile | next stage/Waiting (Train -> Eval -> Deploy -> Train) | — |
//! | S/Failed | reconcile, once the back-off has passed | Train/Waiting | — |
//!
//! Anything else leaves the state as it is (a late or repeated report is not an error). Sedna
//! retries a failed stage at once, in a tight loop; here the n-th failure in a row waits
//! [`backoff`]`(n)` (10 s doubling, at most 5 minutes) and the failure's reason stays in the
//! message of the Train/Waiting condition that follows it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A stage of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Retrain the edge model.
    Train,
    /// Score the new model against the deployed one.
    Eval,
    /// Roll the new model out when it is better.
    Deploy,
}

/// The phase within a stage (the condition's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting for the LC's trigger.
    Waiting,
    /// The trigger fired; the controller is to act.
    Ready,
    /// The stage's pod was created.
    Starting,
    /// The stage's pod runs.
    Running,
    /// The stage finished.
    Completed,
    /// The stage failed.
    Failed,
}

macro_rules! names {
    ($t:ty, $($v:ident),*) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$v => stringify!($v)),* })
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $(stringify!($v) => Ok(Self::$v),)* other => Err(format!("unknown {} {other:?}", stringify!($t))) }
            }
        }
    };
}
names!(Stage, Train, Eval, Deploy);
names!(Phase, Waiting, Ready, Starting, Running, Completed, Failed);

impl Stage {
    /// The stage after this one.
    pub fn following(self) -> Stage {
        match self {
            Stage::Train => Stage::Eval,
            Stage::Eval => Stage::Deploy,
            Stage::Deploy => Stage::Train,
        }
    }

    /// Lower-case, as Sedna's workers and annotations spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Stage::Train => "train",
            Stage::Eval => "eval",
            Stage::Deploy => "deploy",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// The stage.
    pub stage: Stage,
    /// Its phase.
    pub phase: Phase,
}

impl State {
    /// Reads a condition's `stage` and `type`.
    pub fn parse(stage: &str, phase: &str) -> Result<State, String> {
        Ok(State {
            stage: stage.parse()?,
            phase: phase.parse()?,
        })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stage, self.phase)
    }
}

/// What the controller observed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A pass of the controller with nothing else new: `waited` is how long the job has been in
    /// its state, `failures` how many Failed conditions came in a row before it.
    Reconcile {
        /// Time since the last condition.
        waited: Duration,
        /// Consecutive failures so far.
        failures: u32,
    },
    /// The LC's trigger for `stage` fired; `data` is its input (JSON).
    LcReady {
        /// The stage.
        stage: Stage,
        /// Input for the stage's worker.
        data: String,
    },
    /// The stage's worker (through the LC) finished; `data` is its output (JSON). For Deploy in
    /// Waiting, it means the LC decided the new model is not better.
    LcCompleted {
        /// The stage.
        stage: Stage,
        /// Output.
        data: String,
    },
    /// The stage's worker (through the LC) failed.
    LcFailed {
        /// The stage.
        stage: Stage,
        /// Why.
        message: String,
    },
    /// The stage's pod runs.
    PodRunning,
    /// The stage's pod exited 0.
    PodSucceeded,
    /// The stage's pod failed (or could not start).
    PodFailed {
        /// Kubernetes' reason (`Error`, `OOMKilled`, `ImagePullBackOff`, ...).
        reason: String,
        /// Details (exit code, last log line).
        message: String,
    },
}

/// What the controller must do after appending the condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Create the inference worker (on the job's first condition).
    CreateInferenceWorker,
    /// Create the stage's pod (train or eval) from its template.
    CreatePod(Stage),
    /// Delete the inference worker's pod so it restarts with the copied model (cold deploy).
    RestartInferenceWorker,
}

/// A condition to append.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The new state.
    pub to: State,
    /// Condition reason.
    pub reason: String,
    /// Condition message.
    pub message: String,
    /// Condition data (the stage's input or output), when there is some.
    pub data: Option<String>,
    /// What to do.
    pub action: Action,
}

fn go(stage: Stage, phase: Phase, reason: &str, message: impl Into<String>) -> Transition {
    Transition {
        to: State { stage, phase },
        reason: reason.to_string(),
        message: message.into(),
        data: None,
        action: Action::None,
    }
}

/// How long to wait before retrying after the `failures`-th failure in a row (1-based): 10 s,
/// 20 s, 40 s, ... at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

/// The first condition of a new job.
pub fn start() -> Transition {
    Transition {
        action: Action::CreateInferenceWorker,
        ..go(
            Stage::Train,
            Phase::Waiting,
            "Created",
            "waiting for the train trigger",
        )
    }
}

/// The transition `event` causes from `from`, or `None` when it causes none.
pub fn next(from: State, event: &Event, hot_update: bool) -> Option<Transition> {
    use Phase::*;
    let State { stage, phase } = from;
    match (phase, event) {
        (Waiting, Event::LcReady { stage: s, data }) if *s == stage => Some(Transition {
            data: Some(data.clone()),
            ..go(stage, Ready, "TriggerFired", "reported by lc")
        }),
        (
            Waiting,
            Event::LcCompleted {
                stage: Stage::Deploy,
                data,
            },
        ) if stage == Stage::Deploy => Some(Transition {
            data: Some(data.clone()),
            ..go(
                stage,
                Completed,
                "NotDeployed",
                "the new model did not meet the deploy trigger; the deployed model stays",
            )
        }),
        (Waiting, Event::LcFailed { stage: s, message }) if *s == stage => {
            Some(go(stage, Failed, "LocalControllerFailed", message.clone()))
        }
        (Ready, Event::Reconcile { .. }) => Some(match stage {
            Stage::Train | Stage::Eval => Transition {
                action: Action::CreatePod(stage),
                ..go(
                    stage,
                    Starting,
                    "PodCreated",
                    format!("{} worker created", stage.lower()),
                )
            },
            Stage::Deploy if hot_update => go(
                stage,
                Starting,
                "HotUpdate",
                "the local controller is handing the new model to the running worker",
            ),
            Stage::Deploy => Transition {
                action: Action::RestartInferenceWorker,
                ..go(
                    stage,
                    Completed,
                    "ColdUpdate",
                    "the new model was copied over the deployed one; the inference worker restarts",
                )
            },
        }),
        (Starting, Event::PodRunning) => Some(go(stage, Running, "PodRunning", "worker running")),
        (Starting | Running, Event::PodSucceeded) => {
            Some(go(stage, Completed, "PodSucceeded", "worker completed"))
        }
        (Starting | Running, Event::LcCompleted { stage: s, data }) if *s == stage => {
            Some(Transition {
                data: Some(data.clone()),
                ..go(stage, Completed, "WorkerCompleted", "reported by lc")
            })
        }
        (Starting | Running, Event::PodFailed { reason, message }) => {
            Some(go(stage, Failed, reason, message.clone()))
        }
        (Starting | Running, Event::LcFailed { stage: s, message }) if *s == stage => {
            Some(go(stage, Failed, "WorkerFailed", message.clone()))
        }
        (Completed, Event::Reconcile { .. }) => {
            let n = stage.following();
            Some(go(
                n,
                Waiting,
                "StageCompleted",
                format!("{stage} completed; waiting for the {} trigger", n.lower()),
            ))
        }
        (Failed, Event::Reconcile { waited, failures }) if *waited >= backoff(*failures) => {
            Some(go(
                Stage::Train,
                Waiting,
                "Retrying",
                format!(
                    "{stage} failed ({} in a row); waiting for the train trigger again",
                    failures
                ),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(stage: Stage, phase: Phase) -> State {
        State { stage, phase }
    }

    fn tick() -> Event {
        Event::Reconcile {
            waited: Duration::ZERO,
            failures: 0,
        }
    }

    fn ready(stage: Stage) -> Event {
        Event::LcReady {
            stage,
            data: r#"{"round":1}"#.into(),
        }
    }

    #[test]
    fn a_new_job_waits_for_training_and_starts_its_inference_worker() {
        let t = start();
        assert_eq!(t.to, st(Stage::Train, Phase::Waiting));
        assert_eq!(t.action, Action::CreateInferenceWorker);
    }

    #[test]
    fn waiting_moves_only_on_its_own_stages_trigger() {
        for s in [Stage::Train, Stage::Eval, Stage::Deploy] {
            let t = next(st(s, Phase::Waiting), &ready(s), false).unwrap();
            assert_eq!(t.to, st(s, Phase::Ready));
            assert_eq!(t.message, "reported by lc");
            assert_eq!(t.data.as_deref(), Some(r#"{"round":1}"#));
            assert_eq!(next(st(s, Phase::Waiting), &tick(), false), None);
            assert_eq!(
                next(st(s, Phase::Waiting), &ready(s.following()), false),
                None,
                "a stale report of another stage is ignored"
            );
        }
    }

    #[test]
    fn ready_train_and_eval_create_their_pod() {
        for s in [Stage::Train, Stage::Eval] {
            let t = next(st(s, Phase::Ready), &tick(), false).unwrap();
            assert_eq!(t.to, st(s, Phase::Starting));
            assert_eq!(t.action, Action::CreatePod(s));
        }
    }

    #[test]
    fn deploy_cold_restarts_the_worker_and_hot_hands_over() {
        let cold = next(st(Stage::Deploy, Phase::Ready), &tick(), false).unwrap();
        assert_eq!(cold.to, st(Stage::Deploy, Phase::Completed));
        assert_eq!(cold.action, Action::RestartInferenceWorker);
        let hot = next(st(Stage::Deploy, Phase::Ready), &tick(), true).unwrap();
        assert_eq!(hot.to, st(Stage::Deploy, Phase::Starting));
        assert_eq!(hot.action, Action::None);
        let done = Event::LcCompleted {
            stage: Stage::Deploy,
            data: "{}".into(),
        };
        let t = next(hot.to, &done, true).unwrap();
        assert_eq!(t.to, st(Stage::Deploy, Phase::Completed));
        let failed = Event::LcFailed {
            stage: Stage::Deploy,
            message: "model does not load".into(),
        };
        let t = next(hot.to, &failed, true).unwrap();
        assert_eq!(t.to, st(Stage::Deploy, Phase::Failed));
        assert_eq!(t.message, "model does not load");
    }

    #[test]
    fn the_local_controller_can_fail_a_waiting_stage() {
        let e = Event::LcFailed {
            stage: Stage::Train,
            message: "outputDir /x is not writable".into(),
        };
        let t = next(st(Stage::Train, Phase::Waiting), &e, false).unwrap();
        assert_eq!(t.to, st(Stage::Train, Phase::Failed));
        assert_eq!(t.reason, "LocalControllerFailed");
        assert_eq!(t.message, "outputDir /x is not writable");
        assert_eq!(next(st(Stage::Eval, Phase::Waiting), &e, false), None);
    }

    #[test]
    fn deploy_waiting_can_decide_not_to_deploy() {
        let no = Event::LcCompleted {
            stage: Stage::Deploy,
            data: r#"{"deployed":false}"#.into(),
        };
        let t = next(st(Stage::Deploy, Phase::Waiting), &no, false).unwrap();
        assert_eq!(t.to, st(Stage::Deploy, Phase::Completed));
        assert_eq!(t.reason, "NotDeployed");
        let train_done = Event::LcCompleted {
            stage: Stage::Train,
            data: "{}".into(),
        };
        assert_eq!(
            next(st(Stage::Train, Phase::Waiting), &train_done, false),
            None
        );
    }

    #[test]
    fn pods_drive_starting_and_running() {
        for s in [Stage::Train, Stage::Eval] {
            let t = next(st(s, Phase::Starting), &Event::PodRunning, false).unwrap();
            assert_eq!(t.to, st(s, Phase::Running));
            assert_eq!(next(st(s, Phase::Running), &Event::PodRunning, false), None);
            for from in [Phase::Starting, Phase::Running] {
                let t = next(st(s, from), &Event::PodSucceeded, false).unwrap();
                assert_eq!(t.to, st(s, Phase::Completed));
                let done = Event::LcCompleted {
                    stage: s,
                    data: r#"{"models":[]}"#.into(),
                };
                let t = next(st(s, from), &done, false).unwrap();
                assert_eq!(t.to, st(s, Phase::Completed));
                assert!(t.data.is_some());
                let failed = Event::PodFailed {
                    reason: "Error".into(),
                    message: "exit code 1: no samples".into(),
                };
                let t = next(st(s, from), &failed, false).unwrap();
                assert_eq!(t.to, st(s, Phase::Failed));
                assert_eq!(
                    (t.reason.as_str(), t.message.as_str()),
                    ("Error", "exit code 1: no samples")
                );
            }
        }
    }

    #[test]
    fn completed_moves_round_the_loop() {
        let order = [
            (Stage::Train, Stage::Eval),
            (Stage::Eval, Stage::Deploy),
            (Stage::Deploy, Stage::Train),
        ];
        for (from, to) in order {
            let t = next(st(from, Phase::Completed), &tick(), false).unwrap();
            assert_eq!(t.to, st(to, Phase::Waiting));
        }
    }

    #[test]
    fn a_failure_returns_to_train_waiting_only_after_the_backoff() {
        let failed = st(Stage::Eval, Phase::Failed);
        let early = Event::Reconcile {
            waited: Duration::from_secs(5),
            failures: 1,
        };
        assert_eq!(next(failed, &early, false), None, "no tight loop");
        let later = Event::Reconcile {
            waited: Duration::from_secs(10),
            failures: 1,
        };
        let t = next(failed, &later, false).unwrap();
        assert_eq!(t.to, st(Stage::Train, Phase::Waiting));
        assert!(t.message.contains("Eval failed"), "{}", t.message);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(4), Duration::from_secs(80));
        assert_eq!(backoff(9), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn states_round_trip_through_condition_strings() {
        let s = State::parse("Deploy", "Running").unwrap();
        assert_eq!(s, st(Stage::Deploy, Phase::Running));
        assert_eq!(s.to_string(), "Deploy/Running");
        assert!(
            State::parse("Infer", "Running")
                .unwrap_err()
                .contains("Stage")
        );
        assert!(State::parse("Train", "Done").is_err());
    }
}
