//! The edge controller: a shared informer cache, the downstream sync (what each edge node needs),
//! and the upstream handler (what edge nodes report).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use sedge_api::{
    DeviceStatusReport, EDGE_LABEL, Key, LeaseReport, LogRequest, PodStatusReport, group, kind,
};
use sedge_devices::{Device, DeviceModel};
use sedge_tunnel::{Handler, Hub, Incoming, LinkEvent, Message, OwnerLookup, op};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::events::{self, Events};
use crate::heartbeats::Heartbeats;
use crate::ownership::{Ownership, SERVED_BY};
use crate::transient;

/// The field manager the cloud core writes with.
pub const MANAGER: &str = "sedge-cloudcore";

/// Nodes whose object set may have changed, drained by the downstream worker.
#[derive(Default)]
struct Dirty {
    nodes: Mutex<HashSet<String>>,
    notify: Notify,
}

impl Dirty {
    fn mark(&self, node: &str) {
        if node.is_empty() {
            return;
        }
        self.nodes.lock().unwrap().insert(node.to_string());
        self.notify.notify_one();
    }
    fn take(&self) -> Vec<String> {
        self.nodes.lock().unwrap().drain().collect()
    }
}

/// Which pods are on which node, kept from the pod watch, so a node's sync reads its own pods
/// rather than every pod of the cluster (at 1,000 nodes x 10 pods that scan ran on every pod
/// status change and every node heartbeat). An entry may be stale for a moment (the store is
/// the truth; readers check the pod's node); a relist rebuilds it from the store. Pods not yet
/// placed are kept under the node name "", so the scheduler reads the pods waiting rather than
/// every pod on each pass.
#[derive(Default)]
struct PodsByNode {
    nodes: HashMap<String, HashSet<ObjectRef<Pod>>>,
    placed: HashMap<ObjectRef<Pod>, String>,
}

impl PodsByNode {
    fn apply(&mut self, p: &Pod, deleted: bool) {
        let key = ObjectRef::from_obj(p);
        let node = pod_node(p);
        if let Some(before) = self.placed.get(&key)
            && (deleted || before != node)
        {
            if let Some(set) = self.nodes.get_mut(before) {
                set.remove(&key);
                if set.is_empty() {
                    self.nodes.remove(before);
                }
            }
            self.placed.remove(&key);
        }
        if !deleted {
            self.nodes
                .entry(node.to_string())
                .or_default()
                .insert(key.clone());
            self.placed.insert(key, node.to_string());
        }
    }

    fn rebuild(&mut self, pods: &[Arc<Pod>]) {
        *self = PodsByNode::default();
        for p in pods {
            self.apply(p, false);
        }
    }
}

/// The informer cache shared by every controller of the cloud core: one watch per kind, for all
/// nodes.
#[derive(Clone)]
pub struct Cache {
    /// Pods.
    pub pods: Store<Pod>,
    /// Config maps.
    pub configmaps: Store<ConfigMap>,
    /// Secrets.
    pub secrets: Store<Secret>,
    /// Services (a node gets those of the namespaces its pods are in).
    pub services: Store<Service>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// Node leases (namespace `kube-node-lease`).
    pub leases: Store<Lease>,
    /// Devices (`devices.kubeedge.io`; stays empty where the CRDs are not installed).
    pub devices: Store<Device>,
    /// Device models.
    pub device_models: Store<DeviceModel>,
    /// Per device (`<ns>/<name>`): its node, and the resourceVersion of its last spec change.
    device_specs: Arc<Mutex<HashMap<String, DeviceSpecAt>>>,
    pods_by_node: Arc<Mutex<PodsByNode>>,
    dirty: Arc<Dirty>,
    /// Woken on any pod or node change (the scheduler waits on it).
    pub changed: Arc<Notify>,
    /// The embedded scheduler's counters (zero where it does not run).
    pub scheduling: Arc<crate::scheduler::Stats>,
    /// Heartbeats written to the API and those a newer one replaced before their turn.
    pub heartbeats: Arc<Heartbeats>,
    /// Events the nodes reported, waiting for the background writers.
    pub events: Arc<Events>,
    /// This core's claims on nodes and its hub, once started: every node Lease the informer
    /// sees is checked against them (see [`crate::ownership`]).
    pub served: Arc<std::sync::OnceLock<(Arc<Ownership>, Arc<Hub>)>>,
    /// Set once every store above holds its first list (`Some(false)`: a watch failed for
    /// good). Upstream reports and heartbeat writes wait for it: the checks they make against the
    /// cache (is this pod still the one reported on, is the stored Lease recent enough) are
    /// wrong against a cache still filling after a restart.
    filled: Arc<tokio::sync::watch::Sender<Option<bool>>>,
}

/// Where a device is and which version of its spec the nodes get: the resourceVersion at its
/// last spec change (`metadata.generation`), so a status-only change (the node's own reports,
/// many a second) is not sent back to the node.
#[derive(Debug, Clone)]
struct DeviceSpecAt {
    node: String,
    uid: String,
    generation: i64,
    version: String,
}

/// Records where `o` is and the version of its last spec change (forgets it when `deleted`);
/// what was recorded before, and whether the node has anything new to hear (the device is new,
/// moved, gone, or its spec changed).
fn note_device(
    specs: &Mutex<HashMap<String, DeviceSpecAt>>,
    o: &Device,
    deleted: bool,
) -> (Option<DeviceSpecAt>, bool) {
    let key = format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    let mut specs = specs.lock().unwrap_or_else(|p| p.into_inner());
    if deleted {
        return (specs.remove(&key), true);
    }
    let (uid, generation) = (
        o.uid().unwrap_or_default(),
        o.metadata.generation.unwrap_or(0),
    );
    let version = match specs.get(&key) {
        Some(s) if s.uid == uid && s.generation == generation => s.version.clone(),
        _ => o.resource_version().unwrap_or_default(),
    };
    let now = DeviceSpecAt {
        node: o.spec.node_name.clone(),
        uid,
        generation,
        version,
    };
    let changed = specs
        .get(&key)
        .is_none_or(|b| b.node != now.node || b.version != now.version);
    (specs.insert(key, now), changed)
}

/// A reflector over `api` calling `on` for each event. The store takes a fresh list only at
/// `InitDone` (the objects of `InitApply` are not in it yet when `on` sees them), so with
/// `relisted`, every node is marked dirty then: a change made while the watch was down reaches
/// its node from the store that holds it.
fn reflect<K>(
    api: Api<K>,
    relisted: Option<Arc<Dirty>>,
    on: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, crate::lists::config())
            .default_backoff()
            .modify(crate::lists::slim),
    );
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(e) => {
                    on(&e);
                    if let (Some(d), watcher::Event::InitDone) = (&relisted, &e) {
                        d.mark("*");
                    }
                }
                Err(e) => {
                    tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    (store, task)
}

