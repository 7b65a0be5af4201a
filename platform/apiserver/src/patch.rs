//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch for the
//! built-in kinds, and server-side apply with field ownership recorded in `managedFields`.
//!
//! Strategic merge keys are looked up by field name (`containers`, `env`, `volumes`, ...), which is
//! what the built-in kinds we serve need; see [`merge_key`].

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// The patch document itself is malformed.
    #[error("{0}")]
    Malformed(String),
    /// The patch is well-formed but does not apply to the object (e.g. a failed `test`).
    #[error("{0}")]
    NotApplicable(String),
    /// Server-side apply found fields owned by other managers with different values.
    #[error("Apply failed with {} conflict(s)", .0.len())]
    Conflicts(Vec<(String, String)>),
}

/// The merge key for a list field, decided from the field name and, for the ambiguous names
/// (`ports`, `addresses`), from the items themselves.
pub fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let has = |k: &str| !items.is_empty() && items.iter().all(|i| i.get(k).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        "hostAliases" => Some("ip"),
        "topologySpreadConstraints" => Some("topologyKey"),
        "readinessGates" => Some("conditionType"),
        "ports" if has("containerPort") => Some("containerPort"),
        "ports" if has("port") => Some("port"),
        "addresses" if has("type") => Some("type"),
        _ => None,
    }
}

/// Primitive lists whose strategic patch strategy is "merge" (set union).
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &ops)
        .map_err(|e| PatchError::NotApplicable(format!("the JSON patch does not apply: {e}")))
}

/// Applies a strategic merge patch (the built-in kinds' patch type that `kubectl` uses).
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        return Err(PatchError::Malformed(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    merge_map(target.as_object_mut().expect("object"), p)
}

fn merge_map(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = patch.clone();
            p.remove("$patch");
            *target = p;
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Malformed(format!(
                "unknown patch directive $patch: {other}"
            )));
        }
    }
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (target.get_mut(field), v.as_array())
            {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(pm) => {
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target.remove(k);
                    continue;
                }
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                merge_map(entry.as_object_mut().expect("object"), pm)?;
            }
            Value::Array(items) => merge_list(target, k, items)?,
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: BTreeSet<&str> = retain.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(k.as_str()));
    }
    Ok(())
}

fn merge_list(
    target: &mut Map<String, Value>,
    field: &str,
    items: &[Value],
) -> Result<(), PatchError> {
    let replace_all = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let items: Vec<&Value> = items
        .iter()
        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("replace"))
        .collect();
    if replace_all {
        target.insert(
            field.to_string(),
            Value::Array(items.into_iter().cloned().collect()),
        );
        return Ok(());
    }
    let existing = target
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let all: Vec<Value> = existing
        .iter()
        .chain(items.iter().copied())
        .cloned()
        .collect();
    if let Some(key) = merge_key(field, &all)
        && items.iter().all(|i| i.is_object())
    {
        let mut out = existing;
        for item in items {
            let kv = &item[key];
            let pos = out.iter().position(|e| &e[key] == kv);
            let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
            match (pos, delete) {
                (Some(i), true) => {
                    out.remove(i);
                }
                (None, true) => {}
                (Some(i), false) => {
                    if !out[i].is_object() {
                        out[i] = Value::Object(Map::new());
                    }
                    merge_map(
                        out[i].as_object_mut().expect("object"),
                        item.as_object().expect("object"),
                    )?;
                }
                (None, false) => {
                    let mut fresh = Map::new();
                    merge_map(&mut fresh, item.as_object().expect("object"))?;
                    out.push(Value::Object(fresh));
                }
            }
        }
        target.insert(field.to_string(), Value::Array(out));
    } else if merges_primitives(field) && items.iter().all(|i| !i.is_object() && !i.is_array()) {
        let mut out = existing;
        for item in items {
            if !out.contains(item) {
                out.push(item.clone());
            }
        }
        target.insert(field.to_string(), Value::Array(out));
    } else {
        target.insert(
            field.to_string(),
            Value::Array(items.into_iter().cloned().collect()),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server-side apply.

/// A field path in managedFields notation: `f:spec`, `k:{"name":"c"}`, `.`.
pub type FieldPath = Vec<String>;

fn key_elem(item: &Value, key: &str) -> String {
    let mut m = Map::new();
    m.insert(key.to_string(), item[key].clone());
    format!("k:{}", Value::Object(m))
}

/// The leaf paths a configuration sets (what its manager will own).
pub fn field_set(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    if let Some(map) = obj.as_object() {
        for (k, v) in map {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                        if let Some(mv) = v.get(mk) {
                            collect(
                                mv,
                                mk,
                                vec!["f:metadata".into(), format!("f:{mk}")],
                                &mut out,
                            );
                        }
                    }
                }
                _ => collect(v, k, vec![format!("f:{k}")], &mut out),
            }
        }
    }
    out
}

