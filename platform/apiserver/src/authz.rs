//! Authorization: Kubernetes' RBAC (`rbac.authorization.k8s.io/v1` Role, ClusterRole,
//! RoleBinding, ClusterRoleBinding; aggregation is not implemented) and a Node authorizer.
//!
//! The order is kube-apiserver's: `system:masters` is allowed everything without a look at any
//! rule (so a broken policy cannot lock the administrator out), a node identity
//! (`system:node:<name>` in `system:nodes`) is allowed what [`node_allows`] says, and anything
//! else is RBAC's to allow. The default roles (`cluster-admin`, `admin`, `edit`, `view`, the discovery and
//! self-review roles for every authenticated user) are written at start-up by
//! [`bootstrap_policy`] and can be read with kubectl like any other object.
//!
//! Roles and bindings are read from the store into a [`Policy`] that is rebuilt only when one of
//! them changes (the store's writes bump [`Authorizer::invalidate`]), so a request costs a walk
//! over the bindings that name its user or groups, not a query.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::auth::Identity;
use crate::store::Store;

/// The RBAC API group.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// The user the cloud core runs as on `sedge up`, bound to the role of the same name.
pub const CLOUDCORE_USER: &str = "sedge:cloudcore";
/// The user the AI controller runs as on `sedge up`, bound to the role of the same name.
pub const AI_CONTROLLER_USER: &str = "sedge:ai-controller";
/// The group every authenticated user is in.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group allowed everything.
pub const MASTERS: &str = "system:masters";
/// The group of node identities.
pub const NODES: &str = "system:nodes";
const NODE_PREFIX: &str = "system:node:";

/// What a request asks to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`, ...
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    /// Resource plural; empty for a non-resource request.
    pub resource: String,
    /// Subresource (`status`, `log`, `binding`), or empty.
    pub subresource: String,
    /// Namespace, empty for cluster-scoped requests and lists across namespaces.
    pub namespace: String,
    /// Object name, empty for collections.
    pub name: String,
    /// The URL path of a non-resource request (`/metrics`, `/api`).
    pub path: String,
}

impl Attributes {
    fn resource_request(&self) -> bool {
        !self.resource.is_empty()
    }

    /// kube-apiserver's 403 text for this request.
    pub fn forbidden_message(&self, user: &str) -> String {
        if !self.resource_request() {
            return format!(
                "forbidden: User \"{user}\" cannot {} path \"{}\"",
                self.verb, self.path
            );
        }
        let res = if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let qualified = if self.group.is_empty() {
            res.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let named = if self.name.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", self.name)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", self.namespace)
        };
        format!(
            "{qualified}{named} is forbidden: User \"{user}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
            self.verb, self.group
        )
    }
}

/// One RBAC rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    /// Verbs, `*` for all.
    pub verbs: Vec<String>,
    /// API groups, `*` for all.
    pub api_groups: Vec<String>,
    /// Resources (`pods`, `pods/log`, `*`, `*/status`).
    pub resources: Vec<String>,
    /// Names; empty for all.
    pub resource_names: Vec<String>,
    /// Non-resource URLs (`/metrics`, `/apis/*`, `*`).
    pub non_resource_urls: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

impl Rule {
    fn from_json(v: &Value) -> Rule {
        Rule {
            verbs: strings(&v["verbs"]),
            api_groups: strings(&v["apiGroups"]),
            resources: strings(&v["resources"]),
            resource_names: strings(&v["resourceNames"]),
            non_resource_urls: strings(&v["nonResourceURLs"]),
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({"verbs": self.verbs});
        if !self.non_resource_urls.is_empty() {
            v["nonResourceURLs"] = json!(self.non_resource_urls);
        } else {
            v["apiGroups"] = json!(self.api_groups);
            v["resources"] = json!(self.resources);
            if !self.resource_names.is_empty() {
                v["resourceNames"] = json!(self.resource_names);
            }
        }
        v
    }

    /// Whether this rule allows `a` (Kubernetes' `RuleAllows`).
    pub fn allows(&self, a: &Attributes) -> bool {
        let verb = self.verbs.iter().any(|v| v == "*" || *v == a.verb);
        if !verb {
            return false;
        }
        if !a.resource_request() {
            return self.non_resource_urls.iter().any(|u| {
                u == "*"
                    || *u == a.path
                    || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
            });
        }
        let group = self.api_groups.iter().any(|g| g == "*" || *g == a.group);
        let combined = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        let resource = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
        });
        let name = self.resource_names.is_empty()
            || (!a.name.is_empty() && self.resource_names.contains(&a.name));
        group && resource && name
    }
}

