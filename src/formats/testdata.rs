//! Realistic bodies from the official clients, shared by the format tests.
//!
//! Built from the clients' source (npm @pezzo/client 0.4.18, PyPI pezzo 0.1.2, PyPI promptlayer
//! 1.5.16, npm promptlayer 1.3.6) and PromptLayer's documented examples. Add captured fixtures
//! here as functions so every test (including the mutation fuzz in `formats::tests`) picks them up.

use serde_json::{json, Value};

/// What @pezzo/client 0.4.18 sends for a successful chat completion (`pezzo.openai`
/// wrapper with `properties`).
pub(crate) fn pezzo_ts_success() -> Value {
    json!({
        "metadata": {
            "environment": "Production",
            "provider": "OpenAI",
            "type": "ChatCompletion",
            "client": "pezzo-ts",
            "clientVersion": "0.4.18"
        },
        "properties": {"userId": "u_123", "traceId": "t-9"},
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {
            "timestamp": "2024-05-01T10:00:00.000Z",
            "body": {
                "messages": [
                    {"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": "Hi"}
                ],
                "model": "gpt-3.5-turbo",
                "temperature": 0.7
            }
        },
        "response": {
            "timestamp": "2024-05-01T10:00:01.234Z",
            "body": {
                "id": "chatcmpl-9",
                "object": "chat.completion",
                "created": 1_714_557_601,
                "model": "gpt-3.5-turbo-0125",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 15, "completion_tokens": 2, "total_tokens": 17},
                "system_fingerprint": null
            },
            "status": 200
        }
    })
}

/// What PyPI pezzo 0.1.2 sends for a managed prompt (metadata merged with the prompt's).
pub(crate) fn pezzo_py_managed() -> Value {
    json!({
        "metadata": {
            "environment": "Production",
            "provider": "OpenAI",
            "type": "Chat",
            "client": "pezzo-python",
            "clientVersion": "0.1.2",
            "promptId": "clnv2ko5a0001mh08ykzzz6xo",
            "promptVersionSha": "4b1ee3c"
        },
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {
            "timestamp": "2024-05-01T10:00:00.000Z",
            "body": {"messages": [{"role": "user", "content": "Summarise: cats"}], "model": "gpt-4", "max_tokens": 100}
        },
        "response": {
            "timestamp": "2024-05-01T10:00:02.000Z",
            "body": {
                "id": "chatcmpl-2", "object": "chat.completion", "created": 1_714_557_602, "model": "gpt-4-0613",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Cats are great."}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
            },
            "status": 200
        }
    })
}

