//! Dead letters: events a sink gave up on, kept with why, until replayed or purged.
//!
//! Key: sink id (u16 BE) + seq (u64 BE). Value: u32 BE length + JSON [`DeadLetterInfo`],
//! then the original record value (`record.rs`); a chunked payload is copied into
//! `dlq_chunks` under the same key + chunk index, so a dead letter outlives its log record.
//!
//! Bounded: the dead letters' bytes (values and chunks) are counted as they come and go, and
//! kept under `queue.dead_letter_max_bytes` by dropping the oldest (lowest seq, any sink) when
//! a new one goes over it. A sink that refuses every event (a schema change at the remote end)
//! would otherwise fill the disk with dead letters until ingest itself ran out of space. The
//! counts are kept in `meta` at a clean close and counted again after a crash, like the log's.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::record::{self, CHUNK};
use super::store::Trees;
use super::{key_u64, sub, Queue, QueueError, RecordError};
use crate::event::{now_ms, StoredEvent};
use crate::ops::log_throttle::LogThrottle;

/// `meta` key of the dead letters' count and bytes as a clean close left them.
pub(super) const DLQ_COUNTS_AT_CLOSE: &str = "dlq_counts_at_close";

/// One line per this many milliseconds about dead letters dropped over the cap.
static DROP_LOG: LogThrottle = LogThrottle::new(10_000);

/// Largest response body kept with a dead letter.
const MAX_RESPONSE: usize = 2048;

/// Why and when a sink gave up on an event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetterInfo {
    pub sink: String,
    pub reason: String,
    pub status: Option<u16>,
    pub response: Option<String>,
    pub attempts: u32,
    pub first_attempt_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    pub dead_ms: u64,
}

impl DeadLetterInfo {
    pub fn new(sink: &str, reason: impl Into<String>) -> Self {
        DeadLetterInfo {
            sink: sink.to_string(),
            reason: reason.into(),
            status: None,
            response: None,
            attempts: 0,
            first_attempt_ms: None,
            last_attempt_ms: None,
            dead_ms: now_ms(),
        }
    }
}

/// A dead letter as listed: its info, and the event when it still decodes.
#[derive(Debug)]
pub struct DeadLetter {
    pub sink_id: u16,
    pub seq: u64,
    pub info: DeadLetterInfo,
    pub event: Result<StoredEvent, RecordError>,
}

fn dlq_key(sink: u16, seq: u64) -> [u8; 10] {
    super::pair_key(sink, seq)
}

fn dlq_chunk_key(sink: u16, seq: u64, idx: u32) -> [u8; 14] {
    let mut k = [0u8; 14];
    k[..10].copy_from_slice(&dlq_key(sink, seq));
    k[10..].copy_from_slice(&idx.to_be_bytes());
    k
}

impl Queue {
    /// Moves `seq` (as stored in the log) into the dead letters of `sink`.
    pub fn dead_letter(
        &self,
        sink: u16,
        seq: u64,
        mut info: DeadLetterInfo,
    ) -> Result<(), QueueError> {
        let t = self.shared.trees()?;
        // A pack that does not open is kept whole, under its key.
        let value = match super::record_at(&t, seq)? {
            None => return Ok(()),
            Some(Ok(record)) => record,
            Some(Err((raw, _))) => raw,
        };
        if let Some(r) = info.response.as_mut() {
            truncate_utf8(r, MAX_RESPONSE);
        }
        // The bytes its chunks take, for the counts.
        let mut chunks = 0;
        if let Some(len) = record::chunked_len(&value) {
            let payload = super::read_chunks(&t.chunks, seq, len).unwrap_or_default();
            let mut b = sled::Batch::default();
            for (i, c) in payload.chunks(CHUNK).enumerate() {
                b.insert(&dlq_chunk_key(sink, seq, i as u32)[..], c);
            }
            t.dlq_chunks.apply_batch(b)?;
            chunks = payload.len() as u64;
        }
        let meta = serde_json::to_vec(&info).map_err(|e| QueueError::Storage(e.to_string()))?;
        let mut v = Vec::with_capacity(4 + meta.len() + value.len());
        v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        v.extend_from_slice(&meta);
        v.extend_from_slice(&value);
        let len = v.len() as u64;
        let sh = &self.shared;
        match t.dlq.insert(dlq_key(sink, seq), v)? {
            // The same event given up on again (delivered again after a restart): its chunks
            // were rewritten in place, only the value's size changed.
            Some(old) => {
                sh.dlq_bytes.fetch_add(len, Ordering::Relaxed);
                sub(&sh.dlq_bytes, old.len() as u64);
            }
            None => {
                sh.dlq_count.fetch_add(1, Ordering::Relaxed);
                sh.dlq_bytes.fetch_add(len + chunks, Ordering::Relaxed);
            }
        }
        self.trim_dead_letters(&t, dlq_key(sink, seq))
    }

