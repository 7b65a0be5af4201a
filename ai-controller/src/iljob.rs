//! The IncrementalLearningJob controller (the cloud half of Sedna's GM for this kind).
//!
//! Reconcile, in order (one pass, idempotent):
//! 1. Check what the job refers to: the Dataset (and its node), the initial, deploy and eval
//!    Models (files on that node), `trainProb`, both triggers, `outputDir`, the mining rule. A
//!    problem is a `Failed` condition naming the field (appended once, not on every pass);
//!    nothing is created until it is fixed.
//! 2. A new job gets its first condition ([`il::start`]).
//! 3. Children, by server-side apply and owned by the job: the state ConfigMap
//!    (`<job>-il-state`, [`IlNodeState`]: what the node's local controller needs, the current
//!    stage included) and the inference worker's Deployment (`<job>-inference`, from
//!    `deploySpec`, pinned to the Dataset's node, mounting that ConfigMap so the platform
//!    delivers it there).
//! 4. Drive the state machine ([`il::next`]) with what this pass observed: a Ready stage
//!    creates its pod (train or eval, Sedna's environment) or, cold deploy, restarts the
//!    inference worker; the stage's pod running, exiting or vanishing; Completed moves on;
//!    Failed waits out the back-off. The local controller's own events (trigger fired, worker
//!    results) arrive through the cloud module ([`crate::cloud`]), which applies them with the
//!    same [`il::next`] and the same [`append`].
//!
//! Both writers append with the job's `resourceVersion` as a precondition, so two transitions
//! computed from the same state never both land.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use sedge_worker_contract::{env, hot_update};
use serde_json::{Value, json};

use crate::controller::{AiError, ControllerConfig, ModelSource, model_source, now};
use crate::crd::{
    Dataset, IncrementalLearningCondition, IncrementalLearningJob, IncrementalLearningJobStatus,
    Model, hem_parameters_json,
};
use crate::il::{self, Action as IlAction, Event, Phase, Stage, State, Transition};
use crate::podspec::{self, containers, parent, set_env};
use crate::wire::{
    IL_JOB_LABEL, IL_STATE_KEY, IL_WORKER_TYPE_LABEL, IlEvent, IlNodeState, IlProgress,
    il_state_configmap,
};

const MANAGER: &str = "sedge-ai-controller";
/// Conditions kept in the status (the oldest go first); [`IncrementalLearningJobStatus`]'s
/// `transitions` keeps counting.
pub const MAX_CONDITIONS: usize = 64;
/// A stage pod that exited 0 moves its stage to Completed only after this long without the
/// worker's own report (which carries the results) having done it.
const REPORT_GRACE: Duration = Duration::from_secs(20);
/// Job annotation: the cloud model server (`host:port`) that labels the inference worker's hard
/// examples. Without it the worker runs edge-only and collects nothing.
pub const LABELLER_ANNOTATION: &str = "sedge.io/big-model-address";
/// Where the state ConfigMap is mounted in the inference worker.
const STATE_MOUNT: &str = "/home/sedge/il-state";

struct Ctx {
    client: Client,
    cfg: ControllerConfig,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    cfg: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs = Api::<IncrementalLearningJob>::all(client.clone());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
    });
    Controller::new(jobs, watcher::Config::default())
        .owns(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(IL_JOB_LABEL),
        )
        .owns(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().labels(IL_JOB_LABEL),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            crate::metrics::INCREMENTAL_LEARNING.count(&r);
            if let Err(e) = r {
                tracing::debug!(error = %e, "incremental learning reconcile failed");
            }
        })
        .await;
}

