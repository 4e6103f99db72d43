//! The command line: `run`, `check-config`, `send`, `status`, `dlq`.
//!
//! Commands that talk to a running daemon use its Unix socket (`send`) or its HTTP listener
//! (`status`, `dlq` while it runs); `dlq` opens the data directory itself when no daemon holds
//! it. Errors print one line and exit non-zero: 64 for a bad config or usage, 69 when the
//! daemon cannot be reached, 1 when some event was refused or an operation failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::config::{Config, Overrides};

/// Exit codes (sysexits.h).
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_SOFTWARE: i32 = 70;

#[derive(Debug, Parser)]
#[command(
    name = "llmlogd",
    version,
    about = "Durable local buffer for LLM request logs (Pezzo, PromptLayer, HTTP)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the config comes from; shared by every command that needs it.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// Config file (TOML). Without it, embedded defaults are used.
    #[arg(short, long, env = "LLMLOGD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides queue.data_dir).
    #[arg(long, env = "LLMLOGD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address (overrides server.http_listen; "" switches HTTP off).
    #[arg(long, env = "LLMLOGD_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Unix socket path (overrides server.unix_socket; "" switches it off).
    #[arg(long, env = "LLMLOGD_UNIX_SOCKET")]
    pub unix_socket: Option<String>,
}

impl ConfigArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            http_listen: self.http_listen.clone(),
            unix_socket: self.unix_socket.clone(),
        }
    }

    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load(self.config.as_deref(), &self.overrides())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(ConfigArgs),
    /// Validate a config file and print the effective configuration (secrets masked).
    CheckConfig {
        /// The file to check (default: --config / LLMLOGD_CONFIG, else the embedded defaults).
        file: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Submit events (JSON object, array, or NDJSON) from a file or stdin over the socket.
    Send {
        /// File to read (default: stdin; "-" is stdin too).
        file: Option<PathBuf>,
        /// Socket path (default: from the config).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Show the running daemon's queue and sinks.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Check the queue store offline (the daemon must be stopped); --repair fixes it.
    Fsck {
        /// Move corrupt records to the dead letters, remove orphans.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Inspect and act on dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters (oldest first).
    List {
        #[arg(long)]
        sink: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its event.
    Show { sink: String, seq: u64 },
    /// Put dead letters back into the queue for their sink.
    Replay {
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        seq: Option<u64>,
    },
    /// Delete dead letters.
    Purge {
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        seq: Option<u64>,
        /// Required when purging more than one sink's letters.
        #[arg(long)]
        all: bool,
    },
}

/// A CLI failure: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::new(EXIT_USAGE, e.to_string())
    }
}

pub fn check_config(file: Option<PathBuf>, cfg: &ConfigArgs) -> Result<(), CliError> {
    let path = file.or_else(|| cfg.config.clone());
    let c = Config::load(path.as_deref(), &cfg.overrides())?;
    print!("{}", c.render());
    eprintln!(
        "config ok: {}",
        path.map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded defaults".into())
    );
    Ok(())
}

/// `llmlogd send`: one line per event over the socket; reports each refusal.
pub fn send(
    file: Option<PathBuf>,
    socket: Option<PathBuf>,
    cfg: &ConfigArgs,
) -> Result<(), CliError> {
    let mut input = Vec::new();
    let source = match file.as_deref() {
        Some(p) if p.as_os_str() != "-" => p.display().to_string(),
        _ => "stdin".to_string(),
    };
    let read = match file.as_deref() {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut input))
        }
        _ => std::io::stdin().read_to_end(&mut input),
    };
    read.map_err(|e| CliError::new(EXIT_USAGE, format!("cannot read {source}: {e}")))?;
    let lines = split_input(&input)?;
    if lines.is_empty() {
        return Err(CliError::new(EXIT_USAGE, "no event in the input"));
    }
    let path = match socket {
        Some(p) => p,
        None => cfg.load()?.server.unix_socket.ok_or_else(|| {
            CliError::new(
                EXIT_USAGE,
                "the Unix socket is switched off in the config; pass --socket",
            )
        })?,
    };
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        CliError::new(
            EXIT_UNAVAILABLE,
            format!("cannot connect to llmlogd at {}: {e}", path.display()),
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let reader_stream = stream
        .try_clone()
        .map_err(|e| CliError::new(EXIT_UNAVAILABLE, e.to_string()))?;
    // Write in a thread while reading replies, so large inputs never deadlock on buffers.
    let n = lines.len();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(&stream);
        for l in lines {
            w.write_all(&l)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        stream.shutdown(std::net::Shutdown::Write)
    });
    let mut refused = 0usize;
    let mut answered = 0usize;
    for (i, line) in BufReader::new(reader_stream).lines().enumerate() {
        let line = line.map_err(|e| {
            CliError::new(
                EXIT_UNAVAILABLE,
                format!("lost the connection after {i} replies: {e}"),
            )
        })?;
        answered += 1;
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v.get("ok") != Some(&Value::Bool(true)) {
            refused += 1;
            let err = v.get("error").and_then(Value::as_str).unwrap_or(&line);
            eprintln!("event {}: refused: {err}", i + 1);
        }
    }
    let _ = writer.join();
    if answered < n {
        return Err(CliError::new(
            EXIT_UNAVAILABLE,
            format!(
                "{} of {n} events got no answer (not stored or not confirmed)",
                n - answered
            ),
        ));
    }
    if refused > 0 {
        return Err(CliError::new(1, format!("{refused} of {n} events refused")));
    }
    eprintln!("{n} events stored");
    Ok(())
}

