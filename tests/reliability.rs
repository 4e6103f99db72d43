//! Reliability: crash loops, bounded resources, disk full, hostile input, disk space.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::util::*;

fn sink(mock: &impl Target) -> String {
    format!(
        "[sinks.m]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"5ms\"\nretry_initial = \"20ms\"\nretry_max = \"200ms\"\n",
        mock.url("/in")
    )
}

async fn metric(url: &str, line_prefix: &str) -> Option<f64> {
    let text = client().get(url).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Posts unique events over HTTP until `stop`, recording the acknowledged ones.
async fn http_writer(
    url: String,
    tag: String,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let http = client();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
        let body = format!("{{\"w\":\"{tag}\",\"i\":{i}}}");
        i += 1;
        match http
            .post(&url)
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(5))
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status() == 202 => acked.lock().unwrap().push(body),
            Ok(_) => {}
            Err(_) => return, // daemon killed
        }
    }
}

/// The same over the Unix socket, NDJSON, waiting for each ack.
async fn socket_writer(
    path: std::path::PathBuf,
    tag: String,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let Ok(s) = tokio::net::UnixStream::connect(&path).await else {
        return;
    };
    let (rd, mut wr) = s.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
        let body = format!("{{\"w\":\"{tag}\",\"i\":{i}}}");
        i += 1;
        if wr.write_all(format!("{body}\n").as_bytes()).await.is_err() {
            return;
        }
        match lines.next_line().await {
            Ok(Some(l)) if l.contains("\"ok\":true") => acked.lock().unwrap().push(body),
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// N rounds of concurrent ingest (HTTP and socket), SIGKILL at a random moment, restart;
/// at the end every acknowledged event has arrived. Duplicates are counted and reported.
/// `LLMLOGD_CRASH_ROUNDS` sets N (CI: 3; `make crash-loop`: 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_no_acknowledged_event() {
    let rounds: usize = std::env::var("LLMLOGD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // A slightly slow endpoint keeps deliveries in flight when the kill lands.
    mock.default_answer(Answer::Delay(Duration::from_millis(5)));
    let cfg = sink(&mock) + "batch_max_events = 50\n";
    let acked = Arc::new(Mutex::new(Vec::new()));
    for round in 0..rounds {
        let p = Process::start(dir.path(), &cfg);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..3 {
            tasks.push(tokio::spawn(http_writer(
                p.url("/v1/events"),
                format!("r{round}h{w}"),
                acked.clone(),
                stop.clone(),
            )));
        }
        for w in 0..2 {
            tasks.push(tokio::spawn(socket_writer(
                dir.path().join("llmlogd.sock"),
                format!("r{round}s{w}"),
                acked.clone(),
                stop.clone(),
            )));
        }
        let wait = rand::thread_rng().gen_range(100..700);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        p.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    }
    let p = Process::start(dir.path(), &cfg);
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "the load did run: {} acked", acked.len());
    let counts = wait_for(
        Duration::from_secs(120),
        "every acknowledged event at the endpoint",
        || {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for r in mock.received() {
                for e in r.raw_events() {
                    *counts.entry(e).or_default() += 1;
                }
            }
            acked
                .iter()
                .all(|a| counts.contains_key(a))
                .then_some(counts)
        },
    )
    .await;
    let dupes: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "crash loop: {rounds} rounds, {} acknowledged, all delivered, {dupes} duplicate deliveries ({:.2} %)",
        acked.len(),
        100.0 * dupes as f64 / acked.len() as f64
    );
    assert!(p.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_503_then_drops_oldest_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    // The sink's endpoint is closed: events stay queued.
    let port = MockSink::closed();
    let cfg = sink(&port) + "[queue]\nmax_events = 5\n";
    let d = InProcess::start(dir.path(), &cfg).await;
    for i in 0..5 {
        let (s, v) = post_json(&d.url("/v1/events"), &format!("{{\"i\":{i}}}")).await;
        assert_eq!(s, 202, "{v}");
    }
    let r = client()
        .post(d.url("/v1/events"))
        .header("content-type", "application/json")
        .body("{\"i\":5}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("max_events"), "{v}");
    // NDJSON says so per line; `send` exits non-zero naming the event.
    let s = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let (rd, mut wr) = s.into_split();
    wr.write_all(b"{\"i\":6}\n").await.unwrap();
    let line = BufReader::new(rd)
        .lines()
        .next_line()
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["status"], 503, "{v}");
    let send = |input: &'static [u8]| {
        let sock = d.socket();
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new(bin())
                .args(["send", "--socket"])
                .arg(sock)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(input).unwrap();
            c.wait_with_output().unwrap()
        })
    };
    // Refused only for now: EX_TEMPFAIL (75), so a script knows to send it again later.
    let out = send(b"{\"i\":7}\n").await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("event 1") && err.contains("full"), "{err}");
    // One of them refused for good: 1, sending it again would not help.
    let out = send(b"{\"i\":7}\n[1]\n").await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 of 2 events refused"), "{err}");
    // The HTTP refusal above is counted (read before the reload: until the reload is applied,
    // the polling below may be refused too).
    let full = metric(
        &d.url("/metrics"),
        "llmlogd_ingest_events_total{route=\"native\",result=\"full\"}",
    )
    .await;
    assert_eq!(full, Some(1.0));
    // drop_oldest: new events go in, the oldest go out, counted.
    d.reload(&(sink(&port) + "[queue]\nmax_events = 5\nwhen_full = \"drop_oldest\"\n"))
        .await;
    let url = d.url("/v1/events");
    wait_until(DEADLINE, "reloaded caps accept again", || async {
        let (s, _) = post_json(&url, "{\"i\":8}").await;
        (s == 202).then_some(())
    })
    .await;
    let evicted = metric(&d.url("/metrics"), "llmlogd_queue_evicted_events_total ").await;
    assert_eq!(evicted, Some(1.0));
    d.stop().await;
}

