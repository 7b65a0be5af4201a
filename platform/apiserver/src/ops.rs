//! The verbs, independent of HTTP: create, get, list, update, patch, delete. Each write is one
//! [`Store::modify`] call, so the read, the checks and the commit happen under the writer lock and
//! optimistic concurrency is exact.
//!
//! These functions block on SQLite; the HTTP layer calls them through `spawn_blocking`.

mod delete;
mod list;
pub mod scale;
mod update;

pub use delete::delete;
pub use list::{Listed, list, list_body, list_meta, parse_rv};
use std::sync::Arc;
use update::*;
pub use update::{patch, update};

use base64::Engine;
use chrono::{SecondsFormat, Utc};
use rand::Rng;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult, Cause};
use crate::kinds;
use crate::patch::{self, PatchError};
use crate::registry::{Registry, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Change, EventType, Store, StoreError};
use crate::validate;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted {
                requested,
                compacted,
            } => ApiError::Expired(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The state the verbs work on.
#[derive(Debug)]
pub struct Core {
    /// Object store.
    pub store: Arc<Store>,
    /// Served resources.
    pub registry: Registry,
    /// Where `pods/{name}/log` is forwarded: set by the cloud core when it runs in the same
    /// process (`sedge up`); unset, the subresource answers 503 saying so.
    pub pod_logs: std::sync::OnceLock<PodLogSource>,
    /// Where `pods/{name}/exec` is forwarded, set the same way.
    pub pod_exec: std::sync::OnceLock<PodExecSource>,
    /// RBAC and the Node authorizer, with the policy cached until a role or binding changes.
    pub authz: crate::authz::Authorizer,
    /// Full garbage-collection sweeps made since start.
    pub gc_sweeps: std::sync::atomic::AtomicU64,
}

/// What `kubectl logs` asks for, with the pod resolved to where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLogRequest {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// The node the pod is bound to.
    pub node: String,
    /// What the node is asked for (UID, resolved container, tail, limit, previous).
    pub log: sedge_api::LogRequest,
}

/// Serves pod logs from wherever the pod runs.
pub type PodLogFn = dyn Fn(PodLogRequest) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, String>>
    + Send
    + Sync;

/// A [`PodLogFn`] behind a `Debug` wrapper.
#[derive(Clone)]
pub struct PodLogSource(pub Arc<PodLogFn>);

impl std::fmt::Debug for PodLogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodLogSource")
    }
}

/// What `kubectl exec` asks for, with the pod resolved to where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodExecRequest {
    /// The node the pod is bound to.
    pub node: String,
    /// What the node is asked to run or connect.
    pub open: sedge_api::StreamOpen,
}

/// An exec stream opened on the pod's node: frames in Kubernetes' channel protocol (first byte
/// the channel, [`sedge_api::exec_channel`]).
#[derive(Debug)]
pub struct PodExecStream {
    /// Frames from the container; `None` once the node closed the stream cleanly, one `Err`
    /// naming why when it failed (the link dropped).
    pub from_node: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    /// Frames for the container, each at most [`PodExecStream::MAX_FRAME`] bytes; dropping it
    /// ends the stream and the command.
    pub to_node: tokio::sync::mpsc::Sender<bytes::Bytes>,
}

impl PodExecStream {
    /// The largest frame `to_node` takes (the channel's stream frame).
    pub const MAX_FRAME: usize = 64 * 1024;
}

/// Opens exec streams wherever pods run; errors are the API errors the client gets.
pub type PodExecFn = dyn Fn(PodExecRequest) -> futures::future::BoxFuture<'static, Result<PodExecStream, ApiError>>
    + Send
    + Sync;

/// A [`PodExecFn`] behind a `Debug` wrapper.
#[derive(Clone)]
pub struct PodExecSource(pub Arc<PodExecFn>);

impl std::fmt::Debug for PodExecSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodExecSource")
    }
}

/// Who is writing, and whether for real.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// Field manager recorded in `managedFields`.
    pub manager: String,
    /// `dryRun=All`: validate and answer, but store nothing.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields in custom resources are an error, not pruned.
    pub strict: bool,
}

fn type_error(rt: &ResourceType, version: &str, e: String) -> ApiError {
    ApiError::bad_request(format!(
        "{kind} in version \"{version}\" cannot be handled as a {kind}: {e}",
        kind = rt.kind
    ))
}

