//! The sled store under `<data_dir>/queue`, and giving disk space back.
//!
//! sled never shrinks its files: after a large backlog drains, the data directory stays as big
//! as the backlog was. Compaction copies the few live records into a fresh store and swaps it
//! in, crash-safely:
//!
//! 1. build `queue.compact/`, copy every tree, flush + fsync, write `COMPLETE` (fsynced);
//! 2. close both stores; rename `queue` → `queue.old`, `queue.compact` → `queue`; fsync the dir;
//! 3. remove `queue.old`; reopen `queue`.
//!
//! [`Trees::open`] finishes or undoes an interrupted compaction: a `queue.compact` without
//! `COMPLETE` is deleted; with `COMPLETE` and no `queue` it is renamed into place; a leftover
//! `queue.old` is deleted once `queue` exists. At every step one complete store is on disk.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::QueueError;
use crate::config::QueueConfig;

/// sled segment size: pages up to a quarter of it stay in the log file that we fsync.
pub(crate) const SEGMENT_SIZE: usize = 2 << 20;
const COMPLETE: &str = "COMPLETE";

pub(crate) struct Trees {
    pub db: sled::Db,
    pub log: sled::Tree,
    pub chunks: sled::Tree,
    pub sinks: sled::Tree,
    pub cursors: sled::Tree,
    pub dlq: sled::Tree,
    pub dlq_chunks: sled::Tree,
    pub remote: sled::Tree,
    pub meta: sled::Tree,
}

/// The vendored sled's flush ends each buffer write with `fdatasync` (`vendor/sled/PATCHED.md`,
/// fix 3), and [`Trees::sync`] relies on it. The published sled 0.34.7 only calls
/// `sync_file_range`, which leaves the drive's cache and the file's size unsynced: built
/// against it, this line does not compile, so the guarantee cannot be lost unseen.
const _: () = sled::LLMLOGD_FLUSH_IS_FDATASYNC;

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("queue"),
        dir.join("queue.compact"),
        dir.join("queue.old"),
    )
}

impl Trees {
    /// Opens the store in `dir` (the data directory), first settling any interrupted compaction.
    pub fn open(dir: &Path, cfg: &QueueConfig) -> Result<Trees, QueueError> {
        let (live, fresh, old) = paths(dir);
        if fresh.exists() {
            if fresh.join(COMPLETE).exists() && !live.exists() {
                std::fs::rename(&fresh, &live)?;
                sync_dir(dir)?;
            } else {
                std::fs::remove_dir_all(&fresh)?;
            }
        }
        if old.exists() {
            if live.exists() {
                std::fs::remove_dir_all(&old)?;
            } else {
                std::fs::rename(&old, &live)?;
                sync_dir(dir)?;
            }
        }
        Self::open_at(&live, cfg)
    }

