//! OpenAI chat-completions (and legacy completions) bodies <-> PromptLayer templates.
//!
//! OpenAI messages map almost one to one: PromptLayer's chat template borrowed OpenAI's roles,
//! `tool_calls` and `tools`; only `content` differs (string or parts in OpenAI, always parts in
//! PromptLayer).

use serde_json::{json, Map, Value};

use super::{
    chat_template, completion_template, copy_keys, has_tokens, is_completion, joined_text,
    merge_parameters, messages, parameters_of, part_text, template_parts, token, ResponseCtx,
};
use crate::formats::canonical::{ErrorType, Usage};

/// Request members that are content rather than model parameters.
pub(crate) const CONTENT_KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
];

/// Template members that map to request members of the same name.
const TOOL_KEYS: &[&str] = &["tools", "tool_choice", "functions", "function_call"];

/// A request's model parameters (temperature, max_tokens, ...).
pub(crate) fn parameters(body: &Map<String, Value>) -> Map<String, Value> {
    parameters_of(body, CONTENT_KEYS)
}

/// Request body -> PromptLayer `input` template.
pub(crate) fn request_to_template(body: &Map<String, Value>) -> Value {
    if !body.contains_key("messages") {
        if let Some(prompt) = body.get("prompt") {
            return completion_template(&prompt_text(prompt));
        }
    }
    let msgs = messages(body)
        .into_iter()
        .map(|m| message_to_template(m, "user"))
        .collect();
    let mut extra = Map::new();
    copy_keys(&mut extra, body, TOOL_KEYS);
    chat_template(msgs, extra)
}

/// PromptLayer `input` template (+ parameters, model) -> request body.
pub(crate) fn request_from_template(
    input: &Value,
    params: Option<&Map<String, Value>>,
    model: Option<&str>,
) -> Value {
    let mut body = Map::new();
    if let Some(m) = model {
        body.insert("model".into(), json!(m));
    }
    if is_completion(input) {
        let text = joined_text(&template_parts(input.get("content")));
        body.insert("prompt".into(), json!(text));
    } else {
        let msgs: Vec<Value> = input
            .as_object()
            .map(messages)
            .unwrap_or_default()
            .into_iter()
            .filter_map(message_from_template)
            .collect();
        body.insert("messages".into(), Value::Array(msgs));
        if let Some(t) = input.as_object() {
            copy_keys(&mut body, t, TOOL_KEYS);
        }
    }
    merge_parameters(&mut body, params);
    Value::Object(body)
}

/// Response body -> PromptLayer `output` template, and the first choice's `finish_reason`.
pub(crate) fn response_to_template(body: &Map<String, Value>) -> (Value, Option<String>) {
    let choice = body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(Value::as_object);
    let Some(choice) = choice else {
        return (chat_template(Vec::new(), Map::new()), None);
    };
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(msg) = choice.get("message").and_then(Value::as_object) {
        let t = chat_template(vec![message_to_template(msg, "assistant")], Map::new());
        (t, finish)
    } else if let Some(text) = choice.get("text").and_then(Value::as_str) {
        (completion_template(text), finish)
    } else {
        (chat_template(Vec::new(), Map::new()), finish)
    }
}

/// PromptLayer `output` template -> response body (`chat.completion` or `text_completion`).
pub(crate) fn response_from_template(output: &Value, ctx: &ResponseCtx<'_>) -> Value {
    let mut body = Map::new();
    let completion = is_completion(output);
    body.insert(
        "object".into(),
        json!(if completion {
            "text_completion"
        } else {
            "chat.completion"
        }),
    );
    if let Some(c) = ctx.created {
        body.insert("created".into(), json!(c));
    }
    if let Some(m) = ctx.model {
        body.insert("model".into(), json!(m));
    }
    let choices: Vec<Value> = if completion {
        let text = joined_text(&template_parts(output.get("content")));
        vec![json!({
            "index": 0,
            "text": text,
            "finish_reason": ctx.finish.unwrap_or("stop"),
        })]
    } else {
        output
            .as_object()
            .map(messages)
            .unwrap_or_default()
            .into_iter()
            .filter_map(message_from_template)
            .enumerate()
            .map(|(i, msg)| {
                let calls = msg
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                let finish = ctx
                    .finish
                    .unwrap_or(if calls { "tool_calls" } else { "stop" });
                json!({"index": i, "message": msg, "finish_reason": finish})
            })
            .collect()
    };
    body.insert("choices".into(), Value::Array(choices));
    if let (true, Some(u)) = (has_tokens(ctx.usage), ctx.usage) {
        body.insert("usage".into(), usage_json(u));
    }
    Value::Object(body)
}

/// OpenAI's `usage` object for `u` (missing counts as 0).
pub(crate) fn usage_json(u: &Usage) -> Value {
    let input = u.input_tokens.unwrap_or(0);
    let output = u.output_tokens.unwrap_or(0);
    json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input.saturating_add(output),
    })
}

/// Token counts of a response body.
pub(crate) fn usage(body: &Map<String, Value>) -> Option<Usage> {
    let u = body.get("usage")?.as_object()?;
    let usage = Usage {
        input_tokens: token(u.get("prompt_tokens")),
        output_tokens: token(u.get("completion_tokens")),
    };
    has_tokens(Some(&usage)).then_some(usage)
}

