//! Turning a pod spec into what a runtime needs: environment (`env`, `envFrom`, `valueFrom`
//! with the downward API), volumes materialised as files (configMap, secret, projected,
//! downwardAPI, emptyDir, hostPath) and mounts linked under the container's root. Everything
//! comes from the local store, so it works offline. Errors are the kubelet's
//! `CreateContainerConfigError` messages.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

use crate::runtime::Mount;
use crate::store::MetaStore;

/// Node facts the downward API exposes.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// Node name.
    pub node: String,
    /// Node (and, unless `pod_ip` says otherwise, pod) IP.
    pub ip: String,
    /// The pod's own IP on a pod network (a CRI sandbox's), for `status.podIP`.
    pub pod_ip: Option<String>,
}

fn lookup(store: &MetaStore, kind: &str, ns: &str, name: &str) -> Result<Option<Value>, String> {
    store.get(kind, ns, name).map_err(|e| e.to_string())
}

/// The string data of a config map or secret (secrets decoded), or `None` if not held.
fn data_of(
    store: &MetaStore,
    secret: bool,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let kind = if secret { "secret" } else { "configmap" };
    let Some(obj) = lookup(store, kind, ns, name)? else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(d) = obj["data"].as_object() {
        for (k, v) in d {
            let s = v.as_str().unwrap_or_default();
            let bytes = if secret {
                b64.decode(s)
                    .map_err(|e| format!("secret {ns}/{name} key {k}: {e}"))?
            } else {
                s.as_bytes().to_vec()
            };
            out.insert(k.clone(), bytes);
        }
    }
    if let Some(d) = obj["binaryData"].as_object() {
        for (k, v) in d {
            let bytes = b64
                .decode(v.as_str().unwrap_or_default())
                .map_err(|e| format!("configmap {ns}/{name} key {k}: {e}"))?;
            out.insert(k.clone(), bytes);
        }
    }
    Ok(Some(out))
}

fn what(secret: bool) -> &'static str {
    if secret { "secret" } else { "configmap" }
}

fn field(pod: &Value, path: &str, facts: &NodeFacts) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let m = &pod["metadata"];
    let keyed = |prefix: &str, map: &Value| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(s(&map[key]))
    };
    Ok(match path {
        "metadata.name" => s(&m["name"]),
        "metadata.namespace" => s(&m["namespace"]),
        "metadata.uid" => s(&m["uid"]),
        "spec.nodeName" => facts.node.clone(),
        "spec.serviceAccountName" => s(&pod["spec"]["serviceAccountName"]),
        "status.podIP" | "status.podIPs" => {
            facts.pod_ip.clone().unwrap_or_else(|| facts.ip.clone())
        }
        "status.hostIP" | "status.hostIPs" => facts.ip.clone(),
        _ => {
            if let Some(v) = keyed("metadata.labels", &m["labels"]) {
                v
            } else if let Some(v) = keyed("metadata.annotations", &m["annotations"]) {
                v
            } else {
                return Err(format!("unsupported fieldPath {path:?}"));
            }
        }
    })
}

