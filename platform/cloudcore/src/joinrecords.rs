//! Join tokens and node certificate records in the Kubernetes API, so that every cloud core of
//! a cluster admits the same tokens and refuses the same revoked certificates (a token made on
//! one core joins through another; a token revoked through one closes its nodes' sessions on
//! all, including certificates a dead core issued).
//!
//! - A token is the Secret `kube-system/sedge-join-token-<id>` of type [`TOKEN_TYPE`], as
//!   kubeadm's bootstrap tokens are `bootstrap-token-<id>`: its id, description, creation and
//!   expiry, uses and the node it is bound to. Not the token's text: the signature proves it.
//!   A use is taken by a write conditional on the Secret's resourceVersion, so a single-use
//!   token admits one join even when two cores are asked at the same moment.
//! - A node's certificates are the Secret `kube-system/sedge-node-certs-<node>` of type
//!   [`CERTS_TYPE`]: each certificate's fingerprint, the token it came through, its expiry and
//!   whether it is revoked, and whether the node's Node has been seen. Every core keeps them in
//!   memory from a watch: a revocation check is made on every connection (10,000 of them when a
//!   cloud restarts) and must not cost an API call. Writes are read-modify-write on the
//!   resourceVersion, so two cores never lose each other's changes.
//!
//! Deleting a `sedge-node-certs-*` Secret forgets that node's revocations, as deleting
//! `hub.db` did: it is never deleted by Sedge.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use sedge_tunnel::TunnelError;
use sedge_tunnel::message::not_newer;
use sedge_tunnel::token::{
    CertRecord, JoinRecords, MAX_DESCRIPTION, SqliteRecords, TokenError, TokenInfo, valid_token_id,
};
use serde::{Deserialize, Serialize};

/// Where the records are.
pub const NAMESPACE: &str = "kube-system";
/// The type of a token's Secret.
pub const TOKEN_TYPE: &str = "sedge.io/join-token";
/// The type of a node's certificates' Secret.
pub const CERTS_TYPE: &str = "sedge.io/node-certs";
const TOKEN_LABEL: &str = "sedge.io/join-token";
const CERTS_LABEL: &str = "sedge.io/node-certs";
const TOKEN_PREFIX: &str = "sedge-join-token-";
const CERTS_PREFIX: &str = "sedge-node-certs-";
/// Certificates kept per node: renewals replace a node's certificate every few days, and
/// records expired for a day go, so a node has a handful; this bounds a damaged record.
const MAX_CERTS_PER_NODE: usize = 64;
/// Conditional writes retried when another core wrote in between.
const ATTEMPTS: usize = 16;

/// What a node's certificates' Secret holds (`records.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct NodeCerts {
    node: String,
    #[serde(default)]
    seen: bool,
    #[serde(default)]
    certs: Vec<CertRecord>,
}

#[derive(Default)]
struct Cache {
    /// Per node: the Secret's resourceVersion and its records.
    nodes: HashMap<String, (String, NodeCerts)>,
    /// Fingerprint -> node.
    by_fingerprint: HashMap<String, String>,
}

