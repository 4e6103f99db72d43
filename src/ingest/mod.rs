//! Ingest: turn requests into events, route them, and answer once they are durable.
//!
//! - `http.rs`: the routes (native, Pezzo, PromptLayer, ops endpoints), shared by the TCP
//!   listener and the Unix socket.
//! - `server.rs`: listeners: accept loops, connection cap, header/body timeouts, graceful stop,
//!   protocol detection on the Unix socket.
//! - `ndjson.rs`: the line protocol on the Unix socket.
//! - `unix_stream.rs`: Unix socket connections watched for input only (`LeanUnix`).
//!
//! Validation happens before anything is stored: a refused request stores nothing, an accepted
//! one is stored whole (one group commit for all its events) or not at all.

pub mod browser;
pub mod http;
pub mod ndjson;
mod parse_errors;
pub mod server;
mod unix_stream;

pub use unix_stream::LeanUnix;

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::{Route, SinkConfig, SinkKind};
use crate::event::{EventKind, NewEvent};
use crate::formats::{FieldError, Format};
use crate::ops::metrics::Metrics;
use crate::queue::{Appended, Queue, QueueError, ReadItem};

/// Which sinks take which events; rebuilt on reload and swapped in atomically.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<RouteEntry>,
}

#[derive(Debug)]
struct RouteEntry {
    id: u16,
    kind: SinkType,
    route: Route,
    name: String,
    /// The sink has its own API key; without one it can only send events that came in its
    /// own format with the app's key.
    own_key: bool,
    /// The sink has its own project id (Pezzo; always true for the others): without one it
    /// can only send Pezzo reports that came with the app's project id.
    own_project: bool,
}

/// A credential a service sink lacks for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    Key,
    Project,
}

