//! Configuration: TOML → [`raw::RawConfig`] (serde, unknown keys refused) → [`Config`]
//! (defaults filled, every value checked once, named by its key when refused).
//!
//! Everything is parsed from `&str`, so unit tests need no disk; only key files are read here.
//! `llmlogd check-config` runs exactly this code, and so does `SIGHUP` reload.

mod raw;
mod secret;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use secret::{KeySource, Secret};

use crate::formats::Format;

/// Default loopback HTTP address when neither the config nor `--http-listen` names one.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8411";

/// A refused configuration. `key` is the dotted TOML path (`sinks.pl.timeout`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Syntax(String),
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

/// The longest path a Unix socket can be bound at: `sun_path` holds 108 bytes on Linux,
/// the path's terminating NUL included.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// A name `server.allowed_hosts` may hold: a DNS name (letters, digits, `-`, `.`, `_`), no
/// port, scheme or path, at most 253 bytes. A mistake like `http://x:8411` would otherwise
/// never match any Host and go unnoticed until a client is refused.
fn host_name_ok(name: &str) -> bool {
    let n = name.trim_end_matches('.');
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A socket path the kernel cannot bind is a bad value like any other: refused with the key's
/// name (exit 64, by `check-config` too) before anything is created. Before, `check-config`
/// passed it and `run` created the socket's directory, then failed with exit 1 and the
/// standard library's "path must be shorter than SUN_LEN".
fn check_socket_path(path: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(invalid(
            "server.unix_socket",
            format!(
                "`{}` is {len} bytes long; a Unix socket path can be at most {MAX_SOCKET_PATH_BYTES} bytes (choose a shorter one)",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub unix_socket: Option<String>,
}

/// How loading a config treats the sinks' API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Read every key; one that cannot be read is an error (the daemon: start and reload).
    Read,
    /// As `Read`, except that a systemd credential is left unread where there is none
    /// (`CREDENTIALS_DIRECTORY` unset): `check-config` run by hand, or as `ExecStartPre=` under
    /// a systemd older than 252, which gives credentials to `ExecStart=` only.
    Check,
    /// Read none: the CLI tools that need only paths and sink names (`status`, `send`, `dlq`,
    /// `fsck`). A key file only the service's user may read, or a variable only its unit sets,
    /// must not stop them.
    Skip,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub queue: QueueConfig,
    pub log: LogConfig,
    pub delivery: DeliveryConfig,
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `None` when HTTP is switched off (`http_listen = ""`).
    pub http_listen: Option<SocketAddr>,
    /// `server.allow_non_loopback`: kept so that `check-config` prints it, and what it prints
    /// for a non-loopback `http_listen` is a config that loads.
    pub allow_non_loopback: bool,
    /// `server.allowed_hosts`: names a request on a loopback address may give as its Host,
    /// besides IP addresses, `localhost` and the machine's hostname (`ingest::browser`).
    pub allowed_hosts: Vec<String>,
    /// `None` when the Unix socket is switched off (`unix_socket = ""`).
    pub unix_socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub max_body_bytes: usize,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What ingest does when the queue has reached `max_bytes` or `max_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse new events (HTTP 503 + Retry-After); nothing stored is touched.
    Reject,
    /// Make room by dead-lettering nothing and deleting the oldest events (counted, logged).
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub data_dir: PathBuf,
    pub max_bytes: u64,
    pub max_events: Option<u64>,
    pub when_full: WhenFull,
    pub cache_bytes: u64,
    pub compression: Compression,
    /// When the store's files exceed this (and four times what it holds) after a backlog
    /// drained, the live records are moved to a fresh store to give the disk space back.
    pub compact_above: u64,
    /// Cap on what the dead letters take (their records and metadata); over it, the oldest
    /// dead letters are dropped to make room for the newest.
    pub dead_letter_max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How long a graceful stop lets in-flight deliveries finish.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpEncoding {
    /// One JSON array of the events, each byte-identical to what the app sent.
    JsonArray,
    /// One event per line.
    Ndjson,
}

/// Which remote service a sink speaks.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    Http {
        url: String,
        encoding: HttpEncoding,
        gzip: bool,
        headers: BTreeMap<String, String>,
    },
    Pezzo {
        /// Base URL, e.g. `https://api.pezzo.ai`; the sink appends `/api/reporting/v2/request`.
        url: String,
        project_id: Option<String>,
    },
    PromptLayer {
        /// Base URL, e.g. `https://api.promptlayer.com`; the sink appends `/log-request`.
        url: String,
    },
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::Http { .. } => "http",
            SinkKind::Pezzo { .. } => "pezzo",
            SinkKind::PromptLayer { .. } => "promptlayer",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
    pub max_age: Duration,
    pub max_retry_after: Duration,
    pub poison_after: u32,
    pub circuit_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    pub per_second: f64,
    pub burst: u32,
}

/// Which events a sink takes. Empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    pub formats: Vec<Format>,
    pub environments: Vec<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    pub key: Option<Secret>,
    pub key_source: KeySource,
    pub batch: BatchConfig,
    pub concurrency: usize,
    pub timeout: Duration,
    pub rate: Option<RateConfig>,
    pub retry: RetryConfig,
    pub route: Route,
}

impl Config {
    /// Reads and validates a config file; `None` means the embedded defaults.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::load_keys(path, overrides, Keys::Read)
    }

    /// [`Config::load`], with the sinks' keys read as `keys` says.
    pub fn load_keys(
        path: Option<&Path>,
        overrides: &Overrides,
        keys: Keys,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Config::parse_keys(&text, overrides, keys)
    }

    /// Parses TOML text, reading every key.
    pub fn parse(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::parse_keys(text, overrides, Keys::Read)
    }

    /// Parses TOML text; the single entry point of all validation.
    pub fn parse_keys(
        text: &str,
        overrides: &Overrides,
        keys: Keys,
    ) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(syntax_error(text, &e)))?;
        Config::from_raw(raw, overrides, keys)
    }

    fn from_raw(raw: raw::RawConfig, ov: &Overrides, keys: Keys) -> Result<Config, ConfigError> {
        let s = raw.server;
        let allow_non_loopback = s.allow_non_loopback.unwrap_or(false);
        let listen_text = ov
            .http_listen
            .clone()
            .or(s.http_listen)
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_string());
        let http_listen = if listen_text.is_empty() {
            None
        } else {
            let addr: SocketAddr = listen_text.parse().map_err(|_| {
                invalid(
                    "server.http_listen",
                    format!("`{listen_text}` is not an address like 127.0.0.1:8411"),
                )
            })?;
            if !addr.ip().is_loopback() && !allow_non_loopback {
                return Err(invalid(
                    "server.http_listen",
                    format!(
                        "{addr} is not a loopback address; set server.allow_non_loopback = true to expose it"
                    ),
                ));
            }
            Some(addr)
        };
        let socket_text = ov.unix_socket.clone().or(s.unix_socket);
        let unix_socket = match socket_text {
            Some(t) if t.is_empty() => None,
            Some(t) => Some(PathBuf::from(t)),
            None => Some(default_socket_path()),
        };
        if let Some(path) = &unix_socket {
            check_socket_path(path)?;
        }
        let socket_mode = match s.socket_mode {
            None => 0o660,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|v| *v <= 0o777)
                .ok_or_else(|| {
                    invalid(
                        "server.socket_mode",
                        format!("`{m}` is not an octal mode like \"0660\""),
                    )
                })?,
        };
        let allowed_hosts = s.allowed_hosts.unwrap_or_default();
        for (i, name) in allowed_hosts.iter().enumerate() {
            if !host_name_ok(name) {
                return Err(invalid(
                    format!("server.allowed_hosts[{i}]"),
                    format!(
                        "`{name}` is not a host name like \"llm.internal\" (letters, digits, '-' and '.', no port or scheme)"
                    ),
                ));
            }
        }
        let server = ServerConfig {
            http_listen,
            allow_non_loopback,
            allowed_hosts,
            unix_socket,
            socket_mode,
            socket_group: s.socket_group.filter(|g| !g.is_empty()),
            max_body_bytes: bytes_in(
                "server.max_body_bytes",
                s.max_body_bytes,
                DEFAULT_MAX_EVENT_BYTES,
                1024,
                MAX_RECORD_PAYLOAD,
            )? as usize,
            max_line_bytes: bytes_in(
                "server.max_line_bytes",
                s.max_line_bytes,
                DEFAULT_MAX_EVENT_BYTES,
                1024,
                MAX_RECORD_PAYLOAD,
            )? as usize,
            max_connections: int_in(
                "server.max_connections",
                s.max_connections,
                1024,
                1,
                1 << 20,
            )? as usize,
            header_timeout: duration(
                "server.header_timeout",
                s.header_timeout,
                "10s",
                "100ms",
                "1h",
            )?,
            body_timeout: duration("server.body_timeout", s.body_timeout, "30s", "100ms", "1h")?,
            idle_timeout: duration("server.idle_timeout", s.idle_timeout, "120s", "100ms", "7d")?,
        };

        let q = raw.queue;
        let data_dir = ov
            .data_dir
            .clone()
            .or(q.data_dir.map(PathBuf::from))
            .unwrap_or_else(default_data_dir);
        let data_dir = local_path("queue.data_dir", data_dir)?;
        let queue = QueueConfig {
            data_dir,
            max_bytes: bytes_in("queue.max_bytes", q.max_bytes, 1 << 30, 1 << 20, u64::MAX)?,
            max_events: match q.max_events {
                None | Some(0) => None,
                Some(n) => Some(n),
            },
            when_full: match q.when_full.as_deref() {
                None | Some("reject") => WhenFull::Reject,
                Some("drop_oldest") => WhenFull::DropOldest,
                Some(o) => {
                    return Err(invalid(
                        "queue.when_full",
                        format!("`{o}` is not one of reject, drop_oldest"),
                    ))
                }
            },
            cache_bytes: bytes_in(
                "queue.cache_bytes",
                q.cache_bytes,
                DEFAULT_CACHE_BYTES,
                1 << 20,
                u64::MAX,
            )?,
            compact_above: bytes_in(
                "queue.compact_above",
                q.compact_above,
                64 << 20,
                1 << 20,
                u64::MAX,
            )?,
            dead_letter_max_bytes: bytes_in(
                "queue.dead_letter_max_bytes",
                q.dead_letter_max_bytes,
                DEFAULT_DEAD_LETTER_MAX_BYTES,
                1 << 20,
                u64::MAX,
            )?,
            compression: match q.compression.as_deref() {
                None | Some("zstd") => Compression::Zstd,
                Some("none") => Compression::None,
                Some(o) => {
                    return Err(invalid(
                        "queue.compression",
                        format!("`{o}` is not one of zstd, none"),
                    ))
                }
            },
        };

        let log = LogConfig {
            level: raw.log.level.unwrap_or_else(|| "info".into()),
            format: match raw.log.format.as_deref() {
                None | Some("human") => LogFormat::Human,
                Some("json") => LogFormat::Json,
                Some(o) => {
                    return Err(invalid(
                        "log.format",
                        format!("`{o}` is not one of human, json"),
                    ))
                }
            },
        };
        if let Some(problem) = log_filter_problem(&log.level) {
            return Err(invalid("log.level", problem));
        }
        let delivery = DeliveryConfig {
            drain_timeout: duration(
                "delivery.drain_timeout",
                raw.delivery.drain_timeout,
                "10s",
                "0s",
                "1h",
            )?,
        };

        let mut sinks = Vec::new();
        for (name, rs) in raw.sinks {
            sinks.push(sink_from_raw(&name, rs, keys)?);
        }
        Ok(Config {
            server,
            queue,
            log,
            delivery,
            sinks,
        })
    }

    /// What a valid configuration does that its author may not expect, one line each:
    /// logged as warnings by `run` (at start and at each reload) and printed as notes by
    /// `check-config`.
    ///
    /// A Pezzo sink with its own key and no `project_id` sends only Pezzo reports that carry
    /// the app's `x-pezzo-project-id`: the canonical native events and PromptLayer logs its
    /// route takes are routed elsewhere or, with no other sink for them, acknowledged and
    /// discarded, because a report without a project cannot be sent. A key is what makes a
    /// sink take converted events, so such a sink looks as if it would.
    pub fn notes(&self) -> Vec<String> {
        self.sinks
            .iter()
            .filter_map(|s| match &s.kind {
                SinkKind::Pezzo { project_id: None, .. } if !matches!(s.key_source, KeySource::None) => Some(format!(
                    "sinks.{}: a pezzo sink with its own api_key but no project_id sends only Pezzo reports that carry x-pezzo-project-id; native events and PromptLayer logs are not sent to it: set project_id",
                    s.name
                )),
                _ => None,
            })
            .collect()
    }

    /// The effective configuration as TOML-like text, secrets masked (`check-config`).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let s = &self.server;
        let _ = writeln!(o, "[server]");
        let _ = writeln!(
            o,
            "http_listen = {:?}",
            s.http_listen.map(|a| a.to_string()).unwrap_or_default()
        );
        let _ = writeln!(o, "allow_non_loopback = {}", s.allow_non_loopback);
        let _ = writeln!(
            o,
            "allowed_hosts = [{}]",
            s.allowed_hosts
                .iter()
                .map(|h| format!("{h:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            o,
            "unix_socket = {:?}",
            s.unix_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        let _ = writeln!(o, "socket_mode = \"{:04o}\"", s.socket_mode);
        if let Some(g) = &s.socket_group {
            let _ = writeln!(o, "socket_group = {g:?}");
        }
        let _ = writeln!(o, "max_body_bytes = {}", s.max_body_bytes);
        let _ = writeln!(o, "max_line_bytes = {}", s.max_line_bytes);
        let _ = writeln!(o, "max_connections = {}", s.max_connections);
        let _ = writeln!(o, "header_timeout = {:?}", fmt_dur(s.header_timeout));
        let _ = writeln!(o, "body_timeout = {:?}", fmt_dur(s.body_timeout));
        let _ = writeln!(o, "idle_timeout = {:?}", fmt_dur(s.idle_timeout));
        let q = &self.queue;
        let _ = writeln!(o, "\n[queue]");
        let _ = writeln!(o, "data_dir = {:?}", q.data_dir.display().to_string());
        let _ = writeln!(o, "max_bytes = {}", q.max_bytes);
        let _ = writeln!(o, "max_events = {}", q.max_events.unwrap_or(0));
        let _ = writeln!(
            o,
            "when_full = {:?}",
            match q.when_full {
                WhenFull::Reject => "reject",
                WhenFull::DropOldest => "drop_oldest",
            }
        );
        let _ = writeln!(o, "cache_bytes = {}", q.cache_bytes);
        let _ = writeln!(o, "compact_above = {}", q.compact_above);
        let _ = writeln!(o, "dead_letter_max_bytes = {}", q.dead_letter_max_bytes);
        let _ = writeln!(
            o,
            "compression = {:?}",
            match q.compression {
                Compression::Zstd => "zstd",
                Compression::None => "none",
            }
        );
        let _ = writeln!(o, "\n[log]\nlevel = {:?}", self.log.level);
        let _ = writeln!(
            o,
            "format = {:?}",
            match self.log.format {
                LogFormat::Human => "human",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(
            o,
            "\n[delivery]\ndrain_timeout = {:?}",
            fmt_dur(self.delivery.drain_timeout)
        );
        for sink in &self.sinks {
            let _ = writeln!(o, "\n[sinks.{}]", sink.name);
            let _ = writeln!(o, "type = {:?}", sink.kind.type_name());
            match &sink.kind {
                SinkKind::Http {
                    url,
                    encoding,
                    gzip,
                    headers,
                } => {
                    let _ = writeln!(o, "url = {:?}", redact_url(url));
                    let _ = writeln!(
                        o,
                        "encoding = {:?}",
                        match encoding {
                            HttpEncoding::JsonArray => "json",
                            HttpEncoding::Ndjson => "ndjson",
                        }
                    );
                    let _ = writeln!(o, "gzip = {gzip}");
                    for name in headers.keys() {
                        // Header values may hold credentials: names only.
                        let _ = writeln!(o, "headers.{name:?} = \"***\"");
                    }
                }
                SinkKind::Pezzo { url, project_id } => {
                    let _ = writeln!(o, "url = {:?}", redact_url(url));
                    if let Some(p) = project_id {
                        let _ = writeln!(o, "project_id = {p:?}");
                    }
                }
                SinkKind::PromptLayer { url } => {
                    let _ = writeln!(o, "url = {:?}", redact_url(url));
                }
            }
            // An http sink takes no key (its credentials are headers).
            if !matches!(sink.kind, SinkKind::Http { .. }) {
                let _ = writeln!(
                    o,
                    "api_key = {:?}  # from {}",
                    if sink.key.is_some() { "***" } else { "" },
                    sink.key_source
                );
            }
            let _ = writeln!(o, "batch_max_events = {}", sink.batch.max_events);
            let _ = writeln!(o, "batch_max_bytes = {}", sink.batch.max_bytes);
            let _ = writeln!(o, "batch_max_wait = {:?}", fmt_dur(sink.batch.max_wait));
            let _ = writeln!(o, "concurrency = {}", sink.concurrency);
            let _ = writeln!(o, "timeout = {:?}", fmt_dur(sink.timeout));
            if let Some(r) = &sink.rate {
                let _ = writeln!(o, "rate_limit = {}", r.per_second);
                let _ = writeln!(o, "rate_burst = {}", r.burst);
            }
            let r = &sink.retry;
            let _ = writeln!(o, "retry_initial = {:?}", fmt_dur(r.initial));
            let _ = writeln!(o, "retry_max = {:?}", fmt_dur(r.max));
            let _ = writeln!(o, "max_age = {:?}", fmt_dur(r.max_age));
            let _ = writeln!(o, "max_retry_after = {:?}", fmt_dur(r.max_retry_after));
            let _ = writeln!(o, "poison_after = {}", r.poison_after);
            let _ = writeln!(o, "circuit_after = {}", r.circuit_after);
            let rt = &sink.route;
            let _ = writeln!(
                o,
                "route.formats = {:?}",
                rt.formats.iter().map(|f| f.name()).collect::<Vec<_>>()
            );
            let _ = writeln!(o, "route.environments = {:?}", rt.environments);
            let _ = writeln!(o, "route.tags = {:?}", rt.tags);
        }
        o
    }
}

/// The largest request body or line the config may allow (and so the largest event payload).
pub const MAX_RECORD_PAYLOAD: u64 = 64 << 20;
/// Default `server.max_body_bytes` and `server.max_line_bytes`: 16 MiB. An app that logs a
/// vision request (base64 images in the messages) sends 2-10 MB as a matter of course, and
/// the OpenTelemetry Collector's HTTP receiver takes 20 MiB by default; at 1 MiB such an app
/// got 413 on a default install. Memory stays bounded whatever this is: bodies and long lines
/// hold the shared body budget (64 MiB at this default) until they are answered.
pub const DEFAULT_MAX_EVENT_BYTES: u64 = 16 << 20;
/// sled's page cache. 8 MiB: a larger cache bought no throughput anywhere in the bench
/// (ingest, drain, startup: 64, 16 and 8 MiB measured alike), and with the sinks down it is
/// what a growing backlog keeps resident. Peak RSS filling a 1 M backlog: 107 MiB at 64 MiB
/// (F37), and since sled's cache obeys its capacity (vendored sled, F41) 62 MiB at 16 and
/// 55-58 MiB at 8 (BENCHMARKS.md).
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;

/// Default `queue.dead_letter_max_bytes`: a sink that refuses every event (a schema change at
/// the remote end) fills the dead letters as fast as the apps log; this keeps a few hundred
/// thousand of the newest for an operator to look at and replay, and the disk for the queue.
pub const DEFAULT_DEAD_LETTER_MAX_BYTES: u64 = 256 << 20;

fn sink_from_raw(name: &str, rs: raw::RawSink, keys: Keys) -> Result<SinkConfig, ConfigError> {
    let k = |field: &str| format!("sinks.{name}.{field}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            format!("sinks.{name}"),
            "a sink name may hold only letters, digits, '_' and '-'",
        ));
    }
    let kind_name = rs
        .kind
        .clone()
        .ok_or_else(|| invalid(k("type"), "missing; one of http, pezzo, promptlayer"))?;
    let url_of = |default: Option<&str>| -> Result<String, ConfigError> {
        let u = match (&rs.url, default) {
            (Some(u), _) => u.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => return Err(invalid(k("url"), "missing")),
        };
        let parsed = reqwest::Url::parse(&u)
            .map_err(|e| invalid(k("url"), format!("`{}` is not a URL: {e}", redact_url(&u))))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(
                k("url"),
                format!("`{}` is not an http(s) URL", redact_url(&u)),
            ));
        }
        Ok(u.trim_end_matches('/').to_string())
    };
    let (kind, default_batch, default_conc) = match kind_name.as_str() {
        "http" => {
            let headers = rs.headers.clone().unwrap_or_default();
            for (h, v) in &headers {
                if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(v).is_err()
                {
                    return Err(invalid(
                        k(&format!("headers.{h}")),
                        "not a valid HTTP header name and value",
                    ));
                }
            }
            (
                SinkKind::Http {
                    url: url_of(None)?,
                    encoding: match rs.encoding.as_deref() {
                        None | Some("json") => HttpEncoding::JsonArray,
                        Some("ndjson") => HttpEncoding::Ndjson,
                        Some(o) => {
                            return Err(invalid(
                                k("encoding"),
                                format!("`{o}` is not one of json, ndjson"),
                            ))
                        }
                    },
                    gzip: rs.gzip.unwrap_or(false),
                    headers,
                },
                // The batch's `X-Llmlogd-Event-Ids` header takes 33 bytes an event: 200 keep it
                // under the 8 KiB header limit of nginx and Apache (500 went over Node's 16).
                200,
                2,
            )
        }
        "pezzo" => (
            SinkKind::Pezzo {
                url: url_of(Some("https://api.pezzo.ai"))?,
                project_id: rs.project_id.clone(),
            },
            64,
            16,
        ),
        "promptlayer" => (
            SinkKind::PromptLayer {
                url: url_of(Some("https://api.promptlayer.com"))?,
            },
            64,
            16,
        ),
        other => {
            return Err(invalid(
                k("type"),
                format!("`{other}` is not one of http, pezzo, promptlayer"),
            ))
        }
    };
    if rs.project_id.is_some() && !matches!(kind, SinkKind::Pezzo { .. }) {
        return Err(invalid(
            k("project_id"),
            "only pezzo sinks take a project_id",
        ));
    }
    // The http sink sends no key: one configured there was accepted and never sent, so the
    // collector answered 401 and the sink held every event as if the key had been refused.
    if matches!(kind, SinkKind::Http { .. }) {
        let given = [
            ("api_key", rs.api_key.is_some()),
            ("api_key_env", rs.api_key_env.is_some()),
            ("api_key_file", rs.api_key_file.is_some()),
            ("api_key_credential", rs.api_key_credential.is_some()),
        ];
        if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
            return Err(invalid(
                k(field),
                "http sinks send no API key; give the collector's credentials as a header: headers = { Authorization = \"Bearer ...\" }",
            ));
        }
    }
    if !matches!(kind, SinkKind::Http { .. })
        && (rs.encoding.is_some() || rs.gzip.is_some() || rs.headers.is_some())
    {
        return Err(invalid(
            k("encoding"),
            "encoding, gzip and headers apply only to http sinks",
        ));
    }
    let (key, key_source) = read_key(name, &rs, keys)?;
    let rate = match rs.rate_limit {
        None => None,
        // At least one request per 100 s: a rate like 1e-300 was taken, and the sink sent one
        // request and then held every event for good while status said "ok".
        Some(r) if r.is_finite() && (MIN_RATE_LIMIT..=MAX_RATE_LIMIT).contains(&r) => {
            Some(RateConfig {
                per_second: r,
                burst: int_in(&k("rate_burst"), rs.rate_burst, r.ceil() as u64, 1, 1 << 20)? as u32,
            })
        }
        Some(r) => {
            return Err(invalid(
                k("rate_limit"),
                format!(
                "{r} is not a requests-per-second rate within {MIN_RATE_LIMIT}..={MAX_RATE_LIMIT}"
            ),
            ))
        }
    };
    if rate.is_none() && rs.rate_burst.is_some() {
        return Err(invalid(k("rate_burst"), "needs rate_limit"));
    }
    let retry = RetryConfig {
        initial: duration(&k("retry_initial"), rs.retry_initial, "500ms", "10ms", "1h")?,
        max: duration(&k("retry_max"), rs.retry_max, "60s", "10ms", "1d")?,
        max_age: duration(&k("max_age"), rs.max_age, "30d", "1s", "3650d")?,
        max_retry_after: duration(
            &k("max_retry_after"),
            rs.max_retry_after,
            "10m",
            "10ms",
            "1d",
        )?,
        poison_after: int_in(&k("poison_after"), rs.poison_after, 5, 1, 1_000_000)? as u32,
        circuit_after: int_in(&k("circuit_after"), rs.circuit_after, 5, 1, 1_000_000)? as u32,
    };
    if retry.initial > retry.max {
        return Err(invalid(k("retry_initial"), "is larger than retry_max"));
    }
    let mut formats = Vec::new();
    for f in rs.route.formats.unwrap_or_default() {
        formats.push(Format::from_name(&f).ok_or_else(|| {
            invalid(
                k("route.formats"),
                format!("`{f}` is not one of native, pezzo, promptlayer"),
            )
        })?);
    }
    Ok(SinkConfig {
        name: name.to_string(),
        kind,
        key,
        key_source,
        batch: BatchConfig {
            max_events: int_in(
                &k("batch_max_events"),
                rs.batch_max_events,
                default_batch,
                1,
                100_000,
            )? as usize,
            max_bytes: bytes_in(
                &k("batch_max_bytes"),
                rs.batch_max_bytes,
                4 << 20,
                1024,
                256 << 20,
            )? as usize,
            max_wait: duration(&k("batch_max_wait"), rs.batch_max_wait, "100ms", "0s", "1h")?,
        },
        concurrency: int_in(&k("concurrency"), rs.concurrency, default_conc, 1, 4096)? as usize,
        timeout: duration(&k("timeout"), rs.timeout, "10s", "100ms", "1h")?,
        rate,
        retry,
        route: Route {
            formats,
            environments: rs.route.environments.unwrap_or_default(),
            tags: rs.route.tags.unwrap_or_default(),
        },
    })
}

