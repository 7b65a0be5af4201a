//! The `sedna.io/v1alpha1` resources, with Sedna's JSON field names (so Sedna manifests apply
//! unchanged), and the CRDs generated from them.
//!
//! Field names follow `../shared/reference/sedna.md` section 2 exactly, including the snake_case
//! `device_soc_versions` of `Model`. What Sedge adds is additive and only in `status`
//! (`edgeWorkers`, `cloudWorkers`, `observedGeneration`) plus printer columns, which Sedna has none
//! of. Pod templates are validated structurally by the CRD (an object with a `spec.containers`
//! list); the full pod schema is checked by the API server when the controller creates the
//! workers' Deployments, and a refusal there is reported in the service's status.

// kube-derive takes printer columns as repeated attributes with the same keys.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group.
pub const GROUP: &str = "sedna.io";
/// The API version.
pub const VERSION: &str = "v1alpha1";

/// A key/value pair with string values (Sedna's `ParaSpec`, used for HEM parameters).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ParaSpec {
    /// Parameter name.
    pub key: String,
    /// Parameter value, always a string (quote numbers in YAML).
    pub value: String,
}

/// A key/value pair with string values (Sedna's `Metric`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Metric {
    /// Metric name, e.g. `inferenceNumber`.
    pub key: String,
    /// Its value, as a string.
    pub value: String,
}

/// A reference to a `Model` in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ModelRef {
    /// The Model's name.
    pub name: String,
}

/// A reference to a `Dataset` in the same namespace, with the train share.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetRef {
    /// The Dataset's name.
    pub name: String,
    /// Share of samples used for training (the rest evaluates).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub train_prob: f64,
}

/// Dataset spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "Dataset",
    namespaced,
    category = "sedna",
    status = "DatasetStatus",
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.format"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Samples",
        type_ = "integer",
        json_path = ".status.numberOfSamples"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// Where the index file lives on the node (or a URL).
    pub url: String,
    /// `txt` or `csv` (Sedna's LC accepts both, any case).
    pub format: String,
    /// The node that holds the data.
    pub node_name: String,
    /// Secret with storage credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
}

/// Dataset status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    /// Samples in the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_of_samples: Option<i64>,
    /// When it was counted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
}

/// Model spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "Model",
    namespaced,
    category = "sedna",
    status = "ModelStatus",
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.format"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A path on the node, `file://`, or `http(s)://` (downloaded and cached by the worker; pin
    /// its content with the annotation `sedge.io/model-sha256`).
    pub url: String,
    /// Free text (`onnx`, `pb`, `pth`, ...).
    pub format: String,
    /// SoCs the model was built for (Sedna's snake_case name).
    #[serde(
        rename = "device_soc_versions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub device_soc_versions: Option<Vec<String>>,
    /// Secret with storage credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
}

/// Model status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Last update (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Vec<Metric>>,
}

/// A hard-example-mining rule and its parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct HardExampleMining {
    /// The rule (`HEM_NAME`): CrossEntropy, Threshold, IBT, Random, EdgeOnly, CloudOnly,
    /// MaxProbability, Margin.
    pub name: String,
    /// Its parameters (`HEM_PARAMETERS`), string values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<ParaSpec>>,
}

/// Autoscaling for a worker (autoscaling/v2 fields).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hpa {
    /// Fewest replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_replicas: Option<i32>,
    /// Most replicas.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// autoscaling/v2 `MetricSpec`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_list")]
    pub metrics: Option<Vec<Value>>,
    /// autoscaling/v2 `HorizontalPodAutoscalerBehavior`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub behavior: Option<Value>,
}

/// The edge worker of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeWorker {
    /// The little model.
    pub model: ModelRef,
    /// How hard examples are found.
    pub hard_example_mining: HardExampleMining,
    /// The worker pod.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
    /// Autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<Hpa>,
}

/// The cloud worker of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudWorker {
    /// The big model.
    pub model: ModelRef,
    /// The worker pod.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
    /// Autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<Hpa>,
}

