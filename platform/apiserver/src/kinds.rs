//! Defaults and validation for the built-in kinds the platform relies on (the subset of
//! kube-apiserver's strategies that clients notice), and the CRD status the server maintains.

use base64::Engine;
use serde_json::{Value, json};

use crate::error::Cause;
use crate::registry::{ResourceType, crd_to_type};
use crate::selector::LabelSelector;
use crate::validate;

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut()
        && m.get(key).is_none_or(Value::is_null)
    {
        m.insert(key.to_string(), v);
    }
}

/// Fills defaults the way kube-apiserver does on create and update.
pub fn apply_defaults(rt: &ResourceType, obj: &mut Value, rev: i64) {
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Pod") => default_pod_spec(&mut obj["spec"]),
        ("apps", "Deployment") => {
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            set_default(
                spec,
                "strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            default_template(spec);
        }
        ("apps", "ReplicaSet") => {
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            default_template(spec);
        }
        ("apps", "DaemonSet") => {
            let spec = &mut obj["spec"];
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            default_template(spec);
        }
        ("batch", "Job") => default_job(obj),
        ("", "Service") => {
            let spec = &mut obj["spec"];
            if !spec.is_object() {
                *spec = json!({});
            }
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            if spec["type"] != "ExternalName" {
                // Derived from the revision of the create: unique for the first million services.
                let n = rev.rem_euclid(1 << 20);
                let ip = format!("10.{}.{}.{}", 96 + (n >> 16), (n >> 8) & 255, n & 255);
                set_default(spec, "clusterIP", json!(ip));
                let ip = spec["clusterIP"].clone();
                set_default(spec, "clusterIPs", json!([ip]));
            }
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports {
                    set_default(p, "protocol", json!("TCP"));
                    let port = p["port"].clone();
                    set_default(p, "targetPort", port);
                }
            }
        }
        ("", "Secret") => {
            set_default(obj, "type", json!("Opaque"));
            if let Some(Value::Object(string_data)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                set_default(obj, "data", json!({}));
                for (k, v) in string_data {
                    let enc = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(enc);
                }
            }
        }
        ("", "Namespace") => {
            set_default(obj, "spec", json!({"finalizers": ["kubernetes"]}));
            if obj["status"]["phase"].is_null() {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        _ => {}
    }
}

/// kube-apiserver's Job defaults: counts, and (unless `manualSelector`) a selector on the Job's
/// uid with the labels that make its pods findable (`batch.kubernetes.io/job-name`, ...).
fn default_job(obj: &mut Value) {
    let uid = obj["metadata"]["uid"].clone();
    let name = obj["metadata"]["name"].clone();
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        return;
    }
    if spec["completions"].is_null() && spec["parallelism"].is_null() {
        spec["completions"] = json!(1);
        spec["parallelism"] = json!(1);
    }
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    set_default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    if spec["manualSelector"] != true && spec["selector"].is_null() && uid.is_string() {
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        let labels = &mut spec["template"]["metadata"]["labels"];
        if !labels.is_object() {
            *labels = json!({});
        }
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", &uid),
            ("batch.kubernetes.io/job-name", &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels[k] = v.clone();
        }
    }
    if spec["template"]["spec"].is_object() {
        let rp = spec["template"]["spec"]["restartPolicy"].clone();
        default_pod_spec(&mut spec["template"]["spec"]);
        // Kubernetes has no default here: a Job's pods must say Never or OnFailure.
        if rp.is_null()
            && let Some(m) = spec["template"]["spec"].as_object_mut()
        {
            m.remove("restartPolicy");
        }
    }
}

/// A workload's selector must be set and match its template's labels.
fn selector_matches_template(spec: &Value, causes: &mut Vec<Cause>) {
    match LabelSelector::from_object(&spec["selector"]) {
        Ok(sel) if !sel.0.is_empty() => {
            let tmpl = json!({"metadata": {"labels": spec["template"]["metadata"]["labels"]}});
            if !sel.matches(&tmpl) {
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    &spec["template"]["metadata"]["labels"],
                    "`selector` does not match template `labels`",
                ));
            }
        }
        Ok(_) => causes.push(Cause::required("spec.selector")),
        Err(e) => causes.push(Cause::invalid("spec.selector", &spec["selector"], e)),
    }
}

