//! A standalone edge endpoint of the channel, for poking a hub by hand and for the reliability
//! test, which kills it with SIGKILL and starts it again.
//!
//! It keeps every object the cloud sends in `<data-dir>/state.db` (SQLite), acknowledging only
//! after the commit, and records any update that arrives older than what it already holds in a
//! `violations` table (there should never be one).
//!
//! Usage: `tunnel-edge --data-dir DIR --cloud HOST:PORT [--transport websocket|quic]
//! [--cloud-quic HOST:PORT] [--join TOKEN --node-name NAME] [--keepalive-ms N]`

use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};
use sedge_tunnel::{EdgeConfig, EdgeHub, EdgeOptions, Incoming, Message, op};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn apply(db: &Connection, m: &Message) -> rusqlite::Result<()> {
    let rv: i64 = m.resource_version.parse().unwrap_or(0);
    let key = &m.route.resource;
    let had: Option<i64> = db
        .query_row("SELECT rv FROM seen WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()?;
    match had {
        Some(h) if h > rv => {
            db.execute(
                "INSERT INTO violations (key, got, had) VALUES (?1, ?2, ?3)",
                params![key, rv, h],
            )?;
            return Ok(());
        }
        Some(h) if h == rv => {
            db.execute("UPDATE stats SET duplicates = duplicates + 1", [])?;
            return Ok(());
        }
        _ => {}
    }
    db.execute(
        "INSERT INTO seen (key, rv) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET rv = excluded.rv",
        params![key, rv],
    )?;
    if m.route.operation == op::DELETE {
        db.execute("DELETE FROM objects WHERE key = ?1", params![key])?;
    } else {
        db.execute(
            "INSERT INTO objects (key, rv, content) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET rv = excluded.rv, content = excluded.content",
            params![key, rv, m.content.as_ref()],
        )?;
    }
    db.execute("UPDATE stats SET applied = applied + 1", [])?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sedge_tunnel=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = arg(&args, "--data-dir") else {
        bail!("--data-dir is required");
    };
    let mut cfg = EdgeConfig {
        data_dir: dir.clone().into(),
        cloud: arg(&args, "--cloud").context("--cloud HOST:PORT is required")?,
        ..Default::default()
    };
    if let Some(t) = arg(&args, "--transport") {
        cfg.transport = t.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(q) = arg(&args, "--cloud-quic") {
        cfg.cloud_quic = q;
    }
    if let Some(k) = arg(&args, "--keepalive-ms") {
        cfg.keepalive_interval_ms = k.parse().context("--keepalive-ms")?;
        cfg.backoff_initial_ms = cfg.keepalive_interval_ms / 2;
        cfg.backoff_max_ms = cfg.keepalive_interval_ms * 4;
        cfg.ack_timeout_ms = cfg.keepalive_interval_ms * 2;
    }
    if let Some(token) = arg(&args, "--join") {
        cfg.node_name = arg(&args, "--node-name").context("--join needs --node-name")?;
        sedge_tunnel::join(&cfg, &token).await?;
    }
    let db = Connection::open(std::path::Path::new(&dir).join("state.db"))?;
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, rv INTEGER NOT NULL, content BLOB);
         CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, rv INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS violations (key TEXT, got INTEGER, had INTEGER);
         CREATE TABLE IF NOT EXISTS stats (applied INTEGER, duplicates INTEGER);
         INSERT INTO stats SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM stats);",
    )?;
    let db = Arc::new(Mutex::new(db));
    let held = db.clone();
    let handler = sedge_tunnel::handler(move |i: Incoming| {
        let db = db.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let db = db.lock().unwrap_or_else(|p| p.into_inner());
                apply(&db, &i.message).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??;
            Ok(None)
        }
    });
    let edge = EdgeHub::start(
        cfg,
        EdgeOptions {
            handler: Some(handler),
            quic_endpoint: None,
            inventory: Some(Arc::new(move || {
                let db = held.lock().unwrap_or_else(|p| p.into_inner());
                let mut st = db
                    .prepare("SELECT key, rv FROM objects")
                    .map_err(|e| e.to_string())?;
                let rows = st
                    .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.to_string())))
                    .map_err(|e| e.to_string())?;
                rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
            })),
        },
    )
    .await?;
    eprintln!("tunnel-edge {} running", edge.node());
    tokio::signal::ctrl_c().await?;
    edge.shutdown().await;
    Ok(())
}
