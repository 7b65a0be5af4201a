//! ServiceAccount tokens, as kube-apiserver issues them: `TokenRequest`
//! (`POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`, what `kubectl create token`
//! sends) returns a JWT signed with the server's ES256 key (`sa.key` in the data directory,
//! created on first start, kept across restarts). The token is:
//!
//! - **expiring**: `spec.expirationSeconds`, 1 hour by default, at least 10 minutes (a shorter one
//!   is refused, as kube-apiserver does), at most [`MAX_EXPIRATION_SECONDS`] (a longer one is cut
//!   to it);
//! - **bound**: to the ServiceAccount's UID, and optionally (`spec.boundObjectRef`) to a Pod's
//!   name and UID; it stops authenticating once that object is deleted or being deleted (or
//!   re-created with a new UID), within [`CACHE_TTL`];
//! - **audience-scoped**: `spec.audiences`, by default the API server's own ([`API_AUDIENCE`]);
//!   a token for another audience (a token for some other service) is not accepted here.
//!
//! Authenticated, a token is the user `system:serviceaccount:<ns>:<name>` in the groups
//! `system:serviceaccounts` and `system:serviceaccounts:<ns>`; RBAC decides the rest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::Identity;
use crate::error::{ApiError, Cause};
use crate::store::Store;

/// The issuer, and the audience the API server accepts (kube-apiserver's defaults).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// Default lifetime of a requested token.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Shortest lifetime that may be asked for (kube-apiserver's).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// Longest lifetime given; longer requests are cut to it.
pub const MAX_EXPIRATION_SECONDS: i64 = 48 * 3600;
/// How long a verified token's lookup (its ServiceAccount, its Pod) is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Verified tokens remembered at most (the cache is emptied when full).
const CACHE_MAX: usize = 4096;
/// Longest token looked at (a JWT of ours is well under 1 KB).
const MAX_TOKEN_BYTES: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ref {
    name: String,
    uid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

/// Issues and verifies ServiceAccount tokens.
pub struct ServiceAccountTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    cache: Mutex<HashMap<String, (Identity, Instant)>>,
}

impl std::fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountTokens")
            .finish_non_exhaustive()
    }
}

