//! Content conversion between provider bodies and PromptLayer templates.
//!
//! The PromptLayer template (`{"type":"chat","messages":[{"role","content":[parts],
//! "tool_calls"}], "tools", "tool_choice"}` or `{"type":"completion","content":[parts]}`) is the
//! pivot: every provider dialect converts to and from it, so OpenAI <-> Anthropic is two steps.
//! Conversions are best effort and never fail: unknown content parts pass through unchanged,
//! missing pieces become empty. Same-format round trips never go through here (the canonical
//! event keeps the source's own bodies and templates), so these need not be bijective.

pub(crate) mod anthropic;
pub(crate) mod openai;

use serde_json::{json, Map, Value};

use super::canonical::{ErrorType, Usage};

/// Which provider's JSON a body is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// OpenAI chat/completions (also Azure OpenAI and OpenAI-compatible endpoints).
    OpenAi,
    /// Anthropic messages (and legacy text completions).
    Anthropic,
}

/// The dialect of a request body from provider `provider` (a canonical id).
///
/// Anthropic's own API unless the body is plainly OpenAI-shaped (OpenAI-compatible endpoints
/// accept `system`/`tool` roles and `tool_calls`, Anthropic's messages API does not).
pub(crate) fn request_dialect(provider: &str, body: &Map<String, Value>) -> Dialect {
    if provider != "anthropic" {
        return Dialect::OpenAi;
    }
    let openai_shaped = messages(body).iter().any(|m| {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        matches!(role, "system" | "developer" | "tool" | "function")
            || m.get("tool_calls").is_some()
    });
    if openai_shaped {
        Dialect::OpenAi
    } else {
        Dialect::Anthropic
    }
}

/// The dialect of a response body: OpenAI has `choices`, Anthropic a `type` of `message`,
/// `completion` or `error` next to no `choices`; otherwise the provider decides.
pub(crate) fn response_dialect(provider: &str, body: &Map<String, Value>) -> Dialect {
    if body.contains_key("choices") {
        return Dialect::OpenAi;
    }
    match body.get("type").and_then(Value::as_str) {
        Some("message" | "completion") => Dialect::Anthropic,
        Some("error") if body.get("error").is_some_and(Value::is_object) => Dialect::Anthropic,
        _ if provider == "anthropic" => Dialect::Anthropic,
        _ => Dialect::OpenAi,
    }
}

