//! Drop-in for the official clients: golden fixtures of what they send, and the real SDKs run
//! against llmlogd with mock Pezzo / PromptLayer services behind it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use llmlogd::formats::{self, Format, TrackKind};

use crate::util::*;

/// Whether `got` is the PromptLayer log `sent` as llmlogd delivers it: the same members, times
/// as RFC 3339 strings of the same instant (to the microsecond), and nulls the spec does not
/// allow left out. `Ok(float times converted)` or what differs.
fn same_log(sent: &Value, got: &Value) -> Result<usize, String> {
    let mut floats = 0;
    for (k, v) in sent.as_object().unwrap() {
        let g = &got[k];
        if k.ends_with("_time") {
            let at = g
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .ok_or(format!("{k}: {g}"))?;
            let micros = match v.as_f64() {
                Some(secs) => {
                    floats += 1;
                    (secs * 1e6).round() as i64
                }
                None => chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
                    .map_err(|e| e.to_string())?
                    .timestamp_micros(),
            };
            if (at.timestamp_micros() - micros).abs() > 1 {
                return Err(format!("{k}: {v} → {g}"));
            }
        } else if !(v.is_null() && got.get(k).is_none()) && g != v {
            return Err(format!("{k}: {v} → {g}"));
        }
    }
    Ok(floats)
}

/// A mock PromptLayer that answers logs and groups with ids counting up from `first`, and
/// follow-ups with success.
async fn promptlayer_mock(first: u64) -> MockSink {
    let pl = MockSink::start().await;
    let next_id = Arc::new(AtomicU64::new(first));
    pl.rule(move |r| {
        let id = next_id.fetch_add(1, Ordering::SeqCst);
        Some(match r.path.as_str() {
            "/log-request" => {
                Answer::StatusBody(201, format!("{{\"id\":{id},\"prompt_version\":{{}}}}"))
            }
            "/create-group" => Answer::StatusBody(200, format!("{{\"success\":true,\"id\":{id}}}")),
            "/track-request" => {
                Answer::StatusBody(200, format!("{{\"success\":true,\"request_id\":{id}}}"))
            }
            _ => Answer::StatusBody(200, "{\"success\":true}".into()),
        })
    });
    pl
}

/// A Pezzo body as llmlogd delivers it: without the `null`s its spec does not allow.
fn pezzo_less_spec_nulls(body: &Value) -> Value {
    let mut v = body.clone();
    let o = v.as_object_mut().unwrap();
    o.retain(|k, x| {
        !(x.is_null() && ["cacheHit", "cacheEnabled", "properties"].contains(&k.as_str()))
    });
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, x| !(x.is_null() && k == "promptId"));
    }
    v
}

fn fixtures() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clients");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 20, "fixtures missing: {}", out.len());
    out
}

/// Fixtures of calls llmlogd takes (cache and wrapper calls are out of scope).
/// The logging fixture whose path ends with `path`.
fn fixture(path: &str) -> Value {
    logging_fixtures()
        .into_iter()
        .find(|(_, p, _)| p.ends_with(path))
        .unwrap()
        .2
}

