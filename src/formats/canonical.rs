//! The canonical LLM event: one model every wire format parses into and renders from.
//!
//! # Contract
//!
//! - **Raw bodies are the truth about content.** `request.body` / `response.body` hold the
//!   provider's own JSON (OpenAI chat/completions or Anthropic messages shape). PromptLayer events
//!   carry no raw bodies, so its parser builds provider-shaped ones from the `input`/`output`
//!   templates (see `convert`).
//! - **Summary fields are filled by every parser** (model, parameters, usage, status, error...),
//!   from wherever the source keeps them: PromptLayer sends them as fields, Pezzo implies them by
//!   its bodies. A renderer for a format that carries them separately (PromptLayer) uses them; a
//!   renderer that carries only bodies (Pezzo) uses the bodies.
//! - **Nothing is lost.** Whatever a parser did not absorb into a typed field (fields outside the
//!   spec, spec fields sent as `null`, values of the wrong type in unvalidated input, and the
//!   PromptLayer templates whose conversion is not bijective) is kept verbatim in [`Extra`], per
//!   source format. Only that format's renderer reads it back, filling keys it did not produce
//!   itself, so a same-format round trip returns the same JSON while a cross-format one is not
//!   polluted by the other format's fields.
//! - **Serde form is the native format.** `LlmEvent` serialises with `"schema": "llmlogd.llm/v1"`
//!   ([`SCHEMA`]); [`super::native`] recognises events by that marker. Times serialise as RFC 3339
//!   strings and parse from strings or Unix seconds.

use std::fmt;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// The schema marker of the canonical (native) event.
pub const SCHEMA: &str = "llmlogd.llm/v1";

/// Largest Unix second RFC 3339 can express (9999-12-31T23:59:59Z).
const MAX_UNIX_SECONDS: f64 = 253_402_300_799.0;
/// Numbers above this are Unix milliseconds in PromptLayer times ([`Timestamp::from_unix_number`]).
pub const MILLIS_ABOVE: f64 = 2e10;

/// Marker field: serialises as [`SCHEMA`] and refuses to deserialise anything else, so a native
/// body only converts when it claims to be a canonical event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schema;

impl Serialize for Schema {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(SCHEMA)
    }
}

impl<'de> Deserialize<'de> for Schema {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == SCHEMA {
            Ok(Schema)
        } else {
            Err(serde::de::Error::custom(format!(
                "unknown schema {s:?}, expected {SCHEMA:?}"
            )))
        }
    }
}

/// A point in time, remembering the exact text the source sent.
///
/// Renderers reuse `text` when present, because chrono cannot know whether a client wrote
/// `.000Z`, `Z` or `+00:00`; that keeps same-format round trips byte-exact. Times that arrived as
/// Unix seconds have no text and render as RFC 3339 (see the renderers for the exact form).
#[derive(Clone, PartialEq, Eq)]
pub struct Timestamp {
    at: DateTime<FixedOffset>,
    text: Option<String>,
}

impl Timestamp {
    /// A time without source text.
    pub fn from_datetime(at: DateTime<FixedOffset>) -> Self {
        Timestamp { at, text: None }
    }

