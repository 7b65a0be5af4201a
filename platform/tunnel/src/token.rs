//! Join tokens: `hex(sha256(CA certificate DER)) + "." + JWT`, as in kubeadm and KubeEdge.
//!
//! The first part lets a joining node pin the CA it fetches; the JWT (HS256, with `exp`) proves
//! the holder was given the token. Unlike KubeEdge, every token has an id (`jti`) recorded in the
//! hub database, so tokens can be listed, created with any TTL, and revoked; a token whose id is
//! not in the database is refused even if its signature and expiry are fine. The HMAC key is a
//! random 256-bit secret in `<pki_dir>/token.key` (mode 0600), not the CA key.

use std::collections::HashSet;
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
    #[error(
        "token {0} has been revoked or was never issued by this cloud (a cloud core run with --kubeconfig keeps its tokens in the cluster: create them with `sedge token create --kubeconfig ...`)"
    )]
    Revoked(String),
    /// The records could not be read or written.
    #[error("the join records are unavailable: {0}")]
    Unavailable(String),
    /// Every use the token allows has been made.
    #[error(
        "token {id} has been used {uses} time(s), all it allows; create another with `sedge token create` (or `--max-uses N` to enrol a fleet)"
    )]
    UsedUp {
        /// Token id.
        id: String,
        /// Uses made.
        uses: i64,
    },
    /// The token was made for another node.
    #[error("token {id} is bound to node {bound:?}; it cannot join {node:?}")]
    BoundElsewhere {
        /// Token id.
        id: String,
        /// The node it was made for.
        bound: String,
        /// The node asked for.
        node: String,
    },
    /// The name belongs to a connected node.
    #[error(
        "node {0:?} is connected now: a certificate is never issued for a connected node's name"
    )]
    NodeConnected(String),
    /// The name belongs to a node that joined before.
    #[error(
        "node {0:?} has joined already and its certificate is valid; to re-join that machine, create a token bound to it (`sedge token create --node {0}`): its old certificates are revoked when it joins"
    )]
    NodeRegistered(String),
}

impl TokenError {
    /// Every attempt to count a use lost to another join counting one at the same time.
    pub fn busy(id: &str) -> TokenError {
        TokenError::Unavailable(format!(
            "token {id} is being used by many joins at once; try again"
        ))
    }

    /// Whether the refusal is about the node name (a conflict) rather than the token.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            TokenError::NodeConnected(_) | TokenError::NodeRegistered(_)
        )
    }
}

/// A join the store admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The token's id.
    pub token: String,
    /// The token was bound to this node: a re-join, whose earlier certificates are revoked
    /// once the new one is recorded.
    pub rejoin: bool,
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
    /// Joins it allows (1 unless made for a fleet).
    pub max_uses: i64,
    /// The node it is bound to (empty: any new node).
    pub node: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    jti: String,
    iat: i64,
    exp: i64,
    sub: String,
}

/// A certificate issued to a node, as the records keep it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// The token it was issued through (for a renewal: the token of the certificate renewed).
    pub token: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// Revoked: its token was revoked, or its node deleted or re-joined.
    pub revoked: bool,
}

