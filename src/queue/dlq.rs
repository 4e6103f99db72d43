//! Dead letters: events a sink gave up on, kept with why, until replayed or purged.
//!
//! Key: sink id (u16 BE) + seq (u64 BE). Value: u32 BE length + JSON [`DeadLetterInfo`],
//! then the original record value (`record.rs`); a chunked payload is copied into
//! `dlq_chunks` under the same key + chunk index, so a dead letter outlives its log record.

use serde::{Deserialize, Serialize};

use super::record::{self, CHUNK};
use super::store::Trees;
use super::{key_u64, Queue, QueueError, RecordError};
use crate::event::{now_ms, StoredEvent};

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
        if let Some(len) = record::chunked_len(&value) {
            let payload = super::read_chunks(&t.chunks, seq, len).unwrap_or_default();
            let mut b = sled::Batch::default();
            for (i, c) in payload.chunks(CHUNK).enumerate() {
                b.insert(&dlq_chunk_key(sink, seq, i as u32)[..], c);
            }
            t.dlq_chunks.apply_batch(b)?;
        }
        let meta = serde_json::to_vec(&info).map_err(|e| QueueError::Storage(e.to_string()))?;
        let mut v = Vec::with_capacity(4 + meta.len() + value.len());
        v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        v.extend_from_slice(&meta);
        v.extend_from_slice(&value);
        t.dlq.insert(dlq_key(sink, seq), v)?;
        Ok(())
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

    pub fn dead_letter_count(&self) -> u64 {
        self.shared.trees().map(|t| t.dlq.len() as u64).unwrap_or(0)
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
        let existed = t.dlq.remove(dlq_key(sink, seq))?.is_some();
        let mut b = sled::Batch::default();
        for k in t
            .dlq_chunks
            .range(dlq_chunk_key(sink, seq, 0)..dlq_chunk_key(sink, seq, u32::MAX))
            .keys()
        {
            b.remove(k?);
        }
        t.dlq_chunks.apply_batch(b)?;
        Ok(existed)
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
            for kv in t
                .dlq_chunks
                .range(dlq_chunk_key(sink_id, seq, 0)..dlq_chunk_key(sink_id, seq, u32::MAX))
            {
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
