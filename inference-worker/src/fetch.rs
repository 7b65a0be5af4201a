//! Where a model named by `MODEL_URL` is on this machine.
//!
//! - A path: used as is. Under Sedge's process runtime a path inside the pod (Sedna mounts a
//!   local model's directory at `/home/data<dir>`) is found under `$SEDGE_ROOT`, the container's
//!   root.
//! - `file://<path>`: the same path.
//! - `http://` or `https://`: downloaded with its `.json` description beside it into the cache
//!   (`$SEDGE_MODEL_CACHE`, default `~/.cache/sedge/models`), keyed by the URL. The SHA-256 of the
//!   model is recorded next to it; a cached copy whose content no longer matches is fetched again,
//!   and with `MODEL_SHA256` set a download that does not match is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a model could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL's scheme is not one we fetch.
    #[error("model URL {0:?}: unsupported scheme (use a path, file://, http:// or https://)")]
    Scheme(String),
    /// The download failed.
    #[error("downloading {url}: {why}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// The content is not what `MODEL_SHA256` says.
    #[error("model {url}: SHA-256 is {got}, but MODEL_SHA256 says {want}")]
    Checksum {
        /// The URL.
        url: String,
        /// Expected.
        want: String,
        /// Found.
        got: String,
    },
    /// The cache could not be written.
    #[error("model cache {path}: {source}")]
    Cache {
        /// Where.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An HTTP(S) client (rustls with ring; system roots).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(timeout).build()
}

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = crate::config::env("SEDGE_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".cache/sedge/models"),
        None => std::env::temp_dir().join("sedge-models"),
    }
}

/// A path as the worker sees it: as given, or under `$SEDGE_ROOT` when only that exists.
pub fn local_path(p: &str) -> PathBuf {
    let direct = PathBuf::from(p);
    if direct.exists() {
        return direct;
    }
    if let Some(root) = crate::config::env("SEDGE_ROOT") {
        let under = Path::new(&root).join(p.trim_start_matches('/'));
        if under.exists() {
            return under;
        }
    }
    direct
}

/// The local file for `url`, downloading it into [`cache_dir`] if needed. `want_sha256` pins
/// the content.
pub async fn resolve(url: &str, want_sha256: Option<&str>) -> Result<PathBuf, FetchError> {
    resolve_in(url, want_sha256, &cache_dir()).await
}

/// Like [`resolve`], with the cache in `cache`.
pub async fn resolve_in(
    url: &str,
    want_sha256: Option<&str>,
    cache: &Path,
) -> Result<PathBuf, FetchError> {
    let url = url.trim();
    if let Some(p) = url.strip_prefix("file://") {
        return Ok(local_path(p));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        if url.contains("://") {
            return Err(FetchError::Scheme(url.into()));
        }
        return Ok(local_path(url));
    }
    let name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("model.onnx")
        .to_string();
    let dir = cache.join(&sha256_hex(url.as_bytes())[..16]);
    let file = dir.join(&name);
    let sum_file = dir.join(format!("{name}.sha256"));
    let want = want_sha256.map(|s| s.trim().to_lowercase());
    // A cached copy is used only if its content still matches what was recorded (and pinned).
    if let (Ok(bytes), Ok(recorded)) = (std::fs::read(&file), std::fs::read_to_string(&sum_file)) {
        let got = sha256_hex(&bytes);
        if got == recorded.trim() && want.as_ref().is_none_or(|w| *w == got) {
            return Ok(file);
        }
        tracing::warn!(file = %file.display(), "cached model does not match its checksum; fetching it again");
    }
    let client = http_client(Duration::from_secs(120)).map_err(|e| FetchError::Download {
        url: url.into(),
        why: e.to_string(),
    })?;
    let get = async |u: &str| -> Result<Vec<u8>, FetchError> {
        let err = |why: String| FetchError::Download { url: u.into(), why };
        let r = client.get(u).send().await.map_err(|e| err(e.to_string()))?;
        if !r.status().is_success() {
            return Err(err(format!("HTTP {}", r.status())));
        }
        Ok(r.bytes().await.map_err(|e| err(e.to_string()))?.to_vec())
    };
    let model = get(url).await?;
    let got = sha256_hex(&model);
    if let Some(w) = &want
        && *w != got
    {
        return Err(FetchError::Checksum {
            url: url.into(),
            want: w.clone(),
            got,
        });
    }
    // The model's description (`<name>.json`, or `<stem>.json`) travels with it.
    let json_url = match url.rsplit_once('.') {
        Some((stem, ext)) if !ext.contains('/') => format!("{stem}.json"),
        _ => format!("{url}.json"),
    };
    let description = get(&json_url).await?;
    let cache_err = |path: &Path, source| FetchError::Cache {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| cache_err(&dir, e))?;
    let json_file = file.with_extension("json");
    for (path, bytes) in [(&json_file, &description), (&file, &model)] {
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, bytes).map_err(|e| cache_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| cache_err(path, e))?;
    }
    std::fs::write(&sum_file, &got).map_err(|e| cache_err(&sum_file, e))?;
    tracing::info!(%url, file = %file.display(), sha256 = %got, "model downloaded");
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Serves `/m.onnx` and `/m.json`; counts requests.
    fn serve(model: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                h.fetch_add(1, Ordering::SeqCst);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let body: &[u8] = if req.starts_with("GET /m.onnx ") {
                    model
                } else if req.starts_with("GET /m.json ") {
                    b"{}"
                } else {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(body);
            }
        });
        (port, hits)
    }

    #[tokio::test]
    async fn downloads_once_checks_the_sum_and_refetches_a_corrupt_copy() {
        let (port, hits) = serve(b"model-bytes");
        let cache = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{port}/m.onnx");
        let sum = sha256_hex(b"model-bytes");
        let f = resolve_in(&url, Some(&sum), cache.path()).await.unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"model-bytes");
        assert_eq!(std::fs::read(f.with_extension("json")).unwrap(), b"{}");
        assert_eq!(hits.load(Ordering::SeqCst), 2, "model and description");
        // Cached: no request.
        resolve_in(&url, Some(&sum), cache.path()).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Corrupted on disk: fetched again.
        std::fs::write(&f, b"bit rot").unwrap();
        resolve_in(&url, None, cache.path()).await.unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"model-bytes");
        assert_eq!(hits.load(Ordering::SeqCst), 4);
        // A pinned sum that does not match is refused, naming both sums.
        let other = tempfile::tempdir().unwrap();
        let e = resolve_in(&url, Some(&"0".repeat(64)), other.path())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains(&sum), "{e}");
        // Missing files and foreign schemes say what is wrong.
        let e = resolve_in(
            &format!("http://127.0.0.1:{port}/none.onnx"),
            None,
            other.path(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        let e = resolve_in("s3://b/m.onnx", None, other.path())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
    }
}
