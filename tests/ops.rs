//! Operations: sd_notify, reload, metrics, status, check-config.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

fn http_sink(name: &str, mock: &impl Target) -> String {
    format!(
        "[sinks.{name}]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"20ms\"\nretry_initial = \"20ms\"\nretry_max = \"200ms\"\n",
        mock.url("/in")
    )
}

/// Reads notify datagrams until `pred` matches one, or the deadline passes.
fn recv_until(sock: &UnixDatagram, seen: &mut Vec<String>, pred: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = pred(&msg);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

/// A socket playing systemd's `NOTIFY_SOCKET` in `dir`, read by `recv_until`.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (sock, path)
}

/// Starts the daemon with a test `NOTIFY_SOCKET` (and `env`) and waits for its READY=1;
/// returns it, the socket, and the messages seen so far.
fn start_notified(
    dir: &std::path::Path,
    config: &str,
    env: &[(&str, &str)],
) -> (Process, UnixDatagram, Vec<String>) {
    let (sock, notify_path) = notify_socket(dir);
    let mut all = vec![("NOTIFY_SOCKET", notify_path.to_str().unwrap())];
    all.extend_from_slice(env);
    let p = Process::start_with(dir, config, &all);
    let mut seen = Vec::new();
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("READY=1")),
        "{seen:?}"
    );
    (p, sock, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_reloading_watchdog_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (p, sock, mut seen) = start_notified(dir.path(), "", &[("WATCHDOG_USEC", "200000")]);
    // READY comes once the listener answers: it does now.
    let (s, _) = post_json(&p.url("/v1/events"), "{\"a\":1}").await;
    assert_eq!(s, 202);
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("WATCHDOG=1")),
        "{seen:?}"
    );
    p.signal(libc::SIGHUP);
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("RELOADING=1")),
        "{seen:?}"
    );
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("READY=1")),
        "{seen:?}"
    );
    let status = p.terminate();
    assert!(status.success());
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("STOPPING=1")),
        "{seen:?}"
    );
}

/// A drain longer than the unit's `TimeoutStopSec=` (30 s) is not cut short by SIGKILL: with
/// STOPPING=1 the daemon tells systemd how long its stop may take (EXTEND_TIMEOUT_USEC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_extends_systemds_stop_timeout_to_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let (p, sock, mut seen) =
        start_notified(dir.path(), "[delivery]\ndrain_timeout = \"90s\"\n", &[]);
    assert!(p.terminate().success());
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("STOPPING=1")),
        "{seen:?}"
    );
    let stopping = seen.last().unwrap();
    let usec: u64 = stopping
        .lines()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC in {stopping:?}"))
        .parse()
        .unwrap();
    assert!(
        (90_000_000..=120_000_000).contains(&usec),
        "{usec} µs for a 90 s drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_applies_sinks_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let a = MockSink::start().await;
    let b = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink("a", &a)).await;
    let url = d.url("/v1/events");
    // Four keep-alive clients posting 300 events each while the config is reloaded.
    let mut clients = Vec::new();
    for c in 0..4 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let http = client();
            let mut acked = Vec::new();
            for k in 0..300 {
                let body = format!("{{\"c\":{c},\"k\":{k}}}");
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("no connection lost during reload");
                assert_eq!(r.status(), 202);
                acked.push(body);
            }
            acked
        }));
    }
    // Reload mid-stream: add sink b (events from now on), change a's batching; and an invalid
    // config in between, which must be refused while the old one keeps running.
    wait_for(DEADLINE, "some events delivered before the reload", || {
        (a.received().len() > 5).then_some(())
    })
    .await;
    d.reload("[sinks.a]\ntype = \"nope\"\n").await;
    let both = http_sink("a", &a) + "batch_max_events = 7\n" + &http_sink("b", &b);
    d.reload(&both).await;
    let mut sent = Vec::new();
    for c in clients {
        sent.extend(c.await.unwrap());
    }
    let deadline = Instant::now() + DEADLINE;
    let got_a = loop {
        let all: std::collections::HashSet<String> =
            a.received().iter().flat_map(|r| r.raw_events()).collect();
        if sent.iter().all(|s| all.contains(s)) {
            break all;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = sent.iter().filter(|s| !all.contains(*s)).collect();
            let status = get_text(&d.url("/v1/status")).await;
            let at_b: std::collections::HashSet<String> =
                b.received().iter().flat_map(|r| r.raw_events()).collect();
            panic!(
                "{} of 1200 events missing at sink a (first: {:?}; {} of them at sink b); {} requests received; status: {status}",
                missing.len(),
                missing.first(),
                missing.iter().filter(|m| at_b.contains(**m)).count(),
                a.received().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got_a.len(), 1200);
    // b was added by the reload and receives what came after it.
    let after = "{\"after\":\"reload\"}";
    let (s, _) = post_json(&url, after).await;
    assert_eq!(s, 202);
    wait_for(DEADLINE, "the post-reload event at sink b", || {
        b.received()
            .iter()
            .any(|r| r.raw_events().iter().any(|e| e == after))
            .then_some(())
    })
    .await;
    d.stop().await;
}

/// A sink taken out of the config by a reload leaves `/metrics`; the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_sink_leaves_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let a = MockSink::start().await;
    let b = MockSink::start().await;
    let d = InProcess::start(dir.path(), &(http_sink("a", &a) + &http_sink("b", &b))).await;
    let (s, _) = post_json(&d.url("/v1/events"), "{\"n\":1}").await;
    assert_eq!(s, 202);
    let metrics = d.url("/metrics");
    let delivered =
        |sink: &str| format!("llmlogd_sink_delivered_events_total{{sink=\"{sink}\"}} 1");
    wait_until(DEADLINE, "the event delivered to both sinks", || async {
        let m = get_text(&metrics).await;
        (m.contains(&delivered("a")) && m.contains(&delivered("b"))).then_some(())
    })
    .await;
    d.reload(&http_sink("a", &a)).await;
    let m = wait_until(DEADLINE, "sink b's series to go", || async {
        let m = get_text(&metrics).await;
        (!m.contains("sink=\"b\"")).then_some(m)
    })
    .await;
    assert!(m.contains(&delivered("a")), "{m}");
    assert!(
        m.contains("llmlogd_sink_state{sink=\"a\",state=\"ok\"} 1"),
        "{m}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_known_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // First attempt fails with 503 (no Retry-After): one retry, then delivered.
    mock.script([Answer::Status(503)]);
    let d = InProcess::start(
        dir.path(),
        &(http_sink("m", &mock) + "batch_max_events = 3\n"),
    )
    .await;
    let (s, _) = post_json(&d.url("/v1/events"), "[{\"n\":1},{\"n\":2},{\"n\":3}]").await;
    assert_eq!(s, 202);
    let (s, _) = post_json(&d.url("/v1/events"), "{\"n\":").await;
    assert_eq!(s, 400);
    let http = client();
    let text = wait_for(DEADLINE, "delivered metric", || {
        let t = futures_lite_block(http.get(d.url("/metrics")).send());
        t.contains("llmlogd_sink_delivered_events_total{sink=\"m\"} 3")
            .then_some(t)
    })
    .await;
    for line in [
        "llmlogd_ingest_events_total{route=\"native\",result=\"accepted\"} 3",
        "llmlogd_ingest_events_total{route=\"native\",result=\"invalid\"} 1",
        "llmlogd_sink_failed_attempts_total{sink=\"m\",class=\"status_5xx\"} 1",
        "llmlogd_sink_retried_events_total{sink=\"m\"} 3",
        "llmlogd_sink_state{sink=\"m\",state=\"ok\"} 1",
        "llmlogd_sink_delivery_latency_seconds_count{sink=\"m\"} 2",
        "llmlogd_sink_in_flight_requests{sink=\"m\"} 0",
        // Series that never moved exist at 0 from the sink's start.
        "llmlogd_sink_dead_lettered_events_total{sink=\"m\"} 0",
        "llmlogd_sink_failed_attempts_total{sink=\"m\",class=\"timeout\"} 0",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // The queue empties once delivered (the collector runs every 500 ms).
    wait_for(DEADLINE, "queue_events 0", || {
        let t = futures_lite_block(http.get(d.url("/metrics")).send());
        t.contains("llmlogd_queue_events 0").then_some(())
    })
    .await;
    let (s, v) = get(&d.url("/readyz")).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ready")));
    let (s, _) = get(&d.url("/healthz")).await;
    assert_eq!(s, 200);
    let (s, v) = get(&d.url("/v1/status")).await;
    assert_eq!(s, 200);
    assert_eq!(v["sinks"][0]["name"], "m");
    assert_eq!(v["sinks"][0]["delivered"], 3);
    d.stop().await;
}

/// `llmlogd_queue_oldest_age_seconds` is in seconds: an event held by a sink that is down
/// ages with the wall clock (an alert on `> 600` means ten minutes, not 0.6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_event_age_is_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let port = MockSink::closed();
    let d = InProcess::start(dir.path(), &http_sink("m", &port)).await;
    let t0 = std::time::Instant::now();
    let (s, _) = post_json(&d.url("/v1/events"), "{\"n\":1}").await;
    assert_eq!(s, 202);
    let url = d.url("/metrics");
    let age = wait_until(DEADLINE, "the event to age 0.2 s", || async {
        let v = sample(&get_text(&url).await, "llmlogd_queue_oldest_age_seconds")?;
        (v >= 0.2).then_some(v)
    })
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(age <= elapsed + 1.0, "age {age} after {elapsed} s");
    d.stop().await;
}

/// Bytes free for an unprivileged writer on the filesystem holding `p` (what the daemon
/// reports), asked here independently.
fn statvfs_free(p: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes only into the zeroed struct, from a valid C string path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// The value of the one sample named exactly `name` (no labels) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

/// The free space of the data directory's filesystem shows in `/metrics` and the status, so
/// an alert can fire before ingest starts refusing events (507 under 16 MiB free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_show_the_free_disk_space() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink("m", &mock)).await;
    let data = dir.path().join("data");
    // Other work on the machine writes to the same filesystem: the value must lie between
    // what the test saw just before and just after, give or take what may change meanwhile.
    let slack = 256u64 << 20;
    let within = |v: u64, before: u64, after: u64| {
        v + slack >= before.min(after) && v <= before.max(after) + slack
    };
    let before = statvfs_free(&data);
    let text = get_text(&d.url("/metrics")).await;
    let status = get_json(&d.url("/v1/status")).await;
    let after = statvfs_free(&data);
    let metric = sample(&text, "llmlogd_disk_free_bytes")
        .unwrap_or_else(|| panic!("no llmlogd_disk_free_bytes in\n{text}"));
    assert!(metric > 0.0 && metric.fract() == 0.0, "{metric}");
    assert!(
        within(metric as u64, before, after),
        "metric {metric}, statvfs {before}..{after}"
    );
    assert!(
        text.contains("# TYPE llmlogd_disk_free_bytes gauge"),
        "{text}"
    );
    let in_status = status["queue"]["disk_free_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no queue.disk_free_bytes in {status}"));
    assert!(
        within(in_status, before, after),
        "status {in_status}, statvfs {before}..{after}"
    );
    d.stop().await;
}

