//! One node's session on the hub: the reliable queue pumped into the link, acks and requests
//! from the edge, the session's end.

use super::*;

pub(super) async fn send_now(tx: &mpsc::Sender<Bytes>, m: &Message) -> bool {
    tx.send(m.encode()).await.is_ok()
}

/// One session, from hello to close.
pub(super) async fn run_session(
    inner: Arc<Inner>,
    node: String,
    fingerprint: String,
    mut link: Link,
) {
    let remote = link.remote;
    let transport = link.transport;
    let hs = Duration::from_millis(inner.cfg.handshake_timeout_ms);
    // Hello: the edge says who it thinks it is; the certificate decides who it is.
    let hello = match tokio::time::timeout(hs, link.rx.recv()).await {
        Ok(Some(Ok(m))) if m.route.group == HUB_GROUP && m.route.operation == op::HELLO => m,
        other => {
            Counters::inc(&inner.counters.handshake_failures);
            let why = match other {
                Err(_) => "no hello in time".to_string(),
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => "closed".into(),
                Ok(Some(Ok(m))) => format!("expected hello, got {}", m.route.operation),
            };
            tracing::warn!(%node, %remote, reason = %why, "session refused");
            return;
        }
    };
    let (claimed, held) = serde_json::from_slice::<Hello>(&hello.content)
        .map(|h| (h.node, h.held))
        .unwrap_or_default();
    if claimed != node {
        Counters::inc(&inner.counters.handshake_failures);
        let why = format!(
            "the client certificate is for node {node}, but the edge says it is {claimed:?}: a certificate only works for its own node; join {claimed:?} with a token"
        );
        tracing::warn!(%remote, reason = %why, "session refused");
        let mut e = control(op::ERROR, why);
        e.parent_id = hello.id;
        let _ = send_now(&link.tx, &e).await;
        return;
    }
    let n = match inner.node(&node).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(%node, error = %e, "loading delivery records failed");
            return;
        }
    };
    let sid = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let welcome = Welcome {
        session: sid,
        keepalive_ms: inner.cfg.keepalive_interval_ms,
    };
    let mut w = control(
        op::WELCOME,
        serde_json::to_vec(&welcome).unwrap_or_default(),
    );
    w.parent_id = hello.id;
    if !send_now(&link.tx, &w).await {
        return;
    }
    let (close_tx, mut close_rx) = watch::channel(false);
    let old = n.session().replace(SessionHandle {
        id: sid,
        fingerprint,
        tx: link.tx.clone(),
        close: close_tx,
    });
    if let Some(old) = old {
        Counters::inc(&inner.counters.sessions_replaced);
        tracing::info!(%node, old = old.id, new = sid, "replacing the node's previous session");
        let _ = old.close.send(true);
    }
    n.queue().reset();
    // The node's inventory replaces the records: it is what the node really holds, also after
    // another core served it. A bad one is ignored (the node then gets what the records miss
    // again, which is safe: delivery is at-least-once and stale versions are not applied).
    if let Some(held) = held {
        match crate::session::check_held(&held) {
            None => {
                Counters::inc(&inner.counters.inventories_adopted);
                tracing::debug!(%node, objects = held.len(), "the node's inventory replaces its delivery records");
                let mut queue = n.queue();
                // Written to the database only when it says something new (a node coming back
                // to the core that served it usually holds what was recorded).
                if queue.acked() != &held {
                    inner.records.replace(&node, held.clone());
                }
                queue.adopt(held);
            }
            Some(why) => {
                Counters::inc(&inner.counters.inventories_refused);
                tracing::warn!(%node, reason = %why, "the node's inventory is ignored; its delivery records stand");
            }
        }
    }
    Counters::inc(&inner.counters.sessions_opened);
    tracing::info!(%node, %remote, ?transport, session = sid, "edge connected");
    let _ = inner.events.send(LinkEvent::Connected {
        node: node.clone(),
        transport,
        remote,
    });

    let pump = tokio::spawn(pump(
        inner.clone(),
        n.clone(),
        link.tx.clone(),
        close_rx.clone(),
    ));
    let (work_tx, work_rx) = mpsc::channel::<Message>(1024);
    let worker = tokio::spawn(serve(
        inner.handler.clone(),
        node.clone(),
        work_rx,
        link.tx.clone(),
    ));

    let dead_after = inner.cfg.dead_after();
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(inner.cfg.keepalive());
    let mut stop = inner.shutdown.subscribe();
    let reason = loop {
        tokio::select! {
            _ = close_rx.changed() => break "closed by the hub (a newer session, a revoked certificate, or another cloud core serves the node)".to_string(),
            _ = crate::stopped(&mut stop) => break "hub shutting down".to_string(),
            _ = tick.tick() => {
                if last_seen.elapsed() > dead_after {
                    break format!("no traffic for {dead_after:?} (dead peer)");
                }
            }
            m = link.rx.recv() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(end)) => {
                        match end {
                            LinkEnd::Oversize(_) => Counters::inc(&inner.counters.oversize_frames),
                            LinkEnd::Garbage(_) => Counters::inc(&inner.counters.garbage_frames),
                            _ => {}
                        }
                        match end {
                            LinkEnd::Oversize(_) | LinkEnd::Garbage(_) => {
                                tracing::warn!(%node, %remote, reason = %end, "closing the connection")
                            }
                            _ => tracing::debug!(%node, %remote, reason = %end, "connection ended"),
                        }
                        break end.to_string();
                    }
                    None => break "closed".to_string(),
                };
                last_seen = Instant::now();
                if m.route.group == HUB_GROUP {
                    match m.route.operation.as_str() {
                        op::KEEPALIVE => {
                            let _ = link.tx.try_send(control(op::KEEPALIVE, "pong").encode());
                        }
                        op::ACK => {
                            Counters::inc(&inner.counters.acks_received);
                            let effect = n.queue().ack(&m.parent_id);
                            match effect {
                                Some(AckEffect::Set(k, rv)) => inner.records.set(&node, &k, &rv),
                                Some(AckEffect::Removed(k)) => inner.records.remove(&node, &k),
                                None => {}
                            }
                            n.notify.notify_one();
                        }
                        _ => {}
                    }
                    continue;
                }
                Counters::inc(&inner.counters.messages_received);
                if !m.parent_id.is_empty()
                    && matches!(m.route.operation.as_str(), op::RESPONSE | op::ERROR | op::REFUSED)
                {
                    let is_error = m.route.operation == op::ERROR;
                    let (parent, content) = (m.parent_id.clone(), m.content.clone());
                    if !inner.requests.complete(m) && is_error {
                        // A reliable message the edge failed to persist: retried on the timeout.
                        tracing::warn!(%node, %parent, reason = %String::from_utf8_lossy(&content), "edge reported an error");
                    }
                    continue;
                }
                if let Err(why) = authorize(&node, &m, inner.owner_of.as_ref()) {
                    // Before the owners are known (the cloud core's cache still filling after
                    // a restart) a pod the node runs can look unbound: the node is told to try
                    // again, not refused for good (a refused report is dropped from its outbox).
                    if inner.owners_known.as_ref().is_some_and(|known| !known()) {
                        let _ = link.tx.send(m.reply(op::ERROR, format!("not yet: {why}")).encode()).await;
                        continue;
                    }
                    Counters::inc(&inner.counters.refused);
                    tracing::warn!(%node, resource = %m.route.resource, operation = %m.route.operation, reason = %why, "message refused");
                    let r = m.reply(op::REFUSED, why);
                    let _ = link.tx.send(r.encode()).await;
                    continue;
                }
                if work_tx.send(m).await.is_err() {
                    break "handler stopped".into();
                }
            }
        }
    };
    pump.abort();
    drop(work_tx);
    let _ = worker.await;
    let current = {
        let mut s = n.session();
        if s.as_ref().is_some_and(|s| s.id == sid) {
            s.take();
            true
        } else {
            false
        }
    };
    Counters::inc(&inner.counters.sessions_closed);
    tracing::info!(%node, session = sid, %reason, "edge session ended");
    if current {
        n.queue().reset();
        let _ = inner.events.send(LinkEvent::Disconnected {
            node: node.clone(),
            reason,
        });
    }
}

/// Sends the node's queue: up to the window in flight, retries on the ack timeout.
pub(super) async fn pump(
    inner: Arc<Inner>,
    n: Arc<Node>,
    tx: mpsc::Sender<Bytes>,
    mut closed: watch::Receiver<bool>,
) {
    let ack_timeout = Duration::from_millis(inner.cfg.ack_timeout_ms.max(1));
    let max_backoff = Duration::from_millis(inner.cfg.max_retry_backoff_ms);
    loop {
        let (msgs, next, retried) = n.queue().take(
            inner.cfg.send_window.max(1),
            Instant::now(),
            ack_timeout,
            max_backoff,
        );
        inner
            .counters
            .retries
            .fetch_add(retried as u64, Ordering::Relaxed);
        for m in msgs {
            if tx.send(m.encode()).await.is_err() {
                return;
            }
            Counters::inc(&inner.counters.messages_sent);
        }
        let wait = next.map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = n.notify.notified() => {}
            _ = async { match wait { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
            _ = closed.changed() => return,
        }
    }
}
