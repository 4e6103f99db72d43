//! Every metric llmlogd exports, defined once (Prometheus text format on `/metrics`).
//!
//! Stages hold an `Arc<Metrics>` and call the typed helpers below; no metric name appears
//! anywhere else. Queue figures are read from the queue at scrape time. Labels never carry
//! API keys or event content: only route names, sink names (from the config), classes.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::queue::Queue;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResult {
    pub route: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkClass {
    pub sink: String,
    pub class: FailureClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkState {
    pub sink: String,
    pub state: &'static str,
}

/// Why a delivery attempt failed, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureClass {
    connect,
    timeout,
    status_5xx,
    status_429,
    status_408,
    /// A 3xx: the sink's URL is out of date (redirects are not followed).
    redirect,
    auth,
    too_large,
    rejected_4xx,
    convert,
    other,
}

impl FailureClass {
    /// Every class (a new variant that is not listed here fails to compile in `listed`).
    pub const ALL: [FailureClass; 11] = [
        FailureClass::connect,
        FailureClass::timeout,
        FailureClass::status_5xx,
        FailureClass::status_429,
        FailureClass::status_408,
        FailureClass::redirect,
        FailureClass::auth,
        FailureClass::too_large,
        FailureClass::rejected_4xx,
        FailureClass::convert,
        FailureClass::other,
    ];

    #[allow(dead_code)]
    fn listed(self) {
        use FailureClass::*;
        match self {
            connect | timeout | status_5xx | status_429 | status_408 | redirect | auth
            | too_large | rejected_4xx | convert | other => {}
        }
    }
}

pub struct Metrics {
    registry: Registry,
    ingest_events: Family<RouteResult, Counter>,
    queue_events: Gauge,
    queue_bytes: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    queue_syncs: Gauge,
    queue_evicted: Gauge,
    queue_lost: Gauge,
    dead_letters: Gauge,
    disk_bytes: Gauge,
    disk_free: Gauge,
    delivered: Family<SinkLabel, Counter>,
    retried: Family<SinkLabel, Counter>,
    failed: Family<SinkClass, Counter>,
    dead_lettered: Family<SinkLabel, Counter>,
    in_flight: Family<SinkLabel, Gauge>,
    state: Family<SinkState, Gauge>,
    rate: Family<SinkLabel, Gauge<f64, AtomicU64>>,
    concurrency: Family<SinkLabel, Gauge>,
    latency: Family<SinkLabel, Histogram>,
    backlog: Family<SinkLabel, Gauge>,
}

