//! Validation: object names, labels, and custom resources against their CRD's `openAPIV3Schema`
//! (types, required, enums, bounds, defaults, and pruning of unknown fields).
//!
//! Not covered (documented in the crate docs): `pattern` (no regex engine here), `format`,
//! CEL `x-kubernetes-validations`, and `oneOf`/`anyOf`/`allOf`/`not`.

use serde_json::{Map, Value};

use crate::error::Cause;

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

/// An RFC 1123 label (namespace names, CRD plurals): `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters and not empty; {LABEL_MSG}"
        ));
    }
    if sedge_api::is_dns_label(s) {
        Ok(())
    } else {
        Err(LABEL_MSG.to_string())
    }
}

/// An RFC 1123 subdomain (most object names), at most 253 characters.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!(
            "must be no more than 253 characters and not empty; {SUBDOMAIN_MSG}"
        ));
    }
    if s.split('.').all(|part| dns_label(part).is_ok()) {
        Ok(())
    } else {
        Err(SUBDOMAIN_MSG.to_string())
    }
}

/// An RFC 1035 label (service names): like a label but starting with a letter.
pub fn dns1035_label(s: &str) -> Result<(), String> {
    match dns_label(s) {
        Ok(()) if s.as_bytes()[0].is_ascii_lowercase() => Ok(()),
        Ok(()) => Err(DNS1035_MSG.to_string()),
        Err(e) => Err(e.replace(LABEL_MSG, DNS1035_MSG)),
    }
}

/// Checks an object name for a kind.
pub fn object_name(kind: &str, name: &str) -> Result<(), String> {
    match kind {
        "Namespace" => dns_label(name),
        "Service" => dns1035_label(name),
        // RBAC names are path segments (`system:discovery`), as in kube-apiserver.
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => path_segment(name),
        _ => dns_subdomain(name),
    }
}

/// kube-apiserver's `ValidatePathSegmentName`: usable as one URL path segment.
pub fn path_segment(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be no more than 253 characters and not empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("may not be '{name}'"));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '%')) {
        return Err(format!("may not contain '{c}'"));
    }
    Ok(())
}

fn qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Validates `metadata.labels` (keys and values) and `metadata.annotations` keys.
pub fn labels_and_annotations(meta: &Value, causes: &mut Vec<Cause>) {
    for (field, check_values) in [("labels", true), ("annotations", false)] {
        let Some(map) = meta.get(field) else { continue };
        if map.is_null() {
            continue;
        }
        let Some(map) = map.as_object() else {
            causes.push(Cause::wrong_type(
                format!("metadata.{field}"),
                map,
                "object",
            ));
            continue;
        };
        for (k, v) in map {
            let (prefix, name) = match k.rsplit_once('/') {
                Some((p, n)) => (Some(p), n),
                None => (None, k.as_str()),
            };
            let prefix_ok = prefix.is_none_or(|p| dns_subdomain(p).is_ok());
            if !prefix_ok || !qualified_name_part(name) {
                causes.push(Cause::invalid(
                    format!("metadata.{field}"),
                    &Value::from(k.as_str()),
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, with an optional DNS subdomain prefix and '/'",
                ));
            }
            match v {
                Value::String(s) if check_values && !s.is_empty() && !qualified_name_part(s) => {
                    causes.push(Cause::invalid(
                        format!("metadata.labels.{k}"),
                        v,
                        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                    ))
                }
                Value::String(_) => {}
                other => causes.push(Cause::wrong_type(format!("metadata.{field}.{k}"), other, "string")),
            }
        }
    }
}

const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean"];