/// Closes this core's session with the Lease's node when another core claimed the node after it.
fn yield_if_claimed(own: &Ownership, hub: &Hub, lease: &Lease, deleted: bool) {
    let node = lease.name_any();
    if deleted {
        own.forget(&node);
        return;
    }
    let owner = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVED_BY));
    let rv = lease.metadata.resource_version.as_deref().unwrap_or("");
    if let Some(session) = own.observe(&node, owner.map(String::as_str), rv, hub.session_id(&node))
    {
        tracing::warn!(%node, to = ?owner, "another cloud core claimed the node; closing this core's session with it");
        hub.close_session(&node, session);
    }
}

fn event_object<K>(ev: &watcher::Event<K>) -> Option<&K> {
    match ev {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o) => {
            Some(o)
        }
        _ => None,
    }
}

pub(crate) fn pod_node(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default()
}

/// The config maps and secrets a pod references: volumes (also projected), `env.valueFrom` and
/// `envFrom`, in every container and init container.
pub fn pod_references(p: &Pod) -> (HashSet<String>, HashSet<String>) {
    let (mut cms, mut secrets) = (HashSet::new(), HashSet::new());
    let Some(spec) = &p.spec else {
        return (cms, secrets);
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cms.insert(c.name.clone());
        }
        if let Some(s) = &v.secret
            && let Some(n) = &s.secret_name
        {
            secrets.insert(n.clone());
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                cms.insert(c.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(vf) = &e.value_from {
                if let Some(r) = &vf.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &vf.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &ef.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    (cms, secrets)
}

impl Cache {
    /// When `node`'s Lease was last renewed, as this core's informer last saw it.
    pub fn lease_renewed(&self, node: &str) -> Option<k8s_openapi::jiff::Timestamp> {
        self.leases
            .get(&ObjectRef::new(node).within("kube-node-lease"))
            .and_then(|l| l.spec.as_ref()?.renew_time.as_ref().map(|t| t.0))
    }

    /// Starts one watch per kind. The stores fill in the background.
    pub fn start(client: kube::Client) -> (Cache, Vec<JoinHandle<()>>) {
        let dirty = Arc::new(Dirty::default());
        let changed = Arc::new(Notify::new());
        let (pods, pods_writer) = reflector::store::<Pod>();
        let mut tasks = Vec::new();

        // Config maps and secrets: mark the nodes of the pods that reference them.
        let referencing = |pods: Store<Pod>, dirty: Arc<Dirty>, secret: bool| {
            move |ns: &str, name: &str| {
                for p in pods.state() {
                    if p.namespace().as_deref() != Some(ns) {
                        continue;
                    }
                    let (cms, secrets) = pod_references(&p);
                    if (if secret { &secrets } else { &cms }).contains(name) {
                        dirty.mark(pod_node(&p));
                    }
                }
            }
        };
        let on_cm = referencing(pods.clone(), dirty.clone(), false);
        let (configmaps, t) = reflect(
            Api::<ConfigMap>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                if let Some(o) = event_object(ev) {
                    on_cm(&o.namespace().unwrap_or_default(), &o.name_any());
                }
            },
        );
        tasks.push(t);
        let on_secret = referencing(pods.clone(), dirty.clone(), true);
        let (secrets, t) = reflect(
            Api::<Secret>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                if let Some(o) = event_object(ev) {
                    on_secret(&o.namespace().unwrap_or_default(), &o.name_any());
                }
            },
        );
        tasks.push(t);
        // Services: every node with a pod in the namespace.
        let (pods_of, d) = (pods.clone(), dirty.clone());
        let (services, t) = reflect(
            Api::<Service>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                if let Some(o) = event_object(ev) {
                    let ns = o.namespace();
                    for p in pods_of.state() {
                        if p.namespace() == ns {
                            d.mark(pod_node(&p));
                        }
                    }
                }
            },
        );
        tasks.push(t);

        let (d, c) = (dirty.clone(), changed.clone());
        let pods_by_node: Arc<Mutex<PodsByNode>> = Arc::default();
        let (index, store) = (pods_by_node.clone(), pods.clone());
        let pod_stream = reflector::reflector(
            pods_writer,
            watcher(Api::<Pod>::all(client.clone()), crate::lists::config())
                .default_backoff()
                .modify(crate::lists::slim),
        );
        tasks.push(tokio::spawn(async move {
            futures::pin_mut!(pod_stream);
            while let Some(ev) = pod_stream.next().await {
                match ev {
                    Ok(ev) => {
                        if let Some(p) = event_object(&ev) {
                            // The index first: the mark wakes the sync, which reads it.
                            index
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .apply(p, matches!(ev, watcher::Event::Delete(_)));
                            d.mark(pod_node(p));
                        }
                        if matches!(ev, watcher::Event::InitDone) {
                            // A fresh list (the store holds it now): every node may have
                            // missed changes, and pods deleted meanwhile leave the index.
                            index
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .rebuild(&store.state());
                            d.mark("*");
                        }
                        c.notify_one();
                    }
                    Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                }
            }
        }));

        let (d, c) = (dirty.clone(), changed.clone());
        let (nodes, t) = reflect(
            Api::<Node>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                if let Some(n) = event_object(ev) {
                    d.mark(&n.name_any());
                }
                c.notify_one();
            },
        );
        tasks.push(t);
        let served: Arc<std::sync::OnceLock<(Arc<Ownership>, Arc<Hub>)>> = Arc::default();
        let s = served.clone();
        let (leases, t) = reflect(
            Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
            None,
            move |ev| {
                if let (Some(l), Some((own, hub))) = (event_object(ev), s.get()) {
                    yield_if_claimed(own, hub, l, matches!(ev, watcher::Event::Delete(_)));
                }
            },
        );
        tasks.push(t);

        // Devices: mark the device's node, and the node it left when it moved or went away;
        // remember the version of its last spec change.
        let d = dirty.clone();
        let device_specs: Arc<Mutex<HashMap<String, DeviceSpecAt>>> = Arc::default();
        let specs = device_specs.clone();
        let (devices, t) = reflect(
            Api::<Device>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                let Some(o) = event_object(ev) else {
                    return;
                };
                let node = o.spec.node_name.clone();
                let (before, spec_changed) =
                    note_device(&specs, o, matches!(ev, watcher::Event::Delete(_)));
                // A status-only change (the node's own reports) has nothing for the node.
                if !spec_changed {
                    return;
                }
                if let Some(b) = before
                    && b.node != node
                {
                    d.mark(&b.node);
                }
                d.mark(&node);
            },
        );
        tasks.push(t);
        // Device models: the nodes of the devices made from them.
        let (d, devs) = (dirty.clone(), devices.clone());
        let (device_models, t) = reflect(
            Api::<DeviceModel>::all(client.clone()),
            Some(dirty.clone()),
            move |ev| {
                if let Some(m) = event_object(ev) {
                    let (ns, name) = (m.namespace(), m.name_any());
                    for dev in devs.state() {
                        if dev.namespace() == ns
                            && dev.spec.device_model_ref.as_ref().map(|r| r.name.as_str())
                                == Some(name.as_str())
                        {
                            d.mark(&dev.spec.node_name);
                        }
                    }
                }
            },
        );
        tasks.push(t);
        let cache = Cache {
            pods,
            configmaps,
            secrets,
            services,
            nodes,
            leases,
            devices,
            device_models,
            device_specs,
            pods_by_node,
            dirty,
            changed,
            scheduling: Arc::default(),
            heartbeats: Arc::default(),
            events: Arc::default(),
            served,
            filled: Arc::default(),
        };
        let c = cache.clone();
        tasks.push(tokio::spawn(async move {
            let ok = c.fill().await;
            c.filled.send_replace(Some(ok));
        }));
        (cache, tasks)
    }

    /// Waits until every store holds its first list; false if a watch failed for good.
    pub async fn ready(&self) -> bool {
        let mut filled = self.filled.subscribe();
        match filled.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Whether every store holds its first list now.
    pub fn is_ready(&self) -> bool {
        *self.filled.borrow() == Some(true)
    }

    async fn fill(&self) -> bool {
        // Short attempts: a `wait_until_ready` future made before the stores fill sometimes
        // misses its wake-up (kube-runtime 5), while a fresh one resolves at once.
        for attempt in 1u64.. {
            let all = async {
                self.pods.wait_until_ready().await?;
                self.nodes.wait_until_ready().await?;
                self.configmaps.wait_until_ready().await?;
                self.secrets.wait_until_ready().await?;
                self.services.wait_until_ready().await?;
                self.leases.wait_until_ready().await
            };
            match tokio::time::timeout(Duration::from_millis(500), all).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "informer cache never became ready");
                    return false;
                }
                Err(_) if attempt % 60 == 0 => tracing::warn!(
                    "the informer cache is not filled after {} s; is the API server reachable?",
                    attempt / 2
                ),
                Err(_) => {}
            }
        }
        false
    }

    /// Whether a node is an edge node (registered through the channel).
    pub fn is_edge(&self, node: &str) -> bool {
        self.nodes
            .get(&ObjectRef::new(node))
            .is_some_and(|n| sedge_api::is_agent_node(n.labels().keys()))
    }

    /// The pods bound to `node`, from the cache.
    pub fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        let refs: Vec<ObjectRef<Pod>> = self
            .pods_by_node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        refs.iter()
            .filter_map(|r| self.pods.get(r))
            .filter(|p| pod_node(p) == node)
            .collect()
    }

    /// The pods not bound to a node yet, from the cache (the scheduler's pending pods and
    /// those it leaves to another scheduler).
    pub fn unplaced_pods(&self) -> Vec<Arc<Pod>> {
        self.pods_on("")
    }

    /// A pod from the cache.
    pub fn pod(&self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(ns))
    }

    /// Ownership for the hub's authorisation: pod status and pod events belong to the pod's node.
    pub fn owner_lookup(&self) -> OwnerLookup {
        let cache = self.clone();
        Arc::new(move |k: &str, ns: &str, name: &str| match k {
            kind::POD_STATUS | kind::EVENT => cache
                .pod(ns, name)
                .map(|p| pod_node(&p).to_string())
                .filter(|n| !n.is_empty()),
            kind::DEVICE_STATUS => cache
                .devices
                .get(&ObjectRef::new(name).within(ns))
                .map(|d| d.spec.node_name.clone())
                .filter(|n| !n.is_empty()),
            _ => None,
        })
    }

    /// What `node` should hold: resource key -> (resourceVersion, object JSON).
    pub fn desired(&self, node: &str) -> BTreeMap<String, (String, Value)> {
        self.desired_since(node, &HashMap::new())
            .into_iter()
            .map(|(k, (rv, v))| (k, (rv, v.unwrap_or(Value::Null))))
            .collect()
    }

    /// What `node` should hold, the objects at the version in `known` (what was offered last)
    /// left unserialised (`None`): a node's change costs the objects that changed, not the
    /// node's whole set.
    pub fn desired_since(
        &self,
        node: &str,
        known: &HashMap<String, String>,
    ) -> BTreeMap<String, (String, Option<Value>)> {
        let mut out = Objects {
            map: BTreeMap::new(),
            known,
        };
        let mut refs: HashSet<(String, bool, String)> = HashSet::new();
        let mut namespaces = HashSet::new();
        for p in self.pods_on(node) {
            let ns = p.namespace().unwrap_or_default();
            namespaces.insert(ns.clone());
            let (cms, secrets) = pod_references(&p);
            refs.extend(cms.into_iter().map(|c| (ns.clone(), false, c)));
            refs.extend(secrets.into_iter().map(|s| (ns.clone(), true, s)));
            out.insert(kind::POD, p.as_ref(), None);
        }
        for (ns, secret, name) in refs {
            let r = ObjectRef::new(&name).within(&ns);
            if secret {
                if let Some(s) = self.secrets.get(&ObjectRef::new(&name).within(&ns)) {
                    out.insert(kind::SECRET, s.as_ref(), None);
                }
            } else if let Some(c) = self.configmaps.get(&r) {
                out.insert(kind::CONFIGMAP, c.as_ref(), None);
            }
        }
        // The Services of those namespaces: their pods reach them by name through the node's
        // service proxy.
        for svc in self.services.state() {
            if namespaces.contains(&svc.namespace().unwrap_or_default()) {
                out.insert(kind::SERVICE, svc.as_ref(), None);
            }
        }
        // The node's devices and their models, each device at the version of its last spec
        // change. The status stays in the cloud (the node is its source) but for the desired
        // values the node reported in force: the versions there are the cloud's view of the
        // node's own changes (the conflict rule of `sedge_devices::versions`).
        let mut models = HashSet::new();
        for d in self.devices.state() {
            if d.spec.node_name != node {
                continue;
            }
            let ns = d.namespace().unwrap_or_default();
            if let Some(r) = &d.spec.device_model_ref {
                models.insert((ns.clone(), r.name.clone()));
            }
            // The version of the spec this object carries; an object the store holds at
            // another generation than the one recorded (the store lags the event during a
            // relist) goes out at its own version, so a version never labels another spec.
            let at = self
                .device_specs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&format!("{ns}/{}", d.name_any()))
                .filter(|a| {
                    a.generation == d.metadata.generation.unwrap_or(0)
                        && Some(&a.uid) == d.metadata.uid.as_ref()
                })
                .map(|a| a.version.clone());
            let key = out.insert(kind::DEVICE, d.as_ref(), at);
            if let Some((_, Some(obj))) = out.map.get_mut(&key) {
                let observed: Vec<Value> = obj["status"]["twins"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t.get("observedDesired").is_some())
                    .map(|t| json!({"propertyName": t["propertyName"], "observedDesired": t["observedDesired"]}))
                    .collect();
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                    if !observed.is_empty() {
                        o.insert("status".into(), json!({"twins": observed}));
                    }
                }
            }
        }
        for (ns, name) in models {
            if let Some(m) = self.device_models.get(&ObjectRef::new(&name).within(&ns)) {
                out.insert(kind::DEVICE_MODEL, m.as_ref(), None);
            }
        }
        out.map
    }
}