/// @pezzo/client on a rate-limited call: `body` is the OpenAI SDK's `err.error`.
pub(crate) fn pezzo_ts_rate_limited() -> Value {
    json!({
        "metadata": {"environment": "Staging", "provider": "OpenAI", "type": "ChatCompletion", "client": "pezzo-ts", "clientVersion": "0.4.18"},
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {"timestamp": "2024-05-01T10:00:00.000Z", "body": {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4o"}},
        "response": {
            "timestamp": "2024-05-01T10:00:00.100Z",
            "body": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": null, "code": "rate_limit_exceeded"},
            "status": 429
        }
    })
}

/// PyPI pezzo on a bad key: `body` is openai 0.x's `err.json_body`.
pub(crate) fn pezzo_py_auth_error() -> Value {
    json!({
        "metadata": {"environment": "Production", "provider": "OpenAI", "type": "ChatCompletion", "client": "pezzo-python", "clientVersion": "0.1.2"},
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {"timestamp": "2024-05-01T10:00:00.000Z", "body": {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-3.5-turbo"}},
        "response": {
            "timestamp": "2024-05-01T10:00:00.050Z",
            "body": {"error": {"message": "Incorrect API key provided: sk-abc.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}},
            "status": 401
        }
    })
}

/// @pezzo/client when the provider could not be reached: the OpenAI SDK's
/// `APIConnectionError` has no `error` and no `status`, so the report has neither (JSON leaves
/// out `undefined`).
pub(crate) fn pezzo_ts_unreachable() -> Value {
    json!({
        "metadata": {"environment": "Production", "provider": "OpenAI", "type": "ChatCompletion", "client": "pezzo-ts", "clientVersion": "0.4.18"},
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {"timestamp": "2024-05-01T10:00:00.000Z", "body": {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4o-mini"}},
        "response": {"timestamp": "2024-05-01T10:00:00.020Z"}
    })
}

/// PyPI pezzo when the provider could not be reached: openai 0.x's `APIConnectionError` has
/// `json_body` and `http_status` both `None`.
pub(crate) fn pezzo_py_unreachable() -> Value {
    json!({
        "metadata": {"environment": "Production", "provider": "OpenAI", "type": "ChatCompletion", "client": "pezzo-python", "clientVersion": "0.1.2"},
        "cacheEnabled": false,
        "cacheHit": null,
        "request": {"timestamp": "2024-05-01T10:00:00.000Z", "body": {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-3.5-turbo"}},
        "response": {"timestamp": "2024-05-01T10:00:00.020Z", "body": null, "status": null}
    })
}

/// Every Pezzo fixture, named.
pub(crate) fn pezzo_all() -> Vec<(&'static str, Value)> {
    vec![
        ("pezzo_ts_success", pezzo_ts_success()),
        ("pezzo_py_managed", pezzo_py_managed()),
        ("pezzo_ts_rate_limited", pezzo_ts_rate_limited()),
        ("pezzo_py_auth_error", pezzo_py_auth_error()),
        ("pezzo_ts_unreachable", pezzo_ts_unreachable()),
        ("pezzo_py_unreachable", pezzo_py_unreachable()),
    ]
}

/// PyPI promptlayer 1.5.16 `log_request(...)`: every field is sent, defaults and nulls included,
/// times as `time.time()` floats.
pub(crate) fn pl_py_openai() -> Value {
    json!({
        "provider": "openai",
        "model": "gpt-4o",
        "input": {"type": "chat", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}
        ]},
        "output": {"type": "chat", "messages": [
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]}
        ]},
        "request_start_time": 1_700_000_000.123,
        "request_end_time": 1_700_000_001.456,
        "parameters": {"temperature": 0.7, "max_tokens": 256},
        "tags": ["prod", "math"],
        "metadata": {"user_id": "42", "session": "abc"},
        "prompt_name": null,
        "prompt_version_number": null,
        "prompt_input_variables": {},
        "input_tokens": 20,
        "output_tokens": 1,
        "price": 0.0,
        "function_name": "",
        "score": 0,
        "prompt_id": null,
        "score_name": null,
        "api_type": null,
        "status": "SUCCESS",
        "error_type": null,
        "error_message": null
    })
}

/// npm promptlayer 1.3.6 `logRequest(...)`: only the fields given; times as `Date.now() / 1000`.
pub(crate) fn pl_js_anthropic() -> Value {
    json!({
        "provider": "anthropic",
        "model": "claude-3-5-sonnet-20241022",
        "input": {"type": "chat", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]}
        ]},
        "output": {"type": "chat", "messages": [
            {"role": "assistant", "content": [{"type": "text", "text": "Bonjour !"}]}
        ]},
        "request_start_time": 1_700_000_000.5,
        "request_end_time": 1_700_000_002,
        "parameters": {"max_tokens": 1024, "temperature": 0.3},
        "tags": ["js"],
        "metadata": {"environment": "staging"},
        "input_tokens": 18,
        "output_tokens": 5,
        "price": 0.00012,
        "prompt_name": "greeter",
        "prompt_id": 77,
        "prompt_version_number": 3,
        "prompt_input_variables": {"lang": "French"},
        "score": 90,
        "api_type": "chat-completions"
    })
}

/// PromptLayer's documented tools example (ISO times with `+00:00`).
pub(crate) fn pl_docs_tools() -> Value {
    json!({
        "provider": "openai",
        "model": "gpt-4o",
        "input": {
            "type": "chat",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What's the weather in NYC?"}]}],
            "tools": [{"type": "function", "function": {
                "name": "get_weather",
                "description": "Get the current weather for a location",
                "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}}, "required": ["location"]}
            }}],
            "tool_choice": "auto"
        },
        "output": {"type": "chat", "messages": [{
            "role": "assistant",
            "content": [],
            "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"NYC\"}"}}]
        }]},
        "request_start_time": "2024-04-03T20:57:25+00:00",
        "request_end_time": "2024-04-03T20:57:26+00:00"
    })
}

/// PromptLayer's documented failed-request example (string message content).
pub(crate) fn pl_docs_error() -> Value {
    json!({
        "provider": "openai",
        "model": "gpt-4",
        "api_type": "chat-completions",
        "input": {"type": "chat", "messages": [{"role": "user", "content": "Hello"}]},
        "output": {"type": "chat", "messages": []},
        "request_start_time": "2024-01-15T10:30:00Z",
        "request_end_time": "2024-01-15T10:30:30Z",
        "status": "ERROR",
        "error_type": "PROVIDER_TIMEOUT",
        "error_message": "Request timed out after 30 seconds"
    })
}