/// POSTs a Pezzo `report` and a PromptLayer `log` with an app's credentials; both are taken.
async fn post_report_and_log(d: &InProcess, report: &Value, log: &Value) {
    let http = client();
    let r = http
        .post(d.url("/api/reporting/v2/request"))
        .header("x-pezzo-api-key", "pez_app")
        .header("x-pezzo-project-id", "proj")
        .json(report)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(d.url("/log-request"))
        .header("x-api-key", "pl_app")
        .json(log)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

fn logging_fixtures() -> Vec<(String, String, Value)> {
    fixtures()
        .into_iter()
        .filter_map(|(name, f)| {
            let path = f["path"].as_str()?.to_string();
            let known = path.ends_with("/reporting/v2/request")
                || path == "/log-request"
                || path == "/create-group"
                || path == "/track-request"
                || TrackKind::from_path(&path).is_some();
            known.then(|| (name, path, f["body"].clone()))
        })
        .collect()
}

#[test]
fn golden_fixtures_validate_and_round_trip() {
    let mut checked = 0;
    for (name, path, body) in logging_fixtures() {
        if name.contains("async-track-prompt") {
            // promptlayer 1.5.16's async track.prompt sends its arguments in the wrong order
            // (request_id: true); refusing it names the field.
            let errs = formats::promptlayer::validate_track(TrackKind::Prompt, &body).unwrap_err();
            assert!(
                errs.iter().any(|e| e.field == "request_id"),
                "{name}: {errs:?}"
            );
            continue;
        }
        if path.ends_with("/reporting/v2/request") {
            formats::pezzo::validate(&body).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let back = formats::render(Format::Pezzo, &body, Format::Pezzo).unwrap();
            // The clients' bodies come back unchanged unless the model is not priced by the
            // server (then usage moves into properties so the server does not answer 500).
            let model = body["request"]["body"]["model"].as_str().unwrap_or("");
            if formats::pezzo::is_priced_model(model)
                || body["response"]["body"].get("usage").is_none()
            {
                assert_eq!(
                    back,
                    pezzo_less_spec_nulls(&body),
                    "{name}: Pezzo round trip"
                );
            }
            formats::pezzo::validate(&back).unwrap_or_else(|e| panic!("{name} rendered: {e:?}"));
            assert_eq!(spec::pezzo_report(&back), Vec::<String>::new(), "{name}");
            // And across: to PromptLayer, valid per its spec.
            let pl = formats::render(Format::Pezzo, &body, Format::PromptLayer).unwrap();
            formats::promptlayer::validate(&pl)
                .unwrap_or_else(|e| panic!("{name} → PL: {e:?}\n{pl:#}"));
            assert_eq!(
                spec::promptlayer_log(&pl),
                Vec::<String>::new(),
                "{name} → PL"
            );
        } else if path == "/log-request" {
            formats::promptlayer::validate(&body).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let back = formats::render(Format::PromptLayer, &body, Format::PromptLayer).unwrap();
            formats::promptlayer::validate(&back)
                .unwrap_or_else(|e| panic!("{name} rendered: {e:?}"));
            assert_eq!(spec::promptlayer_log(&back), Vec::<String>::new(), "{name}");
            let pz = formats::render(Format::PromptLayer, &body, Format::Pezzo).unwrap();
            formats::pezzo::validate(&pz)
                .unwrap_or_else(|e| panic!("{name} → Pezzo: {e:?}\n{pz:#}"));
            assert_eq!(
                spec::pezzo_report(&pz),
                Vec::<String>::new(),
                "{name} → Pezzo"
            );
            assert_eq!(
                pz["metadata"]["provider"], "OpenAI",
                "{name}: no Pezzo 500 for other providers"
            );
        } else if let Some(kind) = TrackKind::from_path(&path) {
            formats::promptlayer::validate_track(kind, &body)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

/// A request without the credentials the service needs gets the service's 401, naming the
/// header, when a sink of that service has none of its own: stored, the event could never
/// reach it (it used to be answered 201 and dropped, or to stall the sink).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_credentials_a_keyless_service_sink_needs_get_401() {
    let pezzo = MockSink::start().await;
    pezzo.ok_answer(201, "{}");
    let pl = MockSink::start().await;
    pl.ok_answer(201, "{\"id\":1,\"prompt_version\":{}}");
    let cfg = format!(
        "[sinks.pz]\ntype = \"pezzo\"\nurl = \"{}\"\n[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\n",
        pezzo.url(""),
        pl.url("")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let http = client();
    let (report, log) = (fixture("/reporting/v2/request"), fixture("/log-request"));
    type Case<'a> = (&'a str, &'a Value, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 3] = [
        ("/api/reporting/v2/request", &report, &[], "x-pezzo-api-key"),
        (
            "/api/reporting/v2/request",
            &report,
            &[("x-pezzo-api-key", "pez_app")],
            "x-pezzo-project-id",
        ),
        ("/log-request", &log, &[], "X-API-KEY"),
    ];
    for (path, body, headers, field) in cases {
        let mut req = http.post(d.url(path)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} {headers:?}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "missing_credentials", "{e}");
        assert_eq!(e["error"]["fields"][0]["field"], field, "{e}");
    }
    // With them, the same bodies are taken and delivered; nothing of the refused ones was stored.
    post_report_and_log(&d, &report, &log).await;
    let got = wait_for(DEADLINE, "one delivery each", || {
        let (a, b) = (pezzo.received(), pl.received());
        (a.len() == 1 && b.len() == 1).then_some((a, b))
    })
    .await;
    assert_eq!(
        got.0[0].header("x-pezzo-project-id").as_deref(),
        Some("proj")
    );
    assert_eq!(got.1[0].header("x-api-key").as_deref(), Some("pl_app"));
    let status: Value = http
        .get(d.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["queue"]["next_seq"], 2, "{status:#}");
    d.stop().await;
}

/// A native event without the canonical schema marker converts to no service. Where only a
/// Pezzo or PromptLayer sink would take it, it is refused (400, naming the `schema` field and
/// the sink), over HTTP and on the socket line by line; it used to be acknowledged and then
/// discarded, so an app posting the README's event to a PromptLayer-only host lost them all.
/// Canonical events beside it go on; an `http` sink takes it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_event_no_sink_can_send_is_refused_not_acknowledged_and_dropped() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let pl = promptlayer_mock(1).await;
    let cfg = format!(
        "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\napi_key = \"pl_sink\"\nbatch_max_wait = \"10ms\"\n",
        pl.url("")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let readme = r#"{"model":"gpt-4o","input":"hello","output":"hi!"}"#;
    let canonical = json!({
        "schema": "llmlogd.llm/v1",
        "provider": "openai",
        "model": "gpt-4o",
        "request": {
            "start_time": "2024-11-22T01:46:40.100Z",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        },
        "response": {
            "end_time": "2024-11-22T01:46:41.300Z",
            "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi!"}, "finish_reason": "stop"}]}
        }
    })
    .to_string();

    let (st, e) = post_json(&d.url("/v1/events"), readme).await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_field", "{e}");
    assert_eq!(e["error"]["fields"][0]["field"], "schema", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("sink \"pl\"") && msg.contains("llmlogd.llm/v1"),
        "{msg}"
    );
    let (st, e) = post_json(&d.url("/v1/events"), &format!("[{canonical},{readme}]")).await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["fields"][0]["field"], "[1].schema", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("event [1]: "),
        "{e}"
    );

    // On the socket the refused line is answered on its own; the lines beside it are stored.
    let s = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let (rd, mut wr) = s.into_split();
    wr.write_all(format!("{canonical}\n{readme}\n{canonical}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let mut replies = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("a reply line");
        replies.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    assert_eq!(replies[1]["ok"], false, "{replies:?}");
    assert_eq!(replies[1]["code"], "invalid_field", "{replies:?}");
    assert_eq!(replies[1]["status"], 400, "{replies:?}");
    assert!(
        replies[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("line 2: schema: "),
        "{replies:?}"
    );
    assert_eq!(replies[2]["ok"], true, "{replies:?}");
    // The two canonical events reach PromptLayer; nothing else was stored.
    wait_for(DEADLINE, "two logs at PromptLayer", || {
        (pl.received()
            .iter()
            .filter(|r| r.path == "/log-request")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    let status = get_json(&d.url("/v1/status")).await;
    assert_eq!(status["queue"]["next_seq"], 2, "{status:#}");

    // With an http sink beside it, the same event is taken and arrives as it was sent.
    let raw = MockSink::start().await;
    d.reload(&format!("{cfg}{}", raw.sink_config())).await;
    wait_until(DEADLINE, "the http sink in the routes", || async {
        let (st, _) = post_json(&d.url("/v1/events"), readme).await;
        (st == 202).then_some(())
    })
    .await;
    raw.wait_arrived(&[readme]).await;
    d.stop().await;
}

/// Follow-ups must name the right kind of local id (logs and groups are separate id spaces
/// at PromptLayer), and an integral float id (`3.0`, which the checks take as 3) is translated
/// like an integer, not sent on as llmlogd's local id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_name_the_right_kind_of_id_and_float_ids_are_translated() {
    let pl = promptlayer_mock(70_000).await;
    let raw = MockSink::start().await;
    let cfg = format!(
        "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\napi_key = \"pl_sink\"\n\
         [sinks.raw]\ntype = \"http\"\nurl = \"{}\"\nbatch_max_wait = \"10ms\"\n",
        pl.url(""),
        raw.url("/raw")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let http = client();
    let post = |path: &'static str, body: Value| {
        let req = http.post(d.url(path)).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (st, g) = post("/create-group", json!({"api_key": "k"})).await;
    assert_eq!(st, 200);
    let group = g["id"].as_u64().unwrap();
    let log = logging_fixtures()
        .into_iter()
        .find(|(_, p, _)| p == "/log-request")
        .unwrap()
        .2;
    let (st, l) = post("/log-request", log).await;
    assert_eq!(st, 201);
    let log_id = l["id"].as_u64().unwrap();

    // A group's id where a log's is wanted, and the reverse: 400, naming the field.
    let (st, e) = post(
        "/library-track-score",
        json!({"api_key": "k", "request_id": group, "score": 5}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(e.to_string().contains("request_id"), "{e}");
    let (st, e) = post(
        "/track-group",
        json!({"api_key": "k", "request_id": log_id, "group_id": log_id}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(e.to_string().contains("group_id"), "{e}");
    assert!(
        !e.to_string().contains("request_id"),
        "the log id is right there: {e}"
    );

    // A native event's id, once it has left the queue (no sink to wait for it here): it was
    // acknowledged, then routed to no sink and discarded. Refused, naming the field.
    let (st, n) = post("/v1/events", json!({"not": "a log"})).await;
    assert_eq!(st, 202, "{n}");
    let native = n["seqs"][0].as_u64().unwrap();
    let status = d.url("/v1/status");
    wait_until(DEADLINE, "the native event gone from the queue", || async {
        (get_json(&status).await["queue"]["events"] == 0).then_some(())
    })
    .await;
    let (st, e) = post(
        "/library-track-score",
        json!({"api_key": "k", "request_id": native, "score": 5}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["fields"][0]["field"], "request_id", "{e}");

    // Float ids: taken and translated.
    let (st, e) = post(
        "/track-group",
        json!({"api_key": "k", "request_id": log_id as f64, "group_id": group as f64}),
    )
    .await;
    assert_eq!(st, 200, "{e}");
    let tracked = wait_for(DEADLINE, "the /track-group delivery", || {
        pl.received().into_iter().find(|r| r.path == "/track-group")
    })
    .await;
    let body = tracked.json();
    assert!(body["request_id"].as_u64().unwrap() >= 70_000, "{body}");
    assert!(body["group_id"].as_u64().unwrap() >= 70_000, "{body}");
    d.stop().await;
}

/// PromptLayer sinks with `route.tags` / `route.environments` (as config.example.toml shows):
/// follow-ups and groups carry neither, and were acknowledged, then routed to no sink (the
/// scores, metadata and groups of every log were lost). Each follow-up now goes to the sinks
/// its log went to, and only there; groups go to every PromptLayer sink; a wrapper's
/// `/track-request` is routed by its own tags like a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_reach_the_promptlayer_sinks_their_log_went_to_whatever_the_route() {
    let billing = promptlayer_mock(1_000).await;
    let prod = promptlayer_mock(2_000).await;
    let cfg = format!(
        r#"
[sinks.billing]
type = "promptlayer"
url = "{}"
api_key = "pl_billing"
route.tags = ["billing"]
[sinks.prod]
type = "promptlayer"
url = "{}"
api_key = "pl_prod"
route.environments = ["prod"]
"#,
        billing.url(""),
        prod.url("")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let http = client();
    let post = |path: &'static str, body: Value| {
        let req = http
            .post(d.url(path))
            .header("x-api-key", "pl_app")
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            assert!(status == 200 || status == 201, "{path}: {status} {v}");
            v
        }
    };
    let log = |tags: Value, env: &str| {
        json!({"provider": "openai", "model": "gpt-4o",
               "input": {"type": "chat", "messages": []}, "output": {"type": "chat", "messages": []},
               "request_start_time": 1_732_240_000.1, "request_end_time": 1_732_240_001.3,
               "tags": tags, "metadata": {"environment": env}})
    };
    let a = post("/log-request", log(json!(["billing"]), "dev")).await["id"].clone();
    let b = post("/log-request", log(json!([]), "prod")).await["id"].clone();
    let g = post("/create-group", json!({"api_key": "k"})).await["id"].clone();
    let t = post(
        "/track-request",
        json!({"function_name": "openai.chat.completions.create", "kwargs": {},
               "tags": ["billing"], "request_response": {}, "api_key": "k"}),
    )
    .await["request_id"]
        .clone();
    post(
        "/library-track-score",
        json!({"api_key": "k", "request_id": a, "score": 90}),
    )
    .await;
    post(
        "/library-track-metadata",
        json!({"api_key": "k", "request_id": b, "metadata": {"k": "v"}}),
    )
    .await;
    post(
        "/track-group",
        json!({"api_key": "k", "request_id": a, "group_id": g}),
    )
    .await;
    post(
        "/library-track-score",
        json!({"api_key": "k", "request_id": t, "score": 10}),
    )
    .await;

    let paths = |m: &MockSink| {
        let mut p: Vec<String> = m.received().into_iter().map(|r| r.path).collect();
        p.sort();
        p
    };
    let status = wait_until(DEADLINE, "both sinks drained", || {
        let url = d.url("/v1/status");
        async move {
            let s = get_json(&url).await;
            let sinks = s["sinks"].as_array().cloned().unwrap_or_default();
            let delivered: u64 = sinks.iter().filter_map(|x| x["delivered"].as_u64()).sum();
            let idle = sinks
                .iter()
                .all(|x| x["backlog"] == 0 && x["in_flight"] == 0);
            // 6 to billing, 3 to prod.
            (delivered >= 9 && idle).then_some(s)
        }
    })
    .await;
    assert_eq!(status["queue"]["dead_letters"], 0, "{status:#}");
    assert_eq!(
        paths(&billing),
        [
            "/create-group",
            "/library-track-score",
            "/library-track-score",
            "/log-request",
            "/track-group",
            "/track-request"
        ],
        "billing"
    );
    assert_eq!(
        paths(&prod),
        ["/create-group", "/library-track-metadata", "/log-request"],
        "prod"
    );
    // Once the logs are delivered (and may have left the queue), their follow-ups still go
    // only where the logs went.
    post(
        "/library-track-score",
        json!({"api_key": "k", "request_id": b, "score": 1}),
    )
    .await;
    post(
        "/library-track-metadata",
        json!({"api_key": "k", "request_id": a, "metadata": {"k": "v"}}),
    )
    .await;
    wait_for(DEADLINE, "the late follow-ups", || {
        (billing.received().len() == 7 && prod.received().len() == 4).then_some(())
    })
    .await;
    let status = get_json(&d.url("/v1/status")).await;
    assert_eq!(status["queue"]["dead_letters"], 0, "{status:#}");
    let (bills, prods) = (billing.received(), prod.received());
    assert_eq!(bills[6].path, "/library-track-metadata");
    assert_eq!(prods[3].path, "/library-track-score");
    for r in bills.iter().chain(prods.iter()) {
        let body = r.json();
        if let Some(id) = body.get("request_id") {
            assert!(id.as_u64().unwrap() >= 1_000, "{}: {body}", r.path);
        }
    }
    d.stop().await;
}

/// Refusals of the request line are JSON too: an unknown path 404, a wrong method 405 (with
/// `Allow`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_get_json_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let http = client();
    let r = http.get(d.url("/log-request")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().get("allow").is_some());
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
    let r = http
        .put(d.url("/api/reporting/v2/request"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = http.post(d.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("/nope"),
        "{e}"
    );
    d.stop().await;
}

/// Every fixture posted to llmlogd gets the status its client needs (201 for logs and Pezzo
/// reports, 200 with a JSON body for follow-ups and groups), with ids the SDKs accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_posted_to_llmlogd_get_the_replies_the_clients_accept() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let http = client();
    // A log first, so follow-ups can name a local id that exists.
    let log = logging_fixtures()
        .into_iter()
        .find(|(_, p, _)| p == "/log-request")
        .unwrap();
    let r = http
        .post(d.url("/log-request"))
        .json(&log.2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let local_id = v["id"].as_u64().expect("integer id");
    let group = http
        .post(d.url("/create-group"))
        .json(&json!({"api_key": "k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(group.status(), 200);
    let group_id = group.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    for (name, path, mut body) in logging_fixtures() {
        if body.get("request_id").is_some_and(Value::is_u64) {
            body["request_id"] = json!(local_id);
        }
        if body.get("group_id").is_some() {
            body["group_id"] = json!(group_id);
        }
        let r = http.post(d.url(&path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let reply: Value = r.json().await.unwrap_or(Value::Null);
        let want = if path == "/log-request" || path.ends_with("/reporting/v2/request") {
            201
        } else if name.contains("async-track-prompt") {
            400
        } else {
            200
        };
        assert_eq!(status, want, "{name} {path}: {reply}");
        if path == "/log-request" {
            assert!(reply["id"].is_u64(), "{name}: {reply}");
            assert!(reply["prompt_version"].is_object(), "{name}: {reply}");
        }
        if path == "/track-request" {
            assert!(
                reply["request_id"].is_u64(),
                "{name}: the wrappers read request_id: {reply}"
            );
        }
        if want == 200 {
            assert!(
                reply.is_object(),
                "{name}: JSON reply required by the JS SDK"
            );
        }
    }
    // A follow-up naming an id llmlogd never issued is refused, naming the field.
    let r = http
        .post(d.url("/library-track-score"))
        .json(&json!({"api_key": "k", "request_id": 999_999, "score": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["fields"][0]["field"], "request_id", "{v}");
    d.stop().await;
}

/// Where the official clients' dependencies are, or why the test cannot run here.
fn client_env() -> Option<(PathBuf, String)> {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let python = std::env::var("LLMLOGD_CLIENTS_PYTHON")
        .unwrap_or_else(|_| "/tmp/clients-venv/bin/python".into());
    let ready = clients.join("node_modules/@pezzo/client").exists()
        && clients.join("node_modules/promptlayer").exists()
        && Path::new(&python).exists();
    if ready {
        return Some((clients, python));
    }
    let why = "official clients not installed (cd tests/clients && npm ci; python3 -m venv /tmp/clients-venv && /tmp/clients-venv/bin/pip install -r tests/clients/requirements.txt)";
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// Runs `tests/clients/run_all.sh` against llmlogd at `base`; fails the test if a client failed.
async fn run_clients(clients: &Path, python: &str, base: &str, env: &[(&str, &str)]) {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(clients.join("run_all.sh"))
        .env("LLMLOGD_URL", base)
        .env("PYTHON", python);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "clients failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The real SDKs (PromptLayer Python + JS, Pezzo JS + Python) against llmlogd; llmlogd
/// delivers to mock services; the mocks see what the real services would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_end_to_end() {
    let Some((clients, python)) = client_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pezzo = MockSink::start().await;
    pezzo.ok_answer(201, "{\"reportId\":\"x\"}");
    let pl = promptlayer_mock(90_000).await;
    let raw = MockSink::start().await;
    let cfg = format!(
        r#"
[sinks.pezzo]
type = "pezzo"
url = "{}"
batch_max_wait = "10ms"
[sinks.promptlayer]
type = "promptlayer"
url = "{}"
[sinks.raw]
type = "http"
url = "{}"
batch_max_wait = "10ms"
"#,
        pezzo.url(""),
        pl.url(""),
        raw.url("/raw")
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    run_clients(&clients, &python, &d.url(""), &[]).await;

    // PromptLayer: every log arrives with the app's key, valid per the spec, and each
    // follow-up names the id the service gave (90000+), never llmlogd's local id.
    let got = wait_for(DEADLINE, "PromptLayer logs and follow-ups", || {
        let r = pl.received();
        let logs = r.iter().filter(|x| x.path == "/log-request").count();
        let tracks = r
            .iter()
            .filter(|x| x.path.starts_with("/library-track") || x.path == "/track-group")
            .count();
        (logs >= 5 && tracks >= 8).then_some(r)
    })
    .await;
    for r in &got {
        let body = r.json();
        match r.path.as_str() {
            "/log-request" => {
                assert_eq!(
                    r.header("x-api-key").as_deref(),
                    Some("pl_test_api_key_0123456789")
                );
                formats::promptlayer::validate(&body).unwrap_or_else(|e| panic!("{e:?}\n{body:#}"));
            }
            "/create-group" => assert_eq!(body["api_key"], "pl_test_api_key_0123456789"),
            p => {
                let kind = TrackKind::from_path(p).unwrap_or_else(|| panic!("unexpected path {p}"));
                formats::promptlayer::validate_track(kind, &body)
                    .unwrap_or_else(|e| panic!("{p}: {e:?}\n{body:#}"));
                assert!(
                    body["request_id"].as_u64().unwrap() >= 90_000,
                    "{p}: {body}"
                );
                if kind == TrackKind::Group {
                    assert!(body["group_id"].as_u64().unwrap() >= 90_000, "{body}");
                }
            }
        }
    }
    // PromptLayer logs reach PromptLayer valid against a strict reading of its spec (the SDKs
    // send float Unix seconds and nulls the spec does not allow), and are what the SDK sent
    // otherwise: the same instants, the same members (the raw sink holds what the apps sent).
    let raws: Vec<Value> = raw
        .received()
        .iter()
        .flat_map(|r| r.raw_events())
        .map(|s| serde_json::from_str(&s).unwrap())
        .collect();
    let mut float_times = 0;
    for r in got.iter().filter(|r| r.path == "/log-request") {
        let body = r.json();
        assert_eq!(
            spec::promptlayer_log(&body),
            Vec::<String>::new(),
            "{body:#}"
        );
        let matches: Vec<usize> = raws
            .iter()
            .filter_map(|sent| same_log(sent, &body).ok())
            .collect();
        assert!(
            !matches.is_empty(),
            "no SDK log delivered as {body:#}: {:?}",
            raws.iter().map(|s| same_log(s, &body)).collect::<Vec<_>>()
        );
        float_times += matches[0];
    }
    assert!(
        float_times > 0,
        "the SDKs send float times: this checks their conversion"
    );

    // Pezzo: reports arrive with the app's key and project, valid, provider OpenAI.
    let reports = wait_for(DEADLINE, "Pezzo reports", || {
        let r = pezzo.received();
        (r.len() >= 8).then_some(r)
    })
    .await;
    // The calls whose provider could not be reached (one per client) came without a response
    // body; they arrive as failed calls, with an error body the spec accepts.
    let unreachable: Vec<Value> = reports
        .iter()
        .map(|r| r.json())
        .filter(|b| b["request"]["body"]["messages"][0]["content"] == "Nobody answers.")
        .collect();
    assert_eq!(unreachable.len(), 2, "{unreachable:#?}");
    for b in &unreachable {
        assert_eq!(
            b["response"]["body"]["error"]["message"],
            formats::pezzo::NO_RESPONSE,
            "{b:#}"
        );
        assert_eq!(b["response"]["status"], 500, "{b:#}");
    }
    for r in &reports {
        assert_eq!(r.path, "/api/reporting/v2/request");
        assert_eq!(
            r.header("x-pezzo-api-key").as_deref(),
            Some("pez_test_api_key_0123456789")
        );
        assert_eq!(
            r.header("x-pezzo-project-id").as_deref(),
            Some("test-project-id")
        );
        let body = r.json();
        formats::pezzo::validate(&body).unwrap_or_else(|e| panic!("{e:?}\n{body:#}"));
        assert_eq!(spec::pezzo_report(&body), Vec::<String>::new(), "{body:#}");
        assert_eq!(body["metadata"]["provider"], "OpenAI");
        assert!(body["metadata"]["environment"].is_string(), "{body}");
    }
    d.stop().await;
}

/// The PromptLayer SDK wrappers' `/track-request`: answered at once with a local request id,
/// delivered with the sink's key, and follow-ups naming the local id get the service's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_request_and_its_follow_ups_reach_promptlayer_with_the_services_id() {
    let dir = tempfile::tempdir().unwrap();
    let pl = MockSink::start().await;
    pl.rule(|r| {
        Some(match r.path.as_str() {
            "/track-request" => {
                Answer::StatusBody(200, "{\"success\":true,\"request_id\":4242}".into())
            }
            _ => Answer::StatusBody(200, "{\"success\":true}".into()),
        })
    });
    let cfg = format!(
        "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\napi_key = \"pl_sink_key\"\n",
        pl.url("")
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let fixture = fixtures()
        .into_iter()
        .find(|(n, _)| n == "promptlayer_py-track-request.json")
        .unwrap()
        .1;
    let http = client();
    let r = http
        .post(d.url("/track-request"))
        .json(&fixture["body"])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let local = r.json::<Value>().await.unwrap()["request_id"]
        .as_u64()
        .unwrap();
    let r = http
        .post(d.url("/library-track-score"))
        .json(&json!({"api_key": "pl_app_key", "request_id": local, "score": 80}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = wait_for(DEADLINE, "track-request and its score", || {
        let r = pl.received();
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert_eq!(got[0].path, "/track-request");
    let mut sent = fixture["body"].clone();
    sent["api_key"] = json!("pl_sink_key");
    assert_eq!(
        got[0].json(),
        sent,
        "forwarded as the SDK sent it, with the sink's key"
    );
    assert_eq!(got[1].path, "/library-track-score");
    assert_eq!(got[1].json()["request_id"], 4242);
    assert_eq!(got[1].json()["api_key"], "pl_sink_key");
    d.stop().await;
}

/// Pezzo's request cache routes (asked by apps with `cache: true`): every lookup is a miss,
/// a save is accepted, nothing is stored or sent; a broken body is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pezzo_cache_routes_answer_a_miss_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), "").await;
    let http = client();
    let req = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for prefix in ["/api/cache/v1", "/cache/v1"] {
        let r = http
            .post(d.url(&format!("{prefix}/request/retrieve")))
            .json(&json!({ "request": req }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{prefix}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"hit": false, "data": null})
        );
        let r = http
            .post(d.url(&format!("{prefix}/request/save")))
            .json(&json!({ "request": req, "response": {"id": "chatcmpl-1"} }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{prefix}");
    }
    for (path, body, field) in [
        ("/api/cache/v1/request/retrieve", json!({}), "request"),
        (
            "/api/cache/v1/request/retrieve",
            json!({"request": "x"}),
            "request",
        ),
        (
            "/api/cache/v1/request/save",
            json!({ "request": req }),
            "response",
        ),
    ] {
        let r = http.post(d.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path} {body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["fields"][0]["field"], field, "{v}");
    }
    let status: Value = serde_json::from_str(&get_text(&d.url("/v1/status")).await).unwrap();
    assert_eq!(
        status["queue"]["next_seq"], 0,
        "cache calls stored something: {status}"
    );
    d.stop().await;
}

/// The official Pezzo clients with the cache on (`cache: true`): their calls keep working
/// through llmlogd (a server without the cache routes makes both throw), and the reports say
/// the cache was on and missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_pezzo_clients_with_the_cache_on_keep_working() {
    let Some((clients, python)) = client_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pezzo = MockSink::start().await;
    pezzo.ok_answer(201, "{\"reportId\":\"x\"}");
    let cfg = format!(
        "[sinks.pezzo]\ntype = \"pezzo\"\nurl = \"{}\"\nbatch_max_wait = \"10ms\"\n",
        pezzo.url("")
    );
    let d = InProcess::start(dir.path(), &cfg).await;
    let env = [("ONLY", "pezzo_node pezzo_py"), ("EXTRAS", "1")];
    run_clients(&clients, &python, &d.url(""), &env).await;
    let cached = wait_for(DEADLINE, "the cache-miss reports of both clients", || {
        let r: Vec<Value> = pezzo
            .received()
            .iter()
            .map(|r| r.json())
            .filter(|b| b["cacheEnabled"] == true)
            .collect();
        (r.len() >= 2).then_some(r)
    })
    .await;
    for body in &cached {
        assert_eq!(body["cacheHit"], false, "{body}");
        formats::pezzo::validate(body).unwrap_or_else(|e| panic!("{e:?}\n{body:#}"));
        assert_eq!(spec::pezzo_report(body), Vec::<String>::new(), "{body:#}");
    }
    d.stop().await;
}

/// The service sinks send one event a request with an `Idempotency-Key` that is the event's
/// own id: a retry (here after a 503) carries the same key as the attempt before it, so a
/// service that honours the header drops the duplicate a lost reply would cause, and two
/// events never share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_sinks_retry_an_event_under_the_same_idempotency_key() {
    let pezzo = MockSink::start().await;
    pezzo.ok_answer(201, "{}");
    pezzo.script([Answer::Status(503)]);
    let pl = MockSink::start().await;
    pl.ok_answer(201, "{\"id\":1,\"prompt_version\":{}}");
    pl.script([Answer::Status(503)]);
    let retry = "retry_initial = \"20ms\"\nretry_max = \"100ms\"\nbatch_max_wait = \"5ms\"\n";
    let cfg = format!(
        "[sinks.pz]\ntype = \"pezzo\"\nurl = \"{}\"\n{retry}[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\n{retry}",
        pezzo.url(""),
        pl.url("")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let (report, log) = (fixture("/reporting/v2/request"), fixture("/log-request"));
    // One at a time, so the 503 is the first event's.
    for i in 0..2 {
        post_report_and_log(&d, &report, &log).await;
        for (name, mock) in [("pezzo", &pezzo), ("promptlayer", &pl)] {
            wait_for(DEADLINE, &format!("{name}: event {i} delivered"), || {
                (mock.received().len() == i + 2).then_some(())
            })
            .await;
        }
    }
    for (name, mock) in [("pezzo", &pezzo), ("promptlayer", &pl)] {
        let keys: Vec<String> = mock
            .received()
            .iter()
            .map(|r| {
                r.header("idempotency-key")
                    .unwrap_or_else(|| panic!("{name}: a request without Idempotency-Key"))
            })
            .collect();
        assert_eq!(keys.len(), 3, "{name}: {keys:?}");
        for k in &keys {
            assert!(
                uuid::Uuid::parse_str(k).is_ok(),
                "{name}: {k} is an event id"
            );
        }
        assert_eq!(keys[0], keys[1], "{name}: the retry keeps its key");
        assert_ne!(keys[1], keys[2], "{name}: another event, another key");
    }
    d.stop().await;
}

/// PromptLayer can answer a refusal with a 200 and `"success": false`. That is not a
/// delivery: the log goes to the dead letters with the service's message, and the sink counts
/// nothing delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promptlayer_200_saying_success_false_is_dead_lettered_with_its_message() {
    let pl = MockSink::start().await;
    pl.ok_answer(
        200,
        "{\"success\":false,\"message\":\"prompt template not found\"}",
    );
    let cfg = format!(
        "[sinks.pl]\ntype = \"promptlayer\"\nurl = \"{}\"\nbatch_max_wait = \"5ms\"\n",
        pl.url("")
    );
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), &cfg).await;
    let r = client()
        .post(d.url("/log-request"))
        .header("x-api-key", "pl_app")
        .json(&fixture("/log-request"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let st = wait_until(DEADLINE, "the log dead-lettered", || async {
        let st = get_json(&d.url("/v1/status")).await;
        (st["queue"]["dead_letters"] == 1).then_some(st)
    })
    .await;
    let sink = &st["sinks"][0];
    assert_eq!(sink["delivered"], 0, "{st}");
    assert_eq!(pl.received().len(), 1, "refused once, not retried");
    d.stop().await;
    let letters = dlq_list(&dir.path().join("data"));
    assert_eq!(letters.len(), 1, "{letters:?}");
    let info = &letters[0]["info"];
    assert_eq!(info["status"], 200, "{info}");
    assert!(
        info["reason"]
            .as_str()
            .unwrap_or("")
            .contains("refused by the service: prompt template not found"),
        "{info}"
    );
}
