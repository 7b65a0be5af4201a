//! The AI cloud module, plugged into the cloud core (`sedge_cloudcore::CloudModule`).
//!
//! - **Worker reports** (`<ns>/workerreport/<pod>`): the counters of every worker of a joint
//!   inference service are added up and written to the service's `status.metrics` (Sedna's
//!   `inferenceNumber`, `hardExampleNumber`, `uploadCloudRatio`, plus `cloudAnsweredNumber`,
//!   `edgeFallbackNumber`, and the latest `cloudReachable`/`cloudError` of the edge). A worker
//!   whose counters go backwards restarted: what it had counted is kept, so the service's totals
//!   only grow while this process runs.
//! - **Incremental learning** (`<ns>/ilevent/<pod>`, `<ns>/ilprogress/<pod>`): the local
//!   controller's events move the job through [`crate::il`] ([`crate::iljob::on_event`]), its
//!   sample counts go to `status.samples`; only for the job the reporting pod belongs to.
//! - **Routes** (`query` on `<ns>/route/<service>`): a node that runs a worker of the service
//!   behind a Service annotated `sedge.io/edge-routable` may open a connection to one of the
//!   Service's ready pods; the bytes travel as `<ns>/stream/<id>` messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use sedge_cloudcore::{CloudModule, CloudModuleContext};
use sedge_tunnel::{LinkEvent, Message, op};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::controller::{NAME_LABEL, WORKER_TYPE_LABEL};
use crate::crd::JointInferenceService;
use crate::wire::{
    EDGE_ROUTABLE_ANNOTATION, GROUP, IL_JOB_LABEL, IlEvent, IlProgress, RouteOpen, STREAM_BUFFER,
    WorkerReport, kind,
};

/// Counters summed over a service's workers.
const COUNTERS: &[&str] = &[
    "inferenceNumber",
    "hardExampleNumber",
    "cloudAnsweredNumber",
    "edgeFallbackNumber",
];

#[derive(Default)]
struct WorkerCounters {
    /// What earlier runs of the worker counted.
    base: BTreeMap<String, f64>,
    /// The latest report.
    last: BTreeMap<String, f64>,
}

struct CloudStream {
    node: String,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Inner {
    ctx: OnceLock<CloudModuleContext>,
    streams: Mutex<HashMap<String, CloudStream>>,
    /// (namespace, service) -> pod -> counters.
    counters: Mutex<HashMap<(String, String), BTreeMap<String, WorkerCounters>>>,
}

/// The AI cloud module.
#[derive(Clone, Default)]
pub struct CloudAiModule {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CloudAiModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudAiModule").finish()
    }
}

impl CloudAiModule {
    /// A module.
    pub fn new() -> CloudAiModule {
        CloudAiModule::default()
    }
}

impl CloudModule for CloudAiModule {
    fn group(&self) -> &str {
        GROUP
    }

    fn owner(&self, k: &str, ns: &str, name: &str) -> Option<String> {
        match k {
            kind::REPORT | kind::IL_EVENT | kind::IL_PROGRESS => {
                let pod = self.inner.ctx.get()?.cache.pod(ns, name)?;
                pod.spec.as_ref()?.node_name.clone()
            }
            kind::STREAM => self
                .inner
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .map(|s| s.node.clone()),
            _ => None,
        }
    }

