//! The SQLite store: objects, a revision counter used as `resourceVersion`, and a bounded history
//! of changes for watch replay and consistent paginated lists.
//!
//! Design:
//! - WAL mode; one writer connection behind a mutex, so writers queue in-process and SQLite never
//!   answers "database is locked" to us; readers use their own connections and see snapshots.
//! - One transaction per write: the object row, the history row, the owner index and the revision
//!   move together.
//! - Group commit. A write commits under the writer lock without waiting for the disk, releases the
//!   lock, then waits until an fsync of the WAL that began after its commit has finished. One
//!   fsync covers every commit made before it began, so writers that arrive together share one
//!   fsync instead of queueing behind each other's (with `Durability::Full`, the default, an
//!   acknowledged write survives power loss, as with `synchronous=FULL`). Readers on their own
//!   connections may see a commit during that fsync; its writer and the watchers hear of it only
//!   once it is on disk.
//! - Events are queued in revision order under the writer lock and broadcast by whoever made them
//!   durable, in that order, so subscribers see revisions in order; a subscriber that falls behind
//!   re-reads the history table.
//! - Compaction drops history older than the retention window: the last `history` events, and
//!   every event younger than `history_seconds` (up to `history_max_events`), so a paginated list
//!   or a watch that pauses stays valid for minutes however fast heartbeats write, as with
//!   etcd's five-minute compaction. A watch or continue token older than that gets `410 Expired`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::broadcast;

/// Storage failures. None of them leave a partial write behind: the transaction is rolled back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value did not parse (the file was modified outside the server).
    #[error("stored object {key} is not valid JSON: {source}")]
    Corrupt {
        /// `res/ns/name`.
        key: String,
        /// Parse error.
        source: serde_json::Error,
    },
    /// The requested revision has been compacted away.
    #[error("too old resource version: {requested} ({compacted})")]
    Compacted {
        /// Revision asked for.
        requested: i64,
        /// Oldest revision still answerable.
        compacted: i64,
    },
    /// The data directory is held by another process.
    #[error("data directory {0} is in use by another sedge apiserver (lock file {1} is held)")]
    Locked(PathBuf, PathBuf),
    /// Filesystem error around the database.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    fn code(self) -> i64 {
        match self {
            EventType::Added => 0,
            EventType::Modified => 1,
            EventType::Deleted => 2,
        }
    }

    fn from_code(c: i64) -> Self {
        match c {
            0 => EventType::Added,
            1 => EventType::Modified,
            _ => EventType::Deleted,
        }
    }

    /// The Kubernetes watch event name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct Event {
    /// Revision of the change (the object's new resourceVersion).
    pub rev: i64,
    /// What happened.
    pub kind: EventType,
    /// Storage key of the resource (`group/plural`).
    pub resource: String,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// The object after the change (for a delete: its last state, at the delete's revision).
    pub object: Arc<Value>,
    /// The object before the change, if it existed.
    pub prev: Option<Arc<Value>>,
    /// The object as JSON in one API version, encoded once and shared by every watcher that
    /// presents it that way (set by the first, see `watch`).
    pub encoded: std::sync::OnceLock<(String, bytes::Bytes)>,
}

/// What a [`Store::modify`] closure decided.
#[derive(Debug)]
pub enum Change {
    /// Write this object (created or replaced).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Leave it as it is (no revision is used).
    Unchanged,
}

/// Durability of each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A write is acknowledged once an fsync of the WAL covers it (shared by the writes that
    /// arrive together): survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash (kill -9), not power loss.
    Normal,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Database file.
    pub path: PathBuf,
    /// Number of history events retained for watches and paginated lists, at least.
    pub history: u64,
    /// Events younger than this many seconds are retained too (0: count only) ...
    pub history_seconds: u64,
    /// ... up to this many events (disk use is bounded however fast writes come).
    pub history_max_events: u64,
    /// Commit durability.
    pub durability: Durability,
}

impl StoreConfig {
    /// Keeps the last `history` events, whatever their age.
    pub fn by_count(path: PathBuf, history: u64, durability: Durability) -> StoreConfig {
        StoreConfig {
            path,
            history,
            history_seconds: 0,
            history_max_events: history,
            durability,
        }
    }
}

/// Result of a list.
#[derive(Debug)]
pub struct ListPage {
    /// Objects in (namespace, name) order.
    pub items: Vec<Value>,
    /// The revision the list reflects.
    pub rev: i64,
    /// Whether more objects follow the last one returned.
    pub more: bool,
}

