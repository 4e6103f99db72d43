//! The `promptlayer` sink: `POST {url}/log-request` with `X-API-KEY` per log, and the
//! `/library-track-*` follow-ups with `api_key` and `request_id` in the body.
//!
//! Follow-ups name the local id llmlogd returned for the log; the service needs its own id,
//! which its `/log-request` reply carried (`id`). The engine stores that id when the log is
//! delivered, and a follow-up is built only once it is known ([`RemoteId`]).

use bytes::Bytes;
use serde_json::Value;

use super::{key_for, Accepted, BuildContext, BuildError, RemoteId, Sink, SinkRequest};
use crate::config::Secret;
use crate::event::{EventKind, StoredEvent};
use crate::formats::{self, TrackKind};

/// The service's id for a local one, or why the follow-up cannot be built yet (or ever).
fn resolve(ctx: &dyn BuildContext, local: u64, what: &str) -> Result<u64, BuildError> {
    match ctx.remote_id(local) {
        RemoteId::Known(remote) => Ok(remote),
        RemoteId::Pending => Err(BuildError::NotYet),
        RemoteId::Unknown => Err(BuildError::Unrenderable(format!(
            "the {what} with id {local} was not delivered to this sink, or longer ago than the {} days its id is kept, so the follow-up has nothing to refer to",
            crate::queue::FOLLOW_UP_IDS_KEEP_MS / 86_400_000
        ))),
    }
}

pub struct PromptLayerSink {
    base: String,
    key: Option<Secret>,
}

impl PromptLayerSink {
    pub fn new(base: String, key: Option<Secret>) -> Self {
        PromptLayerSink { base, key }
    }
}

impl Sink for PromptLayerSink {
    fn events_per_request(&self) -> usize {
        1
    }

    fn build(
        &self,
        events: &[&StoredEvent],
        ctx: &dyn BuildContext,
    ) -> Result<SinkRequest, BuildError> {
        let ev = events.first().ok_or(BuildError::NotYet)?;
        let key = key_for(&self.key, ev, formats::Format::PromptLayer).ok_or(BuildError::NoKey)?;
        let app_key = self.key.is_none();
        match ev.kind {
            EventKind::PromptLayerTrack(kind) => {
                let mut body: Value = serde_json::from_slice(&ev.payload)
                    .map_err(|e| BuildError::Unrenderable(format!("stored follow-up: {e}")))?;
                let local = formats::promptlayer::track_request_id(&body).ok_or_else(|| {
                    BuildError::Unrenderable("follow-up without request_id".into())
                })?;
                let remote = resolve(ctx, local, "log")?;
                formats::promptlayer::set_track_request_id(&mut body, remote);
                if kind == TrackKind::Group {
                    if let Some(local_group) = formats::promptlayer::track_group_id(&body) {
                        body["group_id"] = resolve(ctx, local_group, "group")?.into();
                    }
                }
                formats::promptlayer::set_track_api_key(&mut body, key.expose());
                Ok(SinkRequest {
                    url: format!("{}{}", self.base, kind.path()),
                    headers: vec![super::json_content_type()],
                    body: Bytes::from(body.to_string()),
                    app_key,
                })
            }
            EventKind::PromptLayerTrackRequest => {
                let mut body: Value = serde_json::from_slice(&ev.payload)
                    .map_err(|e| BuildError::Unrenderable(format!("stored track-request: {e}")))?;
                formats::promptlayer::set_track_api_key(&mut body, key.expose());
                Ok(SinkRequest {
                    url: format!("{}/track-request", self.base),
                    headers: vec![super::json_content_type()],
                    body: Bytes::from(body.to_string()),
                    app_key,
                })
            }
            EventKind::PromptLayerCreateGroup => Ok(SinkRequest {
                url: format!("{}/create-group", self.base),
                headers: vec![super::json_content_type()],
                body: Bytes::from(serde_json::json!({"api_key": key.expose()}).to_string()),
                app_key,
            }),
            kind => {
                // PromptLayer's own logs too go through the renderer: the SDKs send times as
                // Unix seconds and `null` where the spec wants a value, and the service gets
                // what its spec says (`formats::promptlayer`, "Normalisations").
                let body = Bytes::from(
                    formats::render_payload(
                        kind.format(),
                        &ev.payload,
                        formats::Format::PromptLayer,
                    )
                    .map_err(|e| BuildError::Unrenderable(e.to_string()))?,
                );
                Ok(SinkRequest {
                    url: format!("{}/log-request", self.base),
                    headers: vec![
                        super::json_content_type(),
                        super::header("x-api-key", key.expose())?,
                        super::header("idempotency-key", &ev.id.to_string())?,
                    ],
                    body,
                    app_key,
                })
            }
        }
    }

    fn accepted(&self, events: &[&StoredEvent], body: &[u8]) -> Accepted {
        // Logs and group creation answer with the service's id, which follow-ups need.
        let is_log = events
            .first()
            .is_some_and(|e| !matches!(e.kind, EventKind::PromptLayerTrack(_)));
        let v: Option<Value> = serde_json::from_slice(body).ok();
        if let Some(Value::Bool(false)) = v.as_ref().and_then(|v| v.get("success")) {
            let msg = v
                .as_ref()
                .and_then(|v| v.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("the service answered success: false");
            return Accepted::Refused(msg.to_string());
        }
        // /track-request answers with `request_id`, /log-request and /create-group with `id`.
        let field = match events.first().map(|e| e.kind) {
            Some(EventKind::PromptLayerTrackRequest) => "request_id",
            _ => "id",
        };
        Accepted::Yes {
            remote_id: if is_log {
                v.as_ref().and_then(|v| v.get(field)).and_then(remote_id)
            } else {
                None
            },
        }
    }
}

/// The service's id in a reply: an integer, or the same digits in a string (PromptLayer's
/// reference types `/track-request`'s `request_id` as a string). Read as an integer only, a
/// string id left every follow-up of that request without its id: dead-lettered.
fn remote_id(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.trim().parse().ok(),
        other => other.as_u64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ClientCredentials;

    fn stored(kind: EventKind) -> StoredEvent {
        StoredEvent {
            seq: 7,
            id: uuid::Uuid::nil(),
            kind,
            received_ms: 0,
            routes: vec![0],
            creds: ClientCredentials::default(),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn the_services_id_is_read_from_integers_and_digit_strings() {
        let sink = PromptLayerSink::new("http://pl".into(), None);
        let track = stored(EventKind::PromptLayerTrackRequest);
        let log = stored(EventKind::PromptLayerLog);
        let got = |ev: &StoredEvent, body: &str| sink.accepted(&[ev], body.as_bytes());
        assert_eq!(
            got(&track, r#"{"success":true,"request_id":"4242"}"#),
            Accepted::Yes {
                remote_id: Some(4242)
            }
        );
        assert_eq!(
            got(&track, r#"{"success":true,"request_id":4242}"#),
            Accepted::Yes {
                remote_id: Some(4242)
            }
        );
        assert_eq!(
            got(&log, r#"{"id":17,"prompt_version":{}}"#),
            Accepted::Yes {
                remote_id: Some(17)
            }
        );
        assert_eq!(
            got(&log, r#"{"id":"x17"}"#),
            Accepted::Yes { remote_id: None }
        );
        let follow_up = stored(EventKind::PromptLayerTrack(TrackKind::Score));
        assert_eq!(
            got(&follow_up, r#"{"success":true,"request_id":"4242"}"#),
            Accepted::Yes { remote_id: None }
        );
    }
}