/// Moves the store's high-water mark (`<data>/queue.mark`) `by` numbers up: what a store
/// that lost its last acknowledged events to damaged files looks like when it opens.
fn raise_mark(data: &std::path::Path, by: u64) {
    let path = data.join("queue.mark");
    let text = std::fs::read_to_string(&path).expect("a mark after a clean stop");
    let (header, next) = text.trim_end().split_once('\n').unwrap();
    let next: u64 = next.strip_prefix("next_seq ").unwrap().parse().unwrap();
    std::fs::write(&path, format!("{header}\nnext_seq {}\n", next + by)).unwrap();
}

async fn lost_metric(d: &InProcess) -> Option<f64> {
    sample(
        &get_text(&d.url("/metrics")).await,
        "llmlogd_queue_lost_events_total",
    )
}

/// A store that opens short of its mark (events lost to damage) shows it in `/metrics` and
/// the status, so an alert can fire; `fsck` says what was lost and that `--repair` cannot
/// bring it back, instead of sending the operator to a repair that does nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_show_in_the_metrics_and_fsck_says_repair_cannot_bring_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink("m", &mock)).await;
    let (s, _) = post_json(&d.url("/v1/events"), "[{\"n\":1},{\"n\":2}]").await;
    assert_eq!(s, 202);
    assert_eq!(lost_metric(&d).await, Some(0.0));
    assert_eq!(
        get_json(&d.url("/v1/status")).await["queue"]["lost_events"],
        0
    );
    d.stop().await;

    raise_mark(&data, 100);
    let d = InProcess::start(dir.path(), &http_sink("m", &mock)).await;
    assert_eq!(lost_metric(&d).await, Some(100.0));
    let text = get_text(&d.url("/metrics")).await;
    assert!(
        text.contains("# TYPE llmlogd_queue_lost_events_total counter"),
        "{text}"
    );
    assert_eq!(
        get_json(&d.url("/v1/status")).await["queue"]["lost_events"],
        100
    );
    d.stop().await;

    let fsck = |repair: bool| {
        let mut args = vec!["fsck", "--data-dir", data.to_str().unwrap()];
        if repair {
            args.push("--repair");
        }
        let (code, _, err) = offline(&args);
        (Some(code), err)
    };
    // Found once (the open above took the numbering past the mark), kept on record.
    let (code, err) = fsck(false);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("note: this store lost up to 100 acknowledged events"),
        "{err}"
    );
    assert!(!err.contains("lost: the store opened"), "{err}");
    raise_mark(&data, 7);
    let (code, err) = fsck(false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("lost: the store opened without up to 7 acknowledged events"),
        "{err}"
    );
    assert!(err.contains("Nothing brings them back"), "{err}");
    assert!(
        err.contains("nothing for `llmlogd fsck --repair` to do"),
        "{err}"
    );
    assert!(!err.contains("to fix them"), "no repair is offered: {err}");
    raise_mark(&data, 5);
    let (code, err) = fsck(true);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("up to 5 acknowledged events"), "{err}");
    assert!(!err.contains("repaired:"), "nothing was repaired: {err}");

    // The daemon reports every loss on record after its restarts, those `fsck` found too: an
    // alert on the counter neither clears by itself nor misses a loss another open found.
    let d = InProcess::start(dir.path(), &http_sink("m", &mock)).await;
    let status = get_json(&d.url("/v1/status")).await;
    assert_eq!(lost_metric(&d).await, Some(112.0));
    assert_eq!(status["queue"]["lost_events"], 112);
    let last = &status["queue"]["last_loss"];
    assert_eq!(
        last["mark"].as_u64().unwrap() - last["found"].as_u64().unwrap(),
        5,
        "{status}"
    );
    d.stop().await;
}

async fn get(url: &str) -> (u16, serde_json::Value) {
    let r = client().get(url).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

/// Runs a request to completion from a sync closure (wait_for polls synchronously).
fn futures_lite_block(
    fut: impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        let text = match fut.await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default()
}

/// Runs `llmlogd status --json --http-listen <http_listen> --unix-socket <its socket>` against
/// a daemon (which listens on its own HTTP port) and checks it answered; then again once the
/// daemon is gone, and returns that error (checked: exit 69, one line).
async fn status_then_gone(http_listen: &str) -> (std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let p = Process::start(dir.path(), &http_sink("collector", &mock));
    let socket = dir.path().join("llmlogd.sock");
    let status = || {
        Command::new(bin())
            .env_remove("LLMLOGD_CONFIG")
            .args([
                "status",
                "--json",
                "--http-listen",
                http_listen,
                "--unix-socket",
            ])
            .arg(&socket)
            .output()
            .unwrap()
    };
    let out = status();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sinks"][0]["name"], "collector");
    assert_eq!(v["pid"], p.child.id());
    drop(p);
    let out = status();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    (socket, err)
}

/// With HTTP switched off (`http_listen = ""`, a socket-only host), `llmlogd status` asks the
/// same route on the Unix socket; with the daemon gone, the error names the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cli_uses_the_socket_when_http_is_off() {
    let (socket, err) = status_then_gone("").await;
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
}