const BROADCAST_CAPACITY: usize = 8192;
const COMPACT_EVERY: u64 = 512;
const MAX_READERS: usize = 8;

/// Which revision was current when: sampled at each compaction check, so the events older than a
/// time are known without a timestamp per event. Revisions committed since the store opened only;
/// older ones are all treated as young until the window has passed once.
#[derive(Debug, Default)]
struct Marks {
    samples: VecDeque<(std::time::Instant, i64)>,
    /// Every event at or below this revision is older than the window.
    aged: i64,
}

impl Marks {
    fn note(&mut self, now: std::time::Instant, rev: i64) {
        self.samples.push_back((now, rev));
    }

    /// The highest revision known to be older than `age` at `now` (0 if none).
    fn older_than(&mut self, now: std::time::Instant, age: std::time::Duration) -> i64 {
        while let Some(&(at, rev)) = self.samples.front() {
            if now.saturating_duration_since(at) < age {
                break;
            }
            self.aged = self.aged.max(rev);
            self.samples.pop_front();
        }
        self.aged
    }
}

/// Group commit state: what has been committed but is not yet known to be on disk.
#[derive(Debug)]
struct Flush {
    /// The WAL file (`<db>-wal`), fsynced to make commits durable (`None` with
    /// [`Durability::Normal`]).
    wal: Option<std::fs::File>,
    /// Committed events not yet broadcast, in revision order (pushed under the writer lock).
    pending: Mutex<VecDeque<Arc<Event>>>,
    /// Held by the one thread that is syncing and broadcasting what its sync covered.
    syncing: Mutex<()>,
    /// Every revision at or below this is on disk and broadcast.
    durable: AtomicI64,
    /// fsyncs of the WAL made so far.
    syncs: AtomicU64,
}

/// The object store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    writer: Mutex<Connection>,
    flush: Flush,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    rev: AtomicI64,
    compacted: AtomicI64,
    history: i64,
    history_age: std::time::Duration,
    history_max: i64,
    /// Revisions sampled with the time they were current, oldest first, to compact by age.
    marks: Mutex<Marks>,
    writes: AtomicU64,
    tx: broadcast::Sender<Arc<Event>>,
    _lock: std::fs::File,
}

/// Opens a connection in WAL mode. `synchronous=NORMAL`: SQLite syncs the WAL at checkpoints
/// (and the header when the WAL is reused); the per-commit sync is the store's own group fsync.
fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

fn parse(key: impl FnOnce() -> String, bytes: &[u8]) -> Result<Value, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { key: key(), source })
}