/// A container's environment, in the kubelet's order (`envFrom` first, then `env`, later
/// entries win, `$(VAR)` expanded against earlier ones).
pub fn env(
    store: &MetaStore,
    pod: &Value,
    c: &Value,
    facts: &NodeFacts,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    // Services' variables first: the container's own win.
    let mut out: Vec<(String, String)> = crate::services::env(store, pod);
    let set = |out: &mut Vec<(String, String)>, k: String, v: String| {
        out.retain(|(x, _)| *x != k);
        out.push((k, v));
    };
    for ef in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = ef["prefix"].as_str().unwrap_or_default();
        for (secret, r) in [(false, &ef["configMapRef"]), (true, &ef["secretRef"])] {
            let Some(name) = r["name"].as_str() else {
                continue;
            };
            match data_of(store, secret, ns, name)? {
                Some(d) => {
                    for (k, v) in d {
                        set(
                            &mut out,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
                None if r["optional"] == true => {}
                None => return Err(format!("{} \"{name}\" not found", what(secret))),
            }
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let vf = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            let known: BTreeMap<&str, &str> =
                out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            crate::runtime::expand(v, &known)
        } else if vf.is_object() {
            if let Some(p) = vf["fieldRef"]["fieldPath"].as_str() {
                field(pod, p, facts)?
            } else if let Some(r) = vf["resourceFieldRef"]["resource"].as_str() {
                let (section, res) = r.split_once('.').unwrap_or(("limits", r));
                c["resources"][section][res]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| "0".into())
            } else {
                let (secret, r) = if vf["secretKeyRef"].is_object() {
                    (true, &vf["secretKeyRef"])
                } else {
                    (false, &vf["configMapKeyRef"])
                };
                let obj = r["name"].as_str().unwrap_or_default();
                let key = r["key"].as_str().unwrap_or_default();
                let optional = r["optional"] == true;
                match data_of(store, secret, ns, obj)? {
                    Some(d) => match d.get(key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            let kind = if secret { "Secret" } else { "ConfigMap" };
                            return Err(format!("couldn't find key {key} in {kind} {ns}/{obj}"));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("{} \"{obj}\" not found", what(secret))),
                }
            }
        } else {
            String::new()
        };
        set(&mut out, name, value);
    }
    Ok(out)
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<Value>>,
    mode: Option<u32>,
) -> Result<(), String> {
    let io = |p: &Path, e: std::io::Error| format!("writing {}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let pairs: Vec<(String, String)> = match items {
        Some(items) => items
            .iter()
            .map(|i| {
                (
                    i["key"].as_str().unwrap_or_default().to_string(),
                    i["path"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, rel) in pairs {
        let Some(bytes) = data.get(&key) else {
            return Err(format!("key {key} is not in the volume's source"));
        };
        let path = crate::runtime::under_root(dir, &rel);
        if let Some(parent) = Path::new(&rel).parent() {
            crate::podcheck::dirs_under(dir, parent)?;
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "{} is a symbolic link; refusing to write through it",
                path.display()
            ));
        }
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("sedge-tmp");
        std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
        if let Some(m) = mode {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m));
        }
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// Materialises the pod's volumes under `pod_dir/volumes/<name>`; returns name -> host path.
pub fn volumes(
    store: &MetaStore,
    pod: &Value,
    pod_dir: &Path,
    facts: &NodeFacts,
) -> Result<HashMap<String, PathBuf>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let mut out = HashMap::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let dir = pod_dir.join("volumes").join(&name);
        let mode = |x: &Value| x["defaultMode"].as_u64().map(|m| m as u32);
        // A config map or secret as files: `spec` holds the name (under `name_field`), `items`
        // and `optional`.
        let source =
            |secret: bool, spec: &Value, name_field: &str, m: Option<u32>| -> Result<(), String> {
                let obj = spec[name_field].as_str().unwrap_or_default();
                match data_of(store, secret, ns, obj)? {
                    Some(d) => write_items(&dir, &d, spec["items"].as_array(), m),
                    None if spec["optional"] == true => {
                        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())
                    }
                    None => Err(format!("{} \"{obj}\" not found", what(secret))),
                }
            };
        if v["configMap"].is_object() {
            source(false, &v["configMap"], "name", mode(&v["configMap"]))?;
        } else if v["secret"].is_object() {
            source(true, &v["secret"], "secretName", mode(&v["secret"]))?;
        } else if v["projected"].is_object() {
            let p = &v["projected"];
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for src in p["sources"].as_array().into_iter().flatten() {
                if src["configMap"].is_object() {
                    source(false, &src["configMap"], "name", mode(p))?;
                } else if src["secret"].is_object() {
                    source(true, &src["secret"], "name", mode(p))?;
                }
            }
        } else if v["downwardAPI"].is_object() {
            let mut data = BTreeMap::new();
            let mut items = Vec::new();
            for i in v["downwardAPI"]["items"].as_array().into_iter().flatten() {
                if let Some(p) = i["fieldRef"]["fieldPath"].as_str() {
                    let key = i["path"].as_str().unwrap_or_default().to_string();
                    data.insert(key.clone(), field(pod, p, facts)?.into_bytes());
                    items.push(serde_json::json!({"key": key, "path": key}));
                }
            }
            write_items(&dir, &data, Some(&items), None)?;
        } else if v["emptyDir"].is_object() {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        } else if let Some(p) = v["hostPath"]["path"].as_str() {
            out.insert(name, PathBuf::from(p));
            continue;
        } else {
            let kind = v
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "name").cloned())
                .unwrap_or_default();
            return Err(format!(
                "volume {name:?}: type {kind:?} is not supported on this node"
            ));
        }
        out.insert(name, dir);
    }
    Ok(out)
}

/// The container's `volumeMounts` as mounts: the volume (or, for `subPath`, the file or
/// directory under it, made if missing) and where it goes. A `subPath` never goes through a
/// symbolic link: a container that plants a link in a shared volume cannot make another mount
/// name a path outside it.
pub fn mount_list(c: &Value, vols: &HashMap<String, PathBuf>) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let volume = vols
            .get(name)
            .ok_or_else(|| format!("volumeMount {name:?} names no volume of the pod"))?;
        let host_path = match m["subPath"].as_str().filter(|s| !s.is_empty()) {
            Some(sp) => sub_path(volume, sp)?,
            None => volume.clone(),
        };
        let container_path = m["mountPath"].as_str().unwrap_or_default().to_string();
        out.push(Mount {
            host_path,
            container_path,
            read_only: m["readOnly"] == true,
        });
    }
    Ok(out)
}