/// Splits `send` input into one compact JSON object per line.
fn split_input(input: &[u8]) -> Result<Vec<Vec<u8>>, CliError> {
    let text =
        std::str::from_utf8(input).map_err(|_| CliError::new(EXIT_USAGE, "input is not UTF-8"))?;
    let trimmed = text.trim();
    // A whole JSON document (object or array) first; else NDJSON.
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        let items = match v {
            Value::Array(a) => a,
            other => vec![other],
        };
        return items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if !v.is_object() {
                    return Err(CliError::new(
                        EXIT_USAGE,
                        format!("event {} is not a JSON object", i + 1),
                    ));
                }
                Ok(serde_json::to_vec(&v).unwrap_or_default())
            })
            .collect();
    }
    // NDJSON: lines go as they are; the daemon judges each and `send` reports its verdicts.
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect())
}

fn daemon_url(cfg: &ConfigArgs, path: &str) -> Result<String, CliError> {
    let c = cfg.load()?;
    let addr = c.server.http_listen.ok_or_else(|| {
        CliError::new(
            EXIT_USAGE,
            "HTTP is switched off in the config; status needs it",
        )
    })?;
    Ok(format!("http://{addr}{path}"))
}

fn get_json(url: &str) -> Result<Value, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(EXIT_SOFTWARE, e.to_string()))?;
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| {
                CliError::new(
                    EXIT_UNAVAILABLE,
                    format!("cannot reach llmlogd at {url}: {e}"),
                )
            })?;
        resp.json::<Value>()
            .await
            .map_err(|e| CliError::new(EXIT_SOFTWARE, format!("unexpected reply from {url}: {e}")))
    })
}

