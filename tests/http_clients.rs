//! Ingest as an HTTP server meeting real (and sloppy) clients: half-closed connections,
//! compressed bodies, byte order marks, and refusals in requests of many events that must
//! say which event is wrong. Each test sends raw bytes, so it sees exactly what a client sees.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::util::*;

/// One request written by hand: `head` is the request line and headers (without the blank
/// line), a `Content-Length` is added. With `half_close` the client shuts its write side once
/// the request is sent. Returns (status, body) of the reply, read to the end of the
/// connection.
async fn exchange<S>(mut s: S, head: &str, body: &[u8], half_close: bool) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!("{head}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the connection ends in time")
        .expect("read the reply");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no reply: got {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn tcp(d: &InProcess) -> TcpStream {
    TcpStream::connect(d.started.http.unwrap()).await.unwrap()
}

async fn unix(path: &Path) -> UnixStream {
    UnixStream::connect(path).await.unwrap()
}

/// POSTs `body` to `path` over TCP with `headers` (each "Name: value"), `Connection: close`.
async fn post(d: &InProcess, path: &str, headers: &[&str], body: &[u8]) -> (u16, Value) {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close");
    for h in headers {
        head.push_str("\r\n");
        head.push_str(h);
    }
    let (status, text) = exchange(tcp(d).await, &head, body, false).await;
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} reply {text:?} is not JSON: {e}"));
    (status, v)
}

/// The next sequence number: stores one event and returns its seq, so every event stored
/// before it has a smaller one.
async fn next_seq(d: &InProcess) -> u64 {
    let (s, v) = post(
        d,
        "/v1/events",
        &["Content-Type: application/json"],
        br#"{"sentinel":true}"#,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    v["seqs"][0].as_u64().expect("a seq")
}

/// A client that shuts down its write side once its request is sent (`nc -N`, `socat`, a
/// script piping a request into the socket) waits for the reply. hyper took that end of input
/// for a vanished client and closed the connection unanswered, though the event was stored:
/// stored and never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let over_tcp = r#"{"model":"gpt-4o","input":"half-closed over tcp"}"#;
    let over_socket = r#"{"model":"gpt-4o","input":"half-closed over the socket"}"#;
    let head = "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    let (status, body) = exchange(tcp(&d).await, head, over_tcp.as_bytes(), true).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        exchange(unix(&d.socket()).await, head, over_socket.as_bytes(), true).await;
    assert_eq!(status, 202, "{body}");
    // HTTP/1.0, which closes after one request anyway.
    let old = r#"{"model":"gpt-4o","input":"half-closed, HTTP/1.0"}"#;
    let head10 = "POST /v1/events HTTP/1.0\r\nContent-Type: application/json";
    let (status, body) = exchange(unix(&d.socket()).await, head10, old.as_bytes(), true).await;
    assert_eq!(status, 202, "{body}");
    mock.wait_arrived(&[over_tcp, over_socket, old]).await;
    d.stop().await;
}

