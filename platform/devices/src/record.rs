//! What the node keeps per device (store kind [`crate::twin::TWIN_KIND`]): the twins mappers
//! and apps reported, the state, the desired values in force with their versions
//! ([`crate::versions`]), and how many times each actual value was reported.
//!
//! The Device's status is derived from it ([`Record::status`]): the reported twins, state and
//! last online time, and each property's desired value in force as `observedDesired` with
//! metadata `source`, `cloudVersion`, `edgeVersion` (the cloud sends that back with the next spec
//! change, which is how it tells the node which edge changes it has seen).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::versions::{self, CloudUpdate, Expected, Source};
use crate::{Device, DeviceStatus, Twin, TwinProperty};

/// Metadata keys of `observedDesired` the node writes.
pub mod meta {
    /// `cloud` or `edge`.
    pub const SOURCE: &str = "source";
    /// The Device generation of the cloud change in force.
    pub const CLOUD_VERSION: &str = "cloudVersion";
    /// The node's local change count.
    pub const EDGE_VERSION: &str = "edgeVersion";
    /// When the value was set (ms).
    pub const TIMESTAMP: &str = "timestamp";
}

/// One device's twin on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The device it belongs to (a device deleted and created again starts afresh).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Reported twins, one per property.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    /// The state the mapper last reported.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// When it was last online (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
    /// The desired value in force per property.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected: BTreeMap<String, Expected>,
    /// Reports of each property's actual value (KubeEdge's `actual_version.edge`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub actual_version: BTreeMap<String, u64>,
}