fn uid_of(v: &Value) -> String {
    v["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn owner_uids(v: &Value) -> Vec<String> {
    v["metadata"]["ownerReferences"]
        .as_array()
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r["uid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) the database, taking an exclusive lock on `<path>.lock`.
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let lock_path = cfg.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(cfg.path.clone(), lock_path));
        }
        let conn = open_conn(&cfg.path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects(
                 res TEXT NOT NULL, ns TEXT NOT NULL, name TEXT NOT NULL,
                 uid TEXT NOT NULL, rv INTEGER NOT NULL, value BLOB NOT NULL,
                 PRIMARY KEY(res, ns, name)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS objects_uid ON objects(uid);
             CREATE TABLE IF NOT EXISTS events(
                 rev INTEGER PRIMARY KEY, res TEXT NOT NULL, ns TEXT NOT NULL, name TEXT NOT NULL,
                 type INTEGER NOT NULL, value BLOB NOT NULL, prev BLOB);
             CREATE INDEX IF NOT EXISTS events_res ON events(res, rev);
             CREATE TABLE IF NOT EXISTS owners(
                 owner TEXT NOT NULL, res TEXT NOT NULL, ns TEXT NOT NULL, name TEXT NOT NULL,
                 PRIMARY KEY(owner, res, ns, name)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS owners_dep ON owners(res, ns, name);
             CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )?;
        let meta = |k: &str| -> Result<i64, StoreError> {
            Ok(conn
                .query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0))
                .optional()?
                .unwrap_or(0))
        };
        let max_event: i64 =
            conn.query_row("SELECT COALESCE(MAX(rev), 0) FROM events", [], |r| r.get(0))?;
        let rev = meta("rev")?.max(max_event);
        let compacted = meta("compacted")?;
        // The WAL exists while a connection is open, and the writer's stays open as long as the
        // store: SQLite rewinds it after a checkpoint but keeps the file, so this handle stays valid.
        let wal_path = PathBuf::from(format!("{}-wal", cfg.path.display()));
        let wal = match cfg.durability {
            Durability::Full => Some(std::fs::File::open(&wal_path).map_err(io(&wal_path))?),
            Durability::Normal => None,
        };
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Store {
            writer: Mutex::new(conn),
            flush: Flush {
                wal,
                pending: Mutex::new(VecDeque::new()),
                syncing: Mutex::new(()),
                durable: AtomicI64::new(rev),
                syncs: AtomicU64::new(0),
            },
            readers: Mutex::new(Vec::new()),
            path: cfg.path.clone(),
            rev: AtomicI64::new(rev),
            compacted: AtomicI64::new(compacted),
            history: cfg.history.max(1) as i64,
            history_age: std::time::Duration::from_secs(cfg.history_seconds),
            history_max: cfg.history_max_events.max(cfg.history.max(1)) as i64,
            marks: Mutex::new(Marks::default()),
            writes: AtomicU64::new(0),
            tx,
            _lock: lock,
        })
    }

    /// The latest committed revision.
    pub fn current_rev(&self) -> i64 {
        self.rev.load(Ordering::SeqCst)
    }

    /// Revisions at or below this are no longer in the history.
    pub fn compacted_rev(&self) -> i64 {
        self.compacted.load(Ordering::SeqCst)
    }

    /// Subscribes to committed changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let out = f(&mut conn);
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_READERS {
            pool.push(conn);
        }
        out
    }

    /// Reads one object.
    pub fn get(&self, res: &str, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        self.with_reader(|c| {
            let bytes: Option<Vec<u8>> = c
                .prepare_cached(
                    "SELECT value FROM objects WHERE res = ?1 AND ns = ?2 AND name = ?3",
                )?
                .query_row(params![res, ns, name], |r| r.get(0))
                .optional()?;
            bytes
                .map(|b| parse(|| format!("{res}/{ns}/{name}"), &b))
                .transpose()
        })
    }

    /// Finds an object by uid: (resource key, namespace, name, object).
    pub fn get_by_uid(
        &self,
        uid: &str,
    ) -> Result<Option<(String, String, String, Value)>, StoreError> {
        self.with_reader(|c| {
            let row: Option<(String, String, String, Vec<u8>)> = c
                .prepare_cached("SELECT res, ns, name, value FROM objects WHERE uid = ?1")?
                .query_row([uid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            row.map(|(res, ns, name, b)| {
                let v = parse(|| format!("{res}/{ns}/{name}"), &b)?;
                Ok((res, ns, name, v))
            })
            .transpose()
        })
    }

    /// Objects whose ownerReferences name `owner_uid`: (resource key, namespace, name).
    pub fn dependents(&self, owner_uid: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT res, ns, name FROM owners WHERE owner = ?1")?;
            let rows = stmt.query_map([owner_uid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Every (resource key, namespace, name) that has ownerReferences, and the owner uids.
    pub fn all_owned(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT owner, res, ns, name FROM owners")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Every stored object whose JSON contains `needle` (a byte search inside SQLite, so objects
    /// without it are neither copied out nor parsed): (resource key, object). Callers check the
    /// field they look for: the bytes may also appear in a value.
    pub fn containing(&self, needle: &str) -> Result<Vec<(String, Value)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT res, ns, name, value FROM objects WHERE instr(value, ?1) > 0",
            )?;
            let rows = stmt.query_map([needle.as_bytes()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (res, ns, name, bytes) = row?;
                let v = parse(|| format!("{res}/{ns}/{name}"), &bytes)?;
                out.push((res, v));
            }
            Ok(out)
        })
    }

    /// Lists objects of a resource in (namespace, name) order, optionally in one namespace, after a
    /// cursor, at most `limit`, as of revision `at` (default: now). A past revision is answered from
    /// the history; one older than the retained history is [`StoreError::Compacted`].
    pub fn list(
        &self,
        res: &str,
        ns: Option<&str>,
        after: Option<(&str, &str)>,
        limit: Option<usize>,
        at: Option<i64>,
    ) -> Result<ListPage, StoreError> {
        self.with_reader(|c| {
            let tx = c.transaction()?;
            let now: i64 = tx.query_row("SELECT COALESCE((SELECT v FROM meta WHERE k = 'rev'), 0)", [], |r| r.get(0))?;
            let compacted: i64 =
                tx.query_row("SELECT COALESCE((SELECT v FROM meta WHERE k = 'compacted'), 0)", [], |r| r.get(0))?;
            let at = at.unwrap_or(now);
            if at < compacted {
                return Err(StoreError::Compacted { requested: at, compacted });
            }
            let (after_ns, after_name) = after.unwrap_or(("", ""));
            let has_cursor = after.is_some();
            let in_range = |rns: &str, rname: &str| {
                ns.is_none_or(|n| n == rns) && (!has_cursor || (rns, rname) > (after_ns, after_name))
            };
            // State at `at` of every key changed after it: the first later event tells.
            let mut past: BTreeMap<(String, String), Option<Value>> = BTreeMap::new();
            if at < now {
                let mut stmt =
                    tx.prepare_cached("SELECT ns, name, type, prev FROM events WHERE res = ?1 AND rev > ?2 ORDER BY rev")?;
                let mut rows = stmt.query(params![res, at])?;
                while let Some(r) = rows.next()? {
                    let (rns, rname): (String, String) = (r.get(0)?, r.get(1)?);
                    if !in_range(&rns, &rname) || past.contains_key(&(rns.clone(), rname.clone())) {
                        continue;
                    }
                    let kind = EventType::from_code(r.get(2)?);
                    let prev: Option<Vec<u8>> = r.get(3)?;
                    let state = match (kind, prev) {
                        (EventType::Added, _) | (_, None) => None,
                        (_, Some(b)) => Some(parse(|| format!("{res}/{rns}/{rname}"), &b)?),
                    };
                    past.insert((rns, rname), state);
                }
            }
            let limit = limit.unwrap_or(usize::MAX);
            let mut items = Vec::new();
            let mut more = false;
            let mut stmt = tx.prepare_cached(
                "SELECT ns, name, value FROM objects WHERE res = ?1 AND (ns, name) > (?2, ?3) ORDER BY ns, name",
            )?;
            let (start_ns, start_name) = match (has_cursor, ns) {
                (true, _) => (after_ns.to_string(), after_name.to_string()),
                // Rows compare greater than ("ns", "") only if they are in ns or later.
                (false, Some(n)) => (n.to_string(), String::new()),
                (false, None) => (String::new(), String::new()),
            };
            let mut rows = stmt.query(params![res, start_ns, start_name])?;
            let emit = |v: Option<Value>, items: &mut Vec<Value>, more: &mut bool| -> bool {
                let Some(v) = v else { return true };
                if items.len() == limit {
                    *more = true;
                    return false;
                }
                items.push(v);
                true
            };
            'rows: while let Some(r) = rows.next()? {
                let (rns, rname): (String, String) = (r.get(0)?, r.get(1)?);
                if ns.is_some_and(|n| n != rns) {
                    break;
                }
                let key = (rns, rname);
                // Objects that existed at `at` but sort before this row (deleted since).
                while past.first_key_value().is_some_and(|(k, _)| *k < key) {
                    let (_, v) = past.pop_first().expect("non-empty");
                    if !emit(v, &mut items, &mut more) {
                        break 'rows;
                    }
                }
                let v = match past.remove(&key) {
                    Some(state_at) => state_at,
                    None => {
                        let bytes: Vec<u8> = r.get(2)?;
                        Some(parse(|| format!("{res}/{}/{}", key.0, key.1), &bytes)?)
                    }
                };
                if !emit(v, &mut items, &mut more) {
                    break;
                }
            }
            if !more {
                while let Some((_, v)) = past.pop_first() {
                    if !emit(v, &mut items, &mut more) {
                        break;
                    }
                }
            }
            Ok(ListPage { items, rev: at, more })
        })
    }

    /// Changes after `after` (exclusive), oldest first, optionally for one resource, at most `max`.
    pub fn events_since(
        &self,
        res: Option<&str>,
        after: i64,
        max: usize,
    ) -> Result<Vec<Arc<Event>>, StoreError> {
        let compacted = self.compacted_rev();
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        self.with_reader(|c| {
            let sql = if res.is_some() {
                "SELECT rev, res, ns, name, type, value, prev FROM events WHERE res = ?1 AND rev > ?2 ORDER BY rev LIMIT ?3"
            } else {
                "SELECT rev, res, ns, name, type, value, prev FROM events WHERE ?1 IS NULL AND rev > ?2 ORDER BY rev LIMIT ?3"
            };
            let mut stmt = c.prepare_cached(sql)?;
            let mut rows = stmt.query(params![res, after, max as i64])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let (rev, res, ns, name): (i64, String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                let key = || format!("{res}/{ns}/{name}@{rev}");
                let value: Vec<u8> = r.get(5)?;
                let prev: Option<Vec<u8>> = r.get(6)?;
                out.push(Arc::new(Event {
                    rev,
                    kind: EventType::from_code(r.get(4)?),
                    object: Arc::new(parse(key, &value)?),
                    prev: prev.map(|p| parse(key, &p).map(Arc::new)).transpose()?,
                    resource: res,
                    namespace: ns,
                    name,
                    encoded: Default::default(),
                }));
            }
            // Compaction may have raced with the read.
            let compacted = self.compacted_rev();
            if after < compacted {
                return Err(StoreError::Compacted { requested: after, compacted });
            }
            Ok(out)
        })
    }

    /// Atomically reads an object, lets `f` decide its fate given the revision the write would get,
    /// and commits. The new object's `metadata.resourceVersion` is set by the store. Returns the
    /// committed event, or `None` when `f` chose [`Change::Unchanged`].
    pub fn modify<E>(
        &self,
        res: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(Option<Value>, i64) -> Result<Change, E>,
    ) -> Result<Option<Arc<Event>>, E>
    where
        E: From<StoreError>,
    {
        let mut conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // The stored bytes are the event's `prev` as they are (they are what serializing the
        // parsed object would give).
        let prev_bytes: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM objects WHERE res = ?1 AND ns = ?2 AND name = ?3")
            .map_err(StoreError::from)?
            .query_row(params![res, ns, name], |r| r.get(0))
            .optional()
            .map_err(StoreError::from)?;
        let current = prev_bytes
            .as_ref()
            .map(|b| parse(|| format!("{res}/{ns}/{name}"), b))
            .transpose()?;
        let old_owners = current.as_ref().map(owner_uids).unwrap_or_default();
        let rev = self.rev.load(Ordering::SeqCst) + 1;
        let change = f(current.clone(), rev)?;
        let (kind, object) = match (change, &current) {
            (Change::Unchanged, _) | (Change::Delete, None) => return Ok(None),
            (Change::Put(mut v), cur) => {
                v["metadata"]["resourceVersion"] = Value::String(rev.to_string());
                (
                    if cur.is_some() {
                        EventType::Modified
                    } else {
                        EventType::Added
                    },
                    v,
                )
            }
            (Change::Delete, Some(cur)) => {
                let mut v = cur.clone();
                v["metadata"]["resourceVersion"] = Value::String(rev.to_string());
                (EventType::Deleted, v)
            }
        };
        let bytes = serde_json::to_vec(&object).map_err(|e| StoreError::Corrupt {
            key: name.into(),
            source: e,
        })?;
        let write = |conn: &mut Connection| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            if kind == EventType::Deleted {
                tx.prepare_cached("DELETE FROM objects WHERE res = ?1 AND ns = ?2 AND name = ?3")?
                    .execute(params![res, ns, name])?;
            } else {
                tx.prepare_cached(
                    "INSERT INTO objects(res, ns, name, uid, rv, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(res, ns, name) DO UPDATE SET uid = excluded.uid, rv = excluded.rv, value = excluded.value",
                )?
                .execute(params![res, ns, name, uid_of(&object), rev, bytes])?;
            }
            let new_owners = if kind == EventType::Deleted {
                Vec::new()
            } else {
                owner_uids(&object)
            };
            if old_owners != new_owners {
                tx.prepare_cached("DELETE FROM owners WHERE res = ?1 AND ns = ?2 AND name = ?3")?
                    .execute(params![res, ns, name])?;
                for o in &new_owners {
                    tx.prepare_cached("INSERT OR IGNORE INTO owners(owner, res, ns, name) VALUES (?1, ?2, ?3, ?4)")?
                        .execute(params![o, res, ns, name])?;
                }
            }
            tx.prepare_cached("INSERT INTO events(rev, res, ns, name, type, value, prev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                .execute(params![rev, res, ns, name, kind.code(), bytes, prev_bytes])?;
            tx.prepare_cached("INSERT INTO meta(k, v) VALUES ('rev', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v")?
                .execute([rev])?;
            tx.commit()
        };
        write(&mut conn).map_err(StoreError::from)?;
        let event = Arc::new(Event {
            rev,
            kind,
            resource: res.to_string(),
            namespace: ns.to_string(),
            name: name.to_string(),
            object: Arc::new(object),
            prev: current.map(Arc::new),
            encoded: Default::default(),
        });
        // Queued before the revision moves, so a flush that covers `rev` finds its event.
        self.flush
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(event.clone());
        self.rev.store(rev, Ordering::SeqCst);
        if self.writes.fetch_add(1, Ordering::Relaxed) % COMPACT_EVERY == COMPACT_EVERY - 1
            && let Err(e) = self.compact_locked(&mut conn, rev, std::time::Instant::now())
        {
            tracing::warn!(error = %e, "history compaction failed; will retry");
        }
        drop(conn);
        self.wait_durable(rev)?;
        Ok(Some(event))
    }

    /// Returns once revision `rev` is on disk and its event broadcast. If no sync covers it yet,
    /// this thread syncs the WAL for every commit made so far and broadcasts their events in order.
    /// A failed fsync answers this write with an error; its commit may or may not survive power
    /// loss, and the next write's sync tries again.
    fn wait_durable(&self, rev: i64) -> Result<(), StoreError> {
        let flush = &self.flush;
        if flush.durable.load(Ordering::SeqCst) >= rev {
            return Ok(());
        }
        let _syncing = flush.syncing.lock().unwrap_or_else(|e| e.into_inner());
        if flush.durable.load(Ordering::SeqCst) >= rev {
            return Ok(());
        }
        // Every commit at or below `upto` has been written to the WAL and queued its event.
        let upto = self.rev.load(Ordering::SeqCst);
        if let Some(wal) = &flush.wal {
            wal.sync_data().map_err(|source| StoreError::Io {
                path: PathBuf::from(format!("{}-wal", self.path.display())),
                source,
            })?;
            flush.syncs.fetch_add(1, Ordering::Relaxed);
        }
        let ready: Vec<Arc<Event>> = {
            let mut pending = flush.pending.lock().unwrap_or_else(|e| e.into_inner());
            let n = pending.iter().take_while(|e| e.rev <= upto).count();
            pending.drain(..n).collect()
        };
        for event in ready {
            let _ = self.tx.send(event);
        }
        flush.durable.store(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Writes committed and fsyncs of the WAL made since the store was opened. With group commit
    /// the second grows more slowly than the first when writers arrive together.
    pub fn commit_stats(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.flush.syncs.load(Ordering::Relaxed),
        )
    }

    /// Drops the events that are neither among the last `history` nor younger than the age
    /// window, and in any case all but the last `history_max`.
    fn compact_locked(
        &self,
        conn: &mut Connection,
        rev: i64,
        now: std::time::Instant,
    ) -> Result<(), StoreError> {
        let aged = {
            let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
            marks.note(now, rev);
            marks.older_than(now, self.history_age)
        };
        let keep_from = (rev - self.history).min(aged).max(rev - self.history_max);
        if keep_from <= self.compacted_rev() {
            return Ok(());
        }
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM events WHERE rev <= ?1", [keep_from])?;
        tx.execute(
            "INSERT INTO meta(k, v) VALUES ('compacted', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            [keep_from],
        )?;
        tx.commit()?;
        self.compacted.store(keep_from, Ordering::SeqCst);
        Ok(())
    }

    /// Compacts history now, keeping what the retention settings keep.
    pub fn compact(&self) -> Result<(), StoreError> {
        self.compact_as_of(std::time::Instant::now())
    }

    /// Compacts history as if the time were `now` (tests age the history without waiting).
    pub fn compact_as_of(&self, now: std::time::Instant) -> Result<(), StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let rev = self.current_rev();
        self.compact_locked(&mut conn, rev, now)
    }

    /// Number of stored objects (all resources).
    pub fn count(&self) -> Result<i64, StoreError> {
        self.with_reader(|c| Ok(c.query_row("SELECT COUNT(*) FROM objects", [], |r| r.get(0))?))
    }

    /// Namespaced resource keys that have objects in `ns`.
    pub fn resources_in_namespace(&self, ns: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT res, name FROM objects WHERE ns = ?1")?;
            let rows = stmt.query_map([ns], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(dir: &Path, history: u64) -> Store {
        store_with(dir, history, Durability::Normal)
    }

    fn store_with(dir: &Path, history: u64, durability: Durability) -> Store {
        Store::open(&StoreConfig::by_count(
            dir.join("db.sqlite"),
            history,
            durability,
        ))
        .unwrap()
    }

    fn put(s: &Store, ns: &str, name: &str, data: i64) -> i64 {
        let e = s
            .modify::<StoreError>("/configmaps", ns, name, |_, _| {
                Ok(Change::Put(json!({"metadata": {"name": name, "namespace": ns, "uid": format!("u-{name}")}, "data": data})))
            })
            .unwrap()
            .unwrap();
        e.rev
    }

    fn names(p: &ListPage) -> Vec<String> {
        p.items
            .iter()
            .map(|v| v["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn revisions_are_monotonic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        assert_eq!(put(&s, "a", "x", 1), 1);
        assert_eq!(put(&s, "a", "y", 1), 2);
        let got = s.get("/configmaps", "a", "x").unwrap().unwrap();
        assert_eq!(got["metadata"]["resourceVersion"], "1");
        drop(s);
        let s = store(dir.path(), 100);
        assert_eq!(s.current_rev(), 2);
        assert_eq!(put(&s, "a", "z", 1), 3);
    }

    #[test]
    fn concurrent_writers_share_fsyncs_and_watchers_see_every_revision_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(store_with(dir.path(), 10_000, Durability::Full));
        let mut rx = s.subscribe();
        const THREADS: usize = 16;
        const EACH: usize = 50;
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let rev = put(&s, "a", &format!("t{t}-{i}"), i as i64);
                        // Acknowledged means on disk: no later sync is needed to cover it.
                        assert!(s.flush.durable.load(Ordering::SeqCst) >= rev);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let total = (THREADS * EACH) as u64;
        let (commits, syncs) = s.commit_stats();
        assert_eq!(commits, total);
        assert!(
            syncs >= 1 && syncs <= total,
            "{syncs} fsyncs for {total} commits"
        );
        let mut seen = Vec::new();
        while let Ok(e) = rx.try_recv() {
            seen.push(e.rev);
        }
        assert_eq!(seen, (1..=total as i64).collect::<Vec<_>>());
        assert!(s.flush.pending.lock().unwrap().is_empty());
        drop(rx);
        let s = Arc::into_inner(s).unwrap();
        drop(s);
        let s = store(dir.path(), 100);
        assert_eq!(s.current_rev(), total as i64);
        assert_eq!(s.count().unwrap(), total as i64);
    }

    #[test]
    fn writes_committed_during_an_fsync_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(store_with(dir.path(), 100, Durability::Full));
        let mut rx = s.subscribe();
        // Stand in for a long fsync: hold the sync slot while eight writers commit.
        let slot = s.flush.syncing.lock().unwrap();
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || put(&s, "a", &format!("w{t}"), t))
            })
            .collect();
        while s.current_rev() < 8 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Committed, visible to readers, but neither acknowledged nor announced.
        assert_eq!(s.count().unwrap(), 8);
        assert!(rx.try_recv().is_err());
        assert!(workers.iter().all(|w| !w.is_finished()));
        drop(slot);
        let mut revs: Vec<i64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        revs.sort();
        assert_eq!(revs, (1..=8).collect::<Vec<_>>());
        assert_eq!(s.commit_stats(), (8, 1), "one fsync covers all eight");
        let seen: Vec<i64> = std::iter::from_fn(|| rx.try_recv().ok().map(|e| e.rev)).collect();
        assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn containing_finds_only_objects_with_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        for (name, meta) in [
            ("plain", json!({"name": "plain"})),
            (
                "going",
                json!({"name": "going", "deletionTimestamp": "2026-12-03T00:00:00Z"}),
            ),
        ] {
            s.modify::<StoreError>("/pods", "a", name, |_, _| {
                Ok(Change::Put(json!({"metadata": meta})))
            })
            .unwrap();
        }
        let found = s.containing("\"deletionTimestamp\"").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "/pods");
        assert_eq!(found[0].1["metadata"]["name"], "going");
        assert!(s.containing("nowhere").unwrap().is_empty());
    }

    #[test]
    fn second_open_of_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = store(dir.path(), 100);
        let err = Store::open(&StoreConfig::by_count(
            dir.path().join("db.sqlite"),
            10,
            Durability::Normal,
        ))
        .unwrap_err();
        assert!(matches!(err, StoreError::Locked(..)), "{err}");
    }

    #[test]
    fn list_pages_and_past_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1000);
        for n in ["a", "b", "c", "d"] {
            put(&s, "ns", n, 1);
        }
        put(&s, "other", "e", 1);
        let at = s.current_rev();
        let p = s
            .list("/configmaps", Some("ns"), None, Some(2), None)
            .unwrap();
        assert_eq!(names(&p), vec!["a", "b"]);
        assert!(p.more);
        // Changes after the first page must not show in later pages read at the same revision.
        s.modify::<StoreError>("/configmaps", "ns", "c", |_, _| Ok(Change::Delete))
            .unwrap();
        put(&s, "ns", "bb", 1);
        put(&s, "ns", "d", 2);
        let p2 = s
            .list(
                "/configmaps",
                Some("ns"),
                Some(("ns", "b")),
                Some(10),
                Some(at),
            )
            .unwrap();
        assert_eq!(names(&p2), vec!["c", "d"]);
        assert_eq!(p2.items[1]["data"], 1);
        assert!(!p2.more);
        let now = s.list("/configmaps", None, None, None, None).unwrap();
        assert_eq!(names(&now), vec!["a", "b", "bb", "d", "e"]);
    }

    #[test]
    fn history_replay_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        for i in 0..30 {
            put(&s, "ns", &format!("o{i}"), i);
        }
        s.compact().unwrap();
        assert_eq!(s.compacted_rev(), 20);
        let ev = s.events_since(Some("/configmaps"), 25, 100).unwrap();
        assert_eq!(
            ev.iter().map(|e| e.rev).collect::<Vec<_>>(),
            vec![26, 27, 28, 29, 30]
        );
        assert!(matches!(
            s.events_since(None, 5, 100),
            Err(StoreError::Compacted { .. })
        ));
        assert!(matches!(
            s.list("/configmaps", None, None, None, Some(3)),
            Err(StoreError::Compacted { .. })
        ));
    }

    fn store_kept(dir: &Path, history: u64, seconds: u64, max: u64) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("db.sqlite"),
            history,
            history_seconds: seconds,
            history_max_events: max,
            durability: Durability::Normal,
        })
        .unwrap()
    }

    #[test]
    fn young_history_outlives_the_event_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_kept(dir.path(), 10, 300, 1_000);
        for i in 0..30 {
            put(&s, "ns", &format!("o{i}"), i);
        }
        // Past the count, but all younger than 300 s: a list paused at revision 3 goes on.
        let t0 = std::time::Instant::now();
        s.compact_as_of(t0).unwrap();
        assert_eq!(s.compacted_rev(), 0);
        let at3 = s.list("/configmaps", None, None, None, Some(3)).unwrap();
        assert_eq!(names(&at3), vec!["o0", "o1", "o2"]);
        assert_eq!(s.events_since(None, 0, 100).unwrap().len(), 30);
        // Five minutes on, the count rules again.
        s.compact_as_of(t0 + std::time::Duration::from_secs(301))
            .unwrap();
        assert_eq!(s.compacted_rev(), 20);
        assert!(matches!(
            s.list("/configmaps", None, None, None, Some(3)),
            Err(StoreError::Compacted { .. })
        ));
        // Writes after the mark are young: kept although past the count.
        for i in 30..45 {
            put(&s, "ns", &format!("o{i}"), i);
        }
        s.compact_as_of(t0 + std::time::Duration::from_secs(302))
            .unwrap();
        assert_eq!(s.compacted_rev(), 30);
    }

    #[test]
    fn young_history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = store_kept(dir.path(), 10, 300, 50);
        for i in 0..120 {
            put(&s, "ns", &format!("o{i}"), i);
        }
        s.compact().unwrap();
        assert_eq!(s.compacted_rev(), 70);
        assert_eq!(s.events_since(None, 70, 1_000).unwrap().len(), 50);
    }

    #[test]
    fn failed_closure_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        put(&s, "ns", "a", 1);
        let r = s.modify::<StoreError>("/configmaps", "ns", "a", |_, _| {
            Err(StoreError::Compacted {
                requested: 0,
                compacted: 0,
            })
        });
        assert!(r.is_err());
        assert_eq!(s.current_rev(), 1);
        assert_eq!(s.get("/configmaps", "ns", "a").unwrap().unwrap()["data"], 1);
    }

    #[test]
    fn owner_index_follows_owner_references() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        s.modify::<StoreError>("/pods", "ns", "p", |_, _| {
            Ok(Change::Put(json!({"metadata": {"name": "p", "uid": "pu", "ownerReferences": [{"uid": "owner-1"}]}})))
        })
        .unwrap();
        assert_eq!(
            s.dependents("owner-1").unwrap(),
            vec![("/pods".into(), "ns".into(), "p".into())]
        );
        s.modify::<StoreError>("/pods", "ns", "p", |_, _| Ok(Change::Delete))
            .unwrap();
        assert!(s.dependents("owner-1").unwrap().is_empty());
    }
}
