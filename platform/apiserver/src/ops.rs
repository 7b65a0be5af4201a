//! The verbs, independent of HTTP: create, get, list, update, patch, delete. Each write is one
//! [`Store::modify`] call, so the read, the checks and the commit happen under the writer lock and
//! optimistic concurrency is exact.
//!
//! These functions block on SQLite; the HTTP layer calls them through `spawn_blocking`.

use std::sync::Arc;

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
    /// RBAC and the Node authorizer, with the policy cached until a role or binding changes.
    pub authz: crate::authz::Authorizer,
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

/// Creates the default roles and bindings ([`crate::authz::bootstrap_policy`]) that are absent;
/// ones already stored (perhaps edited by an administrator) are left alone.
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
        if core.store.get(&rt.storage_key(), "", name)?.is_none() {
            match create(core, &rt, "v1", None, obj, &ctx) {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
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

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    ns: String,
    name: String,
}

fn decode_continue(token: &str) -> ApiResult<ContinueToken> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

fn encode_continue(t: &ContinueToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(t).unwrap_or_default())
}

/// Parses a resourceVersion parameter.
pub fn parse_rv(s: &str) -> ApiResult<i64> {
    s.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::Invalid {
            kind: String::new(),
            group: String::new(),
            name: String::new(),
            causes: vec![Cause::invalid(
                "resourceVersion",
                &json!(s),
                "must be a non-negative integer",
            )],
        })
}

/// Objects of a list, plus the list's resourceVersion and continue token.
#[derive(Debug)]
pub struct Listed {
    /// Matching objects, presented for the requested version.
    pub items: Vec<Value>,
    /// The revision the list reflects.
    pub rev: i64,
    /// Token for the next page.
    pub continue_token: Option<String>,
}

/// Lists objects (one namespace or all), with selectors, pagination and resourceVersion semantics.
pub fn list(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    opts: &ListOpts,
) -> ApiResult<Listed> {
    let ns = if rt.namespaced {
        ns.filter(|n| !n.is_empty())
    } else {
        None
    };
    let (mut at, mut cursor) = (None, None);
    if let Some(token) = opts.continue_token.as_deref().filter(|t| !t.is_empty()) {
        let t = decode_continue(token)?;
        if t.rv < core.store.compacted_rev() {
            return Err(ApiError::Expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            ));
        }
        at = Some(t.rv);
        cursor = Some((t.ns, t.name));
    } else if let Some(rv) = opts.resource_version.as_deref().filter(|r| !r.is_empty()) {
        let rv = parse_rv(rv)?;
        match opts.resource_version_match.as_deref() {
            Some("Exact") => at = Some(rv),
            None | Some("") | Some("NotOlderThan") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "resourceVersionMatch: unsupported value {other:?}; use Exact or NotOlderThan"
                )));
            }
        }
    }
    let limit = opts.limit.filter(|l| *l > 0);
    let mut items = Vec::new();
    let mut rev = at;
    let mut continue_token = None;
    loop {
        let want = limit.map(|l| l - items.len());
        let after = cursor
            .as_ref()
            .map(|(n, m): &(String, String)| (n.as_str(), m.as_str()));
        let page = core.store.list(&rt.storage_key(), ns, after, want, rev)?;
        rev = Some(page.rev);
        let last = page.items.last().map(|o| {
            (
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        items.extend(
            page.items
                .into_iter()
                .filter(|o| opts.matches(o))
                .map(|o| present(rt, version, o)),
        );
        match (page.more, last) {
            (true, Some(last)) => {
                if limit.is_some_and(|l| items.len() >= l) {
                    continue_token = Some(encode_continue(&ContinueToken {
                        rv: page.rev,
                        ns: last.0,
                        name: last.1,
                    }));
                    break;
                }
                cursor = Some(last);
            }
            _ => break,
        }
    }
    Ok(Listed {
        items,
        rev: rev.unwrap_or(0),
        continue_token,
    })
}

/// `metadata` of a list: its resourceVersion and, if there is more, the continue token.
pub fn list_meta(listed: &Listed) -> Value {
    let mut meta = json!({"resourceVersion": listed.rev.to_string()});
    if let Some(c) = &listed.continue_token {
        meta["continue"] = json!(c);
    }
    meta
}

/// Renders a list response body.
pub fn list_body(rt: &ResourceType, version: &str, listed: Listed) -> Value {
    json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(version),
        "metadata": list_meta(&listed),
        "items": listed.items,
    })
}

