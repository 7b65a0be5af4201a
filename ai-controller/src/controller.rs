//! The AI controller's entry point ([`run`]: the sedna.io CRDs, this controller and
//! [`crate::iljob`]'s), and the joint-inference controller: for each `JointInferenceService`, a cloud Deployment and its
//! Service, and an edge Deployment pinned to the edge, with Sedna's worker environment; status
//! conditions a user can act on.
//!
//! Reconcile, in order (one pass, idempotent):
//! 1. Check what the service refers to: both `Model`s exist and have a usable URL, the
//!    hard-example-mining rule and its parameters parse. A problem is a `Failed` condition naming
//!    the field and the fix; nothing is created until it is fixed (Model changes re-trigger).
//! 2. Apply the children with server-side apply (owner references, so deleting the service
//!    deletes them; a deleted child is recreated on the next pass; a spec change changes the pod
//!    template, which rolls the workers).
//! 3. Derive the status from the children: `Pending` (reason and readiness in the message),
//!    `Running`, or `Failed` when a worker crash-loops (the last log line in the message). The
//!    workers' counters in `status.metrics` are written by [`crate::cloud`], not here.
//!
//! How the edge reaches the cloud worker without cluster DNS: the edge pod gets
//! `BIG_MODEL_IP=127.0.0.1` and a per-service local port (`BIG_MODEL_PORT`, allocated here from
//! [`ControllerConfig::route_ports`] and kept in the service's annotation
//! `sedge.io/route-port`); the edge module on the node listens there and carries each connection
//! through the channel to a ready cloud worker pod. With the annotation
//! `sedge.io/big-model-address: host:port` on the service, the edge worker dials that address
//! directly instead. Either way, the edge worker answers edge-only while the cloud is away.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use sedge_worker_contract::env;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::crd::{
    JointInferenceService, JointInferenceServiceStatus, Model, hem_parameters_json, metrics_map,
};
use crate::podspec::{self, containers, set_env};
use crate::verdict::{Verdict, conditions, config_error, crash_looping, last_log_line, readiness};
use crate::wire::{EDGE_ROUTABLE_ANNOTATION, ROUTE_LISTEN_ANNOTATION, ROUTE_SERVICE_ANNOTATION};

/// Label naming the service on every child (Sedna's).
pub const NAME_LABEL: &str = "jointinferenceservice.sedna.io/name";
/// Label with the service's UID (Sedna's).
pub const UID_LABEL: &str = "jointinferenceservice.sedna.io/uid";
/// Label with the worker type, `edge` or `cloud` (Sedna's).
pub const WORKER_TYPE_LABEL: &str = "jointinferenceservice.sedna.io/worker-type";
/// Service annotation holding the allocated local route port.
pub const ROUTE_PORT_ANNOTATION: &str = "sedge.io/route-port";
/// Service annotation: dial the cloud worker at this `host:port` instead of routing.
pub const DIRECT_ADDRESS_ANNOTATION: &str = "sedge.io/big-model-address";
/// Model annotation: the expected SHA-256 of the model file (checked by the worker).
pub const MODEL_SHA256_ANNOTATION: &str = "sedge.io/model-sha256";
/// Exit code of our workers when the model cannot be fetched or loaded (the contract's).
pub const EXIT_MODEL_UNAVAILABLE: i32 = sedge_worker_contract::exit::MODEL_UNAVAILABLE;

const MANAGER: &str = "sedge-ai-controller";

/// Settings of `sedge ai-controller` (`--print-default-config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// Install (or update) the sedna.io CRDs at start.
    pub install_crds: bool,
    /// Port of the edge module's local-controller endpoint on every node (`LC_SERVER`).
    pub lc_port: u16,
    /// How often workers report their counters, in seconds (`LC_PERIOD`; Sedna's default is 30).
    pub report_period_seconds: u64,
    /// The cloud worker's port (Sedna's 5000) unless its template declares a `containerPort`.
    pub big_model_port: u16,
    /// Local ports handed out to edge workers for their route to the cloud, `[first, last]`.
    pub route_ports: [u16; 2],
    /// Where `sedge ai-controller` serves `/metrics` (reconciles and failures per controller),
    /// `/healthz` and `/readyz`. Empty disables it. (`sedge up` serves these on the cloud
    /// core's endpoint instead.)
    pub metrics_listen: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            install_crds: true,
            lc_port: 9100,
            report_period_seconds: 5,
            big_model_port: 5000,
            route_ports: [39100, 39999],
            metrics_listen: "127.0.0.1:10270".into(),
        }
    }
}

