//! One sink's delivery loop: read from its cursor, send, classify, advance.
//!
//! The worker keeps a bounded *window* of events read from the queue (`Slot`s, by seq). Each
//! loop turn it tops the window up, sends what is due (within concurrency and rate), and
//! applies replies. The cursor it persists is the lowest seq still in the window (or the read
//! position when the window is empty), so an event leaves the queue only once it was
//! delivered or dead-lettered; with it go the runs above it already done, so a restart does
//! not send those again.
//!
//! Sink states: `ok`; `backoff` (some events wait for a retry); `paused` (Retry-After, or a
//! refused key until reload); `open` (the circuit: after `circuit_after` consecutive failures
//! of at least two different events, 429s not counted, only one probe goes out per backoff
//! interval; one log line when it opens, a summary every five minutes, one line when it
//! closes). Any reply
//! that is not a transient failure (delivered, refused, paused) closes the circuit: the
//! service is reachable.
//!
//! Probes rotate through the window (least recently tried first), so one event that always
//! fails cannot keep the circuit open while the others would go through.
//!
//! Poison events: a *strike* is a failure of an event while the sink delivered something else
//! since that event last failed (or was first sent). A single-event request's strikes add up
//! to `poison_after`, then the event goes to the dead letters. A multi-event batch that fails
//! that way is not struck but bisected (its events go out in halves), so the culprit ends up
//! alone and its batch-mates are delivered. An event failing on its own with nothing else
//! being sent is not evidence of either poison or outage: it does not open the circuit (its
//! own backoff already paces it like a probe would).
//!
//! A run of poison events as long as the window would fill it, so the good events behind
//! them would never be read, nothing would succeed and no strike would ever be earned. So a
//! window whose events were all sent and wait for a retry reads a little further (`limits`),
//! up to the ceiling, for an event that can succeed. Striking without a success would be
//! simpler and wrong: a window where every event fails on its own is also exactly what a 5xx
//! outage looks like, and dead-lettering on an outage is what this engine exists not to do.
//! Known limit: a run longer than the ceiling (`MAX_WINDOW_EVENTS`) still waits for
//! `max_age`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backoff::ExponentialBackoff;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::limits::{BatchCeiling, FlowControl};
use super::retry::{self, Verdict};
use crate::config::{SinkConfig, SinkKind};
use crate::event::{now_ms, StoredEvent};
use crate::ops::log_throttle::LogThrottle;
use crate::ops::metrics::{FailureClass, Metrics};
use crate::ops::status::StatusBoard;
use crate::queue::{DeadLetterInfo, Queue, ReadItem};
use crate::sinks::{self, Accepted, BuildContext, BuildError, RemoteId, Sink, SinkRequest};

/// The window's bounds (see `window_caps`): events, and payload bytes.
const MIN_WINDOW_EVENTS: usize = 1024;
const MAX_WINDOW_EVENTS: usize = 4096;
const MIN_WINDOW_BYTES: usize = 8 << 20;
const MAX_WINDOW_BYTES: usize = 32 << 20;
/// Most response bytes read (kept with dead letters, parsed for ids).
const MAX_RESPONSE: usize = 64 * 1024;
/// How often an ongoing outage is summarised in the log.
const OUTAGE_SUMMARY: Duration = Duration::from_secs(300);
/// A Retry-After pause at least this long is persisted (`Queue::set_not_before`), so a restart
/// honours it: the service asked for the time, and a daemon that restarts (an upgrade, a crash
/// loop) must not answer with a request at once. Shorter ones are over before a restart is.
const PERSIST_PAUSE_FROM: Duration = Duration::from_secs(1);
/// How long a follow-up waits before asking again whether its log was delivered.
const DEPENDENCY_WAIT: Duration = Duration::from_millis(200);

/// Bytes a batch body adds around its events: `[`, `]` and a comma per event for a JSON
/// array; a newline per event for NDJSON. Counted as 1 + one per event.
const FRAMING_PER_BATCH: usize = 1;
const FRAMING_PER_EVENT: usize = 1;

/// Most ranges of done events above the cursor persisted with it (`Queue::set_progress`):
/// 4 KiB. More only means more resends after a restart.
const MAX_DONE_RANGES: usize = 256;

/// At most one line about dead letters per this many milliseconds, per sink (plus a count).
const DEAD_LETTER_LOG_MS: u64 = 10_000;
/// At most one "could not persist the cursor" line per this many milliseconds, per sink (plus
/// a count): while the store is unavailable (a full disk) every pass of the loop fails it.
const CURSOR_LOG_MS: u64 = 10_000;

struct Slot {
    ev: StoredEvent,
    attempts: u32,
    strikes: u32,
    next_try: Instant,
    in_flight: bool,
    /// Largest batch this event may go in: halved by a 413, or by a failure while other
    /// requests succeed (bisection finds the event that fails the batch).
    max_batch: usize,
    first_attempt_ms: Option<u64>,
    last_attempt_ms: Option<u64>,
    /// The worker's send counter when this event last went out (0: never): probes go to the
    /// event sent least recently.
    last_sent: u64,
    /// The sink's success count when this event last failed (or was first sent): a success
    /// since then makes its next failure a strike.
    mark: u64,
    last_error: Option<(Option<u16>, String)>,
    /// When it entered the window (batch max wait).
    ready_at: Instant,
}

impl Slot {
    fn new(ev: StoredEvent, now: Instant) -> Slot {
        Slot {
            ev,
            attempts: 0,
            strikes: 0,
            next_try: now,
            in_flight: false,
            max_batch: usize::MAX,
            first_attempt_ms: None,
            last_attempt_ms: None,
            last_sent: 0,
            mark: 0,
            last_error: None,
            ready_at: now,
        }
    }
}

/// What came back for one request.
struct Done {
    seqs: Vec<u64>,
    elapsed: Duration,
    /// The config generation the request was built with (a refused key from before a reload
    /// says nothing about the new key).
    generation: u64,
    /// It carried the app's key, not the sink's (`SinkRequest::app_key`).
    app_key: bool,
    /// The worker's send counter when it went out (`Worker::sends`).
    sent: u64,
    result: Result<Reply, (FailureClass, String)>,
}

struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    /// Where a 3xx pointed (resolved against the request's URL, query left out).
    location: Option<String>,
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
    /// Opened within `OUTAGE_SUMMARY` of the last outage's end (a flapping endpoint): its
    /// start and end are logged at debug, and the flapping once per `OUTAGE_SUMMARY`.
    quiet: bool,
}

/// Outages that start soon after the one before: logged as one flapping line per
/// `OUTAGE_SUMMARY`, not a pair of lines each (up to five pairs a second were seen).
#[derive(Default)]
struct Flapping {
    /// When the last outage ended.
    last_end: Option<Instant>,
    /// Outages opened quietly since the last flapping line.
    unlogged: u32,
    /// When the last flapping line was written.
    logged_at: Option<Instant>,
}

pub(crate) struct Worker {
    name: String,
    id: u16,
    cfg: Arc<SinkConfig>,
    sink: Box<dyn Sink>,
    client: reqwest::Client,
    /// The same, keeping no idle connection: for the one immediate resend of a request whose
    /// pooled connection the server closed as it went out (`execute`).
    fresh_client: reqwest::Client,
    queue: Queue,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    window: BTreeMap<u64, Slot>,
    window_bytes: usize,
    read_pos: u64,
    persisted_cursor: u64,
    /// Runs of seqs at or above the cursor that are done (delivered or dead-lettered, and the
    /// seqs between them not routed here), start → end: persisted with the cursor, so a
    /// restart skips them (`advance_cursor`). Loaded at start; runs with no window event
    /// between them are merged, so there are at most as many as window events, plus one.
    done: BTreeMap<u64, u64>,
    /// `done` as last persisted.
    persisted_done: Vec<std::ops::Range<u64>>,
    /// `done` changed since the progress was persisted.
    progress_dirty: bool,
    /// The queue's store epoch the progress above was read at (`Queue::store_epoch`).
    store_epoch: u64,
    /// The end of the Retry-After pause last persisted (`Queue::set_not_before`), Unix ms.
    persisted_not_before_ms: u64,
    flow: FlowControl,
    /// The largest request the service was seen to accept (413/431): later batches are
    /// formed under it instead of being refused and halved again each time.
    ceiling: BatchCeiling,
    requests: JoinSet<Done>,
    /// The events of each request task, to recover them if the task itself fails.
    flights: HashMap<tokio::task::Id, Vec<u64>>,
    in_flight: usize,
    /// Of those, the requests sent since the last reload: an open circuit waits for these
    /// before its next probe, not for one sent before the reload (to the old url, say).
    in_flight_since_reload: usize,
    /// Of those, the requests sent to the endpoint the sink has now (since `endpoint_since`):
    /// what `concurrency` limits. Requests still out to the url before a reload load that
    /// one, not this, and may hang there for their whole timeout.
    in_flight_to_endpoint: usize,
    /// Bumped by every reload.
    generation: u64,
    /// The generation since which the sink's endpoint (url, key) is the one it has now: a
    /// request sent before then went to another.
    endpoint_since: u64,
    /// Requests sent so far (orders `Slot::last_sent`).
    sends: u64,
    /// `sends` when a 429 last lowered the limits: a 429 to a request sent before then
    /// answers the old pace, and lowers nothing more.
    throttled_at: u64,
    /// A Retry-After pause was logged since the last delivery (later ones log at debug).
    pause_logged: bool,
    flapping: Flapping,
    /// The service asked to wait (Retry-After) and nothing was delivered since: the sink is
    /// `paused` in status and metrics until a delivery, not `ok` between two pauses while its
    /// requests go out and get the next 429.
    paced: bool,
    /// Dead letters are logged one line, then one count per `DEAD_LETTER_LOG_MS`.
    dead_letter_log: LogThrottle,
    dead_letter_last_reason: String,
    /// Failures to persist the cursor are logged one line per `CURSOR_LOG_MS`, with a count.
    cursor_log: LogThrottle,
    /// The last attempt to persist the cursor failed (its recovery is logged once).
    cursor_failing: bool,
    /// A lone event's run of failures was logged (no circuit for it): say when it ends.
    failing_logged: bool,
    /// A redirect was logged since the last reload (later ones show in the status only).
    redirect_warned: bool,
    consecutive_failures: u32,
    /// Up to two different events that failed since the last success: the circuit opens only
    /// when more than one event fails.
    failing: Vec<u64>,
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

/// How much a worker reads ahead and holds (events read, in flight, or waiting for a retry):
/// every request it may have in flight plus one more batch ready to go,
/// `(concurrency + 1) × batch_max_events` (and the same in bytes), within
/// `MIN_WINDOW_*..=MAX_WINDOW_*`. The floor leaves room beside events waiting out a backoff;
/// the ceiling bounds memory. While a backlog drains, what a worker holds is in memory twice:
/// its decoded payloads, and sled's pages of the records behind its cursor (BENCHMARKS.md F30,
/// F33).
fn window_caps(cfg: &SinkConfig) -> (usize, usize) {
    let slots = cfg.concurrency.saturating_add(1);
    let events = slots
        .saturating_mul(cfg.batch.max_events)
        .clamp(MIN_WINDOW_EVENTS, MAX_WINDOW_EVENTS);
    let bytes = slots
        .saturating_mul(cfg.batch.max_bytes)
        .clamp(MIN_WINDOW_BYTES, MAX_WINDOW_BYTES);
    (events, bytes)
}

/// Builds the HTTP client for a sink: its timeout, bounded idle pool, and the proxy the
/// environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, read as curl
/// reads them), except for a sink on this host: a proxy cannot reach our loopback, and
/// reqwest, unlike Go's and Python's clients, sends `127.0.0.1` through it unless `NO_PROXY`
/// lists it, so a local collector got every request refused by the proxy.
///
/// Redirects are never followed: on 301/302/303 a client re-sends a POST as a GET without
/// its body, and the GET's 200 would count the batch as delivered. A 3xx is a failed
/// attempt instead (`retry::classify`), reported with its Location.
///
/// `pooled = false` builds one that keeps no idle connection, so each request opens its own.
pub(crate) fn client_for(cfg: &SinkConfig, pooled: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(if pooled { cfg.concurrency } else { 0 })
        .user_agent(concat!("llmlogd/", env!("CARGO_PKG_VERSION")));
    if is_loopback(url_and_headers(cfg).0) {
        b = b.no_proxy();
    }
    b.build().unwrap_or_else(|_| reqwest::Client::new())
}

/// Whether `url` names this host: `localhost` (or a name under it), 127.0.0.0/8 or `::1`.
pub(crate) fn is_loopback(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let h = host.trim_end_matches('.').to_ascii_lowercase();
            h == "localhost" || h.ends_with(".localhost")
        }
    }
}

