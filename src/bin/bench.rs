//! `llmlogd-bench`: the numbers of issue #8, measured against the real daemon.
//!
//! ```sh
//! cargo build --release && target/release/llmlogd-bench            # full run (~7 min)
//! cargo build --release && target/release/llmlogd-bench --smoke    # < 30 s, checks the tool
//! ```
//!
//! It starts `target/release/llmlogd` (the binary next to this one) as a child process, drives
//! it from this process (tokio; loopback TCP and the Unix socket only) and prints one Markdown
//! report. Phases, in order (`--only` picks some):
//!
//! 1. `ceiling`: raw sled insert + flush + fdatasync at the client counts' group sizes, and
//!    llmlogd's `Queue` in process (`storage.rs`).
//! 2. `ingest`: durable ingest at each client count: HTTP (native, Pezzo, PromptLayer bodies)
//!    and NDJSON on the Unix socket, one event in flight per client, plus NDJSON pipelined;
//!    then the transport floor: the same clients against a server that answers at once
//!    (`floor.rs`).
//! 3. `steady`: ack latency at a steady 1,000 events/s (open loop), HTTP and NDJSON.
//! 4. `app`: what one log call costs a synchronous app: NDJSON waiting for the ack, NDJSON
//!    fire-and-forget, HTTP, and posting straight to a service that answers in 50 ms.
//! 5. `drain`: fill a backlog (`--events`, 1 M) with the http sink pointing at a closed port,
//!    restart llmlogd pointing it at a fast local mock, time the drain; RSS and disk.
//! 6. `single`: the same with a PromptLayer sink (one request per event, concurrency 64)
//!    against a mock that answers in 50 ms (`--single-events`).
//!
//! Benchmarks print numbers; nothing here asserts on time. The run fails (exit 1) only when
//! the tool could not measure: a refused event, a lost event, a daemon that would not start.

#[path = "bench/client.rs"]
mod client;
#[path = "bench/daemon.rs"]
mod daemon;
#[path = "bench/events.rs"]
mod events;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/mock.rs"]
mod mock;
#[path = "bench/phases.rs"]
mod phases;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/storage.rs"]
mod storage;
#[path = "bench/sys.rs"]
mod sys;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use llmlogd::formats::Format;

use client::Addr;
use daemon::{Daemon, Launch};
use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Ceiling,
    Ingest,
    Steady,
    App,
    Drain,
    Single,
}