fn error_policy(_job: Arc<IncrementalLearningJob>, e: &AiError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "incremental learning reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The job's last condition: its current state.
fn last_condition(job: &IncrementalLearningJob) -> Option<&IncrementalLearningCondition> {
    job.status.as_ref()?.conditions.as_ref()?.last()
}

/// Where the job is: its last condition, parsed.
pub fn state_of(job: &IncrementalLearningJob) -> Option<State> {
    let c = last_condition(job)?;
    State::parse(c.stage.as_deref().unwrap_or_default(), &c.type_).ok()
}

/// How many transitions the job has been through (the last condition's sequence number + 1).
pub fn transitions(job: &IncrementalLearningJob) -> usize {
    job.status
        .as_ref()
        .and_then(|s| s.transitions)
        .unwrap_or_else(|| {
            job.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map_or(0, Vec::len)
        })
}

fn condition(t: &Transition, now: &str) -> IncrementalLearningCondition {
    IncrementalLearningCondition {
        type_: t.to.phase.to_string(),
        status: "True".into(),
        stage: Some(t.to.stage.to_string()),
        last_heartbeat_time: Some(now.to_string()),
        last_transition_time: Some(now.to_string()),
        reason: Some(t.reason.clone()),
        message: Some(t.message.clone()),
        data: t.data.clone(),
    }
}

/// Appends `t`'s condition (and whatever `edit` sets) to the job's status, on the condition that
/// the job was not changed since it was read. `Ok(false)`: it was; read it again.
pub async fn append(
    client: &Client,
    job: &IncrementalLearningJob,
    t: &Transition,
    edit: impl FnOnce(&mut IncrementalLearningJobStatus),
) -> Result<bool, kube::Error> {
    let now = now();
    let mut st = job.status.clone().unwrap_or_default();
    let seq = transitions(job);
    let conds = st.conditions.get_or_insert_with(Vec::new);
    conds.push(condition(t, &now));
    if conds.len() > MAX_CONDITIONS {
        conds.drain(..conds.len() - MAX_CONDITIONS);
    }
    st.transitions = Some(seq + 1);
    st.start_time.get_or_insert(now);
    edit(&mut st);
    let ns = job.namespace().unwrap_or_default();
    let body = json!({
        "metadata": {"resourceVersion": job.resource_version()},
        "status": st,
    });
    match Api::<IncrementalLearningJob>::namespaced(client.clone(), &ns)
        .patch_status(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(job = %format!("{ns}/{}", job.name_any()), to = %t.to, reason = %t.reason, "incremental learning job moved");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// What the job refers to, resolved.
struct Resolved {
    node: String,
    dataset: String,
    initial_model: String,
    deploy_model: String,
    eval_model: String,
}

fn local_file(role: &str, field: &str, m: &Model) -> Result<String, (String, String)> {
    match model_source(&m.spec.url) {
        Ok(ModelSource::Local(p)) => Ok(p),
        Ok(ModelSource::Remote(u)) => Err((
            "ModelURLUnsupported".into(),
            format!(
                "{role} model {:?} ({field}): {u} is remote; incremental learning trains and deploys on the node, so its Models must be files there (a path or file://)",
                m.name_any()
            ),
        )),
        Err(e) => Err((
            "ModelURLUnsupported".into(),
            format!("{role} model {:?} ({field}): spec.url {e}", m.name_any()),
        )),
    }
}

/// Checks the job; `Err((reason, message))` names the field at fault.
async fn check(
    job: &IncrementalLearningJob,
    client: &Client,
) -> Result<Result<Resolved, (String, String)>, AiError> {
    let ns = job.namespace().unwrap_or_default();
    let spec = &job.spec;
    let Some(ds) = Api::<Dataset>::namespaced(client.clone(), &ns)
        .get_opt(&spec.dataset.name)
        .await?
    else {
        return Ok(Err((
            "DatasetNotFound".into(),
            format!(
                "dataset {:?} (spec.dataset.name) does not exist in namespace {ns:?}; create the Dataset or fix the name",
                spec.dataset.name
            ),
        )));
    };
    if ds.spec.node_name.is_empty() {
        return Ok(Err((
            "DatasetWithoutNode".into(),
            format!(
                "dataset {:?} has no spec.nodeName: the job's data and workers must be on one node",
                spec.dataset.name
            ),
        )));
    }
    let dataset = match model_source(&ds.spec.url) {
        Ok(ModelSource::Local(p)) => p,
        _ => {
            return Ok(Err((
                "DatasetURLUnsupported".into(),
                format!(
                    "dataset {:?}: spec.url {:?} must be an index file on node {} (a path or file://)",
                    spec.dataset.name, ds.spec.url, ds.spec.node_name
                ),
            )));
        }
    };
    if !(0.0..=1.0).contains(&spec.dataset.train_prob) {
        return Ok(Err((
            "InvalidTrainProb".into(),
            format!(
                "spec.dataset.trainProb {} is outside [0, 1]",
                spec.dataset.train_prob
            ),
        )));
    }
    for (field, t) in [
        ("spec.trainSpec.trigger", &spec.train_spec.trigger),
        ("spec.deploySpec.trigger", &spec.deploy_spec.trigger),
    ] {
        if let Err(e) = crate::trigger::Rule::parse(t) {
            return Ok(Err(("InvalidTrigger".into(), format!("{field}: {e}"))));
        }
    }
    if !spec.output_dir.starts_with('/') || spec.output_dir.split('/').any(|c| c == "..") {
        return Ok(Err((
            "InvalidOutputDir".into(),
            format!(
                "spec.outputDir {:?} must be an absolute path on node {} without '..'",
                spec.output_dir, ds.spec.node_name
            ),
        )));
    }
    let hem = &spec.deploy_spec.hard_example_mining;
    if let Err(e) = sedge_worker_contract::mining::HardExampleMining::from_env_strings(
        &hem.name,
        &hem_parameters_json(&hem.parameters),
    ) {
        return Ok(Err((
            "InvalidHardExampleMining".into(),
            format!("spec.deploySpec.hardExampleMining: {e}"),
        )));
    }
    let models = Api::<Model>::namespaced(client.clone(), &ns);
    let mut files = Vec::new();
    let eval = spec
        .eval_spec
        .as_ref()
        .and_then(|e| e.initial_eval_model.as_ref());
    for (role, field, name) in [
        (
            "initial",
            "spec.initialModel.name",
            Some(&spec.initial_model.name),
        ),
        (
            "deploy",
            "spec.deploySpec.model.name",
            Some(&spec.deploy_spec.model.name),
        ),
        (
            "eval",
            "spec.evalSpec.initialEvalModel.name",
            eval.map(|m| &m.name),
        ),
    ] {
        let Some(name) = name else {
            files.push(String::new());
            continue;
        };
        let Some(m) = models.get_opt(name).await? else {
            return Ok(Err((
                "ModelNotFound".into(),
                format!(
                    "{role} model {name:?} ({field}) does not exist in namespace {ns:?}; create the Model or fix the name"
                ),
            )));
        };
        match local_file(role, field, &m) {
            Ok(p) => files.push(p),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(Resolved {
        node: ds.spec.node_name.clone(),
        dataset,
        initial_model: files[0].clone(),
        deploy_model: files[1].clone(),
        eval_model: files[2].clone(),
    }))
}

/// Mounts host directory `dir` at the same path (the workers see the node's paths unchanged).
fn mount_host_dir(spec: &mut Value, name: &str, dir: &str, read_only: bool) {
    podspec::mount_host_dir(spec, name, dir, dir, read_only, Some("DirectoryOrCreate"));
}

fn owner_ref(job: &IncrementalLearningJob) -> Value {
    podspec::owner_ref(
        "IncrementalLearningJob",
        &job.name_any(),
        &job.uid().unwrap_or_default(),
    )
}

fn hot_config(job: &IncrementalLearningJob) -> Option<String> {
    job.spec.deploy_spec.model.hot_update_enabled.then(|| {
        format!(
            "{}/hot-update/model_config.json",
            job.spec.output_dir.trim_end_matches('/')
        )
    })
}

/// A pod spec from `template` for `role`, with the job's labels, node, mounts and Sedna's common
/// environment.
fn pod_spec(
    job: &IncrementalLearningJob,
    cfg: &ControllerConfig,
    r: &Resolved,
    role: &str,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
) -> (Value, Value) {
    let name = job.name_any();
    let (meta, mut spec) = podspec::from_template(
        template,
        &[(IL_JOB_LABEL, &name), (IL_WORKER_TYPE_LABEL, role)],
    );
    spec["nodeName"] = json!(r.node);
    let out = job.spec.output_dir.trim_end_matches('/').to_string();
    mount_host_dir(&mut spec, "sedge-il-output", &out, false);
    mount_host_dir(
        &mut spec,
        "sedge-il-dataset",
        &parent(&r.dataset),
        role != "inference",
    );
    for (i, m) in [&r.initial_model, &r.deploy_model, &r.eval_model]
        .into_iter()
        .enumerate()
    {
        if !m.is_empty() && !parent(m).starts_with(&out) {
            // The deploy model is overwritten by a cold update: writable for the LC only,
            // read-only for the pods.
            mount_host_dir(&mut spec, &format!("sedge-il-model-{i}"), &parent(m), true);
        }
    }
    let cs = containers(&mut spec);
    podspec::common_env(
        cs,
        cfg,
        &job.namespace().unwrap_or_default(),
        (env::JOB_NAME, &name),
    );
    set_env(cs, env::ORIGINAL_DATASET_URL, json!(r.dataset));
    (meta, spec)
}

fn state_configmap(job: &IncrementalLearningJob, r: &Resolved) -> Value {
    let (stage, phase) = state_of(job)
        .map(|s| (s.stage.to_string(), s.phase.to_string()))
        .unwrap_or_default();
    let st = IlNodeState {
        job: job.name_any(),
        node: r.node.clone(),
        dataset: r.dataset.clone(),
        train_prob: job.spec.dataset.train_prob,
        train_trigger: job.spec.train_spec.trigger.clone(),
        deploy_trigger: job.spec.deploy_spec.trigger.clone(),
        output_dir: job.spec.output_dir.trim_end_matches('/').to_string(),
        initial_model: r.initial_model.clone(),
        deploy_model: r.deploy_model.clone(),
        eval_model: r.eval_model.clone(),
        hot_update_config: hot_config(job).unwrap_or_default(),
        hot_update_poll_seconds: job.spec.deploy_spec.model.poll_period_seconds.max(1) as u64,
        stage,
        phase,
        seq: transitions(job),
    };
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": il_state_configmap(&job.name_any()),
            "namespace": job.namespace(),
            "labels": {IL_JOB_LABEL: job.name_any()},
            "ownerReferences": [owner_ref(job)],
        },
        "data": {IL_STATE_KEY: serde_json::to_string_pretty(&st).expect("serialises")},
    })
}

fn inference_deployment(
    job: &IncrementalLearningJob,
    cfg: &ControllerConfig,
    r: &Resolved,
) -> Value {
    let name = job.name_any();
    let (meta, mut spec) = pod_spec(job, cfg, r, "inference", &job.spec.deploy_spec.template);
    let hem = &job.spec.deploy_spec.hard_example_mining;
    let cs = containers(&mut spec);
    set_env(cs, env::MODEL_URL, json!(r.deploy_model));
    set_env(cs, env::HEM_NAME, json!(hem.name));
    set_env(
        cs,
        env::HEM_PARAMETERS,
        json!(hem_parameters_json(&hem.parameters)),
    );
    // The worker appends each hard example, with the cloud's answer, to the Dataset's index.
    set_env(cs, env::HARD_EXAMPLES_INDEX, json!(r.dataset));
    if let Some(addr) = job.annotations().get(LABELLER_ANNOTATION) {
        let (ip, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "5000"));
        set_env(cs, env::BIG_MODEL_IP, json!(ip));
        set_env(cs, env::BIG_MODEL_PORT, json!(port));
    }
    if let Some(config) = hot_config(job) {
        set_env(cs, hot_update::ENABLED_ENV, json!("true"));
        set_env(
            cs,
            hot_update::PERIOD_ENV,
            json!(
                job.spec
                    .deploy_spec
                    .model
                    .poll_period_seconds
                    .max(1)
                    .to_string()
            ),
        );
        set_env(cs, hot_update::CONFIG_ENV, json!(config));
    }
    // The state ConfigMap rides with the worker, so the node holds it (offline too).
    let vols = spec["volumes"]
        .as_array_mut()
        .expect("mount_host_dir made it");
    vols.push(json!({"name": "sedge-il-state", "configMap": {"name": il_state_configmap(&name)}}));
    for c in spec["containers"].as_array_mut().into_iter().flatten() {
        if let Some(m) = c["volumeMounts"].as_array_mut() {
            m.push(json!({"name": "sedge-il-state", "mountPath": STATE_MOUNT, "readOnly": true}));
        }
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": format!("{name}-inference"),
            "namespace": job.namespace(),
            "labels": {IL_JOB_LABEL: name, IL_WORKER_TYPE_LABEL: "inference"},
            "ownerReferences": [owner_ref(job)],
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {IL_JOB_LABEL: name, IL_WORKER_TYPE_LABEL: "inference"}},
            "template": {"metadata": meta, "spec": spec},
        }
    })
}

