//! The committed CRD YAML matches the Rust types; KubeEdge-shaped v1beta1 manifests validate
//! against it unchanged (nothing pruned, free-form protocol data kept), and wrong types are
//! refused with the field named.

use sedge_devices::{Device, DeviceModel, PropertyType};
use serde_json::Value;

#[test]
fn committed_crds_match_the_types() {
    let generated = sedge_devices::crds_yaml();
    if std::env::var_os("SEDGE_WRITE_CRDS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds/devices.kubeedge.io.yaml"),
            &generated,
        )
        .unwrap();
        return;
    }
    assert!(
        sedge_devices::CRDS_YAML == generated,
        "platform/devices/crds/devices.kubeedge.io.yaml differs from the types; regenerate it with \
         `SEDGE_WRITE_CRDS=1 cargo test --workspace --test device_crds`"
    );
}

fn schema(kind: &str) -> Value {
    let crd = sedge_devices::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let v = serde_json::to_value(&crd.spec.versions[0]).unwrap();
    v["schema"]["openAPIV3Schema"].clone()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::with::singleton_map_recursive::deserialize::<Value, _>(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn validate(obj: &Value) -> Vec<String> {
    let mut o = obj.clone();
    let kind = o["kind"].as_str().unwrap().to_string();
    sedge_apiserver::validate::custom_resource(&mut o, &schema(&kind))
        .into_iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect()
}

#[test]
fn kubeedge_manifests_apply_unchanged() {
    let all = docs(include_str!("manifests/modbus-thermometer.yaml"));
    for d in &all {
        let causes = validate(d);
        assert!(causes.is_empty(), "{causes:?}");
        let mut pruned = Vec::new();
        let mut o = d.clone();
        sedge_apiserver::validate::custom_resource_pruned(
            &mut o,
            &schema(d["kind"].as_str().unwrap()),
            &mut pruned,
        );
        assert!(pruned.is_empty(), "pruned {pruned:?}");
    }
    let model: DeviceModel = serde_json::from_value(all[0].clone()).unwrap();
    assert_eq!(model.spec.properties[0].type_, Some(PropertyType::INT));
    let device: Device = serde_json::from_value(all[1].clone()).unwrap();
    let cfg = device.spec.protocol.config_data.as_ref().unwrap();
    assert_eq!(cfg["port"], 1502);
    let visitor = device.spec.properties[0].visitors.as_ref().unwrap();
    assert_eq!(
        visitor.config_data.as_ref().unwrap()["register"],
        "HoldingRegister"
    );
    let status = device.status.as_ref().unwrap();
    assert_eq!(status.twins[0].reported.as_ref().unwrap().value, "21");
    // What was read is what is written back: a round trip loses nothing.
    assert_eq!(serde_json::to_value(&device).unwrap(), all[1]);
}

#[test]
fn wrong_types_are_refused_with_the_field_named() {
    let all = docs(include_str!("manifests/modbus-thermometer.yaml"));
    let mut model = all[0].clone();
    model["spec"]["properties"][0]["type"] = "int".into();
    let causes = validate(&model);
    assert!(
        causes
            .iter()
            .any(|c| c.starts_with("spec.properties[0].type")),
        "{causes:?}"
    );
    let mut device = all[1].clone();
    device["spec"]["properties"][0]["collectCycle"] = "often".into();
    device["spec"]["properties"][0]["pushMethod"]["mqtt"]["qos"] = 3.into();
    let causes = validate(&device);
    assert!(
        causes
            .iter()
            .any(|c| c.starts_with("spec.properties[0].collectCycle")),
        "{causes:?}"
    );
    assert!(
        causes
            .iter()
            .any(|c| c.starts_with("spec.properties[0].pushMethod.mqtt.qos")),
        "{causes:?}"
    );
}
