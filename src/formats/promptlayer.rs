//! PromptLayer's `POST /log-request` and its follow-ups (`/library-track-*`, `/track-group`).
//!
//! What the official SDKs (PyPI promptlayer 1.5.16, npm promptlayer 1.3.6) send beyond the docs:
//!
//! - `request_start_time`/`request_end_time` as **Unix seconds** (floats from `time.time()` /
//!   `Date.now() / 1000`), where the spec says `string<date-time>`; both forms are accepted,
//!   integers too. A number above 2e10 is **milliseconds** (`Date.now()`, which the JS SDK's
//!   `number` type invites), as the service itself reads numbers (pydantic's rule).
//! - The Python SDK sends every field, `null` included (`prompt_name: null`, `error_type: null`,
//!   ...), so `null` is accepted for every optional field and means "absent".
//! - `score_name`, outside the spec; kept (canonical `score_name`).
//!
//! # Normalisations of a PromptLayer -> canonical -> PromptLayer round trip
//!
//! The result equals the input except:
//!
//! - numeric times become RFC 3339 strings (UTC, `Z`, fraction digits as needed: 0, 3, 6 or 9
//!   after rounding to the microsecond). The spec types them `string<date-time>`, an RFC 3339
//!   date-time with an explicit offset; floats are only what the SDKs happen to send, and an
//!   offset keeps the instant unambiguous whatever the server's zone. String times are re-sent
//!   exactly as received unless they use RFC 3339's rarer spellings (a space or `t` between
//!   date and time, a lower-case `z`), which are re-written in the usual form;
//! - integral floats in integer fields (`"score": 3.0`) become integers;
//! - a `null` in an optional member the spec does not type `… | null` (`tags`, `metadata`,
//!   `status`, `input_tokens`, ...) is left out, which the spec reads as absent; the Python
//!   SDK's `null`s in nullable members (`prompt_name`, `error_type`, ...) are kept;
//! - a `provider` spelled differently from llmlogd's id (`OpenAI`) is re-sent as received.
//!
//! # Cross-format mapping (see `from_canonical`)
//!
//! `metadata` <-> Pezzo `properties` (values stringified, since PromptLayer wants strings);
//! `environment` <-> `metadata.environment`; a Pezzo prompt id (a string) goes to
//! `metadata.llmlogd_prompt_id` because `prompt_id` must be a PromptLayer integer id.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::canonical::{
    provider_id, ErrorType, LlmEvent, PromptId, PromptLayerExtra, Status, Timestamp, Usage,
};
use super::check::{self, index_path, key_path, present, Checker, ROOT};
use super::convert::{
    self, anthropic, openai, request_dialect, response_dialect, stringify, truncate_chars, Dialect,
    ResponseCtx,
};
use super::{Attributes, FastAccepted, FieldError, TrackKind};

/// The ingest (and delivery) path of request logs.
pub const PATH: &str = "/log-request";
/// Header carrying the API key on `/log-request` (follow-ups carry `api_key` in the body).
pub const API_KEY_HEADER: &str = "X-API-KEY";

/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 512;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 1024;
/// Longest `error_message`, in characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

const STATUSES: &[&str] = &["SUCCESS", "WARNING", "ERROR"];
/// Roles of the SDK's chat template types.
const ROLES: &[&str] = convert::TEMPLATE_ROLES;

const TOP_REQUIRED: &[&str] = &[
    "provider",
    "model",
    "input",
    "output",
    "request_start_time",
    "request_end_time",
];
const TOP_OPTIONAL: &[&str] = &[
    "parameters",
    "tags",
    "metadata",
    "prompt_name",
    "prompt_id",
    "prompt_version_number",
    "prompt_input_variables",
    "input_tokens",
    "output_tokens",
    "price",
    "function_name",
    "score",
    "score_name",
    "api_type",
    "status",
    "error_type",
    "error_message",
];

/// The optional members the spec types `… | null` (and `score_name`, outside the spec): a
/// `null` the Python SDK sent there is delivered as sent; elsewhere it is left out.
const TOP_NULLABLE: &[&str] = &[
    "prompt_name",
    "prompt_id",
    "prompt_version_number",
    "score_name",
    "api_type",
    "error_type",
    "error_message",
];

const I64_MIN: i128 = i64::MIN as i128;
const I64_MAX: i128 = i64::MAX as i128;
const U64_MAX: i128 = u64::MAX as i128;

/// Checks a `/log-request` body against the spec, listing every bad field.
pub fn validate(body: &Value) -> Result<(), Vec<FieldError>> {
    let mut c = Checker::new();
    let Some(root) = c.object(body, ROOT) else {
        return c.finish();
    };
    for key in ["provider", "model"] {
        if let Some(v) = c.required(root, ROOT, key) {
            c.string(v, key);
        }
    }
    for key in ["input", "output"] {
        if let Some(v) = c.required(root, ROOT, key) {
            check_template(&mut c, v, key);
        }
    }
    for key in ["request_start_time", "request_end_time"] {
        if let Some(v) = c.required(root, ROOT, key) {
            c.date_time(v, key, true);
        }
    }
    if let Some(v) = present(root, "parameters") {
        c.object(v, "parameters");
    }
    if let Some(tags) = present(root, "tags").and_then(|v| c.array(v, "tags")) {
        for (i, t) in tags.iter().enumerate() {
            c.string_max(t, &index_path("tags", i), MAX_TAG_CHARS);
        }
    }
    if let Some(v) = present(root, "metadata") {
        check_metadata(&mut c, v, "metadata");
    }
    for key in ["prompt_name", "function_name", "score_name", "api_type"] {
        if let Some(v) = present(root, key) {
            c.string(v, key);
        }
    }
    if let Some(v) = present(root, "prompt_id") {
        c.integer_in(v, "prompt_id", I64_MIN, I64_MAX);
    }
    if let Some(v) = present(root, "prompt_version_number") {
        c.integer_in(v, "prompt_version_number", 1, I64_MAX);
    }
    if let Some(v) = present(root, "prompt_input_variables") {
        c.object(v, "prompt_input_variables");
    }
    for key in ["input_tokens", "output_tokens"] {
        if let Some(v) = present(root, key) {
            c.integer_in(v, key, 0, U64_MAX);
        }
    }
    if let Some(v) = present(root, "price") {
        c.non_negative_number(v, "price");
    }
    if let Some(v) = present(root, "score") {
        c.integer_in(v, "score", 0, 100);
    }
    // `None` when the status itself is invalid (already reported).
    let status = match present(root, "status") {
        None => Some(Status::Success),
        Some(v) => c
            .one_of(v, "status", STATUSES)
            .and_then(Status::from_promptlayer),
    };
    if let Some(v) = present(root, "error_type") {
        let names: Vec<&str> = ErrorType::ALL.iter().map(ErrorType::as_str).collect();
        let error_type = c.one_of(v, "error_type", &names).and_then(ErrorType::parse);
        if let (Some(t), Some(s)) = (error_type, status) {
            if !t.allowed_statuses().contains(&s) {
                let allowed: Vec<&str> = t
                    .allowed_statuses()
                    .iter()
                    .map(Status::as_promptlayer)
                    .collect();
                let default = if present(root, "status").is_none() {
                    " (the default)"
                } else {
                    ""
                };
                c.error(
                    "error_type",
                    format!(
                        "{} is only allowed with status {}, got {}{default}",
                        t.as_str(),
                        allowed.join(" or "),
                        s.as_promptlayer()
                    ),
                );
            }
        }
    }
    if let Some(v) = present(root, "error_message") {
        c.string_max(v, "error_message", MAX_ERROR_MESSAGE_CHARS);
    }
    c.finish()
}

