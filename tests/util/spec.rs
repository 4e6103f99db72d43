//! Strict checks of what llmlogd delivers, written from the specs in `shared/specs/` alone
//! (not from llmlogd's own validators, which accept what the official clients send beyond the
//! specs: float times, `null`s everywhere). Each returns every violation as `path: problem`.
//!
//! OpenAPI 3.0 reading: a member is `null` only where the spec says `… | null`; `string
//! <date-time>` is RFC 3339 in its usual spelling (upper-case `T` between date and time, `Z` or
//! a numeric offset), which is what Pezzo's class-validator `IsDateString` takes.

use serde_json::{Map, Value};

/// `POST /reporting/v2/request`, `CreateReportDto`.
pub fn pezzo_report(body: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(o) = object(body, "$", &mut errs) else {
        return errs;
    };
    required(o, "$", &["metadata", "request", "response"], &mut errs);
    if let Some(m) = o.get("metadata") {
        if let Some(m) = object(m, "metadata", &mut errs) {
            required(
                m,
                "metadata",
                &["provider", "client", "clientVersion", "environment"],
                &mut errs,
            );
            if let Some(p) = m.get("provider") {
                one_of(
                    p,
                    "metadata.provider",
                    &["OpenAI", "Azure", "Anthropic"],
                    &mut errs,
                );
            }
            for k in ["client", "clientVersion", "environment", "promptId"] {
                if let Some(v) = m.get(k) {
                    string(v, &format!("metadata.{k}"), &mut errs);
                }
            }
        }
    }
    if let Some(p) = o.get("properties") {
        object(p, "properties", &mut errs);
    }
    for k in ["cacheEnabled", "cacheHit"] {
        if let Some(v) = o.get(k) {
            if !v.is_boolean() {
                errs.push(format!("{k}: must be a boolean, is {v}"));
            }
        }
    }
    for part in ["request", "response"] {
        if let Some(x) = o.get(part).and_then(|x| object(x, part, &mut errs)) {
            required(x, part, &["timestamp", "body"], &mut errs);
            if let Some(t) = x.get("timestamp") {
                date_time(t, &format!("{part}.timestamp"), &mut errs);
            }
            if let Some(b) = x.get("body") {
                object(b, &format!("{part}.body"), &mut errs);
            }
        }
    }
    errs
}

/// `POST /log-request`, its body.
pub fn promptlayer_log(body: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(o) = object(body, "$", &mut errs) else {
        return errs;
    };
    required(
        o,
        "$",
        &[
            "provider",
            "model",
            "input",
            "output",
            "request_start_time",
            "request_end_time",
        ],
        &mut errs,
    );
    for (k, v) in o {
        let nullable = [
            "prompt_name",
            "prompt_id",
            "prompt_version_number",
            "api_type",
            "error_type",
            "error_message",
        ]
        .contains(&k.as_str());
        if v.is_null() && nullable {
            continue;
        }
        let e = &mut errs;
        match k.as_str() {
            "provider" | "model" | "function_name" | "prompt_name" | "api_type" => {
                string(v, k, e);
            }
            "input" | "output" | "parameters" | "metadata" | "prompt_input_variables" => {
                object(v, k, e);
            }
            "request_start_time" | "request_end_time" => date_time(v, k, e),
            "tags" => match v.as_array() {
                Some(tags) => {
                    for (i, t) in tags.iter().enumerate() {
                        match t.as_str() {
                            Some(s) if s.chars().count() <= 512 => {}
                            Some(_) => e.push(format!("tags[{i}]: longer than 512")),
                            None => e.push(format!("tags[{i}]: must be a string, is {t}")),
                        }
                    }
                }
                None => e.push(format!("tags: must be an array, is {v}")),
            },
            "prompt_id" => integer(v, k, None, None, e),
            "prompt_version_number" => integer(v, k, Some(1), None, e),
            "input_tokens" | "output_tokens" => integer(v, k, Some(0), None, e),
            "score" => integer(v, k, Some(0), Some(100), e),
            "price" if !v.as_f64().is_some_and(|p| p >= 0.0) => {
                e.push(format!("price: must be a number >= 0, is {v}"));
            }
            "status" => one_of(v, k, &["SUCCESS", "WARNING", "ERROR"], e),
            "error_type" => one_of(
                v,
                k,
                &[
                    "PROVIDER_TIMEOUT",
                    "PROVIDER_QUOTA_LIMIT",
                    "PROVIDER_RATE_LIMIT",
                    "PROVIDER_AUTH_ERROR",
                    "PROVIDER_ERROR",
                    "TEMPLATE_RENDER_ERROR",
                    "VARIABLE_MISSING_OR_EMPTY",
                    "UNKNOWN_ERROR",
                ],
                e,
            ),
            "error_message" => match v.as_str() {
                Some(s) if s.chars().count() <= 1024 => {}
                Some(_) => e.push("error_message: longer than 1024".into()),
                None => e.push(format!("error_message: must be a string, is {v}")),
            },
            // Not in the spec (the SDKs' own members, e.g. `score_name`): anything goes.
            _ => {}
        }
    }
    errs
}