impl RouteEntry {
    /// The credential this sink lacks for `ev`: neither its config has it nor, for an event
    /// in the sink's own format, the app sent it (an app's key is only ever sent to the
    /// service it was meant for). `None` for the `http` sink, which uses its config only.
    fn missing(&self, ev: &NewEvent) -> Option<Missing> {
        let own_format = match self.kind {
            SinkType::Pezzo => Format::Pezzo,
            SinkType::PromptLayer => Format::PromptLayer,
            SinkType::Http => return None,
        };
        let from_app = ev.kind.format() == own_format;
        let has_key = self.own_key || (from_app && ev.creds.api_key.is_some());
        let has_project = self.own_project || (from_app && ev.creds.project_id.is_some());
        if !has_key {
            Some(Missing::Key)
        } else if !has_project {
            Some(Missing::Project)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkType {
    Http,
    Pezzo,
    PromptLayer,
}

impl RouteTable {
    /// Builds the table from the sinks' config and their queue ids.
    pub fn new(sinks: &[(u16, &SinkConfig)]) -> Self {
        RouteTable {
            entries: sinks
                .iter()
                .map(|(id, s)| RouteEntry {
                    id: *id,
                    kind: match s.kind {
                        SinkKind::Http { .. } => SinkType::Http,
                        SinkKind::Pezzo { .. } => SinkType::Pezzo,
                        SinkKind::PromptLayer { .. } => SinkType::PromptLayer,
                    },
                    route: s.route.clone(),
                    name: s.name.clone(),
                    own_key: s.key.is_some(),
                    own_project: match &s.kind {
                        SinkKind::Pezzo { project_id, .. } => project_id.is_some(),
                        _ => true,
                    },
                })
                .collect(),
        }
    }

    /// The sinks an event goes to. A sink takes an event when its route matches and it can
    /// render the event: the `http` sink takes any log; Pezzo and PromptLayer take logs they
    /// can convert (native events only in the canonical shape); PromptLayer follow-ups and
    /// group creation go only to PromptLayer sinks (their bodies carry the app's key).
    pub fn routes_for(&self, ev: &NewEvent) -> Vec<u16> {
        self.entries
            .iter()
            .filter(|e| {
                let renders = match (e.kind, ev.kind) {
                    (SinkType::PromptLayer, _) if ev.kind.promptlayer_only() => true,
                    (_, k) if k.promptlayer_only() => false,
                    (SinkType::Http, _) => true,
                    (_, EventKind::Native) => ev.attrs.canonical,
                    _ => true,
                };
                renders && e.missing(ev).is_none() && route_matches(&e.route, ev)
            })
            .map(|e| e.id)
            .collect()
    }

    /// The credential that a sink of the event's own service (a Pezzo sink for a Pezzo
    /// report, ...) would need and that neither the sink's config nor the request gives. The
    /// real service answers such a request 401, and so does llmlogd: stored, the event could
    /// never reach that sink.
    pub fn missing_credentials(&self, ev: &NewEvent) -> Option<FieldError> {
        let (own, key_field) = match ev.kind {
            EventKind::Pezzo => (SinkType::Pezzo, "x-pezzo-api-key"),
            EventKind::PromptLayerLog => (SinkType::PromptLayer, "X-API-KEY"),
            k if k.promptlayer_only() => (SinkType::PromptLayer, "api_key"),
            _ => return None,
        };
        self.entries
            .iter()
            .filter(|e| e.kind == own && route_matches(&e.route, ev))
            .find_map(|e| {
                let field = match e.missing(ev)? {
                    Missing::Key => key_field,
                    Missing::Project => "x-pezzo-project-id",
                };
                Some(FieldError {
                    field: field.into(),
                    problem: format!(
                        "required: sink {:?} has none of its own configured, so the request must carry it",
                        e.name
                    ),
                })
            })
    }

    /// Why a native event without the canonical schema marker would be stored for nothing:
    /// a Pezzo or PromptLayer sink's route takes it and could send it if only it converted,
    /// and no sink takes it (no `http` sink does). Such an event was acknowledged and then
    /// discarded: an app that posted the README's `{"model":…,"input":…,"output":…}` to a host
    /// with only a PromptLayer sink lost every event without a word. A route that leaves the
    /// event out on purpose (its formats, environments or tags) is not this.
    pub fn unconvertible(&self, ev: &NewEvent) -> Option<FieldError> {
        if ev.kind != EventKind::Native || ev.attrs.canonical || !self.routes_for(ev).is_empty() {
            return None;
        }
        let e = self.entries.iter().find(|e| {
            e.kind != SinkType::Http && e.missing(ev).is_none() && route_matches(&e.route, ev)
        })?;
        let service = match e.kind {
            SinkType::Pezzo => "pezzo",
            _ => "promptlayer",
        };
        Some(FieldError {
            field: "schema".into(),
            problem: format!(
                "sink {:?} ({service}) takes a native event only in llmlogd's canonical shape (\"schema\": \"{}\"), and no other sink takes this one: stored, it would never be delivered; log it in the service's format (/log-request, /api/reporting/v2/request) or add an http sink",
                e.name,
                crate::formats::canonical::SCHEMA,
            ),
        })
    }
}

/// Whether a sink's route takes `ev`.
///
/// PromptLayer follow-ups (`/library-track-*`, `/track-group`) and `/create-group` carry no
/// environment or tags of their own: only the route's formats apply to them. Filtering them by
/// the log's environment or tags dropped every one of them (acknowledged, then routed to no
/// sink) as soon as a PromptLayer sink had `route.environments` or `route.tags`. A follow-up
/// then goes only to the sinks its log went to ([`Ingest::admit`]).
fn route_matches(r: &Route, ev: &NewEvent) -> bool {
    let formats = r.formats.is_empty() || r.formats.contains(&ev.kind.format());
    if matches!(
        ev.kind,
        EventKind::PromptLayerTrack(_) | EventKind::PromptLayerCreateGroup
    ) {
        return formats;
    }
    formats
        && (r.environments.is_empty()
            || ev
                .attrs
                .environment
                .as_ref()
                .is_some_and(|e| r.environments.iter().any(|x| x == e)))
        && (r.tags.is_empty() || ev.attrs.tags.iter().any(|t| r.tags.contains(t)))
}

/// How many bad fields a refusal's `message` names (all of them are in `fields`).
const MESSAGE_FIELDS: usize = 5;

/// A refused request: the status, a machine-readable code, and what was wrong.
#[derive(Debug, Clone, Serialize)]
pub struct IngestError {
    #[serde(skip)]
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
    /// Seconds after which a retry may succeed (queue full, busy).
    #[serde(skip)]
    pub retry_after: Option<u64>,
    /// Refused before the request body was read (HTTP): the connection cannot carry another
    /// request, so the reply says `Connection: close` (see [`IngestError::unread_body`]).
    #[serde(skip)]
    pub closes: bool,
}

impl IngestError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        IngestError {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
            retry_after: None,
            closes: false,
        }
    }

    /// This refusal leaves the request's body unread (or read in part), so hyper closes the
    /// connection after the reply. The reply must say so: without `Connection: close`, a
    /// keep-alive client (Python's `http.client` and `requests.Session`, Node's agent, undici)
    /// sent its next request on the closed connection and got "Remote end closed connection
    /// without response" or a broken pipe, with no way to know whether it was stored.
    pub fn unread_body(mut self) -> Self {
        self.closes = true;
        self
    }

    /// A 400 naming every bad field. The message names them too (the first
    /// [`MESSAGE_FIELDS`]), not only `fields`: the official SDKs show the app nothing but
    /// `message` (PromptLayer's raise `message`, Pezzo's print the body), and "3 fields are
    /// invalid" left the user guessing which.
    pub fn invalid(fields: Vec<FieldError>) -> Self {
        let message = match fields.as_slice() {
            [one] => one.to_string(),
            many => {
                let shown: Vec<String> = many
                    .iter()
                    .take(MESSAGE_FIELDS)
                    .map(ToString::to_string)
                    .collect();
                let more = many.len().saturating_sub(MESSAGE_FIELDS);
                let rest = if more > 0 {
                    format!("; and {more} more (see error.fields)")
                } else {
                    String::new()
                };
                format!(
                    "{} fields are invalid: {}{rest}",
                    many.len(),
                    shown.join("; ")
                )
            }
        };
        IngestError {
            fields,
            ..IngestError::new(400, "invalid_field", message)
        }
    }

    /// The result label for `llmlogd_ingest_events_total`.
    pub fn metric_result(&self) -> &'static str {
        match self.status {
            413 => "too_large",
            503 | 507 => "full",
            s if s >= 500 => "error",
            _ => "invalid",
        }
    }
}