pub fn status(json: bool, cfg: &ConfigArgs) -> Result<(), CliError> {
    let v = get_json(&daemon_url(cfg, "/v1/status")?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let now = v["now_ms"].as_u64().unwrap_or(0);
    let q = &v["queue"];
    println!(
        "llmlogd {} (pid {})  queue: {} events, {} bytes, oldest {}  dead letters: {}  disk: {} bytes",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        q["events"],
        q["bytes"],
        age(now, q["oldest_ms"].as_u64()),
        q["dead_letters"],
        q["disk_bytes"],
    );
    println!(
        "{:<16} {:<12} {:<8} {:>8} {:>10} {:>8} {:<14} {:<14} LAST ERROR",
        "SINK", "TYPE", "STATE", "BACKLOG", "DELIVERED", "DEAD", "OLDEST", "LAST OK"
    );
    for s in v["sinks"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<16} {:<12} {:<8} {:>8} {:>10} {:>8} {:<14} {:<14} {}",
            s["name"].as_str().unwrap_or(""),
            s["kind"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["backlog"].to_string(),
            s["delivered"].to_string(),
            s["dead_lettered"].to_string(),
            age(now, s["oldest_pending_ms"].as_u64()),
            age(now, s["last_success_ms"].as_u64()),
            s["last_error"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

fn age(now: u64, then: Option<u64>) -> String {
    match then {
        None => "-".into(),
        Some(t) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now.saturating_sub(t) / 1000))
        ),
    }
}

/// `llmlogd dlq …`, on the data directory (the daemon must not hold it).
pub fn dlq(action: DlqAction, cfg: &ConfigArgs) -> Result<(), CliError> {
    let c = cfg.load()?;
    let queue = open_offline(&c)?;
    let names = queue
        .sink_names()
        .map_err(|e| CliError::new(1, e.to_string()))?;
    let id_of = |name: &str| -> Result<u16, CliError> {
        names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                CliError::new(EXIT_USAGE, format!("no sink named {name:?} in this queue"))
            })
    };
    let name_of = |id: u16| -> String {
        names
            .iter()
            .find(|(_, i)| *i == id)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let fail = |e: crate::queue::QueueError| CliError::new(1, e.to_string());
    let result = match action {
        DlqAction::List { sink, limit, json } => {
            let sink_id = sink.as_deref().map(id_of).transpose()?;
            let letters = queue.dead_letters(sink_id, limit).map_err(fail)?;
            if !json {
                println!(
                    "{:<16} {:>10} {:>8} {:>6} {:<28} REASON",
                    "SINK", "SEQ", "ATTEMPTS", "STATUS", "EVENT ID"
                );
            }
            for d in &letters {
                if json {
                    let v = serde_json::json!({
                        "sink": name_of(d.sink_id), "seq": d.seq, "info": d.info,
                        "event_id": d.event.as_ref().ok().map(|e| e.id.to_string()),
                        "format": d.event.as_ref().ok().map(|e| e.kind.name()),
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{:<16} {:>10} {:>8} {:>6} {:<28} {}",
                        name_of(d.sink_id),
                        d.seq,
                        d.info.attempts,
                        d.info
                            .status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        d.event
                            .as_ref()
                            .map(|e| e.id.to_string())
                            .unwrap_or_else(|e| e.to_string()),
                        d.info.reason
                    );
                }
            }
            Ok(())
        }
        DlqAction::Show { sink, seq } => {
            let d = queue
                .dead_letter_get(id_of(&sink)?, seq)
                .map_err(fail)?
                .ok_or_else(|| CliError::new(1, format!("no dead letter {sink}/{seq}")))?;
            let event = match &d.event {
                Ok(e) => serde_json::json!({
                    "id": e.id.to_string(), "format": e.kind.name(), "received_ms": e.received_ms,
                    "payload": serde_json::from_slice::<Value>(&e.payload)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.payload).into_owned())),
                }),
                Err(err) => serde_json::json!({"unreadable": err.to_string()}),
            };
            let v = serde_json::json!({"sink": sink, "seq": d.seq, "info": d.info, "event": event});
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        DlqAction::Replay { sink, seq } => {
            if seq.is_some() && sink.is_none() {
                return Err(CliError::new(EXIT_USAGE, "--seq needs --sink"));
            }
            let sink_id = sink.as_deref().map(id_of).transpose()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::new(EXIT_SOFTWARE, e.to_string()))?;
            let n = rt.block_on(queue.replay(sink_id, seq)).map_err(fail)?;
            println!("{n} dead letters put back in the queue");
            Ok(())
        }
        DlqAction::Purge { sink, seq, all } => {
            if sink.is_none() && !all {
                return Err(CliError::new(
                    EXIT_USAGE,
                    "purge needs --sink NAME, or --all for every sink",
                ));
            }
            let sink_id = sink.as_deref().map(id_of).transpose()?;
            let targets: Vec<(u16, u64)> = match (sink_id, seq) {
                (Some(s), Some(q)) => vec![(s, q)],
                _ => queue
                    .dead_letters(sink_id, usize::MAX)
                    .map_err(fail)?
                    .iter()
                    .map(|d| (d.sink_id, d.seq))
                    .collect(),
            };
            let mut n = 0;
            for (s, q) in targets {
                if queue.dead_letter_remove(s, q).map_err(fail)? {
                    n += 1;
                }
            }
            println!("{n} dead letters purged");
            Ok(())
        }
    };
    queue.close().map_err(fail)?;
    result
}

/// `llmlogd fsck [--repair]`: exit 0 when the store is clean (or was repaired), 1 otherwise.
pub fn fsck(repair: bool, json: bool, cfg: &ConfigArgs) -> Result<(), CliError> {
    let c = cfg.load()?;
    let queue = open_offline(&c)?;
    let report = queue
        .fsck(repair)
        .map_err(|e| CliError::new(1, format!("fsck failed: {e}")))?;
    queue.close().map_err(|e| CliError::new(1, e.to_string()))?;
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "{} records; corrupt: {:?}; orphan chunks: {}; orphan cursors: {}; unreadable dead letters: {}; next_seq behind: {}",
            report.records,
            report.corrupt_records,
            report.orphan_chunks,
            report.orphan_cursors,
            report.unreadable_dead_letters,
            report.next_seq_behind
        );
    }
    if report.is_clean() || repair {
        if repair && !report.is_clean() {
            eprintln!("repaired: corrupt records are in the dead letters (llmlogd dlq list)");
        }
        Ok(())
    } else {
        Err(CliError::new(
            1,
            "problems found; run `llmlogd fsck --repair` to fix them",
        ))
    }
}

/// Opens the queue without a daemon, or says which daemon holds it.
fn open_offline(c: &Config) -> Result<crate::queue::Queue, CliError> {
    crate::queue::Queue::open(&c.queue).map_err(|e| match e {
        crate::queue::QueueError::Locked { .. } => CliError::new(
            EXIT_UNAVAILABLE,
            format!("{e}; stop it first (this command works on the data directory offline)"),
        ),
        other => CliError::new(1, other.to_string()),
    })
}
