//! Length-prefixed frames on a byte stream (the QUIC stream; WebSocket has its own framing).
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. A length above the cap
//! ends the connection before anything is allocated for it (KubeEdge's CVE-2026-62370 was a
//! reader that trusted the claimed length), and the payload buffer grows only as bytes arrive,
//! so a peer that claims 32 MiB and sends 10 bytes costs 64 KiB, not 32 MiB.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The default cap on one frame's payload.
pub const DEFAULT_MAX_FRAME: usize = 32 * 1024 * 1024;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame above the cap.
    #[error("frame of {claimed} bytes exceeds the {cap}-byte cap")]
    TooLarge {
        /// Announced length.
        claimed: u64,
        /// Configured cap.
        cap: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const CHUNK: usize = 64 * 1024;

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    cap: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { got, want: 4 });
        }
        got += n;
    }
    let want = u32::from_be_bytes(len) as usize;
    if want > cap {
        return Err(FrameError::TooLarge {
            claimed: want as u64,
            cap,
        });
    }
    let mut buf = Vec::with_capacity(want.min(CHUNK));
    while buf.len() < want {
        let room = (want - buf.len()).min(CHUNK);
        let start = buf.len();
        buf.resize(start + room, 0);
        let n = r.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(FrameError::Truncated {
                got: buf.len(),
                want,
            });
        }
    }
    Ok(Some(buf))
}

/// Appends one frame to `buf` (for writing several frames at once).
pub fn append_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&payload[..len as usize]);
}

/// Writes one frame (length prefix and payload in one write).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").await.unwrap();
        write_frame(&mut wire, b"").await.unwrap();
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, 16).await.unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r, 16).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut r, 16).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversize_claims_are_refused_before_allocation() {
        // Claims 4 GiB - 1 and sends nothing: refused from the header alone.
        let wire = [0xffu8, 0xff, 0xff, 0xff];
        let err = read_frame(&mut &wire[..], DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { claimed, .. } if claimed == u32::MAX as u64),
            "{err}"
        );
        assert!(err.to_string().contains("exceeds the 33554432-byte cap"));
    }

    #[tokio::test]
    async fn a_short_frame_is_truncated_not_padded() {
        let mut wire = vec![0, 0, 1, 0];
        wire.extend_from_slice(&[1, 2, 3]);
        let err = read_frame(&mut &wire[..], 1024).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { got: 3, want: 256 }),
            "{err}"
        );
        let err = read_frame(&mut &[0u8, 1][..], 1024).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { got: 2, want: 4 }),
            "{err}"
        );
    }
}
