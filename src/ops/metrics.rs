//! Every metric llmlogd exports, defined once, served on `/metrics`.
//!
//! Stages hold an `Arc<Metrics>` and call the typed helpers below; no metric name appears
//! anywhere else. Queue figures are read from the queue at scrape time. Labels never carry
//! API keys or event content: only route names, sink names (from the config), classes.
//!
//! Two text formats, chosen by the scrape's `Accept` header ([`Exposition::negotiate`]):
//! OpenMetrics 1.0 when asked for (Prometheus asks for it first), else the Prometheus text
//! format 0.0.4, which is what `curl`, older scrapers and most other tools read.
//! prometheus-client encodes only OpenMetrics, so 0.0.4 is its output converted line by line
//! ([`to_prometheus_text`]): the same samples, names and values.

use std::sync::atomic::{AtomicU64, Ordering};

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
pub struct Reason {
    pub reason: &'static str,
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
    forbidden: Family<Reason, Counter>,
    queue_events: Gauge,
    queue_bytes: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    /// Counters kept by the queue; copied in at each scrape (`fetch_max`: two scrapes at once
    /// cannot count anything twice).
    queue_syncs: Counter,
    queue_evicted: Counter,
    queue_lost: Counter,
    dead_letters: Gauge,
    dead_letter_bytes: Gauge,
    dead_letters_dropped: Counter,
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
    ceiling_events: Family<SinkLabel, Gauge>,
    ceiling_bytes: Family<SinkLabel, Gauge>,
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
            forbidden: Family::default(),
            queue_events: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            queue_syncs: Counter::default(),
            queue_evicted: Counter::default(),
            queue_lost: Counter::default(),
            dead_letters: Gauge::default(),
            dead_letter_bytes: Gauge::default(),
            dead_letters_dropped: Counter::default(),
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
            ceiling_events: Family::default(),
            ceiling_bytes: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
            }),
            backlog: Family::default(),
            registry: Registry::default(),
        };
        // Both series from the start, at 0, so an alert on them has something to read.
        for reason in ["origin", "host"] {
            let _ = m.forbidden.get_or_create(&Reason { reason });
        }
        registry.register(
            "ingest_events",
            "Events received, by route and result (accepted, invalid, too_large, full, error)",
            m.ingest_events.clone(),
        );
        registry.register(
            "http_forbidden_requests",
            "HTTP requests refused as coming from a web page, by reason (origin: it had an Origin header; host: its Host named another site)",
            m.forbidden.clone(),
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
            "Acknowledged events the store opened without (damaged files; sequence numbers between its end and its high-water mark), over the store's life: 0 normally, kept across restarts",
            m.queue_lost.clone(),
        );
        registry.register(
            "dead_letters",
            "Events held in the dead-letter store",
            m.dead_letters.clone(),
        );
        registry.register(
            "dead_letter_bytes",
            "Bytes the dead letters take (records and metadata), kept under queue.dead_letter_max_bytes",
            m.dead_letter_bytes.clone(),
        );
        registry.register(
            "dead_letters_dropped",
            "Oldest dead letters dropped to keep them under queue.dead_letter_max_bytes, since start",
            m.dead_letters_dropped.clone(),
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
            "sink_batch_ceiling_events",
            "Most events per request now: batch_max_events, or lower after the service refused a batch as too large (431)",
            m.ceiling_events.clone(),
        );
        registry.register(
            "sink_batch_ceiling_bytes",
            "Most body bytes per request now: batch_max_bytes, or lower after the service refused a batch as too large (413)",
            m.ceiling_bytes.clone(),
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

    /// A request refused by `ingest::browser` (`origin` or `host`).
    pub fn forbidden(&self, reason: &'static str) {
        self.forbidden.get_or_create(&Reason { reason }).inc();
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
        self.ceiling_events.remove(&l);
        self.ceiling_bytes.remove(&l);
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

    pub fn batch_ceiling(&self, sink: &str, events: usize, bytes: usize) {
        self.ceiling_events
            .get_or_create(&label(sink))
            .set(events as i64);
        self.ceiling_bytes
            .get_or_create(&label(sink))
            .set(bytes as i64);
    }

    pub fn latency(&self, sink: &str, seconds: f64) {
        self.latency.get_or_create(&label(sink)).observe(seconds);
    }

    pub fn backlog(&self, sink: &str, n: u64) {
        self.backlog.get_or_create(&label(sink)).set(n as i64);
    }

    /// Renders the registry in `format`, refreshing the queue gauges first.
    pub fn render(&self, queue: &Queue, format: Exposition) -> String {
        let s = queue.stats();
        self.queue_events.set(s.events as i64);
        self.queue_bytes.set(s.bytes as i64);
        self.queue_syncs
            .inner()
            .fetch_max(s.syncs, Ordering::Relaxed);
        self.queue_evicted
            .inner()
            .fetch_max(s.evicted, Ordering::Relaxed);
        self.queue_oldest_age.set(
            s.oldest_ms
                .map(|ms| crate::event::now_ms().saturating_sub(ms) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
        self.queue_lost
            .inner()
            .fetch_max(queue.lost_events(), Ordering::Relaxed);
        self.dead_letters.set(queue.dead_letter_count() as i64);
        self.dead_letter_bytes
            .set(i64::try_from(queue.dead_letter_bytes()).unwrap_or(i64::MAX));
        self.dead_letters_dropped
            .inner()
            .fetch_max(queue.dead_letters_dropped(), Ordering::Relaxed);
        self.disk_bytes.set(queue.disk_bytes() as i64);
        // A filesystem that cannot be asked (never seen for a directory the daemon holds
        // open) keeps the last value rather than a 0 that would look like a full disk.
        if let Some(free) = queue.free_bytes() {
            self.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Prometheus => to_prometheus_text(&out),
        }
    }
}

/// The text formats `/metrics` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 (what prometheus-client encodes).
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Prometheus,
}

impl Exposition {
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format for a scrape with these `Accept` header values: OpenMetrics only when one
    /// names `application/openmetrics-text` (version 1.0.0, 0.0.1 or none) with a weight at
    /// least that of `text/plain` (or of `text/*`, `*/*` when `text/plain` is not named: the
    /// most specific range sets a type's weight). A wildcard alone, or no header, gets 0.0.4,
    /// which every client can read; so does anything unparsable.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Exposition {
        // (specificity, weight) of the range that decides each type's weight.
        let mut om: Option<(u8, f32)> = None;
        let mut text: Option<(u8, f32)> = None;
        let take = |slot: &mut Option<(u8, f32)>, specificity: u8, q: f32| {
            *slot = match *slot {
                Some((s, w)) if s > specificity => Some((s, w)),
                Some((s, w)) if s == specificity => Some((s, w.max(q))),
                _ => Some((specificity, q)),
            }
        };
        for range in accept.into_iter().flat_map(|h| h.split(',')) {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let (mut q, mut version) = (1.0f32, None);
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0),
                    "version" => version = Some(v.to_string()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text"
                    if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) =>
                {
                    take(&mut om, 3, q)
                }
                "text/plain" => take(&mut text, 3, q),
                "text/*" => take(&mut text, 2, q),
                "*/*" => take(&mut text, 1, q),
                _ => {}
            }
        }
        let (om, text) = (om.map_or(0.0, |o| o.1), text.map_or(0.0, |t| t.1));
        if om > 0.0 && om >= text {
            Exposition::OpenMetrics
        } else {
            Exposition::Prometheus
        }
    }
}