impl From<QueueError> for IngestError {
    fn from(e: QueueError) -> Self {
        let mut err = match &e {
            QueueError::Full { .. } | QueueError::Busy | QueueError::Closed => {
                IngestError::new(503, "unavailable", e.to_string())
            }
            QueueError::NoSpace => IngestError::new(507, "no_space", e.to_string()),
            QueueError::TooLarge { .. } | QueueError::OverCap { .. } => {
                IngestError::new(413, "too_large", e.to_string())
            }
            _ => IngestError::new(500, "storage_error", e.to_string()),
        };
        if e.is_transient() {
            err.retry_after = Some(match e {
                QueueError::Full { .. } | QueueError::NoSpace => 5,
                _ => 1,
            });
        }
        err
    }
}

/// The shared front of ingest: routing and the durable append.
pub struct Ingest {
    pub queue: Queue,
    pub routes: ArcSwap<RouteTable>,
    pub metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(queue: Queue, routes: RouteTable, metrics: Arc<Metrics>) -> Self {
        Ingest {
            queue,
            routes: ArcSwap::from_pointee(routes),
            metrics,
        }
    }

    /// Routes and stores `events` as one durable write; counts the outcome under `route`.
    pub async fn admit(
        &self,
        route: &'static str,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Appended>, IngestError> {
        let n = events.len() as u64;
        let table = self.routes.load();
        if let Some(f) = events.iter().find_map(|ev| table.missing_credentials(ev)) {
            let err = IngestError {
                fields: vec![f.clone()],
                ..IngestError::new(401, "missing_credentials", f.to_string())
            };
            self.metrics.ingest(route, err.metric_result(), n);
            return Err(err);
        }
        let mut prepared = Vec::with_capacity(events.len());
        for ev in &events {
            let mut routes = table.routes_for(ev);
            if let EventKind::PromptLayerTrack(_) = ev.kind {
                if let Err(err) = self.keep_the_logs_sinks(ev, &mut routes) {
                    self.metrics.ingest(route, err.metric_result(), n);
                    return Err(err);
                }
            }
            prepared.push(self.queue.prepare(ev, &routes));
        }
        match self.queue.append(prepared).await {
            Ok(ids) => {
                self.metrics.ingest(route, "accepted", n);
                Ok(ids)
            }
            Err(e) => {
                let err = IngestError::from(e);
                self.metrics.ingest(route, err.metric_result(), n);
                Err(err)
            }
        }
    }

