//! `llmlogd fsck`: check the store offline, and with `repair` fix what can be fixed.
//!
//! | finding | repair |
//! |---|---|
//! | a log record that does not decode | moved to the dead letters of every sink it names (or of sink id 0xFFFF when its routes are unreadable), then removed from the log (inside a pack: replaced by a record routed nowhere, so the pack's numbering stays) |
//! | a pack that does not open | moved whole to the dead letters of sink id 0xFFFF under its key, then removed |
//! | chunks with no log record | removed |
//! | a cursor for a sink id no name maps to | removed |
//! | a dead letter that does not decode | kept (it is shown as unreadable by `dlq list`); counted |
//! | `next_seq` behind the log | raised |
//! | the store opened short of its high-water mark (`queue.mark`: acknowledged events lost to a damaged file) | none can bring the events back; reported, recorded in the store (the daemon's metrics and status report it after any restart), and numbering goes on above the mark (any open does that, `fsck` without `--repair` too, so it is found once) |
//!
//! Nothing acknowledged is deleted: a corrupt record becomes a dead letter, where an operator
//! can still look at its bytes.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::dlq::DeadLetterInfo;
use super::{key_u64, record, Queue, QueueError};

/// What `fsck` found (and repaired, when asked).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct FsckReport {
    pub records: u64,
    pub corrupt_records: Vec<u64>,
    pub orphan_chunks: u64,
    pub orphan_cursors: u64,
    pub unreadable_dead_letters: u64,
    pub next_seq_behind: bool,
    /// The store opened short of its high-water mark: events were lost to damage.
    pub behind_mark: Option<super::BehindMark>,
    /// Every loss on record for this store (this open's included): the daemon reports the
    /// same, after any restart.
    pub loss: Option<super::LossRecord>,
    pub repaired: bool,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        !self.has_repairable() && self.behind_mark.is_none()
    }

    /// Whether it found something `--repair` fixes: everything but lost events, which no
    /// repair can bring back.
    pub fn has_repairable(&self) -> bool {
        !self.corrupt_records.is_empty()
            || self.orphan_chunks != 0
            || self.orphan_cursors != 0
            || self.next_seq_behind
    }
}

/// Dead-letter sink id for records whose routes cannot be read.
pub const UNKNOWN_SINK: u16 = 0xFFFF;

impl Queue {
    /// Checks the store; with `repair`, fixes what it found (see the module table).
    pub fn fsck(&self, repair: bool) -> Result<FsckReport, QueueError> {
        let mut r = FsckReport {
            repaired: repair,
            behind_mark: self.behind_mark(),
            loss: self.loss(),
            ..FsckReport::default()
        };
        let mut chunked = std::collections::BTreeSet::new();
        let mut corrupt: Vec<(u64, Vec<u16>)> = Vec::new();
        let mut last_seq = None;
        {
            let t = self.shared.trees()?;
            for kv in t.log.iter() {
                let (k, v) = kv?;
                let key = key_u64(&k);
                last_seq = Some(key);
                if record::chunked_len(&v).is_some() {
                    chunked.insert(key);
                }
                let Ok((first, body, spans)) = super::open_value(key, &v) else {
                    // A pack that does not open: its routes are unknown.
                    r.records += record::count_of(&v);
                    corrupt.push((key, Vec::new()));
                    continue;
                };
                r.records += spans.len() as u64;
                for (i, span) in spans.into_iter().enumerate() {
                    let seq = first + i as u64;
                    let rec = &body[span];
                    let ok =
                        record::decode(seq, rec, |len| super::read_chunks(&t.chunks, seq, len));
                    if ok.is_err() {
                        let routes = record::routes_of(rec)
                            .map(|i| i.collect::<Vec<_>>())
                            .unwrap_or_default();
                        corrupt.push((seq, routes));
                    }
                }
            }
            for k in t.chunks.iter().keys() {
                let k = k?;
                if !chunked.contains(&key_u64(&k[..8.min(k.len())])) {
                    r.orphan_chunks += 1;
                    if repair {
                        t.chunks.remove(k)?;
                    }
                }
            }
            let known: Vec<u16> = t
                .sinks
                .iter()
                .values()
                .filter_map(|v| v.ok())
                .map(|v| u16::from_be_bytes([v[0], v[1]]))
                .collect();
            for k in t.cursors.iter().keys() {
                let k = k?;
                if k.len() != 2 || !known.contains(&u16::from_be_bytes([k[0], k[1]])) {
                    r.orphan_cursors += 1;
                    if repair {
                        t.cursors.remove(k)?;
                    }
                }
            }
            let next = t.meta.get("next_seq")?.map(|v| key_u64(&v)).unwrap_or(0);
            if let Some(last) = last_seq {
                if next <= last {
                    r.next_seq_behind = true;
                    if repair {
                        t.meta.insert("next_seq", &(last + 1).to_be_bytes())?;
                    }
                }
            }
        }
        r.unreadable_dead_letters = self
            .dead_letters(None, usize::MAX)?
            .iter()
            .filter(|d| d.event.is_err())
            .count() as u64;
        r.corrupt_records = corrupt.iter().map(|(s, _)| *s).collect();
        if repair {
            for (seq, routes) in corrupt {
                let sinks = if routes.is_empty() {
                    vec![UNKNOWN_SINK]
                } else {
                    routes
                };
                for sink in sinks {
                    self.dead_letter(sink, seq, DeadLetterInfo::new("?", "corrupt record (fsck)"))?;
                }
                let t = self.shared.trees()?;
                super::remove_record(&t, seq, self.shared.cfg.compression)?;
            }
            let t = self.shared.trees()?;
            // What was removed leaves the counts: the close after a repair keeps them in the
            // store for the daemon's next open, which takes them instead of counting.
            let (events, bytes) = super::count_log(&t)?;
            self.shared.events.store(events, Ordering::Relaxed);
            self.shared.bytes.store(bytes, Ordering::Relaxed);
            t.sync()?;
        }
        Ok(r)
    }
}
