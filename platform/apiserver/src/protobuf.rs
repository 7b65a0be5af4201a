//! Kubernetes protobuf request bodies for the kinds `kubectl`'s typed commands send that way
//! (`kubectl create namespace|configmap|secret|serviceaccount|role|rolebinding|clusterrole|
//! clusterrolebinding|token`, `kubectl auth can-i|whoami`): the `k8s\0` envelope, the
//! `runtime.Unknown` wrapper, and a schema-driven decoder into the same JSON the rest of the server
//! works on. Field numbers follow k8s.io/api's `generated.proto`.
//!
//! Other kinds answer 415 with a message pointing at JSON/YAML (`kubectl apply -f`), which every
//! kubectl command that reads manifests uses. Responses are always JSON.

use base64::Engine;
use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value};

/// How one field is encoded.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    /// bytes, rendered base64 like JSON does.
    Bytes,
    Msg(&'static [Field]),
    RepStr,
    RepMsg(&'static [Field]),
    MapStr,
    MapBytes,
    Time,
    /// Known, but the server manages it: dropped.
    Ignore,
}

type Field = (u32, &'static str, Kind);

const OWNER_REFERENCE: &[Field] = &[
    (1, "kind", Kind::Str),
    (3, "name", Kind::Str),
    (4, "uid", Kind::Str),
    (5, "apiVersion", Kind::Str),
    (6, "controller", Kind::Bool),
    (7, "blockOwnerDeletion", Kind::Bool),
];

const OBJECT_META: &[Field] = &[
    (1, "name", Kind::Str),
    (2, "generateName", Kind::Str),
    (3, "namespace", Kind::Str),
    (4, "selfLink", Kind::Str),
    (5, "uid", Kind::Str),
    (6, "resourceVersion", Kind::Str),
    (7, "generation", Kind::Int),
    (8, "creationTimestamp", Kind::Time),
    (9, "deletionTimestamp", Kind::Time),
    (10, "deletionGracePeriodSeconds", Kind::Int),
    (11, "labels", Kind::MapStr),
    (12, "annotations", Kind::MapStr),
    (13, "ownerReferences", Kind::RepMsg(OWNER_REFERENCE)),
    (14, "finalizers", Kind::RepStr),
    (17, "managedFields", Kind::Ignore),
];

const OBJECT_REFERENCE: &[Field] = &[
    (1, "kind", Kind::Str),
    (2, "namespace", Kind::Str),
    (3, "name", Kind::Str),
    (4, "uid", Kind::Str),
    (5, "apiVersion", Kind::Str),
    (6, "resourceVersion", Kind::Str),
    (7, "fieldPath", Kind::Str),
];

const LOCAL_OBJECT_REFERENCE: &[Field] = &[(1, "name", Kind::Str)];

const CONFIG_MAP: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "data", Kind::MapStr),
    (3, "binaryData", Kind::MapBytes),
    (4, "immutable", Kind::Bool),
];

const SECRET: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "data", Kind::MapBytes),
    (3, "type", Kind::Str),
    (4, "stringData", Kind::MapStr),
    (5, "immutable", Kind::Bool),
];

const NAMESPACE: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "spec", Kind::Msg(&[(1, "finalizers", Kind::RepStr)])),
    (
        3,
        "status",
        Kind::Msg(&[(1, "phase", Kind::Str), (2, "conditions", Kind::Ignore)]),
    ),
];

const SERVICE_ACCOUNT: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "secrets", Kind::RepMsg(OBJECT_REFERENCE)),
    (3, "imagePullSecrets", Kind::RepMsg(LOCAL_OBJECT_REFERENCE)),
    (4, "automountServiceAccountToken", Kind::Bool),
];

const POLICY_RULE: &[Field] = &[
    (1, "verbs", Kind::RepStr),
    (2, "apiGroups", Kind::RepStr),
    (3, "resources", Kind::RepStr),
    (4, "resourceNames", Kind::RepStr),
    (5, "nonResourceURLs", Kind::RepStr),
];

const ROLE: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "rules", Kind::RepMsg(POLICY_RULE)),
    // ClusterRole's aggregationRule: aggregation is not implemented.
    (3, "aggregationRule", Kind::Ignore),
];

const ROLE_BINDING: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (
        2,
        "subjects",
        Kind::RepMsg(&[
            (1, "kind", Kind::Str),
            (2, "apiGroup", Kind::Str),
            (3, "name", Kind::Str),
            (4, "namespace", Kind::Str),
        ]),
    ),
    (
        3,
        "roleRef",
        Kind::Msg(&[
            (1, "apiGroup", Kind::Str),
            (2, "kind", Kind::Str),
            (3, "name", Kind::Str),
        ]),
    ),
];

