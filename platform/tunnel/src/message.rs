//! The message model: what travels between cloud and edge.
//!
//! Shaped like KubeEdge's beehive message (header, route, content) so that anyone who knows that
//! model reads ours at a glance. On the wire a message is protobuf (prost), one message per frame;
//! [`Message::to_json`] exists for debugging and logs.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Operation names used by the channel itself and by the layers above it.
pub mod op {
    /// Create an object.
    pub const INSERT: &str = "insert";
    /// Replace an object.
    pub const UPDATE: &str = "update";
    /// Patch an object.
    pub const PATCH: &str = "patch";
    /// Delete an object.
    pub const DELETE: &str = "delete";
    /// Ask for something; answered with [`RESPONSE`] or [`ERROR`].
    pub const QUERY: &str = "query";
    /// A reply (`parent_id` names the request).
    pub const RESPONSE: &str = "response";
    /// A failure reply (`parent_id` names the request, content is the reason).
    pub const ERROR: &str = "error";
    /// A permanent refusal (authorisation): the sender must not retry.
    pub const REFUSED: &str = "refused";
    /// Keepalive, both directions.
    pub const KEEPALIVE: &str = "keepalive";
    /// Acknowledgement: the receiver has persisted the message named by `parent_id`.
    pub const ACK: &str = "ack";
    /// First message on a connection, edge to cloud.
    pub const HELLO: &str = "hello";
    /// The cloud's answer to [`HELLO`].
    pub const WELCOME: &str = "welcome";
}

/// The route group reserved for the channel's own control messages.
pub const HUB_GROUP: &str = "hub";

/// Where a message goes and what it is about.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct Route {
    /// The sending module.
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub source: String,
    /// The destination module, if one module in particular.
    #[prost(string, tag = "2")]
    #[serde(default)]
    pub destination: String,
    /// The destination group (`resource`, `twin`, `user`, `hub`, ...).
    #[prost(string, tag = "3")]
    #[serde(default)]
    pub group: String,
    /// What to do (see [`op`]).
    #[prost(string, tag = "4")]
    #[serde(default)]
    pub operation: String,
    /// What it is about, e.g. `default/pod/nginx`; the object identity used for coalescing.
    #[prost(string, tag = "5")]
    #[serde(default)]
    pub resource: String,
}

/// One message.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
pub struct Message {
    /// Unique id (UUID v4 text).
    #[prost(string, tag = "1")]
    pub id: String,
    /// For replies and acks: the id of the message answered.
    #[prost(string, tag = "2")]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_id: String,
    /// Creation time, Unix milliseconds.
    #[prost(int64, tag = "3")]
    #[serde(default)]
    pub timestamp_ms: i64,
    /// The resourceVersion of the object carried (basis of reliable sync); empty if none.
    #[prost(string, tag = "4")]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// Route.
    #[prost(message, required, tag = "5")]
    pub route: Route,
    /// True for messages that are never acknowledged or retried (keepalives, queries, replies).
    #[prost(bool, tag = "6")]
    #[serde(default)]
    pub no_ack: bool,
    /// Payload (a Kubernetes object as JSON, a status, a reason text ...).
    #[prost(bytes = "bytes", tag = "7")]
    #[serde(with = "content_serde", default)]
    pub content: Bytes,
}

mod content_serde {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    // Content shows as text when it is UTF-8 (almost always JSON), as a byte list otherwise.
    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(t) => s.serialize_str(t),
            Err(_) => s.collect_seq(b.iter()),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Raw(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(match Either::deserialize(d)? {
            Either::Text(t) => Bytes::from(t),
            Either::Raw(r) => Bytes::from(r),
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Message {
    /// A new message with a fresh id and the current time.
    pub fn new(group: &str, operation: &str, resource: &str, content: impl Into<Bytes>) -> Message {
        Message {
            id: uuid::Uuid::new_v4().to_string(),
            parent_id: String::new(),
            timestamp_ms: now_ms(),
            resource_version: String::new(),
            route: Route {
                source: String::new(),
                destination: String::new(),
                group: group.into(),
                operation: operation.into(),
                resource: resource.into(),
            },
            no_ack: false,
            content: content.into(),
        }
    }

    /// Sets the resourceVersion.
    pub fn with_version(mut self, rv: impl Into<String>) -> Message {
        self.resource_version = rv.into();
        self
    }

    /// Sets the source module.
    pub fn with_source(mut self, source: &str) -> Message {
        self.route.source = source.into();
        self
    }

    /// Marks the message as needing no acknowledgement.
    pub fn unacked(mut self) -> Message {
        self.no_ack = true;
        self
    }

    /// A reply to this message: new id, `parent_id` = this id, same group and resource.
    pub fn reply(&self, operation: &str, content: impl Into<Bytes>) -> Message {
        let mut m = Message::new(&self.route.group, operation, &self.route.resource, content);
        m.parent_id = self.id.clone();
        m.no_ack = true;
        m
    }

    /// Whether this is a channel control message (keepalive, ack, hello).
    pub fn is_control(&self) -> bool {
        self.route.group == HUB_GROUP
    }

    /// Refuses a message that would not fit in a frame of `cap` bytes.
    pub fn check_size(&self, cap: usize) -> Result<(), crate::TunnelError> {
        let size = prost::Message::encoded_len(self);
        if size > cap {
            return Err(crate::TunnelError::TooLarge {
                resource: self.route.resource.clone(),
                size,
                cap,
            });
        }
        Ok(())
    }

    /// Encodes to the wire format (protobuf).
    pub fn encode(&self) -> Bytes {
        Bytes::from(prost::Message::encode_to_vec(self))
    }

    /// Decodes the wire format.
    pub fn decode(buf: &[u8]) -> Result<Message, prost::DecodeError> {
        <Message as prost::Message>::decode(buf)
    }

    /// JSON, for debugging and logs.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Compares two resourceVersions: numerically when both are integers (as ours and etcd's are),
/// otherwise `None` (unknown order: treat the newer arrival as newer).
pub fn version_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    Some(a.parse::<u64>().ok()?.cmp(&b.parse::<u64>().ok()?))
}

/// True when `candidate` is known not to be newer than `current`.
pub fn not_newer(candidate: &str, current: &str) -> bool {
    matches!(
        version_cmp(candidate, current),
        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_on_the_wire_and_in_json() {
        let m = Message::new("resource", op::UPDATE, "default/pod/nginx", "{\"a\":1}")
            .with_version("42")
            .with_source("edgecontroller");
        let back = Message::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        let json = m.to_json();
        assert!(
            json.contains("\"resource\":\"default/pod/nginx\""),
            "{json}"
        );
        let from_json: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, m);
        // The binary form is well under the JSON form (the UUID and route dominate both).
        assert!(
            m.encode().len() * 10 < json.len() * 6,
            "{} vs {}",
            m.encode().len(),
            json.len()
        );
    }

    #[test]
    fn replies_point_at_their_request() {
        let q = Message::new("resource", op::QUERY, "default/configmap/c", "");
        let r = q.reply(op::RESPONSE, "{}");
        assert_eq!(r.parent_id, q.id);
        assert_ne!(r.id, q.id);
        assert!(r.no_ack);
        assert_eq!(r.route.resource, q.route.resource);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(not_newer("9", "10"));
        assert!(not_newer("10", "10"));
        assert!(!not_newer("11", "10"));
        assert!(!not_newer("abc", "10"));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(Message::decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