fn check_pruned(
    rt: &ResourceType,
    version: &str,
    pruned: &[String],
    strict: bool,
) -> ApiResult<()> {
    if strict && !pruned.is_empty() {
        let fields: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            fields.join(", "),
            kind = rt.kind
        )));
    }
    Ok(())
}

/// `POST pods/{name}/binding`: assigns a pending pod to a node, as a scheduler does.
pub fn bind_pod(
    core: &Core,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    binding: &Value,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    let target = binding["target"]["name"].as_str().unwrap_or_default();
    if target.is_empty() {
        return Err(ApiError::Invalid {
            kind: "Binding".into(),
            group: String::new(),
            name: name.into(),
            causes: vec![Cause::required("target.name")],
        });
    }
    let pod = get(core, rt, "v1", Some(ns), name)?;
    let current = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if !current.is_empty() {
        return Err(ApiError::Conflict {
            resource: rt.qualified(),
            name: name.into(),
            message: format!("pod {name} is already assigned to node \"{current}\""),
            causes: vec![],
        });
    }
    if let Some(uid) = binding["metadata"]["uid"].as_str()
        && !uid.is_empty()
        && Some(uid) != pod["metadata"]["uid"].as_str()
    {
        return Err(ApiError::Conflict {
            resource: rt.qualified(),
            name: name.into(),
            message: format!("the binding is for UID {uid}, the pod is another object"),
            causes: vec![],
        });
    }
    patch(
        core,
        rt,
        "v1",
        Some(ns),
        name,
        PatchType::Merge,
        json!({"spec": {"nodeName": target}}),
        None,
        ctx,
    )?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

/// Kinds of PATCH.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json` (built-in kinds only).
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply {
        /// `force=true`: take ownership of conflicting fields.
        force: bool,
    },
}

/// DELETE options (from the body and the query).
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `Foreground`, `Background` or `Orphan`.
    pub propagation: Option<String>,
    /// Grace period for pods; 0 deletes at once.
    pub grace_seconds: Option<i64>,
    /// Precondition on uid.
    pub uid: Option<String>,
    /// Precondition on resourceVersion.
    pub resource_version: Option<String>,
    /// Validate only.
    pub dry_run: bool,
}

/// List options.
#[derive(Debug, Clone, Default)]
pub struct ListOpts {
    /// `labelSelector`.
    pub labels: Option<LabelSelector>,
    /// `fieldSelector`.
    pub fields: Option<FieldSelector>,
    /// `limit`.
    pub limit: Option<usize>,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
}

impl ListOpts {
    /// Whether an object passes both selectors.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.as_ref().is_none_or(|l| l.matches(obj))
            && self.fields.as_ref().is_none_or(|f| f.matches(obj))
    }
}

/// Current time as Kubernetes writes timestamps.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::NotFound {
        resource: rt.qualified(),
        name: name.to_string(),
    }
}

fn ns_key(rt: &ResourceType, ns: Option<&str>) -> String {
    if rt.namespaced {
        ns.unwrap_or_default().to_string()
    } else {
        String::new()
    }
}

/// Sets `apiVersion` and `kind` for the version the client asked for (no conversion is needed:
/// CRD versions share one schema here, built-ins have one version).
pub fn present(rt: &ResourceType, version: &str, mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version(version)));
        m.insert("kind".into(), json!(rt.kind));
    }
    obj
}

/// A JSON object of `fields`, moved in. `json!` serializes each value it is given by
/// reference, so `json!({"items": items})` copies every item: at 100,000 pods that copy was a
/// third of the API server's time in a list. Response bodies that carry objects use this.
pub fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// `obj` as a `PartialObjectMetadata` (`Accept: ...;as=PartialObjectMetadata`): its metadata only.
pub fn partial_metadata(mut obj: Value) -> Value {
    let metadata = obj
        .as_object_mut()
        .and_then(|m| m.remove("metadata"))
        .unwrap_or(Value::Null);
    object([
        ("kind", json!("PartialObjectMetadata")),
        ("apiVersion", json!("meta.k8s.io/v1")),
        ("metadata", metadata),
    ])
}

fn excerpt(body: &Value) -> String {
    let s = body.to_string();
    if s.len() > 120 {
        format!("{}...", &s[..s.floor_char_boundary(117)])
    } else {
        s
    }
}

