//! NDJSON on the Unix socket: one event per line in, one reply line per event out, in order,
//! each sent once its event is durable.
//!
//! ```text
//! → {"model":"gpt-4o","input":"hi"}
//! ← {"ok":true,"id":"0190…","seq":41}
//! → {"broken"
//! ← {"ok":false,"error":"line 2: the event is not valid JSON: …","code":"invalid_json","status":400}
//! ```
//! A line is one JSON object; blank lines are skipped (no reply) but counted, so "line N" in an
//! error is the client's own line number. `\r\n` endings are fine.
//!
//! Bounds, so that a client can only ever slow itself down:
//! - a line over `max_line_bytes` (not counting its line ending) is refused with one error
//!   reply, the rest of it is skipped, and the connection goes on with the next line;
//! - at most `MAX_PIPELINE` events, and at most `max(max_line_bytes, 1 MiB)` bytes of them,
//!   wait for their ack per connection; past that, reading pauses until acks are written. A
//!   client that never reads its replies therefore stops being read, and once it has not taken
//!   a reply for `body_timeout` the connection is closed (`server::WriteStall`);
//! - a line must be complete `body_timeout` after its first byte arrived, however it trickles
//!   in; otherwise the client gets a `line_timeout` error and the connection is closed;
//! - a connection with nothing to do for `idle_timeout` is closed.
//!
//! A fragment without its newline when the input ends, times out, or the daemon stops is
//! never stored; at end of input or timeout the client gets an error reply for it.
//!
//! Order: a connection's events are stored in the order of its lines. Three parts run in the
//! connection's task: the reader parses lines; the admitter hands everything read so far to
//! the queue as one append, waits for it to be durable, then takes the next lot (group commit
//! per connection: one append in flight per connection, so a pipelining client cannot crowd
//! the queue's writer for the others); the writer sends the replies in line order.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::native_event;
use super::{Ingest, IngestError};
use crate::event::NewEvent;

/// Events read but not yet answered, per connection.
const MAX_PIPELINE: usize = 1024;
/// The floor of the per-connection byte budget for events awaiting their ack (the budget is
/// the larger of this and `max_line_bytes`, so one line of any allowed size always fits).
const MIN_PIPELINE_BYTES: usize = 1 << 20;
/// How much the read buffer grows by per read.
const READ_CHUNK: usize = 16 * 1024;

/// A `sched_yield` that took longer than this means the CPU was contended (a busy host, or an
/// app that computes on after its `write`): stop yielding for `YIELD_PAUSE`. A pause of 1 s
/// left a whole second of an app's calls unprotected after one stray slow yield on a quiet
/// host (fire-and-forget p99 75-78 µs in some runs instead of 32-38); a threshold of 1 ms
/// kept yielding under heavy load, where it costs throughput (BENCHMARKS.md F44).
const YIELD_SLOW: std::time::Duration = std::time::Duration::from_micros(200);
const YIELD_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Right after a read, give the CPU back to whoever was running on it. An app's `write` to the
/// socket wakes this worker, and the kernel often runs it on the app's own CPU at once,
/// preempting the app in the middle of its `write` for the time it takes to parse the line and
/// hand it to the queue (~70 µs; measured with `perf sched` while the other CPU sat idle:
/// BENCHMARKS.md F44). Yielding lets the app's call return first; when nothing else wants the
/// CPU, the yield returns at once. On a contended CPU a yield can cost a whole time slice, so
/// one that takes longer than `YIELD_SLOW` turns yielding off on this thread for
/// `YIELD_PAUSE`: a busy host pays at most one slow yield per worker per 100 ms.
fn yield_to_the_app() {
    thread_local! {
        static GATE: std::cell::Cell<YieldGate> = const { std::cell::Cell::new(YieldGate::OPEN) };
    }
    let now = std::time::Instant::now();
    let mut gate = GATE.get();
    if !gate.open(now) {
        return;
    }
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
    gate.yielded(now, now.elapsed());
    GATE.set(gate);
}