/// The signing key could not be read, made or used.
#[derive(Debug, thiserror::Error)]
#[error("ServiceAccount signing key {path}: {message}")]
pub struct KeyError {
    /// The key file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl ServiceAccountTokens {
    /// Loads the ES256 signing key from `path` (PKCS#8 PEM), creating it (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let err = |message: String| KeyError {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            let key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
            sedge_pki::write_file(path, &key.serialize_pem(), true)
                .map_err(|e| err(e.to_string()))?;
        }
        let pem = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| err(e.to_string()))?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(err("not an ECDSA P-256 key".into()));
        }
        Ok(ServiceAccountTokens {
            // PKCS#8 DER to sign, the SEC1 point to verify (what the ES256 backend takes).
            encoding: EncodingKey::from_ec_der(&key.serialize_der()),
            decoding: DecodingKey::from_ec_der(key.public_key_raw()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a bearer token is one of ours to check (a JWT); static tokens are not.
    pub fn is_jwt(token: &str) -> bool {
        token.len() <= MAX_TOKEN_BYTES
            && token.starts_with("eyJ")
            && token.matches('.').count() == 2
    }

    /// Answers a `TokenRequest` for the ServiceAccount `sa` (as stored) in `ns`: checks the
    /// request, signs the token, returns the `TokenRequest` with its `status`.
    pub fn request(
        &self,
        store: &Store,
        ns: &str,
        sa: &Value,
        mut req: Value,
    ) -> Result<Value, ApiError> {
        let name = sa["metadata"]["name"].as_str().unwrap_or_default();
        let sa_uid = sa["metadata"]["uid"].as_str().unwrap_or_default();
        let invalid =
            |c: Cause| ApiError::invalid("TokenRequest", "authentication.k8s.io", name, c);
        if !req.is_object() {
            return Err(ApiError::bad_request(
                "a TokenRequest must be a JSON object",
            ));
        }
        let spec = req["spec"].clone();
        let seconds = match &spec["expirationSeconds"] {
            Value::Null => DEFAULT_EXPIRATION_SECONDS,
            v => v.as_i64().ok_or_else(|| {
                invalid(Cause::wrong_type("spec.expirationSeconds", v, "integer"))
            })?,
        };
        if seconds < MIN_EXPIRATION_SECONDS {
            return Err(invalid(Cause::invalid(
                "spec.expirationSeconds",
                &json!(seconds),
                "may not specify a duration less than 10 minutes",
            )));
        }
        let seconds = seconds.min(MAX_EXPIRATION_SECONDS);
        let audiences: Vec<String> = match &spec["audiences"] {
            Value::Null => vec![API_AUDIENCE.into()],
            Value::Array(a) if a.is_empty() => vec![API_AUDIENCE.into()],
            Value::Array(a) if a.len() <= 16 => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .filter(|s| !s.is_empty() && s.len() <= 256)
                        .map(String::from)
                        .ok_or_else(|| {
                            invalid(Cause::invalid(
                                "spec.audiences",
                                v,
                                "must be non-empty strings of at most 256 characters",
                            ))
                        })
                })
                .collect::<Result<_, _>>()?,
            v => {
                return Err(invalid(Cause::invalid(
                    "spec.audiences",
                    v,
                    "must be a list of at most 16 strings",
                )));
            }
        };
        let pod = match &spec["boundObjectRef"] {
            Value::Null => None,
            r => {
                let kind = r["kind"].as_str().unwrap_or_default();
                if kind != "Pod" {
                    return Err(invalid(Cause::not_supported(
                        "spec.boundObjectRef.kind",
                        &json!(kind),
                        &[json!("Pod")],
                    )));
                }
                let pod_name = r["name"].as_str().unwrap_or_default();
                let pod = store
                    .get("/pods", ns, pod_name)
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| ApiError::NotFound {
                        resource: "pods".into(),
                        name: pod_name.into(),
                    })?;
                let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
                if let Some(want) = r["uid"].as_str().filter(|u| !u.is_empty())
                    && want != uid
                {
                    return Err(ApiError::Conflict {
                        resource: "pods".into(),
                        name: pod_name.into(),
                        message: format!(
                            "the UID in the bound object reference ({want}) does not match the UID in record ({uid}); the object might have been deleted and then recreated"
                        ),
                        causes: Vec::new(),
                    });
                }
                Some(Ref {
                    name: pod_name.into(),
                    uid: uid.into(),
                })
            }
        };
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            iss: API_AUDIENCE.into(),
            sub: format!("system:serviceaccount:{ns}:{name}"),
            aud: audiences.clone(),
            exp: now + seconds,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            kubernetes: KubernetesClaims {
                namespace: ns.into(),
                serviceaccount: Ref {
                    name: name.into(),
                    uid: sa_uid.into(),
                },
                pod: pod.clone(),
            },
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(ApiError::internal)?;
        let expires = chrono::DateTime::from_timestamp(claims.exp, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        req["apiVersion"] = json!("authentication.k8s.io/v1");
        req["kind"] = json!("TokenRequest");
        req["metadata"] = json!({"name": name, "namespace": ns,
            "creationTimestamp": chrono::DateTime::from_timestamp(now, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
        req["spec"] = json!({"audiences": audiences, "expirationSeconds": seconds,
            "boundObjectRef": pod.map(|p| json!({"kind": "Pod", "apiVersion": "v1", "name": p.name, "uid": p.uid}))});
        req["status"] = json!({"token": token, "expirationTimestamp": expires});
        tracing::info!(
            namespace = ns,
            serviceaccount = name,
            seconds,
            "ServiceAccount token issued"
        );
        Ok(req)
    }

    /// Who a token is: its signature, issuer, audience and lifetime checked, then its
    /// ServiceAccount (and Pod, when bound) looked up by UID. `Err` says why not (logged, never
    /// told to the client, which gets a bare 401 as from kube-apiserver).
    pub fn authenticate(&self, store: &Store, token: &str) -> Result<Identity, String> {
        if let Some((id, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            && at.elapsed() < CACHE_TTL
        {
            // Only tokens with more than the TTL left are cached, so a hit is never expired.
            return Ok(id.clone());
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[API_AUDIENCE]);
        v.set_audience(&[API_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(|e| format!("invalid ServiceAccount token: {e}"))?
            .claims;
        let k = &claims.kubernetes;
        let ns = k.namespace.as_str();
        let sa = &k.serviceaccount;
        if claims.sub != format!("system:serviceaccount:{ns}:{}", sa.name) {
            return Err("ServiceAccount token: subject and claims disagree".into());
        }
        // The object's UID, unless it is gone or being deleted.
        let live_uid = |res: &str, name: &str| -> Result<Option<String>, String> {
            Ok(store
                .get(res, ns, name)
                .map_err(|e| e.to_string())?
                .filter(|o| o["metadata"]["deletionTimestamp"].is_null())
                .and_then(|o| o["metadata"]["uid"].as_str().map(String::from)))
        };
        if live_uid("/serviceaccounts", &sa.name)?.as_deref() != Some(sa.uid.as_str()) {
            return Err(format!(
                "ServiceAccount {ns}/{} (uid {}) no longer exists",
                sa.name, sa.uid
            ));
        }
        if let Some(pod) = &k.pod
            && live_uid("/pods", &pod.name)?.as_deref() != Some(pod.uid.as_str())
        {
            return Err(format!(
                "the Pod {ns}/{} (uid {}) the token is bound to no longer exists",
                pod.name, pod.uid
            ));
        }
        let id = Identity {
            user: claims.sub.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
            ],
        };
        let remaining = claims.exp - chrono::Utc::now().timestamp();
        if remaining > CACHE_TTL.as_secs() as i64 {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(token.to_string(), (id.clone(), Instant::now()));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, Durability, StoreConfig, StoreError};

    fn store(dir: &Path) -> Store {
        Store::open(&StoreConfig::by_count(
            dir.join("db.sqlite"),
            100,
            Durability::Normal,
        ))
        .unwrap()
    }

    fn put(store: &Store, res: &str, ns: &str, name: &str, uid: &str) {
        let obj = json!({"metadata": {"name": name, "namespace": ns, "uid": uid}});
        store
            .modify::<StoreError>(res, ns, name, |_, _| Ok(Change::Put(obj.clone())))
            .unwrap();
    }

    fn del(store: &Store, res: &str, ns: &str, name: &str) {
        store
            .modify::<StoreError>(res, ns, name, |_, _| Ok(Change::Delete))
            .unwrap();
    }

    fn token(t: &ServiceAccountTokens, store: &Store, req: Value) -> Result<String, ApiError> {
        let sa = store
            .get("/serviceaccounts", "team", "ctl")
            .unwrap()
            .unwrap();
        let r = t.request(store, "team", &sa, req)?;
        Ok(r["status"]["token"].as_str().unwrap().to_string())
    }

    #[test]
    fn issued_tokens_authenticate_until_their_object_goes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let t = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        put(&s, "/serviceaccounts", "team", "ctl", "u1");
        put(&s, "/pods", "team", "p", "pu1");
        let plain = token(&t, &s, json!({"spec": {}})).unwrap();
        assert!(ServiceAccountTokens::is_jwt(&plain));
        let id = t.authenticate(&s, &plain).unwrap();
        assert_eq!(id.user, "system:serviceaccount:team:ctl");
        assert_eq!(
            id.groups,
            vec!["system:serviceaccounts", "system:serviceaccounts:team"]
        );
        let bound = token(
            &t,
            &s,
            json!({"spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}}),
        )
        .unwrap();
        assert!(t.authenticate(&s, &bound).is_ok());

        // The key survives a restart: tokens stay valid.
        let again = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        assert!(again.authenticate(&s, &plain).is_ok());

        // The Pod is deleted: its bound token stops working, the plain one does not.
        del(&s, "/pods", "team", "p");
        let fresh = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        let e = fresh.authenticate(&s, &bound).unwrap_err();
        assert!(e.contains("Pod team/p"), "{e}");
        assert!(fresh.authenticate(&s, &plain).is_ok());
        // The ServiceAccount is re-created (new UID): old tokens are dead.
        put(&s, "/serviceaccounts", "team", "ctl", "u2");
        let fresh = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        let e = fresh.authenticate(&s, &plain).unwrap_err();
        assert!(e.contains("no longer exists"), "{e}");
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let t = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        put(&s, "/serviceaccounts", "team", "ctl", "u1");
        let good = token(&t, &s, json!({})).unwrap();

        // Another server's key signs the same claims: refused.
        let other = ServiceAccountTokens::load_or_create(&dir.path().join("other.key")).unwrap();
        let sa = s.get("/serviceaccounts", "team", "ctl").unwrap().unwrap();
        let foreign = other.request(&s, "team", &sa, json!({})).unwrap()["status"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(t.authenticate(&s, &foreign).is_err());

        // Claims edited after signing (another user): the signature no longer matches.
        let parts: Vec<&str> = good.split('.').collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = json!("system:serviceaccount:kube-system:admin");
        claims["kubernetes.io"]["namespace"] = json!("kube-system");
        let edited = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert!(t.authenticate(&s, &edited).is_err());
        // `alg: none`.
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(t.authenticate(&s, &none).is_err());

        // Expired a minute ago, signed by the right key.
        let now = chrono::Utc::now().timestamp();
        let old = Claims {
            iss: API_AUDIENCE.into(),
            sub: "system:serviceaccount:team:ctl".into(),
            aud: vec![API_AUDIENCE.into()],
            exp: now - 60,
            iat: now - 3600,
            nbf: now - 3600,
            jti: "x".into(),
            kubernetes: KubernetesClaims {
                namespace: "team".into(),
                serviceaccount: Ref {
                    name: "ctl".into(),
                    uid: "u1".into(),
                },
                pod: None,
            },
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &old, &t.encoding).unwrap();
        let e = t.authenticate(&s, &expired).unwrap_err();
        assert!(e.contains("xpired"), "{e}");

        // A token for another audience is not a credential for this server.
        let vault = token(&t, &s, json!({"spec": {"audiences": ["vault"]}})).unwrap();
        assert!(t.authenticate(&s, &vault).is_err());
    }

    #[test]
    fn token_requests_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let t = ServiceAccountTokens::load_or_create(&dir.path().join("sa.key")).unwrap();
        put(&s, "/serviceaccounts", "team", "ctl", "u1");
        let msg = |req: Value| token(&t, &s, req).unwrap_err().to_string();
        assert!(
            msg(json!({"spec": {"expirationSeconds": 60}}))
                .contains("may not specify a duration less than 10 minutes")
        );
        assert!(msg(json!({"spec": {"expirationSeconds": "x"}})).contains("integer"));
        assert!(
            msg(json!({"spec": {"boundObjectRef": {"kind": "Secret", "name": "s"}}}))
                .contains("Pod")
        );
        assert!(
            msg(json!({"spec": {"boundObjectRef": {"kind": "Pod", "name": "nope"}}}))
                .contains("\"nope\" not found")
        );
        assert!(msg(json!({"spec": {"audiences": [""]}})).contains("spec.audiences"));
        assert!(msg(json!([1])).contains("JSON object"));
        // Longer than the maximum: cut to it.
        let sa = s.get("/serviceaccounts", "team", "ctl").unwrap().unwrap();
        let r = t
            .request(
                &s,
                "team",
                &sa,
                json!({"spec": {"expirationSeconds": 10_000_000}}),
            )
            .unwrap();
        assert_eq!(r["spec"]["expirationSeconds"], MAX_EXPIRATION_SECONDS);
        // A key file that is not a P-256 key is refused by name.
        std::fs::write(dir.path().join("bad.key"), "garbage").unwrap();
        let e = ServiceAccountTokens::load_or_create(&dir.path().join("bad.key")).unwrap_err();
        assert!(e.to_string().contains("bad.key"), "{e}");
    }
}