/// A node's objects being gathered: key -> (version, JSON unless the version is known).
struct Objects<'a> {
    map: BTreeMap<String, (String, Option<Value>)>,
    known: &'a HashMap<String, String>,
}

impl Objects<'_> {
    /// Adds `obj` under its resource key at `version` (its resourceVersion if none) and returns
    /// the key; serialised only if that version is not the known one.
    fn insert<K: Resource + serde::Serialize>(
        &mut self,
        k: &str,
        obj: &K,
        version: Option<String>,
    ) -> String {
        let meta = obj.meta();
        let key = Key::new(
            meta.namespace.as_deref(),
            k,
            meta.name.as_deref().unwrap_or_default(),
        )
        .to_string();
        let rv = version.unwrap_or_else(|| meta.resource_version.clone().unwrap_or_default());
        let value = (self.known.get(&key) != Some(&rv)).then(|| {
            let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
            v
        });
        self.map.insert(key.clone(), (rv, value));
        key
    }
}

/// Keeps every connected edge node's object set in step with the cache: offers what each node
/// should hold (the hub skips what it already has) and deletes what it should no longer hold.
pub async fn run_downstream(hub: Arc<Hub>, cache: Cache) {
    if !cache.ready().await {
        return;
    }
    tracing::info!(
        pods = cache.pods.state().len(),
        "edge controller: informer cache ready"
    );
    // A (re)connecting node is re-offered everything (cheap: the hub skips what it holds).
    let mut links = hub.subscribe();
    let dirty = cache.dirty.clone();
    let forget: Arc<Mutex<HashSet<String>>> = Arc::default();
    let f = forget.clone();
    tokio::spawn(async move {
        loop {
            let node = match links.recv().await {
                Ok(LinkEvent::Connected { node, .. }) => node,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => "*".to_string(),
                Err(_) => return,
            };
            f.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.clone());
            dirty.mark(&node);
        }
    });
    // What was offered to each node, at which version: only what changed since is serialised
    // and offered again.
    let mut offered: HashMap<String, HashMap<String, String>> = HashMap::new();
    cache.dirty.mark("*");
    loop {
        let notified = cache.dirty.notify.notified();
        let mut nodes = cache.dirty.take();
        for n in std::mem::take(&mut *forget.lock().unwrap_or_else(|p| p.into_inner())) {
            if n == "*" {
                offered.clear();
            } else {
                offered.remove(&n);
            }
        }
        if nodes.iter().any(|n| n == "*") {
            nodes = cache
                .nodes
                .state()
                .iter()
                .filter(|n| sedge_api::is_agent_node(n.labels().keys()))
                .map(|n| n.name_any())
                .collect();
        }
        for node in nodes {
            // Only the nodes connected to this core: a node offline, or served by another cloud
            // core of the cluster, is offered everything when it connects here (the hub skips
            // what its delivery records say the node holds). So two cores never both queue
            // for one node, and a core holds no queues for nodes it does not serve.
            if !cache.is_edge(&node) || !hub.is_connected(&node) {
                continue;
            }
            let sent = offered.entry(node.clone()).or_default();
            if let Err(e) = sync_node(&hub, &cache, &node, sent).await {
                tracing::warn!(%node, error = %e, "sync failed; retrying");
                let d = cache.dirty.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    d.mark(&node);
                });
            }
        }
        notified.await;
    }
}

