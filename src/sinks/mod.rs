//! Sinks: thin adapters from events to one remote service's requests.
//!
//! A sink only (1) builds a request from a batch of events and (2) reads what the service's
//! reply means for those events. Everything else (batching, concurrency, rate limits,
//! retries, Retry-After, the circuit, dead letters, cursors) is the delivery engine's, so the
//! three sinks behave the same under failure.

mod http;
mod pezzo;
mod promptlayer;

use bytes::Bytes;
use reqwest::header::{HeaderName, HeaderValue};

use crate::config::{Secret, SinkConfig, SinkKind};
use crate::event::StoredEvent;

pub use http::HttpSink;
pub use pezzo::PezzoSink;
pub use promptlayer::PromptLayerSink;

/// One HTTP request a sink wants sent.
#[derive(Debug, Clone)]
pub struct SinkRequest {
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The request carries the key the app sent with the event, not the sink's own: a
    /// refusal is about that app's key (that event), not the sink's.
    pub app_key: bool,
}

/// Why a sink cannot build a request for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// The event cannot be rendered for this service, now or ever (dead letter).
    Unrenderable(String),
    /// The event must wait for another one (a follow-up for a log not yet delivered).
    NotYet,
    /// Neither the sink's config nor the app gave an API key (pause the sink until reload).
    NoKey,
}

/// Whether the remote id of a PromptLayer log is known yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteId {
    Known(u64),
    /// The log is still queued for this sink.
    Pending,
    /// The log was not delivered by this sink (dead-lettered, or never routed to it).
    Unknown,
}

/// What the engine lets a sink look up while building.
pub trait BuildContext {
    fn remote_id(&self, local_seq: u64) -> RemoteId;
}

/// A sink's reading of a 2xx reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Delivered; with the service's id for the event where it gives one.
    Yes { remote_id: Option<u64> },
    /// A 2xx whose body says the service refused it (dead letter with this reason).
    Refused(String),
}

pub trait Sink: Send + Sync + 'static {
    /// How many events one request may carry: the batch size for the `http` sink, 1 for
    /// single-event APIs (the engine then sends a batch as concurrent requests).
    fn events_per_request(&self) -> usize;

    /// Builds one request for `events` (at most `events_per_request`).
    fn build(
        &self,
        events: &[&StoredEvent],
        ctx: &dyn BuildContext,
    ) -> Result<SinkRequest, BuildError>;

    /// Reads a 2xx reply for a single-event request (or the whole batch).
    fn accepted(&self, _events: &[&StoredEvent], _body: &[u8]) -> Accepted {
        Accepted::Yes { remote_id: None }
    }
}

/// Builds the sink a config names.
pub fn build(cfg: &SinkConfig) -> Box<dyn Sink> {
    match &cfg.kind {
        SinkKind::Http {
            url,
            encoding,
            gzip,
            headers,
        } => Box::new(HttpSink::new(
            url.clone(),
            *encoding,
            *gzip,
            headers,
            cfg.batch.max_events,
        )),
        SinkKind::Pezzo { url, project_id } => Box::new(PezzoSink::new(
            url.clone(),
            project_id.clone(),
            cfg.key.clone(),
        )),
        SinkKind::PromptLayer { url } => {
            Box::new(PromptLayerSink::new(url.clone(), cfg.key.clone()))
        }
    }
}

/// The key to send: the sink's own, else the one the app sent with the event — only when the
/// event came in this sink's own format (an app's key goes only to the service it was for).
pub(crate) fn key_for<'a>(
    own: &'a Option<Secret>,
    ev: &'a StoredEvent,
    format: crate::formats::Format,
) -> Option<&'a Secret> {
    own.as_ref().or(ev
        .creds
        .api_key
        .as_ref()
        .filter(|_| ev.kind.format() == format))
}

pub(crate) fn header(
    name: &'static str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), BuildError> {
    let v = HeaderValue::from_str(value)
        .map_err(|_| BuildError::Unrenderable(format!("{name} holds characters HTTP forbids")))?;
    Ok((HeaderName::from_static(name), v))
}

pub(crate) fn json_content_type() -> (HeaderName, HeaderValue) {
    (
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )
}
