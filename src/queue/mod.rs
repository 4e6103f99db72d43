//! The durable queue: one sled log, a cursor per sink, dead letters.
//!
//! # Layout (sled trees under `<data_dir>/queue`)
//! - `log`: key = sequence number, u64 big-endian (so key order is arrival order) → a pack of
//!   consecutive records ending with that one, or one large record (`record.rs`: small
//!   records are packed ~8 to a value and compressed together; a scan from any `seq` meets
//!   the value holding it first; a pack is removed when every sink is past its last record).
//!   Sequence numbers only grow, across restarts and compactions: the writer persists the
//!   high-water mark in `meta` with every group commit, and on open takes the largest of it,
//!   the last log key + 1 and every cursor.
//! - `chunks`: key = seq (8) + chunk index (u32 BE) → up to `record::CHUNK` bytes of a large
//!   payload. No sled value exceeds ~20 KiB, so no sled page is ever written as an (unsynced)
//!   blob file.
//! - `sinks`: sink name → u16 id. Ids are assigned once and never reused; records name the
//!   sinks they were routed to by id.
//! - `cursors`: sink id (u16 BE) → u64 BE: every record below it is done for that sink
//!   (delivered, dead-lettered, or not routed to it); then, optionally, pairs of u64 BE
//!   `start, end`: ranges above the cursor that are done too (events delivered after one
//!   that still waits for a retry), so a restart does not send them again. Whoever needs only
//!   the cursor reads the first 8 bytes.
//! - `dlq`: key = sink id (u16 BE) + seq (u64 BE) → dead letter (`dlq.rs`), with its own
//!   `dlq_chunks` tree for large payloads.
//! - `remote`: key = sink id + seq → the id the remote service gave the event (PromptLayer's
//!   request id), so follow-ups can refer to it.
//! - `meta`: `next_seq` high-water mark; after a clean stop, the event and byte counts;
//!   `not_before/` + sink id (u16 BE) → wall-clock ms (u64 BE) until which a sink's service
//!   asked it to wait (Retry-After) + a fingerprint (u64 BE) of the endpoint that asked
//!   (`set_not_before`).
//!
//! # What an ack means
//! [`Queue::append`] returns only after the records were inserted and sled's flush had written
//! them *and* `fdatasync`ed its `db` file. The published sled 0.34 ends a flush with
//! `sync_file_range`, which neither persists file metadata nor flushes the drive cache; the
//! vendored copy llmlogd builds with calls `fdatasync` there instead (`vendor/sled/PATCHED.md`),
//! which is what makes an ack survive power loss, in one device round trip per commit. One
//! writer thread does this for everything that arrived while the previous sync ran (group
//! commit), packing and inserting each append as it arrives, above the head (the next
//! sequence number to assign), where readers never look until the sync moves the head past it.
//!
//! # After a crash
//! sled recovers a prefix of its log, which includes every acknowledged append (it was synced).
//! Cursor updates are not synced on their own (they ride on the next group commit or sled's
//! 500 ms flusher), so after a crash a sink may resume a little behind where it was and
//! deliver some events twice: delivery is at-least-once. The prefix may also hold part of a
//! group whose sync never finished: those records were never acknowledged, but they are
//! delivered like the rest (an app that retries such a write makes a duplicate, which the
//! event ids let receivers drop). Records are removed only below the
//! lowest cursor of the configured sinks (`gc`), so nothing acknowledged is removed before
//! every sink is done with it. A record that does not decode is handed to the reader as
//! [`ReadItem::Corrupt`]; delivery dead-letters it and counts it, so it can never wedge a sink.
//!
//! # A damaged store
//! sled cannot tell a damaged file from the torn end of a crash: it drops everything after the
//! first page that fails its checksum. `<data_dir>/queue.mark` (`mark.rs`), a high-water mark
//! kept outside sled, makes such a loss visible: a store that opens short of its mark is
//! reported, and numbering resumes above the mark.

mod dlq;
mod error;
mod fsck;
mod mark;
mod record;
mod store;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};
use tokio::sync::{oneshot, watch};

pub use dlq::{DeadLetter, DeadLetterInfo};
pub use error::QueueError;
pub use fsck::{FsckReport, UNKNOWN_SINK};
pub use mark::{BehindMark, LossRecord};
pub use record::RecordError;

use crate::config::{QueueConfig, WhenFull};
use crate::event::{now_ms, ClientCredentials, NewEvent, StoredEvent};
use record::{Encoded, RecordRef, CHUNK};
use store::Trees;

/// Writes waiting for the writer thread; beyond this ingest answers "busy".
const WRITE_QUEUE_DEPTH: usize = 4096;
/// Upper bound of records in one group commit (keeps one commit's latency bounded).
const MAX_GROUP_RECORDS: usize = 8192;
/// Commit delay: when the last group held at least `DELAY_FROM_GROUP` records (many writers at
/// once), the writer waits for the next group to grow to twice that, for at most half as long
/// as the last sync took and never more than this. A sync costs sled ~250 µs of CPU whatever
/// its size, so on a 2-core machine groups of 10 instead of 40 spent most of the CPU on
/// syncing (measured at 64 clients: ~17 k → ~21 k events/s; delays of a whole sync or more
/// made it slower again, see BENCHMARKS.md). Light traffic (a lone app, or 1,000 events/s from
/// a few connections: groups of 1-3) never waits, so its ack latency is unchanged; from 4 the
/// steady-rate p99 came close to its 2 ms target, hence 8.
const MAX_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(600);
const DELAY_FROM_GROUP: usize = 8;
/// Groups this large already spread the sync's cost thin: no delay.
const DELAY_UNTIL_GROUP: usize = 256;
/// How often (ms) a group commit looks for the store's files before its acks
/// (`store::present`): one `stat` after each sync cost 20-35 µs of CPU per commit on the
/// project's VM, 10-15 % of the one-client ingest cells (BENCHMARKS.md, fourteenth session).
/// So the writes acknowledged in the last 50 ms before the data directory is deleted may be
/// lost with it at the next restart; from then on every append is refused.
const PRESENT_CHECK_MS: u64 = 50;
/// `meta` key of the event and byte counts a clean stop leaves for the next open.
const COUNTS_AT_CLOSE: &str = "counts_at_close";
/// How long the ids follow-ups refer to are kept: a PromptLayer log's id at the service (one
/// entry per log delivered) and the mark of a group created. Without an end these two grew by
/// an entry per log for the life of the store. A follow-up names its log within seconds or
/// minutes in every client seen; one naming an older log is refused (at ingest for an id that
/// is gone, at delivery as a dead letter), saying why.
pub const FOLLOW_UP_IDS_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;
/// Old follow-up ids are looked for at most this often, and at most this many removed a pass.
const FOLLOW_UP_PRUNE_EVERY_MS: u64 = 60_000;
const FOLLOW_UP_PRUNE_MAX: usize = 10_000;
/// `meta` key set once the follow-up ids carry their time (older stores are brought up at open).
const FOLLOW_UP_IDS_TIMED: &str = "follow_up_ids_timed";
/// Compaction is considered at most this often.
const COMPACT_CHECK_EVERY_MS: u64 = 10_000;
/// Compaction runs only when the live data is at most this big (it copies it).
const COMPACT_MAX_LIVE_BYTES: u64 = 64 << 20;
/// Live data this small is copied at once, even while a backlog drains (it costs little).
const COMPACT_SMALL_LIVE_BYTES: u64 = 8 << 20;
/// Space ingest leaves free on the data directory's filesystem: below it, new events are
/// refused as if the disk were full (507). What gives space back needs some itself: moving
/// cursors and removing delivered records are sled writes, reopening the store after a
/// storage error writes a segment, compaction copies what is left. When ingest took the last
/// byte, none of them could run, so a backlog that filled its disk stayed stuck after its
/// sink came back, until an operator freed space elsewhere.
const MIN_FREE_BYTES: u64 = 16 << 20;

/// While the store is unavailable (it could not be opened again after a storage error or a
/// compaction), the writer tries to open it again this often even when no append arrives to
/// make it try: delivery reads from the store, so a backlog whose disk filled up, with its
/// clients refused and quiet, waited for the next append to drain at all.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A record encoded by ingest (off the writer thread), ready to append.
pub struct Prepared {
    enc: Encoded,
    pub id: uuid::Uuid,
}

/// What `append` assigned to each record, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub id: uuid::Uuid,
}

/// One item read for delivery.
#[derive(Debug)]
pub enum ReadItem {
    Event(StoredEvent),
    /// The record at `seq` does not decode; `raw` is its stored value.
    Corrupt {
        seq: u64,
        raw: Bytes,
        error: RecordError,
    },
}

/// What a reader got: items routed to it, and where to read next.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub items: Vec<ReadItem>,
    /// Next sequence number to read; every record below it was scanned.
    pub next: u64,
}

/// Point-in-time queue figures (metrics, status).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct QueueStats {
    pub events: u64,
    pub bytes: u64,
    pub next_seq: u64,
    pub syncs: u64,
    pub evicted: u64,
    pub oldest_ms: Option<u64>,
}

enum WriteOp {
    Append {
        records: Vec<Prepared>,
        reply: Reply,
    },
    /// Copy the live records into a fresh store (see `store.rs`).
    Compact,
    Stop,
}