async fn sync_node(
    hub: &Hub,
    cache: &Cache,
    node: &str,
    offered: &mut HashMap<String, String>,
) -> Result<(), sedge_tunnel::TunnelError> {
    let desired = cache.desired_since(node, offered);
    let mut sent = 0usize;
    for (key, (rv, obj)) in &desired {
        // Offered at this version already (the hub delivers it, reliably).
        let Some(obj) = obj else { continue };
        let msg = Message::new(
            group::META,
            op::UPDATE,
            key,
            serde_json::to_vec(obj).unwrap_or_default(),
        )
        .with_version(rv.clone());
        hub.send(node, msg).await?;
        offered.insert(key.clone(), rv.clone());
        sent += 1;
    }
    tracing::debug!(%node, objects = desired.len(), offered = sent, "synced node");
    let acked = hub.acked(node).await?;
    let gone: HashSet<String> = acked
        .keys()
        .chain(offered.keys())
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        offered.remove(&key);
        let k = key.split('/').nth(1).unwrap_or_default();
        if ![
            kind::POD,
            kind::CONFIGMAP,
            kind::SECRET,
            kind::SERVICE,
            kind::DEVICE,
            kind::DEVICE_MODEL,
        ]
        .contains(&k)
        {
            continue;
        }
        hub.send(
            node,
            Message::new(group::META, op::DELETE, &key, Vec::new()),
        )
        .await?;
    }
    Ok(())
}

/// Asks the node for a container's log.
pub async fn pod_logs(
    hub: &Hub,
    node: &str,
    namespace: &str,
    pod: &str,
    req: &LogRequest,
    timeout: Duration,
) -> Result<bytes::Bytes, String> {
    let key = Key::new(Some(namespace), kind::POD_LOG, pod);
    let msg = Message::new(
        group::EDGED,
        op::QUERY,
        &key.to_string(),
        serde_json::to_vec(req).unwrap_or_default(),
    );
    match hub.request(node, msg, timeout).await {
        Ok(reply) if reply.route.operation == op::ERROR => Err(format!(
            "node {node}: {}",
            String::from_utf8_lossy(&reply.content)
        )),
        Ok(reply) => Ok(reply.content),
        Err(sedge_tunnel::TunnelError::NotConnected) => Err(format!(
            "node {node} is not connected to the cloud; its logs stay on the node (read them there with `sedge edge logs`) until it reconnects"
        )),
        Err(e) => Err(format!("node {node}: {e}")),
    }
}

/// Applies what edge nodes report.
pub struct Upstream {
    client: kube::Client,
    cache: Cache,
    modules: HashMap<String, Arc<dyn crate::CloudModule>>,
    streams: sedge_tunnel::stream::Streams,
    /// The hub, once started (streams a node opens to a Service go on to another node).
    pub hub: std::sync::OnceLock<Arc<sedge_tunnel::Hub>>,
    /// Reports being written to the API at once. Unbounded, 10,000 heartbeating nodes made the
    /// client open a connection per report in flight: with `sedge cloud --embedded` both ends
    /// are this process, and it ran out of file descriptors (20,000) beside the nodes' own.
    in_flight: tokio::sync::Semaphore,
    /// The node lifecycle's grace: a Lease is written when the stored renewal is 3/8 of it old
    /// ([`crate::heartbeats::renewal`]).
    grace: Duration,
}