/// What a Retry-After applies to: where requests go and with what credentials (the sink's
/// type, URL and key; for the `http` sink its headers, which carry its key).
fn endpoint(cfg: &SinkConfig) -> impl PartialEq + '_ {
    let (url, headers) = url_and_headers(cfg);
    (cfg.kind.type_name(), url, cfg.key.as_ref(), headers)
}

fn url_and_headers(cfg: &SinkConfig) -> (&String, Option<&BTreeMap<String, String>>) {
    match &cfg.kind {
        SinkKind::Http { url, headers, .. } => (url, Some(headers)),
        SinkKind::Pezzo { url, .. } | SinkKind::PromptLayer { url } => (url, None),
    }
}

/// `endpoint` as a number, stored with a persisted pause: a restart with the sink pointed
/// elsewhere (another url or key) drops the pause, as a reload does. std's `DefaultHasher`
/// (SipHash with fixed keys) is stable within a build; a build that hashes differently only
/// loses a pause across that upgrade (one request sent early, as before pauses persisted).
fn endpoint_fingerprint(cfg: &SinkConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    let (url, headers) = url_and_headers(cfg);
    let key = cfg.key.as_ref().map(|k| k.expose());
    (cfg.kind.type_name(), url, key, headers).hash(&mut h);
    h.finish()
}

/// The Retry-After pause a previous run persisted for this sink, if it is not over (capped
/// by `max_retry_after`, as a live one is) and was asked by the same endpoint.
fn restored_pause(queue: &Queue, id: u16, cfg: &SinkConfig, now: Instant) -> Option<Pause> {
    let (until_ms, fingerprint) = match queue.not_before(id) {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(sink = %cfg.name, error = %e, "could not read the sink's Retry-After pause from before the restart; not pausing");
            return None;
        }
    };
    let left = until_ms.saturating_sub(now_ms());
    if left == 0 || fingerprint != endpoint_fingerprint(cfg) {
        return None;
    }
    let d = Duration::from_millis(left).min(cfg.retry.max_retry_after);
    tracing::info!(sink = %cfg.name, pause = ?d, "the service asked to wait (Retry-After) before the restart; the sink stays paused until then");
    Some(Pause::Until(
        now + d,
        "Retry-After (asked before the restart)".into(),
    ))
}