/// JointInferenceService spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "JointInferenceService",
    namespaced,
    category = "sedna",
    status = "JointInferenceServiceStatus",
    shortname = "ji",
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.status==\"True\")].type"
    ),
    printcolumn(name = "Edge", type_ = "string", json_path = ".status.edgeWorkers"),
    printcolumn(name = "Cloud", type_ = "string", json_path = ".status.cloudWorkers"),
    printcolumn(
        name = "Inferences",
        type_ = "string",
        json_path = ".status.metrics[?(@.key==\"inferenceNumber\")].value"
    ),
    printcolumn(
        name = "Hard",
        type_ = "string",
        json_path = ".status.metrics[?(@.key==\"hardExampleNumber\")].value"
    ),
    printcolumn(
        name = "Offload",
        type_ = "string",
        json_path = ".status.metrics[?(@.key==\"uploadCloudRatio\")].value"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.status==\"True\")].reason"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.status==\"True\")].message"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct JointInferenceServiceSpec {
    /// The edge worker.
    pub edge_worker: EdgeWorker,
    /// The cloud worker.
    pub cloud_worker: CloudWorker,
}

/// A condition of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JointInferenceCondition {
    /// `Pending`, `Running` or `Failed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Last time the controller looked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// Last time `status` changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// A CamelCase reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// JointInferenceService status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JointInferenceServiceStatus {
    /// One condition per type; exactly one has status `True`, and it is the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<JointInferenceCondition>>,
    /// When the service was first seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Worker Deployments that are available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<i32>,
    /// Worker Deployments that are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<i32>,
    /// Counters the workers report: `inferenceNumber`, `hardExampleNumber`,
    /// `uploadCloudRatio` (Sedna's) plus `cloudAnsweredNumber` and `edgeFallbackNumber`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Vec<Metric>>,
    /// Sedge: edge worker pods ready / wanted, e.g. `1/1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_workers: Option<String>,
    /// Sedge: cloud worker pods ready / wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_workers: Option<String>,
    /// Sedge: the generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// When a train or deploy stage starts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// How often to check (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub check_period_seconds: Option<i64>,
    /// Daily window, `"HH:MM"` strings (quote them in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Timer>,
    /// The condition.
    pub condition: TriggerCondition,
}

/// A daily time window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Timer {
    /// Start, `HH:MM`.
    #[serde(deserialize_with = "crate::trigger::time_string")]
    #[schemars(with = "String")]
    pub start: String,
    /// End, `HH:MM`.
    #[serde(deserialize_with = "crate::trigger::time_string")]
    #[schemars(with = "String")]
    pub end: String,
}

/// `metric operator threshold`, e.g. `num_of_samples > 500`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TriggerCondition {
    /// `>`, `>=`, `<`, `<=`, `=`.
    pub operator: String,
    /// The threshold.
    pub threshold: f64,
    /// The metric, e.g. `num_of_samples` or `precision_delta`.
    pub metric: String,
}

/// The train stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TrainSpec {
    /// The train worker pod.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
    /// When to train.
    pub trigger: Trigger,
}

/// The eval stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalSpec {
    /// The eval worker pod.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
    /// The model to compare against first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_eval_model: Option<ModelRef>,
}

/// The model a deploy stage writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployModel {
    /// The Model's name.
    pub name: String,
    /// Reload the model in the running worker instead of restarting it.
    #[serde(default)]
    pub hot_update_enabled: bool,
    /// How often the worker checks for a new model (seconds).
    #[serde(default = "default_poll_period")]
    #[schemars(range(min = 1))]
    pub poll_period_seconds: i64,
}

fn default_poll_period() -> i64 {
    60
}

/// The deploy stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploySpec {
    /// The model deployed.
    pub model: DeployModel,
    /// When to deploy.
    pub trigger: Trigger,
    /// How the inference worker finds hard examples.
    pub hard_example_mining: HardExampleMining,
    /// The inference worker pod.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
}