fn collect(v: &Value, field: &str, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, sub) in m {
                let mut p = path.clone();
                p.push(format!("f:{k}"));
                collect(sub, k, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => match merge_key(field, items) {
            Some(key) if items.iter().all(Value::is_object) => {
                for item in items {
                    let mut p = path.clone();
                    p.push(key_elem(item, key));
                    let mut dot = p.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    if let Some(m) = item.as_object() {
                        for (k, sub) in m {
                            let mut pp = p.clone();
                            pp.push(format!("f:{k}"));
                            collect(sub, k, pp, out);
                        }
                    }
                }
            }
            _ => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// Renders a path set as a `fieldsV1` trie.
pub fn to_fields_v1(set: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for elem in path {
            node = node
                .entry(elem.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("trie nodes are objects");
        }
    }
    Value::Object(root)
}

/// Reads a `fieldsV1` trie back into a path set.
pub fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, sub) in m {
                    path.push(k.clone());
                    walk(sub, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The value at a path (`None` if absent).
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for elem in path {
        if elem == "." {
            return Some(cur);
        }
        if let Some(f) = elem.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = elem.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|item| key.iter().all(|(kk, kv)| &item[kk] == kv))?;
        } else {
            return None;
        }
    }
    Some(cur)
}

fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    if last == "." {
        // Remove the list item itself: parent_path ends with its k: element.
        let Some((item, list_path)) = parent_path.split_last() else {
            return;
        };
        let Some(k) = item.strip_prefix("k:") else {
            return;
        };
        let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
            return;
        };
        if let Some(Value::Array(list)) = value_at_mut(obj, list_path) {
            list.retain(|i| !key.iter().all(|(kk, kv)| &i[kk] == kv));
        }
        return;
    }
    if let (Some(f), Some(Value::Object(m))) =
        (last.strip_prefix("f:"), value_at_mut(obj, parent_path))
    {
        m.remove(f);
    }
}

fn value_at_mut<'a>(obj: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for elem in path {
        if let Some(f) = elem.strip_prefix("f:") {
            cur = cur.get_mut(f)?;
        } else if let Some(k) = elem.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array_mut()?
                .iter_mut()
                .find(|item| key.iter().all(|(kk, kv)| &item[kk] == kv))?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Deep merge used by apply: maps recurse, keyed lists merge by key, everything else is replaced.
fn apply_merge(target: &mut Value, config: &Value, field: &str) {
    match (target, config) {
        (Value::Object(t), Value::Object(c)) => {
            for (k, v) in c {
                match t.get_mut(k) {
                    Some(existing) if !v.is_null() => apply_merge(existing, v, k),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t @ Value::Array(_), Value::Array(c)) => {
            let all: Vec<Value> = t
                .as_array()
                .expect("array")
                .iter()
                .chain(c)
                .cloned()
                .collect();
            match merge_key(field, &all) {
                Some(key) if all.iter().all(Value::is_object) => {
                    let list = t.as_array_mut().expect("array");
                    for item in c {
                        match list.iter_mut().find(|e| e[key] == item[key]) {
                            Some(e) => apply_merge(e, item, ""),
                            None => list.push(item.clone()),
                        }
                    }
                }
                _ => *t = Value::Array(c.clone()),
            }
        }
        (t, c) => *t = c.clone(),
    }
}

fn render(path: &[String]) -> String {
    let mut s = String::new();
    for e in path {
        if let Some(f) = e.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = e.strip_prefix("k:") {
            s.push('[');
            s.push_str(k);
            s.push(']');
        }
    }
    s
}

fn managers(obj: &Value) -> Vec<Value> {
    obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn set_managers(obj: &mut Value, entries: Vec<Value>) {
    let entries: Vec<Value> = entries
        .into_iter()
        .filter(|e| e["fieldsV1"].as_object().is_some_and(|m| !m.is_empty()))
        .collect();
    if entries.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(entries);
    }
}

fn entry(
    manager: &str,
    operation: &str,
    api_version: &str,
    now: &str,
    set: &BTreeSet<FieldPath>,
    sub: Option<&str>,
) -> Value {
    let mut e = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(set),
    });
    if let Some(s) = sub {
        e["subresource"] = json!(s);
    }
    e
}

