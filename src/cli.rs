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

mod input;

/// Exit codes (sysexits.h).
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_SOFTWARE: i32 = 70;
/// No input where some was expected (`sysexits.h` `EX_NOINPUT`): no queue in the data dir.
pub const EXIT_NOINPUT: i32 = 66;
/// sysexits' EX_TEMPFAIL: every refusal said "retry later" (queue full, disk full).
pub const EXIT_TEMPFAIL: i32 = 75;
/// sysexits' EX_NOPERM: the data directory is not readable by this user.
pub const EXIT_NOPERM: i32 = 77;

/// One line from clap's rendering of a usage error (several lines: the error, what it lists,
/// a tip, the usage, a pointer to `--help`; or the whole help when a subcommand is missing):
/// the error with what it lists and its tip, then which `--help` to read (the usage's
/// command, else the subcommands named in `args`). A script's log, or the journal under
/// `ExecStartPre`, gets one line like every other error of this CLI.
pub fn usage_error_line(rendered: &str, args: &[String]) -> String {
    let mut what: Option<String> = None;
    let mut listing = false;
    let mut tips = Vec::new();
    let mut command = None;
    for line in rendered.lines() {
        let trimmed = line.trim();
        if let Some(e) = trimmed.strip_prefix("error: ") {
            if what.is_none() {
                listing = e.ends_with(':');
                what = Some(e.trim_end_matches(':').to_string());
            }
            continue;
        }
        if listing && line.starts_with(' ') && !trimmed.is_empty() {
            if let Some(w) = what.as_mut() {
                w.push_str(if w.contains(": ") { ", " } else { ": " });
                w.push_str(trimmed);
            }
            continue;
        }
        listing = false;
        if let Some(t) = trimmed.strip_prefix("tip: ") {
            tips.push(t.to_string());
        } else if let Some(u) = trimmed.strip_prefix("Usage: ") {
            command = Some(
                u.split_whitespace()
                    .take_while(|w| !w.starts_with(['[', '<', '-']))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    let command = command.unwrap_or_else(|| command_named_in(args));
    let what = what.unwrap_or_else(|| format!("`{command}` needs a command"));
    let tips: String = tips.iter().map(|t| format!("; {t}")).collect();
    format!("{what}{tips} (see `{command} --help`)")
}

/// `llmlogd` and the subcommands `args` name (`llmlogd dlq show`), options skipped.
fn command_named_in(args: &[String]) -> String {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    let mut path = vec!["llmlogd".to_string()];
    for a in args.iter().skip(1).filter(|a| !a.starts_with('-')) {
        let Some(sub) = cmd.find_subcommand(a).cloned() else {
            break;
        };
        path.push(a.clone());
        cmd = sub;
    }
    path.join(" ")
}

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
    /// Inspect and act on dead letters (the daemon must be stopped).
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
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its event (as JSON).
    Show {
        /// The sink it is for (as `dlq list` names it).
        sink: String,
        /// Its sequence number (the SEQ column of `dlq list`).
        seq: u64,
    },
    /// Put dead letters back into the queue for their sink (every one, unless narrowed).
    Replay {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// Only this one (needs --sink).
        #[arg(long)]
        seq: Option<u64>,
    },
    /// Delete dead letters.
    Purge {
        /// This sink's (every one of them, unless --seq).
        #[arg(long)]
        sink: Option<String>,
        /// Only this one (with --sink).
        #[arg(long)]
        seq: Option<u64>,
        /// Every sink's: required when --sink is not given.
        #[arg(long)]
        all: bool,
    },
}

/// A CLI failure: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
    /// Already written to the daemon's log (a fatal error of `run` under
    /// `log.format = "json"`): only the exit code is left to give.
    pub logged: bool,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
            logged: false,
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
    for n in c.notes() {
        eprintln!("note: {n}");
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
///
/// NDJSON input is read, sent and answered as it goes (see [`input`]): memory stays small
/// whatever its size. A writer thread sends while this one reads the replies, so a large
/// input never deadlocks on the socket's buffers; it hands each event's name to the reader
/// through a bounded channel, in order.
pub fn send(
    file: Option<PathBuf>,
    socket: Option<PathBuf>,
    timeout: Duration,
    cfg: &ConfigArgs,
) -> Result<(), CliError> {
    let source = match file.as_deref() {
        Some(p) if p.as_os_str() != "-" => p.display().to_string(),
        _ => "stdin".to_string(),
    };
    let reader: Box<dyn Read + Send> = match file.as_deref() {
        Some(p) if p.as_os_str() != "-" => Box::new(
            std::fs::File::open(p)
                .map_err(|e| CliError::new(EXIT_USAGE, format!("cannot read {source}: {e}")))?,
        ),
        _ => Box::new(std::io::stdin()),
    };
    // Nothing is sent before this returns: a refusal here means nothing was.
    let mut events = input::open(reader).map_err(|e| match e {
        input::InputError::Read(e) => {
            CliError::new(EXIT_USAGE, format!("cannot read {source}: {e}"))
        }
        e => CliError::new(EXIT_USAGE, format!("{source} is {e}; nothing was sent")),
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
    let (names, named) = std::sync::mpsc::sync_channel::<Sent>(NAMES_IN_FLIGHT);
    // Events taken from the input so far (sent, or refused here).
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let taken = taken.clone();
        std::thread::spawn(move || write_events(&mut events, &write_half, &names, &taken))
    };

    let mut refused = 0usize;
    // Refusals that say "retry later" (503 queue full, 507 disk full): the same input, sent
    // again, would be taken.
    let mut refused_for_now = 0usize;
    let mut answered = 0usize;
    let mut lost: Option<(String, String)> = None;
    let mut replies = BufReader::new(&stream);
    let mut line = String::new();
    // Ends when the writer is done and every event it sent is answered.
    while let Ok(ev) = named.recv() {
        let (label, sent_line) = match ev {
            Sent::Line { label, sent_line } => (label, sent_line),
            Sent::Refused { label, reason } => {
                answered += 1;
                refused += 1;
                eprintln!("{label}: refused: {reason}");
                continue;
            }
        };
        line.clear();
        let why = match replies.read_line(&mut line) {
            Ok(0) => Some("llmlogd closed the connection".to_string()),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Some(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))
            }
            Err(e) => Some(format!("lost the connection: {e}")),
        };
        if let Some(why) = why {
            lost = Some((label, why));
            break;
        }
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
            let err = strip_line_prefix(err, sent_line);
            eprintln!("{label}: refused: {err}");
        }
    }
    // Unblock the writer if the daemon stopped reading.
    let _ = stream.shutdown(std::net::Shutdown::Both);

    if let Some((from, why)) = lost {
        // The writer is not waited for: it may be waiting on the input (a pipe still open).
        let n = taken.load(std::sync::atomic::Ordering::Acquire);
        return Err(CliError::new(
            EXIT_UNAVAILABLE,
            format!(
                "{} of {n} events got no answer, from {from} on: {why}; they may not be stored{}{}",
                n - answered,
                if refused > 0 {
                    format!(", and {refused} were refused")
                } else {
                    String::new()
                },
                if writer.is_finished() {
                    ""
                } else {
                    "; the rest of the input was not read"
                }
            ),
        ));
    }
    let n = answered;
    if let Ok(Err(e)) = writer.join() {
        return Err(CliError::new(
            EXIT_USAGE,
            format!(
                "cannot read {source} after event {n}: {e}; the {n} events before it were sent{}",
                if refused > 0 {
                    format!(", and {refused} of them refused")
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

/// How many events the writer may send ahead of their replies. The daemon itself takes at
/// most 1024 unanswered events per connection; the socket's buffers hold some more.
const NAMES_IN_FLIGHT: usize = 4096;

/// An event the writer took from the input, for the reader to match with its reply.
enum Sent {
    /// Sent as line `sent_line` of the connection (the daemon names lines by that number).
    Line { label: String, sent_line: usize },
    /// Refused before sending (a line longer than any daemon takes).
    Refused { label: String, reason: String },
}

/// Sends the events, and names each to the reader, in order. Returns an input error; a
/// socket error just ends it (the reader sees the connection end).
fn write_events(
    events: &mut input::Events<Box<dyn Read + Send>>,
    socket: &UnixStream,
    names: &std::sync::mpsc::SyncSender<Sent>,
    taken: &std::sync::atomic::AtomicUsize,
) -> Result<(), input::InputError> {
    let mut w = std::io::BufWriter::with_capacity(64 << 10, socket);
    let mut sent_line = 0usize;
    let result = loop {
        // Before a read that may wait on the input (a `tail -f`), what is sent goes out.
        if events.may_wait() && w.flush().is_err() {
            break Ok(());
        }
        let item = match events.next() {
            Ok(Some(item)) => item,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let note = match item {
            // The socket reads a connection whose first byte is a capital letter as HTTP (a
            // request line), so such a first line (a text file's "Error: …", say) made the
            // daemon answer the whole input as one bad HTTP request and close: every event
            // was reported unanswered, "may not be stored", exit 69, and none was. It is not
            // a JSON object, so the daemon would refuse it anyway: refused here, not sent.
            input::Item::Send { label, line }
                if sent_line == 0 && line.first().is_some_and(u8::is_ascii_uppercase) =>
            {
                Sent::Refused {
                    label,
                    reason: "the event must be a JSON object (one per line)".into(),
                }
            }
            input::Item::Send { line, label } => {
                if w.write_all(&line)
                    .and_then(|()| w.write_all(b"\n"))
                    .is_err()
                {
                    break Ok(());
                }
                sent_line += 1;
                Sent::Line { label, sent_line }
            }
            input::Item::Refuse { label, reason } => Sent::Refused { label, reason },
        };
        taken.fetch_add(1, std::sync::atomic::Ordering::Release);
        match names.try_send(note) {
            Ok(()) => {}
            // The reader waits on replies to what is buffered here: send it before waiting.
            Err(std::sync::mpsc::TrySendError::Full(note)) => {
                if w.flush().is_err() || names.send(note).is_err() {
                    break Ok(());
                }
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => break Ok(()),
        }
    };
    let _ = w.flush();
    let _ = socket.shutdown(std::net::Shutdown::Write);
    result
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
    /// The config's socket, asked when nothing listens at its HTTP address: a daemon started
    /// with another `--http-listen` (or by socket activation) still has the socket `status`
    /// would name, and `llmlogd status` with no flags answered "cannot reach llmlogd".
    fallback: Option<PathBuf>,
}

impl DaemonApi {
    fn from_config(cfg: &ConfigArgs) -> Result<DaemonApi, CliError> {
        let c = cfg.load_without_keys()?;
        match (c.server.http_listen, c.server.unix_socket) {
            (Some(addr), socket) => Ok(DaemonApi {
                base: format!("http://{addr}"),
                socket: None,
                fallback: socket,
            }),
            (None, Some(path)) => Ok(DaemonApi {
                base: "http://localhost".into(),
                socket: Some(path),
                fallback: None,
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
        let first = self.get_json_once(path);
        match (&first, &self.fallback) {
            (Err(e), Some(socket)) if e.code == EXIT_UNAVAILABLE && is_socket(socket) => {
                let on_socket = DaemonApi {
                    base: "http://localhost".into(),
                    socket: Some(socket.clone()),
                    fallback: None,
                };
                // Nobody at the HTTP address: the daemon's socket answers for it, or the
                // error stays the one about the address the config names.
                on_socket.get_json_once(path).or(first)
            }
            _ => first,
        }
    }

    fn get_json_once(&self, path: &str) -> Result<Value, CliError> {
        let at = self.describe(path);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::new(EXIT_SOFTWARE, e.to_string()))?;
        // The daemon is on this host: an `HTTP_PROXY` in the operator's shell must not send
        // the request for 127.0.0.1 to the proxy (reqwest bypasses loopback only when
        // `NO_PROXY` says so), which answered "cannot reach llmlogd" with the daemon up.
        let mut client = reqwest::Client::builder().no_proxy();
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
                        format!("cannot reach llmlogd at {at}: {}", cause(&e)),
                    )
                })?;
            resp.json::<Value>().await.map_err(|e| {
                CliError::new(EXIT_SOFTWARE, format!("unexpected reply from {at}: {e}"))
            })
        })
    }
}

fn is_socket(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Why a request to the daemon failed, in the words of its innermost cause: reqwest's own
/// message ("error sending request for url (…)") repeats the URL and leaves out the reason
/// (connection refused, no such socket, timed out), which is what the operator needs.
fn cause(e: &reqwest::Error) -> String {
    let mut innermost: &dyn std::error::Error = e;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    if e.is_timeout() {
        return "no answer within 10s".into();
    }
    let hint = match innermost
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
    {
        Some(std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
            "; is it running? (--config names its config)"
        }
        _ => "",
    };
    format!("{innermost}{hint}")
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
        "llmlogd {} (pid {})  queue: {} events, {} bytes, oldest {}  dead letters: {} ({} bytes{})  disk: {} bytes, {} bytes free",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        q["events"],
        q["bytes"],
        age(now, q["oldest_ms"].as_u64()),
        q["dead_letters"],
        q["dead_letter_bytes"],
        match q["dead_letters_dropped"].as_u64() {
            Some(n) if n > 0 => format!(", {n} oldest dropped over the cap"),
            _ => String::new(),
        },
        q["disk_bytes"],
        q["disk_free_bytes"].as_u64().map_or("?".into(), |f| f.to_string()),
    );
    if let Some(lost) = q["lost_events"].as_u64().filter(|&n| n > 0) {
        let last = &q["last_loss"];
        println!(
            "LOST: this queue store has opened without up to {lost} acknowledged events in all (damaged files); the last time {}, seq {}..{} (see the daemon's log and `llmlogd fsck`)",
            age(now, last["at_ms"].as_u64()),
            last["found"],
            last["mark"],
        );
    }
    let sinks = v["sinks"].as_array().cloned().unwrap_or_default();
    if sinks.is_empty() {
        // A header over nothing read like a table that failed to load.
        println!("no sinks configured: events are stored, then discarded");
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:<8} {:>8} {:>10} {:>8} {:<14} {:<14} LAST ERROR",
        "SINK", "TYPE", "STATE", "BACKLOG", "DELIVERED", "DEAD", "OLDEST", "LAST OK"
    );
    for s in sinks {
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
            // With its age: after a recovery the last error stays shown beside `ok`.
            match (s["last_error"].as_str(), s["last_error_ms"].as_u64()) {
                (Some(e), Some(at)) => format!("{}: {e}", age(now, Some(at))),
                (Some(e), None) => e.to_string(),
                (None, _) => "-".into(),
            },
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
    // A sequence number is per sink: `purge --all --seq N` purged every sink's letters, the
    // --seq unheeded.
    if let DlqAction::Replay {
        sink: None,
        seq: Some(_),
    }
    | DlqAction::Purge {
        sink: None,
        seq: Some(_),
        ..
    } = action
    {
        return Err(CliError::new(
            EXIT_USAGE,
            "--seq needs --sink (sequence numbers are per sink; `dlq list` shows both)",
        ));
    }
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
            // One more than shown, to say when there are more.
            let mut letters = queue
                .dead_letters(sink_id, limit.saturating_add(1))
                .map_err(fail)?;
            let more = letters.len() > limit;
            letters.truncate(limit);
            if !json {
                println!(
                    "{:<16} {:>10} {:>8} {:>6} {:<36} REASON",
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
                        "{:<16} {:>10} {:>8} {:>6} {:<36} {}",
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
            // On stderr, so `--json` output stays one object a line.
            if more {
                let total = queue.dead_letters(sink_id, usize::MAX).map_err(fail)?.len();
                eprintln!(
                    "(the first {limit} of {total} dead letters: `--limit {total}` lists them all)"
                );
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
            if let (0, Some(q), Some(name)) = (n, seq, &sink) {
                return Err(CliError::new(1, format!("no dead letter {name}/{q}")));
            }
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
            if let (0, Some(q), Some(name)) = (n, seq, &sink) {
                return Err(CliError::new(1, format!("no dead letter {name}/{q}")));
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
    } else if let Some(l) = report.loss {
        eprintln!(
            "note: this store lost up to {} acknowledged events to damaged files before; the last time {}, seq {}..{} (found when it was opened then, and kept on record)",
            l.total,
            age(crate::event::now_ms(), Some(l.at_ms)),
            l.last.found,
            l.last.mark,
        );
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
        "lost: the store opened without up to {lost} acknowledged events (seq {found}..{mark}; its numbering stopped at {found} but had reached {mark}): those not yet delivered to every sink are gone, lost to damaged files (a disk error, or files changed by hand: check the disk). Nothing brings them back, `llmlogd fsck --repair` included (it fixes corrupt records, orphans and counters, not lost events). The store is usable as it is: numbering goes on from {mark}, so no new event reuses their numbers. The loss is kept on record in the store: the daemon reports it in `llmlogd status` and `llmlogd_queue_lost_events_total`",
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
    // Not readable (run as another user than the daemon's): say so, rather than "no queue",
    // which `exists()` answers for a directory it may not look into.
    if let Err(e) = std::fs::read_dir(dir) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Err(CliError::new(
                EXIT_NOPERM,
                format!(
                    "cannot read the data directory {}: {e} (run as the daemon's user, e.g. sudo -u llmlogd)",
                    dir.display()
                ),
            ));
        }
    }
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

    #[test]
    fn every_option_and_argument_says_what_it_is() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "llmlogd",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:?}");
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