/// The sink's key and where it comes from; with [`Keys::Skip`] (or a credential [`Keys::Check`]
/// cannot reach) only where: the key is `None`.
fn read_key(
    name: &str,
    rs: &raw::RawSink,
    keys: Keys,
) -> Result<(Option<Secret>, KeySource), ConfigError> {
    let given = [
        rs.api_key.is_some(),
        rs.api_key_env.is_some(),
        rs.api_key_file.is_some(),
        rs.api_key_credential.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given > 1 {
        return Err(invalid(
            format!("sinks.{name}.api_key"),
            "give only one of api_key, api_key_env, api_key_file, api_key_credential",
        ));
    }
    let source = if let Some(v) = &rs.api_key_env {
        KeySource::Env(v.clone())
    } else if let Some(p) = &rs.api_key_file {
        KeySource::File(p.clone())
    } else if let Some(c) = &rs.api_key_credential {
        KeySource::Credential(c.clone())
    } else if rs.api_key.is_some() {
        KeySource::Inline
    } else {
        KeySource::None
    };
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY");
    let unread = match &source {
        KeySource::None => true,
        KeySource::Credential(_) if keys == Keys::Check => credentials.is_none(),
        _ => keys == Keys::Skip,
    };
    if unread {
        return Ok((None, source));
    }
    let from_file = |key: &str, path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| {
            invalid(
                format!("sinks.{name}.{key}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let key = match &source {
        KeySource::Env(var) => std::env::var(var).map_err(|_| {
            invalid(
                format!("sinks.{name}.api_key_env"),
                format!("environment variable {var} is not set"),
            )
        })?,
        KeySource::File(p) => from_file("api_key_file", PathBuf::from(p))?,
        KeySource::Credential(c) => {
            let dir = credentials.ok_or_else(|| {
                invalid(
                    format!("sinks.{name}.api_key_credential"),
                    "CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)",
                )
            })?;
            from_file("api_key_credential", PathBuf::from(dir).join(c))?
        }
        _ => rs.api_key.clone().unwrap_or_default(),
    };
    let key = match source {
        KeySource::Inline => key,
        _ => key.trim().to_string(),
    };
    // An empty key would be sent as the sink's own, instead of each app's, and refused: the
    // sink would hold every event until the config changed. A credential file not filled in
    // yet is the usual way to get one.
    if key.trim().is_empty() {
        let field = match &source {
            KeySource::Env(_) => "api_key_env",
            KeySource::File(_) => "api_key_file",
            KeySource::Credential(_) => "api_key_credential",
            _ => "api_key",
        };
        return Err(invalid(
            format!("sinks.{name}.{field}"),
            "the key is empty (leave every api_key setting out to use the key each app sends)",
        ));
    }
    Ok((Some(Secret::new(key)), source))
}

/// A duration setting within `min..=max`: zero where it would turn a wait into a busy loop (a
/// retry delay, a timeout) and centuries where a setting would never fire are refused too.
fn duration(
    key: &str,
    v: Option<String>,
    default: &str,
    min: &str,
    max: &str,
) -> Result<Duration, ConfigError> {
    let text = v.unwrap_or_else(|| default.to_string());
    let d = humantime::parse_duration(&text).map_err(|_| {
        invalid(
            key,
            format!("`{text}` is not a duration like \"500ms\", \"10s\", \"7d\""),
        )
    })?;
    let bound = |b: &str| humantime::parse_duration(b).expect("bounds are valid durations");
    if d < bound(min) || d > bound(max) {
        return Err(invalid(key, format!("`{text}` is outside {min}..={max}")));
    }
    Ok(d)
}

/// Why `filter` (`log.level`, or `RUST_LOG`) is not a log filter, if it is not one. A bare
/// word must be a level; anything else a `target=level` directive. (The filter syntax takes a
/// bare word as a target name, so `warning` would silently match nothing and the daemon would
/// log nothing at all, its errors included.)
pub fn log_filter_problem(filter: &str) -> Option<String> {
    let levels = ["trace", "debug", "info", "warn", "error", "off"];
    let bare_non_level = filter
        .split(',')
        .map(str::trim)
        .any(|d| !d.contains('=') && !levels.contains(&d.to_ascii_lowercase().as_str()));
    (bare_non_level || tracing_subscriber::EnvFilter::try_new(filter).is_err()).then(|| {
        format!(
            "`{filter}` is not a level (trace, debug, info, warn, error, off) or a filter like \"info,llmlogd::delivery=debug\""
        )
    })
}

/// Lowest and highest `rate_limit` (requests per second).
const MIN_RATE_LIMIT: f64 = 0.01;
const MAX_RATE_LIMIT: f64 = 1_000_000.0;

/// A path setting as the daemon will use it: not empty (an empty `data_dir` put the queue in
/// whatever directory the daemon was started from), not starting with `~` (no shell expands
/// it: a directory named `~` was made), and absolute (a relative one is taken from the current
/// directory, so logs and `check-config` show where it is).
fn local_path(key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let text = path.to_string_lossy();
    if text.trim().is_empty() {
        return Err(invalid(key, "is empty; give a directory"));
    }
    if text.starts_with('~') {
        return Err(invalid(
            key,
            format!("`{text}`: `~` is not expanded here; give the full path"),
        ));
    }
    std::path::absolute(&path).map_err(|e| invalid(key, format!("`{text}`: {e}")))
}

/// Whether a URL path segment looks like a credential: webhook URLs carry their token in the
/// path (Slack's `/services/T…/B…/<24 characters>`, Discord's `/api/webhooks/<id>/<token>`).
/// 16 characters or more, letters and digits mixed (no word of a path like `ingest` or
/// `v1`); a long id is masked too, which costs nothing.
pub fn token_like(seg: &str) -> bool {
    seg.len() >= 16
        && seg.bytes().any(|b| b.is_ascii_digit())
        && seg.bytes().any(|b| b.is_ascii_alphabetic())
}

/// `url` with what may be a credential masked: the password of `user:password@`, a user
/// name alone (`https://TOKEN@host`, the way Sentry DSNs and many webhooks carry their key:
/// it goes out as the Basic auth user), every query value (`?token=…`), and a path segment
/// that looks like a token ([`token_like`]). For logs, errors, status and `check-config`.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => authority.to_string(),
            };
            let path: Vec<&str> = path
                .split('/')
                .map(|seg| if token_like(seg) { "***" } else { seg })
                .collect();
            format!("{scheme}://{authority}{}", path.join("/"))
        }
        None => head.to_string(),
    };
    if let Some(q) = query {
        let (q, fragment) = match q.split_once('#') {
            Some((q, f)) => (q, Some(f)),
            None => (q, None),
        };
        let masked: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&masked.join("&"));
        if let Some(f) = fragment {
            out.push('#');
            out.push_str(f);
        }
    }
    out
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn int_in(key: &str, v: Option<u64>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n = v.unwrap_or(default);
    if n < min || n > max {
        return Err(invalid(key, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

fn bytes_in(
    key: &str,
    v: Option<raw::ByteSize>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let n = match v {
        None => default,
        Some(raw::ByteSize::Int(n)) => n,
        Some(raw::ByteSize::Text(t)) => parse_bytes(&t).ok_or_else(|| {
            invalid(
                key,
                format!("`{t}` is not a size like 1048576, \"64MiB\" or \"1GB\""),
            )
        })?,
    };
    if n < min || n > max {
        return Err(invalid(key, format!("{n} bytes is outside {min}..={max}")));
    }
    Ok(n)
}

/// Parses `"64MiB"`, `"1 GB"`, `"512k"`, `"1000"`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    let v = num * mult as f64;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/llmlogd`, else `~/.local/state/llmlogd`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several colon-separated directories; the first is ours.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return PathBuf::from(first);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("llmlogd");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/state/llmlogd");
    }
    PathBuf::from("/var/lib/llmlogd")
}

/// `$RUNTIME_DIRECTORY/llmlogd.sock` (systemd), else `$XDG_RUNTIME_DIR/llmlogd.sock`,
/// else `/tmp/llmlogd-$UID.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return PathBuf::from(first).join("llmlogd.sock");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("llmlogd.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/llmlogd-{uid}.sock"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A TOML error as one line that names where it is (line, column and the key written on that
/// line) but shows no value. The toml crate's own message quotes the offending source line,
/// and serde's quotes a string it did not expect (`invalid type: string "…"`): either can be
/// an API key (`api_key = "sk-…` left unterminated, `headers = "Bearer …"`), and this message
/// goes to the terminal, to `ExecStartPre`'s journal and to the daemon's log on a reload.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = redact_quoted(&one_line(e.message()));
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line_no = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // The key of a `key = value` line (a key is a name, never a secret).
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.contains('"'));
    // Under the table header above it, as the keys are written elsewhere (`sinks.pl.timeout`).
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .and_then(|l| l.strip_prefix('[')?.split(']').next())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let key = key.map(|k| match table {
        Some(t) => format!("{t}.{k}"),
        None => k.to_string(),
    });
    match key {
        Some(k) => format!("line {line_no}, column {column} (`{k}`): {message}"),
        None => format!("line {line_no}, column {column}: {message}"),
    }
}

