//! Services for edge pods: a pod's connection to a Service, accepted by its node's service
//! proxy, arrives here as a channel stream the node opened ([`sedge_api::ServiceConnectRequest`]).
//! The cloud core picks one of the Service's ready endpoints (a pod selected by the Service,
//! running and Ready, on any node), opens a port-forward stream to that pod's node and joins
//! the two. Every connection goes through the cloud core, also when the endpoint is on the
//! same node; an offline node reaches no Service.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use sedge_api::{PortForwardRequest, ServiceConnectRequest, StreamOpen};
use sedge_tunnel::stream::{self, Streams};
use sedge_tunnel::{Hub, Message, op};

use crate::edgecontroller::Cache;

/// How long opening the endpoint's side may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod and port a connection to `req` goes to: a ready endpoint, picked at random.
pub fn endpoint(
    cache: &Cache,
    req: &ServiceConnectRequest,
) -> Result<(String, PortForwardRequest), String> {
    let (ns, name) = (&req.namespace, &req.service);
    let svc: Arc<Service> = cache
        .services
        .get(&ObjectRef::new(name).within(ns))
        .ok_or_else(|| format!("service {ns}/{name} not found"))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(req.port))
        .ok_or_else(|| format!("service {ns}/{name} has no port {}", req.port))?;
    if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
        return Err(format!(
            "service {ns}/{name} port {}: only TCP is carried",
            req.port
        ));
    }
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        return Err(format!(
            "service {ns}/{name} has no selector (endpoints managed by hand are not supported)"
        ));
    }
    let ready = |p: &Pod| {
        let st = p.status.as_ref();
        p.metadata.deletion_timestamp.is_none()
            && st.and_then(|s| s.phase.as_deref()) == Some("Running")
            && st
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let mut pods: Vec<Arc<Pod>> = cache
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .filter(|p| ready(p))
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some()
        })
        .collect();
    if pods.is_empty() {
        return Err(format!("service {ns}/{name} has no ready endpoints"));
    }
    pods.sort_by_key(|p| p.name_any());
    let pod = &pods[rand::random_range(0..pods.len())];
    let target = match &port.target_port {
        None => req.port,
        Some(IntOrString::Int(n)) => u16::try_from(*n).map_err(|_| format!("targetPort {n}"))?,
        Some(IntOrString::String(named)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(named.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| {
                format!(
                    "service {ns}/{name}: pod {} has no port named {named:?}",
                    pod.name_any()
                )
            })?,
    };
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    Ok((
        node,
        PortForwardRequest {
            namespace: ns.clone(),
            pod: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            port: target,
            check_only: false,
        },
    ))
}

/// What a node's stream request asks for: a Service connection, the only stream a node may
/// open; anything else is refused with the reason.
fn service_request(content: &[u8]) -> Result<ServiceConnectRequest, String> {
    match serde_json::from_slice::<StreamOpen>(content) {
        Ok(StreamOpen::Service(r)) => Ok(r),
        Ok(_) => Err("a node may only open streams to Services".into()),
        Err(e) => Err(format!("malformed stream request: {e}")),
    }
}

/// Accepts a stream `node` opens to a Service: the reply to its open request. The endpoint's
/// side is opened in a task of its own (the session's handler does not wait for another node);
/// if that fails, the node's stream is closed with the reason.
pub fn accept(
    hub: &Arc<Hub>,
    streams: &Streams,
    cache: &Cache,
    node: &str,
    msg: &Message,
) -> Message {
    let req = match service_request(&msg.content) {
        Ok(r) => r,
        Err(why) => return msg.reply(op::ERROR, why),
    };
    let (target, pf) = match endpoint(cache, &req) {
        Ok(t) => t,
        Err(why) => return msg.reply(op::ERROR, why),
    };
    if streams.count(node) >= crate::exec::MAX_STREAMS_PER_NODE {
        return msg.reply(
            op::ERROR,
            format!(
                "node {node} already has {} streams open",
                crate::exec::MAX_STREAMS_PER_NODE
            ),
        );
    }
    let send: stream::Sender = {
        let (hub, node) = (hub.clone(), node.to_string());
        Arc::new(move |m: Message| {
            let (hub, node) = (hub.clone(), node.clone());
            Box::pin(async move { hub.send_unacked(&node, m).await })
        })
    };
    let Some(s) = streams.register(&msg.route.resource, node, send) else {
        return msg.reply(op::ERROR, "stream id in use");
    };
    let (hub, streams) = (hub.clone(), streams.clone());
    tokio::spawn(async move {
        let stream::Stream { mut reader, writer } = s;
        let far = crate::exec::open(
            &hub,
            &streams,
            &target,
            &StreamOpen::PortForward(pf),
            OPEN_TIMEOUT,
        )
        .await;
        let crate::exec::ExecChannels {
            mut from_node,
            to_node,
        } = match far {
            Ok(c) => c,
            Err(e) => return writer.close(Some(&e.to_string())).await,
        };
        let up = async {
            while let Some(Ok(f)) = reader.recv().await {
                if to_node.send(f).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            loop {
                match from_node.recv().await {
                    Some(Ok(f)) => {
                        if writer.send(f).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(why)) => return writer.close(Some(&why)).await,
                    None => return writer.close(None).await,
                }
            }
        };
        tokio::select! {
            () = up => writer.close(None).await,
            () = down => {}
        }
    });
    msg.reply(op::RESPONSE, "")
}

#[cfg(test)]
mod tests {
    use super::service_request;

    /// A node's stream request crosses a trust boundary: only a well-formed Service connection
    /// passes; a node asking for an exec or a port-forward of its own, or sending garbage, is
    /// refused with the reason.
    #[test]
    fn a_node_may_open_only_service_connections() {
        let ok = serde_json::to_vec(&sedge_api::StreamOpen::Service(
            sedge_api::ServiceConnectRequest {
                namespace: "default".into(),
                service: "web".into(),
                port: 80,
            },
        ))
        .unwrap();
        let r = service_request(&ok).unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.service.as_str(), r.port),
            ("default", "web", 80)
        );
        let exec =
            serde_json::to_vec(&sedge_api::StreamOpen::PortForward(Default::default())).unwrap();
        assert_eq!(
            service_request(&exec).unwrap_err(),
            "a node may only open streams to Services"
        );
        let big_port = br#"{"kind":"service","namespace":"default","service":"web","port":70000}"#;
        for bad in [
            &b"not json"[..],
            b"",
            b"{}",
            big_port,
            br#"{"kind":"service","namespace":"default","service":"web"}"#,
            br#"{"kind":"teleport"}"#,
        ] {
            let e = service_request(bad).unwrap_err();
            assert!(
                e.starts_with("malformed stream request: "),
                "{:?}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