    /// Drops the oldest dead letters (lowest seq, whichever sink) while they take more than
    /// `dead_letter_max_bytes`; the one just added (`keep`) is never dropped, so one letter
    /// larger than the cap stays alone.
    pub(super) fn trim_dead_letters(&self, t: &Trees, keep: [u8; 10]) -> Result<(), QueueError> {
        let cap = self.shared.caps.load().dead_letter_max_bytes;
        while self.shared.dlq_bytes.load(Ordering::Relaxed) > cap {
            let Some((sink, seq)) = oldest_dead_letter(t, keep)? else {
                break;
            };
            if self.remove_letter(t, sink, seq)? {
                self.shared.dlq_dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(skipped) = DROP_LOG.ready() {
                    tracing::warn!(
                        sink_id = sink,
                        seq,
                        skipped,
                        cap,
                        "dead letters over queue.dead_letter_max_bytes: the oldest was dropped to make room (llmlogd_dead_letters_dropped_total counts them)"
                    );
                }
            }
        }
        Ok(())
    }

    /// Removes one dead letter and its chunks, and takes them off the counts. Returns whether
    /// it was there (another thread may have removed it first).
    fn remove_letter(&self, t: &Trees, sink: u16, seq: u64) -> Result<bool, QueueError> {
        let Some(old) = t.dlq.remove(dlq_key(sink, seq))? else {
            return Ok(false);
        };
        let mut b = sled::Batch::default();
        let mut freed = old.len() as u64;
        for kv in letter_chunks(t, sink, seq) {
            let (k, c) = kv?;
            freed += c.len() as u64;
            b.remove(k);
        }
        t.dlq_chunks.apply_batch(b)?;
        sub(&self.shared.dlq_count, 1);
        sub(&self.shared.dlq_bytes, freed);
        Ok(true)
    }

    /// Dead letters, optionally of one sink, oldest first; at most `limit`.
    pub fn dead_letters(
        &self,
        sink: Option<u16>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        let t = self.shared.trees()?;
        let iter = match sink {
            Some(s) => t.dlq.scan_prefix(s.to_be_bytes()),
            None => t.dlq.iter(),
        };
        let mut out = Vec::new();
        for kv in iter.take(limit) {
            let (k, v) = kv?;
            out.push(decode_dead(&t, &k, &v));
        }
        Ok(out)
    }

    /// How many dead letters there are (counted as they come and go: no scan).
    pub fn dead_letter_count(&self) -> u64 {
        self.shared.dlq_count.load(Ordering::Relaxed)
    }

    /// What the dead letters take: their values and chunks, before sled's own overhead.
    pub fn dead_letter_bytes(&self) -> u64 {
        self.shared.dlq_bytes.load(Ordering::Relaxed)
    }

    /// Dead letters dropped over `dead_letter_max_bytes` since the queue opened.
    pub fn dead_letters_dropped(&self) -> u64 {
        self.shared.dlq_dropped.load(Ordering::Relaxed)
    }

    /// One dead letter.
    pub fn dead_letter_get(&self, sink: u16, seq: u64) -> Result<Option<DeadLetter>, QueueError> {
        let t = self.shared.trees()?;
        let k = dlq_key(sink, seq);
        Ok(t.dlq.get(k)?.map(|v| decode_dead(&t, &k, &v)))
    }

    /// Removes one dead letter (after replay, or by `purge`).
    pub fn dead_letter_remove(&self, sink: u16, seq: u64) -> Result<bool, QueueError> {
        let t = self.shared.trees()?;
        self.remove_letter(&t, sink, seq)
    }

    /// Puts dead letters back into the queue for their sink: each becomes a new record
    /// (new seq, same event id, received now) routed to that sink only, appended durably; only
    /// then is the dead letter removed. Returns how many were replayed.
    pub async fn replay(&self, sink: Option<u16>, seq: Option<u64>) -> Result<u64, QueueError> {
        let letters = match (sink, seq) {
            (Some(s), Some(q)) => self.dead_letter_get(s, q)?.into_iter().collect(),
            _ => self.dead_letters(sink, usize::MAX)?,
        };
        let mut n = 0;
        for dl in letters {
            let Ok(ev) = dl.event else {
                continue;
            };
            let enc = record::encode(
                &record::RecordRef {
                    kind: ev.kind,
                    // A replay is a fresh start: `max_age` counts from now, or an old event
                    // would go straight back to the dead letters.
                    received_ms: now_ms(),
                    id: ev.id,
                    routes: &[dl.sink_id],
                    creds: &ev.creds,
                    payload: &ev.payload,
                },
                self.shared.cfg.compression,
            );
            self.append(vec![super::Prepared { enc, id: ev.id }])
                .await?;
            self.dead_letter_remove(dl.sink_id, dl.seq)?;
            n += 1;
        }
        Ok(n)
    }
}