/// Checks a chat or completion template (the SDK's `PromptTemplate` union).
fn check_template(c: &mut Checker, v: &Value, path: &str) {
    let Some(t) = c.object(v, path) else {
        return;
    };
    let type_path = key_path(path, "type");
    let kind = c
        .required(t, path, "type")
        .and_then(|k| c.one_of(k, &type_path, &["completion", "chat"]));
    match kind {
        Some("chat") => {
            let msgs_path = key_path(path, "messages");
            let Some(msgs) = c
                .required(t, path, "messages")
                .and_then(|m| c.array(m, &msgs_path))
            else {
                return;
            };
            for (i, m) in msgs.iter().enumerate() {
                let mp = index_path(&msgs_path, i);
                let Some(mo) = c.object(m, &mp) else {
                    continue;
                };
                if let Some(r) = c.required(mo, &mp, "role") {
                    c.one_of(r, &key_path(&mp, "role"), ROLES);
                }
                // The docs' own examples use plain-string message content.
                if let Some(content) = present(mo, "content") {
                    if !content.is_string() {
                        check_parts(c, content, &key_path(&mp, "content"));
                    }
                }
            }
        }
        Some("completion") => {
            if let Some(content) = present(t, "content") {
                check_parts(c, content, &key_path(path, "content"));
            }
        }
        _ => {}
    }
}

/// Content parts: an array of objects with a string `type`.
fn check_parts(c: &mut Checker, v: &Value, path: &str) {
    let Some(parts) = c.array(v, path) else {
        return;
    };
    for (i, p) in parts.iter().enumerate() {
        let pp = index_path(path, i);
        if let Some(po) = c.object(p, &pp) {
            if let Some(t) = c.required(po, &pp, "type") {
                c.string(t, &key_path(&pp, "type"));
            }
        }
    }
}

/// `metadata`: an object of strings whose keys are at most 1024 characters.
fn check_metadata(c: &mut Checker, v: &Value, path: &str) {
    let Some(m) = c.object(v, path) else {
        return;
    };
    for (k, val) in m {
        let kp = key_path(path, k);
        let n = k.chars().count();
        if n > MAX_METADATA_KEY_CHARS {
            c.error(
                &kp,
                format!("key must be at most {MAX_METADATA_KEY_CHARS} characters long, got {n}"),
            );
        }
        c.string(val, &kp);
    }
}

/// Whether a template passes validation (so it may be re-sent verbatim).
fn template_ok(v: &Value) -> bool {
    let mut c = Checker::new();
    check_template(&mut c, v, "t");
    c.finish().is_ok()
}

/// The canonical event of a (validated) `/log-request` body. Never panics; on invalid input,
/// fields that don't parse are left unset.
///
/// Provider-shaped raw bodies are built from the templates (OpenAI chat/completions, or Anthropic
/// messages when the provider is `anthropic`); an `ERROR` gets a provider error body.
pub fn to_canonical(body: &Value) -> LlmEvent {
    let empty = Map::new();
    let root = body.as_object().unwrap_or(&empty);
    let mut ev = LlmEvent::default();
    let mut px = PromptLayerExtra::default();
    let mut usage = Usage::default();
    for (k, v) in root {
        let s = v.as_str();
        let absorbed = match k.as_str() {
            "provider" => s.is_some_and(|p| {
                ev.provider = provider_id(p);
                if provider_name(&ev.provider) != p {
                    px.provider = Some(p.to_string());
                }
                true
            }),
            "model" => set(&mut ev.model, s.map(str::to_string)),
            "input" => set(&mut px.input, Some(v.clone()).filter(template_ok)),
            "output" => set(&mut px.output, Some(v.clone()).filter(template_ok)),
            "request_start_time" => Timestamp::from_promptlayer_json(v)
                .map(|t| ev.request.start_time = t)
                .is_some(),
            "request_end_time" => Timestamp::from_promptlayer_json(v)
                .map(|t| ev.response.end_time = t)
                .is_some(),
            "parameters" => set(&mut ev.parameters, v.as_object().cloned()),
            "tags" => {
                let tags = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|t| t.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                });
                set(&mut ev.tags, tags)
            }
            "metadata" => set(&mut ev.metadata, v.as_object().cloned()),
            "prompt_name" => set(&mut ev.prompt.name, s.map(str::to_string)),
            "prompt_id" => {
                let id = check::as_integer(v).and_then(|i| i64::try_from(i).ok());
                set(&mut ev.prompt.id, id.map(PromptId::Number))
            }
            "prompt_version_number" => {
                let n = check::as_u64(v).filter(|n| (1..=I64_MAX as u64).contains(n));
                set(&mut ev.prompt.version_number, n)
            }
            "prompt_input_variables" => set(&mut ev.prompt.input_variables, v.as_object().cloned()),
            "input_tokens" => set(&mut usage.input_tokens, check::as_u64(v)),
            "output_tokens" => set(&mut usage.output_tokens, check::as_u64(v)),
            "price" => {
                let ok = v.as_f64().is_some_and(|p| p >= 0.0 && p.is_finite());
                let n = v.as_number().filter(|_| ok).cloned();
                set(&mut ev.price, n)
            }
            "function_name" => set(&mut ev.function_name, s.map(str::to_string)),
            "score" => {
                let score = check::as_integer(v)
                    .filter(|n| (0..=100).contains(n))
                    .and_then(|n| u8::try_from(n).ok());
                set(&mut ev.score, score)
            }
            "score_name" => set(&mut ev.score_name, s.map(str::to_string)),
            "api_type" => set(&mut ev.api_type, s.map(str::to_string)),
            "status" => set(&mut ev.status, s.and_then(Status::from_promptlayer)),
            "error_type" => set(&mut ev.error_type, s.and_then(ErrorType::parse)),
            "error_message" => set(&mut ev.error_message, s.map(str::to_string)),
            _ => false,
        };
        convert::keep(&mut px.fields, k, v, absorbed, TOP_REQUIRED, TOP_OPTIONAL);
    }
    if ev.provider.is_empty() {
        ev.provider = "unknown".into();
    }
    if usage.input_tokens.is_some() || usage.output_tokens.is_some() {
        ev.usage = Some(usage);
    }
    ev.environment = ev
        .metadata
        .as_ref()
        .and_then(|m| m.get("environment"))
        .and_then(Value::as_str)
        .map(str::to_string);
    build_bodies(&mut ev, &px);
    ev.extra.promptlayer = Some(px);
    ev
}

/// Stores `value` in `slot` if there is one; tells whether it did.
fn set<T>(slot: &mut Option<T>, value: Option<T>) -> bool {
    match value {
        Some(v) => {
            *slot = Some(v);
            true
        }
        None => false,
    }
}

/// Builds provider-shaped request/response bodies from the templates.
fn build_bodies(ev: &mut LlmEvent, px: &PromptLayerExtra) {
    let empty = || convert::chat_template(Vec::new(), Map::new());
    let input = px.input.clone().unwrap_or_else(empty);
    let output = px.output.clone().unwrap_or_else(empty);
    let anthropic_api = ev.provider == "anthropic";
    let model = ev.model.as_deref();
    let params = ev.parameters.as_ref();
    ev.request.body = Some(if anthropic_api {
        anthropic::request_from_template(&input, params, model)
    } else {
        openai::request_from_template(&input, params, model)
    });
    ev.response.body = Some(if ev.is_error() {
        let message = ev.error_message.as_deref().unwrap_or("request failed");
        if anthropic_api {
            anthropic::error_body(message, ev.error_type)
        } else {
            openai::error_body(message, ev.error_type)
        }
    } else {
        let ctx = ResponseCtx {
            model,
            usage: ev.usage.as_ref(),
            finish: None,
            created: Some(ev.response.end_time.at().timestamp()),
        };
        if anthropic_api {
            anthropic::response_from_template(&output, &ctx)
        } else {
            openai::response_from_template(&output, &ctx)
        }
    });
}