/// At most this many reports are written to the API at once; the rest wait their turn.
const REPORTS_IN_FLIGHT: usize = 64;

/// Heartbeats and events written to the API at once (besides the reports above) while no
/// report waits.
const BACKGROUND_WRITERS: usize = 32;

/// Background writes at once while reports are being written: they share the API server's CPU,
/// and a pod's status is what a user waits for.
const BACKGROUND_WRITERS_YIELDING: usize = 4;

/// A heartbeat that has waited this long is written at full pace whatever waits: a node served
/// here is judged by when its heartbeat arrived ([`crate::lifecycle::last_heard`]), but another
/// cloud core judges it by its Lease alone, with a 40 s grace by default.
const HEARTBEAT_YIELD_MAX: Duration = Duration::from_secs(15);

/// Background writes allowed at once with `urgent` urgent writes pending and the heartbeat first
/// in line having waited `oldest`.
fn background_writers(urgent: usize, oldest: Option<Duration>) -> usize {
    let late = oldest.is_some_and(|w| w >= HEARTBEAT_YIELD_MAX);
    if urgent > 0 && !late {
        BACKGROUND_WRITERS_YIELDING
    } else {
        BACKGROUND_WRITERS
    }
}

/// One background write.
enum Background {
    Heartbeat(crate::heartbeats::BeatKey, Value),
    Event(Box<events::Held>),
}

/// The outcome of one report: `Err` is retried by the edge later, a permanent refusal is logged
/// and dropped (retrying it forever would only fill the edge's outbox).
type Outcome = Result<Option<Message>, String>;

fn settle(what: &str, r: Result<(), kube::Error>) -> Outcome {
    match r {
        Ok(()) => Ok(None),
        Err(e) if transient(&e) => Err(format!("{what}: {e}")),
        Err(e) => {
            tracing::warn!(error = %e, "{what}: refused by the API server; dropped");
            Ok(None)
        }
    }
}

/// A node's Lease renewal and when it was renewed, checked when it arrives (a malformed one
/// would otherwise be tried again and again on the heartbeat lane).
fn renewal_time(body: &Value) -> Result<(LeaseReport, k8s_openapi::jiff::Timestamp), String> {
    let r = LeaseReport::deserialize(body).map_err(|e| e.to_string())?;
    let t = r
        .renew_time
        .parse()
        .map_err(|e| format!("renewTime {:?}: {e}", r.renew_time))?;
    Ok((r, t))
}

impl Upstream {
    /// An upstream handler for the hub.
    pub fn new(
        client: kube::Client,
        cache: Cache,
        modules: HashMap<String, Arc<dyn crate::CloudModule>>,
        streams: sedge_tunnel::stream::Streams,
        grace: Duration,
    ) -> Upstream {
        Upstream {
            client,
            cache,
            modules,
            streams,
            hub: std::sync::OnceLock::new(),
            in_flight: tokio::sync::Semaphore::new(REPORTS_IN_FLIGHT),
            grace,
        }
    }

    /// The hub handler.
    pub fn handler(self: Arc<Self>) -> Handler {
        sedge_tunnel::handler(move |i: Incoming| {
            let me = self.clone();
            async move { me.handle(i).await }
        })
    }

