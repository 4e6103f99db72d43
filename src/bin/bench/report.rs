//! The results, and the one table they print as (Markdown, pasted into BENCHMARKS.md).

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::Summary;
use crate::storage::Ceiling;
use crate::sys::Machine;

/// llmlogd's `Queue` in process.
pub struct QueueCeiling {
    pub appenders: usize,
    pub rate: f64,
    pub latency: Summary,
    /// CPU of the bench process during the window, in cores.
    pub cpu: f64,
}

/// The `format` of the transport floor's rows (`floor.rs`): kept out of the ingest table.
pub const FLOOR: &str = "transport floor";

/// One ingest measurement.
pub struct IngestRow {
    pub transport: &'static str,
    pub format: &'static str,
    pub clients: usize,
    /// "1" (wait for each ack) or the pipeline window.
    pub in_flight: usize,
    pub rate: f64,
    pub latency: Summary,
    /// Events per group commit (fdatasync) during the window.
    pub per_sync: Option<f64>,
    /// CPU used, in cores (1.0 = one core busy all the time).
    pub daemon_cpu: f64,
    pub bench_cpu: f64,
    /// events/s of every run of the cell, lowest first (the row is the median run).
    pub runs: Vec<f64>,
}

pub struct SteadyRow {
    pub transport: &'static str,
    pub rate: f64,
    pub achieved: f64,
    pub conns: usize,
    pub latency: Summary,
    pub late: u64,
}

pub struct AppRow {
    pub how: String,
    pub latency: Summary,
}

pub struct DrainRow {
    pub sink: String,
    pub backlog: u64,
    pub fill_rate: f64,
    /// Spawn to "ready" with the backlog on disk (the queue recounts it when it opens).
    pub startup: Duration,
    /// Ready to the last event received by the mock.
    pub drain: Duration,
    pub rate: f64,
    pub received: u64,
    pub unique: u64,
    pub peak_rss: u64,
    /// Peak RSS once ready (opening the queue with the backlog), before delivering much.
    pub rss_ready: u64,
    /// Peak RSS of the daemon that took the backlog in (its sink unreachable).
    pub fill_rss: u64,
    pub disk_after_fill: u64,
    pub payload_bytes: u64,
    pub disk_after_drain: Option<u64>,
    pub daemon_cpu: f64,
    pub bench_cpu: f64,
    /// What the target is for this sink (events/s).
    pub target: f64,
}

#[derive(Default)]
pub struct Report {
    pub header: Vec<(String, String)>,
    pub ceilings: Vec<Ceiling>,
    pub queue_ceilings: Vec<QueueCeiling>,
    pub ingest: Vec<IngestRow>,
    pub ingest_rss: Option<(u64, u64)>,
    pub steady: Vec<SteadyRow>,
    pub app: Vec<AppRow>,
    pub drains: Vec<DrainRow>,
    pub notes: Vec<String>,
}

pub fn rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The lowest and highest events/s of a cell's runs ("–" for one run).
fn range(runs: &[f64]) -> String {
    match (runs.first(), runs.last()) {
        (Some(lo), Some(hi)) if runs.len() > 1 => {
            format!("{:.1}-{:.1} k", lo / 1000.0, hi / 1000.0)
        }
        _ => "–".into(),
    }
}