/// A compressed body is refused with a 415 naming `Content-Encoding`, and nothing is stored.
/// Before, a gzip body got "not valid JSON" and a plain JSON body labelled `br` was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_a_content_encoding_is_refused_naming_the_header() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let event = br#"{"model":"gpt-4o","input":"compressed"}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(event).unwrap();
    let gzipped = gz.finish().unwrap();
    let pezzo = r#"{"metadata":{"provider":"OpenAI","client":"c","clientVersion":"1","environment":"Production"},"request":{"timestamp":"2024-11-22T03:30:35.400Z","body":{"model":"gpt-4o"}},"response":{"timestamp":"2024-11-22T03:30:36.100Z","body":{},"status":200}}"#;
    let before = next_seq(&d).await;
    for (path, encoding, body) in [
        ("/v1/events", "gzip", &gzipped[..]),
        ("/v1/events", "br", &event[..]),
        ("/v1/events", "identity, deflate", &event[..]),
        ("/api/reporting/v2/request", "gzip", pezzo.as_bytes()),
        ("/log-request", "deflate", &event[..]),
    ] {
        let (status, v) = post(
            &d,
            path,
            &[
                "Content-Type: application/json",
                &format!("Content-Encoding: {encoding}"),
                "x-pezzo-api-key: k",
                "x-pezzo-project-id: p",
            ],
            body,
        )
        .await;
        assert_eq!(status, 415, "{path} {encoding}: {v}");
        assert_eq!(v["error"]["code"], "unsupported_encoding", "{v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("Content-Encoding"), "{msg}");
    }
    assert_eq!(next_seq(&d).await, before + 1, "nothing refused was stored");
    // `identity` is no encoding at all.
    let (status, v) = post(
        &d,
        "/v1/events",
        &["Content-Encoding: identity"],
        br#"{"plain":"identity"}"#,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    mock.wait_arrived(&[r#"{"plain":"identity"}"#]).await;
    d.stop().await;
}

/// A request of many events is stored whole or not at all; a refusal names the event (its
/// index in an array, its line in NDJSON) and the field, with the field's path in the body.
/// Before, it named the field only (`tags[0]`): the client could not tell which event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_among_good_ones_is_named_by_its_place_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let good = r#"{"model":"gpt-4o","input":"good"}"#;
    let bad = r#"{"schema":"llmlogd.llm/v1","provider":"openai","model":"gpt-4o","tags":[1]}"#;
    let before = next_seq(&d).await;

    let array = format!("[{good},{bad},{good}]");
    let (status, v) = post(
        &d,
        "/v1/events",
        &["Content-Type: application/json"],
        array.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_field", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.starts_with("event [1]: tags[0]"), "{msg}");
    assert_eq!(v["error"]["fields"][0]["field"], "[1].tags[0]", "{v}");

    let lines = format!("{good}\n\n{bad}\n{good}\n");
    let (status, v) = post(
        &d,
        "/v1/events",
        &["Content-Type: application/x-ndjson"],
        lines.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.starts_with("line 3: tags[0]"), "{msg}");

    assert_eq!(
        next_seq(&d).await,
        before + 1,
        "no event of a refused request was stored"
    );
    d.stop().await;
}

/// A body saved as "UTF-8 with BOM" (`curl -d @file.json` of a file from a Windows editor) is
/// taken, as the socket's NDJSON and `llmlogd send` take it, and stored without the mark.
/// Before, it was refused "not valid JSON: expected value at line 1 column 1". An empty body
/// is refused as empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_starting_with_a_byte_order_mark_is_stored_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(dir.path(), &mock.sink_config()).await;
    let one = r#"{"model":"gpt-4o","input":"saved with a BOM"}"#;
    let two = r#"{"model":"gpt-4o","input":"an array with a BOM"}"#;
    let three = r#"{"model":"gpt-4o","input":"NDJSON with a BOM"}"#;
    for (ct, body) in [
        ("application/json", format!("\u{feff}{one}\n")),
        ("application/json", format!("\u{feff}[{two}]")),
        ("application/x-ndjson", format!("\u{feff}{three}\n")),
    ] {
        let (status, v) = post(
            &d,
            "/v1/events",
            &[&format!("Content-Type: {ct}")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 202, "{ct} {body:?}: {v}");
    }
    let got = mock.wait_arrived(&[one, two, three]).await;
    assert!(
        got.iter().all(|e| !e.contains('\u{feff}')),
        "stored without the mark: {got:?}"
    );
    for path in ["/v1/events", "/log-request"] {
        let (status, v) = post(&d, path, &["Content-Type: application/json"], b"  \n").await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "empty", "{path}: {v}");
    }
    d.stop().await;
}

/// Reads one reply from a kept-alive connection: (status, head in lower case, body).
async fn one_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut byte))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(
            n == 1,
            "the connection ended before a reply: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut body))
        .await
        .expect("the body in time")
        .unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, String::from_utf8(body).unwrap())
}

