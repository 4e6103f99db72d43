//! hyper answers a request it cannot parse by itself, before any handler runs: `400` (a bad
//! request line or header), `414` (URI too long), `431` (headers over the read buffer), each
//! with an empty body and `connection: close`. Every other refusal of llmlogd is a JSON body
//! naming the problem (`http.rs`), and a client that logs the body of an error got nothing to
//! go on. [`JsonParseErrors`] sits under hyper on each HTTP connection and writes those three
//! replies with the same JSON body as the rest: hyper's head is recognised byte for byte
//! (`connection: close`, `content-length: 0`, then its `date`), so a reply of llmlogd's own
//! (always with a body) is never touched, and anything else goes through as it is.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::IngestError;

/// The body hyper's automatic reply to `status` gets, if it is one of them.
fn error_for(status: &[u8]) -> Option<IngestError> {
    Some(match status {
        b"400" => IngestError::new(
            400,
            "bad_request",
            "the request is not valid HTTP/1.1: its request line or a header could not be parsed",
        ),
        b"414" => IngestError::new(414, "uri_too_long", "the request's URI is too long"),
        b"431" => IngestError::new(
            431,
            "headers_too_large",
            format!(
                "the request line and headers take more than {} KiB together: send fewer or smaller headers",
                super::server::HTTP_READ_BUFFER >> 10
            ),
        ),
        _ => return None,
    })
}

/// hyper's automatic reply with a JSON body in place of its empty one, if `head` is one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    const PREFIX: &[u8] = b"HTTP/1.1 ";
    const EMPTY: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";
    let rest = head.strip_prefix(PREFIX)?;
    let e = error_for(rest.get(..3)?)?;
    if !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    // The status line, then exactly hyper's two headers, then the rest (its `date`).
    let after = head[line_end..].strip_prefix(EMPTY)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "success": false,
        "message": e.message,
        "error": e,
    }))
    .ok()?;
    let mut out = Vec::with_capacity(head.len() + body.len() + 64);
    out.extend_from_slice(&head[..line_end]);
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-type: application/json\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(after);
    out.extend_from_slice(&body);
    Some(out)
}

/// See the module doc.
pub(crate) struct JsonParseErrors<S> {
    inner: S,
    /// A rewritten reply being written: its bytes, how many are written, and the length of
    /// hyper's own, reported to hyper as written once all of ours are.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonParseErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        JsonParseErrors {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Whether a rewritten reply is being written, starting one if `buf` (one write, whole)
    /// is hyper's head: then [`Self::poll_pending`] writes it instead of `buf`.
    fn take(&mut self, buf: &[u8]) -> bool {
        // Only a write that begins with an error status line is looked at.
        if self.pending.is_none() && buf.starts_with(b"HTTP/1.1 4") {
            self.pending = rewrite(buf).map(|ours| (ours, 0, buf.len()));
        }
        self.pending.is_some()
    }

    /// Writes what is pending; `Ok(n)` (hyper's length) once all of it is out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, written, theirs)) = &mut self.pending else {
            return Poll::Ready(Ok(0));
        };
        while *written < bytes.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let theirs = *theirs;
        self.pending = None;
        Poll::Ready(Ok(theirs))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.take(buf) {
            return self.poll_pending(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let whole = match (nonempty.next(), nonempty.next()) {
            (Some(first), None) => &first[..],
            _ => &[],
        };
        if self.take(whole) {
            return self.poll_pending(cx);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_some() {
            ready!(self.poll_pending(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_some() {
            ready!(self.poll_pending(cx))?;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "date: Sat, 05 Dec 2026 16:18:55 GMT\r\n\r\n";

    fn hyper_head(status: &str) -> Vec<u8> {
        format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}")
            .into_bytes()
    }

    fn split(reply: &[u8]) -> (String, serde_json::Value) {
        let at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(reply[..at].to_vec()).unwrap();
        (head, serde_json::from_slice(&reply[at..]).unwrap())
    }

    #[test]
    fn hypers_own_replies_get_a_json_body_of_the_length_they_say() {
        for (status, code) in [
            ("400 Bad Request", "bad_request"),
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let ours = rewrite(&hyper_head(status)).expect(status);
            let (head, body) = split(&ours);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(
                head.contains("\r\ncontent-type: application/json\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
            assert!(head.ends_with(DATE), "hyper's date kept: {head}");
            let len = serde_json::to_vec(&body).unwrap().len();
            assert!(
                head.contains(&format!("\r\ncontent-length: {len}\r\n")),
                "{head}"
            );
            assert_eq!(body["success"], false);
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(body["message"].as_str().unwrap().len() > 10, "{body}");
        }
    }

    #[test]
    fn replies_with_a_body_or_other_statuses_go_through_as_they_are() {
        // llmlogd's own 400: it has a body.
        let own = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\ndate: x\r\n\r\n{}";
        assert!(rewrite(own).is_none());
        assert!(rewrite(&hyper_head("404 Not Found")).is_none());
        assert!(rewrite(&hyper_head("202 Accepted")).is_none());
        // A head cut short.
        let head = hyper_head("400 Bad Request");
        assert!(rewrite(&head[..head.len() - 2]).is_none());
        // Something after the head (a body, or another reply).
        let mut more = hyper_head("400 Bad Request");
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert!(rewrite(&more).is_none());
    }

    /// Written through a stream that takes a few bytes at a time, hyper is told its own
    /// length once every byte of the rewritten reply is out, and not before.
    #[tokio::test]
    async fn a_rewritten_reply_is_written_whole_through_short_writes() {
        use tokio::io::AsyncWriteExt;
        let (client, server) = tokio::io::duplex(7);
        let mut w = JsonParseErrors::new(server);
        let head = hyper_head("431 Request Header Fields Too Large");
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                .await
                .unwrap();
            got
        });
        let n = std::future::poll_fn(|cx| Pin::new(&mut w).poll_write(cx, &head))
            .await
            .unwrap();
        assert_eq!(n, head.len());
        w.shutdown().await.unwrap();
        drop(w);
        let got = reader.await.unwrap();
        assert_eq!(got, rewrite(&head).unwrap());
        let (_, body) = split(&got);
        assert_eq!(body["error"]["code"], "headers_too_large");
    }
}
