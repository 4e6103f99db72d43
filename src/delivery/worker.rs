//! One sink's delivery loop: read from its cursor, send, classify, advance.
//!
//! The worker keeps a bounded *window* of events read from the queue (`Slot`s, by seq). Each
//! loop turn it tops the window up, sends what is due (within concurrency and rate), and
//! applies replies. The cursor it persists is the lowest seq still in the window (or the read
//! position when the window is empty), so an event leaves the queue only once it was
//! delivered or dead-lettered.
//!
//! Sink states: `ok`; `backoff` (some events wait for a retry); `paused` (Retry-After, or a
//! refused key until reload); `open` (the circuit: after `circuit_after` consecutive failures
//! only one probe goes out per backoff interval; one log line when it opens, a summary every
//! five minutes, one line when it closes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::limits::FlowControl;
use super::retry::{self, Verdict};
use crate::config::SinkConfig;
use crate::event::{now_ms, StoredEvent};
use crate::ops::metrics::{FailureClass, Metrics};
use crate::ops::status::StatusBoard;
use crate::queue::{DeadLetterInfo, Queue, ReadItem};
use crate::sinks::{self, Accepted, BuildContext, BuildError, RemoteId, Sink, SinkRequest};

/// Most events a worker holds in memory at once.
const MAX_WINDOW_EVENTS: usize = 4096;
/// Most payload bytes a worker holds in memory at once.
const MAX_WINDOW_BYTES: usize = 32 << 20;
/// Most response bytes read (kept with dead letters, parsed for ids).
const MAX_RESPONSE: usize = 64 * 1024;
/// How often an ongoing outage is summarised in the log.
const OUTAGE_SUMMARY: Duration = Duration::from_secs(300);
/// How long a follow-up waits before asking again whether its log was delivered.
const DEPENDENCY_WAIT: Duration = Duration::from_millis(200);

struct Slot {
    ev: StoredEvent,
    attempts: u32,
    strikes: u32,
    next_try: Instant,
    in_flight: bool,
    /// Send alone (after a 413 on a batch).
    solo: bool,
    first_attempt_ms: Option<u64>,
    last_attempt_ms: Option<u64>,
    /// The sink's success count when this event was last sent (poison detection).
    successes_at_send: u64,
    last_error: Option<(Option<u16>, String)>,
    /// When it entered the window (batch max wait).
    ready_at: Instant,
}

/// What came back for one request.
struct Done {
    seqs: Vec<u64>,
    elapsed: Duration,
    result: Result<Reply, (FailureClass, String)>,
}

struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

enum Pause {
    Until(Instant, String),
    UntilReload(String),
}

struct Circuit {
    since: Instant,
    next_probe: Instant,
    backoff: ExponentialBackoff,
    failures: u64,
    last_summary: Instant,
}

pub(crate) struct Worker {
    name: String,
    id: u16,
    cfg: Arc<SinkConfig>,
    sink: Box<dyn Sink>,
    client: reqwest::Client,
    queue: Queue,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    window: BTreeMap<u64, Slot>,
    window_bytes: usize,
    read_pos: u64,
    persisted_cursor: u64,
    flow: FlowControl,
    requests: JoinSet<Done>,
    in_flight: usize,
    consecutive_failures: u32,
    successes: u64,
    delivered: u64,
    dead_lettered: u64,
    circuit: Option<Circuit>,
    pause: Option<Pause>,
    last_error: Option<String>,
    last_error_ms: Option<u64>,
    last_success_ms: Option<u64>,
    last_expiry_sweep: Instant,
}

