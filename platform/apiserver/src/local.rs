//! Requests from the same process, without a socket.
//!
//! `sedge up` and `sedge cloud --embedded` run the cloud core beside the API server. Over the
//! loopback listener each of its requests cost a TLS record each way, an HTTP/1 request and
//! response written and parsed, and a connection per request in flight: in a profile of 2,000
//! nodes renewing their Leases, the API server's TLS and HTTP side took 15% of the process and the
//! cloud core's client as much again (benchmarks/README.md). A [`LocalService`] hands the request
//! to the same router instead, on the server's runtime, with the caller's identity attached as a
//! TLS client certificate would attach it: authentication, authorisation, admission, limits and
//! metrics are the ones every request gets. Only code in this process can build one; nothing on
//! the wire can claim an identity this way.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use tower::ServiceExt;

use crate::auth::{Identity, PeerIdentity};

/// A `tower::Service` that serves requests in memory, as one identity (see the module docs).
/// With `kube::Client::new(service, "default")` it is a client of this server.
#[derive(Clone)]
pub struct LocalService {
    router: axum::Router,
    peer: PeerIdentity,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for LocalService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalService")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// What a [`LocalService`] call fails with: only the server's runtime going away.
#[derive(Debug, thiserror::Error)]
#[error("the API server stopped: {0}")]
pub struct Stopped(String);

impl LocalService {
    pub(crate) fn new(
        router: axum::Router,
        user: &str,
        groups: &[&str],
        runtime: tokio::runtime::Handle,
    ) -> LocalService {
        LocalService {
            router,
            peer: PeerIdentity(Some(Identity {
                user: user.to_string(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            })),
            runtime,
        }
    }
}

impl<B> tower::Service<axum::http::Request<B>> for LocalService
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::http::Response<Body>;
    type Error = Stopped;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Stopped>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Stopped>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        // Whatever the caller put there, the identity is this service's (a bearer token would
        // take precedence over a certificate's identity, so none goes through).
        parts.extensions.insert(self.peer.clone());
        parts.headers.remove(axum::http::header::AUTHORIZATION);
        let req = axum::http::Request::from_parts(parts, Body::new(body));
        let router = self.router.clone();
        // On the server's own runtime (and its blocking pool), as a request over the socket
        // would be: the caller's runtime does not do the server's work.
        let served = self.runtime.spawn(async move {
            let r: Result<axum::http::Response<Body>, Infallible> = router.oneshot(req).await;
            match r {
                Ok(r) => r,
                Err(never) => match never {},
            }
        });
        Box::pin(async move { served.await.map_err(|e| Stopped(e.to_string())) })
    }
}