/// `subPath` under a volume: directories on the way are made without following links, the last
/// part is used as it is (a file of a config map) or made as a directory; no part is a link.
fn sub_path(volume: &Path, sp: &str) -> Result<PathBuf, String> {
    let rel: PathBuf = Path::new(sp)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let Some(last) = rel.file_name() else {
        return Ok(volume.to_path_buf());
    };
    let parent = crate::podcheck::dirs_under(volume, rel.parent().unwrap_or(Path::new("")))?;
    let at = parent.join(last);
    match std::fs::symlink_metadata(&at) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "subPath {sp:?}: {} is a symbolic link; a mount may not go through it",
            at.display()
        )),
        Ok(_) => Ok(at),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&at)
                .map_err(|e| format!("subPath {sp:?}: {}: {e}", at.display()))?;
            Ok(at)
        }
        Err(e) => Err(format!("subPath {sp:?}: {}: {e}", at.display())),
    }
}

/// Links each mount under the container's root (`<root>/<mountPath>` -> the node's path): how
/// the process runtime gives a host process its volumes.
pub fn link_mounts(mounts: &[Mount], root: &Path) -> Result<(), String> {
    for m in mounts {
        let mount_path = m.container_path.as_str();
        let target = &m.host_path;
        let link = crate::runtime::under_root(root, mount_path);
        if link == root {
            return Err(format!(
                "mountPath {mount_path:?}: cannot mount over the container's root"
            ));
        }
        // The directories up to the link are made without following links (an earlier mount
        // may be a link to the host), and only a link of ours is ever replaced: the agent never
        // writes or deletes through a mount.
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        if let Some(parent) = Path::new(mount_path).parent() {
            crate::podcheck::dirs_under(root, parent)?;
        }
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::remove_file(&link).map_err(|e| format!("mount {}: {e}", link.display()))?
            }
            Ok(_) => {
                return Err(format!(
                    "mountPath {mount_path:?}: {} already exists in the container's root",
                    link.display()
                ));
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &link)
            .map_err(|e| format!("mount {}: {e}", link.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn setup() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&dir.path().join("edge.db")).unwrap();
        s.upsert(
            "configmap",
            "default",
            "cfg",
            "1",
            &json!({"data": {"MODE": "fast", "app.yaml": "a: 1"}}),
        )
        .unwrap();
        s.upsert(
            "secret",
            "default",
            "creds",
            "2",
            &json!({"data": {"TOKEN": "czNjcjN0"}}),
        )
        .unwrap();
        (dir, s)
    }

    #[test]
    fn env_resolves_references_and_names_what_is_missing() {
        let (_d, s) = setup();
        let facts = NodeFacts {
            node: "edge-1".into(),
            ip: "10.0.0.5".into(),
            pod_ip: None,
        };
        let pod =
            json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}}});
        let c = json!({
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "A", "value": "x"},
                {"name": "B", "value": "$(A)-y"},
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}}
            ]
        });
        let e: BTreeMap<String, String> = env(&s, &pod, &c, &facts).unwrap().into_iter().collect();
        assert_eq!(e["CFG_MODE"], "fast");
        assert_eq!(e["B"], "x-y");
        assert_eq!(e["T"], "s3cr3t");
        assert_eq!(e["N"], "edge-1");
        assert_eq!(e["IP"], "10.0.0.5");
        assert_eq!(e["L"], "web");
        assert!(!e.contains_key("O"));
        let c = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "k"}}}]});
        assert_eq!(
            env(&s, &pod, &c, &facts).unwrap_err(),
            "configmap \"missing\" not found"
        );
        let c = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nokey"}}}]});
        assert_eq!(
            env(&s, &pod, &c, &facts).unwrap_err(),
            "couldn't find key nokey in ConfigMap default/cfg"
        );
    }

    #[test]
    fn volumes_become_files_and_mounts_links() {
        let (d, s) = setup();
        let facts = NodeFacts {
            node: "edge-1".into(),
            ip: "10.0.0.5".into(),
            pod_ip: None,
        };
        let pod = json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {"volumes": [
            {"name": "config", "configMap": {"name": "cfg", "items": [{"key": "app.yaml", "path": "conf/app.yaml"}]}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}
        ]}});
        let pod_dir = d.path().join("pod");
        let vols = volumes(&s, &pod, &pod_dir, &facts).unwrap();
        let root = pod_dir.join("c");
        let c = json!({"volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "creds", "mountPath": "/var/run/creds"}, {"name": "info", "mountPath": "/info"}]});
        mounts(&c, &vols, &root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/app/conf/app.yaml")).unwrap(),
            "a: 1"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("var/run/creds/TOKEN")).unwrap(),
            "s3cr3t"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("info/name")).unwrap(),
            "p"
        );
        let bad = json!({"metadata": {"namespace": "default"}, "spec": {"volumes": [{"name": "x", "secret": {"secretName": "gone"}}]}});
        assert_eq!(
            volumes(&s, &bad, &pod_dir, &facts).unwrap_err(),
            "secret \"gone\" not found"
        );
        let bad = json!({"metadata": {"namespace": "default"}, "spec": {"volumes": [{"name": "x", "nfs": {"server": "s"}}]}});
        assert!(
            volumes(&s, &bad, &pod_dir, &facts)
                .unwrap_err()
                .contains("\"nfs\" is not supported")
        );
    }

    #[test]
    fn a_mount_under_a_host_path_link_never_touches_the_host() {
        let (d, s) = setup();
        let facts = NodeFacts {
            node: "edge-1".into(),
            ip: "10.0.0.5".into(),
            pod_ip: None,
        };
        // The host: a directory with a file the attacker wants gone.
        let host = d.path().join("host");
        std::fs::create_dir_all(host.join("etc")).unwrap();
        std::fs::write(host.join("etc/passwd"), "root:x:0:0").unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {"volumes": [
            {"name": "h", "hostPath": {"path": host.to_str().unwrap()}},
            {"name": "config", "configMap": {"name": "cfg"}}
        ]}});
        let pod_dir = d.path().join("pod");
        let vols = volumes(&s, &pod, &pod_dir, &facts).unwrap();
        let root = pod_dir.join("c");
        // The attack: mount the host path at /data, then a volume at /data/etc/passwd, which
        // used to delete the host's file to put the link there.
        let c = json!({"volumeMounts": [{"name": "h", "mountPath": "/data"}, {"name": "config", "mountPath": "/data/etc/passwd"}]});
        let e = mounts(&c, &vols, &root).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_to_string(host.join("etc/passwd")).unwrap(),
            "root:x:0:0"
        );
        // A mount over something the container root holds that is not our link is refused too.
        std::fs::create_dir_all(root.join("keep")).unwrap();
        let c = json!({"volumeMounts": [{"name": "config", "mountPath": "/keep"}]});
        assert!(
            mounts(&c, &vols, &root)
                .unwrap_err()
                .contains("already exists")
        );
        let c = json!({"volumeMounts": [{"name": "config", "mountPath": "/"}]});
        assert!(mounts(&c, &vols, &root).unwrap_err().contains("root"));
        // Mounting again (a restart) replaces our own link.
        let c = json!({"volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]});
        mounts(&c, &vols, &root).unwrap();
        mounts(&c, &vols, &root).unwrap();
        assert!(root.join("etc/app/MODE").exists());
    }

    fn mounts(c: &Value, vols: &HashMap<String, PathBuf>, root: &Path) -> Result<(), String> {
        link_mounts(&mount_list(c, vols)?, root)
    }

    #[test]
    fn a_sub_path_never_goes_through_a_link_a_container_planted() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("volumes/shared");
        std::fs::create_dir_all(&shared).unwrap();
        // One container of the pod made `escape -> /` in the shared emptyDir.
        std::os::unix::fs::symlink("/", shared.join("escape")).unwrap();
        let vols: HashMap<String, PathBuf> = [("shared".to_string(), shared.clone())].into();
        for sp in ["escape", "escape/etc", "../escape", "/escape/"] {
            let c = json!({"volumeMounts": [{"name": "shared", "mountPath": "/x", "subPath": sp}]});
            let e = mount_list(&c, &vols).unwrap_err();
            assert!(e.contains("symbolic link"), "{sp}: {e}");
        }
        // A plain subPath is made under the volume, read-only kept.
        let c = json!({"volumeMounts": [{"name": "shared", "mountPath": "/x", "subPath": "../../a/b", "readOnly": true}]});
        let m = mount_list(&c, &vols).unwrap();
        assert_eq!(
            m,
            vec![Mount {
                host_path: shared.join("a/b"),
                container_path: "/x".into(),
                read_only: true
            }]
        );
        assert!(shared.join("a/b").is_dir());
    }
}
