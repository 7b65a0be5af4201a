//! The event bus: KubeEdge's device topics over MQTT. The agent either embeds a broker
//! ([`crate::broker`], on localhost) or connects to an external one (Debian's `mosquitto`, say);
//! either way the twin speaks to it as an MQTT client (rumqttc), so local apps and MQTT mappers
//! use `mosquitto_pub`/`mosquitto_sub` or any client unchanged.
//!
//! Topics (`<id>` is `<namespace>/<name>`):
//! - `$hw/events/device/<id>/twin/update`: `{"event_id","timestamp","twin":{"<prop>":{"actual":
//!   {"value"},"expected":{"value"},"metadata":{"type"}}}}`; answered on `.../update/result`
//!   (the accepted twin, or `{"code","reason"}`), then `.../update/document` (`last` and `current`
//!   per property) and, where expected and actual differ, `.../update/delta`. An `expected`
//!   value is a local change of the desired value: it bumps the edge version and goes to the
//!   mapper (see [`crate::versions`] for how it meets the cloud's).
//! - `$hw/events/device/<id>/twin/get` -> `.../twin/get/result`.
//! - `$hw/events/device/<id>/state/update` `{"state"}` -> `.../state/update/result`.
//! - `$hw/events/node/<node>/membership/get` -> `.../membership/get/result` (this node's devices).
//!
//! Actual values go into the Device's status in the cloud (as DMI reports do); a desired value
//! set in the cloud is published on `.../twin/update/delta`. Documents carry KubeEdge's
//! `expected_version`/`actual_version` per property. Payloads are bounded by the
//! broker's and the client's packet size; a bad one gets a `{"code":400,"reason":...}` result
//! naming the problem, an unknown device 404, and nothing is stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Map, Value, json};

use crate::record::Record;
use crate::twin::Twins;
use crate::{Device, MAX_KEY_BYTES};

/// Largest MQTT packet the bus takes or sends (bytes).
pub const MAX_PACKET_BYTES: usize = 64 * 1024;
/// Topics with a message waiting to be handled (one per topic, the latest); a new topic beyond
/// that is dropped and counted.
pub const INBOX: usize = 16 * 1024;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn error_doc(event_id: &str, code: u16, reason: &str) -> Value {
    json!({"event_id": event_id, "timestamp": now_ms(), "code": code, "reason": reason})
}

/// A topic of a device: `(namespace, name, rest)`.
fn device_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let rest = topic.strip_prefix("$hw/events/device/")?;
    let mut parts = rest.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Serves the device topics on the broker at `broker` (`host:port`) for this node's twins.