/// The `messages` array of a body (or a template), as objects.
pub(crate) fn messages(body: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// `{"type":"text","text":...}`.
pub(crate) fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// The text of a part if it is a text part.
pub(crate) fn part_text(part: &Value) -> Option<&str> {
    let o = part.as_object()?;
    if o.get("type").and_then(Value::as_str) == Some("text") {
        o.get("text").and_then(Value::as_str)
    } else {
        None
    }
}

/// Template content (string, array of parts, or null) as a list of parts. Parts that are not
/// objects with a string `type` become text parts (strings as they are, anything else as JSON
/// text), so the result is always a valid PromptLayer content list.
pub(crate) fn template_parts(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::String(s)) => vec![text_part(s)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| match p {
                Value::String(s) => text_part(s),
                Value::Object(o) if o.get("type").is_some_and(Value::is_string) => p.clone(),
                other => text_part(&other.to_string()),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Roles a PromptLayer chat template accepts.
pub(crate) const TEMPLATE_ROLES: &[&str] = &[
    "system",
    "user",
    "assistant",
    "function",
    "tool",
    "placeholder",
    "developer",
];

/// `role` if PromptLayer knows it, else `user` (the role of text of unknown origin).
pub(crate) fn template_role(role: &str) -> &str {
    if TEMPLATE_ROLES.contains(&role) {
        role
    } else {
        "user"
    }
}

/// All text of a list of parts, concatenated (no separator, as providers stream them).
pub(crate) fn joined_text(parts: &[Value]) -> String {
    parts.iter().filter_map(part_text).collect()
}

/// A chat template; `extra` adds `tools`, `tool_choice`, ... when present.
pub(crate) fn chat_template(messages: Vec<Value>, extra: Map<String, Value>) -> Value {
    let mut t = Map::new();
    t.insert("type".into(), json!("chat"));
    t.insert("messages".into(), Value::Array(messages));
    t.extend(extra);
    Value::Object(t)
}

/// A completion template holding `text`.
pub(crate) fn completion_template(text: &str) -> Value {
    json!({"type": "completion", "content": [text_part(text)]})
}

/// The kind of a template: `chat`, `completion`, or `None` for anything else.
pub(crate) fn template_kind(t: &Value) -> Option<&str> {
    t.get("type").and_then(Value::as_str)
}

/// `true` if a template is a completion template.
pub(crate) fn is_completion(t: &Value) -> bool {
    template_kind(t) == Some("completion")
}

/// Copies `src`'s non-null members named in `keys` into `dst`.
pub(crate) fn copy_keys(dst: &mut Map<String, Value>, src: &Map<String, Value>, keys: &[&str]) {
    for k in keys {
        if let Some(v) = src.get(*k) {
            if !v.is_null() {
                dst.insert((*k).to_string(), v.clone());
            }
        }
    }
}

/// `body` minus `content_keys`: what PromptLayer calls `parameters`.
pub(crate) fn parameters_of(
    body: &Map<String, Value>,
    content_keys: &[&str],
) -> Map<String, Value> {
    body.iter()
        .filter(|(k, _)| !content_keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Inserts `params` into `body` without overwriting what the body already has.
pub(crate) fn merge_parameters(body: &mut Map<String, Value>, params: Option<&Map<String, Value>>) {
    if let Some(p) = params {
        for (k, v) in p {
            if !body.contains_key(k) {
                body.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Keeps an unabsorbed member in `extras`: unknown members always, known optional ones only
/// when `null` (a known member with a bad value is invalid input, not data).
pub(crate) fn keep(
    extras: &mut Map<String, Value>,
    k: &str,
    v: &Value,
    absorbed: bool,
    required: &[&str],
    optional: &[&str],
) {
    if absorbed || required.contains(&k) || (optional.contains(&k) && !v.is_null()) {
        return;
    }
    extras.insert(k.to_string(), v.clone());
}

/// Adds a format's leftovers (see `canonical::Extra`) to a rendered object: only keys the
/// renderer did not produce, never a `required` key, and an `optional` key only as `null` and
/// only when the spec lets it be `null` (`nullable`). So a crafted or stale extra can't make
/// the rendered body invalid, and a `null` an official client sends where the spec wants a
/// value (`cacheHit: null` from the Pezzo clients) is left out, which the spec reads as absent.
pub(crate) fn fill_extras(
    out: &mut Map<String, Value>,
    extras: Option<&Map<String, Value>>,
    required: &[&str],
    optional: &[&str],
    nullable: &[&str],
) {
    for (k, v) in extras.into_iter().flatten() {
        let key = k.as_str();
        if out.contains_key(key)
            || required.contains(&key)
            || (optional.contains(&key) && !(v.is_null() && nullable.contains(&key)))
        {
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
}

/// `usage` as a token count member, when known.
pub(crate) fn token(v: Option<&Value>) -> Option<u64> {
    v.and_then(super::check::as_u64)
}

/// Whether a usage has any count.
pub(crate) fn has_tokens(u: Option<&Usage>) -> bool {
    u.is_some_and(|u| u.input_tokens.is_some() || u.output_tokens.is_some())
}

/// At most `max` characters of `s`, cut on a character boundary.
pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((byte, _)) => s[..byte].to_string(),
        None => s.to_string(),
    }
}

/// A JSON value as a string: strings as they are, anything else as compact JSON text.
pub(crate) fn stringify(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a rendered response body needs besides the output template.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ResponseCtx<'a> {
    pub(crate) model: Option<&'a str>,
    pub(crate) usage: Option<&'a Usage>,
    /// Why generation stopped, in OpenAI's vocabulary (`stop`, `length`, `tool_calls`, ...).
    pub(crate) finish: Option<&'a str>,
    /// Unix seconds of the response.
    pub(crate) created: Option<i64>,
}

/// What went wrong with a call, read from its HTTP status and response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) error_type: ErrorType,
    pub(crate) message: String,
}

/// What a call's provider bodies say about it: the summary fields every parser fills (see
/// `canonical.rs`). Pezzo carries nothing else; a native event may state them itself, and then
/// its own values stand.
#[derive(Debug, Default)]
pub(crate) struct BodySummary {
    /// The request body's `model`.
    pub(crate) model: Option<String>,
    /// The response body's `model` (the provider's echo, often a dated snapshot).
    pub(crate) response_model: Option<String>,
    pub(crate) api_type: Option<String>,
    pub(crate) parameters: Option<Map<String, Value>>,
    pub(crate) failure: Option<Failure>,
    /// Only for a call that did not fail.
    pub(crate) usage: Option<Usage>,
}

pub(crate) fn body_summary(
    provider: &str,
    request: Option<&Value>,
    http_status: Option<u16>,
    response: Option<&Value>,
) -> BodySummary {
    let mut s = BodySummary::default();
    let resp = response.and_then(Value::as_object);
    if let Some(req) = request.and_then(Value::as_object) {
        s.model = req.get("model").and_then(Value::as_str).map(str::to_string);
        s.api_type = if req.contains_key("messages") {
            Some("chat-completions".into())
        } else if req.contains_key("prompt") {
            Some("completions".into())
        } else {
            None
        };
        s.parameters = Some(match request_dialect(provider, req) {
            Dialect::OpenAi => openai::parameters(req),
            Dialect::Anthropic => anthropic::parameters(req),
        });
    }
    s.response_model = resp
        .and_then(|r| r.get("model"))
        .and_then(Value::as_str)
        .map(str::to_string);
    s.failure = failure(http_status, response);
    if s.failure.is_none() {
        if let Some(resp) = resp {
            s.usage = match response_dialect(provider, resp) {
                Dialect::OpenAi => openai::usage(resp),
                Dialect::Anthropic => anthropic::usage(resp),
            };
        }
    }
    s
}

/// Whether a response is a failure: an HTTP status >= 400, or an error body (OpenAI
/// `{"error": ...}`, Anthropic `{"type": "error", ...}`).
pub(crate) fn failure(http_status: Option<u16>, body: Option<&Value>) -> Option<Failure> {
    let obj = body.and_then(Value::as_object);
    let error_body = obj.is_some_and(|o| {
        o.get("error").is_some_and(|e| !e.is_null())
            || o.get("type").and_then(Value::as_str) == Some("error")
    });
    let bad_status = http_status.is_some_and(|s| s >= 400);
    if !error_body && !bad_status {
        return None;
    }
    // OpenAI's body is {"error": {...}} (Python SDK's json_body) or the inner object itself
    // (the JS SDK's err.error); Anthropic's {"type":"error","error":{...}}.
    let inner = obj.map(|o| match o.get("error") {
        Some(Value::Object(e)) => e,
        _ => o,
    });
    let str_of = |k: &str| inner.and_then(|e| e.get(k)).and_then(Value::as_str);
    let error_type = classify(http_status, str_of("type"), str_of("code"));
    let message = str_of("message")
        .map(str::to_string)
        .or_else(|| {
            obj.and_then(|o| o.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| match http_status {
            Some(s) => format!("HTTP {s}"),
            None => "request failed".to_string(),
        });
    Some(Failure {
        error_type,
        message: truncate_chars(&message, 1024),
    })
}

/// PromptLayer error type for a failed call. Names in the body win (they are precise: OpenAI
/// answers 429 both for rate limits and for an exhausted quota), then the status: 429 rate limit,
/// 401/403 auth, 408/504 timeout, anything else a provider error.
fn classify(http_status: Option<u16>, kind: Option<&str>, code: Option<&str>) -> ErrorType {
    for name in [code, kind].into_iter().flatten() {
        let by_name = match name {
            "insufficient_quota" | "billing_hard_limit_reached" => {
                Some(ErrorType::ProviderQuotaLimit)
            }
            "rate_limit_exceeded" | "rate_limit_error" => Some(ErrorType::ProviderRateLimit),
            "invalid_api_key" | "authentication_error" | "permission_error" => {
                Some(ErrorType::ProviderAuthError)
            }
            "timeout" | "timeout_error" | "request_timeout" => Some(ErrorType::ProviderTimeout),
            // Bodies llmlogd renders itself carry the PromptLayer name in lower case.
            other => ErrorType::parse(&other.to_ascii_uppercase()),
        };
        if let Some(t) = by_name {
            return t;
        }
    }
    match http_status {
        Some(429) => ErrorType::ProviderRateLimit,
        Some(401 | 403) => ErrorType::ProviderAuthError,
        Some(408 | 504) => ErrorType::ProviderTimeout,
        _ => ErrorType::ProviderError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("héllo", 10), "héllo");
        assert_eq!(truncate_chars("🦀🦀🦀", 1), "🦀");
        assert_eq!(truncate_chars("", 0), "");
    }

    #[test]
    fn failures_are_classified() {
        let f = |status: Option<u16>, body: Value| failure(status, Some(&body));
        assert_eq!(f(Some(200), json!({"choices": []})), None);
        assert_eq!(
            f(
                Some(429),
                json!({"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"})
            ),
            Some(Failure {
                error_type: ErrorType::ProviderRateLimit,
                message: "Rate limit reached".into()
            })
        );
        assert_eq!(
            f(Some(429), json!({"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}))
                .map(|f| f.error_type),
            Some(ErrorType::ProviderQuotaLimit)
        );
        assert_eq!(
            f(
                Some(401),
                json!({"message": "bad key", "type": "invalid_request_error", "code": null})
            )
            .map(|f| f.error_type),
            Some(ErrorType::ProviderAuthError)
        );
        assert_eq!(
            f(Some(403), json!({})).map(|f| f.error_type),
            Some(ErrorType::ProviderAuthError)
        );
        assert_eq!(
            f(Some(504), json!({})),
            Some(Failure {
                error_type: ErrorType::ProviderTimeout,
                message: "HTTP 504".into()
            })
        );
        assert_eq!(
            f(
                None,
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            ),
            Some(Failure {
                error_type: ErrorType::ProviderError,
                message: "Overloaded".into()
            })
        );
        assert_eq!(
            f(
                None,
                json!({"error": {"type": "template_render_error", "message": "x"}})
            )
            .map(|f| f.error_type),
            Some(ErrorType::TemplateRenderError)
        );
        let long = "é".repeat(2000);
        let got = f(Some(500), json!({"error": {"message": long}})).expect("failure");
        assert_eq!(got.message.chars().count(), 1024);
    }

    #[test]
    fn dialects() {
        let anthropic_req = json!({"model": "claude-3-5-sonnet-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        let openai_req =
            json!({"model": "claude", "messages": [{"role": "system", "content": "be brief"}]});
        let o = |v: &Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            request_dialect("anthropic", &o(&anthropic_req)),
            Dialect::Anthropic
        );
        assert_eq!(
            request_dialect("anthropic", &o(&openai_req)),
            Dialect::OpenAi
        );
        assert_eq!(
            request_dialect("openai", &o(&anthropic_req)),
            Dialect::OpenAi
        );
        assert_eq!(
            response_dialect("openai", &o(&json!({"type": "message", "content": []}))),
            Dialect::Anthropic
        );
        assert_eq!(
            response_dialect("anthropic", &o(&json!({"choices": []}))),
            Dialect::OpenAi
        );
        assert_eq!(
            response_dialect("openai", &o(&json!({"error": {"message": "x"}}))),
            Dialect::OpenAi
        );
    }
}