/// `authentication.k8s.io/v1` TokenRequest (`kubectl create token`).
const TOKEN_REQUEST: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (
        2,
        "spec",
        Kind::Msg(&[
            (1, "audiences", Kind::RepStr),
            (
                3,
                "boundObjectRef",
                Kind::Msg(&[
                    (1, "kind", Kind::Str),
                    (2, "apiVersion", Kind::Str),
                    (3, "name", Kind::Str),
                    (4, "uid", Kind::Str),
                ]),
            ),
            (4, "expirationSeconds", Kind::Int),
        ]),
    ),
    (3, "status", Kind::Ignore),
];

/// `authentication.k8s.io/v1` SelfSubjectReview (`kubectl auth whoami`).
const SELF_SUBJECT_REVIEW: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "status", Kind::Ignore),
];

const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (
        2,
        "spec",
        Kind::Msg(&[
            (
                1,
                "resourceAttributes",
                Kind::Msg(&[
                    (1, "namespace", Kind::Str),
                    (2, "verb", Kind::Str),
                    (3, "group", Kind::Str),
                    (4, "version", Kind::Str),
                    (5, "resource", Kind::Str),
                    (6, "subresource", Kind::Str),
                    (7, "name", Kind::Str),
                    (8, "fieldSelector", Kind::Ignore),
                    (9, "labelSelector", Kind::Ignore),
                ]),
            ),
            (
                2,
                "nonResourceAttributes",
                Kind::Msg(&[(1, "path", Kind::Str), (2, "verb", Kind::Str)]),
            ),
        ]),
    ),
    (3, "status", Kind::Ignore),
];

const SELF_SUBJECT_RULES_REVIEW: &[Field] = &[
    (1, "metadata", Kind::Msg(OBJECT_META)),
    (2, "spec", Kind::Msg(&[(1, "namespace", Kind::Str)])),
    (3, "status", Kind::Ignore),
];

const TIME: &[Field] = &[(1, "seconds", Kind::Int), (2, "nanos", Kind::Int)];
/// `runtime.TypeMeta` (not meta/v1's): apiVersion first.
const TYPE_META: &[Field] = &[(1, "apiVersion", Kind::Str), (2, "kind", Kind::Str)];
const UNKNOWN: &[Field] = &[
    (1, "typeMeta", Kind::Msg(TYPE_META)),
    (2, "raw", Kind::Bytes),
    (3, "contentEncoding", Kind::Str),
    (4, "contentType", Kind::Str),
];

fn schema_for(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    match (api_version, kind) {
        ("v1", "ConfigMap") => Some(CONFIG_MAP),
        ("v1", "Secret") => Some(SECRET),
        ("v1", "Namespace") => Some(NAMESPACE),
        ("v1", "ServiceAccount") => Some(SERVICE_ACCOUNT),
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => Some(ROLE),
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => {
            Some(ROLE_BINDING)
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => Some(SELF_SUBJECT_ACCESS_REVIEW),
        ("authentication.k8s.io/v1", "TokenRequest") => Some(TOKEN_REQUEST),
        ("authentication.k8s.io/v1", "SelfSubjectReview") => Some(SELF_SUBJECT_REVIEW),
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview") => Some(SELF_SUBJECT_RULES_REVIEW),
        _ => None,
    }
}

/// Magic prefix of Kubernetes protobuf bodies.
pub const MAGIC: &[u8] = b"k8s\0";

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()? as usize;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or("length runs past the end of the message")?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            w => Err(format!("unsupported wire type {w}")),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if self.pos + n > self.buf.len() {
            return Err("truncated fixed-width field".into());
        }
        self.pos += n;
        Ok(())
    }
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string field is not UTF-8".to_string())
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: b, pos: 0 };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while r.pos < b.len() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => k = utf8(r.bytes()?)?,
            (2, 2) if bytes_value => {
                v = Value::String(base64::engine::general_purpose::STANDARD.encode(r.bytes()?))
            }
            (2, 2) => v = Value::String(utf8(r.bytes()?)?),
            (_, w) => r.skip(w)?,
        }
    }
    Ok((k, v))
}