pub async fn run(twins: Twins, broker: String) {
    let (host, port) = match broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse().ok()?)))
    {
        Some(x) => x,
        None => {
            tracing::error!(%broker, "the MQTT broker address is not host:port; the event bus is off");
            return;
        }
    };
    let mut opts = MqttOptions::new(format!("sedge-devicetwin-{}", twins.node()), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    let (client, mut events) = AsyncClient::new(opts, 1024);
    // Small request/answer messages: no Nagle delay (40 ms against delayed ACKs otherwise).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let node = twins.node().to_string();
    let topics = [
        "$hw/events/device/+/+/twin/update".to_string(),
        "$hw/events/device/+/+/twin/get".to_string(),
        "$hw/events/device/+/+/state/update".to_string(),
        format!("$hw/events/node/{node}/membership/get"),
    ];
    // Desired values set in the cloud go out as deltas. The bus's tasks end with it (a
    // JoinSet aborts them when dropped).
    let mut own = tokio::task::JoinSet::new();
    own.spawn(publish_cloud_deltas(twins.clone(), client.clone()));
    // Messages are handled (and answered) by their own task, so the connection keeps being
    // polled while answers queue: awaiting a publish here, in the loop that drains the client's
    // queue, would deadlock once the queue filled. Waiting messages coalesce per topic (the
    // latest update of a device wins when they come faster than they are handled, so its last
    // value is never the one lost); at most INBOX topics wait, a new one beyond that is dropped
    // and counted.
    let inbox = Arc::new(Inbox::default());
    let (t, c, n, ib) = (twins.clone(), client.clone(), node.clone(), inbox.clone());
    own.spawn(async move {
        loop {
            let (topic, payload) = ib.pop().await;
            for (topic, doc) in handle(&t, &n, &topic, &payload).await {
                let _ = c
                    .publish(topic, QoS::AtLeastOnce, false, doc.to_string())
                    .await;
            }
        }
    });
    let mut dropped: u64 = 0;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(%broker, "device twin on the MQTT bus");
                for t in &topics {
                    if let Err(e) = client.subscribe(t, QoS::AtLeastOnce).await {
                        tracing::warn!(topic = %t, error = %e, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if !inbox.push(p.topic.clone(), p.payload.clone()) {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped,
                            "device messages arrive faster than they are handled; dropped"
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%broker, error = %e, "MQTT connection lost; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Messages waiting to be handled, one per topic (the latest), in arrival order of topics.
#[derive(Default)]
struct Inbox {
    waiting: std::sync::Mutex<(VecDeque<String>, HashMap<String, bytes::Bytes>)>,
    ready: tokio::sync::Notify,
}

impl Inbox {
    /// Queues `payload` for `topic`, replacing one waiting for the same topic; false if
    /// [`INBOX`] other topics are waiting.
    fn push(&self, topic: String, payload: bytes::Bytes) -> bool {
        let mut w = self.waiting.lock().unwrap();
        let (order, latest) = &mut *w;
        if let Some(p) = latest.get_mut(&topic) {
            *p = payload;
        } else if order.len() >= INBOX {
            return false;
        } else {
            order.push_back(topic.clone());
            latest.insert(topic, payload);
        }
        drop(w);
        self.ready.notify_one();
        true
    }

    async fn pop(&self) -> (String, bytes::Bytes) {
        loop {
            {
                let mut w = self.waiting.lock().unwrap();
                let (order, latest) = &mut *w;
                if let Some(t) = order.pop_front() {
                    let p = latest.remove(&t).unwrap_or_default();
                    return (t, p);
                }
            }
            self.ready.notified().await;
        }
    }
}

/// What to publish in answer to `payload` on `topic`.
pub async fn handle(
    twins: &Twins,
    node: &str,
    topic: &str,
    payload: &[u8],
) -> Vec<(String, Value)> {
    if topic == format!("$hw/events/node/{node}/membership/get") {
        let event_id = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v["event_id"].as_str().map(String::from))
            .unwrap_or_default();
        let devices: Vec<Value> = twins
            .devices()
            .await
            .iter()
            .map(|d| {
                json!({"id": format!("{}/{}", d.metadata.namespace.clone().unwrap_or_default(), d.metadata.name.clone().unwrap_or_default()),
                       "name": d.metadata.name, "protocol": d.spec.protocol.protocol_name})
            })
            .collect();
        return vec![(
            format!("{topic}/result"),
            json!({"event_id": event_id, "timestamp": now_ms(), "devices": devices}),
        )];
    }
    let Some((ns, name, what)) = device_topic(topic) else {
        return vec![];
    };
    let result_topic = format!("$hw/events/device/{ns}/{name}/{what}/result");
    let doc: Value = match serde_json::from_slice(payload) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return vec![(
                result_topic,
                error_doc("", 400, "the payload is not a JSON object"),
            )];
        }
        Err(e) => {
            return vec![(
                result_topic,
                error_doc("", 400, &format!("the payload is not JSON: {e}")),
            )];
        }
    };
    let event_id = doc["event_id"].as_str().unwrap_or_default().to_string();
    if event_id.len() > MAX_KEY_BYTES {
        return vec![(
            result_topic,
            error_doc("", 400, "event_id is over 128 bytes"),
        )];
    }
    let dev = match twins.device(ns, name).await {
        Ok(d) => d,
        Err(s) => {
            let code = if s.code() == tonic::Code::NotFound {
                404
            } else {
                400
            };
            return vec![(result_topic, error_doc(&event_id, code, s.message()))];
        }
    };
    match what {
        "twin/update" => twin_update(twins, &dev, ns, name, &event_id, &doc, result_topic).await,
        "twin/get" => {
            let current = twins.twin(ns, name).await;
            vec![(
                result_topic,
                json!({"event_id": event_id, "timestamp": now_ms(), "twin": mqtt_twin(&dev, &current)}),
            )]
        }
        "state/update" => {
            let state = doc["state"].as_str().unwrap_or_default();
            if state.is_empty() || state.len() > MAX_KEY_BYTES {
                return vec![(
                    result_topic,
                    error_doc(&event_id, 400, "state must be a string of 1 to 128 bytes"),
                )];
            }
            match twins.set_state(&dev, state).await {
                Ok(()) => vec![(
                    result_topic,
                    json!({"event_id": event_id, "timestamp": now_ms(), "state": state}),
                )],
                Err(s) => vec![(result_topic, error_doc(&event_id, 500, s.message()))],
            }
        }
        _ => vec![],
    }
}

/// The twin as KubeEdge's documents show it: per property `expected` (the desired value in
/// force: the cloud's, or a local app's), `actual` (the reported one), `metadata` and the
/// versions (`expected_version`, `actual_version`, each `{cloud, edge}`).
fn mqtt_twin(dev: &Device, stored: &Record) -> Value {
    let mut out = Map::new();
    for p in &dev.spec.properties {
        let mut t = Map::new();
        if let Some(d) = stored.desired(dev, &p.name) {
            t.insert("expected".into(), json!({"value": d}));
        }
        let (ev, av) = stored.versions(&p.name);
        t.insert(
            "expected_version".into(),
            json!({"cloud": ev.cloud, "edge": ev.edge}),
        );
        if let Some(r) = stored.reported(&p.name) {
            t.insert("actual".into(), json!({"value": r.value}));
            t.insert(
                "actual_version".into(),
                json!({"cloud": av.cloud, "edge": av.edge}),
            );
            if let Some(ty) = r.metadata.get("type") {
                t.insert("metadata".into(), json!({"type": ty}));
            }
        }
        out.insert(p.name.clone(), Value::Object(t));
    }
    Value::Object(out)
}

#[allow(clippy::too_many_arguments)]
async fn twin_update(
    twins: &Twins,
    dev: &Device,
    ns: &str,
    name: &str,
    event_id: &str,
    doc: &Value,
    result_topic: String,
) -> Vec<(String, Value)> {
    let Some(update) = doc["twin"].as_object() else {
        return vec![(
            result_topic,
            error_doc(event_id, 400, "twin is missing or not an object"),
        )];
    };
    // Actual values become reported twins, and expected values the desired values in force
    // (the edge's change, KubeEdge's version rule), checked (names, sizes) like a DMI report by
    // `Twins::edge_update`.
    let mut reported = Vec::new();
    let mut expected = Vec::new();
    for (prop, t) in update {
        for (field, is_actual) in [("actual", true), ("expected", false)] {
            let Some(v) = t.get(field) else { continue };
            let Some(value) = v["value"].as_str() else {
                return vec![(
                    result_topic,
                    error_doc(
                        event_id,
                        400,
                        &format!("twin {prop:?}: {field}.value must be a string"),
                    ),
                )];
            };
            if !is_actual {
                expected.push((prop.clone(), value.to_string()));
                continue;
            }
            let mut metadata: HashMap<String, String> = HashMap::new();
            metadata.insert("timestamp".into(), now_ms().to_string());
            if let Some(ty) = t["metadata"]["type"].as_str() {
                metadata.insert("type".into(), ty.chars().take(MAX_KEY_BYTES).collect());
            }
            reported.push((prop.clone(), value.to_string(), metadata));
        }
    }
    let (before, after) = match twins.edge_update(dev, reported, expected).await {
        Ok(x) => x,
        Err(s) => {
            let code = if s.code() == tonic::Code::InvalidArgument {
                400
            } else {
                500
            };
            return vec![(result_topic, error_doc(event_id, code, s.message()))];
        }
    };
    let (last, current) = (mqtt_twin(dev, &before), mqtt_twin(dev, &after));
    let mut document = Map::new();
    for prop in update.keys() {
        document.insert(
            prop.clone(),
            json!({"last": last.get(prop), "current": current.get(prop)}),
        );
    }
    let base = format!("$hw/events/device/{ns}/{name}/twin/update");
    let mut out = vec![
        (
            result_topic,
            json!({"event_id": event_id, "timestamp": now_ms(), "twin": Value::Object(update.clone())}),
        ),
        (
            format!("{base}/document"),
            json!({"event_id": event_id, "timestamp": now_ms(), "twin": document}),
        ),
    ];
    if let Some(delta) = delta_of(dev, &after) {
        out.push((format!("{base}/delta"), delta));
    }
    out
}

/// The delta document when a desired value in force differs from the reported one.
fn delta_of(dev: &Device, stored: &Record) -> Option<Value> {
    let mut delta = Map::new();
    for p in &dev.spec.properties {
        if let Some(e) = stored.desired(dev, &p.name)
            && stored.reported(&p.name).map(|r| r.value.as_str()) != Some(e)
        {
            delta.insert(p.name.clone(), json!(e));
        }
    }
    (!delta.is_empty()).then(|| {
        json!({"event_id": uuid::Uuid::new_v4().to_string(), "timestamp": now_ms(), "twin": mqtt_twin(dev, stored), "delta": delta})
    })
}

/// Publishes a delta whenever the cloud changes a desired value in force (a local app's change
/// is answered with its delta where it is made).
async fn publish_cloud_deltas(twins: Twins, client: AsyncClient) {
    let mut changes = twins.desired_changes();
    loop {
        let change = match changes.recv().await {
            Ok(c) if !c.from_edge => c,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Ok(dev) = twins.device(&change.namespace, &change.name).await else {
            continue;
        };
        let stored = twins.twin(&change.namespace, &change.name).await;
        if let Some(delta) = delta_of(&dev, &stored) {
            let topic = format!(
                "$hw/events/device/{}/{}/twin/update/delta",
                change.namespace, change.name
            );
            let _ = client
                .publish(topic, QoS::AtLeastOnce, false, delta.to_string())
                .await;
        }
    }
}