/// Server-side apply of `config` by `manager` onto `current` (None = create). Returns the new object
/// with `managedFields` updated. Conflicts with other managers fail unless `force`.
pub fn server_side_apply(
    current: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, PatchError> {
    if !config.is_object() {
        return Err(PatchError::Malformed(
            "an apply configuration must be a JSON object".into(),
        ));
    }
    let api_version = config["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let new_set = field_set(config);
    let mut obj = current.cloned().unwrap_or_else(|| json!({"metadata": {}}));
    let mut entries = managers(&obj);
    let mut old_set = BTreeSet::new();
    let mut conflicts = Vec::new();
    for e in entries.iter_mut() {
        let name = e["manager"].as_str().unwrap_or_default();
        let is_self = name == manager && e["operation"] == "Apply";
        let mut set = from_fields_v1(&e["fieldsV1"]);
        if is_self {
            old_set = set;
            continue;
        }
        let clashing: Vec<FieldPath> = set
            .iter()
            .filter(|p| p.last().is_some_and(|l| l != "."))
            .filter(|p| new_set.contains(*p) && value_at(&obj, p) != value_at(config, p))
            .cloned()
            .collect();
        if clashing.is_empty() {
            continue;
        }
        if force {
            for p in &clashing {
                set.remove(p);
            }
            e["fieldsV1"] = to_fields_v1(&set);
        } else {
            conflicts.extend(clashing.iter().map(|p| (name.to_string(), render(p))));
        }
    }
    if !conflicts.is_empty() {
        return Err(PatchError::Conflicts(conflicts));
    }
    // Fields this manager applied before, no longer applies, and nobody else owns: removed.
    let others: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| !(e["manager"] == manager && e["operation"] == "Apply"))
        .flat_map(|e| from_fields_v1(&e["fieldsV1"]))
        .collect();
    let mut dropped: Vec<&FieldPath> = old_set
        .iter()
        .filter(|p| !new_set.contains(*p))
        .filter(|p| {
            let prefix: &[String] = if p.last().is_some_and(|l| l == ".") {
                &p[..p.len() - 1]
            } else {
                &p[..]
            };
            !others.iter().any(|o| o.starts_with(prefix))
        })
        .collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        remove_at(&mut obj, p);
    }
    let mut cfg = config.clone();
    if let Some(m) = cfg["metadata"].as_object_mut() {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    apply_merge(&mut obj, &cfg, "");
    entries.retain(|e| !(e["manager"] == manager && e["operation"] == "Apply"));
    entries.push(entry(manager, "Apply", &api_version, now, &new_set, None));
    set_managers(&mut obj, entries);
    Ok(obj)
}

/// Records an ordinary (non-apply) write by `manager`: the leaves it changed become its own and
/// leave other managers' sets. `sub` is `Some("status")` for status writes.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    now: &str,
    sub: Option<&str>,
) {
    let new_set = field_set(new);
    let changed: BTreeSet<FieldPath> = match old {
        None => new_set.clone(),
        Some(o) => new_set
            .iter()
            .filter(|p| value_at(o, p) != value_at(new, p))
            .cloned()
            .collect(),
    };
    let mut entries = managers(new);
    if changed.is_empty() && !entries.is_empty() {
        return;
    }
    let mut mine = BTreeSet::new();
    for e in entries.iter_mut() {
        let mut set = from_fields_v1(&e["fieldsV1"]);
        let is_mine = e["manager"] == manager
            && e["operation"] == "Update"
            && e["subresource"].as_str() == sub;
        if is_mine {
            mine = set;
            continue;
        }
        let before = set.len();
        set.retain(|p| !changed.contains(p));
        // Fields that no longer exist are owned by nobody.
        set.retain(|p| value_at(new, p).is_some());
        if set.len() != before {
            e["fieldsV1"] = to_fields_v1(&set);
        }
    }
    mine.extend(changed);
    mine.retain(|p| value_at(new, p).is_some());
    entries.retain(|e| {
        !(e["manager"] == manager && e["operation"] == "Update" && e["subresource"].as_str() == sub)
    });
    let api_version = new["apiVersion"].as_str().unwrap_or_default().to_string();
    entries.push(entry(manager, "Update", &api_version, now, &mine, sub));
    set_managers(new, entries);
}