    /// Parses an RFC 3339 date-time (offset required), keeping the text.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let at = DateTime::parse_from_rfc3339(s).ok()?;
        Some(Timestamp {
            at,
            text: Some(s.to_string()),
        })
    }

    /// Unix seconds (integer or float) within 0..=253402300799, rounded to the microsecond:
    /// a float of ~1.7e9 carries about 0.2 µs of precision, so finer digits are noise.
    pub fn from_unix_seconds(secs: f64) -> Option<Self> {
        if !(0.0..=MAX_UNIX_SECONDS).contains(&secs) {
            return None;
        }
        // In range, so the product fits i64 comfortably (< 2.6e17).
        let micros = (secs * 1_000_000.0).round() as i64;
        let at = DateTime::from_timestamp_micros(micros)?;
        Some(Timestamp::from_datetime(at.fixed_offset()))
    }

    /// A number as PromptLayer reads one for a date-time: Unix seconds, or Unix
    /// **milliseconds** when it is above [`MILLIS_ABOVE`] (2e10 seconds would be the year
    /// 2603). That is pydantic's rule, which the service's API validates with; the JS SDK
    /// types the times `number`, so an app passing `Date.now()` sends milliseconds, which the
    /// service takes and llmlogd used to refuse.
    pub fn from_unix_number(n: f64) -> Option<Self> {
        if n > MILLIS_ABOVE {
            Self::from_unix_seconds(n / 1000.0)
        } else {
            Self::from_unix_seconds(n)
        }
    }

    /// From PromptLayer JSON: an RFC 3339 string, or a number read by
    /// [`Timestamp::from_unix_number`].
    pub fn from_promptlayer_json(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) => n.as_f64().and_then(Self::from_unix_number),
            other => Self::from_json(other),
        }
    }

    /// From JSON: an RFC 3339 string or Unix seconds.
    pub fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Self::parse_rfc3339(s),
            Value::Number(n) => n.as_f64().and_then(Self::from_unix_seconds),
            _ => None,
        }
    }

    /// The Unix epoch; the stand-in when unvalidated input has no usable time.
    pub fn epoch() -> Self {
        Timestamp::from_datetime(DateTime::<Utc>::UNIX_EPOCH.fixed_offset())
    }

    /// The instant, in the offset the source used.
    pub fn at(&self) -> DateTime<FixedOffset> {
        self.at
    }

    /// The text the source sent, if it sent a string.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The source text if it is in the usual form (see [`Self::conventional_text`]), else
    /// RFC 3339 with as many fraction digits as needed (0, 3, 6 or 9) and `Z` for UTC.
    pub fn to_rfc3339(&self) -> String {
        match self.conventional_text() {
            Some(t) => t.to_string(),
            None => self.at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        }
    }

    /// The source text, unless it uses RFC 3339's rarer spellings (a space or lower-case `t`
    /// between date and time, a lower-case `z`), which some servers' ISO 8601 checks refuse
    /// (class-validator's `IsDateString`, used by Pezzo, wants an upper-case `T`).
    pub fn conventional_text(&self) -> Option<&str> {
        self.text
            .as_deref()
            .filter(|t| t.as_bytes().get(10) == Some(&b'T') && !t.ends_with('z'))
    }

    /// The source text, or JavaScript's `toISOString()` form (UTC, milliseconds, `Z`), which is
    /// what the Pezzo clients send.
    pub fn to_iso_millis_utc(&self) -> String {
        match self.conventional_text() {
            Some(t) => t.to_string(),
            None => self
                .at
                .with_timezone(&Utc)
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        }
    }

    /// Milliseconds since the epoch.
    pub fn unix_millis(&self) -> i64 {
        self.at.timestamp_millis()
    }
}

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp::epoch()
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Timestamp::from_json(&v).ok_or_else(|| {
            serde::de::Error::custom("expected an RFC 3339 date-time or Unix seconds")
        })
    }
}

/// Outcome of the LLM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    /// Succeeded with issues (retries, degraded response).
    Warning,
    Error,
}

impl Status {
    /// PromptLayer's spelling.
    pub fn as_promptlayer(&self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Warning => "WARNING",
            Status::Error => "ERROR",
        }
    }

    /// From PromptLayer's spelling.
    pub fn from_promptlayer(s: &str) -> Option<Status> {
        match s {
            "SUCCESS" => Some(Status::Success),
            "WARNING" => Some(Status::Warning),
            "ERROR" => Some(Status::Error),
            _ => None,
        }
    }
}

/// Error categories; PromptLayer's table, the only taxonomy among the formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorType {
    ProviderTimeout,
    ProviderQuotaLimit,
    ProviderRateLimit,
    ProviderAuthError,
    ProviderError,
    TemplateRenderError,
    VariableMissingOrEmpty,
    UnknownError,
}

impl ErrorType {
    pub const ALL: [ErrorType; 8] = [
        ErrorType::ProviderTimeout,
        ErrorType::ProviderQuotaLimit,
        ErrorType::ProviderRateLimit,
        ErrorType::ProviderAuthError,
        ErrorType::ProviderError,
        ErrorType::TemplateRenderError,
        ErrorType::VariableMissingOrEmpty,
        ErrorType::UnknownError,
    ];

    /// PromptLayer's spelling, e.g. `PROVIDER_RATE_LIMIT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorType::ProviderTimeout => "PROVIDER_TIMEOUT",
            ErrorType::ProviderQuotaLimit => "PROVIDER_QUOTA_LIMIT",
            ErrorType::ProviderRateLimit => "PROVIDER_RATE_LIMIT",
            ErrorType::ProviderAuthError => "PROVIDER_AUTH_ERROR",
            ErrorType::ProviderError => "PROVIDER_ERROR",
            ErrorType::TemplateRenderError => "TEMPLATE_RENDER_ERROR",
            ErrorType::VariableMissingOrEmpty => "VARIABLE_MISSING_OR_EMPTY",
            ErrorType::UnknownError => "UNKNOWN_ERROR",
        }
    }

    /// From PromptLayer's spelling.
    pub fn parse(s: &str) -> Option<ErrorType> {
        ErrorType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The statuses PromptLayer allows this type with (its "Allowed Statuses" column).
    pub fn allowed_statuses(&self) -> &'static [Status] {
        match self {
            ErrorType::ProviderRateLimit
            | ErrorType::ProviderQuotaLimit
            | ErrorType::UnknownError => &[Status::Warning, Status::Error],
            ErrorType::VariableMissingOrEmpty => &[Status::Warning],
            ErrorType::ProviderTimeout
            | ErrorType::ProviderAuthError
            | ErrorType::ProviderError
            | ErrorType::TemplateRenderError => &[Status::Error],
        }
    }

    /// The HTTP status a provider would most plausibly have answered with.
    pub fn http_status(&self) -> u16 {
        match self {
            ErrorType::ProviderRateLimit | ErrorType::ProviderQuotaLimit => 429,
            ErrorType::ProviderAuthError => 401,
            ErrorType::ProviderTimeout => 408,
            ErrorType::TemplateRenderError | ErrorType::VariableMissingOrEmpty => 400,
            ErrorType::ProviderError | ErrorType::UnknownError => 500,
        }
    }
}

