//! `list`: paging with continue tokens, field and label selectors, resourceVersion semantics,
//! and the list body.

use super::*;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ContinueToken {
    rv: i64,
    ns: String,
    name: String,
}

pub(super) fn decode_continue(token: &str) -> ApiResult<ContinueToken> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

pub(super) fn encode_continue(t: &ContinueToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(t).unwrap_or_default())
}

/// Parses a resourceVersion parameter.
pub fn parse_rv(s: &str) -> ApiResult<i64> {
    s.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::Invalid {
            kind: String::new(),
            group: String::new(),
            name: String::new(),
            causes: vec![Cause::invalid(
                "resourceVersion",
                &json!(s),
                "must be a non-negative integer",
            )],
        })
}

/// Objects of a list, plus the list's resourceVersion and continue token.
#[derive(Debug)]
pub struct Listed {
    /// Matching objects, presented for the requested version.
    pub items: Vec<Value>,
    /// The revision the list reflects.
    pub rev: i64,
    /// Token for the next page.
    pub continue_token: Option<String>,
}

/// Lists objects (one namespace or all), with selectors, pagination and resourceVersion semantics.
pub fn list(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    opts: &ListOpts,
) -> ApiResult<Listed> {
    let ns = if rt.namespaced {
        ns.filter(|n| !n.is_empty())
    } else {
        None
    };
    let (mut at, mut cursor) = (None, None);
    if let Some(token) = opts.continue_token.as_deref().filter(|t| !t.is_empty()) {
        let t = decode_continue(token)?;
        if t.rv < core.store.compacted_rev() {
            return Err(ApiError::Expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            ));
        }
        at = Some(t.rv);
        cursor = Some((t.ns, t.name));
    } else if let Some(rv) = opts.resource_version.as_deref().filter(|r| !r.is_empty()) {
        let rv = parse_rv(rv)?;
        match opts.resource_version_match.as_deref() {
            Some("Exact") => at = Some(rv),
            None | Some("") | Some("NotOlderThan") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "resourceVersionMatch: unsupported value {other:?}; use Exact or NotOlderThan"
                )));
            }
        }
    }
    let limit = opts.limit.filter(|l| *l > 0);
    let mut items = Vec::new();
    let mut rev = at;
    let mut continue_token = None;
    loop {
        let want = limit.map(|l| l - items.len());
        let after = cursor
            .as_ref()
            .map(|(n, m): &(String, String)| (n.as_str(), m.as_str()));
        let page = core.store.list(&rt.storage_key(), ns, after, want, rev)?;
        rev = Some(page.rev);
        let last = page.items.last().map(|o| {
            (
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        items.extend(
            page.items
                .into_iter()
                .filter(|o| opts.matches(o))
                .map(|o| present(rt, version, o)),
        );
        match (page.more, last) {
            (true, Some(last)) => {
                if limit.is_some_and(|l| items.len() >= l) {
                    continue_token = Some(encode_continue(&ContinueToken {
                        rv: page.rev,
                        ns: last.0,
                        name: last.1,
                    }));
                    break;
                }
                cursor = Some(last);
            }
            _ => break,
        }
    }
    Ok(Listed {
        items,
        rev: rev.unwrap_or(0),
        continue_token,
    })
}

/// `metadata` of a list: its resourceVersion and, if there is more, the continue token.
pub fn list_meta(listed: &Listed) -> Value {
    let mut meta = json!({"resourceVersion": listed.rev.to_string()});
    if let Some(c) = &listed.continue_token {
        meta["continue"] = json!(c);
    }
    meta
}

/// Renders a list response body; the items move into it ([`super::object`]).
pub fn list_body(rt: &ResourceType, version: &str, listed: Listed) -> Value {
    let metadata = list_meta(&listed);
    object([
        ("kind", json!(format!("{}List", rt.kind))),
        ("apiVersion", json!(rt.api_version(version))),
        ("metadata", metadata),
        ("items", Value::Array(listed.items)),
    ])
}