/// Waits until every event in `acked` has reached `mock`.
async fn wait_all_delivered(p: &Process, mock: &MockSink, acked: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got: HashSet<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        let missing = acked.iter().filter(|a| !got.contains(*a)).count();
        if missing == 0 {
            return;
        }
        if Instant::now() > deadline {
            let status = get_json(&p.url("/v1/status")).await;
            let log = p.log();
            let tail = &log[log.len().saturating_sub(40)..];
            panic!(
                "timed out after 120 s: {missing} of {} acknowledged events not delivered \
                 ({} received)\nstatus: {status}\nlog:\n{}",
                acked.len(),
                got.len(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Mounts a small tmpfs, or says why it cannot (not root, no mount permission).
struct SmallFs {
    path: std::path::PathBuf,
}

impl SmallFs {
    fn mount(path: &std::path::Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(path).ok()?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot mount a tmpfs here ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallFs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Posts incompressible 8 KB events until the daemon refuses one with 507 or 503 (the disk is
/// full); returns that reply, and adds each acknowledged event to `acked`.
async fn fill_until_refused(url: &str, acked: &mut Vec<String>) -> (u16, serde_json::Value) {
    let mut rng = rand::thread_rng();
    for i in 0..20_000 {
        let noise: String = (0..8000)
            .map(|_| rng.gen_range(b'a'..=b'z') as char)
            .collect();
        let body = format!("{{\"i\":{i},\"n\":\"{noise}\"}}");
        let (s, v) = post_json(url, &body).await;
        match s {
            202 => acked.push(body),
            507 | 503 => return (s, v),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    panic!("the disk did not fill up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_a_clear_error_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&dir.path().join("data"), "48m") else {
        return;
    };
    let port = MockSink::closed();
    let p = Process::start(dir.path(), &sink(&port));
    let mut acked = Vec::new();
    for i in 0..50 {
        let body = format!("{{\"before\":{i}}}");
        let (s, v) = post_json(&p.url("/v1/events"), &body).await;
        assert_eq!(s, 202, "{v}");
        acked.push(body);
    }
    // Fill the filesystem with a ballast file, leaving little room.
    let ballast = fs.path.join("ballast");
    {
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let (status, v) = fill_until_refused(&p.url("/v1/events"), &mut acked).await;
    eprintln!(
        "disk full after {} more events: {status} {v}",
        acked.len() - 50
    );
    assert!(
        v["message"].as_str().unwrap().contains("space") || status == 503,
        "{v}"
    );
    // Still up and answering.
    let r = client().get(p.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Space returns: ingest recovers by itself.
    std::fs::remove_file(&ballast).unwrap();
    let after = "{\"after\":\"space returned\"}".to_string();
    let url = p.url("/v1/events");
    wait_until(DEADLINE, "ingest to recover", || async {
        let (s, _) = post_json(&url, &after).await;
        (s == 202).then_some(())
    })
    .await;
    acked.push(after);
    // Nothing acknowledged was lost.
    let mock = port.open().await;
    wait_all_delivered(&p, &mock, &acked).await;
    assert!(p.terminate().success());
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_backlog_gives_disk_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = MockSink::closed();
    let cfg = sink(&port) + "[queue]\ncompact_above = \"4MiB\"\ncompression = \"none\"\n";
    let d = InProcess::start(dir.path(), &cfg).await;
    // ~40 MB of backlog while the endpoint is down.
    let event = format!("{{\"pad\":\"{}\"}}", "x".repeat(4000));
    let batch = format!("[{}]", vec![event.as_str(); 100].join(","));
    for _ in 0..100 {
        let (s, v) = post_json(&d.url("/v1/events"), &batch).await;
        assert_eq!(s, 202, "{v}");
    }
    let full = metric(&d.url("/metrics"), "llmlogd_disk_bytes")
        .await
        .unwrap();
    assert!(full > 30e6, "backlog on disk: {full}");
    let mock = port.open().await;
    wait_for(Duration::from_secs(120), "the backlog delivered", || {
        let n: usize = mock.received().iter().map(|r| r.raw_events().len()).sum();
        (n >= 10_000).then_some(())
    })
    .await;
    let url = d.url("/metrics");
    let small = wait_until(
        Duration::from_secs(120),
        "the data dir to shrink",
        || async {
            let b = metric(&url, "llmlogd_disk_bytes").await?;
            (b < 8e6).then_some(b)
        },
    )
    .await;
    eprintln!("disk: {full:.0} bytes with the backlog, {small:.0} after it drained");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let cfg = sink(&mock)
        + "[server]\nmax_body_bytes = \"64KiB\"\nheader_timeout = \"1s\"\nbody_timeout = \"2s\"\nmax_connections = 8\n";
    let d = InProcess::start(dir.path(), &cfg).await;
    let url = d.url("/v1/events");
    let http = client();
    let send = |body: Vec<u8>, ct: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(&url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    // Too large.
    let (s, v) = send(
        format!("{{\"a\":\"{}\"}}", "x".repeat(100_000)).into_bytes(),
        "application/json",
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert!(v["message"].as_str().unwrap().contains("max_body_bytes"));
    // Invalid UTF-8.
    let (s, v) = send(b"{\"a\":\"\xff\xfe\"}".to_vec(), "application/json").await;
    assert_eq!(s, 400, "{v}");
    // Deep nesting.
    let deep = "[".repeat(5000) + &"]".repeat(5000);
    let (s, v) = send(format!("{{\"a\":{deep}}}").into_bytes(), "application/json").await;
    assert_eq!(s, 400, "{v}");
    // Wrong types on a service route: every bad field named.
    let r = http
        .post(d.url("/log-request"))
        .json(&serde_json::json!({"provider": 3, "model": "m", "input": {}, "output": {}, "request_start_time": "soon", "request_end_time": 1.0, "score": 101}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    let fields: Vec<&str> = v["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    for f in ["provider", "request_start_time", "score"] {
        assert!(fields.contains(&f), "{f} not named: {v}");
    }
    // A slow client that never finishes its headers is disconnected after header_timeout,
    // and does not hold up others.
    let addr = d.started.http.unwrap();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf); // returns when the server closes (or answers 408)
        started.elapsed()
    });
    let (s, _) = send(b"{\"fine\":1}".to_vec(), "application/json").await;
    assert_eq!(s, 202);
    let held = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(held < Duration::from_secs(25), "slow client held {held:?}");
    // More connections than max_connections: the extra ones wait; all eventually served.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr).unwrap());
    }
    let waiter = {
        let url = url.clone();
        tokio::spawn(async move { post_json(&url, "{\"after\":\"idle\"}").await.0 })
    };
    // The idle ones are cut after header_timeout; then the waiter gets its turn.
    let status = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(status, 202);
    drop(idle);
    // The daemon is fine and delivered the good events, and nothing else.
    wait_for(DEADLINE, "the two good events", || {
        let got: Vec<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let got: Vec<String> = mock
        .received()
        .iter()
        .flat_map(|r| r.raw_events())
        .collect();
    assert_eq!(
        got,
        vec![
            "{\"fine\":1}".to_string(),
            "{\"after\":\"idle\"}".to_string()
        ]
    );
    d.stop().await;
}

#[test]
fn unusable_data_dirs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Held by another daemon.
    let p = Process::start(dir.path(), "");
    let out = Command::new(bin())
        .args(["run", "--http-listen", "127.0.0.1:0", "--unix-socket", ""])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("in use by another llmlogd")
            && last.contains(&format!("pid {}", p.child.id())),
        "{err}"
    );
    drop(p);
    // Not ours to read: run as `nobody` against a root-only directory (needs root to set up).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/usr/sbin/runuser").exists() {
        eprintln!("skipped: the permission case needs root and runuser");
        return;
    }
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    // The binary must be reachable by nobody: the test dir is root's 0700 temp dir, so the
    // data dir is what is refused, not the binary (which lives under target/).
    let out = Command::new("/usr/sbin/runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin())
        .args(["run", "--http-listen", "127.0.0.1:0", "--unix-socket", ""])
        .arg("--data-dir")
        .arg(private.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("Permission denied") || err.contains("permission denied"),
        "{err}"
    );
    assert!(err.contains("private"), "names the directory: {err}");
}

/// Hundreds of socket connections each send most of a 1 MB line and stop: the daemon holds
/// what they sent within the body budget (64 MiB) shared with HTTP bodies, not 400 × 1 MB,
/// and a short line on another connection is still acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_ndjson_lines_take_memory_only_from_the_body_budget() {
    const CONNECTIONS: usize = 400;
    const LINE_PART: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), "");
    let sock = dir.path().join("llmlogd.sock");
    let before = p.rss_bytes();
    let path = sock.clone();
    let conns = tokio::task::spawn_blocking(move || {
        use std::os::unix::net::UnixStream;
        let mut conns: Vec<(UnixStream, usize)> = (0..CONNECTIONS)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(b"{\"pad\":\"").unwrap();
                s.set_nonblocking(true).unwrap();
                (s, 0)
            })
            .collect();
        // Send what the daemon takes, for a few seconds (it stops reading once the budget
        // is spent; before, it read all of it).
        let chunk = vec![b'x'; 64 << 10];
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until && conns.iter().any(|(_, sent)| *sent < LINE_PART) {
            let mut progress = false;
            for (s, sent) in conns.iter_mut().filter(|(_, sent)| *sent < LINE_PART) {
                if let Ok(n) = s.write(&chunk[..chunk.len().min(LINE_PART - *sent)]) {
                    *sent += n;
                    progress |= n > 0;
                }
            }
            if !progress {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        conns
    })
    .await
    .unwrap();
    let sent: usize = conns.iter().map(|(_, n)| n).sum();
    let grew = p.rss_bytes().saturating_sub(before);
    eprintln!(
        "{CONNECTIONS} half lines: {} MiB sent, RSS grew by {} MiB",
        sent >> 20,
        grew >> 20
    );
    assert!(
        grew < 160 << 20,
        "RSS grew by {} MiB for {} MiB of half-sent lines",
        grew >> 20,
        sent >> 20
    );
    // A short line is not held up by the long ones.
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (rd, mut wr) = s.into_split();
    wr.write_all(b"{\"short\":1}\n").await.unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(rd).lines().next_line(),
    )
    .await
    .expect("a short line is answered at once")
    .unwrap()
    .unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    drop(conns);
}

/// Hundreds of HTTP connections each trickle in a few hundred KB of headers: each may hold
/// only a small read buffer (16 KiB; hyper's default let each hold ~400 KiB), and is refused
/// with 431 past it; a normal request still goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_headers_are_bounded_per_connection() {
    const CONNECTIONS: usize = 400;
    const HEADERS: usize = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), "");
    let before = p.rss_bytes();
    let addr = p.http;
    let peak = tokio::task::spawn_blocking(move || {
        let mut conns: Vec<(TcpStream, usize)> = (0..CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n")
                    .unwrap();
                s.set_nonblocking(true).unwrap();
                (s, 0)
            })
            .collect();
        let header = format!("X-Pad: {}\r\n", "y".repeat(4000));
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && conns.iter().any(|(_, sent)| *sent < HEADERS) {
            let mut progress = false;
            for (s, sent) in conns.iter_mut().filter(|(_, sent)| *sent < HEADERS) {
                match s.write(header.as_bytes()) {
                    Ok(n) => {
                        *sent += n;
                        progress |= n > 0;
                    }
                    // Refused and closed: done.
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => *sent = HEADERS,
                    Err(_) => {}
                }
            }
            if !progress {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        conns
    })
    .await
    .unwrap();
    let grew = p.rss_bytes().saturating_sub(before);
    eprintln!(
        "{CONNECTIONS} connections with long headers: RSS grew by {} MiB",
        grew >> 20
    );
    assert!(grew < 32 << 20, "RSS grew by {} MiB", grew >> 20);
    drop(peak);
    // Too long is refused, a normal request goes in.
    let r = client()
        .post(p.url("/v1/events"))
        .header("x-pad", "y".repeat(20_000))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let (s, v) = post_json(&p.url("/v1/events"), "{\"after\":1}").await;
    assert_eq!(s, 202, "{v}");
}

/// What the daemon wrote before it closed the connection. A request it stopped reading
/// (headers over its buffer) is closed with input unread, which resets the connection after
/// the reply: what arrived before the reset is the reply.
fn read_until_closed(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
}

/// Requests hyper cannot parse are answered by hyper itself, before any handler: those replies
/// carry a JSON body naming the problem like every other refusal (they had an empty one), over
/// TCP and the socket, on a fresh connection and after a good request on a kept-alive one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_cannot_parse_get_a_json_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let (addr, sock) = (d.started.http.unwrap(), d.socket());
    let good = "POST /v1/events HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("POST /v1/events HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n", "y".repeat(64 << 10)),
            431,
            "headers_too_large",
        ),
        ("POST /v1/events HTTP/1.1\r\nHost: localhost\r\nBad Header: 1\r\n\r\n".into(), 400, "bad_request"),
        ("POST /v1/events HTTP/1.1\r\nHost: localhost\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}".into(), 400, "bad_request"),
        ("GET / HTTP/9.9\r\nHost: localhost\r\n\r\n".into(), 400, "bad_request"),
    ];
    for (request, status, code) in &cases {
        for after_good in [false, true] {
            let send = if after_good {
                format!("{good}{request}")
            } else {
                request.clone()
            };
            let replies = tokio::task::spawn_blocking({
                let sock = sock.clone();
                let send = send.clone();
                move || {
                    let tcp = {
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.set_read_timeout(Some(DEADLINE)).unwrap();
                        s.write_all(send.as_bytes()).unwrap();
                        read_until_closed(&mut s)
                    };
                    let unix = {
                        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
                        s.set_read_timeout(Some(DEADLINE)).unwrap();
                        s.write_all(send.as_bytes()).unwrap();
                        read_until_closed(&mut s)
                    };
                    [tcp, unix]
                }
            })
            .await
            .unwrap();
            for reply in replies {
                let mut text = String::from_utf8(reply).unwrap();
                if after_good {
                    assert!(text.starts_with("HTTP/1.1 202 "), "{text}");
                    let at = text.find("}HTTP/1.1 ").expect("a second reply") + 1;
                    text = text[at..].to_string();
                }
                let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{request:.80}: {head}\n{body}"
                );
                assert!(
                    head.contains("\r\ncontent-type: application/json\r\n"),
                    "{head}"
                );
                assert!(
                    head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
                    "{head}\n{body}"
                );
                let v: serde_json::Value = serde_json::from_str(body).expect(body);
                assert_eq!(v["error"]["code"], *code, "{v}");
                assert_eq!(v["success"], false, "{v}");
            }
        }
    }
    d.stop().await;
}

/// The sink is down and its backlog fills the disk. Ingest stops (507) while some space is
/// still free, so when the sink comes back the backlog drains, the store gives its space
/// back, and ingest resumes, by itself. (Ingest used to take the last byte: the store could
/// then not even be reopened, delivery stalled, and nothing ever gave the space back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_fills_the_disk_drains_and_ingest_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&dir.path().join("data"), "40m") else {
        return;
    };
    let port = MockSink::closed();
    let p = Process::start(
        dir.path(),
        &(sink(&port) + "[queue]\ncompression = \"none\"\n"),
    );
    let mut acked = Vec::new();
    let (status, v) = fill_until_refused(&p.url("/v1/events"), &mut acked).await;
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "no_space", "{v}");
    let mock = port.open().await;
    wait_all_delivered(&p, &mock, &acked).await;
    let url = p.url("/v1/events");
    wait_until(Duration::from_secs(60), "ingest to resume", || async {
        let (s, _) = post_json(&url, "{\"after\":\"drained\"}").await;
        (s == 202).then_some(())
    })
    .await;
    eprintln!(
        "{} events filled the disk; all delivered, ingest resumed",
        acked.len()
    );
    assert!(p.terminate().success());
    drop(fs);
}