#[derive(Debug, Clone)]
struct Binding {
    /// Empty for a ClusterRoleBinding.
    namespace: String,
    /// `(kind, name)` of the role; a RoleBinding's Role is in its own namespace.
    role_kind: String,
    role_name: String,
    /// `(kind, name, namespace)` of each subject.
    subjects: Vec<(String, String, String)>,
}

/// The roles and bindings, as read from the store at one moment.
#[derive(Debug, Default)]
pub struct Policy {
    cluster_roles: std::collections::HashMap<String, Vec<Rule>>,
    roles: std::collections::HashMap<(String, String), Vec<Rule>>,
    bindings: Vec<Binding>,
}

impl Policy {
    /// Builds a policy from the four kinds' objects.
    pub fn from_objects(
        cluster_roles: &[Value],
        roles: &[Value],
        cluster_bindings: &[Value],
        bindings: &[Value],
    ) -> Policy {
        let name = |o: &Value| {
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let ns = |o: &Value| {
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let rules = |o: &Value| -> Vec<Rule> {
            o["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(Rule::from_json)
                .collect()
        };
        let binding = |o: &Value, namespace: String| Binding {
            namespace,
            role_kind: o["roleRef"]["kind"].as_str().unwrap_or_default().into(),
            role_name: o["roleRef"]["name"].as_str().unwrap_or_default().into(),
            subjects: o["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["kind"].as_str().unwrap_or_default().to_string(),
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["namespace"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        };
        Policy {
            cluster_roles: cluster_roles.iter().map(|o| (name(o), rules(o))).collect(),
            roles: roles.iter().map(|o| ((ns(o), name(o)), rules(o))).collect(),
            bindings: cluster_bindings
                .iter()
                .map(|o| binding(o, String::new()))
                .chain(bindings.iter().map(|o| binding(o, ns(o))))
                .collect(),
        }
    }

    fn names(b: &Binding, id: &Identity) -> bool {
        b.subjects
            .iter()
            .any(|(kind, name, ns)| match kind.as_str() {
                "User" => *name == id.user,
                "Group" => id.groups.iter().any(|g| g == name),
                "ServiceAccount" => id.user == format!("system:serviceaccount:{ns}:{name}"),
                _ => false,
            })
    }

    /// The rules that apply to `id` in `namespace` (cluster-wide rules, and with a namespace
    /// those bound there).
    pub fn rules_for(&self, id: &Identity, namespace: &str) -> Vec<&Rule> {
        let mut out = Vec::new();
        for b in &self.bindings {
            if !(b.namespace.is_empty() || b.namespace == namespace) || !Self::names(b, id) {
                continue;
            }
            let rules = match b.role_kind.as_str() {
                "ClusterRole" => self.cluster_roles.get(&b.role_name),
                "Role" if !b.namespace.is_empty() => {
                    self.roles.get(&(b.namespace.clone(), b.role_name.clone()))
                }
                _ => None,
            };
            out.extend(rules.into_iter().flatten());
        }
        out
    }

    /// Whether RBAC allows `a` for `id`.
    pub fn allows(&self, id: &Identity, a: &Attributes) -> bool {
        self.rules_for(id, &a.namespace).iter().any(|r| r.allows(a))
    }

    /// The rules of a role reference, for the escalation check on bindings.
    fn role_rules(&self, kind: &str, name: &str, namespace: &str) -> Option<&Vec<Rule>> {
        match kind {
            "ClusterRole" => self.cluster_roles.get(name),
            "Role" => self.roles.get(&(namespace.to_string(), name.to_string())),
            _ => None,
        }
    }
}

/// Caches the [`Policy`] and decides requests.
#[derive(Debug, Default)]
pub struct Authorizer {
    generation: AtomicU64,
    cached: Mutex<Option<(u64, Arc<Policy>)>>,
}

/// Why a request was refused, and how kube-apiserver would say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

fn list_all(store: &Store, key: &str) -> Vec<Value> {
    match store.list(key, None, None, None, None) {
        Ok(page) => page.items,
        Err(e) => {
            tracing::error!(error = %e, key, "cannot read RBAC objects; they count as absent");
            Vec::new()
        }
    }
}

impl Authorizer {
    /// Marks the cached policy stale (a role or binding was written).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current policy, read from `store` if stale.
    pub fn policy(&self, store: &Store) -> Arc<Policy> {
        if let Some(p) = self.current() {
            return p;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let key = |plural: &str| format!("{RBAC_GROUP}/{plural}");
        let p = Arc::new(Policy::from_objects(
            &list_all(store, &key("clusterroles")),
            &list_all(store, &key("roles")),
            &list_all(store, &key("clusterrolebindings")),
            &list_all(store, &key("rolebindings")),
        ));
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, p.clone()));
        p
    }

    /// The cached policy, if no role or binding changed since it was read.
    fn current(&self) -> Option<Arc<Policy>> {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, p)| p.clone())
    }

    /// Decides a request without touching the store when it can: `system:masters`, or anyone
    /// but a node while the cached policy is current. `None`: call [`Authorizer::authorize`]
    /// off the runtime.
    pub fn authorize_cached(&self, id: &Identity, a: &Attributes) -> Option<Result<(), Denied>> {
        if id.groups.iter().any(|g| g == MASTERS) {
            return Some(Ok(()));
        }
        if node_of(id).is_some() {
            return None;
        }
        let policy = self.current()?;
        Some(decide(&policy, id, a))
    }

    /// Decides a request. Blocking (may read the store): call off the async runtime.
    pub fn authorize(&self, store: &Store, id: &Identity, a: &Attributes) -> Result<(), Denied> {
        if let Some(decided) = self.authorize_cached(id, a) {
            return decided;
        }
        // Like kube-apiserver's chain `Node,RBAC`: the Node authorizer allows what a node
        // needs, and anything else is RBAC's to allow (nodes hold only the defaults every
        // authenticated user has, unless someone binds them more).
        if node_of(id).is_some_and(|node| node_allows(store, node, a)) {
            return Ok(());
        }
        decide(&self.policy(store), id, a)
    }

    /// Kubernetes' escalation check: a role may hold, and a binding may grant, only what its
    /// author holds (or the author has the `escalate` / `bind` verb on it). `obj` is the role
    /// or binding about to be stored.
    pub fn check_escalation(
        &self,
        store: &Store,
        id: &Identity,
        resource: &str,
        namespace: &str,
        obj: &Value,
    ) -> Result<(), Denied> {
        if id.groups.iter().any(|g| g == MASTERS) {
            return Ok(());
        }
        let policy = self.policy(store);
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let (rules, special) = match resource {
            "roles" | "clusterroles" => (
                obj["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(Rule::from_json)
                    .collect::<Vec<_>>(),
                "escalate",
            ),
            "rolebindings" | "clusterrolebindings" => {
                let kind = obj["roleRef"]["kind"].as_str().unwrap_or_default();
                let role = obj["roleRef"]["name"].as_str().unwrap_or_default();
                match policy.role_rules(kind, role, namespace) {
                    Some(r) => (r.clone(), "bind"),
                    // A binding to a role that does not exist grants nothing (yet): Kubernetes
                    // allows it only with `bind`.
                    None => (
                        vec![Rule {
                            verbs: vec!["*".into()],
                            api_groups: vec!["*".into()],
                            resources: vec!["*".into()],
                            ..Default::default()
                        }],
                        "bind",
                    ),
                }
            }
            _ => return Ok(()),
        };
        let special_ok = policy.allows(
            id,
            &Attributes {
                verb: special.into(),
                group: RBAC_GROUP.into(),
                resource: resource.into(),
                namespace: namespace.into(),
                name: name.into(),
                ..Default::default()
            },
        );
        if special_ok {
            return Ok(());
        }
        for rule in &rules {
            if let Some(missing) = uncovered(&policy, id, namespace, rule) {
                return Err(Denied(format!(
                    "{resource}.{RBAC_GROUP} \"{name}\" is forbidden: user \"{}\" is attempting to grant RBAC permissions not currently held: {missing}",
                    id.user
                )));
            }
        }
        Ok(())
    }
}

/// RBAC's answer, with kube-apiserver's refusal text.
fn decide(policy: &Policy, id: &Identity, a: &Attributes) -> Result<(), Denied> {
    if policy.allows(id, a) {
        Ok(())
    } else {
        Err(Denied(a.forbidden_message(&id.user)))
    }
}

/// The first permission of `rule` that `id` does not hold itself, if any.
fn uncovered(policy: &Policy, id: &Identity, namespace: &str, rule: &Rule) -> Option<String> {
    let names: Vec<String> = if rule.resource_names.is_empty() {
        vec![String::new()]
    } else {
        rule.resource_names.clone()
    };
    for verb in &rule.verbs {
        if !rule.non_resource_urls.is_empty() {
            for path in &rule.non_resource_urls {
                let a = Attributes {
                    verb: verb.clone(),
                    path: path.clone(),
                    ..Default::default()
                };
                if !policy.allows(id, &a) {
                    return Some(format!("{{NonResourceURLs:[{path}] Verbs:[{verb}]}}"));
                }
            }
            continue;
        }
        for group in &rule.api_groups {
            for res in &rule.resources {
                let (resource, sub) = res.split_once('/').unwrap_or((res, ""));
                for name in &names {
                    let a = Attributes {
                        verb: verb.clone(),
                        group: group.clone(),
                        resource: resource.into(),
                        subresource: sub.into(),
                        namespace: namespace.into(),
                        name: name.clone(),
                        path: String::new(),
                    };
                    // A wildcard in the new rule is covered only by a wildcard held: a
                    // `*` attribute matches only a rule that says `*` itself.
                    let held = policy.allows(id, &a);
                    if !held {
                        return Some(format!(
                            "{{APIGroups:[{group:?}] Resources:[{res:?}] Verbs:[{verb:?}]}}"
                        ));
                    }
                }
            }
        }
    }
    None
}

/// The node named by a node identity (`system:node:<name>` in `system:nodes`).
pub fn node_of(id: &Identity) -> Option<&str> {
    let name = id.user.strip_prefix(NODE_PREFIX)?;
    id.groups.iter().any(|g| g == NODES).then_some(name)
}

fn read(verb: &str) -> bool {
    matches!(verb, "get" | "list" | "watch")
}

/// The Node authorizer: what a node may do with the API, and nothing more. It reads what every
/// node reads (nodes, pods, services, endpoints) and may write only its own Node, its Lease,
/// the status of pods bound to it and events; it reads a Secret or ConfigMap only by name and
/// only when a pod bound to it references it (Kubernetes' graph authorizer, answered from the
/// store).
pub fn node_allows(store: &Store, node: &str, a: &Attributes) -> bool {
    if !a.resource_request() {
        // Discovery and version, like any authenticated client.
        return a.verb == "get" && discovery_path(&a.path);
    }
    match (
        a.group.as_str(),
        a.resource.as_str(),
        a.subresource.as_str(),
    ) {
        ("", "nodes", "") if read(&a.verb) => true,
        ("", "nodes", "" | "status") => {
            matches!(a.verb.as_str(), "create" | "update" | "patch") && a.name == node
        }
        ("", "pods", "") if read(&a.verb) => true,
        ("", "pods", "status") if matches!(a.verb.as_str(), "update" | "patch") => {
            pod_on(store, &a.namespace, &a.name, node)
        }
        ("", "pods", "") if a.verb == "delete" => pod_on(store, &a.namespace, &a.name, node),
        ("", "services" | "endpoints", "") => read(&a.verb),
        ("", "events", "") | ("events.k8s.io", "events", "") => {
            matches!(a.verb.as_str(), "create" | "update" | "patch")
        }
        ("coordination.k8s.io", "leases", "") => {
            a.namespace == "kube-node-lease"
                && a.name == node
                && matches!(a.verb.as_str(), "get" | "create" | "update" | "patch")
        }
        ("", kind @ ("secrets" | "configmaps"), "") => {
            a.verb == "get"
                && !a.name.is_empty()
                && referenced_by_pods_on(store, node, &a.namespace, kind, &a.name)
        }
        _ => false,
    }
}

fn discovery_path(p: &str) -> bool {
    matches!(p, "/api" | "/apis" | "/version" | "/openapi/v2")
        || p.starts_with("/api/")
        || p.starts_with("/apis/")
        || p.starts_with("/openapi/")
}

fn pod_on(store: &Store, ns: &str, name: &str, node: &str) -> bool {
    matches!(store.get("/pods", ns, name), Ok(Some(p)) if p["spec"]["nodeName"] == node)
}

/// Whether a pod bound to `node` in `ns` references the secret or config map `name`.
fn referenced_by_pods_on(store: &Store, node: &str, ns: &str, kind: &str, name: &str) -> bool {
    let Ok(page) = store.list("/pods", Some(ns), None, None, None) else {
        return false;
    };
    page.items
        .iter()
        .filter(|p| p["spec"]["nodeName"] == node)
        .any(|p| sedge_api::pod_references(&p["spec"], kind, name))
}

/// Namespace of the components' ServiceAccounts in [`component_rbac_yaml`].
pub const COMPONENT_NAMESPACE: &str = "sedge-system";

/// The least-privilege role of one of Sedge's components ([`CLOUDCORE_USER`] or
/// [`AI_CONTROLLER_USER`]) for a real cluster: a ServiceAccount in [`COMPONENT_NAMESPACE`]
/// named after the component (`sedge-cloudcore`, `sedge-ai-controller`), the same ClusterRole
/// the embedded server gives it, and the binding of the two, as one YAML stream to
/// `kubectl apply`. None for another name.
pub fn component_rbac_yaml(component: &str) -> Option<String> {
    let role = bootstrap_policy()
        .into_iter()
        .find(|(res, r)| *res == "clusterroles" && r["metadata"]["name"] == component)?
        .1;
    let sa = component.replace(':', "-");
    let docs = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": sa, "namespace": COMPONENT_NAMESPACE}}),
        json!({"apiVersion": role["apiVersion"], "kind": "ClusterRole",
               "metadata": {"name": component}, "rules": role["rules"]}),
        json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRoleBinding",
               "metadata": {"name": component},
               "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": component},
               "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": COMPONENT_NAMESPACE}]}),
    ];
    let mut out = format!(
        "# Generated from sedge_apiserver::authz::bootstrap_policy (the role `sedge up` gives {component});\n\
         # regenerate with `SEDGE_WRITE_RBAC=1 cargo test -p sedge-apiserver --test rbac_yaml`.\n\
         # kubectl create namespace {COMPONENT_NAMESPACE}; kubectl apply -f this file; then run the\n\
         # component as the ServiceAccount {COMPONENT_NAMESPACE}/{sa} (in-cluster, or with\n\
         # `kubectl create token {sa} -n {COMPONENT_NAMESPACE}` in its kubeconfig).\n"
    );
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d).expect("serialises"));
    }
    Some(out)
}