impl Cache {
    /// Takes in a node's records as of `rv`, unless what is held is newer. Returns whether a
    /// certificate became revoked (or forgotten) by it.
    fn apply(&mut self, rv: &str, rec: NodeCerts) -> bool {
        if let Some((held, _)) = self.nodes.get(&rec.node)
            && not_newer(rv, held)
        {
            return false;
        }
        let old = self.remove(&rec.node);
        let revoked_before: HashSet<&str> = old
            .as_ref()
            .map(|o| {
                o.certs
                    .iter()
                    .filter(|c| c.revoked)
                    .map(|c| c.fingerprint.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let revocation = rec
            .certs
            .iter()
            .any(|c| c.revoked && !revoked_before.contains(c.fingerprint.as_str()));
        for c in &rec.certs {
            self.by_fingerprint
                .insert(c.fingerprint.clone(), rec.node.clone());
        }
        self.nodes.insert(rec.node.clone(), (rv.to_string(), rec));
        revocation
    }

    fn remove(&mut self, node: &str) -> Option<NodeCerts> {
        let (_, old) = self.nodes.remove(node)?;
        for c in &old.certs {
            if self.by_fingerprint.get(&c.fingerprint).map(String::as_str) == Some(node) {
                self.by_fingerprint.remove(&c.fingerprint);
            }
        }
        Some(old)
    }
}

/// The join records of every cloud core sharing the cluster (see the module's documentation).
pub struct ApiRecords {
    secrets: Api<Secret>,
    rt: tokio::runtime::Handle,
    /// `None` for a handle opened for tokens only ([`ApiRecords::for_tokens`]).
    cache: Option<RwLock<Cache>>,
    generation: AtomicI64,
    watch: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for ApiRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRecords").finish_non_exhaustive()
    }
}

impl Drop for ApiRecords {
    fn drop(&mut self) {
        if let Some(w) = self.watch.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.abort();
        }
    }
}

fn api_err(what: &str, e: kube::Error) -> TunnelError {
    TunnelError::Store(format!("{what}: {e}"))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The Secret name of a node's certificates: `sedge-node-certs-<node>`, or, for a name too
/// long for that, the SHA-256 of the name (the node's name is inside).
fn certs_name(node: &str) -> String {
    let name = format!("{CERTS_PREFIX}{node}");
    if name.len() <= 253 {
        return name;
    }
    let hash = sedge_tunnel::tls::ca_hash(node.as_bytes());
    format!("{CERTS_PREFIX}{}", &hash[..40])
}

fn data(pairs: &[(&str, String)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
}

fn token_secret(t: &TokenInfo, rv: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("{TOKEN_PREFIX}{}", t.id)),
            namespace: Some(NAMESPACE.into()),
            labels: Some([(TOKEN_LABEL.to_string(), "true".to_string())].into()),
            resource_version: rv,
            ..Default::default()
        },
        type_: Some(TOKEN_TYPE.into()),
        data: Some(data(&[
            ("token-id", t.id.clone()),
            ("description", t.description.clone()),
            ("created", t.created.to_string()),
            ("expires", t.expires.to_string()),
            ("uses", t.uses.to_string()),
            ("max-uses", t.max_uses.to_string()),
            ("node", t.node.clone()),
            ("last-node", t.last_node.clone()),
        ])),
        ..Default::default()
    }
}

/// A token's record from its Secret; the error names the Secret and what is wrong with it.
fn parse_token(s: &Secret) -> Result<TokenInfo, String> {
    let name = s.metadata.name.clone().unwrap_or_default();
    let bad = |what: String| format!("Secret {NAMESPACE}/{name}: {what}");
    if s.type_.as_deref() != Some(TOKEN_TYPE) {
        return Err(bad(format!("its type is not {TOKEN_TYPE}")));
    }
    let empty = BTreeMap::new();
    let d = s.data.as_ref().unwrap_or(&empty);
    let text = |k: &str, max: usize| -> Result<String, String> {
        let v = d.get(k).map(|b| b.0.as_slice()).unwrap_or_default();
        if v.len() > max {
            return Err(bad(format!("{k} is longer than {max} bytes")));
        }
        String::from_utf8(v.to_vec()).map_err(|_| bad(format!("{k} is not UTF-8")))
    };
    let num = |k: &str| -> Result<i64, String> {
        let v = text(k, 20)?;
        v.parse()
            .map_err(|_| bad(format!("{k} {v:?} is not a whole number")))
    };
    let t = TokenInfo {
        id: text("token-id", 64)?,
        description: text("description", MAX_DESCRIPTION)?,
        created: num("created")?,
        expires: num("expires")?,
        uses: num("uses")?,
        last_node: text("last-node", 253)?,
        max_uses: num("max-uses")?,
        node: text("node", 253)?,
    };
    if !valid_token_id(&t.id) || name != format!("{TOKEN_PREFIX}{}", t.id) {
        return Err(bad(format!(
            "token-id {:?} is not the id in its name",
            t.id
        )));
    }
    if t.uses < 0 || t.max_uses < 1 {
        return Err(bad(format!(
            "uses {} / max-uses {} are out of range",
            t.uses, t.max_uses
        )));
    }
    Ok(t)
}