/// One connection holds at most a quarter of the body budget: a client that declared a body of
/// the largest allowed size and sends it slowly leaves room for another client's large body,
/// which is stored at once. With the budget at 64 MiB whatever `max_body_bytes` was, the
/// second request waited for the first's `body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_large_body_leaves_room_for_another_clients_large_body() {
    const LARGEST: usize = 40 << 20;
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(
        dir.path(),
        &format!("[server]\nmax_body_bytes = {LARGEST}\nbody_timeout = \"60s\"\n"),
    )
    .await;
    let addr = d.started.http.unwrap();
    // The slow client: its body's share is held once the daemon asks for the body, which it
    // does with `100 Continue` (after taking the share, before reading).
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\nExpect: 100-continue\r\ncontent-length: {LARGEST}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(DEADLINE, async {
        while !head.ends_with(b"\r\n\r\n") {
            tokio::io::AsyncReadExt::read_exact(&mut slow, &mut byte)
                .await
                .expect("the interim reply");
            head.push(byte[0]);
        }
    })
    .await
    .expect("100 Continue in time");
    assert!(
        head.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    slow.write_all(b"{\"pad\":\"").await.unwrap();
    // Another client's body, too large for what a 64 MiB budget has left beside the slow one.
    let big = format!("{{\"model\":\"m\",\"input\":\"{}\"}}", "x".repeat(25 << 20));
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        post_json(&d.url("/v1/events"), &big),
    )
    .await
    .unwrap_or_else(|_| panic!("the large body waited on the slow one for 20 s"));
    assert_eq!(status, 202, "{body}");
    eprintln!("the large body was stored in {:?}", started.elapsed());
    drop(slow);
    d.stop().await;
}