struct Shared {
    /// The store; `None` only while it is being reopened after a storage error. A write lock
    /// is taken only to swap it (compaction, reopen), so no operation sees two stores.
    trees: RwLock<Option<Trees>>,
    cfg: QueueConfig,
    /// The caps (`max_bytes`, `max_events`, `when_full`), replaced on reload.
    caps: arc_swap::ArcSwap<QueueConfig>,
    events: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    evicted: AtomicU64,
    /// `when_full = "drop_oldest"`: one line per [`EVICT_LOG_MS`] at most, and the events
    /// dropped since the last one. A queue kept full drops on nearly every append.
    evict_log: crate::ops::log_throttle::LogThrottle,
    evicted_unlogged: AtomicU64,
    /// The dead letters: how many, their bytes, and how many were dropped over their cap.
    dlq_count: AtomicU64,
    dlq_bytes: AtomicU64,
    dlq_dropped: AtomicU64,
    /// Bumped (under the store's write lock) each time the store is opened again after a
    /// storage error ([`Queue::store_epoch`]).
    store_epoch: AtomicU64,
    head: watch::Sender<u64>,
    /// Woken when a sink's cursor moves: there may be records to remove.
    cursor_moved: tokio::sync::Notify,
    closed: AtomicBool,
    last_compact_check: AtomicU64,
    last_follow_up_prune: AtomicU64,
    /// When the writer last looked for the store's files after a commit (`store::present`).
    present_checked: AtomicU64,
    /// When the writer took up the step it is on (a group commit, a compaction), in Unix ms;
    /// 0 while it waits for work. The systemd watchdog stops pinging when a step takes too
    /// long: a writer stuck in a sync that never returns stalls every ack, and only a restart
    /// helps.
    writer_busy_since: AtomicU64,
    /// The cap the last append was refused for (`when_full = "reject"`), until an append is
    /// taken or records are removed: `/readyz` reports it.
    refused_for: arc_swap::ArcSwapOption<&'static str>,
    /// Live bytes at the last compaction check (at open before the first).
    live_at_last_check: AtomicU64,
    /// Set when the store opened short of its high-water mark (see "A damaged store").
    behind_mark: Option<BehindMark>,
    /// Every loss the store was ever opened with (kept in `meta`): reported until it is gone.
    loss: Option<LossRecord>,
    /// Why the store could not be opened again after a storage error, unless the disk is
    /// full: appends are refused with it meanwhile. A filesystem turned read-only, or an I/O
    /// error, was reported to clients as a full disk (507 "no space left"), which sent
    /// operators looking for space that was there.
    unavailable: parking_lot::Mutex<Option<String>>,
    /// Tests: run once by the collector between reading a value and removing it.
    #[cfg(test)]
    before_remove: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Tests: the store was taken away by the test, which decides when it comes back.
    #[cfg(test)]
    taken_by_test: AtomicBool,
    _lock: DirLock,
}

impl Shared {
    /// The store is unavailable and the writer opens it again on its own (`REOPEN_EVERY`).
    fn reopen_by_itself(&self) -> bool {
        #[cfg(test)]
        if self.taken_by_test.load(Ordering::Relaxed) {
            return false;
        }
        self.trees.read().is_none()
    }

    /// What an append is refused with while the store is unavailable (see `unavailable`).
    fn unavailable_error(&self) -> QueueError {
        match self.unavailable.lock().as_deref() {
            None => QueueError::NoSpace,
            Some(why) => QueueError::Storage(format!(
                "the queue store cannot be opened again after a storage error: {why}"
            )),
        }
    }

    /// Records why the store could not be opened (`None` once it could, or when the disk is
    /// full: that is what `NoSpace` says).
    fn set_unavailable(&self, e: Option<&QueueError>) {
        *self.unavailable.lock() = match e {
            None | Some(QueueError::NoSpace) => None,
            Some(other) => Some(other.to_string()),
        };
    }

