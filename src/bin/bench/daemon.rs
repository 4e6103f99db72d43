//! The daemon under test: the real `llmlogd` binary, started as a child process so its memory
//! and CPU are its own (`/proc/<pid>`), stopped with SIGTERM like systemd would.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::sys;

/// A running llmlogd; killed if dropped while running.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub http: SocketAddr,
    pub unix: PathBuf,
    /// From spawn to the "ready" log line (includes opening the queue).
    pub startup: Duration,
    log: PathBuf,
}

/// How to start it.
pub struct Launch<'a> {
    pub bin: &'a Path,
    /// Arguments before `run` (the bench's transport floor stands in for llmlogd this way).
    pub prefix: &'a [&'a str],
    pub config: &'a Path,
    pub data_dir: &'a Path,
    pub socket: &'a Path,
    /// Its stderr goes here (appended).
    pub log: &'a Path,
    /// How long to wait for "ready" (opening a large queue takes a while).
    pub ready_within: Duration,
    /// Process settings taken from the systemd unit (empty: run it bare).
    pub unit: &'a UnitSettings,
}

/// What `systemd/llmlogd.service` changes about the process that the bench can reproduce:
/// `Environment=`, `CPUSchedulingPolicy=` (other, batch, idle) and `Nice=`. Its cgroup limits
/// (`MemoryHigh=`, `MemoryMax=`) and sandboxing are not applied.
#[derive(Debug, Clone, Default)]
pub struct UnitSettings {
    pub env: Vec<(String, String)>,
    pub policy: Option<(String, libc::c_int)>,
    pub nice: Option<i32>,
}

impl UnitSettings {
    pub fn parse(text: &str) -> UnitSettings {
        let mut u = UnitSettings::default();
        let mut in_service = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            let Some((k, v)) = line.split_once('=').filter(|_| in_service) else {
                continue;
            };
            match k.trim() {
                "Environment" => {
                    for word in v.split_whitespace() {
                        if let Some((ek, ev)) = word.trim_matches('"').split_once('=') {
                            u.env.push((ek.to_string(), ev.to_string()));
                        }
                    }
                }
                "CPUSchedulingPolicy" => {
                    u.policy = match v.trim() {
                        "batch" => Some(("batch".into(), libc::SCHED_BATCH)),
                        "idle" => Some(("idle".into(), libc::SCHED_IDLE)),
                        "other" => Some(("other".into(), libc::SCHED_OTHER)),
                        _ => None,
                    }
                }
                "Nice" => u.nice = v.trim().parse().ok(),
                _ => {}
            }
        }
        u
    }

    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        if let Some((name, _)) = &self.policy {
            parts.push(format!("`CPUSchedulingPolicy={name}`"));
        }
        if let Some(n) = self.nice {
            parts.push(format!("`Nice={n}`"));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

impl Daemon {
    pub fn start(l: &Launch<'_>) -> anyhow::Result<Daemon> {
        let t0 = Instant::now();
        let mut cmd = Command::new(l.bin);
        cmd.env_remove("MALLOC_ARENA_MAX");
        cmd.envs(l.unit.env.iter().map(|(k, v)| (k, v)));
        let (policy, nice) = (l.unit.policy.as_ref().map(|p| p.1), l.unit.nice);
        if policy.is_some() || nice.is_some() {
            // SAFETY: runs in the forked child before exec; sched_setscheduler and
            // setpriority are plain syscalls (async-signal-safe) on stack values.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    if let Some(p) = policy {
                        let param = libc::sched_param { sched_priority: 0 };
                        if libc::sched_setscheduler(0, p, &param) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(n) = nice {
                        if libc::setpriority(libc::PRIO_PROCESS, 0, n) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(l.prefix)
            .arg("run")
            .arg("--config")
            .arg(l.config)
            .arg("--data-dir")
            .arg(l.data_dir)
            .args(["--http-listen", "127.0.0.1:0", "--unix-socket"])
            .arg(l.socket)
            .env_remove("RUST_LOG")
            .env_remove("LLMLOGD_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", l.bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l.log)
            .with_context(|| format!("opening {}", l.log.display()))?;
        let (tx, rx) = mpsc::channel::<String>();
        // Keep reading its stderr for its whole life, so the pipe never fills and blocks it.
        std::thread::Builder::new()
            .name(format!("llmlogd-{pid}-stderr"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    if line.contains("llmlogd ready") {
                        let _ = tx.send(line);
                    }
                }
            })?;
        let deadline = Instant::now() + l.ready_within;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    bail!(
                        "llmlogd exited before it was ready; its log ({}):\n{}",
                        l.log.display(),
                        tail(l.log)
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "llmlogd exited ({status}) before it was ready; its log:\n{}",
                    tail(l.log)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "llmlogd was not ready within {:?}; its log:\n{}",
                    l.ready_within,
                    tail(l.log)
                );
            }
        };
        let http = field(&line, "listening=http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("no HTTP address in {line:?}"))?;
        let unix = field(&line, " and unix:")
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no socket path in {line:?}"))?;
        Ok(Daemon {
            child: Some(child),
            pid,
            http,
            unix,
            startup: t0.elapsed(),
            log: l.log.to_path_buf(),
        })
    }

    pub fn peak_rss(&self) -> u64 {
        sys::status_kb(self.pid, "VmHWM").unwrap_or(0)
    }

    pub fn rss(&self) -> u64 {
        sys::status_kb(self.pid, "VmRSS").unwrap_or(0)
    }

    pub fn reset_peak_rss(&self) -> bool {
        sys::reset_peak_rss(self.pid)
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after `grace`).
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child by the pid we got when spawning it (not yet reaped).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "llmlogd exited with {status}; its log:\n{}",
                        tail(&self.log)
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("llmlogd did not stop within {grace:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The text after `key` up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    Some(rest.split_whitespace().next().unwrap_or(rest))
}

/// The last lines of a log file, for error messages.
pub fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A port on 127.0.0.1 nothing listens on (bound, then released): a sink pointed there fails
/// fast with "connection refused", so its events stay queued.
pub fn closed_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_settings() {
        let u = super::UnitSettings::parse(
            "[Unit]\nEnvironment=NO=1\n[Service]\nEnvironment=MALLOC_ARENA_MAX=2 \"A=b\"\nCPUSchedulingPolicy=batch\nNice=5\n",
        );
        assert_eq!(
            u.env,
            vec![
                ("MALLOC_ARENA_MAX".into(), "2".into()),
                ("A".into(), "b".into())
            ]
        );
        assert_eq!(u.policy.map(|p| p.1), Some(libc::SCHED_BATCH));
        assert_eq!(u.nice, Some(5));
        assert!(super::UnitSettings::parse("").describe() == "nothing");
    }

    #[test]
    fn ready_line_fields() {
        let l = "2025-01-01T00:00:00Z  INFO llmlogd::app: llmlogd ready listening=http://127.0.0.1:4242 and unix:/tmp/x/s.sock data_dir=/tmp/x sinks=0";
        assert_eq!(super::field(l, "listening=http://"), Some("127.0.0.1:4242"));
        assert_eq!(super::field(l, " and unix:"), Some("/tmp/x/s.sock"));
    }
}