impl Worker {
    pub(crate) fn new(
        cfg: Arc<SinkConfig>,
        id: u16,
        queue: Queue,
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
    ) -> Result<Self, crate::queue::QueueError> {
        let store_epoch = queue.store_epoch();
        let (cursor, done) = queue.progress(id)?;
        let now = Instant::now();
        let pause = restored_pause(&queue, id, &cfg, now);
        Ok(Worker {
            name: cfg.name.clone(),
            id,
            sink: sinks::build(&cfg),
            client: client_for(&cfg, true),
            fresh_client: client_for(&cfg, false),
            flow: FlowControl::new(cfg.concurrency, cfg.rate.clone(), now),
            ceiling: BatchCeiling::new(cfg.batch.max_events, cfg.batch.max_bytes, now),
            cfg,
            queue,
            metrics,
            board,
            window: BTreeMap::new(),
            window_bytes: 0,
            read_pos: cursor,
            persisted_cursor: cursor,
            done: done.iter().map(|r| (r.start, r.end)).collect(),
            persisted_done: done,
            progress_dirty: false,
            store_epoch,
            persisted_not_before_ms: 0,
            requests: JoinSet::new(),
            flights: HashMap::new(),
            in_flight: 0,
            in_flight_since_reload: 0,
            in_flight_to_endpoint: 0,
            generation: 0,
            endpoint_since: 0,
            sends: 0,
            throttled_at: 0,
            pause_logged: false,
            flapping: Flapping::default(),
            paced: false,
            dead_letter_log: LogThrottle::new(DEAD_LETTER_LOG_MS),
            dead_letter_last_reason: String::new(),
            cursor_log: LogThrottle::new(CURSOR_LOG_MS),
            cursor_failing: false,
            failing_logged: false,
            redirect_warned: false,
            consecutive_failures: 0,
            failing: Vec::new(),
            successes: 0,
            delivered: 0,
            dead_lettered: 0,
            circuit: None,
            pause,
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
        self.metrics.register_sink(&self.name);
        self.metrics.sink_state(&self.name, "ok");
        loop {
            let now = Instant::now();
            if self.queue.store_epoch() != self.store_epoch {
                self.resync();
            }
            // Expired events leave first, so the refill takes their room at once.
            self.sweep_expired(now);
            self.log_held_dead_letters();
            let readable = match self.refill() {
                Ok(read_on) => read_on,
                Err(e) => {
                    self.note_error(format!("reading the queue: {e}"));
                    false
                }
            };
            let mut wake = self.dispatch(now);
            let (max_events, max_bytes) = self.limits();
            let room = self.window.len() < max_events && self.window_bytes < max_bytes;
            // Events left the window without a reply to wake us (dead-lettered while
            // dispatching, say, or behind an open circuit whose probe found the window empty)
            // and more wait in the queue: read on now, never sleep on a backlog. After a
            // failed read, in a second.
            if room && self.read_pos < *self.queue.head().borrow() {
                let t = if readable {
                    now
                } else {
                    now + Duration::from_secs(1)
                };
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            self.advance_cursor();
            self.publish();
            let sleep =
                tokio::time::sleep_until(wake.unwrap_or(now + Duration::from_secs(3600)).into());
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(joined) = self.requests.join_next_with_id(), if self.in_flight > 0 => {
                    self.joined(joined);
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
                Some(joined) = self.requests.join_next_with_id() => self.joined(joined),
            }
        }
        self.requests.abort_all();
        self.advance_cursor();
        if config.has_changed().is_err() {
            // The manager dropped our config: the sink was removed (or the daemon stops).
            // Take its status and metrics down, after the last update this loop may have made.
            self.board.remove(&self.name);
            self.metrics.forget_sink(&self.name);
        } else {
            self.publish();
        }
    }

    /// A request task ended: apply its reply, or, if the task itself failed (it never
    /// should), retry its events rather than lose track of them.
    fn joined(&mut self, joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>) {
        let done = match joined {
            Ok((id, done)) => {
                self.flights.remove(&id);
                done
            }
            Err(e) => Done {
                seqs: self.flights.remove(&e.id()).unwrap_or_default(),
                elapsed: Duration::ZERO,
                generation: self.generation,
                app_key: false,
                sent: 0,
                result: Err((FailureClass::other, format!("delivery task failed: {e}"))),
            },
        };
        self.complete(done, Instant::now());
    }

    fn reconfigure(&mut self, cfg: Arc<SinkConfig>) {
        self.reconfigure_at(cfg, Instant::now());
    }

    /// Applies a reload. Every reload, even one that changes nothing for this sink, resumes
    /// a sink paused for its key and lets an open circuit probe at once: a reload is how an
    /// operator says "fixed, try now" (the key may have been fixed on the service's side, or
    /// behind a proxy). Only a changed config resets the rest (client, limits, backoffs).
    fn reconfigure_at(&mut self, cfg: Arc<SinkConfig>, now: Instant) {
        // A 401 still in flight answers for the time before the reload: ignored.
        self.generation += 1;
        self.in_flight_since_reload = 0;
        self.redirect_warned = false;
        if matches!(self.pause, Some(Pause::UntilReload(_))) {
            tracing::info!(sink = %self.name, "config reloaded; resuming the sink paused for its key");
            self.pause = None;
        }
        if let Some(c) = &mut self.circuit {
            c.next_probe = c.next_probe.min(now);
        }
        if *cfg == *self.cfg {
            return;
        }
        if endpoint(&cfg) != endpoint(&self.cfg) {
            self.endpoint_since = self.generation;
            self.in_flight_to_endpoint = 0;
        }
        // A Retry-After was the old endpoint's (or the old key's) request: a different one
        // owes it nothing. Kept when only other settings changed.
        if matches!(self.pause, Some(Pause::Until(..))) && endpoint(&cfg) != endpoint(&self.cfg) {
            tracing::info!(sink = %self.name, "config reloaded with a new endpoint or key; dropping the Retry-After pause");
            self.pause = None;
            self.paced = false;
            self.persisted_not_before_ms = 0;
            if let Err(e) = self.queue.clear_not_before(self.id) {
                tracing::debug!(sink = %self.name, error = %e, "could not forget the persisted pause (its endpoint fingerprint no longer matches anyway)");
            }
        }
        // What the old endpoint accepted says nothing about a new one, and new maxima are
        // the operator saying what to send: start from them.
        if cfg.batch.max_events != self.cfg.batch.max_events
            || cfg.batch.max_bytes != self.cfg.batch.max_bytes
            || endpoint(&cfg) != endpoint(&self.cfg)
        {
            self.ceiling = BatchCeiling::new(cfg.batch.max_events, cfg.batch.max_bytes, now);
        }
        self.sink = sinks::build(&cfg);
        self.client = client_for(&cfg, true);
        self.fresh_client = client_for(&cfg, false);
        self.flow.reconfigure(cfg.concurrency, cfg.rate.clone());
        for s in self.window.values_mut() {
            if !s.in_flight {
                s.next_try = s.next_try.min(now);
            }
        }
        self.cfg = cfg;
    }

    /// How much the window may hold now: `window_caps`, or, while it is full of events that
    /// were all sent and wait for a retry (a run of failing events as long as the window),
    /// a little more (a request's worth, at least `concurrency` events), within the ceiling.
    /// A later event may then succeed, which is the evidence a poison strike needs; without
    /// it a window-long run of poison events would hold the sink until `max_age`. In an
    /// outage the window grows this way, one step per round of probes, up to the ceiling.
    fn limits(&self) -> (usize, usize) {
        let (events, bytes) = window_caps(&self.cfg);
        let full = self.window.len() >= events || self.window_bytes >= bytes;
        if !full || self.window.values().any(|s| s.last_sent == 0) {
            return (events, bytes);
        }
        let step = self
            .sink
            .events_per_request()
            .max(self.cfg.concurrency)
            .max(1);
        (
            (self.window.len() + step).clamp(events, MAX_WINDOW_EVENTS.max(events)),
            (self.window_bytes + self.cfg.batch.max_bytes)
                .clamp(bytes, MAX_WINDOW_BYTES.max(bytes)),
        )
    }

    /// Tops the window up from the queue. `Ok(false)` when a read made no progress (the
    /// caller then does not spin on reading again).
    fn refill(&mut self) -> Result<bool, crate::queue::QueueError> {
        let head = *self.queue.head().borrow();
        let now = Instant::now();
        let (max_events, max_bytes) = self.limits();
        while self.read_pos < head
            && self.window.len() < max_events
            && self.window_bytes < max_bytes
        {
            let batch = self.queue.read(
                self.id,
                self.read_pos,
                max_events - self.window.len(),
                max_bytes - self.window_bytes,
                8192,
            )?;
            if batch.next <= self.read_pos {
                return Ok(false);
            }
            self.read_pos = batch.next;
            for item in batch.items {
                let seq = match &item {
                    ReadItem::Event(ev) => ev.seq,
                    ReadItem::Corrupt { seq, .. } => *seq,
                };
                // Already held: an event still in flight when the progress was read again
                // (`resync`).
                if self.done_before(seq) || self.window.contains_key(&seq) {
                    continue;
                }
                match item {
                    ReadItem::Event(ev) => {
                        self.window_bytes += ev.payload.len();
                        self.window.insert(ev.seq, Slot::new(ev, now));
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
        Ok(true)
    }

    /// Dead-letters events older than `max_age` that were sent at least once, or that wait
    /// behind an open circuit or a Retry-After pause (which may never let them be sent).
    /// Never while the sink waits for a fixed key: a wrong key loses nothing.
    fn sweep_expired(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_expiry_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_expiry_sweep = now;
        if matches!(self.pause, Some(Pause::UntilReload(_))) {
            return;
        }
        let held = self.circuit.is_some() || self.pause.is_some();
        let max_age = self.cfg.retry.max_age.as_millis() as u64;
        let wall = now_ms();
        let expired: Vec<u64> = self
            .window
            .iter()
            .filter(|(_, s)| {
                !s.in_flight
                    && (held || s.first_attempt_ms.is_some())
                    && wall.saturating_sub(s.ev.received_ms) > max_age
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
                tracing::debug!(sink = %self.name, "Retry-After pause over; resuming delivery");
                self.pause = None;
            }
            None => {}
        }
        if let Some(c) = &mut self.circuit {
            if now.saturating_duration_since(c.last_summary) >= OUTAGE_SUMMARY {
                c.last_summary = now;
                tracing::warn!(
                    sink = %self.name,
                    down_for = %humantime::format_duration(Duration::from_secs(now.saturating_duration_since(c.since).as_secs())),
                    waiting = self.window.len(),
                    failed_probes = c.failures,
                    last_error = self.last_error.as_deref().unwrap_or(""),
                    "sink still unreachable"
                );
            }
            if self.in_flight_since_reload > 0 {
                // A probe (or a request sent before the circuit opened) is out: its reply
                // wakes us. Never return a time already past, or the loop would spin. One
                // sent before the last reload is not waited for: the reload is the operator
                // saying "fixed, try now", and that probe may hang on the old url for its
                // whole timeout.
                return None;
            }
            if now < c.next_probe {
                return Some(c.next_probe);
            }
            // One probe: the event tried least recently (never-tried ones first), so probes
            // rotate and one event that always fails cannot hold the circuit open.
            let probe = self
                .window
                .iter()
                .filter(|(_, s)| !s.in_flight)
                .min_by_key(|(k, s)| (s.last_sent, **k))
                .map(|(k, _)| *k);
            let seq = probe?;
            let next = retry::next_probe(&mut c.backoff, self.cfg.retry.max);
            c.next_probe = now + next;
            let next_probe = c.next_probe;
            return match self.send(vec![seq], now) {
                Some(later) => Some(later.min(next_probe)),
                None => Some(next_probe),
            };
        }

        let per_request = self.sink.events_per_request().max(1);
        let max_bytes = self.ceiling.bytes();
        let max_events = self.ceiling.events();
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
        while i < due.len() && self.in_flight_to_endpoint < self.flow.concurrency() {
            // Form one request's worth: at most `per_request` events (and the smallest
            // `max_batch` among them), at most `max_bytes` of body, both within the ceiling
            // the service taught (413/431).
            let first = &self.window[&due[i]];
            let mut limit = per_request.min(max_events).min(first.max_batch).max(1);
            let mut group = vec![due[i]];
            let mut bytes = FRAMING_PER_BATCH + first.ev.payload.len() + FRAMING_PER_EVENT;
            let mut j = i + 1;
            // Whether something other than running out of due events ended the batch.
            let mut full = group.len() >= limit;
            while !full && j < due.len() {
                let s = &self.window[&due[j]];
                let size = s.ev.payload.len() + FRAMING_PER_EVENT;
                if group.len() + 1 > s.max_batch || bytes + size > max_bytes {
                    full = true;
                    break;
                }
                bytes += size;
                limit = limit.min(s.max_batch);
                group.push(due[j]);
                j += 1;
                full = group.len() >= limit;
            }
            // A batch that could still grow waits up to max_wait for more, unless more is
            // already queued.
            if !full && caught_up {
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
            if let Some(later) = self.send(group, now) {
                earliest(later, &mut wake);
            }
            i = j;
        }
        wake
    }

    /// Builds and starts one request for `seqs`. When it cannot be built yet (a follow-up
    /// waiting for its log), returns when to try again.
    fn send(&mut self, seqs: Vec<u64>, now: Instant) -> Option<Instant> {
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
                return Some(now + DEPENDENCY_WAIT);
            }
            Err(BuildError::Unrenderable(reason)) => {
                self.metrics.failed(&self.name, FailureClass::convert);
                for k in seqs {
                    self.dead_letter(k, &format!("cannot render for this sink: {reason}"), None);
                }
                return None;
            }
            Err(BuildError::NoKey) => {
                if !matches!(self.pause, Some(Pause::UntilReload(_))) {
                    tracing::error!(sink = %self.name, "no API key: neither the sink's config nor the app gave one; holding events until a reload");
                }
                self.note_error("no API key configured and none sent by the app".into());
                self.pause = Some(Pause::UntilReload("no API key".into()));
                return None;
            }
        };
        let wall = now_ms();
        self.sends += 1;
        for k in &seqs {
            if let Some(s) = self.window.get_mut(k) {
                s.in_flight = true;
                s.last_sent = self.sends;
                if s.first_attempt_ms.is_none() {
                    s.first_attempt_ms = Some(wall);
                    s.mark = self.successes;
                }
                s.last_attempt_ms = Some(wall);
            }
        }
        self.in_flight += 1;
        self.in_flight_since_reload += 1;
        self.in_flight_to_endpoint += 1;
        self.metrics.in_flight(&self.name, 1);
        let (client, fresh) = (self.client.clone(), self.fresh_client.clone());
        let generation = self.generation;
        let app_key = req.app_key;
        let sent = self.sends;
        let task_seqs = seqs.clone();
        let timeout = request_timeout(self.cfg.timeout, req.body.len());
        let handle = self.requests.spawn(async move {
            let started = Instant::now();
            let result = execute(&client, &fresh, req, timeout).await;
            Done {
                seqs: task_seqs,
                elapsed: started.elapsed(),
                generation,
                app_key,
                sent,
                result,
            }
        });
        self.flights.insert(handle.id(), seqs);
        None
    }

    /// Applies what came back for one request.
    fn complete(&mut self, done: Done, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if done.generation == self.generation {
            self.in_flight_since_reload = self.in_flight_since_reload.saturating_sub(1);
        }
        if done.generation >= self.endpoint_since {
            self.in_flight_to_endpoint = self.in_flight_to_endpoint.saturating_sub(1);
        }
        self.metrics.in_flight(&self.name, -1);
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
                let body = if (300..400).contains(&reply.status) {
                    let msg = redirect_message(reply.status, reply.location.as_deref());
                    if !self.redirect_warned {
                        tracing::warn!(sink = %self.name, "{msg}; holding its events and retrying");
                        self.redirect_warned = true;
                    }
                    msg
                } else {
                    String::from_utf8_lossy(&reply.body).into_owned()
                };
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
                            self.reachable(now);
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
        if verdict == Verdict::PauseAuth && done.generation != self.generation {
            // Sent with the key of a config that was reloaded since: says nothing about the
            // current key. Send again (not an attempt).
            self.metrics.failed(&self.name, FailureClass::auth);
            return;
        }
        if verdict != Verdict::Delivered && done.generation < self.endpoint_since {
            // An answer from the endpoint (url or key) the sink had before a reload says
            // nothing about the one it has now: its Retry-After must not pause the new one (up
            // to `max_retry_after`, persisted; the reload dropped the old one's pause), its
            // timeouts must not open the new one's circuit, and its 404s (the url the reload
            // fixed) must not dead-letter events the new one would take. Send again at once
            // (not an attempt).
            let class = match verdict {
                Verdict::Retry(c)
                | Verdict::PauseFor(_, c)
                | Verdict::Split(c)
                | Verdict::Reject(c) => c,
                Verdict::PauseAuth | Verdict::Delivered => FailureClass::auth,
            };
            self.metrics.failed(&self.name, class);
            return;
        }
        let mut verdict = verdict;
        if verdict == Verdict::PauseAuth && done.app_key {
            // The app's own key, refused. Pausing the sink would stall every other app's
            // events too, for good (a paused sink never ages its events out). When the sink
            // delivered something since these events went out, other keys work: it is this
            // app's key, and its events go to the dead letters. With no such evidence every
            // key may be refused (the url points at another region or deployment of the
            // service, or its auth is failing): held and retried like an outage, so that does
            // not empty the backlog into the dead letters.
            if self.delivered_since(&seqs) {
                self.metrics.failed(&self.name, FailureClass::auth);
                self.reachable(now);
                let reason = format!(
                    "the service refused the app's API key (HTTP {})",
                    status.unwrap_or(0)
                );
                return self.reject(&seqs, status, &reason, Some(detail));
            }
            verdict = Verdict::Retry(FailureClass::auth);
        }
        if !matches!(verdict, Verdict::Retry(_)) {
            // The service answered: it is reachable, whatever it thought of these events.
            self.reachable(now);
        }
        match verdict {
            Verdict::Delivered => {
                let n = seqs.len() as u64;
                let bytes = self.request_bytes(&seqs);
                self.ceiling.delivered(seqs.len(), bytes, now);
                for k in &seqs {
                    if let Some(s) = self.window.remove(k) {
                        self.window_bytes -= s.ev.payload.len();
                        self.mark_done(*k);
                    }
                }
                self.successes += 1;
                self.delivered += n;
                self.metrics.delivered(&self.name, n);
                self.last_success_ms = Some(now_ms());
                self.pause_logged = false;
                self.paced = false;
                self.flow.on_success();
                self.reachable(now);
            }
            Verdict::Retry(class) => {
                self.metrics.failed(&self.name, class);
                let throttled = class == FailureClass::status_429;
                if throttled {
                    self.throttle(done.sent);
                }
                let what = match status {
                    // Already says what happened (and names the status).
                    Some(st) if (300..400).contains(&st) => detail.clone(),
                    Some(st) if class == FailureClass::auth => format!(
                        "HTTP {st}: the service refused the app's API key, and no other key worked since: {}",
                        snippet(&detail)
                    ),
                    Some(st) => format!("HTTP {st}: {}", snippet(&detail)),
                    None => detail.clone(),
                };
                self.note_error(what.clone());
                // A 429 is a service that answers and asks for a slower pace (AIMD above), not
                // an outage: it does not count towards the circuit, which would call the sink
                // unreachable, and reachable again, at every burst of them.
                if !throttled {
                    self.consecutive_failures += 1;
                    for k in &seqs {
                        if self.failing.len() >= 2 {
                            break;
                        }
                        if !self.failing.contains(k) {
                            self.failing.push(*k);
                        }
                    }
                }
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
                // Did the sink deliver anything else since these events last failed (or were
                // first sent)? Then this failure is about them, not the service: strike a
                // lone event, bisect a batch. A 429 is about the pace, never the event. A
                // failure without a reply (a reset, a timeout, a reply cut short) bisects but
                // never strikes: it says nothing about the event for certain, and on a flaky
                // network 5 of them in a row befall healthy events by chance (1 in 243 at one
                // failed request in three), which then sat in the dead letters.
                let successes = self.successes;
                let evidence = !throttled && self.delivered_since(&seqs);
                let bisect = evidence && seqs.len() > 1;
                let strike = evidence && status.is_some();
                let half = (seqs.len() / 2).max(1);
                for k in &seqs {
                    let Some(s) = self.window.get_mut(k) else {
                        continue;
                    };
                    s.attempts += 1;
                    s.last_error = Some((status, detail.clone()));
                    if bisect {
                        s.max_batch = s.max_batch.min(half);
                    } else if strike {
                        s.strikes += 1;
                    }
                    s.mark = successes;
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
                if self.circuit.is_none()
                    && self.failing.len() < 2
                    && self.consecutive_failures == self.cfg.retry.circuit_after
                {
                    // One event failing on its own may be poison or an outage with one event
                    // waiting: no circuit, but the operator hears of it once.
                    tracing::warn!(
                        sink = %self.name,
                        error = %what,
                        failures = self.consecutive_failures,
                        "deliveries are failing; retrying with backoff"
                    );
                    self.failing_logged = true;
                }
                if let Some(c) = &mut self.circuit {
                    c.failures += 1;
                } else if self.consecutive_failures >= self.cfg.retry.circuit_after
                    && self.failing.len() >= 2
                {
                    let mut backoff = retry::backoff(self.cfg.retry.initial, self.cfg.retry.max);
                    let first = retry::next_probe(&mut backoff, self.cfg.retry.max);
                    let f = &mut self.flapping;
                    let quiet = f
                        .last_end
                        .is_some_and(|t| now.saturating_duration_since(t) < OUTAGE_SUMMARY);
                    if !quiet {
                        tracing::warn!(
                            sink = %self.name,
                            error = %what,
                            waiting = self.window.len(),
                            "sink unreachable; holding events and sending one probe per backoff interval"
                        );
                    } else {
                        f.unlogged += 1;
                        tracing::debug!(sink = %self.name, error = %what, "sink unreachable again");
                        if f.logged_at
                            .is_none_or(|t| now.saturating_duration_since(t) >= OUTAGE_SUMMARY)
                        {
                            tracing::warn!(
                                sink = %self.name,
                                outages = f.unlogged,
                                error = %what,
                                "sink flapping: unreachable again within minutes of coming back; its outages are logged once per five minutes"
                            );
                            f.logged_at = Some(now);
                            f.unlogged = 0;
                        }
                    }
                    self.circuit = Some(Circuit {
                        since: now,
                        next_probe: now + first,
                        backoff,
                        failures: 0,
                        last_summary: now,
                        quiet,
                    });
                }
            }
            Verdict::PauseFor(d, class) => {
                self.metrics.failed(&self.name, class);
                self.paced = true;
                // No AIMD here: the service set the pace itself. Halving the rate at each such
                // 429 as well compounded across a run of pauses (the rate sent during a pause
                // is near zero), down to 0.2 requests/s, and once the service took events
                // again a backlog of 1,000 took 90 s to drain instead of a few.
                // Capped by config; and never shorter than the first retry delay, so a
                // service answering `Retry-After: 0` (or a date in the past) to everything
                // is not hammered in a loop that counts no attempts.
                let r = &self.cfg.retry;
                let d = d
                    .min(r.max_retry_after)
                    .max(r.initial.min(r.max_retry_after));
                let until = now + d;
                let later = match &self.pause {
                    Some(Pause::Until(t, _)) => until > *t,
                    // A sink waiting for a fixed key keeps waiting for it.
                    Some(Pause::UntilReload(_)) => false,
                    None => true,
                };
                if later {
                    // One line per run of pauses, not one per 429.
                    if self.pause_logged {
                        tracing::debug!(sink = %self.name, status = ?status, pause = ?d, "Retry-After; pausing the sink");
                    } else {
                        tracing::info!(sink = %self.name, status = ?status, pause = ?d, "service asked to wait (Retry-After); pausing the sink");
                        self.pause_logged = true;
                    }
                    self.pause = Some(Pause::Until(
                        until,
                        format!("Retry-After from HTTP {}", status.unwrap_or(0)),
                    ));
                    let until_ms = now_ms() + d.as_millis() as u64;
                    // Written (and synced) when it moves the stored end by a second or more:
                    // the 429s of a round of requests in flight each extend the pause by a
                    // few milliseconds, and need not each cost a sync on this task.
                    if d >= PERSIST_PAUSE_FROM
                        && until_ms
                            >= self.persisted_not_before_ms + PERSIST_PAUSE_FROM.as_millis() as u64
                    {
                        let fingerprint = endpoint_fingerprint(&self.cfg);
                        match self.queue.set_not_before(self.id, until_ms, fingerprint) {
                            Ok(()) => self.persisted_not_before_ms = until_ms,
                            Err(e) => {
                                tracing::warn!(sink = %self.name, error = %e, "could not persist the Retry-After pause (a restart would not honour it)");
                            }
                        }
                    }
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
            Verdict::Split(class) => {
                // Bisect: halves go out at once; a half still too large (or still refused) is
                // halved again, and a single event that still is goes to the dead letters
                // (`Reject`). Not an attempt: the batch-mates did nothing wrong.
                self.metrics.failed(&self.name, class);
                if class == FailureClass::too_large {
                    let before = (self.ceiling.events(), self.ceiling.bytes());
                    let bytes = self.request_bytes(&seqs);
                    self.ceiling
                        .too_large(status.unwrap_or(413), seqs.len(), bytes, now);
                    let after = (self.ceiling.events(), self.ceiling.bytes());
                    if after != before {
                        tracing::info!(
                            sink = %self.name,
                            status = ?status,
                            refused_events = seqs.len(),
                            refused_bytes = bytes,
                            max_events = after.0,
                            max_bytes = after.1,
                            "the service refused a batch as too large; later batches stay under what it accepts"
                        );
                    }
                }
                if class == FailureClass::rejected_4xx {
                    self.note_error(format!(
                        "HTTP {}: {} (halving the batch to find the refused events)",
                        status.unwrap_or(0),
                        snippet(&detail)
                    ));
                }
                let half = (seqs.len() / 2).max(1);
                for k in &seqs {
                    if let Some(s) = self.window.get_mut(k) {
                        s.max_batch = s.max_batch.min(half);
                        s.next_try = now;
                    }
                }
            }
            Verdict::Reject(class) => {
                self.metrics.failed(&self.name, class);
                let reason = match class {
                    FailureClass::too_large => {
                        format!("too large for the service (HTTP {})", status.unwrap_or(413))
                    }
                    _ => format!("refused by the service (HTTP {})", status.unwrap_or(0)),
                };
                self.reject(&seqs, status, &reason, Some(detail));
            }
        }
    }

    /// A 429 to the request sent as number `sent`: lowers concurrency and rate (AIMD) once per
    /// round of requests, as TCP halves once per window. Every request in flight when the
    /// service starts refusing gets a 429; counted each, a burst of them at concurrency 16
    /// halved the rate 16 times, to its floor, and the sink crawled for tens of seconds.
    fn throttle(&mut self, sent: u64) {
        if sent > self.throttled_at {
            self.flow.on_throttle();
            self.throttled_at = self.sends;
        }
    }

    /// The service answered with something other than a transient failure: it is reachable,
    /// so the failure count starts over and an open circuit closes.
    fn reachable(&mut self, now: Instant) {
        self.consecutive_failures = 0;
        self.failing.clear();
        if std::mem::take(&mut self.failing_logged) && self.circuit.is_none() {
            tracing::info!(sink = %self.name, "deliveries succeed again");
        }
        if let Some(c) = self.circuit.take() {
            let down_for = humantime::format_duration(Duration::from_secs(
                now.saturating_duration_since(c.since).as_secs(),
            ));
            if c.quiet {
                tracing::debug!(sink = %self.name, %down_for, failed_probes = c.failures, "sink reachable again");
            } else {
                tracing::info!(
                    sink = %self.name,
                    %down_for,
                    failed_probes = c.failures,
                    "sink reachable again; resuming delivery"
                );
            }
            self.flapping.last_end = Some(now);
            for s in self.window.values_mut() {
                if !s.in_flight {
                    s.next_try = s.next_try.min(now);
                }
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

    /// Logs how many dead letters the last period held back, if any and if the period is over.
    fn log_held_dead_letters(&self) {
        if let Some(events) = self.dead_letter_log.held_if_due() {
            tracing::warn!(
                sink = %self.name,
                events,
                last_reason = %self.dead_letter_last_reason,
                "more events moved to the dead letters (llmlogd dlq list)"
            );
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
                self.mark_done(seq);
                self.dead_lettered += 1;
                self.metrics.dead_lettered(&self.name, 1);
                // One line, then at most one count per period: expiring a backlog after a
                // long outage must not write a line per event.
                match self.dead_letter_log.ready() {
                    Some(held) => tracing::warn!(
                        sink = %self.name,
                        seq,
                        reason,
                        held,
                        "event moved to the dead letters"
                    ),
                    None => self.dead_letter_last_reason = reason.to_string(),
                }
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

    /// The body bytes a request of these window events counts for (`dispatch`'s measure:
    /// payloads plus framing).
    fn request_bytes(&self, seqs: &[u64]) -> usize {
        seqs.iter()
            .filter_map(|k| self.window.get(k))
            .map(|s| s.ev.payload.len() + FRAMING_PER_EVENT)
            .sum::<usize>()
            + FRAMING_PER_BATCH
    }

    /// Whether the sink delivered anything since any of `seqs` last failed (or was first
    /// sent): then a failure is about these events (or their key), not the service.
    fn delivered_since(&self, seqs: &[u64]) -> bool {
        seqs.iter()
            .filter_map(|k| self.window.get(k))
            .any(|s| self.successes > s.mark)
    }

    /// Whether `seq` is done already (it was before the last stop: the refill skips it).
    fn done_before(&self, seq: u64) -> bool {
        self.done
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| end > seq)
    }

    /// Records that `seq` (out of the window now) is done, merged with the runs beside it
    /// when no window event lies between: every seq below the read position that is not in
    /// the window is done or not routed here.
    fn mark_done(&mut self, seq: u64) {
        let (mut start, mut end) = (seq, seq + 1);
        if let Some((&a, &e)) = self.done.range(..=seq).next_back() {
            if e >= seq || self.window.range(e..seq).next().is_none() {
                self.done.remove(&a);
                (start, end) = (a, end.max(e));
            }
        }
        if let Some((&a, &e)) = self.done.range(end..).next() {
            if self.window.range(end..a).next().is_none() {
                self.done.remove(&a);
                end = end.max(e);
            }
        }
        self.done.insert(start, end);
        self.progress_dirty = true;
    }

    /// The done runs above `cursor` (dropping those below), at most `MAX_DONE_RANGES`, lowest
    /// first.
    fn done_ranges(&mut self, cursor: u64) -> Vec<std::ops::Range<u64>> {
        while let Some((&a, &e)) = self.done.first_key_value() {
            if e > cursor {
                break;
            }
            self.done.remove(&a);
        }
        self.done
            .iter()
            .take(MAX_DONE_RANGES)
            .map(|(&a, &e)| a.max(cursor)..e)
            .collect()
    }

    /// Takes up the progress the store holds after it was opened again following a storage
    /// error. The store then holds only what was synced: a dead letter, a PromptLayer id or
    /// the progress written just before the error may be gone, while this worker counts those
    /// events as done. Had it written its cursor on, such an event would be lost: neither
    /// delivered nor in the dead letters. So it reads the cursor and done runs back, and
    /// reads the log from there again: what was done since the store's last sync is done
    /// again (at-least-once: deliveries may repeat). Events in flight stay, so their replies
    /// still count; the others are read again.
    fn resync(&mut self) {
        let epoch = self.queue.store_epoch();
        let (cursor, done) = match self.queue.progress(self.id) {
            Ok(p) => p,
            Err(e) => {
                // Tried again at the next pass, before anything is written.
                self.note_error(format!(
                    "reading the progress after the store reopened: {e}"
                ));
                return;
            }
        };
        tracing::warn!(
            sink = %self.name,
            cursor,
            was = self.persisted_cursor,
            "the queue store was opened again after a storage error: delivery goes on from the progress it holds (events done since its last sync are sent again)"
        );
        self.store_epoch = epoch;
        self.window.retain(|_, s| s.in_flight);
        self.window_bytes = self.window.values().map(|s| s.ev.payload.len()).sum();
        self.read_pos = cursor;
        self.persisted_cursor = cursor;
        self.done = done.iter().map(|r| (r.start, r.end)).collect();
        self.persisted_done = done;
        self.progress_dirty = false;
    }

    /// Persists the cursor (the lowest seq in the window, or the read position), and with it
    /// which events above it are done already: the cursor alone stops at the first event still
    /// waiting, and a restart would send everything after it again, dead letters too (a purged
    /// one would come back).
    fn advance_cursor(&mut self) {
        let cursor = self
            .window
            .keys()
            .next()
            .copied()
            .unwrap_or(self.read_pos)
            .max(self.persisted_cursor);
        if cursor == self.persisted_cursor && !self.progress_dirty {
            return;
        }
        let done = self.done_ranges(cursor);
        if cursor == self.persisted_cursor && done == self.persisted_done {
            self.progress_dirty = false;
            return;
        }
        match self
            .queue
            .set_progress_at(self.store_epoch, self.id, cursor, &done)
        {
            Ok(()) => {
                self.persisted_cursor = cursor;
                self.persisted_done = done;
                self.progress_dirty = false;
                if std::mem::take(&mut self.cursor_failing) {
                    let skipped = self.cursor_log.reset();
                    tracing::info!(sink = %self.name, skipped, "the cursor is persisted again");
                }
            }
            Err(crate::queue::QueueError::Reopened) => self.resync(),
            Err(e) => {
                self.cursor_failing = true;
                // One line, then at most one per period carrying how many were held
                // back: the loop retries at every pass (about once a second).
                if let Some(skipped) = self.cursor_log.ready() {
                    tracing::warn!(sink = %self.name, error = %e, skipped, "could not persist the cursor")
                }
            }
        }
    }

    fn note_error(&mut self, e: String) {
        self.last_error = Some(e);
        self.last_error_ms = Some(now_ms());
    }

    fn state(&self) -> &'static str {
        if self.pause.is_some() || (self.paced && !self.window.is_empty()) {
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
        self.metrics
            .batch_ceiling(&self.name, self.ceiling.events(), self.ceiling.bytes());
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
            s.batch_ceiling_events = self.ceiling.events();
            s.batch_ceiling_bytes = self.ceiling.bytes();
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

/// The upload rate a request's body is given time for beyond the sink's `timeout`: 1 MiB/s
/// (~8 Mbit/s, a slow uplink).
const UPLOAD_FLOOR_BYTES_PER_SEC: f64 = (1 << 20) as f64;

/// How long one request may take: the sink's `timeout`, plus the time its body takes to go
/// out at `UPLOAD_FLOOR_BYTES_PER_SEC`. With the whole request held to `timeout`, a 10 MB
/// event (an image in a vision request) on an 8 Mbit/s uplink timed out at every attempt
/// and could only end in the dead letters; a batch of ordinary size gets a fraction of a
/// second more.
fn request_timeout(timeout: Duration, body_bytes: usize) -> Duration {
    timeout + Duration::from_secs_f64(body_bytes as f64 / UPLOAD_FLOOR_BYTES_PER_SEC)
}

/// Sends one request within `timeout` (see [`request_timeout`]); reads at most
/// `MAX_RESPONSE` bytes of the reply.
///
/// A request whose connection is closed or reset before any reply is sent once more at
/// once, on a new connection (`fresh`). That is what a server closing an idle keep-alive
/// connection (its own idle timeout: 5 s in Node, uvicorn and Apache) looks like when the
/// request went out on it at that moment: nothing is wrong with the service, and counted as
/// a failed attempt each such request waited out a backoff, and at a concurrency of 8 or more
/// opened the circuit, logging the sink unreachable (and reachable again at once). Requests
/// are idempotent (event ids), as Go's client requires before it resends on a reused
/// connection; since reqwest does not say whether the connection was reused, a fresh one
/// failing that way is sent twice too: at most one more request per attempt.
async fn execute(
    client: &reqwest::Client,
    fresh: &reqwest::Client,
    req: SinkRequest,
    timeout: Duration,
) -> Result<Reply, (FailureClass, String)> {
    let location = |resp: &reqwest::Response| {
        let loc = resp
            .headers()
            .get(reqwest::header::LOCATION)?
            .to_str()
            .ok()?;
        let url = resp.url().join(loc).ok()?;
        // A query may carry a token (a signed URL): masked like the sink's own URL.
        Some(crate::config::redact_url(url.as_str()))
    };
    let send = |client: &reqwest::Client| {
        let mut rb = client
            .post(&req.url)
            .timeout(timeout)
            .body(req.body.clone());
        for (k, v) in &req.headers {
            rb = rb.header(k, v);
        }
        rb.send()
    };
    let mut resp = match send(client).await {
        Ok(r) => r,
        Err(e) if closed_before_reply(&e) => send(fresh).await.map_err(transport_error)?,
        Err(e) => return Err(transport_error(e)),
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let location = if (300..400).contains(&status) {
        location(&resp)
    } else {
        None
    };
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
    // What the reply says goes to status, the logs and the dead letters: never with the key
    // the request carried, should the service quote it back.
    let body = crate::sinks::mask_secrets(body, &req.secrets());
    Ok(Reply {
        status,
        retry_after,
        location,
        body,
    })
}

/// Whether the connection was closed or reset under a request before any reply came (not a
/// refused connection, not a timeout).
fn closed_before_reply(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() {
        return false;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            );
        }
        src = s.source();
    }
    false
}

fn transport_error(e: reqwest::Error) -> (FailureClass, String) {
    let class = if e.is_timeout() {
        FailureClass::timeout
    } else if e.is_connect() {
        FailureClass::connect
    } else {
        FailureClass::other
    };
    // reqwest's message names the URL (never headers or body): shown with its password and
    // query values masked, since a collector's token may sit there (`?api_key=…`).
    let url = e.url().map(|u| crate::config::redact_url(u.as_str()));
    let e = e.without_url();
    let mut msg = e.to_string();
    if let Some(u) = url {
        msg.push_str(&format!(" (url {u})"));
    }
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    // The two ways a scheme that does not match the port reads, in the words of rustls and
    // hyper, which do not say what is wrong.
    if msg.contains("InvalidContentType") {
        msg.push_str(
            " (the endpoint answered without TLS: should the sink's url start with http://?)",
        );
    } else if msg.contains("invalid HTTP version") {
        msg.push_str(" (the endpoint did not answer in HTTP: if it expects TLS, the sink's url should start with https://)");
    }
    (class, msg)
}

/// What a 3xx reply means for the operator: the sink's URL is out of date.
fn redirect_message(status: u16, location: Option<&str>) -> String {
    format!(
        "HTTP {status} redirect to {}: llmlogd does not follow redirects; set the sink's url to the final address",
        location.unwrap_or("(no Location header)")
    )
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

#[cfg(test)]
mod tests {
    //! The worker's decisions, driven directly: requests are started for real (towards a
    //! closed port) but their replies are injected with `complete`, at injected instants.

    use super::*;
    use crate::config::{Config, Overrides};
    use crate::event::{EventKind, NewEvent};
    use std::sync::atomic::Ordering;

    /// A scheme that does not match the port gets a hint, not only rustls's "received corrupt
    /// message of type InvalidContentType" or hyper's "invalid HTTP version parsed".
    #[tokio::test]
    async fn a_scheme_that_does_not_match_the_port_says_so() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        // A plain HTTP server, and one that answers like a TLS server (a handshake alert).
        let serve = |answer: &'static [u8]| async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut c, _)) = l.accept().await {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf).await;
                    let _ = c.write_all(answer).await;
                }
            });
            addr
        };
        let plain = serve(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        let tls = serve(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]).await;
        let send = |url: String| async move {
            let e = reqwest::Client::new()
                .post(url)
                .body("[]")
                .send()
                .await
                .expect_err("refused");
            transport_error(e).1
        };
        let msg = send(format!("https://{plain}/in")).await;
        assert!(
            msg.contains("should the sink's url start with http://?"),
            "{msg}"
        );
        let msg = send(format!("http://{tls}/in")).await;
        assert!(msg.contains("should start with https://"), "{msg}");
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        for u in [
            "http://127.0.0.1:9000/in",
            "http://127.8.9.1/in",
            "http://localhost:9000",
            "https://LOCALHOST./x",
            "http://collector.localhost/in",
            "http://[::1]:9000/in",
            "http://[::ffff:127.0.0.1]/in",
        ] {
            assert!(is_loopback(u), "{u}");
        }
        for u in [
            "https://api.promptlayer.com",
            "http://10.0.0.1/in",
            "http://[2001:db8::1]/in",
            "http://localhost.example.com/in",
            "not a url",
        ] {
            assert!(!is_loopback(u), "{u}");
        }
    }

    struct Rig {
        w: Worker,
        t: Instant,
        _dir: tempfile::TempDir,
    }

    fn rig(extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[sinks.s]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/ingest\"\n\
             retry_initial = \"100ms\"\nretry_max = \"1s\"\n{extra}"
        );
        let ov = Overrides {
            data_dir: Some(dir.path().join("data")),
            http_listen: Some(String::new()),
            unix_socket: Some(String::new()),
        };
        let cfg = Config::parse(&toml, &ov).expect("test config");
        let queue = Queue::open(&cfg.queue).unwrap();
        let id = queue.sink_id("s").unwrap();
        let w = Worker::new(
            Arc::new(cfg.sinks[0].clone()),
            id,
            queue,
            Arc::new(Metrics::new()),
            Arc::new(StatusBoard::default()),
        )
        .unwrap();
        Rig {
            w,
            t: Instant::now(),
            _dir: dir,
        }
    }

    impl Rig {
        /// Instant `ms` milliseconds into the test.
        fn at(&self, ms: u64) -> Instant {
            self.t + Duration::from_millis(ms)
        }

        /// Puts events `seqs` in the window (payload `{"i":seq}` padded to `len` bytes).
        fn add(&mut self, seqs: std::ops::Range<u64>, len: usize) {
            for seq in seqs {
                let mut p = format!("{{\"i\":{seq},\"pad\":\"");
                while p.len() + 2 < len {
                    p.push('x');
                }
                p.push_str("\"}");
                let ev = StoredEvent {
                    seq,
                    id: uuid::Uuid::now_v7(),
                    kind: EventKind::Native,
                    received_ms: now_ms(),
                    routes: vec![self.w.id],
                    creds: Default::default(),
                    payload: bytes::Bytes::from(p),
                };
                self.w.window_bytes += ev.payload.len();
                self.w.window.insert(seq, Slot::new(ev, self.t));
            }
        }

        /// Dispatches at `ms`; returns the requests it started (their events) and its wake.
        fn dispatch(&mut self, ms: u64) -> (Vec<Vec<u64>>, Option<Instant>) {
            let wake = self.w.dispatch(self.at(ms));
            let mut sent: Vec<Vec<u64>> =
                std::mem::take(&mut self.w.flights).into_values().collect();
            sent.sort();
            // The real requests would fail against the closed port; replies are injected.
            self.w.requests.abort_all();
            (sent, wake)
        }

        fn reply(&mut self, seqs: &[u64], status: u16, ms: u64) {
            self.reply_gen(seqs, status, ms, self.w.generation);
        }

        fn reply_retry_after(&mut self, seqs: &[u64], status: u16, after: Duration, ms: u64) {
            let done = Done {
                seqs: seqs.to_vec(),
                elapsed: Duration::ZERO,
                generation: self.w.generation,
                app_key: false,
                sent: self.w.sends,
                result: Ok(Reply {
                    status,
                    retry_after: Some(after),
                    location: None,
                    body: Vec::new(),
                }),
            };
            self.w.complete(done, self.at(ms));
        }

        /// A second worker for the same sink and store, as a restart would start.
        fn restarted(&self, cfg: SinkConfig) -> Worker {
            Worker::new(
                Arc::new(cfg),
                self.w.id,
                self.w.queue.clone(),
                Arc::new(Metrics::new()),
                Arc::new(StatusBoard::default()),
            )
            .unwrap()
        }

        fn reply_gen(&mut self, seqs: &[u64], status: u16, ms: u64, generation: u64) {
            let done = Done {
                seqs: seqs.to_vec(),
                elapsed: Duration::ZERO,
                generation,
                app_key: false,
                sent: self.w.sends,
                result: Ok(Reply {
                    status,
                    retry_after: None,
                    location: None,
                    body: Vec::new(),
                }),
            };
            self.w.complete(done, self.at(ms));
        }
    }

    /// What the worker logs, as the daemon would print it (no colours).
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        /// Collects this thread's log lines until the guard drops.
        fn capture(&self) -> tracing::subscriber::DefaultGuard {
            let logs = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || logs.clone())
                .finish();
            tracing::subscriber::set_default(subscriber)
        }

        fn lines(&self, containing: &str) -> Vec<String> {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .filter(|l| l.contains(containing))
                .map(str::to_string)
                .collect()
        }
    }

    /// While the store is unavailable (a full disk), every pass of the loop fails to persist
    /// the cursor: one line, then one per period saying how many were held back, and one
    /// when it works again.
    #[tokio::test]
    async fn a_cursor_that_cannot_be_persisted_is_logged_once_per_period_with_a_count() {
        let mut r = rig("");
        let logs = Logs::default();
        let _guard = logs.capture();
        let failing = "could not persist the cursor";
        // No period ends within the test unless it says so, however slow the machine.
        let pin = |w: &Worker| w.cursor_log.last_ms.store(u64::MAX, Ordering::Relaxed);
        r.w.queue.take_store_for_test();
        for pos in 1..=5 {
            r.w.read_pos = pos;
            r.w.advance_cursor();
            pin(&r.w);
        }
        assert_eq!(r.w.persisted_cursor, 0);
        let lines = logs.lines(failing);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("skipped=0"), "{lines:#?}");
        // The next period: one line, with the count of those held back.
        r.w.cursor_log.last_ms.store(1, Ordering::Relaxed);
        r.w.read_pos = 6;
        r.w.advance_cursor();
        pin(&r.w);
        let lines = logs.lines(failing);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[1].contains("skipped=4"), "{lines:#?}");
        for pos in 7..=8 {
            r.w.read_pos = pos;
            r.w.advance_cursor();
        }
        assert_eq!(logs.lines(failing).len(), 2);
        r.w.queue.reopen_store_for_test();
        // The store was opened again: the worker first reads its progress back from it.
        r.w.advance_cursor();
        assert_eq!((r.w.read_pos, r.w.persisted_cursor), (0, 0));
        r.w.read_pos = 9;
        r.w.advance_cursor();
        assert_eq!(r.w.persisted_cursor, 9);
        let again = logs.lines("the cursor is persisted again");
        assert_eq!(again.len(), 1, "{again:#?}");
        assert!(again[0].contains("skipped=2"), "{again:#?}");
        r.w.read_pos = 10;
        r.w.advance_cursor();
        assert_eq!(logs.lines("the cursor is persisted again").len(), 1);
    }

    #[tokio::test]
    async fn a_probe_in_flight_never_makes_the_loop_spin() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2");
        r.add(0..4, 20);
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent, vec![vec![0], vec![1]]);
        r.reply(&[0], 503, 10);
        r.reply(&[1], 503, 10);
        assert!(r.w.circuit.is_some(), "two events failed twice in a row");
        let (sent, wake) = r.dispatch(20);
        assert!(sent.is_empty(), "no probe before the interval: {sent:?}");
        assert!(wake.is_some_and(|w| w > r.at(20)));
        let (sent, _) = r.dispatch(5_000);
        assert_eq!(sent.len(), 1, "one probe");
        // The probe hangs (a blackholed endpoint) long past the next probe time: the worker
        // waits for its reply instead of waking at a time already past.
        for ms in [6_000, 60_000] {
            let (sent, wake) = r.dispatch(ms);
            assert!(sent.is_empty());
            assert!(
                wake.is_none_or(|w| w > r.at(ms)),
                "wake {:?} before now",
                r.at(ms) - wake.unwrap()
            );
        }
        // A reload (the url fixed, say) probes at once, without waiting for the probe that
        // hangs (on the old url); then waits for its own.
        let cfg = r.w.cfg.clone();
        r.w.reconfigure_at(cfg, r.at(61_000));
        let (sent, _) = r.dispatch(61_000);
        assert_eq!(sent.len(), 1, "a probe at once after the reload");
        let (sent, wake) = r.dispatch(61_001);
        assert!(sent.is_empty() && wake.is_none(), "{sent:?} {wake:?}");
    }

    /// The url fixed by a reload while the requests to the old one hang: the new url gets its
    /// `concurrency` at once, instead of waiting for those to time out.
    #[tokio::test]
    async fn requests_hanging_on_the_url_before_a_reload_leave_the_new_one_its_concurrency() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2");
        r.add(0..6, 20);
        assert_eq!(r.dispatch(0).0, vec![vec![0], vec![1]]);
        assert!(r.dispatch(10).0.is_empty(), "two in flight");
        // A reload that changes nothing else still waits for them (same endpoint).
        let same = r.w.cfg.clone();
        r.w.reconfigure_at(same, r.at(15));
        assert!(r.dispatch(15).0.is_empty(), "same url: still two in flight");
        let mut cfg = (*r.w.cfg).clone();
        if let SinkKind::Http { url, .. } = &mut cfg.kind {
            *url = "http://127.0.0.1:10/fixed".into();
        }
        r.w.reconfigure_at(Arc::new(cfg), r.at(20));
        assert_eq!(
            r.dispatch(20).0,
            vec![vec![2], vec![3]],
            "the new url's two"
        );
        assert!(r.dispatch(30).0.is_empty(), "and no more");
        // The old url's answers come back later: the new url's count stays.
        r.reply_gen(&[0], 503, 40, 0);
        assert!(
            r.dispatch(40).0.is_empty(),
            "still the new url's two in flight"
        );
        r.reply(&[2], 200, 50);
        assert_eq!(r.dispatch(50).0.len(), 1);
    }

    /// Answers from the url a reload replaced (the wrong one: 404; a timeout) neither
    /// dead-letter their events nor count as attempts: they are sent to the new url at once.
    #[tokio::test]
    async fn answers_from_the_url_before_a_reload_do_not_count_for_the_new_one() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 4\ncircuit_after = 2");
        r.add(0..3, 20);
        assert_eq!(r.dispatch(0).0, vec![vec![0], vec![1], vec![2]]);
        let old = r.w.generation;
        let mut cfg = (*r.w.cfg).clone();
        if let SinkKind::Http { url, .. } = &mut cfg.kind {
            *url = "http://127.0.0.1:10/fixed".into();
        }
        r.w.reconfigure_at(Arc::new(cfg), r.at(10));
        r.reply_gen(&[0], 404, 20, old);
        r.reply_gen(&[1], 503, 20, old);
        r.reply_gen(&[2], 504, 20, old);
        assert_eq!(
            r.w.dead_lettered, 0,
            "the old url's 404 dead-lettered an event"
        );
        assert!(
            r.w.circuit.is_none(),
            "the old url's failures opened the circuit"
        );
        assert!(r.w.window.values().all(|s| s.attempts == 0), "not attempts");
        assert_eq!(
            r.dispatch(20).0,
            vec![vec![0], vec![1], vec![2]],
            "sent again at once"
        );
    }

    #[tokio::test]
    async fn an_open_circuit_summarises_the_outage_every_five_minutes() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2");
        r.add(0..2, 20);
        let (sent, _) = r.dispatch(0);
        r.reply(&sent[0], 503, 10);
        r.reply(&sent[1], 503, 10);
        let since = r.w.circuit.as_ref().unwrap().last_summary;
        let (sent, _) = r.dispatch(200_000);
        r.reply(&sent[0], 503, 200_001);
        assert_eq!(r.w.circuit.as_ref().unwrap().last_summary, since);
        r.dispatch(300_010);
        assert_eq!(
            r.w.circuit.as_ref().unwrap().last_summary,
            r.at(300_010),
            "a summary line after five minutes"
        );
    }