/// One dead letter's chunks, in order.
fn letter_chunks(t: &Trees, sink: u16, seq: u64) -> sled::Iter {
    t.dlq_chunks
        .range(dlq_chunk_key(sink, seq, 0)..dlq_chunk_key(sink, seq, u32::MAX))
}

/// The dead letter with the lowest seq over every sink, `keep` aside: the first of each sink's
/// run of keys (one lookup a sink, however many letters there are).
fn oldest_dead_letter(t: &Trees, keep: [u8; 10]) -> Result<Option<(u16, u64)>, QueueError> {
    let mut best: Option<(u16, u64)> = None;
    let mut from = [0u8; 10];
    loop {
        let mut run = t.dlq.range(from..).keys();
        let Some(k) = run.next().transpose()? else {
            break;
        };
        let sink = u16::from_be_bytes([k[0], k[1]]);
        let first = if k[..] == keep[..] {
            run.next().transpose()?.filter(|k2| k2[..2] == k[..2])
        } else {
            Some(k)
        };
        if let Some(k) = first {
            let seq = key_u64(&k[2..]);
            if best.is_none_or(|(_, b)| seq < b) {
                best = Some((sink, seq));
            }
        }
        let Some(next) = sink.checked_add(1) else {
            break;
        };
        from = dlq_key(next, 0);
    }
    Ok(best)
}

/// Counts the dead letters and their bytes by reading them all (after a crash: a clean close
/// leaves the counts in `meta`), and removes chunks no letter has. A letter is removed before
/// its chunks (`remove_letter`), so a crash between the two leaves its chunks behind: counted,
/// they inflated the bytes the cap is checked against for good (every later letter dropped
/// others to make room for bytes that were not there), and nothing else ever removed them.
pub(super) fn count_dead_letters(t: &Trees) -> Result<(u64, u64), QueueError> {
    let (mut count, mut bytes) = (0u64, 0u64);
    for kv in t.dlq.iter() {
        count += 1;
        bytes += kv?.1.len() as u64;
    }
    let mut orphans = sled::Batch::default();
    // Chunks sort by their letter's key: one lookup per letter, not per chunk.
    let mut last: Option<(Vec<u8>, bool)> = None;
    for kv in t.dlq_chunks.iter() {
        let (k, c) = kv?;
        let letter = k.get(..10).unwrap_or(&k[..]);
        let has_letter = match &last {
            Some((l, has)) if l[..] == letter[..] => *has,
            _ => {
                let has = k.len() == 14 && t.dlq.contains_key(letter)?;
                last = Some((letter.to_vec(), has));
                has
            }
        };
        if has_letter {
            bytes += c.len() as u64;
        } else {
            orphans.remove(k);
        }
    }
    t.dlq_chunks.apply_batch(orphans)?;
    Ok((count, bytes))
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Decodes one dead-letter entry (key, value) of store `t`.
fn decode_dead(t: &Trees, k: &[u8], v: &[u8]) -> DeadLetter {
    let sink_id = u16::from_be_bytes([k[0], k[1]]);
    let seq = key_u64(&k[2..]);
    let meta_len = v
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(usize::MAX);
    let info = v
        .get(4..4usize.saturating_add(meta_len))
        .and_then(|m| serde_json::from_slice::<DeadLetterInfo>(m).ok())
        .unwrap_or_else(|| DeadLetterInfo::new("?", "dead letter metadata unreadable"));
    let event = match v.get(4usize.saturating_add(meta_len)..) {
        Some(rec) => record::decode(seq, rec, |len| {
            let mut out = Vec::with_capacity(len);
            for kv in letter_chunks(t, sink_id, seq) {
                let (_, c) = kv.map_err(|_| RecordError("chunk unreadable"))?;
                out.extend_from_slice(&c);
            }
            Ok(out)
        }),
        None => Err(RecordError("dead letter truncated")),
    };
    DeadLetter {
        sink_id,
        seq,
        info,
        event,
    }
}
