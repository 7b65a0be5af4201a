//! The cloud core: the cloud hub of the channel plus the controllers that make edge nodes real.
//!
//! Everything here talks to Kubernetes through `kube` only, so it runs against the embedded API
//! server (`sedge up`) and against a real kube-apiserver given a kubeconfig.
//!
//! - [`edgecontroller`]: one shared informer cache (one watch per kind for all nodes) of Pods,
//!   ConfigMaps, Secrets, Nodes and Leases; works out which objects each edge node needs (its pods
//!   and the config maps and secrets they reference) and offers them through the hub, which skips
//!   what the node already holds. Upstream it applies node registration, node status, leases, pod
//!   status, finished pod deletes and events.
//! - [`lifecycle`]: marks an edge node `Ready=Unknown` and taints it
//!   `node.kubernetes.io/unreachable` when its lease is older than the grace; pods stay (no
//!   eviction by default, see [`TaintEffect`]).
//! - [`workload`]: Deployments (through ReplicaSets, with revisions for `kubectl rollout`),
//!   ReplicaSets, DaemonSets and Jobs.
//! - [`scheduler`]: binds pending pods in the embedded mode (node selector, required node
//!   affinity, taints/tolerations, requests against allocatable).

pub mod edgecontroller;
pub mod events;
pub mod exec;
pub mod heartbeats;
pub mod joinrecords;
pub mod leader;
pub mod lifecycle;
pub mod lists;
pub mod ownership;
pub use sedge_api::quantity;
pub mod scheduler;
pub mod services;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use sedge_api::group;
use sedge_tunnel::{Hub, HubConfig};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub use edgecontroller::Cache;

/// Errors of the cloud core.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The channel's hub failed to start.
    #[error("cloud hub: {0}")]
    Hub(#[from] sedge_tunnel::TunnelError),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
}

/// The effect of the taint put on an unreachable edge node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TaintEffect {
    /// New pods are not scheduled there; running pods stay bound and keep running on the edge
    /// (the default: an edge that loses its uplink is still doing its job).
    #[default]
    NoSchedule,
    /// Kubernetes' behaviour for cloud nodes: pods without a toleration for
    /// `node.kubernetes.io/unreachable` are deleted after their `tolerationSeconds` (default 300).
    NoExecute,
}

/// Settings of the cloud core (`sedge cloud --print-default-config`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CloudCoreConfig {
    /// The channel's hub.
    pub hub: HubConfig,
    /// An edge node whose lease is older than this is marked `Ready=Unknown`.
    pub node_grace_seconds: u64,
    /// How often node leases are checked.
    pub node_monitor_period_ms: u64,
    /// What the unreachable taint does (see [`TaintEffect`]).
    pub unreachable_taint_effect: TaintEffect,
    /// Run the workload controllers: Deployments, ReplicaSets, DaemonSets, Jobs (off against a
    /// real cluster, which has its own).
    pub workloads: bool,
    /// Run the scheduler (off against a real cluster, which has its own).
    pub scheduler: bool,
    /// How long `kubectl logs` waits for the node.
    pub log_timeout_ms: u64,
    /// Where `sedge cloud` serves `/metrics` (the hub's counters, nodes connected and Ready,
    /// objects queued), `/healthz` and `/readyz`. Empty disables it.
    pub metrics_listen: String,
    /// Leader election of the singleton controllers (node lifecycle, workloads, scheduler)
    /// among cloud cores sharing one cluster.
    pub leader: leader::LeaderConfig,
    /// Where join tokens and node certificate records are kept (see [`JoinRecordsAt`]).
    pub join_records: JoinRecordsAt,
}

/// Where a cloud core keeps join tokens and node certificate records.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JoinRecordsAt {
    /// `api` for `sedge cloud --kubeconfig` (cores may share the cluster), `hub` for
    /// `sedge cloud --embedded` and `sedge up` (one core). [`CloudCore::start`] takes it as
    /// `hub`.
    #[default]
    Auto,
    /// The hub's own database, `hub.data_dir/hub.db`: only this core knows them.
    Hub,
    /// Secrets in `kube-system` ([`joinrecords`]): every core of the cluster shares them, and
    /// `sedge token --kubeconfig` manages them. What the hub's database held is copied in at
    /// start.
    Api,
}