/// An error body as OpenAI's API (and so the Pezzo Python client) sends it.
pub(crate) fn error_body(message: &str, error_type: Option<ErrorType>) -> Value {
    let (kind, code) = match error_type {
        Some(ErrorType::ProviderQuotaLimit) => (
            "insufficient_quota".to_string(),
            json!("insufficient_quota"),
        ),
        Some(ErrorType::ProviderRateLimit) => (
            "provider_rate_limit".to_string(),
            json!("rate_limit_exceeded"),
        ),
        Some(ErrorType::ProviderAuthError) => {
            ("provider_auth_error".to_string(), json!("invalid_api_key"))
        }
        Some(t) => (t.as_str().to_ascii_lowercase(), Value::Null),
        None => ("provider_error".to_string(), Value::Null),
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// A `prompt` (string or array of strings) as one text.
fn prompt_text(prompt: &Value) -> String {
    match prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// OpenAI message -> template message.
fn message_to_template(m: &Map<String, Value>, default_role: &str) -> Value {
    let mut out = Map::new();
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or(default_role);
    out.insert("role".into(), json!(super::template_role(role)));
    let mut parts = template_parts(m.get("content"));
    if let Some(refusal) = m.get("refusal").and_then(Value::as_str) {
        parts.push(super::text_part(refusal));
    }
    out.insert("content".into(), Value::Array(parts));
    copy_keys(
        &mut out,
        m,
        &["name", "tool_call_id", "tool_calls", "function_call"],
    );
    Value::Object(out)
}

/// Template message -> OpenAI message; `None` for PromptLayer placeholders.
fn message_from_template(m: &Map<String, Value>) -> Option<Value> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
    if role == "placeholder" {
        return None;
    }
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    // Reasoning ("thinking") has no place in a chat-completions message.
    let parts: Vec<Value> = template_parts(m.get("content"))
        .into_iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some("thinking"))
        .collect();
    let content = match parts.as_slice() {
        [] if role == "assistant" => Value::Null,
        [] => json!(""),
        [one] if part_text(one).is_some() => json!(part_text(one).unwrap_or_default()),
        _ => Value::Array(parts),
    };
    out.insert("content".into(), content);
    copy_keys(&mut out, m, &["name", "tool_call_id", "function_call"]);
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        if !calls.is_empty() {
            let calls = calls
                .iter()
                .filter_map(Value::as_object)
                .map(tool_call)
                .collect();
            out.insert("tool_calls".into(), Value::Array(calls));
        }
    }
    Some(Value::Object(out))
}

/// A template tool call in OpenAI's shape (drops PromptLayer's `tool_id`/`provider_metadata`).
fn tool_call(tc: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    copy_keys(&mut out, tc, &["id"]);
    out.insert(
        "type".into(),
        tc.get("type").cloned().unwrap_or_else(|| json!("function")),
    );
    copy_keys(&mut out, tc, &["function"]);
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn chat_request_to_template_and_back() {
        let body = obj(json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
            "tool_choice": "auto",
            "temperature": 0.2
        }));
        let t = request_to_template(&body);
        assert_eq!(
            t,
            json!({
                "type": "chat",
                "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                    ]},
                    {"role": "assistant", "content": [], "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "content": [{"type": "text", "text": "a cat"}], "tool_call_id": "call_1"}
                ],
                "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
                "tool_choice": "auto"
            })
        );
        assert_eq!(parameters(&body), obj(json!({"temperature": 0.2})));
        let back = request_from_template(&t, Some(&parameters(&body)), Some("gpt-4o"));
        assert_eq!(back, Value::Object(body));
    }

    #[test]
    fn completion_request_and_response() {
        let body =
            obj(json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5}));
        let t = request_to_template(&body);
        assert_eq!(
            t,
            json!({"type": "completion", "content": [{"type": "text", "text": "Say hi"}]})
        );
        assert_eq!(
            request_from_template(&t, Some(&parameters(&body)), Some("gpt-3.5-turbo-instruct")),
            Value::Object(body)
        );
        let resp = obj(
            json!({"object": "text_completion", "choices": [{"index": 0, "text": "Hi!", "finish_reason": "stop"}]}),
        );
        let (out, finish) = response_to_template(&resp);
        assert_eq!(
            out,
            json!({"type": "completion", "content": [{"type": "text", "text": "Hi!"}]})
        );
        assert_eq!(finish.as_deref(), Some("stop"));
    }

    #[test]
    fn response_to_template_and_back() {
        let resp = obj(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        }));
        let (out, finish) = response_to_template(&resp);
        assert_eq!(
            out,
            json!({"type": "chat", "messages": [{"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]})
        );
        let u = usage(&resp).expect("usage");
        assert_eq!(
            u,
            Usage {
                input_tokens: Some(12),
                output_tokens: Some(3)
            }
        );
        let ctx = ResponseCtx {
            model: Some("gpt-4o"),
            usage: Some(&u),
            finish: finish.as_deref(),
            created: Some(1_700_000_000),
        };
        assert_eq!(
            response_from_template(&out, &ctx),
            json!({
                "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
            })
        );
    }

    #[test]
    fn tool_call_output_gets_tool_calls_finish() {
        let out = json!({"type": "chat", "messages": [{"role": "assistant", "content": [], "tool_calls": [
            {"id": "call_abc123", "tool_id": null, "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"NYC\"}"}}
        ]}]});
        assert_eq!(
            response_from_template(&out, &ResponseCtx::default()),
            json!({"object": "chat.completion", "choices": [{"index": 0, "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"NYC\"}"}}]
            }, "finish_reason": "tool_calls"}]})
        );
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_body("slow down", Some(ErrorType::ProviderRateLimit)),
            json!({"error": {"message": "slow down", "type": "provider_rate_limit", "param": null, "code": "rate_limit_exceeded"}})
        );
        assert_eq!(
            error_body("x", Some(ErrorType::TemplateRenderError))["error"]["type"],
            json!("template_render_error")
        );
    }
}
