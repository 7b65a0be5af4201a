//! SPDY/3.1 framing, the part `kubectl port-forward` speaks: kubectl 1.31+ tunnels it inside a
//! WebSocket (`SPDY/3.1+portforward.k8s.io`), older ones upgrade to it directly.
//!
//! Frames: control frames (SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS,
//! WINDOW_UPDATE) and data frames. Header blocks are zlib-compressed with the SPDY/3 dictionary,
//! one compression context per direction for the life of the connection. Flow control is not
//! enforced (nor sent): the Go clients that speak it (moby/spdystream) ignore WINDOW_UPDATE, as
//! the kubelet does.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// SPDY/3's header compression dictionary (1,423 bytes, from the draft 3 specification).
pub const DICTIONARY: &[u8] = b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04p\
      ost\x00\x00\x00\x03put\x00\x00\x00\x06delete\x00\x00\x00\x05\
      trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccep\
      t-charset\x00\x00\x00\x0faccept-enco\
      ding\x00\x00\x00\x0faccept-language\x00\
      \x00\x00\x0daccept-ranges\x00\x00\x00\x03age\x00\
      \x00\x00\x05allow\x00\x00\x00\x0dauthorizatio\
      n\x00\x00\x00\x0dcache-control\x00\x00\x00\x0aco\
      nnection\x00\x00\x00\x0ccontent-base\
      \x00\x00\x00\x10content-encoding\x00\x00\x00\x10\
      content-language\x00\x00\x00\x0econt\
      ent-length\x00\x00\x00\x10content-lo\
      cation\x00\x00\x00\x0bcontent-md5\x00\x00\x00\
      \x0dcontent-range\x00\x00\x00\x0cconten\
      t-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\
      \x00\x06expect\x00\x00\x00\x07expires\x00\x00\x00\x04f\
      rom\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\
      \x00\x00\x11if-modified-since\x00\x00\x00\x0d\
      if-none-match\x00\x00\x00\x08if-rang\
      e\x00\x00\x00\x13if-unmodified-since\
      \x00\x00\x00\x0dlast-modified\x00\x00\x00\x08loc\
      ation\x00\x00\x00\x0cmax-forwards\x00\x00\x00\
      \x06pragma\x00\x00\x00\x12proxy-authent\
      icate\x00\x00\x00\x13proxy-authoriza\
      tion\x00\x00\x00\x05range\x00\x00\x00\x07referer\
      \x00\x00\x00\x0bretry-after\x00\x00\x00\x06serve\
      r\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\x11tr\
      ansfer-encoding\x00\x00\x00\x07upgra\
      de\x00\x00\x00\x0auser-agent\x00\x00\x00\x04vary\
      \x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10ww\
      w-authenticate\x00\x00\x00\x06method\
      \x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200\
      \x20OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1\
      .1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\x0as\
      et-cookie\x00\x00\x00\x0akeep-alive\x00\
      \x00\x00\x06origin100101201202205\
      206300302303304305306307\
      402405406407408409410411\
      412413414415416417502504\
      505203\x20Non-Authoritative\
      \x20Information204\x20No\x20Conte\
      nt301\x20Moved\x20Permanently4\
      00\x20Bad\x20Request401\x20Unauth\
      orized403\x20Forbidden404\x20N\
      ot\x20Found500\x20Internal\x20Ser\
      ver\x20Error501\x20Not\x20Impleme\
      nted503\x20Service\x20Unavaila\
      bleJan\x20Feb\x20Mar\x20Apr\x20May\x20J\
      un\x20Jul\x20Aug\x20Sept\x20Oct\x20Nov\x20\
      Dec\x2000:00:00\x20Mon,\x20Tue,\x20W\
      ed,\x20Thu,\x20Fri,\x20Sat,\x20Sun,\x20\
      GMTchunked,text/html,ima\
      ge/png,image/jpg,image/g\
      if,application/xml,appli\
      cation/xhtml+xml,text/pl\
      ain,text/javascript,publ\
      icprivatemax-age=gzip,de\
      flate,sdchcharset=utf-8c\
      harset=iso-8859-1,utf-,*\
      ,enq=0.";

/// The largest frame taken from a client (kubectl writes data in 32 KiB pieces).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest decompressed header block taken from a client.
const MAX_HEADERS: usize = 64 * 1024;

/// Control frame types.
mod kind {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const SETTINGS: u16 = 4;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
    pub const WINDOW_UPDATE: u16 = 9;
}