fn object<'a>(v: &'a Value, path: &str, errs: &mut Vec<String>) -> Option<&'a Map<String, Value>> {
    let o = v.as_object();
    if o.is_none() {
        errs.push(format!("{path}: must be an object, is {v}"));
    }
    o
}

fn required(o: &Map<String, Value>, path: &str, keys: &[&str], errs: &mut Vec<String>) {
    for k in keys {
        if !o.contains_key(*k) {
            errs.push(format!("{path}.{k}: required"));
        }
    }
}

fn string(v: &Value, path: &str, errs: &mut Vec<String>) {
    if !v.is_string() {
        errs.push(format!("{path}: must be a string, is {v}"));
    }
}

fn one_of(v: &Value, path: &str, allowed: &[&str], errs: &mut Vec<String>) {
    if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
        errs.push(format!("{path}: must be one of {allowed:?}, is {v}"));
    }
}

fn integer(v: &Value, path: &str, min: Option<i64>, max: Option<i64>, errs: &mut Vec<String>) {
    // JSON Schema's `integer` takes 3.0 too; the real services' parsers may not, so integers
    // are asked for in integer form.
    match v.as_i64() {
        Some(n) if min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m) => {}
        _ => errs.push(format!(
            "{path}: must be an integer in {min:?}..={max:?}, is {v}"
        )),
    }
}

fn date_time(v: &Value, path: &str, errs: &mut Vec<String>) {
    let ok = v.as_str().is_some_and(|s| {
        s.as_bytes().get(10) == Some(&b'T')
            && !s.ends_with('z')
            && chrono::DateTime::parse_from_rfc3339(s).is_ok()
    });
    if !ok {
        errs.push(format!(
            "{path}: must be an RFC 3339 date-time string, is {v}"
        ));
    }
}

#[test]
fn the_strict_checks_catch_what_the_clients_send_beyond_the_specs() {
    let pl = serde_json::json!({
        "provider": "openai", "model": "gpt-4o",
        "input": {"type": "chat", "messages": []}, "output": {"type": "chat", "messages": []},
        "request_start_time": 1_700_000_000.25, "request_end_time": "2024-01-15 10:30:00z",
        "tags": null, "prompt_name": null, "score": 3.0
    });
    let errs = promptlayer_log(&pl);
    assert_eq!(errs.len(), 4, "{errs:?}");
    let pz = serde_json::json!({
        "metadata": {"provider": "OpenAI", "client": "c", "clientVersion": "1", "environment": "P",
                     "promptId": null},
        "request": {"timestamp": "2024-01-01T00:00:00.000Z", "body": {}},
        "response": {"timestamp": "2024-01-01", "body": {}},
        "cacheHit": null
    });
    let errs = pezzo_report(&pz);
    assert_eq!(errs.len(), 3, "{errs:?}");
}
