//! The Unix socket from any language (issue #5): NDJSON and HTTP on one socket, permissions,
//! one daemon per data dir and socket, `llmlogd send`, the client snippets in
//! `examples/clients/`, and clients that misbehave without hurting the others.

use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::util::*;

/// How long a well-behaved client may wait for its ack while others misbehave. Generous for a
/// slow shared machine, yet well below the misbehaving clients' own timeouts (60 s) in those
/// tests, so a daemon that waited on them would fail.
const PROMPT: Duration = Duration::from_secs(20);

/// An NDJSON client on the socket.
struct Nd {
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Nd {
    async fn connect(path: &Path) -> Nd {
        let s = tokio::time::timeout(DEADLINE, UnixStream::connect(path))
            .await
            .expect("connected in time")
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        let (rd, wr) = s.into_split();
        Nd {
            lines: BufReader::new(rd).lines(),
            wr,
        }
    }

    async fn write(&mut self, bytes: impl AsRef<[u8]>) {
        self.wr.write_all(bytes.as_ref()).await.expect("write");
    }

    /// The next reply line, within `within`.
    async fn reply_within(&mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no reply within {within:?}"))
            .expect("read a reply")
            .expect("a reply, not the end of the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    async fn reply(&mut self) -> Value {
        self.reply_within(DEADLINE).await
    }

    /// One event, its reply.
    async fn send(&mut self, line: &str) -> Value {
        self.write(format!("{line}\n")).await;
        self.reply().await
    }

    /// Reads what is left; true when the daemon closed the connection (within DEADLINE).
    async fn closed(&mut self) -> Result<(), String> {
        match tokio::time::timeout(DEADLINE, self.lines.next_line()).await {
            Err(_) => Err("still open".into()),
            Ok(Ok(None)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(Some(l))) => Err(format!("unexpected reply {l}")),
        }
    }
}

fn assert_ok(v: &Value) -> u64 {
    assert_eq!(v["ok"], true, "expected an ack, got {v}");
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    v["seq"].as_u64().expect("seq")
}

fn assert_refused(v: &Value, code: &str, needle: &str) {
    assert_eq!(v["ok"], false, "expected a refusal, got {v}");
    assert_eq!(v["code"], code, "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "error {msg:?} should contain {needle:?}"
    );
}

/// One HTTP/1.1 request over the socket, written by hand; returns (status, body).
async fn http_unix(
    path: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = UnixStream::connect(path).await.expect("connect");
    let mut req = format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("HTTP reply in time")
        .unwrap();
    let text = String::from_utf8(out).expect("UTF-8 reply");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends one event over a fresh connection and returns its sequence number: every event stored
/// before it has a smaller one, so it counts what was stored.
async fn sentinel(socket: &Path, text: &str) -> u64 {
    let mut c = Nd::connect(socket).await;
    assert_ok(&c.send(text).await)
}

// ---------------------------------------------------------------------------------------------
// NDJSON and HTTP on one socket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_answers_each_line_in_order_and_events_arrive_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let mut c = Nd::connect(&d.socket()).await;
    // Odd spacing, escapes, numbers serde would rewrite, CRLF, blank lines; some lines refused.
    let good = [
        r#"{ "model" : "gpt-4o",  "input":"hello \u00e9", "cost": 1.50 }"#,
        r#"{"model":"gpt-4o","output":"line two","n":1e3}"#,
        r#"{"model":"claude","tags":["a","b"]}"#,
        r#"{"last":true}"#,
    ];
    let input = format!(
        "{}\n{}\r\n\n{{\"broken\"\n[1,2]\n\"a string\"\n{}\n   \n[{{\"in\":\"array\"}}]\n{}\n",
        good[0], good[1], good[2], good[3]
    );
    // All of it at once: replies are pipelined and come back in order.
    c.write(&input).await;
    let r: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(c.reply().await);
        }
        v
    };
    let seqs = [
        assert_ok(&r[0]),
        assert_ok(&r[1]),
        assert_ok(&r[5]),
        assert_ok(&r[7]),
    ];
    assert_eq!(seqs, [0, 1, 2, 3], "acks come in line order: {r:?}");
    // Refusals name the line as the client counts them (blank lines count).
    assert_refused(&r[2], "invalid_json", "line 4");
    assert_refused(&r[3], "invalid_json", "line 5");
    assert_refused(&r[4], "invalid_json", "line 6");
    assert_refused(&r[6], "invalid_json", "line 9");
    let got = mock.wait_arrived(&good.map(String::from)).await;
    assert_eq!(
        got,
        good.map(String::from).to_vec(),
        "exactly the accepted lines, byte for byte"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_starting_with_a_byte_order_mark_is_stored_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let mut c = Nd::connect(&d.socket()).await;
    // What a Windows tool writes first ("UTF-8 with BOM"), then a BOM on a later line too.
    let first = r#"{"model":"gpt-4o","input":"from windows"}"#;
    let later = r#"{"model":"gpt-4o","input":"bom again"}"#;
    c.write(format!("\u{feff}{first}\r\n\u{feff}{later}\n"))
        .await;
    assert_ok(&c.reply().await);
    assert_ok(&c.reply().await);
    let want = [first.to_string(), later.to_string()];
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want, "the events as sent, without the byte order mark");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_on_the_socket_serves_the_loopback_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let sock = d.socket();
    let json_ct = [("Content-Type", "application/json")];