/// Renders apply conflicts like kube-apiserver does.
pub fn conflict_message(conflicts: &[(String, String)]) -> String {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
        .collect();
    format!(
        "Apply failed with {} conflict(s): {}",
        conflicts.len(),
        lines.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"containers": [
                {"name": "main", "image": "nginx:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "side", "image": "busybox"}
            ]}
        })
    }

    #[test]
    fn strategic_merges_containers_and_env_by_name() {
        let mut p = pod();
        strategic_merge(
            &mut p,
            &json!({"metadata": {"finalizers": ["b", "a"]}, "spec": {
                "$setElementOrder/containers": [{"name": "main"}, {"name": "side"}],
                "containers": [{"name": "main", "image": "nginx:2", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]
            }}),
        )
        .unwrap();
        let c = &p["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "nginx:2");
        assert_eq!(c[1]["image"], "busybox");
        let env: Vec<_> = c[0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["value"].as_str().unwrap())
            .collect();
        assert_eq!(env, vec!["1", "3", "4"]);
        assert_eq!(p["metadata"]["finalizers"], json!(["a", "b"]));
        assert!(p["spec"].get("$setElementOrder/containers").is_none());
    }

    #[test]
    fn strategic_directives() {
        let mut p = pod();
        strategic_merge(
            &mut p,
            &json!({"metadata": {"labels": null, "$deleteFromPrimitiveList/finalizers": ["a"]},
                    "spec": {"containers": [{"name": "side", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert!(p["metadata"].get("labels").is_none());
        assert_eq!(p["metadata"]["finalizers"], json!([]));
        assert_eq!(p["spec"]["containers"].as_array().unwrap().len(), 1);
        let mut p = pod();
        strategic_merge(&mut p, &json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}}))
            .unwrap();
        assert_eq!(
            p["spec"]["containers"],
            json!([{"name": "only", "image": "x"}])
        );
        assert!(strategic_merge(&mut p, &json!([1])).is_err());
    }

    #[test]
    fn json_patch_errors_are_classified() {
        let mut p = pod();
        json_patch(
            &mut p,
            &json!([{"op": "replace", "path": "/metadata/labels/app", "value": "db"}]),
        )
        .unwrap();
        assert_eq!(p["metadata"]["labels"]["app"], "db");
        assert!(matches!(
            json_patch(&mut p, &json!({"op": "nope"})),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            json_patch(
                &mut p,
                &json!([{"op": "test", "path": "/metadata/name", "value": "other"}])
            ),
            Err(PatchError::NotApplicable(_))
        ));
    }

    #[test]
    fn fields_v1_round_trip() {
        let set = field_set(&pod());
        assert!(set.contains(&vec![
            "f:spec".into(),
            "f:containers".into(),
            "k:{\"name\":\"side\"}".into(),
            ".".into()
        ]));
        let trie = to_fields_v1(&set);
        assert_eq!(from_fields_v1(&trie), set);
        assert!(trie["f:metadata"]["f:labels"]["f:app"].is_object());
    }

    #[test]
    fn apply_owns_removes_and_conflicts() {
        let now = "2026-01-01T00:00:00Z";
        let cfg1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1", "y": "2"}});
        let o1 = server_side_apply(None, &cfg1, "alice", false, now).unwrap();
        assert_eq!(o1["data"]["y"], "2");
        // Alice stops applying y and label b: they go away.
        let cfg2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"x": "1"}});
        let o2 = server_side_apply(Some(&o1), &cfg2, "alice", false, now).unwrap();
        assert!(o2["data"].get("y").is_none());
        assert!(o2["metadata"]["labels"].get("b").is_none());
        // Bob changes x with an ordinary update; Alice re-applying x=1 now conflicts.
        let mut o3 = o2.clone();
        o3["data"]["x"] = json!("9");
        record_update(Some(&o2), &mut o3, "bob", now, None);
        let err = server_side_apply(Some(&o3), &cfg2, "alice", false, now).unwrap_err();
        assert_eq!(
            err,
            PatchError::Conflicts(vec![("bob".into(), ".data.x".into())])
        );
        let o4 = server_side_apply(Some(&o3), &cfg2, "alice", true, now).unwrap();
        assert_eq!(o4["data"]["x"], "1");
        let bob = o4["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == "bob");
        assert!(
            bob.is_none(),
            "bob lost his only field: {:?}",
            o4["metadata"]["managedFields"]
        );
        // Applying the same value another manager owns is shared ownership, not a conflict.
        let o5 = server_side_apply(Some(&o4), &cfg2, "carol", false, now).unwrap();
        assert_eq!(o5["metadata"]["managedFields"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn apply_merges_keyed_lists() {
        let now = "2026-01-01T00:00:00Z";
        let base = server_side_apply(None, &pod(), "a", false, now).unwrap();
        let cfg = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                         "spec": {"containers": [{"name": "extra", "image": "e"}]}});
        let merged = server_side_apply(Some(&base), &cfg, "b", false, now).unwrap();
        assert_eq!(merged["spec"]["containers"].as_array().unwrap().len(), 3);
    }
}
