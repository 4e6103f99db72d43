//! The storage ceiling: what sled on this disk can take when every commit is made durable the
//! way llmlogd's writer makes it (see `Queue::open` and `writer_loop` in `src/queue/mod.rs`):
//! same sled settings (2 MiB segments, `Mode::HighThroughput`, the same 8 MiB cache), a batch
//! of records under big-endian u64 keys, the `next_seq` mark in a second tree, then `flush()`,
//! which in llmlogd's vendored sled ends with `fdatasync` of sled's `db` file (published sled:
//! `sync_file_range`, not durable; `vendor/sled/PATCHED.md`). Values are real records: the
//! 28-byte header plus the zstd level 1 payload of the bench's events, one per key or several to a value. (llmlogd's
//! packs are smaller still: it compresses a pack's ~8 events as one frame; the ceiling keeps
//! compression out of the measured loop.)
//!
//! Also the queue ceiling: llmlogd's own `Queue` in process (no network, no parsing), with
//! N tasks each appending one event at a time, so the table separates what the storage costs
//! from what the queue's writer adds and what ingest adds on top.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use rand::RngCore;

use crate::load::{self, Outcome, Summary, Window};

/// The largest packed value (llmlogd's queue packs records into values of up to this size).
pub const PACK_BYTES: usize = 16 * 1024;

/// What one group size achieved.
#[derive(Debug)]
pub struct Ceiling {
    pub group: usize,
    /// Records packed into shared sled values (up to `PACK_BYTES` each), not one per key.
    pub packed: bool,
    pub commits: u64,
    pub events: u64,
    pub window: Duration,
    pub commit_latency: Summary,
    /// CPU of the bench process (sled's threads included) during the window, in cores.
    pub cpu: f64,
}

impl Ceiling {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.window.as_secs_f64()
    }
}

/// Queue records for `payloads`, as the writer stores them (no routes, no credentials).
pub fn records(payloads: &[Bytes]) -> Vec<Vec<u8>> {
    let mut rng = rand::thread_rng();
    payloads
        .iter()
        .map(|p| {
            let z = zstd::bulk::compress(p, 1).unwrap_or_else(|_| p.to_vec());
            let mut v = Vec::with_capacity(28 + z.len());
            v.extend_from_slice(&[1, 0, 1]); // version, kind native, flags zstd
            v.extend_from_slice(&1_763_000_000_000u64.to_be_bytes());
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            v.extend_from_slice(&id);
            v.push(0); // no routes
            v.extend_from_slice(&z);
            v
        })
        .collect()
}

/// Raw sled: groups of `group` records, each group inserted, flushed and fdatasync'ed.
pub fn sled_ceiling(
    dir: &Path,
    group: usize,
    packed: bool,
    values: &[Vec<u8>],
    warmup: Duration,
    measure: Duration,
    max_commits: u64,
) -> anyhow::Result<Ceiling> {
    let _ = std::fs::remove_dir_all(dir);
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(llmlogd::config::DEFAULT_CACHE_BYTES)
        .segment_size(2 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
        .with_context(|| format!("opening sled at {}", dir.display()))?;
    let log = db.open_tree("log")?;
    let meta = db.open_tree("meta")?;
    let w = Window::after(warmup, measure);
    let (mut seq, mut commits, mut events) = (0u64, 0u64, 0u64);
    let mut lat = Vec::new();
    let mut cpu_at_start = None;
    for _ in 0..max_commits {
        let t = Instant::now();
        if t >= w.end {
            break;
        }
        if t >= w.start && cpu_at_start.is_none() {
            cpu_at_start = Some((t, crate::sys::self_cpu()));
        }
        let mut batch = sled::Batch::default();
        if packed {
            let mut frame: Vec<u8> = Vec::new();
            let mut first = seq;
            for _ in 0..group {
                let v = &values[seq as usize % values.len()];
                if !frame.is_empty() && frame.len() + 4 + v.len() > PACK_BYTES {
                    batch.insert(&first.to_be_bytes()[..], std::mem::take(&mut frame));
                    first = seq;
                }
                frame.extend_from_slice(&(v.len() as u32).to_be_bytes());
                frame.extend_from_slice(v);
                seq += 1;
            }
            batch.insert(&first.to_be_bytes()[..], frame);
        } else {
            for _ in 0..group {
                batch.insert(
                    &seq.to_be_bytes()[..],
                    &values[seq as usize % values.len()][..],
                );
                seq += 1;
            }
        }
        log.apply_batch(batch)?;
        meta.insert("next_seq", &seq.to_be_bytes())?;
        db.flush()?;
        let done = Instant::now();
        if done >= w.start && done < w.end {
            commits += 1;
            events += group as u64;
            lat.push((done - t).as_nanos() as u64);
        }
    }
    let cpu = cpu_at_start.map_or(0.0, |(t, c)| {
        crate::sys::self_cpu().saturating_sub(c).as_secs_f64() / t.elapsed().as_secs_f64()
    });
    drop((log, meta, db));
    let _ = std::fs::remove_dir_all(dir);
    Ok(Ceiling {
        group,
        packed,
        commits,
        events,
        window: w.len(),
        commit_latency: load::summarize(&mut lat),
        cpu,
    })
}

/// llmlogd's `Queue` in process: `appenders` tasks, each appending one event and waiting for
/// its durable ack, then the next.
pub async fn queue_ceiling(
    dir: &Path,
    appenders: usize,
    payloads: Arc<Vec<Bytes>>,
    w: Window,
    max_per_task: u64,
) -> anyhow::Result<Outcome> {
    use llmlogd::config::{Config, Overrides};
    use llmlogd::event::{ClientCredentials, EventKind, NewEvent};
    let _ = std::fs::remove_dir_all(dir);
    let cfg = Config::parse(
        "[queue]\nmax_bytes = \"64GiB\"\n",
        &Overrides {
            data_dir: Some(dir.to_path_buf()),
            ..Overrides::default()
        },
    )?;
    let qc = cfg.queue.clone();
    let queue = tokio::task::spawn_blocking(move || llmlogd::queue::Queue::open(&qc)).await??;
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..appenders {
        let (queue, payloads) = (queue.clone(), payloads.clone());
        tasks.spawn(async move {
            let mut out = Outcome::default();
            for k in 0..max_per_task {
                let t = Instant::now();
                if t >= w.end {
                    break;
                }
                let ev = NewEvent {
                    kind: EventKind::Native,
                    payload: payloads[(a * 7919 + k as usize) % payloads.len()].clone(),
                    attrs: Default::default(),
                    creds: ClientCredentials::default(),
                };
                let prepared = queue.prepare(&ev, &[]);
                queue.append(vec![prepared]).await?;
                let done = Instant::now();
                if done >= w.start && done < w.end {
                    out.acked += 1;
                    out.latencies.push((done - t).as_nanos() as u64);
                }
            }
            Ok::<_, llmlogd::queue::QueueError>(out)
        });
    }
    let mut total = Outcome::default();
    while let Some(r) = tasks.join_next().await {
        let o = r??;
        total.acked += o.acked;
        total.latencies.extend(o.latencies);
    }
    let q = queue.clone();
    tokio::task::spawn_blocking(move || q.close()).await??;
    drop(queue);
    let _ = std::fs::remove_dir_all(dir);
    Ok(total)
}