    let native = r#"{"model":"gpt-4o", "input":"over http on the socket"}"#;
    let (s, b) = http_unix(&sock, "POST", "/v1/events", &json_ct, native).await;
    assert_eq!(s, 202, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["accepted"], 1, "{v}");

    // NDJSON body over HTTP, as on loopback.
    let nd = "{\"k\":1}\n{\"k\":2}\n";
    let (s, b) = http_unix(
        &sock,
        "POST",
        "/v1/events",
        &[("Content-Type", "application/x-ndjson")],
        nd,
    )
    .await;
    assert_eq!(s, 202, "{b}");

    // The Pezzo and PromptLayer routes, with bodies their official clients sent.
    let fixture = |name: &str| -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/clients")
            .join(name);
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let pz = fixture("pezzo_node-report-success.json");
    let pz_body = serde_json::to_string(&pz["body"]).unwrap();
    let (s, b) = http_unix(
        &sock,
        "POST",
        pz["path"].as_str().unwrap(),
        &[
            ("Content-Type", "application/json"),
            ("X-Pezzo-Api-Key", "pez_test_api_key_0123456789"),
            ("X-Pezzo-Project-Id", "test-project-id"),
        ],
        &pz_body,
    )
    .await;
    assert_eq!(s, 201, "Pezzo report over the socket: {b}");
    let pl = fixture("promptlayer_py-log-request-openai.json");
    let pl_body = serde_json::to_string(&pl["body"]).unwrap();
    let (s, b) = http_unix(
        &sock,
        "POST",
        pl["path"].as_str().unwrap(),
        &[
            ("Content-Type", "application/json"),
            ("X-API-KEY", "pl_test_api_key_0123456789"),
        ],
        &pl_body,
    )
    .await;
    assert_eq!(s, 201, "PromptLayer /log-request over the socket: {b}");

    // Ops endpoints too; a bad request gets the same error as on loopback.
    let (s, _) = http_unix(&sock, "GET", "/healthz", &[], "").await;
    assert_eq!(s, 200);
    let (s, b) = http_unix(&sock, "POST", "/v1/events", &json_ct, "{\"a\":").await;
    assert_eq!(s, 400, "{b}");

    // curl, as the README shows it.
    if which("curl").is_some() {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--unix-socket"])
            .arg(&sock)
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"via":"curl"}"#,
            ])
            .arg("http://localhost/v1/events")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["accepted"], 1, "{v}");
    } else {
        println!("curl not installed: skipping the curl check");
    }

    let mut want = vec![
        native.to_string(),
        "{\"k\":1}".into(),
        "{\"k\":2}".into(),
        pz_body,
        pl_body,
    ];
    if which("curl").is_some() {
        want.push(r#"{"via":"curl"}"#.into());
    }
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got.len(), want.len(), "nothing else arrived: {got:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_at_once_from_many_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let sock = d.socket();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let sock = sock.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..20 {
                let ev = format!("{{\"client\":{c},\"i\":{i}}}");
                if (c + i) % 2 == 0 {
                    let mut nd = Nd::connect(&sock).await;
                    assert_ok(&nd.send(&ev).await);
                } else {
                    let (s, b) = http_unix(&sock, "POST", "/v1/events", &[], &ev).await;
                    assert_eq!(s, 202, "{b}");
                }
                sent.push(ev);
            }
            sent
        }));
    }
    let mut want = Vec::new();
    for t in tasks {
        want.extend(t.await.unwrap());
    }
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got.len(), want.len());
    d.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The socket file: mode, group, stale files, one daemon per socket and data dir