/// The train or eval pod of a round, from the Ready condition's `data` (the LC's input).
fn stage_pod(
    job: &IncrementalLearningJob,
    cfg: &ControllerConfig,
    r: &Resolved,
    stage: Stage,
    data: &Value,
) -> Result<Value, String> {
    let round = data["round"]
        .as_u64()
        .ok_or("the Ready condition's data has no round")?;
    let field = |k: &str| -> Result<String, String> {
        data[k]
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("the Ready condition's data has no {k}"))
    };
    let template = match stage {
        Stage::Train => &job.spec.train_spec.template,
        Stage::Eval => match &job.spec.eval_spec {
            Some(e) => &e.template,
            None => {
                return Err(
                    "spec.evalSpec is missing: the eval stage has no worker template".into(),
                );
            }
        },
        Stage::Deploy => return Err("deploy has no pod".into()),
    };
    let role = stage.lower();
    let (mut meta, mut spec) = pod_spec(job, cfg, r, role, template);
    let cs = containers(&mut spec);
    match stage {
        Stage::Train => {
            set_env(cs, env::BASE_MODEL_URL, json!(field("baseModelUrl")?));
            set_env(cs, env::MODEL_URL, json!(field("outputUrl")?));
            set_env(cs, env::TRAIN_DATASET_URL, json!(field("trainDatasetUrl")?));
        }
        _ => {
            set_env(cs, env::MODEL_URLS, json!(field("modelUrls")?));
            set_env(cs, env::TEST_DATASET_URL, json!(field("testDatasetUrl")?));
        }
    }
    if spec["restartPolicy"].as_str().is_none_or(str::is_empty) {
        spec["restartPolicy"] = json!("Never");
    }
    let name = stage_pod_name(job, stage, round);
    meta["name"] = json!(name);
    meta["namespace"] = json!(job.namespace());
    meta["ownerReferences"] = json!([owner_ref(job)]);
    Ok(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}))
}