    /// When the probe gets through, the events held behind the circuit go at once, not each
    /// after what is left of its own backoff (up to `retry_max`).
    #[tokio::test]
    async fn a_closing_circuit_sends_the_held_events_at_once() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 4\ncircuit_after = 2");
        r.add(0..3, 20);
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent.len(), 3);
        for s in &sent {
            r.reply(s, 503, 10);
        }
        let probe_at = r.w.circuit.as_ref().expect("open").next_probe;
        let ms = probe_at.duration_since(r.t).as_millis() as u64 + 1;
        let (probe, _) = r.dispatch(ms);
        assert_eq!(probe.len(), 1, "one probe");
        // The others' backoffs have grown long (as after a long outage).
        for s in r.w.window.values_mut().filter(|s| !s.in_flight) {
            s.next_try = probe_at + Duration::from_secs(3_000);
        }
        r.reply(&probe[0], 200, ms + 1);
        assert!(r.w.circuit.is_none(), "closed");
        let (sent, _) = r.dispatch(ms + 1);
        assert_eq!(sent.len(), 2, "the held events at once: {sent:?}");
    }

    /// An endpoint that keeps failing and coming back logs its first outage as before, then
    /// one flapping line per five minutes instead of a pair of lines per outage.
    #[tokio::test]
    async fn a_flapping_endpoint_logs_its_outages_once_per_five_minutes() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2");
        let mut t = 0;
        let mut quiet = Vec::new();
        for round in 0..4u64 {
            r.add(round * 2..round * 2 + 2, 20);
            let (sent, _) = r.dispatch(t);
            r.reply(&sent[0], 503, t + 1);
            r.reply(&sent[1], 503, t + 1);
            quiet.push(r.w.circuit.as_ref().expect("open").quiet);
            // The probe succeeds: the outage ends; the other event follows.
            t += 2_000;
            let (sent, _) = r.dispatch(t);
            r.reply(&sent[0], 200, t + 1);
            assert!(r.w.circuit.is_none(), "round {round}: closed");
            let (sent, _) = r.dispatch(t + 2);
            for s in &sent {
                r.reply(s, 200, t + 3);
            }
            t += 10_000;
        }
        assert_eq!(quiet, [false, true, true, true]);
        // The second outage wrote the flapping line; the next two wait for the next one.
        assert_eq!(r.w.flapping.unlogged, 2);
        assert_eq!(r.w.flapping.logged_at, Some(r.at(12_001)));
        // Five minutes after the last one ended, an outage is loud again.
        t += 300_000;
        r.add(100..102, 20);
        let (sent, _) = r.dispatch(t);
        r.reply(&sent[0], 503, t + 1);
        r.reply(&sent[1], 503, t + 1);
        assert!(!r.w.circuit.as_ref().expect("open").quiet);
    }

    #[tokio::test]
    async fn probe_intervals_never_exceed_retry_max() {
        // retry_initial = 100ms, retry_max = 1s: the interval reaches the cap in a few probes.
        let mut r = rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2");
        r.add(0..2, 20);
        let (sent, _) = r.dispatch(0);
        r.reply(&sent[0], 503, 10);
        r.reply(&sent[1], 503, 10);
        let c = r.w.circuit.as_ref().expect("open");
        assert!(c.next_probe <= r.at(10) + Duration::from_secs(1));
        let mut intervals = Vec::new();
        for k in 1..=40u64 {
            let ms = k * 10_000;
            let (sent, _) = r.dispatch(ms);
            assert_eq!(sent.len(), 1, "one probe");
            intervals.push(r.w.circuit.as_ref().unwrap().next_probe - r.at(ms));
            r.reply(&sent[0], 503, ms + 1);
        }
        assert!(
            intervals.iter().all(|d| *d <= Duration::from_secs(1)),
            "{intervals:?}"
        );
    }

    #[tokio::test]
    async fn probes_rotate_through_the_waiting_events() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2");
        r.add(0..3, 20);
        let (sent, _) = r.dispatch(0);
        r.reply(&sent[0], 500, 10);
        r.reply(&sent[1], 500, 10);
        assert!(r.w.circuit.is_some());
        let mut probed = Vec::new();
        for k in 1..=6 {
            let (sent, _) = r.dispatch(k * 10_000);
            assert_eq!(sent.len(), 1);
            probed.push(sent[0][0]);
            r.reply(&sent[0], 500, k * 10_000 + 5);
        }
        // Never-sent 2 first, then the least recently sent.
        assert_eq!(probed, vec![2, 0, 1, 2, 0, 1]);
        // A reload (a fixed URL, say) probes at once instead of after the interval.
        let (sent, wake) = r.dispatch(60_010);
        assert!(sent.is_empty() && wake.is_some_and(|w| w > r.at(60_010)));
        let cfg = r.w.cfg.clone();
        r.w.reconfigure_at(cfg, r.at(60_020));
        let (sent, _) = r.dispatch(60_020);
        assert_eq!(sent.len(), 1, "probe right after the reload");
        r.reply(&sent[0], 500, 60_030);
        // A probe that is answered at all closes the circuit, even with a refusal.
        let (sent, _) = r.dispatch(100_000);
        r.reply(&sent[0], 400, 100_005);
        assert!(r.w.circuit.is_none());
        assert_eq!(r.w.dead_lettered, 1);
        let (sent, _) = r.dispatch(100_010);
        assert_eq!(sent.len(), 2, "the circuit closed: both others go at once");
    }

    #[tokio::test]
    async fn one_event_failing_alone_does_not_open_the_circuit() {
        let mut r = rig("batch_max_events = 1\ncircuit_after = 2");
        r.add(0..1, 20);
        let mut ms = 0;
        for _ in 0..6 {
            ms += 10_000;
            let (sent, _) = r.dispatch(ms);
            assert_eq!(sent, vec![vec![0]]);
            r.reply(&[0], 500, ms + 1);
        }
        assert!(r.w.circuit.is_none(), "its own backoff paces it already");
        assert_eq!(
            r.w.window[&0].strikes, 0,
            "nothing else succeeded: no strike"
        );
        // A second event failing too looks like an outage.
        r.add(1..2, 20);
        let (sent, _) = r.dispatch(ms + 10_000);
        assert_eq!(sent, vec![vec![0], vec![1]]);
        r.reply(&[1], 500, ms + 10_001);
        assert!(r.w.circuit.is_some());
    }

    #[tokio::test]
    async fn a_batch_failing_while_others_succeed_is_bisected_and_only_the_culprit_struck() {
        let mut r = rig("batch_max_events = 4\nconcurrency = 2\npoison_after = 2");
        r.add(0..8, 20);
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        r.reply(&[4, 5, 6, 7], 200, 1_001);
        r.reply(&[0, 1, 2, 3], 500, 1_002);
        assert!(r.w.window.values().all(|s| s.strikes == 0));
        let (sent, _) = r.dispatch(10_000);
        assert_eq!(sent, vec![vec![0, 1], vec![2, 3]], "halves");
        r.reply(&[0, 1], 200, 10_001);
        r.reply(&[2, 3], 500, 10_002);
        let (sent, _) = r.dispatch(20_000);
        assert_eq!(sent, vec![vec![2], vec![3]], "quarters");
        r.reply(&[2], 200, 20_001);
        r.reply(&[3], 500, 20_002);
        assert_eq!(r.w.window[&3].strikes, 1);
        // Failing again with nothing delivered in between: not evidence, no strike.
        let (sent, _) = r.dispatch(30_000);
        r.reply(&sent[0], 500, 30_001);
        assert_eq!(r.w.window[&3].strikes, 1);
        // Another event delivered, then 3 fails again: second strike, dead letter.
        r.add(8..9, 20);
        let (sent, _) = r.dispatch(40_000);
        assert_eq!(sent, vec![vec![3], vec![8]]);
        r.reply(&[8], 200, 40_001);
        r.reply(&[3], 500, 40_002);
        assert!(r.w.window.is_empty());
        assert_eq!(r.w.dead_lettered, 1);
        assert_eq!(r.w.delivered, 8);
    }

    /// A 404 about one event (the service knows the URL: other events are delivered) still
    /// ends in the dead letters, found by bisection and the poison rule.
    #[tokio::test]
    async fn a_404_for_one_event_while_others_are_delivered_dead_letters_it() {
        let mut r = rig("batch_max_events = 2\nconcurrency = 2\npoison_after = 1");
        r.add(0..4, 20);
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent, vec![vec![0, 1], vec![2, 3]]);
        r.reply(&[2, 3], 200, 1_001);
        r.reply(&[0, 1], 404, 1_002);
        let (sent, _) = r.dispatch(10_000);
        assert_eq!(sent, vec![vec![0], vec![1]], "halves");
        r.reply(&[0], 200, 10_001);
        r.reply(&[1], 404, 10_002);
        assert!(r.w.window.is_empty());
        assert_eq!((r.w.delivered, r.w.dead_lettered), (3, 1));
    }

    /// Events delivered above one still waiting are persisted as done runs beside the cursor,
    /// merged across seqs routed elsewhere; the runs go once the cursor passes them.
    #[tokio::test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one range, not a range's values
    async fn done_runs_above_a_waiting_event_are_persisted_with_the_cursor() {
        let mut r = rig("");
        // Seqs 1, 3, 5, 7-9 went to other sinks.
        for seq in [0, 2, 4, 6, 10] {
            r.add(seq..seq + 1, 20);
        }
        r.w.read_pos = 11;
        for (i, seq) in [4, 2, 6].into_iter().enumerate() {
            r.reply(&[seq], 200, 1_000 + i as u64);
        }
        r.w.advance_cursor();
        assert_eq!(r.w.queue.progress(r.w.id).unwrap(), (0, vec![2..7]));
        r.reply(&[10], 422, 2_000);
        r.w.advance_cursor();
        // Dead-lettered is done too; 7-9 are not the sink's, so the runs join.
        assert_eq!(r.w.queue.progress(r.w.id).unwrap(), (0, vec![2..11]));
        assert_eq!(r.w.dead_lettered, 1);
        r.reply(&[0], 200, 3_000);
        r.w.advance_cursor();
        assert_eq!(r.w.queue.progress(r.w.id).unwrap(), (11, vec![]));
        assert!(r.w.done.is_empty());
    }

    /// After a storage error the store is opened again and holds only what was synced: here
    /// a dead letter and the progress written after the last sync are gone. The worker, which
    /// counted the event done, must not write its cursor past it into the new store (the
    /// event would be neither delivered nor a dead letter); it reads its progress back and
    /// the event again. Before, the cursor went to 3 and event 1 was lost.
    #[tokio::test]
    async fn after_the_store_reopens_the_worker_reads_its_progress_back_and_loses_nothing() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 3");
        let q = r.w.queue.clone();
        let records = (0..3)
            .map(|i| {
                let ev = NewEvent {
                    kind: EventKind::Native,
                    payload: bytes::Bytes::from(format!("{{\"i\":{i}}}")),
                    attrs: Default::default(),
                    creds: Default::default(),
                };
                q.prepare(&ev, &[r.w.id])
            })
            .collect();
        q.append(records).await.unwrap();
        r.w.refill().unwrap();
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent, vec![vec![0], vec![1], vec![2]]);
        r.reply(&[0], 200, 1_001);
        r.reply(&[1], 422, 1_002);
        assert_eq!(q.dead_letter_count(), 1);
        // The storage error: the store is opened again, without what was not synced.
        q.reopen_store_for_test();
        assert!(q.dead_letter_remove(r.w.id, 1).unwrap());
        q.set_progress(r.w.id, 0, &[]).unwrap();
        // Event 2 is still in flight; events 0 and 1 count as done in memory.
        r.w.advance_cursor();
        assert_eq!(
            q.progress(r.w.id).unwrap(),
            (0, vec![]),
            "nothing written past event 1"
        );
        r.w.refill().unwrap();
        assert_eq!(
            r.w.window.keys().copied().collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(
            r.w.window[&2].in_flight,
            "the request in flight still counts"
        );
        r.reply(&[2], 200, 1_003);
        let (sent, _) = r.dispatch(2_000);
        assert_eq!(sent, vec![vec![0], vec![1]], "sent again: at-least-once");
        r.reply(&[0], 200, 2_001);
        r.reply(&[1], 422, 2_002);
        r.w.advance_cursor();
        assert_eq!(q.progress(r.w.id).unwrap(), (3, vec![]));
        assert!(q.dead_letter_get(r.w.id, 1).unwrap().is_some());
    }

    /// The 429s of requests in flight together lower the limits once; a 429 to a request sent
    /// after that lowers them again.
    #[tokio::test]
    async fn concurrent_429s_halve_once_per_round() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 8");
        r.add(0..4, 20);
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent.len(), 4);
        for (i, req) in sent.iter().enumerate() {
            r.reply(req, 429, 1_001 + i as u64);
        }
        assert_eq!(r.w.flow.concurrency(), 4, "one halving for the round");
        let (sent, _) = r.dispatch(60_000);
        assert_eq!(sent.len(), 4);
        r.reply(&sent[0], 429, 60_001);
        assert_eq!(r.w.flow.concurrency(), 2, "sent after the first halving");
    }

    /// A 413 halves the refused batch and teaches the sink a ceiling: later batches, of
    /// events never refused, are formed under it instead of being refused again each time.
    #[tokio::test]
    async fn a_413_halves_the_batch_and_later_batches_stay_under_what_was_accepted() {
        let mut r = rig("batch_max_events = 8\nconcurrency = 1\nbatch_max_wait = \"1ms\"");
        // 20-byte events: 21 bytes each in a JSON array, plus 1 for the batch.
        r.add(0..24, 20);
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent, vec![(0..8).collect::<Vec<_>>()]);
        r.reply(&sent[0], 413, 1_001);
        assert_eq!((r.w.ceiling.events(), r.w.ceiling.bytes()), (8, 84));
        // Halved, and within 84 bytes: three events.
        let (sent, _) = r.dispatch(1_002);
        assert_eq!(sent, vec![vec![0, 1, 2]]);
        r.reply(&sent[0], 413, 1_003);
        assert_eq!(r.w.ceiling.bytes(), 32);
        let mut ms = 1_004;
        let mut batches = Vec::new();
        while !r.w.window.is_empty() {
            let (sent, _) = r.dispatch(ms);
            assert_eq!(sent.len(), 1, "at {ms}");
            r.reply(&sent[0], 200, ms + 1);
            batches.push(sent[0].clone());
            ms += 10;
        }
        assert!(
            batches.iter().all(|b| b.len() == 1),
            "every later batch under the 32 bytes learned: {batches:?}"
        );
        assert_eq!(r.w.delivered, 24);
        // An event too large on its own still goes to the dead letters, and teaches nothing.
        r.add(24..25, 500);
        let (sent, _) = r.dispatch(ms);
        assert_eq!(sent, vec![vec![24]]);
        r.reply(&sent[0], 413, ms + 1);
        assert_eq!(r.w.dead_lettered, 1);
        assert_eq!((r.w.ceiling.events(), r.w.ceiling.bytes()), (8, 32));
        r.w.publish();
        let st = r.w.board.get("s").unwrap();
        assert_eq!((st.batch_ceiling_events, st.batch_ceiling_bytes), (8, 32));
        // A reload that changes nothing of the batch keeps it; new maxima reset it.
        let mut cfg = (*r.w.cfg).clone();
        cfg.timeout = Duration::from_secs(3);
        r.w.reconfigure(Arc::new(cfg.clone()));
        assert_eq!(r.w.ceiling.bytes(), 32);
        cfg.batch.max_bytes = 4096;
        r.w.reconfigure(Arc::new(cfg));
        assert_eq!((r.w.ceiling.events(), r.w.ceiling.bytes()), (8, 4096));
    }

    /// A 431 (headers too large: the event ids header grows with the batch) lowers the
    /// events per request, never below one.
    #[tokio::test]
    async fn a_431_lowers_the_events_per_request() {
        let mut r = rig("batch_max_events = 8\nconcurrency = 1\nbatch_max_wait = \"1ms\"");
        r.add(0..8, 20);
        let (sent, _) = r.dispatch(1_000);
        r.reply(&sent[0], 431, 1_001);
        let (sent, _) = r.dispatch(1_002);
        assert_eq!(sent, vec![vec![0, 1, 2, 3]]);
        r.reply(&sent[0], 431, 1_003);
        let (sent, _) = r.dispatch(1_004);
        assert_eq!(sent, vec![vec![0, 1]]);
        r.reply(&sent[0], 431, 1_005);
        assert_eq!(r.w.ceiling.events(), 1);
        let (sent, _) = r.dispatch(1_006);
        assert_eq!(sent, vec![vec![0]]);
        r.reply(&sent[0], 200, 1_007);
        let (sent, _) = r.dispatch(1_008);
        assert_eq!(sent, vec![vec![1]], "one event per request from now on");
    }

    /// A Retry-After pause is persisted and a restarted worker honours it (capped by
    /// `max_retry_after`), unless the sink now points elsewhere; a reload to another endpoint
    /// forgets it.
    #[tokio::test]
    async fn a_retry_after_pause_survives_a_restart_of_the_worker() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 1");
        r.add(0..1, 20);
        // A short pause is not persisted.
        let (sent, _) = r.dispatch(0);
        r.reply_retry_after(&sent[0], 503, Duration::from_millis(500), 1);
        assert_eq!(r.w.queue.not_before(r.w.id).unwrap(), None);
        let (sent, _) = r.dispatch(600);
        let before = now_ms();
        r.reply_retry_after(&sent[0], 503, Duration::from_secs(30), 601);
        let (until, _) = r.w.queue.not_before(r.w.id).unwrap().expect("persisted");
        assert!(
            until >= before + 30_000 && until <= now_ms() + 30_000,
            "{until}"
        );

        let cfg = (*r.w.cfg).clone();
        let mut w = r.restarted(cfg.clone());
        let now = Instant::now();
        match &w.pause {
            Some(Pause::Until(t, _)) => {
                let left = t.saturating_duration_since(now);
                assert!(
                    left > Duration::from_secs(25) && left <= Duration::from_secs(30),
                    "{left:?}"
                );
            }
            _ => panic!("not paused after the restart"),
        }
        assert_eq!(
            w.dispatch(now),
            w.pause.as_ref().map(|p| match p {
                Pause::Until(t, _) => *t,
                Pause::UntilReload(_) => unreachable!(),
            })
        );
        w.publish();
        assert!(w.board.get("s").unwrap().paused_until_ms.is_some());

        // Capped like a live Retry-After.
        let mut capped = cfg.clone();
        capped.retry.max_retry_after = Duration::from_secs(2);
        match &r.restarted(capped).pause {
            Some(Pause::Until(t, _)) => assert!(*t <= Instant::now() + Duration::from_secs(2)),
            _ => panic!("not paused"),
        }
        // Another url: not its pause.
        let mut moved = cfg.clone();
        if let SinkKind::Http { url, .. } = &mut moved.kind {
            *url = "http://127.0.0.1:9/other".into();
        }
        assert!(r.restarted(moved.clone()).pause.is_none());
        // A reload to another endpoint drops the pause and forgets it.
        r.w.reconfigure(Arc::new(moved));
        assert!(r.w.pause.is_none());
        assert_eq!(r.w.queue.not_before(r.w.id).unwrap(), None);
        assert!(r.restarted(cfg).pause.is_none());
    }

    #[tokio::test]
    async fn batch_bytes_count_the_framing_and_a_batch_cut_by_bytes_goes_at_once() {
        let mut r = rig(
            "batch_max_events = 100\nbatch_max_bytes = 1024\nbatch_max_wait = \"1h\"\nconcurrency = 2",
        );
        // Six payloads of 170 bytes are 1020 bytes, but 1027 as a JSON array.
        r.add(0..12, 170);
        let (sent, wake) = r.dispatch(0);
        assert_eq!(sent, vec![(0..5).collect::<Vec<_>>(), (5..10).collect()]);
        assert!(wake.is_none(), "waits for a reply (concurrency 2)");
        let events: Vec<&StoredEvent> = (0..5).map(|k| &r.w.window[&k].ev).collect();
        struct NoCtx;
        impl BuildContext for NoCtx {
            fn remote_id(&self, _: u64) -> RemoteId {
                RemoteId::Unknown
            }
        }
        let body = r.w.sink.build(&events, &NoCtx).unwrap().body;
        assert!(body.len() <= 1024, "{}", body.len());
        r.reply(&sent[0], 200, 1);
        r.reply(&sent[1], 200, 1);
        // The rest could still grow: it waits for max_wait.
        let (sent, wake) = r.dispatch(2);
        assert!(sent.is_empty());
        assert_eq!(wake, Some(r.at(0) + Duration::from_secs(3600)));
    }

    #[tokio::test]
    async fn a_refused_key_from_before_a_reload_does_not_pause_the_sink_again() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2");
        r.add(0..2, 20);
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent.len(), 2);
        let old = r.w.generation;
        let mut cfg = (*r.w.cfg).clone();
        cfg.timeout = Duration::from_secs(3);
        r.w.reconfigure(Arc::new(cfg));
        r.reply_gen(&[0], 401, 10, old);
        assert!(r.w.pause.is_none(), "an old key's refusal");
        assert_eq!(r.w.window[&0].attempts, 0, "not an attempt");
        let (sent, _) = r.dispatch(20);
        assert_eq!(sent, vec![vec![0]], "sent again with the new key");
        r.reply(&[0], 401, 30);
        assert!(matches!(r.w.pause, Some(Pause::UntilReload(_))));
        // Paused for the key: nothing is sent, and nothing expires.
        let (sent, wake) = r.dispatch(10_000);
        assert!(sent.is_empty() && wake.is_none());
    }

    #[tokio::test]
    async fn a_reload_with_an_unchanged_config_resumes_an_auth_pause_and_keeps_backoffs() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 2");
        r.add(0..2, 20);
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent, vec![vec![0], vec![1]]);
        r.reply(&[0], 500, 10);
        r.reply(&[1], 401, 10);
        assert!(matches!(r.w.pause, Some(Pause::UntilReload(_))));
        let backoff = r.w.window[&0].next_try;
        assert!(backoff > r.at(10));
        let cfg = r.w.cfg.clone();
        r.w.reconfigure_at(cfg, r.at(20));
        assert!(r.w.pause.is_none(), "resumed");
        assert_eq!(r.w.window[&0].next_try, backoff, "its backoff kept");
        let (sent, _) = r.dispatch(20);
        assert_eq!(sent, vec![vec![1]], "the refused event goes again at once");
    }

    #[tokio::test]
    async fn old_events_expire_behind_an_open_circuit_but_not_while_waiting_for_a_key() {
        let mut r =
            rig("batch_max_events = 1\nconcurrency = 2\ncircuit_after = 2\nmax_age = \"1s\"");
        r.add(0..6, 20);
        for s in r.w.window.values_mut() {
            s.ev.received_ms -= 10_000;
        }
        r.w.pause = Some(Pause::UntilReload("test".into()));
        r.w.sweep_expired(r.at(5_000));
        assert_eq!(r.w.window.len(), 6, "a wrong key loses nothing");
        r.w.pause = None;
        let (sent, _) = r.dispatch(6_000);
        assert_eq!(sent, vec![vec![0], vec![1]]);
        r.reply(&sent[0], 503, 6_001);
        r.reply(&sent[1], 503, 6_001);
        // Both tried events were too old to retry; their failures opened the circuit.
        assert_eq!(r.w.window.len(), 4);
        assert!(r.w.circuit.is_some());
        // Never-sent events behind the open circuit expire too; young ones stay.
        r.add(10..12, 20);
        r.w.sweep_expired(r.at(8_000));
        let left: Vec<u64> = r.w.window.keys().copied().collect();
        assert_eq!(left, vec![10, 11], "only the young ones stay");
    }

    /// An event that fails, is retried, and then expires keeps the last reply's status and
    /// body in its dead letter, so `dlq show` says why it never got through.
    #[tokio::test]
    async fn an_event_that_expires_after_failing_keeps_the_last_reply_in_its_dead_letter() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 1\nmax_age = \"1s\"");
        // A stored event (the dead letter keeps its record).
        let ev = NewEvent {
            kind: EventKind::Native,
            payload: bytes::Bytes::from_static(b"{\"i\":0}"),
            attrs: Default::default(),
            creds: Default::default(),
        };
        let record = r.w.queue.prepare(&ev, &[r.w.id]);
        r.w.queue.append(vec![record]).await.unwrap();
        r.w.refill().unwrap();
        let (sent, _) = r.dispatch(1_000);
        assert_eq!(sent, vec![vec![0]]);
        r.reply(&[0], 503, 1_010);
        assert_eq!(r.w.window.len(), 1, "young: kept for a retry");
        r.w.window.get_mut(&0).unwrap().ev.received_ms -= 10_000;
        r.w.sweep_expired(r.at(6_000));
        assert!(r.w.window.is_empty(), "expired");
        let dead =
            r.w.queue
                .dead_letter_get(r.w.id, 0)
                .unwrap()
                .expect("a dead letter");
        assert_eq!(dead.info.status, Some(503), "{:?}", dead.info);
        assert_eq!(dead.info.attempts, 1, "{:?}", dead.info);
    }

    #[tokio::test]
    async fn retry_after_pauses_without_an_attempt_within_floor_and_cap() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 1\nmax_retry_after = \"5s\"");
        r.add(0..1, 20);
        let ra = |w: &mut Worker, secs: u64, ms: u64, t: Instant| {
            let done = Done {
                seqs: vec![0],
                elapsed: Duration::ZERO,
                generation: w.generation,
                app_key: false,
                sent: w.sends,
                // 503: a 429 would also lower the rate (AIMD), which is not under test here.
                result: Ok(Reply {
                    status: 503,
                    retry_after: Some(Duration::from_secs(secs)),
                    location: None,
                    body: Vec::new(),
                }),
            };
            w.complete(done, t + Duration::from_millis(ms));
        };
        let t = r.t;
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent.len(), 1);
        ra(&mut r.w, 2, 10, t);
        assert_eq!(r.w.window[&0].attempts, 0, "a pause is not an attempt");
        let (sent, wake) = r.dispatch(2_009);
        assert!(sent.is_empty(), "nothing before the time");
        assert_eq!(wake, Some(r.at(2_010)));
        let (sent, _) = r.dispatch(2_010);
        assert_eq!(sent.len(), 1);
        // `Retry-After: 0` still waits the first retry delay (100 ms here).
        ra(&mut r.w, 0, 3_000, t);
        assert!(r.dispatch(3_050).0.is_empty());
        assert_eq!(r.dispatch(3_100).0.len(), 1);
        // An hour is capped at max_retry_after.
        ra(&mut r.w, 3600, 4_000, t);
        assert_eq!(r.dispatch(8_999).1, Some(r.at(9_000)));
        assert_eq!(r.dispatch(9_000).0.len(), 1);
        // A sink waiting for a fixed key is not resumed by a Retry-After's end.
        r.w.pause = Some(Pause::UntilReload("key".into()));
        ra(&mut r.w, 1, 9_001, t);
        assert!(matches!(r.w.pause, Some(Pause::UntilReload(_))));
    }

    #[tokio::test]
    async fn a_retry_after_pause_ends_with_a_reload_to_another_url_only() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 1\nmax_retry_after = \"1h\"");
        r.add(0..1, 20);
        let (sent, _) = r.dispatch(0);
        assert_eq!(sent.len(), 1);
        let done = Done {
            seqs: vec![0],
            elapsed: Duration::ZERO,
            generation: r.w.generation,
            app_key: false,
            sent: r.w.sends,
            result: Ok(Reply {
                status: 503,
                retry_after: Some(Duration::from_secs(600)),
                location: None,
                body: Vec::new(),
            }),
        };
        r.w.complete(done, r.at(10));
        assert!(matches!(r.w.pause, Some(Pause::Until(..))));
        // Another timeout: the same endpoint still wants its pause.
        let mut cfg = (*r.w.cfg).clone();
        cfg.timeout = Duration::from_secs(3);
        r.w.reconfigure_at(Arc::new(cfg.clone()), r.at(20));
        assert!(matches!(r.w.pause, Some(Pause::Until(..))), "kept");
        assert!(r.dispatch(30).0.is_empty());
        // Another URL owes the old one's pause nothing.
        if let SinkKind::Http { url, .. } = &mut cfg.kind {
            *url = "http://127.0.0.1:9/elsewhere".into();
        }
        r.w.reconfigure_at(Arc::new(cfg), r.at(40));
        assert!(r.w.pause.is_none(), "dropped");
        assert_eq!(r.dispatch(40).0, vec![vec![0]], "sent at once");
    }

    #[tokio::test]
    async fn a_failed_request_task_does_not_strand_its_events() {
        let mut r = rig("batch_max_events = 1");
        r.add(0..1, 20);
        // A request task that panics instead of returning its reply.
        r.w.window.get_mut(&0).unwrap().in_flight = true;
        r.w.in_flight = 1;
        let h = r.w.requests.spawn(async { panic!("boom") });
        r.w.flights.insert(h.id(), vec![0]);
        let joined = r.w.requests.join_next_with_id().await.unwrap();
        r.w.joined(joined);
        let s = &r.w.window[&0];
        assert!(!s.in_flight && s.attempts == 1, "retried like any failure");
        assert_eq!(r.w.in_flight, 0);
    }

    #[tokio::test]
    async fn a_window_of_failing_events_reads_a_little_further_up_to_the_ceiling() {
        let mut r = rig("batch_max_events = 1\nconcurrency = 4");
        r.add(0..1024, 20);
        assert_eq!(r.w.limits().0, MIN_WINDOW_EVENTS, "never sent: no more");
        for s in r.w.window.values_mut() {
            s.last_sent = 1;
        }
        assert_eq!(
            r.w.limits().0,
            1024 + 4,
            "all sent and failing: a step further"
        );
        r.add(1024..MAX_WINDOW_EVENTS as u64, 20);
        for s in r.w.window.values_mut() {
            s.last_sent = 1;
        }
        assert_eq!(r.w.limits().0, MAX_WINDOW_EVENTS, "never past the ceiling");
    }

    /// A worker reads ahead what its in-flight requests and one more batch can use, between
    /// the floor and the ceiling, in events and in bytes.
    #[test]
    fn the_window_holds_what_the_requests_in_flight_can_use() {
        let caps = |extra: &str| window_caps(&rig(extra).w.cfg);
        // The http sink's defaults: 200 events / 4 MiB per batch, 2 in flight (3 × 200 events
        // is under the floor).
        assert_eq!(caps(""), (MIN_WINDOW_EVENTS, 12 << 20));
        assert_eq!(caps("batch_max_events = 500"), (1500, 12 << 20));
        assert_eq!(
            caps("batch_max_events = 100\nbatch_max_bytes = \"1MiB\"\nconcurrency = 15"),
            (1600, 16 << 20)
        );
        // Single-event requests, one at a time: the floor.
        assert_eq!(
            caps("batch_max_events = 1\nbatch_max_bytes = \"1KiB\"\nconcurrency = 1"),
            (MIN_WINDOW_EVENTS, MIN_WINDOW_BYTES)
        );
        // Large batches, many in flight: the ceiling.
        assert_eq!(
            caps("batch_max_events = 10000\nbatch_max_bytes = \"64MiB\"\nconcurrency = 64"),
            (MAX_WINDOW_EVENTS, MAX_WINDOW_BYTES)
        );
    }
}