fn gid_of(group: &str) -> Option<u32> {
    let c = std::ffi::CString::new(group).unwrap();
    // SAFETY: getgrnam returns null or a pointer to static storage, read at once.
    unsafe {
        let g = libc::getgrnam(c.as_ptr());
        (!g.is_null()).then(|| (*g).gr_gid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_and_group_follow_the_config_and_the_file_goes_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "default mode");
    let path = d.socket();
    d.stop().await;
    assert!(!path.exists(), "the daemon removes its socket file at stop");

    // Some group other than ours, present on any Debian-like system.
    let group = ["daemon", "nogroup", "bin"]
        .into_iter()
        .find(|g| gid_of(g).is_some())
        .expect("a system group");
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(
        dir.path(),
        &format!("[server]\nsocket_mode = \"0640\"\nsocket_group = \"{group}\"\n"),
    )
    .await;
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(Some(meta.gid()), gid_of(group), "socket_group = {group}");
    d.stop().await;
}

/// Runs `llmlogd run` expecting it to refuse to start; returns (exit code, stderr).
fn run_refused(dir: &Path, config: &str, data_dir: &Path, socket: &Path) -> (Option<i32>, String) {
    let cfg = dir.join("refused.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--unix-socket")
        .arg(socket)
        .args(["--http-listen", "127.0.0.1:0"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("llmlogd did not refuse to start within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_refuses_with_one_line_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let first = Process::start(dir.path(), "");
    let pid = first.child.id();
    let sock = dir.path().join("llmlogd.sock");

    // Same data dir, another socket.
    let (code, err) = run_refused(
        other.path(),
        "",
        &dir.path().join("data"),
        &other.path().join("b.sock"),
    );
    assert_ne!(code, Some(0), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains(&format!("pid {pid}")),
        "names the other daemon: {err}"
    );
    assert!(
        err.contains(&dir.path().join("data").display().to_string()),
        "names the data dir: {err}"
    );
    assert!(
        !other.path().join("b.sock").exists(),
        "left no socket behind"
    );

    // Another data dir, the same socket.
    let (code, err) = run_refused(other.path(), "", &other.path().join("data"), &sock);
    assert_ne!(code, Some(0), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains(&sock.display().to_string()),
        "names the socket: {err}"
    );
    assert!(err.contains("another running llmlogd"), "{err}");
    assert!(
        err.contains(&format!("pid {pid}")),
        "names the other daemon: {err}"
    );

    // The first one is untouched: its socket still answers.
    assert!(sock.exists());
    let mut c = Nd::connect(&sock).await;
    assert_ok(&c.send("{\"still\":\"here\"}").await);
    drop(c);

    // kill -9 leaves a stale socket file; the next start removes it and serves.
    first.kill9();
    assert!(sock.exists(), "a killed daemon leaves its socket file");
    let second = Process::start(dir.path(), "");
    let mut c = Nd::connect(&sock).await;
    assert_ok(&c.send("{\"after\":\"restart\"}").await);
    drop(c);
    assert!(second.terminate().success());
}

#[test]
fn a_path_that_is_not_a_socket_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let (code, err) = run_refused(dir.path(), "", &dir.path().join("data"), &precious);
    assert_ne!(code, Some(0), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

#[test]
fn an_unknown_socket_group_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run_refused(
        dir.path(),
        "[server]\nsocket_group = \"no-such-group-llmlogd\"\n",
        &dir.path().join("data"),
        &dir.path().join("s.sock"),
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("no-such-group-llmlogd"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
}

// ---------------------------------------------------------------------------------------------
// Clients that misbehave don't hurt the others

/// Well-behaved clients: each sends `each` events one at a time on its own NDJSON connection,
/// and as many over HTTP on the socket, and must get every ack within PROMPT. Returns the
/// events sent and the slowest ack seen.
async fn good_clients(
    sock: &Path,
    tag: &str,
    clients: usize,
    each: usize,
) -> (Vec<String>, Duration) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sock = sock.to_path_buf();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut nd = tokio::time::timeout(PROMPT, Nd::connect(&sock))
                .await
                .expect("connected promptly");
            for i in 0..each {
                let ev = format!("{{\"good\":\"{tag}\",\"c\":{c},\"i\":{i}}}");
                let t = Instant::now();
                nd.write(format!("{ev}\n")).await;
                assert_ok(&nd.reply_within(PROMPT).await);
                slowest = slowest.max(t.elapsed());
                sent.push(ev);

                let ev = format!("{{\"good\":\"{tag}\",\"c\":{c},\"i\":{i},\"via\":\"http\"}}");
                let t = Instant::now();
                let (s, b) =
                    tokio::time::timeout(PROMPT, http_unix(&sock, "POST", "/v1/events", &[], &ev))
                        .await
                        .expect("HTTP ack promptly");
                assert_eq!(s, 202, "{b}");
                slowest = slowest.max(t.elapsed());
                sent.push(ev);
            }
            (sent, slowest)
        }));
    }
    let mut all = Vec::new();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (s, w) = t.await.unwrap();
        all.extend(s);
        slowest = slowest.max(w);
    }
    (all, slowest)
}

