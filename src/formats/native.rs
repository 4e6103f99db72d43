//! llmlogd's native events: any JSON object.
//!
//! A native event that carries `"schema": "llmlogd.llm/v1"` ([`SCHEMA`]) is a canonical
//! [`LlmEvent`] in its serde form and converts to the other formats; any other object is
//! opaque (delivered as is to sinks that take native events, such as a generic HTTP sink).
//!
//! The canonical serde form, briefly: `provider` (lowercase id), `request.start_time` and
//! `response.end_time` (RFC 3339 strings or Unix seconds) are required; `request.body` /
//! `response.body` hold raw provider JSON; every other field is optional (see `canonical.rs`).

use serde::Deserialize;
use serde_json::Value;

use super::canonical::{provider_id, LlmEvent, Status, SCHEMA};
use super::check::{Checker, ROOT};
use super::convert;
use super::{Attributes, FieldError};

/// Whether a body claims to be a canonical event.
pub fn is_canonical(body: &Value) -> bool {
    body.get("schema").and_then(Value::as_str) == Some(SCHEMA)
}

/// A native body must be a JSON object; one carrying the schema marker must parse as an event.
pub fn validate(body: &Value) -> Result<(), Vec<FieldError>> {
    check(body).map(|_| ())
}

/// Validates and returns the routing attributes in one pass (ingest's hot path: a canonical
/// event is deserialised once, from the borrowed `Value`, with no clone).
pub fn check(body: &Value) -> Result<Attributes, Vec<FieldError>> {
    let mut c = Checker::new();
    if c.object(body, ROOT).is_none() {
        return Err(c.finish().err().unwrap_or_default());
    }
    if !is_canonical(body) {
        return Ok(opaque_attributes(body));
    }
    // The path of the first bad field (`usage.input_tokens`, `tags[2]`), so the refusal names it.
    match serde_path_to_error::deserialize::<_, LlmEvent<Value>>(body) {
        Ok(ev) => Ok(canonical_attributes(ev)),
        Err(e) => {
            let path = e.path().to_string();
            let at = if path.is_empty() || path == "." {
                None
            } else {
                Some(path)
            };
            let inner = e.into_inner().to_string();
            // serde names a missing field in its message, at the path of the object that
            // lacks it: the refusal names the field itself (`provider`, `request.start_time`).
            let missing = inner
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next());
            let (field, problem) = match (missing, at) {
                (Some(m), Some(at)) => (format!("{at}.{m}"), "is required".to_string()),
                (Some(m), None) => (m.to_string(), "is required".to_string()),
                (None, at) => (
                    at.unwrap_or_else(|| ROOT.to_string()),
                    format!("not a valid {SCHEMA} event: {inner}"),
                ),
            };
            c.error(&field, problem);
            Err(c.finish().err().unwrap_or_default())
        }
    }
}

/// Ingest's fast path for canonical events: validates and derives the attributes straight from
/// the bytes, with no `Value` of the whole body (11 → 5.6 µs for a 2 KB event, measured).
///
/// `None` means "let [`check`] decide": not a canonical event, or invalid, or anything on
/// which deserialising from the bytes could judge differently from the `Value` path. serde_json
/// skips fields that `LlmEvent` does not name without checking their nesting depth, UTF-8 or
/// `\u` escapes, so bodies with nesting deeper than [`FAST_MAX_DEPTH`], with a `\uD…` escape, or
/// not valid UTF-8 take the `Value` path (which refuses what it always refused, with the same
/// words); a duplicated field fails here and is settled there too. So an event is accepted here
/// only if `check` would accept it, with the same attributes.
pub fn check_canonical_bytes(raw: &[u8]) -> Option<Attributes> {
    if raw.first() != Some(&b'{')
        || memchr::memmem::find(raw, SCHEMA.as_bytes()).is_none()
        || !plain_json(raw)
    {
        return None;
    }
    // The provider bodies (most of the bytes) are checked, not built.
    let ev: LlmEvent<serde::de::IgnoredAny> = serde_json::from_slice(raw).ok()?;
    Some(canonical_attributes(ev))
}

/// Nesting allowed on the fast path; serde_json's own limit (which the `Value` path applies
/// everywhere) is 128.
pub const FAST_MAX_DEPTH: usize = 100;
/// Longest number (digits and point) allowed on the fast path; an f64 overflows from 309.
const FAST_MAX_DIGITS: usize = 300;