impl Default for CloudCoreConfig {
    fn default() -> Self {
        CloudCoreConfig {
            hub: HubConfig::default(),
            node_grace_seconds: 40,
            node_monitor_period_ms: 5_000,
            unreachable_taint_effect: TaintEffect::NoSchedule,
            workloads: true,
            scheduler: true,
            log_timeout_ms: 10_000,
            metrics_listen: "127.0.0.1:10266".into(),
            leader: leader::LeaderConfig::default(),
            join_records: JoinRecordsAt::Auto,
        }
    }
}

/// What a cloud module gets to work with once the hub runs.
#[derive(Clone)]
pub struct CloudModuleContext {
    /// The Kubernetes client the cloud core uses.
    pub client: kube::Client,
    /// The channel's hub (to reply later, or send to a node without waiting for an ack).
    pub hub: Arc<Hub>,
    /// The shared informer cache (pods, nodes, ...).
    pub cache: Cache,
}

/// A module plugged into the cloud core: the cloud-side counterpart of an edge module
/// (`sedge_edgecore::EdgeModule`). It claims a message group; messages of that group from edge
/// nodes are handed to it, after the hub checked that the sending node may send them (see
/// [`CloudModule::owner`]). The AI layer plugs in here; the platform knows nothing about it.
pub trait CloudModule: Send + Sync {
    /// The message group it handles (must not be `meta`, `edged` or `cloud`).
    fn group(&self) -> &str;
    /// The node allowed to send messages about `<namespace>/<kind>/<name>` (other than
    /// `query`, which any node may send): `None` refuses them all. Called on the hub's receive
    /// path, so it must answer from memory.
    fn owner(&self, _kind: &str, _namespace: &str, _name: &str) -> Option<String> {
        None
    }
    /// Called once, when the hub runs.
    fn start(&self, _ctx: CloudModuleContext) {}
    /// Handles a message of its group from `node`. `Ok(Some(reply))` replies at once; a module
    /// may also reply later through the hub (a reply is any message whose `parent_id` is the
    /// request's id). `Err` makes the edge retry a reliable message.
    fn handle(
        &self,
        node: &str,
        msg: sedge_tunnel::Message,
    ) -> futures::future::BoxFuture<'static, Result<Option<sedge_tunnel::Message>, String>>;
}

/// A running cloud core.
pub struct CloudCore {
    /// The channel's hub.
    pub hub: Arc<Hub>,
    /// The shared informer cache.
    pub cache: Cache,
    /// Open exec streams, over all nodes.
    pub streams: sedge_tunnel::stream::Streams,
    cfg: CloudCoreConfig,
    tasks: Vec<JoinHandle<()>>,
    leading: tokio::sync::watch::Receiver<bool>,
    client: kube::Client,
}

impl CloudCore {
    /// The cloud core's metrics: the hub's, and its view of the agent nodes.
    pub fn metrics(&self, e: &mut sedge_serve::Exposition) {
        render_metrics(&self.hub, &self.cache, e);
    }
}