/// Why the controller stopped or a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum AiError {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The CRDs did not become usable.
    #[error("CRD {0} was not established in time")]
    CrdNotEstablished(String),
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
}

struct Ctx {
    client: Client,
    cfg: ControllerConfig,
    store: Store<JointInferenceService>,
    /// Serialises route-port allocation.
    alloc: tokio::sync::Mutex<()>,
}

/// Applies the sedna.io CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), AiError> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in crate::crd::crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
        let established = kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        if tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .is_err()
        {
            return Err(AiError::CrdNotEstablished(name));
        }
    }
    Ok(())
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    cfg: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), AiError> {
    if cfg.route_ports[0] == 0 || cfg.route_ports[0] > cfg.route_ports[1] {
        return Err(AiError::Config(format!(
            "route_ports {:?} must be [first, last] with 0 < first <= last",
            cfg.route_ports
        )));
    }
    if cfg.install_crds {
        install_crds(&client).await?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let il = tokio::spawn(crate::iljob::run(client.clone(), cfg.clone(), async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let jis = Api::<JointInferenceService>::all(client.clone());
    let controller = Controller::new(jis, watcher::Config::default());
    let store = controller.store();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
        store: store.clone(),
        alloc: tokio::sync::Mutex::new(()),
    });
    let by_model = store.clone();
    controller
        .owns(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .watches(
            Api::<Model>::all(client.clone()),
            watcher::Config::default(),
            move |m: Model| {
                let ns = m.namespace();
                let name = m.name_any();
                by_model
                    .state()
                    .into_iter()
                    .filter(|ji| {
                        ji.namespace() == ns
                            && (ji.spec.edge_worker.model.name == name
                                || ji.spec.cloud_worker.model.name == name)
                    })
                    .map(|ji| ObjectRef::from_obj(&*ji))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(NAME_LABEL),
            |p: Pod| {
                let name = p.labels().get(NAME_LABEL)?;
                Some(ObjectRef::<JointInferenceService>::new(name).within(&p.namespace()?))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            crate::metrics::JOINT_INFERENCE.count(&r);
            match r {
                Ok((o, _)) => tracing::debug!(object = %o, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
    let _ = il.await;
    Ok(())
}

fn error_policy(_ji: Arc<JointInferenceService>, e: &AiError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "joint inference reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// How a model URL reaches the worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelSource {
    /// A path on the node: mounted (hostPath of its directory) at `/home/data<dir>`.
    Local(String),
    /// Downloaded by the worker (and cached with its checksum).
    Remote(String),
}

pub(crate) fn model_source(url: &str) -> Result<ModelSource, String> {
    let url = url.trim();
    if let Some(p) = url.strip_prefix("file://") {
        return model_source(p).and_then(|s| match s {
            ModelSource::Local(p) => Ok(ModelSource::Local(p)),
            ModelSource::Remote(_) => Err(format!("file URL {url:?} has no path")),
        });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(ModelSource::Remote(url.to_string()));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(format!(
            "scheme {scheme}:// is not supported (use a path on the node, file://, http:// or https://)"
        ));
    }
    if !url.starts_with('/') {
        return Err(format!(
            "{url:?} is not an absolute path (use a path on the node, file://, http:// or https://)"
        ));
    }
    // Lexically normal (`/a/b/../c` is `/a/c`): the directory is mounted, and `..` through a
    // mount would lead elsewhere.
    let mut parts: Vec<&str> = Vec::new();
    for c in url.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(ModelSource::Local(format!("/{}", parts.join("/"))))
}

struct Resolved {
    edge_model: Model,
    cloud_model: Model,
    edge_source: ModelSource,
    cloud_source: ModelSource,
}

async fn check(
    ji: &JointInferenceService,
    ctx: &Ctx,
) -> Result<Result<Resolved, Verdict>, AiError> {
    let ns = ji.namespace().unwrap_or_default();
    let models = Api::<Model>::namespaced(ctx.client.clone(), &ns);
    let mut found = Vec::new();
    for (role, field, name) in [
        (
            "edge",
            "spec.edgeWorker.model.name",
            &ji.spec.edge_worker.model.name,
        ),
        (
            "cloud",
            "spec.cloudWorker.model.name",
            &ji.spec.cloud_worker.model.name,
        ),
    ] {
        match models.get_opt(name).await? {
            Some(m) => match model_source(&m.spec.url) {
                Ok(_)
                    if let Err(e) =
                        sedge_worker_contract::model::from_annotations(m.annotations()) =>
                {
                    return Ok(Err(Verdict::failed(
                        "ModelInvalid",
                        format!("{role} model {name:?}: {e}"),
                    )));
                }
                Ok(source) => found.push((m, source)),
                Err(e) => {
                    return Ok(Err(Verdict::failed(
                        "ModelURLUnsupported",
                        format!("{role} model {name:?}: spec.url {e}"),
                    )));
                }
            },
            None => {
                return Ok(Err(Verdict::failed(
                    "ModelNotFound",
                    format!(
                        "{role} model {name:?} ({field}) does not exist in namespace {ns:?}; create the Model or fix the name"
                    ),
                )));
            }
        }
    }
    let hem = &ji.spec.edge_worker.hard_example_mining;
    if let Err(e) = sedge_worker_contract::mining::HardExampleMining::from_env_strings(
        &hem.name,
        &hem_parameters_json(&hem.parameters),
    ) {
        return Ok(Err(Verdict::failed(
            "InvalidHardExampleMining",
            format!("spec.edgeWorker.hardExampleMining: {e}"),
        )));
    }
    let (cloud_model, cloud_source) = found.pop().expect("two models");
    let (edge_model, edge_source) = found.pop().expect("two models");
    Ok(Ok(Resolved {
        edge_model,
        cloud_model,
        edge_source,
        cloud_source,
    }))
}

fn owner_ref(ji: &JointInferenceService) -> Value {
    podspec::owner_ref(
        "JointInferenceService",
        &ji.name_any(),
        &ji.uid().unwrap_or_default(),
    )
}

/// Mounts a local model's directory (Sedna's layout: `/home/data<dir>`) and returns the path the
/// worker sees.
fn mount_model(spec: &mut Value, role: &str, source: &ModelSource) -> String {
    match source {
        ModelSource::Remote(url) => url.clone(),
        ModelSource::Local(path) => {
            let dir = podspec::parent(path);
            let vol = format!("sedge-model-{role}");
            let mount = format!("/home/data{}", dir.trim_end_matches('/'));
            podspec::mount_host_dir(spec, &vol, &dir, &mount, true, None);
            format!("/home/data{path}")
        }
    }
}

/// The cloud worker's port: its template's first `containerPort`, else the configured one.
fn cloud_port(ji: &JointInferenceService, cfg: &ControllerConfig) -> u16 {
    ji.spec
        .cloud_worker
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(cfg.big_model_port)
}

/// What the service asks of `hpa` that is not done: said in the condition, never dropped.
fn hpa_note(ji: &JointInferenceService) -> Option<String> {
    let notes: Vec<String> = [
        ("edgeWorker", &ji.spec.edge_worker.hpa),
        ("cloudWorker", &ji.spec.cloud_worker.hpa),
    ]
    .into_iter()
    .filter_map(|(w, h)| {
        let h = h.as_ref()?;
        Some(format!(
            "spec.{w}.hpa: autoscaling is not supported yet, running minReplicas ({}) of at most {}",
            replicas(&Some(h.clone())),
            h.max_replicas
        ))
    })
    .collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

fn replicas(hpa: &Option<crate::crd::Hpa>) -> i32 {
    hpa.as_ref()
        .and_then(|h| h.min_replicas)
        .unwrap_or(1)
        .max(1)
}

/// The Deployment for one worker, as a server-side-apply body.
#[allow(clippy::too_many_arguments)]
fn deployment(
    ji: &JointInferenceService,
    cfg: &ControllerConfig,
    role: &str,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    replicas: i32,
    model: &Model,
    source: &ModelSource,
    edit: impl FnOnce(&mut Value, &mut Value),
) -> Value {
    let name = ji.name_any();
    let uid = ji.uid().unwrap_or_default();
    let (mut meta, mut spec) = podspec::from_template(
        template,
        &[
            (NAME_LABEL, &name),
            (UID_LABEL, &uid),
            (WORKER_TYPE_LABEL, role),
        ],
    );
    let url = mount_model(&mut spec, role, source);
    common_env(&mut spec, ji, cfg, &url, model);
    edit(&mut spec, &mut meta);
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": format!("{name}-deployment-{role}"),
            "namespace": ji.namespace(),
            "labels": {NAME_LABEL: name, WORKER_TYPE_LABEL: role},
            "ownerReferences": [owner_ref(ji)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {NAME_LABEL: name, WORKER_TYPE_LABEL: role}},
            "template": {"metadata": meta, "spec": spec},
        }
    })
}

/// What a worker learns from its Model's annotations: the SHA-256 its download must match, and
/// how a model without a config sidecar is fed (checked in `check`; bad ones never get here).
fn model_env(containers: &mut [Value], model: &Model) {
    if let Some(sum) = model.annotations().get(MODEL_SHA256_ANNOTATION) {
        set_env(containers, env::MODEL_SHA256, json!(sum));
    }
    if let Ok(meta) = sedge_worker_contract::model::from_annotations(model.annotations())
        && !meta.is_empty()
    {
        set_env(
            containers,
            env::MODEL_METADATA,
            json!(serde_json::to_string(&meta).unwrap_or_default()),
        );
    }
}

fn common_env(
    spec: &mut Value,
    ji: &JointInferenceService,
    cfg: &ControllerConfig,
    model_url: &str,
    model: &Model,
) {
    let containers = containers(spec);
    podspec::common_env(
        containers,
        cfg,
        &ji.namespace().unwrap_or_default(),
        (env::SERVICE_NAME, &ji.name_any()),
    );
    set_env(containers, env::MODEL_URL, json!(model_url));
    model_env(containers, model);
    set_env(containers, env::DATA_PATH_PREFIX, json!("/home/data"));
}

/// The route port of `ji`: its annotation, or a free one from the range (recorded on the service).
async fn route_port(ji: &JointInferenceService, ctx: &Ctx) -> Result<u16, AiError> {
    if let Some(p) = ji
        .annotations()
        .get(ROUTE_PORT_ANNOTATION)
        .and_then(|p| p.parse::<u16>().ok())
    {
        return Ok(p);
    }
    let _one = ctx.alloc.lock().await;
    let used: BTreeSet<u16> = ctx
        .store
        .state()
        .iter()
        .filter(|o| o.uid() != ji.uid())
        .filter_map(|o| o.annotations().get(ROUTE_PORT_ANNOTATION)?.parse().ok())
        .collect();
    let [first, last] = ctx.cfg.route_ports;
    let span = u32::from(last - first) + 1;
    let key = format!("{}/{}", ji.namespace().unwrap_or_default(), ji.name_any());
    let start = key.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    }) % span;
    let port = (0..span)
        .map(|i| first + ((start + i) % span) as u16)
        .find(|p| !used.contains(p))
        .ok_or_else(|| AiError::Config(format!("all route ports {first}-{last} are in use")))?;
    Api::<JointInferenceService>::namespaced(
        ctx.client.clone(),
        &ji.namespace().unwrap_or_default(),
    )
    .patch(
        &ji.name_any(),
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {ROUTE_PORT_ANNOTATION: port.to_string()}}}),
        ),
    )
    .await?;
    Ok(port)
}

