//! Pezzo's reporting API v2: `POST /api/reporting/v2/request` (`CreateReportDto`).
//!
//! The official clients (npm @pezzo/client 0.4.18, PyPI pezzo 0.1.2) send, besides the spec's
//! fields: `response.status` (HTTP status of the LLM call), `metadata.type` (`ChatCompletion`, or
//! a managed prompt's `Prompt`/`Chat`), `metadata.promptVersionSha`, and `cacheHit: null` where
//! the spec says boolean. All are accepted; unknown fields anywhere are kept.
//!
//! # Rendering for the real server (why [`from_canonical`] rewrites some events)
//!
//! The Pezzo server computes a report's cost in `buildRequestReport`: it switches on
//! `metadata.provider` and throws ("Unsupported provider", answered as 500) for anything but
//! `OpenAI`; then, when the response body has `usage` and the request body a `model`, it looks the
//! model up with `gptModels[model]` in @pezzo/llm-toolkit (0.7.0, the only published version) —
//! an exact-key lookup, so any model outside that table (`gpt-4o-mini`, dated snapshots,
//! fine-tunes, every non-OpenAI model) dereferences `undefined` and 500s as well. A 500 would be
//! retried forever, so every rendered body:
//!
//! - says `provider: "OpenAI"`; the true provider and model go to `properties.llmlogd_provider`
//!   / `properties.llmlogd_model` when the provider is not OpenAI,
//! - has request/response bodies in OpenAI chat-completions shape (Anthropic bodies and
//!   PromptLayer templates are converted),
//! - carries `usage` in the response body only when the request's `model` is one of
//!   [`PRICED_MODELS`]; otherwise the usage object moves to `properties.llmlogd_usage`.
//!
//! Bodies from the official clients (provider OpenAI, a priced model) round-trip unchanged,
//! except that a `null` in an optional member (`cacheHit: null`, which both clients send) is
//! left out: the spec types `cacheHit`, `cacheEnabled`, `properties` and `metadata.promptId`
//! without `null`, and absent is what such a `null` means.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::canonical::{provider_id, ErrorType, LlmEvent, PezzoExtra, PromptId, Status, Timestamp};
use super::check::{key_path, present, Checker, ROOT};
use super::convert::{
    self, anthropic, openai, request_dialect, response_dialect, Dialect, ResponseCtx,
};
use super::{Attributes, FastAccepted, FieldError};

/// The ingest path the clients POST to (server URL + `/api` + the spec's path).
pub const PATH: &str = "/api/reporting/v2/request";
/// Header carrying the API key.
pub const API_KEY_HEADER: &str = "x-pezzo-api-key";
/// Header carrying the project id.
pub const PROJECT_ID_HEADER: &str = "x-pezzo-project-id";
/// `metadata.environment` when the event has none (Pezzo's example value and default name).
pub const DEFAULT_ENVIRONMENT: &str = "Production";
/// `metadata.client` for events llmlogd renders from another format.
pub const CLIENT_NAME: &str = "llmlogd";

/// `metadata.provider`'s enum in the spec.
const PROVIDERS: &[&str] = &["OpenAI", "Azure", "Anthropic"];

/// The models the Pezzo server can price: the keys of `gptModels` in @pezzo/llm-toolkit 0.7.0.
/// Exact names, not prefixes — the server does `gptModels[model]`. (It maps `ft:gpt-3.5-turbo-0613*`
/// to `ft:gpt-3.5-turbo-0613`, which that table lacks, so fine-tunes are out too.)
pub const PRICED_MODELS: &[&str] = &[
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-16k",
    "gpt-3.5-turbo-1106",
    "gpt-3.5-turbo-instruct",
    "gpt-4",
    "gpt-4-32k",
    "gpt-4-1106-preview",
    "gpt-4-vision-preview",
    "gpt-4-turbo-preview",
    "gpt-4-turbo",
    "gpt-4-1106-vision-preview",
    "gpt-4-0125-preview",
    "gpt-4o",
    "gpt-4o-2024-05-13",
];

/// Whether the Pezzo server can price `model` (so `usage` may be sent with it).
pub fn is_priced_model(model: &str) -> bool {
    PRICED_MODELS.contains(&model)
}

// Known members, for `fill_extras`.
const TOP_REQUIRED: &[&str] = &["metadata", "request", "response"];
const TOP_OPTIONAL: &[&str] = &["properties", "cacheEnabled", "cacheHit"];
const META_REQUIRED: &[&str] = &["provider", "client", "clientVersion", "environment"];
const META_OPTIONAL: &[&str] = &["promptId"];
const EXCHANGE_REQUIRED: &[&str] = &["timestamp", "body"];
const RESPONSE_OPTIONAL: &[&str] = &["status"];

/// Checks a report body against the spec (plus the clients' `response.status`), listing every
/// bad field.
pub fn validate(body: &Value) -> Result<(), Vec<FieldError>> {
    let mut c = Checker::new();
    let Some(root) = c.object(body, ROOT) else {
        return c.finish();
    };
    if let Some(meta) = c
        .required(root, ROOT, "metadata")
        .and_then(|v| c.object(v, "metadata"))
    {
        if let Some(v) = c.required(meta, "metadata", "provider") {
            c.one_of(v, "metadata.provider", PROVIDERS);
        }
        for key in ["client", "clientVersion"] {
            if let Some(v) = c.required(meta, "metadata", key) {
                c.string(v, &key_path("metadata", key));
            }
        }
        // The spec requires `environment`, but @pezzo/client omits it when the app configured
        // none; refusing would lose those reports (the client only warns). Accept its absence;
        // the sink sends DEFAULT_ENVIRONMENT, as the Python client does.
        if let Some(v) = present(meta, "environment") {
            c.string(v, "metadata.environment");
        }
        if let Some(v) = present(meta, "promptId") {
            c.string(v, "metadata.promptId");
        }
    }
    if let Some(v) = present(root, "properties") {
        c.object(v, "properties");
    }
    for key in ["request", "response"] {
        let Some(part) = c.required(root, ROOT, key).and_then(|v| c.object(v, key)) else {
            continue;
        };
        if let Some(v) = c.required(part, key, "timestamp") {
            c.date_time(v, &key_path(key, "timestamp"), false);
        }
        if key == "response" {
            // The spec requires it, but @pezzo/client sends none when the provider never
            // answered (a refused or dropped connection): such a report records a failed
            // call, the kind most worth keeping. Accepted, and delivered with an error body
            // (`derive_summary`, `openai_response`).
            if let Some(v) = present(part, "body") {
                c.object(v, "response.body");
            }
        } else if let Some(v) = c.required(part, key, "body") {
            c.object(v, &key_path(key, "body"));
        }
        if key == "response" {
            if let Some(v) = present(part, "status") {
                c.integer_in(v, "response.status", 100, 599);
            }
        }
    }
    for key in ["cacheEnabled", "cacheHit"] {
        if let Some(v) = present(root, key) {
            c.boolean(v, key);
        }
    }
    c.finish()
}

