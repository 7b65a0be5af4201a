//! Garbage collection and namespace cleanup, driven by the store's change stream:
//! - dependents whose owners are all gone are deleted (background propagation);
//! - `foregroundDeletion`: dependents are deleted first, then the owner;
//! - `orphan`: dependents lose their owner reference, then the owner goes;
//! - a terminating namespace is emptied, then removed.
//!
//! A full sweep runs at start (catching up on deletions that happened while the server was down),
//! after the change stream lags (at most every [`LAG_SWEEP_GAP`]), and every 30 seconds as a
//! safety net. Only deletions and objects being deleted are looked at on the change stream; the
//! rest (node heartbeats, status updates: almost every write) is skipped without leaving the
//! stream's task, so it keeps up. Before, every event went through the blocking pool one at a
//! time; under 1,000 heartbeats a second the stream lagged all the time and each lag started a
//! full sweep: a quarter of the cloud's CPU, measured.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, ApiResult};
use crate::ops::{self, Core, DeleteOpts};
use crate::registry::ResourceType;
use crate::store::{Change, Event, EventType};

const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// After a lag of the change stream, a sweep runs at most this long after the previous one.
pub const LAG_SWEEP_GAP: Duration = Duration::from_secs(5);

/// Whether a change can give the collector work: a deletion (dependents, a foreground owner, a
/// terminating namespace may be waiting for it) or an object marked for deletion.
fn needs_collecting(ev: &Event) -> bool {
    ev.kind == EventType::Deleted || ev.object["metadata"]["deletionTimestamp"].is_string()
}

