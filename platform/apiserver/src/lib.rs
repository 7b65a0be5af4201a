//! Sedge's embedded Kubernetes-compatible API server on SQLite.
//!
//! On one machine there is no Kubernetes cluster, so `sedge up` (or `sedge apiserver`) serves the
//! Kubernetes REST API from this crate: discovery, CRUD with optimistic concurrency, all four patch
//! types, watch with bookmarks and replay, CRDs with schema validation, server-side Table printing,
//! garbage collection, TLS with bearer-token and client-certificate authentication. Controllers
//! talk to it through the `kube` crate only, so they run unchanged against a real kube-apiserver.
//!
//! What is not implemented (requests for it get a clear error, or the behaviour is documented):
//! RBAC role aggregation, admission webhooks, CRD version
//! conversion (versions share one schema), protobuf bodies beyond ConfigMap/Secret/Namespace/
//! ServiceAccount (what kubectl's typed `create` commands send), the `scale` subresource of custom resources (Deployments, ReplicaSets and StatefulSets have it), `pattern`/`format`
//! and CEL rules in CRD schemas, event TTLs, and aggregated discovery (clients fall back to the
//! unaggregated documents).
//!
//! Module map: [`store`] (SQLite, revisions, history), [`registry`] (served resources), [`ops`]
//! (the verbs), [`http`] (URLs and content negotiation), [`watch`], [`patch`], [`validate`],
//! [`kinds`] (built-in defaults), [`table`], [`discovery`], [`openapi`], [`gc`], [`auth`], [`authz`],
//! [`server`] (TLS, start-up, kubeconfig).

pub mod auth;
pub mod authz;
pub mod config;
pub mod discovery;
pub mod error;
pub mod gc;
pub mod http;
pub mod kinds;
pub mod local;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod satoken;
pub mod selector;
pub mod server;
pub mod spdy;
pub mod store;
pub mod table;
pub mod validate;
pub mod watch;

pub use config::ApiServerConfig;
pub use server::{ApiServer, StartError};
