//! Wire formats: parsing, strict validation, the canonical event and conversion both ways.
//!
//! llmlogd accepts LLM-request log events in the wire formats of the services it forwards to, so an
//! app using an official client only changes its base URL:
//!
//! - [`pezzo`]: `POST /api/reporting/v2/request` (Pezzo's `CreateReportDto`),
//! - [`promptlayer`]: `POST /log-request` plus the follow-ups of [`TrackKind`],
//! - [`native`]: llmlogd's own events, any JSON object; those carrying the canonical schema marker
//!   convert.
//!
//! Every format parses into one [`canonical::LlmEvent`] and renders from it, so an event received
//! in one format can be delivered in another. Each module offers the same verbs: `validate`
//! (all problems at once, as [`FieldError`]s), `to_canonical` (assumes a validated body, but never
//! panics on any `Value`), `from_canonical` (always renders a body its own `validate` accepts) and
//! `attributes` (what routing needs).
//!
//! Nothing here does I/O; the module is pure functions over `serde_json::Value`.

pub mod canonical;
mod check;
mod convert;
pub mod native;
pub mod pezzo;
pub mod promptlayer;
#[cfg(test)]
mod testdata;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The wire format an event arrived in (and the format a sink delivers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// llmlogd's own events (see [`native`]).
    Native,
    /// Pezzo's reporting API v2.
    Pezzo,
    /// PromptLayer's `/log-request`.
    PromptLayer,
}

impl Format {
    /// The lowercase name, as in config files and serde.
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Pezzo => "pezzo",
            Format::PromptLayer => "promptlayer",
        }
    }

    /// Same as [`Format::as_str`] (the name the placeholder module used).
    pub fn name(self) -> &'static str {
        self.as_str()
    }

    /// The format of a lowercase name.
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "native" => Some(Format::Native),
            "pezzo" => Some(Format::Pezzo),
            "promptlayer" => Some(Format::PromptLayer),
            _ => None,
        }
    }
}

/// PromptLayer follow-up calls that annotate a logged request after the fact.
///
/// Their bodies carry `api_key` and the `request_id` PromptLayer returned for `/log-request`, so a
/// forwarder must swap in the remote id (see [`promptlayer::set_track_request_id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    /// `score` (0..=100) with an optional `name`.
    Score,
    /// `metadata`: string-to-string pairs.
    Metadata,
    /// `prompt_name`, `prompt_input_variables`, optional `version`/`label`.
    Prompt,
    /// `group_id`.
    Group,
}

impl TrackKind {
    /// All kinds, for routing tables.
    pub const ALL: [TrackKind; 4] = [
        TrackKind::Score,
        TrackKind::Metadata,
        TrackKind::Prompt,
        TrackKind::Group,
    ];

    /// The path the official SDKs POST to (and so the path to deliver to).
    ///
    /// Groups are the odd one out: both SDKs (PyPI promptlayer 1.5.16, npm promptlayer 1.3.6)
    /// post to `/track-group`, not `/library-track-group`.
    pub fn path(&self) -> &'static str {
        match self {
            TrackKind::Score => "/library-track-score",
            TrackKind::Metadata => "/library-track-metadata",
            TrackKind::Prompt => "/library-track-prompt",
            TrackKind::Group => "/track-group",
        }
    }

    /// The kind for a request path; accepts `/library-track-group` too, and one trailing slash.
    pub fn from_path(path: &str) -> Option<TrackKind> {
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/library-track-score" => Some(TrackKind::Score),
            "/library-track-metadata" => Some(TrackKind::Metadata),
            "/library-track-prompt" => Some(TrackKind::Prompt),
            "/track-group" | "/library-track-group" => Some(TrackKind::Group),
            _ => None,
        }
    }
}

/// One problem with one field of a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// JSON path of the field: `metadata.provider`, `tags[3]`, `metadata["a.b"]`; `$` is the body.
    pub field: String,
    /// What is wrong, for a human.
    pub problem: String,
}

