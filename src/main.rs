//! The `llmlogd` binary: parse the command line, load the config before binding anything,
//! run, and turn errors into one line and an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use llmlogd::cli::{self, Cli, CliError, Command};
use llmlogd::config::{Config, LogFormat};

/// mimalloc instead of glibc's malloc: under load glibc's arena locks showed up in the profile
/// as futex waits on every thread (ingest, the writer, sled's I/O threads); see BENCHMARKS.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before giving it back to the OS: 10 ms (its default,
/// stated so a newer mimalloc cannot change it unseen); `MIMALLOC_PURGE_DELAY` in the
/// environment overrides it. At 0 (immediate) the writer and ingest threads spent ~12 % of
/// their CPU on page faults and `madvise` refilling memory just given back; 10 ms measured
/// 59 -> 64-65 k events/s pipelined and +5 % at 64 clients for +10-15 MiB of peak RSS
/// during ingest (BENCHMARKS.md F21). Transparent huge pages stay off (`no_thp`). The
/// option number is `mi_option_purge_delay` in mimalloc.h, the same in v2 and v3.
fn tune_allocator() {
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of a mimalloc global option, valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 10) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` print and succeed; a usage error is one line, exit 64
            // (EX_USAGE) like every other usage error of this CLI, not clap's own 2.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let args: Vec<String> = std::env::args().collect();
            eprintln!(
                "llmlogd: {}",
                cli::usage_error_line(&e.render().to_string(), &args)
            );
            return ExitCode::from(cli::EXIT_USAGE as u8);
        }
    };
    if matches!(
        cli.command,
        Command::CheckConfig { .. }
            | Command::Status { .. }
            | Command::Dlq { .. }
            | Command::Fsck { .. }
    ) {
        // These only print: `llmlogd status | head -1` should end quietly as Unix tools do,
        // not panic on a closed stdout (Rust ignores SIGPIPE). Not for `run` (a vanished
        // peer must not kill the daemon) nor `send` (which reports a closed socket).
        // SAFETY: sets a signal disposition before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::CheckConfig { file, cfg } => cli::check_config(file, &cfg),
        Command::Send {
            file,
            socket,
            timeout,
            cfg,
        } => cli::send(file, socket, timeout, &cfg),
        Command::Status { json, cfg } => cli::status(json, &cfg),
        Command::Dlq { action, cfg } => cli::dlq(action, &cfg),
        Command::Fsck { repair, json, cfg } => cli::fsck(repair, json, &cfg),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.logged => ExitCode::from(e.code.clamp(1, 255) as u8),
        Err(e) => {
            // `<3>`: an error's priority for journald (see `init_tracing`).
            let priority = if stderr_is_journal() { "<3>" } else { "" };
            eprintln!("{priority}llmlogd: {}", e.message);
            ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}

fn run(args: cli::ConfigArgs) -> Result<(), CliError> {
    // The handlers go in first, before the config is read: until they are in, a signal has
    // its default action, and SIGHUP's kills the process. A `systemctl reload` (or a script's
    // SIGHUP) that came right after the start, while the config was being read, took the
    // daemon down. Signals that arrive from here on wait in the channel: a reload is done,
    // and a stop honoured, once the daemon is up.
    let signals = llmlogd::ops::signals::listen().map_err(|e| {
        CliError::new(
            cli::EXIT_SOFTWARE,
            format!("cannot install signal handlers: {e}"),
        )
    })?;
    let cfg: Config = args.load()?;
    // `RUST_LOG` overrides `log.level`, and is held to the same rule: a value that is not a
    // filter (`warning`) silenced every line, errors included. Empty means unset.
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if let Some(problem) = rust_log
        .as_deref()
        .and_then(llmlogd::config::log_filter_problem)
    {
        return Err(CliError::new(
            cli::EXIT_USAGE,
            format!("RUST_LOG: {problem}"),
        ));
    }
    init_tracing(&cfg, rust_log.as_deref());
    // From here on the log is set up: under `log.format = "json"` a fatal error is one more
    // JSON line of it (level ERROR), so a collector reading the daemon's output as JSON
    // lines meets no plain-text line at the end. Errors before this point (the command line,
    // the config itself) come before the format is known and stay one plain line.
    let json = cfg.log.format == LogFormat::Json;
    let fatal = |code: i32, message: String| {
        if json {
            tracing::error!("{message}");
            CliError {
                logged: true,
                ..CliError::new(code, message)
            }
        } else {
            CliError::new(code, message)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmlogd")
        .build()
        .map_err(|e| fatal(cli::EXIT_SOFTWARE, format!("cannot start the runtime: {e}")))?;
    let source = llmlogd::app::ConfigSource {
        path: args.config.clone(),
        overrides: args.overrides(),
    };
    rt.block_on(llmlogd::app::run(cfg, source, signals, None))
        .map_err(|e| fatal(1, format!("{e:#}")))
}

fn init_tracing(cfg: &Config, rust_log: Option<&str>) {
    use tracing_subscriber::fmt::format;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(rust_log.unwrap_or(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Under journald the journal stamps time itself; no colours either; and each line starts
    // with its syslog priority (`<3>` error … `<7>` debug), which journald takes off and
    // keeps as the entry's priority: without it every line was priority 6 ("info"), so
    // `journalctl -p warning -u llmlogd` showed none of the daemon's warnings and errors.
    let journald = stderr_is_journal();
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match (cfg.log.format, journald) {
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder
            .fmt_fields(format::JsonFields::new())
            .event_format(Prioritised(format().json()))
            .init(),
        (LogFormat::Human, true) => builder
            .event_format(Prioritised(format().without_time().with_ansi(false)))
            .init(),
        (LogFormat::Human, false) => builder.init(),
    }
}

/// Whether stderr is the journal: `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd) names
/// it. An inherited variable whose stream is not our stderr (a service that started us with
/// stderr sent elsewhere) does not count, as sd_journal_stream_fd(3) says.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(meta) = std::os::fd::AsFd::as_fd(&stderr)
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
    else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// An event format that puts the syslog priority of each line before it (`<4>` for a
/// warning), for journald (`SyslogLevelPrefix=`, on by default).
struct Prioritised<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prioritised<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