/// A node's records from their Secret, with its resourceVersion.
fn parse_certs(s: &Secret) -> Result<(String, NodeCerts), String> {
    let name = s.metadata.name.clone().unwrap_or_default();
    let bad = |what: String| format!("Secret {NAMESPACE}/{name}: {what}");
    if s.type_.as_deref() != Some(CERTS_TYPE) {
        return Err(bad(format!("its type is not {CERTS_TYPE}")));
    }
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get("records.json"))
        .ok_or_else(|| bad("no records.json".into()))?;
    let rec: NodeCerts = serde_json::from_slice(&raw.0)
        .map_err(|e| bad(format!("records.json is not node certificate records: {e}")))?;
    if !sedge_tunnel::tls::valid_node_name(&rec.node) || certs_name(&rec.node) != name {
        return Err(bad(format!(
            "node {:?} is not the node in its name",
            rec.node
        )));
    }
    if rec.certs.len() > MAX_CERTS_PER_NODE {
        return Err(bad(format!(
            "{} certificates, more than {MAX_CERTS_PER_NODE}",
            rec.certs.len()
        )));
    }
    let rv = s.metadata.resource_version.clone().unwrap_or_default();
    Ok((rv, rec))
}

fn certs_secret(rec: &NodeCerts, rv: Option<String>) -> Result<Secret, TunnelError> {
    let json = serde_json::to_string(rec).map_err(|e| TunnelError::Store(e.to_string()))?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(certs_name(&rec.node)),
            namespace: Some(NAMESPACE.into()),
            labels: Some([(CERTS_LABEL.to_string(), "true".to_string())].into()),
            resource_version: rv,
            ..Default::default()
        },
        type_: Some(CERTS_TYPE.into()),
        data: Some(data(&[("records.json", json)])),
        ..Default::default()
    })
}