/// The canonical event of a (validated) report. Never panics; on invalid input, fields that
/// don't parse are left unset.
///
/// Summary fields come from the bodies: `model`/`parameters` from the request body, `usage` from
/// the response body, `status`/`error_*` from `response.status` and error bodies.
pub fn to_canonical(body: &Value) -> LlmEvent {
    let empty = Map::new();
    let root = body.as_object().unwrap_or(&empty);
    let mut ev = LlmEvent::default();
    let mut extra = PezzoExtra::default();
    for (k, v) in root {
        let absorbed = match (k.as_str(), v) {
            ("metadata", Value::Object(m)) => {
                read_metadata(&mut ev, &mut extra, m);
                true
            }
            ("properties", Value::Object(p)) => {
                ev.metadata = Some(p.clone());
                true
            }
            ("request", Value::Object(r)) => {
                for (k, v) in r {
                    let absorbed = match (k.as_str(), v) {
                        ("timestamp", Value::String(s)) => Timestamp::parse_rfc3339(s)
                            .map(|t| ev.request.start_time = t)
                            .is_some(),
                        ("body", Value::Object(_)) => {
                            ev.request.body = Some(v.clone());
                            true
                        }
                        _ => false,
                    };
                    convert::keep(&mut extra.request, k, v, absorbed, EXCHANGE_REQUIRED, &[]);
                }
                true
            }
            ("response", Value::Object(r)) => {
                for (k, v) in r {
                    let absorbed = match (k.as_str(), v) {
                        ("timestamp", Value::String(s)) => Timestamp::parse_rfc3339(s)
                            .map(|t| ev.response.end_time = t)
                            .is_some(),
                        ("body", Value::Object(_)) => {
                            ev.response.body = Some(v.clone());
                            true
                        }
                        ("status", _) => {
                            let s = super::check::as_integer(v)
                                .and_then(|s| u16::try_from(s).ok())
                                .filter(|s| (100..=599).contains(s));
                            s.map(|s| ev.response.http_status = Some(s)).is_some()
                        }
                        _ => false,
                    };
                    convert::keep(
                        &mut extra.response,
                        k,
                        v,
                        absorbed,
                        EXCHANGE_REQUIRED,
                        RESPONSE_OPTIONAL,
                    );
                }
                true
            }
            ("cacheEnabled", Value::Bool(b)) => {
                ev.cache_enabled = Some(*b);
                true
            }
            ("cacheHit", Value::Bool(b)) => {
                ev.cache_hit = Some(*b);
                true
            }
            _ => false,
        };
        convert::keep(
            &mut extra.fields,
            k,
            v,
            absorbed,
            TOP_REQUIRED,
            TOP_OPTIONAL,
        );
    }
    if ev.provider.is_empty() {
        ev.provider = "unknown".into();
    }
    derive_summary(&mut ev);
    ev.extra.pezzo = Some(extra);
    ev
}

fn read_metadata(ev: &mut LlmEvent, extra: &mut PezzoExtra, meta: &Map<String, Value>) {
    for (k, v) in meta {
        let s = v.as_str();
        let absorbed = match (k.as_str(), s) {
            ("provider", Some(p)) if PROVIDERS.contains(&p) => {
                ev.provider = provider_id(p);
                true
            }
            ("client", Some(s)) => {
                ev.client = Some(s.to_string());
                true
            }
            ("clientVersion", Some(s)) => {
                ev.client_version = Some(s.to_string());
                true
            }
            ("environment", Some(s)) => {
                ev.environment = Some(s.to_string());
                true
            }
            ("promptId", Some(s)) => {
                ev.prompt.id = Some(PromptId::Text(s.to_string()));
                true
            }
            _ => false,
        };
        convert::keep(
            &mut extra.metadata,
            k,
            v,
            absorbed,
            META_REQUIRED,
            META_OPTIONAL,
        );
    }
}

/// Fills model, api_type, parameters, usage, status and error fields from the bodies.
///
/// A report without a response body is a failed call: @pezzo/client sends none when the
/// provider never answered (a refused or dropped connection: the OpenAI SDK's
/// `APIConnectionError` has no body and no status).
fn derive_summary(ev: &mut LlmEvent) {
    let s = convert::body_summary(
        &ev.provider,
        ev.request.body.as_ref(),
        ev.response.http_status,
        ev.response.body.as_ref(),
    );
    // Pezzo's model is the request's: the response's `model` is the provider's echo.
    ev.model = s.model;
    ev.api_type = s.api_type;
    if s.parameters.is_some() {
        ev.parameters = s.parameters;
    }
    let failure = s.failure.or_else(|| {
        ev.response.body.is_none().then(|| convert::Failure {
            error_type: ErrorType::ProviderError,
            message: NO_RESPONSE.to_string(),
        })
    });
    match failure {
        Some(f) => {
            ev.status = Some(Status::Error);
            ev.error_type = Some(f.error_type);
            ev.error_message = Some(f.message);
        }
        None => {
            ev.status = Some(Status::Success);
            ev.usage = s.usage;
        }
    }
}

/// The error message of a report that came without a response body.
pub const NO_RESPONSE: &str =
    "no response from the provider (the report came without a response body)";