fn strip_for_compare(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
    }
    v
}

fn spec_part(rt: &ResourceType, v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if rt.status_subresource {
            m.remove("status");
        }
    }
    v
}

/// Turns a proposed new state of an existing object into the change to store: immutable metadata
/// kept, status/spec separation, validation, generation, managedFields, finalizer-driven delete.
#[allow(clippy::too_many_arguments)]
fn finish_update(
    rt: &ResourceType,
    version: &str,
    cur: &Value,
    mut new: Value,
    sub: Option<&str>,
    ctx: &WriteCtx,
    rev: i64,
    apply: bool,
) -> ApiResult<Change> {
    let manager = ctx.manager.as_str();
    let name = cur["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !new.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    if new["metadata"].is_null() {
        new["metadata"] = json!({});
    }
    if !new["metadata"].is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    for k in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "name",
        "namespace",
    ] {
        match cur["metadata"].get(k) {
            Some(v) => new["metadata"][k] = v.clone(),
            None => {
                new["metadata"].as_object_mut().expect("object").remove(k);
            }
        }
    }
    if rt.status_subresource {
        if sub == Some("status") {
            let status = new.get("status").cloned();
            let mut merged = cur.clone();
            match status {
                Some(s) => merged["status"] = s,
                None => {
                    merged.as_object_mut().expect("object").remove("status");
                }
            }
            // Status writers may still manage their own metadata annotations and labels.
            for k in ["labels", "annotations"] {
                if let Some(v) = new["metadata"].get(k) {
                    merged["metadata"][k] = v.clone();
                }
            }
            new = merged;
        } else {
            match cur.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().expect("object").remove("status");
                }
            }
        }
    }
    let mut causes = Vec::new();
    if !rt.builtin
        && let Some(schema) = rt.schemas.get(version)
    {
        let mut pruned = Vec::new();
        causes.extend(validate::custom_resource_pruned(
            &mut new,
            schema,
            &mut pruned,
        ));
        check_pruned(rt, version, &pruned, ctx.strict)?;
    }
    kinds::check_types(rt, &new).map_err(|e| type_error(rt, version, e))?;
    kinds::apply_defaults(rt, &mut new, rev);
    validate::labels_and_annotations(&new["metadata"], &mut causes);
    causes.extend(kinds::validate(rt, &new, Some(cur)));
    if cur["metadata"]["deletionTimestamp"].is_string() {
        let old: Vec<Value> = cur["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let added = new["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| !old.contains(f));
        if added {
            causes.push(Cause::forbidden(
                "metadata.finalizers",
                "no new finalizers can be added if the object is being deleted",
            ));
        }
    }
    if !causes.is_empty() {
        return Err(invalid(rt, &name, causes));
    }
    if spec_part(rt, cur) != spec_part(rt, &new) {
        let g = cur["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    let now = now();
    if rt.group == "apiextensions.k8s.io" {
        kinds::crd_status(&mut new, &now);
    }
    new["apiVersion"] = json!(rt.api_version(rt.preferred_version()));
    new["kind"] = json!(rt.kind);
    // No-op writes keep the resourceVersion; for apply, a change of ownership alone is a write.
    let same = strip_for_compare(cur) == strip_for_compare(&new);
    if apply {
        if same && cur["metadata"]["managedFields"] == new["metadata"]["managedFields"] {
            return Ok(Change::Unchanged);
        }
    } else {
        if same {
            return Ok(Change::Unchanged);
        }
        patch::record_update(Some(cur), &mut new, manager, &now, sub);
    }
    let finalizers_empty = new["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    let is_namespace = rt.group.is_empty() && rt.kind == "Namespace";
    if new["metadata"]["deletionTimestamp"].is_string() && finalizers_empty && !is_namespace {
        return Ok(Change::Delete);
    }
    Ok(Change::Put(new))
}

/// Runs a keyed write and returns the resulting object (the stored one when nothing changed) and
/// what happened.
fn write(
    core: &Core,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    f: impl FnOnce(Option<Value>, i64) -> ApiResult<Change>,
) -> ApiResult<(Value, Option<EventType>)> {
    let mut unchanged = None;
    let event = core.store.modify(&rt.storage_key(), ns, name, |cur, rev| {
        let keep = cur.clone();
        let change = f(cur, rev)?;
        if matches!(change, Change::Unchanged) {
            unchanged = keep;
        }
        Ok::<_, ApiError>(change)
    })?;
    after_write(core, rt);
    match event {
        Some(e) => Ok(((*e.object).clone(), Some(e.kind))),
        None => unchanged
            .map(|v| (v, None))
            .ok_or_else(|| not_found(rt, name)),
    }
}

/// Runs a write's decision without committing it: the object it would store.
fn dry_run(
    core: &Core,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    f: impl FnOnce(Option<Value>, i64) -> ApiResult<Change>,
) -> ApiResult<Value> {
    let cur = core.store.get(&rt.storage_key(), ns, name)?;
    match f(cur.clone(), core.store.current_rev() + 1)? {
        Change::Put(v) => Ok(v),
        Change::Unchanged | Change::Delete => cur.ok_or_else(|| not_found(rt, name)),
    }
}

fn check_rv(rt: &ResourceType, cur: &Value, body: &Value) -> ApiResult<()> {
    let want = body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    let have = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !want.is_empty() && want != have {
        return Err(ApiError::Conflict {
            resource: rt.qualified(),
            name: cur["metadata"]["name"].as_str().unwrap_or_default().into(),
            message: "the object has been modified; please apply your changes to the latest version and try again"
                .into(),
            causes: Vec::new(),
        });
    }
    Ok(())
}

/// PUT: replaces an object (or its status), with optimistic concurrency on resourceVersion.
#[allow(clippy::too_many_arguments)]
pub fn update(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    body: Value,
    sub: Option<&str>,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    check_type_meta(rt, version, &body)?;
    let ns = ns_key(rt, ns);
    let body_name = body["metadata"]["name"].as_str().unwrap_or_default();
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let body_ns = body["metadata"]["namespace"].as_str().unwrap_or_default();
    if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
        return Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
        )));
    }
    if !rt.builtin
        && body["metadata"]["resourceVersion"]
            .as_str()
            .is_none_or(str::is_empty)
    {
        return Err(invalid(
            rt,
            name,
            vec![Cause::invalid(
                "metadata.resourceVersion",
                &json!(0),
                "must be specified for an update",
            )],
        ));
    }
    let run = |cur: Option<Value>, rev: i64| -> ApiResult<Change> {
        let cur = cur.ok_or_else(|| not_found(rt, name))?;
        check_rv(rt, &cur, &body)?;
        finish_update(rt, version, &cur, body.clone(), sub, ctx, rev, false)
    };
    if ctx.dry_run {
        let obj = dry_run(core, rt, &ns, name, run)?;
        return Ok(present(rt, version, obj));
    }
    let (obj, _) = write(core, rt, &ns, name, run)?;
    Ok(present(rt, version, obj))
}