/// The sink states shown as `llmlogd_sink_state{state=...}` (one is 1, the others 0).
pub const SINK_STATES: [&str; 4] = ["ok", "backoff", "paused", "open"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmlogd");
        let m = Metrics {
            ingest_events: Family::default(),
            queue_events: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            queue_syncs: Gauge::default(),
            queue_evicted: Gauge::default(),
            queue_lost: Gauge::default(),
            dead_letters: Gauge::default(),
            disk_bytes: Gauge::default(),
            disk_free: Gauge::default(),
            delivered: Family::default(),
            retried: Family::default(),
            failed: Family::default(),
            dead_lettered: Family::default(),
            in_flight: Family::default(),
            state: Family::default(),
            rate: Family::default(),
            concurrency: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
            }),
            backlog: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ingest_events",
            "Events received, by route and result (accepted, invalid, too_large, full, error)",
            m.ingest_events.clone(),
        );
        registry.register(
            "queue_events",
            "Events in the queue",
            m.queue_events.clone(),
        );
        registry.register(
            "queue_bytes",
            "Bytes the queued events occupy (after compression)",
            m.queue_bytes.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued event",
            m.queue_oldest_age.clone(),
        );
        registry.register(
            "queue_syncs",
            "fdatasync calls made by the queue writer since start",
            m.queue_syncs.clone(),
        );
        registry.register(
            "queue_evicted_events",
            "Events dropped because the queue was full (when_full = drop_oldest) since start",
            m.queue_evicted.clone(),
        );
        registry.register(
            "queue_lost_events",
            "Acknowledged events the store opened without (damaged files; sequence numbers between its end and its high-water mark), 0 normally; reported until the next restart",
            m.queue_lost.clone(),
        );
        registry.register(
            "dead_letters",
            "Events held in the dead-letter store",
            m.dead_letters.clone(),
        );
        registry.register(
            "disk_bytes",
            "Bytes the data directory occupies on disk",
            m.disk_bytes.clone(),
        );
        registry.register(
            "disk_free_bytes",
            format!(
                "Bytes free for llmlogd on the data directory's filesystem (ingest refuses events, 507, below {} MiB)",
                Queue::MIN_FREE_BYTES >> 20
            ),
            m.disk_free.clone(),
        );
        registry.register(
            "sink_delivered_events",
            "Events delivered",
            m.delivered.clone(),
        );
        registry.register(
            "sink_retried_events",
            "Event delivery attempts that will be retried",
            m.retried.clone(),
        );
        registry.register(
            "sink_failed_attempts",
            "Failed delivery attempts by class",
            m.failed.clone(),
        );
        registry.register(
            "sink_dead_lettered_events",
            "Events moved to the dead letters",
            m.dead_lettered.clone(),
        );
        registry.register(
            "sink_in_flight_requests",
            "Requests in flight",
            m.in_flight.clone(),
        );
        registry.register(
            "sink_state",
            "Sink state (1 for the current one): ok, backoff, paused, open",
            m.state.clone(),
        );
        registry.register(
            "sink_rate_limit",
            "Current requests/s limit (0 = unlimited)",
            m.rate.clone(),
        );
        registry.register(
            "sink_concurrency",
            "Current concurrency limit",
            m.concurrency.clone(),
        );
        registry.register(
            "sink_delivery_latency_seconds",
            "Time from send to the service's reply, per request",
            m.latency.clone(),
        );
        registry.register(
            "sink_backlog_events",
            "Events routed to the sink not yet done (approximate)",
            m.backlog.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn ingest(&self, route: &'static str, result: &'static str, n: u64) {
        self.ingest_events
            .get_or_create(&RouteResult { route, result })
            .inc_by(n);
    }

    pub fn delivered(&self, sink: &str, n: u64) {
        self.delivered.get_or_create(&label(sink)).inc_by(n);
    }

    pub fn retried(&self, sink: &str, n: u64) {
        self.retried.get_or_create(&label(sink)).inc_by(n);
    }

    pub fn failed(&self, sink: &str, class: FailureClass) {
        self.failed
            .get_or_create(&SinkClass {
                sink: sink.to_string(),
                class,
            })
            .inc();
    }

    pub fn dead_lettered(&self, sink: &str, n: u64) {
        self.dead_lettered.get_or_create(&label(sink)).inc_by(n);
    }

    pub fn in_flight(&self, sink: &str, delta: i64) {
        self.in_flight.get_or_create(&label(sink)).inc_by(delta);
    }

    /// Drops every series of a sink that left the config, so `/metrics` stops reporting it
    /// (a sink added back later starts its series from zero, like a restart would).
    pub fn forget_sink(&self, sink: &str) {
        let l = label(sink);
        self.delivered.remove(&l);
        self.retried.remove(&l);
        self.dead_lettered.remove(&l);
        self.in_flight.remove(&l);
        self.rate.remove(&l);
        self.concurrency.remove(&l);
        self.latency.remove(&l);
        self.backlog.remove(&l);
        for class in FailureClass::ALL {
            self.failed.remove(&SinkClass {
                sink: sink.to_string(),
                class,
            });
        }
        for state in SINK_STATES {
            self.state.remove(&SinkState {
                sink: sink.to_string(),
                state,
            });
        }
    }

    /// A sink's counters exist from its start, at 0 (Prometheus' `rate()` and alerts on
    /// `increase()` need the series before the first event).
    pub fn register_sink(&self, sink: &str) {
        let l = label(sink);
        let _ = self.delivered.get_or_create(&l);
        let _ = self.retried.get_or_create(&l);
        let _ = self.dead_lettered.get_or_create(&l);
        let _ = self.in_flight.get_or_create(&l);
        for class in FailureClass::ALL {
            let _ = self.failed.get_or_create(&SinkClass {
                sink: sink.to_string(),
                class,
            });
        }
    }

    pub fn sink_state(&self, sink: &str, state: &str) {
        for s in SINK_STATES {
            self.state
                .get_or_create(&SinkState {
                    sink: sink.to_string(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    pub fn sink_limits(&self, sink: &str, rate: f64, concurrency: usize) {
        self.rate.get_or_create(&label(sink)).set(rate);
        self.concurrency
            .get_or_create(&label(sink))
            .set(concurrency as i64);
    }

    pub fn latency(&self, sink: &str, seconds: f64) {
        self.latency.get_or_create(&label(sink)).observe(seconds);
    }

    pub fn backlog(&self, sink: &str, n: u64) {
        self.backlog.get_or_create(&label(sink)).set(n as i64);
    }

    /// Renders the registry, refreshing the queue gauges first.
    pub fn render(&self, queue: &Queue) -> String {
        let s = queue.stats();
        self.queue_events.set(s.events as i64);
        self.queue_bytes.set(s.bytes as i64);
        self.queue_syncs.set(s.syncs as i64);
        self.queue_evicted.set(s.evicted as i64);
        self.queue_oldest_age.set(
            s.oldest_ms
                .map(|ms| crate::event::now_ms().saturating_sub(ms) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
        self.queue_lost
            .set(queue.behind_mark().map_or(0, |b| b.lost()) as i64);
        self.dead_letters.set(queue.dead_letter_count() as i64);
        self.disk_bytes.set(queue.disk_bytes() as i64);
        // A filesystem that cannot be asked (never seen for a directory the daemon holds
        // open) keeps the last value rather than a 0 that would look like a full disk.
        if let Some(free) = queue.free_bytes() {
            self.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn label(sink: &str) -> SinkLabel {
    SinkLabel {
        sink: sink.to_string(),
    }
}
