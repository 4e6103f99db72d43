//! The command line: `run`, `check-config`, `send`, `status`, `dlq`.
//!
//! Commands that talk to a running daemon use its Unix socket (`send`) or its HTTP API
//! (`status`: the HTTP listener, or the same routes on the socket when HTTP is off); `dlq` opens the data directory itself when no daemon holds
//! it. Errors print one line and exit non-zero: 64 for a bad config or usage, 69 when the
//! daemon cannot be reached, 75 when events were refused only for now (the queue or the disk is
//! full: retry later), 1 when some event was refused for good or an operation failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::config::{Config, KeySource, Keys, Overrides};

/// Exit codes (sysexits.h).
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_SOFTWARE: i32 = 70;
/// No input where some was expected (`sysexits.h` `EX_NOINPUT`): no queue in the data dir.
pub const EXIT_NOINPUT: i32 = 66;
/// sysexits' EX_TEMPFAIL: every refusal said "retry later" (queue full, disk full).
pub const EXIT_TEMPFAIL: i32 = 75;

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
    #[arg(short, long, env = "LLMLOGD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory (overrides queue.data_dir).
    #[arg(long, env = "LLMLOGD_DATA_DIR", global = true)]
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

    /// The config as the daemon takes it: every key read.
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load(self.config.as_deref(), &self.overrides())
    }

    /// The config as the CLI tools take it: paths and names, no keys read ([`Keys::Skip`]).
    pub fn load_without_keys(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load_keys(self.config.as_deref(), &self.overrides(), Keys::Skip)
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
    /// Submit events (a JSON object, a JSON array of objects, JSON objects one after another,
    /// or NDJSON) from a file or stdin over the socket. Silent on success; names each event
    /// refused or left unanswered and exits 1 (refused), 75 (refused only because the queue or
    /// the disk is full: retry later) or 69 (daemon unreachable, or it stopped answering).
    Send {
        /// File to read (default: stdin; "-" is stdin too).
        file: Option<PathBuf>,
        /// Socket path (default: from the config; without one, this user's own daemon's, else
        /// the system service's, /run/llmlogd/llmlogd.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Give up when the daemon sends no reply for this long.
        #[arg(long, default_value = "60s", value_parser = positive_duration)]
        timeout: Duration,
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

/// A duration greater than zero (`--timeout 0` would mean "no reply is ever late").
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

pub fn check_config(file: Option<PathBuf>, cfg: &ConfigArgs) -> Result<(), CliError> {
    let path = file.or_else(|| cfg.config.clone());
    let c = Config::load_keys(path.as_deref(), &cfg.overrides(), Keys::Check)?;
    for s in &c.sinks {
        if let (None, KeySource::Credential(name)) = (&s.key, &s.key_source) {
            eprintln!(
                "note: sinks.{}.api_key_credential: credential {name:?} not checked, CREDENTIALS_DIRECTORY is not set (systemd sets it for the service)",
                s.name
            );
        }
    }
    // What `run` would only find out when it binds (and the unit's ExecStartPre should catch).
    if let Some(g) = &c.server.socket_group {
        let name = std::ffi::CString::new(g.as_str()).unwrap_or_default();
        // SAFETY: getgrnam with a valid C string; only the pointer's nullness is read, on this
        // (the CLI's only) thread.
        if unsafe { libc::getgrnam(name.as_ptr()) }.is_null() {
            return Err(CliError::new(
                EXIT_USAGE,
                format!("server.socket_group: group {g:?} does not exist"),
            ));
        }
    }
    print!("{}", c.render());
    eprintln!(
        "config ok: {}",
        path.map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded defaults".into())
    );
    Ok(())
}

/// `llmlogd send`: the events go over the socket as NDJSON, one line each; every reply is
/// matched to its event. Refusals and unanswered events are named on stderr.
pub fn send(
    file: Option<PathBuf>,
    socket: Option<PathBuf>,
    timeout: Duration,
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
    let Outgoing {
        stream: out,
        events,
    } = split_input(&input).map_err(|e| {
        CliError::new(
            EXIT_USAGE,
            format!("{source} is not valid JSON: {e}; nothing was sent"),
        )
    })?;
    if events.is_empty() {
        return Err(CliError::new(EXIT_USAGE, format!("no event in {source}")));
    }
    let path = match socket {
        Some(p) => p,
        None => {
            let configured = cfg.load_without_keys()?.server.unix_socket.ok_or_else(|| {
                CliError::new(
                    EXIT_USAGE,
                    "the Unix socket is switched off in the config; pass --socket",
                )
            })?;
            let named = cfg.config.is_some() || cfg.unix_socket.is_some();
            default_or_system_socket(configured, named, Path::new(SYSTEM_SOCKET))
        }
    };
    let unavailable = |e: std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "; is it running? (--socket PATH for another socket)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; the socket is for its owner and group (server.socket_group)"
            }
            // From `connect`: its listen queue stayed full for `timeout`.
            std::io::ErrorKind::WouldBlock => {
                return CliError::new(
                    EXIT_UNAVAILABLE,
                    format!(
                        "llmlogd at {} took no connection within {}: it is hung, or serving server.max_connections with more waiting",
                        path.display(),
                        humantime::format_duration(timeout)
                    ),
                )
            }
            _ => "",
        };
        CliError::new(
            EXIT_UNAVAILABLE,
            format!("cannot connect to llmlogd at {}: {e}{hint}", path.display()),
        )
    };
    let stream = connect(&path, timeout).map_err(unavailable)?;
    let write_half = stream.try_clone().map_err(unavailable)?;
    // Write in a thread while reading replies, so large inputs never deadlock on buffers.
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(&write_half);
        w.write_all(&out)?;
        w.flush()?;
        write_half.shutdown(std::net::Shutdown::Write)
    });

    let n = events.len();
    let mut refused = 0usize;
    // Refusals that say "retry later" (503 queue full, 507 disk full): the same input, sent
    // again, would be taken.
    let mut refused_for_now = 0usize;
    let mut answered = 0usize;
    let mut lost: Option<String> = None;
    let mut replies = BufReader::new(&stream);
    let mut line = String::new();
    while answered < n {
        line.clear();
        match replies.read_line(&mut line) {
            Ok(0) => {
                lost = Some("llmlogd closed the connection".into());
                break;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                lost = Some(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ));
                break;
            }
            Err(e) => {
                lost = Some(format!("lost the connection: {e}"));
                break;
            }
        }
        let ev = &events[answered];
        answered += 1;
        let v: Value = serde_json::from_str(line.trim_end()).unwrap_or(Value::Null);
        if v.get("ok") != Some(&Value::Bool(true)) {
            refused += 1;
            if matches!(v.get("status").and_then(Value::as_u64), Some(503 | 507)) {
                refused_for_now += 1;
            }
            let err = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or(line.trim_end());
            // The daemon counts lines as sent; say it in the input's terms instead.
            let err = strip_line_prefix(err, ev.sent_line);
            eprintln!("{}: refused: {err}", ev.label);
        }
    }
    // Unblock the writer if the daemon stopped reading, then collect it.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();

    if let Some(why) = lost {
        return Err(CliError::new(
            EXIT_UNAVAILABLE,
            format!(
                "{} of {n} events got no answer, from {} on: {why}; they may not be stored{}",
                n - answered,
                events[answered].label,
                if refused > 0 {
                    format!(", and {refused} were refused")
                } else {
                    String::new()
                }
            ),
        ));
    }
    if refused > 0 && refused == refused_for_now {
        return Err(CliError::new(
            EXIT_TEMPFAIL,
            format!("{refused} of {n} events refused for now (the queue or the disk is full); send them again later"),
        ));
    }
    if refused > 0 {
        return Err(CliError::new(1, format!("{refused} of {n} events refused")));
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("{n} events stored");
    }
    Ok(())
}

