//! Authentication: static bearer tokens (kube-apiserver's `--token-auth-file` CSV format) and
//! client certificates signed by the cluster CA (CN = user, O = groups). Anonymous requests are
//! refused except for `/version`, `/healthz`, `/livez` and `/readyz`.
//!
//! Every authenticated identity is also in `system:authenticated`, as in Kubernetes; what it
//! may do is decided by [`crate::authz`].

use std::collections::HashMap;
use std::path::Path;

use axum::http::HeaderMap;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// User name.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// The identity proven by the TLS client certificate of the connection, if any.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity(pub Option<Identity>);

/// Paths anyone may read.
pub fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/version" | "/healthz" | "/livez" | "/readyz" | "/version/"
    )
}

/// Token-file failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read or written.
    #[error("token file {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("token file {path} line {line}: {why}")]
    Line {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Bearer tokens.
#[derive(Debug, Default, Clone)]
pub struct Authenticator {
    tokens: HashMap<String, Identity>,
}

impl Authenticator {
    /// Parses `token,user,uid,"group1,group2"` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str, path: &str) -> Result<Self, AuthError> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, groups) = match line.split_once(",\"") {
                Some((h, g)) => (h, g.trim_end_matches('"')),
                None => (line, ""),
            };
            let fields: Vec<&str> = head.split(',').collect();
            if fields.len() < 2 || fields[0].is_empty() || fields[1].is_empty() {
                return Err(AuthError::Line {
                    path: path.into(),
                    line: i + 1,
                    why: "expected token,user,uid[,\"group1,group2\"]".into(),
                });
            }
            let groups = groups
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect();
            tokens.insert(
                fields[0].to_string(),
                Identity {
                    user: fields[1].to_string(),
                    groups,
                },
            );
        }
        Ok(Authenticator { tokens })
    }

    /// Loads a token file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Adds a token.
    pub fn insert(&mut self, token: String, id: Identity) {
        self.tokens.insert(token, id);
    }

    /// Whether `token` is one of the static tokens.
    pub fn knows(&self, token: &str) -> bool {
        self.tokens.contains_key(token)
    }

    /// Authenticates a request. `Err(())` means credentials were presented but are wrong.
    #[allow(clippy::result_unit_err)]
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: &PeerIdentity,
    ) -> Result<Option<Identity>, ()> {
        if let Some(token) = bearer(headers)? {
            return self
                .tokens
                .get(&token)
                .cloned()
                .map(|id| Some(authenticated(id)))
                .ok_or(());
        }
        Ok(peer.0.clone().map(authenticated))
    }
}

/// The bearer token of a request: none without an `Authorization` header, `Err` for one that is
/// not `Bearer <token>`.
#[allow(clippy::result_unit_err)]
pub fn bearer(headers: &HeaderMap) -> Result<Option<String>, ()> {
    let Some(h) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = h.to_str().map_err(|_| ())?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(|t| Some(t.trim().to_string()))
        .ok_or(())
}

/// The identity with `system:authenticated` added, as every authenticated caller has it.
pub fn authenticated(mut id: Identity) -> Identity {
    if !id.groups.iter().any(|g| g == crate::authz::AUTHENTICATED) {
        id.groups.push(crate::authz::AUTHENTICATED.into());
    }
    id
}

/// A fresh random token (32 bytes, hex).
pub fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_and_headers() {
        let a = Authenticator::parse(
            "# admin\nabc,admin,1,\"system:masters,dev\"\nxyz,bob,2\n",
            "t.csv",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        let id = a
            .authenticate(&h, &PeerIdentity::default())
            .unwrap()
            .unwrap();
        assert_eq!(id.user, "admin");
        assert_eq!(
            id.groups,
            vec!["system:masters", "dev", "system:authenticated"]
        );
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(a.authenticate(&h, &PeerIdentity::default()).is_err());
        let peer = PeerIdentity(Some(Identity {
            user: "cert".into(),
            groups: vec![],
        }));
        assert_eq!(
            a.authenticate(&HeaderMap::new(), &peer)
                .unwrap()
                .unwrap()
                .user,
            "cert"
        );
        assert!(
            a.authenticate(&HeaderMap::new(), &PeerIdentity::default())
                .unwrap()
                .is_none()
        );
        let e = Authenticator::parse("onlytoken\n", "t.csv").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