/// Renders `ev` as a report the real Pezzo server accepts without a 500 (see the module docs).
/// The result always passes [`validate`].
pub fn from_canonical(ev: &LlmEvent) -> Value {
    let px = ev.extra.pezzo.as_ref();
    let request_body = openai_request(ev);
    let mut response_body = openai_response(ev);

    let mut notes = Map::new();
    let priced = request_body
        .get("model")
        .and_then(Value::as_str)
        .is_some_and(is_priced_model);
    if !priced {
        if let Some(usage) = response_body.remove("usage").filter(|u| !u.is_null()) {
            notes.insert("llmlogd_usage".into(), usage);
        }
    }
    if ev.provider != "openai" {
        notes.insert("llmlogd_provider".into(), json!(ev.provider));
        if let Some(m) = &ev.model {
            notes.insert("llmlogd_model".into(), json!(m));
        }
    }
    foreign_notes(ev, &mut notes);

    let mut meta = Map::new();
    let environment = ev
        .environment
        .clone()
        .or_else(|| metadata_environment(ev))
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_string());
    meta.insert("environment".into(), json!(environment));
    meta.insert("provider".into(), json!("OpenAI"));
    meta.insert(
        "client".into(),
        json!(ev.client.as_deref().unwrap_or(CLIENT_NAME)),
    );
    meta.insert(
        "clientVersion".into(),
        json!(ev
            .client_version
            .as_deref()
            .unwrap_or(env!("CARGO_PKG_VERSION"))),
    );
    if let Some(PromptId::Text(id)) = &ev.prompt.id {
        meta.insert("promptId".into(), json!(id));
    }
    convert::fill_extras(
        &mut meta,
        px.map(|p| &p.metadata),
        META_REQUIRED,
        META_OPTIONAL,
        &[],
    );
    // We always render chat-completions bodies, which is what the clients call ChatCompletion.
    meta.entry("type")
        .or_insert_with(|| json!("ChatCompletion"));

    let mut out = Map::new();
    out.insert("metadata".into(), Value::Object(meta));
    let mut props = ev.metadata.clone().unwrap_or_default();
    for (k, v) in notes {
        // The app's own keys win over llmlogd's notes.
        props.entry(k).or_insert(v);
    }
    if ev.metadata.is_some() || !props.is_empty() {
        out.insert("properties".into(), Value::Object(props));
    }
    if let Some(b) = ev.cache_enabled {
        out.insert("cacheEnabled".into(), json!(b));
    }
    if let Some(b) = ev.cache_hit {
        out.insert("cacheHit".into(), json!(b));
    }

    let mut request = Map::new();
    request.insert(
        "timestamp".into(),
        json!(ev.request.start_time.to_iso_millis_utc()),
    );
    request.insert("body".into(), Value::Object(request_body));
    convert::fill_extras(
        &mut request,
        px.map(|p| &p.request),
        EXCHANGE_REQUIRED,
        &[],
        &[],
    );
    out.insert("request".into(), Value::Object(request));

    let mut response = Map::new();
    response.insert(
        "timestamp".into(),
        json!(ev.response.end_time.to_iso_millis_utc()),
    );
    response.insert("body".into(), Value::Object(response_body));
    if let Some(s) = ev.response.http_status.filter(|s| (100..=599).contains(s)) {
        response.insert("status".into(), json!(s));
    }
    convert::fill_extras(
        &mut response,
        px.map(|p| &p.response),
        EXCHANGE_REQUIRED,
        RESPONSE_OPTIONAL,
        // Outside the spec (the server reads it to mark errors): kept as the client sent it.
        RESPONSE_OPTIONAL,
    );
    // Events from other formats get the status a client would have sent; a Pezzo event keeps
    // what its client sent (possibly nothing), unless it came without a response body: it is
    // sent with an error body, and the status that says so.
    let said = response.get("status").is_some_and(|s| !s.is_null());
    if (px.is_none() && !response.contains_key("status")) || (ev.response.body.is_none() && !said) {
        let status = if ev.is_error() {
            ev.error_type.map_or(500, |t| t.http_status())
        } else {
            200
        };
        response.insert("status".into(), json!(status));
    }
    out.insert("response".into(), Value::Object(response));
    // The spec lets none of the top-level optional members be `null`.
    convert::fill_extras(
        &mut out,
        px.map(|p| &p.fields),
        TOP_REQUIRED,
        TOP_OPTIONAL,
        &[],
    );
    Value::Object(out)
}

/// `metadata.environment` of the event's annotations (PromptLayer keeps it there).
fn metadata_environment(ev: &LlmEvent) -> Option<String> {
    ev.metadata
        .as_ref()?
        .get("environment")?
        .as_str()
        .map(str::to_string)
}

/// Canonical fields Pezzo has no place for, kept as `llmlogd_*` properties.
fn foreign_notes(ev: &LlmEvent, notes: &mut Map<String, Value>) {
    if let Some(tags) = ev.tags.as_ref().filter(|t| !t.is_empty()) {
        notes.insert("llmlogd_tags".into(), json!(tags));
    }
    if let Some(name) = &ev.prompt.name {
        notes.insert("llmlogd_prompt_name".into(), json!(name));
    }
    if let Some(PromptId::Number(id)) = &ev.prompt.id {
        notes.insert("llmlogd_prompt_id".into(), json!(id));
    }
    if let Some(v) = ev.prompt.version_number {
        notes.insert("llmlogd_prompt_version".into(), json!(v));
    }
    if let Some(s) = ev.score {
        notes.insert("llmlogd_score".into(), json!(s));
    }
    if let Some(p) = &ev.price {
        notes.insert("llmlogd_price".into(), Value::Number(p.clone()));
    }
    // A warning succeeded, so the response says 200; keep what went wrong.
    if ev.status == Some(Status::Warning) {
        notes.insert("llmlogd_status".into(), json!("WARNING"));
        if let Some(t) = ev.error_type {
            notes.insert("llmlogd_error_type".into(), json!(t.as_str()));
        }
        if let Some(m) = &ev.error_message {
            notes.insert("llmlogd_error_message".into(), json!(m));
        }
    }
}

/// The request body in OpenAI chat shape.
fn openai_request(ev: &LlmEvent) -> Map<String, Value> {
    let raw = ev.request.body.as_ref().and_then(Value::as_object);
    let mut body = match raw {
        Some(b) if request_dialect(&ev.provider, b) == Dialect::OpenAi => b.clone(),
        other => {
            // Prefer PromptLayer's own template: one conversion instead of two.
            let template = ev
                .extra
                .promptlayer
                .as_ref()
                .and_then(|p| p.input.clone())
                .or_else(|| other.map(anthropic::request_to_template))
                .unwrap_or_else(|| convert::chat_template(Vec::new(), Map::new()));
            let params = ev
                .parameters
                .clone()
                .or_else(|| other.map(anthropic::parameters));
            let converted = openai::request_from_template(&template, params.as_ref(), None);
            converted.as_object().cloned().unwrap_or_default()
        }
    };
    if !body.contains_key("model") {
        if let Some(m) = &ev.model {
            // Keep the model first, as clients send it.
            let mut with_model = Map::new();
            with_model.insert("model".into(), json!(m));
            with_model.extend(body);
            body = with_model;
        }
    }
    body
}

/// The response body in OpenAI chat shape (an OpenAI error body for failed calls).
fn openai_response(ev: &LlmEvent) -> Map<String, Value> {
    let raw = ev.response.body.as_ref().and_then(Value::as_object);
    if let Some(b) = raw {
        if response_dialect(&ev.provider, b) == Dialect::OpenAi {
            return b.clone();
        }
    }
    let body = if ev.is_error() {
        let failure = convert::failure(ev.response.http_status, ev.response.body.as_ref());
        let message = ev
            .error_message
            .clone()
            .or_else(|| failure.as_ref().map(|f| f.message.clone()))
            .unwrap_or_else(|| "request failed".to_string());
        let kind = ev.error_type.or(failure.map(|f| f.error_type));
        openai::error_body(&message, kind)
    } else {
        let pl_output = ev.extra.promptlayer.as_ref().and_then(|p| p.output.clone());
        let (template, finish) = match (pl_output, raw) {
            (Some(t), _) => (t, None),
            (None, Some(b)) => anthropic::response_to_template(b),
            (None, None) => (convert::chat_template(Vec::new(), Map::new()), None),
        };
        let usage = ev.usage.or_else(|| raw.and_then(anthropic::usage));
        let ctx = ResponseCtx {
            model: ev.model.as_deref(),
            usage: usage.as_ref(),
            finish: finish.as_deref(),
            created: Some(ev.response.end_time.at().timestamp()),
        };
        openai::response_from_template(&template, &ctx)
    };
    body.as_object().cloned().unwrap_or_default()
}