/// Where join tokens and node certificate records are kept: the hub's own SQLite database
/// ([`SqliteRecords`], one cloud core), or a store every cloud core of a cluster shares (the
/// cloud core keeps them in the Kubernetes API). The hub calls these on the blocking pool, so an
/// implementation may block. A token's text is never stored, only its id and what `sedge token
/// list` shows: the signature proves the rest.
pub trait JoinRecords: Send + Sync {
    /// Stores a new token.
    fn insert_token(&self, t: &TokenInfo) -> Result<(), TunnelError>;
    /// Every token not revoked, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenInfo>, TunnelError>;
    /// Deletes token `id` and revokes every certificate issued through it: whether the token
    /// existed, and how many certificates were revoked now.
    fn revoke_token(&self, id: &str) -> Result<(bool, usize), TunnelError>;
    /// Revokes every certificate of `node`; how many were revoked now.
    fn revoke_node(&self, node: &str) -> Result<usize, TunnelError>;
    /// Notes that the Node objects of `nodes` exist.
    fn mark_seen(&self, nodes: &[String]) -> Result<(), TunnelError>;
    /// Nodes seen once, with a certificate not revoked, that are not in `present`.
    fn gone(&self, present: &HashSet<String>) -> Result<Vec<String>, TunnelError>;
    /// Records a certificate issued for `node`; records of certificates expired for a day go.
    fn record_cert(&self, node: &str, cert: CertRecord) -> Result<(), TunnelError>;
    /// The record of the certificate with this fingerprint, and its node.
    fn cert(&self, fingerprint: &str) -> Option<(String, CertRecord)>;
    /// Whether `node` has a certificate neither revoked nor expired.
    fn registered(&self, node: &str) -> Result<bool, TunnelError>;
    /// A number that moves whenever a certificate is revoked, here or by another process.
    fn revocation_generation(&self) -> i64;
    /// Takes one use of token `id` for `node`, if `check` passes on the token as it is now:
    /// atomically with every other use, by any process, so a single-use token admits one join.
    /// `None`: no such token (revoked, or never issued).
    fn take_use(
        &self,
        id: &str,
        node: &str,
        check: &dyn Fn(&TokenInfo) -> Result<(), TokenError>,
    ) -> Result<Option<TokenInfo>, TokenError>;
}

