//! The edge's durable outbox: messages for the cloud, kept in SQLite until the cloud
//! acknowledges them, so status and events produced offline (or before a crash) are delivered
//! on reconnect.
//!
//! Bounded by `capacity` messages. Drop policy when full, per [`Policy`]:
//! - `LatestWins` (node and pod status, leases, twin state): at most one entry per object; a new
//!   one replaces the old, so these never fill the outbox on their own.
//! - `Append` (events, reports): kept in order; when the outbox is full the oldest `Append`
//!   entries are dropped first. If only `LatestWins` entries remain, the oldest of those go.
//!
//! Every drop is counted and logged.
//!
//! The outbox holds a few kilobytes but is written on every report (a push and, once acked, a
//! delete): SQLite's default WAL of 1,000 pages would make it a 4 MiB file that each commit
//! appends to for a thousand commits before rewinding, on every node (flash wear on a device; on a
//! machine running thousands of hollow agents, gigabytes of page cache written back). The WAL is
//! checkpointed every [`WAL_PAGES`] pages instead and cut back to that size.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use crate::TunnelError;
use crate::message::Message;

/// How an outbox entry behaves when newer ones arrive or the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One entry per object (the route's resource); newest wins.
    LatestWins,
    /// Every entry kept, oldest dropped first when full.
    Append,
}

