//! The node's own check of a pod spec before anything of it touches the host.
//!
//! The API server validates pods, but the node trusts nothing that crosses the channel: here a
//! UID, a container name and a volume name become directory names, `mountPath`, `subPath` and
//! item paths become paths under the pod's directory, and a `hostPath` becomes a link to the
//! host. So the node checks again what it materialises, with kube-apiserver's rules where they
//! exist (DNS-1123 labels, relative paths without `..`), and a host-path allowlist of its own.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// Longest UID accepted (Kubernetes UIDs are 36-character UUIDs).
const MAX_UID: usize = 128;

pub use sedge_api::is_dns_label as dns_label;

/// A pod UID usable as a directory name: `[A-Za-z0-9-]`, 1 to 128 characters.
pub fn uid(u: &str) -> Result<(), String> {
    if u.is_empty()
        || u.len() > MAX_UID
        || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "pod UID {u:?} is not usable: expected 1 to {MAX_UID} letters, digits or '-'"
        ));
    }
    Ok(())
}

/// A path the pod gives that must stay inside a directory (`subPath`, item `path`): relative,
/// no `..`, not empty.
pub fn relative_path(field: &str, p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    sedge_api::local_descending(p).map_err(|why| format!("{field} {p:?}: {why}"))
}

/// A `hostPath` the node may link: absolute, no `..`, and under one of `allow` (each an
/// absolute directory). An empty `allow` refuses every host path.
pub fn host_path(field: &str, p: &str, allow: &[PathBuf]) -> Result<(), String> {
    let path = Path::new(p);
    if !path.is_absolute() || sedge_api::climbs(p) {
        return Err(format!(
            "{field} {p:?}: must be an absolute path without '..'"
        ));
    }
    if allow.iter().any(|a| path.starts_with(lexical(a))) {
        return Ok(());
    }
    let allowed = if allow.is_empty() {
        "none are allowed on this node".to_string()
    } else {
        format!(
            "allowed: {}",
            allow
                .iter()
                .map(|a| a.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(format!(
        "{field} {p:?}: host path is not allowed on this node ({allowed}; the edge agent's `host_path_allow` setting)"
    ))
}

/// Checks the node's `host_path_allow` setting: every entry an absolute path (a relative one
/// would silently allow nothing).
pub fn allowlist(allow: &[PathBuf]) -> Result<(), String> {
    match allow.iter().find(|a| !a.is_absolute()) {
        Some(a) => Err(format!(
            "host_path_allow entry {:?} is not an absolute path (e.g. /opt/models)",
            a.display().to_string()
        )),
        None => Ok(()),
    }
}

/// `p` with `.` and `..` resolved by the text alone (an allowlist entry written
/// `/opt/sedge/../models` means `/opt/models`).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Everything the node materialises from `pod`, checked. `host_images` names the images whose
/// containers run any host program anyway (for them a host path is no escalation and is allowed).
pub fn pod(
    pod: &Value,
    allow: &[PathBuf],
    host_image: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let spec = &pod["spec"];
    let mut volumes = HashSet::new();
    let mut host_volumes = Vec::new();
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        let name = v["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            return Err(format!(
                "spec.volumes[{i}].name {name:?}: must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
            ));
        }
        if !volumes.insert(name) {
            return Err(format!(
                "spec.volumes[{i}].name {name:?}: duplicate volume name"
            ));
        }
        for source in ["configMap", "secret", "downwardAPI"] {
            for (j, item) in v[source]["items"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                relative_path(
                    &format!("spec.volumes[{i}].{source}.items[{j}].path"),
                    item["path"].as_str().unwrap_or_default(),
                )?;
            }
        }
        for (s, src) in v["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            for source in ["configMap", "secret"] {
                for (j, item) in src[source]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    relative_path(
                        &format!(
                            "spec.volumes[{i}].projected.sources[{s}].{source}.items[{j}].path"
                        ),
                        item["path"].as_str().unwrap_or_default(),
                    )?;
                }
            }
        }
        if let Some(p) = v["hostPath"]["path"].as_str() {
            host_volumes.push((i, name, p));
        }
    }
    let mut names = HashSet::new();
    let mut all_host_images = true;
    let containers = spec["containers"].as_array().into_iter().flatten();
    let inits = spec["initContainers"].as_array().into_iter().flatten();
    for (i, c) in containers.chain(inits).enumerate() {
        let name = c["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            return Err(format!(
                "container {i} name {name:?}: must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
            ));
        }
        if !names.insert(name) {
            return Err(format!("container name {name:?}: duplicate"));
        }
        all_host_images &= host_image(c["image"].as_str().unwrap_or_default());
        for (j, m) in c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("container {name}: volumeMounts[{j}]");
            let vol = m["name"].as_str().unwrap_or_default();
            if !volumes.contains(vol) {
                return Err(format!("{field}.name {vol:?}: names no volume of the pod"));
            }
            let mp = m["mountPath"].as_str().unwrap_or_default();
            if mp.is_empty() || sedge_api::climbs(mp) {
                return Err(format!(
                    "{field}.mountPath {mp:?}: must be a path without '..'"
                ));
            }
            if let Some(sp) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
                relative_path(&format!("{field}.subPath"), sp)?;
            }
        }
        if let Some(wd) = c["workingDir"].as_str()
            && sedge_api::climbs(wd)
        {
            return Err(format!(
                "container {name}: workingDir {wd:?}: must not contain '..'"
            ));
        }
    }
    if !all_host_images {
        for (i, _, p) in host_volumes {
            host_path(&format!("spec.volumes[{i}].hostPath.path"), p, allow)?;
        }
    }
    Ok(())
}