/// An ingest row's `events/s | all runs | ack p50 | p99 | p99.9` cells.
fn rate_and_latency(r: &IngestRow) -> String {
    format!(
        "{} | {} | {} | {} | {}",
        rate(r.rate),
        range(&r.runs),
        dur(r.latency.p50),
        dur(r.latency.p99),
        dur(r.latency.p999)
    )
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

impl Report {
    pub fn machine(&mut self, m: &Machine) {
        self.header.extend([
            (
                "CPU".into(),
                format!("{} × {} ({} online)", m.cpus, m.cpu_model, m.cpus),
            ),
            ("memory".into(), m.memory.clone()),
            ("kernel".into(), m.kernel.clone()),
            ("data dir filesystem".into(), m.filesystem.clone()),
        ]);
    }

    /// The storage ceiling at a group size: the better of the two ways of laying records
    /// out in sled (one value each, or packed), so ingest is compared with the most the
    /// storage can take, not with the layout llmlogd happens to use.
    fn ceiling_at(&self, group: usize) -> Option<f64> {
        self.ceilings
            .iter()
            .filter(|c| c.group == group)
            .map(Ceiling::events_per_sec)
            .reduce(f64::max)
    }

    fn ingest_at(&self, transport: &str, format: &str, clients: usize) -> Option<&IngestRow> {
        self.ingest.iter().find(|r| {
            r.transport == transport
                && r.format == format
                && r.clients == clients
                && r.in_flight == 1
        })
    }

    /// What the one-in-flight cells could reach if llmlogd cost nothing, from this run's own
    /// numbers. A client's next event waits for its ack, so a group of C clients' events
    /// first crosses the transport (C ÷ floor's rate, at best) and is then committed (C ÷ the
    /// ceiling's rate at groups of C); the two cannot overlap for the same group, so per event
    /// the times add: rate ≤ 1 ÷ (1/ceiling + 1/floor). Splitting the clients into two groups
    /// that overlap instead is held by the ceiling at groups of C/2, which is lower still.
    fn closed_loop_bound(&self) -> Option<String> {
        let top = self.ingest.iter().map(|r| r.clients).max()?;
        let ceiling = self.ceiling_at(top)?;
        let mut parts = Vec::new();
        for r in self
            .ingest
            .iter()
            .filter(|r| r.format == FLOOR && r.clients == top)
        {
            let bound = 1.0 / (1.0 / ceiling + 1.0 / r.rate.max(1e-9));
            let daemon = self.ingest_at(r.transport, "native", top);
            parts.push(format!(
                "{}: {} events/s, {} of the ceiling{}",
                r.transport,
                rate(bound),
                pct(bound / ceiling),
                daemon.map_or(String::new(), |d| format!(
                    " (llmlogd reached {} of that bound)",
                    pct(d.rate / bound)
                )),
            ));
        }
        if parts.is_empty() {
            return None;
        }
        Some(format!(
            "**Closed-loop bound** at {top} clients with one event in flight each, for a daemon that \
             cost no CPU at all: a group's events first cross the transport (at the floor's rate at \
             best), then are committed (at the storage ceiling's rate, {}); for one group the two \
             cannot overlap, so per event the times add, rate ≤ 1 ÷ (1/ceiling + 1/floor). {}.",
            rate(ceiling),
            parts.join("; ")
        ))
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "| | |\n|---|---|");
        for (k, v) in &self.header {
            let _ = writeln!(o, "| {k} | {v} |");
        }

        if !self.ceilings.is_empty() || !self.queue_ceilings.is_empty() {
            let _ = writeln!(
                o,
                "\n### Storage ceiling (sled insert + flush + fdatasync, no network)\n"
            );
            let _ = writeln!(
                o,
                "| what | group | commits/s | events/s | commit p50 | p99 | p99.9 | CPU | CPU µs/event |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for c in &self.ceilings {
                let _ = writeln!(
                    o,
                    "| raw sled, {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                    if c.packed {
                        "records packed into ≤ 16 KiB values"
                    } else {
                        "one value per record"
                    },
                    c.group,
                    rate(c.commits as f64 / c.window.as_secs_f64()),
                    rate(c.events_per_sec()),
                    dur(c.commit_latency.p50),
                    dur(c.commit_latency.p99),
                    dur(c.commit_latency.p999),
                    pct(c.cpu),
                    c.cpu * 1e6 / c.events_per_sec().max(1e-9)
                );
            }
            for q in &self.queue_ceilings {
                let _ = writeln!(
                    o,
                    "| llmlogd `Queue` in process, {n} appenders (ack latency) | ≤ {n} | | {} | {} | {} | {} | {} | {:.0} |",
                    rate(q.rate),
                    dur(q.latency.p50),
                    dur(q.latency.p99),
                    dur(q.latency.p999),
                    pct(q.cpu),
                    q.cpu * 1e6 / q.rate.max(1e-9),
                    n = q.appenders,
                );
            }
        }

        if !self.ingest.is_empty() {
            let _ = writeln!(o, "\n### Durable ingest (ack after fdatasync)\n");
            if let Some(n) = self.ingest.first().map(|r| r.runs.len()).filter(|n| *n > 1) {
                let _ = writeln!(
                    o,
                    "Each cell ran {n} times, in rounds (every cell once per round); a row is its median run by events/s, *all runs* the lowest and highest.\n"
                );
            }
            let _ = writeln!(
                o,
                "| transport | format | clients | in flight each | events/s | all runs | ack p50 | p99 | p99.9 | events/sync | % of ceiling | llmlogd CPU | CPU µs/event | bench CPU |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for r in self.ingest.iter().filter(|r| r.format != FLOOR) {
                let ceiling = self
                    .ceiling_at(r.clients)
                    .map_or("–".into(), |c| pct(r.rate / c));
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
                    r.transport,
                    r.format,
                    r.clients,
                    r.in_flight,
                    rate_and_latency(r),
                    r.per_sync.map_or("–".into(), |g| format!("{g:.1}")),
                    if r.in_flight == 1 {
                        ceiling
                    } else {
                        "–".into()
                    },
                    pct(r.daemon_cpu),
                    r.daemon_cpu * 1e6 / r.rate.max(1e-9),
                    pct(r.bench_cpu)
                );
            }
        }

        let floor: Vec<&IngestRow> = self.ingest.iter().filter(|r| r.format == FLOOR).collect();
        if !floor.is_empty() {
            let _ = writeln!(
                o,
                "\n### Transport floor (the same clients against a server that answers each event at once: nothing parsed, nothing stored)\n"
            );
            let _ = writeln!(
                o,
                "| transport | clients | in flight each | events/s | all runs | ack p50 | p99 | p99.9 | server CPU | CPU µs/event | bench CPU | llmlogd, same cell | llmlogd ÷ floor |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for r in floor {
                let daemon = self.ingest_at(r.transport, "native", r.clients);
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                    r.transport,
                    r.clients,
                    r.in_flight,
                    rate_and_latency(r),
                    pct(r.daemon_cpu),
                    r.daemon_cpu * 1e6 / r.rate.max(1e-9),
                    pct(r.bench_cpu),
                    daemon.map_or("–".into(), |d| rate(d.rate)),
                    daemon.map_or("–".into(), |d| pct(d.rate / r.rate.max(1e-9))),
                );
            }
            if let Some(bound) = self.closed_loop_bound() {
                let _ = writeln!(o, "\n{bound}");
            }
        }

        if !self.steady.is_empty() {
            let _ = writeln!(o, "\n### Ack latency at a steady rate (open loop)\n");
            let _ = writeln!(
                o,
                "| transport | rate asked | achieved | connections | p50 | p99 | p99.9 | max | late sends |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for r in &self.steady {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.transport,
                    rate(r.rate),
                    rate(r.achieved),
                    r.conns,
                    dur(r.latency.p50),
                    dur(r.latency.p99),
                    dur(r.latency.p999),
                    dur(r.latency.max),
                    r.late
                );
            }
        }

        if !self.app.is_empty() {
            let _ = writeln!(o, "\n### The app's view: time one log call takes\n");
            let _ = writeln!(
                o,
                "| how the app logs | calls | p50 | p99 | p99.9 | max |\n|---|--:|--:|--:|--:|--:|"
            );
            for r in &self.app {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.how,
                    r.latency.count,
                    dur(r.latency.p50),
                    dur(r.latency.p99),
                    dur(r.latency.p999),
                    dur(r.latency.max)
                );
            }
        }

        if !self.drains.is_empty() {
            let _ = writeln!(o, "\n### Drain from a backlog\n");
            let _ = writeln!(
                o,
                "| sink | backlog | filled at (events/s) | peak RSS filling | startup with backlog | peak RSS at ready | drain time | events/s | target | received (unique) | peak RSS draining | llmlogd CPU | bench CPU |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
            );
            for d in &self.drains {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
                    d.sink,
                    rate(d.backlog as f64),
                    rate(d.fill_rate),
                    mib(d.fill_rss),
                    dur(d.startup),
                    mib(d.rss_ready),
                    dur(d.drain),
                    rate(d.rate),
                    rate(d.target),
                    rate(d.received as f64),
                    rate(d.unique as f64),
                    mib(d.peak_rss),
                    pct(d.daemon_cpu),
                    pct(d.bench_cpu)
                );
            }
            let _ = writeln!(o, "\n### Disk\n");
            let _ = writeln!(
                o,
                "| backlog | payload/event | disk/event with backlog | disk ÷ payload | disk after drain |\n|--:|--:|--:|--:|--:|"
            );
            for d in &self.drains {
                let per_payload = d.payload_bytes as f64 / d.backlog.max(1) as f64;
                let per_disk = d.disk_after_fill as f64 / d.backlog.max(1) as f64;
                let _ = writeln!(
                    o,
                    "| {} ({}) | {per_payload:.0} B | {per_disk:.0} B | {:.2} | {} |",
                    rate(d.backlog as f64),
                    d.sink,
                    per_disk / per_payload,
                    d.disk_after_drain.map_or("–".into(), mib)
                );
            }
        }

        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(o, "\n### Targets (issue #8)\n");
            let _ = writeln!(o, "| target | measured | |\n|---|---|---|");
            for (t, m, ok) in targets {
                let _ = writeln!(o, "| {t} | {m} | {} |", met(ok));
            }
        }
        for n in &self.notes {
            let _ = writeln!(o, "\n{n}");
        }
        o
    }

    /// (target, measured, met) for every target this run measured.
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        let mut t = Vec::new();
        let top = self.ingest.iter().map(|r| r.clients).max().unwrap_or(0);
        for (transport, want) in [("HTTP", 35_000.0), ("Unix NDJSON", 50_000.0)] {
            if let Some(r) = self.ingest_at(transport, "native", top) {
                let runs = match r.runs.len() {
                    0 | 1 => String::new(),
                    n => format!(" (median of {n} runs: {})", range(&r.runs)),
                };
                t.push((
                    format!("{transport} ≥ {} events/s at {top} clients", rate(want)),
                    format!("{} events/s{runs}", rate(r.rate)),
                    r.rate >= want,
                ));
                if let Some(c) = self.ceiling_at(top) {
                    t.push((
                        format!("{transport} ingest ≥ 80 % of the storage ceiling ({top} clients)"),
                        format!("{} of {}", pct(r.rate / c), rate(c)),
                        r.rate >= 0.8 * c,
                    ));
                }
            }
        }
        for r in &self.steady {
            t.push((
                format!(
                    "{} ack p99 ≤ 2 ms at {} events/s",
                    r.transport,
                    rate(r.rate)
                ),
                dur(r.latency.p99),
                r.latency.p99 <= Duration::from_millis(2),
            ));
        }
        for r in &self.app {
            let limit = if r.how.starts_with("Unix NDJSON, wait for the ack") {
                Duration::from_millis(1)
            } else if r.how.starts_with("Unix NDJSON, write and go on") {
                Duration::from_micros(50)
            } else {
                continue;
            };
            t.push((
                format!("app cost p99 ≤ {}: {}", dur(limit), r.how),
                dur(r.latency.p99),
                r.latency.p99 <= limit,
            ));
        }
        for d in &self.drains {
            t.push((
                format!("drain to {} ≥ {} events/s", d.sink, rate(d.target)),
                format!("{} events/s", rate(d.rate)),
                d.rate >= d.target,
            ));
        }
        if let Some(d) = self.drains.iter().max_by_key(|d| d.backlog) {
            // Draining it, and while it builds up (sink down, events arriving: the state of a
            // host that is offline).
            for (when, rss) in [("drain", d.peak_rss), ("filling it, sink down", d.fill_rss)] {
                t.push((
                    format!(
                        "RSS ≤ 64 MiB with a {}-event backlog ({when})",
                        rate(d.backlog as f64)
                    ),
                    mib(rss),
                    rss <= 64 << 20,
                ));
            }
            let ratio = d.disk_after_fill as f64 / d.payload_bytes.max(1) as f64;
            t.push((
                "disk ≤ 1.5 × payload".into(),
                format!("{ratio:.2} ×"),
                ratio <= 1.5,
            ));
        }
        if let Some((peak, _)) = self.ingest_rss {
            t.push((
                "RSS ≤ 64 MiB during ingest".into(),
                mib(peak),
                peak <= 64 << 20,
            ));
        }
        t
    }
}