/// Routing attributes of a report body.
///
/// A report without `metadata.environment` (what @pezzo/client sends when the app set none) is
/// routed as [`DEFAULT_ENVIRONMENT`], the environment it is delivered with: routed as having
/// none, it was acknowledged and then dropped by a sink with `route.environments =
/// ["Production"]`.
pub fn attributes(body: &Value) -> Attributes {
    let meta = body.get("metadata");
    let str_at = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let environment = str_at(meta, "environment").or_else(|| {
        meta.is_some_and(Value::is_object)
            .then(|| DEFAULT_ENVIRONMENT.to_string())
    });
    Attributes {
        provider: str_at(meta, "provider").map(|p| provider_id(&p)),
        model: str_at(body.get("request").and_then(|r| r.get("body")), "model"),
        environment,
        tags: Vec::new(),
        canonical: true,
    }
}

/// What the real server answers (201) for a saved report: `reportId`, `calculated` and the
/// report's own members, as `ReportingService.saveReport` returns them. Clients only check for a
/// 2xx. Costs are not computed; durations and token counts are.
pub fn success_reply(body: &Value) -> String {
    /// The reply, borrowing the report's members: serialised straight from the request's
    /// `Value`, not cloned into a new one first (the report is echoed whole).
    #[derive(Serialize)]
    struct Reply<'a> {
        #[serde(rename = "reportId")]
        report_id: String,
        calculated: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        properties: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        request: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        response: Option<&'a Value>,
    }
    let member = |k: &str| body.as_object().and_then(|root| root.get(k));
    let reply = Reply {
        report_id: report_id(),
        calculated: calculated(body),
        properties: member("properties"),
        metadata: member("metadata"),
        request: member("request"),
        response: member("response"),
    };
    // Plain data with string keys: serialising cannot fail.
    serde_json::to_string(&reply).unwrap_or_default()
}

/// Ingest's fast path for a report, like [`super::native::check_canonical_bytes`]: checks the
/// body and derives the attributes and the 201 (as [`success_reply`] gives it, the members
/// echoed as the report had them, byte for byte) from the bytes, with no `Value` of the whole
/// body. The `Value` path parses, checks, echoes and frees ~2 KB of maps and strings per report:
/// ~10 µs for a 2.3 KB report in process against ~7 µs here, and under load the difference is
/// larger (64 clients: 74 → 43-57 µs of the daemon's CPU per report, BENCHMARKS.md F45).
///
/// `None` means "let [`validate`] decide": anything this path does not accept for certain
/// (a bad or missing field, a duplicated member, a body [`super::native::plain_json`] leaves
/// to the `Value` path) goes there, which accepts it or names the problem as it always did. So
/// a report is accepted here only if `validate` would accept it, with the same attributes.
pub fn accept_bytes(raw: &[u8]) -> Option<FastAccepted> {
    if raw.first() != Some(&b'{') || !super::native::plain_json(raw) {
        return None;
    }
    let top: FastReport<'_> = serde_json::from_slice(raw).ok()?;
    let meta: FastMeta<'_> = object_of(top.metadata)?;
    if !PROVIDERS.contains(&meta.provider.as_ref()) {
        return None;
    }
    if top.properties.present().is_some_and(|p| !is_object(p)) {
        return None;
    }
    for flag in [top.cache_enabled, top.cache_hit] {
        if flag
            .present()
            .is_some_and(|b| !matches!(b.get(), "true" | "false"))
        {
            return None;
        }
    }
    let request: FastExchange<'_> = object_of(top.request)?;
    let response: FastExchange<'_> = object_of(top.response)?;
    for part in [&request, &response] {
        Timestamp::parse_rfc3339(&part.timestamp)?;
        if !is_object(part.body) {
            return None;
        }
    }
    if let Some(status) = response.status.present() {
        let v: Value = serde_json::from_str(status.get()).ok()?;
        if !super::check::as_integer(&v).is_some_and(|i| (100..=599).contains(&i)) {
            return None;
        }
    }
    let model = match serde_json::from_str::<FastModel<'_>>(request.body.get())
        .ok()?
        .model
        .0
    {
        Some(m) => serde_json::from_str::<String>(m.get()).ok(),
        None => None,
    };
    let attrs = Attributes {
        provider: Some(provider_id(&meta.provider)),
        model,
        // As `attributes`: a report without one is delivered, so routed, as the default.
        environment: Some(
            meta.environment
                .map_or_else(|| DEFAULT_ENVIRONMENT.to_string(), Cow::into_owned),
        ),
        tags: Vec::new(),
        canonical: true,
    };
    // `calculated` reads the two timestamps and the response's `usage`: give it just those.
    let usage = match serde_json::from_str::<FastUsage<'_>>(response.body.get())
        .ok()?
        .usage
        .0
    {
        Some(u) => serde_json::from_str::<Value>(u.get()).ok()?,
        None => Value::Null,
    };
    let mut response_body = Map::new();
    if !usage.is_null() {
        response_body.insert("usage".into(), usage);
    }
    let calc = calculated(&json!({
        "request": {"timestamp": request.timestamp},
        "response": {"timestamp": response.timestamp, "body": response_body},
    }));
    let mut reply = String::with_capacity(raw.len() + 160);
    reply.push_str("{\"reportId\":\"");
    reply.push_str(&report_id());
    reply.push_str("\",\"calculated\":");
    reply.push_str(&calc.to_string());
    for (key, member) in [
        ("properties", top.properties),
        ("metadata", top.metadata),
        ("request", top.request),
        ("response", top.response),
    ] {
        if let Some(m) = member.0 {
            reply.push_str(",\"");
            reply.push_str(key);
            reply.push_str("\":");
            reply.push_str(m.get());
        }
    }
    reply.push('}');
    Some(FastAccepted {
        attrs,
        reply: Box::new(move |_| reply),
    })
}

/// A member's JSON text as the body has it, `null` included; `None` when absent.
#[derive(Debug, Default, Clone, Copy)]
struct Raw<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|r| Raw(Some(r)))
    }
}

impl<'a> Raw<'a> {
    /// Present and not `null` (what [`present`] means on the `Value` path).
    fn present(self) -> Option<&'a RawValue> {
        self.0.filter(|r| r.get() != "null")
    }
}

fn is_object(r: &RawValue) -> bool {
    r.get().starts_with('{')
}