/// IncrementalLearningJob spec (Sedna's fields). The loop is run by
/// [`crate::iljob`] (cloud) and [`crate::lc`] (the node's local controller).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "IncrementalLearningJob",
    namespaced,
    category = "sedna",
    status = "IncrementalLearningJobStatus",
    shortname = "il",
    printcolumn(
        name = "Stage",
        type_ = "string",
        json_path = ".status.conditions[-1:].stage"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.conditions[-1:].type"
    ),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round"),
    printcolumn(name = "Samples", type_ = "integer", json_path = ".status.samples"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.modelVersion"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IncrementalLearningJobSpec {
    /// The training data.
    pub dataset: DatasetRef,
    /// The model training starts from.
    pub initial_model: ModelRef,
    /// The train stage.
    pub train_spec: TrainSpec,
    /// The eval stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_spec: Option<EvalSpec>,
    /// The deploy stage.
    pub deploy_spec: DeploySpec,
    /// Secret with credentials for `outputDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Where models and split files go.
    pub output_dir: String,
}

/// A condition of an incremental learning job (appended, never edited, as Sedna does).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncrementalLearningCondition {
    /// `Waiting`, `Ready`, `Starting`, `Running`, `Completed` or `Failed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// `Train`, `Eval` or `Deploy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// JSON of the stage's input and output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// IncrementalLearningJob status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncrementalLearningJobStatus {
    /// Conditions, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<IncrementalLearningCondition>>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Conditions appended so far (only the last 64 are kept). Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transitions: Option<usize>,
    /// The current round (1 once the first train trigger fired). Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// Train samples collected on the node since the last round started. Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<i64>,
    /// The model the inference worker serves: `initial` or `round-<n>`. Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The file of that model on the node. Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    /// The last eval: each metric of the new model and its delta against the deployed one
    /// (JSON, `{"accuracy": [..], "accuracy_delta": [..], ...}`). Sedge's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_eval: Option<String>,
}

/// A pod template: metadata and a spec with at least one container. Other pod fields are kept as
/// written and checked by the API server when the controller creates the Deployment.
fn pod_template(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "properties": {
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
                },
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "required": ["containers"],
                "properties": {
                    "nodeName": {"type": "string"},
                    "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                    "hostNetwork": {"type": "boolean"},
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "image": {"type": "string"},
                                "command": {"type": "array", "items": {"type": "string"}},
                                "args": {"type": "array", "items": {"type": "string"}},
                                "env": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "value": {"type": "string"}
                                        },
                                        "x-kubernetes-preserve-unknown-fields": true
                                    }
                                }
                            },
                            "x-kubernetes-preserve-unknown-fields": true
                        }
                    }
                },
                "x-kubernetes-preserve-unknown-fields": true
            }
        }
    })
}

fn preserved_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

fn preserved_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The four CRDs, in the order they should be applied.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        Dataset::crd(),
        Model::crd(),
        JointInferenceService::crd(),
        IncrementalLearningJob::crd(),
    ]
}

/// The CRDs as one multi-document YAML file (what `crds/sedna.io.yaml` holds).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from ai-controller/src/crd.rs by `sedge ai-controller --print-crds`; do not edit.\n",
    );
    for c in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&c).expect("a CRD serialises"));
    }
    out
}

/// The committed CRD file.
pub const CRDS_YAML: &str = include_str!("../crds/sedna.io.yaml");

/// The `KEY=VALUE` list Sedna puts in `HEM_PARAMETERS`: the CRD's list as JSON.
pub fn hem_parameters_json(p: &Option<Vec<ParaSpec>>) -> String {
    serde_json::to_string(p.as_deref().unwrap_or(&[])).expect("strings serialise")
}

/// The metrics list as a map.
pub fn metrics_map(m: &Option<Vec<Metric>>) -> BTreeMap<String, String> {
    m.iter()
        .flatten()
        .map(|m| (m.key.clone(), m.value.clone()))
        .collect()
}
