//! Which resources the server serves: the built-in kinds and every established CRD.
//!
//! The registry is rebuilt from the stored CRDs whenever one changes, so a CRD is served the moment
//! its create returns (no "ensure CRDs are installed first" race for the same client).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::error::Cause;

/// One printer column, from a CRD's `additionalPrinterColumns`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    /// Optional format (`name` for the name column).
    pub format: String,
    /// Description shown by `kubectl explain`-like tools.
    pub description: String,
    /// 0 = always shown, >0 = only with `-o wide`.
    pub priority: i64,
    /// JSONPath into the object.
    pub json_path: String,
}

/// One served resource (e.g. `pods`, `deployments.apps`, `jointinferenceservices.sedna.io`).
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// Served versions, preferred (storage) first.
    pub versions: Vec<String>,
    /// Plural resource name used in URLs.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// `kubectl` short names.
    pub short_names: Vec<String>,
    /// Categories such as `all`.
    pub categories: Vec<String>,
    /// Whether `/status` is a separate subresource (spec writes ignore status, and vice versa).
    pub status_subresource: bool,
    /// CRD printer columns (empty for built-ins, whose columns live in `table.rs`).
    pub columns: Vec<PrinterColumn>,
    /// CRD schema per version (`openAPIV3Schema`).
    pub schemas: HashMap<String, Value>,
    /// Built-in kind (strategic merge patch allowed) rather than a custom resource.
    pub builtin: bool,
    /// Field paths usable in field selectors besides `metadata.name` and `metadata.namespace`.
    pub field_selectors: Vec<&'static str>,
}

impl ResourceType {
    /// Key of this resource in the store: `group/plural` (core group is empty).
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// `plural.group` as Kubernetes spells it in messages (`pods`, `deployments.apps`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `group/version` or `version` for core.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The preferred (storage) version.
    pub fn preferred_version(&self) -> &str {
        &self.versions[0]
    }

    /// Whether a field path may be used in a field selector.
    pub fn selectable(&self, field: &str) -> bool {
        field == "metadata.name"
            || field == "metadata.namespace"
            || self.field_selectors.contains(&field)
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    fields: &'static [&'static str],
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
        categories: &[],
        status: true,
        fields: &["status.phase"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short: &["no"],
        categories: &[],
        status: true,
        fields: &["spec.unschedulable"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
        categories: &["all"],
        status: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        fields: &["type"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
        categories: &["all"],
        status: true,
        fields: &["spec.clusterIP", "spec.type"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short: &["ep"],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        categories: &[],
        status: false,
        fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short: &["sa"],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
        categories: &["all"],
        status: true,
        fields: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short: &["rs"],
        categories: &["all"],
        status: true,
        fields: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short: &["ds"],
        categories: &["all"],
        status: true,
        fields: &[],
    },
    Builtin {
        group: "batch",
        version: "v1",
        plural: "jobs",
        singular: "job",
        kind: "Job",
        namespaced: true,
        short: &[],
        categories: &["all"],
        status: true,
        fields: &[],
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    // Create-only reviews, answered by the authorizer and never stored (see `http`).
    Builtin {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectrulesreviews",
        singular: "selfsubjectrulesreview",
        kind: "SelfSubjectRulesReview",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        kind: "SelfSubjectReview",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        fields: &[],
    },
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        categories: &["api-extensions"],
        status: true,
        fields: &[],
    },
];

fn builtin_types() -> Vec<Arc<ResourceType>> {
    BUILTINS
        .iter()
        .map(|b| {
            Arc::new(ResourceType {
                group: b.group.into(),
                versions: vec![b.version.into()],
                plural: b.plural.into(),
                singular: b.singular.into(),
                kind: b.kind.into(),
                namespaced: b.namespaced,
                short_names: b.short.iter().map(|s| s.to_string()).collect(),
                categories: b.categories.iter().map(|s| s.to_string()).collect(),
                status_subresource: b.status,
                columns: Vec::new(),
                schemas: HashMap::new(),
                builtin: true,
                field_selectors: b.fields.to_vec(),
            })
        })
        .collect()
}

/// The served resources, swapped atomically when CRDs change.
#[derive(Debug)]
pub struct Registry {
    inner: RwLock<Arc<Snapshot>>,
}

/// An immutable view of the registry.
#[derive(Debug, Default)]
pub struct Snapshot {
    types: Vec<Arc<ResourceType>>,
    by_gvr: HashMap<(String, String, String), Arc<ResourceType>>,
}

impl Snapshot {
    fn build(types: Vec<Arc<ResourceType>>) -> Self {
        let mut by_gvr = HashMap::new();
        for t in &types {
            for v in &t.versions {
                by_gvr.insert((t.group.clone(), v.clone(), t.plural.clone()), t.clone());
            }
        }
        Snapshot { types, by_gvr }
    }

    /// Looks up `group/version/plural`.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.by_gvr
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Finds the resource for an `apiVersion` + `kind`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<(Arc<ResourceType>, String)> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
            .map(|t| (t.clone(), version.to_string()))
    }

    /// Whether any resource is served for this group/version.
    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.group == group && t.versions.iter().any(|v| v == version))
    }

