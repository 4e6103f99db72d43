//! Queue errors, typed so ingest can map each to the right reply without reading strings.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The byte or event cap is reached and `when_full = "reject"`.
    #[error("queue is full ({reason}); retry later")]
    Full { reason: &'static str },
    /// The write alone (with what its group commit already holds) exceeds the cap: no
    /// eviction or wait could make room for it.
    #[error("this write alone exceeds the queue's cap ({reason}): it can never be stored; send fewer events at once or raise the cap")]
    OverCap { reason: &'static str },
    /// One event's stored form exceeds what a record may hold.
    #[error("event is too large to store ({bytes} bytes after encoding; limit {limit})")]
    TooLarge { bytes: usize, limit: usize },
    /// The disk has no room; nothing of this write was acknowledged.
    #[error("no space left on the device holding the queue")]
    NoSpace,
    /// Storage failed (I/O error, sled error); nothing of this write was acknowledged.
    #[error("storage error: {0}")]
    Storage(String),
    /// The writer is gone (shutting down).
    #[error("queue is shutting down")]
    Closed,
    /// Too many writes are waiting for the disk.
    #[error("queue is busy; retry later")]
    Busy,
    /// The store was opened again after a storage error since the caller read its state:
    /// writes it had not synced may be gone, so what the caller holds in memory may be ahead
    /// of the store (see [`super::Queue::store_epoch`]).
    #[error("the queue store was opened again after a storage error; read its state again")]
    Reopened,
    #[error("data directory {path}: {problem}")]
    DataDir { path: PathBuf, problem: String },
    #[error("data directory {path} is in use by another llmlogd{holder}")]
    Locked { path: PathBuf, holder: String },
}

impl QueueError {
    /// True where the client should simply try again later (503 rather than 500).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            QueueError::Full { .. } | QueueError::NoSpace | QueueError::Busy | QueueError::Closed
        )
    }
}

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => io.into(),
            other => {
                // sled wraps some I/O failures in its own variants; a full disk must still be
                // reported as such (507, retry later), not as a generic storage failure.
                let msg = other.to_string();
                if mentions_no_space(&msg) {
                    QueueError::NoSpace
                } else {
                    QueueError::Storage(msg)
                }
            }
        }
    }
}

impl From<std::io::Error> for QueueError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC)
            || e.raw_os_error() == Some(libc::EDQUOT)
            || e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded
            || mentions_no_space(&e.to_string())
        {
            QueueError::NoSpace
        } else {
            QueueError::Storage(e.to_string())
        }
    }
}

fn mentions_no_space(msg: &str) -> bool {
    msg.contains("No space left on device")
        || msg.contains("StorageFull")
        || msg.contains("code: 28,")
}
