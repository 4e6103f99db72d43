//! Test helpers: a mock remote endpoint, the daemon in-process or as a real process, and
//! waiting on conditions with a deadline.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};

pub mod spec;

use llmlogd::app::{ConfigSource, Started};
use llmlogd::config::{Config, Overrides};
use llmlogd::ops::signals::Signal;

/// Waits until `f` returns `Some`, polling every 10 ms, up to `timeout`; panics with `what`.
pub async fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_for`], for conditions that need to await (an HTTP request).
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Generous: CI machines are slow and shared. Tests never wait this long when they pass.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("mock received JSON")
    }

    /// For a JSON-array batch: each element's exact bytes.
    pub fn raw_events(&self) -> Vec<String> {
        let items: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(&self.body).expect("batch is a JSON array");
        items.iter().map(|r| r.get().to_string()).collect()
    }
}

/// What the mock answers, in order; after the script runs out, `default`.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16),
    StatusBody(u16, String),
    RetryAfter(u16, String),
    /// A 3xx with this Location.
    Redirect(u16, String),
    /// Wait, then answer 200 (slower than a sink timeout = a timeout).
    Delay(Duration),
    /// Close the connection without answering.
    Reset,
}

type Rule = Arc<dyn Fn(&Received) -> Option<Answer> + Send + Sync>;

#[derive(Default)]
struct MockState {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Answer>>,
    default: Mutex<Option<Answer>>,
    /// Per-request override computed from the body (e.g. poison events).
    rule: Mutex<Option<Rule>>,
    /// Answer for a success (status, body).
    ok: Mutex<Option<(u16, String)>>,
}

/// A port bound but not listening: a connection to it is refused (RST), as to a closed port,
/// but the port stays this test's. (A port bound and let go can be handed to another test's
/// mock at once, which then answers for the "down" endpoint.)
pub struct ClosedPort {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

/// Something a sink's URL can point at: a running mock or a closed port.
pub trait Target {
    fn url(&self, path: &str) -> String;
}

impl Target for ClosedPort {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Target for MockSink {
    fn url(&self, path: &str) -> String {
        MockSink::url(self, path)
    }
}

impl ClosedPort {
    /// The endpoint comes up on this port.
    pub async fn open(self) -> MockSink {
        MockSink::serve(self.socket.listen(1024).unwrap()).await
    }
}

/// A local endpoint that records what arrives and answers from a script.
#[derive(Clone)]
pub struct MockSink {
    state: Arc<MockState>,
    pub addr: SocketAddr,
    stop: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl MockSink {
    /// A `[sinks.mock]` table: an `http` sink to this mock's `/in`, batches sent after 20 ms.
    pub fn sink_config(&self) -> String {
        format!(
            "[sinks.mock]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"20ms\"\n",
            self.url("/in")
        )
    }

    /// Every event that reached the mock, as the exact bytes it forwarded.
    pub fn arrived(&self) -> Vec<String> {
        self.received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect()
    }

    /// Waits until the mock holds every one of `events`, then returns all it holds.
    pub async fn wait_arrived(&self, events: &[impl AsRef<str>]) -> Vec<String> {
        wait_for(
            DEADLINE,
            &format!("{} events at the mock", events.len()),
            || {
                let all = self.arrived();
                events
                    .iter()
                    .all(|e| all.iter().any(|a| a == e.as_ref()))
                    .then_some(all)
            },
        )
        .await
    }

    /// Starts on a free loopback port.
    pub async fn start() -> MockSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener).await
    }

    /// A loopback port for an endpoint that is down, held so that no other test's mock can take
    /// it: connections are refused until [`ClosedPort::open`] starts a mock on it.
    pub fn closed() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        ClosedPort { socket, addr }
    }

    async fn serve(listener: tokio::net::TcpListener) -> MockSink {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        let (tx, rx) = oneshot::channel::<()>();
        // No body limit: axum's default (2 MB) would answer large events 413 itself.
        let app = axum::Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        MockSink {
            state,
            addr,
            stop: Arc::new(Mutex::new(Some(tx))),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) -> &Self {
        self.state.script.lock().unwrap().extend(answers);
        self
    }

    pub fn default_answer(&self, a: Answer) -> &Self {
        *self.state.default.lock().unwrap() = Some(a);
        self
    }

    pub fn rule(&self, f: impl Fn(&Received) -> Option<Answer> + Send + Sync + 'static) -> &Self {
        *self.state.rule.lock().unwrap() = Some(Arc::new(f));
        self
    }

    pub fn ok_answer(&self, status: u16, body: &str) -> &Self {
        *self.state.ok.lock().unwrap() = Some((status, body.to_string()));
        self
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

async fn handle(
    State(st): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rec = Received {
        at: Instant::now(),
        path: uri.path().to_string(),
        headers,
        body,
    };
    let rule = st.rule.lock().unwrap().clone();
    let answer = rule
        .and_then(|r| r(&rec))
        .or_else(|| st.script.lock().unwrap().pop_front())
        .or_else(|| st.default.lock().unwrap().clone());
    let ok = st
        .ok
        .lock()
        .unwrap()
        .clone()
        .unwrap_or((200, "{}".to_string()));
    let record = |st: &MockState, rec: Received| st.received.lock().unwrap().push(rec);
    match answer {
        None => {
            record(&st, rec);
            (StatusCode::from_u16(ok.0).unwrap(), ok.1).into_response()
        }
        Some(Answer::Status(s)) => {
            record(&st, rec);
            (StatusCode::from_u16(s).unwrap(), ok_body_for(s, &ok.1)).into_response()
        }
        Some(Answer::StatusBody(s, b)) => {
            record(&st, rec);
            (StatusCode::from_u16(s).unwrap(), b).into_response()
        }
        Some(Answer::RetryAfter(s, v)) => {
            record(&st, rec);
            let mut r = (StatusCode::from_u16(s).unwrap(), "slow down").into_response();
            r.headers_mut().insert("retry-after", v.parse().unwrap());
            r
        }
        Some(Answer::Redirect(s, location)) => {
            record(&st, rec);
            let mut r = (StatusCode::from_u16(s).unwrap(), "moved").into_response();
            r.headers_mut()
                .insert("location", location.parse().unwrap());
            r
        }
        Some(Answer::Delay(d)) => {
            record(&st, rec);
            tokio::time::sleep(d).await;
            (StatusCode::from_u16(ok.0).unwrap(), ok.1).into_response()
        }
        Some(Answer::Reset) => {
            record(&st, rec);
            // Panicking inside the handler makes hyper drop the connection without a reply.
            std::panic::resume_unwind(Box::new("mock reset"))
        }
    }
}

fn ok_body_for(status: u16, ok: &str) -> String {
    if (200..300).contains(&status) {
        ok.to_string()
    } else {
        format!("{{\"error\":\"mock status {status}\"}}")
    }
}

/// The daemon running in this process through `app::run`.
pub struct InProcess {
    pub started: Started,
    control: mpsc::Sender<Signal>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub config_path: PathBuf,
}

impl InProcess {
    /// Starts with `toml` (written to a file so reload can re-read it) in `dir`.
    ///
    /// A daemon this process stopped in the same dir may still look like its holder for a
    /// moment (see [`dlq`]): then the start is tried again, up to the deadline.
    pub async fn start(dir: &Path, toml: &str) -> InProcess {
        let config_path = dir.join("llmlogd.toml");
        std::fs::write(&config_path, toml).unwrap();
        let held_by_us = held_by_us();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let overrides = Overrides {
                data_dir: Some(dir.join("data")),
                http_listen: Some("127.0.0.1:0".into()),
                unix_socket: Some(dir.join("llmlogd.sock").display().to_string()),
            };
            let cfg = Config::load(Some(&config_path), &overrides).expect("valid test config");
            let (control, rx) = mpsc::channel(4);
            let (tx, started) = oneshot::channel();
            let source = ConfigSource {
                path: Some(config_path.clone()),
                overrides,
            };
            let mut task = tokio::spawn(llmlogd::app::run(cfg, source, rx, Some(tx)));
            match tokio::time::timeout(DEADLINE, started)
                .await
                .expect("daemon started in time")
            {
                Ok(started) => {
                    return InProcess {
                        started,
                        control,
                        task,
                        config_path,
                    };
                }
                // It gave up before it was ready: say why, or try again.
                Err(_) => {
                    let why = tokio::time::timeout(DEADLINE, &mut task)
                        .await
                        .expect("a daemon that did not start exits");
                    let held = matches!(&why, Ok(Err(e)) if format!("{e:#}").contains(&held_by_us));
                    if !held || Instant::now() > deadline {
                        panic!("daemon did not start: {why:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.started.http.unwrap(), path)
    }

    pub fn socket(&self) -> PathBuf {
        self.started.unix.clone().unwrap()
    }

    pub async fn reload(&self, toml: &str) {
        // Write-then-rename, as config management tools do: a reload must never read a
        // half-written file (an empty one is a valid config with no sinks).
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
        self.control.send(Signal::Reload).await.unwrap();
    }

    pub async fn stop(self) {
        self.control.send(Signal::Shutdown).await.unwrap();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("daemon stopped in time")
            .unwrap()
            .expect("daemon exited cleanly");
    }
}

/// The real binary, as a child process.
pub struct Process {
    pub child: Child,
    pub http: SocketAddr,
    pub stderr_lines: Arc<Mutex<Vec<String>>>,
}

/// Runs `llmlogd dlq --data-dir DIR ARGS…`; returns (exit code, stdout, stderr).
///
/// A daemon stopped in this process may still look like the data dir's holder for a moment:
/// its lock's file descriptor lives on in a child another test is forking (until that child
/// execs). Then the command is run again, up to the deadline (see [`while_held_by_us`]).
pub fn dlq(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    while_held_by_us(|| dlq_once(data_dir, args))
}

/// Runs `llmlogd ARGS…` (a command that opens a data dir, as `fsck` does) with no config or
/// data dir from the environment, as [`dlq`] does: again while this process holds the dir.
pub fn offline(args: &[&str]) -> (i32, String, String) {
    while_held_by_us(|| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_remove("LLMLOGD_CONFIG")
            .env_remove("LLMLOGD_DATA_DIR");
        outcome(cmd)
    })
}

/// (exit code, stdout, stderr) of `cmd`, run to its end.
fn outcome(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run llmlogd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How a command or a start is refused while this process holds the data dir.
fn held_by_us() -> String {
    format!("in use by another llmlogd (pid {})", std::process::id())
}

/// Runs `run` again, up to the deadline, while it fails because this process (a daemon it
/// stopped, through a forked child's copy of the lock) still holds the data dir.
fn while_held_by_us(mut run: impl FnMut() -> (i32, String, String)) -> (i32, String, String) {
    let held_by_us = held_by_us();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = run();
        if out.0 == 0 || !out.2.contains(&held_by_us) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn dlq_once(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("dlq");
    // The daemon's config (the test daemons keep it beside their data dir), as an operator
    // would give it: `replay` checks the sinks against it.
    let config = data_dir.parent().map(|p| p.join("llmlogd.toml"));
    if let Some(c) = config.filter(|c| c.exists()) {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("LLMLOGD_CONFIG");
    outcome(cmd)
}

pub fn dlq_list(data_dir: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = dlq(data_dir, &["list", "--json", "--limit", "100000"]);
    assert_eq!(code, 0, "dlq list: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_llmlogd")
}

impl Process {
    /// Starts `llmlogd run` with `config` in `dir` and waits for "llmlogd ready".
    pub fn start(dir: &Path, config: &str) -> Process {
        Self::start_with(dir, config, &[])
    }

    /// Like `start`, with extra environment variables (e.g. NOTIFY_SOCKET).
    pub fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Process {
        let cfg = dir.join("llmlogd.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new(bin());
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--unix-socket")
            .arg(dir.join("llmlogd.sock"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn llmlogd");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("llmlogd ready") {
                    let _ = tx.send(line.clone());
                }
                l2.lock().unwrap().push(line);
            }
        });
        let ready = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!("llmlogd did not become ready: {:?}", lines.lock().unwrap())
        });
        let addr = ready
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("ready line names the HTTP address")
            .parse()
            .expect("an address");
        Process {
            child,
            http: addr,
            stderr_lines: lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Sends a signal (SIGHUP to reload, …).
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// The daemon's resident memory (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in kB")
            * 1024
    }

    /// Stderr lines so far.
    pub fn log(&self) -> Vec<String> {
        self.stderr_lines.lock().unwrap().clone()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process that is killed and reaped when the test ends, passed or failed (a daemon
/// started through `systemd-socket-activate` is that child: it execs the daemon).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// GETs `url` and returns the body as text.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GETs `url` and parses its JSON body (`/v1/status`, say).
pub async fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(url).await).expect("a JSON body")
}

/// Posts JSON text to `url`, returns (status, body).
pub async fn post_json(url: &str, body: &str) -> (u16, serde_json::Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent");
    let s = r.status().as_u16();
    let v = r.json().await.unwrap_or(serde_json::Value::Null);
    (s, v)
}

/// The executable `prog` on `PATH`, if any.
pub fn which(prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| {
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// Whether `systemd-socket-activate` is there to play systemd. CI installs it, so there its
/// absence fails the test instead of skipping it.
pub fn socket_activate_available() -> bool {
    if which("systemd-socket-activate").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "systemd-socket-activate missing in CI"
    );
    eprintln!("skipped: systemd-socket-activate not installed");
    false
}
