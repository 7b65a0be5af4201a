//! Request bodies: read within the size limit (the rest drained), nesting bounded before any
//! parse, JSON or YAML by content type, large ones parsed off the runtime.

use super::*;

/// Most bytes of an over-size body read and thrown away, so that the client gets to read the 413
/// instead of a reset connection; past this the connection is dropped.
pub(super) const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

pub(super) async fn drain(mut body: Body) {
    use http_body_util::BodyExt;
    let mut seen = 0usize;
    while seen < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(f)) => seen += f.data_ref().map_or(0, |d| d.len()),
            Some(Err(_)) | None => break,
        }
    }
}

/// Reads a body of at most `max` bytes without buffering more than that.
pub(super) async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> ApiResult<Bytes> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared
        && len > max
    {
        drain(body).await;
        return Err(ApiError::TooLarge {
            size: len,
            limit: max,
        });
    }
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > max {
                let size = buf.len() + d.len();
                drain(body).await;
                return Err(ApiError::TooLarge { size, limit: max });
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(buf.freeze())
}

/// A body that may be absent (DELETE's `DeleteOptions`).
pub(super) async fn optional_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> ApiResult<Option<Value>> {
    let bytes = read_body(headers, body, max).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        parse(headers, bytes).await.map(Some)
    }
}

pub(super) fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase()
}

/// Deepest nesting a request body may have. kube-apiserver's decoders stop at 10,000 levels;
/// no Kubernetes object needs a tenth of this, and the check runs before any parser sees the
/// bytes (a YAML body nested 100,000 deep took the parser 25 s).
pub const MAX_DEPTH: usize = 100;

/// The deepest nesting in a JSON or YAML text, approximated without parsing: flow brackets
/// (`[`, `{`) outside quoted strings and comments, plus block sequence dashes and indentation
/// within a line. Over-counts rather than under-counts.
pub fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut flow, mut max) = (0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    let mut line_start = true;
    let mut i = 0;
    // A quote or a comment starts only after a separator (YAML's rule; JSON agrees): the `'`
    // in `it's` is part of a plain scalar, not a string that could hide what follows.
    let after_separator = |i: usize| {
        i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'\n' | b'\r' | b':' | b',' | b'[' | b'{'
            )
    };
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' && q == b'"' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if line_start {
            // Indentation (two columns a level) and `- ` / `? ` markers, each a block level.
            let (mut spaces, mut markers) = (0usize, 0usize);
            while i < bytes.len() {
                match bytes[i] {
                    b' ' | b'\t' => spaces += 1,
                    b'-' | b'?' if matches!(bytes.get(i + 1), None | Some(b' ' | b'\n')) => {
                        markers += 1
                    }
                    _ => break,
                }
                i += 1;
            }
            max = max.max(flow + spaces / 2 + markers);
            line_start = false;
            continue;
        }
        match b {
            b'"' | b'\'' if after_separator(i) => quote = Some(b),
            b'#' if after_separator(i) => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                flow += 1;
                max = max.max(flow);
            }
            b']' | b'}' => flow = flow.saturating_sub(1),
            b'\n' => line_start = true,
            _ => {}
        }
        i += 1;
    }
    max
}

/// Parses a body off the async runtime's worker threads (a large body is CPU work that must
/// not stall watches, health checks or the hub), after the depth check.
pub(super) async fn parse(headers: &HeaderMap, bytes: Bytes) -> ApiResult<Value> {
    let headers = headers.clone();
    decode(bytes, move |b| parse_body(&headers, b)).await
}

/// Runs `f` on `bytes`: on the runtime for a small body (it decodes in microseconds, a thread
/// hop would cost more), on the blocking pool for a large one.
pub(super) async fn decode<T: Send + 'static>(
    bytes: Bytes,
    f: impl FnOnce(&[u8]) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    if bytes.len() <= INLINE_PARSE_BYTES {
        return f(&bytes);
    }
    blocking(move || f(&bytes)).await
}

/// Bodies up to this size are parsed on the runtime (after the depth check, which bounds the
/// work); larger ones on the blocking pool.
pub(super) const INLINE_PARSE_BYTES: usize = 64 * 1024;

pub(super) fn check_depth(bytes: &[u8]) -> ApiResult<()> {
    let depth = nesting_depth(bytes);
    if depth > MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "the request body is nested {depth} levels deep; at most {MAX_DEPTH} are accepted"
        )));
    }
    Ok(())
}

pub(super) fn parse_body(headers: &HeaderMap, bytes: &[u8]) -> ApiResult<Value> {
    let ct = content_type(headers);
    if !ct.contains("protobuf") {
        check_depth(bytes)?;
    }
    if ct.contains("protobuf") {
        return crate::protobuf::to_json(bytes).map_err(|e| match e {
            crate::protobuf::ProtoError::Malformed(_) => ApiError::BadRequest(e.to_string()),
            crate::protobuf::ProtoError::Unsupported(m) => ApiError::UnsupportedMediaType(m),
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice::<Value>(bytes)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
    } else {
        serde_json::from_slice::<Value>(bytes)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }
}
