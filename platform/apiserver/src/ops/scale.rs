//! The `scale` subresource (`autoscaling/v1` Scale) of Deployments, ReplicaSets and
//! StatefulSets: what `kubectl scale` reads and writes. A Scale is a view of the object
//! (`spec.replicas`, `status.replicas`, the selector as a string); writing one sets the object's
//! `spec.replicas` through [`update`], so optimistic concurrency, generation and managedFields
//! behave as for any update.

use serde_json::{Value, json};

use super::Core;
use super::{WriteCtx, get, update};
use crate::error::{ApiError, ApiResult, Cause};
use crate::registry::ResourceType;

/// Whether `rt` has a `scale` subresource.
pub fn has_scale(rt: &ResourceType) -> bool {
    rt.group == "apps"
        && matches!(
            rt.kind.as_str(),
            "Deployment" | "ReplicaSet" | "StatefulSet"
        )
}

/// The Scale of `obj`.
pub fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = crate::table::pairs(&obj["spec"]["selector"]["matchLabels"]);
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

/// GET: the Scale of `ns/name`.
pub fn read(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Value> {
    Ok(scale_of(&get(core, rt, version, ns, name)?))
}

/// PUT (and a patch, once applied to the Scale): sets `spec.replicas` from `scale`, which must
/// be a whole number from 0 to 2^31-1. A `metadata.resourceVersion` in it is a precondition;
/// without one, the write is retried if the object changed in between.
pub fn write(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    scale: &Value,
    ctx: &WriteCtx,
) -> ApiResult<Value> {
    let invalid = |why: &str| ApiError::Invalid {
        kind: "Scale".into(),
        group: "autoscaling".into(),
        name: name.into(),
        causes: vec![Cause::invalid(
            "spec.replicas",
            &scale["spec"]["replicas"],
            why,
        )],
    };
    let replicas = match &scale["spec"]["replicas"] {
        Value::Number(n) => n
            .as_i64()
            .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
            .ok_or_else(|| invalid("must be greater than or equal to 0 and a 32-bit integer"))?,
        Value::Null => return Err(invalid("is required")),
        _ => return Err(invalid("must be an integer")),
    };
    let precondition = scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
        .map(String::from);
    for _ in 0..5 {
        let mut obj = get(core, rt, version, ns, name)?;
        obj["spec"]["replicas"] = json!(replicas);
        if let Some(rv) = &precondition {
            obj["metadata"]["resourceVersion"] = json!(rv);
        }
        match update(core, rt, version, ns, name, obj, None, ctx) {
            Err(ApiError::Conflict { .. }) if precondition.is_none() => continue,
            r => return r.map(|o| scale_of(&o)),
        }
    }
    Err(ApiError::Conflict {
        resource: rt.qualified(),
        name: name.into(),
        message: "the object kept changing; try again".into(),
        causes: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_shows_replicas_and_the_selector() {
        let s = scale_of(&json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web", "tier": "edge"}}},
            "status": {"replicas": 2}
        }));
        assert_eq!(s["kind"], "Scale");
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["replicas"], 2);
        assert_eq!(s["status"]["selector"], "app=web,tier=edge");
        assert_eq!(s["metadata"]["resourceVersion"], "7");
    }
}
