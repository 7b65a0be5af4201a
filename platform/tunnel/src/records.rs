//! Delivery records: per (node, object), the last resourceVersion the node acknowledged.
//!
//! This is KubeEdge's ObjectSync, kept in the hub's SQLite database instead of one custom
//! resource per (node, object). It lets the hub skip what a node already has (after a reconnect
//! or a hub restart, callers offer everything and only what changed is sent) and tells callers
//! which objects a node holds, so that objects deleted while the node was away get deletes.
//!
//! Writes go to one thread that commits them in batches (acks arrive at tens of thousands per
//! second in the benchmark); reads are per node, when a node first appears.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use crate::TunnelError;

enum Op {
    Set(String, String, String),
    Remove(String, String),
    Replace(String, HashMap<String, String>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The delivery record store.
pub struct Records {
    tx: Mutex<std::sync::mpsc::Sender<Op>>,
    read: Mutex<Connection>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;
  CREATE TABLE IF NOT EXISTS acked (node TEXT NOT NULL, key TEXT NOT NULL, rv TEXT NOT NULL,
    PRIMARY KEY (node, key)) WITHOUT ROWID;";

impl Records {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Records, TunnelError> {
        let err = |e: rusqlite::Error| TunnelError::Store(format!("{}: {e}", path.display()));
        let write = Connection::open(path).map_err(err)?;
        write.execute_batch(SCHEMA).map_err(err)?;
        let read = Connection::open(path).map_err(err)?;
        read.execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(err)?;
        let (tx, rx) = std::sync::mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("tunnel-records".into())
            .spawn(move || writer(write, rx))
            .map_err(|e| TunnelError::Store(format!("starting the record writer: {e}")))?;
        Ok(Records {
            tx: Mutex::new(tx),
            read: Mutex::new(read),
        })
    }

    fn send(&self, op: Op) {
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(op);
    }

    /// Records that `node` acknowledged `key` at `rv`.
    pub fn set(&self, node: &str, key: &str, rv: &str) {
        self.send(Op::Set(node.into(), key.into(), rv.into()));
    }

    /// Forgets `key` on `node` (it acknowledged the delete).
    pub fn remove(&self, node: &str, key: &str) {
        self.send(Op::Remove(node.into(), key.into()));
    }

    /// Replaces everything recorded for `node` with `held` (what the node says it holds).
    pub fn replace(&self, node: &str, held: HashMap<String, String>) {
        self.send(Op::Replace(node.into(), held));
    }

    /// Waits until every earlier write is committed.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(Op::Flush(tx));
        let _ = rx.recv();
    }

    /// Everything `node` has acknowledged (blocking; call from `spawn_blocking`).
    pub fn load(&self, node: &str) -> Result<HashMap<String, String>, TunnelError> {
        let db = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let err = |e: rusqlite::Error| TunnelError::Store(e.to_string());
        let mut st = db
            .prepare_cached("SELECT key, rv FROM acked WHERE node = ?1")
            .map_err(err)?;
        let rows = st
            .query_map(params![node], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Everything every node has acknowledged, in one read (blocking; call from
    /// `spawn_blocking`).
    pub fn load_all(&self) -> Result<HashMap<String, HashMap<String, String>>, TunnelError> {
        let db = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let err = |e: rusqlite::Error| TunnelError::Store(e.to_string());
        let mut st = db.prepare("SELECT node, key, rv FROM acked").map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        let mut all: HashMap<String, HashMap<String, String>> = HashMap::new();
        while let Some(r) = rows.next().map_err(err)? {
            let node: String = r.get(0).map_err(err)?;
            all.entry(node)
                .or_default()
                .insert(r.get(1).map_err(err)?, r.get(2).map_err(err)?);
        }
        Ok(all)
    }
}

fn writer(mut db: Connection, rx: std::sync::mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 20_000 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut waiters = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = db.transaction()?;
            {
                let mut set = tx.prepare_cached(
                    "INSERT INTO acked (node, key, rv) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node, key) DO UPDATE SET rv = excluded.rv",
                )?;
                let mut del =
                    tx.prepare_cached("DELETE FROM acked WHERE node = ?1 AND key = ?2")?;
                let mut clear = tx.prepare_cached("DELETE FROM acked WHERE node = ?1")?;
                for op in batch.drain(..) {
                    match op {
                        Op::Set(n, k, v) => {
                            set.execute(params![n, k, v])?;
                        }
                        Op::Remove(n, k) => {
                            del.execute(params![n, k])?;
                        }
                        Op::Replace(n, held) => {
                            clear.execute(params![n])?;
                            for (k, v) in held {
                                set.execute(params![n, k, v])?;
                            }
                        }
                        Op::Flush(w) => waiters.push(w),
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            // Losing a record only means a resend later (delivery is at-least-once).
            tracing::error!(error = %e, "writing delivery records failed");
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_persist_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let r = Records::open(&path).unwrap();
        r.set("edge-1", "default/pod/a", "5");
        r.set("edge-1", "default/pod/a", "7");
        r.set("edge-1", "default/pod/b", "3");
        r.set("edge-2", "default/pod/a", "9");
        r.remove("edge-1", "default/pod/b");
        r.flush();
        drop(r);
        let r = Records::open(&path).unwrap();
        let one = r.load("edge-1").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one["default/pod/a"], "7");
        assert_eq!(r.load("edge-2").unwrap()["default/pod/a"], "9");
        assert!(r.load("edge-3").unwrap().is_empty());
        // What a restarted hub reads at once: every node's, the same as one at a time.
        let all = r.load_all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["edge-1"], one);
        assert_eq!(all["edge-2"], r.load("edge-2").unwrap());
    }
}