/// [`CloudCore::metrics`], from the parts a `/metrics` handler can hold on to.
pub fn render_metrics(hub: &Hub, cache: &Cache, e: &mut sedge_serve::Exposition) {
    use kube::ResourceExt;
    hub.metrics(e);
    let nodes = cache.nodes.state();
    let agents: Vec<_> = nodes
        .iter()
        .filter(|n| sedge_api::is_agent_node(n.labels().keys()))
        .collect();
    let ready = agents
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    e.gauge(
        "cloudcore_agent_nodes",
        "Nodes registered through the channel",
        agents.len() as i64,
    )
    .gauge(
        "cloudcore_agent_nodes_ready",
        "Of those, Ready",
        ready as i64,
    )
    .gauge(
        "cloudcore_pods_cached",
        "Pods in the cloud core's cache",
        cache.pods.state().len() as i64,
    );
    let s = &cache.scheduling;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    e.counter(
        "cloudcore_scheduler_passes",
        "Scheduling passes that had pods to place",
        get(&s.passes),
    )
    .counter(
        "cloudcore_scheduler_bindings",
        "Pods the embedded scheduler bound",
        get(&s.bound),
    )
    .counter(
        "cloudcore_scheduler_binding_conflicts",
        "Bindings refused because the pod was already bound",
        get(&s.conflicts),
    );
    let h = &cache.heartbeats;
    e.counter(
        "cloudcore_heartbeats_written",
        "Node Lease renewals and status reports written to the API",
        get(&h.written),
    )
    .counter(
        "cloudcore_heartbeats_replaced",
        "Heartbeats dropped unwritten: a newer one from the same node arrived while they waited",
        get(&h.replaced),
    )
    .counter(
        "cloudcore_heartbeats_skipped",
        "Heartbeats not written: the stored Lease was renewed recently, or the status had nothing new but its heartbeat times",
        get(&h.skipped),
    )
    .counter(
        "cloudcore_heartbeats_failed",
        "Heartbeat writes that failed (a transient failure is tried again)",
        get(&h.failed),
    )
    .gauge(
        "cloudcore_heartbeats_pending",
        "Nodes with a heartbeat waiting for its turn or being written",
        h.pending() as i64,
    );
    let ev = &cache.events;
    e.counter(
        "cloudcore_events_written",
        "Events the nodes reported, written to the API",
        get(&ev.written),
    )
    .counter(
        "cloudcore_events_dropped",
        "Events the nodes reported and this core dropped (too many waiting, or refused)",
        get(&ev.dropped),
    )
    .gauge(
        "cloudcore_events_pending",
        "Events waiting to be written",
        ev.pending() as i64,
    );
    if let Some((own, _)) = cache.served.get() {
        e.counter(
            "cloudcore_node_claims",
            "Nodes this core claimed (the first Lease renewal of each session names it)",
            get(&own.claims),
        )
        .counter(
            "cloudcore_nodes_yielded",
            "Sessions this core closed because another cloud core claimed the node after it",
            get(&own.yielded),
        );
    }
}

impl std::fmt::Debug for CloudCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudCore")
            .field("hub", &self.hub.addr())
            .finish()
    }
}

/// The join records in the API, with what this core's hub database held copied in.
async fn shared_join_records(
    client: &kube::Client,
    hub: &HubConfig,
) -> Result<Arc<dyn sedge_tunnel::token::JoinRecords>, CloudError> {
    let records = joinrecords::ApiRecords::start(client.clone()).await?;
    let db = hub.data_dir.join("hub.db");
    if db.exists() {
        let api = records.clone();
        let (tokens, certs) = tokio::task::spawn_blocking(move || {
            let local = sedge_tunnel::token::SqliteRecords::open(&db)?;
            api.import(&local)
        })
        .await
        .map_err(|e| CloudError::Config(e.to_string()))??;
        if tokens + certs > 0 {
            tracing::info!(
                tokens,
                certificates = certs,
                "copied the hub database's join tokens and certificate records into the API"
            );
        }
    }
    Ok(records)
}