/// The token store: signs and checks tokens, with the records in a [`JoinRecords`].
pub struct TokenStore {
    records: std::sync::Arc<dyn JoinRecords>,
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

/// The token signing key in `<pki_dir>/token.key`, made on first use. Every cloud core of a
/// cluster must have the same one (it lives beside the CA they share).
fn signing_key(pki_dir: &Path) -> Result<Vec<u8>, TunnelError> {
    let key_path = pki_dir.join("token.key");
    match std::fs::read_to_string(&key_path) {
        Ok(hex) => decode_hex(hex.trim())
            .ok_or_else(|| TunnelError::Config(format!("{}: not a hex key", key_path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut key[..]);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            sedge_pki::write_file(&key_path, &hex, true)?;
            Ok(key.to_vec())
        }
        Err(e) => Err(TunnelError::Config(format!("{}: {e}", key_path.display()))),
    }
}

impl TokenStore {
    /// Opens (creating) the store in the SQLite database `db_path`, with the signing key in
    /// `pki_dir`.
    pub fn open(db_path: &Path, pki_dir: &Path, ca_hash: &str) -> Result<TokenStore, TunnelError> {
        let records = std::sync::Arc::new(SqliteRecords::open(db_path)?);
        TokenStore::with_records(records, pki_dir, ca_hash)
    }

    /// A key for `purpose` derived from the signing key (HMAC-SHA256 of `purpose`): the same
    /// in every cloud core of the cluster, and telling nothing of the signing key.
    pub(crate) fn derived_key(&self, purpose: &[u8]) -> ring::hmac::Tag {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret);
        ring::hmac::sign(&key, purpose)
    }

    /// The store over `records`, with the signing key in `pki_dir`.
    pub fn with_records(
        records: std::sync::Arc<dyn JoinRecords>,
        pki_dir: &Path,
        ca_hash: &str,
    ) -> Result<TokenStore, TunnelError> {
        Ok(TokenStore {
            records,
            secret: signing_key(pki_dir)?,
            ca_hash: ca_hash.into(),
        })
    }

    /// Creates a single-use token valid for `ttl`; returns the token text and its record.
    pub fn create(
        &self,
        ttl: Duration,
        description: &str,
    ) -> Result<(String, TokenInfo), TunnelError> {
        self.create_with(ttl, description, 1, None)
    }

    /// Creates a token valid for `ttl` and `max_uses` joins, bound to `node` if given (a token
    /// bound to a node re-joins it: the only way to get a certificate for a name that joined).
    pub fn create_with(
        &self,
        ttl: Duration,
        description: &str,
        max_uses: u32,
        node: Option<&str>,
    ) -> Result<(String, TokenInfo), TunnelError> {
        if ttl.is_zero() {
            return Err(TunnelError::Config("a token TTL must be above zero".into()));
        }
        if max_uses == 0 {
            return Err(TunnelError::Config(
                "a token's max uses must be at least 1".into(),
            ));
        }
        let node = node.unwrap_or_default();
        if !node.is_empty() && !crate::tls::valid_node_name(node) {
            return Err(TunnelError::Config(format!(
                "node name {node:?} is not a lower-case DNS name (letters, digits, '-', '.')"
            )));
        }
        if max_uses > 1 && !node.is_empty() {
            return Err(TunnelError::Config(
                "a token bound to one node is single-use; --max-uses and --node do not go together"
                    .into(),
            ));
        }
        if description.len() > MAX_DESCRIPTION {
            return Err(TunnelError::Config(format!(
                "a token's description is at most {MAX_DESCRIPTION} bytes (this one is {})",
                description.len()
            )));
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
        let info = TokenInfo {
            id,
            description: description.into(),
            created,
            expires,
            uses: 0,
            last_node: String::new(),
            max_uses: max_uses.into(),
            node: node.into(),
        };
        self.records.insert_token(&info)?;
        Ok((format!("{}.{jwt}", self.ca_hash), info))
    }

    /// All tokens that are not revoked (expired ones included, marked by `expires`).
    pub fn list(&self) -> Result<Vec<TokenInfo>, TunnelError> {
        self.records.list_tokens()
    }

    /// Revokes a token by id (or by the full token text), and every certificate issued through
    /// it (renewals included). Returns whether it existed.
    pub fn revoke(&self, id_or_token: &str) -> Result<bool, TunnelError> {
        let id = match id_or_token.split_once('.') {
            Some((_, jwt)) => jsonwebtoken::dangerous::insecure_decode::<Claims>(jwt)
                .map(|d| d.claims.jti)
                .unwrap_or_default(),
            None => id_or_token.to_string(),
        };
        if !valid_token_id(&id) {
            return Ok(false);
        }
        let (existed, certs) = self.records.revoke_token(&id)?;
        if certs > 0 {
            tracing::info!(token = %id, certificates = certs, "revoked the certificates issued through a revoked token");
        }
        Ok(existed)
    }

    /// Revokes every certificate issued for `node` (the node was deleted, or re-joins).
    /// Returns how many were revoked.
    pub fn revoke_node(&self, node: &str) -> Result<usize, TunnelError> {
        self.records.revoke_node(node)
    }

    /// Notes that the Node objects of `nodes` exist: from now on their absence is a deletion
    /// (see [`TokenStore::gone`]).
    pub fn mark_seen(&self, nodes: &[String]) -> Result<(), TunnelError> {
        self.records.mark_seen(nodes)
    }

    /// Nodes whose Node object was seen and is not in `present` (the full list of Nodes),
    /// with certificates still valid: deleted while no one was watching.
    pub fn gone(&self, present: &HashSet<String>) -> Result<Vec<String>, TunnelError> {
        self.records.gone(present)
    }

    /// Records a certificate issued for `node` through `token` (for renewals: the token of
    /// the certificate renewed), so that revoking either revokes it.
    pub fn record_cert(
        &self,
        cert_der: &[u8],
        node: &str,
        token: &str,
        not_after: i64,
    ) -> Result<(), TunnelError> {
        self.records.record_cert(
            node,
            CertRecord {
                fingerprint: crate::tls::ca_hash(cert_der),
                token: token.into(),
                not_after,
                revoked: false,
            },
        )
    }

    /// The token a recorded certificate was issued through (`None` if not recorded).
    pub fn token_of_cert(&self, cert_der: &[u8]) -> Option<String> {
        self.records
            .cert(&crate::tls::ca_hash(cert_der))
            .map(|(_, c)| c.token)
    }

    /// Whether a certificate has been revoked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        self.is_revoked_fingerprint(&crate::tls::ca_hash(cert_der))
    }

    /// Whether the certificate with this SHA-256 fingerprint (lower-case hex) has been revoked.
    pub fn is_revoked_fingerprint(&self, fingerprint: &str) -> bool {
        self.records
            .cert(fingerprint)
            .is_some_and(|(_, c)| c.revoked)
    }

    /// A number that changes whenever a certificate is revoked, by this process or another
    /// (`sedge token revoke`, another cloud core): the hub re-checks its sessions then.
    pub fn revocation_generation(&self) -> i64 {
        self.records.revocation_generation()
    }

    /// Checks a join of `node` with `token` (full text, or the JWT alone), and on success
    /// records a use. `connected` says whether a node of that name is connected now. The checks
    /// and the use are one step, so two joins racing for a single-use token cannot both pass.
    pub fn admit(&self, token: &str, node: &str, connected: bool) -> Result<Admission, TokenError> {
        let claims = self.check_signature(token)?;
        let records = &*self.records;
        let check = |t: &TokenInfo| -> Result<(), TokenError> {
            if t.uses >= t.max_uses {
                return Err(TokenError::UsedUp {
                    id: t.id.clone(),
                    uses: t.uses,
                });
            }
            if !t.node.is_empty() {
                if t.node != node {
                    return Err(TokenError::BoundElsewhere {
                        id: t.id.clone(),
                        bound: t.node.clone(),
                        node: node.into(),
                    });
                }
                return Ok(());
            }
            if connected {
                return Err(TokenError::NodeConnected(node.into()));
            }
            if records
                .registered(node)
                .map_err(|e| TokenError::Unavailable(e.to_string()))?
            {
                return Err(TokenError::NodeRegistered(node.into()));
            }
            Ok(())
        };
        match records.take_use(&claims.jti, node, &check)? {
            Some(t) => Ok(Admission {
                token: claims.jti,
                rejoin: !t.node.is_empty(),
            }),
            None => Err(TokenError::Revoked(claims.jti)),
        }
    }

    /// Checks a token's signature, CA hash and expiry (not its uses: see [`TokenStore::admit`]).
    fn check_signature(&self, token: &str) -> Result<Claims, TokenError> {
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
        if !valid_token_id(&claims.jti) {
            return Err(TokenError::BadSignature(
                "the token id is not 1-64 letters and digits".into(),
            ));
        }
        Ok(claims)
    }
}

/// The longest description a token may carry.
pub const MAX_DESCRIPTION: usize = 1024;

/// A token id as this hub makes them (12 hex digits); older or other ids: letters and digits,
/// at most 64. Ids name API objects, so nothing else may pass.
pub fn valid_token_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The records in the hub's SQLite database (`hub.data_dir/hub.db`): one cloud core's own.
pub struct SqliteRecords {
    db: Mutex<Connection>,
}

impl SqliteRecords {
    /// Opens (creating) the records in `db_path`.
    pub fn open(db_path: &Path) -> Result<SqliteRecords, TunnelError> {
        let db = Connection::open(db_path).map_err(db_err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS tokens (
               id TEXT PRIMARY KEY, description TEXT NOT NULL, created INTEGER NOT NULL,
               expires INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0,
               last_node TEXT NOT NULL DEFAULT '');
             CREATE TABLE IF NOT EXISTS certs (
               fingerprint TEXT PRIMARY KEY, node TEXT NOT NULL, token TEXT NOT NULL,
               not_after INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS certs_node ON certs (node);
             CREATE INDEX IF NOT EXISTS certs_token ON certs (token);
             CREATE TABLE IF NOT EXISTS revocations (id INTEGER PRIMARY KEY CHECK (id = 0),
               generation INTEGER NOT NULL);
             INSERT OR IGNORE INTO revocations (id, generation) VALUES (0, 0);",
        )
        .map_err(db_err)?;
        // Databases from before single-use tokens: add the columns (old tokens become single-use).
        for (col, ddl) in [
            (
                "max_uses",
                "ALTER TABLE tokens ADD COLUMN max_uses INTEGER NOT NULL DEFAULT 1",
            ),
            (
                "node",
                "ALTER TABLE tokens ADD COLUMN node TEXT NOT NULL DEFAULT ''",
            ),
        ] {
            let has: bool = db
                .prepare("SELECT 1 FROM pragma_table_info('tokens') WHERE name = ?1")
                .and_then(|mut st| st.exists(params![col]))
                .map_err(db_err)?;
            if !has {
                db.execute_batch(ddl).map_err(db_err)?;
            }
        }
        // Whether the node's Node object has been seen (so its absence later means a deletion).
        let has_seen: bool = db
            .prepare("SELECT 1 FROM pragma_table_info('certs') WHERE name = 'seen'")
            .and_then(|mut st| st.exists([]))
            .map_err(db_err)?;
        if !has_seen {
            db.execute_batch("ALTER TABLE certs ADD COLUMN seen INTEGER NOT NULL DEFAULT 0")
                .map_err(db_err)?;
        }
        Ok(SqliteRecords { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the records were moved into a store the cloud cores share (they are not read
    /// from here since; moving them again would bring back tokens revoked there).
    pub fn moved(&self) -> Result<bool, TunnelError> {
        self.db()
            .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'moved'")
            .and_then(|mut st| st.exists([]))
            .map_err(db_err)
    }

    /// Notes that the records were moved (see [`SqliteRecords::moved`]).
    pub fn mark_moved(&self, to: &str) -> Result<(), TunnelError> {
        self.db()
            .execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS moved (id INTEGER PRIMARY KEY CHECK (id = 0), at INTEGER NOT NULL, target TEXT NOT NULL);
                 INSERT OR IGNORE INTO moved (id, at, target) VALUES (0, {}, '{}');",
                crate::session::unix_secs(),
                to.replace('\'', "")
            ))
            .map_err(db_err)
    }

    /// Every certificate record: (node, record, whether the node's Node was seen). For moving
    /// the records into a store the cloud cores share.
    pub fn all_certs(&self) -> Result<Vec<(String, CertRecord, bool)>, TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT node, fingerprint, token, not_after, revoked, seen FROM certs ORDER BY node")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    CertRecord {
                        fingerprint: r.get(1)?,
                        token: r.get(2)?,
                        not_after: r.get(3)?,
                        revoked: r.get::<_, i64>(4)? != 0,
                    },
                    r.get::<_, i64>(5)? != 0,
                ))
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }
}