    fn start(&self, ctx: CloudModuleContext) {
        let mut links = ctx.hub.subscribe();
        let _ = self.inner.ctx.set(ctx);
        let inner = self.inner.clone();
        // A node's session ended: its routed connections are gone.
        tokio::spawn(async move {
            loop {
                match links.recv().await {
                    Ok(LinkEvent::Disconnected { node, .. }) => inner
                        .streams
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|_, s| s.node != node),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
    }

    fn handle(
        &self,
        node: &str,
        msg: Message,
    ) -> BoxFuture<'static, Result<Option<Message>, String>> {
        let inner = self.inner.clone();
        let node = node.to_string();
        async move {
            let Some(ctx) = inner.ctx.get().cloned() else {
                return Err("the AI cloud module is not started yet".to_string());
            };
            let parts: Vec<&str> = msg.route.resource.splitn(3, '/').collect();
            if parts.len() != 3 {
                tracing::warn!(%node, resource = %msg.route.resource, "not <ns>/<kind>/<name>; dropped");
                return Ok(None);
            }
            let (ns, k, name) = (parts[0].to_string(), parts[1], parts[2].to_string());
            match (k, msg.route.operation.as_str()) {
                (kind::REPORT, op::UPDATE) => report(&inner, &ctx, &ns, &name, &msg.content).await,
                (kind::IL_EVENT, op::UPDATE) => {
                    match il_message::<IlEvent>(&ctx, &ns, &name, &msg.content, |e| &e.job) {
                        Some(ev) => crate::iljob::on_event(&ctx.client, &ns, &ev).await.map(|()| None),
                        None => Ok(None),
                    }
                }
                (kind::IL_PROGRESS, op::UPDATE) => {
                    match il_message::<IlProgress>(&ctx, &ns, &name, &msg.content, |p| &p.job) {
                        Some(p) => crate::iljob::on_progress(&ctx.client, &ns, &p).await.map(|()| None),
                        None => Ok(None),
                    }
                }
                (kind::ROUTE, op::QUERY) => Ok(Some(
                    match open_route(&inner, &ctx, &node, &ns, &name, &msg.content).await {
                        Ok(()) => msg.reply(op::RESPONSE, Vec::new()),
                        Err(why) => {
                            tracing::debug!(%node, service = %format!("{ns}/{name}"), %why, "route refused");
                            msg.reply(op::ERROR, why)
                        }
                    },
                )),
                (kind::STREAM, op::UPDATE) => {
                    let tx = inner
                        .streams
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&name)
                        .map(|s| s.tx.clone());
                    if let Some(tx) = tx
                        && tx.send(msg.content.clone()).await.is_err()
                    {
                        inner.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                    }
                    Ok(None)
                }
                (kind::STREAM, op::DELETE) => {
                    inner.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                    Ok(None)
                }
                _ => {
                    tracing::warn!(%node, resource = %msg.route.resource, operation = %msg.route.operation, "unknown AI message; dropped");
                    Ok(None)
                }
            }
        }
        .boxed()
    }
}

/// An incremental-learning message from the inference worker pod `ns/pod`, if it parses and
/// names the job that pod belongs to (a node speaks only for its own pods' jobs).
fn il_message<T: serde::de::DeserializeOwned>(
    ctx: &CloudModuleContext,
    ns: &str,
    pod: &str,
    content: &[u8],
    job: impl Fn(&T) -> &String,
) -> Option<T> {
    let m: T = match serde_json::from_slice(content) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                namespace = ns,
                pod,
                "malformed incremental learning message: {e}; dropped"
            );
            return None;
        }
    };
    let owner = ctx
        .cache
        .pod(ns, pod)
        .and_then(|p| p.labels().get(IL_JOB_LABEL).cloned());
    if owner.as_deref() != Some(job(&m).as_str()) {
        tracing::warn!(namespace = ns, pod, job = %job(&m), "incremental learning message for a job the pod does not belong to; dropped");
        return None;
    }
    Some(m)
}

