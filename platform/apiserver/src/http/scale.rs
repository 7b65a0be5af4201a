//! `.../{deployments,replicasets,statefulsets}/{name}/scale`: GET, PUT and PATCH (merge, JSON
//! and strategic merge patches, applied to the Scale), what `kubectl scale` uses.

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::*;
use crate::ops::scale;

#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    app: &App,
    rt: Arc<ResourceType>,
    version: String,
    ns: Option<String>,
    name: String,
    method: Method,
    headers: &HeaderMap,
    body: Body,
    params: &Params,
    identity: &Option<Identity>,
) -> ApiResult<Response> {
    let core = app.core.clone();
    if method == Method::GET || method == Method::HEAD {
        let s = blocking(move || scale::read(&core, &rt, &version, ns.as_deref(), &name)).await?;
        return Ok(json_response(StatusCode::OK, &s));
    }
    let patch_kind = match method {
        Method::PUT => None,
        Method::PATCH => {
            let ct = content_type(headers);
            if ct.starts_with("application/json-patch+json") {
                Some(true)
            } else if ct.starts_with("application/merge-patch+json")
                || ct.starts_with("application/strategic-merge-patch+json")
            {
                Some(false)
            } else {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format ({ct}) - accepted media types for scale include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
                )));
            }
        }
        m => {
            return Err(ApiError::MethodNotAllowed(format!(
                "the scale subresource supports get, update and patch, not {m}"
            )));
        }
    };
    let bytes = read_body(headers, body, app.max_body).await?;
    let doc = decode(bytes, |b| {
        check_depth(b)?;
        serde_json::from_slice::<Value>(b)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
    })
    .await?;
    let ctx = write_ctx(headers, params, identity)?;
    let s = blocking(move || {
        let target = match patch_kind {
            None => doc,
            Some(json_patch) => {
                let mut current = scale::read(&core, &rt, &version, ns.as_deref(), &name)?;
                if json_patch {
                    crate::patch::json_patch(&mut current, &doc)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                } else {
                    crate::patch::merge_patch(&mut current, &doc);
                }
                current
            }
        };
        scale::write(&core, &rt, &version, ns.as_deref(), &name, &target, &ctx)
    })
    .await?;
    Ok(json_response(StatusCode::OK, &s))
}