/// prometheus-client's OpenMetrics text as the Prometheus text format 0.0.4:
/// - a counter's `# HELP`/`# TYPE` name the `_total` samples it has (0.0.4 names a family by
///   its samples); its samples keep their names, so queries are the same in both formats;
/// - `unknown` becomes `untyped`; types 0.0.4 lacks (`info`, `stateset`, `gaugehistogram`)
///   lose their `# HELP`/`# TYPE`, so their samples read as untyped;
/// - `# UNIT`, `# EOF` and any other comment, `_created` samples and exemplars are dropped.
///
/// prometheus-client writes a family's `# HELP` before its `# TYPE`, and help text as given
/// (no escapes: the help strings above hold no backslash, quote or newline).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    // The family being written and whether it has `_created` samples to drop.
    let mut family = String::new();
    let mut created = false;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let help = help.take().filter(|(h, _)| *h == name).map(|(_, t)| t);
            family = name.to_string();
            created = matches!(kind, "counter" | "histogram" | "summary");
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                "unknown" => (name.to_string(), "untyped"),
                _ => continue,
            };
            if let Some(text) = help {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let sample = without_exemplar(line);
            let name = sample.split(['{', ' ']).next().unwrap_or("");
            if created && name.strip_prefix(family.as_str()) == Some("_created") {
                continue;
            }
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// A sample line up to its exemplar (` # {...} value`): the first `#` outside a quoted label
/// value (names and values never hold one).
fn without_exemplar(line: &str) -> &str {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

fn label(sink: &str) -> SinkLabel {
    SinkLabel {
        sink: sink.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::exemplar::CounterWithExemplar;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::Unit;

    #[test]
    fn openmetrics_only_when_the_scraper_asks_for_it() {
        use Exposition::*;
        let cases: &[(&[&str], Exposition)] = &[
            (&[], Prometheus),
            (&["*/*"], Prometheus),
            (&["text/plain"], Prometheus),
            (&["text/plain; version=0.0.4; charset=utf-8"], Prometheus),
            (&["application/openmetrics-text"], OpenMetrics),
            // Prometheus 2.x, then 3.x, by default.
            (&["application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"], OpenMetrics),
            (&["application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"], OpenMetrics),
            // Prometheus told to scrape 0.0.4 only.
            (&["text/plain;version=0.0.4;q=0.3,*/*;q=0.2"], Prometheus),
            (&["text/plain;q=1, application/openmetrics-text;q=0.5"], Prometheus),
            (&["*/*;q=0.9, application/openmetrics-text;q=0.5"], Prometheus),
            (&["text/*;q=0.4, application/openmetrics-text; q=0.5"], OpenMetrics),
            (&["application/openmetrics-text;q=0, text/plain;q=0"], Prometheus),
            (&["application/openmetrics-text;version=2.0.0"], Prometheus),
            (&["Application/OpenMetrics-Text; Version=\"1.0.0\""], OpenMetrics),
            (&["text/html", "application/openmetrics-text"], OpenMetrics),
            (&["garbage;;q=x,,;"], Prometheus),
        ];
        for (accept, want) in cases {
            assert_eq!(
                Exposition::negotiate(accept.iter().copied()),
                *want,
                "{accept:?}"
            );
        }
    }

    /// prometheus-client's own output, every kind of metric it has, converted: the same
    /// samples, counters declared by their `_total` names, no unit, exemplar or `# EOF`.
    #[test]
    fn openmetrics_converts_to_the_prometheus_text_format() {
        let mut r = Registry::with_prefix("t");
        let requests = Family::<SinkLabel, Counter>::default();
        requests
            .get_or_create(&label("a#b\"c\\d # {x} 9"))
            .inc_by(2);
        r.register("requests", "Requests (by sink)", requests);
        let depth = Gauge::<i64>::default();
        depth.set(5);
        r.register("depth", "Depth", depth);
        let age = Gauge::<f64, AtomicU64>::default();
        age.set(1.5);
        r.register("age_seconds", "Age", age);
        let latency = Histogram::new([0.1, 1.0]);
        latency.observe(0.5);
        r.register("latency_seconds", "Latency", latency);
        r.register_with_unit("sent", "Sent", Unit::Bytes, Counter::<u64>::default());
        let traced = CounterWithExemplar::<Vec<(String, String)>>::default();
        traced.inc_by(1, Some(vec![("trace".into(), "x # y".into())]), None);
        r.register("traced", "Traced", traced);
        r.register("build", "Build", Info::new(vec![("version", "1")]));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(
            om.contains("# UNIT") && om.contains(" # {trace=") && om.ends_with("# EOF\n"),
            "the input has what must go: {om}"
        );
        let expected = r#"# HELP t_requests_total Requests (by sink).
# TYPE t_requests_total counter
t_requests_total{sink="a#b\"c\\d # {x} 9"} 2
# HELP t_depth Depth.
# TYPE t_depth gauge
t_depth 5
# HELP t_age_seconds Age.
# TYPE t_age_seconds gauge
t_age_seconds 1.5
# HELP t_latency_seconds Latency.
# TYPE t_latency_seconds histogram
t_latency_seconds_sum 0.5
t_latency_seconds_count 1
t_latency_seconds_bucket{le="0.1"} 0
t_latency_seconds_bucket{le="1.0"} 1
t_latency_seconds_bucket{le="+Inf"} 1
# HELP t_sent_bytes_total Sent.
# TYPE t_sent_bytes_total counter
t_sent_bytes_total 0
# HELP t_traced_total Traced.
# TYPE t_traced_total counter
t_traced_total 1
t_build_info{version="1"} 1
"#;
        assert_eq!(to_prometheus_text(&om), expected, "from:\n{om}");
    }

    /// What prometheus-client does not write today but OpenMetrics allows.
    #[test]
    fn unknown_types_created_samples_and_comments_convert_too() {
        let om = "# HELP x_things Things\n# TYPE x_things unknown\nx_things 3\n\
                  # TYPE x_c counter\nx_c_total 1\nx_c_created 1700000000.0\n\
                  # HELP x_s State\n# TYPE x_s stateset\nx_s{x_s=\"a\"} 1\n\
                  # a comment\n\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_things Things\n# TYPE x_things untyped\nx_things 3\n\
             # TYPE x_c_total counter\nx_c_total 1\nx_s{x_s=\"a\"} 1\n"
        );
    }

    /// Help text goes out as written in both formats: none may need escaping.
    #[test]
    fn no_help_text_needs_escaping() {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &Metrics::new().registry).unwrap();
        for line in om.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(!line.contains(['\\', '"']), "{line}");
        }
    }
}