    /// Narrows a follow-up's `routes` to the sinks its log (`request_id`) was routed to: at
    /// any other PromptLayer sink there is no request to attach it to (it would only be
    /// dead-lettered there). The log's record names its sinks while it is queued; once it is
    /// gone, a sink took it if it holds the service's id for it, or the log's dead letter:
    /// there the follow-up goes to the dead letters too, saying why. (A follow-up that came
    /// after its log was dead-lettered was routed to no sink: acknowledged, then discarded
    /// without a trace, where one that came a moment earlier became a dead letter.) On a
    /// storage error the routes stay as they are (delivery then decides, with a dead letter
    /// that says why).
    ///
    /// A follow-up whose log is gone and that no PromptLayer sink took (not a PromptLayer log
    /// at all, such as a native event, or one delivered longer ago than its id is kept) is
    /// refused, naming `request_id`: accepted, it was routed to no sink and discarded.
    fn keep_the_logs_sinks(&self, ev: &NewEvent, routes: &mut Vec<u16>) -> Result<(), IngestError> {
        let local = serde_json::from_slice::<serde_json::Value>(&ev.payload)
            .ok()
            .and_then(|v| crate::formats::promptlayer::track_request_id(&v));
        let Some(local) = local else {
            return Ok(());
        };
        match self.queue.get(local) {
            Ok(Some(ReadItem::Event(log))) => routes.retain(|s| log.routes.contains(s)),
            Ok(None) => {
                let had = !routes.is_empty();
                routes.retain(|s| {
                    matches!(self.queue.remote_id(*s, local), Ok(Some(_)))
                        || matches!(self.queue.dead_letter_get(*s, local), Ok(Some(_)))
                });
                if had && routes.is_empty() {
                    let f = crate::formats::FieldError {
                        field: "request_id".into(),
                        problem: format!(
                            "{local} is not a PromptLayer log this llmlogd delivered in the last {} days (not a log, or one no PromptLayer sink took)",
                            crate::queue::FOLLOW_UP_IDS_KEEP_MS / 86_400_000
                        ),
                    };
                    return Err(IngestError::invalid(vec![f]));
                }
            }
            Ok(Some(ReadItem::Corrupt { .. })) | Err(_) => {}
        }
        Ok(())
    }

    /// `ev`, unless it is a native event no sink could ever send
    /// ([`RouteTable::unconvertible`]): refused as a bad `schema` field (400), before anything
    /// is stored. Checked per event where native events are parsed (`/v1/events`, the
    /// socket's NDJSON), so a refusal names the event's place and an NDJSON line is refused
    /// on its own.
    pub fn deliverable(&self, ev: NewEvent) -> Result<NewEvent, IngestError> {
        match self.routes.load().unconvertible(&ev) {
            None => Ok(ev),
            Some(f) => Err(IngestError::invalid(vec![f.clone()])),
        }
    }

    /// Counts a request refused before it reached the queue.
    pub fn refused(&self, route: &'static str, err: &IngestError) {
        self.metrics.ingest(route, err.metric_result(), 1);
    }
}