/// A daemon that is not at the HTTP address `status` reads from the config (started with
/// another `--http-listen`) is found on the config's socket: `llmlogd status` with no flags
/// said "cannot reach llmlogd … is it running?" with the daemon up. With no daemon at all,
/// the error is about the address the config names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cli_finds_the_daemon_on_its_socket_when_its_http_address_is_elsewhere() {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (_, err) = status_then_gone(&nobody).await;
    assert!(err.contains(&nobody), "{err}");
}

/// With no sinks, the table says so instead of printing its header over nothing.
#[test]
fn status_cli_says_when_no_sinks_are_configured() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), "");
    let out = Command::new(bin())
        .env_remove("LLMLOGD_CONFIG")
        .args(["status", "--http-listen", &p.http.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no sinks configured"), "{text}");
    assert!(!text.contains("LAST ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cli_shows_sinks_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // One failure first: the table shows the last error with its age.
    mock.script([Answer::StatusBody(503, "overloaded".into())]);
    let p = Process::start(dir.path(), &http_sink("collector", &mock));
    let (s, _) = post_json(&p.url("/v1/events"), "{\"x\":1}").await;
    assert_eq!(s, 202);
    wait_for(DEADLINE, "delivery", || {
        (mock.received().len() >= 2).then_some(())
    })
    .await;
    let addr = p.http.to_string();
    let out = Command::new(bin())
        .args(["status", "--json", "--http-listen", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sinks"][0]["name"], "collector");
    assert_eq!(v["sinks"][0]["state"], "ok");
    let out = Command::new(bin())
        .args(["status", "--http-listen", &addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("SINK") && table.contains("collector") && table.contains("http"),
        "{table}"
    );
    assert!(table.contains(" ago: HTTP 503: overloaded"), "{table}");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(" bytes free")),
        "{table}"
    );
    assert!(v["queue"]["disk_free_bytes"].as_u64().is_some(), "{v}");
    drop(p);
    // Daemon gone: a one-line error and exit 69.
    let out = Command::new(bin())
        .args(["status", "--http-listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

/// A body refused from its declared length (413) whose client then stops sending is let go
/// 5 s after its last byte, not held with its connection slot until `body_timeout` (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_that_stops_coming_frees_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let mut s = tokio::net::TcpStream::connect(d.started.http.unwrap())
        .await
        .unwrap();
    let head = "POST /v1/events HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 20000000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; 64 << 10]).await.unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    // Well under body_timeout (30 s), well over the 5 s it should take.
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
        .await
        .expect("the connection was closed before body_timeout")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    eprintln!("closed {:?} after the last byte", started.elapsed());
    d.stop().await;
}

/// The config the README installs for the unit names the unit's directories and the socket
/// unit's addresses, so the commands an operator runs outside the unit (`sudo -u llmlogd
/// llmlogd dlq --config /etc/llmlogd/llmlogd.toml list`, `llmlogd send --config ...`) find
/// the daemon's queue and socket: they do not get the unit's `STATE_DIRECTORY` /
/// `RUNTIME_DIRECTORY`.
#[test]
fn the_installed_service_config_names_the_units_paths() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let readme = read("README.md");
    let source = readme
        .lines()
        .find(|l| l.starts_with("sudo install") && l.contains("/etc/llmlogd/llmlogd.toml"))
        .and_then(|l| {
            l.split_whitespace()
                .take_while(|w| *w != "/etc/llmlogd/llmlogd.toml")
                .last()
        })
        .expect("README installs /etc/llmlogd/llmlogd.toml")
        .to_string();
    let unit = |file: &str, key: &str| -> Vec<String> {
        read(file)
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    };
    let state = unit("systemd/llmlogd.service", "StateDirectory");
    let runtime = unit("systemd/llmlogd.service", "RuntimeDirectory");
    let listen = unit("systemd/llmlogd.socket", "ListenStream");
    // As an operator's shell runs it: none of the unit's environment.
    let out = Command::new(bin())
        .arg("check-config")
        .arg(root.join(&source))
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("LLMLOGD_CONFIG")
        .env_remove("LLMLOGD_DATA_DIR")
        .env_remove("LLMLOGD_UNIX_SOCKET")
        .env_remove("LLMLOGD_HTTP_LISTEN")
        .env("HOME", "/home/operator")
        .env("XDG_RUNTIME_DIR", "/run/user/1000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(" = "))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .trim_matches('"')
            .to_string()
    };
    assert_eq!(
        value("data_dir"),
        format!("/var/lib/{}", state[0]),
        "{source}"
    );
    let socket = value("unix_socket");
    assert!(
        socket.starts_with(&format!("/run/{}/", runtime[0])),
        "{source}: {socket}"
    );
    assert!(listen.contains(&socket), "llmlogd.socket: {listen:?}");
    assert!(
        listen.contains(&value("http_listen")),
        "llmlogd.socket: {listen:?}"
    );
}

#[test]
fn check_config_validates_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("pl.key");
    std::fs::write(&key_file, "pl_file_secret\n").unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[sinks.pl]\ntype = \"promptlayer\"\napi_key_file = \"{}\"\n[sinks.pz]\ntype = \"pezzo\"\napi_key = \"pz_inline_secret\"\nproject_id = \"p1\"\n",
            key_file.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("pl_file_secret") && !text.contains("pz_inline_secret"),
        "{text}"
    );
    assert!(
        text.contains(&format!("from file {}", key_file.display())),
        "{text}"
    );
    // The example config in the repo is valid (with its env key set).
    let out = Command::new(bin())
        .arg("check-config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .env("PROMPTLAYER_API_KEY", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Bad: a missing key file is named.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[sinks.pl]\ntype = \"promptlayer\"\napi_key_file = \"/nonexistent/k\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sinks.pl.api_key_file") && err.contains("/nonexistent/k"),
        "{err}"
    );
    // A socket group that does not exist is caught here, not only when `run` binds.
    std::fs::write(&bad, "[server]\nsocket_group = \"no-such-group-llmlogd\"\n").unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.socket_group"), "{err}");
    // A sink URL's password and query values are not printed.
    std::fs::write(
        &good,
        "[sinks.c]\ntype = \"http\"\nurl = \"http://u:URLPASS@127.0.0.1:9/i?token=URLTOKEN\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains("URLPASS") && !all.contains("URLTOKEN"),
        "{all}"
    );
}

/// The service's config names keys that only the service can read (a systemd credential, a
/// file only its user may read, a variable only its unit sets). `check-config` by hand (or as
/// the `ExecStartPre=` of a systemd older than 252, which gets no credentials) notes the
/// credential it cannot reach instead of refusing the file, and the tools that need no key
/// (`status`, `dlq`, `fsck`, `send`) do not read keys at all.
#[test]
fn tools_run_on_the_services_config_without_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let conf = dir.path().join("llmlogd.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nhttp_listen = \"127.0.0.1:9\"\nunix_socket = \"{sock}\"\n[queue]\ndata_dir = \"{data}\"\n\
             [sinks.pl]\ntype = \"promptlayer\"\napi_key_credential = \"promptlayer\"\n\
             [sinks.pz]\ntype = \"pezzo\"\napi_key_file = \"/nonexistent/pezzo.key\"\nproject_id = \"p\"\n\
             [sinks.c]\ntype = \"promptlayer\"\nurl = \"http://127.0.0.1:9/x\"\napi_key_env = \"LLMLOGD_TEST_UNSET_KEY\"\n",
            sock = dir.path().join("s.sock").display(),
            data = data.display(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&conf)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("LLMLOGD_TEST_UNSET_KEY")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let drop_line = |line: &str| {
        let text = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(&conf, text.replace(line, "")).unwrap();
    };
    // Each tool gets as far as its own work: no daemon (69), no queue yet (66).
    let (code, err) = run(&["status"]);
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    for tool in [&["dlq", "list"][..], &["fsck"]] {
        let (code, err) = run(tool);
        assert_eq!(code, Some(66), "{tool:?}: {err}");
        assert!(err.contains("no llmlogd queue"), "{tool:?}: {err}");
    }
    // check-config still reads every key it can reach: the unset variable is refused (sinks
    // are checked in name order), then the missing file...
    let (code, err) = run(&["check-config"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("sinks.c.api_key_env"), "{err}");
    drop_line("api_key_env = \"LLMLOGD_TEST_UNSET_KEY\"\n");
    let (code, err) = run(&["check-config"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("sinks.pz.api_key_file"), "{err}");
    // ...and with the keys it can reach, the unreachable credential is a note, not an error.
    drop_line("api_key_file = \"/nonexistent/pezzo.key\"\n");
    let (code, err) = run(&["check-config"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("sinks.pl.api_key_credential") && err.contains("not checked"),
        "{err}"
    );
    // The daemon itself still refuses to start without the key it needs.
    let (code, err) = run(&["run"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");
}

/// Posts one event to a socket-activated daemon, retrying until it is up to answer: the
/// status and body.
async fn post_once_activated(url: &str) -> (u16, String) {
    wait_until(DEADLINE, "the activated daemon to answer", || async {
        let r = client()
            .post(url)
            .header("content-type", "application/json")
            .body("{\"via\":\"tcp\"}")
            .send()
            .await
            .ok()?;
        let s = r.status().as_u16();
        Some((s, r.text().await.unwrap_or_default()))
    })
    .await
}

/// Socket activation (llmlogd.socket): the daemon serves on the sockets it is handed and binds
/// nothing of its own. `systemd-socket-activate` plays systemd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_uses_the_inherited_sockets() {
    if !socket_activate_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let activated = dir.path().join("activated.sock");
    let own = dir.path().join("own.sock");
    let mut child = KillOnDrop(
        std::process::Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-l")
            .arg(&activated)
            .arg(bin())
            .args(["run", "--http-listen", "127.0.0.1:9", "--unix-socket"])
            .arg(&own)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    // The first connection starts the daemon; it is answered once the daemon is up.
    let (s, v) = post_once_activated(&url).await;
    assert_eq!(s, 202, "{v}");
    // The inherited Unix socket speaks NDJSON too.
    let stream = tokio::net::UnixStream::connect(&activated).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    tokio::io::AsyncWriteExt::write_all(&mut wr, b"{\"via\":\"unix\"}\n")
        .await
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(rd));
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    assert!(!own.exists(), "bound its own socket despite activation");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        activated.exists(),
        "the activated socket belongs to systemd and stays"
    );
}

/// A socket unit may list several addresses of one kind (`ListenStream=127.0.0.1:8411` and
/// `ListenStream=[::1]:8411`, or two socket paths): every one is served, including the one
/// whose first connection started the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_every_inherited_socket() {
    if !socket_activate_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (first, second) = (port(), port());
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = KillOnDrop(
        std::process::Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{first}"))
            .arg("-l")
            .arg(format!("127.0.0.1:{second}"))
            .arg("-l")
            .arg(&sock_a)
            .arg("-l")
            .arg(&sock_b)
            .arg(bin())
            .args(["run", "--data-dir"])
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The first address starts the daemon; its connection is the one systemd hands over.
    for port in [first, second] {
        let url = format!("http://127.0.0.1:{port}/v1/events");
        let (s, v) = post_once_activated(&url).await;
        assert_eq!(s, 202, "port {port}: {v}");
    }
    for path in [&sock_a, &sock_b] {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        tokio::io::AsyncWriteExt::write_all(&mut wr, b"{\"via\":\"unix\"}\n")
            .await
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(rd));
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("no reply on the socket")
            .unwrap()
            .unwrap_or_default();
        assert!(line.contains("\"ok\":true"), "{}: {line}", path.display());
    }
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    assert!(child.0.wait().unwrap().success());
}

/// A reload that would leave no sink (most often a config file read half-written) is refused,
/// said in one log line, and the running sinks keep delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_drops_every_sink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = MockSink::start().await;
    let d = Process::start(dir.path(), &http_sink("a", &a));
    std::fs::write(dir.path().join("llmlogd.toml"), "").unwrap();
    d.signal(libc::SIGHUP);
    let line = wait_until(DEADLINE, "the refusal in the log", || async {
        d.log().into_iter().find(|l| l.contains("has no sinks"))
    })
    .await;
    assert!(line.contains("keeping the running configuration"), "{line}");
    let (s, _) = post_json(&d.url("/v1/events"), "{\"after\":\"empty reload\"}").await;
    assert_eq!(s, 202);
    wait_for(DEADLINE, "the event at the running sink", || {
        let got: Vec<String> = a.received().iter().flat_map(|r| r.raw_events()).collect();
        got.iter().any(|e| e.contains("empty reload")).then_some(())
    })
    .await;
    assert_eq!(d.terminate().code(), Some(0));
}

/// A reload names a change that waits for a restart against what is running, not against
/// the last file taken: reloading the same file again names it again, and putting the running
/// value back names nothing. (The second reload said only "configuration reloaded".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_waiting_for_a_restart_is_named_at_every_reload() {
    let dir = tempfile::tempdir().unwrap();
    let a = MockSink::start().await;
    let base = http_sink("a", &a);
    let d = Process::start(dir.path(), &base);
    let cfg = dir.path().join("llmlogd.toml");
    let reload = |d: &Process, n: usize| {
        d.signal(libc::SIGHUP);
        let lines = d.stderr_lines.clone();
        async move {
            wait_for(DEADLINE, "the reload done", || {
                let l = lines.lock().unwrap();
                (l.iter()
                    .filter(|l| l.contains("configuration reloaded"))
                    .count()
                    >= n)
                    .then(|| l.clone())
            })
            .await
        }
    };
    let warned = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("take effect at the next restart"))
            .count()
    };
    std::fs::write(&cfg, format!("[server]\nmax_body_bytes = \"1MiB\"\n{base}")).unwrap();
    let lines = reload(&d, 1).await;
    assert_eq!(warned(&lines), 1, "{lines:#?}");
    let lines = reload(&d, 2).await;
    assert_eq!(warned(&lines), 2, "still waiting for a restart: {lines:#?}");
    std::fs::write(&cfg, &base).unwrap();
    let lines = reload(&d, 3).await;
    assert_eq!(warned(&lines), 2, "back to what runs: {lines:#?}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// `dlq` and `fsck` run as a user who may not read the data directory say so (exit 77), where
/// they said "no llmlogd queue" (`exists()` is false for what one may not look into). Needs
/// root to run the commands as `nobody` (setpriv); skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_commands_name_a_data_dir_they_may_not_read() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !setpriv {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    d.stop().await;
    let data = dir.path().join("data");
    // The binary must be reachable by `nobody`: run a copy from a world-readable place.
    let exe = std::env::temp_dir().join(format!("llmlogd-perm-{}", std::process::id()));
    std::fs::copy(bin(), &exe).unwrap();
    for args in [&["dlq", "list"][..], &["fsck"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{args:?}: {err}");
        assert!(
            err.contains("cannot read the data directory") && err.contains("Permission denied"),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_file(&exe);
}

/// The offline commands refuse what would silently do the wrong thing: a data dir that holds
/// no queue (a wrong `--data-dir`, or the daemon's config not given) is not opened, which would
/// create an empty store and list nothing; dead letters of a sink the config no longer has are
/// not replayed, since the next start would drop them; and a closed stdout ends `dlq list`
/// quietly instead of a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_commands_refuse_a_missing_queue_and_a_replay_to_a_removed_sink() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .env_remove("LLMLOGD_CONFIG")
            .env_remove("LLMLOGD_DATA_DIR")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let nowhere = dir.path().join("not-a-queue");
    let (code, _, err) = run(&["dlq", "--data-dir", nowhere.to_str().unwrap(), "list"]);
    assert_eq!(code, Some(66), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no llmlogd queue in"), "{err}");
    assert!(!nowhere.exists(), "nothing created");
    let (code, _, _) = run(&["fsck", "--data-dir", nowhere.to_str().unwrap()]);
    assert_eq!(code, Some(66));
    // The config options are taken after `dlq`'s own subcommand too.
    let (code, _, err) = run(&["dlq", "list", "--data-dir", nowhere.to_str().unwrap()]);
    assert_eq!(code, Some(66), "{err}");

    // One dead letter for sink `gone` (the service refuses the event).
    let refusing = MockSink::start().await;
    refusing.ok_answer(422, "{\"error\":\"no\"}");
    let d = InProcess::start(dir.path(), &http_sink("gone", &refusing)).await;
    let data = dir.path().join("data");
    let r = client()
        .post(d.url("/v1/events"))
        .body("{\"n\":1}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for(DEADLINE, "the dead letter", || {
        (refusing.received().len() == 1).then_some(())
    })
    .await;
    let status = d.url("/v1/status");
    wait_until(DEADLINE, "the dead letter", || async {
        (get_json(&status).await["queue"]["dead_letters"] == 1).then_some(())
    })
    .await;
    d.stop().await;

    // The config without `gone` (another sink instead): replay is refused, the letter stays.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, http_sink("other", &refusing)).unwrap();
    let data_arg = data.to_str().unwrap();
    let cfg_arg = other.to_str().unwrap();
    for replay in [vec!["replay", "--sink", "gone"], vec!["replay"]] {
        let mut args = vec!["dlq", "--config", cfg_arg, "--data-dir", data_arg];
        args.extend(replay);
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(64), "{out}{err}");
        assert!(err.contains("\"gone\" is not in the config"), "{err}");
    }
    let (code, out, err) = run(&["dlq", "--data-dir", data_arg, "list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines().count(),
        1,
        "the dead letter is still there: {out}"
    );
    // A sequence number is per sink: --seq without --sink is refused, for purge as for
    // replay (`purge --all --seq N` purged every letter, the --seq unheeded).
    for seq in [
        vec!["purge", "--all", "--seq", "999999"],
        vec!["replay", "--seq", "1"],
    ] {
        let mut args = vec!["dlq", "--data-dir", data_arg];
        args.extend(seq);
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(64), "{out}{err}");
        assert!(err.contains("--seq needs --sink"), "{err}");
    }
    let (_, out, _) = run(&["dlq", "--data-dir", data_arg, "list", "--json"]);
    assert_eq!(
        out.lines().count(),
        1,
        "the dead letter is still there: {out}"
    );

    // A closed stdout: no panic (exit by SIGPIPE, or 0 if the output fit the pipe first).
    let mut child = Command::new(bin())
        .args(["dlq", "--data-dir", data_arg, "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// A daemon with one PromptLayer sink whose service refuses every log (422), and the local id
/// of one log posted to it (on its way to the dead letters).
async fn a_log_the_service_refuses(dir: &std::path::Path) -> (MockSink, InProcess, u64) {
    let pl = MockSink::start().await;
    pl.ok_answer(422, "{\"success\":false,\"message\":\"no\"}");
    let cfg = format!(
        "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\napi_key = \"pl_sink\"\n",
        pl.url("")
    );
    let d = InProcess::start(dir, &cfg).await;
    let log = serde_json::json!({
        "provider": "openai", "model": "gpt-4o",
        "input": {"type": "chat", "messages": []}, "output": {"type": "chat", "messages": []},
        "request_start_time": 1_700_000_000.0, "request_end_time": 1_700_000_001.0
    });
    let r = client()
        .post(d.url("/log-request"))
        .json(&log)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_u64()
        .unwrap();
    (pl, d, id)
}

/// `dlq show` never prints an app's key: PromptLayer follow-ups carry it in their body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_show_masks_the_key_a_follow_up_carries() {
    let dir = tempfile::tempdir().unwrap();
    let (_pl, d, id) = a_log_the_service_refuses(dir.path()).await;
    let http = client();
    let r = http
        .post(d.url("/library-track-score"))
        .json(&serde_json::json!({"api_key": "pl_APPSECRET", "request_id": id, "score": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The log is refused (422), so the follow-up has nothing to refer to: both dead letters.
    let status = d.url("/v1/status");
    wait_until(DEADLINE, "two dead letters", || async {
        (get_json(&status).await["queue"]["dead_letters"] == 2).then_some(())
    })
    .await;
    d.stop().await;
    let (code, text, err) = dlq(
        &dir.path().join("data"),
        &["show", "pl", &(id + 1).to_string()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("library") || text.contains("score"),
        "the follow-up: {text}"
    );
    assert!(!text.contains("pl_APPSECRET"), "{text}");
    assert!(text.contains("\"api_key\": \"***\""), "{text}");
}

/// A follow-up that comes after its log was dead-lettered goes to the dead letters too, saying
/// why, as one that comes a moment earlier does. It was routed to no sink (the log's record
/// was gone and the sink held no service id for it): answered 200, then discarded without a
/// trace. (`dlq_show_masks_the_key_a_follow_up_carries` failed about one run in four on it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_to_a_dead_lettered_log_is_a_dead_letter_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (pl, d, id) = a_log_the_service_refuses(dir.path()).await;
    let http = client();
    // The log is refused (422) and leaves the queue for the dead letters...
    let status = d.url("/v1/status");
    wait_until(DEADLINE, "the log dead-lettered and gone", || async {
        let s = get_json(&status).await;
        (s["queue"]["dead_letters"] == 1 && s["queue"]["events"] == 0).then_some(())
    })
    .await;
    // ...and only then comes its follow-up.
    let r = http
        .post(d.url("/library-track-score"))
        .json(&serde_json::json!({"api_key": "pl_app", "request_id": id, "score": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until(DEADLINE, "the follow-up dead-lettered too", || async {
        (get_json(&status).await["queue"]["dead_letters"] == 2).then_some(())
    })
    .await;
    d.stop().await;
    let letters = dlq_list(&dir.path().join("data"));
    let follow_up = letters
        .iter()
        .find(|l| l["seq"] == id + 1)
        .unwrap_or_else(|| panic!("no dead letter for the follow-up: {letters:?}"));
    let reason = follow_up["info"]["reason"].as_str().unwrap();
    assert!(reason.contains("nothing to refer to"), "{reason}");
    // Only the log was ever sent.
    assert_eq!(pl.received().len(), 1);
}

/// A service that quotes the key it was sent in its error reply ("invalid key pl_…") does not
/// get it shown: the reply reaches status, the logs and the dead letters with every credential
/// the request carried masked: a sink's own key, the app's key it passed on, an http sink's
/// header and URL token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_service_quotes_back_is_masked_in_status_and_dead_letters() {
    const OWN: &str = "pl_OWNKEY_quoted_1";
    const APP: &str = "pl_APPKEY_quoted_2";
    const HEADER: &str = "tok_HEADERKEY_quoted_3";
    const IN_URL: &str = "URLKEY_quoted_4";
    let quoting = |what: &str| format!("{{\"success\":false,\"message\":\"invalid key {what}\"}}");
    let own = MockSink::start().await;
    let app = MockSink::start().await;
    let col = MockSink::start().await;
    own.ok_answer(422, &quoting(OWN));
    app.ok_answer(422, &quoting(APP));
    col.ok_answer(422, &quoting(&format!("Bearer {HEADER} ?token={IN_URL}")));
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[sinks.own]\ntype = \"promptlayer\"\nurl = \"{}\"\napi_key = \"{OWN}\"\n\
         [sinks.app]\ntype = \"promptlayer\"\nurl = \"{}\"\n\
         [sinks.col]\ntype = \"http\"\nurl = \"{}?token={IN_URL}\"\n\
         headers = {{ Authorization = \"Bearer {HEADER}\" }}\n",
        own.url(""),
        app.url(""),
        col.url("/in"),
    );
    let d = Process::start(dir.path(), &cfg);
    let log = serde_json::json!({
        "provider": "openai", "model": "gpt-4o",
        "input": {"type": "chat", "messages": []}, "output": {"type": "chat", "messages": []},
        "request_start_time": 1_700_000_000.0, "request_end_time": 1_700_000_001.0
    });
    let r = client()
        .post(d.url("/log-request"))
        .header("x-api-key", APP)
        .json(&log)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let status_url = d.url("/v1/status");
    let status = wait_until(DEADLINE, "three dead letters", || async {
        let s = get_json(&status_url).await;
        (s["queue"]["dead_letters"] == 3).then_some(s)
    })
    .await;
    // Each service was sent its credential, and quoted it back.
    assert_eq!(own.received()[0].header("x-api-key").as_deref(), Some(OWN));
    assert_eq!(app.received()[0].header("x-api-key").as_deref(), Some(APP));
    let metrics = client()
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let log = d.log().join("\n");
    assert!(d.terminate().success());
    let list = serde_json::Value::from(dlq_list(&dir.path().join("data"))).to_string();
    let status = status.to_string();
    for (what, text) in [
        ("status", &status),
        ("dlq list", &list),
        ("metrics", &metrics),
        ("log", &log),
    ] {
        for key in [OWN, APP, HEADER, IN_URL] {
            assert!(!text.contains(key), "{what} shows {key}: {text}");
        }
    }
    for (name, masked) in [
        ("own", "invalid key ***"),
        ("app", "invalid key ***"),
        ("col", "invalid key *** ?token=***"),
    ] {
        let e = status_of(&status, name);
        assert!(e.contains(masked), "{name}: {e}");
    }
    assert_eq!(list.matches("invalid key ***").count(), 3, "{list}");
}

/// The `last_error` of sink `name` in a `/v1/status` reply.
fn status_of(status: &str, name: &str) -> String {
    let s: serde_json::Value = serde_json::from_str(status).unwrap();
    s["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .map(|x| x["last_error"].to_string())
        .unwrap_or_default()
}

/// A token in a sink's URL never shows in its errors (status, metrics, logs share the text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_sink_url_is_masked_in_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: connection refused. Not a port bound and let go: another
    // test's mock took one such port in a run of the whole suite, and answered 422.
    let addr = "127.0.0.1:9";
    let cfg = format!(
        "[sinks.c]\ntype = \"http\"\nurl = \"http://u:URLPASS@{addr}/in?token=URLTOKEN\"\nretry_initial = \"20ms\"\nretry_max = \"100ms\"\n"
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let http = client();
    let r = http
        .post(d.url("/v1/events"))
        .header("content-type", "application/json")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = d.url("/v1/status");
    let err = wait_until(DEADLINE, "the sink's error", || async {
        get_json(&status).await["sinks"][0]["last_error"]
            .as_str()
            .map(String::from)
    })
    .await;
    assert!(
        !err.contains("URLTOKEN") && !err.contains("URLPASS"),
        "{err}"
    );
    assert!(err.contains("token=***"), "{err}");
    let metrics = http
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("URLTOKEN") && !metrics.contains("URLPASS"));
    d.stop().await;
}

/// A SIGHUP while the daemon is still reading its config (a `systemctl reload` right after the
/// start) must not kill it: the reload waits until the daemon is up. The config is a FIFO, so
/// the test knows the daemon is in the middle of reading it (its open for writing succeeds
/// only once the daemon has the FIFO open) and holds it there while the signal arrives; the
/// handlers used to be installed after the config was read, and SIGHUP's default action ended
/// the process.
#[test]
fn a_sighup_while_the_config_is_being_read_does_not_kill_the_daemon() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::process::ExitStatusExt as _;

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llmlogd.toml");
    let c_path = std::ffi::CString::new(cfg.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let child = Command::new(bin())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .arg("--unix-socket")
        .arg(dir.path().join("llmlogd.sock"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn llmlogd");
    let mut child = KillOnDrop(child);
    let pid = child.0.id() as i32;
    // A non-blocking open for writing fails (ENXIO) until the daemon has the FIFO open.
    let deadline = Instant::now() + DEADLINE;
    let mut fifo = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&cfg)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                if let Ok(Some(st)) = child.0.try_wait() {
                    panic!("llmlogd exited before reading its config: {st:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("the daemon never opened its config: {e}"),
        }
    };
    // The daemon is reading its config, which it cannot finish yet.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    // Later reads (the reload) find a regular file: put it in place before the FIFO's end.
    let text = "[server]\nbody_timeout = \"30s\"\n";
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, text).unwrap();
    std::fs::rename(&plain, &cfg).unwrap();
    fifo.write_all(text.as_bytes()).expect("write the config");
    drop(fifo);

    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !seen
        .iter()
        .any(|l: &String| l.contains("configuration reloaded"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no reload after the early SIGHUP; exit: {:?}, log: {seen:#?}",
                child
                    .0
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|s| (s.code(), s.signal()))
            ),
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("llmlogd ready")),
        "ready before the reload: {seen:#?}"
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "still running after the reload"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a clean stop: {status:?}");
}

/// One family of a metrics text: its type and its samples (name with labels, value).
#[derive(Debug)]
struct MetricFamily {
    kind: String,
    samples: Vec<(String, String)>,
}

/// Parses a `/metrics` body against its format's grammar, every line, strictly: each family
/// is a `# HELP` then its `# TYPE`, then samples of that family only (no exemplar or timestamp:
/// llmlogd writes none); OpenMetrics ends with `# EOF`, 0.0.4 has none, nor `# UNIT` or any
/// other comment, and names a counter by its `_total` samples. Returns the families in order.
fn parse_exposition(text: &str, openmetrics: bool) -> Result<Vec<(String, MetricFamily)>, String> {
    let body = text.strip_suffix('\n').ok_or("no final newline")?;
    let mut lines: Vec<&str> = body.split('\n').collect();
    if openmetrics && lines.pop() != Some("# EOF") {
        return Err("no `# EOF` at the end".into());
    }
    let types: &[&str] = if openmetrics {
        &[
            "counter",
            "gauge",
            "histogram",
            "gaugehistogram",
            "stateset",
            "info",
            "summary",
            "unknown",
        ]
    } else {
        &["counter", "gauge", "histogram", "summary", "untyped"]
    };
    let mut families: Vec<(String, MetricFamily)> = Vec::new();
    let mut help: Option<&str> = None;
    for (i, line) in lines.iter().enumerate() {
        let err = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').ok_or_else(|| err("no help text"))?;
            check_metric_name(name).map_err(|e| err(&e))?;
            if text.trim().is_empty() || help.replace(name).is_some() {
                return Err(err("empty HELP, or two in a row"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| err("no type"))?;
            if help.take() != Some(name) {
                return Err(err("TYPE not right after its HELP"));
            }
            if !types.contains(&kind) {
                return Err(err("not a type of this format"));
            }
            if !openmetrics && kind == "counter" && !name.ends_with("_total") {
                return Err(err("a 0.0.4 counter is named by its `_total` samples"));
            }
            if families.iter().any(|(n, _)| n == name) {
                return Err(err("family declared twice"));
            }
            families.push((
                name.to_string(),
                MetricFamily {
                    kind: kind.to_string(),
                    samples: Vec::new(),
                },
            ));
        } else if line.starts_with('#') || line.is_empty() {
            return Err(err("a line llmlogd does not write"));
        } else {
            if help.is_some() {
                return Err(err("a sample between HELP and TYPE"));
            }
            let (name, labels, value) = parse_sample(line).map_err(|e| err(&e))?;
            let (family, f) = families
                .last_mut()
                .ok_or_else(|| err("a sample before any TYPE"))?;
            let suffixes: &[&str] = match (f.kind.as_str(), openmetrics) {
                ("counter", true) => &["_total"],
                ("histogram", _) => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            let suffix = name.strip_prefix(family.as_str());
            if !suffixes.iter().any(|s| suffix == Some(s)) {
                return Err(err(&format!("not a sample of {family} ({})", f.kind)));
            }
            if suffix == Some("_bucket") && !labels.contains("le=\"") {
                return Err(err("a bucket without `le`"));
            }
            f.samples
                .push((format!("{name}{labels}"), value.to_string()));
        }
    }
    match help {
        Some(h) => Err(format!("HELP {h} without TYPE")),
        None => Ok(families),
    }
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

/// `name{label="value",...} value`: the name, the label set as written (`""` when none), and
/// the value. Label values may hold only the escapes `\\`, `\"`, `\n`.
fn parse_sample(line: &str) -> Result<(&str, &str, &str), String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    check_metric_name(name)?;
    let rest = &line[end..];
    let b = rest.as_bytes();
    let mut i = 0;
    if b[0] == b'{' {
        i = 1;
        loop {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if i == start || b[start].is_ascii_digit() {
                return Err("bad label name".into());
            }
            if !rest[i..].starts_with("=\"") {
                return Err("no `=\"` after a label name".into());
            }
            i += 2;
            loop {
                match b.get(i) {
                    None => return Err("unterminated label value".into()),
                    Some(b'\\') if matches!(b.get(i + 1), Some(b'\\' | b'"' | b'n')) => i += 2,
                    Some(b'\\') => return Err("bad escape in a label value".into()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err("expected `,` or `}` after a label".into()),
            }
        }
    }
    let (labels, rest) = rest.split_at(i);
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let number = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || ".eE+-".contains(c))
        && value.parse::<f64>().is_ok();
    if number || matches!(value, "+Inf" | "-Inf" | "NaN") {
        Ok((name, labels, value))
    } else {
        Err(format!("bad value {value:?} (or something after it)"))
    }
}

/// `/metrics` answers OpenMetrics only when the scrape asks for it (Prometheus does), and
/// otherwise (`curl`'s `*/*`, no `Accept`, tools that ask for 0.0.4) the Prometheus text
/// format 0.0.4: both parse strictly, with the same samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_openmetrics_only_when_asked_and_prometheus_text_otherwise() {
    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink("m", &mock)).await;
    let (s, _) = post_json(&d.url("/v1/events"), "{\"n\":1}").await;
    assert_eq!(s, 202);
    let (s, _) = post_json(&d.url("/v1/events"), "{\"n\":").await;
    assert_eq!(s, 400);
    let url = d.url("/metrics");
    let scrape = |accept: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut rq = client().get(&url);
            if let Some(a) = accept {
                rq = rq.header("accept", a);
            }
            let r = rq.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            (ct, r.text().await.unwrap())
        }
    };
    // Settled: delivered and answered, so only the queue and disk figures can still move.
    wait_until(DEADLINE, "the event delivered", || async {
        let (_, t) = scrape(None).await;
        (t.contains("llmlogd_sink_delivered_events_total{sink=\"m\"} 1")
            && t.contains("llmlogd_sink_in_flight_requests{sink=\"m\"} 0"))
        .then_some(())
    })
    .await;
    let (ct, om) = scrape(Some(PROMETHEUS)).await;
    assert_eq!(
        ct,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = parse_exposition(&om, true).unwrap_or_else(|e| panic!("{e}\n{om}"));
    let syncs = om
        .iter()
        .find(|(n, _)| n == "llmlogd_queue_syncs")
        .map(|(_, f)| (f.kind.clone(), f.samples.clone()));
    let (kind, samples) = syncs.expect("llmlogd_queue_syncs is exposed");
    assert_eq!(kind, "counter");
    assert!(
        samples
            .iter()
            .any(|(n, v)| n == "llmlogd_queue_syncs_total" && v.parse::<f64>().unwrap() >= 1.0),
        "the accepted event was synced: {samples:?}"
    );
    let kinds = |fs: &[(String, MetricFamily)], counter_suffix: &str| {
        fs.iter()
            .map(|(n, f)| match f.kind.as_str() {
                "counter" => (format!("{n}{counter_suffix}"), "counter".to_string()),
                "unknown" => (n.clone(), "untyped".to_string()),
                k => (n.clone(), k.to_string()),
            })
            .collect::<Vec<_>>()
    };
    let stable = |fs: &[(String, MetricFamily)]| {
        fs.iter()
            .flat_map(|(_, f)| f.samples.clone())
            .filter(|(s, _)| !s.starts_with("llmlogd_queue_") && !s.starts_with("llmlogd_disk_"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let all = |fs: &[(String, MetricFamily)]| {
        fs.iter()
            .flat_map(|(_, f)| f.samples.iter().map(|(s, _)| s.clone()))
            .collect::<Vec<_>>()
    };
    for accept in [
        None,
        Some("*/*"),
        Some("text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
    ] {
        let (ct, text) = scrape(accept).await;
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8", "{accept:?}");
        let p =
            parse_exposition(&text, false).unwrap_or_else(|e| panic!("{accept:?}: {e}\n{text}"));
        assert_eq!(kinds(&p, ""), kinds(&om, "_total"), "{accept:?}");
        assert_eq!(all(&p), all(&om), "the same samples, in order: {accept:?}");
        assert_eq!(stable(&p), stable(&om), "{accept:?}");
        for line in [
            "# TYPE llmlogd_ingest_events_total counter",
            "llmlogd_ingest_events_total{route=\"native\",result=\"invalid\"} 1",
            "# TYPE llmlogd_sink_delivery_latency_seconds histogram",
            "llmlogd_sink_delivery_latency_seconds_count{sink=\"m\"} 1",
            // Counted since start by the queue: counters, so `rate()` and resets work.
            "# TYPE llmlogd_queue_syncs_total counter",
            "# TYPE llmlogd_queue_evicted_events_total counter",
            "llmlogd_queue_evicted_events_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
    d.stop().await;
}

/// A sink that refuses every event fills the dead letters only up to
/// `queue.dead_letter_max_bytes`: the oldest are dropped for the newest, and the metrics and
/// the status say how many letters there are, what they take and how many were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_stay_under_their_cap_and_the_metrics_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    mock.default_answer(Answer::Status(422));
    let cfg = format!(
        "[queue]\ndead_letter_max_bytes = \"1MiB\"\n{}batch_max_events = 1\nconcurrency = 8\n",
        http_sink("refuses", &mock)
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let pad = "x".repeat(2_000);
    for batch in 0..8 {
        let body: Vec<String> = (0..100)
            .map(|i| format!("{{\"n\":{},\"pad\":\"{pad}\"}}", batch * 100 + i))
            .collect();
        let (s, _) = post_json(&d.url("/v1/events"), &format!("[{}]", body.join(","))).await;
        assert_eq!(s, 202);
    }
    let st = wait_until(DEADLINE, "800 events given up on", || async {
        let st = get_json(&d.url("/v1/status")).await;
        let q = &st["queue"];
        let (n, dropped) = (
            q["dead_letters"].as_u64()?,
            q["dead_letters_dropped"].as_u64()?,
        );
        (n + dropped == 800).then_some(st)
    })
    .await;
    let q = &st["queue"];
    let (n, bytes, dropped) = (
        q["dead_letters"].as_u64().unwrap(),
        q["dead_letter_bytes"].as_u64().unwrap(),
        q["dead_letters_dropped"].as_u64().unwrap(),
    );
    assert!(bytes <= 1 << 20, "{st}");
    assert!(dropped > 0 && n > 0, "{st}");
    let text = get_text(&d.url("/metrics")).await;
    assert_eq!(
        sample(&text, "llmlogd_dead_letters"),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "llmlogd_dead_letter_bytes"),
        Some(bytes as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "llmlogd_dead_letters_dropped_total"),
        Some(dropped as f64),
        "{text}"
    );
    d.stop().await;
    // The newest are the ones kept (give or take the few in flight at once: letters come in
    // the order their requests end).
    let data = dir.path().join("data");
    let (code, out, err) = offline(&[
        "dlq",
        "--data-dir",
        data.to_str().unwrap(),
        "list",
        "--json",
        "--limit",
        "10000",
    ]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs.len() as u64, n);
    assert!(seqs.contains(&799), "{seqs:?}");
    assert!(
        seqs.iter().all(|&s| s + 16 >= dropped),
        "dropped {dropped}, kept {seqs:?}"
    );
}

/// `/readyz` answers 503 with the reason while a new event would be refused (the queue at its
/// cap with `when_full = "reject"`), and 200 again once the backlog drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_the_queue_refuses_events() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    mock.default_answer(Answer::Status(503));
    let cfg = format!(
        "[queue]\nmax_bytes = \"1MiB\"\ncompression = \"none\"\n{}",
        http_sink("down", &mock)
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let (s, v) = get(&d.url("/readyz")).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ready")));
    let pad = "y".repeat(4_000);
    let mut refused = None;
    for n in 0..2_000 {
        let (s, v) = post_json(
            &d.url("/v1/events"),
            &format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"),
        )
        .await;
        if s != 202 {
            refused = Some((s, v));
            break;
        }
    }
    let (s, v) = refused.expect("the 1 MiB cap refuses an event");
    assert_eq!(s, 503, "{v}");
    let (s, v) = get(&d.url("/readyz")).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["status"], "not accepting events");
    assert!(v["reason"].as_str().unwrap().contains("max_bytes"), "{v}");
    mock.default_answer(Answer::Status(200));
    wait_until(DEADLINE, "ready again once delivered", || async {
        let (s, _) = get(&d.url("/readyz")).await;
        (s == 200).then_some(())
    })
    .await;
    d.stop().await;
}

/// A queue kept full with `when_full = "drop_oldest"` drops on nearly every append; the log
/// says so once per period with the count, not once per request (it wrote a line each).
#[tokio::test]
async fn a_queue_kept_full_by_drop_oldest_logs_once_per_period() {
    let dir = tempfile::tempdir().unwrap();
    // A sink that never answers, so nothing leaves the queue but by eviction.
    let d = Process::start(
        dir.path(),
        "[queue]\nmax_events = 5\nwhen_full = \"drop_oldest\"\n[sinks.down]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/in\"\n",
    );
    let started = Instant::now();
    for i in 0..60 {
        let (status, body) =
            post_json(&d.url("/v1/events"), &format!(r#"{{"model":"m{i}"}}"#)).await;
        assert_eq!(status, 202, "{body}");
    }
    let evicted = wait_until(DEADLINE, "the evictions counted", || async {
        sample(
            &get_text(&d.url("/metrics")).await,
            "llmlogd_queue_evicted_events_total",
        )
        .filter(|&n| n >= 55.0)
    })
    .await;
    let periods = started.elapsed().as_secs() / 10 + 1;
    let lines: Vec<String> = d
        .log()
        .into_iter()
        .filter(|l| l.contains("dropped the oldest events"))
        .collect();
    assert!(
        !lines.is_empty() && lines.len() as u64 <= periods,
        "{evicted} events evicted in {periods} period(s) of 10 s, logged in {} lines: {lines:#?}",
        lines.len()
    );
}

/// `llmlogd status` with no daemon says why in one line (the connection was refused), not
/// only reqwest's "error sending request for url (…)", which names the URL a second time.
#[test]
fn status_without_a_daemon_says_why_in_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin())
        .env_remove("LLMLOGD_CONFIG")
        .args(["status", "--http-listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("Connection refused") && err.contains("is it running?"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Under journald (`JOURNAL_STREAM` names our stderr) each line starts with its syslog
/// priority, which journald keeps as the entry's priority: without it every line was "info",
/// and `journalctl -p warning` showed none of the daemon's warnings and errors. A
/// `JOURNAL_STREAM` that names another stream changes nothing.
#[test]
fn under_journald_lines_carry_their_priority() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], journal: bool, serves: bool| -> (Option<i32>, String) {
        let log = dir.path().join("stderr");
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut child = KillOnDrop(
            Command::new(bin())
                .env_remove("NOTIFY_SOCKET")
                .env_remove("LISTEN_FDS")
                .env_remove("RUST_LOG")
                .env("JOURNAL_STREAM", stream)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap(),
        );
        if serves {
            let deadline = Instant::now() + DEADLINE;
            while !std::fs::read_to_string(&log)
                .unwrap()
                .contains("llmlogd ready")
            {
                assert!(Instant::now() < deadline, "not ready");
                assert!(
                    child.0.try_wait().unwrap().is_none(),
                    "exited: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        }
        let code = child.0.wait().unwrap().code();
        (code, std::fs::read_to_string(&log).unwrap())
    };
    let data = dir.path().join("data");
    let daemon = [
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--http-listen",
        "127.0.0.1:0",
        "--unix-socket",
        "",
    ];
    let (code, log) = run(&daemon, true, true);
    assert_eq!(code, Some(0), "{log}");
    let line = |text: &str| {
        log.lines()
            .find(|l| l.contains(text))
            .unwrap_or_else(|| panic!("no {text:?} line in {log}"))
            .to_string()
    };
    assert!(line("no sinks configured").starts_with("<4>"), "{log}");
    assert!(line("llmlogd ready").starts_with("<6>"), "{log}");
    // A fatal error, printed before logging is set up, is an error too.
    let (code, log) = run(&["run", "--http-listen", "10.1.2.3:1"], true, false);
    assert_eq!(code, Some(64), "{log}");
    assert!(log.starts_with("<3>llmlogd: "), "{log}");
    // Not the journal: no prefix.
    let (code, log) = run(&daemon, false, true);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.lines().all(|l| !l.starts_with('<')), "{log}");
}

/// Under `log.format = "json"` every line the daemon writes is JSON, the fatal error that
/// stops it included (it was one plain `llmlogd: …` line after the JSON log lines).
#[test]
fn a_fatal_error_under_the_json_log_is_a_json_line() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken: binding it is the fatal error, after the log is set up.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = dir.path().join("llmlogd.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_listen = \"{addr}\"\nunix_socket = \"\"\n\n[queue]\ndata_dir = {data:?}\n\n[log]\nformat = \"json\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG")
        .args(["run", "--config", config.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let last = lines.last().unwrap_or_else(|| panic!("nothing logged"));
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let message = last["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    drop(taken);
}

/// `systemctl reload` only sends SIGHUP, so it succeeds whatever the daemon makes of the file:
/// the STATUS line `systemctl status` shows says a refused reload was refused (it said
/// "listening on …" as after a good one), until a reload is taken.
#[test]
fn a_refused_reload_shows_in_the_systemd_status() {
    let dir = tempfile::tempdir().unwrap();
    let (p, sock, mut seen) = start_notified(dir.path(), "", &[]);
    let write_config = |text: &str| {
        let tmp = dir.path().join("llmlogd.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.path().join("llmlogd.toml")).unwrap();
    };
    write_config("[queue]\nmax_evnets = 5\n");
    p.signal(libc::SIGHUP);
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("READY=1")),
        "{seen:?}"
    );
    let status = seen.last().unwrap().clone();
    assert!(
        status.contains("reload") && status.contains("refused") && status.contains("max_evnets"),
        "{status:?}"
    );
    write_config("[queue]\nmax_events = 5\n");
    p.signal(libc::SIGHUP);
    assert!(
        recv_until(&sock, &mut seen, |m| m.contains("READY=1")),
        "{seen:?}"
    );
    let status = seen.last().unwrap();
    assert!(
        status.contains("STATUS=listening on") && !status.contains("refused"),
        "{status:?}"
    );
}

/// A usage error is one line naming the problem and the `--help` to read, exit 64: clap's own
/// rendering spread it over five or more lines (the error, a tip, the usage, a pointer), and a
/// missing subcommand printed the whole help, into a script's log or the journal.
/// `RUST_LOG` is held to `log.level`'s rule: `warning` (a target name to the filter syntax)
/// made the daemon log nothing at all, its errors included. Refused in one line, exit 64.
#[test]
fn a_rust_log_that_is_not_a_filter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["warning", "bogus_level", "info,warning"] {
        let mut child = Command::new(bin())
            .args(["run", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--http-listen", "127.0.0.1:0", "--unix-socket", ""])
            .env("RUST_LOG", bad)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A daemon that started instead (silent) is stopped, and the test fails.
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad}: {err}");
        assert!(
            err.starts_with("llmlogd: RUST_LOG: `") && err.contains("is not a level"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn usage_errors_are_one_line_and_help_still_prints_whole() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["run", "--foo"],
            "unexpected argument '--foo' found (see `llmlogd run --help`)",
        ),
        (
            &["sendd"],
            "a similar subcommand exists: 'send' (see `llmlogd --help`)",
        ),
        (
            &["dlq"],
            "`llmlogd dlq` needs a command (see `llmlogd dlq --help`)",
        ),
        (
            &["dlq", "show"],
            "not provided: <SINK>, <SEQ> (see `llmlogd dlq show --help`)",
        ),
        (
            &["run", "--config"],
            "none was supplied (see `llmlogd run --help`)",
        ),
        (&[], "`llmlogd` needs a command (see `llmlogd --help`)"),
    ];
    for (args, want) in cases {
        let out = Command::new(bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("llmlogd: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    for args in [&["--help"][..], &["dlq", "--help"], &["--version"]] {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty() && out.stderr.is_empty(), "{args:?}");
    }
}
