//! The meta manager's store: every object the cloud sent, in SQLite (WAL, synchronous=FULL),
//! written before the channel acknowledges it; plus edged's container records, so that a
//! restarted agent finds its processes again.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use sedge_tunnel::message::not_newer;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("edge store {path}: {source}")]
    Sql {
        /// The database file.
        path: String,
        /// Cause.
        source: rusqlite::Error,
    },
}

/// How many changes a local watcher may fall behind before it is told it missed some (and
/// lists again). The broadcast ring holds this many slots from the start, per agent: a slot
/// is a pointer now; holding the whole change it was about 600 KiB of every agent's memory,
/// most of a hollow node's in the scale benchmark.
pub const CHANGES_QUEUED: usize = 4096;

/// A change to the store, published to local watchers (edged, the MetaServer, edge modules),
/// shared (`Arc`): each watcher's receive is a reference, not a copy of the object.
#[derive(Debug, Clone)]
pub struct Change {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind_of_change: &'static str,
    /// Resource kind (`pod`, `configmap`, ...).
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object (the last known one for deletes).
    pub object: Value,
    /// The store's local revision after the change.
    pub revision: u64,
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored (new or newer).
    Stored,
    /// Not newer than what is stored: ignored (a duplicate delivery).
    Stale,
    /// Removed.
    Deleted,
    /// A delete of something not held.
    Absent,
}

/// A container edged started, as recorded for a restarted agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub name: String,
    /// Process id (or runtime id) of the running instance, 0 when none.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (guards against pid reuse).
    pub start_ticks: u64,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Restarts so far.
    pub restarts: i32,
    /// The last terminated state (JSON `ContainerStateTerminated`), if any.
    pub last_terminated: Option<Value>,
    /// Hash of the container spec it was started from.
    pub spec_hash: String,
    /// The runtime's id of the running instance (a CRI container id), empty when none or for
    /// processes (their pid and start time say it).
    #[serde(default)]
    pub container_id: String,
}

/// The edge's SQLite store.
pub struct MetaStore {
    conn: Mutex<Connection>,
    path: String,
    changes: broadcast::Sender<Arc<Change>>,
    writes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("path", &self.path)
            .finish()
    }
}