impl CloudCore {
    /// Starts the informers, the hub and the controllers.
    /// `modules` get the messages of the groups they claim.
    pub async fn start(
        client: kube::Client,
        cfg: CloudCoreConfig,
        modules: Vec<Arc<dyn CloudModule>>,
    ) -> Result<CloudCore, CloudError> {
        let mut groups = std::collections::HashMap::new();
        for m in modules {
            let g = m.group().to_string();
            if [
                group::META,
                group::EDGED,
                group::CLOUD,
                sedge_tunnel::stream::GROUP,
            ]
            .contains(&g.as_str())
            {
                return Err(CloudError::Config(format!(
                    "a cloud module may not claim the built-in group {g:?}"
                )));
            }
            if groups.insert(g.clone(), m).is_some() {
                return Err(CloudError::Config(format!(
                    "two cloud modules claim the group {g:?}"
                )));
            }
        }
        lists::probe(&client).await;
        let (cache, mut tasks) = Cache::start(client.clone());
        let owner_of: sedge_tunnel::hub::OwnerLookup = {
            let base = cache.owner_lookup();
            let modules: Vec<Arc<dyn CloudModule>> = groups.values().cloned().collect();
            Arc::new(move |k: &str, ns: &str, name: &str| {
                base(k, ns, name).or_else(|| modules.iter().find_map(|m| m.owner(k, ns, name)))
            })
        };
        let streams = sedge_tunnel::stream::Streams::default();
        let upstream = Arc::new(edgecontroller::Upstream::new(
            client.clone(),
            cache.clone(),
            groups.clone(),
            streams.clone(),
            Duration::from_secs(cfg.node_grace_seconds),
        ));
        let join_records = match cfg.join_records {
            JoinRecordsAt::Api => Some(shared_join_records(&client, &cfg.hub).await?),
            JoinRecordsAt::Hub | JoinRecordsAt::Auto => None,
        };
        let hub = Hub::start(
            cfg.hub.clone(),
            sedge_tunnel::hub::HubOptions {
                handler: Some(upstream.clone().handler()),
                owner_of: Some(owner_of),
                owners_known: Some({
                    let cache = cache.clone();
                    Arc::new(move || cache.is_ready())
                }),
                join_records,
            },
        )
        .await?;
        let hub = Arc::new(hub);
        let _ = upstream.hub.set(hub.clone());
        tasks.push(tokio::spawn(upstream.clone().write_background()));
        let own = ownership::Ownership::new(cfg.leader.identity());
        let _ = cache.served.set((Arc::new(own), hub.clone()));
        for m in groups.values() {
            m.start(CloudModuleContext {
                client: client.clone(),
                hub: hub.clone(),
                cache: cache.clone(),
            });
        }
        tasks.push(tokio::spawn(exec::close_on_disconnect(
            hub.clone(),
            streams.clone(),
        )));
        tasks.push(tokio::spawn(edgecontroller::run_downstream(
            hub.clone(),
            cache.clone(),
        )));
        tasks.push(tokio::spawn(lifecycle::revoke_deleted_nodes(
            client.clone(),
            hub.clone(),
        )));
        // The controllers one core runs at a time, whichever holds the Lease.
        cfg.leader.check().map_err(CloudError::Config)?;
        let (leading_tx, leading) = tokio::sync::watch::channel(false);
        let singletons = {
            let (client, cache, cfg) = (client.clone(), cache.clone(), cfg.clone());
            move || {
                let (client, cache, cfg) = (client.clone(), cache.clone(), cfg.clone());
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    set.spawn(lifecycle::run(
                        client.clone(),
                        cache.clone(),
                        lifecycle::Settings {
                            grace: Duration::from_secs(cfg.node_grace_seconds),
                            period: Duration::from_millis(cfg.node_monitor_period_ms.max(100)),
                            effect: cfg.unreachable_taint_effect,
                        },
                    ));
                    if cfg.workloads {
                        set.spawn(workload::run(client.clone()));
                    }
                    if cfg.scheduler {
                        set.spawn(scheduler::run(client, cache));
                    }
                    // Dropping the set (this task aborted) aborts the controllers.
                    while set.join_next().await.is_some() {}
                }
            }
        };
        tasks.push(tokio::spawn(leader::run_while_leading(
            client.clone(),
            cfg.leader.clone(),
            leading_tx,
            singletons,
        )));
        tracing::info!(addr = %hub.addr(), quic = ?hub.quic_addr(), "cloud core running");
        Ok(CloudCore {
            hub,
            cache,
            streams,
            cfg,
            tasks,
            leading,
            client,
        })
    }

    /// Reads a container's log from the node the pod runs on, through the channel.
    pub async fn pod_logs(
        &self,
        node: &str,
        namespace: &str,
        pod: &str,
        req: &sedge_api::LogRequest,
    ) -> Result<bytes::Bytes, String> {
        edgecontroller::pod_logs(
            &self.hub,
            node,
            namespace,
            pod,
            req,
            Duration::from_millis(self.cfg.log_timeout_ms),
        )
        .await
    }

    /// Opens an exec stream to the node the pod runs on (see [`exec::open`]).
    pub async fn pod_exec(
        &self,
        node: &str,
        req: &sedge_api::StreamOpen,
    ) -> Result<exec::ExecChannels, exec::ExecError> {
        exec::open(
            &self.hub,
            &self.streams,
            node,
            req,
            Duration::from_millis(self.cfg.log_timeout_ms),
        )
        .await
    }

    /// Stops the controllers and the hub.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // Another core takes the singleton controllers over at once.
        if *self.leading.borrow() {
            leader::release(self.client.clone(), &self.cfg.leader).await;
        }
        self.hub.shutdown().await;
    }

    /// Stops like a crash (`kill -9`): the tasks and the hub's sessions end, nothing is released
    /// (the Lease expires on its own). For failover tests.
    pub async fn crash(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.hub.shutdown().await;
    }

    /// Whether this core runs the singleton controllers now.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }
}

/// Whether a kube error is worth retrying (the API server is away or busy) rather than a
/// permanent refusal of this request.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        _ => true,
    }
}