#[derive(Debug, Parser)]
#[command(
    name = "llmlogd-bench",
    about = "Benchmarks llmlogd (issue #8) and prints one Markdown report"
)]
struct Args {
    /// A tiny run (< 30 s) that checks the tool works; its numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Backlog for the batched (http sink) drain.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Backlog for the single-event (PromptLayer sink, 50 ms service) drain.
    #[arg(long, default_value_t = 50_000)]
    single_events: u64,
    /// Seconds measured per ingest cell run (after a 1 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Runs of each ingest cell, in rounds; the report gives the median run and the range.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Concurrent clients (and storage group sizes).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Events each pipelined NDJSON client keeps in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Phases to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
    /// Ingest cells to run (default: all): `http` (native), `ndjson`, `pipelined`, `pezzo`,
    /// `promptlayer`, `unix-http`, `floor`. For A/B experiments on one cell; the report's
    /// targets table then leaves out what was not run.
    #[arg(long, value_delimiter = ',')]
    cells: Vec<String>,
    /// The llmlogd binary (default: `llmlogd` next to this binary).
    #[arg(long)]
    llmlogd: Option<PathBuf>,
    /// Working directory for data dirs, sockets and logs (default: a new one under $TMPDIR).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the working directory (logs, data) afterwards.
    #[arg(long)]
    keep: bool,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The systemd unit whose process settings (`Environment=`, `CPUSchedulingPolicy=`,
    /// `Nice=`) llmlogd is started with, as users running the unit get them (default:
    /// `systemd/llmlogd.service` of the checkout the llmlogd binary was built in).
    #[arg(long)]
    unit: Option<PathBuf>,
    /// Start llmlogd bare, without the unit's process settings.
    #[arg(long, conflicts_with = "unit")]
    bare: bool,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Extra `[queue]` settings for every daemon, e.g. `--queue 'cache_bytes = "16MiB"'`
    /// (experiments; the report lists them).
    #[arg(long = "queue", value_name = "SETTING")]
    queue_settings: Vec<String>,
    /// Batched drain: the http sink's `batch_max_events` and `concurrency`.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 2)]
    batch_concurrency: usize,
}

/// Everything the phases share.
struct Bench {
    args: Args,
    bin: PathBuf,
    work: PathBuf,
    rt: tokio::runtime::Runtime,
    events: events::Events,
    warmup: Duration,
    measure: Duration,
    report: Report,
    /// The unit's process settings the daemon is started with.
    unit: daemon::UnitSettings,
    unit_path: Option<PathBuf>,
    /// Problems that make the run invalid (printed, exit 1).
    failures: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(floor::FLAG) {
        return match floor::serve(&argv[2..]) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("llmlogd-bench {}: {e:#}", floor::FLAG);
                std::process::ExitCode::FAILURE
            }
        };
    }
    let mut args = Args::parse();
    if args.smoke {
        args.events = args.events.min(2_000);
        args.single_events = args.single_events.min(200);
        args.duration = args.duration.min(0.3);
        args.repeat = 1;
        args.clients = vec![1, 4];
        args.window = args.window.min(4);
    }
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("llmlogd-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let bin = match &args.llmlogd {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the bench binary")?
            .join("llmlogd"),
    };
    let needs_daemon = args.only.is_empty() || args.only.iter().any(|p| *p != Phase::Ceiling);
    if needs_daemon && !bin.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --release`) or pass --llmlogd",
            bin.display()
        );
    }
    let (work, made) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("llmlogd-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    eprintln!("generating events…");
    let events = events::generate(if args.smoke { 64 } else { 1024 }, 2048, 8)?;
    let (warmup, measure) = if args.smoke {
        (
            Duration::from_millis(100),
            Duration::from_secs_f64(args.duration),
        )
    } else {
        (
            Duration::from_secs(1),
            Duration::from_secs_f64(args.duration),
        )
    };
    let mut b = Bench {
        bin,
        work: work.clone(),
        rt,
        events,
        warmup,
        measure,
        report: Report::default(),
        unit: daemon::UnitSettings::default(),
        unit_path: None,
        failures: Vec::new(),
        args,
    };
    if !b.args.bare {
        let path = b.args.unit.clone().unwrap_or_else(|| {
            // target/release/llmlogd -> the checkout's systemd/llmlogd.service
            b.bin
                .ancestors()
                .nth(3)
                .unwrap_or(Path::new("."))
                .join("systemd/llmlogd.service")
        });
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                b.unit = daemon::UnitSettings::parse(&text);
                b.unit_path = Some(path);
            }
            Err(e) if b.args.unit.is_some() => bail!("{}: {e}", path.display()),
            Err(_) => {}
        }
    }
    b.header();
    let phases: Vec<Phase> = if b.args.only.is_empty() {
        Phase::value_variants().to_vec()
    } else {
        b.args.only.clone()
    };
    let t0 = Instant::now();
    for p in phases {
        eprintln!("== {p:?} ({:.0} s in)", t0.elapsed().as_secs_f64());
        let r = match p {
            Phase::Ceiling => b.ceiling(),
            Phase::Ingest => b.ingest(),
            Phase::Steady => b.steady(),
            Phase::App => b.app(),
            Phase::Drain => b.drain_batched(),
            Phase::Single => b.drain_single(),
        };
        if let Err(e) = r {
            b.failures.push(format!("{p:?}: {e:#}"));
        }
    }
    b.report.header.push((
        "bench wall time".into(),
        format!("{:.0} s", t0.elapsed().as_secs_f64()),
    ));
    if b.args.smoke {
        b.report
            .notes
            .push("**Smoke run: a check that the tool works. These numbers mean nothing.**".into());
    }
    let md = b.report.markdown();
    println!("{md}");
    if let Some(out) = &b.args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    for f in &b.failures {
        eprintln!("FAILED: {f}");
    }
    if made && !b.args.keep && b.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("work directory kept: {}", work.display());
    }
    Ok(b.failures.is_empty())
}

/// CPU of the daemon and of this process over a stretch of time, in cores.
struct CpuMeter {
    pid: u32,
    at: Instant,
    daemon: Duration,
    bench: Duration,
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            at: Instant::now(),
            daemon: sys::process_cpu(pid).unwrap_or_default(),
            bench: sys::self_cpu(),
        }
    }

    /// (daemon cores, bench cores) since `start`.
    fn read(&self) -> (f64, f64) {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let d = sys::process_cpu(self.pid).unwrap_or_default();
        (
            d.saturating_sub(self.daemon).as_secs_f64() / wall,
            sys::self_cpu().saturating_sub(self.bench).as_secs_f64() / wall,
        )
    }
}

/// A value of the daemon's `/metrics` (first sample of that name).
async fn metric(http: std::net::SocketAddr, name: &str) -> Option<f64> {
    let mut c = client::Http::connect(&Addr::Tcp(http)).await.ok()?;
    let (status, body) = c.request(&client::get("/metrics")).await.ok()?;
    if status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The daemon's `/v1/status`.
async fn status(http: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut c = client::Http::connect(&Addr::Tcp(http)).await?;
    let (code, body) = c.request(&client::get("/v1/status")).await?;
    if code != 200 {
        bail!("/v1/status answered {code}");
    }
    Ok(serde_json::from_slice(&body)?)
}

const SYNCS: &str = "llmlogd_queue_syncs_total";

impl Bench {
    fn header(&mut self) {
        let m = sys::Machine::describe(&self.work);
        let r = &mut self.report;
        r.header.push((
            "date".into(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        ));
        r.machine(&m);
        // The checkout the daemon binary was built in (`-modified`: with uncommitted changes).
        let commit = std::process::Command::new("git")
            .arg("-C")
            .arg(self.bin.parent().unwrap_or(Path::new(".")))
            .args(["describe", "--always", "--dirty=-modified"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        r.header.push((
            "llmlogd".into(),
            format!("`{}`, built from commit {commit}", self.bin.display()),
        ));
        r.header.push((
            "command".into(),
            format!(
                "`llmlogd-bench {}`",
                std::env::args()
                    .skip(1)
                    .map(|a| if a.contains([' ', '"']) {
                        format!("'{a}'")
                    } else {
                        a
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
        r.header.push((
            "llmlogd process".into(),
            match &self.unit_path {
                Some(p) => format!(
                    "with the process settings of `{}`: {} (not its cgroup limits)",
                    p.display(),
                    self.unit.describe()
                ),
                None => "bare: default scheduling, environment and malloc".into(),
            },
        ));
        r.header.push((
            "llmlogd config".into(),
            format!(
                "defaults, plus `queue.max_bytes = \"64GiB\"`{}; sinks as named below",
                self.args
                    .queue_settings
                    .iter()
                    .map(|s| format!(", `queue.{s}`"))
                    .collect::<String>()
            ),
        ));
        r.header.push((
            "events".into(),
            format!(
                "OpenAI chat request + response; mean size native {} B, Pezzo {} B, PromptLayer {} B",
                self.events.mean_len(Format::Native),
                self.events.mean_len(Format::Pezzo),
                self.events.mean_len(Format::PromptLayer)
            ),
        ));
        r.header.push((
            "load generator".into(),
            format!(
                "this process, tokio with {} worker thread(s); its CPU is the \"bench CPU\" column",
                self.args.client_threads
            ),
        ));
    }

    /// Writes `<name>.toml` (logging, a big queue cap, then `sinks`) and starts llmlogd on
    /// `data` with its socket at `<name>.sock` and its log in `<name>.log`.
    fn start_daemon(&self, name: &str, data: &Path, sinks: &str) -> anyhow::Result<Daemon> {
        let config = self.work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[log]\nlevel = \"info\"\n\n[queue]\nmax_bytes = \"64GiB\"\n{}\n\n{sinks}",
                self.args.queue_settings.join("\n")
            ),
        )?;
        let socket = self.work.join(format!("{name}.sock"));
        let log = self.work.join(format!("{name}.log"));
        Daemon::start(&Launch {
            bin: &self.bin,
            prefix: &[],
            config: &config,
            data_dir: data,
            socket: &socket,
            log: &log,
            ready_within: Duration::from_secs(600),
            unit: &self.unit,
        })
    }
}
