//! The queue's high-water mark, kept beside the store in `<data_dir>/queue.mark`: the next
//! sequence number as the writer last synced it, rewritten at most every [`MARK_EVERY`] and at
//! a clean close.
//!
//! Why: sled recovers its log up to the first page whose checksum fails and drops the rest
//! without a word, because that is what the torn end of a crash looks like. A damaged file (a
//! bad sector, a flipped byte, a file cut short) therefore opens as a smaller store, with
//! acknowledged events gone and nothing logged. The mark is a second, independent record of
//! how far the store had got: at open, a store whose numbering stops short of its mark is
//! reported (an error line at start, and by `fsck`), and numbering resumes above the mark, so
//! no new event takes a number a sink's cursor may already be past.
//!
//! The mark never runs ahead of what was synced (it is written from the committed head), so a
//! crash, `kill -9` or power loss cannot raise a false alarm: at worst it lags.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the writer rewrites the mark while events arrive: events acknowledged within the
/// last interval before a damage may go unreported, nothing else does. A rewrite (create,
/// write, `fdatasync`, rename) takes the writer ~0.3 ms on the bench machine's disk, so once a
/// second costs ~0.03 % of its time and delays one commit a second by that much.
pub(crate) const MARK_EVERY: Duration = Duration::from_secs(1);

const FILE: &str = "queue.mark";
const HEADER: &str = "llmlogd queue mark v1";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The mark's next sequence number; `None` when there is no mark (a store from before marks,
/// or one that was never closed nor written to) or it does not read as one.
pub(crate) fn read(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path(dir)).ok()?;
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    lines.next()?.strip_prefix("next_seq ")?.parse().ok()
}

/// Replaces the mark: a new file, synced, renamed over the old one, so a crash leaves either.
pub(crate) fn write(dir: &Path, next_seq: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    write!(f, "{HEADER}\nnext_seq {next_seq}\n")?;
    f.sync_data()?;
    std::fs::rename(&tmp, path(dir))
}

/// Where a store that opened short of its mark stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BehindMark {
    /// The next sequence number the store itself gave (its log, cursors and `next_seq`).
    pub found: u64,
    /// The mark's: every number below it was handed out to an acknowledged event.
    pub mark: u64,
}

impl BehindMark {
    /// The sequence numbers between the two: the most acknowledged events that can have been
    /// lost (those already delivered everywhere, or routed nowhere, were lost to no one).
    pub fn lost(&self) -> u64 {
        self.mark - self.found
    }
}

/// What the store keeps of the losses it was opened with, in `meta` under [`LOSS_KEY`], so
/// they stay reported after the restart that found them (by the gauge, the status and `fsck`)
/// instead of only until the next one: an alert must not clear because the daemon restarted,
/// nor miss a loss that `fsck` happened to open first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LossRecord {
    /// Sequence numbers lost, over every open that found the store short of its mark.
    pub total: u64,
    /// The latest such open.
    pub last: BehindMark,
    /// When it was found (Unix ms).
    pub at_ms: u64,
}

pub(crate) const LOSS_KEY: &str = "lost_events";

impl LossRecord {
    pub(crate) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.total, self.last.found, self.last.mark, self.at_ms]
            .into_iter()
            .enumerate()
        {
            b[i * 8..(i + 1) * 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    /// `None` for anything that is not a record this code wrote.
    pub(crate) fn decode(b: &[u8]) -> Option<LossRecord> {
        let b: &[u8; 32] = b.try_into().ok()?;
        let at = |i: usize| u64::from_be_bytes(b[i * 8..(i + 1) * 8].try_into().unwrap());
        Some(LossRecord {
            total: at(0),
            last: BehindMark {
                found: at(1),
                mark: at(2),
            },
            at_ms: at(3),
        })
    }

    /// This record with one more loss added.
    pub(crate) fn add(prev: Option<LossRecord>, b: BehindMark, at_ms: u64) -> LossRecord {
        LossRecord {
            total: prev.map_or(0, |p| p.total).saturating_add(b.lost()),
            last: b,
            at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_and_anything_else_is_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        write(dir.path(), 12_345).unwrap();
        assert_eq!(read(dir.path()), Some(12_345));
        write(dir.path(), 7).unwrap();
        assert_eq!(read(dir.path()), Some(7));
        std::fs::write(path(dir.path()), "something else\nnext_seq 9\n").unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::write(path(dir.path()), format!("{HEADER}\nnext_seq x\n")).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn a_loss_record_reads_back_and_adds_up() {
        let first = LossRecord::add(None, BehindMark { found: 3, mark: 10 }, 1_000);
        assert_eq!(first.total, 7);
        let second = LossRecord::add(
            Some(first),
            BehindMark {
                found: 20,
                mark: 25,
            },
            2_000,
        );
        assert_eq!(second.total, 12);
        assert_eq!(
            second.last,
            BehindMark {
                found: 20,
                mark: 25
            }
        );
        assert_eq!(LossRecord::decode(&second.encode()), Some(second));
        assert_eq!(LossRecord::decode(&[0u8; 31]), None);
    }
}
