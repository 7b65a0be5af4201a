//! Prometheus metrics on `/metrics`: requests by verb, resource and code; open watches; the store's
//! revision.

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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let watchers = Gauge::default();
        let revision = Gauge::default();
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
    pub fn render(&self, revision: i64) -> String {
        self.revision.set(revision);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