/// The FIN flag (both frame kinds).
pub const FLAG_FIN: u8 = 1;

/// A frame as the server acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A new stream from the client, with its headers (names lowercase).
    SynStream {
        /// Stream id.
        id: u32,
        /// Headers.
        headers: Vec<(String, String)>,
        /// The client sends nothing more on it.
        fin: bool,
    },
    /// Data on a stream.
    Data {
        /// Stream id.
        id: u32,
        /// The bytes.
        data: bytes::Bytes,
        /// The last data on the stream.
        fin: bool,
    },
    /// The client abandons a stream.
    RstStream {
        /// Stream id.
        id: u32,
    },
    /// A ping to answer.
    Ping {
        /// Its id.
        id: u32,
    },
    /// The client is done with the connection.
    GoAway,
    /// Anything the server has nothing to do for (SETTINGS, WINDOW_UPDATE, HEADERS, replies).
    Ignored,
}

/// Malformed input from the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("SPDY: {0}")]
pub struct SpdyError(pub String);

fn err(s: impl Into<String>) -> SpdyError {
    SpdyError(s.into())
}

/// Reads frames off the client's byte stream.
pub struct Reader {
    buf: bytes::BytesMut,
    inflate: Decompress,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            buf: bytes::BytesMut::new(),
            inflate: Decompress::new(true),
        }
    }
}

impl Reader {
    /// Adds bytes received from the client.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME {
            return Err(err(format!(
                "a frame of {len} bytes is above the {MAX_FRAME}-byte limit"
            )));
        }
        if self.buf.len() < 8 + len {
            return Ok(None);
        }
        let head = self.buf.split_to(8);
        let body = self.buf.split_to(len).freeze();
        let flags = head[4];
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff;
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                id: word(&head[..4]),
                data: body,
                fin: flags & FLAG_FIN != 0,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != 3 {
            return Err(err(format!("version {version} is not SPDY/3")));
        }
        let need = |n: usize| {
            if body.len() < n {
                Err(err("a control frame is shorter than its fields"))
            } else {
                Ok(())
            }
        };
        Ok(Some(match u16::from_be_bytes([head[2], head[3]]) {
            kind::SYN_STREAM => {
                need(10)?;
                let id = word(&body[..4]);
                let headers = self.headers(&body[10..])?;
                Frame::SynStream {
                    id,
                    headers,
                    fin: flags & FLAG_FIN != 0,
                }
            }
            kind::SYN_REPLY | kind::HEADERS => {
                need(4)?;
                // Decompressed all the same: the context is shared with later blocks.
                self.headers(&body[4..])?;
                Frame::Ignored
            }
            kind::RST_STREAM => {
                need(8)?;
                Frame::RstStream {
                    id: word(&body[..4]),
                }
            }
            kind::PING => {
                need(4)?;
                Frame::Ping {
                    id: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                }
            }
            kind::GOAWAY => Frame::GoAway,
            kind::SETTINGS | kind::WINDOW_UPDATE => Frame::Ignored,
            _ => Frame::Ignored,
        }))
    }

    /// Decompresses a header block and parses its name/value pairs.
    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut out = Vec::with_capacity(256);
        let mut input = block;
        for _ in 0..64 {
            if out.len() >= MAX_HEADERS {
                return Err(err(format!(
                    "a header block decompresses to more than {MAX_HEADERS} bytes"
                )));
            }
            out.reserve(4096);
            let before_in = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before_in) as usize;
            input = &input[used..];
            match r {
                Ok(Status::StreamEnd) => break,
                Ok(_) if input.is_empty() && out.capacity() > out.len() => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| err(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(err(format!("header block: {e}"))),
            }
        }
        if !input.is_empty() {
            return Err(err("a header block does not decompress"));
        }
        parse_headers(&out)
    }
}

fn parse_headers(b: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let mut pos = 0;
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        let s = b
            .get(pos..pos + n)
            .ok_or_else(|| err("a header block ends early"))?;
        pos += n;
        Ok(s)
    };
    let int = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
    let count = int(take(4)?);
    if count > 1024 {
        return Err(err(format!("{count} headers in one block is too many")));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = int(take(4)?);
        let name = String::from_utf8_lossy(take(n)?).to_ascii_lowercase();
        let n = int(take(4)?);
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        out.push((name, value));
    }
    Ok(out)
}

/// Writes frames for the client.
pub struct Writer {
    deflate: Compress,
}