impl Record {
    /// The stored record (an empty one if none, or if it is not a record).
    pub fn from_value(v: Option<serde_json::Value>) -> Record {
        v.and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    /// As stored.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The reported twin of `prop`, if any.
    pub fn reported(&self, prop: &str) -> Option<&TwinProperty> {
        self.twins
            .iter()
            .find(|t| t.property_name == prop)
            .and_then(|t| t.reported.as_ref())
    }

    /// Merges reported twins by property (a twin replaces the one of its property); each
    /// reported value bumps its actual version.
    pub fn merge(&mut self, twins: Vec<Twin>) {
        for t in twins {
            if t.reported.is_some() {
                *self
                    .actual_version
                    .entry(t.property_name.clone())
                    .or_default() += 1;
            }
            self.twins.retain(|m| m.property_name != t.property_name);
            self.twins.push(t);
        }
    }

    /// The Device's status: reported twins, with the desired value in force as
    /// `observedDesired` where the node has one.
    pub fn status(&self) -> DeviceStatus {
        let mut twins = self.twins.clone();
        for (prop, e) in &self.expected {
            let Some(value) = &e.value else { continue };
            let observed = TwinProperty {
                value: value.clone(),
                metadata: BTreeMap::from([
                    (meta::SOURCE.to_string(), e.source.as_str().to_string()),
                    (meta::CLOUD_VERSION.to_string(), e.version.cloud.to_string()),
                    (meta::EDGE_VERSION.to_string(), e.version.edge.to_string()),
                    (meta::TIMESTAMP.to_string(), e.timestamp.to_string()),
                ]),
            };
            match twins.iter_mut().find(|t| &t.property_name == prop) {
                Some(t) => t.observed_desired = Some(observed),
                None => twins.push(Twin {
                    property_name: prop.clone(),
                    reported: None,
                    observed_desired: Some(observed),
                }),
            }
        }
        twins.sort_by(|a, b| a.property_name.cmp(&b.property_name));
        DeviceStatus {
            twins,
            state: self.state.clone(),
            last_online_time: self.last_online_time.clone(),
            ..Default::default()
        }
    }

    /// The desired value in force for `prop` of `dev`: the record's, else the spec's.
    pub fn desired<'a>(&'a self, dev: &'a Device, prop: &str) -> Option<&'a str> {
        match self.expected.get(prop) {
            Some(e) => e.value.as_deref(),
            None => dev
                .spec
                .properties
                .iter()
                .find(|p| p.name == prop)
                .and_then(|p| p.desired.as_ref())
                .map(|d| d.value.as_str()),
        }
    }

    /// `dev` with the desired values in force (what a mapper is told to apply).
    pub fn effective(&self, dev: &Device) -> Device {
        let mut out = dev.clone();
        for p in &mut out.spec.properties {
            let Some(e) = self.expected.get(&p.name) else {
                continue;
            };
            p.desired = e.value.as_ref().map(|v| TwinProperty {
                value: v.clone(),
                metadata: p.desired.take().map(|d| d.metadata).unwrap_or_default(),
            });
        }
        out.status = None;
        out
    }

    /// Applies the cloud's desired values of `dev` (as the cloud sent it, with the status it
    /// had) under the version rule; what became of each property whose cloud value changed.
    /// A record of another device of the same name (deleted and created again) is reset first.
    pub fn apply_cloud(&mut self, dev: &Device, now_ms: i64) -> Vec<(String, CloudUpdate)> {
        self.own(dev);
        let generation = dev.metadata.generation.unwrap_or(1).max(0) as u64;
        let seen = |prop: &str| -> u64 {
            dev.status
                .as_ref()
                .and_then(|s| s.twins.iter().find(|t| t.property_name == prop))
                .and_then(|t| t.observed_desired.as_ref())
                .and_then(|o| o.metadata.get(meta::EDGE_VERSION))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let mut out = Vec::new();
        for p in &dev.spec.properties {
            let value = p.desired.as_ref().map(|d| d.value.as_str());
            let (what, next) = versions::cloud(
                self.expected.get(&p.name),
                value,
                generation,
                seen(&p.name),
                now_ms,
            );
            if let Some(n) = next {
                self.expected.insert(p.name.clone(), n);
            }
            if what != CloudUpdate::Unchanged {
                out.push((p.name.clone(), what));
            }
        }
        // Properties gone from the spec take their desired values with them.
        self.expected
            .retain(|k, _| dev.spec.properties.iter().any(|p| &p.name == k));
        out
    }

    /// Makes the record `dev`'s: one of an earlier device of the same name (deleted and created
    /// again) is reset first.
    pub fn own(&mut self, dev: &Device) {
        let uid = dev.metadata.uid.clone().unwrap_or_default();
        if !self.uid.is_empty() && self.uid != uid {
            *self = Record::default();
        }
        self.uid = uid;
    }

    /// A local app's desired value for `prop`.
    pub fn set_expected(&mut self, prop: &str, value: &str, now_ms: i64) {
        let next = versions::edge(self.expected.get(prop), value, now_ms);
        self.expected.insert(prop.to_string(), next);
    }

    /// The versions of `prop` as KubeEdge's documents show them:
    /// `(expected_version, actual_version)`, each `{cloud, edge}`.
    pub fn versions(&self, prop: &str) -> (versions::Version, versions::Version) {
        let expected = self
            .expected
            .get(prop)
            .map(|e| e.version)
            .unwrap_or_default();
        let actual = versions::Version {
            cloud: 0,
            edge: self.actual_version.get(prop).copied().unwrap_or(0),
        };
        (expected, actual)
    }

    /// Whether the desired value in force for `prop` was set on the node.
    pub fn set_on_edge(&self, prop: &str) -> bool {
        self.expected
            .get(prop)
            .is_some_and(|e| e.source == Source::Edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device(uid: &str, generation: i64, desired: &str, seen_edge: Option<u64>) -> Device {
        let mut d = json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "valve", "namespace": "default", "uid": uid, "generation": generation},
            "spec": {"nodeName": "edge-1", "protocol": {"protocolName": "modbus"},
                     "properties": [{"name": "setpoint", "desired": {"value": desired, "metadata": {"type": "int"}}},
                                    {"name": "mode", "desired": {"value": "auto"}}]}
        });
        if let Some(e) = seen_edge {
            d["status"] = json!({"twins": [{"propertyName": "setpoint",
                "observedDesired": {"value": "x", "metadata": {"edgeVersion": e.to_string()}}}]});
        }
        serde_json::from_value(d).unwrap()
    }

    #[test]
    fn the_status_carries_the_value_in_force_and_its_versions() {
        let mut r = Record::default();
        r.apply_cloud(&device("u1", 1, "20", None), 5);
        r.merge(vec![Twin {
            property_name: "setpoint".into(),
            reported: Some(TwinProperty {
                value: "19".into(),
                metadata: BTreeMap::new(),
            }),
            observed_desired: None,
        }]);
        r.set_expected("setpoint", "25", 6);
        let s = r.status();
        let t = s
            .twins
            .iter()
            .find(|t| t.property_name == "setpoint")
            .unwrap();
        assert_eq!(t.reported.as_ref().unwrap().value, "19");
        let o = t.observed_desired.as_ref().unwrap();
        assert_eq!(o.value, "25");
        assert_eq!(o.metadata[meta::SOURCE], "edge");
        assert_eq!(o.metadata[meta::CLOUD_VERSION], "1");
        assert_eq!(o.metadata[meta::EDGE_VERSION], "1");
        let (e, a) = r.versions("setpoint");
        assert_eq!((e.cloud, e.edge, a.edge), (1, 1, 1));
        // What the mapper is told: the local value, the spec's metadata kept.
        let eff = r.effective(&device("u1", 1, "20", None));
        let p = &eff.spec.properties[0];
        assert_eq!(p.desired.as_ref().unwrap().value, "25");
        assert_eq!(p.desired.as_ref().unwrap().metadata["type"], "int");
    }

    #[test]
    fn a_cloud_change_to_one_property_leaves_a_local_change_to_another() {
        let mut r = Record::default();
        r.apply_cloud(&device("u1", 1, "20", None), 1);
        r.set_expected("mode", "manual", 2);
        let mut d = device("u1", 2, "30", Some(0));
        let out = r.apply_cloud(&d, 3);
        assert_eq!(out, vec![("setpoint".to_string(), CloudUpdate::Applied)]);
        assert_eq!(r.desired(&d, "mode"), Some("manual"));
        assert_eq!(r.desired(&d, "setpoint"), Some("30"));
        // The property removed from the spec loses its desired value.
        d.spec.properties.truncate(1);
        r.apply_cloud(&d, 4);
        assert!(!r.expected.contains_key("mode"));
    }

    #[test]
    fn a_device_created_again_starts_afresh() {
        let mut r = Record::default();
        r.apply_cloud(&device("u1", 7, "20", None), 1);
        r.state = "online".into();
        let out = r.apply_cloud(&device("u2", 1, "5", None), 2);
        assert_eq!(
            out,
            vec![
                ("setpoint".to_string(), CloudUpdate::Applied),
                ("mode".to_string(), CloudUpdate::Applied)
            ]
        );
        assert_eq!(r.uid, "u2");
        assert!(r.state.is_empty());
        assert_eq!(r.expected["setpoint"].version.cloud, 1);
    }
}