/// What ingest needs of a body that a format's fast path (`accept_bytes`) accepted: the
/// routing attributes and the reply, which may carry the local id the event is stored under.
pub struct FastAccepted {
    pub attrs: Attributes,
    pub reply: Box<dyn FnOnce(u64) -> String + Send>,
}

/// Routing attributes, extracted from a body of any format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Attributes {
    /// Lowercase provider id: `openai`, `anthropic`, `azure`, or the source's name lowercased.
    pub provider: Option<String>,
    /// The model name as sent.
    pub model: Option<String>,
    /// Pezzo `metadata.environment`, PromptLayer `metadata.environment`, native `environment`.
    pub environment: Option<String>,
    /// PromptLayer `tags`, native `tags`; Pezzo has none.
    pub tags: Vec<String>,
    /// Whether the body converts to a canonical event (and so to other formats): always for
    /// Pezzo and PromptLayer logs, for native bodies only with the schema marker.
    pub canonical: bool,
}

/// Why a body could not be rendered in another format.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The stored payload is not JSON.
    #[error("payload is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A native body without the canonical schema marker only goes to native sinks.
    #[error("native event is not in the canonical {} shape", canonical::SCHEMA)]
    NotCanonical,
}

/// Renders a body received as `from` in format `to`, through the canonical event.
///
/// Same-format renders go through the canonical event too: that is identity for bodies from the
/// official clients, and it is what applies the Pezzo 500-avoidance (see [`pezzo`]) to Pezzo
/// reports made with unpriced models. A native body renders as native unchanged.
pub fn render(from: Format, body: &Value, to: Format) -> Result<Value, RenderError> {
    if from == Format::Native && to == Format::Native {
        return Ok(body.clone());
    }
    let ev = to_canonical(from, body).ok_or(RenderError::NotCanonical)?;
    Ok(from_canonical(to, &ev))
}

/// [`render`] for stored bytes.
pub fn render_payload(from: Format, payload: &[u8], to: Format) -> Result<Vec<u8>, RenderError> {
    let body: Value = serde_json::from_slice(payload)?;
    Ok(serde_json::to_vec(&render(from, &body, to)?)?)
}

/// Validates a body of `format` (native: any JSON object; one with the schema marker must parse).
pub fn validate(format: Format, body: &Value) -> Result<(), Vec<FieldError>> {
    match format {
        Format::Native => native::validate(body),
        Format::Pezzo => pezzo::validate(body),
        Format::PromptLayer => promptlayer::validate(body),
    }
}

/// The canonical event for a body of `format`; `None` only for native bodies without the schema.
pub fn to_canonical(format: Format, body: &Value) -> Option<canonical::LlmEvent> {
    match format {
        Format::Native => native::to_event(body),
        Format::Pezzo => Some(pezzo::to_canonical(body)),
        Format::PromptLayer => Some(promptlayer::to_canonical(body)),
    }
}

/// Renders `ev` in `format`.
pub fn from_canonical(format: Format, ev: &canonical::LlmEvent) -> Value {
    match format {
        Format::Native => native::from_canonical(ev),
        Format::Pezzo => pezzo::from_canonical(ev),
        Format::PromptLayer => promptlayer::from_canonical(ev),
    }
}