/// `field` must be absent or a whole number >= 0.
fn non_negative(spec: &Value, field: &str, causes: &mut Vec<Cause>) {
    if let Some(r) = spec[field].as_i64()
        && r < 0
    {
        causes.push(Cause::invalid(
            format!("spec.{field}"),
            &spec[field],
            "must be greater than or equal to 0",
        ));
    }
}

/// The template's `restartPolicy` must be one of `allowed`.
fn template_restart_policy(spec: &Value, allowed: &[&str], causes: &mut Vec<Cause>) {
    let rp = &spec["template"]["spec"]["restartPolicy"];
    let values: Vec<Value> = allowed.iter().map(|a| json!(a)).collect();
    if rp.is_null() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "spec.template.spec.restartPolicy".into(),
            message: format!(
                "Required value: valid values: {}",
                allowed
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    } else if !values.contains(rp) {
        causes.push(Cause::not_supported(
            "spec.template.spec.restartPolicy",
            rp,
            &values,
        ));
    }
}

/// Pod defaults for a workload's `spec.template`, when it has a pod spec.
fn default_template(spec: &mut Value) {
    if spec["template"]["spec"].is_object() {
        default_pod_spec(&mut spec["template"]["spec"]);
    }
}

fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            for c in cs {
                let latest = c["image"]
                    .as_str()
                    .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                set_default(
                    c,
                    "imagePullPolicy",
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                if let Some(ports) = c["ports"].as_array_mut() {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// kube-apiserver's `validateLocalDescendingPath`: relative and without `..`.
fn local_descending_path(field: String, v: &Value, causes: &mut Vec<Cause>) {
    let Some(p) = v.as_str() else { return };
    if let Err(why) = sedge_api::local_descending(p) {
        causes.push(Cause::invalid(field, v, why));
    }
}

/// Volume names (DNS-1123 labels, unique) and the paths inside their sources; returns the names.
fn pod_volumes(spec: &Value, path: &str, causes: &mut Vec<Cause>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        let p = format!("{path}.volumes[{i}]");
        match v["name"].as_str() {
            None | Some("") => causes.push(Cause::required(format!("{p}.name"))),
            Some(n) => {
                if let Err(e) = validate::dns_label(n) {
                    causes.push(Cause::invalid(format!("{p}.name"), &v["name"], e));
                } else if names.iter().any(|x| x == n) {
                    causes.push(Cause {
                        reason: "FieldValueDuplicate",
                        field: format!("{p}.name"),
                        message: format!("Duplicate value: {n:?}"),
                    });
                }
                names.push(n.to_string());
            }
        }
        for source in ["configMap", "secret", "downwardAPI"] {
            for (j, item) in v[source]["items"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                local_descending_path(
                    format!("{p}.{source}.items[{j}].path"),
                    &item["path"],
                    causes,
                );
            }
        }
        for (k, src) in v["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            for source in ["configMap", "secret", "downwardAPI"] {
                for (j, item) in src[source]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    local_descending_path(
                        format!("{p}.projected.sources[{k}].{source}.items[{j}].path"),
                        &item["path"],
                        causes,
                    );
                }
            }
        }
        if v["hostPath"].is_object() && v["hostPath"]["path"].as_str().is_none_or(str::is_empty) {
            causes.push(Cause::required(format!("{p}.hostPath.path")));
        }
    }
    names
}

