//! Wiring: build the stages from a `Config`, run until told to stop, reload on request, and
//! shut down in order.
//!
//! Start: open the queue → start delivery → bind listeners → serve → READY=1.
//! Stop: STOPPING=1 → stop accepting, answer in-flight requests (their acks need the queue)
//! → let delivery drain up to `delivery.drain_timeout` → close the queue (final sync) → exit 0.
//! A second stop signal cuts the two waits short; the queue is still closed cleanly.
//! Reload (SIGHUP): re-read and validate the file; if it is valid, swap sinks, keys, sink
//! limits, routing and the queue caps in place (no connection or event is dropped); if not, log
//! why and keep running the old one. Listeners, server limits, the data dir and logging are
//! fixed at start: a change there is logged as needing a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Overrides, SinkConfig};
use crate::delivery::Delivery;
use crate::ingest::browser::HostNames;
use crate::ingest::http::{router, HttpState};
use crate::ingest::ndjson::NdjsonLimits;
use crate::ingest::server::{self, Listeners, ServeContext};
use crate::ingest::{Ingest, RouteTable};
use crate::ops::metrics::Metrics;
use crate::ops::signals::Signal;
use crate::ops::status::StatusBoard;
use crate::ops::systemd;
use crate::queue::Queue;

/// Where a reload reads the config from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

/// What `run` reports once it is serving (tests use it to find the ports).
#[derive(Debug, Clone)]
pub struct Started {
    /// The first HTTP address served (socket activation may hand over more).
    pub http: Option<SocketAddr>,
    /// The first socket path served.
    pub unix: Option<PathBuf>,
    pub data_dir: PathBuf,
}