/// A member that must be a JSON object, deserialised. serde would also fill a struct from an
/// array, which the `Value` path refuses: only objects get here.
fn object_of<'a, T: Deserialize<'a>>(member: Raw<'a>) -> Option<T> {
    let r = member.present().filter(|r| is_object(r))?;
    serde_json::from_str(r.get()).ok()
}

#[derive(Deserialize)]
struct FastReport<'a> {
    #[serde(default, borrow)]
    metadata: Raw<'a>,
    #[serde(default, borrow)]
    properties: Raw<'a>,
    #[serde(default, borrow)]
    request: Raw<'a>,
    #[serde(default, borrow)]
    response: Raw<'a>,
    #[serde(default, borrow, rename = "cacheEnabled")]
    cache_enabled: Raw<'a>,
    #[serde(default, borrow, rename = "cacheHit")]
    cache_hit: Raw<'a>,
}

/// `metadata`: the required strings are required here too (a `null` fails to deserialise and
/// goes to the `Value` path); the optional ones may be `null`.
#[derive(Deserialize)]
struct FastMeta<'a> {
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow, rename = "client")]
    _client: Cow<'a, str>,
    #[serde(borrow, rename = "clientVersion")]
    _client_version: Cow<'a, str>,
    #[serde(default, borrow)]
    environment: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "promptId")]
    _prompt_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FastExchange<'a> {
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(default, borrow)]
    status: Raw<'a>,
}

#[derive(Deserialize)]
struct FastModel<'a> {
    #[serde(default, borrow)]
    model: Raw<'a>,
}

#[derive(Deserialize)]
struct FastUsage<'a> {
    #[serde(default, borrow)]
    usage: Raw<'a>,
}

fn calculated(body: &Value) -> Value {
    let time = |k: &str| {
        body.get(k)
            .and_then(|p| p.get("timestamp"))
            .and_then(Value::as_str)
            .and_then(Timestamp::parse_rfc3339)
    };
    let mut c = Map::new();
    if let (Some(a), Some(b)) = (time("request"), time("response")) {
        c.insert(
            "duration".into(),
            json!(b.unix_millis().saturating_sub(a.unix_millis())),
        );
    }
    let usage = body
        .get("response")
        .and_then(|r| r.get("body"))
        .and_then(Value::as_object)
        .and_then(openai::usage);
    if let Some(u) = usage {
        let p = u.input_tokens.unwrap_or(0);
        let q = u.output_tokens.unwrap_or(0);
        c.insert("promptTokens".into(), json!(p));
        c.insert("completionTokens".into(), json!(q));
        c.insert("totalTokens".into(), json!(p.saturating_add(q)));
    }
    Value::Object(c)
}

