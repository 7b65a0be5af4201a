//! Who may do what: the authorizer's verdict for a request, the escalation check on RBAC
//! writes, and the self-reviews (`kubectl auth can-i`, `whoami`).

use super::*;

/// Asks the authorizer (off the runtime: it may read the store) and turns a refusal into
/// kube-apiserver's 403.
pub(super) async fn authorize(app: &Arc<App>, id: &Identity, attrs: Attributes) -> ApiResult<()> {
    let resource = attrs.resource.clone();
    let name = attrs.name.clone();
    // Off the runtime only when the store must be read (a stale policy, a node's graph).
    let decided = match app.core.authz.authorize_cached(id, &attrs) {
        Some(d) => d.map_err(|d| (d, id.user.clone())),
        None => {
            let (core, id) = (app.core.clone(), id.clone());
            blocking(move || {
                Ok(core
                    .authz
                    .authorize(&core.store, &id, &attrs)
                    .map_err(|d| (d, id.user)))
            })
            .await?
        }
    };
    decided.map_err(|(Denied(message), user)| {
        tracing::debug!(%user, %message, "forbidden");
        ApiError::Forbidden {
            resource,
            name,
            message,
        }
    })
}

/// The RBAC escalation check for a role or binding about to be written.
pub(super) async fn escalation(
    app: &Arc<App>,
    identity: &Option<Identity>,
    rt: &ResourceType,
    ns: Option<&str>,
    obj: &Value,
) -> ApiResult<()> {
    let Some(id) = identity.clone() else {
        return Ok(());
    };
    if rt.group != crate::authz::RBAC_GROUP {
        return Ok(());
    }
    let (core, plural, ns, obj) = (
        app.core.clone(),
        rt.plural.clone(),
        ns.unwrap_or_default().to_string(),
        obj.clone(),
    );
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let qualified = rt.qualified();
    blocking(move || {
        core.authz
            .check_escalation(&core.store, &id, &plural, &ns, &obj)
            .map_err(|Denied(message)| ApiError::Forbidden {
                resource: qualified,
                name,
                message,
            })
    })
    .await
}

/// `SelfSubjectAccessReview` (`kubectl auth can-i VERB RESOURCE`) and `SelfSubjectRulesReview`
/// (`kubectl auth can-i --list`): answered for the caller, never stored.
pub(super) async fn self_review(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
    rt: &ResourceType,
    identity: Option<Identity>,
) -> ApiResult<Response> {
    if method != Method::POST {
        return Err(ApiError::MethodNotAllowed(format!(
            "{} supports only create",
            rt.qualified()
        )));
    }
    let Some(id) = identity else {
        return Err(ApiError::Unauthorized);
    };
    let bytes = read_body(headers, body, app.max_body).await?;
    let mut review = parse(headers, bytes).await?;
    if !review.is_object() {
        return Err(ApiError::bad_request(format!(
            "a {} must be a JSON object",
            rt.kind
        )));
    }
    let core = app.core.clone();
    let kind = rt.kind.clone();
    let status = blocking(move || {
        let spec = &review["spec"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let status = if kind == "SelfSubjectRulesReview" {
            let policy = core.authz.policy(&core.store);
            crate::authz::rules_review(&policy, &id, spec["namespace"].as_str().unwrap_or_default())
        } else {
            let attrs = if spec["nonResourceAttributes"].is_object() {
                let n = &spec["nonResourceAttributes"];
                Attributes {
                    verb: text(&n["verb"]),
                    path: text(&n["path"]),
                    ..Default::default()
                }
            } else if spec["resourceAttributes"].is_object() {
                let r = &spec["resourceAttributes"];
                Attributes {
                    verb: text(&r["verb"]),
                    group: text(&r["group"]),
                    resource: text(&r["resource"]),
                    subresource: text(&r["subresource"]),
                    namespace: text(&r["namespace"]),
                    name: text(&r["name"]),
                    path: String::new(),
                }
            } else {
                return Err(ApiError::bad_request(
                    "spec: exactly one of resourceAttributes or nonResourceAttributes is required",
                ));
            };
            if attrs.verb.is_empty() {
                return Err(ApiError::bad_request("spec: the verb is required"));
            }
            match core.authz.authorize(&core.store, &id, &attrs) {
                Ok(()) => {
                    json!({"allowed": true, "reason": "allowed by RBAC or the Node authorizer"})
                }
                // kube-apiserver gives RBAC denials no reason (kubectl prints a bare "no");
                // the 403 of the real request carries the text.
                Err(Denied(_)) => json!({"allowed": false}),
            }
        };
        review["status"] = status;
        review["apiVersion"] = json!("authorization.k8s.io/v1");
        review["kind"] = json!(kind);
        Ok(review)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &status))
}