/// The default roles and bindings (Kubernetes' bootstrap policy, the parts that matter here),
/// as objects to create when absent. Labelled `kubernetes.io/bootstrapping: rbac-defaults`.
pub fn bootstrap_policy() -> Vec<(&'static str, Value)> {
    let read = ["get", "list", "watch"];
    let write = ["create", "update", "patch", "delete", "deletecollection"];
    let all_read_write: Vec<&str> = read.iter().chain(write.iter()).copied().collect();
    // What `view` may read: everything users deploy, but not Secrets or RBAC.
    let view_core = [
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "services/status",
        "endpoints",
        "configmaps",
        "persistentvolumeclaims",
        "replicationcontrollers",
        "serviceaccounts",
        "events",
        "namespaces",
        "namespaces/status",
        "limitranges",
        "resourcequotas",
    ];
    let view_apps = [
        "deployments",
        "deployments/status",
        "deployments/scale",
        "replicasets",
        "replicasets/status",
        "replicasets/scale",
        "statefulsets",
        "daemonsets",
        "daemonsets/status",
    ];
    let view_other = [
        ("batch", &["jobs", "cronjobs"][..]),
        ("coordination.k8s.io", &["leases"][..]),
        ("sedna.io", &["*"][..]),
        ("devices.kubeedge.io", &["*"][..]),
    ];
    let rule = |verbs: &[&str], group: &str, resources: &[&str]| json!({"verbs": verbs, "apiGroups": [group], "resources": resources});
    let mut view_rules = vec![rule(&read, "", &view_core), rule(&read, "apps", &view_apps)];
    for (g, r) in view_other {
        view_rules.push(rule(&read, g, r));
    }
    let mut edit_rules = view_rules.clone();
    let edit_core = [
        "pods",
        "services",
        "endpoints",
        "configmaps",
        "secrets",
        "persistentvolumeclaims",
        "replicationcontrollers",
        "serviceaccounts",
        "events",
    ];
    edit_rules.push(rule(&all_read_write, "", &edit_core));
    // Tokens for the ServiceAccounts of the namespace (`kubectl create token`), as Kubernetes'
    // `edit` allows.
    edit_rules.push(rule(&["create"], "", &["serviceaccounts/token"]));
    // Commands in the namespace's pods (`kubectl exec`), as Kubernetes' `edit` allows.
    edit_rules.push(rule(
        &["get", "create"],
        "",
        &["pods/exec", "pods/attach", "pods/portforward"],
    ));
    edit_rules.push(rule(
        &all_read_write,
        "apps",
        &[
            "deployments",
            "deployments/scale",
            "replicasets",
            "replicasets/scale",
            "statefulsets",
            "daemonsets",
        ],
    ));
    for (g, r) in view_other {
        edit_rules.push(rule(&all_read_write, g, r));
    }
    let mut admin_rules = edit_rules.clone();
    admin_rules.push(rule(
        &all_read_write,
        RBAC_GROUP,
        &["roles", "rolebindings"],
    ));
    let meta = |name: &str| {
        json!({"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
               "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}})
    };
    let role = |name: &str, rules: Vec<Value>| json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRole", "metadata": meta(name), "rules": rules});
    // A ClusterRoleBinding of `role` to one subject (`Group` or `User`).
    let bind_to = |name: &str, role: &str, kind: &str, subject: &str| {
        json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRoleBinding", "metadata": meta(name),
               "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
               "subjects": [{"apiGroup": RBAC_GROUP, "kind": kind, "name": subject}]})
    };
    let bind = |name: &str, role: &str, group: &str| bind_to(name, role, "Group", group);
    let bind_user = |name: &str| bind_to(name, name, "User", name);
    // Sedge's own components, each with what it uses and no more (see `sedge up`).
    let all = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let cloudcore = vec![
        rule(&all, "", &["pods", "pods/status", "nodes", "nodes/status"]),
        rule(&["create"], "", &["pods/binding"]),
        rule(
            &read,
            "",
            &[
                "configmaps",
                "secrets",
                "services",
                "endpoints",
                "namespaces",
            ],
        ),
        rule(&["create", "update", "patch"], "", &["events"]),
        rule(&all, "coordination.k8s.io", &["leases"]),
        // The workload controllers: Deployments own ReplicaSets, which own pods; DaemonSets
        // and Jobs own pods.
        rule(
            &["get", "list", "watch", "update", "patch"],
            "apps",
            &[
                "deployments",
                "deployments/status",
                "daemonsets",
                "daemonsets/status",
                "replicasets/status",
            ],
        ),
        rule(&all, "apps", &["replicasets"]),
        rule(
            &["get", "list", "watch", "update", "patch"],
            "batch",
            &["jobs", "jobs/status"],
        ),
        // Devices: sent to their nodes; their status written from the nodes' reports.
        rule(&read, "devices.kubeedge.io", &["devices", "devicemodels"]),
        rule(
            &["get", "update", "patch"],
            "devices.kubeedge.io",
            &["devices/status"],
        ),
        // The AI layer's cloud module runs inside the cloud core and writes service status.
        rule(
            &["get", "list", "watch", "update", "patch"],
            "sedna.io",
            &["*"],
        ),
    ];
    let ai_controller = vec![
        rule(&all_read_write, "sedna.io", &["*"]),
        rule(&all_read_write, "apps", &["deployments"]),
        rule(&all_read_write, "", &["services"]),
        rule(&read, "", &["pods/log", "nodes"]),
        // Incremental learning: its train and eval pods, its state ConfigMap.
        rule(&all_read_write, "", &["pods", "configmaps"]),
        rule(&["create", "update", "patch"], "", &["events"]),
        rule(
            &["get", "list", "watch", "create", "update", "patch"],
            "apiextensions.k8s.io",
            &["customresourcedefinitions"],
        ),
    ];
    vec![
        ("clusterroles", role(CLOUDCORE_USER, cloudcore)),
        ("clusterroles", role(AI_CONTROLLER_USER, ai_controller)),
        ("clusterrolebindings", bind_user(CLOUDCORE_USER)),
        ("clusterrolebindings", bind_user(AI_CONTROLLER_USER)),
        (
            "clusterroles",
            role(
                "cluster-admin",
                vec![
                    json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
                    json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
                ],
            ),
        ),
        ("clusterroles", role("admin", admin_rules)),
        ("clusterroles", role("edit", edit_rules)),
        ("clusterroles", role("view", view_rules)),
        (
            "clusterroles",
            role(
                "system:discovery",
                vec![json!({"verbs": ["get"], "nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/", "/healthz", "/livez", "/readyz"]})],
            ),
        ),
        (
            "clusterroles",
            role(
                "system:basic-user",
                vec![
                    rule(
                        &["create"],
                        "authorization.k8s.io",
                        &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    ),
                    rule(
                        &["create"],
                        "authentication.k8s.io",
                        &["selfsubjectreviews"],
                    ),
                ],
            ),
        ),
        (
            "clusterrolebindings",
            bind("cluster-admin", "cluster-admin", MASTERS),
        ),
        (
            "clusterrolebindings",
            bind("system:discovery", "system:discovery", AUTHENTICATED),
        ),
        (
            "clusterrolebindings",
            bind("system:basic-user", "system:basic-user", AUTHENTICATED),
        ),
    ]
}

