//! `kubectl port-forward` on the node: a TCP connection to the pod's port, carried by a channel
//! stream (see [`sedge_api::PortForwardRequest`] for the frames). The pod's address is its own
//! IP when the runtime gives it one (a CRI pod network), else the node's loopback (pods share the
//! node's network).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use sedge_api::tcp_frame::{CLOSE_WRITE, DATA};
use sedge_api::{PortForwardRequest, kind};
use sedge_tunnel::stream::{MAX_FRAME, Stream, StreamWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runtime::Runtime;
use crate::store::MetaStore;

/// How long connecting to the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks the request against what the node runs: the pod by UID, one of its containers
/// running, a port. The address to connect to.
pub fn resolve(
    store: &MetaStore,
    runtime: &dyn Runtime,
    req: &PortForwardRequest,
) -> Result<SocketAddr, String> {
    crate::podcheck::uid(&req.uid)?;
    if req.port == 0 {
        return Err("port 0 is not a valid port".into());
    }
    let (ns, name) = (&req.namespace, &req.pod);
    store
        .get(kind::POD, ns, name)
        .map_err(|e| e.to_string())?
        .filter(|p| p["metadata"]["uid"] == req.uid.as_str())
        .ok_or_else(|| format!("pod {ns}/{name} is not on this node"))?;
    let running = store
        .containers(&req.uid)
        .map_err(|e| e.to_string())?
        .iter()
        .any(|r| crate::exec::running(r, runtime.cri()));
    if !running {
        return Err(format!(
            "unable to forward port because pod {ns}/{name} has no running container"
        ));
    }
    let ip = runtime
        .pod_ip(&req.uid)
        .unwrap_or_else(|| "127.0.0.1".into());
    format!("{ip}:{}", req.port)
        .parse()
        .map_err(|e| format!("pod address {ip}: {e}"))
}

/// How [`tcp_to_stream`] ended.
pub(crate) enum Pumped {
    /// The connection's reading side ended.
    Eof,
    /// Reading failed.
    ReadFailed(std::io::Error),
    /// The stream is closed: nobody takes the bytes any more.
    StreamClosed,
}

/// Copies what `rd` reads into `DATA` frames on `writer` until one of them ends.
pub(crate) async fn tcp_to_stream(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    writer: &StreamWriter,
) -> Pumped {
    let mut buf = vec![0u8; MAX_FRAME - 1];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return Pumped::Eof,
            Ok(n) => {
                let mut f = BytesMut::with_capacity(n + 1);
                f.put_u8(DATA);
                f.put_slice(&buf[..n]);
                if writer.send(f.freeze()).await.is_err() {
                    return Pumped::StreamClosed;
                }
            }
            Err(e) => return Pumped::ReadFailed(e),
        }
    }
}

/// Connects to `addr` and relays until the pod closes the connection or the stream ends.
pub async fn run(addr: SocketAddr, req: PortForwardRequest, stream: Stream) {
    let Stream { mut reader, writer } = stream;
    let failed = |e: String| {
        format!(
            "error forwarding port {} to pod {}/{}: {e}",
            req.port, req.namespace, req.pod
        )
    };
    let conn =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return writer
                    .close(Some(&failed(format!("dial tcp {addr}: {e}"))))
                    .await;
            }
            Err(_) => {
                return writer
                    .close(Some(&failed(format!(
                        "dial tcp {addr}: no answer within {CONNECT_TIMEOUT:?}"
                    ))))
                    .await;
            }
        };
    let _ = conn.set_nodelay(true);
    let (mut rd, mut wr) = conn.into_split();
    let from_pod = async {
        match tcp_to_stream(&mut rd, &writer).await {
            Pumped::Eof | Pumped::StreamClosed => None,
            Pumped::ReadFailed(e) => Some(failed(format!("reading from the pod: {e}"))),
        }
    };
    let to_pod = async {
        loop {
            match reader.recv().await {
                Some(Ok(f)) => match f.first() {
                    // The pod stopped reading; what it sends may still come.
                    Some(&DATA) if wr.write_all(&f[1..]).await.is_err() => {
                        let _ = wr.shutdown().await;
                    }
                    Some(&CLOSE_WRITE) => {
                        let _ = wr.shutdown().await;
                    }
                    _ => {}
                },
                // The client left or the link dropped: nobody is there to answer.
                Some(Err(_)) | None => return,
            }
        }
    };
    tokio::select! {
        e = from_pod => writer.close(e.as_deref()).await,
        () = to_pod => writer.close(None).await,
    }
}