/// Where the systemd unit's daemon listens (`RuntimeDirectory=llmlogd`, `llmlogd.socket`).
pub const SYSTEM_SOCKET: &str = "/run/llmlogd/llmlogd.sock";

/// The socket `send` uses when `--socket` does not name one. A config or `--unix-socket` that
/// names it is followed. Otherwise the default is the one a daemon run by this user would
/// bind (`$XDG_RUNTIME_DIR/llmlogd.sock`, …), and when there is none there, the system
/// service's: a script or cron job on a host with the service installed reaches it with a
/// bare `llmlogd send`, as the README shows (its config, `0640` to the service's group, may
/// not even be readable by the script's user).
fn default_or_system_socket(default: PathBuf, named: bool, system: &Path) -> PathBuf {
    if named || default.exists() || !system.exists() {
        default
    } else {
        system.to_path_buf()
    }
}

/// Connects to the daemon's socket with `timeout` on every read and write, and on the connect
/// itself: a connect to a Unix socket whose listen queue is full (a hung daemon, or one at
/// `server.max_connections` with that many more waiting) blocks until there is room, with no
/// end unless the socket has a send timeout; then it fails with `WouldBlock`. (A non-blocking
/// connect cannot be waited on here: it fails at once, and there is nothing to poll.)
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(s.into())
}