/// PromptLayer's documented warning example.
pub(crate) fn pl_docs_warning() -> Value {
    json!({
        "provider": "anthropic",
        "model": "claude-3-sonnet",
        "api_type": "chat-completions",
        "input": {"type": "chat", "messages": [{"role": "user", "content": "Summarize this"}]},
        "output": {"type": "chat", "messages": [{"role": "assistant", "content": "Summary..."}]},
        "request_start_time": "2024-01-15T10:30:00Z",
        "request_end_time": "2024-01-15T10:30:05Z",
        "status": "WARNING",
        "error_type": "PROVIDER_RATE_LIMIT",
        "error_message": "Succeeded after 2 retries due to rate limiting"
    })
}

/// The spec's own example: a completion template with `template_format`/`input_variables`.
pub(crate) fn pl_docs_completion() -> Value {
    json!({
        "provider": "openai",
        "model": "gpt-3.5-turbo-instruct",
        "input": {"content": [{"text": "Write a haiku about {topic}", "type": "text"}], "input_variables": ["topic"], "template_format": "f-string", "type": "completion"},
        "output": {"content": [{"text": "Autumn moonlight", "type": "text"}], "input_variables": [], "template_format": "f-string", "type": "completion"},
        "request_start_time": "2023-11-07T05:31:56Z",
        "request_end_time": "2023-11-07T05:31:56Z",
        "parameters": {},
        "tags": [],
        "metadata": {},
        "prompt_name": "haiku",
        "prompt_id": 123,
        "prompt_version_number": 1,
        "prompt_input_variables": {"topic": "autumn"},
        "input_tokens": 0,
        "output_tokens": 0,
        "price": 0,
        "function_name": "",
        "score": 0,
        "api_type": "completions",
        "status": "SUCCESS"
    })
}

/// Every PromptLayer fixture, named.
pub(crate) fn pl_all() -> Vec<(&'static str, Value)> {
    vec![
        ("pl_py_openai", pl_py_openai()),
        ("pl_js_anthropic", pl_js_anthropic()),
        ("pl_docs_tools", pl_docs_tools()),
        ("pl_docs_error", pl_docs_error()),
        ("pl_docs_warning", pl_docs_warning()),
        ("pl_docs_completion", pl_docs_completion()),
    ]
}

/// Follow-ups as the Python SDK sends them (`api_key` and `request_id` in the body).
pub(crate) fn pl_track_score() -> Value {
    json!({"request_id": 4242, "score": 87, "api_key": "pl_key", "name": "accuracy"})
}

pub(crate) fn pl_track_metadata() -> Value {
    json!({"request_id": 4242, "metadata": {"user_id": "42", "plan": "pro"}, "api_key": "pl_key"})
}

pub(crate) fn pl_track_prompt() -> Value {
    json!({"request_id": 4242, "prompt_name": "greeter", "prompt_input_variables": {"lang": "French"}, "api_key": "pl_key", "version": null, "label": null})
}

pub(crate) fn pl_track_group() -> Value {
    json!({"api_key": "pl_key", "request_id": 4242, "group_id": 7})
}

/// `body` as the Pezzo renderer sends it back: without the `null`s the spec does not allow
/// (`cacheHit`, `cacheEnabled`, `properties`, `metadata.promptId`).
pub(crate) fn pezzo_without_spec_nulls(body: &Value) -> Value {
    let mut v = body.clone();
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, x| {
            !(x.is_null() && ["cacheHit", "cacheEnabled", "properties"].contains(&k.as_str()))
        });
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            m.retain(|k, x| !(x.is_null() && k == "promptId"));
        }
    }
    v
}

/// `body` as the PromptLayer renderer sends it back: without `null`s in the optional members
/// the spec does not type `… | null`.
pub(crate) fn promptlayer_without_spec_nulls(body: &Value) -> Value {
    const NOT_NULLABLE: &[&str] = &[
        "parameters",
        "tags",
        "metadata",
        "prompt_input_variables",
        "input_tokens",
        "output_tokens",
        "price",
        "function_name",
        "score",
        "status",
    ];
    let mut v = body.clone();
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, x| !(x.is_null() && NOT_NULLABLE.contains(&k.as_str())));
    }
    v
}
