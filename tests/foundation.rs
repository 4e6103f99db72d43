//! The spine: ingest → sled → delivery, end to end, crash-safe.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn http_sink(mock: &impl Target) -> String {
    format!(
        "[sinks.mock]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"20ms\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n",
        mock.url("/ingest")
    )
}

/// A unique event whose bytes have odd spacing, so byte-identity is really checked.
fn event(i: usize) -> String {
    format!(
        "{{ \"i\" : {i},\"model\":\"gpt-4o\",  \"messages\":[{{\"role\":\"user\",\"content\":\"hello {i} \\u00e9\"}}] }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_from_16_clients_arrive_once_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink(&mock)).await;
    let url = d.url("/v1/events");
    let mut tasks = Vec::new();
    for c in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let http = client();
            for i in (c..1000).step_by(16) {
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(event(i))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "event {i}: {:?}", r.text().await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent: Vec<String> = (0..1000).map(event).collect();
    let got = wait_for(DEADLINE, "1000 events at the mock", || {
        let all: Vec<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        (all.len() >= 1000).then_some(all)
    })
    .await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for g in &got {
        *counts.entry(g.as_str()).or_default() += 1;
    }
    for s in &sent {
        assert_eq!(
            counts.get(s.as_str()),
            Some(&1),
            "event {s} arrived {:?} times",
            counts.get(s.as_str())
        );
    }
    assert_eq!(got.len(), 1000, "no extra events");
    // Every batch names its events' ids for de-duplication.
    for r in mock.received() {
        let ids = r.header("x-llmlogd-event-ids").expect("ids header");
        assert_eq!(ids.split(',').count(), r.raw_events().len());
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_while_the_endpoint_is_down() {
    let dir = tempfile::tempdir().unwrap();
    // Reserve a port for the endpoint, closed: connections are refused.
    let port = MockSink::closed();
    let cfg = http_sink(&port);
    let p = Process::start(dir.path(), &cfg);
    let mut sent = Vec::new();
    for i in 0..200 {
        let (s, v) = post_json(&p.url("/v1/events"), &event(i)).await;
        assert_eq!(s, 202, "{v}");
        sent.push(event(i));
    }
    // Batch post too: an array of 50.
    let batch: Vec<String> = (200..250).map(event).collect();
    let (s, v) = post_json(&p.url("/v1/events"), &format!("[{}]", batch.join(","))).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["ids"].as_array().unwrap().len(), 50);
    sent.extend(batch);
    p.kill9();

    let mock = port.open().await;
    let p = Process::start(dir.path(), &cfg);
    let got = wait_for(DEADLINE, "every acknowledged event after restart", || {
        let all: Vec<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        let have: std::collections::HashSet<&String> = all.iter().collect();
        sent.iter().all(|s| have.contains(s)).then_some(all.len())
    })
    .await;
    assert!(got >= 250);
    let status = p.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_400_naming_the_problem_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink(&mock)).await;
    let cases = [
        ("{\"a\": 1", "end of input"),
        ("[{\"a\":1}, 2]", "event [1]"),
        ("\"just a string\"", "JSON object"),
        ("{\"a\":1} trailing", "trailing"),
    ];
    for (body, needle) in cases {
        let (s, v) = post_json(&d.url("/v1/events"), body).await;
        assert_eq!(s, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert_eq!(v["error"]["code"], "invalid_json");
    }
    // Wrong content type: 415 naming the header.
    let r = client()
        .post(d.url("/v1/events"))
        .header("content-type", "text/html")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.text().await.unwrap().contains("Content-Type"));
    // Nothing was stored: the next accepted event gets sequence number 0.
    let (s, v) = post_json(&d.url("/v1/events"), "{\"ok\":true}").await;
    assert_eq!(s, 202);
    assert_eq!(v["seqs"][0], 0);
    let got = wait_for(DEADLINE, "the one good event", || {
        let all: Vec<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(got, vec!["{\"ok\":true}".to_string()]);
    let metrics = get_text(&d.url("/metrics")).await;
    assert!(
        metrics.contains("llmlogd_ingest_events_total{route=\"native\",result=\"invalid\"} 5"),
        "{metrics}"
    );
    d.stop().await;
}

#[test]
fn config_errors_exit_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nhttp_listne = \"127.0.0.1:1\"\n", "http_listne"),
        (
            "[sinks.pl]\ntype = \"promptlayer\"\ntimeout = \"soon\"\n",
            "sinks.pl.timeout",
        ),
        ("[queue]\nwhen_full = \"panic\"\n", "queue.when_full"),
        ("[sinks.x]\ntype = \"http\"\n", "sinks.x.url"),
        ("not toml at all [", "config"),
    ];
    for (text, key) in cases {
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, text).unwrap();
        let out = Command::new(bin())
            .args(["run", "--config"])
            .arg(&f)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        // Refused before anything was created or bound.
        assert!(!dir.path().join("data").exists());
    }
    // check-config agrees, and prints the effective config for a good file.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\nheaders = { Authorization = \"Bearer s3cret\" }\n").unwrap();
    let out = Command::new(bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[sinks.h]") && !text.contains("s3cret"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_and_exits_zero_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // The endpoint is slow: events are still queued when SIGTERM arrives.
    mock.default_answer(Answer::Delay(Duration::from_millis(300)));
    let cfg = http_sink(&mock) + "batch_max_events = 10\n";
    let p = Process::start(dir.path(), &cfg);
    for i in 0..100 {
        let (s, _) = post_json(&p.url("/v1/events"), &event(i)).await;
        assert_eq!(s, 202);
    }
    let status = p.terminate();
    assert!(status.success(), "{status:?}");
    // Restart: whatever was not delivered before the stop is delivered now.
    mock.default_answer(Answer::Status(200));
    let p = Process::start(dir.path(), &cfg);
    wait_for(DEADLINE, "all 100 events", || {
        let all: std::collections::HashSet<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        (0..100).all(|i| all.contains(&event(i))).then_some(())
    })
    .await;
    assert!(p.terminate().success());
}

fn sigterm(p: &Process) {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
}

/// Sends SIGTERM and waits for the daemon to say it is stopping; its log lines.
async fn stop_begun(p: &Process) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    sigterm(p);
    let lines = p.stderr_lines.clone();
    wait_for(DEADLINE, "the stop under way", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("stopping"))
            .then_some(())
    })
    .await;
    lines
}