fn stage_pod_name(job: &IncrementalLearningJob, stage: Stage, round: u64) -> String {
    format!("{}-{}-{round}", job.name_any(), stage.lower())
}

/// The data of the job's last `stage`/Ready condition.
fn ready_data(job: &IncrementalLearningJob, stage: Stage) -> Value {
    job.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .rev()
        .find(|c| c.type_ == "Ready" && c.stage.as_deref() == Some(&stage.to_string()))
        .and_then(|c| serde_json::from_str(c.data.as_deref()?).ok())
        .unwrap_or(Value::Null)
}

/// Failed conditions since the last Completed one.
fn failures(job: &IncrementalLearningJob) -> u32 {
    job.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .rev()
        .take_while(|c| c.type_ != "Completed")
        .filter(|c| c.type_ == "Failed")
        .count() as u32
}

fn since(c: Option<&IncrementalLearningCondition>) -> Duration {
    let t = c
        .and_then(|c| c.last_transition_time.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    match t {
        Some(t) => (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
            .to_std()
            .unwrap_or_default(),
        None => Duration::ZERO,
    }
}

/// What the stage's pod says, as an event.
async fn pod_event(
    job: &IncrementalLearningJob,
    ctx: &Ctx,
    stage: Stage,
) -> Result<Option<Event>, AiError> {
    let ns = job.namespace().unwrap_or_default();
    let Some(round) = ready_data(job, stage)["round"].as_u64() else {
        return Ok(None);
    };
    let name = stage_pod_name(job, stage, round);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let Some(pod) = pods.get_opt(&name).await? else {
        // Created by this controller a moment ago, and not visible yet: wait.
        return Ok(
            (since(last_condition(job)) > Duration::from_secs(30)).then(|| Event::PodFailed {
                reason: "PodMissing".into(),
                message: format!("{} pod {name} is gone", stage.lower()),
            }),
        );
    };
    let status = pod.status.clone().unwrap_or_default();
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.clone())
        .next();
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.clone())
        .find(|w| {
            matches!(
                w.reason.as_deref(),
                Some(
                    "ErrImagePull"
                        | "ImagePullBackOff"
                        | "CreateContainerConfigError"
                        | "CreateContainerError"
                )
            )
        });
    Ok(match status.phase.as_deref() {
        Some("Succeeded") => {
            let finished = terminated
                .as_ref()
                .and_then(|t| t.finished_at.as_ref())
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.0.to_string()).ok())
                .map(|t| {
                    (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                        .to_std()
                        .unwrap_or_default()
                })
                .unwrap_or(REPORT_GRACE);
            (finished >= REPORT_GRACE).then_some(Event::PodSucceeded)
        }
        Some("Failed") => {
            let code = terminated.as_ref().map(|t| t.exit_code);
            let log = crate::verdict::last_log_line(&ctx.client, &ns, &name).await;
            Some(Event::PodFailed {
                reason: terminated
                    .as_ref()
                    .and_then(|t| t.reason.clone())
                    .unwrap_or_else(|| "Error".into()),
                message: format!(
                    "{} pod {name} failed (exit code {}){}",
                    stage.lower(),
                    code.map_or("unknown".into(), |c| c.to_string()),
                    log.map(|l| format!(": {l}")).unwrap_or_default()
                ),
            })
        }
        _ => match waiting {
            Some(w) => Some(Event::PodFailed {
                reason: w.reason.unwrap_or_default(),
                message: format!(
                    "{} pod {name}: {}",
                    stage.lower(),
                    w.message.unwrap_or_default()
                ),
            }),
            None if status.phase.as_deref() == Some("Running") => Some(Event::PodRunning),
            None => None,
        },
    })
}

