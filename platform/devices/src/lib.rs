//! Devices as KubeEdge defines them, so KubeEdge's device manifests apply unchanged: the
//! `devices.kubeedge.io/v1beta1` resources `DeviceModel` and `Device` as Rust types, and the CRDs
//! generated from them (committed as `crds/devices.kubeedge.io.yaml`, with a drift test).
//!
//! Which shape: KubeEdge v1beta1's `Device` with its twins in `Device.status` (`twins`, `state`,
//! `lastOnlineTime`), the shape every release through v1.22 uses and v1.23 still accepts; v1.23's
//! separate `DeviceStatus` resource is not served. Field names follow
//! `../shared/reference/kubeedge.md` section 5.3 and KubeEdge's Go types (`json` tags), v1.23's
//! additions included (`methods`, `stateReport`, `pushMethod.otel`, `anomalyDetection`,
//! `protocolConfigData`). Protocol and visitor `configData` is free-form, as in KubeEdge: a
//! mapper reads it. What Sedge adds is printer columns that answer "is it alive?".
//!
//! Platform, not the AI layer: the cloud core's edge controller sends each node its devices and
//! writes their reported status ([`check_status`] first); the edge's device twin ([`twin`])
//! serves them to mappers over KubeEdge's DMI.

// kube-derive takes printer columns as repeated attributes with the same keys.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

pub mod broker;
pub mod dmiconv;
pub mod mqtt;
pub mod record;
pub mod twin;
pub mod versions;

use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The API group.
pub const GROUP: &str = "devices.kubeedge.io";
/// The API version.
pub const VERSION: &str = "v1beta1";

/// Free-form protocol data (KubeEdge's `CustomizedValue`): any object, kept as written.
fn free_form(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Free-form, optional.
fn free_form_opt(g: &mut SchemaGenerator) -> Schema {
    free_form(g)
}

/// `DeviceModel.spec`: the blueprint of a kind of device (its properties and protocol).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "DeviceModel",
    namespaced,
    category = "kubeedge",
    printcolumn(name = "Protocol", type_ = "string", json_path = ".spec.protocol"),
    printcolumn(
        name = "Properties",
        type_ = "string",
        json_path = ".spec.properties[*].name"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    /// The device's properties.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<ModelProperty>,
    /// The protocol the device speaks (`modbus`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Protocol settings shared by the model's devices (a device's own override them; v1.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_opt")]
    pub protocol_config_data: Option<Map<String, Value>>,
}

/// One property of a device model (temperature, a switch, ...).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    /// Its name, unique in the model.
    pub name: String,
    /// What it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `INT`, `FLOAT`, `DOUBLE`, `STRING`, `BOOLEAN`, `BYTES` or `STREAM`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<PropertyType>,
    /// `ReadWrite` or `ReadOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
    /// Smallest value (as text).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub minimum: String,
    /// Largest value (as text).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub maximum: String,
    /// Unit of its values.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// The type of a property's values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum PropertyType {
    /// A whole number.
    INT,
    /// A 32-bit float.
    FLOAT,
    /// A 64-bit float.
    DOUBLE,
    /// Text.
    STRING,
    /// `true` or `false`.
    BOOLEAN,
    /// Base64 bytes.
    BYTES,
    /// A media stream (the mapper saves frames or video).
    STREAM,
}

/// Whether a property can be written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    /// Desired values are written to the device.
    ReadWrite,
    /// Only reported.
    ReadOnly,
}

/// `Device.spec`: one device, bound to one node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "Device",
    namespaced,
    category = "kubeedge",
    status = "DeviceStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Protocol",
        type_ = "string",
        json_path = ".spec.protocol.protocolName"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Last-Online",
        type_ = "string",
        json_path = ".status.lastOnlineTime"
    ),
    printcolumn(
        name = "Reported",
        type_ = "string",
        json_path = ".status.twins[*].reported.value"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The DeviceModel it is an instance of (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model_ref: Option<LocalObjectReference>,
    /// The node the device is attached to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    /// Its properties: desired values, how the mapper reaches each, how often and where to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<DeviceProperty>,
    /// How to connect to it.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// Methods: named groups of properties an application may call (v1.23).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<DeviceMethod>,
    /// How the device's state is reported (v1.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report: Option<StateReport>,
}

/// A reference by name within the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct LocalObjectReference {
    /// The name.
    #[serde(default)]
    pub name: String,
}

