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

use super::canonical::{provider_id, LlmEvent, SCHEMA};
use super::check::{Checker, ROOT};
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
    match LlmEvent::deserialize(body) {
        Ok(ev) => Ok(canonical_attributes(ev)),
        Err(e) => {
            c.error(ROOT, format!("not a valid {SCHEMA} event: {e}"));
            Err(c.finish().err().unwrap_or_default())
        }
    }
}

/// The canonical event, when the body carries the schema marker and parses.
pub fn to_canonical(body: &Value) -> Option<LlmEvent> {
    if !is_canonical(body) {
        return None;
    }
    LlmEvent::deserialize(body).ok()
}

fn canonical_attributes(ev: LlmEvent) -> Attributes {
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

    #[test]
    fn canonical_native_events_convert() {
        let body = hand_written();
        assert_eq!(validate(&body), Ok(()));
        let ev = to_canonical(&body).expect("canonical");
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
        let again = from_canonical(&ev);
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
        assert_eq!(errs[0].field, "$");
        assert!(
            errs[0]
                .problem
                .starts_with("not a valid llmlogd.llm/v1 event"),
            "{}",
            errs[0].problem
        );
        assert_eq!(to_canonical(&body), None);
        assert!(validate(&json!("text")).is_err());
    }
}