async fn apply(client: &Client, ns: &str, body: &Value) -> Result<Option<String>, AiError> {
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pp = PatchParams::apply(MANAGER).force();
    let r = match body["kind"].as_str() {
        Some("Deployment") => Api::<Deployment>::namespaced(client.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(body))
            .await
            .map(|_| ()),
        _ => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(body))
            .await
            .map(|_| ()),
    };
    match r {
        Ok(()) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => Ok(Some(s.message)),
        Err(e) => Err(e.into()),
    }
}

/// Appends `stage`/Failed with `reason`, unless the job's last condition already says so (a
/// problem that persists is one condition, not one per pass).
async fn refuse(
    client: &Client,
    job: &IncrementalLearningJob,
    stage: Stage,
    reason: &str,
    message: String,
) -> Result<(), AiError> {
    if last_condition(job).and_then(|c| c.reason.as_deref()) == Some(reason) {
        return Ok(());
    }
    let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
    tracing::warn!(job = %key, %reason, %message, "incremental learning stage refused");
    let t = Transition {
        to: State {
            stage,
            phase: Phase::Failed,
        },
        reason: reason.to_string(),
        message,
        data: None,
        action: IlAction::None,
    };
    append(client, job, &t, |_| {}).await?;
    Ok(())
}

async fn reconcile(job: Arc<IncrementalLearningJob>, ctx: Arc<Ctx>) -> Result<Action, AiError> {
    if job.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    let state = state_of(&job);
    let resolved = match check(&job, &ctx.client).await? {
        Ok(r) => r,
        Err((reason, message)) => {
            let stage = state.map_or(Stage::Train, |s| s.stage);
            refuse(&ctx.client, &job, stage, &reason, message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let Some(state) = state else {
        append(&ctx.client, &job, &il::start(), |st| {
            st.round = Some(0);
            st.model_version = Some("initial".into());
            st.model_url = Some(resolved.deploy_model.clone());
        })
        .await?;
        return Ok(Action::requeue(Duration::from_millis(100)));
    };
    for body in [
        state_configmap(&job, &resolved),
        inference_deployment(&job, &ctx.cfg, &resolved),
    ] {
        if let Some(why) = apply(&ctx.client, &ns, &body).await? {
            let message = format!("spec.deploySpec.template was refused by the API server: {why}");
            refuse(&ctx.client, &job, state.stage, "InvalidTemplate", message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    }
    let hot = job.spec.deploy_spec.model.hot_update_enabled;

    let event = match state.phase {
        Phase::Starting | Phase::Running if state.stage != Stage::Deploy => {
            match pod_event(&job, &ctx, state.stage).await? {
                Some(e) => e,
                None => return Ok(Action::requeue(Duration::from_secs(5))),
            }
        }
        Phase::Waiting | Phase::Starting | Phase::Running => {
            // The local controller's turn; its events come through the cloud module.
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        _ => Event::Reconcile {
            waited: since(last_condition(&job)),
            failures: failures(&job),
        },
    };
    let Some(t) = il::next(state, &event, hot) else {
        let wait = match (state.phase, &event) {
            (Phase::Failed, Event::Reconcile { waited, failures }) => {
                il::backoff(*failures).saturating_sub(*waited) + Duration::from_millis(200)
            }
            _ => Duration::from_secs(10),
        };
        return Ok(Action::requeue(wait));
    };
    // Act before recording it: a pod that exists with its condition lost is found again by
    // name on the next pass; a condition without its pod would wait for nothing.
    match t.action {
        IlAction::CreatePod(stage) => {
            let data = ready_data(&job, stage);
            let pod = match stage_pod(&job, &ctx.cfg, &resolved, stage, &data) {
                Ok(p) => p,
                Err(why) => {
                    refuse(&ctx.client, &job, stage, "InvalidStageInput", why).await?;
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
            };
            let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
            let body: Pod = serde_json::from_value(pod)
                .map_err(|e| AiError::Config(format!("pod body: {e}")))?;
            match pods.create(&PostParams::default(), &body).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    let message = format!(
                        "the {} pod was refused by the API server: {}",
                        stage.lower(),
                        s.message
                    );
                    refuse(&ctx.client, &job, stage, "InvalidTemplate", message).await?;
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        IlAction::RestartInferenceWorker => {
            let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
            let sel = format!(
                "{IL_JOB_LABEL}={},{IL_WORKER_TYPE_LABEL}=inference",
                job.name_any()
            );
            for p in pods.list(&ListParams::default().labels(&sel)).await?.items {
                match pods.delete(&p.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        IlAction::None | IlAction::CreateInferenceWorker => {}
    }
    append(&ctx.client, &job, &t, |_| {}).await?;
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Applies a local controller's event to its job (called by the cloud module, after the hub
/// checked that the node runs the reporting pod and the pod belongs to the job). `Err` is
/// transient (the edge sends it again); a stale or impossible event is logged and dropped.
pub async fn on_event(client: &Client, ns: &str, ev: &IlEvent) -> Result<(), String> {
    let api = Api::<IncrementalLearningJob>::namespaced(client.clone(), ns);
    let key = format!("{ns}/{}", ev.job);
    let Ok(stage) = ev.stage.parse::<Stage>() else {
        tracing::warn!(job = %key, stage = %ev.stage, "local controller event for an unknown stage; dropped");
        return Ok(());
    };
    let event = match ev.status.as_str() {
        "ready" => Event::LcReady {
            stage,
            data: ev.data.clone(),
        },
        "completed" => Event::LcCompleted {
            stage,
            data: ev.data.clone(),
        },
        "failed" => Event::LcFailed {
            stage,
            message: ev.message.clone(),
        },
        other => {
            tracing::warn!(job = %key, status = %other, "local controller event with an unknown status; dropped");
            return Ok(());
        }
    };
    let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    for _ in 0..5 {
        let job = match api.get_opt(&ev.job).await {
            Ok(Some(j)) => j,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("job {key}: {e}")),
        };
        let Some(state) = state_of(&job) else {
            return Err(format!("job {key} has no condition yet"));
        };
        // What the LC decided on a state it saw must answer that state; worker outcomes
        // (seq 0) answer whatever run of the stage is going on.
        if ev.seq != 0 && ev.seq != transitions(&job) {
            tracing::debug!(job = %key, seq = ev.seq, now = transitions(&job), "stale local controller event; dropped");
            return Ok(());
        }
        let Some(t) = il::next(state, &event, job.spec.deploy_spec.model.hot_update_enabled) else {
            tracing::debug!(job = %key, %state, status = %ev.status, stage = %ev.stage, "local controller event causes no transition; dropped");
            return Ok(());
        };
        let applied = append(client, &job, &t, |st| {
            if stage == Stage::Train && ev.status == "ready" {
                st.round = Some(ev.round);
                st.samples = Some(0);
            }
            if let Some(v) = data["modelVersion"].as_str() {
                st.model_version = Some(v.to_string());
                st.model_url = data["modelUrl"].as_str().map(String::from);
            }
            if let Some(e) = data.get("lastEval") {
                st.last_eval = Some(e.to_string());
            }
        })
        .await
        .map_err(|e| format!("job {key}: {e}"))?;
        if applied {
            return Ok(());
        }
    }
    Err(format!("job {key}: the status kept changing; retrying"))
}

/// Writes a local controller's sample count into the job's status.
pub async fn on_progress(client: &Client, ns: &str, p: &IlProgress) -> Result<(), String> {
    let body = json!({"status": {"samples": p.samples}});
    match Api::<IncrementalLearningJob>::namespaced(client.clone(), ns)
        .patch_status(&p.job, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(format!("job {ns}/{}: {e}", p.job)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(yaml: &str) -> IncrementalLearningJob {
        serde_yaml::from_str(yaml).unwrap()
    }

    const JOB: &str = r#"
apiVersion: sedna.io/v1alpha1
kind: IncrementalLearningJob
metadata: {name: fm, namespace: default, uid: u1, annotations: {sedge.io/big-model-address: "127.0.0.1:5001"}}
spec:
  initialModel: {name: edge}
  dataset: {name: hard, trainProb: 0.8}
  trainSpec:
    template: {spec: {containers: [{name: t, image: sedge/worker, args: [train]}]}}
    trigger: {checkPeriodSeconds: 5, timer: {start: "00:00", end: "23:59"}, condition: {operator: ">", threshold: 50, metric: num_of_samples}}
  evalSpec:
    template: {spec: {containers: [{name: e, image: sedge/worker, args: [eval]}]}}
  deploySpec:
    model: {name: deployed, hotUpdateEnabled: true, pollPeriodSeconds: 2}
    trigger: {condition: {operator: ">", threshold: 0.0, metric: accuracy_delta}}
    hardExampleMining: {name: IBT, parameters: [{key: threshold_img, value: "0.9"}]}
    template: {spec: {containers: [{name: i, image: sedge/worker, args: [edge, /tmp/data/stream.txt]}]}}
  outputDir: /tmp/il/out
"#;

    fn resolved() -> Resolved {
        Resolved {
            node: "edge-1".into(),
            dataset: "/tmp/il/hard/index.txt".into(),
            initial_model: "/tmp/models/edge.onnx".into(),
            deploy_model: "/tmp/il/deployed/edge.onnx".into(),
            eval_model: String::new(),
        }
    }

    fn env(pod_spec: &Value) -> std::collections::BTreeMap<String, Value> {
        pod_spec["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let v = if e["value"].is_null() {
                    e["valueFrom"].clone()
                } else {
                    e["value"].clone()
                };
                (e["name"].as_str().unwrap().to_string(), v)
            })
            .collect()
    }

    #[test]
    fn the_inference_worker_gets_sednas_environment_the_hot_update_contract_and_the_state() {
        let j = job(JOB);
        let d = inference_deployment(&j, &ControllerConfig::default(), &resolved());
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(spec["nodeName"], "edge-1");
        let e = env(spec);
        assert_eq!(e["MODEL_URL"], "/tmp/il/deployed/edge.onnx");
        assert_eq!(e["HEM_NAME"], "IBT");
        assert_eq!(e["MODEL_HOT_UPDATE"], "true");
        assert_eq!(e["MODEL_POLL_PERIOD_SECONDS"], "2");
        assert_eq!(
            e["MODEL_HOT_UPDATE_CONFIG"],
            "/tmp/il/out/hot-update/model_config.json"
        );
        assert_eq!(e["HARD_EXAMPLES_INDEX"], "/tmp/il/hard/index.txt");
        assert_eq!(
            (e["BIG_MODEL_IP"].as_str(), e["BIG_MODEL_PORT"].as_str()),
            (Some("127.0.0.1"), Some("5001"))
        );
        assert_eq!(e["JOB_NAME"], "fm");
        assert_eq!(e["WORKER_NAME"]["fieldRef"]["fieldPath"], "metadata.name");
        let vols = spec["volumes"].as_array().unwrap();
        assert!(vols.iter().any(|v| v["configMap"]["name"] == "fm-il-state"));
        assert!(vols.iter().any(|v| v["hostPath"]["path"] == "/tmp/il/out"));
        assert!(vols.iter().any(|v| v["hostPath"]["path"] == "/tmp/il/hard"));
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels[IL_JOB_LABEL], "fm");
        assert_eq!(labels[IL_WORKER_TYPE_LABEL], "inference");
    }

    #[test]
    fn stage_pods_take_their_input_from_the_ready_condition() {
        let j = job(JOB);
        let data = json!({"round": 2, "baseModelUrl": "/tmp/il/deployed/edge.onnx",
            "outputUrl": "/tmp/il/out/models/2", "trainDatasetUrl": "/tmp/il/out/data/train/2/data.txt"});
        let p = stage_pod(
            &j,
            &ControllerConfig::default(),
            &resolved(),
            Stage::Train,
            &data,
        )
        .unwrap();
        assert_eq!(p["metadata"]["name"], "fm-train-2");
        assert_eq!(p["spec"]["restartPolicy"], "Never");
        let e = env(&p["spec"]);
        assert_eq!(e["BASE_MODEL_URL"], "/tmp/il/deployed/edge.onnx");
        assert_eq!(e["MODEL_URL"], "/tmp/il/out/models/2");
        assert_eq!(e["TRAIN_DATASET_URL"], "/tmp/il/out/data/train/2/data.txt");
        assert_eq!(e["ORIGINAL_DATASET_URL"], "/tmp/il/hard/index.txt");
        assert!(e.contains_key("LC_SERVER"));
        let bad = stage_pod(
            &j,
            &ControllerConfig::default(),
            &resolved(),
            Stage::Eval,
            &json!({"round": 2}),
        );
        assert!(bad.unwrap_err().contains("modelUrls"));
        let eval = json!({"round": 2, "modelUrls": "a;b", "testDatasetUrl": "/t"});
        let p = stage_pod(
            &j,
            &ControllerConfig::default(),
            &resolved(),
            Stage::Eval,
            &eval,
        )
        .unwrap();
        assert_eq!(env(&p["spec"])["MODEL_URLS"], "a;b");
    }

    #[test]
    fn the_node_state_names_the_current_stage_and_sequence() {
        let mut j = job(JOB);
        j.status = Some(IncrementalLearningJobStatus {
            conditions: Some(vec![condition(&il::start(), "2026-01-01T00:00:00Z")]),
            transitions: Some(7),
            ..Default::default()
        });
        let cm = state_configmap(&j, &resolved());
        let st: IlNodeState =
            serde_json::from_str(cm["data"][IL_STATE_KEY].as_str().unwrap()).unwrap();
        assert_eq!(
            (st.stage.as_str(), st.phase.as_str(), st.seq),
            ("Train", "Waiting", 7)
        );
        assert_eq!(
            st.hot_update_config,
            "/tmp/il/out/hot-update/model_config.json"
        );
        assert_eq!(st.train_trigger.condition.threshold, 50.0);
    }
}
