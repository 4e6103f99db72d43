//! Wire formats (placeholder until the full module lands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Native,
    Pezzo,
    PromptLayer,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    Score,
    Metadata,
    Prompt,
    Group,
}
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub environment: Option<String>,
    pub tags: Vec<String>,
    pub canonical: bool,
}
impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Pezzo => "pezzo",
            Format::PromptLayer => "promptlayer",
        }
    }
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "native" => Some(Format::Native),
            "pezzo" => Some(Format::Pezzo),
            "promptlayer" => Some(Format::PromptLayer),
            _ => None,
        }
    }
}
impl TrackKind {
    pub fn path(self) -> &'static str {
        match self {
            TrackKind::Score => "/library-track-score",
            TrackKind::Metadata => "/library-track-metadata",
            TrackKind::Prompt => "/library-track-prompt",
            TrackKind::Group => "/track-group",
        }
    }
}
#[derive(Debug, Clone, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}
pub mod pezzo {
    use super::*;
    use serde_json::Value;
    pub fn validate(_b: &Value) -> Result<(), Vec<FieldError>> {
        Ok(())
    }
    pub fn attributes(_b: &Value) -> Attributes {
        Attributes::default()
    }
    pub fn success_reply(b: &Value) -> Value {
        b.clone()
    }
}
pub mod promptlayer {
    use super::*;
    use serde_json::Value;
    pub fn validate(_b: &Value) -> Result<(), Vec<FieldError>> {
        Ok(())
    }
    pub fn validate_track(_k: TrackKind, _b: &Value) -> Result<(), Vec<FieldError>> {
        Ok(())
    }
    pub fn attributes(_b: &Value) -> Attributes {
        Attributes::default()
    }
    pub fn log_reply(id: u64, _b: &Value) -> Value {
        serde_json::json!({"id": id})
    }
    pub fn track_request_id(b: &Value) -> Option<u64> {
        b.get("request_id")?.as_u64()
    }
    pub fn set_track_request_id(b: &mut Value, id: u64) {
        b["request_id"] = id.into();
    }
    pub fn set_track_api_key(b: &mut Value, k: &str) {
        b["api_key"] = k.into();
    }
}
pub mod native {
    use super::*;
    use serde_json::Value;
    pub fn attributes(_b: &Value) -> Attributes {
        Attributes::default()
    }
}

pub fn render(
    _kind: crate::event::EventKind,
    _payload: &[u8],
    _to: Format,
) -> Result<Vec<u8>, String> {
    Err("conversion not available yet".into())
}