fn patch_error(rt: &ResourceType, name: &str, e: PatchError) -> ApiError {
    match e {
        PatchError::Malformed(m) => ApiError::BadRequest(m),
        PatchError::NotApplicable(m) => invalid(
            rt,
            name,
            vec![Cause {
                reason: "FieldValueInvalid",
                field: String::new(),
                message: m,
            }],
        ),
        PatchError::Conflicts(c) => ApiError::Conflict {
            resource: rt.qualified(),
            name: name.to_string(),
            message: patch::conflict_message(&c),
            causes: c
                .iter()
                .map(|(m, f)| Cause {
                    reason: "FieldManagerConflict",
                    field: f.clone(),
                    message: format!("conflict with \"{m}\""),
                })
                .collect(),
        },
    }
}

/// PATCH: merge, JSON, strategic, or server-side apply (which creates when absent).
/// Returns the object and whether it was created.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    kind: PatchType,
    body: Value,
    sub: Option<&str>,
    ctx: &WriteCtx,
) -> ApiResult<(Value, bool)> {
    if kind == PatchType::Strategic && !rt.builtin {
        return Err(ApiError::UnsupportedMediaType(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
        ));
    }
    let ns = ns_key(rt, ns);
    if matches!(kind, PatchType::Apply { .. }) {
        check_type_meta(rt, version, &body)?;
        let body_name = body["metadata"]["name"].as_str().unwrap_or_default();
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        check_namespace(core, rt, &ns)?;
    }
    let mut created = false;
    let run = |cur: Option<Value>, rev: i64| -> ApiResult<Change> {
        let now = now();
        let Some(cur) = cur else {
            let PatchType::Apply { force } = kind else {
                return Err(not_found(rt, name));
            };
            let applied = patch::server_side_apply(None, &body, &ctx.manager, force, &now)
                .map_err(|e| patch_error(rt, name, e))?;
            let managed = applied["metadata"]["managedFields"].clone();
            let mut obj = prepare_create(
                rt,
                version,
                Some(&ns),
                applied,
                rev,
                &ctx.manager,
                ctx.strict,
            )?;
            obj["metadata"]["managedFields"] = managed;
            created = true;
            return Ok(Change::Put(obj));
        };
        let mut new = present(rt, version, cur.clone());
        match kind {
            PatchType::Merge => {
                if !body.is_object() {
                    return Err(ApiError::bad_request(
                        "a JSON merge patch must be a JSON object",
                    ));
                }
                patch::merge_patch(&mut new, &body)
            }
            PatchType::Json => {
                patch::json_patch(&mut new, &body).map_err(|e| patch_error(rt, name, e))?
            }
            PatchType::Strategic => {
                patch::strategic_merge(&mut new, &body).map_err(|e| patch_error(rt, name, e))?
            }
            PatchType::Apply { force } => {
                new = patch::server_side_apply(Some(&new), &body, &ctx.manager, force, &now)
                    .map_err(|e| patch_error(rt, name, e))?;
            }
        }
        check_rv(rt, &cur, &new)?;
        let apply = matches!(kind, PatchType::Apply { .. });
        finish_update(rt, version, &cur, new, sub, ctx, rev, apply)
    };
    if ctx.dry_run {
        let obj = dry_run(core, rt, &ns, name, run)?;
        return Ok((present(rt, version, obj), created));
    }
    let (obj, _) = write(core, rt, &ns, name, run)?;
    Ok((present(rt, version, obj), created))
}