/// Routing attributes of a body of `format`.
pub fn attributes(format: Format, body: &Value) -> Attributes {
    match format {
        Format::Native => native::attributes(body),
        Format::Pezzo => pezzo::attributes(body),
        Format::PromptLayer => promptlayer::attributes(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn track_paths_round_trip() {
        for kind in TrackKind::ALL {
            assert_eq!(TrackKind::from_path(kind.path()), Some(kind));
        }
        assert_eq!(
            TrackKind::from_path("/library-track-group"),
            Some(TrackKind::Group)
        );
        assert_eq!(
            TrackKind::from_path("/library-track-score/"),
            Some(TrackKind::Score)
        );
        assert_eq!(TrackKind::from_path("/log-request"), None);
    }

    #[test]
    fn format_serde_is_lowercase() {
        assert_eq!(
            serde_json::to_value(Format::PromptLayer).expect("serialises"),
            json!("promptlayer")
        );
        let f: Format = serde_json::from_value(json!("pezzo")).expect("parses");
        assert_eq!(f, Format::Pezzo);
        assert_eq!(Format::Native.as_str(), "native");
    }

    #[test]
    fn field_error_displays_path_and_problem() {
        let e = FieldError {
            field: "tags[3]".into(),
            problem: "must be a string".into(),
        };
        assert_eq!(e.to_string(), "tags[3]: must be a string");
    }

    #[test]
    fn dispatch_by_format() {
        let body = testdata::pezzo_ts_success();
        assert_eq!(validate(Format::Pezzo, &body), Ok(()));
        assert!(validate(Format::PromptLayer, &body).is_err());
        assert_eq!(validate(Format::Native, &body), Ok(()));
        let ev = to_canonical(Format::Pezzo, &body).expect("pezzo converts");
        assert_eq!(
            from_canonical(Format::Pezzo, &ev),
            testdata::pezzo_without_spec_nulls(&body)
        );
        assert_eq!(to_canonical(Format::Native, &body), None);
        let native = from_canonical(Format::Native, &ev);
        assert_eq!(to_canonical(Format::Native, &native), Some(ev));
        assert_eq!(
            attributes(Format::Pezzo, &body).model.as_deref(),
            Some("gpt-3.5-turbo")
        );
        assert!(attributes(Format::Pezzo, &body).canonical);
        assert_eq!(
            Format::from_name(Format::PromptLayer.name()),
            Some(Format::PromptLayer)
        );
    }

    #[test]
    fn render_between_formats() {
        let body = testdata::pezzo_ts_success();
        assert_eq!(
            render(Format::Pezzo, &body, Format::Pezzo).expect("renders"),
            testdata::pezzo_without_spec_nulls(&body)
        );
        let pl = render(Format::Pezzo, &body, Format::PromptLayer).expect("renders");
        assert_eq!(promptlayer::validate(&pl), Ok(()));
        let bytes = render_payload(
            Format::PromptLayer,
            pl.to_string().as_bytes(),
            Format::Pezzo,
        )
        .expect("renders");
        let pz: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(pezzo::validate(&pz), Ok(()));
        let opaque = json!({"hello": "world"});
        assert_eq!(
            render(Format::Native, &opaque, Format::Native).expect("as is"),
            opaque
        );
        assert!(matches!(
            render(Format::Native, &opaque, Format::Pezzo),
            Err(RenderError::NotCanonical)
        ));
        assert!(matches!(
            render_payload(Format::Pezzo, b"{nope", Format::PromptLayer),
            Err(RenderError::Json(_))
        ));
    }

    /// Values that tend to break parsers.
    fn odd_values() -> Vec<Value> {
        vec![
            Value::Null,
            json!(true),
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1e300),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(253_402_300_800u64),
            json!(""),
            json!("x"),
            json!("2024-01-01T00:00:00Z"),
            json!("9999-12-31T23:59:59-23:59"),
            json!("\u{1F980}".repeat(1100)),
            json!([]),
            json!([null, 1, "a", {}]),
            json!({}),
            json!({"type": "chat", "messages": [{"role": "tool"}]}),
            json!({"error": null, "type": "error", "choices": 3, "content": "x", "usage": {"prompt_tokens": -1}}),
        ]
    }

    /// Paths (keys / indices) to every node of `v`.
    fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
        out.push(prefix.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    prefix.push(json!(k));
                    paths(child, prefix, out);
                    prefix.pop();
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    prefix.push(json!(i));
                    paths(child, prefix, out);
                    prefix.pop();
                }
            }
            _ => {}
        }
    }

    /// `v` with the node at `path` replaced (`Some`) or removed (`None`).
    fn mutate(v: &Value, path: &[Value], new: Option<&Value>) -> Value {
        let mut out = v.clone();
        let Some((last, parents)) = path.split_last() else {
            return new.cloned().unwrap_or(Value::Null);
        };
        let mut node = &mut out;
        for seg in parents {
            node = match seg {
                Value::String(k) => &mut node[k.as_str()],
                _ => &mut node[seg.as_u64().unwrap_or(0) as usize],
            };
        }
        match (node, last, new) {
            (Value::Object(m), Value::String(k), Some(n)) => {
                m.insert(k.clone(), n.clone());
            }
            (Value::Object(m), Value::String(k), None) => {
                m.remove(k);
            }
            (Value::Array(a), i, Some(n)) => {
                if let Some(slot) = a.get_mut(i.as_u64().unwrap_or(0) as usize) {
                    *slot = n.clone();
                }
            }
            (Value::Array(a), i, None) => {
                let i = i.as_u64().unwrap_or(0) as usize;
                if i < a.len() {
                    a.remove(i);
                }
            }
            _ => {}
        }
        out
    }

    /// Runs every public function on `body`; renderers must produce bodies their own
    /// validators accept, whatever went in.
    fn exercise(body: &Value) {
        let _ = pezzo::validate(body);
        let _ = promptlayer::validate(body);
        let _ = native::validate(body);
        for kind in TrackKind::ALL {
            let _ = promptlayer::validate_track(kind, body);
        }
        let _ = pezzo::attributes(body);
        let _ = promptlayer::attributes(body);
        let _ = native::attributes(body);
        let _ = pezzo::success_reply(body);
        let _ = promptlayer::log_reply(u64::MAX, body);
        let _ = promptlayer::track_request_id(body);
        let mut b = body.clone();
        promptlayer::set_track_request_id(&mut b, 1);
        promptlayer::set_track_api_key(&mut b, "k");

        let events = [pezzo::to_canonical(body), promptlayer::to_canonical(body)]
            .into_iter()
            .chain(native::to_canonical(body));
        for ev in events {
            let pz = pezzo::from_canonical(&ev);
            assert_eq!(pezzo::validate(&pz), Ok(()), "pezzo render of {body}");
            let pl = promptlayer::from_canonical(&ev);
            assert_eq!(
                promptlayer::validate(&pl),
                Ok(()),
                "promptlayer render of {body}"
            );
            let nv = native::from_canonical(&ev);
            let back = native::to_canonical(&nv).expect("native form parses");
            assert_eq!(
                promptlayer::from_canonical(&back),
                pl,
                "native round trip of {body}"
            );
            // Second generation, across formats.
            let pl2 = promptlayer::from_canonical(&pezzo::to_canonical(&pz));
            assert_eq!(promptlayer::validate(&pl2), Ok(()), "pezzo->pl of {body}");
            let pz2 = pezzo::from_canonical(&promptlayer::to_canonical(&pl));
            assert_eq!(pezzo::validate(&pz2), Ok(()), "pl->pezzo of {body}");
        }
    }

    #[test]
    fn odd_values_never_panic_and_renders_stay_valid() {
        let mut fixtures: Vec<Value> = testdata::pezzo_all().into_iter().map(|(_, v)| v).collect();
        fixtures.extend(testdata::pl_all().into_iter().map(|(_, v)| v));
        fixtures.push(testdata::pl_track_prompt());
        let ev = pezzo::to_canonical(&testdata::pezzo_ts_success());
        fixtures.push(native::from_canonical(&ev));
        let odd = odd_values();
        let mut runs = 0;
        for body in odd.iter().chain(fixtures.iter()) {
            exercise(body);
            let mut all = Vec::new();
            paths(body, &mut Vec::new(), &mut all);
            for path in all.iter().filter(|p| !p.is_empty()) {
                exercise(&mutate(body, path, None));
                for o in &odd {
                    exercise(&mutate(body, path, Some(o)));
                    runs += 1;
                }
            }
        }
        assert!(runs > 5_000, "only {runs} mutations");
    }
}