/// What `send` writes, and the events in it (each line that gets a reply).
#[derive(Debug)]
struct Outgoing {
    /// NDJSON, newline-terminated.
    stream: Vec<u8>,
    events: Vec<OutEvent>,
}

#[derive(Debug, PartialEq)]
struct OutEvent {
    /// How to name it to the user: "event 2", or "event 2 (line 3)" for NDJSON input.
    label: String,
    /// Its line number in `stream`, as the daemon counts (it names lines in its errors).
    sent_line: usize,
}

/// Splits `send` input into NDJSON. A whole JSON document (an object, or an array of them) is
/// sent one event per line, each element's bytes as written except for its line breaks; so is
/// a series of JSON values (NDJSON, or documents one after another as `jq` prints them), each
/// one event. Other input whose first line is a whole JSON value (or not JSON at all) is
/// NDJSON with bad lines: it is sent line for line, so the daemon judges each line and its
/// "line N" is the input's own line N (blank lines get no reply, as on the socket).
///
/// Input whose first line opens a document it does not finish is pretty-printed JSON: if it
/// does not parse, it is refused whole, with the parser's error. Sent line for line, its lines
/// would be refused one by one, and any that happened to be a JSON object on its own (an
/// element of a broken array, a `{}` inside a document) stored as an event.
fn split_input(input: &[u8]) -> Result<Outgoing, serde_json::Error> {
    use serde_json::value::RawValue;
    // A file saved "UTF-8 with BOM" (Windows editors, PowerShell 5's `Out-File`) starts with
    // one: it marks the file's encoding and is no part of the first event.
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let trimmed = input.trim_ascii();
    if let Ok(doc) = serde_json::from_slice::<&RawValue>(trimmed) {
        let text = doc.get();
        let items: Vec<&str> = if text.starts_with('[') {
            serde_json::from_str::<Vec<&RawValue>>(text)
                .map(|v| v.iter().map(|r| r.get()).collect())
                .unwrap_or_default()
        } else {
            vec![text]
        };
        return Ok(one_line_each(items.iter().map(|item| (*item, None))));
    }
    // A series of JSON values: NDJSON, or documents one after another.
    let mut items = Vec::new();
    let mut broken = None;
    // The input line a value starts on, counted on from the previous value's start.
    let (mut counted, mut line) = (0usize, 1usize);
    for value in serde_json::Deserializer::from_slice(input).into_iter::<&RawValue>() {
        match value {
            Ok(v) => {
                let text = v.get();
                let at = text.as_ptr() as usize - input.as_ptr() as usize;
                line += memchr::memchr_iter(b'\n', &input[counted..at]).count();
                counted = at;
                items.push((text, Some(line)));
            }
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    let Some(error) = broken else {
        return Ok(one_line_each(items));
    };
    let first_line = trimmed.split(|b| *b == b'\n').next().unwrap_or_default();
    if serde_json::from_slice::<&RawValue>(first_line.trim_ascii()).is_err_and(|e| e.is_eof()) {
        return Err(error);
    }
    let mut stream = Vec::with_capacity(input.len() + 1);
    let mut events = Vec::new();
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        stream.extend_from_slice(line);
        stream.push(b'\n');
        if !line.trim_ascii().is_empty() {
            events.push(OutEvent {
                label: format!("event {} (line {})", events.len() + 1, i + 1),
                sent_line: i + 1,
            });
        }
    }
    Ok(Outgoing { stream, events })
}

/// Each JSON value (with the input line it starts on, if worth naming) as one line of its own.
fn one_line_each<'a>(items: impl IntoIterator<Item = (&'a str, Option<usize>)>) -> Outgoing {
    let mut stream = Vec::new();
    let mut events = Vec::new();
    for (i, (item, line)) in items.into_iter().enumerate() {
        // Line breaks in valid JSON are only ever whitespace between tokens.
        stream.extend(item.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
        stream.push(b'\n');
        events.push(OutEvent {
            label: match line {
                Some(l) => format!("event {} (line {l})", i + 1),
                None => format!("event {}", i + 1),
            },
            sent_line: i + 1,
        });
    }
    Outgoing { stream, events }
}

/// "line 3: the event is …" → "the event is …"; "line 3 exceeds …" → "exceeds …".
fn strip_line_prefix(err: &str, line: usize) -> &str {
    let tag = format!("line {line}");
    match err.strip_prefix(&tag) {
        Some(rest) if rest.starts_with(": ") => &rest[2..],
        Some(rest) if rest.starts_with(' ') => &rest[1..],
        _ => err,
    }
}

/// Where the running daemon's HTTP API is: its HTTP listener, else (HTTP switched off) the
/// same routes on its Unix socket.
struct DaemonApi {
    base: String,
    socket: Option<PathBuf>,
}

impl DaemonApi {
    fn from_config(cfg: &ConfigArgs) -> Result<DaemonApi, CliError> {
        let c = cfg.load_without_keys()?;
        match (c.server.http_listen, c.server.unix_socket) {
            (Some(addr), _) => Ok(DaemonApi {
                base: format!("http://{addr}"),
                socket: None,
            }),
            (None, Some(path)) => Ok(DaemonApi {
                base: "http://localhost".into(),
                socket: Some(path),
            }),
            (None, None) => Err(CliError::new(
                EXIT_USAGE,
                "HTTP and the Unix socket are both switched off in the config; status needs one",
            )),
        }
    }

    /// How an error names the daemon: its URL, or the socket and the path on it.
    fn describe(&self, path: &str) -> String {
        match &self.socket {
            None => format!("{}{path}", self.base),
            Some(socket) => format!("{} ({path})", socket.display()),
        }
    }

    fn get_json(&self, path: &str) -> Result<Value, CliError> {
        let at = self.describe(path);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::new(EXIT_SOFTWARE, e.to_string()))?;
        let mut client = reqwest::Client::builder();
        if let Some(socket) = &self.socket {
            client = client.unix_socket(socket.as_path());
        }
        let client = client
            .build()
            .map_err(|e| CliError::new(EXIT_SOFTWARE, e.to_string()))?;
        rt.block_on(async {
            let resp = client
                .get(format!("{}{path}", self.base))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| {
                    CliError::new(
                        EXIT_UNAVAILABLE,
                        format!("cannot reach llmlogd at {at}: {e}"),
                    )
                })?;
            resp.json::<Value>().await.map_err(|e| {
                CliError::new(EXIT_SOFTWARE, format!("unexpected reply from {at}: {e}"))
            })
        })
    }
}

