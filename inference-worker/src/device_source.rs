//! Samples from a device: the edge worker subscribes to a device's data topic on the node's MQTT
//! broker (KubeEdge's `$ke/events/device/<ns>/<name>/data/update`, where a mapper's
//! `pushMethod.mqtt` publishes), so a JointInferenceService runs on what a camera-like device
//! sends. The input is written `mqtt://<host>:<port>/<topic>[?property=<name>]`.
//!
//! Each message is one frame, either KubeEdge's mapper data document
//! `{"data": {"<property>": {"value": "<base64>", "metadata": {"label": "3"}}}}` (the named
//! property, or the only one) or the frame's raw bytes. A frame that starts like a PNG or JPEG
//! file is decoded as one; anything else is grey pixels, row by row (the pipeline checks their
//! count against the model's input). A message that is neither
//! becomes an unreadable sample naming why (the pipeline reports it and goes on). Messages are
//! bounded by the client's packet size ([`MAX_FRAME_BYTES`]); frames that arrive while the
//! pipeline is behind wait in a bounded queue ([`QUEUE`]) and newer ones beyond it are dropped
//! and counted: a live stream is sampled, never buffered without bound.

use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::source::{Payload, Sample};

/// Largest message taken (bytes).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Frames waiting for the pipeline.
pub const QUEUE: usize = 64;

/// A device data topic on a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopic {
    /// `host:port`.
    pub broker: String,
    /// The MQTT topic (no wildcards).
    pub topic: String,
    /// The property whose value is the frame (none: the document's only property).
    pub property: Option<String>,
}