/// PromptLayer's name for a canonical provider id (`azure` is `openai.azure` there).
fn provider_name(id: &str) -> &str {
    match id {
        "azure" => "openai.azure",
        other => other,
    }
}

/// Renders `ev` as a `/log-request` body; the result always passes [`validate`].
///
/// Times are RFC 3339 strings with an offset (the source's text when it sent one): the spec's
/// `string<date-time>`, unambiguous whatever the server's time zone.
pub fn from_canonical(ev: &LlmEvent) -> Value {
    let px = ev.extra.promptlayer.as_ref();
    let mut out = Map::new();
    let provider = px
        .and_then(|p| p.provider.as_deref())
        .filter(|raw| provider_id(raw) == ev.provider)
        .unwrap_or_else(|| provider_name(&ev.provider));
    out.insert("provider".into(), json!(provider));
    let model = ev
        .model
        .clone()
        .or_else(|| {
            ev.request
                .body
                .as_ref()
                .and_then(|b| b.get("model"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string());
    out.insert("model".into(), json!(model));
    let input = px
        .and_then(|p| p.input.clone())
        .filter(template_ok)
        .unwrap_or_else(|| input_template(ev));
    out.insert("input".into(), input);
    let output = px
        .and_then(|p| p.output.clone())
        .filter(template_ok)
        .unwrap_or_else(|| output_template(ev));
    out.insert("output".into(), output);
    out.insert(
        "request_start_time".into(),
        json!(ev.request.start_time.to_rfc3339()),
    );
    out.insert(
        "request_end_time".into(),
        json!(ev.response.end_time.to_rfc3339()),
    );
    if let Some(p) = &ev.parameters {
        out.insert("parameters".into(), Value::Object(p.clone()));
    }
    if let Some(tags) = &ev.tags {
        let tags: Vec<String> = tags
            .iter()
            .map(|t| truncate_chars(t, MAX_TAG_CHARS))
            .collect();
        out.insert("tags".into(), json!(tags));
    }
    if let Some(m) = metadata(ev) {
        out.insert("metadata".into(), Value::Object(m));
    }
    if let Some(n) = &ev.prompt.name {
        out.insert("prompt_name".into(), json!(n));
    }
    if let Some(PromptId::Number(id)) = ev.prompt.id {
        out.insert("prompt_id".into(), json!(id));
    }
    if let Some(v) = ev
        .prompt
        .version_number
        .filter(|v| (1..=I64_MAX as u64).contains(v))
    {
        out.insert("prompt_version_number".into(), json!(v));
    }
    if let Some(vars) = &ev.prompt.input_variables {
        out.insert("prompt_input_variables".into(), Value::Object(vars.clone()));
    }
    if let Some(u) = &ev.usage {
        if let Some(n) = u.input_tokens {
            out.insert("input_tokens".into(), json!(n));
        }
        if let Some(n) = u.output_tokens {
            out.insert("output_tokens".into(), json!(n));
        }
    }
    let price = ev
        .price
        .as_ref()
        .filter(|p| p.as_f64().is_some_and(|f| f >= 0.0 && f.is_finite()));
    if let Some(p) = price {
        out.insert("price".into(), Value::Number(p.clone()));
    }
    if let Some(f) = &ev.function_name {
        out.insert("function_name".into(), json!(f));
    }
    if let Some(s) = ev.score {
        out.insert("score".into(), json!(s.min(100)));
    }
    if let Some(s) = &ev.score_name {
        out.insert("score_name".into(), json!(s));
    }
    if let Some(a) = &ev.api_type {
        out.insert("api_type".into(), json!(a));
    }
    if let Some(s) = ev.status {
        out.insert("status".into(), json!(s.as_promptlayer()));
    }
    let effective = ev.status.unwrap_or(Status::Success);
    if let Some(t) = ev
        .error_type
        .filter(|t| t.allowed_statuses().contains(&effective))
    {
        out.insert("error_type".into(), json!(t.as_str()));
    }
    if let Some(m) = &ev.error_message {
        out.insert(
            "error_message".into(),
            json!(truncate_chars(m, MAX_ERROR_MESSAGE_CHARS)),
        );
    }
    convert::fill_extras(
        &mut out,
        px.map(|p| &p.fields),
        TOP_REQUIRED,
        TOP_OPTIONAL,
        TOP_NULLABLE,
    );
    Value::Object(out)
}

/// `metadata`: the event's annotations as strings (keys over 1024 characters dropped), plus
/// `environment` and a non-integer prompt id when the annotations lack them.
fn metadata(ev: &LlmEvent) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    for (k, v) in ev.metadata.iter().flatten() {
        if k.chars().count() <= MAX_METADATA_KEY_CHARS {
            m.insert(k.clone(), Value::String(stringify(v)));
        }
    }
    if let Some(env) = &ev.environment {
        m.entry("environment").or_insert_with(|| json!(env));
    }
    if let Some(PromptId::Text(id)) = &ev.prompt.id {
        m.entry("llmlogd_prompt_id").or_insert_with(|| json!(id));
    }
    (ev.metadata.is_some() || !m.is_empty()).then_some(m)
}

/// The `input` template for an event without one.
fn input_template(ev: &LlmEvent) -> Value {
    match ev.request.body.as_ref().and_then(Value::as_object) {
        Some(b) => match request_dialect(&ev.provider, b) {
            Dialect::OpenAi => openai::request_to_template(b),
            Dialect::Anthropic => anthropic::request_to_template(b),
        },
        None => convert::chat_template(Vec::new(), Map::new()),
    }
}

/// The `output` template for an event without one; failed calls have no output.
fn output_template(ev: &LlmEvent) -> Value {
    match ev.response.body.as_ref().and_then(Value::as_object) {
        Some(b) if !ev.is_error() => match response_dialect(&ev.provider, b) {
            Dialect::OpenAi => openai::response_to_template(b).0,
            Dialect::Anthropic => anthropic::response_to_template(b).0,
        },
        _ => convert::chat_template(Vec::new(), Map::new()),
    }
}

/// Routing attributes of a `/log-request` body.
pub fn attributes(body: &Value) -> Attributes {
    let str_of = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    Attributes {
        provider: str_of("provider").map(|p| provider_id(&p)),
        model: str_of("model"),
        environment: body
            .get("metadata")
            .and_then(|m| m.get("environment"))
            .and_then(Value::as_str)
            .map(str::to_string),
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
        canonical: true,
    }
}

/// The 201 body for `/log-request`: our local id and a `prompt_version` shaped per the spec from
/// the input (template, model, parameters).
pub fn log_reply(local_id: u64, body: &Value) -> String {
    let input = body.get("input").filter(|v| v.is_object());
    reply_with_template(local_id, body, input)
}

/// [`log_reply`] with the template given apart (the fast path has it as raw JSON, and `body`
/// without it).
fn reply_with_template<T: Serialize>(local_id: u64, body: &Value, template: Option<T>) -> String {
    use std::borrow::Cow;
    // Serialised straight from the request's `Value` (the template is most of the body), not
    // cloned into a new one first; members in the order the service gives them.
    #[derive(Serialize)]
    struct Reply<'a, T> {
        id: u64,
        prompt_version: PromptVersion<'a, T>,
        status: Cow<'a, Value>,
        error_type: &'a Value,
        error_message: &'a Value,
    }
    #[derive(Serialize)]
    struct PromptVersion<'a, T> {
        prompt_template: Template<T>,
        commit_message: Option<()>,
        metadata: VersionMeta<'a>,
    }
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Template<T> {
        Given(T),
        Empty(Value),
    }
    #[derive(Serialize)]
    struct VersionMeta<'a> {
        model: Model<'a>,
    }
    #[derive(Serialize)]
    struct Model<'a> {
        provider: &'a Value,
        name: &'a Value,
        parameters: Cow<'a, Value>,
    }
    static NULL: Value = Value::Null;
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    let object = |k: &str| get(k).filter(|v| v.is_object()).map(Cow::Borrowed);
    let reply = Reply {
        id: local_id,
        prompt_version: PromptVersion {
            prompt_template: template.map_or_else(
                || Template::Empty(convert::chat_template(Vec::new(), Map::new())),
                Template::Given,
            ),
            commit_message: None,
            metadata: VersionMeta {
                model: Model {
                    provider: get("provider").unwrap_or(&NULL),
                    name: get("model").unwrap_or(&NULL),
                    parameters: object("parameters").unwrap_or_else(|| Cow::Owned(json!({}))),
                },
            },
        },
        status: get("status").map_or_else(|| Cow::Owned(json!("SUCCESS")), Cow::Borrowed),
        error_type: get("error_type").unwrap_or(&NULL),
        error_message: get("error_message").unwrap_or(&NULL),
    };
    // Plain data with string keys: serialising cannot fail.
    serde_json::to_string(&reply).unwrap_or_default()
}