/// A prompt's id: PromptLayer uses integers, Pezzo cuid strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptId {
    Number(i64),
    Text(String),
}

/// The managed prompt the request was made from, if any.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// PromptLayer `prompt_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// PromptLayer `prompt_id`, Pezzo `metadata.promptId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<PromptId>,
    /// PromptLayer `prompt_version_number` (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_number: Option<u64>,
    /// PromptLayer `prompt_input_variables`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_variables: Option<Map<String, Value>>,
}

impl Prompt {
    pub fn is_empty(&self) -> bool {
        *self == Prompt::default()
    }
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (OpenAI `prompt_tokens`, Anthropic `input_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Completion tokens (OpenAI `completion_tokens`, Anthropic `output_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

/// The call as sent to the provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Request<B = Value> {
    pub start_time: Timestamp,
    /// Raw provider request body (an object), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<B>,
}

/// The provider's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response<B = Value> {
    pub end_time: Timestamp,
    /// Raw provider response body (an object; an error body for failed calls), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<B>,
    /// HTTP status of the provider call, when known (Pezzo clients send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
}

/// Pezzo fields not absorbed into typed fields, by the object they sat in.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PezzoExtra {
    /// Top level (e.g. `cacheHit: null`, fields outside the spec).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
    /// Inside `metadata` (e.g. `type: "ChatCompletion"`, `promptVersionSha`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    /// Inside `request`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub request: Map<String, Value>,
    /// Inside `response` (e.g. `status: null`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub response: Map<String, Value>,
}

/// PromptLayer fields not absorbed into typed fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptLayerExtra {
    /// Top level: fields outside the spec and spec fields sent as `null` (the Python SDK sends
    /// every field).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
    /// `provider` as sent, when the canonical lowercase id would not render back to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The `input` template as sent (template -> body -> template is not bijective).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The `output` template as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// Per-format leftovers; see the module docs. `pezzo` / `promptlayer` is `Some` (possibly
/// empty) exactly when the event was parsed from that format; renderers use that to know whether
/// they are re-rendering their own format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Extra {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pezzo: Option<PezzoExtra>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promptlayer: Option<PromptLayerExtra>,
}

impl Extra {
    pub fn is_empty(&self) -> bool {
        self.pezzo.is_none() && self.promptlayer.is_none()
    }
}

/// One LLM call, as llmlogd understands it.
///
/// `B` is how the provider's request and response bodies are held: as [`Value`]s, or, where
/// only validity matters (ingest's fast path), as [`serde::de::IgnoredAny`], which checks them
/// without building them. One definition, so both judge an event alike.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "B: Deserialize<'de> + Default"))]
pub struct LlmEvent<B = Value> {
    /// Always [`SCHEMA`] on the wire.
    pub schema: Schema,
    /// Lowercase provider id (`openai`, `azure`, `anthropic`, ...); see [`provider_id`].
    pub provider: String,
    /// The model name as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// API flavour in PromptLayer's vocabulary (`chat-completions`, `completions`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_type: Option<String>,
    pub request: Request<B>,
    pub response: Response<B>,
    /// `None`: not stated (PromptLayer's default, SUCCESS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<ErrorType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Cost in USD, as the source wrote the number (`0` and `0.0` differ in JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Number>,
    /// Model parameters (temperature, max_tokens, ...): PromptLayer `parameters`; for Pezzo the
    /// request body minus its content keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Key-value annotations: PromptLayer `metadata` (string values), Pezzo `properties` (any
    /// JSON values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// Pezzo `metadata.environment`; PromptLayer `metadata.environment` when it is a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Prompt::is_empty")]
    pub prompt: Prompt,
    /// 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u8>,
    /// PromptLayer SDKs' `score_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_name: Option<String>,
    /// Reporting client (Pezzo `metadata.client`, e.g. `pezzo-ts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Pezzo `metadata.clientVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_version: Option<String>,
    /// Pezzo `cacheEnabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_enabled: Option<bool>,
    /// Pezzo `cacheHit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl<B> LlmEvent<B> {
    /// Whether the call failed (`status` error).
    pub fn is_error(&self) -> bool {
        self.status == Some(Status::Error)
    }

