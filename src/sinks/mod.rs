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

impl SinkRequest {
    /// What in this request may be a credential, as bytes to mask wherever the service's reply
    /// quotes it: the value of every header that is not plainly about the content (an
    /// `Authorization` value also without its scheme, `Bearer …`), and the URL's user info and
    /// query values. Values shorter than [`MIN_SECRET`] are left out: masking them would
    /// garble replies, and a credential is longer.
    pub fn secrets(&self) -> Vec<Vec<u8>> {
        const NOT_SECRET: [&str; 7] = [
            "content-type",
            "content-encoding",
            "content-length",
            "accept",
            "user-agent",
            "idempotency-key",
            "x-llmlogd-event-ids",
        ];
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut add = |v: &[u8]| {
            let v = v.trim_ascii();
            if v.len() >= MIN_SECRET && !out.iter().any(|o| o == v) {
                out.push(v.to_vec());
            }
        };
        for (name, value) in &self.headers {
            if NOT_SECRET.contains(&name.as_str()) {
                continue;
            }
            let v = value.as_bytes();
            add(v);
            if let Some(at) = v.iter().position(|b| *b == b' ') {
                add(&v[at + 1..]);
            }
        }
        if let Ok(url) = reqwest::Url::parse(&self.url) {
            if let Some(p) = url.password() {
                add(p.as_bytes());
            }
            add(url.username().as_bytes());
            for (_, v) in url.query_pairs() {
                add(v.as_bytes());
            }
            for seg in url.path_segments().into_iter().flatten() {
                if crate::config::token_like(seg) {
                    add(seg.as_bytes());
                }
            }
        }
        // Longest first, so a token is not half masked by a shorter value inside it.
        out.sort_by_key(|v| std::cmp::Reverse(v.len()));
        out
    }
}

/// The shortest header or URL value [`SinkRequest::secrets`] counts as a possible credential.
pub const MIN_SECRET: usize = 8;

/// `body` with every occurrence of each of `secrets` replaced by `***`: a service's error reply
/// may quote the key it was sent ("invalid key pl_…"), and replies reach `llmlogd status`,
/// the logs and the dead letters.
pub fn mask_secrets(body: Vec<u8>, secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut body = body;
    for s in secrets {
        if memchr::memmem::find(&body, s).is_none() {
            continue;
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest = &body[..];
        while let Some(at) = memchr::memmem::find(rest, s) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(b"***");
            rest = &rest[at + s.len()..];
        }
        out.extend_from_slice(rest);
        body = out;
    }
    body
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str, headers: &[(&'static str, &str)]) -> SinkRequest {
        SinkRequest {
            url: url.into(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        HeaderName::from_static(k),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
            body: Bytes::new(),
            app_key: false,
        }
    }

    #[test]
    fn what_a_request_carries_is_masked_in_a_reply() {
        let req = request(
            "https://user:hunter2pass@example.com/in?token=querytoken1&x=1",
            &[
                ("authorization", "Bearer sk-abcdefgh12345"),
                ("x-api-key", "pl_0123456789"),
                ("content-type", "application/json"),
                ("idempotency-key", "0123456789abcdef0123456789abcdef"),
                ("x-short", "prod"),
            ],
        );
        let secrets = req.secrets();
        let reply = b"bad key pl_0123456789 / sk-abcdefgh12345 (Bearer sk-abcdefgh12345), \
                      pw hunter2pass, q querytoken1, id 0123456789abcdef0123456789abcdef, \
                      application/json, env prod, x=1";
        let masked = String::from_utf8(mask_secrets(reply.to_vec(), &secrets)).unwrap();
        assert_eq!(
            masked,
            "bad key *** / *** (***), pw ***, q ***, id 0123456789abcdef0123456789abcdef, \
             application/json, env prod, x=1"
        );
        // Nothing to mask: the same bytes.
        let plain = b"{\"success\":true,\"id\":7}".to_vec();
        assert_eq!(mask_secrets(plain.clone(), &secrets), plain);
    }
}
