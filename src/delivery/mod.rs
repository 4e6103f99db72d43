//! Delivery: one engine for every sink.
//!
//! Each configured sink gets a worker task (`worker.rs`) with its own cursor over the one
//! queue, so a dead or slow sink never delays another. The manager here starts, reconfigures
//! (reload) and stops workers, and runs the collector that removes records every sink is done
//! with. Flow control is in `limits.rs`, reply classification and backoff in `retry.rs`.

mod limits;
pub mod retry;
mod worker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::SinkConfig;
use crate::ops::metrics::Metrics;
use crate::ops::status::StatusBoard;
use crate::queue::{Queue, QueueError};

/// Fully delivered records are removed from the queue when a cursor moves (or, with no sink,
/// when the head does), at most once per `GC_SPACING`, and at least every `GC_INTERVAL`.
/// Removing soon is what bounds memory: sled keeps the records it read or wrote resident
/// until they are removed (BENCHMARKS.md F30, F31: peak RSS draining a 1 M backlog 137 →
/// 66-69 MiB, during ingest 93-100 → 47 MiB, against a collector on a 500 ms tick).
const GC_SPACING: Duration = Duration::from_millis(20);
const GC_INTERVAL: Duration = Duration::from_millis(500);

struct WorkerHandle {
    id: u16,
    config: watch::Sender<Arc<SinkConfig>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Delivery {
    queue: Queue,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    workers: BTreeMap<String, WorkerHandle>,
    /// Workers of removed sinks, possibly still finishing in-flight requests. A sink added
    /// back under the same name starts only once its old worker is gone, so two workers
    /// never share one cursor.
    retiring: BTreeMap<String, JoinHandle<()>>,
    /// Ids of the configured sinks: the collector keeps what the slowest of them needs.
    active: Arc<Mutex<Vec<u16>>>,
    /// Cancelled when the drain deadline passes: in-flight requests are abandoned (their
    /// events stay queued).
    abort: CancellationToken,
    gc_stop: CancellationToken,
    gc: Option<JoinHandle<()>>,
}

impl Delivery {
    /// Starts a worker per sink, and the collector.
    pub fn start(
        queue: Queue,
        sinks: &[SinkConfig],
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
    ) -> Result<Delivery, QueueError> {
        let mut d = Delivery {
            queue: queue.clone(),
            metrics,
            board,
            workers: BTreeMap::new(),
            retiring: BTreeMap::new(),
            active: Arc::new(Mutex::new(Vec::new())),
            abort: CancellationToken::new(),
            gc_stop: CancellationToken::new(),
            gc: None,
        };
        d.apply(sinks)?;
        let (active, stop) = (d.active.clone(), d.gc_stop.clone());
        d.gc = Some(tokio::spawn(async move {
            let mut last_warn = None::<std::time::Instant>;
            let mut head = queue.head();
            loop {
                let no_sinks = active.lock().map(|a| a.is_empty()).unwrap_or(false);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(GC_INTERVAL) => {}
                    _ = queue.cursor_moved() => {}
                    // With no sink, every record below the head is done.
                    Ok(()) = head.changed(), if no_sinks => {}
                }
                head.borrow_and_update();
                let ids = active.lock().map(|a| a.clone()).unwrap_or_default();
                let q = queue.clone();
                let r = tokio::task::spawn_blocking(move || q.gc(&ids)).await;
                if let Ok(Err(e)) = r {
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "removing delivered events failed");
                        last_warn = Some(std::time::Instant::now());
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(GC_SPACING) => {}
                }
            }
        }));
        Ok(d)
    }

    /// The sinks' queue ids, for routing.
    pub fn sink_ids(&self) -> Vec<(String, u16)> {
        self.workers
            .iter()
            .map(|(n, w)| (n.clone(), w.id))
            .collect()
    }

    /// Brings the running workers in line with `sinks`: starts new ones, tells every running
    /// one about the reload (which resumes a sink paused for auth, even with an unchanged
    /// config), stops removed ones.
    pub fn apply(&mut self, sinks: &[SinkConfig]) -> Result<(), QueueError> {
        // Resolve every id first, so a failure changes nothing.
        let mut ids = Vec::with_capacity(sinks.len());
        for s in sinks {
            ids.push(self.queue.sink_id(&s.name)?);
        }
        let wanted: BTreeMap<&str, (&SinkConfig, u16)> = sinks
            .iter()
            .zip(ids.iter().copied())
            .map(|(s, id)| (s.name.as_str(), (s, id)))
            .collect();
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        self.retiring.retain(|_, t| !t.is_finished());
        for name in gone {
            if let Some(w) = self.workers.remove(&name) {
                // Acknowledged events dropped by the operator's edit: said with their number,
                // as a warning, since a sink renamed in the file is this too (a new name is a
                // new sink, which gets only events that arrive from now on).
                match self.board.get(&name).map_or(0, |s| s.backlog) {
                    0 => tracing::info!(sink = %name, "sink removed from the config"),
                    undelivered => tracing::warn!(
                        sink = %name,
                        undelivered,
                        "sink removed from the config; its undelivered events are dropped (a renamed sink starts with new events only)"
                    ),
                }
                w.stop.cancel();
                self.board.remove(&name);
                self.retiring.insert(name, w.task);
            }
        }
        for (name, (cfg, id)) in wanted {
            match self.workers.get(name) {
                // Every reload reaches every worker, changed or not: a reload is also how an
                // operator says "the key was fixed on the service's side, try again now".
                Some(w) => {
                    w.config.send_replace(Arc::new(cfg.clone()));
                }
                None => {
                    let cfg = Arc::new(cfg.clone());
                    let (tx, mut rx) = watch::channel(cfg.clone());
                    let stop = CancellationToken::new();
                    let task = match self.retiring.remove(name) {
                        None => {
                            let worker = worker::Worker::new(
                                cfg,
                                id,
                                self.queue.clone(),
                                self.metrics.clone(),
                                self.board.clone(),
                            )?;
                            tokio::spawn(worker.run(rx, stop.clone(), self.abort.clone()))
                        }
                        // Removed, then added back while its old worker still drains: start
                        // from the cursor the old one leaves.
                        Some(prev) => {
                            let (queue, metrics, board) =
                                (self.queue.clone(), self.metrics.clone(), self.board.clone());
                            let (stop, abort) = (stop.clone(), self.abort.clone());
                            tokio::spawn(async move {
                                let _ = prev.await;
                                let cfg = rx.borrow_and_update().clone();
                                let name = cfg.name.clone();
                                match worker::Worker::new(cfg, id, queue, metrics, board) {
                                    Ok(w) => w.run(rx, stop, abort).await,
                                    Err(e) => {
                                        tracing::error!(sink = %name, error = %e, "cannot start delivery for the sink")
                                    }
                                }
                            })
                        }
                    };
                    self.workers.insert(
                        name.to_string(),
                        WorkerHandle {
                            id,
                            config: tx,
                            stop,
                            task,
                        },
                    );
                }
            }
        }
        if let Ok(mut a) = self.active.lock() {
            *a = ids;
        }
        Ok(())
    }

    /// Stops sending, lets in-flight requests finish for up to `drain` (or until `hurry` is
    /// cancelled: a second stop signal), then stops.
    pub async fn shutdown(mut self, drain: Duration, hurry: CancellationToken) {
        for w in self.workers.values() {
            w.stop.cancel();
        }
        let abort = self.abort.clone();
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut self.workers)
            .into_values()
            .map(|w| w.task)
            .chain(std::mem::take(&mut self.retiring).into_values())
            .collect();
        let deadline = tokio::time::Instant::now() + drain;
        let mut aborted = false;
        for mut t in tasks {
            let finished = !aborted
                && tokio::select! {
                    r = tokio::time::timeout_at(deadline, &mut t) => r.is_ok(),
                    _ = hurry.cancelled() => false,
                };
            if finished {
                continue;
            }
            if !aborted {
                if !hurry.is_cancelled() {
                    tracing::warn!(?drain, "drain deadline reached; in-flight deliveries abandoned (their events stay queued)");
                }
                abort.cancel();
                aborted = true;
            }
            // After an abort every worker returns promptly (it persists its cursor first).
            let _ = t.await;
        }
        self.gc_stop.cancel();
        if let Some(gc) = self.gc.take() {
            let _ = gc.await;
        }
    }
}
