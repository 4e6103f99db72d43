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
}