pub fn status(json: bool, cfg: &ConfigArgs) -> Result<(), CliError> {
    let v = DaemonApi::from_config(cfg)?.get_json("/v1/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let now = v["now_ms"].as_u64().unwrap_or(0);
    let q = &v["queue"];
    println!(
        "llmlogd {} (pid {})  queue: {} events, {} bytes, oldest {}  dead letters: {}  disk: {} bytes, {} bytes free",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        q["events"],
        q["bytes"],
        age(now, q["oldest_ms"].as_u64()),
        q["dead_letters"],
        q["disk_bytes"],
        q["disk_free_bytes"].as_u64().map_or("?".into(), |f| f.to_string()),
    );
    if let Some(lost) = q["lost_events"].as_u64().filter(|&n| n > 0) {
        println!(
            "LOST: the queue store opened without up to {lost} acknowledged events (damaged files; see the daemon's log)"
        );
    }
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
    let c = cfg.load_without_keys()?;
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
                Ok(e) => {
                    let mut payload =
                        serde_json::from_slice::<Value>(&e.payload).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&e.payload).into_owned())
                        });
                    // PromptLayer follow-ups carry the app's key in the body: never shown.
                    if let Some(k) = payload.get_mut("api_key").filter(|k| k.is_string()) {
                        *k = Value::String("***".into());
                    }
                    serde_json::json!({
                        "id": e.id.to_string(), "format": e.kind.name(),
                        "received_ms": e.received_ms, "payload": payload,
                    })
                }
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
            // A sink the config no longer has would never take them: the next start would
            // drop them as records no sink needs.
            let mut of_sinks: Vec<String> = match &sink {
                Some(n) => vec![n.clone()],
                None => queue
                    .dead_letters(None, usize::MAX)
                    .map_err(fail)?
                    .iter()
                    .map(|d| name_of(d.sink_id))
                    .collect(),
            };
            of_sinks.sort();
            of_sinks.dedup();
            if let Some(gone) = of_sinks
                .iter()
                .find(|n| !c.sinks.iter().any(|s| &s.name == *n))
            {
                return Err(CliError::new(
                    EXIT_USAGE,
                    format!(
                        "sink {gone:?} is not in the config, so replayed events would be dropped at the next start; add the sink back (or name the config with --config), or `dlq purge --sink {gone}`"
                    ),
                ));
            }
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