    /// All served resource types.
    pub fn types(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// Groups (excluding core) with their versions, preferred first, in a stable order.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in &self.types {
            if t.group.is_empty() {
                continue;
            }
            let entry = out.entry(t.group.clone()).or_default();
            for v in &t.versions {
                if !entry.contains(v) {
                    entry.push(v.clone());
                }
            }
        }
        out
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: RwLock::new(Arc::new(Snapshot::build(builtin_types()))),
        }
    }
}

impl Registry {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the custom resources with those defined by `crds` (CRD objects as stored).
    /// CRDs that cannot be served (bad names, clash with a built-in) are skipped with a log line;
    /// validation on create keeps them out in the first place.
    pub fn set_crds(&self, crds: &[Value]) {
        let mut types = builtin_types();
        for crd in crds {
            match crd_to_type(crd) {
                Ok(t) => {
                    if types
                        .iter()
                        .any(|e| e.group == t.group && (e.plural == t.plural || e.kind == t.kind))
                    {
                        tracing::warn!(crd = %crd["metadata"]["name"], "CRD clashes with a served resource; not served");
                        continue;
                    }
                    types.push(Arc::new(t));
                }
                Err(causes) => {
                    tracing::warn!(crd = %crd["metadata"]["name"], ?causes, "invalid CRD in store; not served")
                }
            }
        }
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Snapshot::build(types));
    }
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a CRD and turns it into a served resource. Errors are 422 causes with field paths.
pub fn crd_to_type(crd: &Value) -> Result<ResourceType, Vec<Cause>> {
    let mut causes = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default().to_string();
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &spec["group"],
            "should be a domain with at least one dot",
        ));
    }
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    } else if crate::validate::dns_label(&plural).is_err() {
        causes.push(Cause::invalid(
            "spec.names.plural",
            &names["plural"],
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
        ));
    }
    if kind.is_empty() {
        causes.push(Cause::required("spec.names.kind"));
    }
    let singular = names["singular"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| kind.to_lowercase());
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &crd["metadata"]["name"],
            format!("must be spec.names.plural+\".\"+spec.group: {plural}.{group}"),
        ));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => {
            let v = other.map(Value::from).unwrap_or(Value::Null);
            causes.push(Cause::not_supported(
                "spec.scope",
                &v,
                &["Cluster".into(), "Namespaced".into()],
            ));
            true
        }
    };
    let mut versions = Vec::new();
    let mut storage = None;
    let mut schemas = HashMap::new();
    let mut columns = Vec::new();
    let mut status_subresource = false;
    match spec["versions"].as_array() {
        Some(vs) if !vs.is_empty() => {
            for (i, v) in vs.iter().enumerate() {
                let Some(vname) = v["name"].as_str() else {
                    causes.push(Cause::required(format!("spec.versions[{i}].name")));
                    continue;
                };
                if v["storage"].as_bool() == Some(true) {
                    if storage.is_some() {
                        causes.push(Cause::invalid(
                            "spec.versions",
                            &Value::from(vname),
                            "must have exactly one version marked as storage version",
                        ));
                    }
                    storage = Some(vname.to_string());
                }
                if v["served"].as_bool() == Some(false) {
                    continue;
                }
                versions.push(vname.to_string());
                let schema = &v["schema"]["openAPIV3Schema"];
                if schema.is_object() {
                    if let Err(mut c) = crate::validate::check_schema(
                        schema,
                        &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    ) {
                        causes.append(&mut c);
                    }
                    schemas.insert(vname.to_string(), schema.clone());
                } else {
                    causes.push(Cause::required(format!(
                        "spec.versions[{i}].schema.openAPIV3Schema"
                    )));
                }
                if v["subresources"]["status"].is_object() {
                    status_subresource = true;
                }
                if Some(vname) == storage.as_deref() || columns.is_empty() {
                    columns = v["additionalPrinterColumns"]
                        .as_array()
                        .map(|cols| {
                            cols.iter()
                                .map(|c| PrinterColumn {
                                    name: c["name"].as_str().unwrap_or_default().into(),
                                    type_: c["type"].as_str().unwrap_or("string").into(),
                                    format: c["format"].as_str().unwrap_or_default().into(),
                                    description: c["description"]
                                        .as_str()
                                        .unwrap_or_default()
                                        .into(),
                                    priority: c["priority"].as_i64().unwrap_or(0),
                                    json_path: c["jsonPath"].as_str().unwrap_or_default().into(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                }
            }
            if storage.is_none() {
                causes.push(Cause::invalid(
                    "spec.versions",
                    &Value::Null,
                    "must have exactly one version marked as storage version",
                ));
            }
        }
        _ => causes.push(Cause::required("spec.versions")),
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    // Storage version first, so it is the preferred one.
    let storage = storage.unwrap_or_default();
    versions.sort_by_key(|v| *v != storage);
    Ok(ResourceType {
        group,
        versions,
        plural,
        singular,
        kind,
        namespaced,
        short_names: str_list(&names["shortNames"]),
        categories: str_list(&names["categories"]),
        status_subresource,
        columns,
        schemas,
        builtin: false,
        field_selectors: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object"}},
                     "subresources": {"status": {}},
                     "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]}
                ]
            }
        })
    }

    #[test]
    fn crd_becomes_served_with_storage_version_first() {
        let reg = Registry::default();
        reg.set_crds(&[crd()]);
        let snap = reg.snapshot();
        let t = snap
            .get("example.com", "v1beta1", "widgets")
            .expect("served");
        assert_eq!(t.versions, vec!["v1", "v1beta1"]);
        assert!(t.status_subresource);
        assert_eq!(t.columns[0].json_path, ".spec.size");
        assert_eq!(snap.by_kind("example.com/v1", "Widget").unwrap().1, "v1");
        assert!(snap.groups().contains_key("example.com"));
    }

    #[test]
    fn crd_with_wrong_name_is_refused() {
        let mut c = crd();
        c["metadata"]["name"] = json!("gadgets.example.com");
        c["spec"]["scope"] = json!("Galaxy");
        let causes = crd_to_type(&c).unwrap_err();
        let fields: Vec<_> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, vec!["metadata.name", "spec.scope"]);
    }

    #[test]
    fn crd_clashing_with_builtin_is_not_served() {
        let mut c = crd();
        c["spec"]["group"] = json!("apps");
        let reg = Registry::default();
        // Invalid group (no dot) is refused by validation; the registry also guards against clashes.
        reg.set_crds(&[c]);
        assert!(reg.snapshot().get("apps", "v1", "widgets").is_none());
    }
}
