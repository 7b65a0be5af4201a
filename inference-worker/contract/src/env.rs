//! Environment variables of the workers: Sedna's names (so Sedna's worker images get what they
//! expect), then Sedge's own.

/// The model the worker serves or starts from (path, `file://`, `http(s)://`).
pub const MODEL_URL: &str = "MODEL_URL";
/// Sedge: the SHA-256 the model's download must match.
pub const MODEL_SHA256: &str = "MODEL_SHA256";
/// Sedge: how the model describes itself when it has no config sidecar (a JSON object from the
/// Model's `model.sedge.io/...` annotations; see [`crate::model`]).
pub const MODEL_METADATA: &str = "SEDGE_MODEL_METADATA";
/// The pod's namespace.
pub const NAMESPACE: &str = "NAMESPACE";
/// The JointInferenceService a worker belongs to.
pub const SERVICE_NAME: &str = "SERVICE_NAME";
/// The IncrementalLearningJob a worker belongs to.
pub const JOB_NAME: &str = "JOB_NAME";
/// The worker's name (its pod's).
pub const WORKER_NAME: &str = "WORKER_NAME";
/// The node's local controller the worker reports to.
pub const LC_SERVER: &str = "LC_SERVER";
/// Seconds between reports.
pub const LC_PERIOD: &str = "LC_PERIOD";
/// Where local models are mounted in the pod (Sedna's `/home/data`).
pub const DATA_PATH_PREFIX: &str = "DATA_PATH_PREFIX";
/// Hard-example mining rule name.
pub const HEM_NAME: &str = "HEM_NAME";
/// Its parameters, Sedna's JSON list of `{key, value}`.
pub const HEM_PARAMETERS: &str = "HEM_PARAMETERS";
/// Mining before or after inference.
pub const MINING_MODE: &str = "MINING_MODE";
/// The cloud model server the edge worker offloads to.
pub const BIG_MODEL_IP: &str = "BIG_MODEL_IP";
/// Its port.
pub const BIG_MODEL_PORT: &str = "BIG_MODEL_PORT";
/// The model name on the cloud model server.
pub const BIG_MODEL_NAME: &str = "BIG_MODEL_NAME";
/// The cloud worker's listen address.
pub const BIG_MODEL_BIND_IP: &str = "BIG_MODEL_BIND_IP";
/// The cloud worker's listen port.
pub const BIG_MODEL_BIND_PORT: &str = "BIG_MODEL_BIND_PORT";
/// Train: the model to start from.
pub const BASE_MODEL_URL: &str = "BASE_MODEL_URL";
/// Train: the round's samples.
pub const TRAIN_DATASET_URL: &str = "TRAIN_DATASET_URL";
/// Train: the Dataset's index (replay comes from it).
pub const ORIGINAL_DATASET_URL: &str = "ORIGINAL_DATASET_URL";
/// Eval: the models to score, separated by `;`.
pub const MODEL_URLS: &str = "MODEL_URLS";
/// Eval: the round's eval samples.
pub const TEST_DATASET_URL: &str = "TEST_DATASET_URL";
/// Sedge: where an incremental-learning inference worker saves hard examples (a Dataset index).
pub const HARD_EXAMPLES_INDEX: &str = "HARD_EXAMPLES_INDEX";
/// Sedge: the pod's token for node-local endpoints (set by the edge agent; the platform spells it
/// `sedge_edgecore::podtoken::ENV`, and a test keeps the two equal).
pub const POD_TOKEN: &str = "SEDGE_POD_TOKEN";