/// Builds the HTTP client for a sink: its timeout, bounded idle pool, no proxies from the
/// environment surprises (reqwest honours HTTP(S)_PROXY, which operators expect).
pub(crate) fn client_for(cfg: &SinkConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(cfg.concurrency)
        .user_agent(concat!("llmlogd/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

impl Worker {
    pub(crate) fn new(
        cfg: Arc<SinkConfig>,
        id: u16,
        queue: Queue,
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
    ) -> Result<Self, crate::queue::QueueError> {
        let cursor = queue.cursor(id)?;
        let now = Instant::now();
        Ok(Worker {
            name: cfg.name.clone(),
            id,
            sink: sinks::build(&cfg),
            client: client_for(&cfg),
            flow: FlowControl::new(cfg.concurrency, cfg.rate.clone(), now),
            cfg,
            queue,
            metrics,
            board,
            window: BTreeMap::new(),
            window_bytes: 0,
            read_pos: cursor,
            persisted_cursor: cursor,
            requests: JoinSet::new(),
            in_flight: 0,
            consecutive_failures: 0,
            successes: 0,
            delivered: 0,
            dead_lettered: 0,
            circuit: None,
            pause: None,
            last_error: None,
            last_error_ms: None,
            last_success_ms: None,
            last_expiry_sweep: now,
        })
    }

    /// Runs until `stop` is cancelled, then lets in-flight requests finish until `drain_by`
    /// (or `abort` is cancelled), and persists the cursor.
    pub(crate) async fn run(
        mut self,
        mut config: watch::Receiver<Arc<SinkConfig>>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) {
        let mut head = self.queue.head();
        self.metrics.sink_state(&self.name, "ok");
        loop {
            if let Err(e) = self.refill() {
                self.note_error(format!("reading the queue: {e}"));
            }
            let now = Instant::now();
            self.sweep_expired(now);
            let wake = self.dispatch(now);
            self.advance_cursor();
            self.publish();
            let sleep =
                tokio::time::sleep_until(wake.unwrap_or(now + Duration::from_secs(3600)).into());
            let room =
                self.window.len() < MAX_WINDOW_EVENTS && self.window_bytes < MAX_WINDOW_BYTES;
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(done) = self.requests.join_next(), if self.in_flight > 0 => {
                    if let Ok(done) = done {
                        self.complete(done);
                    }
                }
                Ok(()) = config.changed() => {
                    let cfg = config.borrow_and_update().clone();
                    self.reconfigure(cfg);
                }
                Ok(()) = head.changed(), if room => {}
                _ = sleep => {}
            }
        }
        // Draining: no new sends; apply what comes back until done or aborted.
        while self.in_flight > 0 {
            tokio::select! {
                _ = abort.cancelled() => break,
                Some(done) = self.requests.join_next() => {
                    if let Ok(done) = done {
                        self.complete(done);
                    }
                }
            }
        }
        self.requests.abort_all();
        self.advance_cursor();
        self.publish();
    }

    fn reconfigure(&mut self, cfg: Arc<SinkConfig>) {
        self.sink = sinks::build(&cfg);
        self.client = client_for(&cfg);
        self.flow.reconfigure(cfg.concurrency, cfg.rate.clone());
        // A reload is how an operator fixes a key: resume a sink paused for auth.
        if matches!(self.pause, Some(Pause::UntilReload(_))) {
            tracing::info!(sink = %self.name, "config reloaded; resuming the sink paused for its key");
            self.pause = None;
        }
        for s in self.window.values_mut() {
            if !s.in_flight {
                s.next_try = s.next_try.min(Instant::now());
            }
        }
        self.cfg = cfg;
    }

    /// Tops the window up from the queue.
    fn refill(&mut self) -> Result<(), crate::queue::QueueError> {
        let head = *self.queue.head().borrow();
        let now = Instant::now();
        while self.read_pos < head
            && self.window.len() < MAX_WINDOW_EVENTS
            && self.window_bytes < MAX_WINDOW_BYTES
        {
            let batch = self.queue.read(
                self.id,
                self.read_pos,
                MAX_WINDOW_EVENTS - self.window.len(),
                MAX_WINDOW_BYTES - self.window_bytes,
                8192,
            )?;
            if batch.next <= self.read_pos {
                break;
            }
            self.read_pos = batch.next;
            for item in batch.items {
                match item {
                    ReadItem::Event(ev) => {
                        self.window_bytes += ev.payload.len();
                        self.window.insert(
                            ev.seq,
                            Slot {
                                ev,
                                attempts: 0,
                                strikes: 0,
                                next_try: now,
                                in_flight: false,
                                solo: false,
                                first_attempt_ms: None,
                                last_attempt_ms: None,
                                successes_at_send: 0,
                                last_error: None,
                                ready_at: now,
                            },
                        );
                    }
                    ReadItem::Corrupt { seq, error, .. } => {
                        tracing::error!(sink = %self.name, seq, %error, "corrupt queue record moved to the dead letters");
                        let info =
                            DeadLetterInfo::new(&self.name, format!("corrupt record: {error}"));
                        if self.queue.dead_letter(self.id, seq, info).is_ok() {
                            self.dead_lettered += 1;
                            self.metrics.dead_lettered(&self.name, 1);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Dead-letters events older than `max_age` that are waiting for a retry.
    fn sweep_expired(&mut self, now: Instant) {
        if now.duration_since(self.last_expiry_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_expiry_sweep = now;
        let max_age = self.cfg.retry.max_age.as_millis() as u64;
        let wall = now_ms();
        let expired: Vec<u64> = self
            .window
            .iter()
            .filter(|(_, s)| {
                !s.in_flight && s.attempts > 0 && wall.saturating_sub(s.ev.received_ms) > max_age
            })
            .map(|(k, _)| *k)
            .collect();
        for seq in expired {
            self.dead_letter(seq, "max_age reached before delivery", None);
        }
    }

    /// Sends what is due; returns when to look again.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        match &self.pause {
            Some(Pause::Until(t, _)) if *t > now => return Some(*t),
            Some(Pause::UntilReload(_)) => return None,
            Some(Pause::Until(..)) => {
                tracing::info!(sink = %self.name, "pause over; resuming delivery");
                self.pause = None;
            }
            None => {}
        }
        if let Some(c) = &mut self.circuit {
            if now.duration_since(c.last_summary) >= OUTAGE_SUMMARY {
                c.last_summary = now;
                tracing::warn!(
                    sink = %self.name,
                    down_for = %humantime::format_duration(Duration::from_secs(now.duration_since(c.since).as_secs())),
                    waiting = self.window.len(),
                    failed_probes = c.failures,
                    last_error = self.last_error.as_deref().unwrap_or(""),
                    "sink still unreachable"
                );
            }
            if self.in_flight > 0 || now < c.next_probe {
                return Some(c.next_probe);
            }
            // One probe: the oldest event that is not waiting on another.
            let probe = self
                .window
                .iter()
                .find(|(_, s)| !s.in_flight && s.last_error.is_some())
                .or_else(|| self.window.iter().find(|(_, s)| !s.in_flight))
                .map(|(k, _)| *k);
            let seq = probe?;
            let next = c.backoff.next_backoff().unwrap_or(self.cfg.retry.max);
            c.next_probe = now + next;
            let next_probe = c.next_probe;
            self.send(vec![seq], now);
            return Some(next_probe);
        }

        let per_request = self.sink.events_per_request().max(1);
        let max_bytes = self.cfg.batch.max_bytes;
        let mut wake: Option<Instant> = None;
        let earliest = |t: Instant, wake: &mut Option<Instant>| {
            *wake = Some(wake.map_or(t, |w| w.min(t)));
        };
        let due: Vec<u64> = self
            .window
            .iter()
            .filter(|(_, s)| !s.in_flight)
            .filter_map(|(k, s)| {
                if s.next_try <= now {
                    Some(*k)
                } else {
                    earliest(s.next_try, &mut wake);
                    None
                }
            })
            .collect();
        let caught_up = self.read_pos >= *self.queue.head().borrow();
        let mut i = 0;
        while i < due.len() && self.in_flight < self.flow.concurrency() {
            // Form one request's worth.
            let mut group = vec![due[i]];
            let mut bytes = self.window[&due[i]].ev.payload.len();
            let solo = self.window[&due[i]].solo;
            let mut j = i + 1;
            if !solo {
                while j < due.len() && group.len() < per_request {
                    let s = &self.window[&due[j]];
                    if s.solo || bytes + s.ev.payload.len() > max_bytes {
                        break;
                    }
                    bytes += s.ev.payload.len();
                    group.push(due[j]);
                    j += 1;
                }
            }
            // A part-full batch waits up to max_wait for more, unless more is already queued.
            if per_request > 1 && !solo && group.len() < per_request && caught_up {
                let oldest = group
                    .iter()
                    .map(|k| self.window[k].ready_at)
                    .min()
                    .unwrap_or(now);
                let flush_at = oldest + self.cfg.batch.max_wait;
                if flush_at > now {
                    earliest(flush_at, &mut wake);
                    break;
                }
            }
            if let Err(wait) = self.flow.try_acquire(now) {
                earliest(now + wait, &mut wake);
                break;
            }
            self.send(group, now);
            i = j;
        }
        wake
    }

    /// Builds and starts one request for `seqs`.
    fn send(&mut self, seqs: Vec<u64>, now: Instant) {
        let built = {
            let ctx = Ctx { w: self };
            let events: Vec<&StoredEvent> = seqs.iter().map(|k| &self.window[k].ev).collect();
            self.sink.build(&events, &ctx)
        };
        let req = match built {
            Ok(r) => r,
            Err(BuildError::NotYet) => {
                for k in &seqs {
                    if let Some(s) = self.window.get_mut(k) {
                        s.next_try = now + DEPENDENCY_WAIT;
                    }
                }
                return;
            }
            Err(BuildError::Unrenderable(reason)) => {
                self.metrics.failed(&self.name, FailureClass::convert);
                for k in seqs {
                    self.dead_letter(k, &format!("cannot render for this sink: {reason}"), None);
                }
                return;
            }
            Err(BuildError::NoKey) => {
                if !matches!(self.pause, Some(Pause::UntilReload(_))) {
                    tracing::error!(sink = %self.name, "no API key: neither the sink's config nor the app gave one; holding events until a reload");
                }
                self.note_error("no API key configured and none sent by the app".into());
                self.pause = Some(Pause::UntilReload("no API key".into()));
                return;
            }
        };
        let wall = now_ms();
        for k in &seqs {
            if let Some(s) = self.window.get_mut(k) {
                s.in_flight = true;
                s.first_attempt_ms.get_or_insert(wall);
                s.last_attempt_ms = Some(wall);
                s.successes_at_send = self.successes;
            }
        }
        self.in_flight += 1;
        self.metrics.in_flight(&self.name, 1);
        let client = self.client.clone();
        self.requests.spawn(async move {
            let started = Instant::now();
            let result = execute(&client, req).await;
            Done {
                seqs,
                elapsed: started.elapsed(),
                result,
            }
        });
    }

    /// Applies what came back for one request.
    fn complete(&mut self, done: Done) {
        self.in_flight -= 1;
        self.metrics.in_flight(&self.name, -1);
        let now = Instant::now();
        for k in &done.seqs {
            if let Some(s) = self.window.get_mut(k) {
                s.in_flight = false;
            }
        }
        // Events that left the window while in flight (dead-lettered by age) are skipped.
        let seqs: Vec<u64> = done
            .seqs
            .iter()
            .copied()
            .filter(|k| self.window.contains_key(k))
            .collect();
        if seqs.is_empty() {
            return;
        }
        let (verdict, status, detail) = match &done.result {
            Err((class, msg)) => (Verdict::Retry(*class), None, msg.clone()),
            Ok(reply) => {
                self.metrics.latency(&self.name, done.elapsed.as_secs_f64());
                let v = retry::classify(reply.status, reply.retry_after, seqs.len());
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                if v == Verdict::Delivered {
                    let events: Vec<&StoredEvent> =
                        seqs.iter().map(|k| &self.window[k].ev).collect();
                    match self.sink.accepted(&events, &reply.body) {
                        Accepted::Yes { remote_id } => {
                            if let (Some(r), [seq]) = (remote_id, seqs.as_slice()) {
                                if let Err(e) = self.queue.set_remote_id(self.id, *seq, r) {
                                    tracing::warn!(sink = %self.name, error = %e, "could not store the service's id for a log");
                                }
                            }
                        }
                        Accepted::Refused(msg) => {
                            self.metrics.failed(&self.name, FailureClass::rejected_4xx);
                            return self.reject(
                                &seqs,
                                Some(reply.status),
                                &format!("refused by the service: {msg}"),
                                Some(body),
                            );
                        }
                    }
                }
                (v, Some(reply.status), body)
            }
        };
        match verdict {
            Verdict::Delivered => {
                let n = seqs.len() as u64;
                for k in &seqs {
                    if let Some(s) = self.window.remove(k) {
                        self.window_bytes -= s.ev.payload.len();
                    }
                }
                self.successes += 1;
                self.delivered += n;
                self.metrics.delivered(&self.name, n);
                self.consecutive_failures = 0;
                self.last_success_ms = Some(now_ms());
                self.flow.on_success();
                if let Some(c) = self.circuit.take() {
                    tracing::info!(
                        sink = %self.name,
                        down_for = %humantime::format_duration(Duration::from_secs(now.duration_since(c.since).as_secs())),
                        failed_probes = c.failures,
                        "sink reachable again; resuming delivery"
                    );
                    for s in self.window.values_mut() {
                        s.next_try = now;
                    }
                }
            }
            Verdict::Retry(class) => {
                self.metrics.failed(&self.name, class);
                if class == FailureClass::status_429 {
                    self.flow.on_throttle();
                }
                let what = match status {
                    Some(st) => format!("HTTP {st}: {}", snippet(&detail)),
                    None => detail.clone(),
                };
                self.note_error(what.clone());
                self.consecutive_failures += 1;
                let r = &self.cfg.retry;
                let (poison_after, initial, max, max_age) =
                    (r.poison_after, r.initial, r.max, r.max_age);
                let wall = now_ms();
                let mut poisoned = Vec::new();
                // One jittered delay for the whole request, so its events retry together as
                // one batch instead of scattering into many small ones.
                let attempts = seqs
                    .iter()
                    .filter_map(|k| self.window.get(k))
                    .map(|s| s.attempts + 1)
                    .max()
                    .unwrap_or(1);
                let delay = retry::delay_after(attempts, initial, max);
                for k in &seqs {
                    let Some(s) = self.window.get_mut(k) else {
                        continue;
                    };
                    s.attempts += 1;
                    s.last_error = Some((status, detail.clone()));
                    // A strike only when others were delivered since this one was sent.
                    if self.successes > s.successes_at_send {
                        s.strikes += 1;
                    }
                    if s.strikes >= poison_after {
                        poisoned
                            .push((*k, "poison: kept failing while other events were delivered"));
                    } else if wall.saturating_sub(s.ev.received_ms) > max_age.as_millis() as u64 {
                        poisoned.push((*k, "max_age reached before delivery"));
                    } else {
                        s.next_try = now + delay;
                    }
                }
                self.metrics
                    .retried(&self.name, (seqs.len() - poisoned.len()) as u64);
                for (k, why) in poisoned {
                    self.dead_letter(k, why, status);
                }
                if let Some(c) = &mut self.circuit {
                    c.failures += 1;
                } else if self.consecutive_failures >= self.cfg.retry.circuit_after {
                    let mut backoff = retry::backoff(self.cfg.retry.initial, self.cfg.retry.max);
                    let first = backoff.next_backoff().unwrap_or(self.cfg.retry.max);
                    tracing::warn!(
                        sink = %self.name,
                        error = %what,
                        waiting = self.window.len(),
                        "sink unreachable; holding events and sending one probe per backoff interval"
                    );
                    self.circuit = Some(Circuit {
                        since: now,
                        next_probe: now + first,
                        backoff,
                        failures: 0,
                        last_summary: now,
                    });
                }
            }
            Verdict::PauseFor(d, class) => {
                self.metrics.failed(&self.name, class);
                if class == FailureClass::status_429 {
                    self.flow.on_throttle();
                }
                let d = d.min(self.cfg.retry.max_retry_after);
                let until = now + d;
                let later = match &self.pause {
                    Some(Pause::Until(t, _)) => until > *t,
                    _ => true,
                };
                if later {
                    tracing::info!(sink = %self.name, status = ?status, pause = ?d, "service asked to wait (Retry-After); pausing the sink");
                    self.pause = Some(Pause::Until(
                        until,
                        format!("Retry-After from HTTP {}", status.unwrap_or(0)),
                    ));
                }
                self.note_error(format!(
                    "HTTP {}: Retry-After {}s",
                    status.unwrap_or(0),
                    d.as_secs()
                ));
            }
            Verdict::PauseAuth => {
                self.metrics.failed(&self.name, FailureClass::auth);
                if !matches!(self.pause, Some(Pause::UntilReload(_))) {
                    tracing::error!(
                        sink = %self.name,
                        status = ?status,
                        "the service refused the API key; holding every event until the key is fixed and the config reloaded"
                    );
                }
                self.note_error(format!("HTTP {}: API key refused", status.unwrap_or(0)));
                self.pause = Some(Pause::UntilReload(format!(
                    "HTTP {} (key refused)",
                    status.unwrap_or(0)
                )));
            }
            Verdict::Split => {
                self.metrics.failed(&self.name, FailureClass::too_large);
                for k in &seqs {
                    if let Some(s) = self.window.get_mut(k) {
                        s.solo = true;
                        s.next_try = now;
                    }
                }
            }
            Verdict::Reject(class) => {
                self.metrics.failed(&self.name, class);
                let reason = match class {
                    FailureClass::too_large => "too large for the service (413)".to_string(),
                    _ => format!("refused by the service (HTTP {})", status.unwrap_or(0)),
                };
                self.reject(&seqs, status, &reason, Some(detail));
            }
        }
    }

    fn reject(&mut self, seqs: &[u64], status: Option<u16>, reason: &str, body: Option<String>) {
        self.note_error(format!(
            "{reason}: {}",
            snippet(body.as_deref().unwrap_or(""))
        ));
        for k in seqs {
            if let Some(s) = self.window.get_mut(k) {
                s.attempts += 1;
                s.last_error = Some((status, body.clone().unwrap_or_default()));
            }
            self.dead_letter(*k, reason, status);
        }
    }

    /// Moves one windowed event to the dead letters.
    fn dead_letter(&mut self, seq: u64, reason: &str, status: Option<u16>) {
        let Some(s) = self.window.remove(&seq) else {
            return;
        };
        self.window_bytes -= s.ev.payload.len();
        let mut info = DeadLetterInfo::new(&self.name, reason);
        info.status = status.or(s.last_error.as_ref().and_then(|e| e.0));
        info.response = s.last_error.as_ref().map(|e| e.1.clone());
        info.attempts = s.attempts;
        info.first_attempt_ms = s.first_attempt_ms;
        info.last_attempt_ms = s.last_attempt_ms;
        match self.queue.dead_letter(self.id, seq, info) {
            Ok(()) => {
                self.dead_lettered += 1;
                self.metrics.dead_lettered(&self.name, 1);
                tracing::warn!(sink = %self.name, seq, reason, "event moved to the dead letters");
            }
            Err(e) => {
                // Could not store the dead letter: keep the event and try again later.
                tracing::error!(sink = %self.name, seq, error = %e, "could not store a dead letter; will retry");
                let mut s = s;
                s.next_try = Instant::now() + self.cfg.retry.max;
                self.window_bytes += s.ev.payload.len();
                self.window.insert(seq, s);
            }
        }
    }

    fn advance_cursor(&mut self) {
        let cursor = self.window.keys().next().copied().unwrap_or(self.read_pos);
        if cursor > self.persisted_cursor {
            match self.queue.set_cursor(self.id, cursor) {
                Ok(()) => self.persisted_cursor = cursor,
                Err(e) => {
                    tracing::warn!(sink = %self.name, error = %e, "could not persist the cursor")
                }
            }
        }
    }

    fn note_error(&mut self, e: String) {
        self.last_error = Some(e);
        self.last_error_ms = Some(now_ms());
    }

    fn state(&self) -> &'static str {
        if self.pause.is_some() {
            "paused"
        } else if self.circuit.is_some() {
            "open"
        } else if self.window.values().any(|s| s.attempts > 0) {
            "backoff"
        } else {
            "ok"
        }
    }

    fn publish(&self) {
        let state = self.state();
        self.metrics.sink_state(&self.name, state);
        self.metrics
            .sink_limits(&self.name, self.flow.rate(), self.flow.concurrency());
        let head = *self.queue.head().borrow();
        let backlog = self.window.len() as u64 + head.saturating_sub(self.read_pos);
        self.metrics.backlog(&self.name, backlog);
        let paused_until_ms = match &self.pause {
            Some(Pause::Until(t, _)) => {
                Some(now_ms() + t.saturating_duration_since(Instant::now()).as_millis() as u64)
            }
            _ => None,
        };
        let oldest = self.window.values().next().map(|s| s.ev.received_ms);
        let last_error = match &self.pause {
            Some(Pause::UntilReload(r)) => Some(format!("paused until reload: {r}")),
            Some(Pause::Until(_, r)) => Some(format!("paused: {r}")),
            None => self.last_error.clone(),
        };
        self.board.update(&self.name, |s| {
            s.kind = self.cfg.kind.type_name().to_string();
            s.state = state;
            s.backlog = backlog;
            s.in_flight = self.in_flight;
            s.delivered = self.delivered;
            s.dead_lettered = self.dead_lettered;
            s.last_error = last_error;
            s.last_error_ms = self.last_error_ms;
            s.last_success_ms = self.last_success_ms;
            s.oldest_pending_ms = oldest;
            s.paused_until_ms = paused_until_ms;
            s.rate_limit = self.flow.rate();
            s.concurrency = self.flow.concurrency();
        });
    }
}

/// Remote-id look-ups for follow-ups, answered from the queue and this worker's window.
struct Ctx<'a> {
    w: &'a Worker,
}

impl BuildContext for Ctx<'_> {
    fn remote_id(&self, local: u64) -> RemoteId {
        match self.w.queue.remote_id(self.w.id, local) {
            Ok(Some(r)) => RemoteId::Known(r),
            _ if self.w.window.contains_key(&local) || local >= self.w.read_pos => {
                RemoteId::Pending
            }
            _ => RemoteId::Unknown,
        }
    }
}

/// Sends one request; reads at most `MAX_RESPONSE` bytes of the reply.
async fn execute(
    client: &reqwest::Client,
    req: SinkRequest,
) -> Result<Reply, (FailureClass, String)> {
    let mut rb = client.post(&req.url).body(req.body);
    for (k, v) in req.headers {
        rb = rb.header(k, v);
    }
    let mut resp = rb.send().await.map_err(transport_error)?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = MAX_RESPONSE - body.len();
                body.extend_from_slice(&c[..c.len().min(room)]);
                if body.len() >= MAX_RESPONSE {
                    break;
                }
            }
            Ok(None) => break,
            // The status arrived; a body cut short does not change what it means, except
            // for a 2xx, where the sink may need the body (PromptLayer's id): retry those.
            Err(e) if (200..300).contains(&status) => return Err(transport_error(e)),
            Err(_) => break,
        }
    }
    Ok(Reply {
        status,
        retry_after,
        body,
    })
}

fn transport_error(e: reqwest::Error) -> (FailureClass, String) {
    let class = if e.is_timeout() {
        FailureClass::timeout
    } else if e.is_connect() {
        FailureClass::connect
    } else {
        FailureClass::other
    };
    // reqwest's message names the URL, never headers or body, so no key can leak here.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    (class, msg)
}

fn snippet(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.len() > 200 {
        let mut cut = 200;
        while !one.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &one[..cut])
    } else {
        one
    }
}