async fn apply_children(
    ji: &JointInferenceService,
    r: &Resolved,
    ctx: &Ctx,
) -> Result<Option<Verdict>, AiError> {
    let ns = ji.namespace().unwrap_or_default();
    let name = ji.name_any();
    let cfg = &ctx.cfg;
    let port = cloud_port(ji, cfg);
    let svc_name = format!("{name}-cloud");
    let direct = ji.annotations().get(DIRECT_ADDRESS_ANNOTATION).cloned();
    let route = match &direct {
        Some(_) => None,
        None => Some(route_port(ji, ctx).await?),
    };

    let cloud = deployment(
        ji,
        cfg,
        "cloud",
        &ji.spec.cloud_worker.template,
        replicas(&ji.spec.cloud_worker.hpa),
        &r.cloud_model,
        &r.cloud_source,
        |spec, _meta| {
            set_env(
                containers(spec),
                env::BIG_MODEL_BIND_PORT,
                json!(port.to_string()),
            );
        },
    );
    let hem = &ji.spec.edge_worker.hard_example_mining;
    let edge = deployment(
        ji,
        cfg,
        "edge",
        &ji.spec.edge_worker.template,
        replicas(&ji.spec.edge_worker.hpa),
        &r.edge_model,
        &r.edge_source,
        |spec, meta| {
            let (ip, p) = match (&direct, route) {
                (Some(addr), _) => match addr.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), p.to_string()),
                    None => (addr.clone(), port.to_string()),
                },
                (None, Some(lp)) => ("127.0.0.1".to_string(), lp.to_string()),
                (None, None) => unreachable!("a route port without a direct address"),
            };
            let cs = containers(spec);
            set_env(cs, env::HEM_NAME, json!(hem.name));
            set_env(
                cs,
                env::HEM_PARAMETERS,
                json!(hem_parameters_json(&hem.parameters)),
            );
            set_env(cs, env::BIG_MODEL_IP, json!(ip));
            set_env(cs, env::BIG_MODEL_PORT, json!(p));
            if let Some(lp) = route {
                meta["annotations"][ROUTE_LISTEN_ANNOTATION] = json!(lp.to_string());
                meta["annotations"][ROUTE_SERVICE_ANNOTATION] = json!(format!("{svc_name}:{port}"));
            }
            // Pinned to the edge: the template's nodeName or nodeSelector, else any edge node.
            if spec["nodeName"].as_str().unwrap_or("").is_empty()
                && spec["nodeSelector"]
                    .as_object()
                    .is_none_or(|m| m.is_empty())
            {
                spec["nodeSelector"] = json!({sedge_api::EDGE_LABEL: ""});
            }
        },
    );
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": svc_name, "namespace": ns,
            "labels": {NAME_LABEL: name, WORKER_TYPE_LABEL: "cloud"},
            "annotations": {EDGE_ROUTABLE_ANNOTATION: "true"},
            "ownerReferences": [owner_ref(ji)],
        },
        "spec": {
            "selector": {NAME_LABEL: name, WORKER_TYPE_LABEL: "cloud"},
            "ports": [{"name": "tcp-0", "port": port, "targetPort": port, "protocol": "TCP"}],
        }
    });
    let pp = PatchParams::apply(MANAGER).force();
    let deps = Api::<Deployment>::namespaced(ctx.client.clone(), &ns);
    for (role, body) in [("cloud", &cloud), ("edge", &edge)] {
        let dname = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Err(e) = deps.patch(&dname, &pp, &Patch::Apply(body)).await {
            return match e {
                kube::Error::Api(s) if s.code == 422 || s.code == 400 => Ok(Some(Verdict::failed(
                    "InvalidTemplate",
                    format!(
                        "spec.{role}Worker.template was refused by the API server: {}",
                        s.message
                    ),
                ))),
                e => Err(e.into()),
            };
        }
    }
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&svc_name, &pp, &Patch::Apply(&service))
        .await?;
    Ok(None)
}