/// The rules `id` holds in `namespace`, as `SelfSubjectRulesReview`'s status.
pub fn rules_review(policy: &Policy, id: &Identity, namespace: &str) -> Value {
    if id.groups.iter().any(|g| g == MASTERS) {
        return json!({
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": false,
        });
    }
    let rules = policy.rules_for(id, namespace);
    let (non_resource, resource): (Vec<&&Rule>, Vec<&&Rule>) =
        rules.iter().partition(|r| !r.non_resource_urls.is_empty());
    json!({
        "resourceRules": resource.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "nonResourceRules": non_resource.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "incomplete": node_of(id).is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, groups: &[&str]) -> Identity {
        let mut groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        groups.push(AUTHENTICATED.into());
        Identity {
            user: user.into(),
            groups,
        }
    }

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> Attributes {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    fn defaults() -> (Vec<Value>, Vec<Value>) {
        let mut roles = Vec::new();
        let mut bindings = Vec::new();
        for (kind, o) in bootstrap_policy() {
            if kind == "clusterroles" {
                roles.push(o);
            } else {
                bindings.push(o);
            }
        }
        (roles, bindings)
    }

    #[test]
    fn rules_match_like_kubernetes() {
        let r = Rule {
            verbs: vec!["get".into(), "list".into()],
            api_groups: vec!["".into()],
            resources: vec!["pods".into(), "pods/log".into()],
            resource_names: vec![],
            non_resource_urls: vec![],
        };
        assert!(r.allows(&attrs("get", "", "pods", "a", "p")));
        assert!(r.allows(&attrs("get", "", "pods/log", "a", "p")));
        assert!(!r.allows(&attrs("get", "", "pods/status", "a", "p")));
        assert!(!r.allows(&attrs("create", "", "pods", "a", "")));
        assert!(!r.allows(&attrs("get", "apps", "pods", "a", "p")));
        let named = Rule {
            resource_names: vec!["only".into()],
            ..r.clone()
        };
        assert!(named.allows(&attrs("get", "", "pods", "a", "only")));
        assert!(!named.allows(&attrs("get", "", "pods", "a", "other")));
        assert!(
            !named.allows(&attrs("list", "", "pods", "a", "")),
            "a list has no name"
        );
        let sub = Rule {
            verbs: vec!["*".into()],
            api_groups: vec!["*".into()],
            resources: vec!["*/status".into()],
            ..Default::default()
        };
        assert!(sub.allows(&attrs("patch", "apps", "deployments/status", "", "d")));
        assert!(!sub.allows(&attrs("patch", "apps", "deployments", "", "d")));
        let urls = Rule {
            verbs: vec!["get".into()],
            non_resource_urls: vec!["/apis/*".into(), "/metrics".into()],
            ..Default::default()
        };
        let path = |p: &str| Attributes {
            verb: "get".into(),
            path: p.into(),
            ..Default::default()
        };
        assert!(urls.allows(&path("/apis/apps/v1")));
        assert!(urls.allows(&path("/metrics")));
        assert!(!urls.allows(&path("/metricsx")));
    }

    #[test]
    fn bindings_scope_roles() {
        let (mut croles, cbinds) = defaults();
        croles.push(json!({"metadata": {"name": "pod-reader"}, "rules": [{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}]}));
        let roles = vec![
            json!({"metadata": {"name": "cm", "namespace": "team"}, "rules": [{"verbs": ["*"], "apiGroups": [""], "resources": ["configmaps"]}]}),
        ];
        let binds = vec![
            json!({"metadata": {"name": "b1", "namespace": "team"}, "roleRef": {"kind": "Role", "name": "cm"}, "subjects": [{"kind": "User", "name": "alice"}]}),
            json!({"metadata": {"name": "b2", "namespace": "team"}, "roleRef": {"kind": "ClusterRole", "name": "view"}, "subjects": [{"kind": "Group", "name": "devs"}]}),
            json!({"metadata": {"name": "b3", "namespace": "team"}, "roleRef": {"kind": "ClusterRole", "name": "pod-reader"}, "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": "team"}]}),
        ];
        let p = Policy::from_objects(&croles, &roles, &cbinds, &binds);
        let alice = id("alice", &[]);
        assert!(p.allows(&alice, &attrs("create", "", "configmaps", "team", "")));
        assert!(!p.allows(&alice, &attrs("create", "", "configmaps", "other", "")));
        assert!(
            !p.allows(&alice, &attrs("list", "", "configmaps", "", "")),
            "cluster-wide needs a ClusterRoleBinding"
        );
        let dev = id("bob", &["devs"]);
        assert!(p.allows(&dev, &attrs("list", "", "pods", "team", "")));
        assert!(p.allows(
            &dev,
            &attrs("get", "sedna.io", "jointinferenceservices", "team", "x")
        ));
        assert!(
            !p.allows(&dev, &attrs("get", "", "secrets", "team", "s")),
            "view reads no secrets"
        );
        assert!(!p.allows(&dev, &attrs("create", "", "pods", "team", "")));
        let sa = id(
            "system:serviceaccount:team:ctl",
            &["system:serviceaccounts"],
        );
        assert!(p.allows(&sa, &attrs("get", "", "pods", "team", "p")));
        assert!(!p.allows(&sa, &attrs("delete", "", "pods", "team", "p")));
        // Every authenticated user gets discovery and self reviews, nothing else.
        let nobody = id("nobody", &[]);
        let disc = Attributes {
            verb: "get".into(),
            path: "/apis/apps/v1".into(),
            ..Default::default()
        };
        assert!(p.allows(&nobody, &disc));
        assert!(p.allows(
            &nobody,
            &attrs(
                "create",
                "authorization.k8s.io",
                "selfsubjectaccessreviews",
                "",
                ""
            )
        ));
        assert!(!p.allows(&nobody, &attrs("list", "", "secrets", "", "")));
        assert!(!p.allows(
            &nobody,
            &Attributes {
                verb: "get".into(),
                path: "/metrics".into(),
                ..Default::default()
            }
        ));
    }

    #[test]
    fn sedges_components_hold_what_they_use_and_are_not_admins() {
        let (roles, binds) = defaults();
        let p = Policy::from_objects(&roles, &[], &binds, &[]);
        let cc = id(CLOUDCORE_USER, &[]);
        assert!(p.allows(&cc, &attrs("patch", "", "pods/status", "default", "p")));
        assert!(p.allows(&cc, &attrs("create", "", "pods/binding", "default", "p")));
        assert!(p.allows(&cc, &attrs("watch", "", "secrets", "", "")));
        assert!(!p.allows(&cc, &attrs("create", "", "secrets", "default", "")));
        assert!(!p.allows(
            &cc,
            &attrs("create", RBAC_GROUP, "clusterrolebindings", "", "")
        ));
        assert!(!p.allows(&cc, &attrs("delete", "", "namespaces", "", "default")));
        let ai = id(AI_CONTROLLER_USER, &[]);
        assert!(p.allows(&ai, &attrs("patch", "apps", "deployments", "default", "d")));
        assert!(p.allows(
            &ai,
            &attrs(
                "update",
                "sedna.io",
                "jointinferenceservices/status",
                "default",
                "j"
            )
        ));
        assert!(p.allows(&ai, &attrs("get", "", "pods/log", "default", "p")));
        assert!(!p.allows(&ai, &attrs("get", "", "secrets", "default", "s")));
        // Incremental learning's train and eval pods; never a Secret or a node.
        assert!(p.allows(&ai, &attrs("create", "", "pods", "default", "")));
        assert!(p.allows(
            &ai,
            &attrs("patch", "", "configmaps", "default", "j-il-state")
        ));
        assert!(!p.allows(&ai, &attrs("delete", "", "nodes", "", "edge-1")));
    }

    #[test]
    fn forbidden_messages_read_like_kube_apiserver() {
        assert_eq!(
            attrs("create", "", "pods", "default", "").forbidden_message("bob"),
            "pods is forbidden: User \"bob\" cannot create resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        assert_eq!(
            attrs("delete", "", "nodes", "", "edge-2").forbidden_message("system:node:edge-1"),
            "nodes \"edge-2\" is forbidden: User \"system:node:edge-1\" cannot delete resource \"nodes\" in API group \"\" at the cluster scope"
        );
        assert_eq!(
            attrs("list", "apps", "deployments", "x", "").forbidden_message("u"),
            "deployments.apps is forbidden: User \"u\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"x\""
        );
        let p = Attributes {
            verb: "get".into(),
            path: "/metrics".into(),
            ..Default::default()
        };
        assert_eq!(
            p.forbidden_message("u"),
            "forbidden: User \"u\" cannot get path \"/metrics\""
        );
    }

    #[test]
    fn pod_references_cover_every_way_to_name_a_secret() {
        use sedge_api::pod_references;
        let spec = json!({
            "volumes": [{"name": "a", "secret": {"secretName": "vol"}}, {"name": "b", "projected": {"sources": [{"secret": {"name": "proj"}}, {"configMap": {"name": "pcm"}}]}}],
            "containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}}], "envFrom": [{"secretRef": {"name": "from"}}, {"configMapRef": {"name": "cmfrom"}}]}],
            "imagePullSecrets": [{"name": "pull"}],
        });
        for s in ["vol", "proj", "env", "from", "pull"] {
            assert!(pod_references(&spec, "secrets", s), "{s}");
        }
        assert!(!pod_references(&spec, "secrets", "other"));
        assert!(pod_references(&spec, "configmaps", "pcm"));
        assert!(pod_references(&spec, "configmaps", "cmfrom"));
        assert!(!pod_references(&spec, "configmaps", "vol"));
    }

    #[test]
    fn node_identities_and_wildcards_are_recognised() {
        assert_eq!(node_of(&id("system:node:edge-1", &[NODES])), Some("edge-1"));
        assert_eq!(
            node_of(&id("system:node:edge-1", &[])),
            None,
            "the group is needed too"
        );
        assert_eq!(node_of(&id("alice", &[NODES])), None);
    }
}