impl MetaStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<MetaStore, StoreError> {
        let p = path.display().to_string();
        let err = |source| StoreError::Sql {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS meta (
                kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                rv TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, namespace, name));
             CREATE TABLE IF NOT EXISTS containers (
                pod_uid TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
                PRIMARY KEY (pod_uid, name));
             CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER NOT NULL);
             INSERT OR IGNORE INTO revision VALUES (0, 0);",
        )
        .map_err(err)?;
        sedge_tunnel::outbox::cap_wal(&conn).map_err(err)?;
        Ok(MetaStore {
            conn: Mutex::new(conn),
            path: p,
            changes: broadcast::channel(CHANGES_QUEUED).0,
            writes: Default::default(),
        })
    }

    /// Objects stored or deleted since the store was opened (for `/metrics`).
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn wrote(&self) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// The local revision (bumped by every change).
    pub fn revision(&self) -> Result<u64, StoreError> {
        let c = self.conn.lock().unwrap();
        c.prepare_cached("SELECT rev FROM revision")
            .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            .map(|r| r as u64)
            .map_err(self.err())
    }

    /// Stores `object` unless what is stored is newer; returns what happened.
    pub fn upsert(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        rv: &str,
        object: &Value,
    ) -> Result<Applied, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction().map_err(self.err())?;
        let current = column(&tx, "rv", kind, ns, name).map_err(self.err())?;
        if let Some(cur) = &current
            && not_newer(rv, cur)
        {
            return Ok(Applied::Stale);
        }
        tx.prepare_cached(
            "INSERT INTO meta VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(kind, namespace, name) DO UPDATE SET rv=excluded.rv, value=excluded.value",
        )
        .and_then(|mut st| st.execute(params![kind, ns, name, rv, object.to_string()]))
        .map_err(self.err())?;
        let rev = bump(&tx).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        self.wrote();
        drop(c);
        let _ = self.changes.send(Arc::new(Change {
            kind_of_change: if current.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            object: object.clone(),
            revision: rev,
        }));
        Ok(Applied::Stored)
    }

    /// Removes an object.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) -> Result<Applied, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction().map_err(self.err())?;
        let old = column(&tx, "value", kind, ns, name).map_err(self.err())?;
        let Some(old) = old else {
            return Ok(Applied::Absent);
        };
        tx.prepare_cached("DELETE FROM meta WHERE kind=?1 AND namespace=?2 AND name=?3")
            .and_then(|mut st| st.execute(params![kind, ns, name]))
            .map_err(self.err())?;
        let rev = bump(&tx).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        drop(c);
        self.wrote();
        let _ = self.changes.send(Arc::new(Change {
            kind_of_change: "DELETED",
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            object: serde_json::from_str(&old).unwrap_or(Value::Null),
            revision: rev,
        }));
        Ok(Applied::Deleted)
    }

    /// One object.
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Result<Option<Value>, StoreError> {
        let c = self.conn.lock().unwrap();
        let v = column(&c, "value", kind, ns, name).map_err(self.err())?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// What the cloud delivered and the node holds, `<namespace>/<kind>/<name>` -> resourceVersion:
    /// every object but the node's own Node, which the node writes itself. Sent in the hello so
    /// whichever cloud core serves the node knows what it has.
    pub fn inventory(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c
            .prepare_cached("SELECT namespace, kind, name, rv FROM meta WHERE kind != ?1")
            .map_err(self.err())?;
        let rows = st
            .query_map(params![sedge_api::kind::NODE], |r| {
                Ok((
                    format!(
                        "{}/{}/{}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?
                    ),
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// All objects of a kind, in one namespace or all.
    pub fn list(&self, kind: &str, ns: Option<&str>) -> Result<Vec<Value>, StoreError> {
        let c = self.conn.lock().unwrap();
        json_rows(
            &c,
            "SELECT value FROM meta WHERE kind=?1 AND (?2 IS NULL OR namespace=?2) ORDER BY namespace, name",
            params![kind, ns],
        )
        .map_err(self.err())
    }

    /// Records a container.
    pub fn save_container(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        c.prepare_cached(
            "INSERT INTO containers VALUES (?1, ?2, ?3)
             ON CONFLICT(pod_uid, name) DO UPDATE SET record=excluded.record",
        )
        .and_then(|mut st| {
            st.execute(params![
                rec.pod_uid,
                rec.name,
                serde_json::to_string(rec).unwrap_or_default()
            ])
        })
        .map_err(self.err())?;
        Ok(())
    }

    /// A pod's container records.
    pub fn containers(&self, pod_uid: &str) -> Result<Vec<ContainerRecord>, StoreError> {
        let c = self.conn.lock().unwrap();
        json_rows(
            &c,
            "SELECT record FROM containers WHERE pod_uid=?1",
            params![pod_uid],
        )
        .map_err(self.err())
    }

    /// Pod UIDs that have container records.
    pub fn recorded_pods(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c
            .prepare_cached("SELECT DISTINCT pod_uid FROM containers")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Forgets a pod's containers.
    pub fn forget_containers(&self, pod_uid: &str) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        c.prepare_cached("DELETE FROM containers WHERE pod_uid=?1")
            .and_then(|mut st| st.execute(params![pod_uid]))
            .map_err(self.err())?;
        Ok(())
    }
}

/// Waits for the next change to an object of `kind` (or for changes that were missed, which
/// may have been one); false once the store is gone. Cancel-safe, for `select!` loops that
/// list `kind` again on a change instead of every so often.
pub async fn next_change_of(changes: &mut broadcast::Receiver<Arc<Change>>, kind: &str) -> bool {
    use broadcast::error::RecvError;
    loop {
        match changes.recv().await {
            Ok(c) if c.kind != kind => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => return true,
            Err(RecvError::Closed) => return false,
        }
    }
}

/// Skips the changes queued so far (a listing about to be made covers them all: one pass for
/// a burst); false once the store is gone.
pub fn skip_queued(changes: &mut broadcast::Receiver<Arc<Change>>) -> bool {
    use broadcast::error::TryRecvError;
    loop {
        match changes.try_recv() {
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Closed) => return false,
        }
    }
}

/// The rows of a one-column query of JSON documents, decoded (rows that do not decode are skipped).
/// Statements are prepared once per connection and kept (edged lists the pods on every change).
fn json_rows<T: serde::de::DeserializeOwned>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<Vec<T>> {
    let mut st = c.prepare_cached(sql)?;
    let rows = st.query_map(p, |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(v) = serde_json::from_str(&r?) {
            out.push(v);
        }
    }
    Ok(out)
}

/// One column (`rv` or `value`) of one stored object.
fn column(
    c: &Connection,
    col: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> rusqlite::Result<Option<String>> {
    c.prepare_cached(&format!(
        "SELECT {col} FROM meta WHERE kind=?1 AND namespace=?2 AND name=?3"
    ))?
    .query_row(params![kind, ns, name], |r| r.get(0))
    .optional()
}

fn bump(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    tx.prepare_cached("UPDATE revision SET rev = rev + 1")?
        .execute([])?;
    tx.prepare_cached("SELECT rev FROM revision")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|r| r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_inventory_lists_what_the_cloud_delivered_by_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&dir.path().join("edge.db")).unwrap();
        s.upsert("pod", "default", "a", "5", &json!({})).unwrap();
        s.upsert("configmap", "ml", "cfg", "7", &json!({})).unwrap();
        s.upsert("configmap", "ml", "old", "3", &json!({})).unwrap();
        s.delete("configmap", "ml", "old").unwrap();
        // The node's own Node object is the node's, not the cloud's.
        let node = sedge_api::kind::NODE;
        s.upsert(node, sedge_api::CLUSTER_NS, "edge-1", "9", &json!({}))
            .unwrap();
        let held = s.inventory().unwrap();
        let want: std::collections::HashMap<String, String> = [
            ("default/pod/a".to_string(), "5".to_string()),
            ("ml/configmap/cfg".to_string(), "7".to_string()),
        ]
        .into();
        assert_eq!(held, want);
        // The keys are the cloud's message keys.
        for k in held.keys() {
            assert_eq!(&sedge_api::Key::parse(k).unwrap().to_string(), k);
        }
    }

    #[tokio::test]
    async fn a_listing_wakes_on_a_change_of_its_kind_only_and_once_per_burst() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&dir.path().join("edge.db")).unwrap();
        let mut rx = s.subscribe();
        let soon = |rx: &mut broadcast::Receiver<Arc<Change>>| {
            let mut rx = rx.resubscribe();
            async move {
                tokio::time::timeout(Duration::from_millis(200), next_change_of(&mut rx, "pod"))
                    .await
            }
        };
        // Other kinds (the node's own status every minute, config maps) do not wake it.
        s.upsert("node", "", "edge-1", "1", &json!({})).unwrap();
        s.upsert("configmap", "ml", "cfg", "1", &json!({})).unwrap();
        let waiter = tokio::spawn(soon(&mut rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.upsert("configmap", "ml", "cfg", "2", &json!({})).unwrap();
        assert!(waiter.await.unwrap().is_err(), "woken by a config map");
        // A pod does, also behind other kinds.
        let waiter = tokio::spawn(soon(&mut rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.upsert("configmap", "ml", "cfg", "3", &json!({})).unwrap();
        s.upsert("pod", "default", "a", "1", &json!({})).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(true));
        // A burst queued before a listing is skipped as a whole: the listing covers it.
        for i in 2..50 {
            s.upsert("pod", "default", "a", &i.to_string(), &json!({}))
                .unwrap();
        }
        assert!(skip_queued(&mut rx));
        let left = tokio::time::timeout(Duration::from_millis(200), next_change_of(&mut rx, "pod"));
        assert!(left.await.is_err(), "a queued change left over");
        // The store gone: the loops end.
        drop(s);
        assert!(!skip_queued(&mut rx));
        assert!(!next_change_of(&mut rx, "pod").await);
    }

    #[test]
    fn the_wal_stays_small_so_a_restart_reads_little() {
        // SQLite's defaults let a WAL grow to 4 MiB (1,000 pages) and never shrink it; a node
        // killed without closing its store left all of it to be read at the next start.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        let s = MetaStore::open(&path).unwrap();
        let status = json!({"status": "x".repeat(2048)});
        for i in 0..3000 {
            // The same few objects written over and over, as node status and pods are.
            s.upsert(
                "pod",
                "default",
                &format!("p{}", i % 5),
                &i.to_string(),
                &status,
            )
            .unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("edge.db-wal"))
            .unwrap()
            .len();
        let page = 4096 + 24;
        assert!(
            wal <= 2 * u64::from(sedge_tunnel::outbox::WAL_PAGES) * page,
            "the WAL is {wal} bytes after 3,000 writes of 5 objects"
        );
        // Its page cache is capped too (SQLite's default grows to 2,000 KiB per connection).
        let cache: i64 = s
            .conn
            .lock()
            .unwrap()
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cache, -sedge_tunnel::outbox::CACHE_KIB);
        drop(s);
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(s.list("pod", None).unwrap().len(), 5);
    }

    #[test]
    fn keeps_the_newest_version_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        let s = MetaStore::open(&path).unwrap();
        let mut rx = s.subscribe();
        assert_eq!(
            s.upsert("pod", "default", "a", "5", &json!({"v": 5}))
                .unwrap(),
            Applied::Stored
        );
        assert_eq!(
            s.upsert("pod", "default", "a", "4", &json!({"v": 4}))
                .unwrap(),
            Applied::Stale
        );
        assert_eq!(
            s.upsert("pod", "default", "a", "5", &json!({"v": 5}))
                .unwrap(),
            Applied::Stale
        );
        assert_eq!(
            s.upsert("pod", "default", "a", "7", &json!({"v": 7}))
                .unwrap(),
            Applied::Stored
        );
        assert_eq!(
            s.upsert("configmap", "default", "c", "1", &json!({}))
                .unwrap(),
            Applied::Stored
        );
        assert_eq!(rx.try_recv().unwrap().kind_of_change, "ADDED");
        assert_eq!(rx.try_recv().unwrap().kind_of_change, "MODIFIED");
        drop(s);
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(s.get("pod", "default", "a").unwrap().unwrap()["v"], 7);
        assert_eq!(s.list("pod", None).unwrap().len(), 1);
        assert_eq!(s.list("pod", Some("other")).unwrap().len(), 0);
        assert_eq!(s.delete("pod", "default", "a").unwrap(), Applied::Deleted);
        assert_eq!(s.delete("pod", "default", "a").unwrap(), Applied::Absent);
        assert_eq!(s.revision().unwrap(), 4);
        let rec = ContainerRecord {
            pod_uid: "u".into(),
            name: "c".into(),
            pid: 42,
            start_ticks: 7,
            started_at: "2026-01-01T00:00:00Z".into(),
            restarts: 2,
            last_terminated: None,
            spec_hash: "h".into(),
            container_id: String::new(),
        };
        s.save_container(&rec).unwrap();
        assert_eq!(s.containers("u").unwrap(), vec![rec]);
        assert_eq!(s.recorded_pods().unwrap(), vec!["u".to_string()]);
        s.forget_containers("u").unwrap();
        assert!(s.containers("u").unwrap().is_empty());
    }
}