impl DeviceTopic {
    /// Parses `mqtt://<host>:<port>/<topic>[?property=<name>]`; the error names what is wrong.
    pub fn parse(input: &str) -> Result<DeviceTopic, String> {
        let rest = input
            .strip_prefix("mqtt://")
            .ok_or_else(|| format!("{input:?}: a device input starts with mqtt://"))?;
        let (broker, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{input:?}: no topic (mqtt://<host>:<port>/<topic>)"))?;
        let (host, port) = broker
            .rsplit_once(':')
            .ok_or_else(|| format!("{input:?}: the broker needs a port (<host>:<port>)"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{input:?}: {broker:?} is not <host>:<port>"));
        }
        let (topic, query) = match path.split_once('?') {
            Some((t, q)) => (t, Some(q)),
            None => (path, None),
        };
        if topic.is_empty() || topic.contains(['+', '#']) || topic.len() > 1024 {
            return Err(format!(
                "{input:?}: the topic must be one device's topic (no + or # wildcards, at most 1024 bytes)"
            ));
        }
        let property = match query {
            None => None,
            Some(q) => Some(
                q.strip_prefix("property=")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| format!("{input:?}: the only option is ?property=<name>"))?
                    .to_string(),
            ),
        };
        Ok(DeviceTopic {
            broker: broker.to_string(),
            topic: topic.to_string(),
            property,
        })
    }

    /// Subscribes and yields frames as they arrive, forever (or `limit` of them).
    pub fn open(&self, limit: Option<usize>) -> Box<dyn Iterator<Item = Sample> + Send> {
        let (tx, rx) = mpsc::sync_channel::<Sample>(QUEUE);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("device-input".into())
            .spawn(move || me.receive(tx));
        if let Err(e) = spawned {
            let why = format!("{}: cannot start the MQTT client: {e}", self.topic);
            return Box::new(std::iter::once(Sample {
                id: self.topic.clone(),
                payload: Payload::Unreadable(why),
                label: None,
            }));
        }
        Box::new(rx.into_iter().take(limit.unwrap_or(usize::MAX)))
    }

    fn receive(&self, tx: mpsc::SyncSender<Sample>) {
        let (host, port) = self
            .broker
            .rsplit_once(':')
            .unwrap_or((&self.broker, "1883"));
        let mut opts = rumqttc::MqttOptions::new(
            format!("sedge-edge-worker-{}", std::process::id()),
            host,
            port.parse().unwrap_or(1883),
        );
        opts.set_max_packet_size(MAX_FRAME_BYTES, 64 * 1024);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = rumqttc::Client::new(opts, 64);
        let (mut n, mut dropped) = (0u64, 0u64);
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    tracing::info!(broker = %self.broker, topic = %self.topic, "reading frames from the device topic");
                    if let Err(e) = client.subscribe(&self.topic, rumqttc::QoS::AtMostOnce) {
                        tracing::warn!(topic = %self.topic, "cannot subscribe: {e}");
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let sample = Sample {
                        id: format!("{}#{n}", self.topic),
                        payload: Payload::Unreadable(String::new()),
                        label: None,
                    };
                    n += 1;
                    let sample = match frame(&p.payload, self.property.as_deref()) {
                        Ok((payload, label)) => Sample {
                            payload,
                            label,
                            ..sample
                        },
                        Err(why) => Sample {
                            payload: Payload::Unreadable(format!("{}: {why}", self.topic)),
                            ..sample
                        },
                    };
                    match tx.try_send(sample) {
                        Ok(()) => {}
                        Err(mpsc::TrySendError::Full(_)) => {
                            dropped += 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(
                                    dropped,
                                    "frames arrive faster than the edge infers; dropped"
                                );
                            }
                        }
                        Err(mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(broker = %self.broker, "MQTT connection: {e}; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// One message as a frame: its payload and label, or why it is not one.
pub fn frame(msg: &[u8], property: Option<&str>) -> Result<(Payload, Option<u32>), String> {
    let (bytes, label) = match serde_json::from_slice::<Value>(msg) {
        Ok(Value::Object(doc)) => {
            let data = doc
                .get("data")
                .and_then(Value::as_object)
                .ok_or("a JSON message needs \"data\": {\"<property>\": {\"value\": ...}}")?;
            let entry = match property {
                Some(p) => data
                    .get(p)
                    .ok_or_else(|| format!("no property {p:?} in the message"))?,
                None if data.len() == 1 => data.values().next().unwrap_or(&Value::Null),
                None => {
                    return Err(format!(
                        "{} properties in the message; name one with ?property=<name>",
                        data.len()
                    ));
                }
            };
            let value = entry["value"]
                .as_str()
                .ok_or("the property's value is not a string (base64 of the frame)")?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|e| format!("the value is not base64: {e}"))?;
            let label = match &entry["metadata"]["label"] {
                Value::Null => None,
                Value::String(s) => Some(
                    s.parse()
                        .map_err(|_| format!("label {s:?} is not a class number"))?,
                ),
                Value::Number(n) => Some(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or("the label is not a class number")?,
                ),
                _ => return Err("the label is not a class number".into()),
            };
            (bytes, label)
        }
        _ => (msg.to_vec(), None),
    };
    if bytes.is_empty() {
        return Err("an empty frame".into());
    }
    let image = bytes.starts_with(b"\x89PNG") || bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    if !image {
        return Ok((Payload::Pixels(bytes), label));
    }
    Ok((
        Payload::Encoded {
            path: "mqtt-frame".into(),
            bytes,
        },
        label,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse_and_bad_ones_are_named() {
        let t = DeviceTopic::parse(
            "mqtt://127.0.0.1:1884/$ke/events/device/default/camera-1/data/update?property=frame",
        )
        .unwrap();
        assert_eq!(t.broker, "127.0.0.1:1884");
        assert_eq!(t.topic, "$ke/events/device/default/camera-1/data/update");
        assert_eq!(t.property.as_deref(), Some("frame"));
        for (bad, want) in [
            ("http://x:1/t", "mqtt://"),
            ("mqtt://127.0.0.1:1884", "no topic"),
            ("mqtt://127.0.0.1/t", "port"),
            ("mqtt://127.0.0.1:99999/t", "not <host>:<port>"),
            (
                "mqtt://127.0.0.1:1884/$ke/events/device/+/+/data/update",
                "wildcards",
            ),
            ("mqtt://127.0.0.1:1884/t?label=3", "?property="),
        ] {
            let e = DeviceTopic::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn frames_come_as_documents_or_raw_bytes() {
        let px: Vec<u8> = (0..784).map(|i| (i % 256) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&px);
        let doc = serde_json::json!({"event_id": "e", "timestamp": 1,
            "data": {"frame": {"value": b64, "metadata": {"label": "3", "timestamp": "1"}}}});
        let (p, label) = frame(doc.to_string().as_bytes(), None).unwrap();
        assert!(matches!(p, Payload::Pixels(ref v) if *v == px));
        assert_eq!(label, Some(3));
        let (p, label) = frame(&px, Some("frame")).unwrap();
        assert!(matches!(p, Payload::Pixels(_)));
        assert_eq!(label, None);
        // Not pixels: handed to the image decoder (which names a bad image later).
        let (p, _) = frame(b"\x89PNG...", None).unwrap();
        assert!(matches!(p, Payload::Encoded { .. }));
    }

    #[test]
    fn bad_messages_are_named_not_taken() {
        let two = serde_json::json!({"data": {"a": {"value": ""}, "b": {"value": ""}}});
        for (msg, property, want) in [
            (serde_json::json!({"no": "data"}), None, "needs \"data\""),
            (two.clone(), None, "name one with ?property"),
            (two, Some("c"), "no property \"c\""),
            (
                serde_json::json!({"data": {"f": {"value": 7}}}),
                None,
                "not a string",
            ),
            (
                serde_json::json!({"data": {"f": {"value": "%%%"}}}),
                None,
                "not base64",
            ),
            (
                serde_json::json!({"data": {"f": {"value": "AAAA", "metadata": {"label": "cat"}}}}),
                None,
                "not a class number",
            ),
            (
                serde_json::json!({"data": {"f": {"value": ""}}}),
                None,
                "empty frame",
            ),
        ] {
            let e = frame(msg.to_string().as_bytes(), property).unwrap_err();
            assert!(e.contains(want), "{msg}: {e}");
        }
    }
}
