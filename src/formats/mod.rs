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
            TrackKind::Group => "/library-track-group",
        }
    }
}