/// How to connect to a device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    /// The protocol (`modbus`, ...); a mapper registered for it serves the device.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol_name: String,
    /// Its settings, free-form (for Modbus TCP: address, port, slave id, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_opt")]
    pub config_data: Option<Map<String, Value>>,
}

/// One property of a device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    /// The model property it is.
    pub name: String,
    /// The value the device should have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinProperty>,
    /// How the mapper reads and writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<VisitorConfig>,
    /// Milliseconds between reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    /// Milliseconds between reads from the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<i64>,
    /// Whether reported values go to the cloud (the Device's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Where the mapper also pushes the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<PushMethod>,
}

/// A value with its metadata (`timestamp`, `type`, ...).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TwinProperty {
    /// The value, as text.
    #[serde(default)]
    pub value: String,
    /// Metadata such as `timestamp` (ms) and `type`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// How a mapper reaches one property.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VisitorConfig {
    /// The protocol.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol_name: String,
    /// Its per-property settings, free-form (for Modbus: register, offset, limit, scale, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_opt")]
    pub config_data: Option<Map<String, Value>>,
}

/// Where a mapper pushes property values besides the twin.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethod {
    /// An HTTP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<PushMethodHttp>,
    /// An MQTT topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<PushMethodMqtt>,
    /// An OpenTelemetry collector (v1.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otel: Option<PushMethodOtel>,
    /// A database, free-form (`influxdb2`, `redis`, `TDEngine`, `mysql`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_opt")]
    pub db_method: Option<Map<String, Value>>,
    /// Anomaly detection settings, free-form (v1.23).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_opt")]
    pub anomaly_detection: Option<Map<String, Value>>,
}

/// Push to HTTP.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodHttp {
    /// Host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_name: String,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Path.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_path: String,
    /// Timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// Push to MQTT.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PushMethodMqtt {
    /// Broker, e.g. `tcp://127.0.0.1:1883`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Topic.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// QoS 0, 1 or 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: Option<i32>,
    /// Retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<bool>,
}

/// Push to OpenTelemetry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodOtel {
    /// The collector's URL.
    #[serde(
        rename = "endpointURL",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub endpoint_url: String,
}

/// A named group of properties an application may call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    /// Name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The properties it touches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub property_names: Vec<String>,
}

/// How the device's own state is reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    /// Whether it goes to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Milliseconds between reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
}

/// `Device.status`: its twins (reported and observed-desired values), state and last online time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// One twin per property.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    /// `online`, `offline`, `unhealthy`, ... as the mapper reports.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// When it was last seen online (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
    /// Kept for KubeEdge's older status (reporting is set in the spec now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Kept for KubeEdge's older status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
}

/// A property's twin: what the device reported, and the desired value the mapper last saw.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// The property.
    #[serde(default)]
    pub property_name: String,
    /// The value the device reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinProperty>,
    /// The desired value the mapper has acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinProperty>,
}

/// The two CRDs.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![DeviceModel::crd(), Device::crd()]
}

/// The CRDs as one multi-document YAML file (what `crds/devices.kubeedge.io.yaml` holds).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from platform/devices/src/lib.rs (the drift test in tests/crds.rs); do not edit.\n",
    );
    for c in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&c).expect("a CRD serialises"));
    }
    out
}

/// The committed CRD file.
pub const CRDS_YAML: &str = include_str!("../crds/devices.kubeedge.io.yaml");

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The API server refused or could not be reached.
    #[error("installing the {GROUP} CRDs: {0}")]
    Api(#[from] kube::Error),
    /// A CRD was not established in time.
    #[error("CRD {0} was not established within 30 s")]
    NotEstablished(String),
}