    fn open_at(path: &Path, cfg: &QueueConfig) -> Result<Trees, QueueError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cfg.cache_bytes)
            .segment_size(SEGMENT_SIZE)
            .mode(sled::Mode::HighThroughput);
        // sled releases its file lock only when the last handle on the store's internals is
        // dropped, and some of those are dropped late (epoch-deferred, or held by its I/O
        // threads): a store closed a moment ago in this process (compaction's swap, a reopen
        // after a storage error, a restart in tests) may still hold it. Another process cannot
        // (the data directory's own lock keeps it out), so wait for it, within a bound.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut pause = std::time::Duration::from_millis(1);
        let opened = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().starts_with("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(50));
                }
                other => break other,
            }
        };
        let db = opened.map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                QueueError::DataDir {
                    path: path.to_path_buf(),
                    problem: format!("permission denied ({io})"),
                }
            }
            other => QueueError::from(other),
        })?;
        Ok(Trees {
            log: db.open_tree("log")?,
            chunks: db.open_tree("chunks")?,
            sinks: db.open_tree("sinks")?,
            cursors: db.open_tree("cursors")?,
            dlq: db.open_tree("dlq")?,
            dlq_chunks: db.open_tree("dlq_chunks")?,
            remote: db.open_tree("remote")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    fn named(&self) -> [(&'static str, &sled::Tree); 8] {
        [
            ("log", &self.log),
            ("chunks", &self.chunks),
            ("sinks", &self.sinks),
            ("cursors", &self.cursors),
            ("dlq", &self.dlq),
            ("dlq_chunks", &self.dlq_chunks),
            ("remote", &self.remote),
            ("meta", &self.meta),
        ]
    }

    /// Everything written so far survives power loss once this returns: sled's flush writes
    /// what its buffers hold and `fdatasync`s the log file (the vendored sled, see above).
    pub fn sync(&self) -> Result<(), QueueError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Compaction copies the live records in sled batches of about this many bytes. A batch is
/// resident several times over while sled applies it (the batch, the new nodes, the I/O
/// buffers they are written through), so its size, not the live size, decides most of what
/// compaction adds to RSS: copying 60 MiB of live records took RSS up by ~150 MiB in batches of
/// 4,096 values (up to 64 MiB), by ~50 MiB in 1 MiB batches and 26-47 MiB in 256 KiB ones
/// (BENCHMARKS.md F35), and was faster too.
const COPY_BATCH_BYTES: usize = 256 << 10;
/// How long opening waits for sled's lock to be released by a store closed in this process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Copies the live contents of `current` into a fresh store and swaps it in. The caller holds
/// the store exclusively (no other reader or writer) and passes it by value; on success the
/// compacted store is returned, on failure the original (reopened) one, or the error when even
/// that cannot be opened.
pub(crate) fn compact(
    current: Trees,
    dir: &Path,
    cfg: &QueueConfig,
) -> (Result<Trees, QueueError>, Option<QueueError>) {
    let (live, fresh_path, old) = paths(dir);
    let copy = (|| -> Result<(), QueueError> {
        if fresh_path.exists() {
            std::fs::remove_dir_all(&fresh_path)?;
        }
        let fresh = Trees::open_at(&fresh_path, cfg)?;
        for ((_, src), (_, dst)) in current.named().iter().zip(fresh.named().iter()) {
            let mut batch = sled::Batch::default();
            let mut bytes = 0;
            for kv in src.iter() {
                let (k, v) = kv?;
                bytes += k.len() + v.len();
                batch.insert(k, v);
                if bytes >= COPY_BATCH_BYTES {
                    dst.apply_batch(std::mem::take(&mut batch))?;
                    bytes = 0;
                }
            }
            dst.apply_batch(batch)?;
        }
        fresh.sync()?;
        drop(fresh);
        let marker = File::create(fresh_path.join(COMPLETE))?;
        marker.sync_all()?;
        sync_dir(&fresh_path)?;
        Ok(())
    })();
    if let Err(e) = copy {
        let _ = std::fs::remove_dir_all(&fresh_path);
        return (Ok(current), Some(e));
    }
    // Close the running store before moving directories (sled opens files by path).
    if let Err(e) = current.sync() {
        let _ = std::fs::remove_dir_all(&fresh_path);
        return (Ok(current), Some(e));
    }
    drop(current);
    let swap = (|| -> Result<(), QueueError> {
        std::fs::rename(&live, &old)?;
        std::fs::rename(&fresh_path, &live)?;
        sync_dir(dir)?;
        Ok(())
    })();
    let swap_err = swap.err();
    if swap_err.is_none() {
        let _ = std::fs::remove_dir_all(&old);
        let _ = std::fs::remove_file(live.join(COMPLETE));
    }
    // `open` settles whatever state the renames reached.
    (Trees::open(dir, cfg), swap_err)
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem holding `p`; `None` when it cannot
/// be asked.
pub(crate) fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct we pass, from a valid C string path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes the store's files occupy on disk.
pub(crate) fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}

/// Whether the open store's files are still where it was opened: sled keeps writing to its
/// open files after they are removed (the data directory deleted, or a cleaner emptying it),
/// and a sync of a removed file survives no restart. The writer checks after a group commit's
/// sync, before its acks, at most every `PRESENT_CHECK_MS` (see there). Only the writer thread
/// moves these files (compaction), so it never sees them mid-rename.
pub(crate) fn present(dir: &Path) -> bool {
    paths(dir).0.join("db").exists()
}

/// Whether `dir` holds a store (or one mid-compaction), before [`Trees::open`] creates one.
pub(crate) fn exists(dir: &Path) -> bool {
    let (live, fresh, old) = paths(dir);
    live.exists() || fresh.exists() || old.exists()
}
