//! The hollow runtime (`runtime: hollow`), Kubernetes' kubemark idea: a real edge agent (join,
//! registration, status and lease heartbeats, pods and their config maps through the channel,
//! pod status reported and acknowledged) whose containers are not run. A container "runs" from
//! its start until it is signalled; nothing is spawned, so one process can hold thousands of
//! agents to load the cloud side the way thousands of machines would.
//!
//! For benchmarks only: a node with this runtime reports pods `Running` that run nothing, so
//! its Node carries the label [`LABEL`] for everyone to see.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::runtime::{Container, ContainerSpec, Exit, PodInfo, Runtime, Signal, StartError};
use crate::store::ContainerRecord;

/// The label on a hollow agent's Node (value `true`): `kubectl get nodes -L sedge.io/hollow`
/// shows which nodes run nothing.
pub const LABEL: &str = "sedge.io/hollow";

/// Containers that run nothing.
#[derive(Debug, Default)]
pub struct HollowRuntime {
    next: AtomicU64,
}

const RUNNING: u8 = 0;
const TERM: u8 = 1;
const KILL: u8 = 2;

struct Hollow {
    id: String,
    state: AtomicU8,
    wake: Option<Arc<Notify>>,
}

impl Container for Hollow {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn start_ticks(&self) -> u64 {
        0
    }
    fn poll_exit(&mut self) -> Option<Exit> {
        match self.state.load(Ordering::SeqCst) {
            RUNNING => None,
            // As a well-behaved process: exits 0 on SIGTERM, 137 on SIGKILL.
            TERM => Some(Exit::Code(0)),
            _ => Some(Exit::Signal(9)),
        }
    }
    fn notify_exit(&mut self, wake: Arc<Notify>) -> bool {
        if self.state.load(Ordering::SeqCst) != RUNNING {
            wake.notify_one();
        }
        self.wake = Some(wake);
        true
    }
    fn signal(&self, s: Signal) {
        let to = match s {
            Signal::Term => TERM,
            Signal::Kill => KILL,
        };
        let moved = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now < to).then_some(to)
            });
        if let (Ok(_), Some(w)) = (moved, &self.wake) {
            w.notify_one();
        }
    }
}

impl HollowRuntime {
    fn container(&self) -> Box<dyn Container> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        Box::new(Hollow {
            id: format!("hollow-{n}"),
            state: AtomicU8::new(RUNNING),
            wake: None,
        })
    }
}

impl Runtime for HollowRuntime {
    fn start<'a>(
        &'a self,
        _pod: &'a PodInfo,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, StartError>> {
        Box::pin(async move {
            if spec.image.trim().is_empty() {
                return Err(StartError {
                    reason: "InvalidImageName".into(),
                    message: format!("container {} of {} has no image", spec.name, spec.pod),
                });
            }
            Ok(self.container())
        })
    }

    /// A restarted hollow agent finds its containers still "running".
    fn adopt<'a>(&'a self, rec: &'a ContainerRecord) -> BoxFuture<'a, Option<Box<dyn Container>>> {
        Box::pin(
            async move { (rec.pid != 0 || !rec.container_id.is_empty()).then(|| self.container()) },
        )
    }

    fn version(&self) -> String {
        "hollow://0.1.0".into()
    }

    fn id_scheme(&self) -> &'static str {
        "hollow"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str) -> ContainerSpec {
        ContainerSpec {
            pod_uid: "u1".into(),
            pod: "default/p".into(),
            name: "main".into(),
            image: image.into(),
            pull_policy: String::new(),
            command: vec![],
            args: vec![],
            env: vec![],
            root: "/nonexistent".into(),
            working_dir: "/nonexistent".into(),
            log_path: "/nonexistent/log".into(),
            mounts: vec![],
            container_working_dir: None,
            limits: Default::default(),
            attempt: 0,
            security: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_hollow_container_runs_until_signalled_and_spawns_nothing() {
        let rt = HollowRuntime::default();
        let pod = PodInfo::default();
        let mut a = rt.start(&pod, &spec("busybox")).await.unwrap();
        let mut b = rt.start(&pod, &spec("busybox")).await.unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.poll_exit(), None);
        a.signal(Signal::Term);
        assert_eq!(a.poll_exit(), Some(Exit::Code(0)));
        // A kill after a term is a kill; a term after a kill does not undo it.
        a.signal(Signal::Kill);
        assert_eq!(a.poll_exit(), Some(Exit::Signal(9)));
        a.signal(Signal::Term);
        assert_eq!(a.poll_exit(), Some(Exit::Signal(9)));
        assert_eq!(b.poll_exit(), None);
        // The pod's task is told of the end, and told at once when it has already ended.
        let wake = Arc::new(Notify::new());
        assert!(b.notify_exit(wake.clone()));
        b.signal(Signal::Term);
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified())
            .await
            .expect("told of the end");
        assert!(a.notify_exit(wake.clone()));
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified())
            .await
            .expect("told of an end before it asked");
        let err = rt.start(&pod, &spec(" ")).await.err().unwrap();
        assert_eq!(err.reason, "InvalidImageName");
    }
}
