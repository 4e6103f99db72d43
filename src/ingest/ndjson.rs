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
//! error is the client's own line number. `\r\n` endings are fine, and so is a UTF-8 byte
//! order mark at the start of a line (skipped; the stored event is the object alone).
//!
//! Bounds, so that a client can only ever slow itself down:
//! - a line over `max_line_bytes` (not counting its line ending) is refused with one error
//!   reply, the rest of it is skipped, and the connection goes on with the next line;
//! - at most `MAX_PIPELINE` events, and at most `PIPELINE_BYTES` (1 MiB) of them, wait for
//!   their ack per connection (the line that crosses the byte budget is the last one taken, so
//!   one line of any allowed size always fits); past that, reading pauses until acks are
//!   written. A client that never reads its replies therefore stops being read, and once it
//!   has not taken a reply for `body_timeout` the connection is closed (`server::WriteStall`);
//! - a line must be complete `body_timeout` after its first byte arrived, however it trickles
//!   in; otherwise the client gets a `line_timeout` error and the connection is closed;
//! - a line still arriving may take `LINE_FREE_BYTES` of memory; beyond that, its bytes are
//!   taken from the memory budget HTTP request bodies share (`http::body_budget`) before they
//!   are read, and given back once the line is complete. So 1,000 connections each holding
//!   a half-sent long line cannot take 1,000 × `max_line_bytes` of memory: once the budget is
//!   spent, their lines wait (and time out); short lines never need it, so they go on;
//! - a complete line longer than `LINE_FREE_BYTES` keeps its share of that budget (what it
//!   took while arriving) until its reply is written; if the connection goes away first, until
//!   the queue is done with it. The per-connection byte budget is fixed, not `max_line_bytes`:
//!   with 16 MiB lines allowed, 1,024 connections each holding one complete line waiting for
//!   its ack could otherwise hold 16 GiB outside any budget. A connection never waits for
//!   budget it holds itself: what it holds for complete lines is given back by their acks,
//!   which need no budget, and the budget has room for a quarter of it per connection
//!   (`http::CONNECTION_SHARES`), so a line of the largest size always gets through once
//!   other connections' lines are answered or time out;
//! - a connection with nothing to do for `idle_timeout` is closed.
//!
//! A fragment without its newline when the input ends, times out, or the daemon stops is
//! never stored; at end of input or timeout the client gets an error reply for it.
//!
//! Order: a connection's events are stored in the order of its lines. One loop in the
//! connection's task reads and parses lines, keeps one append in flight (everything read while
//! it was in flight goes to the queue as the next append: group commit per connection, so a
//! pipelining client cannot crowd the queue's writer for the others), and writes the replies
//! in line order, each as soon as it and every one before it are ready.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::native_event;
use super::{Ingest, IngestError};
use crate::event::NewEvent;

/// Events read but not yet answered, per connection.
const MAX_PIPELINE: usize = 1024;
/// The per-connection byte budget for events awaiting their ack: reading pauses once this
/// much is unanswered (the line that crosses it is still taken, so one line of any allowed
/// size always fits). Fixed, whatever `max_line_bytes` is: lines longer than
/// `LINE_FREE_BYTES` are held within the shared body budget instead (see the module doc).
const PIPELINE_BYTES: usize = 1 << 20;
/// A UTF-8 byte order mark, skipped at the start of a line.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// How far the idle deadline may move on before its timer is re-armed.
const TIMER_SLACK: Duration = Duration::from_millis(250);
/// How much the read buffer grows by per read.
const READ_CHUNK: usize = 16 * 1024;
/// What a connection's read buffer may hold without taking from the shared body budget: a
/// line of up to about `READ_CHUNK` bytes (nearly every event) never touches the budget.
const LINE_FREE_BYTES: usize = 2 * READ_CHUNK;

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
    /// The memory budget shared with HTTP request bodies (`http::body_budget`).
    pub body_budget: Arc<Semaphore>,
    /// Slots for lines growing past `LINE_FREE_BYTES` (`http::long_line_slots`): a line takes
    /// one before its first share of `body_budget` and keeps it until it is complete.
    pub long_lines: Arc<Semaphore>,
}