/// Structural checks on a CRD schema: known `type`s, `properties` and `items` that are schemas.
pub fn check_schema(schema: &Value, path: &str) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    check_schema_into(schema, path, &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

fn check_schema_into(schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let Some(obj) = schema.as_object() else {
        causes.push(Cause::wrong_type(path, schema, "object"));
        return;
    };
    if let Some(t) = obj.get("type") {
        match t.as_str() {
            Some(s) if TYPES.contains(&s) => {}
            _ => causes.push(Cause::not_supported(
                format!("{path}.type"),
                t,
                &TYPES.iter().map(|s| Value::from(*s)).collect::<Vec<_>>(),
            )),
        }
    }
    if let Some(props) = obj.get("properties") {
        match props.as_object() {
            Some(p) => {
                for (k, v) in p {
                    check_schema_into(v, &format!("{path}.properties[{k}]"), causes);
                }
            }
            None => causes.push(Cause::wrong_type(
                format!("{path}.properties"),
                props,
                "object",
            )),
        }
    }
    if let Some(items) = obj.get("items") {
        check_schema_into(items, &format!("{path}.items"), causes);
    }
    if let Some(ap) = obj.get("additionalProperties")
        && ap.is_object()
    {
        check_schema_into(ap, &format!("{path}.additionalProperties"), causes);
    }
}

/// Validates a custom resource against its schema, applying defaults and pruning unknown fields
/// in place. `apiVersion`, `kind` and `metadata` at the root are the server's business and are
/// neither pruned nor validated here.
pub fn custom_resource(obj: &mut Value, schema: &Value) -> Vec<Cause> {
    custom_resource_pruned(obj, schema, &mut Vec::new())
}

/// Like [`custom_resource`], also reporting the paths of the fields it pruned (for
/// `fieldValidation=Strict`).
pub fn custom_resource_pruned(
    obj: &mut Value,
    schema: &Value,
    pruned: &mut Vec<String>,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        causes.push(Cause::wrong_type("", obj, "object"));
        return causes;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = preserves(schema);
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                let v = map.get_mut(&k).expect("key present");
                if v.is_null()
                    && !sub
                        .get("nullable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                {
                    map.remove(&k);
                    continue;
                }
                check_value(v, sub, &k, &mut causes, pruned);
            }
            None if preserve => {}
            None => {
                map.remove(&k);
                pruned.push(k);
            }
        }
    }
    apply_defaults_and_required(map, schema, "", &mut causes);
    causes
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn apply_defaults_and_required(
    map: &mut Map<String, Value>,
    schema: &Value,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if !map.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            let server_owned = path.is_empty() && matches!(r, "apiVersion" | "kind" | "metadata");
            if !map.contains_key(r) && !server_owned {
                causes.push(Cause::required(join(path, r)));
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check_value(
    v: &mut Value,
    schema: &Value,
    path: &str,
    causes: &mut Vec<Cause>,
    pruned: &mut Vec<String>,
) {
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            causes.push(Cause::wrong_type(path, v, "integer or string"));
        }
        return;
    }
    if v.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            causes.push(Cause::wrong_type(
                path,
                v,
                schema
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("object"),
            ));
        }
        return;
    }
    let want = schema.get("type").and_then(Value::as_str);
    let got = type_name(v);
    if let Some(want) = want {
        // Whole numbers written as 3.0 are integers for Kubernetes too.
        let int_like = want == "integer" && v.as_f64().is_some_and(|f| f.fract() == 0.0);
        let ok = want == got || (want == "number" && got == "integer") || int_like;
        if !ok {
            causes.push(Cause::wrong_type(path, v, want));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        causes.push(Cause::not_supported(path, v, allowed));
    }
    match v {
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    format!("may not be more than {max} bytes"),
                ));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    format!("should be at least {min} chars long"),
                ));
            }
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && f < min
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    format!("should be greater than or equal to {min}"),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && f > max
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    format!("should be less than or equal to {max}"),
                ));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                causes.push(Cause::invalid(
                    path,
                    &Value::from(n),
                    format!("must have at most {max} items"),
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                causes.push(Cause::invalid(
                    path,
                    &Value::from(n),
                    format!("should have at least {min} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check_value(item, item_schema, &format!("{path}[{i}]"), causes, pruned);
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let embedded = schema
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                == Some(true);
            let preserve = preserves(schema) || additional.and_then(Value::as_bool) == Some(true);
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let sub = props
                    .and_then(|p| p.get(&k))
                    .or(additional.filter(|a| a.is_object()));
                match sub {
                    Some(sub) => {
                        let child = map.get_mut(&k).expect("key present");
                        if child.is_null()
                            && sub.get("nullable").and_then(Value::as_bool) != Some(true)
                        {
                            map.remove(&k);
                            continue;
                        }
                        check_value(child, sub, &join(path, &k), causes, pruned);
                    }
                    None if preserve
                        || (embedded
                            && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")) => {}
                    None => {
                        map.remove(&k);
                        pruned.push(join(path, &k));
                    }
                }
            }
            apply_defaults_and_required(map, schema, path, causes);
        }
        Value::Bool(_) | Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(dns_subdomain("web-1.example").is_ok());
        assert!(dns_subdomain("Web").is_err());
        assert!(dns_subdomain("-a").is_err());
        assert!(dns_subdomain(&"a".repeat(254)).is_err());
        assert!(dns_label("a.b").is_err());
        assert!(dns1035_label("1abc").is_err());
        assert!(dns1035_label("abc-1").is_ok());
        assert!(object_name("Namespace", "has.dot").is_err());
        assert!(object_name("Pod", "has.dot").is_ok());
    }

    #[test]
    fn label_values_are_checked() {
        let mut causes = Vec::new();
        labels_and_annotations(
            &json!({"labels": {"app": "ok", "bad": "has space", "x/y/z": "v"}}),
            &mut causes,
        );
        assert_eq!(causes.len(), 2, "{causes:?}");
    }

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "color": {"type": "string", "enum": ["red", "blue"]},
                        "mode": {"type": "string", "default": "fast"},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "port": {"x-kubernetes-int-or-string": true}
                    }
                },
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        })
    }

    #[test]
    fn prunes_unknown_fields_and_defaults() {
        let mut obj = json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 2, "extra": 1, "free": {"anything": [1]}, "port": "http"},
            "junk": true
        });
        let causes = custom_resource(&mut obj, &schema());
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(obj["spec"]["mode"], "fast");
        assert!(obj["spec"].get("extra").is_none());
        assert!(obj.get("junk").is_none());
        assert_eq!(obj["spec"]["free"]["anything"][0], 1);
        let mut again = json!({"spec": {"size": 1, "extra": {"deep": 1}}, "junk": 1});
        let mut pruned = Vec::new();
        custom_resource_pruned(&mut again, &schema(), &mut pruned);
        assert_eq!(pruned, vec!["junk", "spec.extra"]);
        assert_eq!(obj["metadata"]["name"], "w");
    }

    #[test]
    fn reports_each_violation_with_its_path() {
        let mut obj = json!({"spec": {"color": "green", "tags": ["a", 3], "size": 0}});
        let causes = custom_resource(&mut obj, &schema());
        let fields: Vec<_> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["spec.color", "spec.size", "spec.tags[1]"],
            "{causes:?}"
        );
        let mut obj = json!({"spec": {"size": "two"}});
        let causes = custom_resource(&mut obj, &schema());
        assert_eq!(causes[0].reason, "FieldValueTypeInvalid");
        let mut obj = json!({"spec": {}});
        let causes = custom_resource(&mut obj, &schema());
        assert_eq!(causes[0].field, "spec.size");
        assert_eq!(causes[0].reason, "FieldValueRequired");
    }
}
