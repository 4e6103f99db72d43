//! The `pezzo` sink: one `POST {url}/api/reporting/v2/request` per event, with
//! `x-pezzo-api-key` and `x-pezzo-project-id`, the body a Pezzo report.
//!
//! A Pezzo event is sent as the app sent it. Other formats are converted; the conversion
//! avoids what the real server answers 500 for (non-OpenAI providers, usage of unknown
//! models): see `formats::pezzo::from_canonical`.

use bytes::Bytes;

use super::{key_for, BuildContext, BuildError, Sink, SinkRequest};
use crate::config::Secret;
use crate::event::StoredEvent;
use crate::formats;

pub struct PezzoSink {
    url: String,
    project_id: Option<String>,
    key: Option<Secret>,
}

impl PezzoSink {
    pub fn new(base: String, project_id: Option<String>, key: Option<Secret>) -> Self {
        PezzoSink {
            url: format!("{base}/api/reporting/v2/request"),
            project_id,
            key,
        }
    }
}

impl Sink for PezzoSink {
    fn events_per_request(&self) -> usize {
        1
    }

    fn build(
        &self,
        events: &[&StoredEvent],
        _ctx: &dyn BuildContext,
    ) -> Result<SinkRequest, BuildError> {
        let ev = events.first().ok_or(BuildError::NotYet)?;
        let key = key_for(&self.key, ev, formats::Format::Pezzo).ok_or(BuildError::NoKey)?;
        let project = self
            .project_id
            .as_deref()
            .or(ev
                .creds
                .project_id
                .as_deref()
                .filter(|_| ev.kind.format() == formats::Format::Pezzo))
            .ok_or(BuildError::NoKey)?;
        // Pezzo events go through the renderer too: for the official clients' bodies with a
        // priced model it returns them unchanged, and otherwise it avoids the server's 500s.
        let body = Bytes::from(
            formats::render_payload(ev.kind.format(), &ev.payload, formats::Format::Pezzo)
                .map_err(|e| BuildError::Unrenderable(e.to_string()))?,
        );
        Ok(SinkRequest {
            url: self.url.clone(),
            headers: vec![
                super::json_content_type(),
                super::header("x-pezzo-api-key", key.expose())?,
                super::header("x-pezzo-project-id", project)?,
                super::header("idempotency-key", &ev.id.to_string())?,
            ],
            body,
            app_key: self.key.is_none(),
        })
    }
}