/// `llmlogd fsck [--repair]`: exit 0 when the store is clean, or with `--repair` once what
/// can be repaired was (lost events are reported, and cannot be); 1 otherwise.
pub fn fsck(repair: bool, json: bool, cfg: &ConfigArgs) -> Result<(), CliError> {
    let c = cfg.load_without_keys()?;
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
    if let Some(b) = report.behind_mark {
        eprintln!("{}", lost_events_message(b));
    }
    let repairable = report.has_repairable();
    if repair {
        if repairable {
            eprintln!("repaired: corrupt records are in the dead letters (llmlogd dlq list)");
        }
        Ok(())
    } else if repairable {
        let lost = if report.behind_mark.is_some() {
            " (it cannot bring back the lost events)"
        } else {
            ""
        };
        Err(CliError::new(
            1,
            format!("problems found; run `llmlogd fsck --repair` to fix them{lost}"),
        ))
    } else if report.behind_mark.is_some() {
        Err(CliError::new(
            1,
            "acknowledged events were lost; there is nothing for `llmlogd fsck --repair` to do",
        ))
    } else {
        Ok(())
    }
}

/// What `fsck` says about a store that opened short of its high-water mark: what was lost,
/// and that no repair brings it back (a `--repair` hint alone would promise that it does).
fn lost_events_message(b: crate::queue::BehindMark) -> String {
    format!(
        "lost: the store opened without up to {lost} acknowledged events (seq {found}..{mark}; its numbering stopped at {found} but had reached {mark}): those not yet delivered to every sink are gone, lost to damaged files (a disk error, or files changed by hand: check the disk). Nothing brings them back, `llmlogd fsck --repair` included (it fixes corrupt records, orphans and counters, not lost events). The store is usable as it is: numbering goes on from {mark}, so no new event reuses their numbers; this is reported only once",
        lost = b.lost(),
        found = b.found,
        mark = b.mark,
    )
}

/// Opens the queue without a daemon, or says which daemon holds it. A directory that holds
/// no queue is an error (a wrong `--data-dir`, or a config not given): opening would create an
/// empty store there and report nothing.
fn open_offline(c: &Config) -> Result<crate::queue::Queue, CliError> {
    let dir = &c.queue.data_dir;
    // The store's directories (`queue::store`): live, or mid-compaction.
    if !["queue", "queue.compact", "queue.old"]
        .iter()
        .any(|d| dir.join(d).exists())
    {
        return Err(CliError::new(
            EXIT_NOINPUT,
            format!(
                "no llmlogd queue in {} (give the daemon's config with --config, or its --data-dir)",
                dir.display()
            ),
        ));
    }
    crate::queue::Queue::open(&c.queue).map_err(|e| match e {
        crate::queue::QueueError::Locked { .. } => CliError::new(
            EXIT_UNAVAILABLE,
            format!("{e}; stop it first (this command works on the data directory offline)"),
        ),
        other => CliError::new(1, other.to_string()),
    })
}

#[cfg(test)]
mod send_tests {
    use super::*;

    fn labels(o: &Outgoing) -> Vec<(&str, usize)> {
        o.events
            .iter()
            .map(|e| (e.label.as_str(), e.sent_line))
            .collect()
    }

    #[test]
    fn ndjson_goes_line_for_line_keeping_blank_lines_for_the_numbering() {
        let o = split_input(b"{\"a\":1}\n\n  \r\n{\"b\"\r\n{\"c\":3}").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n\n  \r\n{\"b\"\r\n{\"c\":3}\n");
        assert_eq!(
            labels(&o),
            [
                ("event 1 (line 1)", 1),
                ("event 2 (line 4)", 4),
                ("event 3 (line 5)", 5)
            ]
        );
    }