/// How long in-flight ingest requests get to finish on stop.
const INGEST_GRACE: Duration = Duration::from_secs(10);
/// What a stop may take beyond the ingest grace and the drain: the final sync and exit.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Runs the daemon until a `Signal::Shutdown` arrives on `control` (or it closes).
pub async fn run(
    cfg: Config,
    source: ConfigSource,
    mut control: mpsc::Receiver<Signal>,
    started: Option<oneshot::Sender<Started>>,
) -> anyhow::Result<()> {
    let queue = {
        let qc = cfg.queue.clone();
        tokio::task::spawn_blocking(move || Queue::open(&qc))
            .await
            .context("opening the queue")??
    };
    let metrics = Arc::new(Metrics::new());
    let board = Arc::new(StatusBoard::default());
    let mut delivery = Delivery::start(queue.clone(), &cfg.sinks, metrics.clone(), board.clone())?;
    let ingest = Arc::new(Ingest::new(
        queue.clone(),
        route_table(&delivery, &cfg.sinks),
        metrics.clone(),
    ));
    let listeners = Listeners::bind(&cfg.server).await?;
    let http_addrs = listeners.http_addrs();
    let unix_paths = listeners.unix_paths();
    let ready = Arc::new(AtomicBool::new(false));
    // One memory budget for request bodies and NDJSON lines still arriving, on every listener.
    let largest = cfg.server.max_body_bytes.max(cfg.server.max_line_bytes);
    let body_budget = crate::ingest::http::body_budget(largest);
    let stop_serving = CancellationToken::new();
    let state = Arc::new(HttpState {
        ingest: ingest.clone(),
        max_body: cfg.server.max_body_bytes,
        body_timeout: cfg.server.body_timeout,
        status: board.clone(),
        ready: ready.clone(),
        body_budget: body_budget.clone(),
        stopping: stop_serving.clone(),
    });
    let tracker = TaskTracker::new();
    server::spawn(
        listeners,
        ServeContext {
            router: router(state),
            hosts: Arc::new(HostNames::new(&cfg.server.allowed_hosts)),
            ingest: ingest.clone(),
            header_timeout: cfg.server.header_timeout,
            ndjson: NdjsonLimits {
                max_line: cfg.server.max_line_bytes,
                line_timeout: cfg.server.body_timeout,
                idle_timeout: cfg.server.idle_timeout,
                body_budget,
                long_lines: crate::ingest::http::long_lines(cfg.server.max_line_bytes, largest),
            },
            connections: Arc::new(Semaphore::new(cfg.server.max_connections)),
            shutdown: stop_serving.clone(),
            tracker: tracker.clone(),
        },
    );

    ready.store(true, Ordering::Release);
    let listening = describe(&http_addrs, &unix_paths);
    if cfg.sinks.is_empty() {
        tracing::warn!("no sinks configured: events are accepted, stored, and then discarded");
    }
    for n in cfg.notes() {
        tracing::warn!("{n}");
    }
    tracing::info!(
        listening = %listening,
        data_dir = %cfg.queue.data_dir.display(),
        sinks = cfg.sinks.len(),
        "llmlogd ready"
    );
    systemd::ready(&format!("listening on {listening}"));
    if let Some(tx) = started {
        let _ = tx.send(Started {
            http: http_addrs.first().copied(),
            unix: unix_paths.first().cloned(),
            data_dir: cfg.queue.data_dir.clone(),
        });
    }
    let watchdog = systemd::watchdog_interval().map(|every| {
        let q = queue.clone();
        tokio::spawn(async move {
            let mut said = false;
            loop {
                tokio::time::sleep(every).await;
                // Ping only while the runtime turns, the queue answers and its writer moves:
                // a writer stuck on one step for a whole `WatchdogSec` (a sync that never
                // returns) holds every ack, and a restart is what helps.
                let _ = q.stats();
                match q.writer_stalled(every * 2) {
                    Some(busy) => {
                        if !std::mem::replace(&mut said, true) {
                            tracing::error!(
                                busy_s = busy.as_secs(),
                                "the queue writer has been stuck on one write for longer than WatchdogSec; no watchdog ping, so systemd restarts llmlogd"
                            );
                        }
                    }
                    None => {
                        said = false;
                        systemd::watchdog_ping();
                    }
                }
            }
        })
    });

    // What the restart-only sections run with: a reload compares against these, not against
    // the last file taken, so a change waiting for a restart is named at every reload until
    // then (before, the second reload of the same file forgot it, and putting the old value
    // back was announced as a change).
    let started = cfg.clone();
    let mut current = cfg;
    while let Some(signal) = control.recv().await {
        match signal {
            Signal::Reload => {
                systemd::reloading();
                let refused = match Config::load(source.path.as_deref(), &source.overrides) {
                    Ok(new) => {
                        if let Err(e) = reload(&started, &current, &new, &mut delivery, &ingest) {
                            tracing::error!(error = %e, "reload failed; keeping the running configuration");
                            Some(format!("{e:#}"))
                        } else {
                            current = new;
                            tracing::info!(sinks = current.sinks.len(), "configuration reloaded");
                            None
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new configuration refused; keeping the running one");
                        Some(e.to_string())
                    }
                };
                // `systemctl reload` succeeds whatever the daemon made of the file (it only
                // sends SIGHUP): the status line `systemctl status` shows says it was refused,
                // until a reload is taken.
                systemd::ready(&match refused {
                    None => format!("listening on {listening}"),
                    Some(why) => format!(
                        "listening on {listening}; the last reload ({}) was refused, the running configuration stays: {why}",
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    ),
                });
            }
            Signal::Shutdown => break,
        }
    }

    // Stop, in order.
    systemd::stopping(INGEST_GRACE + current.delivery.drain_timeout + CLOSE_GRACE);
    tracing::info!("stopping: no new connections; answering in-flight requests");
    ready.store(false, Ordering::Release);
    stop_serving.cancel();
    tracker.close();
    // A second SIGTERM/SIGINT (Ctrl-C again) cuts the waits short. Nothing acknowledged is
    // lost by it: unanswered requests were never acknowledged, undelivered events stay queued.
    let hurry = CancellationToken::new();
    let second_stop = tokio::spawn({
        let hurry = hurry.clone();
        async move {
            while let Some(signal) = control.recv().await {
                if signal == Signal::Shutdown {
                    tracing::warn!("second stop signal: not waiting for in-flight requests and deliveries; undelivered events stay queued for the next start");
                    hurry.cancel();
                    break;
                }
            }
        }
    });
    let answered = tokio::select! {
        r = tokio::time::timeout(INGEST_GRACE, tracker.wait()) => r.is_ok(),
        _ = hurry.cancelled() => false,
    };
    if !answered {
        tracing::warn!(
            "some connections did not finish in time; their unacknowledged events were not stored"
        );
    }
    delivery
        .shutdown(current.delivery.drain_timeout, hurry.clone())
        .await;
    second_stop.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let q = queue.clone();
    tokio::task::spawn_blocking(move || q.close())
        .await
        .context("closing the queue")??;
    tracing::info!("stopped");
    Ok(())
}

fn route_table(delivery: &Delivery, sinks: &[SinkConfig]) -> RouteTable {
    let ids = delivery.sink_ids();
    let pairs: Vec<(u16, &SinkConfig)> = sinks
        .iter()
        .filter_map(|s| {
            ids.iter()
                .find(|(n, _)| *n == s.name)
                .map(|(_, id)| (*id, s))
        })
        .collect();
    RouteTable::new(&pairs)
}

/// Applies a validated new config to the running daemon.
fn reload(
    started: &Config,
    old: &Config,
    new: &Config,
    delivery: &mut Delivery,
    ingest: &Ingest,
) -> anyhow::Result<()> {
    // Events accepted with no sink are stored and discarded. Starting that way is a choice
    // (the embedded defaults have no sink); going there by reload is far more often a file
    // read half-written, so it is refused and said plainly.
    if new.sinks.is_empty() && !old.sinks.is_empty() {
        anyhow::bail!(
            "the new configuration has no sinks (the running one has {}): events accepted after it would be discarded; restart llmlogd to run without sinks (and write config files with a rename, so a reload never reads one half-written)",
            old.sinks.len()
        );
    }
    let queue_fixed =
        |q: &crate::config::QueueConfig| (q.data_dir.clone(), q.cache_bytes, q.compression);
    let restart_only = [
        (
            "server",
            format!("{:?}", started.server) != format!("{:?}", new.server),
        ),
        (
            "queue (data_dir, cache_bytes, compression)",
            queue_fixed(&started.queue) != queue_fixed(&new.queue),
        ),
        (
            "log",
            format!("{:?}", started.log) != format!("{:?}", new.log),
        ),
    ];
    for (section, changed) in restart_only {
        if changed {
            tracing::warn!(
                section,
                "changes to this section take effect at the next restart"
            );
        }
    }
    delivery.apply(&new.sinks)?;
    for n in new.notes() {
        tracing::warn!("{n}");
    }
    ingest
        .routes
        .store(Arc::new(route_table(delivery, &new.sinks)));
    ingest.queue.set_caps(&new.queue);
    Ok(())
}

fn describe(http: &[SocketAddr], unix: &[PathBuf]) -> String {
    let mut parts: Vec<String> = http.iter().map(|a| format!("http://{a}")).collect();
    parts.extend(unix.iter().map(|p| format!("unix:{}", p.display())));
    if parts.is_empty() {
        "nothing (no listener configured)".into()
    } else {
        parts.join(" and ")
    }
}
