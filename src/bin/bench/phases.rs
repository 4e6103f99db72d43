//! The phases of a run (see the crate doc): each starts what it needs, measures, stops it, and
//! adds its rows to the report. A phase that cannot measure returns an error (the run fails);
//! a slow result is just a number.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use llmlogd::formats::Format;

use crate::client::{self, Addr, BlockingHttp, BlockingNdjson};
use crate::daemon::{self, Daemon};
use crate::load::{self, Outcome, Proto, Window};
use crate::report::{AppRow, DrainRow, IngestRow, QueueCeiling, SteadyRow, FLOOR};
use crate::{metric, mock, status, storage, sys, Bench, CpuMeter, SYNCS};

/// How a cell drives the daemon.
enum Drive {
    /// One event in flight per client.
    Closed(Proto),
    /// NDJSON, `window` events in flight per client.
    Pipelined(Arc<Vec<Bytes>>, usize),
}

/// How a backlog is filled.
enum Fill {
    Ndjson(Arc<Vec<Bytes>>),
    Http(Arc<Vec<Bytes>>),
}

/// One ingest cell: who serves it, and how it is driven.
struct Cell<'a> {
    server: &'a Daemon,
    transport: &'static str,
    format: &'static str,
    addr: Addr,
    drive: Drive,
    clients: usize,
}

struct DrainSpec<'a> {
    name: &'a str,
    label: String,
    /// The sink's TOML for a given base URL.
    sink: &'a dyn Fn(&str) -> String,
    backlog: u64,
    fill: Fill,
    payload: &'a [Bytes],
    mock_delay: Duration,
    target: f64,
}

/// Most events a client sends in one timed cell (the window ends it first in practice).
const CELL_CAP: u64 = 5_000_000;
const STOP_GRACE: Duration = Duration::from_secs(60);
const PL_KEY: (&str, &str) = ("x-api-key", "pl_bench_key");

impl Bench {
    fn http_requests(&self, f: Format) -> Arc<Vec<Bytes>> {
        let (path, headers): (&str, &[(&str, &str)]) = match f {
            Format::Native => ("/v1/events", &[]),
            Format::Pezzo => (
                "/api/reporting/v2/request",
                &[
                    ("x-pezzo-api-key", "pez_bench_key"),
                    ("x-pezzo-project-id", "bench"),
                ],
            ),
            Format::PromptLayer => ("/log-request", &[PL_KEY]),
        };
        Arc::new(
            self.events
                .of(f)
                .iter()
                .map(|e| client::post(path, headers, e))
                .collect(),
        )
    }

    fn ndjson_lines(&self) -> Arc<Vec<Bytes>> {
        Arc::new(
            self.events
                .native
                .iter()
                .map(|e| {
                    let mut v = Vec::with_capacity(e.len() + 1);
                    v.extend_from_slice(e);
                    v.push(b'\n');
                    Bytes::from(v)
                })
                .collect(),
        )
    }

    fn check(&mut self, what: &str, o: &Outcome) {
        if o.refused > 0 {
            self.failures.push(format!(
                "{what}: {} events refused (first: {})",
                o.refused,
                o.first_refusal.as_deref().unwrap_or("?")
            ));
        }
        if o.acked == 0 {
            self.failures
                .push(format!("{what}: no event acknowledged in the window"));
        }
    }

    pub(crate) fn ceiling(&mut self) -> anyhow::Result<()> {
        let values = storage::records(&self.events.native);
        let mean = values.iter().map(Vec::len).sum::<usize>() / values.len().max(1);
        self.report.header.push((
            "ceiling's record".into(),
            format!(
                "{mean} B (28-byte header + zstd level 1 payload, each event compressed alone; \
                 llmlogd itself compresses ~8 at once: see the disk table)"
            ),
        ));
        for packed in [false, true] {
            for g in self.args.clients.clone() {
                eprintln!("  raw sled, groups of {g}, packed {packed}");
                let c = storage::sled_ceiling(
                    &self.work.join(format!("ceiling-{g}")),
                    g,
                    packed,
                    &values,
                    self.warmup,
                    self.measure,
                    CELL_CAP,
                )?;
                self.report.ceilings.push(c);
            }
        }
        let payloads = Arc::new(self.events.native.clone());
        for g in self.args.clients.clone() {
            eprintln!("  Queue in process, {g} appenders");
            let dir = self.work.join(format!("queue-{g}"));
            let w = Window::after(self.warmup, self.measure);
            let (o, cpu) = self.rt.block_on(async {
                let meter = tokio::spawn(async move {
                    tokio::time::sleep_until(w.start.into()).await;
                    let m = CpuMeter::start(std::process::id());
                    tokio::time::sleep_until(w.end.into()).await;
                    m.read().0
                });
                let o = storage::queue_ceiling(&dir, g, payloads.clone(), w, CELL_CAP).await;
                Ok::<_, anyhow::Error>((o?, meter.await?))
            })?;
            let mut latencies = o.latencies;
            self.report.queue_ceilings.push(QueueCeiling {
                appenders: g,
                rate: o.acked as f64 / w.len().as_secs_f64(),
                latency: load::summarize(&mut latencies),
                cpu,
            });
        }
        Ok(())
    }

