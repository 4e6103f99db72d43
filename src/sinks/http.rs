//! The generic `http` sink: one POST per batch, the events as a JSON array or NDJSON, each
//! event byte-identical to what the app sent (for Pezzo and PromptLayer events, their body).
//!
//! De-duplication: `X-Llmlogd-Event-Ids` lists the stable id of every event in the body, in
//! order (32 hex digits each, comma-separated), so a receiver can drop events it already has
//! after a retry or a crash (delivery is at-least-once).

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use reqwest::header::{HeaderName, HeaderValue};

use super::{BuildContext, BuildError, Sink, SinkRequest};
use crate::config::HttpEncoding;
use crate::event::StoredEvent;

pub struct HttpSink {
    url: String,
    encoding: HttpEncoding,
    gzip: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_events: usize,
}

impl HttpSink {
    pub fn new(
        url: String,
        encoding: HttpEncoding,
        gzip: bool,
        headers: &BTreeMap<String, String>,
        max_events: usize,
    ) -> Self {
        // The config validated every name and value already.
        let headers = headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        HttpSink {
            url,
            encoding,
            gzip,
            headers,
            max_events,
        }
    }
}

impl Sink for HttpSink {
    fn events_per_request(&self) -> usize {
        self.max_events
    }

    fn build(
        &self,
        events: &[&StoredEvent],
        _ctx: &dyn BuildContext,
    ) -> Result<SinkRequest, BuildError> {
        let size: usize = events.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 2;
        let mut body = Vec::with_capacity(size);
        match self.encoding {
            HttpEncoding::JsonArray => {
                body.push(b'[');
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&e.payload);
                }
                body.push(b']');
            }
            HttpEncoding::Ndjson => {
                for e in events {
                    body.extend_from_slice(&e.payload);
                    body.push(b'\n');
                }
            }
        }
        let mut headers = self.headers.clone();
        let ct = match self.encoding {
            HttpEncoding::JsonArray => "application/json",
            HttpEncoding::Ndjson => "application/x-ndjson",
        };
        headers.push((reqwest::header::CONTENT_TYPE, HeaderValue::from_static(ct)));
        let ids: Vec<String> = events.iter().map(|e| e.id.simple().to_string()).collect();
        headers.push(super::header("x-llmlogd-event-ids", &ids.join(","))?);
        if self.gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(size / 4),
                flate2::Compression::fast(),
            );
            // Writing into a Vec cannot fail.
            let _ = enc.write_all(&body);
            body = enc.finish().unwrap_or_default();
            headers.push((
                reqwest::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            ));
        }
        Ok(SinkRequest {
            url: self.url.clone(),
            headers,
            body: Bytes::from(body),
            // The http sink only sends the headers of its config.
            app_key: false,
        })
    }
}
