//! Where a model named by `MODEL_URL` is on this machine.
//!
//! - A path: used as is. Under Sedge's process runtime a path inside the pod (Sedna mounts a
//!   local model's directory at `/home/data<dir>`) is found under `$SEDGE_ROOT`, the container's
//!   root.
//! - `file://<path>`: the same path.
//! - `http://` or `https://`: downloaded with its `.json` description beside it (when the server
//!   has one; a 404 leaves the model to describe itself) into the cache
//!   (`$SEDGE_MODEL_CACHE`, default `~/.cache/sedge/models`), keyed by the URL. The SHA-256 of the
//!   model is recorded next to it; a cached copy whose content no longer matches is fetched again,
//!   and with `MODEL_SHA256` set a download that does not match is refused. Downloads stream to
//!   disk and stop at `SEDGE_MODEL_MAX_BYTES` (default 512 MiB; the description at 1 MiB), and at
//!   most three redirects are followed.

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

/// An HTTP(S) client (rustls with ring; system roots; at most three redirects).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
}

/// Largest model downloaded, unless `SEDGE_MODEL_MAX_BYTES` says otherwise.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;
/// Largest model description (`.json`) downloaded.
const MAX_DESCRIPTION_BYTES: u64 = 1024 * 1024;

fn max_model_bytes() -> Result<u64, FetchError> {
    match crate::config::env("SEDGE_MODEL_MAX_BYTES") {
        None => Ok(DEFAULT_MAX_MODEL_BYTES),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| FetchError::Download {
                url: String::new(),
                why: format!("SEDGE_MODEL_MAX_BYTES={v:?} is not a positive number of bytes"),
            }),
    }
}

/// Downloads `url` into [`part_of`]`(dest)`, at most `cap` bytes, never holding more than one
/// chunk in memory; returns the SHA-256 of what was written. The caller renames it into place.
async fn download(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    cap: u64,
) -> Result<String, FetchError> {
    use std::io::Write;
    let err = |why: String| FetchError::Download {
        url: url.into(),
        why,
    };
    let mut r = client
        .get(url)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !r.status().is_success() {
        return Err(err(format!("HTTP {}", r.status())));
    }
    if let Some(len) = r.content_length()
        && len > cap
    {
        return Err(err(format!(
            "the server says it is {len} bytes, more than the {cap} allowed (SEDGE_MODEL_MAX_BYTES)"
        )));
    }
    let tmp = part_of(dest);
    let cache_err = |source| FetchError::Cache {
        path: tmp.display().to_string(),
        source,
    };
    let mut out = std::fs::File::create(&tmp).map_err(cache_err)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut written = 0u64;
    let result = async {
        while let Some(chunk) = r.chunk().await.map_err(|e| err(e.to_string()))? {
            written += chunk.len() as u64;
            if written > cap {
                return Err(err(format!(
                    "more than the {cap} bytes allowed (SEDGE_MODEL_MAX_BYTES); download stopped"
                )));
            }
            hash.update(&chunk);
            out.write_all(&chunk).map_err(cache_err)?;
        }
        out.sync_all().map_err(cache_err)?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(hash
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Where a download of `dest` is written until it is complete and checked.
fn part_of(dest: &Path) -> PathBuf {
    let mut p = dest.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// The cache file name for a URL's last segment: kept when it is a plain file name.
fn cache_name(url: &str) -> String {
    let last = url
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .rsplit('/')
        .next();
    match last {
        Some(n)
            if !n.is_empty()
                && n != "."
                && n != ".."
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
        {
            n.to_string()
        }
        _ => "model.onnx".into(),
    }
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
    resolve_capped(url, want_sha256, cache, max_model_bytes()?).await
}

/// Like [`resolve_in`], downloading at most `cap` bytes of model.
pub async fn resolve_capped(
    url: &str,
    want_sha256: Option<&str>,
    cache: &Path,
    cap: u64,
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
    let name = cache_name(url);
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
    let cache_err = |path: &Path, source| FetchError::Cache {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| cache_err(&dir, e))?;
    let got = download(&client, url, &file, cap).await?;
    if let Some(w) = &want
        && *w != got
    {
        let _ = std::fs::remove_file(part_of(&file));
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
    // None there (404): the model describes itself (see `model::config_from_onnx`).
    let json_file = file.with_extension("json");
    let described = match download(&client, &json_url, &json_file, MAX_DESCRIPTION_BYTES).await {
        Ok(_) => true,
        Err(FetchError::Download { why, .. }) if why.starts_with("HTTP 404") => {
            let _ = std::fs::remove_file(part_of(&json_file));
            let _ = std::fs::remove_file(&json_file);
            false
        }
        Err(e) => {
            let _ = std::fs::remove_file(part_of(&file));
            return Err(e);
        }
    };
    let placed: &[&PathBuf] = if described {
        &[&json_file, &file]
    } else {
        &[&file]
    };
    for path in placed {
        std::fs::rename(part_of(path), path).map_err(|e| cache_err(path, e))?;
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
                let body: &[u8] =
                    if req.starts_with("GET /m.onnx ") || req.starts_with("GET /bare.onnx ") {
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
        // A model served without a description: fetched alone (it describes itself).
        let f = resolve_in(
            &format!("http://127.0.0.1:{port}/bare.onnx"),
            None,
            other.path(),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"model-bytes");
        assert!(!f.with_extension("json").exists());
        let e = resolve_in("s3://b/m.onnx", None, other.path())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
    }

    #[tokio::test]
    async fn a_model_over_the_cap_is_not_downloaded_whole() {
        static BIG: [u8; 5000] = [7u8; 5000];
        let (port, _) = serve(&BIG);
        let cache = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{port}/m.onnx");
        let e = resolve_capped(&url, None, cache.path(), 1000)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than the 1000"), "{e}");
        // Nothing is left in the cache, not even a partial file.
        let left: Vec<_> = walk(cache.path());
        assert!(left.is_empty(), "{left:?}");
        resolve_capped(&url, None, cache.path(), 5000)
            .await
            .unwrap();
    }

    fn walk(d: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn cache_names_are_plain_file_names() {
        assert_eq!(cache_name("http://h/models/edge.onnx?sig=1"), "edge.onnx");
        for bad in [
            "http://h/..",
            "http://h/",
            "http://h/a%2F..%2Fb",
            "http://h/x y",
        ] {
            assert_eq!(cache_name(bad), "model.onnx", "{bad}");
        }
    }
}
