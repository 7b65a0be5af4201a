//! How this core's watches take their first list: one streaming watch (`sendInitialEvents`,
//! Kubernetes' WatchList) where the API server has it, else pages of 500 (kube's default).
//!
//! Why: after a restart at 100,000 pods the pod informer's 200 pages ran one after another, the
//! API server idle while the core parsed a page and the core idle while the server read the next
//! (half of two cores unused, profiled); 10,000 reconnecting nodes waited for it. A streaming
//! list is read while it is parsed. The embedded API server has it; a Kubernetes API server has
//! it where the WatchList feature is on, and is asked once at start ([`probe`]).

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::runtime::watcher;

static STREAMING: OnceLock<bool> = OnceLock::new();

/// Asks the API server whether it streams a watch's initial state, and remembers the answer
/// for [`config`]. A server without it refuses the parameter, ignores it (no end-of-initial-events
/// bookmark), or does not answer in time: pages then.
pub async fn probe(client: &kube::Client) -> bool {
    let api = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    let params = WatchParams::streaming_lists()
        .fields("metadata.name=sedge-streaming-list-probe")
        .timeout(5);
    let ask = async {
        let mut events = api.watch(&params, "0").await.ok()?.boxed();
        while let Some(ev) = events.next().await {
            match ev.ok()? {
                WatchEvent::Bookmark(b) => {
                    return Some(
                        b.metadata
                            .annotations
                            .get("k8s.io/initial-events-end")
                            .is_some_and(|v| v == "true"),
                    );
                }
                WatchEvent::Error(_) => return Some(false),
                _ => {}
            }
        }
        Some(false)
    };
    let streaming = matches!(
        tokio::time::timeout(Duration::from_secs(10), ask).await,
        Ok(Some(true))
    );
    let _ = STREAMING.set(streaming);
    tracing::info!(
        streaming,
        "initial lists: streaming watch when true, pages otherwise"
    );
    streaming
}

/// Drops what no controller of this core reads from an object it caches: its `managedFields`,
/// the field managers' JSON trees. Applied to each informer's stream before its store
/// (`.modify(lists::slim)`), as kube-rs suggests for reflectors. A heap profile of the cloud at
/// 10,000 nodes found them holding 240 of the 400 MB its two Node caches took
/// (benchmarks/README.md, "eighteenth").
pub fn slim<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// The watcher configuration every informer of this core starts from.
pub fn config() -> watcher::Config {
    let c = watcher::Config::default();
    if STREAMING.get().copied().unwrap_or(false) {
        c.streaming_lists()
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering every request with `status` and `body`.
    async fn server(status: &'static str, body: &'static str) -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    /// A Kubernetes API server without WatchList refuses the parameter (422), an old one ignores
    /// it and sends the objects with no end-of-initial-events bookmark, and one that never ends
    /// the initial state (a plain bookmark) is not taken for one that does: pages, in each case.
    #[tokio::test]
    async fn a_server_without_streaming_lists_gets_pages() {
        let refused = server(
            "422 Unprocessable Entity",
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled","reason":"Invalid","code":422}"#,
        )
        .await;
        assert!(!super::probe(&refused).await);
        let ignored = server(
            "200 OK",
            concat!(
                r#"{"type":"ADDED","object":{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"n1","namespace":"kube-node-lease","resourceVersion":"5"}}}"#,
                "\n"
            ),
        )
        .await;
        assert!(!super::probe(&ignored).await);
        let plain_bookmark = server(
            "200 OK",
            concat!(
                r#"{"type":"BOOKMARK","object":{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"resourceVersion":"7"}}}"#,
                "\n"
            ),
        )
        .await;
        assert!(!super::probe(&plain_bookmark).await);
    }
}