/// When a worker thread may yield: always, except for `YIELD_PAUSE` after a slow yield.
#[derive(Debug, Clone, Copy, PartialEq)]
struct YieldGate {
    paused_until: Option<std::time::Instant>,
}

impl YieldGate {
    const OPEN: YieldGate = YieldGate { paused_until: None };

    fn open(&self, now: std::time::Instant) -> bool {
        self.paused_until.is_none_or(|until| now >= until)
    }

    /// Records a yield that started at `at` and took `took`.
    fn yielded(&mut self, at: std::time::Instant, took: std::time::Duration) {
        self.paused_until = (took > YIELD_SLOW).then(|| at + took + YIELD_PAUSE);
    }
}

#[derive(Debug, Clone)]
pub struct NdjsonLimits {
    pub max_line: usize,
    pub line_timeout: Duration,
    pub idle_timeout: Duration,
}

/// An event read and waiting for the admitter; the permit holds its share of the byte budget.
struct Admit {
    event: NewEvent,
    done: oneshot::Sender<String>,
    /// Released once the event's append is over.
    permit: OwnedSemaphorePermit,
}

enum Reply {
    Now(String),
    Later(oneshot::Receiver<String>),
}

/// Serves one NDJSON connection until the client is done, misbehaves past a bound, or `stop`.
pub async fn serve<S>(stream: S, ingest: Arc<Ingest>, limits: NdjsonLimits, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(MAX_PIPELINE);
    let (admit_tx, admit_rx) = mpsc::channel::<Admit>(MAX_PIPELINE);
    let work = async {
        tokio::join!(
            read_lines(rd, reply_tx, admit_tx, &ingest, limits, stop),
            admit_in_order(admit_rx, &ingest),
        )
    };
    let writer = write_replies(wr, reply_rx);
    tokio::pin!(work, writer);
    tokio::select! {
        // Input over (end, timeout, stop, bound) and all of it admitted: answer, then close.
        _ = &mut work => (&mut writer).await,
        // Replies cannot be written (client gone, or not reading): drop the rest.
        _ = &mut writer => {}
    }
}

/// Admits what the reader sends, in order, as few appends as possible: each takes everything
/// waiting. Ends when the reader is done and everything is admitted.
async fn admit_in_order(mut rx: mpsc::Receiver<Admit>, ingest: &Ingest) {
    let mut lot: Vec<Admit> = Vec::new();
    while let Some(first) = rx.recv().await {
        lot.push(first);
        while let Ok(more) = rx.try_recv() {
            lot.push(more);
        }
        let (events, waiting): (Vec<NewEvent>, Vec<_>) =
            lot.drain(..).map(|a| (a.event, (a.done, a.permit))).unzip();
        let result = ingest.admit("ndjson", events).await;
        for (i, (done, _permit)) in waiting.into_iter().enumerate() {
            let line = match result.as_ref().map(|ids| ids.get(i)) {
                Ok(Some(a)) => ack_line(a),
                Ok(None) => error_line(&IngestError::new(
                    500,
                    "internal",
                    "the queue did not confirm this event",
                )),
                Err(e) => error_line(e),
            };
            let _ = done.send(line);
        }
    }
}