/// Creates the directories of `rel` under `root` one component at a time, never following a
/// symbolic link: a path taken from a pod spec cannot lead out of `root` through a link that an
/// earlier mount (a hostPath) put there. Returns the joined path. `..` and absolute prefixes in
/// `rel` are dropped, as for any path a pod gives.
pub fn dirs_under(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(part) = c else { continue };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link (a mount?); a path of the pod may not go through it",
                    at.display()
                ));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} exists and is not a directory", at.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(pod: Value) -> Result<(), String> {
        super::pod(&pod, &[PathBuf::from("/opt/models")], |i| i == "busybox")
    }

    #[test]
    fn names_that_would_be_paths_are_refused() {
        for bad in [
            "/tmp/x/y",
            "../../../../tmp/z",
            "a/b",
            "",
            "UPPER",
            &"x".repeat(64),
        ] {
            let e = check(json!({"spec": {"volumes": [{"name": bad, "emptyDir": {}}], "containers": [{"name": "c", "image": "sedge/worker"}]}})).unwrap_err();
            assert!(e.contains("spec.volumes[0].name"), "{bad}: {e}");
        }
        let e = check(json!({"spec": {"containers": [{"name": "../x", "image": "sedge/worker"}]}}))
            .unwrap_err();
        assert!(e.contains("DNS-1123"), "{e}");
        for bad in ["", "../../etc", "a/b", "x y", &"u".repeat(129)] {
            assert!(uid(bad).is_err(), "{bad}");
        }
        uid("3b2c6f0e-1d2a-4c5e-9f00-0123456789ab").unwrap();
    }

    #[test]
    fn paths_must_stay_inside() {
        let mounts = |m: Value| json!({"spec": {"volumes": [{"name": "v", "configMap": {"name": "c", "items": [{"key": "k", "path": "ok/file"}]}}], "containers": [{"name": "c", "image": "sedge/worker", "volumeMounts": [m]}]}});
        check(mounts(
            json!({"name": "v", "mountPath": "/etc/app", "subPath": "ok"}),
        ))
        .unwrap();
        let e = check(mounts(
            json!({"name": "v", "mountPath": "/etc/app", "subPath": "../../.."}),
        ))
        .unwrap_err();
        assert!(e.contains("subPath") && e.contains(".."), "{e}");
        let e = check(mounts(
            json!({"name": "v", "mountPath": "/etc/app", "subPath": "/etc"}),
        ))
        .unwrap_err();
        assert!(e.contains("relative"), "{e}");
        let e = check(mounts(json!({"name": "v", "mountPath": "/../../etc"}))).unwrap_err();
        assert!(e.contains("mountPath"), "{e}");
        let e = check(mounts(json!({"name": "nope", "mountPath": "/x"}))).unwrap_err();
        assert!(e.contains("names no volume"), "{e}");
        let e = check(json!({"spec": {"volumes": [{"name": "v", "secret": {"secretName": "s", "items": [{"key": "k", "path": "../../root/.ssh/authorized_keys"}]}}], "containers": [{"name": "c", "image": "x"}]}})).unwrap_err();
        assert!(e.contains("items[0].path"), "{e}");
    }

    #[test]
    fn host_paths_only_from_the_allowlist() {
        let pod = |image: &str, p: &str| json!({"spec": {"volumes": [{"name": "h", "hostPath": {"path": p}}], "containers": [{"name": "c", "image": image}]}});
        check(pod("sedge/worker", "/opt/models/edge")).unwrap();
        let e = check(pod("sedge/worker", "/etc")).unwrap_err();
        assert!(
            e.contains("not allowed") && e.contains("/opt/models"),
            "{e}"
        );
        let e = check(pod("sedge/worker", "/opt/models/../../etc")).unwrap_err();
        assert!(e.contains(".."), "{e}");
        // A host-command image runs any host program already: no escalation.
        check(pod("busybox", "/etc")).unwrap();
        let dotted = [PathBuf::from("/opt/sedge/../models/./")];
        super::pod(&pod("sedge/worker", "/opt/models/x"), &dotted, |_| false).unwrap();
        allowlist(&dotted).unwrap();
        let e = allowlist(&[PathBuf::from("/ok"), PathBuf::from("models")]).unwrap_err();
        assert!(e.contains("\"models\"") && e.contains("absolute"), "{e}");
        let e = super::pod(&pod("sedge/worker", "/opt/models"), &[], |_| false).unwrap_err();
        assert!(e.contains("none are allowed"), "{e}");
    }

    #[test]
    fn dirs_are_never_made_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outside = t.path().join("host");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("data")).unwrap();
        let e = dirs_under(&root, Path::new("data/sub")).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!outside.join("sub").exists());
        let made = dirs_under(&root, Path::new("/a/../b/c")).unwrap();
        assert_eq!(made, root.join("a/b/c"));
        assert!(made.is_dir());
    }
}