async fn observe(
    ji: &JointInferenceService,
    ctx: &Ctx,
) -> Result<(Verdict, JointInferenceServiceStatus), AiError> {
    let ns = ji.namespace().unwrap_or_default();
    let name = ji.name_any();
    let deps = Api::<Deployment>::namespaced(ctx.client.clone(), &ns);
    let edge = deps.get_opt(&format!("{name}-deployment-edge")).await?;
    let cloud = deps.get_opt(&format!("{name}-deployment-cloud")).await?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{NAME_LABEL}={name}")))
        .await?
        .items;
    let (er, ew) = readiness(edge.as_ref());
    let (cr, cw) = readiness(cloud.as_ref());
    let mut st = JointInferenceServiceStatus {
        edge_workers: Some(format!("{er}/{ew}")),
        cloud_workers: Some(format!("{cr}/{cw}")),
        ..Default::default()
    };
    let up = |r: i32, w: i32| w > 0 && r >= w;
    let active = i32::from(up(er, ew)) + i32::from(up(cr, cw));
    st.active = Some(active);
    st.failed = Some(2 - active);
    let verdict = if let Some((pod, role, restarts, code)) = crash_looping(&pods) {
        let line = last_log_line(&ctx.client, &ns, &pod)
            .await
            .unwrap_or_default();
        let (reason, what) = if code == Some(EXIT_MODEL_UNAVAILABLE) {
            ("ModelUnavailable", "cannot load its model")
        } else {
            ("WorkerCrashLooping", "keeps crashing")
        };
        Verdict::failed(
            reason,
            format!(
                "{role} worker {pod} {what} (restarted {restarts} times, last exit code {}): {line}; see kubectl logs {pod} -n {ns}",
                code.map_or("?".into(), |c| c.to_string())
            ),
        )
    } else if let Some((pod, role, message)) = config_error(&pods) {
        // The node would not start the worker: a model directory it does not allow as a host
        // path is a model that is not available there.
        let (reason, what) = if message.contains("hostPath") {
            ("ModelUnavailable", "cannot mount its model")
        } else {
            ("WorkerConfigError", "cannot be configured")
        };
        Verdict::failed(
            reason,
            format!("{role} worker {pod} {what} on its node: {message}"),
        )
    } else if active == 2 {
        let m = metrics_map(&ji.status.as_ref().and_then(|s| s.metrics.clone()));
        if m.get("cloudReachable").map(String::as_str) == Some("false") {
            Verdict::running(
                "CloudUnreachable",
                format!(
                    "the edge worker cannot reach the cloud worker and answers edge-only: {}",
                    m.get("cloudError").cloned().unwrap_or_default()
                ),
            )
        } else {
            Verdict::running(
                "WorkersReady",
                format!("edge {er}/{ew} and cloud {cr}/{cw} workers ready"),
            )
        }
    } else {
        let unscheduled: Vec<String> = pods
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or("")
                    .is_empty()
            })
            .map(|p| p.name_any())
            .collect();
        let mut message =
            format!("waiting for workers: edge {er}/{ew} ready, cloud {cr}/{cw} ready");
        if !unscheduled.is_empty() {
            message.push_str(&format!(
                "; not yet on a node: {} (check the template's nodeName/nodeSelector and kubectl get nodes)",
                unscheduled.join(", ")
            ));
        }
        Verdict::pending("WorkersStarting", message)
    };
    Ok((verdict, st))
}

