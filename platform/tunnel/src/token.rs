//! Join tokens: `hex(sha256(CA certificate DER)) + "." + JWT`, as in kubeadm and KubeEdge.
//!
//! The first part lets a joining node pin the CA it fetches; the JWT (HS256, with `exp`) proves
//! the holder was given the token. Unlike KubeEdge, every token has an id (`jti`) recorded in the
//! hub database, so tokens can be listed, created with any TTL, and revoked; a token whose id is
//! not in the database is refused even if its signature and expiry are fine. The HMAC key is a
//! random 256-bit secret in `<pki_dir>/token.key` (mode 0600), not the CA key.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::TunnelError;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `<hash>.<jwt>`.
    #[error("the token is not `<ca-hash>.<jwt>` (get one with `sedge token create`)")]
    Malformed,
    /// The CA hash is not this hub's.
    #[error(
        "the token's CA hash {got} is not this hub's ({want}): it was made for another cloud, or altered"
    )]
    WrongCa {
        /// Hash in the token.
        got: String,
        /// This hub's hash.
        want: String,
    },
    /// Bad signature or claims.
    #[error("the token's signature is invalid ({0})")]
    BadSignature(String),
    /// Past `exp`.
    #[error(
        "token {id} expired at {expired} (Unix seconds); create a new one with `sedge token create`"
    )]
    Expired {
        /// Token id.
        id: String,
        /// Expiry.
        expired: i64,
    },
    /// Revoked or never issued here.
    #[error("token {0} has been revoked or was never issued by this hub")]
    Revoked(String),
}

/// What `sedge token list` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    /// Token id (the JWT `jti`).
    pub id: String,
    /// Free text given at creation.
    pub description: String,
    /// Creation time, Unix seconds.
    pub created: i64,
    /// Expiry, Unix seconds.
    pub expires: i64,
    /// Successful joins with this token.
    pub uses: i64,
    /// The last node that joined with it.
    pub last_node: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    jti: String,
    iat: i64,
    exp: i64,
    sub: String,
}