const TOKEN_COLUMNS: &str = "id, description, created, expires, uses, last_node, max_uses, node";

/// A token from a row of [`TOKEN_COLUMNS`].
fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.get(0)?,
        description: r.get(1)?,
        created: r.get(2)?,
        expires: r.get(3)?,
        uses: r.get(4)?,
        last_node: r.get(5)?,
        max_uses: r.get(6)?,
        node: r.get(7)?,
    })
}

impl JoinRecords for SqliteRecords {
    fn insert_token(&self, t: &TokenInfo) -> Result<(), TunnelError> {
        self.db()
            .execute(
                "INSERT INTO tokens (id, description, created, expires, uses, last_node, max_uses, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![t.id, t.description, t.created, t.expires, t.uses, t.last_node, t.max_uses, t.node],
            )
            .map_err(db_err)?;
        Ok(())
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>, TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"
            ))
            .map_err(db_err)?;
        let rows = st.query_map([], token_row).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn revoke_token(&self, id: &str) -> Result<(bool, usize), TunnelError> {
        let db = self.db();
        let n = db
            .execute("DELETE FROM tokens WHERE id = ?1", params![id])
            .map_err(db_err)?;
        let certs = db
            .execute(
                "UPDATE certs SET revoked = 1 WHERE token = ?1 AND revoked = 0",
                params![id],
            )
            .map_err(db_err)?;
        if certs > 0 {
            bump_generation(&db)?;
        }
        Ok((n > 0, certs))
    }

    fn revoke_node(&self, node: &str) -> Result<usize, TunnelError> {
        let db = self.db();
        let n = db
            .execute(
                "UPDATE certs SET revoked = 1 WHERE node = ?1 AND revoked = 0",
                params![node],
            )
            .map_err(db_err)?;
        if n > 0 {
            bump_generation(&db)?;
        }
        Ok(n)
    }

    fn mark_seen(&self, nodes: &[String]) -> Result<(), TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare_cached("UPDATE certs SET seen = 1 WHERE node = ?1 AND seen = 0")
            .map_err(db_err)?;
        for n in nodes {
            st.execute(params![n]).map_err(db_err)?;
        }
        Ok(())
    }

    fn gone(&self, present: &HashSet<String>) -> Result<Vec<String>, TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT DISTINCT node FROM certs WHERE seen = 1 AND revoked = 0")
            .map_err(db_err)?;
        let nodes = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?
            .filter_map(Result::ok)
            .filter(|n| !present.contains(n))
            .collect();
        Ok(nodes)
    }

    fn record_cert(&self, node: &str, cert: CertRecord) -> Result<(), TunnelError> {
        let db = self.db();
        // Records of certificates long expired are of no use to anyone.
        let _ = db.execute(
            "DELETE FROM certs WHERE not_after < ?1",
            params![crate::session::unix_secs() - 86_400],
        );
        db.execute(
            // A renewal keeps what is known of the node (its Node was seen).
            "INSERT OR REPLACE INTO certs (fingerprint, node, token, not_after, revoked, seen) VALUES (?1, ?2, ?3, ?4, ?5,
               COALESCE((SELECT MAX(seen) FROM certs WHERE node = ?2 AND revoked = 0), 0))",
            params![cert.fingerprint, node, cert.token, cert.not_after, cert.revoked as i64],
        )
        .map_err(db_err)?;
        Ok(())
    }

    fn cert(&self, fingerprint: &str) -> Option<(String, CertRecord)> {
        self.db()
            .query_row(
                "SELECT node, token, not_after, revoked FROM certs WHERE fingerprint = ?1",
                params![fingerprint],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        CertRecord {
                            fingerprint: fingerprint.into(),
                            token: r.get(1)?,
                            not_after: r.get(2)?,
                            revoked: r.get::<_, i64>(3)? != 0,
                        },
                    ))
                },
            )
            .optional()
            .ok()
            .flatten()
    }

    fn registered(&self, node: &str) -> Result<bool, TunnelError> {
        self.db()
            .prepare("SELECT 1 FROM certs WHERE node = ?1 AND revoked = 0 AND not_after > ?2")
            .and_then(|mut st| st.exists(params![node, crate::session::unix_secs()]))
            .map_err(db_err)
    }

    fn revocation_generation(&self) -> i64 {
        self.db()
            .query_row("SELECT generation FROM revocations WHERE id = 0", [], |r| {
                r.get(0)
            })
            .unwrap_or(0)
    }

    fn take_use(
        &self,
        id: &str,
        node: &str,
        check: &dyn Fn(&TokenInfo) -> Result<(), TokenError>,
    ) -> Result<Option<TokenInfo>, TokenError> {
        let unavailable = |e: rusqlite::Error| TokenError::Unavailable(e.to_string());
        // The check reads other records, so the update is conditional on the uses the check
        // saw: a use made in between (by this process or another) makes it read and check again.
        for _ in 0..8 {
            let t = self
                .db()
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
                    params![id],
                    token_row,
                )
                .optional()
                .map_err(unavailable)?;
            let Some(mut t) = t else { return Ok(None) };
            check(&t)?;
            let n = self
                .db()
                .execute(
                    "UPDATE tokens SET uses = uses + 1, last_node = ?2 WHERE id = ?1 AND uses = ?3",
                    params![id, node, t.uses],
                )
                .map_err(unavailable)?;
            if n == 1 {
                t.uses += 1;
                t.last_node = node.into();
                return Ok(Some(t));
            }
        }
        Err(TokenError::busy(id))
    }
}

