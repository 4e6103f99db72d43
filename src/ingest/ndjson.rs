//! NDJSON on the Unix socket: one event per line in, one reply line per event out, in order,
//! each sent once its event is durable.
//!
//! ```text
//! → {"model":"gpt-4o","input":"hi"}
//! ← {"ok":true,"id":"0190…","seq":41}
//! → {"broken"
//! ← {"ok":false,"error":"line 2 is not valid JSON: …"}
//! ```
//! Bounds: a line longer than `max_line_bytes` is refused (and the rest of it skipped);
//! at most `MAX_PIPELINE` events per connection wait for their ack, after which reading stops
//! until replies are written; a client that never reads its replies therefore stalls only
//! itself. A line must complete within `body_timeout` once started; a connection idle for
//! `idle_timeout` is closed. A fragment without its newline at end of input is never stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::http::native_event;
use super::{Ingest, IngestError};

/// Events read but not yet answered, per connection.
const MAX_PIPELINE: usize = 1024;

#[derive(Debug, Clone)]
pub struct NdjsonLimits {
    pub max_line: usize,
    pub line_timeout: Duration,
    pub idle_timeout: Duration,
}

type Pending = tokio::task::JoinHandle<Result<serde_json::Value, IngestError>>;

pub async fn serve<S>(stream: S, ingest: Arc<Ingest>, limits: NdjsonLimits, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Reply>(MAX_PIPELINE);
    // The writer answers in order; it ends when the reader is done and all replies are out.
    let writer = tokio::spawn(async move {
        let mut out = Vec::with_capacity(256);
        while let Some(reply) = rx.recv().await {
            let v = match reply {
                Reply::Now(v) => v,
                Reply::Later(h) => match h.await {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => error_line(&e),
                    Err(_) => json!({"ok": false, "error": "internal error"}),
                },
            };
            out.clear();
            // Serialising a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, &v);
            out.push(b'\n');
            if wr.write_all(&out).await.is_err() {
                return;
            }
            // Flush only when no reply is ready, so a burst goes out in few writes.
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });

    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut line_no = 0u64;
    let mut skipping = false;
    'read: loop {
        // Take every complete line already buffered.
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(nl + 1).freeze();
            if skipping {
                skipping = false;
                continue;
            }
            line_no += 1;
            let body = line.slice_ref(super::http::trim_ascii(&line));
            if body.is_empty() {
                line_no -= 1;
                continue;
            }
            if tx.send(handle_line(&ingest, body, line_no)).await.is_err() {
                break 'read;
            }
        }
        if buf.len() > limits.max_line {
            // Refuse the over-long line once; drop what we have and skip to its end.
            line_no += 1;
            let e = IngestError::new(
                413,
                "too_large",
                format!(
                    "line {line_no} exceeds {} bytes (server.max_line_bytes)",
                    limits.max_line
                ),
            );
            ingest.refused("ndjson", &e);
            if tx.send(Reply::Now(error_line(&e))).await.is_err() {
                break;
            }
            buf.clear();
            skipping = true;
        }
        let wait = if buf.is_empty() && !skipping {
            limits.idle_timeout
        } else {
            limits.line_timeout
        };
        buf.reserve(16 * 1024);
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(wait, rd.read_buf(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => break,
                Err(_) => {
                    if !buf.is_empty() && !skipping {
                        let e = IngestError::new(408, "line_timeout", format!(
                            "line {} did not complete within {}s; it was not stored",
                            line_no + 1, limits.line_timeout.as_secs()));
                        let _ = tx.send(Reply::Now(error_line(&e))).await;
                    }
                    break;
                }
            },
        };
        if n == 0 {
            if !buf.is_empty() && !skipping {
                let e = IngestError::new(
                    400,
                    "incomplete_line",
                    format!(
                        "line {} has no newline before the end of input; it was not stored",
                        line_no + 1
                    ),
                );
                let _ = tx.send(Reply::Now(error_line(&e))).await;
            }
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

enum Reply {
    Now(serde_json::Value),
    Later(Pending),
}

fn handle_line(ingest: &Arc<Ingest>, body: Bytes, line_no: u64) -> Reply {
    let parsed = super::http::split_native(&body, super::http::Framing::Json)
        .map_err(|mut e| {
            e.message = format!("line {line_no}: {}", e.message);
            e
        })
        .and_then(|mut v| {
            if v.len() != 1 {
                return Err(IngestError::new(
                    400,
                    "invalid_json",
                    format!("line {line_no} must hold one JSON object, not an array"),
                ));
            }
            native_event(v.remove(0))
        });
    match parsed {
        Err(e) => {
            ingest.refused("ndjson", &e);
            Reply::Now(error_line(&e))
        }
        Ok(ev) => {
            let ingest = Arc::clone(ingest);
            Reply::Later(tokio::spawn(async move {
                let ids = ingest.admit("ndjson", vec![ev]).await?;
                Ok(json!({"ok": true, "id": ids[0].id.to_string(), "seq": ids[0].seq}))
            }))
        }
    }
}

fn error_line(e: &IngestError) -> serde_json::Value {
    let mut v = json!({"ok": false, "error": e.message, "code": e.code, "status": e.status});
    if !e.fields.is_empty() {
        v["fields"] = json!(e.fields);
    }
    if let Some(s) = e.retry_after {
        v["retry_after"] = json!(s);
    }
    v
}