    /// Every cell `--repeat` times, in rounds (each round runs every cell once, so a machine
    /// that slows down for a while weighs on all cells alike); a row is the cell's median
    /// run. The transport floor (`floor.rs`) runs beside llmlogd, idle while llmlogd is
    /// measured and the other way round, and takes its turn in every round.
    pub(crate) fn ingest(&mut self) -> anyhow::Result<()> {
        let data = self.work.join("ingest-data");
        let _ = std::fs::remove_dir_all(&data);
        let d = self.start_daemon("ingest", &data, "")?;
        let floor = self.start_floor()?;
        let (http, unix) = (Addr::Tcp(d.http), Addr::Unix(d.unix.clone()));
        let idle_rss = d.rss();
        d.reset_peak_rss();
        let native = self.http_requests(Format::Native);
        let lines = self.ndjson_lines();
        let clients = self.args.clients.clone();
        let top = clients.iter().copied().max().unwrap_or(1);
        let mut cells: Vec<Cell<'_>> = Vec::new();
        // The floor's cells are the ones whose format is `FLOOR`.
        let mut add = |transport, format: &'static str, addr: &Addr, drive, clients| {
            cells.push(Cell {
                server: if format == FLOOR { &floor } else { &d },
                transport,
                format,
                addr: addr.clone(),
                drive,
                clients,
            })
        };
        for &c in &clients {
            add(
                "HTTP",
                "native",
                &http,
                Drive::Closed(Proto::Http(native.clone())),
                c,
            );
        }
        for &c in &clients {
            add(
                "Unix NDJSON",
                "native",
                &unix,
                Drive::Closed(Proto::Ndjson(lines.clone())),
                c,
            );
        }
        for &c in &clients {
            let drive = Drive::Pipelined(lines.clone(), self.args.window);
            add("Unix NDJSON", "native", &unix, drive, c);
        }
        for (name, f) in [
            ("pezzo", Format::Pezzo),
            ("promptlayer", Format::PromptLayer),
        ] {
            let reqs = self.http_requests(f);
            for &c in &clients {
                add(
                    "HTTP",
                    name,
                    &http,
                    Drive::Closed(Proto::Http(reqs.clone())),
                    c,
                );
            }
        }
        add(
            "Unix HTTP",
            "native",
            &unix,
            Drive::Closed(Proto::Http(native.clone())),
            top,
        );
        // The floor: llmlogd's one-in-flight native cells at the most clients.
        let (floor_http, floor_unix) = (Addr::Tcp(floor.http), Addr::Unix(floor.unix.clone()));
        add(
            "HTTP",
            FLOOR,
            &floor_http,
            Drive::Closed(Proto::Http(native)),
            top,
        );
        add(
            "Unix NDJSON",
            FLOOR,
            &floor_unix,
            Drive::Closed(Proto::Ndjson(lines)),
            top,
        );