fn bump_generation(db: &Connection) -> Result<(), TunnelError> {
    db.execute(
        "UPDATE revocations SET generation = generation + 1 WHERE id = 0",
        [],
    )
    .map_err(db_err)?;
    Ok(())
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
        assert_eq!(s.admit(&tok, "edge-1", false).unwrap().token, info.id);
        let listed = s.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].uses, 1);
        assert_eq!(listed[0].last_node, "edge-1");
        assert!(s.revoke(&info.id).unwrap());
        assert_eq!(
            s.admit(&tok, "edge-9", false),
            Err(TokenError::Revoked(info.id))
        );
        assert!(!s.revoke("nope").unwrap());
        // The key survives a reopen: tokens made before a restart still verify.
        let (tok2, _) = s.create(Duration::from_secs(60), "").unwrap();
        drop(s);
        let s = store(dir.path());
        assert!(s.admit(&tok2, "edge-2", false).is_ok());
        assert!(s.revoke(&tok2).unwrap(), "revoke by full token text");
    }

    #[test]
    fn bad_tokens_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (tok, _) = s.create(Duration::from_secs(3600), "").unwrap();
        assert_eq!(s.admit("garbage", "n", false), Err(TokenError::Malformed));
        let other_ca = tok.replacen("ab12", "cd34", 1);
        assert!(matches!(
            s.admit(&other_ca, "n", false),
            Err(TokenError::WrongCa { .. })
        ));
        let mut tampered = tok.clone();
        tampered.pop();
        tampered.push(if tok.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            s.admit(&tampered, "n", false),
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
        let e = s.admit(&format!("ab12.{jwt}"), "n", false).unwrap_err();
        assert!(
            matches!(e, TokenError::Expired { ref id, expired: 1 } if id == "old"),
            "{e}"
        );
        assert!(s.create(Duration::ZERO, "").is_err());
        assert!(s.create_with(Duration::from_secs(60), "", 0, None).is_err());
        assert!(
            s.create_with(Duration::from_secs(60), "", 2, Some("n"))
                .is_err()
        );
        assert!(
            s.create_with(Duration::from_secs(60), "", 1, Some("Bad/Name"))
                .is_err()
        );
    }

    #[test]
    fn a_token_serves_one_new_node_and_names_are_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        // The attack: one token, many node names.
        let (tok, info) = s.create(Duration::from_secs(3600), "").unwrap();
        s.admit(&tok, "edge-1", false).unwrap();
        s.record_cert(b"cert-1", "edge-1", &info.id, i64::MAX)
            .unwrap();
        assert!(matches!(
            s.admit(&tok, "edge-2", false),
            Err(TokenError::UsedUp { uses: 1, .. })
        ));
        // A fresh token may not mint a certificate for a connected or registered name.
        let (t2, _) = s.create(Duration::from_secs(3600), "").unwrap();
        let e = s.admit(&t2, "edge-1", true).unwrap_err();
        assert!(
            e.is_conflict() && e.to_string().contains("connected"),
            "{e}"
        );
        let e = s.admit(&t2, "edge-1", false).unwrap_err();
        assert!(matches!(e, TokenError::NodeRegistered(_)), "{e}");
        assert!(e.to_string().contains("--node edge-1"), "{e}");
        // The refusals did not spend the token.
        assert!(s.admit(&t2, "edge-3", false).is_ok());
        // Re-join is explicit: a token bound to the node, and only to it.
        let (bound, _) = s
            .create_with(Duration::from_secs(3600), "", 1, Some("edge-1"))
            .unwrap();
        let e = s.admit(&bound, "edge-4", false).unwrap_err();
        assert!(matches!(e, TokenError::BoundElsewhere { .. }), "{e}");
        assert!(s.admit(&bound, "edge-1", true).unwrap().rejoin);
        // Fleet enrolment.
        let (fleet, _) = s
            .create_with(Duration::from_secs(3600), "", 3, None)
            .unwrap();
        for n in ["f-1", "f-2", "f-3"] {
            s.admit(&fleet, n, false).unwrap();
        }
        assert!(s.admit(&fleet, "f-4", false).is_err());
        let listed = s.list().unwrap();
        assert!(listed.iter().any(|t| t.max_uses == 3 && t.uses == 3));
    }

    #[test]
    fn revoking_a_token_or_a_node_revokes_its_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (tok, info) = s.create(Duration::from_secs(3600), "").unwrap();
        s.admit(&tok, "edge-1", false).unwrap();
        s.record_cert(b"first", "edge-1", &info.id, i64::MAX)
            .unwrap();
        // A renewal inherits the token.
        assert_eq!(s.token_of_cert(b"first").as_deref(), Some(info.id.as_str()));
        s.record_cert(b"renewed", "edge-1", &info.id, i64::MAX)
            .unwrap();
        let g = s.revocation_generation();
        assert!(!s.is_revoked(b"first") && !s.is_revoked(b"unknown"));
        assert!(s.revoke(&info.id).unwrap());
        assert!(s.is_revoked(b"first") && s.is_revoked(b"renewed"));
        assert!(s.revocation_generation() > g);
        // The name is free again once its certificates are revoked.
        let (t2, i2) = s.create(Duration::from_secs(3600), "").unwrap();
        s.admit(&t2, "edge-1", false).unwrap();
        s.record_cert(b"again", "edge-1", &i2.id, i64::MAX).unwrap();
        assert_eq!(s.revoke_node("edge-1").unwrap(), 1);
        assert!(s.is_revoked(b"again"));
        // Another process sees the same state (the CLI and the hub share the database).
        drop(s);
        let s = store(dir.path());
        assert!(s.is_revoked(b"again"));
    }

    #[test]
    fn nodes_seen_then_missing_are_gone_and_never_seen_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let records = std::sync::Arc::new(SqliteRecords::open(&dir.path().join("hub.db")).unwrap());
        let s = TokenStore::with_records(records.clone(), dir.path(), "ab12").unwrap();
        for (cert, node) in [
            (&b"a"[..], "seen-kept"),
            (b"b", "seen-deleted"),
            (b"c", "new"),
        ] {
            let (tok, info) = s.create(Duration::from_secs(3600), "").unwrap();
            s.admit(&tok, node, false).unwrap();
            s.record_cert(cert, node, &info.id, i64::MAX).unwrap();
        }
        s.mark_seen(&["seen-kept".into(), "seen-deleted".into()])
            .unwrap();
        // A renewal of a seen node is seen too (the old record may expire and go).
        s.record_cert(b"b2", "seen-deleted", "t", i64::MAX).unwrap();
        records
            .db()
            .execute(
                "DELETE FROM certs WHERE fingerprint = ?1",
                params![crate::tls::ca_hash(b"b")],
            )
            .unwrap();
        // The Node list after a restart: one seen node is missing; "new" has not registered yet.
        let present: std::collections::HashSet<String> = ["seen-kept".to_string()].into();
        assert_eq!(s.gone(&present).unwrap(), vec!["seen-deleted".to_string()]);
        s.revoke_node("seen-deleted").unwrap();
        assert!(s.gone(&present).unwrap().is_empty());
    }
}