/// `message` with every double-quoted part replaced by `"***"`.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    out.push_str(parts.next().unwrap_or(""));
    let mut inside = true;
    for part in parts {
        out.push('"');
        out.push_str(if inside { "***" } else { part });
        inside = !inside;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, &Overrides::default())
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn durations_that_would_spin_or_never_fire_are_refused() {
        let sink =
            |kv: &str| format!("[sinks.a]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/\"\n{kv}\n");
        let e = err(&sink("retry_initial = \"0s\""));
        assert!(
            e.contains("sinks.a.retry_initial") && e.contains("outside 10ms..=1h"),
            "{e}"
        );
        assert!(err(&sink("timeout = \"0s\"")).contains("sinks.a.timeout"));
        assert!(err(&sink("timeout = \"99999999999d\"")).contains("sinks.a.timeout"));
        assert!(err(&sink("max_age = \"0s\"")).contains("sinks.a.max_age"));
        assert!(err("[server]\nheader_timeout = \"0s\"").contains("server.header_timeout"));
        assert!(err("[server]\nidle_timeout = \"0s\"").contains("server.idle_timeout"));
        // Zero is fine where it means "at once".
        parse(&sink("batch_max_wait = \"0s\"")).unwrap();
        parse("[delivery]\ndrain_timeout = \"0s\"").unwrap();
    }

    /// A size that is neither a whole number nor a string says so, by key, in plain words.
    #[test]
    fn a_size_of_the_wrong_kind_is_refused_plainly() {
        for (bad, why) in [
            ("-1", "is negative"),
            ("1.5", "not a whole number of bytes"),
            ("true", "a size in bytes"),
        ] {
            let e = err(&format!("[server]\nmax_body_bytes = {bad}\n"));
            assert!(
                e.contains("max_body_bytes") && e.contains(why) && !e.contains("untagged"),
                "{bad}: {e}"
            );
        }
        assert!(parse("[server]\nmax_body_bytes = 1048576\n").is_ok());
        assert!(parse("[server]\nmax_body_bytes = \"2MiB\"\n").is_ok());
    }

    #[test]
    fn a_log_level_that_is_not_one_is_refused() {
        for bad in ["warning", "verbose!!", "info,chatty"] {
            let e = err(&format!("[log]\nlevel = \"{bad}\""));
            assert!(e.contains("log.level"), "{bad}: {e}");
        }
        for good in [
            "warn",
            "INFO",
            "off",
            "info,llmlogd::delivery=debug",
            "llmlogd=trace",
        ] {
            parse(&format!("[log]\nlevel = \"{good}\"")).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn urls_are_shown_without_their_credentials() {
        assert_eq!(
            redact_url("http://user:SECRET@127.0.0.1:9/ingest?api_key=Q&x=1#f"),
            "http://user:***@127.0.0.1:9/ingest?api_key=***&x=***#f"
        );
        assert_eq!(redact_url("https://api.pezzo.ai"), "https://api.pezzo.ai");
        assert_eq!(redact_url("http://tok@h/p"), "http://***@h/p");
        // Webhook tokens in the path (Slack, Discord); words and short ids stay.
        assert_eq!(
            redact_url(
                "https://hooks.slack.com/services/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"
            ),
            "https://hooks.slack.com/services/T0AB12CD3/B0XY98ZW7/***"
        );
        assert_eq!(
            redact_url("https://discord.com/api/webhooks/123456789012345678/Zx9_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
            "https://discord.com/api/webhooks/123456789012345678/***"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:9000/v1/ingest/logs2"),
            "http://127.0.0.1:9000/v1/ingest/logs2"
        );
        let c = parse(
            "[sinks.a]\ntype = \"http\"\nurl = \"http://u:PASSWORD@127.0.0.1:9/i?token=TOKEN\"\n",
        )
        .unwrap();
        let shown = c.render();
        assert!(
            !shown.contains("PASSWORD") && !shown.contains("TOKEN"),
            "{shown}"
        );
    }

    #[test]
    fn embedded_defaults_are_valid_and_loopback() {
        let c = parse("").unwrap();
        assert_eq!(
            c.server.http_listen.unwrap().to_string(),
            DEFAULT_HTTP_LISTEN
        );
        assert!(c.sinks.is_empty());
        assert_eq!(c.queue.cache_bytes, 8 << 20);
        assert_eq!(c.server.socket_mode, 0o660);
    }

    #[test]
    fn example_config_parses_with_and_without_its_sink_examples() {
        let text = include_str!("../../config.example.toml");
        let c = parse(text).unwrap_or_else(|e| panic!("config.example.toml: {e}"));
        assert!(
            c.sinks.is_empty(),
            "the example installs with no active sink"
        );
        // Uncommented, every example sink is valid too.
        std::env::set_var("PROMPTLAYER_API_KEY", "pl_test");
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("pezzo"), "pz").unwrap();
        std::env::set_var("CREDENTIALS_DIRECTORY", creds.path());
        let sinks_at = text.find("#[sinks.").unwrap();
        let uncommented: String = text[sinks_at..]
            .lines()
            .filter(|l| !l.starts_with("##"))
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&(text[..sinks_at].to_string() + &uncommented))
            .unwrap_or_else(|e| panic!("example sinks: {e}"));
        assert_eq!(c.sinks.len(), 3);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("[server]\nhttp_listne = \"127.0.0.1:1\"\n");
        assert!(e.contains("http_listne"), "{e}");
        let e = err("[sinks.a]\ntype = \"http\"\nurl = \"http://x\"\nbatch = 3\n");
        assert!(e.contains("batch"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = err("[sinks.pl]\ntype = \"promptlayer\"\ntimeout = \"soon\"\n");
        assert!(e.contains("sinks.pl.timeout"), "{e}");
        let e = err("[server]\nhttp_listen = \"0.0.0.0:80\"\n");
        assert!(
            e.contains("server.http_listen") && e.contains("allow_non_loopback"),
            "{e}"
        );
        let e = err("[sinks.h]\ntype = \"http\"\n");
        assert!(e.contains("sinks.h.url"), "{e}");
        let e = err("[sinks.h]\ntype = \"kafka\"\n");
        assert!(e.contains("sinks.h.type"), "{e}");
        let e = err("[queue]\nmax_bytes = \"lots\"\n");
        assert!(e.contains("queue.max_bytes"), "{e}");
        let e = err("[sinks.h]\ntype = \"http\"\nurl = \"http://x\"\nroute.formats = [\"xml\"]\n");
        assert!(e.contains("sinks.h.route.formats"), "{e}");
    }

    #[test]
    fn overrides_win() {
        let ov = Overrides {
            data_dir: Some("/tmp/x".into()),
            http_listen: Some("127.0.0.1:9".into()),
            unix_socket: Some(String::new()),
        };
        let c = Config::parse("[queue]\ndata_dir = \"/nope\"\n", &ov).unwrap();
        assert_eq!(c.queue.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.server.http_listen.unwrap().port(), 9);
        assert!(c.server.unix_socket.is_none());
    }

    /// `sun_path` holds 107 bytes and a NUL: a longer socket path is a bad value, named.
    #[test]
    fn a_socket_path_the_kernel_cannot_bind_is_refused_by_name() {
        let at = |len: usize| {
            let path = format!("/tmp/{}", "s".repeat(len - 5));
            assert_eq!(path.len(), len);
            let ov = Overrides {
                unix_socket: Some(path),
                ..Overrides::default()
            };
            Config::parse("", &ov)
        };
        assert!(at(MAX_SOCKET_PATH_BYTES).is_ok());
        let e = at(MAX_SOCKET_PATH_BYTES + 1).unwrap_err().to_string();
        assert!(e.contains("server.unix_socket"), "{e}");
        assert!(e.contains("at most 107 bytes"), "{e}");
        let long = format!("[server]\nunix_socket = \"/tmp/{}\"\n", "d".repeat(120));
        let e = Config::parse(&long, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.unix_socket"), "{e}");
        // A bound socket of the longest length, so the limit is the kernel's, not ours.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().display().to_string();
        if let Some(n) = MAX_SOCKET_PATH_BYTES.checked_sub(base.len() + 1) {
            let path = format!("{base}/{}", "k".repeat(n));
            assert_eq!(path.len(), MAX_SOCKET_PATH_BYTES);
            std::os::unix::net::UnixListener::bind(&path).expect("107 bytes bind");
            assert!(std::os::unix::net::UnixListener::bind(format!("{path}x")).is_err());
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("1 GB"), Some(1_000_000_000));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("1.5KiB"), Some(1536));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn a_pezzo_sink_with_a_key_and_no_project_gets_a_note() {
        let load = |sink: &str| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("c.toml");
            std::fs::write(&p, format!("[sinks.pz]\ntype = \"pezzo\"\n{sink}")).unwrap();
            Config::load(Some(&p), &Overrides::default()).unwrap()
        };
        let notes = load("api_key = \"pez_secret\"\n").notes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("sinks.pz: ") && notes[0].contains("set project_id"));
        assert!(!notes[0].contains("pez_secret"));
        assert!(load("api_key = \"k\"\nproject_id = \"p\"\n")
            .notes()
            .is_empty());
        // Keyless: it sends each app's reports with the app's key and project, as documented.
        assert!(load("").notes().is_empty());
    }

    #[test]
    fn render_masks_secrets() {
        let c = parse(
            "[sinks.pl]\ntype = \"promptlayer\"\napi_key = \"pl_secret_value\"\n[sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/x\"\nheaders = { Authorization = \"Bearer tok_secret\" }\n",
        )
        .unwrap();
        let r = c.render();
        assert!(
            !r.contains("pl_secret_value") && !r.contains("tok_secret"),
            "{r}"
        );
        assert!(r.contains("api_key = \"***\""), "{r}");
        // What is rendered parses back (apart from the masked values).
        assert!(r.contains("[sinks.pl]") && r.contains("type = \"http\""));
    }

    #[test]
    fn an_http_sink_refuses_an_api_key_instead_of_never_sending_it() {
        let secret = "tok_SECRET_9q";
        for field in [
            "api_key",
            "api_key_env",
            "api_key_file",
            "api_key_credential",
        ] {
            let e = err(&format!(
                "[sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n{field} = \"{secret}\"\n"
            ));
            assert!(
                e.contains(&format!("`sinks.h.{field}`")) && e.contains("headers = {"),
                "{field}: {e}"
            );
            assert!(!e.contains(secret), "{e}");
        }
        // Its credentials are headers, and check-config shows no key line for it.
        let c = parse(
            "[sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\nheaders = { Authorization = \"Bearer t\" }\n",
        )
        .unwrap();
        assert!(!c.render().contains("api_key"), "{}", c.render());
    }

    /// A rate that would hold a sink's events for good, and data directories that are not
    /// where the operator meant, are refused by name; a relative directory is made absolute.
    #[test]
    fn rates_and_data_dirs_that_mislead_are_refused() {
        let sink = |rate: &str| {
            format!(
                "[sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\nrate_limit = {rate}\n"
            )
        };
        for bad in ["1e-300", "0.001", "0.0", "-1.0", "2e6"] {
            let e = err(&sink(bad));
            assert!(e.contains("`sinks.h.rate_limit`"), "{bad}: {e}");
        }
        assert!(parse(&sink("0.01")).is_ok());
        for (bad, why) in [("", "is empty"), ("~/llmlogd", "not expanded")] {
            let e = err(&format!("[queue]\ndata_dir = {bad:?}\n"));
            assert!(
                e.contains("`queue.data_dir`") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let c = parse("[queue]\ndata_dir = \"rel/dir\"\n").unwrap();
        assert_eq!(
            c.queue.data_dir,
            std::env::current_dir().unwrap().join("rel/dir")
        );
    }

    /// An empty key is refused by name: sent as the sink's own it overrode each app's key and
    /// was refused by the service, holding every event.
    #[test]
    fn an_empty_api_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, "\n").unwrap();
        for (field, value) in [
            ("api_key", "\"\"".to_string()),
            ("api_key", "\"  \"".to_string()),
            ("api_key_file", format!("\"{}\"", empty.display())),
        ] {
            let e = err(&format!(
                "[sinks.p]\ntype = \"promptlayer\"\n{field} = {value}\n"
            ));
            assert!(
                e.contains(&format!("`sinks.p.{field}`")) && e.contains("empty"),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn allowed_hosts_are_host_names_and_render_back() {
        let c = parse("[server]\nallowed_hosts = [\"llm.internal\", \"box-1.lan.\"]\n").unwrap();
        assert_eq!(c.server.allowed_hosts, ["llm.internal", "box-1.lan."]);
        let r = c.render();
        assert!(
            r.contains("allowed_hosts = [\"llm.internal\", \"box-1.lan.\"]"),
            "{r}"
        );
        assert_eq!(
            parse(&r).unwrap().server.allowed_hosts,
            c.server.allowed_hosts
        );
        assert!(parse("").unwrap().server.allowed_hosts.is_empty());
        for bad in [
            "http://llm.internal",
            "llm.internal:8411",
            "",
            "a..b",
            "a b",
        ] {
            let e = err(&format!("[server]\nallowed_hosts = [\"ok\", {bad:?}]\n"));
            assert!(e.contains("server.allowed_hosts[1]"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_rendered_config_keeps_allow_non_loopback_and_loads() {
        let c =
            parse("[server]\nhttp_listen = \"0.0.0.0:8411\"\nallow_non_loopback = true\n").unwrap();
        let r = c.render();
        assert!(r.contains("allow_non_loopback = true"), "{r}");
        let again = parse(&r).unwrap();
        assert_eq!(again.render(), r);
        assert!(parse("")
            .unwrap()
            .render()
            .contains("allow_non_loopback = false"));
    }

    #[test]
    fn errors_name_the_place_but_never_show_a_value() {
        let secret = "sk-live-TOPSECRET";
        let cases = [
            // Unterminated: the toml crate quoted the whole source line.
            (format!("[sinks.c]\ntype = \"http\"\napi_key = \"{secret}\n"), "line 3"),
            (format!("[sinks.c]\ntype = \"http\"\napi_key = [\"{secret}\"]\n"), "`sinks.c.api_key`"),
            // serde quoted the string it did not expect.
            (format!("[sinks.c]\ntype = \"http\"\nurl = \"http://x\"\nheaders = \"Bearer {secret}\"\n"), "`sinks.c.headers`"),
            (format!("[sinks.c]\ntype = \"http\"\nurl = \"http://x\"\nheaders = {{ A = 5, B = \"{secret}\" }}\n"), "line 4"),
            (format!("[sinks.c]\ntype = \"http\"\nurl = \"http://u:{secret}@x:99999/\"\n"), "sinks.c.url"),
            (format!("[sinks.c]\ntype = \"http\"\nurl = \"ftp://x/?token={secret}\"\n"), "sinks.c.url"),
        ];
        for (toml, place) in cases {
            let e = err(&toml);
            assert!(!e.contains(secret), "a value shown in {e:?}");
            assert!(e.contains(place), "{place} not named in {e:?}");
            assert!(!e.contains('\n'), "not one line: {e:?}");
        }
        // Unknown keys are still named, with the keys that are known.
        let e = err("[sinks.c]\ntype = \"http\"\nbogus = 1\n");
        assert!(
            e.contains("line 3") && e.contains("unknown field `bogus`"),
            "{e}"
        );
    }
}