/// UTF-8, nesting at most [`FAST_MAX_DEPTH`] deep, no `\uD…` escape (a UTF-16 surrogate,
/// which only the `Value` path checks for pairing), and no number with an exponent or more
/// than [`FAST_MAX_DIGITS`] digits (only the `Value` path checks a number's range: `1e400`
/// is refused there, skipped unchecked by serde). Tokens are not checked: serde_json does that.
pub(crate) fn plain_json(raw: &[u8]) -> bool {
    if std::str::from_utf8(raw).is_err() {
        return false;
    }
    let (mut depth, mut digits, mut i) = (0usize, 0usize, 0usize);
    while let Some(&b) = raw.get(i) {
        i += 1;
        if b == b'"' {
            // Inside a string only escapes matter: jump from one `"` or `\` to the next
            // (most of an LLM event is string bytes).
            digits = 0;
            loop {
                let rest = raw.get(i..).unwrap_or_default();
                let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                    return true; // unterminated: serde refuses it
                };
                let j = i + at;
                if raw[j] == b'"' {
                    i = j + 1;
                    break;
                }
                if raw.get(j + 1) == Some(&b'u') && matches!(raw.get(j + 2), Some(b'd' | b'D')) {
                    return false;
                }
                i = j + 2;
            }
            continue;
        }
        if b.is_ascii_digit() || b == b'.' {
            digits += 1;
            if digits > FAST_MAX_DIGITS {
                return false;
            }
            continue;
        }
        if digits > 0 && matches!(b, b'e' | b'E') {
            return false;
        }
        digits = 0;
        match b {
            b'{' | b'[' => {
                depth += 1;
                if depth > FAST_MAX_DEPTH {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// The canonical event, when the body carries the schema marker and parses: exactly what the
/// body says (its serde form; [`from_canonical`] gives the body back).
pub fn to_canonical(body: &Value) -> Option<LlmEvent> {
    if !is_canonical(body) {
        return None;
    }
    LlmEvent::deserialize(body).ok()
}

/// [`to_canonical`] with the summary fields the body leaves out filled from its provider bodies
/// ([`fill_summary`]): the event other formats are rendered from.
pub fn to_event(body: &Value) -> Option<LlmEvent> {
    let mut ev = to_canonical(body)?;
    fill_summary(&mut ev);
    Some(ev)
}

/// Fills what a native event did not state from its provider bodies, as the Pezzo parser
/// does for every report: `model` (the request's, else the response's), `api_type`,
/// `parameters`, `usage`, and for a failed call (an error body, an HTTP status ≥ 400) `status`,
/// `error_type` and `error_message`. What the event states stands. Without this, an event
/// that kept its model and token counts only in its bodies reached Pezzo without the model
/// and PromptLayer without the tokens.
///
/// An event that came from another format (its `extra` holds that format's leftovers) is left
/// as it is: that format's parser filled what it knew, and its native form must read back as
/// the same event.
fn fill_summary(ev: &mut LlmEvent) {
    if !ev.extra.is_empty() {
        return;
    }
    let s = convert::body_summary(
        &ev.provider,
        ev.request.body.as_ref(),
        ev.response.http_status,
        ev.response.body.as_ref(),
    );
    if ev.model.is_none() {
        ev.model = s.model.or(s.response_model);
    }
    if ev.api_type.is_none() {
        ev.api_type = s.api_type;
    }
    if ev.parameters.is_none() {
        ev.parameters = s.parameters.filter(|p| !p.is_empty());
    }
    if ev.status.is_none() {
        if let Some(f) = s.failure {
            ev.status = Some(Status::Error);
            ev.error_type.get_or_insert(f.error_type);
            ev.error_message.get_or_insert(f.message);
        }
    }
    if ev.usage.is_none() && !ev.is_error() {
        ev.usage = s.usage;
    }
}

fn canonical_attributes<B>(ev: LlmEvent<B>) -> Attributes {
    Attributes {
        provider: Some(ev.provider),
        model: ev.model,
        environment: ev.environment,
        tags: ev.tags.unwrap_or_default(),
        canonical: true,
    }
}

/// The canonical event in its native (serde) form.
pub fn from_canonical(ev: &LlmEvent) -> Value {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_value(ev).unwrap_or(Value::Null)
}

/// Routing attributes: from the canonical event when there is one, else best effort from
/// top-level `provider`, `model`, `environment` (or `metadata.environment`) and `tags`.
pub fn attributes(body: &Value) -> Attributes {
    match to_canonical(body) {
        Some(ev) => canonical_attributes(ev),
        None => opaque_attributes(body),
    }
}

fn opaque_attributes(body: &Value) -> Attributes {
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Attributes {
        provider: str_of(body.get("provider")).map(|p| provider_id(&p)),
        model: str_of(body.get("model")),
        environment: str_of(body.get("environment"))
            .or_else(|| str_of(body.get("metadata").and_then(|m| m.get("environment")))),
        tags: body
            .get("tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        canonical: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{Status, Usage};
    use crate::formats::{pezzo, promptlayer};
    use serde_json::json;

    /// A native event as an app would write it by hand.
    fn hand_written() -> Value {
        json!({
            "schema": "llmlogd.llm/v1",
            "provider": "anthropic",
            "model": "claude-3-5-haiku-latest",
            "request": {
                "start_time": 1_714_557_600.25,
                "body": {"model": "claude-3-5-haiku-latest", "max_tokens": 64, "messages": [{"role": "user", "content": "Ping"}]}
            },
            "response": {
                "end_time": "2024-05-01T10:00:01Z",
                "body": {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Pong"}],
                         "stop_reason": "end_turn", "usage": {"input_tokens": 8, "output_tokens": 2}},
                "http_status": 200
            },
            "status": "success",
            "usage": {"input_tokens": 8, "output_tokens": 2},
            "tags": ["ops"],
            "environment": "prod"
        })
    }

    /// The fast path accepts only what the `Value` path accepts, with the same attributes, and
    /// leaves every case where skipping a field could hide a problem to the `Value` path.
    #[test]
    fn the_fast_path_agrees_with_the_value_path() {
        fn slow(raw: &[u8]) -> Result<Attributes, String> {
            let v: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
            check(&v).map_err(|e| format!("{e:?}"))
        }
        let base = hand_written().to_string();
        let with = |extra: &str| format!("{},{extra}}}", &base[..base.len() - 1]).into_bytes();
        let invalid_utf8 = {
            let mut v = with("\"x\":\"__\"");
            let n = v.len();
            v[n - 4] = 0xff;
            v[n - 3] = 0xfe;
            v
        };
        let deep = format!("\"x\":{}1{}", "[".repeat(130), "]".repeat(130));
        let in_body = base.replace("\"max_tokens\":64", "\"max_tokens\":1e999");
        assert_ne!(in_body, base);
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (base.clone().into_bytes(), true),
            (with("\"unknown\":{\"a\":[1,2,{\"b\":\"é ü 漢\"}]}"), true),
            (br#"{"schema":"other","provider":"openai"}"#.to_vec(), false),
            (
                br#"{"provider":"openai","note":"llmlogd.llm/v1"}"#.to_vec(),
                false,
            ),
            (with("\"provider\":\"openai\""), false),
            (with(&deep), false),
            (with("\"x\":\"\\ud800\""), false),
            (with("\"x\":\"\\ud83d\\ude00\""), false),
            (invalid_utf8.clone(), false),
            (base.replace("\"anthropic\"", "3").into_bytes(), false),
            (format!("[{base}]").into_bytes(), false),
            (with("\"x\":1e400"), false),
            (with("\"x\":[2.5E-3]"), false),
            (with(&format!("\"x\":{}", "9".repeat(400))), false),
            (with("\"x\":[-12.75,0,true,false,null]"), true),
            // Inside the provider's request body, which the fast path does not build.
            (in_body.clone().into_bytes(), false),
        ];
        for (raw, fast_expected) in cases {
            let what = String::from_utf8_lossy(&raw).into_owned();
            let fast = check_canonical_bytes(&raw);
            assert_eq!(fast.is_some(), fast_expected, "{what}");
            if let Some(a) = fast {
                assert_eq!(Ok(a), slow(&raw), "{what}");
            }
        }
        // What the fast path leaves alone, the Value path still refuses.
        assert!(slow(&with(&deep)).is_err());
        assert!(slow(&with("\"x\":\"\\ud800\"")).is_err());
        assert!(slow(&invalid_utf8).is_err());
        assert!(slow(&with("\"x\":1e400")).is_err());
        assert!(slow(in_body.as_bytes()).is_err());
        assert!(slow(&with(&format!("\"x\":{}", "9".repeat(400)))).is_err());
    }

    /// The byte-at-a-time scan `plain_json` replaced, kept to check the jumping one against.
    fn plain_json_reference(raw: &[u8]) -> bool {
        if std::str::from_utf8(raw).is_err() {
            return false;
        }
        let (mut depth, mut in_str, mut esc, mut digits) = (0usize, false, false, 0usize);
        for (i, &b) in raw.iter().enumerate() {
            if in_str {
                if esc {
                    if b == b'u' && matches!(raw.get(i + 1), Some(b'd' | b'D')) {
                        return false;
                    }
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == b'"' {
                    in_str = false;
                }
                continue;
            }
            if b.is_ascii_digit() || b == b'.' {
                digits += 1;
                if digits > FAST_MAX_DIGITS {
                    return false;
                }
                continue;
            }
            if digits > 0 && matches!(b, b'e' | b'E') {
                return false;
            }
            digits = 0;
            match b {
                b'"' => in_str = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > FAST_MAX_DEPTH {
                        return false;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        true
    }

    #[test]
    fn plain_json_agrees_with_the_byte_scan() {
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            "\"",
            "\\",
            "\\\"",
            "\\u",
            "\\ud800",
            "\\uD83D",
            "\\\\ud800",
            "u",
            "d",
            "D",
            "1",
            "2.5",
            "e",
            "E",
            "1e5",
            "true",
            "false",
            "null",
            ",",
            ":",
            "abc",
            "é",
            " ",
        ];
        // Every sequence of up to 4 pieces, then some long ones.
        let mut inputs: Vec<String> = vec![String::new()];
        for _ in 0..4 {
            let more: Vec<String> = inputs
                .iter()
                .flat_map(|s| pieces.iter().map(move |p| format!("{s}{p}")))
                .collect();
            inputs.extend(more.into_iter().filter(|s| s.len() < 40));
            inputs.dedup();
        }
        inputs.push(format!("{}1{}", "[".repeat(101), "]".repeat(101)));
        inputs.push(format!("[{}]", "9".repeat(301)));
        inputs.push(format!("[\"{}\"]", "9".repeat(400)));
        inputs.push(hand_written().to_string());
        for s in &inputs {
            assert_eq!(
                plain_json(s.as_bytes()),
                plain_json_reference(s.as_bytes()),
                "{s}"
            );
        }
        assert!(inputs.len() > 100_000, "{}", inputs.len());
    }

    #[test]
    fn canonical_native_events_convert() {
        let body = hand_written();
        assert_eq!(validate(&body), Ok(()));
        let ev = to_event(&body).expect("canonical");
        assert_eq!(ev.status, Some(Status::Success));
        assert_eq!(
            ev.usage,
            Some(Usage {
                input_tokens: Some(8),
                output_tokens: Some(2)
            })
        );
        assert_eq!(
            ev.request.start_time.to_rfc3339(),
            "2024-05-01T10:00:00.250Z"
        );

        let pl = promptlayer::from_canonical(&ev);
        assert_eq!(promptlayer::validate(&pl), Ok(()));
        assert_eq!(
            pl,
            json!({
                "provider": "anthropic", "model": "claude-3-5-haiku-latest",
                "input": {"type": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "Ping"}]}]},
                "output": {"type": "chat", "messages": [{"role": "assistant", "content": [{"type": "text", "text": "Pong"}]}]},
                "request_start_time": "2024-05-01T10:00:00.250Z", "request_end_time": "2024-05-01T10:00:01Z",
                "parameters": {"max_tokens": 64}, "api_type": "chat-completions",
                "tags": ["ops"], "metadata": {"environment": "prod"},
                "input_tokens": 8, "output_tokens": 2, "status": "SUCCESS"
            })
        );
        let pz = pezzo::from_canonical(&ev);
        assert_eq!(pezzo::validate(&pz), Ok(()));
        assert_eq!(
            pz["request"]["body"],
            json!({"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "Ping"}], "max_tokens": 64})
        );
        assert_eq!(pz["response"]["status"], json!(200));

        // Native -> canonical -> native keeps everything; numeric times become strings, after
        // which the form is stable.
        let again = from_canonical(&to_canonical(&body).expect("canonical"));
        let mut expected = body.clone();
        expected["request"]["start_time"] = json!("2024-05-01T10:00:00.250Z");
        assert_eq!(again, expected);
        let ev2 = to_canonical(&again).expect("canonical");
        assert_eq!(from_canonical(&ev2), again);
    }

    #[test]
    fn other_objects_are_opaque() {
        let body = json!({"provider": "OpenAI", "model": "gpt-4o", "metadata": {"environment": "dev"}, "tags": ["a", 1]});
        assert_eq!(validate(&body), Ok(()));
        assert_eq!(to_canonical(&body), None);
        assert_eq!(
            attributes(&body),
            Attributes {
                provider: Some("openai".into()),
                model: Some("gpt-4o".into()),
                environment: Some("dev".into()),
                tags: vec!["a".into()],
                canonical: false,
            }
        );
        assert_eq!(
            attributes(&hand_written()),
            Attributes {
                provider: Some("anthropic".into()),
                model: Some("claude-3-5-haiku-latest".into()),
                environment: Some("prod".into()),
                tags: vec!["ops".into()],
                canonical: true,
            }
        );
    }

    #[test]
    fn broken_canonical_events_are_refused() {
        let mut body = hand_written();
        body["request"]["start_time"] = json!("soon");
        let errs = validate(&body).expect_err("invalid");
        // The refusal names the field.
        assert_eq!(errs[0].field, "request.start_time");
        assert!(
            errs[0]
                .problem
                .starts_with("not a valid llmlogd.llm/v1 event"),
            "{}",
            errs[0].problem
        );
        assert_eq!(to_canonical(&body), None);
        assert!(validate(&json!("text")).is_err());
        let mut body = hand_written();
        body["usage"] = json!({"input_tokens": "many"});
        assert_eq!(
            validate(&body).expect_err("invalid")[0].field,
            "usage.input_tokens"
        );
        let mut body = hand_written();
        body["tags"] = json!(["ok", 7]);
        assert_eq!(validate(&body).expect_err("invalid")[0].field, "tags[1]");
    }

    /// An event that keeps its model, usage or failure only in its provider bodies reaches
    /// Pezzo with its model and PromptLayer with its tokens (they were dropped before); what an
    /// event states itself stands.
    #[test]
    fn summary_fields_left_out_come_from_the_bodies() {
        let mut body = hand_written();
        let top = body.as_object_mut().unwrap();
        for k in ["model", "usage", "status"] {
            top.remove(k);
        }
        body["request"]["body"]
            .as_object_mut()
            .unwrap()
            .remove("model");
        body["response"]["body"]["model"] = json!("claude-3-5-haiku-20241022");
        let ev = to_event(&body).expect("canonical");
        assert_eq!(ev.model.as_deref(), Some("claude-3-5-haiku-20241022"));
        let pl = promptlayer::from_canonical(&ev);
        assert_eq!(pl["input_tokens"], 8, "{pl}");
        assert_eq!(pl["output_tokens"], 2, "{pl}");
        assert_eq!(pl["model"], "claude-3-5-haiku-20241022", "{pl}");
        let pz = pezzo::from_canonical(&ev);
        assert_eq!(
            pz["properties"]["llmlogd_model"], "claude-3-5-haiku-20241022",
            "{pz}"
        );

        // OpenAI, model in the request body only, usage in the response body only.
        let openai = json!({
            "schema": "llmlogd.llm/v1", "provider": "openai",
            "request": {"start_time": 1_714_557_600, "body": {"model": "gpt-4o", "temperature": 0.2,
                        "messages": [{"role": "user", "content": "Hi"}]}},
            "response": {"end_time": 1_714_557_601, "body": {"id": "c1", "object": "chat.completion",
                         "model": "gpt-4o-2024-08-06",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}}
        });
        let ev = to_event(&openai).expect("canonical");
        assert_eq!(ev.model.as_deref(), Some("gpt-4o"));
        let pl = promptlayer::from_canonical(&ev);
        assert_eq!(
            (&pl["input_tokens"], &pl["output_tokens"], &pl["api_type"]),
            (&json!(3), &json!(2), &json!("chat-completions")),
            "{pl}"
        );
        assert_eq!(pl["parameters"], json!({"temperature": 0.2}), "{pl}");

        // A failed call says so; stated values stand.
        let mut failed = openai.clone();
        failed["response"]["body"] = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
        failed["response"]["http_status"] = json!(429);
        failed["model"] = json!("my-deployment");
        let ev = to_event(&failed).expect("canonical");
        assert_eq!(ev.status, Some(Status::Error));
        assert_eq!(ev.model.as_deref(), Some("my-deployment"));
        assert_eq!(ev.usage, None);
        let pl = promptlayer::from_canonical(&ev);
        assert_eq!(
            (&pl["status"], &pl["error_type"]),
            (&json!("ERROR"), &json!("PROVIDER_RATE_LIMIT")),
            "{pl}"
        );
    }

    /// A missing field is named itself, not the object that lacks it (`$` before).
    #[test]
    fn a_missing_field_is_refused_by_its_name() {
        for (path, field) in [
            (&["provider"][..], "provider"),
            (&["request", "start_time"][..], "request.start_time"),
            (&["response"][..], "response"),
        ] {
            let mut body = hand_written();
            let mut at = &mut body;
            for p in &path[..path.len() - 1] {
                at = &mut at[*p];
            }
            at.as_object_mut().unwrap().remove(path[path.len() - 1]);
            let errs = validate(&body).expect_err("invalid");
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].field, field);
            assert_eq!(errs[0].problem, "is required");
        }
    }
}