/// Applies the `devices.kubeedge.io` CRDs (server-side apply) and waits until they are served.
pub async fn install_crds(client: &kube::Client) -> Result<(), InstallError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::ResourceExt;
    use kube::api::{Api, Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("sedge-devices").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        let established = kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        if tokio::time::timeout(std::time::Duration::from_secs(30), established)
            .await
            .is_err()
        {
            return Err(InstallError::NotEstablished(name));
        }
    }
    Ok(())
}

/// Longest reported value KubeEdge's twin takes (bytes).
pub const MAX_VALUE_BYTES: usize = 512;
/// Longest property name or metadata key (bytes).
pub const MAX_KEY_BYTES: usize = 128;
/// Most metadata entries on one value.
pub const MAX_METADATA: usize = 16;

/// A node's report of `device`'s status, checked before it is written: only the device's own
/// properties, values at most [`MAX_VALUE_BYTES`], keys at most [`MAX_KEY_BYTES`], at most
/// [`MAX_METADATA`] metadata entries, one twin per property. The error names what was wrong.
pub fn check_status(device: &Device, status: &Value) -> Result<DeviceStatus, String> {
    let s: DeviceStatus =
        serde_json::from_value(status.clone()).map_err(|e| format!("not a device status: {e}"))?;
    let known: std::collections::HashSet<&str> = device
        .spec
        .properties
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for t in &s.twins {
        if !known.contains(t.property_name.as_str()) {
            return Err(format!(
                "twin {:?} is not a property of the device",
                t.property_name
            ));
        }
        if !seen.insert(t.property_name.as_str()) {
            return Err(format!("twin {:?} reported twice", t.property_name));
        }
        for (what, v) in [
            ("reported", &t.reported),
            ("observedDesired", &t.observed_desired),
        ] {
            let Some(v) = v else { continue };
            if v.value.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "twin {:?} {what} value is {} bytes; at most {MAX_VALUE_BYTES}",
                    t.property_name,
                    v.value.len()
                ));
            }
            if v.metadata.len() > MAX_METADATA
                || v.metadata
                    .iter()
                    .any(|(k, m)| k.len() > MAX_KEY_BYTES || m.len() > MAX_VALUE_BYTES)
            {
                return Err(format!(
                    "twin {:?} {what} metadata is over {MAX_METADATA} entries or {MAX_KEY_BYTES}-byte keys",
                    t.property_name
                ));
            }
        }
    }
    if s.state.len() > MAX_KEY_BYTES || s.last_online_time.len() > MAX_KEY_BYTES {
        return Err(format!(
            "state or lastOnlineTime is over {MAX_KEY_BYTES} bytes"
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device() -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "d", "namespace": "default"},
            "spec": {"nodeName": "edge-1", "protocol": {"protocolName": "modbus"},
                     "properties": [{"name": "temperature"}, {"name": "switch"}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_report_of_the_devices_own_properties_passes() {
        let s = check_status(
            &device(),
            &json!({"state": "online", "lastOnlineTime": "2026-12-01T00:00:00Z",
                    "twins": [{"propertyName": "temperature", "reported": {"value": "21", "metadata": {"timestamp": "1"}}}]}),
        )
        .unwrap();
        assert_eq!(s.twins[0].reported.as_ref().unwrap().value, "21");
    }

    #[test]
    fn attacks_on_the_status_are_named() {
        let d = device();
        let cases = [
            (
                json!({"twins": [{"propertyName": "pressure", "reported": {"value": "1"}}]}),
                "not a property",
            ),
            (
                json!({"twins": [{"propertyName": "switch"}, {"propertyName": "switch"}]}),
                "twice",
            ),
            (
                json!({"twins": [{"propertyName": "switch", "reported": {"value": "x".repeat(513)}}]}),
                "at most 512",
            ),
            (
                json!({"twins": [{"propertyName": "switch", "reported": {"value": "1", "metadata": (0..17).map(|i| (i.to_string(), "v".to_string())).collect::<BTreeMap<_, _>>()}}]}),
                "metadata",
            ),
            (json!({"state": "s".repeat(200)}), "state"),
            (json!({"twins": "all of them"}), "not a device status"),
        ];
        for (status, want) in cases {
            let e = check_status(&d, &status).unwrap_err();
            assert!(e.contains(want), "{status}: {e}");
        }
    }
}