fn decode(buf: &[u8], schema: &'static [Field], path: &str) -> Result<Map<String, Value>, String> {
    let mut r = Reader { buf, pos: 0 };
    let mut out = Map::new();
    while r.pos < buf.len() {
        let tag = r.varint()?;
        let (num, wire) = ((tag >> 3) as u32, tag & 7);
        let Some(&(_, name, kind)) = schema.iter().find(|f| f.0 == num) else {
            return Err(format!(
                "field {num} of {path} is not supported in protobuf; send JSON or YAML instead"
            ));
        };
        let at = if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        let value = match (kind, wire) {
            (Kind::Ignore, w) => {
                r.skip(w)?;
                continue;
            }
            (Kind::Str, 2) => Value::String(utf8(r.bytes()?)?),
            (Kind::Int, 0) => Value::from(r.varint()? as i64),
            (Kind::Bool, 0) => Value::Bool(r.varint()? != 0),
            (Kind::Bytes, 2) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(r.bytes()?))
            }
            (Kind::Msg(s), 2) => Value::Object(decode(r.bytes()?, s, &at)?),
            (Kind::Time, 2) => {
                let t = decode(r.bytes()?, TIME, &at)?;
                let secs = t.get("seconds").and_then(Value::as_i64).unwrap_or(0);
                let ts = DateTime::from_timestamp(secs, 0)
                    .ok_or_else(|| format!("{at}: time out of range"))?;
                Value::String(ts.to_rfc3339_opts(SecondsFormat::Secs, true))
            }
            (Kind::RepStr, 2) => {
                let s = utf8(r.bytes()?)?;
                out.entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .ok_or("repeated field clash")?
                    .push(Value::String(s));
                continue;
            }
            (Kind::RepMsg(s), 2) => {
                let m = decode(r.bytes()?, s, &at)?;
                out.entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                    .ok_or("repeated field clash")?
                    .push(Value::Object(m));
                continue;
            }
            (Kind::MapStr | Kind::MapBytes, 2) => {
                let (k, v) = map_entry(r.bytes()?, matches!(kind, Kind::MapBytes))?;
                out.entry(name)
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .ok_or("map field clash")?
                    .insert(k, v);
                continue;
            }
            (_, w) => {
                return Err(format!(
                    "{at}: wire type {w} does not match the field's type"
                ));
            }
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

/// Why a protobuf body was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    /// The body is not valid Kubernetes protobuf.
    #[error("the protobuf body is invalid: {0}")]
    Malformed(String),
    /// Valid, but a kind or field this server only takes as JSON/YAML.
    #[error("{0}")]
    Unsupported(String),
}

/// Decodes a `k8s\0`-prefixed protobuf body into JSON, or says why it cannot.
pub fn to_json(body: &[u8]) -> Result<Value, ProtoError> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        ProtoError::Malformed("it does not start with the k8s magic bytes".into())
    })?;
    let unknown = decode(rest, UNKNOWN, "").map_err(ProtoError::Malformed)?;
    let api_version = unknown
        .get("typeMeta")
        .and_then(|t| t.get("apiVersion"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = unknown
        .get("typeMeta")
        .and_then(|t| t.get("kind"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let schema = schema_for(&api_version, &kind).ok_or_else(|| {
        ProtoError::Unsupported(format!("protobuf bodies are accepted for v1 ConfigMap, Secret, Namespace and ServiceAccount, the RBAC kinds and the self reviews; {kind} ({api_version}) must be sent as JSON or YAML (for example `kubectl create ... --dry-run=client -o yaml | kubectl apply -f -`)"))
    })?;
    let raw = unknown
        .get("raw")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|e| ProtoError::Malformed(e.to_string()))?;
    let mut obj = decode(&raw, schema, "").map_err(|e| {
        if e.contains("is not supported in protobuf") {
            ProtoError::Unsupported(e)
        } else {
            ProtoError::Malformed(e)
        }
    })?;
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![((num << 3) | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let tm = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        let unknown = [
            field(1, &tm),
            field(2, raw),
            field(4, b"application/vnd.kubernetes.protobuf"),
        ]
        .concat();
        [MAGIC.to_vec(), unknown].concat()
    }

    #[test]
    fn decodes_a_config_map_like_kubectl_sends_it() {
        let meta = [
            field(1, b"settings"),
            field(
                11,
                &[field(1, b"app").as_slice(), field(2, b"web").as_slice()].concat(),
            ),
        ]
        .concat();
        let data = [field(1, b"mode"), field(2, b"fast")].concat();
        let raw = [field(1, &meta), field(2, &data)].concat();
        let obj = to_json(&envelope("v1", "ConfigMap", &raw)).unwrap();
        assert_eq!(obj["kind"], "ConfigMap");
        assert_eq!(obj["metadata"]["name"], "settings");
        assert_eq!(obj["metadata"]["labels"]["app"], "web");
        assert_eq!(obj["data"]["mode"], "fast");
    }

    #[test]
    fn secret_bytes_become_base64() {
        let raw = [
            field(1, &field(1, b"s")),
            field(2, &[field(1, b"k"), field(2, b"abc")].concat()),
            field(3, b"Opaque"),
        ]
        .concat();
        let obj = to_json(&envelope("v1", "Secret", &raw)).unwrap();
        assert_eq!(obj["data"]["k"], "YWJj");
        assert_eq!(obj["type"], "Opaque");
    }

    #[test]
    fn unsupported_kinds_and_garbage_are_named() {
        let e = to_json(&envelope("apps/v1", "Deployment", &[])).unwrap_err();
        assert!(
            matches!(&e, ProtoError::Unsupported(m) if m.contains("Deployment") && m.contains("JSON")),
            "{e}"
        );
        assert!(
            to_json(b"not protobuf")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        assert!(matches!(
            to_json(&[MAGIC, &[0x0a, 0xff, 0xff]].concat()),
            Err(ProtoError::Malformed(_))
        ));
        let e = to_json(&envelope("v1", "ConfigMap", &field(9, b"x"))).unwrap_err();
        assert!(
            matches!(&e, ProtoError::Unsupported(m) if m.contains("field 9")),
            "{e}"
        );
    }
}