impl ApiRecords {
    /// Reads every node's certificate records (nothing is admitted on a partial view), then
    /// keeps them up to date from a watch. Must be called within a Tokio runtime; the records'
    /// methods then block on it (call them off the runtime's workers, as the hub does).
    pub async fn start(client: kube::Client) -> Result<Arc<ApiRecords>, TunnelError> {
        let secrets = Api::<Secret>::namespaced(client, NAMESPACE);
        let list = secrets
            .list(&ListParams::default().labels(&format!("{CERTS_LABEL}=true")))
            .await
            .map_err(|e| {
                api_err(
                    "listing the node certificate records (Secrets in kube-system; the core's \
                     account needs get, list, watch, create, update and delete on them, or set \
                     join_records: hub to keep them in this core's hub.db)",
                    e,
                )
            })?;
        let mut cache = Cache::default();
        for s in &list.items {
            match parse_certs(s) {
                Ok((rv, rec)) => {
                    cache.apply(&rv, rec);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a damaged certificate record"),
            }
        }
        let me = Arc::new(ApiRecords {
            secrets: secrets.clone(),
            rt: tokio::runtime::Handle::current(),
            cache: Some(RwLock::new(cache)),
            generation: AtomicI64::new(0),
            watch: Default::default(),
        });
        let task = tokio::spawn(watch(Arc::downgrade(&me), secrets));
        *me.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Ok(me)
    }

    /// A handle for creating and listing tokens only: it reads no certificate records (a
    /// cluster of 10,000 nodes holds 10,000 of them), so it can neither check a certificate
    /// nor revoke; those answer an error. For `sedge token create|list`.
    pub fn for_tokens(client: kube::Client) -> Arc<ApiRecords> {
        Arc::new(ApiRecords {
            secrets: Api::<Secret>::namespaced(client, NAMESPACE),
            rt: tokio::runtime::Handle::current(),
            cache: None,
            generation: AtomicI64::new(0),
            watch: Default::default(),
        })
    }

    /// Copies what a hub's own database holds (from before its core kept the records in the
    /// API) into the API, once: tokens not there yet, and the certificate records, revocations
    /// included; then marks the database moved, so that a token revoked in the API later is
    /// not brought back by the next start. Returns (tokens, certificates) copied.
    pub fn import(&self, local: &SqliteRecords) -> Result<(usize, usize), TunnelError> {
        if local.moved()? {
            return Ok((0, 0));
        }
        let have: HashSet<String> = self.list_tokens()?.into_iter().map(|t| t.id).collect();
        let mut tokens = 0;
        for t in local.list_tokens()? {
            if !have.contains(&t.id) && valid_token_id(&t.id) {
                self.insert_token(&t)?;
                tokens += 1;
            }
        }
        let mut certs = 0;
        let now = sedge_tunnel::session::unix_secs();
        for (node, cert, seen) in local.all_certs()? {
            if !sedge_tunnel::tls::valid_node_name(&node) || cert.not_after < now - 86_400 {
                continue;
            }
            let changed = self.update_node(&node, |rec| {
                let mut changed = false;
                if seen && !rec.seen {
                    rec.seen = true;
                    changed = true;
                }
                match rec
                    .certs
                    .iter_mut()
                    .find(|c| c.fingerprint == cert.fingerprint)
                {
                    Some(c) if cert.revoked && !c.revoked => {
                        c.revoked = true;
                        changed = true;
                    }
                    Some(_) => {}
                    None => {
                        rec.certs.push(cert.clone());
                        changed = true;
                    }
                }
                changed
            })?;
            certs += usize::from(changed);
        }
        local.mark_moved("kube-system Secrets")?;
        Ok((tokens, certs))
    }

    /// Runs `f` to its end from synchronous code (the hub's blocking pool, or a runtime worker
    /// of a multi-threaded runtime).
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| self.rt.block_on(f)),
            Err(_) => self.rt.block_on(f),
        }
    }

    fn take_in(&self, s: &Secret) {
        match parse_certs(s) {
            Ok((rv, rec)) => {
                let Some(cache) = &self.cache else { return };
                let revoked = cache
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .apply(&rv, rec);
                if revoked {
                    self.generation.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a damaged certificate record"),
        }
    }

    /// Changes a node's records with `f` (which says whether it changed anything), written
    /// conditionally on the version read, again on a conflict. Returns whether it wrote.
    fn update_node(
        &self,
        node: &str,
        f: impl Fn(&mut NodeCerts) -> bool,
    ) -> Result<bool, TunnelError> {
        let name = certs_name(node);
        self.block(async {
            for _ in 0..ATTEMPTS {
                let current = self
                    .secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| api_err(&format!("reading {NAMESPACE}/{name}"), e))?;
                let (rv, mut rec) = match &current {
                    Some(s) => {
                        let (rv, rec) = parse_certs(s).map_err(TunnelError::Store)?;
                        (Some(rv), rec)
                    }
                    None => (
                        None,
                        NodeCerts {
                            node: node.into(),
                            ..Default::default()
                        },
                    ),
                };
                if !f(&mut rec) {
                    return Ok(false);
                }
                let now = sedge_tunnel::session::unix_secs();
                rec.certs.retain(|c| c.not_after >= now - 86_400);
                if rec.certs.len() > MAX_CERTS_PER_NODE {
                    let extra = rec.certs.len() - MAX_CERTS_PER_NODE;
                    // The oldest go first; a revoked one is kept over a valid one.
                    rec.certs.sort_by_key(|c| (c.revoked, c.not_after));
                    rec.certs.drain(..extra);
                }
                let secret = certs_secret(&rec, rv.clone())?;
                let written = match rv {
                    Some(_) => {
                        self.secrets
                            .replace(&name, &PostParams::default(), &secret)
                            .await
                    }
                    None => self.secrets.create(&PostParams::default(), &secret).await,
                };
                match written {
                    Ok(s) => {
                        self.take_in(&s);
                        return Ok(true);
                    }
                    Err(e) if is_code(&e, 409) => continue,
                    Err(e) => return Err(api_err(&format!("writing {NAMESPACE}/{name}"), e)),
                }
            }
            Err(TunnelError::Store(format!(
                "{NAMESPACE}/{name}: still changed by another writer after {ATTEMPTS} attempts"
            )))
        })
    }

    /// Marks revoked the node's certificates that `which` picks and are not revoked yet;
    /// returns how many (as of the write that took).
    fn revoke_where(
        &self,
        node: &str,
        which: impl Fn(&CertRecord) -> bool,
    ) -> Result<usize, TunnelError> {
        let n = std::sync::atomic::AtomicUsize::new(0);
        self.update_node(node, |rec| {
            let mut k = 0;
            for c in rec.certs.iter_mut().filter(|c| !c.revoked && which(c)) {
                c.revoked = true;
                k += 1;
            }
            // The last attempt's count is the one written.
            n.store(k, Ordering::Relaxed);
            k > 0
        })?;
        Ok(n.load(Ordering::Relaxed))
    }

    fn read<T>(&self, f: impl FnOnce(&Cache) -> T) -> Result<T, TunnelError> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            TunnelError::Store(
                "the join records were opened for tokens only; certificate records are not read"
                    .into(),
            )
        })?;
        Ok(f(&cache.read().unwrap_or_else(|p| p.into_inner())))
    }
}

