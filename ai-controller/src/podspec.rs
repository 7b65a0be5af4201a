//! Building workers' pod specs from a user's template: what both the JointInferenceService and
//! the IncrementalLearningJob controllers do to a template (labels, host-path mounts, Sedna's
//! common environment, the owner reference), in one place. The user's own values win: an env
//! variable the template sets is left alone.

use sedge_worker_contract::env;
use serde_json::{Value, json};

use crate::controller::ControllerConfig;

/// The template split into its metadata (with `labels` added) and its pod spec.
pub(crate) fn from_template(
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    labels: &[(&str, &str)],
) -> (Value, Value) {
    let mut tpl = serde_json::to_value(template).unwrap_or_else(|_| json!({}));
    let mut all = tpl["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (k, v) in labels {
        all.insert((*k).into(), json!(v));
    }
    tpl["metadata"]["labels"] = Value::Object(all);
    (tpl["metadata"].take(), tpl["spec"].take())
}

/// The controller reference of a child of the sedna.io object `kind` named `name`.
pub(crate) fn owner_ref(kind: &str, name: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "sedna.io/v1alpha1", "kind": kind,
        "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// The containers of a pod spec.
pub(crate) fn containers(spec: &mut Value) -> &mut [Value] {
    spec["containers"]
        .as_array_mut()
        .map(|v| v.as_mut_slice())
        .unwrap_or(&mut [])
}

/// Sets `name` in every container unless the template already sets it (the user's value wins).
/// An object value is a `valueFrom`.
pub(crate) fn set_env(containers: &mut [Value], name: &str, value: Value) {
    for c in containers {
        let env = c["env"].as_array_mut();
        let env = match env {
            Some(e) => e,
            None => {
                c["env"] = json!([]);
                c["env"].as_array_mut().expect("just set")
            }
        };
        if env.iter().any(|e| e["name"] == name) {
            continue;
        }
        let mut e = json!({"name": name});
        match value {
            Value::Object(ref o) => e["valueFrom"] = Value::Object(o.clone()),
            ref v => e["value"] = v.clone(),
        }
        env.push(e);
    }
}

/// Sedna's environment every worker gets: its namespace, its owner (`SERVICE_NAME` or
/// `JOB_NAME`), its own pod name, and the node's local controller to report to.
pub(crate) fn common_env(
    containers: &mut [Value],
    cfg: &ControllerConfig,
    namespace: &str,
    owner: (&str, &str),
) {
    set_env(containers, env::NAMESPACE, json!(namespace));
    set_env(containers, owner.0, json!(owner.1));
    set_env(
        containers,
        env::WORKER_NAME,
        json!({"fieldRef": {"fieldPath": "metadata.name"}}),
    );
    set_env(
        containers,
        env::LC_SERVER,
        json!(format!("http://127.0.0.1:{}", cfg.lc_port)),
    );
    set_env(
        containers,
        env::LC_PERIOD,
        json!(cfg.report_period_seconds.to_string()),
    );
}

/// Mounts host directory `dir` as volume `name` at `mount` in every container (replacing a
/// volume of that name). `type_` is the hostPath type, if any.
pub(crate) fn mount_host_dir(
    spec: &mut Value,
    name: &str,
    dir: &str,
    mount: &str,
    read_only: bool,
    type_: Option<&str>,
) {
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    let vols = spec["volumes"].as_array_mut().expect("array");
    vols.retain(|v| v["name"] != name);
    let mut host = json!({"path": dir});
    if let Some(t) = type_ {
        host["type"] = json!(t);
    }
    vols.push(json!({"name": name, "hostPath": host}));
    for c in spec["containers"].as_array_mut().into_iter().flatten() {
        if !c["volumeMounts"].is_array() {
            c["volumeMounts"] = json!([]);
        }
        let m = c["volumeMounts"].as_array_mut().expect("array");
        m.retain(|v| v["name"] != name);
        m.push(json!({"name": name, "mountPath": mount, "readOnly": read_only}));
    }
}

/// The directory holding `path` (`/` for a top-level file).
pub(crate) fn parent(path: &str) -> String {
    std::path::Path::new(path)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into())
}
