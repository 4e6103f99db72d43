//! Large events on the default limits: an OpenAI vision request carries its images as base64
//! in the messages, 2-10 MB as a matter of course. Each way in (HTTP, the socket's NDJSON, a
//! Pezzo report, a PromptLayer log) takes a ~10 MB one and delivers it whole; a body over
//! `server.max_body_bytes` (16 MiB) is refused naming it; a large event the service refuses
//! with 413 goes to the dead letters, and `dlq replay` sends it again whole.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::util::*;

/// Base64 of `n` pseudo-random bytes (seeded): a PNG as an app would embed it, ~4/3 × `n`.
fn base64_image(n: usize, seed: u64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = seed;
    let mut bytes = Vec::with_capacity(n);
    for _ in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        bytes.push((x >> 56) as u8);
    }
    let mut out = String::with_capacity(n.div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(ALPHABET[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An image of ~10 MB in base64 (7.5 MB of bytes).
const IMAGE_BYTES: usize = 7_500_000;

/// The user message of an OpenAI vision request: a question and an image, base64 inline.
fn vision_message(seed: u64) -> Value {
    json!({
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {
                "url": format!("data:image/png;base64,{}", base64_image(IMAGE_BYTES, seed)),
                "detail": "high"
            }}
        ]
    })
}

/// An OpenAI chat completion answering it.
fn completion() -> Value {
    json!({
        "id": "chatcmpl-vision1",
        "object": "chat.completion",
        "created": 1_732_240_001,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A cat on a mat."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1105, "completion_tokens": 7, "total_tokens": 1112}
    })
}

/// A canonical native event of an OpenAI vision call, compact as an app's JSON library writes.
fn native_vision_event(seed: u64) -> String {
    json!({
        "schema": "llmlogd.llm/v1",
        "provider": "openai",
        "model": "gpt-4o",
        "request": {
            "start_time": "2024-11-22T01:46:40.100Z",
            "body": {"model": "gpt-4o", "messages": [vision_message(seed)], "max_tokens": 300}
        },
        "response": {"end_time": "2024-11-22T01:46:41.300Z", "body": completion()}
    })
    .to_string()
}

/// An `http` sink at `mock`, quick to flush.
fn http_sink(mock: &MockSink) -> String {
    format!(
        "[sinks.raw]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"10ms\"\nretry_initial = \"20ms\"\nretry_max = \"200ms\"\n",
        mock.url("/ingest")
    )
}

/// The only request `mock` received, once it came.
async fn the_request(mock: &MockSink, what: &str) -> Received {
    wait_for(DEADLINE, what, || mock.received().into_iter().next()).await;
    let got = mock.received();
    assert_eq!(got.len(), 1, "{what}: sent once, whole");
    got.into_iter().next().unwrap()
}

/// Says where two large bodies first differ, instead of printing 10 MB.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let around = |b: &[u8]| {
            String::from_utf8_lossy(&b[at.saturating_sub(80)..(at + 80).min(b.len())]).into_owned()
        };
        panic!(
            "{what}: {} bytes delivered, {} expected; first difference at byte {at}:\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            around(got),
            around(want)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_vision_event_over_http_is_stored_and_delivered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink(&mock)).await;
    let event = native_vision_event(1);
    assert!(event.len() > 10_000_000, "{} bytes", event.len());
    let (status, reply) = post_json(&d.url("/v1/events"), &event).await;
    assert_eq!(status, 202, "{reply}");
    let got = the_request(&mock, "the vision event delivered").await;
    assert_same_bytes(&got.body, format!("[{event}]").as_bytes(), "http sink");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_vision_event_over_the_socket_ndjson_is_acknowledged_and_delivered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &http_sink(&mock)).await;
    let event = native_vision_event(2);
    let s = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let (rd, mut wr) = s.into_split();
    let line = format!("{event}\n");
    let writer = tokio::spawn(async move {
        wr.write_all(line.as_bytes()).await.unwrap();
        wr
    });
    let reply = tokio::time::timeout(DEADLINE, BufReader::new(rd).lines().next_line())
        .await
        .expect("the line answered in time")
        .unwrap()
        .expect("a reply line");
    assert!(reply.starts_with("{\"ok\":true"), "{reply}");
    drop(writer.await.unwrap());
    let got = the_request(&mock, "the vision event delivered").await;
    assert_same_bytes(&got.body, format!("[{event}]").as_bytes(), "http sink");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_pezzo_report_is_delivered_whole_to_pezzo() {
    let dir = tempfile::tempdir().unwrap();
    let pezzo = MockSink::start().await;
    pezzo.ok_answer(201, "{\"reportId\":\"r1\"}");
    let cfg = format!(
        "[sinks.pezzo]\ntype = \"pezzo\"\nurl = \"{}\"\nbatch_max_wait = \"10ms\"\n",
        pezzo.url("")
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    // What @pezzo/client sends, with an image in the request (`metadata`'s keys in the
    // order the Pezzo renderer writes them, so that the bytes can be compared).
    let report = json!({
        "metadata": {"environment": "Production", "provider": "OpenAI", "client": "pezzo-ts", "clientVersion": "0.4.18", "type": "ChatCompletion"},
        "cacheEnabled": false,
        "request": {
            "timestamp": "2024-11-22T03:30:35.400Z",
            "body": {"model": "gpt-4o", "messages": [vision_message(3)], "max_tokens": 300}
        },
        "response": {"timestamp": "2024-11-22T03:30:36.100Z", "body": completion(), "status": 200}
    });
    let body = report.to_string();
    assert!(body.len() > 10_000_000);
    let r = client()
        .post(d.url("/api/reporting/v2/request"))
        .header("content-type", "application/json")
        .header("x-pezzo-api-key", "pez_app_key")
        .header("x-pezzo-project-id", "proj-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let got = the_request(&pezzo, "the report delivered").await;
    assert_eq!(got.path, "/api/reporting/v2/request");
    assert_eq!(
        got.header("x-pezzo-api-key").as_deref(),
        Some("pez_app_key")
    );
    assert_eq!(got.header("x-pezzo-project-id").as_deref(), Some("proj-1"));
    // A Pezzo report that needs no change for the server (provider OpenAI, a priced model,
    // no nulls) goes on exactly as the app sent it.
    assert_same_bytes(&got.body, body.as_bytes(), "pezzo sink");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_promptlayer_log_is_delivered_whole_to_promptlayer() {
    let dir = tempfile::tempdir().unwrap();
    let pl = MockSink::start().await;
    pl.ok_answer(201, "{\"id\":5001,\"prompt_version\":{}}");
    let cfg = format!(
        "[sinks.promptlayer]\ntype = \"promptlayer\"\nurl = \"{}\"\n",
        pl.url("")
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    // What the PromptLayer SDKs send for an OpenAI vision call: the image as a content part.
    let image = vision_message(4)["content"][1].clone();
    let log = json!({
        "provider": "openai",
        "model": "gpt-4o",
        "input": {"type": "chat", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            image
        ]}]},
        "output": {"type": "chat", "messages": [{"role": "assistant", "content": [
            {"type": "text", "text": "A cat on a mat."}
        ]}]},
        "request_start_time": "2024-11-22T01:46:40.100Z",
        "request_end_time": "2024-11-22T01:46:41.300Z",
        "tags": ["vision"],
        "input_tokens": 1105,
        "output_tokens": 7
    });
    let body = log.to_string();
    assert!(body.len() > 10_000_000);
    let r = client()
        .post(d.url("/log-request"))
        .header("content-type", "application/json")
        .header("x-api-key", "pl_app_key")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let got = the_request(&pl, "the log delivered").await;
    assert_eq!(got.path, "/log-request");
    assert_eq!(got.header("x-api-key").as_deref(), Some("pl_app_key"));
    // Times already RFC 3339 and no nulls: nothing for the sink to change.
    assert_same_bytes(&got.body, body.as_bytes(), "promptlayer sink");
    d.stop().await;
}

/// A body over the default `server.max_body_bytes` (16 MiB) is refused at once from its
/// declared length, with the JSON error naming the setting. The client waits for
/// `100 Continue`, as curl does, so the connection closes at once too (a client that sends
/// without waiting has its body read and dropped first, `http_clients.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_17_mib_body_is_refused_413_naming_max_body_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let len = 17 << 20;
    let mut s = tokio::net::TcpStream::connect(d.started.http.unwrap())
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {len}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut reply))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("server.max_body_bytes") && message.contains(&(16u64 << 20).to_string()),
        "{message}"
    );
    d.stop().await;
}