/// The part of the shared body budget a connection holds for the line it is reading.
///
/// A line that is still arriving holds its share and waits for more, so lines could hold the
/// whole budget between them, each waiting for the others, until they all timed out (twelve
/// 2 MiB lines on an 8 MiB budget stopped at ~680 KiB each). So only `long_lines` slots of
/// lines grow at once: their largest sizes add up to at most the budget less one largest
/// body or line (`http::long_line_slots`), so they and a waiting HTTP body always fit.
/// Everything else that holds budget (complete lines waiting for their ack, bodies being
/// read or stored) gives it back without taking more.
struct BudgetHold {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    long_lines: Arc<Semaphore>,
    slot: Option<OwnedSemaphorePermit>,
}

impl BudgetHold {
    fn held(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// What a read buffer holding `buffered` bytes must hold before the next read (which adds
    /// at most `READ_CHUNK`).
    fn needed(buffered: usize) -> usize {
        (buffered + READ_CHUNK).saturating_sub(LINE_FREE_BYTES)
    }

    /// Waits for what `needed` asks beyond what is held (the caller polls it only then).
    async fn grow(&mut self, needed: usize) -> Result<(), tokio::sync::AcquireError> {
        if self.slot.is_none() {
            self.slot = Some(self.long_lines.clone().acquire_owned().await?);
        }
        let more = needed.saturating_sub(self.held());
        let p = self
            .budget
            .clone()
            .acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
            .await?;
        match &mut self.permit {
            Some(held) => held.merge(p),
            None => self.permit = Some(p),
        }
        Ok(())
    }

    /// Splits off up to `n` of what is held: the share a line just completed keeps until its
    /// reply is written. What a read buffer holds never exceeds `LINE_FREE_BYTES` plus what
    /// is held (see `serve`), so a line of `LINE_FREE_BYTES + n` bytes finds all of `n` here.
    fn take(&mut self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = n.min(self.held());
        if n == 0 {
            None
        } else if n == self.held() {
            self.permit.take()
        } else {
            self.permit.as_mut().and_then(|p| p.split(n))
        }
    }

    /// Gives back what is held beyond `needed`.
    fn shrink_to(&mut self, needed: usize) {
        let held = self.held();
        if needed == 0 {
            self.permit = None;
            self.slot = None;
        } else if held > needed {
            drop(self.permit.as_mut().and_then(|p| p.split(held - needed)));
        }
    }
}

/// Replies in line order: `None` until the event's append is over.
struct Replies {
    slots: VecDeque<Option<String>>,
    /// The line-order number of `slots[0]`.
    base: u64,
}

impl Replies {
    fn push(&mut self, reply: Option<String>) -> u64 {
        self.slots.push_back(reply);
        self.base + self.slots.len() as u64 - 1
    }

    fn fill(&mut self, slot: u64, line: String) {
        if let Some(s) = self.slots.get_mut((slot - self.base) as usize) {
            *s = Some(line);
        }
    }

