//! API errors, rendered as Kubernetes `Status` objects.
//!
//! Every failure a client can see goes through [`ApiError`], so the HTTP code, the `reason` and the
//! `details` that `kubectl` and `kube` switch on are decided in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One field-level problem inside a `422 Invalid` error.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// Kubernetes cause type, e.g. `FieldValueInvalid`, `FieldValueRequired`.
    pub reason: &'static str,
    /// Field path such as `metadata.name` or `spec.replicas`.
    pub field: String,
    /// Human-readable explanation, without the field path.
    pub message: String,
}

impl Cause {
    /// A `FieldValueInvalid` cause.
    pub fn invalid(field: impl Into<String>, value: &Value, why: impl AsRef<str>) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {}: {}", short_value(value), why.as_ref()),
        }
    }

    /// A `FieldValueRequired` cause.
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        }
    }

    /// A `FieldValueNotSupported` cause listing the accepted values.
    pub fn not_supported(field: impl Into<String>, value: &Value, allowed: &[Value]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(short_value).collect();
        Self {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                short_value(value),
                allowed.join(", ")
            ),
        }
    }

    /// A `FieldValueTypeInvalid`-style cause (Kubernetes reports it as `FieldValueTypeInvalid`).
    pub fn wrong_type(field: impl Into<String>, value: &Value, expected: &str) -> Self {
        Self {
            reason: "FieldValueTypeInvalid",
            field: field.into(),
            message: format!(
                "Invalid value: {}: must be of type {expected}",
                short_value(value)
            ),
        }
    }

    /// A `FieldValueForbidden` cause.
    pub fn forbidden(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {}", why.into()),
        }
    }
}

fn short_value(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "object".to_string(),
        Value::Array(_) => "array".to_string(),
        other => other.to_string(),
    };
    if s.len() > 80 {
        format!("{}...", &s[..s.floor_char_boundary(77)])
    } else {
        s
    }
}

/// A failed API request. Each variant maps to one Kubernetes `StatusReason`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 BadRequest: the body or a parameter could not be understood.
    #[error("{0}")]
    BadRequest(String),
    /// 401 Unauthorized: no valid credentials.
    #[error("Unauthorized")]
    Unauthorized,
    /// 403 Forbidden: understood, but not allowed (e.g. creating in a terminating namespace).
    #[error("{message}")]
    Forbidden {
        /// Qualified resource, e.g. `pods`.
        resource: String,
        /// Object name, may be empty.
        name: String,
        /// Why.
        message: String,
    },
    /// 404 NotFound.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Qualified resource, e.g. `deployments.apps`.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 404 for a URL that names no resource at all.
    #[error("the server could not find the requested resource")]
    NoRoute,
    /// 405 MethodNotAllowed: the resource exists but does not support the verb.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 406 NotAcceptable.
    #[error("{0}")]
    NotAcceptable(String),
    /// 409 AlreadyExists.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Qualified resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 409 Conflict: optimistic concurrency failure or an apply conflict.
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {message}")]
    Conflict {
        /// Qualified resource.
        resource: String,
        /// Object name.
        name: String,
        /// Why.
        message: String,
        /// Field-level causes (server-side apply conflicts).
        causes: Vec<Cause>,
    },
    /// 410 Expired: a resourceVersion or continue token older than the retained history.
    #[error("{0}")]
    Expired(String),
    /// 413 RequestEntityTooLarge.
    #[error("the request body is {size} bytes or more; the limit is {limit} bytes")]
    TooLarge {
        /// Bytes seen before giving up.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// 415 UnsupportedMediaType.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429 TooManyRequests: a per-user limit was reached.
    #[error("{0}")]
    TooManyRequests(String),
    /// 422 Invalid: the object failed validation.
    #[error("{kind} \"{name}\" is invalid: {}", render_causes(.causes))]
    Invalid {
        /// Kind, e.g. `Pod`.
        kind: String,
        /// Group of the kind, empty for core.
        group: String,
        /// Object name.
        name: String,
        /// What was wrong, field by field.
        causes: Vec<Cause>,
    },
    /// 500 InternalError: a bug or a storage failure; the store is left unchanged.
    #[error("Internal error occurred: {0}")]
    Internal(String),
    /// 503 ServiceUnavailable.
    #[error("{0}")]
    Unavailable(String),
}