    /// The store, for the duration of one operation.
    fn trees(&self) -> Result<MappedRwLockReadGuard<'_, Trees>, QueueError> {
        RwLockReadGuard::try_map(self.trees.read(), |t| t.as_ref()).map_err(|_| {
            QueueError::Storage("the queue store is being reopened after a storage error".into())
        })
    }
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
    tx: Sender<WriteOp>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Queue {
    /// Space ingest leaves free on the data directory's filesystem: below it, appends are
    /// refused as if the disk were full (see the module constant of the same name for why).
    pub const MIN_FREE_BYTES: u64 = MIN_FREE_BYTES;

    /// Opens (or creates) the queue under `cfg.data_dir` and starts the writer thread.
    pub fn open(cfg: &QueueConfig) -> Result<Queue, QueueError> {
        let dir = &cfg.data_dir;
        create_private_dir(dir)?;
        let lock = DirLock::acquire(dir)?;
        // A mark beside a store that is not there any more (removed by hand) says nothing.
        let mark = store::exists(dir).then(|| mark::read(dir)).flatten();
        let t = Trees::open(dir, cfg)?;
        time_follow_up_ids(&t)?;
        // What the log holds (the cap is enforced against these): as a clean stop left them,
        // else counted. Taking them out is a log update like any other, so sled's recovery of
        // a prefix means that after a crash either they are still there and nothing changed
        // since, or they are gone and the log is counted again.
        let (events, bytes) = match t.meta.remove(COUNTS_AT_CLOSE)? {
            Some(v) if v.len() == 16 => (key_u64(&v[..8]), key_u64(&v[8..])),
            _ => {
                // After a crash only: a clean stop leaves no removal half done.
                remove_orphan_chunks(&t)?;
                count_log(&t)?
            }
        };
        let (dlq_count, dlq_bytes) = match t.meta.remove(dlq::DLQ_COUNTS_AT_CLOSE)? {
            Some(v) if v.len() == 16 => (key_u64(&v[..8]), key_u64(&v[8..])),
            _ => dlq::count_dead_letters(&t)?,
        };
        let mut next_seq = t.log.last()?.map(|(k, _)| key_u64(&k) + 1).unwrap_or(0);
        if let Some(v) = t.meta.get("next_seq")? {
            next_seq = next_seq.max(key_u64(&v));
        }
        for kv in t.cursors.iter() {
            let (_, v) = kv?;
            next_seq = next_seq.max(key_u64(&v));
            // The end of its last done range (`set_progress`): no range may cover a seq not
            // given yet.
            if v.len() >= 24 {
                next_seq = next_seq.max(key_u64(&v[v.len() - 8..]));
            }
        }
        let behind_mark = mark.filter(|&m| m > next_seq).map(|mark| BehindMark {
            found: next_seq,
            mark,
        });
        if let Some(b) = behind_mark {
            tracing::error!(
                found = b.found,
                mark = b.mark,
                dir = %dir.display(),
                "the queue store opened without events it had acknowledged: its numbering stops at {} but had reached {}, so undelivered events among seq {}..{} are lost (its files were damaged: a disk error, or changed by hand); numbering goes on from {}",
                b.found, b.mark, b.found, b.mark, b.mark
            );
            next_seq = b.mark;
        }
        let mut loss = t
            .meta
            .get(mark::LOSS_KEY)?
            .and_then(|v| LossRecord::decode(&v));
        if let Some(b) = behind_mark {
            // The loss and the numbering that goes on above it, in one atomic batch, synced
            // before anything else happens: a crash before the sync finds the store short of
            // its mark again and counts the loss then, a crash after it finds it recorded;
            // either way it is counted once.
            let record = LossRecord::add(loss, b, now_ms());
            let mut batch = sled::Batch::default();
            batch.insert("next_seq", &next_seq.to_be_bytes());
            batch.insert(mark::LOSS_KEY, &record.encode());
            t.meta.apply_batch(batch)?;
            t.sync()?;
            loss = Some(record);
        }
        // Chunks at or above the numbering belong to no acknowledged record: a group cut
        // short (a crash, a full disk) can leave a large event's chunks on disk without its log
        // record or the `next_seq` that numbered it, so its number is given again now. Left
        // there, they were read as part of the new event under that number, which then did not
        // decode and went to the dead letters instead of its sink. Not synced: the removal
        // reaches the disk before (with) the next commit, the first that can reuse a number.
        remove_chunks_from(&t.chunks, next_seq)?;
        let (head, _) = watch::channel(next_seq);
        let shared = Arc::new(Shared {
            trees: RwLock::new(Some(t)),
            cfg: cfg.clone(),
            caps: arc_swap::ArcSwap::from_pointee(cfg.clone()),
            events: AtomicU64::new(events),
            bytes: AtomicU64::new(bytes),
            syncs: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            evict_log: crate::ops::log_throttle::LogThrottle::new(EVICT_LOG_MS),
            evicted_unlogged: AtomicU64::new(0),
            dlq_count: AtomicU64::new(dlq_count),
            dlq_bytes: AtomicU64::new(dlq_bytes),
            dlq_dropped: AtomicU64::new(0),
            store_epoch: AtomicU64::new(0),
            head,
            cursor_moved: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            last_compact_check: AtomicU64::new(now_ms()),
            last_follow_up_prune: AtomicU64::new(0),
            present_checked: AtomicU64::new(0),
            writer_busy_since: AtomicU64::new(0),
            refused_for: arc_swap::ArcSwapOption::empty(),
            live_at_last_check: AtomicU64::new(bytes),
            behind_mark,
            loss,
            unavailable: parking_lot::Mutex::new(None),
            #[cfg(test)]
            before_remove: Mutex::new(None),
            #[cfg(test)]
            taken_by_test: AtomicBool::new(false),
            _lock: lock,
        });
        let (tx, rx) = crossbeam_channel::bounded(WRITE_QUEUE_DEPTH);
        let w = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("llmlogd-writer".into())
            .spawn(move || writer_loop(w, rx, next_seq))
            .map_err(|e| QueueError::Storage(format!("cannot start writer thread: {e}")))?;
        Ok(Queue {
            shared,
            tx,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    /// Encodes an event for [`Queue::append`]. Runs on the caller's thread (compression is
    /// the costly part of a write, and ingest has more threads than the one writer).
    pub fn prepare(&self, ev: &NewEvent, routes: &[u16]) -> Prepared {
        let id = uuid::Uuid::now_v7();
        let enc = record::encode(
            &RecordRef {
                kind: ev.kind,
                received_ms: now_ms(),
                id,
                routes,
                creds: &ev.creds,
                payload: &ev.payload,
            },
            self.shared.cfg.compression,
        );
        Prepared { enc, id }
    }

    /// Appends records durably: returns once they are synced to disk (see module docs).
    /// All or nothing: on error none of them was acknowledged.
    pub async fn append(&self, records: Vec<Prepared>) -> Result<Vec<Appended>, QueueError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(WriteOp::Append { records, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(QueueError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(QueueError::Closed),
        }
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Holds every write back (the writer waits for the store) until the guard is dropped:
    /// tests use it to keep acks from coming while they look at what waits for them.
    #[cfg(test)]
    pub(crate) fn hold_writes(&self) -> impl Drop + '_ {
        self.shared.trees.write()
    }

    /// Whether an append is waiting for the writer or being written (tests).
    #[cfg(test)]
    pub(crate) fn writes_pending(&self) -> bool {
        !self.tx.is_empty() || self.shared.writer_busy_since.load(Ordering::Relaxed) != 0
    }

    /// The next sequence number the writer will assign; every record below it that exists is
    /// durable. Delivery waits on changes of this.
    pub fn head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    /// The id of a sink by name, assigned on first use and stable forever after. A new sink
    /// starts its cursor at the current head: it receives events appended from now on.
    pub fn sink_id(&self, name: &str) -> Result<u16, QueueError> {
        let t = self.shared.trees()?;
        if let Some(v) = t.sinks.get(name)? {
            return Ok(u16::from_be_bytes([v[0], v[1]]));
        }
        let used = t.sinks.len();
        // Id 0xFFFF is kept for "unknown" in dead letters.
        if used >= 0xFFFE {
            return Err(QueueError::Storage("too many sink names".into()));
        }
        let id = t
            .sinks
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
            .max()
            .map_or(0, |m| m + 1);
        t.sinks.insert(name, &id.to_be_bytes())?;
        let head = *self.shared.head.borrow();
        t.cursors
            .compare_and_swap(
                id.to_be_bytes(),
                None as Option<&[u8]>,
                Some(&head.to_be_bytes()),
            )?
            .ok();
        Ok(id)
    }

    /// Every sink name the queue has seen, with its id.
    pub fn sink_names(&self) -> Result<Vec<(String, u16)>, QueueError> {
        let mut out = Vec::new();
        for kv in self.shared.trees()?.sinks.iter() {
            let (k, v) = kv?;
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                u16::from_be_bytes([v[0], v[1]]),
            ));
        }
        Ok(out)
    }

    pub fn cursor(&self, sink: u16) -> Result<u64, QueueError> {
        Ok(self
            .shared
            .trees()?
            .cursors
            .get(sink.to_be_bytes())?
            .map(|v| key_u64(&v))
            .unwrap_or(0))
    }

    /// A sink's cursor and the ranges above it that are done too (`set_progress`), as last
    /// persisted. Ranges are sorted, above the cursor, and never overlap.
    pub fn progress(&self, sink: u16) -> Result<(u64, Vec<std::ops::Range<u64>>), QueueError> {
        let Some(v) = self.shared.trees()?.cursors.get(sink.to_be_bytes())? else {
            return Ok((0, Vec::new()));
        };
        let cursor = key_u64(&v);
        let mut done = Vec::new();
        let mut floor = cursor;
        for pair in v.get(8..).unwrap_or_default().chunks_exact(16) {
            let (start, end) = (key_u64(&pair[..8]).max(floor), key_u64(&pair[8..]));
            // Anything out of order is ignored: a range only ever spares a resend.
            if start < end {
                done.push(start..end);
                floor = end;
            }
        }
        Ok((cursor, done))
    }

    /// Moves a sink's cursor (like `set_cursor`) and records `done`: ranges of seqs above it
    /// that are done for the sink, so a restart skips them instead of sending them again.
    /// Listing less than is done only costs resends; listing more would lose events.
    pub fn set_progress(
        &self,
        sink: u16,
        cursor: u64,
        done: &[std::ops::Range<u64>],
    ) -> Result<(), QueueError> {
        self.write_progress(None, sink, cursor, done)
    }

    /// [`Queue::set_progress`] for a caller whose progress was read at store epoch `epoch`
    /// ([`Queue::store_epoch`]): refused with [`QueueError::Reopened`] if the store was opened
    /// again since. The delivery worker keeps its progress in memory and writes it now and
    /// then; after a storage error the reopened store holds only what was synced, and a dead
    /// letter or a delivery mark written just before may be gone. Writing the worker's
    /// cursor past such an event would lose it (neither delivered nor a dead letter).
    pub fn set_progress_at(
        &self,
        epoch: u64,
        sink: u16,
        cursor: u64,
        done: &[std::ops::Range<u64>],
    ) -> Result<(), QueueError> {
        self.write_progress(Some(epoch), sink, cursor, done)
    }

    fn write_progress(
        &self,
        epoch: Option<u64>,
        sink: u16,
        cursor: u64,
        done: &[std::ops::Range<u64>],
    ) -> Result<(), QueueError> {
        let mut v = Vec::with_capacity(8 + 16 * done.len());
        v.extend_from_slice(&cursor.to_be_bytes());
        for r in done {
            v.extend_from_slice(&r.start.to_be_bytes());
            v.extend_from_slice(&r.end.to_be_bytes());
        }
        // The epoch is read under the store's read lock, and a reopen bumps it under the
        // write lock: this write goes to the store the caller's progress came from, or none.
        let t = self.shared.trees()?;
        if epoch.is_some_and(|e| e != self.shared.store_epoch.load(Ordering::SeqCst)) {
            return Err(QueueError::Reopened);
        }
        // One value: after a crash the cursor and its ranges are the same write's.
        t.cursors.insert(sink.to_be_bytes(), v)?;
        drop(t);
        self.shared.cursor_moved.notify_one();
        Ok(())
    }

    /// How many times the store was opened again after a storage error. Read it before
    /// reading state to keep in memory (a sink's progress), and write that state back with
    /// [`Queue::set_progress_at`].
    pub fn store_epoch(&self) -> u64 {
        self.shared.store_epoch.load(Ordering::SeqCst)
    }

    /// Moves a sink's cursor: every record below `seq` is done for it. Not synced by itself
    /// (see "After a crash").
    pub fn set_cursor(&self, sink: u16, seq: u64) -> Result<(), QueueError> {
        self.set_progress(sink, seq, &[])
    }

    /// Resolves after a cursor moved (at once if one moved since the last call returned).
    pub async fn cursor_moved(&self) {
        self.shared.cursor_moved.notified().await
    }

    /// Reads up to `max_events` / `max_bytes` records routed to `sink`, starting at `from`.
    /// Scans at most `max_scan` records, so a sink that is routed few events cannot hold the
    /// reader long; `next` says where the scan stopped.
    pub fn read(
        &self,
        sink: u16,
        from: u64,
        max_events: usize,
        max_bytes: usize,
        max_scan: usize,
    ) -> Result<ReadBatch, QueueError> {
        // Only below the head: every record there was written (and synced) before this scan
        // began. Scanning past it could see a record of a group commit still being applied
        // while missing an earlier one of the same group (a sled iterator copies each page as
        // it reaches it), and moving past the unseen one would skip it for good.
        let head = *self.shared.head.borrow();
        let t = self.shared.trees()?;
        let mut out = ReadBatch {
            items: Vec::new(),
            next: from,
        };
        if from >= head {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let mut scanned = 0usize;
        let mut stopped = false;
        'values: for kv in t.log.range(from.to_be_bytes()..head.to_be_bytes()) {
            let (k, v) = kv?;
            let key = key_u64(&k);
            let (first, body, spans) = match open_value(key, &v) {
                Ok(parts) => parts,
                Err(error) => {
                    // A pack that does not open: one corrupt item for all of it, at its key.
                    if scanned >= max_scan || out.items.len() >= max_events || bytes >= max_bytes {
                        stopped = true;
                        break;
                    }
                    scanned += 1;
                    out.next = key + 1;
                    bytes += v.len();
                    out.items.push(ReadItem::Corrupt {
                        seq: key,
                        raw: Bytes::copy_from_slice(&v),
                        error,
                    });
                    continue;
                }
            };
            for (i, span) in spans.into_iter().enumerate() {
                let seq = first + i as u64;
                if seq < from {
                    continue;
                }
                if scanned >= max_scan || out.items.len() >= max_events || bytes >= max_bytes {
                    stopped = true;
                    break 'values;
                }
                scanned += 1;
                out.next = seq + 1;
                let rec = &body[span];
                let routed = match record::routes_of(rec) {
                    Ok(mut r) => r.any(|id| id == sink),
                    // Unknown routes: hand it to every reader, each dead-letters its copy.
                    Err(_) => true,
                };
                if !routed {
                    continue;
                }
                bytes += rec.len();
                let item = match record::decode(seq, rec, |len| read_chunks(&t.chunks, seq, len)) {
                    Ok(ev) => {
                        bytes += ev.payload.len().saturating_sub(rec.len());
                        ReadItem::Event(ev)
                    }
                    Err(error) => ReadItem::Corrupt {
                        seq,
                        raw: Bytes::copy_from_slice(rec),
                        error,
                    },
                };
                out.items.push(item);
            }
        }
        if !stopped {
            // Everything below the head was scanned (records removed meanwhile included).
            out.next = head;
        }
        Ok(out)
    }

    /// Reads one record by sequence number.
    pub fn get(&self, seq: u64) -> Result<Option<ReadItem>, QueueError> {
        let t = self.shared.trees()?;
        let Some(found) = record_at(&t, seq)? else {
            return Ok(None);
        };
        Ok(Some(match found {
            Ok(rec) => match record::decode(seq, &rec, |len| read_chunks(&t.chunks, seq, len)) {
                Ok(ev) => ReadItem::Event(ev),
                Err(error) => ReadItem::Corrupt {
                    seq,
                    raw: Bytes::from(rec),
                    error,
                },
            },
            Err((raw, error)) => ReadItem::Corrupt {
                seq,
                raw: Bytes::from(raw),
                error,
            },
        }))
    }

    /// Removes every record below the lowest cursor of `active` sinks (all records when there
    /// is none). Returns how many were removed.
    pub fn gc(&self, active: &[u16]) -> Result<u64, QueueError> {
        let mut min = *self.shared.head.borrow();
        for id in active {
            min = min.min(self.cursor(*id)?);
        }
        let removed = self.remove_below(min, u64::MAX)?;
        self.maybe_prune_follow_up_ids();
        self.maybe_compact();
        Ok(removed)
    }

    fn maybe_prune_follow_up_ids(&self) {
        let now = now_ms();
        if !take_turn(
            &self.shared.last_follow_up_prune,
            now,
            FOLLOW_UP_PRUNE_EVERY_MS,
        ) {
            return;
        }
        if let Err(e) = self.prune_follow_up_ids(now.saturating_sub(FOLLOW_UP_IDS_KEEP_MS)) {
            tracing::debug!(error = %e, "old follow-up ids not removed");
        }
    }

    /// Removes the follow-up ids (remote ids, group marks) stored before `before_ms`, at most
    /// `FOLLOW_UP_PRUNE_MAX` a call. Both are keyed by sequence number, which grows with time,
    /// so each run of keys is read from its start and only up to its first younger entry.
    /// Returns how many were removed.
    pub(crate) fn prune_follow_up_ids(&self, before_ms: u64) -> Result<usize, QueueError> {
        let t = self.shared.trees()?;
        let old = |v: &[u8], at: usize| v.get(at..at + 8).is_some_and(|b| key_u64(b) < before_ms);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        // `remote`: one run per sink (sink id, seq) → (remote id, stored ms).
        let mut from = [0u8; 10];
        'sinks: loop {
            let mut sink = None;
            for kv in t.remote.range(from..) {
                let (k, v) = kv?;
                let this = [k[0], k[1]];
                if sink.is_some_and(|s| s != this) {
                    break;
                }
                sink = Some(this);
                if !old(&v, 8) || n == FOLLOW_UP_PRUNE_MAX {
                    break;
                }
                batch.remove(k);
                n += 1;
            }
            let Some(next) = sink.and_then(|s| u16::from_be_bytes(s).checked_add(1)) else {
                break 'sinks;
            };
            from = pair_key(next, 0);
        }
        t.remote.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for kv in t.meta.scan_prefix(GROUP_PREFIX) {
            let (k, v) = kv?;
            if !old(&v, 0) || n == FOLLOW_UP_PRUNE_MAX {
                break;
            }
            batch.remove(k);
            n += 1;
        }
        t.meta.apply_batch(batch)?;
        Ok(n)
    }

    /// Removes the log values wholly below `limit`, at most `max` records (whole values).
    ///
    /// Each value goes by compare-and-swap against what was read, not in a batch: eviction
    /// (`drop_oldest`, on the writer thread) takes the oldest records too, and may trim or
    /// remove a value between this read and its removal. It has counted what it took, so a
    /// blind removal counted the value's records and bytes a second time: the figures the
    /// caps are checked against fell below what is stored, and could wrap round to a count
    /// that made the next `drop_oldest` append evict the whole queue. A value that changed is
    /// read again.
    fn remove_below(&self, limit: u64, max: u64) -> Result<u64, QueueError> {
        let t = self.shared.trees()?;
        let mut removed = 0u64;
        loop {
            let mut seen = 0usize;
            for kv in t.log.range(..limit.to_be_bytes()).take(1024) {
                if removed >= max {
                    break;
                }
                let (k, v) = kv?;
                seen += 1;
                #[cfg(test)]
                if let Some(hook) = self
                    .shared
                    .before_remove
                    .lock()
                    .ok()
                    .and_then(|mut h| h.take())
                {
                    hook();
                }
                if t.log
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                    .is_err()
                {
                    // Trimmed or removed meanwhile: the next pass sees what is left.
                    continue;
                }
                if record::chunked_len(&v).is_some() {
                    remove_chunks(&t.chunks, key_u64(&k))?;
                }
                let n = record::count_of(&v);
                sub(&self.shared.events, n);
                sub(&self.shared.bytes, stored_len_of(&v) as u64);
                removed += n;
            }
            if seen == 0 || removed >= max {
                if removed > 0 {
                    // Room was made: an append refused at a cap may be taken now.
                    self.shared.refused_for.store(None);
                }
                return Ok(removed);
            }
        }
    }

    /// Stores the remote id the service assigned to `seq` (PromptLayer's request id).
    pub fn set_remote_id(&self, sink: u16, seq: u64, remote: u64) -> Result<(), QueueError> {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&remote.to_be_bytes());
        v[8..].copy_from_slice(&now_ms().to_be_bytes());
        self.shared
            .trees()?
            .remote
            .insert(pair_key(sink, seq), &v)?;
        Ok(())
    }

    /// Records, durably, that `seq` is a PromptLayer group (`/create-group`): follow-ups name
    /// groups and logs by local ids from one sequence, but the service's ids for the two are
    /// separate spaces, so ingest checks which one an id is, even after the event is gone.
    pub fn mark_group(&self, seq: u64) -> Result<(), QueueError> {
        let t = self.shared.trees()?;
        t.meta.insert(group_key(seq), &now_ms().to_be_bytes())?;
        t.sync()
    }

    /// Records, durably, that `sink` must send nothing before `until_ms` (wall clock): a
    /// Retry-After pause, which a restart (even `kill -9`) honours instead of sending at once.
    /// `endpoint` fingerprints who asked (url, key), so a sink pointed elsewhere since owes it
    /// nothing. Synced: pauses are rare, and one lost to a crash is the request it was about.
    pub fn set_not_before(
        &self,
        sink: u16,
        until_ms: u64,
        endpoint: u64,
    ) -> Result<(), QueueError> {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&until_ms.to_be_bytes());
        v[8..].copy_from_slice(&endpoint.to_be_bytes());
        let t = self.shared.trees()?;
        t.meta.insert(not_before_key(sink), &v)?;
        t.sync()
    }

    /// A sink's pause as last recorded by [`Queue::set_not_before`]: (until_ms, endpoint).
    pub fn not_before(&self, sink: u16) -> Result<Option<(u64, u64)>, QueueError> {
        Ok(self
            .shared
            .trees()?
            .meta
            .get(not_before_key(sink))?
            .filter(|v| v.len() == 16)
            .map(|v| (key_u64(&v[..8]), key_u64(&v[8..]))))
    }

    /// Forgets a sink's pause (its endpoint changed). Not synced: a pause that comes back
    /// after a crash is ignored for its endpoint fingerprint, or ends by itself.
    pub fn clear_not_before(&self, sink: u16) -> Result<(), QueueError> {
        self.shared.trees()?.meta.remove(not_before_key(sink))?;
        Ok(())
    }

    /// Whether `seq` was marked a group by [`Queue::mark_group`].
    pub fn is_group(&self, seq: u64) -> Result<bool, QueueError> {
        Ok(self.shared.trees()?.meta.contains_key(group_key(seq))?)
    }

    pub fn remote_id(&self, sink: u16, seq: u64) -> Result<Option<u64>, QueueError> {
        Ok(self
            .shared
            .trees()?
            .remote
            .get(pair_key(sink, seq))?
            .and_then(|v| v.get(..8).map(key_u64)))
    }

    pub fn stats(&self) -> QueueStats {
        let oldest_ms = self
            .shared
            .trees()
            .ok()
            .and_then(|t| t.log.first().ok().flatten())
            .and_then(|(k, v)| {
                let (first, body, spans) = open_value(key_u64(&k), &v).ok()?;
                let rec = &body[spans.first()?.clone()];
                record::decode(first, rec, |_| Ok(Vec::new())).ok()
            })
            .map(|e| e.received_ms);
        QueueStats {
            events: self.shared.events.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            next_seq: *self.shared.head.borrow(),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            evicted: self.shared.evicted.load(Ordering::Relaxed),
            oldest_ms,
        }
    }

    /// Applies new caps (`max_bytes`, `max_events`, `when_full`) from a reloaded config; the
    /// other queue settings need a restart.
    pub fn set_caps(&self, cfg: &QueueConfig) {
        self.shared.caps.store(Arc::new(cfg.clone()));
        self.shared.refused_for.store(None);
        // A lowered dead-letter cap applies now, not at the next dead letter (which may be
        // weeks away): the oldest go until they fit. No letter is kept aside here (a key no
        // letter has), so a cap below a single letter's size leaves none.
        if self.dead_letter_bytes() > cfg.dead_letter_max_bytes {
            let trimmed = self
                .shared
                .trees()
                .and_then(|t| self.trim_dead_letters(&t, [0xFF; 10]));
            if let Err(e) = trimmed {
                tracing::warn!(error = %e, "could not bring the dead letters under the new queue.dead_letter_max_bytes; the next dead letter tries again");
            }
        }
    }

    /// Bytes sled's files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        store::dir_size(&self.shared.cfg.data_dir)
    }

    /// Bytes free for llmlogd on the data directory's filesystem (one `statvfs`, cheap enough
    /// to ask per scrape); `None` when it cannot be asked. Operators alert on it before ingest
    /// starts refusing events below [`Queue::MIN_FREE_BYTES`].
    pub fn free_bytes(&self) -> Option<u64> {
        store::free_bytes(&self.shared.cfg.data_dir)
    }

    /// How long the writer has been on its current step (a group commit, a compaction), when
    /// that is more than `limit`: it is stuck, and with it every ack.
    pub fn writer_stalled(&self, limit: std::time::Duration) -> Option<std::time::Duration> {
        let since = self.shared.writer_busy_since.load(Ordering::Relaxed);
        let busy = std::time::Duration::from_millis(now_ms().saturating_sub(since));
        (since != 0 && busy > limit).then_some(busy)
    }

    /// Why new events are refused right now, if they are (for `/readyz`): the store is
    /// unavailable after a storage error, the disk is full, or the last append was refused at
    /// a cap (`when_full = "reject"`) and nothing was taken or removed since.
    pub fn refusing(&self) -> Option<&'static str> {
        {
            // Held while looking for the files: compaction (which takes the write lock) moves
            // them, and must not be taken for their removal.
            let store = self.shared.trees.read();
            if store.is_none() {
                return Some("the queue store is unavailable after a storage error (retrying)");
            }
            if !store::present(&self.shared.cfg.data_dir) {
                return Some(STORE_GONE);
            }
        }
        if self.free_bytes().is_some_and(|f| f < MIN_FREE_BYTES) {
            return Some("the disk holding the queue is full");
        }
        self.shared.refused_for.load().as_deref().copied()
    }

    /// Asks the writer to compact the store when a drained backlog left it much larger than
    /// what it holds, and what it holds has settled (checked at most every 10 s, after removing
    /// delivered records; a backlog still draining is left to finish first).
    fn maybe_compact(&self) {
        if !take_turn(
            &self.shared.last_compact_check,
            now_ms(),
            COMPACT_CHECK_EVERY_MS,
        ) {
            return;
        }
        let live = self.shared.bytes.load(Ordering::Relaxed);
        let before = self.shared.live_at_last_check.swap(live, Ordering::Relaxed);
        let on_disk = || store::dir_size(&self.shared.cfg.data_dir.join("queue"));
        // Short of space, a store much bigger than what it holds is worth copying sooner: that
        // is how disk space comes back for ingest (see `MIN_FREE_BYTES`).
        let mut compact_above = self.shared.caps.load().compact_above;
        if store::free_bytes(&self.shared.cfg.data_dir).is_some_and(|f| f < 2 * MIN_FREE_BYTES) {
            compact_above = compact_above.min(MIN_FREE_BYTES / 2);
        }
        if compaction_due(live, before, on_disk, compact_above) {
            let _ = self.tx.try_send(WriteOp::Compact);
        }
    }

    /// Compacts now, whatever the sizes (tests, `fsck`). Returns once done.
    pub async fn compact_now(&self) -> Result<(), QueueError> {
        self.tx
            .send(WriteOp::Compact)
            .map_err(|_| QueueError::Closed)?;
        // An empty append is a barrier: it is answered after the compaction ran.
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriteOp::Append {
                records: Vec::new(),
                reply,
            })
            .map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?.map(|_| ())
    }

    pub fn data_dir(&self) -> &Path {
        &self.shared.cfg.data_dir
    }

    /// Stops the writer after the writes already queued, and flushes everything (cursors
    /// included) to disk. Appends after this fail with `Closed`.
    pub fn close(&self) -> Result<(), QueueError> {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // A blocking send: the writer drains what is ahead of Stop first.
        let _ = self.tx.send(WriteOp::Stop);
        let handle = self.writer.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        // The next open takes these instead of reading the whole log (a 1 M backlog: ~2.5 s
        // and ~400 MiB of sled pages). Nothing removes records after this: delivery and its
        // collector stopped before the queue is closed.
        let t = self.shared.trees()?;
        let mut counts = [0u8; 16];
        counts[..8].copy_from_slice(&self.shared.events.load(Ordering::SeqCst).to_be_bytes());
        counts[8..].copy_from_slice(&self.shared.bytes.load(Ordering::SeqCst).to_be_bytes());
        t.meta.insert(COUNTS_AT_CLOSE, &counts)?;
        let mut dlq_counts = [0u8; 16];
        dlq_counts[..8]
            .copy_from_slice(&self.shared.dlq_count.load(Ordering::SeqCst).to_be_bytes());
        dlq_counts[8..]
            .copy_from_slice(&self.shared.dlq_bytes.load(Ordering::SeqCst).to_be_bytes());
        t.meta.insert(dlq::DLQ_COUNTS_AT_CLOSE, &dlq_counts)?;
        let next_seq = *self.shared.head.borrow();
        t.meta.insert("next_seq", &next_seq.to_be_bytes())?;
        t.sync()?;
        // Best effort, like the writer's: a stop on a full disk must still be a clean one.
        if let Err(e) = mark::write(&self.shared.cfg.data_dir, next_seq) {
            tracing::warn!(error = %e, "queue mark not written at close");
        }
        Ok(())
    }

    /// Where the store stood against its high-water mark when it opened, if short of it (see
    /// "A damaged store").
    pub fn behind_mark(&self) -> Option<BehindMark> {
        self.shared.behind_mark
    }

    /// The losses on record for this store, this open's included: what the metrics and the
    /// status report, after any number of restarts.
    pub fn loss(&self) -> Option<LossRecord> {
        self.shared.loss
    }

    /// Acknowledged events the store has lost to damage over its life (0 normally).
    pub fn lost_events(&self) -> u64 {
        self.shared.loss.map_or(0, |l| l.total)
    }
}