/// Writes replies in line order, each once its event is durable; ends when the reader is done
/// and every reply is out, or when a write fails.
async fn write_replies<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Reply>) {
    let mut out = Vec::with_capacity(256);
    while let Some(reply) = rx.recv().await {
        let line = match reply {
            Reply::Now(line) => line,
            // The admitter always answers unless the connection is being torn down.
            Reply::Later(r) => r.await.unwrap_or_else(|_| {
                error_line(&IngestError::new(
                    503,
                    "unavailable",
                    "not confirmed: the connection is closing",
                ))
            }),
        };
        out.clear();
        out.extend_from_slice(line.as_bytes());
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
}

/// Reads lines and queues one reply per event line; returns when the input ends, a bound is
/// hit, `stop` is cancelled, or the writer is gone. Dropping `tx` on return lets the writer
/// finish.
async fn read_lines<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::Sender<Reply>,
    admit: mpsc::Sender<Admit>,
    ingest: &Ingest,
    limits: NdjsonLimits,
    stop: CancellationToken,
) {
    let budget_bytes = limits.max_line.max(MIN_PIPELINE_BYTES);
    let budget = Arc::new(Semaphore::new(budget_bytes));
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Bytes at the front of `buf` already known to hold no newline.
    let mut scanned = 0usize;
    // Lines completed so far; the one being read is `line_no + 1`.
    let mut line_no = 0u64;
    // Discarding the rest of an over-long line (already answered).
    let mut skipping = false;
    // When the line being read must be complete (set at its first byte).
    let mut line_deadline: Option<Instant> = None;

    // Queues a reply; false when the connection is over (writer gone, or stop).
    macro_rules! reply {
        ($r:expr) => {{
            let r = $r;
            tokio::select! {
                sent = tx.send(r) => sent.is_ok(),
                _ = stop.cancelled() => false,
            }
        }};
    }
    let refuse = |e: IngestError| {
        ingest.refused("ndjson", &e);
        Reply::Now(error_line(&e))
    };

    loop {
        // Every complete line already buffered.
        while let Some(i) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let line = buf.split_to(scanned + i + 1).freeze();
            scanned = 0;
            line_deadline = None;
            line_no += 1;
            if std::mem::take(&mut skipping) {
                continue;
            }
            // The daemon is stopping: lines not yet taken get no reply, so are not acked.
            if stop.is_cancelled() {
                return;
            }
            let content = strip_line_ending(&line);
            if content.len() > limits.max_line {
                if !reply!(refuse(too_long(line_no, limits.max_line))) {
                    return;
                }
                continue;
            }
            let body = line.slice_ref(content.trim_ascii());
            if body.is_empty() {
                continue;
            }
            let event = match parse_line(body.clone(), line_no) {
                Ok(ev) => ev,
                Err(e) => {
                    if !reply!(refuse(e)) {
                        return;
                    }
                    continue;
                }
            };
            // Within the byte budget: wait for earlier events' acks if need be.
            let want = body.len().clamp(1, budget_bytes) as u32;
            let permit: OwnedSemaphorePermit = tokio::select! {
                p = budget.clone().acquire_many_owned(want) => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let (done, later) = oneshot::channel();
            let queued = tokio::select! {
                sent = admit.send(Admit { event, done, permit }) => sent.is_ok(),
                _ = stop.cancelled() => false,
            };
            if !queued || !reply!(Reply::Later(later)) {
                return;
            }
        }
        scanned = buf.len();

        if skipping {
            buf.clear();
            scanned = 0;
        } else if buf.len() > limits.max_line + 1 {
            // Over-long before its end arrived (one byte of slack for a `\r`): refuse it now,
            // once, and skip the rest of it.
            if !reply!(refuse(too_long(line_no + 1, limits.max_line))) {
                return;
            }
            buf.clear();
            scanned = 0;
            skipping = true;
        }

        let now = Instant::now();
        let partial = !buf.is_empty() || skipping;
        let until = if partial {
            *line_deadline.get_or_insert(now + limits.line_timeout)
        } else {
            now + limits.idle_timeout
        };
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(until, rd.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(n)) if n > 0 => yield_to_the_app(),
            Ok(Ok(_)) => {
                // End of input.
                if partial && !skipping {
                    let e = IngestError::new(
                        400,
                        "incomplete_line",
                        format!(
                            "line {} has no newline before the end of input; it was not stored",
                            line_no + 1
                        ),
                    );
                    reply!(refuse(e));
                }
                return;
            }
            Ok(Err(_)) => return,
            Err(_) => {
                // Timed out: a line not completed in time, or an idle connection.
                if partial && !skipping {
                    let e = IngestError::new(
                        408,
                        "line_timeout",
                        format!(
                            "line {} did not complete within {:?} (server.body_timeout); it was not stored",
                            line_no + 1,
                            limits.line_timeout
                        ),
                    );
                    reply!(refuse(e));
                }
                return;
            }
        }
    }
}