    /// Moves the replies that are ready, up to the first one that is not, into `out`.
    fn take_ready(&mut self, out: &mut Vec<u8>) {
        while let Some(Some(_)) = self.slots.front() {
            if let Some(Some(line)) = self.slots.pop_front() {
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
            self.base += 1;
        }
    }
}

/// Events read and not yet handed to the queue, with their reply slots and the share of the
/// body budget their long lines hold.
#[derive(Default)]
struct Lot {
    events: Vec<NewEvent>,
    slots: Vec<u64>,
    hold: Option<OwnedSemaphorePermit>,
}

/// Adds `more` to what `held` holds of the body budget.
fn merge(held: &mut Option<OwnedSemaphorePermit>, more: Option<OwnedSemaphorePermit>) {
    match (held.as_mut(), more) {
        (Some(h), Some(m)) => h.merge(m),
        (None, m) => *held = m,
        (_, None) => {}
    }
}

/// What an append gives back: the queue's answer, and the budget its lines held (kept until
/// their replies are written).
type AppendDone = (
    Result<Vec<crate::queue::Appended>, IngestError>,
    Option<OwnedSemaphorePermit>,
);

/// Stores `events`. With lines that hold part of the body budget, the append runs as its own
/// task that keeps that share until the queue is done with them: were the connection to go
/// away first (its task dropped), the lines would still sit in the writer's channel, and a
/// client that sends a long line and hangs up, again and again, would have filled memory
/// while the budget read empty. Appends of short lines only (nearly all) run in place.
async fn append_holding(
    ingest: Arc<Ingest>,
    events: Vec<NewEvent>,
    hold: Option<OwnedSemaphorePermit>,
) -> AppendDone {
    let Some(hold) = hold else {
        return (ingest.admit("ndjson", events).await, None);
    };
    let task = tokio::spawn(async move { (ingest.admit("ndjson", events).await, Some(hold)) });
    task.await.unwrap_or_else(|_| {
        let e = IngestError::new(500, "internal", "the append did not finish");
        (Err(e), None)
    })
}

/// Serves one NDJSON connection until the client is done, misbehaves past a bound, or `stop`.
///
/// One task and one loop: it reads and parses lines, keeps one append in flight (everything
/// read while it was in flight goes in the next one), and writes each reply as soon as it and
/// every reply before it are ready. Before, three parts of this task passed each line through
/// two channels, a semaphore permit and a oneshot; one loop took the CPU per event at 64
/// one-event-in-flight clients from 26-31 to 23-24 µs in alternating runs (BENCHMARKS.md F50).
pub async fn serve<S>(
    mut stream: S,
    ingest: Arc<Ingest>,
    limits: NdjsonLimits,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // The shared body budget this connection holds for what `buf` holds beyond
    // `LINE_FREE_BYTES` (see the module doc).
    let mut hold = BudgetHold {
        budget: limits.body_budget.clone(),
        permit: None,
        long_lines: limits.long_lines.clone(),
        slot: None,
    };
    // Bytes at the front of `buf` already known to hold no newline.
    let mut scanned = 0usize;
    // Lines completed so far; the one being read is `line_no + 1`.
    let mut line_no = 0u64;
    // Discarding the rest of an over-long line (already answered).
    let mut skipping = false;
    // When the line being read must be complete (set at its first byte).
    let mut line_deadline: Option<Instant> = None;
    // No more input: end, timeout, stop, or a read error.
    let mut input_over = false;
    let mut replies = Replies {
        slots: VecDeque::new(),
        base: 0,
    };
    let mut waiting = Lot::default();
    // Bytes of the events read and not yet answered (the per-connection budget). Every such
    // event holds a reply slot, so the slots bound their number.
    let mut unanswered_bytes = 0usize;
    let has_room = |bytes: usize, slots: usize| bytes < PIPELINE_BYTES && slots < MAX_PIPELINE;
    let mut in_flight_bytes = 0usize;
    let mut in_flight_slots: Vec<u64> = Vec::new();
    // The budget held by lines whose replies are ready, until they are written.
    let mut answered_hold: Option<OwnedSemaphorePermit> = None;
    let admit = |events: Vec<NewEvent>, hold| append_holding(Arc::clone(&ingest), events, hold);
    let mut append = std::pin::pin!(if false {
        Some(admit(Vec::new(), None))
    } else {
        None
    });
    let mut out = Vec::with_capacity(256);
    let mut stopped = std::pin::pin!(stop.cancelled());
    // The line or idle deadline. Reset only when it moves by more than `TIMER_SLACK` (the idle
    // deadline moves on with every read), so a read does not re-arm a timer each time.
    let mut timer = std::pin::pin!(tokio::time::sleep(limits.idle_timeout));
    let refuse = |e: IngestError| {
        ingest.refused("ndjson", &e);
        Some(error_line(&e))
    };

    // Set by a read: the lines it brought are parsed in the task's next poll (see below).
    let mut just_read = false;
    loop {
        // After `yield_to_the_app`, the lines are parsed and queued in a later poll of this
        // task, which tokio offers to the other worker: when the app's `write` woke this worker
        // on the app's CPU, that work then runs on the other CPU while the app gets its own
        // back. Parsing straight after the read kept the reader on the app's CPU, read after
        // read (the kernel wakes a thread where it last ran): fire-and-forget p99 went from
        // 38-42 to 67-170 µs (BENCHMARKS.md F50).
        if std::mem::take(&mut just_read) {
            tokio::task::yield_now().await;
        }
        // Every complete line already buffered, within the budget.
        let mut took_long = false;
        while has_room(unanswered_bytes, replies.slots.len()) {
            let Some(i) = memchr::memchr(b'\n', &buf[scanned..]) else {
                scanned = buf.len();
                break;
            };
            // Copied out, not split off: the event owns exactly its line, and `buf` stays one
            // allocation the next read reuses. Split-off lines kept each read's whole buffer
            // alive until their append was over, and every read took a new one: peak RSS in
            // the pipelined ingest cells 49-53 MiB, copied 38-41 (BENCHMARKS.md F55).
            let end = scanned + i + 1;
            let line = Bytes::copy_from_slice(&buf[..end]);
            bytes::Buf::advance(&mut buf, end);
            // A long line keeps the share of the budget it took while arriving (given back
            // when it is refused, skipped or answered), and the buffer that held it is
            // replaced below, so its allocation is not kept outside the budget.
            let line_hold = hold.take(end.saturating_sub(LINE_FREE_BYTES));
            took_long |= end > LINE_FREE_BYTES;
            scanned = 0;
            line_deadline = None;
            line_no += 1;
            if std::mem::take(&mut skipping) {
                continue;
            }
            // The daemon is stopping: lines not yet taken get no reply, so are not acked.
            if stop.is_cancelled() {
                input_over = true;
                buf.clear();
                break;
            }
            let content = strip_line_ending(&line);
            if content.len() > limits.max_line {
                replies.push(refuse(too_long(line_no, limits.max_line)));
                continue;
            }
            // A UTF-8 byte order mark (the first line a Windows tool writes) marks the
            // encoding and is no part of the event: RFC 8259 lets a parser ignore it, and
            // the payload stored is the JSON object alone.
            let content = content.strip_prefix(UTF8_BOM).unwrap_or(content);
            let body = line.slice_ref(content.trim_ascii());
            if body.is_empty() {
                continue;
            }
            let size = body.len();
            // A line no sink could ever send is refused on its own; the lines around it go
            // on to one append together.
            let parsed = parse_line(body, line_no).and_then(|event| {
                ingest.deliverable(event).map_err(|mut e| {
                    e.message = format!("line {line_no}: {}", e.message);
                    e
                })
            });
            match parsed {
                Ok(event) => {
                    waiting.slots.push(replies.push(None));
                    waiting.events.push(event);
                    merge(&mut waiting.hold, line_hold);
                    unanswered_bytes += size;
                }
                Err(e) => {
                    replies.push(refuse(e));
                }
            }
        }
        // `scanned == buf.len()`: what is buffered is one line without its end (the loop above
        // may also stop at the budget with complete lines still waiting).
        if !input_over && !skipping && scanned == buf.len() && buf.len() > limits.max_line + 1 {
            // Over-long before its end arrived (one byte of slack for a `\r`): refuse it now,
            // once, and skip the rest of it.
            replies.push(refuse(too_long(line_no + 1, limits.max_line)));
            skipping = true;
        }
        if skipping {
            buf.clear();
            scanned = 0;
        }
        // A long line (taken or skipped) grew the buffer; what is left moves to a small one.
        if (took_long || skipping) && buf.capacity() > LINE_FREE_BYTES {
            let mut small = BytesMut::with_capacity(READ_CHUNK.max(buf.len()));
            small.extend_from_slice(&buf);
            buf = small;
        }
        // Lines taken (or skipped) give their bytes of the budget back.
        let needed = BudgetHold::needed(buf.len());
        hold.shrink_to(needed);

        // One append in flight: everything read while the last one was takes the next.
        if append.is_none() && !waiting.events.is_empty() {
            let lot = std::mem::take(&mut waiting);
            in_flight_slots = lot.slots;
            in_flight_bytes = unanswered_bytes;
            append.set(Some(admit(lot.events, lot.hold)));
        }

        out.clear();
        replies.take_ready(&mut out);
        if !out.is_empty()
            && (stream.write_all(&out).await.is_err() || stream.flush().await.is_err())
        {
            // The client is gone or stopped reading: what is left cannot be answered.
            return;
        }
        // Their replies are written (an append's replies are all ready once it is over, and
        // so are all before them: appends go one at a time, refusals are answered at once).
        drop(answered_hold.take());
        // Complete lines left in the buffer when the budget ran out: take them now that the
        // replies above made room, before waiting on the client or closing.
        if scanned < buf.len() && has_room(unanswered_bytes, replies.slots.len()) {
            continue;
        }
        if input_over && append.is_none() && waiting.events.is_empty() {
            let _ = stream.shutdown().await;
            return;
        }

        let can_read = !input_over && has_room(unanswered_bytes, replies.slots.len());
        let partial = !buf.is_empty() || skipping;
        let until = if partial {
            *line_deadline.get_or_insert_with(|| Instant::now() + limits.line_timeout)
        } else {
            Instant::now() + limits.idle_timeout
        };
        let armed = timer.deadline();
        if until < armed || until > armed + TIMER_SLACK {
            timer.as_mut().reset(until);
        }
        if can_read {
            buf.reserve(READ_CHUNK);
        }
        // Past `LINE_FREE_BYTES`, a read waits for its share of the budget, then adds at most
        // `READ_CHUNK` (what the share covers).
        let funded = hold.held() >= needed;
        let room = (LINE_FREE_BYTES + hold.held()).saturating_sub(buf.len());
        tokio::select! {
            biased;
            (result, held) = async { append.as_mut().as_pin_mut().expect("in flight").await },
                if append.is_some() =>
            {
                append.set(None);
                merge(&mut answered_hold, held);
                for (i, slot) in std::mem::take(&mut in_flight_slots).into_iter().enumerate() {
                    let line = match result.as_ref().map(|ids| ids.get(i)) {
                        Ok(Some(a)) => ack_line(a),
                        Ok(None) => error_line(&IngestError::new(
                            500,
                            "internal",
                            "the queue did not confirm this event",
                        )),
                        Err(e) => error_line(e),
                    };
                    replies.fill(slot, line);
                }
                unanswered_bytes -= in_flight_bytes;
                in_flight_bytes = 0;
            }
            _ = &mut stopped, if !input_over => input_over = true,
            granted = hold.grow(needed), if can_read && !funded => {
                if granted.is_err() {
                    return;
                }
            }
            // At most what keeps the buffer within `LINE_FREE_BYTES` plus what is held (at
            // least `READ_CHUNK`, see `BudgetHold::needed`), so a line taken from it finds
            // its whole share in `hold` (`BudgetHold::take`).
            read = async { stream.read_buf(&mut (&mut buf).limit(room)).await }, if can_read && funded => match read {
                Ok(n) if n > 0 => {
                    yield_to_the_app();
                    just_read = true;
                }
                Ok(_) => {
                    // End of input.
                    input_over = true;
                    if partial && !skipping {
                        replies.push(refuse(IngestError::new(
                            400,
                            "incomplete_line",
                            format!(
                                "line {} has no newline before the end of input; it was not stored",
                                line_no + 1
                            ),
                        )));
                    }
                }
                Err(_) => return,
            },
            _ = &mut timer, if can_read => {
                // Early by at most `TIMER_SLACK` (see above): the loop re-arms it.
                if Instant::now() >= until {
                    // Timed out: a line not completed in time, or an idle connection.
                    input_over = true;
                    if partial && !skipping {
                        replies.push(refuse(IngestError::new(
                            408,
                            "line_timeout",
                            format!(
                                "line {} did not complete within {:?} (server.body_timeout); it was not stored",
                                line_no + 1,
                                limits.line_timeout
                            ),
                        )));
                    }
                } else {
                    timer.as_mut().reset(until);
                }
            }
            // Unreachable: with nothing to read, something is always in flight.
            else => return,
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
    fn replies_go_out_in_line_order_once_each_and_all_before_it_are_ready() {
        let mut r = Replies {
            slots: VecDeque::new(),
            base: 0,
        };
        let a = r.push(None);
        r.push(Some("refused 2".into()));
        let c = r.push(None);
        let mut out = Vec::new();
        r.take_ready(&mut out);
        assert!(out.is_empty(), "line 1 is not answered yet");
        r.fill(c, "ack 3".into());
        r.take_ready(&mut out);
        assert!(out.is_empty(), "line 3 waits for line 1");
        r.fill(a, "ack 1".into());
        r.take_ready(&mut out);
        assert_eq!(out, b"ack 1\nrefused 2\nack 3\n");
        let d = r.push(None);
        assert_eq!(d, 3, "slot numbers go on after the taken ones");
        r.fill(d, "ack 4".into());
        out.clear();
        r.take_ready(&mut out);
        assert_eq!(out, b"ack 4\n");
        assert!(r.slots.is_empty());
    }

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

    /// Many connections each send a long line while the queue holds its acks back: the
    /// complete lines waiting for their ack stay within the shared body budget (those beyond
    /// it wait, half read), and once the acks come every line is stored and answered, and
    /// the budget is whole again. Before, a complete line gave its share back at once and
    /// each connection could hold `max(max_line_bytes, 1 MiB)` of lines waiting for acks:
    /// all twelve 2 MiB lines were taken into memory with the budget untouched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_lines_waiting_for_their_ack_hold_the_body_budget() {
        const BUDGET: usize = 8 << 20;
        const LINE: usize = 2 << 20;
        const CONNECTIONS: usize = 12;
        let dir = tempfile::tempdir().unwrap();
        let ingest = super::super::test_ingest(dir.path());
        let budget = Arc::new(Semaphore::new(BUDGET));
        let limits = NdjsonLimits {
            max_line: 4 << 20,
            line_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            body_budget: budget.clone(),
            long_lines: Arc::new(Semaphore::new(super::super::http::long_line_slots(
                4 << 20,
                4 << 20,
                BUDGET,
            ))),
        };
        let held = ingest.queue.hold_writes();
        let stop = CancellationToken::new();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut clients = Vec::new();
        for c in 0..CONNECTIONS {
            let (client, server) = tokio::io::duplex(64 << 10);
            tokio::spawn(serve(server, ingest.clone(), limits.clone(), stop.clone()));
            let sent = sent.clone();
            clients.push(tokio::spawn(async move {
                let mut line = format!("{{\"conn\":{c},\"pad\":\"").into_bytes();
                line.resize(LINE - 3, b'x');
                line.extend_from_slice(b"\"}\n");
                let (rd, mut wr) = tokio::io::split(client);
                wr.write_all(&line).await.unwrap();
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reply = String::new();
                let mut rd = tokio::io::BufReader::new(rd);
                tokio::io::AsyncBufReadExt::read_line(&mut rd, &mut reply)
                    .await
                    .unwrap();
                reply
            }));
        }
        // Until the budget is spent (or, before the fix, every line was taken).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
            if budget.available_permits() < READ_CHUNK || sent == CONNECTIONS {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "neither spent nor all taken: {} of the budget left, {sent} lines sent",
                budget.available_permits()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A line the client finished sending is taken but for what the pipe holds (64 KiB).
        let most = BUDGET / (LINE - LINE_FREE_BYTES - (64 << 10));
        let sent_now = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            sent_now <= most,
            "{sent_now} lines of {LINE} bytes taken while their acks were held, beyond a \
             budget of {BUDGET} (room for {most}); {} of it left",
            budget.available_permits()
        );
        drop(held);
        for c in clients {
            let reply = tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "every line is answered once the acks come: {} sent, {} left",
                        sent.load(std::sync::atomic::Ordering::SeqCst),
                        budget.available_permits()
                    )
                })
                .unwrap();
            assert!(reply.contains("\"ok\":true"), "{reply}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while budget.available_permits() != BUDGET {
            assert!(
                std::time::Instant::now() < deadline,
                "the budget was not given back: {} of {BUDGET}",
                budget.available_permits()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
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