/// The token store.
pub struct TokenStore {
    db: Mutex<Connection>,
    secret: Vec<u8>,
    ca_hash: String,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

fn db_err(e: rusqlite::Error) -> TunnelError {
    TunnelError::Store(e.to_string())
}

impl TokenStore {
    /// Opens (creating) the store in `db_path`, with the signing key in `pki_dir`.
    pub fn open(db_path: &Path, pki_dir: &Path, ca_hash: &str) -> Result<TokenStore, TunnelError> {
        let key_path = pki_dir.join("token.key");
        let secret = match std::fs::read_to_string(&key_path) {
            Ok(hex) => decode_hex(hex.trim()).ok_or_else(|| {
                TunnelError::Config(format!("{}: not a hex key", key_path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::Rng::fill(&mut rand::rng(), &mut key[..]);
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                sedge_pki::write_file(&key_path, &hex, true)?;
                key.to_vec()
            }
            Err(e) => {
                return Err(TunnelError::Config(format!("{}: {e}", key_path.display())));
            }
        };
        let db = Connection::open(db_path).map_err(db_err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS tokens (
               id TEXT PRIMARY KEY, description TEXT NOT NULL, created INTEGER NOT NULL,
               expires INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0,
               last_node TEXT NOT NULL DEFAULT '');",
        )
        .map_err(db_err)?;
        Ok(TokenStore {
            db: Mutex::new(db),
            secret,
            ca_hash: ca_hash.into(),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a token valid for `ttl`; returns the token text and its record.
    pub fn create(
        &self,
        ttl: Duration,
        description: &str,
    ) -> Result<(String, TokenInfo), TunnelError> {
        if ttl.is_zero() {
            return Err(TunnelError::Config("a token TTL must be above zero".into()));
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let created = crate::session::unix_secs();
        let expires = created.saturating_add(ttl.as_secs().min(i64::MAX as u64) as i64);
        let claims = Claims {
            jti: id.clone(),
            iat: created,
            exp: expires,
            sub: "sedge-join".into(),
        };
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .map_err(|e| TunnelError::Config(format!("signing a token: {e}")))?;
        self.db()
            .execute(
                "INSERT INTO tokens (id, description, created, expires) VALUES (?1, ?2, ?3, ?4)",
                params![id, description, created, expires],
            )
            .map_err(db_err)?;
        let info = TokenInfo {
            id,
            description: description.into(),
            created,
            expires,
            uses: 0,
            last_node: String::new(),
        };
        Ok((format!("{}.{jwt}", self.ca_hash), info))
    }

    /// All tokens that are not revoked (expired ones included, marked by `expires`).
    pub fn list(&self) -> Result<Vec<TokenInfo>, TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT id, description, created, expires, uses, last_node FROM tokens ORDER BY created, id")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(TokenInfo {
                    id: r.get(0)?,
                    description: r.get(1)?,
                    created: r.get(2)?,
                    expires: r.get(3)?,
                    uses: r.get(4)?,
                    last_node: r.get(5)?,
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Revokes a token by id (or by the full token text). Returns whether it existed.
    pub fn revoke(&self, id_or_token: &str) -> Result<bool, TunnelError> {
        let id = match id_or_token.split_once('.') {
            Some((_, jwt)) => jsonwebtoken::dangerous::insecure_decode::<Claims>(jwt)
                .map(|d| d.claims.jti)
                .unwrap_or_default(),
            None => id_or_token.to_string(),
        };
        let n = self
            .db()
            .execute("DELETE FROM tokens WHERE id = ?1", params![id])
            .map_err(db_err)?;
        Ok(n > 0)
    }

    /// Checks a token (full text, or the JWT alone); on success records a use by `node`.
    pub fn verify(&self, token: &str, node: &str) -> Result<String, TokenError> {
        let jwt = match token.split_once('.') {
            // A JWT has two dots; a full token has three.
            Some((hash, rest)) if rest.matches('.').count() == 2 => {
                if hash != self.ca_hash {
                    return Err(TokenError::WrongCa {
                        got: hash.into(),
                        want: self.ca_hash.clone(),
                    });
                }
                rest
            }
            Some(_) if token.matches('.').count() == 2 => token,
            _ => return Err(TokenError::Malformed),
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "jti"]);
        let claims = match jsonwebtoken::decode::<Claims>(
            jwt,
            &DecodingKey::from_secret(&self.secret),
            &v,
        ) {
            Ok(d) => d.claims,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                let c = jsonwebtoken::dangerous::insecure_decode::<Claims>(jwt)
                    .map(|d| d.claims)
                    .map_err(|e| TokenError::BadSignature(e.to_string()))?;
                return Err(TokenError::Expired {
                    id: c.jti,
                    expired: c.exp,
                });
            }
            Err(e) => return Err(TokenError::BadSignature(e.to_string())),
        };
        let db = self.db();
        let known: Option<i64> = db
            .query_row(
                "SELECT expires FROM tokens WHERE id = ?1",
                params![claims.jti],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| TokenError::BadSignature(e.to_string()))?;
        if known.is_none() {
            return Err(TokenError::Revoked(claims.jti));
        }
        let _ = db.execute(
            "UPDATE tokens SET uses = uses + 1, last_node = ?2 WHERE id = ?1",
            params![claims.jti, node],
        );
        Ok(claims.jti)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() < 32 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> TokenStore {
        TokenStore::open(&dir.join("hub.db"), dir, "ab12").unwrap()
    }

    #[test]
    fn create_verify_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (tok, info) = s.create(Duration::from_secs(3600), "site A").unwrap();
        assert!(tok.starts_with("ab12."));
        assert_eq!(s.verify(&tok, "edge-1").unwrap(), info.id);
        let listed = s.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].uses, 1);
        assert_eq!(listed[0].last_node, "edge-1");
        assert!(s.revoke(&info.id).unwrap());
        assert_eq!(s.verify(&tok, "edge-1"), Err(TokenError::Revoked(info.id)));
        assert!(!s.revoke("nope").unwrap());
        // The key survives a reopen: tokens made before a restart still verify.
        let (tok2, _) = s.create(Duration::from_secs(60), "").unwrap();
        drop(s);
        let s = store(dir.path());
        assert!(s.verify(&tok2, "edge-2").is_ok());
        assert!(s.revoke(&tok2).unwrap(), "revoke by full token text");
    }

    #[test]
    fn bad_tokens_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (tok, _) = s.create(Duration::from_secs(3600), "").unwrap();
        assert_eq!(s.verify("garbage", "n"), Err(TokenError::Malformed));
        let other_ca = tok.replacen("ab12", "cd34", 1);
        assert!(matches!(
            s.verify(&other_ca, "n"),
            Err(TokenError::WrongCa { .. })
        ));
        let mut tampered = tok.clone();
        tampered.pop();
        tampered.push(if tok.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            s.verify(&tampered, "n"),
            Err(TokenError::BadSignature(_))
        ));
        // Expired: made with a 1 s TTL and checked with a clock 2 s later is awkward in a test;
        // sign one with exp in the past directly.
        let claims = Claims {
            jti: "old".into(),
            iat: 0,
            exp: 1,
            sub: "sedge-join".into(),
        };
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&s.secret),
        )
        .unwrap();
        let e = s.verify(&format!("ab12.{jwt}"), "n").unwrap_err();
        assert!(
            matches!(e, TokenError::Expired { ref id, expired: 1 } if id == "old"),
            "{e}"
        );
        assert!(s.create(Duration::ZERO, "").is_err());
    }
}