/// A request refused before its body was read leaves the connection unusable (hyper closes
/// it), so the reply says `Connection: close`. Without it, a keep-alive client (Python's
/// http.client, requests.Session, Node's agent) sent its next request on the closed
/// connection and got "Remote end closed connection without response". A refusal after the
/// body was read keeps the connection, and the next request on it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_leaves_the_body_unread_says_connection_close() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let d = InProcess::start(
        dir.path(),
        &format!(
            "[server]\nmax_body_bytes = \"64KiB\"\n{}",
            mock.sink_config()
        ),
    )
    .await;
    let big = format!(r#"{{"model":"gpt-4o","input":"{}"}}"#, "x".repeat(200_000));
    let event = r#"{"model":"gpt-4o","input":"kept alive"}"#;
    for (what, headers, body) in [
        (
            "a wrong Content-Type",
            "Content-Type: text/plain",
            big.as_str(),
        ),
        ("a Content-Encoding", "Content-Encoding: gzip", event),
        (
            "a body over max_body_bytes",
            "Content-Type: application/json",
            big.as_str(),
        ),
    ] {
        let mut s = tcp(&d).await;
        let req = format!(
            "POST /v1/events HTTP/1.1\r\nHost: localhost\r\n{headers}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Only the head, waiting for `100 Continue` as curl does: each refusal is decided
        // from the headers, and the body is never sent.
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, head, reply) = one_reply(&mut s).await;
        assert!(status >= 400, "{what}: {status} {reply}");
        assert!(
            head.contains("\r\nconnection: close\r\n"),
            "{what}: the reply says the connection closes: {head}"
        );
    }
    // Read, then refused: the connection goes on.
    let mut s = tcp(&d).await;
    for (body, want) in [(r#"{"model":"#, 400), (event, 202)] {
        let req = format!(
            "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, head, reply) = one_reply(&mut s).await;
        assert_eq!(status, want, "{reply}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    mock.wait_arrived(&[event]).await;
    d.stop().await;
}

/// Python's http.client and requests (the PromptLayer and Pezzo Python SDKs) send the whole
/// body before reading the reply. When a request was refused from its headers (too large,
/// wrong Content-Type) the daemon closed with the body unread, and such a client got a broken
/// pipe or a reset: an error that reads as transient, to retry, instead of the 413 that says
/// not to. The body is now read and dropped first (bounded), so the client gets the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_before_reading_gets_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "[server]\nmax_body_bytes = \"64KiB\"\n").await;
    // Far more than the sockets' buffers hold, so the daemon must read it for the write to end.
    let big = format!(r#"{{"model":"gpt-4o","input":"{}"}}"#, "x".repeat(8 << 20));
    for (path, content_type, want) in [
        ("/v1/events", "application/json", 413),
        ("/v1/events", "text/plain", 415),
        ("/log-request", "application/x-ndjson", 415),
    ] {
        let mut s = tcp(&d).await;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .into_bytes();
        req.extend_from_slice(big.as_bytes());
        tokio::time::timeout(DEADLINE, s.write_all(&req))
            .await
            .expect("the body is taken in time")
            .unwrap_or_else(|e| panic!("{path} {content_type}: sending the body failed: {e}"));
        let (status, head, reply) = one_reply(&mut s).await;
        assert_eq!(status, want, "{path} {content_type}: {reply}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    d.stop().await;
}

/// A web page the user opens can send requests to loopback ports. Its cross-site POST (no
/// Content-Type, as a `no-cors` fetch of a Blob sends) would be stored and delivered with the
/// sinks' keys; a page whose name was made to resolve to 127.0.0.1 (DNS rebinding) could read
/// the status. Both are refused with a 403 naming the header, nothing is stored, and the
/// refusals are counted; apps (any Host that names this machine, or the Unix socket) are
/// served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_can_neither_post_events_nor_read_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockSink::start().await;
    let cfg = format!(
        "[server]\nallowed_hosts = [\"llm.internal\"]\n{}",
        mock.sink_config()
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let port = d.started.http.unwrap().port();
    let before = next_seq(&d).await;

    let page = br#"{"model":"gpt-4o","input":"from a web page"}"#;
    let refusals = [
        // Cross-site: a page on another site posts (native and PromptLayer routes).
        (
            format!("POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example"),
            "forbidden_origin",
            "Origin",
        ),
        (
            format!("POST /log-request HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: null\r\nContent-Type: text/plain"),
            "forbidden_origin",
            "Origin",
        ),
        // Rebinding: same-origin requests, but the Host names the page's site.
        (
            format!("POST /v1/events HTTP/1.1\r\nHost: evil.example:{port}"),
            "forbidden_host",
            "Host",
        ),
        (
            format!("GET /v1/status HTTP/1.1\r\nHost: evil.example:{port}"),
            "forbidden_host",
            "Host",
        ),
    ];
    for (head, code, field) in &refusals {
        let head = format!("{head}\r\nConnection: close");
        let body: &[u8] = if head.starts_with("GET") { b"" } else { page };
        let (status, text) = exchange(tcp(&d).await, &head, body, false).await;
        assert_eq!(status, 403, "{head}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], *code, "{head}: {v}");
        assert_eq!(v["error"]["fields"][0]["field"], *field, "{v}");
        assert!(!text.contains("\"sinks\""), "no status leaked: {text}");
    }

    // Apps are served: any name for this machine, and the Unix socket even with an Origin.
    let mut served = Vec::new();
    for (i, host) in [
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "llm.internal".to_string(),
        format!("LLM.Internal.:{port}"),
    ]
    .iter()
    .enumerate()
    {
        let ev = format!(r#"{{"model":"gpt-4o","input":"app {i}"}}"#);
        let head = format!("POST /v1/events HTTP/1.1\r\nHost: {host}\r\nConnection: close");
        let (status, text) = exchange(tcp(&d).await, &head, ev.as_bytes(), false).await;
        assert_eq!(status, 202, "{host}: {text}");
        served.push(ev);
    }
    let ev = r#"{"model":"gpt-4o","input":"socket with an Origin"}"#.to_string();
    let head = "POST /v1/events HTTP/1.1\r\nHost: evil.example\r\nOrigin: https://evil.example\r\nConnection: close";
    let (status, text) = exchange(unix(&d.socket()).await, head, ev.as_bytes(), false).await;
    assert_eq!(status, 202, "{text}");
    served.push(ev);

    // Nothing refused was stored: the seqs in between are the served events'.
    let after = next_seq(&d).await;
    assert_eq!(after - before - 1, served.len() as u64);
    let mut arrived = mock.wait_arrived(&served).await;
    arrived.retain(|e| !e.contains("sentinel"));
    assert_eq!(arrived.len(), served.len(), "{arrived:?}");

    let metrics = get_text(&d.url("/metrics")).await;
    for line in [
        "llmlogd_http_forbidden_requests_total{reason=\"origin\"} 2",
        "llmlogd_http_forbidden_requests_total{reason=\"host\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    d.stop().await;
}