impl Default for Writer {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(DICTIONARY)
            .expect("a fresh compressor takes a dictionary");
        Writer { deflate }
    }
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8003u16).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

impl Writer {
    /// SYN_REPLY for stream `id` with no headers.
    pub fn syn_reply(&mut self, id: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        let mut block = Vec::with_capacity(64);
        // An empty name/value block: a count of zero.
        self.deflate
            .compress_vec(&0u32.to_be_bytes(), &mut block, FlushCompress::Sync)
            .expect("compressing into a vector");
        while block.len() == block.capacity() {
            block.reserve(64);
            self.deflate
                .compress_vec(&[], &mut block, FlushCompress::Sync)
                .expect("compressing into a vector");
        }
        body.extend_from_slice(&block);
        control(kind::SYN_REPLY, 0, &body)
    }

    /// A data frame.
    pub fn data(id: u32, data: &[u8], fin: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(8 + data.len());
        f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
        f.push(if fin { FLAG_FIN } else { 0 });
        f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(data);
        f
    }

    /// RST_STREAM with status CANCEL.
    pub fn rst_stream(id: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&5u32.to_be_bytes());
        control(kind::RST_STREAM, 0, &body)
    }

    /// The answer to a ping.
    pub fn ping(id: u32) -> Vec<u8> {
        control(kind::PING, 0, &id.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's SYN_STREAM, compressed as Go's framer does it (zlib with the dictionary,
    /// a sync flush per block, one context for the connection).
    fn syn_stream(c: &mut Compress, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (k, v) in headers {
            raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
            raw.extend_from_slice(k.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut block = Vec::with_capacity(1024);
        c.compress_vec(&raw, &mut block, FlushCompress::Sync)
            .unwrap();
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&block);
        control(kind::SYN_STREAM, 0, &body)
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn header_blocks_share_one_context_and_frames_split_anywhere() {
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(DICTIONARY).unwrap();
        let mut bytes = syn_stream(
            &mut c,
            1,
            &[("streamtype", "error"), ("port", "80"), ("requestid", "0")],
        );
        bytes.extend(syn_stream(
            &mut c,
            3,
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
        ));
        bytes.extend(Writer::data(3, b"GET / HTTP/1.0\r\n\r\n", true));
        bytes.extend(control(kind::PING, 0, &7u32.to_be_bytes()));
        let mut r = Reader::default();
        let mut frames = Vec::new();
        // Byte by byte: a WebSocket message may hold any slice of the stream.
        for b in bytes {
            r.push(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 4);
        assert_eq!(
            frames[1],
            Frame::SynStream {
                id: 3,
                headers: vec![
                    ("streamtype".into(), "data".into()),
                    ("port".into(), "80".into()),
                    ("requestid".into(), "0".into())
                ],
                fin: false
            }
        );
        assert!(
            matches!(&frames[2], Frame::Data { id: 3, fin: true, data } if &data[..] == b"GET / HTTP/1.0\r\n\r\n")
        );
        assert_eq!(frames[3], Frame::Ping { id: 7 });
    }

    #[test]
    fn replies_decompress_with_the_dictionary() {
        let mut w = Writer::default();
        let mut d = Decompress::new(true);
        for id in [2u32, 4] {
            let f = w.syn_reply(id);
            let block = &f[12..];
            let mut out = Vec::with_capacity(64);
            let mut r = d.decompress_vec(block, &mut out, FlushDecompress::Sync);
            if r.as_ref().is_err_and(|e| e.needs_dictionary().is_some()) {
                d.set_dictionary(DICTIONARY).unwrap();
                let used = d.total_in() as usize;
                r = d.decompress_vec(&block[used..], &mut out, FlushDecompress::Sync);
            }
            r.unwrap();
            assert_eq!(out, [0, 0, 0, 0]);
        }
    }

    #[test]
    fn hostile_input_is_refused_not_trusted() {
        let mut r = Reader::default();
        // A frame claiming 16 MiB.
        r.push(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]);
        assert!(r.next_frame().unwrap_err().0.contains("limit"));
        // A header block that is not zlib.
        let mut r = Reader::default();
        r.push(&control(
            kind::SYN_STREAM,
            0,
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
        ));
        assert!(r.next_frame().is_err());
        // A header count past the block.
        assert!(parse_headers(&[0, 0, 0, 5, 0, 0, 0, 9]).is_err());
        assert!(
            parse_headers(&[0, 1, 0, 0])
                .unwrap_err()
                .0
                .contains("too many")
        );
    }
}
