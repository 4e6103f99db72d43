//! The one event type every stage shares.
//!
//! Ingest turns a request into [`NewEvent`]s (payload bytes exactly as the app sent them, plus
//! what routing needs); the queue stores them and hands back [`StoredEvent`]s to delivery. The
//! payload is never re-serialised on the way: a sink that speaks the event's own format sends
//! the app's bytes; a sink of another format converts through `formats`.

use bytes::Bytes;

use crate::config::Secret;
use crate::formats::{Attributes, Format, TrackKind};

/// What an event is: which wire format it arrived in, and for PromptLayer whether it is a log
/// or a follow-up (`/library-track-*`) that refers to an earlier log by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Native,
    Pezzo,
    PromptLayerLog,
    PromptLayerTrack(TrackKind),
    /// `POST /create-group`: the local group id is this event's seq; the sink creates the
    /// group remotely and remembers the service's id for `/track-group` follow-ups.
    PromptLayerCreateGroup,
    /// `POST /track-request`: what the PromptLayer SDKs' OpenAI/Anthropic wrappers send (the
    /// call's kwargs and response). Delivered as is; its local id is this event's seq.
    PromptLayerTrackRequest,
}

impl EventKind {
    /// The wire format, as routing (`route.formats`) sees it.
    pub fn format(self) -> Format {
        match self {
            EventKind::Native => Format::Native,
            EventKind::Pezzo => Format::Pezzo,
            EventKind::PromptLayerLog
            | EventKind::PromptLayerTrack(_)
            | EventKind::PromptLayerCreateGroup
            | EventKind::PromptLayerTrackRequest => Format::PromptLayer,
        }
    }

    /// The byte stored in a queue record. Never renumber: records on disk carry it.
    pub fn code(self) -> u8 {
        match self {
            EventKind::Native => 0,
            EventKind::Pezzo => 1,
            EventKind::PromptLayerLog => 2,
            EventKind::PromptLayerTrack(TrackKind::Score) => 3,
            EventKind::PromptLayerTrack(TrackKind::Metadata) => 4,
            EventKind::PromptLayerTrack(TrackKind::Prompt) => 5,
            EventKind::PromptLayerTrack(TrackKind::Group) => 6,
            EventKind::PromptLayerCreateGroup => 7,
            EventKind::PromptLayerTrackRequest => 8,
        }
    }

    pub fn from_code(c: u8) -> Option<EventKind> {
        Some(match c {
            0 => EventKind::Native,
            1 => EventKind::Pezzo,
            2 => EventKind::PromptLayerLog,
            3 => EventKind::PromptLayerTrack(TrackKind::Score),
            4 => EventKind::PromptLayerTrack(TrackKind::Metadata),
            5 => EventKind::PromptLayerTrack(TrackKind::Prompt),
            6 => EventKind::PromptLayerTrack(TrackKind::Group),
            7 => EventKind::PromptLayerCreateGroup,
            8 => EventKind::PromptLayerTrackRequest,
            _ => return None,
        })
    }

    /// Follow-ups and group creation carry the app's key in their body and mean something
    /// only to PromptLayer: they are routed to PromptLayer sinks alone, never to a collector.
    pub fn promptlayer_only(self) -> bool {
        matches!(
            self,
            EventKind::PromptLayerTrack(_)
                | EventKind::PromptLayerCreateGroup
                | EventKind::PromptLayerTrackRequest
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Native => "native",
            EventKind::Pezzo => "pezzo",
            EventKind::PromptLayerLog => "promptlayer",
            EventKind::PromptLayerTrack(TrackKind::Score) => "promptlayer-track-score",
            EventKind::PromptLayerTrack(TrackKind::Metadata) => "promptlayer-track-metadata",
            EventKind::PromptLayerTrack(TrackKind::Prompt) => "promptlayer-track-prompt",
            EventKind::PromptLayerTrack(TrackKind::Group) => "promptlayer-track-group",
            EventKind::PromptLayerCreateGroup => "promptlayer-create-group",
            EventKind::PromptLayerTrackRequest => "promptlayer-track-request",
        }
    }
}

/// Credentials the app sent with the event (Pezzo's headers, PromptLayer's `X-API-KEY` or
/// body `api_key`). Used for delivery only where the sink has no key of its own (README).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCredentials {
    pub api_key: Option<Secret>,
    pub project_id: Option<String>,
}

impl ClientCredentials {
    pub fn is_empty(&self) -> bool {
        self.api_key.is_none() && self.project_id.is_none()
    }
}

/// An event accepted by ingest, not yet stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    /// The JSON bytes as the app sent them (one object).
    pub payload: Bytes,
    /// Routing attributes, read once at ingest.
    pub attrs: Attributes,
    pub creds: ClientCredentials,
}

/// An event as the queue holds it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Position in the log; also the local id llmlogd returns to apps.
    pub seq: u64,
    /// Stable id sent to receivers for de-duplication (`Idempotency-Key`, envelope `id`).
    pub id: uuid::Uuid,
    pub kind: EventKind,
    /// Milliseconds since the Unix epoch when ingest received it.
    pub received_ms: u64,
    /// Ids of the sinks it was routed to (see `queue` for how ids are assigned).
    pub routes: Vec<u16>,
    pub creds: ClientCredentials,
    pub payload: Bytes,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_codes_round_trip() {
        for c in 0..=8u8 {
            let k = EventKind::from_code(c).unwrap();
            assert_eq!(k.code(), c);
        }
        assert!(EventKind::from_code(9).is_none());
    }
}