    async fn handle(&self, i: Incoming) -> Outcome {
        let m = &i.message;
        if m.route.group == sedge_tunnel::stream::GROUP {
            if m.route.operation == sedge_tunnel::stream::op::OPEN {
                let Some(hub) = self.hub.get() else {
                    return Ok(Some(m.reply(op::ERROR, "the cloud core is starting")));
                };
                return Ok(Some(crate::services::accept(
                    hub,
                    &self.streams,
                    &self.cache,
                    &i.node,
                    m,
                )));
            }
            if let Err(e) = self.streams.handle(&i.node, m) {
                tracing::warn!(node = %i.node, error = %e, "stream frame refused");
            }
            return Ok(None);
        }
        if m.route.group != group::CLOUD {
            if let Some(module) = self.modules.get(&m.route.group) {
                return module.handle(&i.node, i.message).await;
            }
            tracing::debug!(group = %m.route.group, "message for a group nobody handles; dropped");
            return Ok(None);
        }
        let key = match Key::parse(&m.route.resource) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(node = %i.node, "{e}; dropped");
                return Ok(None);
            }
        };
        let op = m.route.operation.as_str();
        let body: Value = match serde_json::from_slice(&m.content) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(node = %i.node, resource = %key, "malformed report: {e}; dropped");
                return Ok(None);
            }
        };
        if key.kind == kind::LEASE
            && let Err(e) = renewal_time(&body)
        {
            tracing::warn!(node = %i.node, resource = %key, "malformed Lease renewal: {e}; dropped");
            return Ok(None);
        }
        if matches!(key.kind.as_str(), kind::NODE_STATUS | kind::LEASE) {
            // Written on the heartbeat lane (`write_background`); the session goes on at once.
            self.cache.heartbeats.offer(&i.node, &key.kind, body);
            return Ok(None);
        }
        if key.kind == kind::EVENT {
            // Best effort, behind the reports (see [`crate::events`]).
            match events::Held::parse(&key.namespace, &key.name, body) {
                Ok(e) => self.cache.events.offer(e),
                Err(e) => tracing::warn!(node = %i.node, resource = %key, "{e}; dropped"),
            }
            return Ok(None);
        }
        // After a restart the reports wait for the cache (the node hears nothing until then,
        // and its outbox keeps them): a pod's status checked against a cache not yet filled
        // would be taken for a report about a deleted pod and dropped.
        if !self.cache.is_ready() && !self.cache.ready().await {
            return Err("the cloud core's informer cache failed".into());
        }
        let _urgent = self.cache.heartbeats.urgent();
        let Ok(_turn) = self.in_flight.acquire().await else {
            return Err("the cloud core is stopping".into());
        };
        match key.kind.as_str() {
            kind::NODE => settle("register node", self.register(&i.node, body).await),
            kind::POD_STATUS => match serde_json::from_value::<PodStatusReport>(body) {
                Ok(r) if op == op::DELETE => {
                    settle("finish pod delete", self.finish_delete(&key, r).await)
                }
                Ok(r) => settle("pod status", self.pod_status(&key, r).await),
                Err(e) => {
                    tracing::warn!(node = %i.node, resource = %key, "malformed pod status: {e}; dropped");
                    Ok(None)
                }
            },
            kind::DEVICE_STATUS => match serde_json::from_value::<DeviceStatusReport>(body) {
                Ok(r) => settle("device status", self.device_status(&key, r).await),
                Err(e) => {
                    tracing::warn!(node = %i.node, resource = %key, "malformed device status: {e}; dropped");
                    Ok(None)
                }
            },
            other => {
                tracing::warn!(node = %i.node, kind = other, "unknown report kind; dropped");
                Ok(None)
            }
        }
    }

    /// How many background writes (heartbeats, events) may be in flight now: a few while
    /// urgent writes (reports, bindings) wait or are written, unless a heartbeat has waited
    /// [`HEARTBEAT_YIELD_MAX`].
    fn background_writers(&self) -> usize {
        let beats = &self.cache.heartbeats;
        background_writers(
            beats.urgent_writes(),
            beats.oldest_wait(std::time::Instant::now()),
        )
    }

    /// Writes the heartbeats held in [`Heartbeats`] and the events held in [`Events`], taking
    /// from each in turn, at most [`Upstream::background_writers`] at a time, until aborted (the
    /// writes in flight go with it).
    pub async fn write_background(self: Arc<Self>) {
        // Until the cache is filled the stored Leases and statuses are unknown, so every
        // heartbeat would be written; held meanwhile, only the newest per node waits, and then
        // only what is due goes out.
        if !self.cache.ready().await {
            return;
        }
        let mut writing = tokio::task::JoinSet::new();
        let mut events_first = false;
        loop {
            while writing.try_join_next().is_some() {}
            if writing.len() >= self.background_writers() {
                writing.join_next().await;
                continue;
            }
            let (beats, evs) = (&self.cache.heartbeats, &self.cache.events);
            let beat = || beats.take().map(|(k, b)| Background::Heartbeat(k, b));
            let event = || evs.take().map(|e| Background::Event(Box::new(e)));
            let next = if events_first {
                event().or_else(beat)
            } else {
                beat().or_else(event)
            };
            events_first = !events_first;
            let Some(next) = next else {
                tokio::select! {
                    _ = beats.wake.notified() => {}
                    _ = evs.wake.notified() => {}
                    Some(_) = writing.join_next(), if !writing.is_empty() => {}
                }
                continue;
            };
            let me = self.clone();
            writing.spawn(async move {
                match next {
                    Background::Heartbeat(key, body) => me.write_heartbeat(key, body).await,
                    Background::Event(e) => me.write_event(*e).await,
                }
            });
        }
    }

    async fn write_heartbeat(&self, key: crate::heartbeats::BeatKey, body: Value) {
        let r = if key.1 == kind::LEASE {
            self.lease(&key.0, body.clone()).await
        } else {
            self.node_status(&key.0, body.clone()).await
        };
        let beats = &self.cache.heartbeats;
        match r {
            Ok(true) => {
                beats.written.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                beats.skipped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                beats.failed.fetch_add(1, Ordering::Relaxed);
                if transient(&e) {
                    tracing::debug!(node = %key.0, kind = %key.1, error = %e, "heartbeat not written; trying again");
                    beats.retry(&key, body);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } else {
                    tracing::warn!(node = %key.0, kind = %key.1, error = %e, "heartbeat refused by the API server; dropped");
                }
            }
        }
        beats.done(&key);
    }

    async fn write_event(&self, e: events::Held) {
        let evs = &self.cache.events;
        match self.event(&e).await {
            Ok(()) => {
                evs.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) if transient(&err) => {
                tracing::debug!(namespace = %e.namespace, error = %err, "event not written; trying again");
                evs.offer(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => {
                evs.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(namespace = %e.namespace, error = %err, "event refused by the API server; dropped");
            }
        }
    }

    async fn register(&self, node: &str, reported: Value) -> Result<(), kube::Error> {
        let api = Api::<Node>::all(self.client.clone());
        let mut labels = reported["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        // Whatever the node reported, it is an agent node; its role label is kept (`edge` when it
        // reported none, as nodes from before roles did).
        labels.insert(sedge_api::AGENT_LABEL.into(), json!(""));
        if !labels
            .keys()
            .any(|k| k.starts_with("node-role.kubernetes.io/"))
        {
            labels.insert(EDGE_LABEL.into(), json!(""));
        }
        labels.insert("kubernetes.io/hostname".into(), json!(node));
        labels.insert("kubernetes.io/os".into(), json!("linux"));
        match api.get_opt(node).await? {
            None => {
                let n: Node = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node, "labels": labels},
                    "spec": {},
                }))
                .map_err(kube::Error::SerdeError)?;
                match api.create(&PostParams::default(), &n).await {
                    Ok(_) => tracing::info!(%node, "edge node registered"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
            Some(_) => {
                api.patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
            }
        }
        if reported["status"].is_object() {
            self.node_status(node, reported["status"].clone()).await?;
        }
        Ok(())
    }

    /// Writes a device's reported twins and state into its status, after checking them against
    /// the device (a report that fails the check is dropped, with the reason logged).
    async fn device_status(&self, key: &Key, r: DeviceStatusReport) -> Result<(), kube::Error> {
        let Some(dev) = self
            .cache
            .devices
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
        else {
            return Ok(());
        };
        if dev.uid().as_deref() != Some(r.uid.as_str()) {
            return Ok(());
        }
        let status = match sedge_devices::check_status(&dev, &r.status) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(device = %format!("{}/{}", key.namespace, key.name), "device status refused: {e}");
                return Ok(());
            }
        };
        Api::<Device>::namespaced(self.client.clone(), &key.namespace)
            .patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map(drop)
    }

    /// Writes `node`'s status unless it says nothing new ([`crate::heartbeats::status_update`]);
    /// whether it was written.
    async fn node_status(&self, node: &str, status: Value) -> Result<bool, kube::Error> {
        let stored = self
            .cache
            .nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| n.status.as_ref().and_then(|s| serde_json::to_value(s).ok()));
        let status = match stored {
            Some(stored) => match crate::heartbeats::status_update(
                &stored,
                status,
                k8s_openapi::jiff::Timestamp::now(),
            ) {
                Some(s) => s,
                None => return Ok(false),
            },
            None => status,
        };
        Api::<Node>::all(self.client.clone())
            .patch_status(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map(|_| true)
    }

    /// Writes `node`'s Lease renewal if it is due ([`crate::heartbeats::renewal`]) or claims the
    /// node for this core; whether it was written.
    async fn lease(&self, node: &str, body: Value) -> Result<bool, kube::Error> {
        use crate::heartbeats::{Renewal, renewal};
        let (r, new) = renewal_time(&body).map_err(|e| kube::Error::Service(e.into()))?;
        let api = Api::<Lease>::namespaced(self.client.clone(), "kube-node-lease");
        let spec = json!({
            "holderIdentity": node,
            "leaseDurationSeconds": r.duration_seconds,
            "renewTime": r.renew_time,
        });
        let stored = self.cache.lease_renewed(node);
        let duration = Duration::from_secs(r.duration_seconds.max(1) as u64);
        let due = renewal(stored, new, self.grace.min(duration));
        // Never move a lease backwards (an old heartbeat flushed from the outbox on reconnect).
        if due == Renewal::Stale {
            return Ok(false);
        }
        // The first renewal of a session claims the node for this core.
        let served = self.cache.served.get();
        let own = served.map(|(own, _)| own);
        let me = own.map(|o| o.me());
        let claim =
            served.and_then(|(own, hub)| hub.session_id(node).filter(|&s| own.must_claim(node, s)));
        if due == Renewal::Recent && claim.is_none() {
            return Ok(false);
        }
        let mut patch = json!({ "spec": spec });
        if claim.is_some() {
            patch["metadata"] = json!({"annotations": {SERVED_BY: me}});
        }
        let written = match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease: Lease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node, "namespace": "kube-node-lease",
                                 "annotations": {SERVED_BY: me}},
                    "spec": spec,
                }))
                .map_err(kube::Error::SerdeError)?;
                api.create(&PostParams::default(), &lease).await?
            }
            other => other?,
        };
        if let (Some(own), Some(session), Some(rv)) =
            (own, claim, written.metadata.resource_version)
        {
            own.claimed(node, session, rv);
        }
        Ok(true)
    }

    fn current(&self, key: &Key, uid: &str) -> Option<Arc<Pod>> {
        self.cache
            .pod(&key.namespace, &key.name)
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
    }

    async fn pod_status(&self, key: &Key, r: PodStatusReport) -> Result<(), kube::Error> {
        if self.current(key, &r.uid).is_none() {
            return Ok(()); // about a pod that is gone (or replaced by another of the same name)
        }
        Api::<Pod>::namespaced(self.client.clone(), &key.namespace)
            .patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": {"uid": r.uid}, "status": r.status })),
            )
            .await
            .map(drop)
    }

    async fn finish_delete(&self, key: &Key, r: PodStatusReport) -> Result<(), kube::Error> {
        let Some(p) = self.current(key, &r.uid) else {
            return Ok(());
        };
        if p.metadata.deletion_timestamp.is_none() {
            return Ok(()); // the edge stopped it for another reason; the pod stays
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(r.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(self.client.clone(), &key.namespace)
            .delete(&key.name, &dp)
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }

    async fn event(&self, e: &events::Held) -> Result<(), kube::Error> {
        Api::<Event>::namespaced(self.client.clone(), &e.namespace)
            .create(&PostParams::default(), &e.event)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_lease_renewal_is_refused_on_arrival_naming_what_is_wrong() {
        let ok = json!({"renewTime": "2026-12-03T10:00:00.000001Z", "durationSeconds": 40});
        let (r, t) = renewal_time(&ok).unwrap();
        assert_eq!((r.duration_seconds, t.as_second()), (40, 1_796_292_000));
        let e =
            renewal_time(&json!({"renewTime": "yesterday", "durationSeconds": 40})).unwrap_err();
        assert!(e.contains("renewTime \"yesterday\""), "{e}");
        let e = renewal_time(&json!({"renewTime": 7})).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let huge = json!({"renewTime": "x".repeat(1 << 16), "durationSeconds": 40});
        assert!(renewal_time(&huge).is_err());
    }

    #[test]
    fn heartbeats_give_way_to_urgent_writes_until_one_is_late() {
        let (full, few) = (BACKGROUND_WRITERS, BACKGROUND_WRITERS_YIELDING);
        assert!(few < full);
        assert_eq!(background_writers(0, None), full, "nothing urgent");
        assert_eq!(background_writers(0, Some(Duration::from_secs(60))), full);
        assert_eq!(background_writers(3, None), few);
        assert_eq!(background_writers(3, Some(Duration::from_secs(1))), few);
        let late = HEARTBEAT_YIELD_MAX;
        assert_eq!(background_writers(3, Some(late)), full, "a late one goes");
    }

    /// After a restart a pod's status report that comes before the informer cache is filled
    /// waits for it: against the empty cache it would be taken for a report about a deleted pod
    /// and dropped (acknowledged, and lost).
    #[tokio::test]
    async fn reports_wait_for_the_cache_to_fill() {
        let mut cache = cache_with(vec![], vec![]);
        cache.filled = Arc::new(tokio::sync::watch::Sender::new(None));
        let cfg = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let up = Arc::new(Upstream::new(
            kube::Client::try_from(cfg).unwrap(),
            cache.clone(),
            HashMap::new(),
            Default::default(),
            Duration::from_secs(40),
        ));
        let report = Message::new(
            group::CLOUD,
            op::UPDATE,
            "default/podstatus/p",
            serde_json::to_vec(&json!({"uid": "u1", "status": {"phase": "Running"}})).unwrap(),
        );
        let waiting = tokio::spawn({
            let up = up.clone();
            async move {
                up.handle(Incoming {
                    node: "n1".into(),
                    message: report,
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "handled before the cache filled");
        assert!(!cache.is_ready());
        cache.filled.send_replace(Some(true));
        let handled = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("handled once the cache filled")
            .unwrap();
        // Filled without that pod, it is a report about a pod that is gone.
        assert!(matches!(handled, Ok(None)), "{handled:?}");
        // A cache whose watch failed for good refuses reports, so the node sends them again.
        cache.filled.send_replace(Some(false));
        assert!(!cache.ready().await);
    }

    /// A cache holding `devices` and `models` (the other stores empty).
    fn cache_with(devices: Vec<Device>, models: Vec<DeviceModel>) -> Cache {
        fn filled<K>(items: Vec<K>) -> Store<K>
        where
            K: kube::Resource<DynamicType = ()> + Clone + 'static,
        {
            let (store, mut writer) = reflector::store::<K>();
            for i in items {
                writer.apply_watcher_event(&watcher::Event::Apply(i));
            }
            store
        }
        Cache {
            pods: filled(vec![]),
            configmaps: filled(vec![]),
            secrets: filled(vec![]),
            services: filled(vec![]),
            nodes: filled(vec![]),
            leases: filled(vec![]),
            devices: filled(devices),
            device_models: filled(models),
            device_specs: Arc::default(),
            pods_by_node: Arc::default(),
            dirty: Arc::default(),
            changed: Arc::default(),
            scheduling: Arc::default(),
            heartbeats: Arc::default(),
            events: Arc::default(),
            served: Arc::default(),
            filled: Arc::new(tokio::sync::watch::Sender::new(Some(true))),
        }
    }

    fn device(name: &str, node: &str) -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "7"},
            "spec": {"nodeName": node, "deviceModelRef": {"name": "m"},
                     "protocol": {"protocolName": "modbus"}},
            "status": {"state": "online"}
        }))
        .unwrap()
    }

    #[test]
    fn a_device_goes_out_at_its_last_spec_change_with_only_the_desired_values_in_force() {
        let at = |rv: &str, generation: i64, uid: &str| -> Device {
            let mut d = device("valve", "edge-1");
            d.metadata.resource_version = Some(rv.into());
            d.metadata.generation = Some(generation);
            d.metadata.uid = Some(uid.into());
            d.status = serde_json::from_value(json!({"state": "online", "twins": [
                {"propertyName": "setpoint", "reported": {"value": "19"},
                 "observedDesired": {"value": "25", "metadata": {"edgeVersion": "1"}}},
                {"propertyName": "temperature", "reported": {"value": "21"}}]}))
            .unwrap();
            d
        };
        let specs = Mutex::default();
        assert!(note_device(&specs, &at("7", 1, "u1"), false).1);
        // A status-only change (the node's own report): the spec version stays, and the node
        // has nothing new to hear.
        assert!(!note_device(&specs, &at("9", 1, "u1"), false).1);
        let cache = cache_with(vec![at("9", 1, "u1")], vec![]);
        *cache.device_specs.lock().unwrap() = specs.lock().unwrap().clone();
        let (rv, obj) = &cache.desired("edge-1")["default/device/valve"];
        assert_eq!(rv, "7");
        // Offered at that version before: not serialised again.
        let known = HashMap::from([("default/device/valve".to_string(), "7".to_string())]);
        assert_eq!(
            cache.desired_since("edge-1", &known)["default/device/valve"],
            ("7".to_string(), None)
        );
        assert_eq!(
            obj["status"],
            json!({"twins": [{"propertyName": "setpoint",
                "observedDesired": {"value": "25", "metadata": {"edgeVersion": "1"}}}]})
        );
        // A spec change, and a device created again, are new versions.
        assert!(note_device(&specs, &at("11", 2, "u1"), false).1);
        assert_eq!(specs.lock().unwrap()["default/valve"].version, "11");
        // During a relist the event is seen before the store has the object: the store's
        // older spec is not sent under the new spec's version (the node would keep it).
        *cache.device_specs.lock().unwrap() = specs.lock().unwrap().clone();
        assert_eq!(cache.desired("edge-1")["default/device/valve"].0, "9");
        assert!(note_device(&specs, &at("15", 2, "u2"), false).1);
        assert_eq!(specs.lock().unwrap()["default/valve"].version, "15");
        let (gone, changed) = note_device(&specs, &at("15", 2, "u2"), true);
        assert!(changed);
        let gone = gone.unwrap();
        assert_eq!(gone.node, "edge-1");
        assert!(specs.lock().unwrap().is_empty());
    }

    #[test]
    fn a_node_gets_its_devices_and_their_models_and_reports_only_on_them() {
        let model: DeviceModel = serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
            "metadata": {"name": "m", "namespace": "default", "resourceVersion": "3"},
            "spec": {"protocol": "modbus"}
        }))
        .unwrap();
        let cache = cache_with(
            vec![device("mine", "edge-1"), device("theirs", "edge-2")],
            vec![model],
        );
        let held = cache.desired("edge-1");
        let keys: Vec<&str> = held.keys().map(String::as_str).collect();
        assert_eq!(keys, ["default/device/mine", "default/devicemodel/m"]);
        // The status stays in the cloud: the node is its source, not its reader.
        assert!(held["default/device/mine"].1.get("status").is_none());
        // The hub lets a node report only on its own devices.
        let lookup = cache.owner_lookup();
        let report = |name: &str| {
            Message::new(
                group::CLOUD,
                op::UPDATE,
                &Key::new(Some("default"), kind::DEVICE_STATUS, name).to_string(),
                Vec::new(),
            )
        };
        assert!(sedge_tunnel::hub::authorize("edge-1", &report("mine"), Some(&lookup)).is_ok());
        let e =
            sedge_tunnel::hub::authorize("edge-1", &report("theirs"), Some(&lookup)).unwrap_err();
        assert!(e.contains("belongs to node edge-2"), "{e}");
        let e =
            sedge_tunnel::hub::authorize("edge-1", &report("ghost"), Some(&lookup)).unwrap_err();
        assert!(e.contains("no such object"), "{e}");
    }

    #[test]
    fn a_node_reads_only_its_own_pods_as_they_move_and_go() {
        let pod = |name: &str, node: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            }))
            .unwrap()
        };
        let (store, mut writer) = reflector::store::<Pod>();
        let mut cache = cache_with(vec![], vec![]);
        cache.pods = store;
        let apply = |writer: &mut reflector::store::Writer<Pod>, cache: &Cache, p: Pod, gone| {
            let ev = if gone {
                watcher::Event::Delete(p.clone())
            } else {
                watcher::Event::Apply(p.clone())
            };
            writer.apply_watcher_event(&ev);
            cache.pods_by_node.lock().unwrap().apply(&p, gone);
        };
        let names = |c: &Cache, node: &str| {
            let mut v: Vec<String> = c.pods_on(node).iter().map(|p| p.name_any()).collect();
            v.sort();
            v
        };
        apply(&mut writer, &cache, pod("a", "n1"), false);
        apply(&mut writer, &cache, pod("b", "n1"), false);
        apply(&mut writer, &cache, pod("c", "n2"), false);
        apply(&mut writer, &cache, pod("d", ""), false);
        assert_eq!(names(&cache, "n1"), ["a", "b"]);
        assert_eq!(names(&cache, "n2"), ["c"]);
        assert_eq!(
            names(&cache, ""),
            ["d"],
            "a pod not placed yet waits under no node"
        );
        assert_eq!(cache.desired("n1").len(), 2);
        // A pod that moves leaves its old node; one deleted leaves every node.
        apply(&mut writer, &cache, pod("b", "n2"), false);
        apply(&mut writer, &cache, pod("a", "n1"), true);
        assert!(names(&cache, "n1").is_empty());
        assert_eq!(names(&cache, "n2"), ["b", "c"]);
        assert!(!cache.pods_by_node.lock().unwrap().nodes.contains_key("n1"));
        // Bound, it leaves the pods waiting.
        apply(&mut writer, &cache, pod("d", "n1"), false);
        assert!(cache.unplaced_pods().is_empty());
        assert_eq!(names(&cache, "n1"), ["d"]);
        // An entry the store does not back (a relist in progress) is not read; the relist
        // rebuilds the index from the store.
        cache
            .pods_by_node
            .lock()
            .unwrap()
            .apply(&pod("e", "n2"), false);
        assert_eq!(names(&cache, "n2"), ["b", "c"]);
        cache
            .pods_by_node
            .lock()
            .unwrap()
            .rebuild(&cache.pods.state());
        let index = cache.pods_by_node.lock().unwrap();
        assert_eq!(index.placed.len(), 3, "the pod the store lacks is dropped");
    }

    #[test]
    fn references_cover_volumes_env_and_env_from() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "s-vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}
                ],
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                    {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}},
                    {"name": "Z", "value": "plain"}
                ], "envFrom": [{"configMapRef": {"name": "cm-from"}}]}]
            }
        }))
        .unwrap();
        let (cms, secrets) = pod_references(&p);
        let mut cms: Vec<_> = cms.into_iter().collect();
        let mut secrets: Vec<_> = secrets.into_iter().collect();
        cms.sort();
        secrets.sort();
        assert_eq!(cms, ["cm-env", "cm-from", "cm-proj", "cm-vol"]);
        assert_eq!(secrets, ["s-env", "s-init", "s-proj", "s-vol"]);
    }
}
