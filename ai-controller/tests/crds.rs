//! The committed CRD YAML matches the Rust types, and Sedna's own manifests validate against it
//! unchanged while manifests with wrong types are refused with the field named.

use sedge_ai_controller::crd::{self, JointInferenceService};
use serde_json::Value;

#[test]
fn committed_crds_match_the_types() {
    let generated = crd::crds_yaml();
    if std::env::var_os("SEDGE_WRITE_CRDS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds/sedna.io.yaml"),
            &generated,
        )
        .unwrap();
        return;
    }
    assert!(
        crd::CRDS_YAML == generated,
        "ai-controller/crds/sedna.io.yaml differs from the types in crd.rs; regenerate it with \
         `SEDGE_WRITE_CRDS=1 cargo test -p sedge-ai-controller --test crds`"
    );
}

/// The CRD schema for `kind`.
fn schema(kind: &str) -> Value {
    let crd = crd::crds()
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

/// Validates like the API server does; returns `field: message` for each cause.
fn validate(obj: &Value) -> Vec<String> {
    let mut o = obj.clone();
    let kind = o["kind"].as_str().unwrap().to_string();
    sedge_apiserver::validate::custom_resource(&mut o, &schema(&kind))
        .into_iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect()
}

#[test]
fn sedna_manifests_apply_unchanged() {
    for file in ["helmet-ji.yaml", "models-dataset.yaml", "helmet-il.yaml"] {
        let text =
            std::fs::read_to_string(format!("{}/tests/sedna/{file}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        for d in docs(&text) {
            let causes = validate(&d);
            assert!(causes.is_empty(), "{file}: {causes:?}");
            // Nothing the user wrote in spec is pruned (hpa included).
            let mut pruned = Vec::new();
            let mut o = d.clone();
            sedge_apiserver::validate::custom_resource_pruned(
                &mut o,
                &schema(d["kind"].as_str().unwrap()),
                &mut pruned,
            );
            assert!(pruned.is_empty(), "{file}: pruned {pruned:?}");
        }
    }
    let ji = &docs(include_str!("sedna/helmet-ji.yaml"))[0];
    let typed: JointInferenceService = serde_json::from_value(ji.clone()).unwrap();
    assert_eq!(typed.spec.edge_worker.hard_example_mining.name, "IBT");
    assert_eq!(typed.spec.edge_worker.hpa.as_ref().unwrap().max_replicas, 2);
    assert_eq!(
        crd::hem_parameters_json(&typed.spec.edge_worker.hard_example_mining.parameters),
        r#"[{"key":"threshold_img","value":"0.9"},{"key":"threshold_box","value":"0.9"}]"#
    );
    let models = docs(include_str!("sedna/models-dataset.yaml"));
    let little: crd::Model = serde_json::from_value(models[1].clone()).unwrap();
    assert_eq!(
        little.spec.device_soc_versions.as_deref(),
        Some(&["Ascend310".to_string()][..])
    );
}

#[test]
fn wrong_types_are_refused_naming_the_field() {
    let ji = docs(include_str!("sedna/helmet-ji.yaml")).remove(0);
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unquoted HEM parameter value",
            Box::new(|v| {
                v["spec"]["edgeWorker"]["hardExampleMining"]["parameters"][0]["value"] = 0.9.into()
            }),
            "spec.edgeWorker.hardExampleMining.parameters[0].value",
        ),
        (
            "maxReplicas as text",
            Box::new(|v| v["spec"]["edgeWorker"]["hpa"]["maxReplicas"] = "two".into()),
            "spec.edgeWorker.hpa.maxReplicas",
        ),
        (
            "no edge model",
            Box::new(|v| {
                v["spec"]["edgeWorker"]
                    .as_object_mut()
                    .unwrap()
                    .remove("model");
            }),
            "spec.edgeWorker.model",
        ),
        (
            "no containers",
            Box::new(|v| {
                v["spec"]["cloudWorker"]["template"]["spec"]["containers"] = Value::Array(vec![])
            }),
            "spec.cloudWorker.template.spec.containers",
        ),
        (
            "nodeName as a number",
            Box::new(|v| v["spec"]["edgeWorker"]["template"]["spec"]["nodeName"] = 7.into()),
            "spec.edgeWorker.template.spec.nodeName",
        ),
    ];
    for (what, edit, field) in cases {
        let mut bad = ji.clone();
        edit(&mut bad);
        let causes = validate(&bad);
        assert!(
            causes.iter().any(|c| c.starts_with(field)),
            "{what}: expected a cause at {field}, got {causes:?}"
        );
    }
    let il = docs(include_str!("sedna/helmet-il.yaml")).remove(0);
    let mut bad = il.clone();
    bad["spec"]["dataset"]["trainProb"] = 1.5.into();
    assert!(
        validate(&bad)
            .iter()
            .any(|c| c.starts_with("spec.dataset.trainProb"))
    );
    let mut bad = il;
    bad["spec"]["deploySpec"]["model"]["pollPeriodSeconds"] = 0.into();
    assert!(
        validate(&bad)
            .iter()
            .any(|c| c.starts_with("spec.deploySpec.model.pollPeriodSeconds"))
    );
}