        if !self.args.cells.is_empty() {
            let wanted = |c: &Cell<'_>| {
                let name = match (c.transport, c.format, &c.drive) {
                    (_, FLOOR, _) => "floor",
                    (_, _, Drive::Pipelined(..)) => "pipelined",
                    ("Unix HTTP", _, _) => "unix-http",
                    ("Unix NDJSON", _, _) => "ndjson",
                    (_, "native", _) => "http",
                    (_, f, _) => f,
                };
                self.args.cells.iter().any(|w| w == name)
            };
            cells.retain(wanted);
        }
        let rounds = self.args.repeat.max(1);
        let mut runs: Vec<Vec<IngestRow>> = cells.iter().map(|_| Vec::new()).collect();
        for round in 1..=rounds {
            if rounds > 1 {
                eprintln!("  round {round} of {rounds}");
            }
            for (cell, runs) in cells.iter().zip(&mut runs) {
                runs.push(self.cell(cell)?);
            }
        }
        for mut runs in runs {
            runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
            let mut median = runs.swap_remove(runs.len() / 2);
            median.runs = rates;
            self.report.ingest.push(median);
        }
        self.report.ingest_rss = Some((d.peak_rss(), idle_rss));
        drop(cells);
        d.stop(STOP_GRACE)?;
        floor.stop(STOP_GRACE)?;
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    }

    /// The transport floor (`floor.rs`), started like llmlogd.
    fn start_floor(&self) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe()?;
        let name = "transport-floor";
        let config = self.work.join(format!("{name}.toml"));
        std::fs::write(&config, "")?;
        Daemon::start(&daemon::Launch {
            bin: &exe,
            prefix: &[crate::floor::FLAG],
            config: &config,
            data_dir: &self.work.join(format!("{name}-data")),
            socket: &self.work.join(format!("{name}.sock")),
            log: &self.work.join(format!("{name}.log")),
            ready_within: Duration::from_secs(30),
            unit: &daemon::UnitSettings::default(),
        })
    }

    /// One timed run of a cell.
    fn cell(&mut self, c: &Cell<'_>) -> anyhow::Result<IngestRow> {
        let Cell {
            server,
            transport,
            format,
            addr,
            drive,
            clients,
        } = c;
        let in_flight = match drive {
            Drive::Closed(_) => 1,
            Drive::Pipelined(_, w) => *w,
        };
        eprintln!("  {transport} {format}: {clients} clients × {in_flight} in flight");
        let w = Window::after(self.warmup, self.measure);
        let (http, pid) = (server.http, server.pid);
        let quotas = vec![CELL_CAP; *clients];
        let (outcome, syncs, (daemon_cpu, bench_cpu)) = self.rt.block_on(async {
            // Reads the daemon's sync counter and both processes' CPU at the window's edges.
            let meter = tokio::spawn(async move {
                tokio::time::sleep_until(w.start.into()).await;
                let s0 = metric(http, SYNCS).await;
                let m = CpuMeter::start(pid);
                tokio::time::sleep_until(w.end.into()).await;
                let cpu = m.read();
                let s1 = metric(http, SYNCS).await;
                (s0.zip(s1).map(|(a, b)| b - a), cpu)
            });
            let o = match drive {
                Drive::Closed(p) => load::closed_loop(addr, p, &quotas, w).await,
                Drive::Pipelined(lines, win) => {
                    load::pipelined(addr, lines.clone(), &quotas, *win, w).await
                }
            };
            let (syncs, cpu) = meter.await?;
            Ok::<_, anyhow::Error>((o?, syncs, cpu))
        })?;
        let what = format!("{transport} {format} × {clients}");
        // Where the daemon's peak RSS grew: one line per cell on stderr (`status_kb` and
        // `peak_rss` give bytes).
        const MIB: f64 = (1u64 << 20) as f64;
        eprintln!(
            "    {:.0} events/s; peak RSS so far {:.1} MiB (now anon {:.1}, file {:.1})",
            outcome.acked as f64 / w.len().as_secs_f64(),
            server.peak_rss() as f64 / MIB,
            sys::status_kb(pid, "RssAnon").unwrap_or(0) as f64 / MIB,
            sys::status_kb(pid, "RssFile").unwrap_or(0) as f64 / MIB,
        );
        self.check(&what, &outcome);
        let mut latencies = outcome.latencies;
        Ok(IngestRow {
            transport,
            format,
            clients: *clients,
            in_flight,
            rate: outcome.acked as f64 / w.len().as_secs_f64(),
            latency: load::summarize(&mut latencies),
            per_sync: syncs.filter(|s| *s > 0.0).map(|s| outcome.acked as f64 / s),
            daemon_cpu,
            bench_cpu,
            runs: Vec::new(),
        })
    }

    pub(crate) fn steady(&mut self) -> anyhow::Result<()> {
        let data = self.work.join("steady-data");
        let _ = std::fs::remove_dir_all(&data);
        let d = self.start_daemon("steady", &data, "")?;
        let secs = if self.args.smoke { 0.5 } else { 10.0 };
        let (rate, conns) = (1000.0, 8);
        for (transport, addr, proto) in [
            (
                "HTTP",
                Addr::Tcp(d.http),
                Proto::Http(self.http_requests(Format::Native)),
            ),
            (
                "Unix NDJSON",
                Addr::Unix(d.unix.clone()),
                Proto::Ndjson(self.ndjson_lines()),
            ),
        ] {
            eprintln!("  {transport} at {rate} events/s");
            let w = Window::after(self.warmup, Duration::from_secs_f64(secs));
            let mut o = self
                .rt
                .block_on(load::steady(&addr, &proto, rate, conns, w))?;
            self.check(&format!("steady {transport}"), &o);
            self.report.steady.push(SteadyRow {
                transport,
                rate,
                achieved: o.rate(&w),
                conns,
                latency: load::summarize(&mut o.latencies),
                late: o.late,
            });
        }
        d.stop(STOP_GRACE)?;
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    }

    pub(crate) fn app(&mut self) -> anyhow::Result<()> {
        let data = self.work.join("app-data");
        let _ = std::fs::remove_dir_all(&data);
        let d = self.start_daemon("app", &data, "")?;
        let service = self.rt.block_on(mock::start(Duration::from_millis(50)))?;
        let (calls, direct_calls) = if self.args.smoke {
            (100, 5)
        } else {
            (5000, 100)
        };
        let pace = Duration::from_millis(1);
        let max_time = Duration::from_secs(30);
        let lines = self.ndjson_lines();
        let n = lines.len();

        // Each way of logging `--repeat` times, in rounds, its calls pooled: a stretch of slow
        // host weighs on all three alike, and a p99 over 3 × 5,000 calls moves less.
        let rounds = self.args.repeat.max(1);
        let (mut durable, mut forget, mut http) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            if rounds > 1 {
                eprintln!("  round {round} of {rounds}");
            }
            eprintln!("  Unix NDJSON, waiting for each ack");
            let mut c = BlockingNdjson::connect(&d.unix)?;
            durable.extend(load::paced_blocking(calls, pace, max_time, |k| {
                if !c.send(&lines[k % n])? {
                    bail!("event refused");
                }
                Ok(())
            })?);
            drop(c);

            eprintln!("  Unix NDJSON, fire-and-forget");
            forget.extend(self.fire_and_forget(&d, &lines, calls, pace, max_time)?);

            eprintln!("  HTTP, waiting for each 202");
            let reqs = self.http_requests(Format::Native);
            let mut c = BlockingHttp::connect(&Addr::Tcp(d.http))?;
            http.extend(load::paced_blocking(calls, pace, max_time, |k| {
                let status = c.send(&reqs[k % reqs.len()])?;
                if status != 202 {
                    bail!("HTTP {status}");
                }
                Ok(())
            })?);
        }
        for (how, mut lat) in [
            ("Unix NDJSON, wait for the ack (durable)", durable),
            (
                "Unix NDJSON, write and go on (fire-and-forget; acks read by another thread)",
                forget,
            ),
            (
                "HTTP keep-alive POST /v1/events, wait for the 202 (durable)",
                http,
            ),
        ] {
            self.report.app.push(AppRow {
                how: how.into(),
                latency: load::summarize(&mut lat),
            });
        }

        eprintln!("  straight to a 50 ms service");
        let reqs = self.http_requests(Format::PromptLayer);
        let mut c = BlockingHttp::connect(&Addr::Tcp(service.addr))?;
        let mut lat = load::paced_blocking(direct_calls, Duration::ZERO, max_time, |k| {
            let status = c.send(&reqs[k % reqs.len()])?;
            if status != 200 {
                bail!("HTTP {status}");
            }
            Ok(())
        })?;
        self.report.app.push(AppRow {
            how: "no llmlogd: keep-alive POST straight to a service that answers in 50 ms".into(),
            latency: load::summarize(&mut lat),
        });
        d.stop(STOP_GRACE)?;
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    }

    /// An app that writes each line and goes on; another thread reads the acks, and every
    /// event must be acknowledged. Returns the time each `write` took.
    fn fire_and_forget(
        &mut self,
        d: &Daemon,
        lines: &[Bytes],
        calls: usize,
        pace: Duration,
        max_time: Duration,
    ) -> anyhow::Result<Vec<u64>> {
        let stream = std::os::unix::net::UnixStream::connect(&d.unix)?;
        let replies = stream.try_clone()?;
        // The app does not wait, but someone reads the replies (else the daemon's writes back
        // fill the socket and it stops reading): a thread counts them.
        let counter = std::thread::spawn(move || {
            let (mut acks, mut other) = (0u64, 0u64);
            for line in BufReader::new(replies).split(b'\n') {
                let Ok(line) = line else { break };
                if client::is_ack(&line) {
                    acks += 1;
                } else {
                    other += 1;
                }
            }
            (acks, other)
        });
        let mut wr = stream;
        let lat = load::paced_blocking(calls, pace, max_time, |k| {
            wr.write_all(&lines[k % lines.len()])?;
            Ok(())
        })?;
        wr.shutdown(std::net::Shutdown::Write)?;
        let (acks, other) = counter
            .join()
            .map_err(|_| anyhow::anyhow!("reply reader panicked"))?;
        if acks != lat.len() as u64 || other > 0 {
            self.failures.push(format!(
                "fire-and-forget: wrote {} events, got {acks} acks and {other} other replies",
                lat.len()
            ));
        }
        Ok(lat)
    }

    pub(crate) fn drain_batched(&mut self) -> anyhow::Result<()> {
        let (batch, conc) = (self.args.batch, self.args.batch_concurrency);
        let sink = move |url: &str| {
            format!(
                "[sinks.bench]\ntype = \"http\"\nurl = \"{url}/ingest\"\nbatch_max_events = {batch}\nconcurrency = {conc}\n"
            )
        };
        let payload = self.events.native.clone();
        self.drain(DrainSpec {
            name: "drain",
            label: format!("http, {batch} events/batch, concurrency {conc}, fast local endpoint"),
            sink: &sink,
            backlog: self.args.events,
            fill: Fill::Ndjson(self.ndjson_lines()),
            payload: &payload,
            mock_delay: Duration::ZERO,
            target: 20_000.0,
        })
    }

    pub(crate) fn drain_single(&mut self) -> anyhow::Result<()> {
        let conc = 64;
        let delay = Duration::from_millis(50);
        let sink = move |url: &str| {
            format!(
                "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{url}\"\napi_key = \"bench\"\nconcurrency = {conc}\n"
            )
        };
        let payload = self.events.promptlayer.clone();
        self.drain(DrainSpec {
            name: "single",
            label: format!("promptlayer (1 event/request), concurrency {conc}, 50 ms endpoint"),
            sink: &sink,
            backlog: self.args.single_events,
            fill: Fill::Http(self.http_requests(Format::PromptLayer)),
            payload: &payload,
            mock_delay: delay,
            target: 0.9 * conc as f64 / delay.as_secs_f64(),
        })
    }

    /// Fills a backlog with the sink pointing at a closed port, restarts llmlogd with it
    /// pointing at a mock, and times the drain where it lands.
    fn drain(&mut self, s: DrainSpec<'_>) -> anyhow::Result<()> {
        let data = self.work.join(format!("{}-data", s.name));
        let _ = std::fs::remove_dir_all(&data);
        let n = s.backlog;
        let closed = format!("http://127.0.0.1:{}", daemon::closed_port()?);
        let d = self.start_daemon(&format!("{}-fill", s.name), &data, &(s.sink)(&closed))?;
        eprintln!("  filling a backlog of {n} events");
        let t = Instant::now();
        // Bounded by count; the hour is only a backstop.
        let w = Window {
            start: t,
            end: t + Duration::from_secs(3600),
        };
        let (o, clients) = match &s.fill {
            Fill::Ndjson(lines) => {
                let q = load::quotas(n, 4);
                (
                    self.rt.block_on(load::pipelined(
                        &Addr::Unix(d.unix.clone()),
                        lines.clone(),
                        &q,
                        256,
                        w,
                    ))?,
                    4,
                )
            }
            Fill::Http(reqs) => {
                let q = load::quotas(n, 16);
                (
                    self.rt.block_on(load::closed_loop(
                        &Addr::Tcp(d.http),
                        &Proto::Http(reqs.clone()),
                        &q,
                        w,
                    ))?,
                    16,
                )
            }
        };
        let fill_rate = o.acked as f64 / t.elapsed().as_secs_f64();
        if o.refused > 0 || o.acked != n {
            bail!(
                "filling: {} of {n} acknowledged, {} refused (first: {})",
                o.acked,
                o.refused,
                o.first_refusal.as_deref().unwrap_or("-")
            );
        }
        let q = load::quotas(n, clients);
        let payload_bytes: u64 = q
            .iter()
            .enumerate()
            .map(|(c, &k)| {
                (0..k)
                    .map(|k| s.payload[load::pick(c, k, s.payload.len())].len() as u64)
                    .sum::<u64>()
            })
            .sum();
        let st = self.rt.block_on(status(d.http))?;
        let held = st["queue"]["events"].as_u64().unwrap_or(0);
        if held != n {
            bail!("after filling, the queue holds {held} events, not {n}");
        }
        let fill_rss = d.peak_rss();
        d.stop(STOP_GRACE)?;
        let disk_after_fill = sys::disk_usage(&data);

        let mock = self.rt.block_on(mock::start(s.mock_delay))?;
        let url = format!("http://{}", mock.addr);
        eprintln!("  draining to {url}");
        let d = self.start_daemon(&format!("{}-drain", s.name), &data, &(s.sink)(&url))?;
        let ready = Instant::now();
        let meter = CpuMeter::start(d.pid);
        let rss_ready = d.peak_rss();
        let limit = Duration::from_secs(60) + Duration::from_secs_f64(n as f64 / 500.0);
        let mut last_print = Instant::now();
        while mock.stats.unique() < n {
            if ready.elapsed() > limit {
                self.failures.push(format!(
                    "{}: only {} of {n} events arrived within {limit:?}",
                    s.name,
                    mock.stats.unique()
                ));
                break;
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                eprintln!("    {} of {n} delivered", mock.stats.unique());
                last_print = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (daemon_cpu, bench_cpu) = meter.read();
        let unique = mock.stats.unique();
        let received = mock.stats.events.load(std::sync::atomic::Ordering::Relaxed);
        // The first delivery can precede the "ready" line (delivery starts before the
        // listeners are bound).
        let from = mock.stats.first().map_or(ready, |f| f.min(ready));
        let drain = mock
            .stats
            .last()
            .map_or(Duration::ZERO, |l| l.saturating_duration_since(from));
        let disk_after_drain = self.settle_disk(&d, &data)?;
        let peak_rss = d.peak_rss();
        let startup = d.startup;
        d.stop(STOP_GRACE)?;
        let _ = std::fs::remove_dir_all(&data);
        self.report.drains.push(DrainRow {
            sink: s.label,
            backlog: n,
            fill_rate,
            startup,
            drain,
            rate: unique as f64 / drain.as_secs_f64().max(1e-9),
            received,
            unique,
            peak_rss,
            rss_ready,
            fill_rss,
            disk_after_fill,
            payload_bytes,
            disk_after_drain,
            daemon_cpu,
            bench_cpu,
            target: s.target,
        });
        Ok(())
    }

    /// Waits (bounded) until the queue is empty and its disk use settles: unchanged for 3 s,
    /// and either small or given the 10 s llmlogd takes to decide on compaction.
    fn settle_disk(&mut self, d: &Daemon, data: &Path) -> anyhow::Result<Option<u64>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.rt.block_on(status(d.http)).context("status")?;
            if st["queue"]["events"].as_u64() == Some(0) {
                break;
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let empty = Instant::now();
        // Half-second samples that must agree: 3 s, or 1 s in a smoke run.
        let stable = if self.args.smoke { 2 } else { 6 };
        let (mut last, mut same) = (sys::disk_usage(data), 0);
        let settled = |last: u64, same: u32| {
            same >= stable && (last < 64 << 20 || empty.elapsed() > Duration::from_secs(13))
        };
        while !settled(last, same) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = sys::disk_usage(data);
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        Ok(Some(last))
    }
}
