//! Messages between the AI edge module and the AI cloud module, in the channel's group
//! [`GROUP`]. Resources follow the platform's `<namespace>/<kind>/<name>` keys.
//!
//! | direction | operation | resource | content |
//! |---|---|---|---|
//! | edge -> cloud | `update` (reliable, latest wins) | `<ns>/workerreport/<pod>` | [`WorkerReport`] |
//! | edge -> cloud | `query` | `<ns>/route/<service>` | [`RouteOpen`]; reply `response` or `error` |
//! | both ways | `update` (unacknowledged, in order) | `<ns>/stream/<id>` | bytes of the connection |
//! | both ways | `delete` (unacknowledged) | `<ns>/stream/<id>` | empty: the connection closed |
//! | edge -> cloud | `update` (reliable, every one kept) | `<ns>/ilevent/<pod>` | [`IlEvent`] of the job `<pod>` (its inference worker) belongs to |
//! | edge -> cloud | `update` (reliable, latest wins) | `<ns>/ilprogress/<pod>` | [`IlProgress`] |
//!
//! A node may only report on pods bound to it and only write to streams it opened (checked by
//! the hub through [`crate::cloud::CloudAiModule`]'s owner lookup).
//!
//! The other direction of incremental learning needs no message of its own: the controller
//! writes what the node's local controller must know ([`IlNodeState`]) into the ConfigMap
//! `<job>-il-state`, which the job's inference worker mounts, so the platform delivers it to
//! the node (and keeps it there while the link is down) like any ConfigMap of a pod.

use std::collections::BTreeMap;

use bytes::Bytes;
use sedge_tunnel::{Message, op};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The message group of the AI modules.
pub const GROUP: &str = "sedna";

/// Resource kinds in [`GROUP`].
pub mod kind {
    /// A worker's report.
    pub const REPORT: &str = "workerreport";
    /// A request to open a routed connection to a Service.
    pub const ROUTE: &str = "route";
    /// The bytes of a routed connection.
    pub const STREAM: &str = "stream";
    /// A local controller's event for an incremental learning job.
    pub const IL_EVENT: &str = "ilevent";
    /// A local controller's sample count for a job (latest wins).
    pub const IL_PROGRESS: &str = "ilprogress";
}

/// Samples collected for a job's next round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IlProgress {
    /// The job.
    pub job: String,
    /// Train samples since the last round started.
    pub samples: u64,
}

/// Label naming the job on its pods and ConfigMap (Sedna's).
pub const IL_JOB_LABEL: &str = "incrementallearningjob.sedna.io/name";
/// Label with the pod's role in the job: `inference`, `train` or `eval` (Sedna's).
pub const IL_WORKER_TYPE_LABEL: &str = "incrementallearningjob.sedna.io/worker-type";
/// The key of [`IlNodeState`] in the job's state ConfigMap.
pub const IL_STATE_KEY: &str = "state.json";

/// The state ConfigMap of a job.
pub fn il_state_configmap(job: &str) -> String {
    format!("{job}-il-state")
}

/// What a local controller says about a job's stage (Sedna's upstream `status` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IlEvent {
    /// The job (checked against the reporting pod's label).
    pub job: String,
    /// `Train`, `Eval` or `Deploy`.
    pub stage: String,
    /// `ready`, `completed` or `failed`.
    pub status: String,
    /// The condition the event answers (its index in the job's conditions): an event about an
    /// older state is stale and ignored.
    pub seq: usize,
    /// The round.
    pub round: u32,
    /// The stage's input (ready) or output (completed), JSON.
    #[serde(default)]
    pub data: String,
    /// Why (failed), or a note.
    #[serde(default)]
    pub message: String,
}

/// What the local controller of a job needs, written by the controller into the job's state
/// ConfigMap. Paths are paths on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct IlNodeState {
    /// The job.
    pub job: String,
    /// The node the job's data and workers are on.
    pub node: String,
    /// The dataset's index file (txt or csv).
    pub dataset: String,
    /// Share of new samples that go to training.
    pub train_prob: f64,
    /// `spec.trainSpec.trigger`.
    pub train_trigger: crate::crd::Trigger,
    /// `spec.deploySpec.trigger`.
    pub deploy_trigger: crate::crd::Trigger,
    /// `spec.outputDir`.
    pub output_dir: String,
    /// The initial model's file (round 1 trains from it unless a model was deployed since).
    pub initial_model: String,
    /// The deploy Model's file (what a cold update overwrites).
    pub deploy_model: String,
    /// The model the eval stage compares against, when not the deployed one
    /// (`spec.evalSpec.initialEvalModel`).
    #[serde(default)]
    pub eval_model: String,
    /// Hot update: the `model_config.json` the inference worker polls; empty for cold update.
    #[serde(default)]
    pub hot_update_config: String,
    /// How often the worker polls that file (`pollPeriodSeconds`).
    #[serde(default)]
    pub hot_update_poll_seconds: u64,
    /// Stage of the job's last condition.
    pub stage: String,
    /// Its type (`Waiting`, `Ready`, ...).
    pub phase: String,
    /// How many conditions the job has: the last one is `seq - 1`.
    pub seq: usize,
}

/// Pod annotation: the local port the edge module listens on for this pod's route.
pub const ROUTE_LISTEN_ANNOTATION: &str = "sedge.io/route-listen";
/// Pod annotation: `<service>:<port>` the route leads to (in the pod's namespace).
pub const ROUTE_SERVICE_ANNOTATION: &str = "sedge.io/route-service";
/// Service annotation: edge nodes may open routes to this Service.
pub const EDGE_ROUTABLE_ANNOTATION: &str = "sedge.io/edge-routable";

/// What a worker reported to the local controller endpoint (Sedna's `/sedna/workers/<name>/info`
/// body, reduced to what the cloud uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// Kind of the owner (`jointinferenceservice`).
    pub owner_kind: String,
    /// Name of the owner.
    pub owner_name: String,
    /// `inference`, `train`, ...
    pub kind: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// Sedna's `ownerInfo` without its time keys, values as strings
    /// (`inferenceNumber`, `hardExampleNumber`, `uploadCloudRatio`, ...).
    pub metrics: BTreeMap<String, String>,
}

/// Opens a routed connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteOpen {
    /// The stream id the edge chose (a UUID).
    pub stream: String,
    /// The Service port.
    pub port: u16,
}

/// Chunks buffered per routed connection towards its socket; a full buffer holds the channel's
/// reader back (back-pressure), it never drops bytes.
pub const STREAM_BUFFER: usize = 64;

/// Carries one routed connection until either side ends: what `sock` yields leaves as `update`
/// messages on `key` through `send` (which says whether the link took it), and the chunks
/// arriving on `rx` are written to `sock`. Both modules use it, on their own side.
pub(crate) async fn pump<F, Fut>(sock: TcpStream, mut rx: mpsc::Receiver<Bytes>, key: &str, send: F)
where
    F: Fn(Message) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut rd, mut wr) = sock.into_split();
    let out = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let m = Message::new(GROUP, op::UPDATE, key, Bytes::copy_from_slice(&buf[..n]));
                    if !send(m).await {
                        break;
                    }
                }
            }
        }
    };
    let into = async {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = out => {}
        _ = into => {}
    }
}