/// Runs until `shutdown` flips.
pub async fn run(core: Arc<Core>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut rx = core.store.subscribe();
    sweep(&core).await;
    let mut last_sweep = tokio::time::Instant::now();
    let mut lagged = false;
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    ticker.tick().await;
    loop {
        let due = last_sweep + LAG_SWEEP_GAP;
        tokio::select! {
            r = rx.recv() => match r {
                Ok(ev) if needs_collecting(&ev) => {
                    let c = core.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || handle(&c, &ev)).await.unwrap_or(Ok(())) {
                        tracing::warn!(error = %e, "garbage collection step failed; the next sweep retries");
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(due), if lagged => {
                sweep(&core).await;
                (lagged, last_sweep) = (false, tokio::time::Instant::now());
            }
            _ = ticker.tick() => {
                sweep(&core).await;
                (lagged, last_sweep) = (false, tokio::time::Instant::now());
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn sweep(core: &Arc<Core>) {
    core.gc_sweeps
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let c = core.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || sweep_now(&c))
        .await
        .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %e, "garbage collection sweep failed");
    }
}

fn rt_for(core: &Core, key: &str) -> Option<Arc<ResourceType>> {
    core.registry
        .snapshot()
        .types()
        .iter()
        .find(|t| t.storage_key() == key)
        .cloned()
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// One pass over everything that may need collecting.
pub fn sweep_now(core: &Core) -> ApiResult<()> {
    let mut owners: Vec<String> = core
        .store
        .all_owned()?
        .into_iter()
        .map(|(o, ..)| o)
        .collect();
    owners.sort();
    owners.dedup();
    for owner in owners {
        if core.store.get_by_uid(&owner)?.is_none() {
            owner_gone(core, &owner)?;
        }
    }
    // Only objects whose JSON holds the key are read and parsed: listing every object of every
    // type each sweep was a quarter of the cloud's CPU at 10,000 heartbeating nodes.
    for (res, obj) in core.store.containing("\"deletionTimestamp\"")? {
        if obj["metadata"]["deletionTimestamp"].is_string() && rt_for(core, &res).is_some() {
            deleting(core, &res, &obj)?;
        }
    }
    Ok(())
}

fn handle(core: &Core, ev: &Event) -> ApiResult<()> {
    match ev.kind {
        EventType::Deleted => {
            if let Some(uid) = ev.object["metadata"]["uid"].as_str() {
                owner_gone(core, uid)?;
            }
            // An owner in foreground deletion may be waiting for this dependent.
            for r in ev.object["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some((res, _, _, owner)) = core
                    .store
                    .get_by_uid(r["uid"].as_str().unwrap_or_default())?
                    && owner["metadata"]["deletionTimestamp"].is_string()
                {
                    deleting(core, &res, &owner)?;
                }
            }
            if !ev.namespace.is_empty()
                && let Some(ns) = core.store.get("/namespaces", "", &ev.namespace)?
                && ns["metadata"]["deletionTimestamp"].is_string()
            {
                deleting(core, "/namespaces", &ns)?;
            }
        }
        EventType::Added | EventType::Modified => {
            if ev.object["metadata"]["deletionTimestamp"].is_string() {
                deleting(core, &ev.resource, &ev.object)?;
            }
        }
    }
    Ok(())
}

fn delete_background(core: &Core, res: &str, ns: &str, name: &str) -> ApiResult<()> {
    let Some(rt) = rt_for(core, res) else {
        core.store
            .modify::<ApiError>(res, ns, name, |_, _| Ok(Change::Delete))?;
        return Ok(());
    };
    let ns = if ns.is_empty() { None } else { Some(ns) };
    match ops::delete(
        core,
        &rt,
        rt.preferred_version(),
        ns,
        name,
        &DeleteOpts::default(),
    ) {
        Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Dependents of a vanished owner: deleted when no other owner remains, else unlinked.
fn owner_gone(core: &Core, owner_uid: &str) -> ApiResult<()> {
    for (res, ns, name) in core.store.dependents(owner_uid)? {
        let Some(obj) = core.store.get(&res, &ns, &name)? else {
            continue;
        };
        let refs = obj["metadata"]["ownerReferences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut remaining = Vec::new();
        for r in &refs {
            let uid = r["uid"].as_str().unwrap_or_default();
            if uid != owner_uid && core.store.get_by_uid(uid)?.is_some() {
                remaining.push(r.clone());
            }
        }
        if remaining.is_empty() {
            tracing::debug!(%res, %ns, %name, owner = owner_uid, "collecting dependent of a deleted owner");
            delete_background(core, &res, &ns, &name)?;
        } else {
            unlink(core, &res, &ns, &name, owner_uid)?;
        }
    }
    Ok(())
}

fn unlink(core: &Core, res: &str, ns: &str, name: &str, owner_uid: &str) -> ApiResult<()> {
    core.store.modify::<ApiError>(res, ns, name, |cur, _| {
        let Some(mut obj) = cur else {
            return Ok(Change::Unchanged);
        };
        let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() else {
            return Ok(Change::Unchanged);
        };
        let before = refs.len();
        refs.retain(|r| r["uid"].as_str() != Some(owner_uid));
        if refs.len() == before {
            return Ok(Change::Unchanged);
        }
        if refs.is_empty() {
            obj["metadata"]
                .as_object_mut()
                .expect("object")
                .remove("ownerReferences");
        }
        Ok(Change::Put(obj))
    })?;
    Ok(())
}

fn remove_finalizer(
    core: &Core,
    res: &str,
    ns: &str,
    name: &str,
    finalizer: &str,
) -> ApiResult<()> {
    core.store.modify::<ApiError>(res, ns, name, |cur, _| {
        let Some(mut obj) = cur else {
            return Ok(Change::Unchanged);
        };
        let mut fs = finalizers(&obj);
        let before = fs.len();
        fs.retain(|f| f != finalizer);
        if fs.len() == before {
            return Ok(Change::Unchanged);
        }
        obj["metadata"]["finalizers"] = json!(fs);
        if fs.is_empty() && obj["metadata"]["deletionTimestamp"].is_string() {
            return Ok(Change::Delete);
        }
        Ok(Change::Put(obj))
    })?;
    Ok(())
}

/// Advances the deletion of an object that has a deletionTimestamp.
fn deleting(core: &Core, res: &str, obj: &Value) -> ApiResult<()> {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
    let fs = finalizers(obj);
    if fs.iter().any(|f| f == "orphan") {
        for (dres, dns, dname) in core.store.dependents(uid)? {
            unlink(core, &dres, &dns, &dname, uid)?;
        }
        remove_finalizer(core, res, ns, name, "orphan")?;
        return Ok(());
    }
    if fs.iter().any(|f| f == "foregroundDeletion") {
        let deps = core.store.dependents(uid)?;
        if deps.is_empty() {
            remove_finalizer(core, res, ns, name, "foregroundDeletion")?;
        }
        for (dres, dns, dname) in deps {
            let dep = core.store.get(&dres, &dns, &dname)?;
            if dep.is_some_and(|d| d["metadata"]["deletionTimestamp"].is_null()) {
                delete_background(core, &dres, &dns, &dname)?;
            }
        }
        return Ok(());
    }
    if res == "/namespaces" {
        let contents = core.store.resources_in_namespace(name)?;
        if contents.is_empty() {
            if fs.is_empty() {
                tracing::info!(namespace = name, "namespace emptied; removing it");
                core.store
                    .modify::<ApiError>("/namespaces", "", name, |cur, _| {
                        Ok(if cur.is_some() {
                            Change::Delete
                        } else {
                            Change::Unchanged
                        })
                    })?;
            }
            return Ok(());
        }
        for (cres, cname) in contents {
            let pending = core
                .store
                .get(&cres, name, &cname)?
                .is_some_and(|o| o["metadata"]["deletionTimestamp"].is_string());
            if !pending {
                delete_background(core, &cres, name, &cname)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Durability, Store, StoreConfig};
    use std::sync::atomic::Ordering;

    fn core(dir: &std::path::Path) -> Arc<Core> {
        let store = Store::open(&StoreConfig::by_count(
            dir.join("state.db"),
            100_000,
            Durability::Normal,
        ))
        .unwrap();
        Arc::new(Core {
            store: Arc::new(store),
            registry: Default::default(),
            pod_logs: Default::default(),
            pod_exec: Default::default(),
            authz: Default::default(),
            gc_sweeps: Default::default(),
        })
    }

    /// `n` updates of one config map, made without yielding to the collector's task.
    fn burst(core: &Core, n: usize) {
        for i in 0..n {
            core.store
                .modify::<crate::store::StoreError>("/configmaps", "default", "hb", |_, _| {
                    Ok(Change::Put(json!({
                        "metadata": {"name": "hb", "namespace": "default", "uid": "u-hb"},
                        "data": {"i": i.to_string()}
                    })))
                })
                .unwrap();
        }
    }

    #[test]
    fn only_deletions_and_objects_being_deleted_give_the_collector_work() {
        let ev = |kind, object: Value| Event {
            rev: 1,
            kind,
            resource: "/configmaps".into(),
            namespace: "default".into(),
            name: "x".into(),
            object: Arc::new(object),
            prev: None,
            encoded: Default::default(),
        };
        let plain = json!({"metadata": {"name": "x"}});
        let deleting =
            json!({"metadata": {"name": "x", "deletionTimestamp": "2026-12-03T00:00:00Z"}});
        assert!(!needs_collecting(&ev(EventType::Added, plain.clone())));
        assert!(!needs_collecting(&ev(EventType::Modified, plain.clone())));
        assert!(needs_collecting(&ev(EventType::Modified, deleting)));
        assert!(needs_collecting(&ev(EventType::Deleted, plain)));
    }

    /// The change stream lagging twice in a row (more writes than it holds, made while the
    /// collector could not run) costs one sweep, not one per lag, and not before the gap.
    #[tokio::test(flavor = "current_thread")]
    async fn lags_of_the_change_stream_sweep_at_most_once_per_gap() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let t0 = tokio::time::Instant::now();
        let gc = tokio::spawn(run(core.clone(), stopped));
        let sweeps = || core.gc_sweeps.load(Ordering::Relaxed);
        while sweeps() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        burst(&core, 9_000);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sweeps(), 1, "a lag right after a sweep waits for the gap");
        burst(&core, 9_000);
        tokio::time::sleep_until(t0 + LAG_SWEEP_GAP + Duration::from_millis(800)).await;
        assert_eq!(
            sweeps(),
            2,
            "both lags made one sweep, once the gap had passed"
        );
        stop.send(true).unwrap();
        gc.await.unwrap();
    }
}