/// A large event the service refuses with 413 is tried alone, then dead-lettered with the
/// status (not retried for ever); `dlq replay` sends it again, whole, once the service takes
/// it. The event is also larger than `batch_max_bytes`: it goes in a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_event_refused_with_413_is_dead_lettered_and_replayed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    mock.default_answer(Answer::StatusBody(
        413,
        "{\"error\":\"payload too large\"}".into(),
    ));
    let cfg = http_sink(&mock) + "batch_max_bytes = \"1MiB\"\n";
    let d = InProcess::start(dir.path(), &cfg).await;
    let small = "{\"small\":1}".to_string();
    let event = native_vision_event(5);
    for e in [&small, &event] {
        let (status, reply) = post_json(&d.url("/v1/events"), e).await;
        assert_eq!(status, 202, "{reply}");
    }
    wait_until(DEADLINE, "the large event dead-lettered", || async {
        let st = get_json(&d.url("/v1/status")).await;
        (st["queue"]["dead_letters"] == 2).then_some(())
    })
    .await;
    // Each went alone: nothing is put beside an event over `batch_max_bytes`.
    let sizes: Vec<usize> = mock.received().iter().map(|r| r.body.len()).collect();
    assert!(
        sizes
            .iter()
            .all(|&n| n == small.len() + 2 || n == event.len() + 2),
        "{sizes:?}"
    );
    d.stop().await;
    let data = dir.path().join("data");
    // With the daemon's config (beside the data dir), as an operator would run it.
    let dlq = |args: &[&str]| {
        let (code, out, err) = dlq(&data, args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let letters: Vec<Value> = dlq(&["list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().all(|l| l["info"]["status"] == 413),
        "{letters:?}"
    );
    dlq(&["replay", "--sink", "raw"]);
    let mock = MockSink::start().await;
    let cfg = http_sink(&mock) + "batch_max_bytes = \"1MiB\"\n";
    let d = InProcess::start(dir.path(), &cfg).await;
    wait_for(DEADLINE, "both replayed events delivered", || {
        (mock.received().len() >= 2).then_some(())
    })
    .await;
    let got = mock.received();
    let large: Vec<&Received> = got.iter().filter(|r| r.body.len() > 1_000_000).collect();
    assert_eq!(large.len(), 1, "the large event sent once");
    assert_same_bytes(&large[0].body, format!("[{event}]").as_bytes(), "replayed");
    tokio::time::timeout(Duration::from_secs(30), d.stop())
        .await
        .unwrap();
}