/// A request whose body is still arriving when SIGTERM comes is answered: stored and `202`
/// if the rest comes within the stop's body grace (7 s; here 4 s later), else `503`
/// `shutting_down` with nothing stored. Before, such a connection was cut off after 3 s with
/// no reply at all (the README promises "answer in-flight requests").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_uploading_at_stop_is_answered() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let mut p = Process::start(dir.path(), &http_sink(&mock));
    let addr = p.url("").trim_start_matches("http://").to_string();
    let body = event(1);
    // `Expect: 100-continue`: the `100` says the handler is reading the body.
    let head = |len: usize| {
        format!(
            "POST /v1/events HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    let reading = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut b).unwrap(),
                1,
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            got.push(b[0]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 100"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    };
    // One upload that will finish after the stop began, one that never will.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(head(body.len()).as_bytes()).unwrap();
    reading(&mut slow);
    slow.write_all(&body.as_bytes()[..5]).unwrap();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled.write_all(head(1000).as_bytes()).unwrap();
    reading(&mut stalled);
    stalled.write_all(b"{\"partial\":").unwrap();
    stop_begun(&p).await;
    // The rest of the first body, past the old 3 s cut-off.
    let rest = body.as_bytes()[5..].to_vec();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        slow.write_all(&rest).unwrap();
        slow.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut reply = String::new();
        let _ = slow.read_to_string(&mut reply);
        reply
    });
    stalled.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut refused = String::new();
    let _ = stalled.read_to_string(&mut refused);
    let stored = writer.join().unwrap();
    assert!(stored.starts_with("HTTP/1.1 202"), "{stored}");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    assert!(refused.contains("\"shutting_down\""), "{refused}");
    let status = wait_for(DEADLINE, "exit", || p.child.try_wait().unwrap()).await;
    assert!(status.success(), "{status:?}");
    // The acknowledged event is delivered after a restart (or was, during the drain).
    let p = Process::start(dir.path(), &http_sink(&mock));
    wait_for(DEADLINE, "the stored event delivered", || {
        let all: Vec<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        all.contains(&event(1)).then_some(())
    })
    .await;
    assert!(p.terminate().success());
}

/// A second SIGTERM (Ctrl-C twice at a terminal) stops at once instead of waiting out
/// `drain_timeout`; the undelivered events stay queued and are delivered after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain_short_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    // Requests hang far longer than the test waits: only a cut-short drain ends quickly.
    mock.default_answer(Answer::Delay(Duration::from_secs(600)));
    // Neither the request timeout nor the drain deadline ends the first stop within the test.
    let cfg = http_sink(&mock)
        + "batch_max_events = 5\ntimeout = \"1h\"\n[delivery]\ndrain_timeout = \"1h\"\n";
    let mut p = Process::start(dir.path(), &cfg);
    for i in 0..20 {
        let (s, _) = post_json(&p.url("/v1/events"), &event(i)).await;
        assert_eq!(s, 202);
    }
    wait_for(DEADLINE, "a delivery in flight", || {
        (!mock.received().is_empty()).then_some(())
    })
    .await;
    let lines = stop_begun(&p).await;
    assert!(p.child.try_wait().unwrap().is_none(), "still draining");
    sigterm(&p);
    let status = wait_for(DEADLINE, "exit after the second SIGTERM", || {
        p.child.try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("second stop signal")),
        "{:?}",
        lines.lock().unwrap()
    );
    // Restart: all 20 arrive.
    mock.default_answer(Answer::Status(200));
    let p = Process::start(dir.path(), &cfg);
    wait_for(DEADLINE, "all 20 events", || {
        let all: std::collections::HashSet<String> = mock
            .received()
            .iter()
            .flat_map(|r| r.raw_events())
            .collect();
        (0..20).all(|i| all.contains(&event(i))).then_some(())
    })
    .await;
    assert!(p.terminate().success());
}