/// Keeps the cache up to date; ends when the records are dropped.
async fn watch(me: std::sync::Weak<ApiRecords>, secrets: Api<Secret>) {
    let cfg = watcher::Config::default().labels(&format!("{CERTS_LABEL}=true"));
    let mut events = std::pin::pin!(watcher(secrets, cfg));
    let mut relisted: Option<HashSet<String>> = None;
    while let Some(ev) = events.next().await {
        let Some(me) = me.upgrade() else { return };
        let Some(cache) = me.cache.as_ref() else {
            return;
        };
        match ev {
            Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(s)) => {
                if let (Some(r), Ok((_, rec))) = (relisted.as_mut(), parse_certs(&s)) {
                    r.insert(rec.node);
                }
                me.take_in(&s);
            }
            Ok(watcher::Event::InitDone) => {
                let Some(present) = relisted.take() else {
                    continue;
                };
                let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
                let gone: Vec<String> = cache
                    .nodes
                    .keys()
                    .filter(|n| !present.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    cache.remove(&n);
                    me.generation.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(watcher::Event::Apply(s)) => me.take_in(&s),
            Ok(watcher::Event::Delete(s)) => {
                if let Ok((_, rec)) = parse_certs(&s) {
                    tracing::warn!(node = %rec.node, "a node's certificate records were deleted: its revocations are forgotten");
                    cache
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&rec.node);
                    me.generation.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "watching the node certificate records");
                drop(me);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

impl JoinRecords for ApiRecords {
    fn insert_token(&self, t: &TokenInfo) -> Result<(), TunnelError> {
        let s = token_secret(t, None);
        self.block(self.secrets.create(&PostParams::default(), &s))
            .map_err(|e| api_err("creating the token's Secret in kube-system", e))?;
        Ok(())
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>, TunnelError> {
        let list = self
            .block(
                self.secrets
                    .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true"))),
            )
            .map_err(|e| api_err("listing the tokens' Secrets in kube-system", e))?;
        let mut out: Vec<TokenInfo> = list
            .items
            .iter()
            .filter_map(|s| {
                parse_token(s)
                    .map_err(|e| tracing::warn!(error = %e, "ignoring a damaged token record"))
                    .ok()
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    fn revoke_token(&self, id: &str) -> Result<(bool, usize), TunnelError> {
        // Refused before anything is deleted on a handle without the certificate records.
        self.read(|_| ())?;
        let name = format!("{TOKEN_PREFIX}{id}");
        let existed = match self.block(self.secrets.delete(&name, &DeleteParams::default())) {
            Ok(_) => true,
            Err(e) if is_code(&e, 404) => false,
            Err(e) => return Err(api_err(&format!("deleting {NAMESPACE}/{name}"), e)),
        };
        let nodes: Vec<String> = self.read(|c| {
            c.nodes
                .iter()
                .filter(|(_, (_, r))| r.certs.iter().any(|c| c.token == id && !c.revoked))
                .map(|(n, _)| n.clone())
                .collect()
        })?;
        let mut revoked = 0;
        for node in nodes {
            revoked += self.revoke_where(&node, |c| c.token == id)?;
        }
        Ok((existed, revoked))
    }

    fn revoke_node(&self, node: &str) -> Result<usize, TunnelError> {
        self.revoke_where(node, |_| true)
    }

    fn mark_seen(&self, nodes: &[String]) -> Result<(), TunnelError> {
        // Only nodes with records not yet marked: at start every Node is passed in.
        let unmarked: Vec<String> = self.read(|c| {
            nodes
                .iter()
                .filter(|n| c.nodes.get(*n).is_some_and(|(_, r)| !r.seen))
                .cloned()
                .collect()
        })?;
        for n in unmarked {
            self.update_node(&n, |rec| {
                let changed = !rec.seen && !rec.certs.is_empty();
                rec.seen = true;
                changed
            })?;
        }
        Ok(())
    }

    fn gone(&self, present: &HashSet<String>) -> Result<Vec<String>, TunnelError> {
        self.read(|c| {
            c.nodes
                .iter()
                .filter(|(n, (_, r))| {
                    r.seen && r.certs.iter().any(|c| !c.revoked) && !present.contains(*n)
                })
                .map(|(n, _)| n.clone())
                .collect()
        })
    }

    fn record_cert(&self, node: &str, cert: CertRecord) -> Result<(), TunnelError> {
        self.update_node(node, |rec| {
            rec.certs.retain(|c| c.fingerprint != cert.fingerprint);
            if rec.certs.iter().all(|c| c.revoked) {
                // A new join of the name (a renewal keeps what is known of the node): its Node
                // is seen anew before its absence means a deletion.
                rec.seen = false;
            }
            rec.certs.push(cert.clone());
            true
        })?;
        Ok(())
    }

    fn cert(&self, fingerprint: &str) -> Option<(String, CertRecord)> {
        self.read(|c| {
            let node = c.by_fingerprint.get(fingerprint)?;
            let (_, rec) = c.nodes.get(node)?;
            let cert = rec.certs.iter().find(|c| c.fingerprint == fingerprint)?;
            Some((node.clone(), cert.clone()))
        })
        .ok()
        .flatten()
    }

    fn registered(&self, node: &str) -> Result<bool, TunnelError> {
        let now = sedge_tunnel::session::unix_secs();
        self.read(|c| {
            c.nodes
                .get(node)
                .is_some_and(|(_, r)| r.certs.iter().any(|c| !c.revoked && c.not_after > now))
        })
    }

    fn revocation_generation(&self) -> i64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn take_use(
        &self,
        id: &str,
        node: &str,
        check: &dyn Fn(&TokenInfo) -> Result<(), TokenError>,
    ) -> Result<Option<TokenInfo>, TokenError> {
        let name = format!("{TOKEN_PREFIX}{id}");
        let unavailable =
            |e: kube::Error| TokenError::Unavailable(format!("{NAMESPACE}/{name}: {e}"));
        for _ in 0..ATTEMPTS {
            let Some(s) = self
                .block(self.secrets.get_opt(&name))
                .map_err(unavailable)?
            else {
                return Ok(None);
            };
            let mut t = parse_token(&s).map_err(TokenError::Unavailable)?;
            check(&t)?;
            t.uses += 1;
            t.last_node = node.into();
            let updated = token_secret(&t, s.metadata.resource_version.clone());
            match self.block(
                self.secrets
                    .replace(&name, &PostParams::default(), &updated),
            ) {
                Ok(_) => return Ok(Some(t)),
                Err(e) if is_code(&e, 409) => continue,
                Err(e) if is_code(&e, 404) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(TokenError::busy(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenInfo {
        TokenInfo {
            id: "0123456789ab".into(),
            description: "site A".into(),
            created: 10,
            expires: 20,
            uses: 1,
            last_node: "edge-1".into(),
            max_uses: 3,
            node: String::new(),
        }
    }

    #[test]
    fn a_token_round_trips_through_its_secret_and_a_damaged_one_is_named() {
        let t = token();
        assert_eq!(parse_token(&token_secret(&t, None)).unwrap(), t);
        // Each damage is refused, naming the Secret and what is wrong.
        type Damage = Box<dyn Fn(&mut Secret)>;
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|s| s.type_ = Some("Opaque".into())), "type"),
            (
                Box::new(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("uses".into(), ByteString(b"-1".to_vec()));
                }),
                "out of range",
            ),
            (
                Box::new(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("expires".into(), ByteString(b"soon".to_vec()));
                }),
                "expires \"soon\"",
            ),
            (
                Box::new(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("token-id".into(), ByteString(b"../other".to_vec()));
                }),
                "token-id",
            ),
            (
                Box::new(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("description".into(), ByteString(vec![b'x'; 5000]));
                }),
                "longer than",
            ),
            (
                Box::new(|s| {
                    s.data
                        .as_mut()
                        .unwrap()
                        .insert("node".into(), ByteString(vec![0xff, 0xfe]));
                }),
                "not UTF-8",
            ),
        ];
        for (damage, want) in cases {
            let mut s = token_secret(&t, None);
            damage(&mut s);
            let e = parse_token(&s).unwrap_err();
            assert!(
                e.contains("kube-system/sedge-join-token-0123456789ab") && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn node_records_round_trip_and_damaged_ones_are_refused() {
        let rec = NodeCerts {
            node: "edge-1".into(),
            seen: true,
            certs: vec![CertRecord {
                fingerprint: "ab".repeat(32),
                token: "0123456789ab".into(),
                not_after: 99,
                revoked: false,
            }],
        };
        let mut s = certs_secret(&rec, None).unwrap();
        s.metadata.resource_version = Some("7".into());
        assert_eq!(parse_certs(&s).unwrap(), ("7".to_string(), rec.clone()));
        // A record naming another node than its Secret's name does, garbage, too many.
        let mut other = certs_secret(&rec, None).unwrap();
        other.metadata.name = Some(certs_name("edge-2"));
        assert!(
            parse_certs(&other)
                .unwrap_err()
                .contains("not the node in its name")
        );
        let mut garbage = certs_secret(&rec, None).unwrap();
        garbage
            .data
            .as_mut()
            .unwrap()
            .insert("records.json".into(), ByteString(b"[1,2".to_vec()));
        assert!(parse_certs(&garbage).unwrap_err().contains("records.json"));
        let many = NodeCerts {
            certs: vec![rec.certs[0].clone(); MAX_CERTS_PER_NODE + 1],
            ..rec.clone()
        };
        assert!(
            parse_certs(&certs_secret(&many, None).unwrap())
                .unwrap_err()
                .contains("more than")
        );
        // A name too long for the prefix is hashed, still a valid object name.
        let long = format!("{}.{}", "a".repeat(200), "b".repeat(50));
        let n = certs_name(&long);
        assert!(n.len() <= 253 && n.starts_with(CERTS_PREFIX), "{n}");
    }

    #[test]
    fn the_cache_keeps_the_newest_version_and_counts_revocations() {
        let cert = |fp: &str, revoked| CertRecord {
            fingerprint: fp.into(),
            token: "t".into(),
            not_after: i64::MAX,
            revoked,
        };
        let mut c = Cache::default();
        let v1 = NodeCerts {
            node: "edge-1".into(),
            seen: false,
            certs: vec![cert("a", false)],
        };
        assert!(!c.apply("5", v1.clone()));
        let v2 = NodeCerts {
            certs: vec![cert("a", true), cert("b", false)],
            ..v1.clone()
        };
        assert!(c.apply("6", v2), "a revocation");
        // An older version delivered late changes nothing.
        assert!(!c.apply("5", v1));
        assert!(c.nodes["edge-1"].1.certs[0].revoked);
        assert_eq!(c.by_fingerprint["b"], "edge-1");
        // A renewal replacing "b" by "c" is not a revocation, and "b" is forgotten.
        let v3 = NodeCerts {
            node: "edge-1".into(),
            seen: true,
            certs: vec![cert("a", true), cert("c", false)],
        };
        assert!(!c.apply("7", v3));
        assert!(!c.by_fingerprint.contains_key("b"));
        assert!(c.remove("edge-1").is_some() && c.by_fingerprint.is_empty());
    }
}