/// Ingest's fast path for `/log-request`, like [`super::pezzo::accept_bytes`]: the templates
/// (`input`, `output`: most of the bytes) are checked straight from the bytes and echoed as the
/// body has them; every other member is parsed into a small `Value` that the real [`validate`]
/// and [`attributes`] run on, with a template that passes standing in for each of the two.
///
/// `None` means "let the `Value` path decide": a template this path does not accept for
/// certain, a member name with an escape, or a body [`super::native::plain_json`] leaves to the
/// `Value` path. So a log is accepted here only if `validate` would accept it, with the same
/// attributes and the same reply.
pub fn accept_bytes(raw: &[u8]) -> Option<FastAccepted> {
    use serde_json::value::RawValue;
    use std::collections::HashMap;
    if raw.first() != Some(&b'{') || !super::native::plain_json(raw) {
        return None;
    }
    // Member names with escapes fail to borrow as `&str`: those bodies take the `Value` path.
    let members: HashMap<&str, &RawValue> = serde_json::from_slice(raw).ok()?;
    let (input, output) = (members.get("input")?, members.get("output")?);
    if !fast_template_ok(input) || !fast_template_ok(output) {
        return None;
    }
    let mut rest = Map::with_capacity(members.len());
    for (k, v) in &members {
        let v = match *k {
            "input" | "output" => json!({"type": "completion"}),
            _ => serde_json::from_str(v.get()).ok()?,
        };
        rest.insert((*k).to_string(), v);
    }
    let rest = Value::Object(rest);
    validate(&rest).ok()?;
    let attrs = attributes(&rest);
    let template: Box<RawValue> = (*input).to_owned();
    Some(FastAccepted {
        attrs,
        reply: Box::new(move |seq| reply_with_template(seq, &rest, Some(&template))),
    })
}

/// Whether `check_template` accepts a template, decided from its JSON text; `false` also for
/// what it might accept but this does not check (a member name with an escape).
fn fast_template_ok(raw: &serde_json::value::RawValue) -> bool {
    use serde_json::value::RawValue;
    use std::collections::HashMap;
    type Object<'a> = HashMap<&'a str, &'a RawValue>;
    fn present<'a>(o: &Object<'a>, k: &str) -> Option<&'a RawValue> {
        o.get(k).copied().filter(|v| v.get() != "null")
    }
    // An array of objects each with a string `type` (`check_parts`).
    let parts_ok = |v: &RawValue| {
        serde_json::from_str::<Vec<Object<'_>>>(v.get()).is_ok_and(|parts| {
            parts.iter().all(|p| {
                present(p, "type").is_some_and(|t| serde_json::from_str::<&str>(t.get()).is_ok())
            })
        })
    };
    // Maps deserialise from JSON objects only, so "must be an object" holds wherever one is.
    let Ok(t) = serde_json::from_str::<Object<'_>>(raw.get()) else {
        return false;
    };
    let kind = present(&t, "type").and_then(|k| serde_json::from_str::<&str>(k.get()).ok());
    match kind {
        Some("chat") => {
            let Some(messages) = present(&t, "messages") else {
                return false;
            };
            let Ok(messages) = serde_json::from_str::<Vec<Object<'_>>>(messages.get()) else {
                return false;
            };
            messages.iter().all(|m| {
                let role =
                    present(m, "role").and_then(|r| serde_json::from_str::<&str>(r.get()).ok());
                role.is_some_and(|r| ROLES.contains(&r))
                    && present(m, "content").is_none_or(|c| c.get().starts_with('"') || parts_ok(c))
            })
        }
        Some("completion") => present(&t, "content").is_none_or(parts_ok),
        _ => false,
    }
}

/// Checks a follow-up body: `api_key` (string) and `request_id` (integer >= 0) always, then the
/// kind's own fields. Unknown fields are accepted.
pub fn validate_track(kind: TrackKind, body: &Value) -> Result<(), Vec<FieldError>> {
    let mut c = Checker::new();
    let Some(root) = c.object(body, ROOT) else {
        return c.finish();
    };
    if let Some(v) = c.required(root, ROOT, "api_key") {
        c.string(v, "api_key");
    }
    if let Some(v) = c.required(root, ROOT, "request_id") {
        c.integer_in(v, "request_id", 0, U64_MAX);
    }
    match kind {
        TrackKind::Score => {
            if let Some(v) = c.required(root, ROOT, "score") {
                c.integer_in(v, "score", 0, 100);
            }
            if let Some(v) = present(root, "name") {
                c.string(v, "name");
            }
        }
        TrackKind::Metadata => {
            if let Some(v) = c.required(root, ROOT, "metadata") {
                check_metadata(&mut c, v, "metadata");
            }
        }
        TrackKind::Prompt => {
            if let Some(v) = c.required(root, ROOT, "prompt_name") {
                c.string(v, "prompt_name");
            }
            if let Some(v) = c.required(root, ROOT, "prompt_input_variables") {
                c.object(v, "prompt_input_variables");
            }
            if let Some(v) = present(root, "version") {
                c.integer_in(v, "version", 1, I64_MAX);
            }
            if let Some(v) = present(root, "label") {
                c.string(v, "label");
            }
        }
        TrackKind::Group => {
            if let Some(v) = c.required(root, ROOT, "group_id") {
                c.integer_in(v, "group_id", 0, U64_MAX);
            }
        }
    }
    c.finish()
}

/// The `request_id` of a follow-up (PromptLayer's id, or llmlogd's local one before delivery).
pub fn track_request_id(body: &Value) -> Option<u64> {
    body.get("request_id").and_then(check::as_u64)
}

/// A `/track-group` follow-up's `group_id` (integral floats too, as `validate_track` takes them).
pub fn track_group_id(body: &Value) -> Option<u64> {
    body.get("group_id").and_then(check::as_u64)
}

/// Replaces a follow-up's `request_id` (local id -> the id PromptLayer assigned on delivery).
/// No-op on a non-object.
pub fn set_track_request_id(body: &mut Value, remote_id: u64) {
    if let Some(o) = body.as_object_mut() {
        o.insert("request_id".into(), json!(remote_id));
    }
}

/// Replaces a follow-up's `api_key` (the sink's key). No-op on a non-object.
pub fn set_track_api_key(body: &mut Value, key: &str) {
    if let Some(o) = body.as_object_mut() {
        o.insert("api_key".into(), json!(key));
    }
}