/// Adds one worker's report to its service's totals and writes them to the status.
async fn report(
    inner: &Inner,
    ctx: &CloudModuleContext,
    ns: &str,
    pod: &str,
    content: &[u8],
) -> Result<Option<Message>, String> {
    let r: WorkerReport = match serde_json::from_slice(content) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(namespace = ns, pod, "malformed worker report: {e}; dropped");
            return Ok(None);
        }
    };
    if r.owner_kind != "jointinferenceservice" {
        tracing::debug!(kind = %r.owner_kind, "report for an owner kind without a controller yet; dropped");
        return Ok(None);
    }
    // The service is the one the pod belongs to, whatever the report claims.
    let Some(service) = ctx
        .cache
        .pod(ns, pod)
        .and_then(|p| p.labels().get(NAME_LABEL).cloned())
    else {
        tracing::warn!(namespace = ns, pod, owner = %r.owner_name, "report from a pod that is no joint inference worker; dropped");
        return Ok(None);
    };
    let metrics = {
        let mut all = inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        let workers = all.entry((ns.to_string(), service.clone())).or_default();
        let w = workers.entry(pod.to_string()).or_default();
        for k in COUNTERS {
            let Some(v) = r.metrics.get(*k).and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let last = w.last.get(*k).copied().unwrap_or(0.0);
            if v < last {
                *w.base.entry(k.to_string()).or_default() += last;
            }
            w.last.insert(k.to_string(), v);
        }
        let total = |k: &str| -> f64 {
            workers
                .values()
                .map(|w| {
                    w.base.get(k).copied().unwrap_or(0.0) + w.last.get(k).copied().unwrap_or(0.0)
                })
                .sum()
        };
        let inferences = total("inferenceNumber");
        let hard = total("hardExampleNumber");
        let ratio = if inferences > 0.0 {
            hard / inferences
        } else {
            0.0
        };
        let mut m = vec![
            json!({"key": "inferenceNumber", "value": format!("{inferences:.0}")}),
            json!({"key": "hardExampleNumber", "value": format!("{hard:.0}")}),
            json!({"key": "uploadCloudRatio", "value": format!("{ratio:.4}")}),
            json!({"key": "cloudAnsweredNumber", "value": format!("{:.0}", total("cloudAnsweredNumber"))}),
            json!({"key": "edgeFallbackNumber", "value": format!("{:.0}", total("edgeFallbackNumber"))}),
        ];
        for k in ["cloudReachable", "cloudError"] {
            if let Some(v) = r.metrics.get(k) {
                m.push(json!({"key": k, "value": v}));
            }
        }
        m
    };
    let api = Api::<JointInferenceService>::namespaced(ctx.client.clone(), ns);
    match api
        .patch_status(
            &service,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"metrics": metrics}})),
        )
        .await
    {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) if sedge_cloudcore::transient(&e) => Err(format!("service status: {e}")),
        Err(e) => {
            tracing::warn!(service = %format!("{ns}/{service}"), error = %e, "worker counters refused; dropped");
            Ok(None)
        }
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Connects a new stream from `node` to a ready pod behind Service `ns/svc`.
async fn open_route(
    inner: &Arc<Inner>,
    ctx: &CloudModuleContext,
    node: &str,
    ns: &str,
    svc: &str,
    content: &[u8],
) -> Result<(), String> {
    let open: RouteOpen =
        serde_json::from_slice(content).map_err(|e| format!("malformed route request: {e}"))?;
    let service = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .get_opt(svc)
        .await
        .map_err(|e| format!("service {ns}/{svc}: {e}"))?
        .ok_or_else(|| format!("service {ns}/{svc} does not exist"))?;
    if service
        .annotations()
        .get(EDGE_ROUTABLE_ANNOTATION)
        .map(String::as_str)
        != Some("true")
    {
        return Err(format!(
            "service {ns}/{svc} is not open to edge routes (annotation {EDGE_ROUTABLE_ANNOTATION})"
        ));
    }
    let owner = service
        .labels()
        .get(NAME_LABEL)
        .cloned()
        .unwrap_or_default();
    let pods = ctx.cache.pods.state();
    let allowed = pods.iter().any(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.labels().get(NAME_LABEL) == Some(&owner)
            && p.labels().get(WORKER_TYPE_LABEL).map(String::as_str) == Some("edge")
    });
    if !allowed {
        return Err(format!(
            "node {node} runs no edge worker of {ns}/{owner}; route to {svc} refused"
        ));
    }
    let spec = service.spec.unwrap_or_default();
    let target = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(open.port))
        .ok_or_else(|| format!("service {ns}/{svc} has no port {}", open.port))?;
    let target_port = match &target.target_port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => *p,
        _ => target.port,
    };
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        return Err(format!("service {ns}/{svc} has no selector"));
    }
    let mut ready: Vec<String> = pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .filter(|p| pod_ready(p))
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    if ready.is_empty() {
        return Err(format!("no ready pod behind service {ns}/{svc}"));
    }
    // Spread connections over the ready pods.
    let pick = ready.swap_remove(open.stream.bytes().map(usize::from).sum::<usize>() % ready.len());
    let addr = format!("{pick}:{target_port}");
    let sock = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("connecting to {addr} (service {ns}/{svc}) timed out"))?
        .map_err(|e| format!("connecting to {addr} (service {ns}/{svc}): {e}"))?;
    let _ = sock.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    inner
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            open.stream.clone(),
            CloudStream {
                node: node.to_string(),
                tx,
            },
        );
    let hub = ctx.hub.clone();
    let node = node.to_string();
    let key = format!("{ns}/{}/{}", kind::STREAM, open.stream);
    let inner = inner.clone();
    tokio::spawn(async move {
        crate::wire::pump(sock, rx, &key, |m| {
            let (hub, node) = (hub.clone(), node.clone());
            async move { hub.send_unacked(&node, m).await.is_ok() }
        })
        .await;
        inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&open.stream);
        let _ = hub
            .send_unacked(&node, Message::new(GROUP, op::DELETE, &key, Vec::new()))
            .await;
    });
    Ok(())
}