/// The line without its `\n` and an optional `\r` before it.
fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn too_long(line_no: u64, max: usize) -> IngestError {
    IngestError::new(
        413,
        "too_large",
        format!("line {line_no} exceeds {max} bytes (server.max_line_bytes); it was not stored"),
    )
}

/// One line → one native event: a JSON object, as the HTTP route takes it.
fn parse_line(body: Bytes, line_no: u64) -> Result<NewEvent, IngestError> {
    let at_line = |mut e: IngestError| {
        e.message = format!("line {line_no}: {}", e.message);
        e
    };
    if body.first() != Some(&b'{') {
        return Err(at_line(IngestError::new(
            400,
            "invalid_json",
            "the event must be a JSON object (one per line)",
        )));
    }
    native_event(body).map_err(at_line)
}

/// The reply line of a stored event, `{"ok":true,"id":"…","seq":N}`, written directly (an id
/// and a number need no escaping).
fn ack_line(a: &crate::queue::Appended) -> String {
    format!(
        r#"{{"ok":true,"id":"{}","seq":{}}}"#,
        a.id.hyphenated(),
        a.seq
    )
}

fn error_line(e: &IngestError) -> String {
    let mut v = json!({"ok": false, "error": e.message, "code": e.code, "status": e.status});
    if !e.fields.is_empty() {
        v["fields"] = json!(e.fields);
    }
    if let Some(s) = e.retry_after {
        v["retry_after"] = json!(s);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ack_line_is_what_serde_json_writes() {
        let a = crate::queue::Appended {
            seq: 18_446_744_073_709_551_615,
            id: uuid::Uuid::from_u128(0x0190_a0b0_c0d0_7e0f_8a1b_2c3d_4e5f_6071),
        };
        let want = json!({"ok": true, "id": a.id.to_string(), "seq": a.seq}).to_string();
        assert_eq!(ack_line(&a), want);
    }

    #[test]
    fn a_slow_yield_pauses_yielding_and_a_fast_one_does_not() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut gate = YieldGate::OPEN;
        assert!(gate.open(t0));
        gate.yielded(t0, std::time::Duration::from_micros(20));
        assert!(gate.open(t0 + ms(1)), "a fast yield keeps yielding on");
        gate.yielded(t0 + ms(1), ms(3));
        assert!(!gate.open(t0 + ms(4)));
        assert!(
            !gate.open(t0 + ms(103)),
            "paused for YIELD_PAUSE after the slow yield ended"
        );
        assert!(gate.open(t0 + ms(104)));
        gate.yielded(t0 + ms(104), std::time::Duration::from_micros(5));
        assert_eq!(
            gate,
            YieldGate::OPEN,
            "a fast yield after the pause clears it"
        );
    }

    #[test]
    fn line_endings() {
        assert_eq!(strip_line_ending(b"{}\r\n"), b"{}");
        assert_eq!(strip_line_ending(b"{}\n"), b"{}");
        assert_eq!(strip_line_ending(b"{}"), b"{}");
        assert_eq!(strip_line_ending(b"{}\r\r\n"), b"{}\r");
    }

    #[test]
    fn a_line_is_one_object() {
        for (line, needle) in [
            (
                &b"[{\"a\":1}]"[..],
                "line 3: the event must be a JSON object",
            ),
            (b"\"s\"", "must be a JSON object"),
            (b"{\"a\":", "line 3: the event is not valid JSON"),
            (b"{\"a\":1} x", "trailing"),
        ] {
            let e = parse_line(Bytes::copy_from_slice(line), 3).unwrap_err();
            assert!(
                e.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(line),
                e.message
            );
            assert_eq!(e.code, "invalid_json");
        }
        assert!(parse_line(Bytes::from_static(b"{\"a\":1}"), 1).is_ok());
    }
}