fn render_causes(causes: &[Cause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| {
            if c.field.is_empty() {
                c.message.clone()
            } else {
                format!("{}: {}", c.field, c.message)
            }
        })
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

impl ApiError {
    /// Shorthand for [`ApiError::BadRequest`].
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }

    /// Shorthand for [`ApiError::Internal`].
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        ApiError::Internal(msg.to_string())
    }

    /// Shorthand for a 422 with one cause.
    pub fn invalid(kind: &str, group: &str, name: &str, cause: Cause) -> Self {
        ApiError::Invalid {
            kind: kind.into(),
            group: group.into(),
            name: name.into(),
            causes: vec![cause],
        }
    }

    /// HTTP status code.
    pub fn code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Expired(_) => StatusCode::GONE,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Kubernetes `StatusReason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden { .. } => "Forbidden",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::NotAcceptable(_) => "NotAcceptable",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Expired(_) => "Expired",
            ApiError::TooLarge { .. } => "RequestEntityTooLarge",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Internal(_) => "InternalError",
            ApiError::Unavailable(_) => "ServiceUnavailable",
        }
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut details = serde_json::Map::new();
        let (group, kind) = split_resource(self);
        match self {
            ApiError::NotFound { name, .. }
            | ApiError::AlreadyExists { name, .. }
            | ApiError::Forbidden { name, .. }
            | ApiError::Conflict { name, .. } => {
                details.insert("name".into(), json!(name));
                details.insert("group".into(), json!(group));
                details.insert("kind".into(), json!(kind));
            }
            ApiError::Invalid {
                kind, group, name, ..
            } => {
                details.insert("name".into(), json!(name));
                details.insert("group".into(), json!(group));
                details.insert("kind".into(), json!(kind));
            }
            _ => {}
        }
        let causes = match self {
            ApiError::Invalid { causes, .. } | ApiError::Conflict { causes, .. } => {
                causes.as_slice()
            }
            _ => &[],
        };
        if !causes.is_empty() {
            details.insert(
                "causes".into(),
                Value::Array(
                    causes
                        .iter()
                        .map(
                            |c| json!({"reason": c.reason, "message": c.message, "field": c.field}),
                        )
                        .collect(),
                ),
            );
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// Splits `deployments.apps` into (`apps`, `deployments`) for `Status.details`.
fn split_resource(e: &ApiError) -> (String, String) {
    let resource = match e {
        ApiError::NotFound { resource, .. }
        | ApiError::AlreadyExists { resource, .. }
        | ApiError::Forbidden { resource, .. }
        | ApiError::Conflict { resource, .. } => resource.as_str(),
        _ => "",
    };
    match resource.split_once('.') {
        Some((r, g)) => (g.to_string(), r.to_string()),
        None => (String::new(), resource.to_string()),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        (
            self.code(),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// Result alias for request handling.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_status_has_group_and_kind() {
        let s = ApiError::NotFound {
            resource: "deployments.apps".into(),
            name: "web".into(),
        }
        .status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["details"]["group"], "apps");
        assert_eq!(s["details"]["kind"], "deployments");
    }

    #[test]
    fn invalid_lists_causes() {
        let e = ApiError::Invalid {
            kind: "Pod".into(),
            group: String::new(),
            name: "Bad_Name".into(),
            causes: vec![Cause::invalid(
                "metadata.name",
                &json!("Bad_Name"),
                "must be lowercase",
            )],
        };
        let s = e.status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .contains("metadata.name: Invalid value: \"Bad_Name\"")
        );
    }
}