/// Checks `apiVersion`/`kind` of a request body against the URL.
fn check_type_meta(rt: &ResourceType, version: &str, body: &Value) -> ApiResult<()> {
    if !body.is_object() {
        return Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got: {}",
            excerpt(body)
        )));
    }
    let kind = body["kind"].as_str().unwrap_or_default();
    let api_version = body["apiVersion"].as_str().unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{}'",
            excerpt(body)
        )));
    }
    if api_version.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'apiVersion' is missing in '{}'",
            excerpt(body)
        )));
    }
    let (group, v) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    if group != rt.group || !rt.versions.iter().any(|x| x == v) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version(version)
        )));
    }
    if kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({}) for {}",
            rt.kind,
            rt.qualified()
        )));
    }
    Ok(())
}

fn meta_mut(obj: &mut Value) -> ApiResult<&mut serde_json::Map<String, Value>> {
    if obj["metadata"].is_null() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

fn generate_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Checks the namespace of a namespaced request exists and is not terminating.
fn check_namespace(core: &Core, rt: &ResourceType, ns: &str) -> ApiResult<()> {
    if !rt.namespaced {
        return Ok(());
    }
    match core.store.get("/namespaces", "", ns)? {
        None => Err(ApiError::NotFound {
            resource: "namespaces".into(),
            name: ns.into(),
        }),
        Some(n) if n["metadata"]["deletionTimestamp"].is_string() => Err(ApiError::Forbidden {
            resource: rt.qualified(),
            name: String::new(),
            message: format!(
                "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                rt.qualified()
            ),
        }),
        Some(_) => Ok(()),
    }
}

fn invalid(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::Invalid {
        kind: rt.kind.clone(),
        group: rt.group.clone(),
        name: name.to_string(),
        causes,
    }
}

/// Everything a create does to a body before it is stored: type and object metadata, defaults,
/// validation, status reset, managedFields. Pure: touches no storage.
fn prepare_create(
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    mut obj: Value,
    rev: i64,
    manager: &str,
    strict: bool,
) -> ApiResult<Value> {
    check_type_meta(rt, version, &obj)?;
    let now = now();
    {
        let meta = meta_mut(&mut obj)?;
        if rt.namespaced {
            let path_ns = ns.unwrap_or_default();
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != path_ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({path_ns})"
                    )));
                }
                _ => {
                    meta.insert("namespace".into(), json!(path_ns));
                }
            }
        } else {
            meta.remove("namespace");
        }
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            // `create` has already turned a generateName into a name.
            return Err(invalid(
                rt,
                "",
                vec![Cause {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        for k in [
            "uid",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
            "resourceVersion",
        ] {
            meta.remove(k);
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now));
        meta.insert("generation".into(), json!(1));
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut causes = Vec::new();
    if let Err(e) = validate::object_name(&rt.kind, &name) {
        causes.push(Cause::invalid("metadata.name", &json!(name), e));
    }
    validate::labels_and_annotations(&obj["metadata"], &mut causes);
    if rt.status_subresource && !(rt.group.is_empty() && rt.kind == "Node") {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
        if rt.group.is_empty() && rt.kind == "Pod" {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
    }
    if !rt.builtin
        && let Some(schema) = rt.schemas.get(version)
    {
        let mut pruned = Vec::new();
        causes.extend(validate::custom_resource_pruned(
            &mut obj,
            schema,
            &mut pruned,
        ));
        check_pruned(rt, version, &pruned, strict)?;
    }
    kinds::check_types(rt, &obj).map_err(|e| type_error(rt, version, e))?;
    kinds::apply_defaults(rt, &mut obj, rev);
    causes.extend(kinds::validate(rt, &obj, None));
    if !causes.is_empty() {
        return Err(invalid(rt, &name, causes));
    }
    if rt.group == "apiextensions.k8s.io" {
        kinds::crd_status(&mut obj, &now);
    }
    obj["apiVersion"] = json!(rt.api_version(rt.preferred_version()));
    patch::record_update(None, &mut obj, manager, &now, None);
    Ok(obj)
}

/// Creates an object. Returns it as stored.
pub fn create(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    obj: Value,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    let ns = ns_key(rt, ns);
    check_namespace(core, rt, &ns)?;
    // The name may be generated, so it is decided before the keyed write.
    let mut obj = obj;
    if obj["metadata"]["name"].as_str().is_none_or(str::is_empty)
        && let Some(prefix) = obj["metadata"]["generateName"]
            .as_str()
            .filter(|p| !p.is_empty())
    {
        obj["metadata"]["name"] = json!(format!("{prefix}{}", generate_suffix()));
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if ctx.dry_run || name.is_empty() {
        // Nothing to store: validate and answer. A nameless object gets its 422 here.
        let obj = prepare_create(
            rt,
            version,
            Some(&ns),
            obj,
            core.store.current_rev() + 1,
            &ctx.manager,
            ctx.strict,
        )?;
        return Ok(present(rt, version, obj));
    }
    let event = core
        .store
        .modify(&rt.storage_key(), &ns, &name, |cur, rev| {
            if cur.is_some() {
                return Err(ApiError::AlreadyExists {
                    resource: rt.qualified(),
                    name: name.clone(),
                });
            }
            Ok(Change::Put(prepare_create(
                rt,
                version,
                Some(&ns),
                obj,
                rev,
                &ctx.manager,
                ctx.strict,
            )?))
        })?;
    let event = event.ok_or_else(|| ApiError::internal("create produced no change"))?;
    after_write(core, rt);
    Ok(present(rt, version, (*event.object).clone()))
}

/// Re-reads CRDs into the registry after a CRD write.
fn after_write(core: &Core, rt: &ResourceType) {
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        refresh_crds(core);
    }
    if rt.group == crate::authz::RBAC_GROUP {
        core.authz.invalidate();
    }
}

/// Creates the default roles and bindings ([`crate::authz::bootstrap_policy`]) that are absent.
/// A stored ClusterRole that still carries `rbac.authorization.kubernetes.io/autoupdate: "true"`
/// gains the rules a newer version added (as kube-apiserver reconciles its bootstrap roles: rules
/// an administrator added stay); one whose annotation was removed or set to false is left alone.
pub fn ensure_bootstrap_policy(core: &Core) -> ApiResult<()> {
    let snap = core.registry.snapshot();
    let ctx = WriteCtx {
        manager: "sedge-apiserver".into(),
        dry_run: false,
        strict: false,
    };
    for (plural, obj) in crate::authz::bootstrap_policy() {
        let rt = snap
            .get(crate::authz::RBAC_GROUP, "v1", plural)
            .expect("RBAC kinds are built in");
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        match core.store.get(&rt.storage_key(), "", name)? {
            None => match create(core, &rt, "v1", None, obj, &ctx) {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            },
            Some(mut stored)
                if plural == "clusterroles"
                    && stored["metadata"]["annotations"]["rbac.authorization.kubernetes.io/autoupdate"]
                        == "true" =>
            {
                let have = stored["rules"].as_array().cloned().unwrap_or_default();
                let missing: Vec<Value> = obj["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| !have.contains(r))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                tracing::info!(
                    role = name,
                    added = missing.len(),
                    "reconciling a bootstrap role"
                );
                stored["rules"] = json!(have.into_iter().chain(missing).collect::<Vec<_>>());
                match update::update(core, &rt, "v1", None, name, stored, None, &ctx) {
                    Ok(_) | Err(ApiError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The stored CRDs that should be served: not being deleted, and not `except`.
fn served_crds(core: &Core, except: Option<&str>) -> Result<Vec<Value>, StoreError> {
    let page = core.store.list(
        "apiextensions.k8s.io/customresourcedefinitions",
        None,
        None,
        None,
        None,
    )?;
    Ok(page
        .items
        .into_iter()
        .filter(|c| c["metadata"]["deletionTimestamp"].is_null())
        .filter(|c| except.is_none_or(|n| c["metadata"]["name"] != n))
        .collect())
}

/// Loads every stored CRD into the registry.
pub fn refresh_crds(core: &Core) {
    match served_crds(core, None) {
        Ok(crds) => core.registry.set_crds(&crds),
        Err(e) => tracing::error!(error = %e, "cannot read CRDs"),
    }
}

/// Reads one object.
pub fn get(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Value> {
    let ns = ns_key(rt, ns);
    let obj = core
        .store
        .get(&rt.storage_key(), &ns, name)?
        .ok_or_else(|| not_found(rt, name))?;
    Ok(present(rt, version, obj))
}

/// Creates the namespaces every cluster has.
pub fn ensure_default_namespaces(core: &Core) -> ApiResult<()> {
    let snap = core.registry.snapshot();
    let rt = snap
        .get("", "v1", "namespaces")
        .expect("namespaces are built in");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        if core.store.get("/namespaces", "", ns)?.is_none() {
            let ctx = WriteCtx {
                manager: "sedge-apiserver".into(),
                dry_run: false,
                strict: false,
            };
            match create(
                core,
                &rt,
                "v1",
                None,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                &ctx,
            ) {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