/// The 200 body PromptLayer answers follow-ups with; the SDKs only check the status.
pub fn track_reply() -> Value {
    json!({"success": true})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pezzo;
    use crate::formats::testdata::*;

    fn errors(body: &Value) -> Vec<(String, String)> {
        validate(body)
            .expect_err("invalid")
            .into_iter()
            .map(|e| (e.field, e.problem))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn accepts_sdk_and_documented_bodies() {
        for (name, body) in pl_all() {
            assert_eq!(validate(&body), Ok(()), "{name}");
        }
    }

    #[test]
    fn accepts_null_for_every_optional_field() {
        let mut body = pl_docs_tools();
        for key in TOP_OPTIONAL {
            body[*key] = Value::Null;
        }
        assert_eq!(validate(&body), Ok(()));
        let ev = to_canonical(&body);
        assert_eq!(ev.tags, None);
        assert_eq!(ev.metadata, None);
        assert_eq!(ev.score, None);
        let back = from_canonical(&ev);
        assert_eq!(back, promptlayer_without_spec_nulls(&body));
        // The nullable ones are sent back as the SDK sent them; the others are left out.
        assert_eq!(back["error_type"], Value::Null);
        assert!(back.get("prompt_name").is_some());
        assert!(back.get("tags").is_none() && back.get("status").is_none());
    }

    /// `Date.now()` from the JS SDK: milliseconds, read as the service reads them (pydantic:
    /// a number above 2e10 is milliseconds); it used to be refused.
    #[test]
    fn accepts_millisecond_times_and_delivers_the_same_instant() {
        let mut body = pl_docs_tools();
        body["request_start_time"] = json!(1_732_240_000_123_u64);
        body["request_end_time"] = json!(1_732_240_001_300.5);
        assert_eq!(validate(&body), Ok(()));
        let out = from_canonical(&to_canonical(&body));
        assert_eq!(out["request_start_time"], "2024-11-22T01:46:40.123Z");
        assert_eq!(out["request_end_time"], "2024-11-22T01:46:41.300500Z");
        // Seconds stay seconds up to 2e10 (the year 2603); below zero and past 9999 is refused.
        body["request_start_time"] = json!(1_732_240_000.5);
        assert_eq!(
            from_canonical(&to_canonical(&body))["request_start_time"],
            "2024-11-22T01:46:40.500Z"
        );
        for bad in [json!(-1), json!(-1_732_240_000_123_i64), json!(2.6e14)] {
            body["request_start_time"] = bad.clone();
            let errs = validate(&body).expect_err("refused");
            assert_eq!(errs[0].field, "request_start_time", "{bad}: {errs:?}");
        }
    }

    #[test]
    fn accepts_integer_seconds_and_iso_times() {
        let mut body = pl_docs_tools();
        body["request_start_time"] = json!(1_700_000_000);
        body["request_end_time"] = json!("2023-11-14T22:13:21.5-05:00");
        assert_eq!(validate(&body), Ok(()));
    }

    #[test]
    fn rejects_every_bad_field_at_once() {
        let body = json!({
            "provider": 1,
            "input": {"type": "chat"},
            "output": {"type": "prose", "messages": []},
            "request_start_time": "2024-01-01 noon",
            "request_end_time": -5,
            "parameters": "hot",
            "tags": ["ok", 5, "x".repeat(513)],
            "metadata": {"k": 1, "long".repeat(300): "v"},
            "prompt_id": "abc",
            "prompt_version_number": 0,
            "prompt_input_variables": [],
            "input_tokens": -1,
            "output_tokens": 1.5,
            "price": -0.01,
            "function_name": false,
            "score": 101,
            "api_type": 3,
            "status": "FAILED",
            "error_type": "DISK_FULL",
            "error_message": "e".repeat(1025)
        });
        let long_key = format!(
            "metadata.{}...",
            "long".repeat(16).chars().take(61).collect::<String>()
        );
        assert_eq!(
            errors(&body),
            pairs(&[
                ("provider", "must be a string, got a number"),
                ("model", "is required"),
                ("input.messages", "is required"),
                ("output.type", "must be one of completion, chat, got \"prose\""),
                ("request_start_time", "must be an RFC 3339 date-time with offset (e.g. 2024-01-01T00:00:00.000Z), got \"2024-01-01 noon\""),
                ("request_end_time", "must be Unix seconds (0..=253402300799) or milliseconds (above 2e10, up to the year 9999), got -5"),
                ("parameters", "must be an object, got a string"),
                ("tags[1]", "must be a string, got a number"),
                ("tags[2]", "must be at most 512 characters long, got 513"),
                ("metadata.k", "must be a string, got a number"),
                (long_key.as_str(), "key must be at most 1024 characters long, got 1200"),
                ("function_name", "must be a string, got a boolean"),
                ("api_type", "must be a string, got a number"),
                ("prompt_id", "must be an integer, got a string"),
                ("prompt_version_number", "must be >= 1, got 0"),
                ("prompt_input_variables", "must be an object, got an array"),
                ("input_tokens", "must be >= 0, got -1"),
                ("output_tokens", "must be an integer, got 1.5"),
                ("price", "must be >= 0, got -0.01"),
                ("score", "must be within 0..=100, got 101"),
                ("status", "must be one of SUCCESS, WARNING, ERROR, got \"FAILED\""),
                ("error_type", "must be one of PROVIDER_TIMEOUT, PROVIDER_QUOTA_LIMIT, PROVIDER_RATE_LIMIT, PROVIDER_AUTH_ERROR, PROVIDER_ERROR, TEMPLATE_RENDER_ERROR, VARIABLE_MISSING_OR_EMPTY, UNKNOWN_ERROR, got \"DISK_FULL\""),
                ("error_message", "must be at most 1024 characters long, got 1025"),
            ])
        );
    }

    #[test]
    fn error_type_must_suit_status() {
        let mut body = pl_docs_error();
        body["status"] = json!("WARNING");
        assert_eq!(
            errors(&body),
            pairs(&[(
                "error_type",
                "PROVIDER_TIMEOUT is only allowed with status ERROR, got WARNING"
            )])
        );
        body.as_object_mut().expect("obj").remove("status");
        body["error_type"] = json!("PROVIDER_RATE_LIMIT");
        assert_eq!(
            errors(&body),
            pairs(&[("error_type", "PROVIDER_RATE_LIMIT is only allowed with status WARNING or ERROR, got SUCCESS (the default)")])
        );
        body["status"] = json!("WARNING");
        body["error_type"] = json!("VARIABLE_MISSING_OR_EMPTY");
        assert_eq!(validate(&body), Ok(()));
        body["status"] = json!("ERROR");
        assert_eq!(
            errors(&body),
            pairs(&[(
                "error_type",
                "VARIABLE_MISSING_OR_EMPTY is only allowed with status WARNING, got ERROR"
            )])
        );
    }

    #[test]
    fn rejects_bad_template_messages() {
        let mut body = pl_docs_tools();
        body["input"]["messages"] = json!([
            "hi",
            {"content": "no role"},
            {"role": "robot", "content": [{"text": "no type"}, 3]}
        ]);
        assert_eq!(
            errors(&body),
            pairs(&[
                ("input.messages[0]", "must be an object, got a string"),
                ("input.messages[1].role", "is required"),
                ("input.messages[2].role", "must be one of system, user, assistant, function, tool, placeholder, developer, got \"robot\""),
                ("input.messages[2].content[0].type", "is required"),
                ("input.messages[2].content[1]", "must be an object, got a number"),
            ])
        );
    }

    /// The Python SDK's body with its float times replaced by what we render.
    fn py_openai_normalised() -> Value {
        let mut b = pl_py_openai();
        b["request_start_time"] = json!("2023-11-14T22:13:20.123Z");
        b["request_end_time"] = json!("2023-11-14T22:13:21.456Z");
        b
    }

    #[test]
    fn round_trips_modulo_time_format() {
        assert_eq!(
            from_canonical(&to_canonical(&pl_py_openai())),
            py_openai_normalised()
        );
        let mut js = pl_js_anthropic();
        js["request_start_time"] = json!("2023-11-14T22:13:20.500Z");
        js["request_end_time"] = json!("2023-11-14T22:13:22Z");
        assert_eq!(from_canonical(&to_canonical(&pl_js_anthropic())), js);
        // Bodies with string times come back exactly, through the native form too.
        for body in [
            pl_docs_tools(),
            pl_docs_error(),
            pl_docs_warning(),
            pl_docs_completion(),
            py_openai_normalised(),
        ] {
            let ev = to_canonical(&body);
            assert_eq!(from_canonical(&ev), body);
            let native: LlmEvent =
                serde_json::from_value(serde_json::to_value(&ev).expect("ser")).expect("de");
            assert_eq!(from_canonical(&native), body);
        }
    }

    #[test]
    fn round_trip_keeps_unknown_fields_and_provider_spelling() {
        let mut body = pl_docs_tools();
        body["provider"] = json!("OpenAI");
        body["workspace_id"] = json!(12);
        body["trace"] = json!({"span": null});
        let ev = to_canonical(&body);
        assert_eq!(ev.provider, "openai");
        assert_eq!(from_canonical(&ev), body);
        body["provider"] = json!("openai.azure");
        let ev = to_canonical(&body);
        assert_eq!(ev.provider, "azure");
        assert_eq!(
            ev.extra
                .promptlayer
                .as_ref()
                .and_then(|p| p.provider.clone()),
            None
        );
        assert_eq!(from_canonical(&ev), body);
    }

    #[test]
    fn integral_floats_normalise_to_integers() {
        let mut body = pl_docs_tools();
        body["score"] = json!(3.0);
        body["input_tokens"] = json!(10.0);
        assert_eq!(validate(&body), Ok(()));
        let out = from_canonical(&to_canonical(&body));
        assert_eq!(out["score"], json!(3));
        assert_eq!(out["input_tokens"], json!(10));
    }

    #[test]
    fn canonical_fields_from_the_python_sdk() {
        let ev = to_canonical(&pl_py_openai());
        assert_eq!(ev.provider, "openai");
        assert_eq!(ev.model.as_deref(), Some("gpt-4o"));
        assert_eq!(
            ev.request.start_time.to_rfc3339(),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            ev.usage,
            Some(Usage {
                input_tokens: Some(20),
                output_tokens: Some(1)
            })
        );
        assert_eq!(
            ev.price,
            Some(serde_json::Number::from_f64(0.0).expect("finite"))
        );
        assert_eq!(ev.score, Some(0));
        assert_eq!(ev.status, Some(Status::Success));
        assert_eq!(ev.prompt.name, None);
        assert_eq!(ev.tags, Some(vec!["prod".to_string(), "math".to_string()]));
        assert_eq!(
            ev.request.body,
            Some(json!({
                "model": "gpt-4o",
                "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
                "temperature": 0.7, "max_tokens": 256
            }))
        );
        assert_eq!(
            ev.response.body,
            Some(json!({
                "object": "chat.completion", "created": 1_700_000_001, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}
            }))
        );
        let nulls = ev.extra.promptlayer.expect("extra").fields;
        let keys: Vec<&str> = nulls.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "prompt_name",
                "prompt_version_number",
                "prompt_id",
                "score_name",
                "api_type",
                "error_type",
                "error_message"
            ]
        );
    }

    #[test]
    fn anthropic_log_builds_anthropic_bodies() {
        let ev = to_canonical(&pl_js_anthropic());
        assert_eq!(ev.environment.as_deref(), Some("staging"));
        assert_eq!(ev.prompt.id, Some(PromptId::Number(77)));
        assert_eq!(
            ev.request.body,
            Some(json!({
                "model": "claude-3-5-sonnet-20241022",
                "system": "Answer in French.",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1024, "temperature": 0.3
            }))
        );
        assert_eq!(
            ev.response.body,
            Some(json!({
                "type": "message", "role": "assistant", "model": "claude-3-5-sonnet-20241022",
                "content": [{"type": "text", "text": "Bonjour !"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 18, "output_tokens": 5}
            }))
        );
    }

    #[test]
    fn openai_log_to_pezzo() {
        let out = pezzo::from_canonical(&to_canonical(&pl_py_openai()));
        assert_eq!(
            out,
            json!({
                "metadata": {"environment": "Production", "provider": "OpenAI", "client": "llmlogd",
                             "clientVersion": env!("CARGO_PKG_VERSION"), "type": "ChatCompletion"},
                "properties": {"user_id": "42", "session": "abc", "llmlogd_tags": ["prod", "math"],
                               "llmlogd_score": 0, "llmlogd_price": 0.0},
                "request": {"timestamp": "2023-11-14T22:13:20.123Z", "body": {
                    "model": "gpt-4o",
                    "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
                    "temperature": 0.7, "max_tokens": 256
                }},
                "response": {"timestamp": "2023-11-14T22:13:21.456Z", "body": {
                    "object": "chat.completion", "created": 1_700_000_001, "model": "gpt-4o",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}
                }, "status": 200}
            })
        );
        assert_eq!(pezzo::validate(&out), Ok(()));
    }

    #[test]
    fn anthropic_log_to_pezzo_avoids_the_500s() {
        let out = pezzo::from_canonical(&to_canonical(&pl_js_anthropic()));
        assert_eq!(pezzo::validate(&out), Ok(()));
        assert_eq!(out["metadata"]["provider"], json!("OpenAI"));
        assert_eq!(out["metadata"]["environment"], json!("staging"));
        assert_eq!(
            out["properties"],
            json!({
                "environment": "staging",
                "llmlogd_usage": {"prompt_tokens": 18, "completion_tokens": 5, "total_tokens": 23},
                "llmlogd_provider": "anthropic",
                "llmlogd_model": "claude-3-5-sonnet-20241022",
                "llmlogd_tags": ["js"],
                "llmlogd_prompt_name": "greeter",
                "llmlogd_prompt_id": 77,
                "llmlogd_prompt_version": 3,
                "llmlogd_score": 90,
                "llmlogd_price": 0.00012
            })
        );
        assert_eq!(
            out["request"]["body"],
            json!({
                "model": "claude-3-5-sonnet-20241022",
                "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
                "max_tokens": 1024, "temperature": 0.3
            })
        );
        assert_eq!(
            out["response"]["body"],
            json!({
                "object": "chat.completion", "created": 1_700_000_002, "model": "claude-3-5-sonnet-20241022",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour !"}, "finish_reason": "stop"}]
            })
        );
    }

    #[test]
    fn error_log_to_pezzo_and_back() {
        let out = pezzo::from_canonical(&to_canonical(&pl_docs_error()));
        assert_eq!(out["response"]["status"], json!(408));
        assert_eq!(out["response"]["timestamp"], json!("2024-01-15T10:30:30Z"));
        let back = from_canonical(&pezzo::to_canonical(&out));
        assert_eq!(
            back,
            json!({
                "provider": "openai", "model": "gpt-4",
                "input": {"type": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]},
                "output": {"type": "chat", "messages": []},
                "request_start_time": "2024-01-15T10:30:00Z", "request_end_time": "2024-01-15T10:30:30Z",
                "parameters": {},
                "metadata": {"environment": "Production"},
                "api_type": "chat-completions",
                "status": "ERROR", "error_type": "PROVIDER_TIMEOUT",
                "error_message": "Request timed out after 30 seconds"
            })
        );
    }

    #[test]
    fn warning_log_to_pezzo_keeps_the_warning() {
        let out = pezzo::from_canonical(&to_canonical(&pl_docs_warning()));
        assert_eq!(pezzo::validate(&out), Ok(()));
        assert_eq!(out["response"]["status"], json!(200));
        assert_eq!(
            out["response"]["body"]["choices"][0]["message"],
            json!({"role": "assistant", "content": "Summary..."})
        );
        assert_eq!(
            out["properties"],
            json!({
                "llmlogd_provider": "anthropic",
                "llmlogd_model": "claude-3-sonnet",
                "llmlogd_status": "WARNING",
                "llmlogd_error_type": "PROVIDER_RATE_LIMIT",
                "llmlogd_error_message": "Succeeded after 2 retries due to rate limiting"
            })
        );
    }

    #[test]
    fn pezzo_success_to_promptlayer() {
        let out = from_canonical(&pezzo::to_canonical(&pezzo_ts_success()));
        assert_eq!(
            out,
            json!({
                "provider": "openai", "model": "gpt-3.5-turbo",
                "input": {"type": "chat", "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
                ]},
                "output": {"type": "chat", "messages": [{"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]},
                "request_start_time": "2024-05-01T10:00:00.000Z", "request_end_time": "2024-05-01T10:00:01.234Z",
                "parameters": {"temperature": 0.7},
                "metadata": {"userId": "u_123", "traceId": "t-9", "environment": "Production"},
                "input_tokens": 15, "output_tokens": 2,
                "api_type": "chat-completions",
                "status": "SUCCESS"
            })
        );
        assert_eq!(validate(&out), Ok(()));
    }

    /// A native event's score is a byte; PromptLayer takes 0..=100, so a larger one is sent
    /// as 100 and the log validates (it would be refused, and dead-lettered, otherwise).
    #[test]
    fn a_score_over_100_is_sent_as_100() {
        let mut ev = pezzo::to_canonical(&pezzo_ts_success());
        for (score, sent) in [(150u8, 100), (100, 100), (0, 0), (42, 42)] {
            ev.score = Some(score);
            let out = from_canonical(&ev);
            assert_eq!(out["score"], json!(sent), "{score}");
            assert_eq!(validate(&out), Ok(()), "{score}");
        }
    }

    #[test]
    fn pezzo_errors_to_promptlayer() {
        let out = from_canonical(&pezzo::to_canonical(&pezzo_ts_rate_limited()));
        assert_eq!(out["status"], json!("ERROR"));
        assert_eq!(out["error_type"], json!("PROVIDER_RATE_LIMIT"));
        assert_eq!(out["error_message"], json!("Rate limit reached for gpt-4o"));
        assert_eq!(out["output"], json!({"type": "chat", "messages": []}));
        assert_eq!(out["metadata"], json!({"environment": "Staging"}));
        let out = from_canonical(&pezzo::to_canonical(&pezzo_py_auth_error()));
        assert_eq!(out["error_type"], json!("PROVIDER_AUTH_ERROR"));
        let out = from_canonical(&pezzo::to_canonical(&pezzo_py_managed()));
        assert_eq!(
            out["metadata"]["llmlogd_prompt_id"],
            json!("clnv2ko5a0001mh08ykzzz6xo")
        );
        assert_eq!(out.get("prompt_id"), None);
    }

    #[test]
    fn metadata_values_are_stringified_and_long_messages_cut() {
        let mut ev = pezzo::to_canonical(&pezzo_ts_success());
        ev.metadata = json!({"n": 3, "b": true, "o": {"a": [1]}, "s": "x", "z": null})
            .as_object()
            .cloned();
        ev.error_message = Some("é".repeat(1500));
        ev.status = Some(Status::Error);
        ev.tags = Some(vec!["t".repeat(600)]);
        let out = from_canonical(&ev);
        assert_eq!(
            out["metadata"],
            json!({"n": "3", "b": "true", "o": "{\"a\":[1]}", "s": "x", "z": "null", "environment": "Production"})
        );
        assert_eq!(
            out["error_message"].as_str().map(|s| s.chars().count()),
            Some(1024)
        );
        assert_eq!(out["tags"][0].as_str().map(str::len), Some(512));
        assert_eq!(validate(&out), Ok(()));
    }

    #[test]
    fn log_reply_shape() {
        let reply = |id, body: &Value| -> Value {
            serde_json::from_str(&log_reply(id, body)).expect("JSON")
        };
        let want = json!({
            "id": 17,
            "prompt_version": {
                "prompt_template": pl_js_anthropic()["input"],
                "commit_message": null,
                "metadata": {"model": {"provider": "anthropic", "name": "claude-3-5-sonnet-20241022",
                                       "parameters": {"max_tokens": 1024, "temperature": 0.3}}}
            },
            "status": "SUCCESS", "error_type": null, "error_message": null
        });
        // Byte for byte what the json! it replaced printed (members in the service's order).
        assert_eq!(log_reply(17, &pl_js_anthropic()), want.to_string());
        assert_eq!(reply(17, &pl_js_anthropic()), want);
        let r = reply(1, &pl_docs_error());
        assert_eq!(r["status"], json!("ERROR"));
        assert_eq!(r["error_type"], json!("PROVIDER_TIMEOUT"));
        assert_eq!(
            r["prompt_version"]["metadata"]["model"]["parameters"],
            json!({})
        );
    }

    #[test]
    fn attributes_of_a_log() {
        assert_eq!(
            attributes(&pl_js_anthropic()),
            Attributes {
                provider: Some("anthropic".into()),
                model: Some("claude-3-5-sonnet-20241022".into()),
                environment: Some("staging".into()),
                tags: vec!["js".into()],
                canonical: true,
            }
        );
        let mut b = pl_docs_tools();
        b["provider"] = json!("openai.azure");
        assert_eq!(attributes(&b).provider.as_deref(), Some("azure"));
    }

    #[test]
    fn track_bodies_validate() {
        assert_eq!(validate_track(TrackKind::Score, &pl_track_score()), Ok(()));
        assert_eq!(
            validate_track(TrackKind::Metadata, &pl_track_metadata()),
            Ok(())
        );
        assert_eq!(
            validate_track(TrackKind::Prompt, &pl_track_prompt()),
            Ok(())
        );
        assert_eq!(validate_track(TrackKind::Group, &pl_track_group()), Ok(()));
        // The Python SDK's float-typed score helper may send 87.0.
        let mut s = pl_track_score();
        s["score"] = json!(87.0);
        assert_eq!(validate_track(TrackKind::Score, &s), Ok(()));
    }

    #[test]
    fn track_bodies_reject_bad_fields() {
        let check = |kind, body: Value| -> Vec<(String, String)> {
            validate_track(kind, &body)
                .expect_err("invalid")
                .into_iter()
                .map(|e| (e.field, e.problem))
                .collect()
        };
        assert_eq!(
            check(
                TrackKind::Score,
                json!({"request_id": "4242", "score": 101, "name": 3})
            ),
            pairs(&[
                ("api_key", "is required"),
                ("request_id", "must be an integer, got a string"),
                ("score", "must be within 0..=100, got 101"),
                ("name", "must be a string, got a number"),
            ])
        );
        assert_eq!(
            check(
                TrackKind::Metadata,
                json!({"api_key": "k", "request_id": 1, "metadata": {"a": 1}})
            ),
            pairs(&[("metadata.a", "must be a string, got a number")])
        );
        assert_eq!(
            check(
                TrackKind::Prompt,
                json!({"api_key": "k", "request_id": 1, "prompt_input_variables": "x", "version": 0, "label": 2})
            ),
            pairs(&[
                ("prompt_name", "is required"),
                ("prompt_input_variables", "must be an object, got a string"),
                ("version", "must be >= 1, got 0"),
                ("label", "must be a string, got a number"),
            ])
        );
        assert_eq!(
            check(
                TrackKind::Group,
                json!({"api_key": "k", "request_id": -1, "group_id": null})
            ),
            pairs(&[
                ("request_id", "must be >= 0, got -1"),
                ("group_id", "is required and must not be null"),
            ])
        );
        assert_eq!(check(TrackKind::Group, json!("x"))[0].0, "$");
    }

    #[test]
    fn track_ids_and_keys_are_swapped() {
        let mut body = pl_track_score();
        assert_eq!(track_request_id(&body), Some(4242));
        set_track_request_id(&mut body, 99_000_001);
        set_track_api_key(&mut body, "pl_remote");
        assert_eq!(
            body,
            json!({"request_id": 99_000_001, "score": 87, "api_key": "pl_remote", "name": "accuracy"})
        );
        let mut not_obj = json!([1]);
        set_track_request_id(&mut not_obj, 1);
        set_track_api_key(&mut not_obj, "k");
        assert_eq!(not_obj, json!([1]));
        assert_eq!(track_request_id(&json!({"request_id": -3})), None);
        assert_eq!(track_reply(), json!({"success": true}));
    }

    /// What the `Value` path makes of a body: `Some((attributes, reply))` when it accepts it.
    fn value_path(raw: &[u8]) -> Option<(Attributes, Value)> {
        let v: Value = serde_json::from_slice(raw).ok()?;
        validate(&v).ok()?;
        let reply = serde_json::from_str(&log_reply(41, &v)).expect("reply JSON");
        Some((attributes(&v), reply))
    }

    /// The fast path accepts only what the `Value` path accepts, with the same attributes and
    /// the same reply.
    fn agrees(raw: &[u8]) -> bool {
        let Some(fast) = accept_bytes(raw) else {
            return false;
        };
        let text = String::from_utf8_lossy(raw);
        let (attrs, want) = value_path(raw).unwrap_or_else(|| panic!("fast path accepted {text}"));
        assert_eq!(fast.attrs, attrs, "{text}");
        let reply = (fast.reply)(41);
        let got: Value = serde_json::from_str(&reply).expect("reply JSON");
        assert_eq!(got, want, "{text}");
        assert!(
            reply.starts_with(r#"{"id":41,"prompt_version":{"prompt_template":"#),
            "{reply}"
        );
        true
    }

    #[test]
    fn fast_path_takes_the_official_bodies_as_the_value_path_does() {
        for (name, body) in pl_all() {
            assert!(agrees(&serde_json::to_vec(&body).unwrap()), "{name}");
            assert!(
                agrees(&serde_json::to_vec_pretty(&body).unwrap()),
                "{name} pretty"
            );
        }
    }

    #[test]
    fn fast_path_echoes_the_template_byte_for_byte() {
        let raw = br#"{"provider":"openai","model":"gpt-4o","request_start_time":1.5,"request_end_time":"2024-05-01T10:00:01Z",
            "input":{"type":"chat","messages":[{"role":"user","content":"caf\u00e9", "n": 1.50}]},
            "output":{"type":"completion","content":[{"type":"text","text":"4"}]}}"#;
        assert!(agrees(raw));
        let reply = (accept_bytes(raw).expect("accepted").reply)(7);
        assert!(reply.starts_with(r#"{"id":7,"prompt_version":{"prompt_template":{"type":"chat","messages":[{"role":"user","content":"caf\u00e9", "n": 1.50}]},"#), "{reply}");
    }

    /// Every variation of the official bodies: wherever the `Value` path refuses, the fast path
    /// declines too (and the `Value` path names the problem); where it accepts, they agree.
    #[test]
    fn fast_path_never_accepts_what_validate_refuses() {
        let long = "x".repeat(MAX_TAG_CHARS + 1);
        let edits: Vec<(&str, Value)> = vec![
            ("/provider", json!(null)),
            ("/provider", json!(3)),
            ("/model", json!(["m"])),
            ("/input", json!(null)),
            ("/input", json!("hi")),
            ("/input", json!([{"type": "chat", "messages": []}])),
            ("/input", json!({"type": "chat", "messages": []})),
            ("/input", json!({"type": "chat"})),
            ("/input", json!({"type": "chat", "messages": null})),
            ("/input", json!({"type": "chat", "messages": {}})),
            (
                "/input",
                json!({"type": "chat", "messages": [["user", "hi"]]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "robot", "content": "hi"}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": null, "content": "hi"}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"content": "hi"}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": null}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": 5}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": [{"text": "a"}]}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": [{"type": 1}]}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": [{"type": null}]}]}),
            ),
            (
                "/input",
                json!({"type": "chat", "messages": [{"role": "user", "content": ["a"]}]}),
            ),
            ("/input", json!({"type": "completion"})),
            ("/input", json!({"type": "completion", "content": "text"})),
            (
                "/input",
                json!({"type": "completion", "content": [{"type": "text", "text": "a"}]}),
            ),
            ("/input", json!({"type": "completion", "content": null})),
            ("/input", json!({"type": "image"})),
            ("/input", json!({"type": null})),
            ("/input", json!({"messages": []})),
            (
                "/output",
                json!({"type": "chat", "messages": [{"role": "assistant", "content": [{"type": "text"}]}]}),
            ),
            (
                "/output",
                json!({"type": "chat", "messages": [{"role": "assistant", "content": [{"type": "text"}]}], "extra": [1]}),
            ),
            ("/output", json!(7)),
            ("/request_start_time", json!("yesterday")),
            ("/request_start_time", json!(-5)),
            ("/request_start_time", json!(null)),
            ("/request_end_time", json!("2024-05-01T10:00:01.000Z")),
            ("/parameters", json!(null)),
            ("/parameters", json!([1])),
            ("/tags", json!(null)),
            ("/tags", json!(["a", 1])),
            ("/tags", json!([long.clone()])),
            ("/tags", json!("a")),
            ("/metadata", json!(null)),
            ("/metadata", json!({"environment": "prod"})),
            ("/metadata", json!({"environment": 5})),
            ("/metadata", json!(["a"])),
            ("/prompt_id", json!("7")),
            ("/prompt_id", json!(7)),
            ("/prompt_version_number", json!(0)),
            ("/prompt_version_number", json!(2)),
            ("/input_tokens", json!(-1)),
            ("/input_tokens", json!(1.5)),
            ("/price", json!(-0.5)),
            ("/price", json!("1")),
            ("/score", json!(101)),
            ("/score", json!(100)),
            ("/status", json!("OK")),
            ("/status", json!("ERROR")),
            ("/status", json!(null)),
            ("/error_type", json!("PROVIDER_RATE_LIMIT")),
            ("/error_type", json!("NOPE")),
            ("/error_message", json!(long)),
            ("/error_message", json!(4)),
            ("/function_name", json!(false)),
            ("/api_type", json!("chat")),
        ];
        let (mut fast, mut refused) = (0, 0);
        for (name, base) in pl_all() {
            for (ptr, value) in &edits {
                let mut body = base.clone();
                match body.pointer_mut(ptr) {
                    Some(slot) => *slot = value.clone(),
                    None => {
                        let key = ptr.trim_start_matches('/');
                        body.as_object_mut()
                            .unwrap()
                            .insert(key.into(), value.clone());
                    }
                }
                let raw = serde_json::to_vec(&body).unwrap();
                if agrees(&raw) {
                    fast += 1;
                } else if value_path(&raw).is_none() {
                    refused += 1;
                }
            }
            for key in TOP_REQUIRED {
                let mut body = base.clone();
                body.as_object_mut().unwrap().shift_remove(*key);
                let raw = serde_json::to_vec(&body).unwrap();
                assert!(
                    !agrees(&raw) && value_path(&raw).is_none(),
                    "{name} without {key}"
                );
            }
        }
        // Both outcomes were exercised: the checks above could fail.
        assert!(fast > 100, "{fast} accepted on the fast path");
        assert!(refused > 150, "{refused} refused");
        // Text-level cases the Value path settles.
        let ok = String::from_utf8(serde_json::to_vec(&pl_py_openai()).unwrap()).unwrap();
        for raw in [
            format!("[{ok}]"),
            format!("{ok} x"),
            ok.replace("\"What is 2+2?\"", "\"\\ud800\""),
            ok.replace("\"temperature\":0.7", "\"temperature\":7e-1"),
            ok.replacen("\"model\"", "\"mod\\u0065l\"", 1),
        ] {
            assert!(accept_bytes(raw.as_bytes()).is_none(), "{raw}");
        }
    }
}
