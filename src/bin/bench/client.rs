//! The load generator's clients: a minimal HTTP/1.1 keep-alive client and the NDJSON line
//! protocol, each in an async (tokio) and a blocking (std) flavour.
//!
//! Why not hyper or reqwest: on a 2-core machine the load generator competes with the daemon
//! for CPU, so a client that sends a pre-formatted request with one `write` and parses only the
//! status line and `Content-Length` of the reply (what `wrk` does) leaves the most CPU to
//! llmlogd. The daemon answers with `Content-Length` bodies; anything else (chunked bodies,
//! a closed connection) is reported as an error, never guessed at.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use llmlogd::ingest::LeanUnix;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where a client connects.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// An async byte stream to the daemon or a mock.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Addr {
    pub async fn connect(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Addr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            // Watched for replies only, as a blocking or libuv client would be (see `LeanUnix`).
            Addr::Unix(p) => Box::new(LeanUnix::new(tokio::net::UnixStream::connect(p).await?)?),
        })
    }

    pub fn connect_blocking(&self) -> io::Result<Box<dyn BlockingStream>> {
        Ok(match self {
            Addr::Tcp(a) => {
                let s = std::net::TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Addr::Unix(p) => Box::new(std::os::unix::net::UnixStream::connect(p)?),
        })
    }
}

pub trait BlockingStream: Read + Write + Send {}
impl<T: Read + Write + Send> BlockingStream for T {}

/// A complete HTTP/1.1 POST with a JSON body, ready to write as is.
pub fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Bytes {
    let mut r = Vec::with_capacity(body.len() + 256);
    let _ = write!(
        r,
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        let _ = write!(r, "{k}: {v}\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    Bytes::from(r)
}

/// A complete HTTP/1.1 GET.
pub fn get(path: &str) -> Bytes {
    Bytes::from(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"))
}

/// Parses the head of a response in `buf`: `Ok(None)` until the whole response is there,
/// else its status and total length (head + body).
fn parse_response(buf: &[u8]) -> io::Result<Option<(u16, usize, usize)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("response head over 64 KiB"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| io::Error::other("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut len = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::other(
                "chunked responses are not supported by the bench client",
            ));
        }
    }
    let total = head_end + 4 + len.ok_or_else(|| io::Error::other("no content-length"))?;
    Ok((buf.len() >= total).then_some((status, head_end + 4, total)))
}

/// One keep-alive HTTP/1.1 connection (async).
pub struct Http {
    s: Box<dyn Stream>,
    buf: BytesMut,
}

impl Http {
    pub async fn connect(a: &Addr) -> io::Result<Http> {
        Ok(Http {
            s: a.connect().await?,
            buf: BytesMut::with_capacity(8192),
        })
    }

    /// Sends one pre-formatted request and reads the whole reply; returns its status.
    pub async fn send(&mut self, req: &[u8]) -> io::Result<u16> {
        Ok(self.request(req).await?.0)
    }

    /// Sends one pre-formatted request; returns the reply's status and body.
    pub async fn request(&mut self, req: &[u8]) -> io::Result<(u16, Bytes)> {
        self.s.write_all(req).await?;
        loop {
            if let Some((status, body_at, total)) = parse_response(&self.buf)? {
                let mut whole = self.buf.split_to(total);
                return Ok((status, whole.split_off(body_at).freeze()));
            }
            self.buf.reserve(4096);
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// One keep-alive HTTP/1.1 connection (blocking), as a synchronous app would hold.
pub struct BlockingHttp {
    s: Box<dyn BlockingStream>,
    buf: Vec<u8>,
}

impl BlockingHttp {
    pub fn connect(a: &Addr) -> io::Result<BlockingHttp> {
        Ok(BlockingHttp {
            s: a.connect_blocking()?,
            buf: Vec::with_capacity(8192),
        })
    }

    pub fn send(&mut self, req: &[u8]) -> io::Result<u16> {
        self.s.write_all(req)?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((status, _, total)) = parse_response(&self.buf)? {
                self.buf.drain(..total);
                return Ok(status);
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Whether an NDJSON reply line is an ack.
pub fn is_ack(line: &[u8]) -> bool {
    line.starts_with(br#"{"ok":true"#)
}

/// Reads NDJSON reply lines from a buffer: calls `f` for each complete line, keeps the rest.
pub fn take_lines(buf: &mut BytesMut, mut f: impl FnMut(&[u8])) {
    while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
        let line = buf.split_to(nl + 1);
        f(&line[..nl]);
    }
}

/// One NDJSON connection on the Unix socket (async), one event in flight.
pub struct Ndjson {
    s: Box<dyn Stream>,
    buf: BytesMut,
}

impl Ndjson {
    pub async fn connect(a: &Addr) -> io::Result<Ndjson> {
        Ok(Ndjson {
            s: a.connect().await?,
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// Writes one line (with its `\n`) and waits for its reply; true when it is an ack.
    pub async fn send(&mut self, line: &[u8]) -> io::Result<bool> {
        self.s.write_all(line).await?;
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let reply = self.buf.split_to(nl + 1);
                return Ok(is_ack(&reply));
            }
            self.buf.reserve(1024);
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The connection's halves, for pipelining (a writer and a reader task).
    pub fn into_split(
        self,
    ) -> (
        impl AsyncRead + Send + Unpin + 'static,
        impl AsyncWrite + Send + Unpin + 'static,
    ) {
        tokio::io::split(self.s)
    }
}

/// One NDJSON connection (blocking), as a synchronous app would hold.
pub struct BlockingNdjson {
    s: std::os::unix::net::UnixStream,
    buf: Vec<u8>,
}

impl BlockingNdjson {
    pub fn connect(path: &std::path::Path) -> io::Result<BlockingNdjson> {
        Ok(BlockingNdjson {
            s: std::os::unix::net::UnixStream::connect(path)?,
            buf: Vec::with_capacity(4096),
        })
    }

    pub fn send(&mut self, line: &[u8]) -> io::Result<bool> {
        self.s.write_all(line)?;
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let ok = is_ack(&self.buf[..nl]);
                self.buf.drain(..=nl);
                return Ok(ok);
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_only_when_complete() {
        let r = b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\ncontent-type: x\r\n\r\nhello";
        assert_eq!(parse_response(&r[..20]).unwrap(), None);
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        assert_eq!(
            parse_response(r).unwrap(),
            Some((202, r.len() - 5, r.len()))
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse_response(chunked).is_err());
        let mut b = BytesMut::from(&b"{\"ok\":true}\n{\"ok\":false}\npart"[..]);
        let mut acks = Vec::new();
        take_lines(&mut b, |l| acks.push(is_ack(l)));
        assert_eq!(acks, vec![true, false]);
        assert_eq!(&b[..], b"part");
    }
}