/// A random UUID v4 string (Pezzo's report ids are `randomUUID()`), from std's randomly keyed
/// hasher so no extra dependency is needed. Not cryptographic; it only has to be unique-ish.
fn report_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let state = std::collections::hash_map::RandomState::new();
    let a = state.hash_one((nanos, 1u8));
    let b = state.hash_one((nanos, 2u8));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{ErrorType, Extra, PromptLayerExtra, Usage};
    use crate::formats::testdata::*;

    #[test]
    fn accepts_official_client_bodies() {
        for (name, body) in [
            ("ts_success", pezzo_ts_success()),
            ("py_managed", pezzo_py_managed()),
            ("ts_rate_limited", pezzo_ts_rate_limited()),
            ("py_auth_error", pezzo_py_auth_error()),
        ] {
            assert_eq!(validate(&body), Ok(()), "{name}");
        }
    }

    #[test]
    fn accepts_spec_minimum_and_nulls() {
        let body = json!({
            "metadata": {"provider": "Anthropic", "client": "c", "clientVersion": "1", "environment": "dev", "promptId": null},
            "properties": null,
            "request": {"timestamp": "2021-01-01T00:00:00Z", "body": {}},
            "response": {"timestamp": "2021-01-01T00:00:00+02:00", "body": {}, "status": null},
            "cacheEnabled": null
        });
        assert_eq!(validate(&body), Ok(()));
    }

    #[test]
    fn rejects_every_bad_field_at_once() {
        let body = json!({
            "metadata": {"provider": "Gemini", "clientVersion": 4, "environment": null, "promptId": 7},
            "properties": ["a"],
            "request": {"timestamp": "yesterday", "body": "hi"},
            "response": {"timestamp": 1_714_557_601, "status": 99},
            "cacheEnabled": "no",
            "cacheHit": 0
        });
        let errs = validate(&body).expect_err("invalid");
        let got: Vec<(String, String)> = errs.into_iter().map(|e| (e.field, e.problem)).collect();
        let want = [
            ("metadata.provider", "must be one of OpenAI, Azure, Anthropic, got \"Gemini\""),
            ("metadata.client", "is required"),
            ("metadata.clientVersion", "must be a string, got a number"),
            ("metadata.promptId", "must be a string, got a number"),
            ("properties", "must be an object, got an array"),
            ("request.timestamp", "must be an RFC 3339 date-time with offset (e.g. 2024-01-01T00:00:00.000Z), got \"yesterday\""),
            ("request.body", "must be an object, got a string"),
            ("response.timestamp", "must be a date-time string, got a number"),
            ("response.status", "must be within 100..=599, got 99"),
            ("cacheEnabled", "must be a boolean, got a string"),
            ("cacheHit", "must be a boolean, got a number"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(f, p)| (f.to_string(), p.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn rejects_non_objects_and_missing_parts() {
        let errs = validate(&json!([1])).expect_err("invalid");
        assert_eq!(errs[0].field, "$");
        let errs = validate(&json!({})).expect_err("invalid");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata", "request", "response"]);
    }

    #[test]
    fn official_bodies_round_trip_less_their_spec_nulls() {
        for body in [
            pezzo_ts_success(),
            pezzo_py_managed(),
            pezzo_ts_rate_limited(),
            pezzo_py_auth_error(),
        ] {
            let ev = to_canonical(&body);
            let back = from_canonical(&ev);
            let expected = pezzo_without_spec_nulls(&body);
            assert_ne!(expected, body, "the clients send cacheHit: null");
            assert_eq!(back, expected);
            // Through the native (serde) form too: what the queue may store.
            let native = serde_json::to_value(&ev).expect("serialises");
            let ev2: LlmEvent = serde_json::from_value(native).expect("parses");
            assert_eq!(from_canonical(&ev2), expected);
        }
    }

    /// The clients report a call whose provider never answered without a response body (the
    /// spec requires one). Refused, the failed call went unrecorded; accepted, it is delivered
    /// as a failed call with an error body the spec accepts, to Pezzo and to PromptLayer.
    #[test]
    fn a_report_without_a_response_body_is_a_failed_call() {
        for body in [pezzo_ts_unreachable(), pezzo_py_unreachable()] {
            assert_eq!(validate(&body), Ok(()), "{body}");
            let ev = to_canonical(&body);
            assert_eq!(ev.status, Some(Status::Error));
            assert_eq!(ev.error_type, Some(ErrorType::ProviderError));
            assert_eq!(ev.error_message.as_deref(), Some(NO_RESPONSE));
            assert_eq!(ev.usage, None);
            let out = from_canonical(&ev);
            assert_eq!(validate(&out), Ok(()), "{out}");
            assert_eq!(out["response"]["body"]["error"]["message"], NO_RESPONSE);
            assert_eq!(out["response"]["status"], 500, "{out}");
            assert_eq!(out["request"], pezzo_without_spec_nulls(&body)["request"]);
            let pl = crate::formats::promptlayer::from_canonical(&ev);
            assert_eq!(crate::formats::promptlayer::validate(&pl), Ok(()), "{pl}");
            assert_eq!(pl["status"], "ERROR", "{pl}");
            assert_eq!(pl["error_type"], "PROVIDER_ERROR", "{pl}");
        }
        // A body of the wrong type is still refused, by name.
        let mut body = pezzo_ts_unreachable();
        body["response"]["body"] = json!("ECONNREFUSED");
        let errs = validate(&body).expect_err("a string body");
        assert_eq!(errs[0].field, "response.body");
    }

    #[test]
    fn round_trip_keeps_unknown_fields_and_drops_spec_nulls() {
        let mut body = pezzo_ts_success();
        body["metadata"]["isTestPrompt"] = json!(false);
        body["metadata"]["promptId"] = Value::Null;
        body["request"]["traceparent"] = json!("00-abc-01");
        body["response"]["headers"] = json!({"x-request-id": "r1"});
        body["response"]["status"] = Value::Null;
        body["properties"] = Value::Null;
        body["somethingNew"] = json!([1, {"a": null}]);
        assert_eq!(validate(&body), Ok(()));
        let back = from_canonical(&to_canonical(&body));
        // Unknown members and the out-of-spec `response.status` keep their nulls; the spec's
        // own optional members lose theirs.
        assert_eq!(back["response"]["status"], Value::Null);
        assert!(back["response"].get("status").is_some());
        assert!(back["metadata"].get("promptId").is_none());
        assert!(back.get("properties").is_none());
        assert!(back.get("cacheHit").is_none());
        assert_eq!(back, pezzo_without_spec_nulls(&body));
    }

    #[test]
    fn canonical_fields_of_a_success() {
        let ev = to_canonical(&pezzo_ts_success());
        assert_eq!(ev.provider, "openai");
        assert_eq!(ev.model.as_deref(), Some("gpt-3.5-turbo"));
        assert_eq!(ev.api_type.as_deref(), Some("chat-completions"));
        assert_eq!(ev.status, Some(Status::Success));
        assert_eq!(ev.error_type, None);
        assert_eq!(
            ev.usage,
            Some(Usage {
                input_tokens: Some(15),
                output_tokens: Some(2)
            })
        );
        assert_eq!(
            ev.parameters,
            json!({"temperature": 0.7}).as_object().cloned()
        );
        assert_eq!(
            ev.metadata,
            json!({"userId": "u_123", "traceId": "t-9"})
                .as_object()
                .cloned()
        );
        assert_eq!(ev.environment.as_deref(), Some("Production"));
        assert_eq!(ev.client.as_deref(), Some("pezzo-ts"));
        assert_eq!(ev.client_version.as_deref(), Some("0.4.18"));
        assert_eq!(ev.cache_enabled, Some(false));
        assert_eq!(ev.cache_hit, None);
        assert_eq!(ev.response.http_status, Some(200));
        assert_eq!(
            ev.request.start_time.to_rfc3339(),
            "2024-05-01T10:00:00.000Z"
        );
        assert_eq!(
            ev.response.end_time.unix_millis() - ev.request.start_time.unix_millis(),
            1234
        );
        let px = ev.extra.pezzo.expect("pezzo extra");
        assert_eq!(
            px.fields,
            json!({"cacheHit": null}).as_object().cloned().expect("obj")
        );
        assert_eq!(
            px.metadata,
            json!({"type": "ChatCompletion"})
                .as_object()
                .cloned()
                .expect("obj")
        );
    }

    #[test]
    fn canonical_fields_of_errors() {
        let ev = to_canonical(&pezzo_ts_rate_limited());
        assert_eq!(ev.status, Some(Status::Error));
        assert_eq!(ev.error_type, Some(ErrorType::ProviderRateLimit));
        assert_eq!(
            ev.error_message.as_deref(),
            Some("Rate limit reached for gpt-4o")
        );
        assert_eq!(ev.usage, None);
        let ev = to_canonical(&pezzo_py_auth_error());
        assert_eq!(ev.error_type, Some(ErrorType::ProviderAuthError));
        assert_eq!(
            ev.error_message.as_deref(),
            Some("Incorrect API key provided: sk-abc.")
        );
        let ev = to_canonical(&pezzo_py_managed());
        assert_eq!(
            ev.prompt.id,
            Some(PromptId::Text("clnv2ko5a0001mh08ykzzz6xo".into()))
        );
    }

    #[test]
    fn unpriced_model_usage_moves_to_properties() {
        let mut body = pezzo_ts_success();
        body["request"]["body"]["model"] = json!("gpt-4o-mini");
        let out = from_canonical(&to_canonical(&body));
        assert_eq!(out["response"]["body"].get("usage"), None);
        assert_eq!(
            out["properties"],
            json!({
                "userId": "u_123", "traceId": "t-9",
                "llmlogd_usage": {"prompt_tokens": 15, "completion_tokens": 2, "total_tokens": 17}
            })
        );
        // Everything else is untouched (but for the spec's nulls).
        let mut expected = pezzo_without_spec_nulls(&body);
        expected["properties"] = out["properties"].clone();
        expected["response"]["body"]
            .as_object_mut()
            .expect("obj")
            .remove("usage");
        assert_eq!(out, expected);
        assert_eq!(validate(&out), Ok(()));
    }

    #[test]
    fn non_openai_providers_render_as_openai() {
        let mut body = pezzo_ts_success();
        body["metadata"]["provider"] = json!("Azure");
        body["request"]["body"]["model"] = json!("my-gpt4-deployment");
        let out = from_canonical(&to_canonical(&body));
        assert_eq!(out["metadata"]["provider"], json!("OpenAI"));
        assert_eq!(out["properties"]["llmlogd_provider"], json!("azure"));
        assert_eq!(
            out["properties"]["llmlogd_model"],
            json!("my-gpt4-deployment")
        );
        assert_eq!(out["request"]["body"], body["request"]["body"]);
        assert_eq!(validate(&out), Ok(()));
    }

    #[test]
    fn anthropic_event_converts_to_openai_shape() {
        // A canonical event as the PromptLayer parser or a native client would produce it.
        let ev = LlmEvent {
            provider: "anthropic".into(),
            model: Some("claude-3-5-sonnet-20241022".into()),
            request: crate::formats::canonical::Request {
                start_time: Timestamp::from_unix_seconds(1_714_557_600.0).expect("time"),
                body: Some(json!({
                    "model": "claude-3-5-sonnet-20241022", "max_tokens": 256, "system": "Be brief.",
                    "messages": [{"role": "user", "content": "Hi"}]
                })),
            },
            response: crate::formats::canonical::Response {
                end_time: Timestamp::from_unix_seconds(1_714_557_601.5).expect("time"),
                body: Some(json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-sonnet-20241022",
                    "content": [{"type": "text", "text": "Hello."}], "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"input_tokens": 10, "output_tokens": 3}
                })),
                http_status: None,
            },
            status: Some(Status::Success),
            environment: Some("prod".into()),
            ..LlmEvent::default()
        };
        let out = from_canonical(&ev);
        assert_eq!(
            out,
            json!({
                "metadata": {"environment": "prod", "provider": "OpenAI", "client": "llmlogd",
                             "clientVersion": env!("CARGO_PKG_VERSION"), "type": "ChatCompletion"},
                "properties": {
                    "llmlogd_usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    "llmlogd_provider": "anthropic",
                    "llmlogd_model": "claude-3-5-sonnet-20241022"
                },
                "request": {"timestamp": "2024-05-01T10:00:00.000Z", "body": {
                    "model": "claude-3-5-sonnet-20241022",
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "max_tokens": 256
                }},
                "response": {"timestamp": "2024-05-01T10:00:01.500Z", "body": {
                    "object": "chat.completion", "created": 1_714_557_601, "model": "claude-3-5-sonnet-20241022",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}]
                }, "status": 200}
            })
        );
        assert_eq!(validate(&out), Ok(()));
    }

    #[test]
    fn foreign_error_becomes_openai_error_body() {
        let ev = LlmEvent {
            provider: "openai".into(),
            model: Some("gpt-4o".into()),
            status: Some(Status::Error),
            error_type: Some(ErrorType::ProviderTimeout),
            error_message: Some("Request timed out after 30 seconds".into()),
            tags: Some(vec!["batch".into()]),
            extra: Extra {
                promptlayer: Some(PromptLayerExtra {
                    input: Some(
                        json!({"type": "chat", "messages": [{"role": "user", "content": "Hello"}]}),
                    ),
                    ..PromptLayerExtra::default()
                }),
                ..Extra::default()
            },
            ..LlmEvent::default()
        };
        let out = from_canonical(&ev);
        assert_eq!(out["response"]["status"], json!(408));
        assert_eq!(
            out["response"]["body"],
            json!({"error": {"message": "Request timed out after 30 seconds", "type": "provider_timeout", "param": null, "code": null}})
        );
        assert_eq!(
            out["request"]["body"],
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]})
        );
        assert_eq!(out["properties"], json!({"llmlogd_tags": ["batch"]}));
        assert_eq!(out["metadata"]["environment"], json!(DEFAULT_ENVIRONMENT));
        // And back: the error survives.
        let again = to_canonical(&out);
        assert_eq!(again.status, Some(Status::Error));
        assert_eq!(again.error_type, Some(ErrorType::ProviderTimeout));
        assert_eq!(
            again.error_message.as_deref(),
            Some("Request timed out after 30 seconds")
        );
    }

    #[test]
    fn attributes_of_a_report() {
        assert_eq!(
            attributes(&pezzo_ts_success()),
            Attributes {
                provider: Some("openai".into()),
                model: Some("gpt-3.5-turbo".into()),
                environment: Some("Production".into()),
                tags: vec![],
                canonical: true,
            }
        );
        assert_eq!(
            attributes(&json!(null)),
            Attributes {
                canonical: true,
                ..Attributes::default()
            }
        );
    }

    /// A report without `metadata.environment` (@pezzo/client with no environment set) is
    /// routed as the environment it is delivered with, on both ingest paths.
    #[test]
    fn a_report_without_an_environment_is_routed_as_the_default() {
        for env in [None, Some(Value::Null)] {
            let mut body = pezzo_ts_success();
            let meta = body["metadata"].as_object_mut().unwrap();
            meta.remove("environment");
            if let Some(v) = env {
                meta.insert("environment".into(), v);
            }
            assert_eq!(validate(&body), Ok(()));
            let want = Some(DEFAULT_ENVIRONMENT.to_string());
            assert_eq!(attributes(&body).environment, want, "{body}");
            let raw = serde_json::to_vec(&body).unwrap();
            assert_eq!(accept_bytes(&raw).expect("fast").attrs.environment, want);
            let delivered = from_canonical(&to_canonical(&body));
            assert_eq!(
                delivered["metadata"]["environment"],
                json!(DEFAULT_ENVIRONMENT)
            );
        }
    }

    #[test]
    fn success_reply_shape() {
        let parse = |s: String| serde_json::from_str::<Value>(&s).expect("JSON");
        let reply = parse(success_reply(&pezzo_ts_success()));
        let id = reply["reportId"].as_str().expect("id");
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(
            parse(success_reply(&pezzo_ts_success()))["reportId"],
            reply["reportId"]
        );
        // Members in the order Pezzo's server gives them, each as the report had it.
        let body = pezzo_ts_success();
        let mut want = vec!["reportId", "calculated"];
        want.extend(
            ["properties", "metadata", "request", "response"]
                .into_iter()
                .filter(|k| body.get(k).is_some()),
        );
        let keys: Vec<&str> = reply
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, want);
        assert_eq!(reply["request"], pezzo_ts_success()["request"]);
        assert_eq!(reply["response"], pezzo_ts_success()["response"]);
        assert_eq!(
            reply["calculated"],
            json!({"duration": 1234, "promptTokens": 15, "completionTokens": 2, "totalTokens": 17})
        );
        assert_eq!(reply["metadata"], pezzo_ts_success()["metadata"]);
        assert_eq!(reply["response"], pezzo_ts_success()["response"]);
        assert_eq!(reply["properties"], pezzo_ts_success()["properties"]);
    }

    /// What the `Value` path makes of a body: `Some((attributes, reply))` when it accepts it.
    fn value_path(raw: &[u8]) -> Option<(Attributes, Value)> {
        let v: Value = serde_json::from_slice(raw).ok()?;
        validate(&v).ok()?;
        let reply = serde_json::from_str(&success_reply(&v)).expect("reply JSON");
        Some((attributes(&v), reply))
    }

    /// The fast path accepts only what the `Value` path accepts, with the same attributes and
    /// (but for the random `reportId`) the same reply.
    fn agrees(raw: &[u8]) -> bool {
        let Some(fast) = accept_bytes(raw) else {
            return false;
        };
        let text = String::from_utf8_lossy(raw);
        let (attrs, mut want) =
            value_path(raw).unwrap_or_else(|| panic!("fast path accepted {text}"));
        assert_eq!(fast.attrs, attrs, "{text}");
        let mut got: Value = serde_json::from_str(&(fast.reply)(0)).expect("reply JSON");
        assert_eq!(got["reportId"].as_str().map(str::len), Some(36));
        got["reportId"] = Value::Null;
        want["reportId"] = Value::Null;
        assert_eq!(got, want, "{text}");
        // Same members in the same order.
        let keys = |v: &Value| v.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&got), keys(&want));
        true
    }

    #[test]
    fn fast_path_takes_the_official_bodies_as_the_value_path_does() {
        for (name, body) in pezzo_all() {
            if name.ends_with("_unreachable") {
                // Rare (a failed connection): left to the `Value` path, which accepts them.
                let raw = serde_json::to_vec(&body).unwrap();
                assert!(
                    accept_bytes(&raw).is_none() && value_path(&raw).is_some(),
                    "{name}"
                );
                continue;
            }
            assert!(agrees(&serde_json::to_vec(&body).unwrap()), "{name}");
            assert!(
                agrees(&serde_json::to_vec_pretty(&body).unwrap()),
                "{name} pretty"
            );
        }
    }

    #[test]
    fn fast_path_echoes_members_byte_for_byte() {
        let raw = br#"{"metadata":{"provider":"OpenAI","client":"pezzo-ts","clientVersion":"0.4.18"},
            "request":{"timestamp":"2024-05-01T10:00:00.000Z","body":{"model":"gpt-4o","t":0.70, "s":"caf\u00e9"}},
            "response":{"timestamp":"2024-05-01T10:00:01.500Z","body":{"usage":{"prompt_tokens":3,"completion_tokens":4}},"status":200}}"#;
        assert!(agrees(raw));
        let reply = (accept_bytes(raw).expect("accepted").reply)(0);
        assert!(reply.contains(r#","request":{"timestamp":"2024-05-01T10:00:00.000Z","body":{"model":"gpt-4o","t":0.70, "s":"caf\u00e9"}},"#), "{reply}");
        assert!(reply.contains(r#""calculated":{"duration":1500,"promptTokens":3,"completionTokens":4,"totalTokens":7}"#), "{reply}");
    }

    /// Every variation of an official body: wherever the `Value` path refuses, the fast path
    /// declines too (and the `Value` path names the problem); where it accepts, they agree.
    #[test]
    fn fast_path_never_accepts_what_validate_refuses() {
        let edits: Vec<(&str, Value)> = vec![
            ("/metadata/provider", json!("Gemini")),
            ("/metadata/provider", json!(null)),
            ("/metadata/provider", json!(5)),
            ("/metadata/provider", json!("Anthropic")),
            ("/metadata/client", json!(null)),
            ("/metadata/client", json!(1)),
            ("/metadata/clientVersion", json!(["1"])),
            ("/metadata/environment", json!(null)),
            ("/metadata/environment", json!(3)),
            ("/metadata/environment", json!("Staging")),
            ("/metadata/promptId", json!(null)),
            ("/metadata/promptId", json!(7)),
            ("/metadata/promptId", json!("p1")),
            ("/metadata", json!(["OpenAI", "c", "v"])),
            ("/metadata", json!(null)),
            ("/properties", json!(null)),
            ("/properties", json!(["a"])),
            ("/properties", json!("x")),
            ("/cacheEnabled", json!(null)),
            ("/cacheEnabled", json!("no")),
            ("/cacheHit", json!(0)),
            ("/cacheHit", json!(true)),
            ("/request", json!(null)),
            ("/request", json!(["2024-05-01T10:00:00.000Z", {}])),
            ("/request/timestamp", json!("yesterday")),
            ("/request/timestamp", json!(1_714_557_601)),
            ("/request/timestamp", json!(null)),
            ("/request/timestamp", json!("2024-05-01T10:00:00+02:00")),
            ("/request/body", json!(null)),
            ("/request/body", json!([])),
            ("/request/body", json!("hi")),
            ("/request/body/model", json!(5)),
            ("/request/body/model", json!(null)),
            ("/request/status", json!("anything")),
            ("/response/status", json!(99)),
            ("/response/status", json!(600)),
            ("/response/status", json!(200.0)),
            ("/response/status", json!(200.5)),
            ("/response/status", json!("200")),
            ("/response/status", json!(null)),
            ("/response/body", json!(null)),
            ("/response/body/usage", json!(null)),
            ("/response/body/usage", json!(5)),
            ("/response/body/usage", json!({"prompt_tokens": 1.5})),
            ("/response/body/usage", json!({"prompt_tokens": 10})),
            ("/response/timestamp", json!(7)),
        ];
        let (mut fast, mut refused) = (0, 0);
        for (name, base) in pezzo_all() {
            for (ptr, value) in &edits {
                let mut body = base.clone();
                let Some(slot) = body.pointer_mut(ptr) else {
                    continue;
                };
                *slot = value.clone();
                let raw = serde_json::to_vec(&body).unwrap();
                if agrees(&raw) {
                    fast += 1;
                } else if value_path(&raw).is_none() {
                    refused += 1;
                }
            }
            // Members the report must have, removed one at a time.
            for (parent, key) in [
                ("", "metadata"),
                ("", "request"),
                ("", "response"),
                ("/metadata", "provider"),
                ("/metadata", "client"),
                ("/metadata", "clientVersion"),
                ("/metadata", "environment"),
                ("/request", "timestamp"),
                ("/response", "body"),
            ] {
                let mut body = base.clone();
                if let Some(Value::Object(m)) = body.pointer_mut(parent) {
                    m.shift_remove(key);
                }
                let raw = serde_json::to_vec(&body).unwrap();
                if !agrees(&raw) {
                    // Both are optional where the clients leave them out (`validate`).
                    assert!(
                        key == "environment" || key == "body" || value_path(&raw).is_none(),
                        "{name} without {key}"
                    );
                }
            }
        }
        // Both outcomes were exercised: the checks above could fail.
        assert!(fast > 40, "{fast} accepted on the fast path");
        assert!(refused > 60, "{refused} refused");
        // Text-level cases the Value path settles: a repeated member, an array at the top,
        // trailing bytes, a lone surrogate escape, an exponent.
        let ok = String::from_utf8(serde_json::to_vec(&pezzo_ts_success()).unwrap()).unwrap();
        for raw in [
            ok.replacen("{\"metadata\":", "{\"metadata\":{},\"metadata\":", 1),
            format!("[{ok}]"),
            format!("{ok} x"),
            ok.replace("You are helpful.", "\\ud800"),
            ok.replace("\"temperature\":0.7", "\"temperature\":7e-1"),
        ] {
            assert!(accept_bytes(raw.as_bytes()).is_none(), "{raw}");
        }
    }
}
