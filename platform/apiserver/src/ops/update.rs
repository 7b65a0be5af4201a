//! `update` and `patch` (JSON, merge, strategic merge, apply): preconditions, the status and
//! spec split, dry runs, and the one write path both end in.

use super::*;

pub(super) fn strip_for_compare(v: &Value) -> Value {
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

pub(super) fn spec_part(rt: &ResourceType, v: &Value) -> Value {
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
pub(super) fn finish_update(
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
pub(super) fn write(
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
pub(super) fn dry_run(
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

pub(super) fn check_rv(rt: &ResourceType, cur: &Value, body: &Value) -> ApiResult<()> {
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

pub(super) fn patch_error(rt: &ResourceType, name: &str, e: PatchError) -> ApiError {
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