/// At most one storage-error line per this many milliseconds: a disk that stays full fails
/// every write, and the log should say so, not repeat it per request.
const STORAGE_ERROR_LOG_MS: u64 = 10_000;
static STORAGE_ERROR_LOG: crate::ops::log_throttle::LogThrottle =
    crate::ops::log_throttle::LogThrottle::new(STORAGE_ERROR_LOG_MS);
/// At most one "dropped the oldest events" line per this many milliseconds: with
/// `when_full = "drop_oldest"` a queue that stays full (a sink down for long) drops on nearly
/// every append, which wrote one line per request.
const EVICT_LOG_MS: u64 = 10_000;

/// The group-commit writer: take everything waiting, insert, flush, fdatasync, then answer.
/// Each append is packed (and its full packs compressed) as it arrives, so while the writer
/// waits for a group to fill it already does most of the group's work; the commit itself is
/// the last pack, sled's insert, flush and sync. Compaction and reopening the store after a
/// storage error (disk full) run between groups, so no append ever sees a half-swapped store.
fn writer_loop(shared: Arc<Shared>, rx: Receiver<WriteOp>, mut next_seq: u64) {
    let (mut last_group, mut last_sync) = (0usize, std::time::Duration::ZERO);
    // When the mark was last written; the number it holds (as far as this writer knows: what
    // the store had at open is the mark's business until a commit); the synced head.
    let mut marked: Option<std::time::Instant> = None;
    let mut marked_seq = next_seq;
    let mut synced = next_seq;
    let mut pending = None;
    loop {
        let first = match pending.take() {
            Some(op) => op,
            None => {
                // Synced events the mark does not cover yet (the last commit came within
                // `MARK_EVERY` of the previous mark): if nothing arrives meanwhile, the mark
                // catches up once the interval is over, so a burst's tail is not left out of
                // it until the next event or the close.
                let mark_due = (synced > marked_seq).then(|| {
                    marked.map_or(std::time::Duration::ZERO, |t| {
                        mark::MARK_EVERY.saturating_sub(t.elapsed())
                    })
                });
                // An unavailable store is opened again without waiting for an append.
                let reopen_due = shared.reopen_by_itself().then_some(REOPEN_EVERY);
                let wait = match (mark_due, reopen_due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let received = match wait {
                    None => rx
                        .recv()
                        .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
                    Some(wait) => rx.recv_timeout(wait),
                };
                match received {
                    Ok(op) => op,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if mark_due == wait {
                            write_mark(&shared, synced);
                            (marked, marked_seq) = (Some(std::time::Instant::now()), synced);
                        }
                        if reopen_due == wait && shared.reopen_by_itself() {
                            reopen(&shared);
                        }
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let started = std::time::Instant::now();
        shared.writer_busy_since.store(now_ms(), Ordering::Relaxed);
        if shared.trees.read().is_none() {
            reopen(&shared);
        }
        let (stop, compact) = match first {
            WriteOp::Stop => (true, false),
            WriteOp::Compact => (false, true),
            append => {
                let mut group = Group::new(&shared, next_seq);
                group.add(append);
                // Everything already waiting, then (see `MAX_COMMIT_DELAY`) a little more.
                let want = if (DELAY_FROM_GROUP..DELAY_UNTIL_GROUP).contains(&last_group) {
                    (last_group * 2).min(MAX_GROUP_RECORDS)
                } else {
                    0
                };
                let deadline = started + (last_sync / 2).min(MAX_COMMIT_DELAY);
                while group.records < MAX_GROUP_RECORDS {
                    let op = match rx.try_recv() {
                        Ok(op) => op,
                        Err(_) if group.records < want => match rx.recv_deadline(deadline) {
                            Ok(op) => op,
                            Err(_) => break,
                        },
                        Err(_) => break,
                    };
                    if matches!(op, WriteOp::Append { .. }) {
                        group.add(op);
                    } else {
                        // Control ops run after this group is committed.
                        pending = Some(op);
                        break;
                    }
                }
                last_group = group.records;
                let sync_started = std::time::Instant::now();
                let (failed, seq) = group.commit();
                if !failed && seq > next_seq {
                    // Every number below `seq` is synced.
                    synced = seq;
                    if marked.is_none_or(|t| t.elapsed() >= mark::MARK_EVERY) {
                        write_mark(&shared, seq);
                        (marked, marked_seq) = (Some(std::time::Instant::now()), seq);
                    }
                }
                next_seq = seq;
                last_sync = sync_started.elapsed();
                if failed {
                    // sled may refuse every write after an I/O error: start from what is on disk.
                    reopen(&shared);
                }
                (false, false)
            }
        };
        if compact {
            run_compaction(&shared);
        }
        shared.writer_busy_since.store(0, Ordering::Relaxed);
        if stop {
            break;
        }
    }
}

/// Writes the mark: every number below `next_seq` is synced, so the mark may say so (best
/// effort; a full disk refuses it like everything else, and a mark that lags only reports less).
fn write_mark(shared: &Shared, next_seq: u64) {
    if let Err(e) = mark::write(&shared.cfg.data_dir, next_seq) {
        tracing::debug!(error = %e, "queue mark not written");
    }
}

/// One group commit being built: appends are checked against the caps, numbered, packed and
/// inserted into sled as they arrive (above the head, so no reader sees them yet);
/// [`Group::commit`] inserts the last pack, syncs and answers them.
///
/// After a crash before the sync, sled may bring back some of a group that was never
/// acknowledged; it is delivered like the rest (an app that retries its unacknowledged write
/// causes a duplicate: delivery is at-least-once).
struct Group<'a> {
    shared: &'a Shared,
    /// `None` while the store is unavailable (after a storage error): appends are refused.
    trees: Option<MappedRwLockReadGuard<'a, Trees>>,
    caps: Arc<QueueConfig>,
    next_seq: u64,
    records: usize,
    /// The group's first sequence number: eviction never reaches it.
    first_seq: u64,
    /// The first storage error: every append of the group is refused with it.
    failed: Option<QueueError>,
    /// Less than `MIN_FREE_BYTES` is free on the disk: appends are refused (`NoSpace`).
    low_space: bool,
    pack: record::PackBuilder,
    pack_last: u64,
    /// Records accepted, and the bytes they were encoded in (before packing and compression:
    /// an upper bound, for the cap checks).
    add_events: u64,
    add_bytes: u64,
    /// What the values inserted take.
    stored: u64,
    replies: Vec<(Reply, Vec<Appended>)>,
}

/// Where an append's outcome goes.
type Reply = oneshot::Sender<Result<Vec<Appended>, QueueError>>;

impl<'a> Group<'a> {
    fn new(shared: &'a Shared, next_seq: u64) -> Group<'a> {
        Group {
            shared,
            trees: shared.trees().ok(),
            caps: shared.caps.load_full(),
            next_seq,
            records: 0,
            first_seq: next_seq,
            failed: None,
            low_space: store::free_bytes(&shared.cfg.data_dir).is_some_and(|f| f < MIN_FREE_BYTES),
            pack: record::PackBuilder::default(),
            pack_last: 0,
            add_events: 0,
            add_bytes: 0,
            stored: 0,
            replies: Vec::new(),
        }
    }

    fn add(&mut self, op: WriteOp) {
        let WriteOp::Append { records, reply } = op else {
            return;
        };
        self.records += records.len();
        let Some(t) = self.trees.as_deref() else {
            let _ = reply.send(Err(self.shared.unavailable_error()));
            return;
        };
        if self.low_space && !records.is_empty() {
            let _ = reply.send(Err(QueueError::NoSpace));
            return;
        }
        let shared: &Shared = self.shared;
        let size: u64 = records.iter().map(|r| r.enc.stored_len() as u64).sum();
        let count = records.len() as u64;
        // Read fresh each time: eviction (and the collector) lower them as we go.
        let events_now = shared.events.load(Ordering::Relaxed) + self.add_events + count;
        let bytes_now = shared.bytes.load(Ordering::Relaxed) + self.add_bytes + size;
        if let Some(reason) = over_cap(&self.caps, events_now, bytes_now) {
            // What eviction cannot remove (this group's records) plus this write: if that is
            // over the cap already, refuse before dropping anything.
            if let Some(reason) =
                over_cap(&self.caps, self.add_events + count, self.add_bytes + size)
            {
                let _ = reply.send(Err(QueueError::OverCap { reason }));
                return;
            }
            let made_room = self.caps.when_full == WhenFull::DropOldest
                && evict_for(shared, t, &self.caps, events_now, bytes_now, self.first_seq);
            if !made_room {
                shared.refused_for.store(Some(Arc::new(reason)));
                let _ = reply.send(Err(QueueError::Full { reason }));
                return;
            }
        }
        self.add_records(records, reply, count, size);
    }

    fn add_records(&mut self, records: Vec<Prepared>, reply: Reply, count: u64, size: u64) {
        let mut ids = Vec::with_capacity(records.len());
        for r in records {
            let seq = self.next_seq;
            self.next_seq += 1;
            ids.push(Appended { seq, id: r.id });
            // A pack holds consecutive records: a lone record closes the open one first.
            if !r.enc.packable || !self.pack.fits(r.enc.value.len()) {
                self.close_pack();
            }
            if r.enc.packable {
                self.pack.push(&r.enc.value);
                self.pack_last = seq;
                continue;
            }
            // Chunks first: a log record never points at chunks that are not stored.
            if let Some(over) = &r.enc.overflow {
                self.put_chunks(seq, over);
            }
            self.put(seq, r.enc.value);
        }
        self.add_events += count;
        self.add_bytes += size;
        self.replies.push((reply, ids));
    }

    fn close_pack(&mut self) {
        if !self.pack.is_empty() {
            let v = std::mem::take(&mut self.pack).finish(self.shared.cfg.compression);
            self.put(self.pack_last, v);
        }
    }

    fn put_chunks(&mut self, seq: u64, payload: &[u8]) {
        let (Some(t), None) = (self.trees.as_deref(), &self.failed) else {
            return;
        };
        for (i, c) in payload.chunks(CHUNK).enumerate() {
            if let Err(e) = t.chunks.insert(&chunk_key(seq, i as u32)[..], c) {
                self.failed = Some(e.into());
                return;
            }
        }
    }

    fn put(&mut self, key: u64, value: Vec<u8>) {
        self.stored += stored_len_of(&value) as u64;
        if let (Some(t), None) = (self.trees.as_deref(), &self.failed) {
            if let Err(e) = t.log.insert(key.to_be_bytes(), value) {
                self.failed = Some(e.into());
            }
        }
    }

    /// Writes and syncs the group, answers every append. Returns whether storage failed, and
    /// the next sequence number (numbers of a failed group are not reused: some of it may
    /// have reached the disk).
    fn commit(mut self) -> (bool, u64) {
        self.close_pack();
        let Group {
            shared,
            trees,
            next_seq,
            failed,
            add_events,
            stored,
            replies,
            ..
        } = self;
        let Some(t) = trees else {
            return (false, next_seq);
        };
        if replies.iter().all(|(_, ids)| ids.is_empty()) {
            // Nothing to write (empty barrier appends, or all refused).
            for (reply, ids) in replies {
                let _ = reply.send(Ok(ids));
            }
            return (false, next_seq);
        }
        let result = (|| -> Result<(), QueueError> {
            if let Some(e) = failed {
                return Err(e);
            }
            t.meta.insert("next_seq", &next_seq.to_be_bytes())?;
            t.sync()?;
            let now = now_ms();
            // Once they are gone, every commit looks (and is refused).
            if now >= shared.present_checked.load(Ordering::Relaxed) + PRESENT_CHECK_MS {
                if !store::present(&shared.cfg.data_dir) {
                    return Err(store_gone(&shared.cfg.data_dir));
                }
                shared.present_checked.store(now, Ordering::Relaxed);
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                shared.events.fetch_add(add_events, Ordering::Relaxed);
                shared.bytes.fetch_add(stored, Ordering::Relaxed);
                shared.head.send_replace(next_seq);
                if add_events > 0 && shared.refused_for.load().is_some() {
                    shared.refused_for.store(None);
                }
                for (reply, ids) in replies {
                    let _ = reply.send(Ok(ids));
                }
                (false, next_seq)
            }
            Err(e) => {
                if let Some(skipped) = STORAGE_ERROR_LOG.ready() {
                    tracing::error!(error = %e, skipped, "queue write failed; the writes were not acknowledged");
                }
                let msg = e.to_string();
                for (reply, _) in replies {
                    let _ = reply.send(Err(match &e {
                        QueueError::NoSpace => QueueError::NoSpace,
                        QueueError::DataDir { path, problem } => QueueError::DataDir {
                            path: path.clone(),
                            problem: problem.clone(),
                        },
                        _ => QueueError::Storage(msg.clone()),
                    }));
                }
                (true, next_seq)
            }
        }
    }
}

/// Why appends are refused once the store's files were removed while it ran.
const STORE_GONE: &str = "the queue's files were removed while llmlogd ran: new events are refused, as they would not survive a restart; events already stored are still delivered; restart llmlogd to start a new store";

fn store_gone(dir: &Path) -> QueueError {
    QueueError::DataDir {
        path: dir.join("queue"),
        problem: STORE_GONE.into(),
    }
}

/// Drops the store and opens it again from disk (after a storage error). While that fails
/// (the disk is still full), the store stays unavailable and appends are refused; the next
/// group tries again.
fn reopen(shared: &Shared) {
    if !store::present(&shared.cfg.data_dir) && shared.trees.read().is_some() {
        // Its files were removed while it ran: opening "again" would start an empty store
        // with no sink names, under records numbered and routed by the old one. The old one
        // stays, so delivery goes on from what it holds; appends are refused until a restart.
        return;
    }
    let mut guard = shared.trees.write();
    drop(guard.take());
    match Trees::open(&shared.cfg.data_dir, &shared.cfg) {
        Ok(t) => {
            // A recount that fails keeps the counts as they were: 0 would let the caps admit a
            // whole cap's worth above what is stored.
            if let Ok((events, bytes)) = count_log(&t) {
                shared.events.store(events, Ordering::Relaxed);
                shared.bytes.store(bytes, Ordering::Relaxed);
            }
            // What the failed writes left of the dead letters is what is on disk now.
            if let Ok((n, b)) = dlq::count_dead_letters(&t) {
                shared.dlq_count.store(n, Ordering::Relaxed);
                shared.dlq_bytes.store(b, Ordering::Relaxed);
            }
            // Under the write lock: no progress write can be between the old store and this.
            shared.store_epoch.fetch_add(1, Ordering::SeqCst);
            *guard = Some(t);
            shared.set_unavailable(None);
            tracing::info!("queue store reopened");
        }
        Err(e) => {
            shared.set_unavailable(Some(&e));
            if let Some(skipped) = STORAGE_ERROR_LOG.ready() {
                tracing::error!(error = %e, skipped, "queue store cannot be reopened yet; refusing new events until it can");
            }
        }
    }
}

fn run_compaction(shared: &Shared) {
    let mut guard = shared.trees.write();
    let Some(current) = guard.take() else {
        return;
    };
    let before = store::dir_size(&shared.cfg.data_dir);
    let started = std::time::Instant::now();
    let (result, err) = store::compact(current, &shared.cfg.data_dir, &shared.cfg);
    if let Some(e) = err {
        tracing::warn!(error = %e, "compaction did not complete; the store is unchanged");
    }
    match result {
        Ok(t) => {
            *guard = Some(t);
            shared.set_unavailable(None);
            let after = store::dir_size(&shared.cfg.data_dir);
            tracing::info!(
                before_bytes = before,
                after_bytes = after,
                took_ms = started.elapsed().as_millis() as u64,
                "queue compacted: disk space given back"
            );
        }
        Err(e) => {
            shared.set_unavailable(Some(&e));
            tracing::error!(error = %e, "queue store cannot be reopened after compaction; retrying");
        }
    }
}

/// Whether to compact: the store's files take more than `compact_above` and four times the
/// `live` bytes, those are few enough to copy (`COMPACT_MAX_LIVE_BYTES`), and they have settled:
/// at least half of what they were at the previous check (`before`), 10 s earlier, unless
/// they are down to `COMPACT_SMALL_LIVE_BYTES`. A backlog still draining is left to finish: the
/// next check has less to copy, and a copy of tens of MiB now would sit in memory beside the
/// drain's reads (F35: copying 60 MiB adds ~30 MiB of RSS while it runs).
fn compaction_due(
    live: u64,
    before: u64,
    on_disk: impl FnOnce() -> u64,
    compact_above: u64,
) -> bool {
    let draining = live < before / 2 && live > COMPACT_SMALL_LIVE_BYTES;
    if live > COMPACT_MAX_LIVE_BYTES || draining {
        return false;
    }
    on_disk() > compact_above.max(live.saturating_mul(4))
}

fn count_log(t: &Trees) -> Result<(u64, u64), QueueError> {
    let (mut events, mut bytes) = (0u64, 0u64);
    for kv in t.log.iter() {
        let (_, v) = kv?;
        events += record::count_of(&v);
        bytes += stored_len_of(&v) as u64;
    }
    Ok((events, bytes))
}

/// Lowers a count, never below 0. The counts go down only by what was removed, but should one
/// ever fall behind the log, a wrapped count (~2^64) was "over the cap" by that much: every
/// append refused, or with `drop_oldest` every record evicted.
fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

fn over_cap(cfg: &QueueConfig, events: u64, bytes: u64) -> Option<&'static str> {
    if bytes > cfg.max_bytes {
        return Some("max_bytes reached");
    }
    if cfg.max_events.is_some_and(|m| events > m) {
        return Some("max_events reached");
    }
    None
}

/// `when_full = "drop_oldest"`: removes the oldest records until `events`/`bytes` fit.
/// Only records below `below` (the group being written) are candidates.
fn evict_for(
    shared: &Shared,
    t: &Trees,
    caps: &QueueConfig,
    events: u64,
    bytes: u64,
    below: u64,
) -> bool {
    let mut need_bytes = bytes.saturating_sub(caps.max_bytes);
    let mut need_events = caps.max_events.map_or(0, |m| events.saturating_sub(m));
    let mut dropped = 0u64;
    while need_bytes > 0 || need_events > 0 {
        let Ok(Some((k, v))) = t.log.first() else {
            break;
        };
        if key_u64(&k) >= below {
            break;
        }
        let len = stored_len_of(&v) as u64;
        let n = record::count_of(&v);
        // Drop only as many of a pack's oldest records as needed: the rest stay a pack ending
        // at the same key. Compare-and-swap, as the collector may remove it meanwhile.
        let want = need_events.max(need_bytes.saturating_mul(n).div_ceil(len.max(1)));
        if want < n {
            if let Ok((_, body, spans)) = open_value(key_u64(&k), &v) {
                let rest = spans[want as usize..].iter().map(|s| &body[s.clone()]);
                let tail = record::pack(rest, shared.cfg.compression);
                let tail_len = stored_len_of(&tail) as u64;
                match t.log.compare_and_swap(&k, Some(&v), Some(tail)) {
                    Ok(Ok(())) => {
                        let freed = len.saturating_sub(tail_len);
                        sub(&shared.events, want);
                        sub(&shared.bytes, freed);
                        need_bytes = need_bytes.saturating_sub(freed);
                        need_events = need_events.saturating_sub(want);
                        dropped += want;
                        continue;
                    }
                    Ok(Err(_)) => continue,
                    Err(_) => break,
                }
            }
        }
        match t.log.compare_and_swap(&k, Some(&v), None as Option<&[u8]>) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => continue,
            Err(_) => break,
        }
        if record::chunked_len(&v).is_some() {
            let _ = remove_chunks(&t.chunks, key_u64(&k));
        }
        sub(&shared.events, n);
        sub(&shared.bytes, len);
        need_bytes = need_bytes.saturating_sub(len);
        need_events = need_events.saturating_sub(n);
        dropped += n;
    }
    if dropped > 0 {
        let total = shared.evicted.fetch_add(dropped, Ordering::Relaxed) + dropped;
        shared
            .evicted_unlogged
            .fetch_add(dropped, Ordering::Relaxed);
        if shared.evict_log.ready().is_some() {
            tracing::warn!(
                dropped = shared.evicted_unlogged.swap(0, Ordering::Relaxed),
                total,
                "queue full: dropped the oldest events (queue.when_full = \"drop_oldest\"; at most one line per 10 s, llmlogd_queue_evicted_events_total counts them)"
            );
        }
    }
    need_bytes == 0 && need_events == 0
}

/// The records of the log value under `key`: the sequence number of the first, the bytes
/// they lie in, and where each lies (a lone record is a pack of one). `Err` when a pack does
/// not open (bad header or frame): then all of it is one corrupt item at `key`.
fn open_value(key: u64, v: &[u8]) -> Result<(u64, record::Body<'_>, record::Spans), RecordError> {
    if !record::is_pack(v) {
        return Ok((key, v.into(), std::iter::once(0..v.len()).collect()));
    }
    let (body, spans) = record::unpack(v)?;
    let n = spans.len() as u64;
    if n > key + 1 {
        return Err(RecordError("pack holds more records than its key allows"));
    }
    Ok((key + 1 - n, body, spans))
}

/// The stored bytes of record `seq`: `Ok(record)`, or `Err((value, why))` when `seq` is the key
/// of a pack that does not open. `None` when no value holds it.
#[allow(clippy::type_complexity)]
fn record_at(
    t: &Trees,
    seq: u64,
) -> Result<Option<Result<Vec<u8>, (Vec<u8>, RecordError)>>, QueueError> {
    let Some(kv) = t.log.range(seq.to_be_bytes()..).next() else {
        return Ok(None);
    };
    let (k, v) = kv?;
    let key = key_u64(&k);
    Ok(match open_value(key, &v) {
        Ok((first, body, spans)) if seq >= first => spans
            .get((seq - first) as usize)
            .map(|s| Ok(body[s.clone()].to_vec())),
        Ok(_) => None,
        Err(e) if key == seq => Some(Err((v.to_vec(), e))),
        Err(_) => None,
    })
}

fn stored_len_of(v: &[u8]) -> usize {
    8 + v.len() + record::chunked_len(v).unwrap_or(0)
}

fn chunk_key(seq: u64, idx: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k[8..].copy_from_slice(&idx.to_be_bytes());
    k
}

fn read_chunks(tree: &sled::Tree, seq: u64, len: usize) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::with_capacity(len);
    for kv in tree.range(chunk_key(seq, 0)..chunk_key(seq + 1, 0)) {
        let (_, v) = kv.map_err(|_| RecordError("chunk unreadable"))?;
        out.extend_from_slice(&v);
        if out.len() > len {
            return Err(RecordError("chunks longer than recorded"));
        }
    }
    Ok(out)
}

/// Removes record `seq` (`fsck` repair, after dead-lettering it). Inside a pack it becomes a
/// record routed to no sink, as sequence numbers in a pack are implicit; a pack that does not
/// open goes whole.
fn remove_record(
    t: &Trees,
    seq: u64,
    compression: crate::config::Compression,
) -> Result<(), QueueError> {
    let Some(kv) = t.log.range(seq.to_be_bytes()..).next() else {
        return Ok(());
    };
    let (k, v) = kv?;
    let key = key_u64(&k);
    match open_value(key, &v) {
        Ok((first, body, spans)) if record::is_pack(&v) && spans.len() > 1 && seq >= first => {
            let none = ClientCredentials::default();
            let placeholder = record::encode(
                &RecordRef {
                    kind: crate::event::EventKind::Native,
                    received_ms: 0,
                    id: uuid::Uuid::nil(),
                    routes: &[],
                    creds: &none,
                    payload: b"",
                },
                compression,
            );
            let records = spans.into_iter().enumerate().map(|(i, span)| {
                if first + i as u64 == seq {
                    &placeholder.value[..]
                } else {
                    &body[span]
                }
            });
            t.log.insert(k, record::pack(records, compression))?;
        }
        Ok((first, _, _)) if seq >= first => {
            t.log.remove(k)?;
            remove_chunks(&t.chunks, key)?;
        }
        Err(_) if key == seq => {
            t.log.remove(k)?;
        }
        _ => {}
    }
    Ok(())
}

/// Removes the chunks whose log record is gone. The collector and eviction remove a large
/// record, then its chunks; a crash between the two left the chunks on disk for good (and
/// every compaction copied them). One step per large record: each looks up the first chunk
/// at or after a number, then that number's record.
fn remove_orphan_chunks(t: &Trees) -> Result<u64, QueueError> {
    let mut from = 0u64;
    let mut removed = 0u64;
    while let Some(k) = t.chunks.range(chunk_key(from, 0)..).keys().next() {
        let seq = key_u64(&k?[..8]);
        if !t.log.contains_key(seq.to_be_bytes())? {
            remove_chunks(&t.chunks, seq)?;
            removed += 1;
        }
        let Some(next) = seq.checked_add(1) else {
            break;
        };
        from = next;
    }
    if removed > 0 {
        tracing::info!(
            records = removed,
            "removed the chunks of large records a crash left without their record"
        );
    }
    Ok(removed)
}

/// Removes every chunk of records numbered `from` and above.
fn remove_chunks_from(tree: &sled::Tree, from: u64) -> Result<(), QueueError> {
    let mut batch = sled::Batch::default();
    for k in tree.range(chunk_key(from, 0)..).keys() {
        batch.remove(k?);
    }
    tree.apply_batch(batch)?;
    Ok(())
}

fn remove_chunks(tree: &sled::Tree, seq: u64) -> Result<(), QueueError> {
    let mut batch = sled::Batch::default();
    for k in tree.range(chunk_key(seq, 0)..chunk_key(seq + 1, 0)).keys() {
        batch.remove(k?);
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// Whether a task run at most every `every_ms` is due at `now`, claiming its turn if so (one
/// caller wins when several ask at once).
fn take_turn(last: &AtomicU64, now: u64, every_ms: u64) -> bool {
    let prev = last.load(Ordering::Relaxed);
    now.saturating_sub(prev) >= every_ms
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Gives the follow-up ids of a store written before they carried their time the time of
/// this open (so they are kept `FOLLOW_UP_IDS_KEEP_MS` from now), once.
fn time_follow_up_ids(t: &Trees) -> Result<(), QueueError> {
    if t.meta.contains_key(FOLLOW_UP_IDS_TIMED)? {
        return Ok(());
    }
    let now = now_ms().to_be_bytes();
    for kv in t.remote.iter() {
        let (k, v) = kv?;
        if v.len() == 8 {
            let mut nv = [0u8; 16];
            nv[..8].copy_from_slice(&v);
            nv[8..].copy_from_slice(&now);
            t.remote.insert(k, &nv)?;
        }
    }
    for kv in t.meta.scan_prefix(GROUP_PREFIX) {
        let (k, v) = kv?;
        if v.is_empty() {
            t.meta.insert(k, &now)?;
        }
    }
    t.meta.insert(FOLLOW_UP_IDS_TIMED, &[])?;
    t.sync()
}

const GROUP_PREFIX: &[u8; 6] = b"group/";
const NOT_BEFORE_PREFIX: &[u8; 11] = b"not_before/";

fn not_before_key(sink: u16) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..11].copy_from_slice(NOT_BEFORE_PREFIX);
    k[11..].copy_from_slice(&sink.to_be_bytes());
    k
}

fn group_key(seq: u64) -> [u8; 14] {
    let mut k = [0u8; 14];
    k[..6].copy_from_slice(GROUP_PREFIX);
    k[6..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn pair_key(sink: u16, seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(&sink.to_be_bytes());
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_u64(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

/// Creates the data directory `0700`, or makes an existing one `0700`: the queue holds the API
/// keys apps send with their events, and a directory made by hand (`mkdir`, mode `0755` under
/// the usual umask) left them readable by every local user. If it cannot be changed (owned by
/// another user), the daemon says so and goes on.
fn create_private_dir(dir: &Path) -> Result<(), QueueError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(QueueError::DataDir {
            path: dir.to_path_buf(),
            problem: "exists and is not a directory".into(),
        });
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| QueueError::DataDir {
            path: dir.to_path_buf(),
            problem: e.to_string(),
        })?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| QueueError::DataDir {
            path: dir.to_path_buf(),
            problem: e.to_string(),
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700)) {
            Ok(()) => tracing::info!(
                data_dir = %dir.display(),
                was = %format!("{:04o}", mode & 0o7777),
                "made the data directory private (0700): it holds the apps' API keys"
            ),
            Err(e) => tracing::warn!(
                data_dir = %dir.display(),
                mode = %format!("{:04o}", mode & 0o7777),
                error = %e,
                "the data directory is readable by other users and could not be made private: the API keys apps send are stored in it"
            ),
        }
    }
    Ok(())
}

/// An exclusive `flock` on `<data_dir>/llmlogd.lock` holding the owner's pid, so a second
/// daemon on the same data dir refuses to start and says who holds it.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, QueueError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        let path: PathBuf = dir.join("llmlogd.lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| QueueError::DataDir {
                path: path.clone(),
                problem: e.to_string(),
            })?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            let holder = s
                .trim()
                .parse::<u32>()
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(QueueError::Locked {
                path: dir.to_path_buf(),
                holder,
            });
        }
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "{}", std::process::id());
        Ok(DirLock { _file: f })
    }
}

#[cfg(test)]
impl Queue {
    /// Takes the store away, as a storage error does until it can be reopened: every
    /// operation fails with `Storage` meanwhile (tests of what other stages do then).
    pub(crate) fn take_store_for_test(&self) {
        self.shared.taken_by_test.store(true, Ordering::Relaxed);
        drop(self.shared.trees.write().take());
    }

    /// Opens the store again, as the writer does after a storage error; from then on the
    /// writer does so by itself as in the daemon.
    pub(crate) fn reopen_store_for_test(&self) {
        reopen(&self.shared);
        self.shared.taken_by_test.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