    #[test]
    fn a_document_keeps_its_bytes_but_its_line_breaks() {
        let o = split_input(b"\n[\n {\"a\": 1.50},\n {\"b\":\n  \"\\u00e9\"}, 7\n]\n").unwrap();
        assert_eq!(o.stream, b"{\"a\": 1.50}\n{\"b\":  \"\\u00e9\"}\n7\n");
        assert_eq!(labels(&o), [("event 1", 1), ("event 2", 2), ("event 3", 3)]);
        let o = split_input(b"{\n  \"one\": true\n}\n").unwrap();
        assert_eq!(o.stream, b"{  \"one\": true}\n");
        assert_eq!(labels(&o), [("event 1", 1)]);
        assert!(split_input(b"[]").unwrap().events.is_empty());
        assert!(split_input(b" \n\n").unwrap().events.is_empty());
    }

    #[test]
    fn documents_one_after_another_are_one_event_each_named_by_their_line() {
        // What `jq . a.json b.json` prints.
        let o =
            split_input(b"{\n  \"a\": 1,\n  \"t\": [\n    {}\n  ]\n}\n\n{\r\n  \"b\": 2\r\n}\n")
                .unwrap();
        assert_eq!(
            o.stream,
            b"{  \"a\": 1,  \"t\": [    {}  ]}\n{  \"b\": 2}\n"
        );
        assert_eq!(
            labels(&o),
            [("event 1 (line 1)", 1), ("event 2 (line 8)", 2)]
        );
        // NDJSON that parses goes the same way, and names the same lines.
        let o = split_input(b"{\"a\":1}\n\n{\"b\":2}\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(
            labels(&o),
            [("event 1 (line 1)", 1), ("event 2 (line 3)", 2)]
        );
    }

    #[test]
    fn a_broken_pretty_printed_document_is_refused_whole_not_sent_line_by_line() {
        // A missing comma: line by line, its two elements would be stored.
        let e = split_input(b"[\n  {\"a\": 1}\n  {\"b\": 2}\n]\n").unwrap_err();
        assert_eq!((e.line(), e.column()), (3, 3), "{e}");
        // A `{}` inside a broken document would have been stored as an event.
        let e = split_input(b"{\n  \"t\": [\n    {}\n  ],\n}\n").unwrap_err();
        assert_eq!(e.line(), 5, "{e}");
        // NDJSON whose first line is whole is still judged line by line.
        let o = split_input(b"{\"a\":1}\n{\n{}\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\n{}\n");
        assert_eq!(o.events.len(), 3);
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_not_part_of_the_first_event() {
        let o = split_input(b"\xEF\xBB\xBF[{\"a\":1},{\"b\":2}]").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\"b\":2}\n");
        let o = split_input(b"\xEF\xBB\xBF{\"a\":1}\r\n{\"b\":2}\r\n{\"c\"\r\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\r\n{\"b\":2}\r\n{\"c\"\r\n");
        assert_eq!(
            labels(&o),
            [
                ("event 1 (line 1)", 1),
                ("event 2 (line 2)", 2),
                ("event 3 (line 3)", 3)
            ]
        );
    }

    #[test]
    fn without_a_named_socket_send_falls_back_to_the_system_services() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own.sock");
        let system = dir.path().join("system.sock");
        let pick = |named| default_or_system_socket(own.clone(), named, &system);
        assert_eq!(
            pick(false),
            own,
            "no system socket either: name the default"
        );
        std::fs::write(&system, "").unwrap();
        assert_eq!(
            pick(false),
            system,
            "the service's, when this user runs none"
        );
        assert_eq!(
            pick(true),
            own,
            "a config or --unix-socket that names one is followed"
        );
        std::fs::write(&own, "").unwrap();
        assert_eq!(pick(false), own, "this user's own daemon first");
    }

    #[test]
    fn the_daemons_line_numbers_give_way_to_ours() {
        assert_eq!(strip_line_prefix("line 3: bad", 3), "bad");
        assert_eq!(
            strip_line_prefix("line 3 exceeds 9 bytes", 3),
            "exceeds 9 bytes"
        );
        assert_eq!(strip_line_prefix("line 31: bad", 3), "line 31: bad");
        assert_eq!(strip_line_prefix("queue is full", 3), "queue is full");
    }
}