/// A container's mounts (each names a volume of the pod, paths sane) and ports.
fn container_mounts_and_ports(c: &Value, p: &str, volumes: &[String], causes: &mut Vec<Cause>) {
    let mut paths = Vec::new();
    for (j, m) in c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let mp = format!("{p}.volumeMounts[{j}]");
        match m["name"].as_str() {
            None | Some("") => causes.push(Cause::required(format!("{mp}.name"))),
            Some(n) if !volumes.iter().any(|v| v == n) => causes.push(Cause {
                reason: "FieldValueNotFound",
                field: format!("{mp}.name"),
                message: format!("Not found: {n:?}"),
            }),
            Some(_) => {}
        }
        match m["mountPath"].as_str() {
            None | Some("") => causes.push(Cause::required(format!("{mp}.mountPath"))),
            Some(path) => {
                if sedge_api::climbs(path) {
                    causes.push(Cause::invalid(
                        format!("{mp}.mountPath"),
                        &m["mountPath"],
                        "must not contain '..'",
                    ));
                }
                if paths.contains(&path) {
                    causes.push(Cause::invalid(
                        format!("{mp}.mountPath"),
                        &m["mountPath"],
                        "must be unique",
                    ));
                }
                paths.push(path);
            }
        }
        local_descending_path(format!("{mp}.subPath"), &m["subPath"], causes);
    }
    for (j, port) in c["ports"].as_array().into_iter().flatten().enumerate() {
        let pp = format!("{p}.ports[{j}]");
        match port["containerPort"].as_i64() {
            Some(1..=65535) => {}
            Some(_) => causes.push(Cause::invalid(
                format!("{pp}.containerPort"),
                &port["containerPort"],
                "must be between 1 and 65535, inclusive",
            )),
            None => causes.push(Cause::required(format!("{pp}.containerPort"))),
        }
        if let Some(h) = port["hostPort"].as_i64()
            && !(0..=65535).contains(&h)
        {
            causes.push(Cause::invalid(
                format!("{pp}.hostPort"),
                &port["hostPort"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(n) = port["name"].as_str()
            && (n.len() > 15
                || validate::dns_label(n).is_err()
                || !n.bytes().any(|b| b.is_ascii_lowercase()))
        {
            causes.push(Cause::invalid(
                format!("{pp}.name"),
                &port["name"],
                "must be no more than 15 characters, lower case alphanumerics or '-', with at least one letter",
            ));
        }
    }
}

fn pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    if !spec.is_object() {
        causes.push(Cause::required(path));
        return;
    }
    let volumes = pod_volumes(spec, path, causes);
    for (i, c) in spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let p = format!("{path}.initContainers[{i}]");
        if let Some(n) = c["name"].as_str()
            && let Err(e) = validate::dns_label(n)
        {
            causes.push(Cause::invalid(format!("{p}.name"), &c["name"], e));
        }
        container_mounts_and_ports(c, &p, &volumes, causes);
    }
    match spec["containers"].as_array() {
        Some(cs) if !cs.is_empty() => {
            let mut seen = Vec::new();
            for (i, c) in cs.iter().enumerate() {
                let p = format!("{path}.containers[{i}]");
                container_mounts_and_ports(c, &p, &volumes, causes);
                match c["name"].as_str() {
                    None | Some("") => causes.push(Cause::required(format!("{p}.name"))),
                    Some(n) => {
                        if let Err(e) = validate::dns_label(n) {
                            causes.push(Cause::invalid(format!("{p}.name"), &c["name"], e));
                        }
                        if seen.contains(&n) {
                            causes.push(Cause {
                                reason: "FieldValueDuplicate",
                                field: format!("{p}.name"),
                                message: format!("Duplicate value: {n:?}"),
                            });
                        }
                        seen.push(n);
                    }
                }
                if c["image"].as_str().is_none_or(str::is_empty) {
                    causes.push(Cause::required(format!("{p}.image")));
                }
            }
        }
        _ => causes.push(Cause::required(format!("{path}.containers"))),
    }
    let rp = &spec["restartPolicy"];
    let allowed = [json!("Always"), json!("OnFailure"), json!("Never")];
    if !rp.is_null() && !allowed.contains(rp) {
        causes.push(Cause::not_supported(
            format!("{path}.restartPolicy"),
            rp,
            &allowed,
        ));
    }
}

/// Kind-specific validation of an object about to be stored; `old` is the stored object on update.
pub fn validate(rt: &ResourceType, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Pod") => {
            pod_spec(&obj["spec"], "spec", &mut causes);
            if let Some(old) = old {
                // Like Kubernetes: a pod's containers and node binding are immutable once set,
                // except for images.
                let strip = |s: &Value| {
                    let mut s = s.clone();
                    if let Some(cs) = s["containers"].as_array_mut() {
                        for c in cs {
                            if let Some(m) = c.as_object_mut() {
                                m.remove("image");
                            }
                        }
                    }
                    for k in [
                        "activeDeadlineSeconds",
                        "tolerations",
                        "terminationGracePeriodSeconds",
                    ] {
                        if let Some(m) = s.as_object_mut() {
                            m.remove(k);
                        }
                    }
                    s
                };
                let old_node = old["spec"]["nodeName"].as_str().unwrap_or_default();
                let mut a = strip(&old["spec"]);
                let mut b = strip(&obj["spec"]);
                if old_node.is_empty() {
                    // Binding a pending pod to a node is allowed.
                    if let Some(m) = a.as_object_mut() {
                        m.remove("nodeName");
                    }
                    if let Some(m) = b.as_object_mut() {
                        m.remove("nodeName");
                    }
                }
                if a != b {
                    causes.push(Cause::forbidden(
                        "spec",
                        "pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds`",
                    ));
                }
            }
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet") | ("batch", "Job") => {
            let spec = &obj["spec"];
            selector_matches_template(spec, &mut causes);
            for f in [
                "replicas",
                "completions",
                "parallelism",
                "backoffLimit",
                "revisionHistoryLimit",
                "minReadySeconds",
            ] {
                non_negative(spec, f, &mut causes);
            }
            if let Some(d) = spec["activeDeadlineSeconds"].as_i64()
                && d <= 0
            {
                causes.push(Cause::invalid(
                    "spec.activeDeadlineSeconds",
                    &spec["activeDeadlineSeconds"],
                    "must be greater than 0",
                ));
            }
            match rt.kind.as_str() {
                "Job" => template_restart_policy(spec, &["OnFailure", "Never"], &mut causes),
                "DaemonSet" => template_restart_policy(spec, &["Always"], &mut causes),
                _ => {}
            }
            if rt.kind == "DaemonSet" {
                let u = &spec["updateStrategy"]["type"];
                let allowed = [json!("RollingUpdate"), json!("OnDelete")];
                if !u.is_null() && !allowed.contains(u) {
                    causes.push(Cause::not_supported(
                        "spec.updateStrategy.type",
                        u,
                        &allowed,
                    ));
                }
            }
            pod_spec(&spec["template"]["spec"], "spec.template.spec", &mut causes);
            if let Some(old) = old {
                if old["spec"]["selector"] != spec["selector"] {
                    causes.push(Cause::invalid(
                        "spec.selector",
                        &spec["selector"],
                        "field is immutable",
                    ));
                }
                if rt.kind == "Job" && old["spec"]["template"] != spec["template"] {
                    causes.push(Cause::invalid(
                        "spec.template",
                        &spec["template"],
                        "field is immutable",
                    ));
                }
                if rt.kind == "Job" && old["spec"]["completions"] != spec["completions"] {
                    causes.push(Cause::invalid(
                        "spec.completions",
                        &spec["completions"],
                        "field is immutable",
                    ));
                }
            }
        }
        ("", "Service") => {
            if let Some(ports) = obj["spec"]["ports"].as_array() {
                for (i, p) in ports.iter().enumerate() {
                    match p["port"].as_i64() {
                        Some(1..=65535) => {}
                        Some(_) => causes.push(Cause::invalid(
                            format!("spec.ports[{i}].port"),
                            &p["port"],
                            "must be between 1 and 65535, inclusive",
                        )),
                        None => causes.push(Cause::required(format!("spec.ports[{i}].port"))),
                    }
                }
            }
        }
        ("", "Secret") => {
            if let Some(data) = obj["data"].as_object() {
                for (k, v) in data {
                    let ok = v.as_str().is_some_and(|s| {
                        base64::engine::general_purpose::STANDARD.decode(s).is_ok()
                    });
                    if !ok {
                        causes.push(Cause::invalid(
                            format!("data[{k}]"),
                            v,
                            "must be base64-encoded",
                        ));
                    }
                }
            }
        }
        ("", "ConfigMap") => {
            for field in ["data", "binaryData"] {
                if let Some(data) = obj[field].as_object() {
                    for k in data.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                        if !ok {
                            causes.push(Cause::invalid(
                                format!("{field}[{k}]"),
                                &json!(k),
                                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                            ));
                        }
                    }
                }
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if let Err(mut c) = crd_to_type(obj) {
                causes.append(&mut c);
            }
            if let Some(old) = old {
                for f in ["group", "scope"] {
                    if old["spec"][f] != obj["spec"][f] {
                        causes.push(Cause::invalid(
                            format!("spec.{f}"),
                            &obj["spec"][f],
                            "field is immutable",
                        ));
                    }
                }
                if old["spec"]["names"]["plural"] != obj["spec"]["names"]["plural"] {
                    causes.push(Cause::invalid(
                        "spec.names.plural",
                        &obj["spec"]["names"]["plural"],
                        "field is immutable",
                    ));
                }
            }
        }
        _ => {}
    }
    causes
}