/// The outbox.
pub struct Outbox {
    db: Mutex<Connection>,
    capacity: usize,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// WAL pages between checkpoints; the WAL file is truncated to this size after one.
pub const WAL_PAGES: u32 = 64;

/// The most page cache (KiB) an edge store's connection keeps. SQLite's default is 2,000 KiB
/// per connection, filled as the database grows; an agent has two stores, and the file's
/// pages are in the OS page cache anyway.
pub const CACHE_KIB: i64 = 256;

/// Keeps `db`'s WAL to [`WAL_PAGES`]: checkpointed past that, and the file truncated to it.
///
/// SQLite's defaults (a checkpoint every 1,000 pages, the file never shrunk) leave up to 4 MiB
/// of WAL per database, and a process killed without closing leaves it all: the next open reads
/// the whole WAL to index it. An edge node's stores hold little; measured with 10,000 hollow
/// nodes, their WALs (1.5 MiB each for a meta store holding a few objects) made a restart read
/// 15 GB and the nodes missed their hello deadline for minutes.
///
/// Its page cache is held to [`CACHE_KIB`] as well.
pub fn cap_wal(db: &Connection) -> rusqlite::Result<()> {
    db.pragma_update(None, "cache_size", -CACHE_KIB)?;
    db.pragma_update(None, "wal_autocheckpoint", WAL_PAGES)?;
    let page: i64 = db.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    db.pragma_update(None, "journal_size_limit", page * i64::from(WAL_PAGES))
}

fn err(e: rusqlite::Error) -> TunnelError {
    TunnelError::Store(format!("outbox: {e}"))
}

impl Outbox {
    /// Opens (creating) the outbox at `path`.
    pub fn open(path: &Path, capacity: usize) -> Result<Outbox, TunnelError> {
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS outbox (
               seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
               key TEXT NOT NULL, latest INTEGER NOT NULL, body BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS outbox_key ON outbox (key, latest);",
        )
        .map_err(err)?;
        cap_wal(&db).map_err(err)?;
        Ok(Outbox {
            db: Mutex::new(db),
            capacity: capacity.max(1),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a message (blocking). Returns how many older entries were dropped for room.
    pub fn push(&self, msg: &Message, policy: Policy) -> Result<usize, TunnelError> {
        let mut db = self.db();
        let tx = db.transaction().map_err(err)?;
        let latest = policy == Policy::LatestWins;
        if latest {
            tx.prepare_cached("DELETE FROM outbox WHERE key = ?1 AND latest = 1")
                .and_then(|mut st| st.execute(params![msg.route.resource]))
                .map_err(err)?;
        }
        // Statements prepared once per connection: every report and every ack passes here.
        tx.prepare_cached("INSERT INTO outbox (id, key, latest, body) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut st| {
                st.execute(params![
                    msg.id,
                    msg.route.resource,
                    latest,
                    msg.encode().as_ref()
                ])
            })
            .map_err(err)?;
        let count: i64 = tx
            .prepare_cached("SELECT count(*) FROM outbox")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(err)?;
        let over = (count as usize).saturating_sub(self.capacity);
        let mut dropped = 0;
        if over > 0 {
            dropped += tx
                .execute(
                    "DELETE FROM outbox WHERE seq IN
                       (SELECT seq FROM outbox WHERE latest = 0 ORDER BY seq LIMIT ?1)",
                    params![over as i64],
                )
                .map_err(err)?;
            if dropped < over {
                dropped += tx
                    .execute(
                        "DELETE FROM outbox WHERE seq IN
                           (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                        params![(over - dropped) as i64],
                    )
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                capacity = self.capacity,
                "edge outbox full: dropped the oldest entries"
            );
        }
        Ok(dropped)
    }

    /// Up to `limit` entries after sequence number `after`, oldest first (blocking).
    pub fn after(&self, after: i64, limit: usize) -> Result<Vec<(i64, Message)>, TunnelError> {
        let db = self.db();
        let mut st = db
            .prepare_cached("SELECT seq, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(err)?;
        let rows = st
            .query_map(params![after, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(err)?;
            match Message::decode(&body) {
                Ok(m) => out.push((seq, m)),
                Err(e) => tracing::error!(seq, error = %e, "unreadable outbox entry skipped"),
            }
        }
        Ok(out)
    }

    /// Removes an acknowledged entry by message id (blocking). Returns whether it was there.
    pub fn remove(&self, id: &str) -> Result<bool, TunnelError> {
        Ok(self
            .db()
            .prepare_cached("DELETE FROM outbox WHERE id = ?1")
            .and_then(|mut st| st.execute(params![id]))
            .map_err(err)?
            > 0)
    }

    /// Entries waiting.
    pub fn len(&self) -> Result<usize, TunnelError> {
        self.db()
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(err)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> Result<bool, TunnelError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::op;

    fn status(key: &str, v: &str) -> Message {
        Message::new("resource", op::UPDATE, key, v.to_string())
    }

    #[test]
    fn the_wal_stays_small_however_many_reports_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let ob = Outbox::open(&path, 100).unwrap();
        let wal = dir.path().join("outbox.db-wal");
        let mut largest = 0;
        // A node's Lease and status reports for a few hours: pushed, then acked.
        for i in 0..3000 {
            let m = status(
                &format!("kube-node-lease/lease/n{}", i % 3),
                &"x".repeat(300),
            );
            ob.push(&m, Policy::LatestWins).unwrap();
            ob.remove(&m.id).unwrap();
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        assert!(ob.is_empty().unwrap());
        // SQLite's default would let it reach 1,000 pages (4 MiB).
        let bound = 4096 * (u64::from(WAL_PAGES) + 16);
        assert!(
            largest > 0 && largest <= bound,
            "WAL reached {largest} bytes (bound {bound})"
        );
    }

    #[test]
    fn latest_wins_and_append_drop_policies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let ob = Outbox::open(&path, 3).unwrap();
        ob.push(&status("default/podstatus/a", "1"), Policy::LatestWins)
            .unwrap();
        ob.push(&status("default/podstatus/a", "2"), Policy::LatestWins)
            .unwrap();
        assert_eq!(ob.len().unwrap(), 1);
        ob.push(&status("default/event/e1", "x"), Policy::Append)
            .unwrap();
        ob.push(&status("default/event/e2", "y"), Policy::Append)
            .unwrap();
        // Full: the oldest event goes, the status stays.
        assert_eq!(
            ob.push(&status("default/event/e3", "z"), Policy::Append)
                .unwrap(),
            1
        );
        let all = ob.after(0, 10).unwrap();
        let keys: Vec<_> = all.iter().map(|(_, m)| m.route.resource.as_str()).collect();
        assert_eq!(
            keys,
            [
                "default/podstatus/a",
                "default/event/e2",
                "default/event/e3"
            ]
        );
        assert_eq!(all[0].1.content, "2");
        // Survives a reopen; removal by id.
        drop(ob);
        let ob = Outbox::open(&path, 3).unwrap();
        let all = ob.after(0, 10).unwrap();
        assert!(ob.remove(&all[1].1.id).unwrap());
        assert!(!ob.remove(&all[1].1.id).unwrap());
        assert_eq!(ob.after(all[0].0, 10).unwrap().len(), 1);
    }
}
