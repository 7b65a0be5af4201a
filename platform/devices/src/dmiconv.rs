//! The CRD types as DMI messages (what `MapperRegister` returns to a mapper).
//!
//! Free-form `configData` becomes DMI's `map<string, google.protobuf.Any>`, each value packed as
//! the protobuf well-known wrapper of its JSON type: text as `StringValue`, whole numbers as
//! `Int64Value`, other numbers as `DoubleValue`, booleans as `BoolValue`, and lists and objects as
//! a `StringValue` holding their JSON.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::twin::dmi;
use crate::{Device, DeviceModel, TwinProperty};

/// One JSON value as an `Any` of its well-known wrapper type.
pub fn any(v: &Value) -> prost_types::Any {
    use prost::encoding;
    let mut buf = Vec::new();
    let type_name = match v {
        Value::Bool(b) => {
            encoding::bool::encode(1, b, &mut buf);
            "BoolValue"
        }
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            let i = n.as_i64().unwrap_or(i64::MAX);
            encoding::int64::encode(1, &i, &mut buf);
            "Int64Value"
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or_default();
            encoding::double::encode(1, &f, &mut buf);
            "DoubleValue"
        }
        Value::String(s) => {
            encoding::string::encode(1, s, &mut buf);
            "StringValue"
        }
        other => {
            encoding::string::encode(1, &other.to_string(), &mut buf);
            "StringValue"
        }
    };
    prost_types::Any {
        type_url: format!("type.googleapis.com/google.protobuf.{type_name}"),
        value: buf,
    }
}

fn customized(m: &Option<Map<String, Value>>) -> Option<dmi::CustomizedValue> {
    m.as_ref().map(|m| dmi::CustomizedValue {
        data: m
            .iter()
            .map(|(k, v)| (k.clone(), any(v)))
            .collect::<HashMap<_, _>>(),
    })
}

fn twin(p: &TwinProperty) -> dmi::TwinProperty {
    dmi::TwinProperty {
        value: p.value.clone(),
        metadata: p.metadata.clone().into_iter().collect(),
    }
}

/// A Device as DMI's `Device`.
pub fn device(d: &Device) -> dmi::Device {
    let s = &d.spec;
    dmi::Device {
        name: d.metadata.name.clone().unwrap_or_default(),
        namespace: d.metadata.namespace.clone().unwrap_or_default(),
        spec: Some(dmi::DeviceSpec {
            device_model_reference: s
                .device_model_ref
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default(),
            protocol: Some(dmi::ProtocolConfig {
                protocol_name: s.protocol.protocol_name.clone(),
                config_data: customized(&s.protocol.config_data),
            }),
            properties: s
                .properties
                .iter()
                .map(|p| dmi::DeviceProperty {
                    name: p.name.clone(),
                    desired: p.desired.as_ref().map(twin),
                    visitors: p.visitors.as_ref().map(|v| dmi::VisitorConfig {
                        protocol_name: v.protocol_name.clone(),
                        config_data: customized(&v.config_data),
                    }),
                    report_cycle: p.report_cycle.unwrap_or_default(),
                    collect_cycle: p.collect_cycle.unwrap_or_default(),
                    report_to_cloud: p.report_to_cloud.unwrap_or_default(),
                    push_method: p.push_method.as_ref().map(|m| dmi::PushMethod {
                        http: m.http.as_ref().map(|h| dmi::PushMethodHttp {
                            hostname: h.host_name.clone(),
                            port: h.port.unwrap_or_default(),
                            requestpath: h.request_path.clone(),
                            timeout: h.timeout.unwrap_or_default(),
                        }),
                        mqtt: m.mqtt.as_ref().map(|q| dmi::PushMethodMqtt {
                            address: q.address.clone(),
                            topic: q.topic.clone(),
                            qos: q.qos.unwrap_or_default(),
                            retained: q.retained.unwrap_or_default(),
                        }),
                        otel: m.otel.as_ref().map(|o| dmi::PushMethodOtel {
                            endpoint_url: o.endpoint_url.clone(),
                        }),
                    }),
                })
                .collect(),
            methods: s
                .methods
                .iter()
                .map(|m| dmi::DeviceMethod {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    property_names: m.property_names.clone(),
                })
                .collect(),
        }),
        status: None,
    }
}

/// A DeviceModel as DMI's `DeviceModel`.
pub fn model(m: &DeviceModel) -> dmi::DeviceModel {
    fn text<T: serde::Serialize>(v: &Option<T>) -> String {
        v.as_ref()
            .and_then(|x| serde_json::to_value(x).ok())
            .and_then(|x| x.as_str().map(String::from))
            .unwrap_or_default()
    }
    dmi::DeviceModel {
        name: m.metadata.name.clone().unwrap_or_default(),
        namespace: m.metadata.namespace.clone().unwrap_or_default(),
        spec: Some(dmi::DeviceModelSpec {
            properties: m
                .spec
                .properties
                .iter()
                .map(|p| dmi::ModelProperty {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    r#type: text(&p.type_),
                    access_mode: text(&p.access_mode),
                    minimum: p.minimum.clone(),
                    maximum: p.maximum.clone(),
                    unit: p.unit.clone(),
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use serde_json::json;

    #[test]
    fn config_values_pack_as_well_known_wrappers() {
        let s = any(&json!("HoldingRegister"));
        assert_eq!(
            s.type_url,
            "type.googleapis.com/google.protobuf.StringValue"
        );
        assert_eq!(
            String::decode(s.value.as_slice()).unwrap(),
            "HoldingRegister"
        );
        let i = any(&json!(1502));
        assert_eq!(i.type_url, "type.googleapis.com/google.protobuf.Int64Value");
        assert_eq!(i64::decode(i.value.as_slice()).unwrap(), 1502);
        let f = any(&json!(0.5));
        assert_eq!(f64::decode(f.value.as_slice()).unwrap(), 0.5);
        let b = any(&json!(true));
        assert!(bool::decode(b.value.as_slice()).unwrap());
        let o = any(&json!({"a": [1]}));
        assert_eq!(String::decode(o.value.as_slice()).unwrap(), r#"{"a":[1]}"#);
    }
}