/// Whether a pod must be deleted gracefully: it is bound to a node that exists, so that node's
/// agent stops it and finishes the delete.
fn graceful_pod(core: &Core, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<bool> {
    if !(rt.group.is_empty() && rt.kind == "Pod") {
        return Ok(false);
    }
    let Some(pod) = core.store.get("/pods", ns, name)? else {
        return Ok(false);
    };
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Ok(false);
    }
    Ok(core.store.get("/nodes", "", node)?.is_some())
}

/// DELETE: honours preconditions, finalizers, propagation policy and pod grace periods.
/// Returns the object and whether it is gone (false: deletion pending).
pub fn delete(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> ApiResult<(Value, bool)> {
    let ns = ns_key(rt, ns);
    if let Some(p) = opts.propagation.as_deref()
        && !matches!(p, "Foreground" | "Background" | "Orphan")
    {
        return Err(ApiError::bad_request(format!(
            "propagationPolicy: unsupported value {p:?}; use Foreground, Background or Orphan"
        )));
    }
    let is_crd = rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions";
    if is_crd && !opts.dry_run {
        let crd = core
            .store
            .get(&rt.storage_key(), "", name)?
            .ok_or_else(|| not_found(rt, name))?;
        let key = format!(
            "{}/{}",
            crd["spec"]["group"].as_str().unwrap_or_default(),
            crd["spec"]["names"]["plural"].as_str().unwrap_or_default()
        );
        // Stop serving first, then remove the instances, like the CRD cleanup finalizer does.
        core.registry.set_crds(&served_crds(core, Some(name))?);
        for obj in core.store.list(&key, None, None, None, None)?.items {
            let ons = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let oname = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            core.store
                .modify::<ApiError>(&key, &ons, &oname, |_, _| Ok(Change::Delete))?;
        }
    }
    let graceful = graceful_pod(core, rt, &ns, name)?;
    let mut gone = false;
    let run = |cur: Option<Value>, _rev: i64| -> ApiResult<Change> {
        let cur = cur.ok_or_else(|| not_found(rt, name))?;
        let meta = &cur["metadata"];
        if let Some(uid) = &opts.uid
            && meta["uid"].as_str() != Some(uid.as_str())
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                message: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta["uid"].as_str().unwrap_or_default()
                ),
                causes: Vec::new(),
            });
        }
        if let Some(rv) = &opts.resource_version
            && meta["resourceVersion"].as_str() != Some(rv.as_str())
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                message: format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta["resourceVersion"].as_str().unwrap_or_default()
                ),
                causes: Vec::new(),
            });
        }
        let mut obj = cur.clone();
        let mut finalizers: Vec<Value> = meta["finalizers"].as_array().cloned().unwrap_or_default();
        let extra = match opts.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        if let Some(f) = extra {
            finalizers.retain(|x| x != "foregroundDeletion" && x != "orphan");
            finalizers.push(json!(f));
        }
        let already = meta["deletionTimestamp"].is_string();
        let now = now();
        let change = if rt.group.is_empty() && rt.kind == "Namespace" {
            if !already {
                obj["metadata"]["deletionTimestamp"] = json!(now);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                obj["status"]["phase"] = json!("Terminating");
            }
            if finalizers.is_empty() && !already {
                Change::Put(obj)
            } else if extra.is_some() || !already {
                obj["metadata"]["finalizers"] = json!(finalizers);
                Change::Put(obj)
            } else {
                Change::Unchanged
            }
        } else if !finalizers.is_empty() {
            if !already {
                obj["metadata"]["deletionTimestamp"] = json!(now);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            obj["metadata"]["finalizers"] = json!(finalizers);
            if obj == cur {
                Change::Unchanged
            } else {
                Change::Put(obj)
            }
        } else if graceful {
            let grace = opts
                .grace_seconds
                .or(cur["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            if grace <= 0 {
                gone = true;
                Change::Delete
            } else if already {
                Change::Unchanged
            } else {
                let at = (Utc::now() + chrono::Duration::seconds(grace))
                    .to_rfc3339_opts(SecondsFormat::Secs, true);
                obj["metadata"]["deletionTimestamp"] = json!(at);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                Change::Put(obj)
            }
        } else {
            gone = true;
            Change::Delete
        };
        Ok(if opts.dry_run {
            Change::Unchanged
        } else {
            change
        })
    };
    let (obj, _) = write(core, rt, &ns, name, run)?;
    Ok((present(rt, version, obj), gone))
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