async fn reconcile(ji: Arc<JointInferenceService>, ctx: Arc<Ctx>) -> Result<Action, AiError> {
    if ji.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ji.namespace().unwrap_or_default();
    let now = now();
    let (verdict, mut st) = match check(&ji, &ctx).await? {
        Err(v) => (v, JointInferenceServiceStatus::default()),
        Ok(resolved) => match apply_children(&ji, &resolved, &ctx).await? {
            Some(v) => (v, JointInferenceServiceStatus::default()),
            None => observe(&ji, &ctx).await?,
        },
    };
    let mut verdict = verdict;
    if !matches!(verdict, Verdict::Failed(_))
        && let Some(note) = hpa_note(&ji)
    {
        let why = verdict.why_mut();
        why.message.push_str("; ");
        why.message.push_str(&note);
    }
    let old = ji.status.clone().unwrap_or_default();
    st.conditions = Some(conditions(
        old.conditions.as_deref().unwrap_or(&[]),
        &verdict,
        &now,
    ));
    st.start_time = old.start_time.clone().or(Some(now.clone()));
    st.observed_generation = ji.meta().generation;
    if st.active.is_none() {
        st.active = Some(0);
        st.failed = Some(2);
    }
    let changed = st.conditions != old.conditions
        || st.active != old.active
        || st.failed != old.failed
        || st.edge_workers != old.edge_workers
        || st.cloud_workers != old.cloud_workers
        || st.start_time != old.start_time
        || st.observed_generation != old.observed_generation;
    if changed {
        let body = json!({"status": {
            "conditions": st.conditions, "startTime": st.start_time, "active": st.active,
            "failed": st.failed, "edgeWorkers": st.edge_workers, "cloudWorkers": st.cloud_workers,
            "observedGeneration": st.observed_generation,
        }});
        Api::<JointInferenceService>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &ji.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await?;
        let was = old
            .conditions
            .iter()
            .flatten()
            .find(|c| c.status == "True")
            .and_then(|c| c.reason.clone());
        if let Verdict::Failed(why) = &verdict
            && was.as_deref() != Some(why.reason.as_str())
        {
            tracing::warn!(service = %format!("{ns}/{}", ji.name_any()), reason = %why.reason, message = %why.message, "joint inference service failed");
        }
    }
    Ok(Action::requeue(verdict.requeue()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_urls() {
        assert_eq!(
            model_source("/m/a.onnx"),
            Ok(ModelSource::Local("/m/a.onnx".into()))
        );
        assert_eq!(
            model_source("file:///m/a.onnx"),
            Ok(ModelSource::Local("/m/a.onnx".into()))
        );
        assert_eq!(
            model_source("https://h/a.onnx"),
            Ok(ModelSource::Remote("https://h/a.onnx".into()))
        );
        let e = model_source("s3://bucket/a.onnx").unwrap_err();
        assert!(e.contains("s3://") && e.contains("file://"), "{e}");
        assert!(
            model_source("models/a.onnx")
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn hpa_is_reported_not_dropped() {
        let yaml = include_str!("../tests/sedna/helmet-ji.yaml");
        let ji: JointInferenceService = serde_yaml::from_str(yaml).unwrap();
        let note = hpa_note(&ji).unwrap();
        assert!(
            note.contains("spec.edgeWorker.hpa") && note.contains("minReplicas (1) of at most 2"),
            "{note}"
        );
        assert_eq!(replicas(&ji.spec.edge_worker.hpa), 1);
        assert_eq!(replicas(&ji.spec.cloud_worker.hpa), 1);
    }

    #[test]
    fn local_paths_are_normalised() {
        assert_eq!(
            model_source("/w/p/../../m/./a.onnx"),
            Ok(ModelSource::Local("/m/a.onnx".into()))
        );
    }

    #[test]
    fn model_annotations_reach_the_worker() {
        let model: Model = serde_json::from_value(json!({
            "apiVersion": "sedna.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "m", "annotations": {
                "model.sedge.io/labels": "cat,dog", "model.sedge.io/std": "0.5",
                "sedge.io/model-sha256": "ab12", "other.io/x": "y"}},
            "spec": {"url": "/opt/m.onnx", "format": "onnx"}
        }))
        .unwrap();
        let mut spec = json!({"containers": [{"name": "w"}]});
        model_env(containers(&mut spec), &model);
        let env = spec["containers"][0]["env"].as_array().unwrap();
        let get = |n: &str| {
            env.iter()
                .find(|e| e["name"] == n)
                .map(|e| e["value"].clone())
        };
        assert_eq!(get("MODEL_SHA256"), Some(json!("ab12")));
        let meta: std::collections::BTreeMap<String, String> =
            serde_json::from_str(get("SEDGE_MODEL_METADATA").unwrap().as_str().unwrap()).unwrap();
        assert_eq!(meta.len(), 2);
        assert_eq!(meta["labels"], "cat,dog");
        // Without model annotations, no variable.
        let plain: Model = serde_json::from_value(json!({
            "apiVersion": "sedna.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "p"}, "spec": {"url": "/opt/p.onnx", "format": "onnx"}
        }))
        .unwrap();
        let mut spec = json!({"containers": [{"name": "w"}]});
        model_env(containers(&mut spec), &plain);
        assert!(spec["containers"][0]["env"].is_null());
    }

    #[test]
    fn user_env_wins_and_local_models_mount_their_directory() {
        let mut spec =
            json!({"containers": [{"name": "w", "env": [{"name": "HEM_NAME", "value": "Mine"}]}]});
        let url = mount_model(
            &mut spec,
            "edge",
            &ModelSource::Local("/opt/m/edge.onnx".into()),
        );
        assert_eq!(url, "/home/data/opt/m/edge.onnx");
        assert_eq!(spec["volumes"][0]["hostPath"]["path"], "/opt/m");
        assert_eq!(
            spec["containers"][0]["volumeMounts"][0]["mountPath"],
            "/home/data/opt/m"
        );
        let cs = spec["containers"].as_array_mut().unwrap();
        set_env(cs, "HEM_NAME", json!("CrossEntropy"));
        set_env(
            cs,
            "WORKER_NAME",
            json!({"fieldRef": {"fieldPath": "metadata.name"}}),
        );
        let env = &spec["containers"][0]["env"];
        assert_eq!(env[0]["value"], "Mine");
        assert_eq!(
            env[1]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        // Applying twice does not add a second mount.
        mount_model(
            &mut spec,
            "edge",
            &ModelSource::Local("/opt/m/edge.onnx".into()),
        );
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 1);
    }
}
