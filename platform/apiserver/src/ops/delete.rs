//! `delete`: preconditions, graceful pod deletion, finalizers and orphaning or cascading to
//! dependents.

use super::*;

/// Whether a pod must be deleted gracefully: it is bound to a node that exists, so that node's
/// agent stops it and finishes the delete.
pub(super) fn graceful_pod(
    core: &Core,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> ApiResult<bool> {
    if !(rt.group.is_empty() && rt.kind == "Pod") {
        return Ok(false);
    }
    let Some(pod) = core.store.get("/pods", ns, name)? else {
        return Ok(false);
    };
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Ok(false);
    }
    Ok(core.store.get("/nodes", "", node)?.is_some())
}

/// DELETE: honours preconditions, finalizers, propagation policy and pod grace periods.
/// Returns the object and whether it is gone (false: deletion pending).
pub fn delete(
    core: &Core,
    rt: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> ApiResult<(Value, bool)> {
    let ns = ns_key(rt, ns);
    if let Some(p) = opts.propagation.as_deref()
        && !matches!(p, "Foreground" | "Background" | "Orphan")
    {
        return Err(ApiError::bad_request(format!(
            "propagationPolicy: unsupported value {p:?}; use Foreground, Background or Orphan"
        )));
    }
    let is_crd = rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions";
    if is_crd && !opts.dry_run {
        let crd = core
            .store
            .get(&rt.storage_key(), "", name)?
            .ok_or_else(|| not_found(rt, name))?;
        let key = format!(
            "{}/{}",
            crd["spec"]["group"].as_str().unwrap_or_default(),
            crd["spec"]["names"]["plural"].as_str().unwrap_or_default()
        );
        // Stop serving first, then remove the instances, like the CRD cleanup finalizer does.
        core.registry.set_crds(&served_crds(core, Some(name))?);
        for obj in core.store.list(&key, None, None, None, None)?.items {
            let ons = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let oname = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            core.store
                .modify::<ApiError>(&key, &ons, &oname, |_, _| Ok(Change::Delete))?;
        }
    }
    let graceful = graceful_pod(core, rt, &ns, name)?;
    let mut gone = false;
    let run = |cur: Option<Value>, _rev: i64| -> ApiResult<Change> {
        let cur = cur.ok_or_else(|| not_found(rt, name))?;
        let meta = &cur["metadata"];
        if let Some(uid) = &opts.uid
            && meta["uid"].as_str() != Some(uid.as_str())
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                message: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta["uid"].as_str().unwrap_or_default()
                ),
                causes: Vec::new(),
            });
        }
        if let Some(rv) = &opts.resource_version
            && meta["resourceVersion"].as_str() != Some(rv.as_str())
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                message: format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta["resourceVersion"].as_str().unwrap_or_default()
                ),
                causes: Vec::new(),
            });
        }
        let mut obj = cur.clone();
        let mut finalizers: Vec<Value> = meta["finalizers"].as_array().cloned().unwrap_or_default();
        let extra = match opts.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        if let Some(f) = extra {
            finalizers.retain(|x| x != "foregroundDeletion" && x != "orphan");
            finalizers.push(json!(f));
        }
        let already = meta["deletionTimestamp"].is_string();
        let now = now();
        let change = if rt.group.is_empty() && rt.kind == "Namespace" {
            if !already {
                obj["metadata"]["deletionTimestamp"] = json!(now);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                obj["status"]["phase"] = json!("Terminating");
            }
            if finalizers.is_empty() && !already {
                Change::Put(obj)
            } else if extra.is_some() || !already {
                obj["metadata"]["finalizers"] = json!(finalizers);
                Change::Put(obj)
            } else {
                Change::Unchanged
            }
        } else if !finalizers.is_empty() {
            if !already {
                obj["metadata"]["deletionTimestamp"] = json!(now);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            obj["metadata"]["finalizers"] = json!(finalizers);
            if obj == cur {
                Change::Unchanged
            } else {
                Change::Put(obj)
            }
        } else if graceful {
            let grace = opts
                .grace_seconds
                .or(cur["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            if grace <= 0 {
                gone = true;
                Change::Delete
            } else if already {
                Change::Unchanged
            } else {
                let at = (Utc::now() + chrono::Duration::seconds(grace))
                    .to_rfc3339_opts(SecondsFormat::Secs, true);
                obj["metadata"]["deletionTimestamp"] = json!(at);
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                Change::Put(obj)
            }
        } else {
            gone = true;
            Change::Delete
        };
        Ok(if opts.dry_run {
            Change::Unchanged
        } else {
            change
        })
    };
    let (obj, _) = write(core, rt, &ns, name, run)?;
    Ok((present(rt, version, obj), gone))
}