    /// `price` as a float.
    pub fn price_usd(&self) -> Option<f64> {
        self.price.as_ref().and_then(Number::as_f64)
    }
}

/// Normalises a provider name to llmlogd's lowercase id: PromptLayer's `openai.azure` and the
/// usual Azure spellings become `azure`; everything else is lowercased as is.
pub fn provider_id(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    match lower.as_str() {
        "openai.azure" | "azure" | "azure-openai" | "azure_openai" | "azureopenai" => {
            "azure".to_string()
        }
        _ => lower,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_keep_text_and_parse_numbers() {
        let t = Timestamp::parse_rfc3339("2024-01-01T00:00:00.000Z").expect("valid");
        assert_eq!(t.to_rfc3339(), "2024-01-01T00:00:00.000Z");
        assert_eq!(t.unix_millis(), 1_704_067_200_000);

        let f = Timestamp::from_unix_seconds(1_700_000_000.123).expect("valid");
        assert_eq!(f.text(), None);
        assert_eq!(f.to_rfc3339(), "2023-11-14T22:13:20.123Z");
        assert_eq!(f.to_iso_millis_utc(), "2023-11-14T22:13:20.123Z");

        let i = Timestamp::from_json(&json!(1_700_000_000)).expect("valid");
        assert_eq!(i.to_rfc3339(), "2023-11-14T22:13:20Z");
        assert_eq!(i.to_iso_millis_utc(), "2023-11-14T22:13:20.000Z");

        assert!(Timestamp::from_json(&json!(-1)).is_none());
        assert!(Timestamp::from_json(&json!(1e12)).is_none());
        assert!(Timestamp::from_json(&json!("2024-01-01T00:00:00")).is_none());
        assert!(Timestamp::from_json(&json!(true)).is_none());

        // Rarer RFC 3339 spellings are accepted but re-rendered in the usual form.
        let odd = Timestamp::parse_rfc3339("2024-01-01 00:00:00.5z").expect("valid");
        assert_eq!(odd.text(), Some("2024-01-01 00:00:00.5z"));
        assert_eq!(odd.to_rfc3339(), "2024-01-01T00:00:00.500Z");
        assert_eq!(odd.to_iso_millis_utc(), "2024-01-01T00:00:00.500Z");
    }

    #[test]
    fn offsets_survive() {
        let t = Timestamp::from_datetime(
            DateTime::parse_from_rfc3339("2024-04-03T22:57:25.5+02:00").expect("valid"),
        );
        assert_eq!(t.to_rfc3339(), "2024-04-03T22:57:25.500+02:00");
        assert_eq!(t.to_iso_millis_utc(), "2024-04-03T20:57:25.500Z");
    }

    #[test]
    fn schema_marker_is_enforced() {
        let ev: LlmEvent = LlmEvent {
            provider: "openai".into(),
            ..LlmEvent::default()
        };
        let v = serde_json::to_value(&ev).expect("serialises");
        assert_eq!(
            v,
            json!({
                "schema": "llmlogd.llm/v1",
                "provider": "openai",
                "request": {"start_time": "1970-01-01T00:00:00Z"},
                "response": {"end_time": "1970-01-01T00:00:00Z"}
            })
        );
        let back: LlmEvent = serde_json::from_value(v.clone()).expect("parses");
        assert_eq!(back.provider, "openai");
        let mut wrong = v;
        wrong["schema"] = json!("something/v2");
        assert!(serde_json::from_value::<LlmEvent>(wrong).is_err());
    }

    #[test]
    fn error_type_table() {
        for t in ErrorType::ALL {
            assert_eq!(ErrorType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).expect("serialises"),
                json!(t.as_str())
            );
        }
        assert_eq!(
            ErrorType::VariableMissingOrEmpty.allowed_statuses(),
            &[Status::Warning]
        );
        assert_eq!(ErrorType::ProviderTimeout.http_status(), 408);
    }

    #[test]
    fn provider_ids() {
        assert_eq!(provider_id("OpenAI"), "openai");
        assert_eq!(provider_id("openai.azure"), "azure");
        assert_eq!(provider_id("Azure"), "azure");
        assert_eq!(provider_id("Anthropic"), "anthropic");
        assert_eq!(provider_id("google"), "google");
    }
}