fn typed<T: serde::de::DeserializeOwned>(obj: &Value) -> Result<(), String> {
    serde_path_to_error::deserialize::<_, T>(obj)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })
}

/// Checks the field types of a built-in object against the Kubernetes API types (`k8s-openapi`),
/// so that `replicas: "three"` is a 400 naming `spec.replicas` instead of being stored.
pub fn check_types(rt: &ResourceType, obj: &Value) -> Result<(), String> {
    use k8s_openapi::api::{
        apps::v1 as apps, coordination::v1 as coordination, core::v1 as core, rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    if !rt.builtin {
        return Ok(());
    }
    match rt.kind.as_str() {
        "Namespace" => typed::<core::Namespace>(obj),
        "Node" => typed::<core::Node>(obj),
        "Pod" => typed::<core::Pod>(obj),
        "ConfigMap" => typed::<core::ConfigMap>(obj),
        "Secret" => typed::<core::Secret>(obj),
        "Service" => typed::<core::Service>(obj),
        "Endpoints" => typed::<core::Endpoints>(obj),
        "Event" => typed::<core::Event>(obj),
        "ServiceAccount" => typed::<core::ServiceAccount>(obj),
        "Lease" => typed::<coordination::Lease>(obj),
        "Deployment" => typed::<apps::Deployment>(obj),
        "ReplicaSet" => typed::<apps::ReplicaSet>(obj),
        "DaemonSet" => typed::<apps::DaemonSet>(obj),
        "Job" => typed::<k8s_openapi::api::batch::v1::Job>(obj),
        "Role" => typed::<rbac::Role>(obj),
        "ClusterRole" => typed::<rbac::ClusterRole>(obj),
        "RoleBinding" => typed::<rbac::RoleBinding>(obj),
        "ClusterRoleBinding" => typed::<rbac::ClusterRoleBinding>(obj),
        "CustomResourceDefinition" => typed::<ext::CustomResourceDefinition>(obj),
        _ => Ok(()),
    }
}

/// The status the server keeps on a CRD: accepted names, Established, stored versions.
pub fn crd_status(crd: &mut Value, now: &str) {
    let names = &crd["spec"]["names"];
    let kind = names["kind"].as_str().unwrap_or_default();
    let mut accepted = names.clone();
    set_default(&mut accepted, "listKind", json!(format!("{kind}List")));
    set_default(&mut accepted, "singular", json!(kind.to_lowercase()));
    let storage: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter(|v| v["storage"] == true)
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    let mut stored = crd["status"]["storedVersions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for s in storage {
        if !stored.contains(&s) {
            stored.push(s);
        }
    }
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    let existing_time = |t: &str| {
        crd["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .map(|c| c["lastTransitionTime"].clone())
    };
    let mut names_accepted = cond("NamesAccepted", "NoConflicts", "no conflicts found");
    let mut established = cond(
        "Established",
        "InitialNamesAccepted",
        "the initial names have been accepted",
    );
    if let Some(t) = existing_time("NamesAccepted") {
        names_accepted["lastTransitionTime"] = t;
    }
    if let Some(t) = existing_time("Established") {
        established["lastTransitionTime"] = t;
    }
    crd["status"] = json!({
        "acceptedNames": accepted,
        "conditions": [names_accepted, established],
        "storedVersions": stored,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn rt(group: &str, plural: &str) -> std::sync::Arc<ResourceType> {
        Registry::default()
            .snapshot()
            .get(group, "v1", plural)
            .unwrap()
    }

    #[test]
    fn pod_defaults_and_validation() {
        let pods = rt("", "pods");
        let mut p = json!({"spec": {"containers": [{"name": "c", "image": "sedge/worker"}]}});
        apply_defaults(&pods, &mut p, 1);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert!(validate(&pods, &p, None).is_empty());
        let bad = json!({"spec": {"containers": [{"name": "C_1"}, {"name": "C_1", "image": "x"}], "restartPolicy": "Sometimes"}});
        let fields: Vec<String> = validate(&pods, &bad, None)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            vec![
                "spec.containers[0].name",
                "spec.containers[0].image",
                "spec.containers[1].name",
                "spec.containers[1].name",
                "spec.restartPolicy"
            ]
        );
        let mut moved = p.clone();
        moved["spec"]["nodeName"] = json!("edge-1");
        assert!(
            validate(&pods, &moved, Some(&p)).is_empty(),
            "binding is allowed"
        );
        let mut moved_again = moved.clone();
        moved_again["spec"]["nodeName"] = json!("edge-2");
        assert_eq!(validate(&pods, &moved_again, Some(&moved)).len(), 1);
    }

    #[test]
    fn pod_volumes_mounts_and_ports_are_validated() {
        let pods = rt("", "pods");
        let pod = |volumes: Value, mounts: Value, ports: Value| {
            json!({"metadata": {"name": "p"}, "spec": {"volumes": volumes,
                "containers": [{"name": "c", "image": "i", "volumeMounts": mounts, "ports": ports}]}})
        };
        let fields = |o: Value| -> Vec<String> {
            validate(&pods, &o, None)
                .into_iter()
                .map(|c| c.field)
                .collect()
        };
        assert!(
            fields(pod(
                json!([{"name": "cfg", "configMap": {"name": "x"}}]),
                json!([{"name": "cfg", "mountPath": "/etc/x"}]),
                json!([{"containerPort": 80, "name": "http"}])
            ))
            .is_empty()
        );
        // The attack: volume names that are paths on the node.
        for bad in ["/tmp/x/y", "../../../../tmp/z", "Cfg"] {
            let f = fields(pod(
                json!([{"name": bad, "emptyDir": {}}]),
                json!([]),
                json!([]),
            ));
            assert_eq!(f, vec!["spec.volumes[0].name"], "{bad}");
        }
        let f = fields(pod(
            json!([{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}, {"name": "s", "secret": {"secretName": "s", "items": [{"key": "k", "path": "../../root/x"}]}}]),
            json!([{"name": "nope", "mountPath": "/x"}, {"name": "a", "mountPath": "/y/../../z", "subPath": "/abs"}, {"name": "a", "mountPath": ""}]),
            json!([{"containerPort": 0}, {"containerPort": 8080, "name": "this-name-is-too-long"}]),
        ));
        for want in [
            "spec.volumes[1].name",
            "spec.volumes[2].secret.items[0].path",
            "spec.containers[0].volumeMounts[0].name",
            "spec.containers[0].volumeMounts[1].mountPath",
            "spec.containers[0].volumeMounts[1].subPath",
            "spec.containers[0].volumeMounts[2].mountPath",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[0].ports[1].name",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let d = rt("apps", "deployments");
        let dep = json!({"spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let causes = validate(&d, &dep, None);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let d = rt("apps", "deployments");
        let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": "three"}});
        let e = check_types(&d, &bad).unwrap_err();
        assert!(e.starts_with("spec.replicas: invalid type: string"), "{e}");
        let ok = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3, "selector": {}, "template": {}}});
        check_types(&d, &ok).unwrap();
    }

    #[test]
    fn secret_string_data_is_encoded() {
        let s = rt("", "secrets");
        let mut sec = json!({"stringData": {"token": "abc"}});
        apply_defaults(&s, &mut sec, 1);
        assert_eq!(sec["data"]["token"], "YWJj");
        assert_eq!(sec["type"], "Opaque");
        assert!(sec.get("stringData").is_none());
        assert!(validate(&s, &json!({"data": {"k": "not base64!"}}), None)[0].field == "data[k]");
    }
}