/// A client that writes events as fast as it can and never reads a reply. Returns the task
/// (ending with the write error that stopped it) and a counter of bytes written.
fn hog(
    sock: PathBuf,
    h: usize,
) -> (
    tokio::task::JoinHandle<std::io::Error>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = written.clone();
    let task = tokio::spawn(async move {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        let mut i = 0u64;
        loop {
            let mut chunk = String::new();
            for _ in 0..100 {
                chunk.push_str(&format!(
                    "{{\"hog\":{h},\"i\":{i},\"pad\":\"{}\"}}\n",
                    "x".repeat(200)
                ));
                i += 1;
            }
            if let Err(e) = s.write_all(chunk.as_bytes()).await {
                return e;
            }
            w.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (task, written)
}

/// Waits until `counter` has not moved for half a second: the hog is blocked on a full socket.
async fn wait_stalled(counter: &std::sync::atomic::AtomicU64) {
    let load = || counter.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let before = load();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if before > 0 && load() == before {
            return;
        }
        assert!(Instant::now() < deadline, "the hog never blocked");
    }
}

const PATIENT: &str =
    "[server]\nheader_timeout = \"60s\"\nbody_timeout = \"60s\"\nidle_timeout = \"60s\"\n";
const IMPATIENT: &str = "[server]\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nidle_timeout = \"5s\"\nmax_line_bytes = \"1KiB\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_replies_or_stall_mid_line_stall_only_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // The misbehaving clients' timeouts are far longer than the good clients may wait.
    let d = InProcess::start(dir.path(), &format!("{PATIENT}{}", mock.sink_config())).await;
    let sock = d.socket();
    let mut hogs = Vec::new();
    for h in 0..3 {
        let (task, written) = hog(sock.clone(), h);
        wait_stalled(&written).await;
        hogs.push(task);
    }
    // Stalled mid-line, and silent after connecting (no first byte yet).
    let mut half = Nd::connect(&sock).await;
    half.write("{\"model\":\"half a li").await;
    let silent = UnixStream::connect(&sock).await.unwrap();
    // An HTTP client that sent half its headers, and one that sent half its body.
    let mut half_head = UnixStream::connect(&sock).await.unwrap();
    half_head
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let mut half_body = UnixStream::connect(&sock).await.unwrap();
    half_body
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();

    let (sent, slowest) = good_clients(&sock, "busy", 4, 10).await;
    println!("slowest ack among good clients beside 3 hogs and 4 stalled clients: {slowest:?}");
    mock.wait_arrived(&sent).await;
    for h in &hogs {
        assert!(
            !h.is_finished(),
            "a hog is merely blocked, not cut, before body_timeout"
        );
    }
    // Nothing of the half line was stored.
    assert!(!mock.arrived().iter().any(|e| e.contains("half a li")));

    // Stopping is not held up by them either.
    let t = Instant::now();
    d.stop().await;
    println!("stop took {:?} with 3 hogs connected", t.elapsed());
    // app.rs gives connections 10 s before it gives up on them; they must not need it.
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "stop waited on misbehaving clients: {:?}",
        t.elapsed()
    );
    drop((half, silent, half_head, half_body));
    for h in hogs {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_disconnected_after_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), IMPATIENT).await;
    let (task, written) = hog(d.socket(), 0);
    wait_stalled(&written).await;
    let err = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the daemon cut the hog off")
        .unwrap();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    // And still serves.
    let mut c = Nd::connect(&d.socket()).await;
    assert_ok(&c.send("{\"after\":\"hog\"}").await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_must_complete_within_body_timeout_even_when_dripped() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &format!("{IMPATIENT}{}", mock.sink_config())).await;
    let sock = d.socket();

    // Stalled: half a line, then nothing.
    let mut c = Nd::connect(&sock).await;
    c.write("{\"stalled\":").await;
    assert_refused(&c.reply().await, "line_timeout", "line 1");
    c.closed().await.expect("closed after the timeout");

    // Dripped: a byte every 100 ms, so no single read waits 1 s, but the line takes 10 s.
    let line = format!("{{\"dripped\":\"{}\"}}\n", "d".repeat(85));
    let s = UnixStream::connect(&sock).await.unwrap();
    let (rd, mut wr) = s.into_split();
    let drip = tokio::spawn(async move {
        for b in line.as_bytes() {
            if wr.write_all(&[*b]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    });
    let mut lines = BufReader::new(rd).lines();
    let reply = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(&reply.expect("a reply")).unwrap();
    assert_refused(&v, "line_timeout", "line 1");
    drip.abort();

    // Neither was stored: the next event is the first one.
    assert_eq!(sentinel(&sock, "{\"sentinel\":1}").await, 0);
    let got = mock.wait_arrived(&["{\"sentinel\":1}".to_string()]).await;
    assert_eq!(got, vec!["{\"sentinel\":1}".to_string()]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_line_at_disconnect_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let sock = d.socket();

    // Half-close after half a line: the complete line is acked, the half one refused.
    let mut a = Nd::connect(&sock).await;
    a.write("{\"n\":1}\n{\"n\":2,\"half\":tr").await;
    a.wr.shutdown().await.unwrap();
    assert_ok(&a.reply().await);
    assert_refused(&a.reply().await, "incomplete_line", "line 2");
    a.closed().await.expect("closed after the input ended");

    // Vanish after half a line, without reading anything.
    let mut b = UnixStream::connect(&sock).await.unwrap();
    b.write_all(b"{\"n\":3}\n{\"n\":4,\"ha").await.unwrap();
    drop(b);

    // A line that ends with the input but without its newline is not an event either.
    let mut c = UnixStream::connect(&sock).await.unwrap();
    c.write_all(b"{\"n\":5}").await.unwrap();
    drop(c);

    let firsts = ["{\"n\":1}".to_string(), "{\"n\":3}".to_string()];
    mock.wait_arrived(&firsts).await;
    assert_eq!(
        sentinel(&sock, "{\"sentinel\":1}").await,
        2,
        "only n=1 and n=3 were stored"
    );
    let mut want = firsts.to_vec();
    want.push("{\"sentinel\":1}".into());
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_lines_are_refused_once_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(
        dir.path(),
        &format!(
            "[server]\nmax_line_bytes = \"1KiB\"\n{}",
            mock.sink_config()
        ),
    )
    .await;
    let mut c = Nd::connect(&d.socket()).await;
    let sized = |n: usize| {
        let e = format!("{{\"pad\":\"{}\"}}", "p".repeat(n - 10));
        assert_eq!(e.len(), n);
        e
    };
    // Exactly the limit: accepted (CRLF does not count).
    assert_ok(&c.send(&format!("{}\r", sized(1024))).await);
    // One byte over, arriving in one piece with its newline.
    assert_refused(
        &c.send(&sized(1025)).await,
        "too_large",
        "line 2 exceeds 1024 bytes",
    );
    // Far over, arriving over many reads: refused once, not once per read.
    c.write(sized(300_000)).await;
    c.write("\n{\"next\":1}\n").await;
    assert_refused(&c.reply().await, "too_large", "line 3");
    let v = c.reply().await;
    assert_ok(&v);
    assert_eq!(v["seq"], 1);
    let want = [sized(1024), "{\"next\":1}".to_string()];
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want.to_vec());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_idle_timeout_and_a_busy_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let idle = Duration::from_secs(1);
    let d = InProcess::start(
        dir.path(),
        &format!("[server]\nidle_timeout = \"1s\"\n{}", mock.sink_config()),
    )
    .await;
    let sock = d.socket();

    // Busy: a line every 300 ms for three idle timeouts; every one is answered.
    let mut busy = Nd::connect(&sock).await;
    let mut quiet = Nd::connect(&sock).await;
    assert_ok(&quiet.send("{\"quiet\":1}").await);
    let quiet_since = Instant::now();
    let mut want = vec!["{\"quiet\":1}".to_string()];
    for i in 0..10 {
        let line = format!("{{\"busy\":{i}}}");
        assert_ok(&busy.send(&line).await);
        want.push(line);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Quiet since its ack: closed, and not before `idle_timeout`.
    quiet.closed().await.expect("the idle connection is closed");
    assert!(quiet_since.elapsed() >= idle, "closed before idle_timeout");
    // The busy one is still served.
    assert_ok(&busy.send("{\"busy\":\"last\"}").await);
    want.push("{\"busy\":\"last\"}".into());
    let mut got = mock.wait_arrived(&want).await;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    d.stop().await;
}

/// An app may connect at start and log its first event later: until its first byte a
/// connection is idle, and `idle_timeout` applies, not `header_timeout` (once, the daemon
/// dropped such a connection after `header_timeout` and the app's first write got EPIPE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_waits_idle_timeout_for_its_first_line_not_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let idle = Duration::from_secs(3);
    let d = InProcess::start(
        dir.path(),
        &format!(
            "[server]\nheader_timeout = \"1s\"\nidle_timeout = \"3s\"\n{}",
            mock.sink_config()
        ),
    )
    .await;
    let sock = d.socket();
    let mut late = Nd::connect(&sock).await;
    let mut silent = Nd::connect(&sock).await;
    let since = Instant::now();
    // Past header_timeout (the scenario itself, not a wait for readiness).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ok(&late.send("{\"first\":\"late\"}").await);
    // One that never sends is still closed, once idle_timeout is over.
    silent
        .closed()
        .await
        .expect("the silent connection is closed");
    assert!(since.elapsed() >= idle, "closed before idle_timeout");
    mock.wait_arrived(&["{\"first\":\"late\"}".to_string()])
        .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_burst_past_the_reply_budget_is_answered_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // Lines far below the limit, but more of them than a connection answers at once (1,024)
    // and more bytes waiting behind those than one line may have.
    let d = InProcess::start(
        dir.path(),
        &format!(
            "[server]\nmax_line_bytes = \"1KiB\"\n{}",
            mock.sink_config()
        ),
    )
    .await;
    let mut c = Nd::connect(&d.socket()).await;
    let lines: Vec<String> = (0..1500).map(|i| format!("{{\"burst\":{i}}}")).collect();
    let mut all = lines.join("\n");
    all.push('\n');
    c.write(all).await;
    // End of input right behind them: the daemon still answers every line before it closes.
    c.wr.shutdown().await.unwrap();
    let mut last = None;
    for (i, _) in lines.iter().enumerate() {
        let v = c.reply().await;
        let seq = assert_ok(&v);
        assert!(
            last.is_none_or(|l| seq == l + 1),
            "reply {i}: seq {seq} after {last:?}"
        );
        last = Some(seq);
    }
    c.closed().await.expect("closed after the last reply");
    // Stored in line order (the seqs above); delivered in concurrent batches, so compared as
    // a set.
    let mut got = mock.wait_arrived(&lines).await;
    got.sort();
    let mut want = lines.clone();
    want.sort();
    assert_eq!(got, want);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_the_socket_and_waiting_clients_get_in_when_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &format!("{PATIENT}max_connections = 4\n")).await;
    let sock = d.socket();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = Nd::connect(&sock).await;
        assert_ok(&c.send("{\"held\":true}").await);
        held.push(c);
    }
    // The fifth connects (the kernel queues it) but is not served while four are open.
    let mut fifth = Nd::connect(&sock).await;
    fifth.write("{\"fifth\":true}\n").await;
    let waited = tokio::time::timeout(Duration::from_millis(500), fifth.lines.next_line()).await;
    assert!(waited.is_err(), "served beyond max_connections: {waited:?}");
    // One leaves: the fifth gets in and gets its ack.
    drop(held.pop());
    assert_ok(&fifth.reply().await);
    drop(held);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_mid_stream_answers_what_was_read_and_every_ack_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let s = UnixStream::connect(d.socket()).await.unwrap();
    let (rd, mut wr) = s.into_split();
    let line = |i: usize| format!("{{\"stream\":{i}}}");
    let writer = tokio::spawn(async move {
        for i in 0..5000 {
            if wr
                .write_all(format!("{}\n", line(i)).as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut replies = BufReader::new(rd).lines();
    let first = replies.next_line().await.unwrap().expect("a first reply");
    assert!(first.contains("\"ok\":true"), "{first}");
    let stopping = tokio::spawn(d.stop());
    // Replies go on for what was read, then the connection ends.
    let mut acked = vec![line(0)];
    loop {
        match tokio::time::timeout(DEADLINE, replies.next_line()).await {
            Err(_) => panic!("the connection did not end after stop"),
            Ok(Ok(Some(r))) => {
                let v: Value = serde_json::from_str(&r).unwrap();
                if v["ok"] == true {
                    assert_eq!(acked.len(), v["seq"].as_u64().unwrap() as usize, "{r}");
                    acked.push(line(acked.len()));
                } else {
                    // Nothing after a refusal is acked.
                    assert_eq!(v["status"], 503, "{r}");
                }
            }
            Ok(_) => break,
        }
    }
    stopping.await.unwrap();
    writer.abort();
    println!(
        "{} of 5000 pipelined lines acked before the stop",
        acked.len()
    );
    // Every ack was durable: after a restart, all of them arrive.
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    mock.wait_arrived(&acked).await;
    d.stop().await;
}

// ---------------------------------------------------------------------------------------------
// llmlogd send

/// Runs `llmlogd send ARGS` with `stdin`, off the runtime; panics if it runs past DEADLINE.
async fn send_cli(args: Vec<String>, stdin: Vec<u8>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(bin())
            .arg("send")
            .args(&args)
            .env_remove("LLMLOGD_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("llmlogd send {args:?} still running after {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = writer.join();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn sock_arg(p: &Path) -> Vec<String> {
    vec!["--socket".into(), p.display().to_string()]
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_stores_ndjson_and_names_each_refused_line() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let good = [
        r#"{"model":"gpt-4o", "cost":1.50,"s":"\u00e9"}"#,
        r#"{"second":true}"#,
        r#"{"third":[1,2,3]}"#,
    ];
    let input = format!("{}\n\n{{\"bad\"\n{}\n[1]\n{}\n", good[0], good[1], good[2]);
    let out = send_cli(sock_arg(&d.socket()), input.into_bytes()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("event 2 (line 3): refused: the event is not valid JSON"),
        "{err}"
    );
    assert!(
        err.contains("event 4 (line 5): refused: the event must be a JSON object"),
        "{err}"
    );
    assert!(err.contains("2 of 5 events refused"), "{err}");
    let want = good.map(String::from);
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want.to_vec(), "the good lines, byte for byte");

    // All good: exit 0.
    let out = send_cli(
        sock_arg(&d.socket()),
        b"{\"fourth\":4}\n{\"fifth\":5}".to_vec(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "silent on success, for cron");
    d.stop().await;
}

/// The socket reads a connection that starts with a capital letter as HTTP. Input whose first
/// line does (a text file's "Error: …") had the daemon answer one bad HTTP request and close:
/// every event reported unanswered, exit 69, none stored. The line is refused, the rest sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_input_whose_first_line_starts_with_a_capital_is_still_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let input = b"Error: not an event\n{\"after\":1}\nPOST / HTTP/1.1\n{\"after\":2}\n".to_vec();
    let out = send_cli(sock_arg(&d.socket()), input).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("event 1 (line 1): refused: the event must be a JSON object"),
        "{err}"
    );
    assert!(
        err.contains("event 3 (line 3): refused: the event must be a JSON object"),
        "{err}"
    );
    assert!(err.contains("2 of 4 events refused"), "{err}");
    let want = [r#"{"after":1}"#.to_string(), r#"{"after":2}"#.to_string()];
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want.to_vec());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_takes_a_json_document_from_a_file_and_keeps_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    // A pretty-printed array: numbers and escapes as written; only the newlines go.
    let file = dir.path().join("events.json");
    std::fs::write(
        &file,
        "[\n  {\"a\": 1.50, \"s\": \"caf\\u00e9\"},\n  {\n    \"b\": [1e3, 2]\n  }\r\n]\n",
    )
    .unwrap();
    let mut args = sock_arg(&d.socket());
    args.push(file.display().to_string());
    let out = send_cli(args, Vec::new()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let want = [
        "{\"a\": 1.50, \"s\": \"caf\\u00e9\"}".to_string(),
        "{    \"b\": [1e3, 2]  }".to_string(),
    ];
    let got = mock.wait_arrived(&want).await;
    assert_eq!(got, want.to_vec());

    // One object; "-" is stdin.
    let mut args = sock_arg(&d.socket());
    args.push("-".into());
    let out = send_cli(args, b"  {\"one\": \"object\"}  \n".to_vec()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    mock.wait_arrived(&["{\"one\": \"object\"}".to_string()])
        .await;

    // Nothing to send is a usage error.
    let out = send_cli(sock_arg(&d.socket()), b"\n  \n".to_vec()).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    d.stop().await;
}

/// Pretty-printed JSON: a broken document is refused whole (once, it went line by line and
/// the elements of a broken array were stored), and documents one after another, as `jq`
/// prints them, are one event each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refuses_a_broken_document_whole_and_takes_documents_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let file = dir.path().join("broken.json");
    // A comma missing between the elements; the `{}` on its own line is part of the first.
    std::fs::write(
        &file,
        "[\n  {\"broken\": 1, \"t\": [\n    {}\n  ]}\n  {\"broken\": 2}\n]\n",
    )
    .unwrap();
    let mut args = sock_arg(&d.socket());
    args.push(file.display().to_string());
    let out = send_cli(args, Vec::new()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "llmlogd: {} is not valid JSON: expected `,` or `]` at line 5 column 3; nothing was sent",
            file.display()
        )
    );

    let jq = "{\n  \"jq\": 1,\n  \"t\": [\n    {}\n  ]\n}\n{\n  \"jq\": 2\n}\n";
    let out = send_cli(sock_arg(&d.socket()), jq.as_bytes().to_vec()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let want = [
        "{  \"jq\": 1,  \"t\": [    {}  ]}".to_string(),
        "{  \"jq\": 2}".to_string(),
    ];
    let got = mock.wait_arrived(&want).await;
    assert_eq!(
        got,
        want.to_vec(),
        "the two documents, and nothing of the broken one"
    );
    d.stop().await;
}

/// `send` streams: 128 MiB of NDJSON through it, and its peak memory stays a small fraction
/// of that (it read all its input into memory first, then made a second copy to send). A
/// stand-in daemon acks every line without storing it, so the test is quick; it reads the
/// peak (`VmHWM`) once the input has all arrived, while `send` waits for the last ack.
#[test]
fn send_streams_a_large_input_in_bounded_memory() {
    const LINE: usize = 1024;
    const LINES: usize = 128 << 10;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("acks.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut child = Command::new(bin())
        .arg("send")
        .args(sock_arg(&sock))
        .env_remove("LLMLOGD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let daemon = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let (s, _) = listener.accept().unwrap();
        let mut acks = std::io::BufWriter::new(s.try_clone().unwrap());
        let mut lines = std::io::BufReader::new(s);
        let (mut n, mut line) = (0usize, Vec::new());
        loop {
            line.clear();
            if lines.read_until(b'\n', &mut line).unwrap() == 0 {
                break;
            }
            assert_eq!(line.len(), LINE, "line {n} arrived whole");
            // Each line's ack goes with the next line: the last one waits for the peak.
            if n > 0 {
                writeln!(acks, "{{\"ok\":true,\"id\":\"x\",\"seq\":{}}}", n - 1).unwrap();
            }
            n += 1;
            if lines.buffer().is_empty() {
                acks.flush().unwrap();
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let peak_kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in kB");
        if n > 0 {
            writeln!(acks, "{{\"ok\":true,\"id\":\"x\",\"seq\":{}}}", n - 1).unwrap();
        }
        acks.flush().unwrap();
        (n, peak_kb * 1024)
    });
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let mut line = format!(
            "{{\"model\":\"m\",\"n\":0,\"pad\":\"{}\"}}",
            "x".repeat(LINE)
        );
        line.truncate(LINE - 3);
        line.push_str("\"}\n");
        let chunk = line.repeat(64);
        for _ in 0..LINES / 64 {
            if stdin.write_all(chunk.as_bytes()).is_err() {
                break; // send is gone: its status says why
            }
        }
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    feeder.join().unwrap();
    assert!(status.success(), "send failed ({status:?}): {err}");
    let (lines, peak) = daemon.join().unwrap();
    assert_eq!(lines, LINES, "every line sent once");
    eprintln!(
        "send: {} MiB of input, peak RSS {} MiB",
        (LINE * LINES) >> 20,
        peak >> 20
    );
    assert!(
        peak < 40 << 20,
        "peak RSS {} MiB for {} MiB of input",
        peak >> 20,
        (LINE * LINES) >> 20
    );
}

/// A bad option is a usage error: exit 64 (EX_USAGE), as the CLI documents, not clap's 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_a_bad_option_exits_64_naming_it() {
    for bad in [
        ["--timeout", "0"],
        ["--timeout", "soon"],
        ["--no-such", "x"],
    ] {
        let out = send_cli(bad.map(String::from).to_vec(), Vec::new()).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {err}");
        assert!(
            err.starts_with("llmlogd: ") && err.contains(bad[0]),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let out = send_cli(vec!["--help".into()], Vec::new()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_without_a_daemon_exits_69_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = send_cli(sock_arg(&sock), b"{\"a\":1}\n".to_vec()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("is it running?"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// A stand-in daemon that acks the first `answer` lines of its first connection, then either
/// hangs up or goes silent.
fn fake_daemon(path: &Path, answer: usize, hang_up: bool) -> std::thread::JoinHandle<()> {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        for i in 0..answer {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            writeln!(w, "{{\"ok\":true,\"id\":\"fake{i}\",\"seq\":{i}}}").unwrap();
        }
        if !hang_up {
            // Silent but connected, until the client gives up (and the test ends).
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut r, &mut rest);
            std::thread::sleep(DEADLINE);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_does_not_hang_when_the_daemon_goes_away_or_goes_silent() {
    let dir = tempfile::tempdir().unwrap();
    let input = b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n".to_vec();

    let sock = dir.path().join("dies.sock");
    let fake = fake_daemon(&sock, 1, true);
    let out = send_cli(sock_arg(&sock), input.clone()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(
            "2 of 3 events got no answer, from event 2 (line 2) on: llmlogd closed the connection"
        ),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    fake.join().unwrap();

    let sock = dir.path().join("silent.sock");
    let _fake = fake_daemon(&sock, 1, false);
    let mut args = sock_arg(&sock);
    args.extend(["--timeout".to_string(), "1s".to_string()]);
    let out = send_cli(args, input).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("2 of 3 events got no answer, from event 2 (line 2) on: no answer within 1s"),
        "{err}"
    );
}

/// A daemon that takes no connection (hung, or at `max_connections` with its listen queue
/// full): `--timeout` bounds the connect too. (Once, a connect to a full queue waited forever,
/// and so did the cron job.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_gives_up_on_a_socket_that_takes_no_connection_within_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("full.sock");
    // A listener that never accepts, with a queue of one, taken by another client.
    let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    l.bind(&socket2::SockAddr::unix(&sock).unwrap()).unwrap();
    l.listen(0).unwrap();
    let mut waiting = Vec::new();
    loop {
        let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        c.set_nonblocking(true).unwrap();
        match c.connect(&socket2::SockAddr::unix(&sock).unwrap()) {
            Ok(()) => waiting.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the listen queue: {e}"),
        }
        assert!(waiting.len() < 64, "the listen queue never filled");
    }
    let mut args = sock_arg(&sock);
    args.extend(["--timeout".to_string(), "1s".to_string()]);
    let started = Instant::now();
    let out = send_cli(args, b"{\"a\":1}\n".to_vec()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "llmlogd: llmlogd at {} took no connection within 1s: it is hung, or serving server.max_connections with more waiting",
            sock.display()
        )
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "gave up early");
    drop(l);
}

// ---------------------------------------------------------------------------------------------
// The client snippets (examples/clients/, shown in README.md)

struct Snippet {
    name: &'static str,
    file: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    /// Besides the program itself.
    also_needs: &'static [&'static str],
    /// Must be runnable when CI is set.
    required_in_ci: bool,
}

const SNIPPETS: &[Snippet] = &[
    Snippet {
        name: "python",
        file: "python.py",
        program: "python3",
        args: &[],
        also_needs: &[],
        required_in_ci: true,
    },
    Snippet {
        name: "node",
        file: "node.mjs",
        program: "node",
        args: &[],
        also_needs: &[],
        required_in_ci: true,
    },
    Snippet {
        name: "shell",
        file: "shell.sh",
        program: "sh",
        args: &[],
        also_needs: &["curl"],
        required_in_ci: true,
    },
    Snippet {
        name: "go",
        file: "go/main.go",
        program: "go",
        args: &["run"],
        also_needs: &[],
        required_in_ci: false,
    },
    Snippet {
        name: "ruby",
        file: "ruby.rb",
        program: "ruby",
        args: &[],
        also_needs: &[],
        required_in_ci: false,
    },
];

fn snippet_path(s: &Snippet) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/clients")
        .join(s.file)
}

/// The snippets this machine can run; fails under CI when a required one cannot run.
fn runnable_snippets() -> Vec<&'static Snippet> {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    SNIPPETS
        .iter()
        .filter(|s| {
            let missing: Vec<&str> = std::iter::once(s.program)
                .chain(s.also_needs.iter().copied())
                .filter(|p| which(p).is_none())
                .collect();
            if missing.is_empty() {
                return true;
            }
            assert!(
                !(ci && s.required_in_ci),
                "CI must run the {} snippet, but {missing:?} is not installed",
                s.name
            );
            println!("skipping the {} snippet: {missing:?} not installed", s.name);
            false
        })
        .collect()
}

fn run_snippet(s: &Snippet, socket: &Path, scratch: &Path) -> Output {
    let mut cmd = Command::new(s.program);
    cmd.args(s.args)
        .arg(snippet_path(s))
        .env("LLMLOGD_SOCKET", socket)
        // Go's caches, away from $HOME.
        .env("GOCACHE", scratch.join("gocache"))
        .env("GOPATH", scratch.join("gopath"))
        .stdin(Stdio::null());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the {} snippet ran past {DEADLINE:?}", s.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snippets_log_their_events_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let snippets = runnable_snippets();
    for s in &snippets {
        let (sock, scratch) = (d.socket(), dir.path().to_path_buf());
        let s2: &'static Snippet = s;
        let out = tokio::task::spawn_blocking(move || run_snippet(s2, &sock, &scratch))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "the {} snippet failed: {}\n{}",
            s.name,
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("stored"), "{}: {stdout}", s.name);
    }
    // Each sent its two events, and nothing else arrived.
    let mut want = Vec::new();
    for s in &snippets {
        for (input, output) in [("What is 2+2?", "4"), ("And 3+3?", "6")] {
            want.push(
                json!({"model": "gpt-4o", "input": input, "output": output, "client": s.name}),
            );
        }
    }
    let got = wait_for(DEADLINE, "the snippets' events", || {
        let all: Vec<Value> = mock
            .arrived()
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        (all.len() >= want.len()).then_some(all)
    })
    .await;
    for w in &want {
        assert_eq!(
            got.iter().filter(|g| *g == w).count(),
            1,
            "{w} arrived once: {got:?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
    d.stop().await;
}

/// A stand-in daemon that refuses everything: NDJSON lines with `{"ok":false}`, HTTP requests
/// with a 400 and the daemon's error body.
fn refusing_daemon(path: &Path) {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
                    if line.starts_with(|c: char| c.is_ascii_uppercase()) {
                        // HTTP: skip to the end of the headers, answer, close.
                        while line != "\r\n" {
                            line.clear();
                            if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        let body = r#"{"success":false,"message":"boom","error":{"code":"invalid_json","message":"boom"}}"#;
                        let _ = write!(
                            w,
                            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                    let _ = writeln!(
                        w,
                        r#"{{"ok":false,"error":"boom","code":"invalid_json","status":400}}"#
                    );
                    line.clear();
                }
            });
        }
    });
}

#[test]
fn snippets_exit_non_zero_when_refused_or_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let refusing = dir.path().join("refusing.sock");
    refusing_daemon(&refusing);
    let nobody = dir.path().join("nobody.sock");
    for s in runnable_snippets() {
        let out = run_snippet(s, &refusing, dir.path());
        assert!(
            !out.status.success(),
            "the {} snippet ignored a refusal",
            s.name
        );
        assert!(
            stderr(&out).contains("boom"),
            "the {} snippet should print the error: {}",
            s.name,
            stderr(&out)
        );
        let out = run_snippet(s, &nobody, dir.path());
        assert!(
            !out.status.success(),
            "the {} snippet succeeded without a daemon",
            s.name
        );
    }
}

#[test]
fn the_readme_shows_each_snippet_verbatim() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for s in SNIPPETS {
        let code = std::fs::read_to_string(snippet_path(s)).unwrap();
        assert!(
            readme.contains(&code),
            "README.md does not show examples/clients/{} verbatim",
            s.file
        );
    }
}
