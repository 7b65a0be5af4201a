//! OpenAPI v3 documents, enough for `kubectl`:
//! - `kubectl apply/create/replace` look for a PATCH operation carrying the kind's
//!   `x-kubernetes-group-version-kind` and a `fieldValidation` query parameter; finding it, they leave
//!   validation to the server instead of downloading the v2 schema.
//! - PATCH operations declare no strategic-merge request body, so client-side apply computes
//!   strategic patches from its compiled-in types for built-in kinds, and merge patches for
//!   custom resources.
//! - `kubectl explain` reads `components.schemas` by group-version-kind: custom resources get their
//!   CRD's `openAPIV3Schema`; built-in kinds get a shallow schema (fields are not described).

use serde_json::{Map, Value, json};

use crate::discovery::KUBE_MINOR;
use crate::registry::{ResourceType, Snapshot};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn hash(s: &str) -> String {
    // FNV-1a: a cache key for clients, not a security property.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

/// `/openapi/v3`: one entry per group-version.
pub fn root(snap: &Snapshot) -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(String, String)> = Vec::new();
    for t in snap.types() {
        for v in &t.versions {
            let gv = (t.group.clone(), v.clone());
            if !gvs.contains(&gv) {
                gvs.push(gv);
            }
        }
    }
    for (g, v) in gvs {
        let p = gv_path(&g, &v);
        let doc = group_version(snap, &p).unwrap_or_default();
        paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", hash(&doc.to_string()))}));
    }
    json!({"paths": paths})
}

fn schema_name(rt: &ResourceType, version: &str) -> String {
    let group = if rt.group.is_empty() {
        "core".to_string()
    } else {
        rt.group.clone()
    };
    let rev: Vec<&str> = group.split('.').rev().collect();
    format!("{}.{version}.{}", rev.join("."), rt.kind)
}

fn gvk(rt: &ResourceType, version: &str) -> Value {
    json!([{"group": rt.group, "version": version, "kind": rt.kind}])
}

fn param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn kind_schema(rt: &ResourceType, version: &str) -> Value {
    let mut schema = rt.schemas.get(version).cloned().unwrap_or_else(|| {
        json!({
            "type": "object",
            "description": format!("{} is a built-in Kubernetes kind served by Sedge.", rt.kind),
            "properties": {
                "spec": {"type": "object", "description": format!("Specification of the {}.", rt.kind), "x-kubernetes-preserve-unknown-fields": true},
                "status": {"type": "object", "description": format!("Most recently observed status of the {}.", rt.kind), "x-kubernetes-preserve-unknown-fields": true}
            }
        })
    });
    if !schema["properties"].is_object() {
        schema["properties"] = json!({});
    }
    let props = schema["properties"].as_object_mut().expect("object");
    props.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
    props.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
    props.insert("metadata".into(), json!({"type": "object", "description": "Standard object's metadata.", "x-kubernetes-preserve-unknown-fields": true}));
    schema["x-kubernetes-group-version-kind"] = gvk(rt, version);
    schema
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/{group}/{version}`.
pub fn group_version(snap: &Snapshot, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return None,
    };
    if !snap.has_group_version(&group, &version) {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in snap
        .types()
        .iter()
        .filter(|t| t.group == group && t.versions.contains(&version))
    {
        let name = schema_name(rt, &version);
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let ext = gvk(rt, &version)[0].clone();
        let write_params = json!([
            param(
                "dryRun",
                "When present, indicates that modifications should not be persisted."
            ),
            param(
                "fieldManager",
                "fieldManager is a name associated with the actor or entity that is making these changes."
            ),
            param(
                "fieldValidation",
                "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields."
            ),
        ]);
        let mut patch_params = write_params.clone();
        patch_params.as_array_mut().expect("array").push(param(
            "force",
            "Force is going to \"force\" Apply requests.",
        ));
        let base = format!("/{}", gv_path(&group, &version));
        let collection = if rt.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("{base}/{}", rt.plural)
        };
        let item = format!("{collection}/{{name}}");
        let op = |verb: &str, params: &Value| {
            json!({
                "description": format!("{verb} {}", rt.kind),
                "operationId": format!("{verb}{}", rt.kind),
                "parameters": params,
                "responses": ok,
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": ext,
            })
        };
        paths.insert(
            collection.clone(),
            json!({"get": op("list", &json!([])), "post": op("post", &write_params)}),
        );
        paths.insert(
            item.clone(),
            json!({
                "get": op("get", &json!([])),
                "put": op("put", &write_params),
                "patch": op("patch", &patch_params),
                "delete": op("delete", &json!([])),
            }),
        );
        if rt.status_subresource {
            paths.insert(
                format!("{item}/status"),
                json!({
                    "get": op("get", &json!([])),
                    "put": op("put", &write_params),
                    "patch": op("patch", &patch_params),
                }),
            );
        }
        schemas.insert(name, kind_schema(rt, &version));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{KUBE_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// Media type kubectl asks `/openapi/v2` for.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// `/openapi/v2` as JSON: a valid Swagger 2.0 document with no definitions. Schemas are published
/// through v3 only.
pub fn v2_json() -> Value {
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": format!("v1.{KUBE_MINOR}.0")}, "paths": {}, "definitions": {}})
}

/// `/openapi/v2` as gnostic protobuf (what kubectl's client-side validation downloads): the same
/// empty document. With no definitions, kubectl skips client-side validation for every kind and
/// the server validates, which matters when a CRD and its first objects arrive in one `apply`
/// (kubectl validates all documents before it creates the CRD).
pub fn v2_protobuf() -> Vec<u8> {
    fn field(num: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(num << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }
    let version = format!("v1.{KUBE_MINOR}.0");
    let info = [field(1, b"Kubernetes"), field(2, version.as_bytes())].concat();
    [field(1, b"2.0"), field(2, &info)].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn patch_operations_declare_field_validation() {
        let snap = Registry::default().snapshot();
        let doc = group_version(&snap, "apis/apps/v1").unwrap();
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(
            doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"].is_object()
                || doc["components"]["schemas"]["apps.v1.Deployment"].is_object()
        );
        let root = root(&snap);
        assert!(
            root["paths"]["api/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/api/v1?hash=")
        );
    }
}
