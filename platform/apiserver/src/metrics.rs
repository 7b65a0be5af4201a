//! Prometheus metrics on `/metrics`: requests by verb, resource and code; open watches; the store's
//! revision; commits and the WAL fsyncs that made them durable (group commit shares one among many).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The server's metrics. Clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<Vec<(String, String)>, Counter>,
    /// Open watch streams.
    pub watchers: Gauge,
    revision: Gauge,
    commits: Counter,
    fsyncs: Counter,
    gc_sweeps: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let watchers = Gauge::default();
        let revision = Gauge::default();
        let commits = Counter::default();
        let fsyncs = Counter::default();
        let gc_sweeps = Counter::default();
        registry.register(
            "sedge_apiserver_gc_sweeps",
            "Full garbage-collection sweeps (at start, every 30 s, after the change stream lagged)",
            gc_sweeps.clone(),
        );
        registry.register(
            "sedge_apiserver_store_commits",
            "Writes committed to the store since start",
            commits.clone(),
        );
        registry.register(
            "sedge_apiserver_store_fsyncs",
            "fsyncs of the store's WAL since start; each makes every commit before it durable",
            fsyncs.clone(),
        );
        registry.register(
            "sedge_apiserver_requests",
            "API requests by method, resource and HTTP code",
            requests.clone(),
        );
        registry.register(
            "sedge_apiserver_watchers",
            "Open watch streams",
            watchers.clone(),
        );
        registry.register(
            "sedge_apiserver_revision",
            "Latest committed store revision",
            revision.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            watchers,
            revision,
            commits,
            fsyncs,
            gc_sweeps,
        }
    }
}

impl Metrics {
    /// Counts one request.
    pub fn request(&self, method: &str, resource: &str, code: u16) {
        self.requests
            .get_or_create(&vec![
                ("method".into(), method.into()),
                ("resource".into(), resource.into()),
                ("code".into(), code.to_string()),
            ])
            .inc();
    }

    /// OpenMetrics text.
    pub fn render(&self, core: &crate::ops::Core) -> String {
        let store = &core.store;
        self.gc_sweeps.inner().store(
            core.gc_sweeps.load(std::sync::atomic::Ordering::Relaxed),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.revision.set(store.current_rev());
        let (commits, fsyncs) = store.commit_stats();
        self.commits
            .inner()
            .store(commits, std::sync::atomic::Ordering::Relaxed);
        self.fsyncs
            .inner()
            .store(fsyncs, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
