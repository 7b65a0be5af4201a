//! What a request asks for besides its target: content negotiation (tables, partial metadata),
//! list, write and delete options from the query and body, and how one object is presented.

use super::*;

pub(super) fn accept(headers: &HeaderMap) -> String {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// `Some(include)` when the client asked for a Table.
pub(super) fn table_requested(
    headers: &HeaderMap,
    params: &Params,
) -> ApiResult<Option<IncludeObject>> {
    let a = accept(headers);
    let wants = a
        .split(',')
        .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"));
    if !wants {
        return Ok(None);
    }
    IncludeObject::parse(params.get("includeObject").map(String::as_str))
        .map(Some)
        .map_err(ApiError::BadRequest)
}

pub(super) fn partial_requested(headers: &HeaderMap) -> bool {
    accept(headers)
        .split(',')
        .any(|p| p.contains("as=PartialObjectMetadata"))
}

pub(super) fn check_acceptable(headers: &HeaderMap) -> ApiResult<()> {
    let a = accept(headers);
    if a.is_empty() {
        return Ok(());
    }
    let ok = a.split(',').any(|p| {
        let p = p.trim();
        p.starts_with("application/json")
            || p.starts_with("*/*")
            || p.starts_with("application/*")
            || p.starts_with("application/yaml")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(format!(
            "only the following media types are accepted: application/json, application/yaml (asked for {a})"
        )))
    }
}

pub(super) fn flag(params: &Params, k: &str) -> bool {
    matches!(params.get(k).map(String::as_str), Some("true") | Some("1"))
}

pub(super) fn list_opts(rt: &ResourceType, params: &Params) -> ApiResult<ListOpts> {
    let labels = match params.get("labelSelector").filter(|s| !s.is_empty()) {
        Some(s) => Some(LabelSelector::parse(s).map_err(ApiError::BadRequest)?),
        None => None,
    };
    let fields = match params.get("fieldSelector").filter(|s| !s.is_empty()) {
        Some(s) => {
            Some(FieldSelector::parse(s, |f| rt.selectable(f)).map_err(ApiError::BadRequest)?)
        }
        None => None,
    };
    let limit = match params.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => Some(l.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("limit: {l:?} is not a non-negative integer"))
        })?),
        None => None,
    };
    Ok(ListOpts {
        labels,
        fields,
        limit,
        continue_token: params.get("continue").cloned(),
        resource_version: params.get("resourceVersion").cloned(),
        resource_version_match: params.get("resourceVersionMatch").cloned(),
    })
}

pub(super) fn write_ctx(
    headers: &HeaderMap,
    params: &Params,
    identity: &Option<Identity>,
) -> ApiResult<WriteCtx> {
    let dry_run = match params.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: unsupported value {other:?}; use All"
            )));
        }
    };
    let manager = match params.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => {
            if m.len() > 128 {
                return Err(ApiError::bad_request(
                    "fieldManager: must be at most 128 characters",
                ));
            }
            m.clone()
        }
        None => headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .map(String::from)
            .or_else(|| identity.as_ref().map(|i| i.user.clone()))
            .unwrap_or_else(|| "unknown".into()),
    };
    let strict = match params.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Ignore") | Some("Warn") => false,
        Some("Strict") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: unsupported value {other:?}; use Ignore, Warn or Strict"
            )));
        }
    };
    Ok(WriteCtx {
        manager,
        dry_run,
        strict,
    })
}

pub(super) fn present_one(
    rt: &ResourceType,
    obj: Value,
    headers: &HeaderMap,
    params: &Params,
) -> ApiResult<Value> {
    if let Some(include) = table_requested(headers, params)? {
        let rv = obj["metadata"]["resourceVersion"].clone();
        return Ok(table::render(
            rt,
            vec![obj],
            json!({"resourceVersion": rv}),
            include,
            true,
        ));
    }
    if partial_requested(headers) {
        return Ok(ops::partial_metadata(obj));
    }
    Ok(obj)
}

pub(super) fn delete_opts(params: &Params, body: Option<&Value>) -> ApiResult<DeleteOpts> {
    let mut o = DeleteOpts::default();
    if let Some(b) = body {
        if !b.is_object() {
            return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
        }
        o.propagation = b["propagationPolicy"].as_str().map(String::from);
        o.grace_seconds = b["gracePeriodSeconds"].as_i64();
        o.uid = b["preconditions"]["uid"].as_str().map(String::from);
        o.resource_version = b["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from);
        o.dry_run = b["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "All"));
        if b["orphanDependents"] == true && o.propagation.is_none() {
            o.propagation = Some("Orphan".into());
        }
    }
    if let Some(p) = params.get("propagationPolicy").filter(|p| !p.is_empty()) {
        o.propagation = Some(p.clone());
    }
    if let Some(g) = params.get("gracePeriodSeconds").filter(|g| !g.is_empty()) {
        o.grace_seconds = Some(g.parse().map_err(|_| {
            ApiError::bad_request(format!("gracePeriodSeconds: {g:?} is not an integer"))
        })?);
    }
    if params.get("dryRun").is_some_and(|d| d == "All") {
        o.dry_run = true;
    }
    if flag(params, "orphanDependents") && o.propagation.is_none() {
        o.propagation = Some("Orphan".into());
    }
    Ok(o)
}