/// An `Ingest` over a fresh queue in `dir`, with no sinks.
#[cfg(test)]
pub(crate) fn test_ingest(dir: &std::path::Path) -> Arc<Ingest> {
    let q = crate::queue::Queue::open(&crate::config::QueueConfig {
        data_dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        max_events: None,
        when_full: crate::config::WhenFull::Reject,
        cache_bytes: 8 << 20,
        compression: crate::config::Compression::Zstd,
        compact_above: 1 << 30,
        dead_letter_max_bytes: crate::config::DEFAULT_DEAD_LETTER_MAX_BYTES,
    })
    .unwrap();
    Arc::new(Ingest::new(
        q,
        RouteTable::default(),
        Arc::new(crate::ops::metrics::Metrics::new()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::config::{Config, Overrides};
    use crate::event::ClientCredentials;
    use crate::formats::{Attributes, TrackKind};

    /// The route table of a config's sinks, numbered in config order (BTreeMap: by name).
    fn table(toml: &str) -> RouteTable {
        let c = Config::parse(toml, &Overrides::default()).unwrap();
        let ids: Vec<(u16, &SinkConfig)> = c
            .sinks
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u16, s))
            .collect();
        RouteTable::new(&ids)
    }

    fn ev(kind: EventKind, env: Option<&str>, tags: &[&str], canonical: bool) -> NewEvent {
        NewEvent {
            kind,
            payload: bytes::Bytes::from_static(b"{}"),
            attrs: Attributes {
                environment: env.map(String::from),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                canonical,
                ..Attributes::default()
            },
            creds: ClientCredentials {
                api_key: Some(Secret::new("app-key")),
                project_id: Some("app-project".into()),
            },
        }
    }

    #[test]
    fn a_refusal_message_names_the_bad_fields() {
        let f = |field: &str| FieldError {
            field: field.into(),
            problem: "is required".into(),
        };
        let e = IngestError::invalid(vec![f("request_id"), f("prompt_name")]);
        assert_eq!(
            e.message,
            "2 fields are invalid: request_id: is required; prompt_name: is required"
        );
        assert_eq!(e.fields.len(), 2);
        let many: Vec<FieldError> = (0..7).map(|i| f(&format!("f{i}"))).collect();
        let e = IngestError::invalid(many);
        assert!(
            e.message
                .starts_with("7 fields are invalid: f0: is required;"),
            "{}",
            e.message
        );
        assert!(
            e.message
                .contains("f4: is required; and 2 more (see error.fields)"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("f5"), "{}", e.message);
        assert_eq!(e.fields.len(), 7);
        assert_eq!(
            IngestError::invalid(vec![f("score")]).message,
            "score: is required"
        );
    }

    #[test]
    fn only_a_native_event_that_no_sink_could_send_is_unconvertible() {
        let opaque = ev(EventKind::Native, Some("prod"), &[], false);
        let pl = "[sinks.pl]\ntype = \"promptlayer\"\napi_key = \"k\"\n";
        let f = table(pl).unconvertible(&opaque).expect("refused");
        assert_eq!(f.field, "schema");
        assert!(
            f.problem.contains("sink \"pl\" (promptlayer)"),
            "{}",
            f.problem
        );
        // Canonical, or taken by an http sink: it goes somewhere.
        assert_eq!(
            table(pl).unconvertible(&ev(EventKind::Native, Some("prod"), &[], true)),
            None
        );
        let with_http = format!("{pl}[sinks.raw]\ntype = \"http\"\nurl = \"http://127.0.0.1:1\"\n");
        assert_eq!(table(&with_http).unconvertible(&opaque), None);
        // A route that leaves it out on purpose, and a key-less sink that takes only its own
        // service's events, are no reason to refuse it; nor are other formats' events.
        for cfg in [
            "[sinks.pl]\ntype = \"promptlayer\"\napi_key = \"k\"\nroute.formats = [\"promptlayer\"]\n",
            "[sinks.pl]\ntype = \"promptlayer\"\napi_key = \"k\"\nroute.environments = [\"dev\"]\n",
            "[sinks.pz]\ntype = \"pezzo\"\n",
        ] {
            assert_eq!(table(cfg).unconvertible(&opaque), None, "{cfg}");
        }
        assert_eq!(
            table(pl).unconvertible(&ev(EventKind::Pezzo, None, &[], true)),
            None
        );
    }

    #[test]
    fn routing_by_format_environment_tag_and_renderability() {
        // BTreeMap order: all=0, pl=1, pz=2.
        let t = table(
            r#"
[sinks.all]
type = "http"
url = "http://127.0.0.1:1"
[sinks.pl]
type = "promptlayer"
api_key = "k"
route.environments = ["prod"]
[sinks.pz]
type = "pezzo"
api_key = "k"
route.tags = ["keep"]
route.formats = ["pezzo", "promptlayer"]
"#,
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Native, Some("prod"), &[], false)),
            vec![0]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Native, Some("prod"), &[], true)),
            vec![0, 1]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Pezzo, Some("prod"), &["keep"], false)),
            vec![0, 1, 2]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Pezzo, Some("dev"), &["x"], false)),
            vec![0]
        );
        assert_eq!(
            t.routes_for(&ev(
                EventKind::PromptLayerTrack(TrackKind::Score),
                Some("prod"),
                &["keep"],
                false
            )),
            vec![1]
        );
        assert_eq!(
            t.routes_for(&ev(
                EventKind::PromptLayerCreateGroup,
                Some("prod"),
                &[],
                false
            )),
            vec![1]
        );
        // Follow-ups and groups carry no environment or tags: the route's formats decide
        // (they were routed to no sink at all). A wrapper's track-request is a log.
        assert_eq!(
            t.routes_for(&ev(
                EventKind::PromptLayerTrack(TrackKind::Metadata),
                None,
                &[],
                false
            )),
            vec![1]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::PromptLayerCreateGroup, None, &[], false)),
            vec![1]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::PromptLayerTrackRequest, None, &[], false)),
            Vec::<u16>::new()
        );
        assert_eq!(Format::from_name("pezzo"), Some(Format::Pezzo));
    }

    #[test]
    fn keyless_service_sinks_take_only_their_own_format_with_the_apps_key() {
        let t = table("[sinks.pl]\ntype = \"promptlayer\"\n[sinks.pz]\ntype = \"pezzo\"\n"); // pl=0, pz=1
        assert_eq!(
            t.routes_for(&ev(EventKind::PromptLayerLog, None, &[], false)),
            vec![0]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Pezzo, None, &[], false)),
            vec![1]
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Native, None, &[], true)),
            Vec::<u16>::new()
        );
        assert_eq!(
            t.missing_credentials(&ev(EventKind::Pezzo, None, &[], false)),
            None
        );
        let mut no_key = ev(EventKind::Pezzo, None, &[], false);
        no_key.creds.api_key = None;
        assert_eq!(t.routes_for(&no_key), Vec::<u16>::new());
        let missing = t.missing_credentials(&no_key).expect("refused");
        assert_eq!(missing.field, "x-pezzo-api-key");
        assert!(missing.problem.contains("\"pz\""), "{missing}");
        // A key but no project: the Pezzo sink could not send it either.
        let mut no_project = ev(EventKind::Pezzo, None, &[], false);
        no_project.creds.project_id = None;
        assert_eq!(t.routes_for(&no_project), Vec::<u16>::new());
        assert_eq!(
            t.missing_credentials(&no_project).map(|f| f.field),
            Some("x-pezzo-project-id".into())
        );
        let mut pl_no_key = ev(EventKind::PromptLayerLog, None, &[], false);
        pl_no_key.creds.api_key = None;
        assert_eq!(
            t.missing_credentials(&pl_no_key).map(|f| f.field),
            Some("X-API-KEY".into())
        );
        // Native events carry no service credentials to miss.
        let mut native = ev(EventKind::Native, None, &[], true);
        native.creds = ClientCredentials::default();
        assert_eq!(t.missing_credentials(&native), None);
    }

    #[test]
    fn a_pezzo_sink_with_a_key_but_no_project_takes_only_reports_with_the_apps_project() {
        let t = table("[sinks.pz]\ntype = \"pezzo\"\napi_key = \"sink-key\"\n");
        // A converted event has no Pezzo project: it cannot go (it used to stall the sink).
        assert_eq!(
            t.routes_for(&ev(EventKind::PromptLayerLog, None, &[], true)),
            Vec::<u16>::new()
        );
        assert_eq!(
            t.routes_for(&ev(EventKind::Pezzo, None, &[], false)),
            vec![0]
        );
        let mut no_project = ev(EventKind::Pezzo, None, &[], false);
        no_project.creds.project_id = None;
        assert_eq!(t.routes_for(&no_project), Vec::<u16>::new());
        assert_eq!(
            t.missing_credentials(&no_project).map(|f| f.field),
            Some("x-pezzo-project-id".into())
        );
    }
}
