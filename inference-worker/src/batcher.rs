//! Dynamic batching: concurrent requests are gathered into one backend call.
//!
//! Requests wait in a bounded queue (`queue` requests). When the queue is full, [`Batcher::infer`]
//! fails at once with [`BatchError::QueueFull`] (HTTP 503, gRPC `RESOURCE_EXHAUSTED`) instead of
//! letting latency grow without limit. A batch closes when it holds `max_batch` samples or when
//! `max_delay` has passed since its first request arrived; a single request larger than
//! `max_batch` runs on its own. One batch runs at a time, on the blocking pool, while the next one
//! is gathered.
//!
//! The default delay is 0, as in Triton: a batch takes whatever is queued when the backend comes
//! free, so an idle server answers at once and batches grow by themselves under load. A delay
//! only pays where one large call is much cheaper than several small ones (GPUs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::backend::Backend;
use crate::metrics::CloudMetrics;

/// Batching settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most samples in one backend call.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, in microseconds (0: take only what is
    /// already queued).
    pub max_delay_us: u64,
    /// Requests that may wait; more are refused.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 32,
            max_delay_us: 0,
            queue: 1024,
        }
    }
}

/// Why a batched call failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The queue is full; the client should back off and retry.
    #[error("the inference queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The batcher has stopped (the server is shutting down).
    #[error("the server is shutting down")]
    Stopped,
    /// The backend failed; the message is the backend's.
    #[error("{0}")]
    Backend(String),
}

struct Job {
    input: Vec<f32>,
    batch: usize,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// Handle to the batching task; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    queue: usize,
}

impl Batcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn start(
        backend: Arc<dyn Backend>,
        config: BatchConfig,
        metrics: Arc<CloudMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(run(rx, backend, config.clone(), metrics));
        Batcher {
            tx,
            queue: config.queue,
        }
    }

    /// Runs `batch` samples (already normalised) and returns their raw outputs.
    pub async fn infer(&self, input: Vec<f32>, batch: usize) -> Result<Vec<f32>, BatchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Job {
                input,
                batch,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => BatchError::QueueFull(self.queue),
                mpsc::error::TrySendError::Closed(_) => BatchError::Stopped,
            })?;
        match rx.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(BatchError::Backend(e)),
            Err(_) => Err(BatchError::Stopped),
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    backend: Arc<dyn Backend>,
    config: BatchConfig,
    metrics: Arc<CloudMetrics>,
) {
    let max_batch = config.max_batch.max(1);
    let max_delay = Duration::from_micros(config.max_delay_us);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::from_std(Instant::now() + max_delay);
        let mut samples = first.batch;
        let mut jobs = vec![first];
        while samples < max_batch {
            // What is already queued joins without touching the timer (tokio's timer has 1 ms
            // granularity, which would dwarf a small model's inference time).
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) if max_delay.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            match next {
                Some(job) if samples + job.batch > max_batch => {
                    carried = Some(job);
                    break;
                }
                Some(job) => {
                    samples += job.batch;
                    jobs.push(job);
                }
                None => break,
            }
        }
        let mut input = Vec::with_capacity(jobs.iter().map(|j| j.input.len()).sum());
        for job in &jobs {
            input.extend_from_slice(&job.input);
        }
        metrics.batch_size.observe(samples as f64);
        let backend = backend.clone();
        let result = tokio::task::spawn_blocking(move || backend.run(&input, samples)).await;
        let result = match result {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(join) => Err(format!("inference task panicked: {join}")),
        };
        match result {
            Ok(out) => {
                let per_sample = out.len() / samples;
                let mut offset = 0;
                for job in jobs {
                    let n = job.batch * per_sample;
                    let _ = job.reply.send(Ok(out[offset..offset + n].to_vec()));
                    offset += n;
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, BackendKind};
    use std::sync::Mutex;

    /// Echoes the first value of each sample and records batch sizes.
    struct Recorder {
        sizes: Mutex<Vec<usize>>,
        gate: Mutex<()>,
    }

    impl Backend for Recorder {
        fn kind(&self) -> BackendKind {
            BackendKind::Tract
        }
        fn output_len(&self) -> usize {
            1
        }
        fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
            let _g = self.gate.lock().unwrap();
            self.sizes.lock().unwrap().push(batch);
            Ok(input.chunks(input.len() / batch).map(|c| c[0]).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_batches_and_get_their_own_answers() {
        let backend = Arc::new(Recorder {
            sizes: Mutex::new(vec![]),
            gate: Mutex::new(()),
        });
        let cfg = BatchConfig {
            max_batch: 8,
            max_delay_us: 50_000,
            queue: 100,
        };
        let b = Batcher::start(backend.clone(), cfg, Arc::new(CloudMetrics::default()));
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.infer(vec![i as f32, 0.0], 1).await.unwrap() })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap(), vec![i as f32]);
        }
        let sizes = backend.sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");
        assert!(sizes.len() < 20, "requests were batched: {sizes:?}");
    }

    // The held lock is the point: it stalls the backend (on the blocking pool) so the queue fills.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_not_queued_forever() {
        let backend = Arc::new(Recorder {
            sizes: Mutex::new(vec![]),
            gate: Mutex::new(()),
        });
        let guard = backend.gate.lock().unwrap();
        let cfg = BatchConfig {
            max_batch: 1,
            max_delay_us: 0,
            queue: 2,
        };
        let b = Batcher::start(backend.clone(), cfg, Arc::new(CloudMetrics::default()));
        let mut pending = Vec::new();
        let mut refused = 0;
        for i in 0..10 {
            let b2 = b.clone();
            let h = tokio::spawn(async move { b2.infer(vec![i as f32], 1).await });
            tokio::task::yield_now().await;
            pending.push(h);
        }
        drop(guard);
        for h in pending {
            if let Err(BatchError::QueueFull(2)) = h.await.unwrap() {
                refused += 1;
            }
        }
        assert!(
            refused > 0,
            "with the backend blocked and a queue of 2, some of 10 requests are refused"
        );
        assert!(
            b.infer(vec![1.0], 1).await.is_ok(),
            "the batcher serves again once the queue drains"
        );
    }

    #[tokio::test]
    async fn oversized_requests_run_alone() {
        let backend = Arc::new(Recorder {
            sizes: Mutex::new(vec![]),
            gate: Mutex::new(()),
        });
        let b = Batcher::start(
            backend.clone(),
            BatchConfig {
                max_batch: 4,
                max_delay_us: 1000,
                queue: 10,
            },
            Arc::new(CloudMetrics::default()),
        );
        let out = b
            .infer((0..10).map(|v| v as f32).collect(), 10)
            .await
            .unwrap();
        assert_eq!(out, (0..10).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(*backend.sizes.lock().unwrap(), vec![10]);
    }
}
