//! The HTTP routes, served on loopback TCP and on the Unix socket alike.
//!
//! | route | format | success |
//! |---|---|---|
//! | `POST /v1/events` | native: one JSON object, an array, or NDJSON | 202 `{"ids":[..],"seqs":[..]}` |
//! | `POST /api/reporting/v2/request`, `/reporting/v2/request` | Pezzo | 201, the saved report |
//! | `POST /log-request` | PromptLayer | 201 `{"id": <local id>, ...}` |
//! | `POST /library-track-{score,metadata,prompt}`, `/track-group` | PromptLayer follow-up | 200 `{"success":true}` |
//! | `POST /create-group` | PromptLayer group | 200 `{"success":true,"id":<local id>}` |
//! | `POST /track-request` | PromptLayer SDK wrappers | 200 `{"success":true,"request_id":<local id>}` |
//! | `POST /api/cache/v1/request/{retrieve,save}` (and without `/api`) | Pezzo request cache | 201 `{"hit":false,"data":null}` / 201 `{"hash":null,"exp":null}`: never a hit, nothing stored (see [`pezzo_cache`]) |
//! | `GET /metrics`, `/healthz`, `/readyz`, `/v1/status` | ops | 200 |
//!
//! Every refusal is a JSON body `{"success":false,"message":..,"error":{"code","message","fields"}}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::{Ingest, IngestError};
use crate::config::Secret;
use crate::event::{ClientCredentials, EventKind, NewEvent};
use crate::formats::{self, TrackKind};
use crate::ops::metrics::Exposition;
use crate::ops::status::StatusBoard;
use crate::queue::ReadItem;

/// What the handlers share.
pub struct HttpState {
    pub ingest: Arc<Ingest>,
    pub max_body: usize,
    pub body_timeout: Duration,
    pub status: Arc<StatusBoard>,
    /// Set once every listener is bound and the queue is open (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Bytes of request bodies held in memory at once, over all connections (see
    /// [`body_budget`]); a request waits for its share before its body is read.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the daemon stops: a body still arriving then gets
    /// [`super::server::BODY_STOP_GRACE`] more, then a `503`.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// The memory budget for request bodies (and NDJSON lines still arriving, `ndjson.rs`): 64 MiB,
/// or `CONNECTION_SHARES` × the `largest` body or line if that is more. With it, memory for
/// bodies is bounded whatever the number of connections.
///
/// A connection holds at most one body or long line of it at a time (HTTP/1 serves a
/// connection's requests one after another; an NDJSON connection takes budget for the line
/// still arriving, and keeps it while the line waits for its ack, but stops reading once its
/// unanswered lines reach 1 MiB), so at most about `largest`: with the budget at least
/// `CONNECTION_SHARES` × `largest`, one connection never holds more than its share, and a
/// legitimate request of the largest size still fits beside it. When the budget was 64 MiB
/// whatever `largest` was, a config with `max_body_bytes = "64MiB"` let one client that
/// declared such a body and sent it slowly make every other large request wait up to
/// `body_timeout`.
pub fn body_budget(largest: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(budget_bytes(largest)))
}

/// How many connections holding the largest body or line the budget always has room for.
pub const CONNECTION_SHARES: usize = 4;

fn budget_bytes(largest: usize) -> usize {
    largest.saturating_mul(CONNECTION_SHARES).max(64 << 20)
}

/// How many NDJSON lines may grow within a `budget` of bytes at once (`ndjson::BudgetHold`):
/// a growing line holds less than `max_line`, and together they leave room for one
/// `largest` more (an HTTP body waiting for its share at the head of the budget's queue).
/// 3 on the defaults (16 MiB lines and bodies, 64 MiB).
pub fn long_line_slots(max_line: usize, largest: usize, budget: usize) -> usize {
    (budget.saturating_sub(largest) / max_line.max(1)).max(1)
}

/// The slots of [`long_line_slots`] for the budget [`body_budget`] makes for `largest`.
pub fn long_lines(max_line: usize, largest: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(long_line_slots(
        max_line,
        largest,
        budget_bytes(largest),
    )))
}

type St = State<Arc<HttpState>>;

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/events", post(native_events))
        .route("/api/reporting/v2/request", post(pezzo_report))
        .route("/reporting/v2/request", post(pezzo_report))
        .route("/api/cache/v1/request/retrieve", post(pezzo_cache_retrieve))
        .route("/cache/v1/request/retrieve", post(pezzo_cache_retrieve))
        .route("/api/cache/v1/request/save", post(pezzo_cache_save))
        .route("/cache/v1/request/save", post(pezzo_cache_save))
        .route("/log-request", post(pl_log))
        .route("/library-track-score", post(pl_track_score))
        .route("/library-track-metadata", post(pl_track_metadata))
        .route("/library-track-prompt", post(pl_track_prompt))
        .route("/track-group", post(pl_track_group))
        .route("/library-track-group", post(pl_track_group))
        .route("/create-group", post(pl_create_group))
        .route("/track-request", post(pl_track_request))
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json200(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON reply with a given status.
struct JsonReply(StatusCode, Value);
/// A reply already serialised.
struct JsonText(StatusCode, String);
struct Json200(Value);

impl IntoResponse for JsonReply {
    fn into_response(self) -> Response {
        JsonText(self.0, self.1.to_string()).into_response()
    }
}

impl IntoResponse for JsonText {
    fn into_response(self) -> Response {
        let mut r = (self.0, self.1).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

impl IntoResponse for Json200 {
    fn into_response(self) -> Response {
        JsonReply(StatusCode::OK, self.0).into_response()
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({
            "success": false,
            "message": self.message,
            "error": self,
        });
        let mut r = JsonReply(status, body).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.closes {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// A known path with the wrong method: 405 with a JSON body like every other refusal (axum
/// keeps its `Allow` header).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> IngestError {
    IngestError::new(
        405,
        "method_not_allowed",
        format!("{method} is not served at {}", uri.path()),
    )
}

async fn not_found(uri: axum::http::Uri) -> IngestError {
    IngestError::new(404, "not_found", format!("no route for {}", uri.path()))
}

/// Reads the body within the size, time and memory limits. The permit returned holds the
/// body's share of the memory budget until the request is answered. Every refusal here leaves
/// the body unread or read in part, so it closes the connection.
async fn read_body(
    st: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), IngestError> {
    read_body_within_limits(st, headers, body)
        .await
        .map_err(IngestError::unread_body)
}

async fn read_body_within_limits(
    st: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), IngestError> {
    let too_large = || {
        IngestError::new(
            413,
            "too_large",
            format!(
                "request body exceeds {} bytes (server.max_body_bytes)",
                st.max_body
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_body) {
        discard_body(st, headers, body);
        return Err(too_large());
    }
    let share = declared.unwrap_or(st.max_body).max(1) as u32;
    let timeout = || {
        IngestError::new(
            408,
            "body_timeout",
            format!(
                "the request body did not arrive within {}s",
                st.body_timeout.as_secs()
            ),
        )
    };
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    let shutting_down = || {
        let mut e = IngestError::new(
            503,
            "shutting_down",
            "llmlogd is stopping and the request body had not arrived: nothing was stored; send it again",
        );
        e.retry_after = Some(1);
        e
    };
    // At stop, the body gets `BODY_STOP_GRACE` more to arrive (and its share of the budget
    // to come free), then the request is refused: answered, not cut off.
    let stop = async {
        st.stopping.cancelled().await;
        tokio::time::sleep(super::server::BODY_STOP_GRACE).await;
    };
    tokio::pin!(stop);
    let acquire =
        tokio::time::timeout_at(deadline, st.body_budget.clone().acquire_many_owned(share));
    // `biased`: a share or a body at hand is taken without polling `stop`, whose first poll
    // registers with the token's waiter list (a shared lock per request: 3 µs of CPU per
    // event at 64 clients, measured).
    let acquired = tokio::select! {
        biased;
        a = acquire => a,
        _ = &mut stop => return Err(shutting_down()),
    };
    let permit = match acquired {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err(IngestError::new(503, "unavailable", "shutting down")),
        Err(_) => {
            let mut e = IngestError::new(
                503,
                "busy",
                "too many request bodies in memory; retry later",
            );
            e.retry_after = Some(1);
            return Err(e);
        }
    };
    let limited = http_body_util::Limited::new(body, st.max_body);
    let collected = tokio::select! {
        biased;
        c = tokio::time::timeout_at(deadline, limited.collect()) => c,
        _ = &mut stop => return Err(shutting_down()),
    };
    match collected {
        Err(_) => Err(timeout()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(IngestError::new(
            400,
            "body_error",
            format!("could not read the request body: {e}"),
        )),
        Ok(Ok(c)) => {
            // A body sent without its length took the largest share while it arrived; from
            // here to the answer it keeps only its own size.
            let body = c.to_bytes();
            let mut permit = permit;
            let excess = permit.num_permits().saturating_sub(body.len().max(1));
            drop(permit.split(excess));
            Ok((body, permit))
        }
    }
}

/// Reads and drops the body of a request refused from its headers, on a task of its own while
/// the reply goes out, so the client gets the reply: Python's `http.client` and `requests`
/// (the PromptLayer and Pezzo Python SDKs) send the whole body before they read anything, and
/// when the daemon closed with the body unread they got a broken pipe or a reset instead of
/// the 413 or 415 that says not to retry, which reads as a transient failure to retry. hyper
/// goes on reading the body into this task after the reply, then closes (the reply says
/// `Connection: close`). Bounded: at most `CONNECTION_SHARES` × `max_body` (64 MiB at least)
/// within `body_timeout`, as any body is; nothing is kept. Not when the client asked
/// `Expect: 100-continue`: it waits for the reply and sends no body after a refusal.
fn discard_body(st: &HttpState, headers: &HeaderMap, body: Body) {
    /// How long a refused body may pause before the connection is let go.
    const DISCARD_IDLE: Duration = Duration::from_secs(5);
    if headers.contains_key(header::EXPECT) {
        return;
    }
    let cap = budget_bytes(st.max_body);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > cap) {
        return;
    }
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    tokio::spawn(async move {
        let mut body = body;
        let mut seen = 0usize;
        // Read while it keeps coming: a client that stopped sending after the refusal is let
        // go after `DISCARD_IDLE`, not held (with a connection slot) until `body_timeout`.
        loop {
            let next = deadline.min(tokio::time::Instant::now() + DISCARD_IDLE);
            let Ok(Some(Ok(frame))) = tokio::time::timeout_at(next, body.frame()).await else {
                break;
            };
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > cap {
                return;
            }
        }
    });
}

/// How a request body is framed, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Json,
    Ndjson,
}

/// The framing a request's headers give its body; a refusal here is made before the body is
/// read, so it closes the connection.
fn framing(headers: &HeaderMap) -> Result<Framing, IngestError> {
    framing_of(headers).map_err(IngestError::unread_body)
}

fn framing_of(headers: &HeaderMap) -> Result<Framing, IngestError> {
    identity_encoding(headers)?;
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Framing::Json);
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = ct.split(';').next().unwrap_or("").trim();
    match mime {
        "application/json" | "text/json" | "" => Ok(Framing::Json),
        m if m.ends_with("+json") => Ok(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl"
        | "application/x-jsonlines" | "application/jsonlines" => Ok(Framing::Ndjson),
        other => Err(IngestError::new(
            415,
            "unsupported_media_type",
            format!(
                "Content-Type `{other}` is not accepted; use application/json (or, on /v1/events, application/x-ndjson)"
            ),
        )),
    }
}

/// Request bodies are taken as sent: a `Content-Encoding` other than `identity` is refused
/// with a 415 naming the header. Without this check a gzip body got "not valid JSON" (its
/// client left wondering what was wrong with its JSON), and a body labelled with an encoding
/// it did not have (`br` on plain JSON) was stored as if the label were not there.
fn identity_encoding(headers: &HeaderMap) -> Result<(), IngestError> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value.to_str().unwrap_or("?");
        let coded = text
            .split(',')
            .map(str::trim)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        if coded {
            return Err(IngestError::new(
                415,
                "unsupported_encoding",
                format!(
                    "Content-Encoding `{}` is not accepted; send the body uncompressed (no Content-Encoding header)",
                    text.trim()
                ),
            ));
        }
    }
    Ok(())
}

fn json_error(e: &serde_json::Error, what: &str) -> IngestError {
    let problem = if e.is_eof() {
        "unexpected end of input".to_string()
    } else {
        // serde_json's two words for a lone surrogate escape ("\ud800" alone, or a low one
        // first) say nothing of what is wrong with the text.
        e.to_string()
            .replace("unexpected end of hex escape", LONE_SURROGATE)
            .replace("lone leading surrogate in hex escape", LONE_SURROGATE)
    };
    IngestError::new(
        400,
        "invalid_json",
        format!("{what} is not valid JSON: {problem}"),
    )
}

const LONE_SURROGATE: &str = "a \\u escape names a lone UTF-16 surrogate, which is not Unicode text (\\uD800-\\uDBFF must be followed by \\uDC00-\\uDFFF)";

fn not_object(what: &str) -> IngestError {
    IngestError::new(400, "invalid_json", format!("{what} must be a JSON object"))
}

/// Where an event sits in a native body, to name it in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// The body is the event.
    Whole,
    /// Element `i` (from 0) of a JSON array.
    Index(usize),
    /// Line `n` (from 1, blank lines counted) of an NDJSON body.
    Line(usize),
}

impl Place {
    /// `err`, about the event at this place, made to say which event it is about: in an array
    /// `event [1]: tags[0]: …` with the field's path from the body (`[1].tags[0]`), on a line
    /// `line 2: …` as the socket's NDJSON says it. Before, a refusal of a request of many events
    /// named the field only, and the client could not tell which event to fix.
    pub(crate) fn locate(self, mut err: IngestError) -> IngestError {
        match self {
            Place::Whole => {}
            Place::Index(i) => {
                err.message = format!("event [{i}]: {}", err.message);
                for f in &mut err.fields {
                    f.field = match f.field.as_str() {
                        "$" => format!("[{i}]"),
                        p if p.starts_with('[') => format!("[{i}]{p}"),
                        p => format!("[{i}].{p}"),
                    };
                }
            }
            Place::Line(n) => err.message = format!("line {n}: {}", err.message),
        }
        err
    }
}

/// A body's JSON text: without a UTF-8 byte order mark at its start (what a Windows tool writes
/// first, "UTF-8 with BOM"; RFC 8259 lets a parser ignore it, and the socket's NDJSON and
/// `llmlogd send` always did), and without the whitespace around it. The mark is not stored.
/// Before, such a body was refused "not valid JSON: expected value at line 1 column 1".
pub(crate) fn json_text(b: &[u8]) -> &[u8] {
    trim_ascii(b.strip_prefix(UTF8_BOM).unwrap_or(b))
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

fn empty_body() -> IngestError {
    IngestError::new(
        400,
        "empty",
        "the request body is empty; send a JSON object",
    )
}

/// Splits a native body into raw event slices, each a JSON object, exactly as sent, each with
/// its place in the body.
pub(crate) fn split_native(
    body: &Bytes,
    framing: Framing,
) -> Result<Vec<(Bytes, Place)>, IngestError> {
    let trimmed = json_text(body);
    match framing {
        Framing::Json if trimmed.is_empty() => Err(empty_body()),
        Framing::Json if trimmed.first() == Some(&b'[') => {
            let items: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(trimmed).map_err(|e| json_error(&e, "the body"))?;
            if items.is_empty() {
                return Err(IngestError::new(400, "empty", "the array holds no event"));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    if !raw.get().starts_with('{') {
                        return Err(not_object(&format!("event [{i}]")));
                    }
                    Ok((body.slice_ref(raw.get().as_bytes()), Place::Index(i)))
                })
                .collect()
        }
        Framing::Json => {
            let raw: &serde_json::value::RawValue =
                serde_json::from_slice(trimmed).map_err(|e| json_error(&e, "the body"))?;
            if !raw.get().starts_with('{') {
                return Err(not_object("the event"));
            }
            Ok(vec![(body.slice_ref(trimmed), Place::Whole)])
        }
        Framing::Ndjson => {
            let mut out = Vec::new();
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = json_text(trim_ascii(line));
                if line.is_empty() {
                    continue;
                }
                let what = format!("line {}", i + 1);
                let raw: &serde_json::value::RawValue =
                    serde_json::from_slice(line).map_err(|e| json_error(&e, &what))?;
                if !raw.get().starts_with('{') {
                    return Err(not_object(&what));
                }
                out.push((body.slice_ref(line), Place::Line(i + 1)));
            }
            if out.is_empty() {
                return Err(IngestError::new(400, "empty", "the body holds no event"));
            }
            Ok(out)
        }
    }
}

pub(crate) fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &b[start..end]
}

/// Builds a native event from one raw object (already known to be a JSON object).
pub(crate) fn native_event(raw: Bytes) -> Result<NewEvent, IngestError> {
    if let Some(attrs) = formats::native::check_canonical_bytes(&raw) {
        return Ok(NewEvent {
            kind: EventKind::Native,
            attrs,
            payload: raw,
            creds: ClientCredentials::default(),
        });
    }
    let v: Value = serde_json::from_slice(&raw).map_err(|e| json_error(&e, "the event"))?;
    let attrs = formats::native::check(&v).map_err(IngestError::invalid)?;
    Ok(NewEvent {
        kind: EventKind::Native,
        attrs,
        payload: raw,
        creds: ClientCredentials::default(),
    })
}

async fn native_events(State(st): St, headers: HeaderMap, body: Body) -> Response {
    const ROUTE: &str = "native";
    let result = async {
        let framing = match framing(&headers) {
            Ok(f) => f,
            Err(e) => {
                discard_body(&st, &headers, body);
                return Err(e);
            }
        };
        let (body, permit) = read_body(&st, &headers, body).await?;
        // One canonical event (nearly every app's request): the fast check parses the whole
        // body, so it is the one valid object `split_native` would have found; any other body
        // is split and checked as before (and gets the same errors).
        if let Some(ev) = one_canonical_event(&body, framing) {
            return Ok((vec![ev], permit));
        }
        let events = split_native(&body, framing)?
            .into_iter()
            .map(|(raw, place)| {
                native_event(raw)
                    .and_then(|ev| st.ingest.deliverable(ev))
                    .map_err(|e| place.locate(e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, IngestError>((events, permit))
    }
    .await;
    let (events, permit) = match result {
        Ok(e) => e,
        Err(e) => {
            st.ingest.refused(ROUTE, &e);
            return e.into_response();
        }
    };
    match admit_holding(&st, ROUTE, events, permit).await {
        Ok(ids) => JsonText(StatusCode::ACCEPTED, accepted_reply(&ids)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Bodies up to this size are stored in the request's own task (see [`admit_holding`]).
const SMALL_BODY: usize = 64 << 10;

/// Stores `events` while `permit` holds their body's share of the memory budget, and gives
/// the share back only once the queue has answered. A client that hangs up drops its
/// request's task (hyper does not finish it), while the events still wait in the queue's
/// channel; were the share given back then, a client sending large bodies and hanging up at
/// once could fill memory with them while the budget read empty. So a large body's append
/// runs as a task of its own that keeps the share to the end; small bodies (nearly all)
/// skip the spawn: the channel's depth bounds what they can hold.
async fn admit_holding(
    st: &HttpState,
    route: &'static str,
    events: Vec<NewEvent>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Vec<crate::queue::Appended>, IngestError> {
    if permit.num_permits() <= SMALL_BODY {
        return st.ingest.admit(route, events).await;
    }
    let ingest = st.ingest.clone();
    tokio::spawn(async move {
        let stored = ingest.admit(route, events).await;
        drop(permit);
        stored
    })
    .await
    .unwrap_or_else(|_| {
        Err(IngestError::new(
            500,
            "internal",
            "the append did not finish",
        ))
    })
}

/// A single-object JSON body that is a canonical event, accepted by the fast check.
fn one_canonical_event(body: &Bytes, framing: Framing) -> Option<NewEvent> {
    let trimmed = json_text(body);
    if framing != Framing::Json || trimmed.first() != Some(&b'{') {
        return None;
    }
    let attrs = formats::native::check_canonical_bytes(trimmed)?;
    Some(NewEvent {
        kind: EventKind::Native,
        attrs,
        payload: body.slice_ref(trimmed),
        creds: ClientCredentials::default(),
    })
}

/// `{"accepted":N,"ids":[…],"seqs":[…]}`, written directly (ids and numbers need no escaping).
fn accepted_reply(ids: &[crate::queue::Appended]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(32 + ids.len() * 60);
    let _ = write!(out, "{{\"accepted\":{},\"ids\":[", ids.len());
    for (i, a) in ids.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}\"{}\"", a.id.hyphenated());
    }
    out.push_str("],\"seqs\":[");
    for (i, a) in ids.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}{}", a.seq);
    }
    out.push_str("]}");
    out
}

/// Parses a single JSON object body (Pezzo, PromptLayer).
async fn object_body(
    st: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Value, tokio::sync::OwnedSemaphorePermit), IngestError> {
    let (raw, permit) = json_body(st, headers, body).await?;
    Ok((raw.clone(), object_value(&raw)?, permit))
}

/// A JSON body's bytes (trimmed), not parsed yet.
async fn json_body(
    st: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), IngestError> {
    let refused = match framing(headers) {
        Ok(Framing::Json) => None,
        Ok(Framing::Ndjson) => Some(
            IngestError::new(
                415,
                "unsupported_media_type",
                "this route takes one JSON object (application/json)",
            )
            .unread_body(),
        ),
        Err(e) => Some(e),
    };
    if let Some(e) = refused {
        discard_body(st, headers, body);
        return Err(e);
    }
    let (body, permit) = read_body(st, headers, body).await?;
    let text = json_text(&body);
    if text.is_empty() {
        return Err(empty_body());
    }
    Ok((body.slice_ref(text), permit))
}

fn object_value(raw: &[u8]) -> Result<Value, IngestError> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| json_error(&e, "the body"))?;
    if !v.is_object() {
        return Err(not_object("the body"));
    }
    Ok(v)
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// One service route: how its single-object body is checked, routed, credited and answered.
/// Every Pezzo and PromptLayer route goes through [`accept`] with one of these.
struct ServiceRoute {
    /// The `route` label of `llmlogd_ingest_events_total`.
    name: &'static str,
    kind: EventKind,
    check: fn(&HttpState, EventKind, &Value) -> Result<(), Vec<formats::FieldError>>,
    attrs: fn(&Value) -> formats::Attributes,
    creds: fn(&HeaderMap, &Value) -> ClientCredentials,
    reply: fn(u64, &Value) -> Response,
    /// A fast path straight from the bytes, tried first: `Some` when it accepts the body for
    /// certain (with its attributes and 201 reply), `None` to leave it to the `Value` path.
    fast: Option<FastRoute>,
}

/// See [`ServiceRoute::fast`]; for routes whose credentials come from headers only.
struct FastRoute {
    accept: fn(&[u8]) -> Option<formats::FastAccepted>,
    creds: fn(&HeaderMap) -> ClientCredentials,
}

/// Parses and checks the body, stores the event durably, and answers as the service would.
async fn accept(st: &HttpState, r: &ServiceRoute, headers: HeaderMap, body: Body) -> Response {
    // The permit holds the body's share of the memory budget until the queue answers.
    let (raw, permit) = match json_body(st, &headers, body).await {
        Ok(b) => b,
        Err(e) => {
            st.ingest.refused(r.name, &e);
            return e.into_response();
        }
    };
    if let Some((fast, ok)) = r.fast.as_ref().and_then(|f| Some((f, (f.accept)(&raw)?))) {
        let ev = NewEvent {
            kind: r.kind,
            attrs: ok.attrs,
            payload: raw,
            creds: (fast.creds)(&headers),
        };
        return match admit_holding(st, r.name, vec![ev], permit).await {
            Ok(ids) => JsonText(StatusCode::CREATED, (ok.reply)(ids[0].seq)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let checked = object_value(&raw).and_then(|v| {
        (r.check)(st, r.kind, &v)
            .map_err(IngestError::invalid)
            .map(|()| v)
    });
    let v = match checked {
        Ok(v) => v,
        Err(e) => {
            st.ingest.refused(r.name, &e);
            return e.into_response();
        }
    };
    let ev = NewEvent {
        kind: r.kind,
        attrs: (r.attrs)(&v),
        payload: raw,
        creds: (r.creds)(&headers, &v),
    };
    match admit_holding(st, r.name, vec![ev], permit).await {
        Ok(ids) => {
            if r.kind == EventKind::PromptLayerCreateGroup {
                // Before the id is handed out, so a follow-up can never beat it.
                let (q, seq) = (st.ingest.queue.clone(), ids[0].seq);
                let marked = tokio::task::spawn_blocking(move || q.mark_group(seq)).await;
                if let Err(e) = marked
                    .map_err(|e| IngestError::new(500, "internal", e.to_string()))
                    .and_then(|r| r.map_err(IngestError::from))
                {
                    return e.into_response();
                }
            }
            (r.reply)(ids[0].seq, &v)
        }
        Err(e) => e.into_response(),
    }
}

fn field_error(field: &str, problem: impl Into<String>) -> formats::FieldError {
    formats::FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

fn no_attrs(_: &Value) -> formats::Attributes {
    formats::Attributes::default()
}

/// PromptLayer's follow-ups carry the key in the body (`api_key`); some SDK calls also send
/// `X-API-KEY`.
fn body_or_header_key(h: &HeaderMap, v: &Value) -> ClientCredentials {
    ClientCredentials {
        api_key: v
            .get("api_key")
            .and_then(Value::as_str)
            .map(Secret::new)
            .or_else(|| header_str(h, "x-api-key").map(Secret::new)),
        project_id: None,
    }
}

/// Ids in follow-ups must be ones this llmlogd handed out, for the right kind of thing: the
/// sink swaps them for the service's ids when it delivers the follow-up, and logs and groups
/// have separate id spaces at the service (groups are marked in the queue when created).
fn check_track(st: &HttpState, kind: EventKind, v: &Value) -> Result<(), Vec<formats::FieldError>> {
    let EventKind::PromptLayerTrack(track) = kind else {
        return Ok(());
    };
    formats::promptlayer::validate_track(track, v)?;
    let head = *st.ingest.queue.head().borrow();
    let q = &st.ingest.queue;
    let is_group = |id: u64| q.is_group(id).unwrap_or(false);
    let kind_at = |id: u64| match q.get(id) {
        Ok(Some(ReadItem::Event(ev))) => Some(ev.kind),
        _ => None,
    };
    let mut bad = Vec::new();
    if let Some(id) = formats::promptlayer::track_request_id(v) {
        let is_log = |k| {
            matches!(
                k,
                EventKind::PromptLayerLog | EventKind::PromptLayerTrackRequest
            )
        };
        if id >= head || is_group(id) || kind_at(id).is_some_and(|k| !is_log(k)) {
            bad.push(field_error(
                "request_id",
                format!(
                    "{id} is not an id this llmlogd returned from /log-request or /track-request"
                ),
            ));
        }
    }
    if track == TrackKind::Group {
        if let Some(id) = formats::promptlayer::track_group_id(v) {
            let group_kind = Some(EventKind::PromptLayerCreateGroup);
            if id >= head || !(is_group(id) || kind_at(id) == group_kind) {
                bad.push(field_error(
                    "group_id",
                    format!(
                        "{id} is not an id this llmlogd returned from /create-group in the last {} days",
                        crate::queue::FOLLOW_UP_IDS_KEEP_MS / 86_400_000
                    ),
                ));
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

const PEZZO: ServiceRoute = ServiceRoute {
    name: "pezzo",
    kind: EventKind::Pezzo,
    check: |_, _, v| formats::pezzo::validate(v),
    attrs: formats::pezzo::attributes,
    creds: |h, _| pezzo_creds(h),
    reply: |_, v| JsonText(StatusCode::CREATED, formats::pezzo::success_reply(v)).into_response(),
    fast: Some(FastRoute {
        accept: formats::pezzo::accept_bytes,
        creds: pezzo_creds,
    }),
};

fn pezzo_creds(h: &HeaderMap) -> ClientCredentials {
    ClientCredentials {
        api_key: header_str(h, "x-pezzo-api-key").map(Secret::new),
        project_id: header_str(h, "x-pezzo-project-id"),
    }
}

const PL_LOG: ServiceRoute = ServiceRoute {
    name: "promptlayer",
    kind: EventKind::PromptLayerLog,
    check: |_, _, v| formats::promptlayer::validate(v),
    attrs: formats::promptlayer::attributes,
    creds: |h, _| promptlayer_creds(h),
    reply: |seq, v| {
        JsonText(StatusCode::CREATED, formats::promptlayer::log_reply(seq, v)).into_response()
    },
    fast: Some(FastRoute {
        accept: formats::promptlayer::accept_bytes,
        creds: promptlayer_creds,
    }),
};

fn promptlayer_creds(h: &HeaderMap) -> ClientCredentials {
    ClientCredentials {
        api_key: header_str(h, "x-api-key").map(Secret::new),
        project_id: None,
    }
}

const fn pl_track_route(track: TrackKind) -> ServiceRoute {
    ServiceRoute {
        name: "promptlayer_track",
        kind: EventKind::PromptLayerTrack(track),
        check: check_track,
        attrs: formats::promptlayer::attributes,
        creds: body_or_header_key,
        reply: |_, _| Json200(formats::promptlayer::track_reply()).into_response(),
        fast: None,
    }
}

/// `POST /create-group`: answered at once with a local group id; the group is created at the
/// service when the sink delivers this event, and `/track-group` follow-ups wait for it.
const PL_CREATE_GROUP: ServiceRoute = ServiceRoute {
    name: "promptlayer_group",
    kind: EventKind::PromptLayerCreateGroup,
    check: |_, _, v| match v.get("api_key") {
        None | Some(Value::String(_)) | Some(Value::Null) => Ok(()),
        Some(_) => Err(vec![field_error("api_key", "must be a string")]),
    },
    attrs: no_attrs,
    creds: body_or_header_key,
    reply: |seq, _| Json200(json!({"success": true, "id": seq})).into_response(),
    fast: None,
};

/// `POST /track-request`, sent by the PromptLayer SDKs' OpenAI/Anthropic wrappers: stored and
/// forwarded as is; answered with a local request id that follow-ups can name.
const PL_TRACK_REQUEST: ServiceRoute = ServiceRoute {
    name: "promptlayer_track_request",
    kind: EventKind::PromptLayerTrackRequest,
    check: |_, _, v| {
        let mut bad = Vec::new();
        match v.get("function_name") {
            Some(Value::String(_)) => {}
            Some(_) => bad.push(field_error("function_name", "must be a string")),
            None => bad.push(field_error("function_name", "is required")),
        }
        if !matches!(
            v.get("kwargs"),
            None | Some(Value::Null) | Some(Value::Object(_))
        ) {
            bad.push(field_error("kwargs", "must be an object"));
        }
        if !matches!(
            v.get("tags"),
            None | Some(Value::Null) | Some(Value::Array(_))
        ) {
            bad.push(field_error("tags", "must be an array of strings"));
        }
        if v.get("api_key").is_some_and(|k| !k.is_string()) {
            bad.push(field_error("api_key", "must be a string"));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad)
        }
    },
    // A wrapper's log: routed by its `tags` and `metadata.environment` like `/log-request`.
    attrs: formats::promptlayer::attributes,
    creds: body_or_header_key,
    reply: |seq, _| Json200(json!({"success": true, "request_id": seq})).into_response(),
    fast: None,
};

async fn pezzo_report(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &PEZZO, h, b).await
}
/// Pezzo's request cache, as seen by an app with `cache: true`: the client asks
/// `/cache/v1/request/retrieve` before every OpenAI call and `/save`s the answer after a miss.
/// Both official clients break the app's call when these routes fail (the JS client parses
/// the error body twice and throws; the Python one raises a TypeError), so llmlogd answers
/// them: every lookup is a miss (the app calls OpenAI as it would on a cold cache) and a save
/// is accepted and dropped. Caching is not logging: llmlogd stores nothing here and sends
/// nothing to Pezzo, and the reports of these calls (`cacheEnabled: true`, `cacheHit: false`)
/// are logged as usual. The body is checked as Pezzo's server checks it (`request` must be an
/// object), so a broken client still gets a 400 that names the field.
fn pezzo_cache(v: &Value, needs_response: bool) -> Result<(), Vec<formats::FieldError>> {
    let mut bad = Vec::new();
    match v.get("request") {
        Some(Value::Object(_)) => {}
        Some(_) => bad.push(field_error("request", "must be an object")),
        None => bad.push(field_error("request", "is required")),
    }
    if needs_response && v.get("response").is_none_or(Value::is_null) {
        bad.push(field_error("response", "is required"));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

async fn pezzo_cache_call(st: &HttpState, h: HeaderMap, b: Body, save: bool) -> Response {
    static NOTED: AtomicBool = AtomicBool::new(false);
    let checked = async {
        let (_, v, _permit) = object_body(st, &h, b).await?;
        pezzo_cache(&v, save).map_err(IngestError::invalid)
    }
    .await;
    if let Err(e) = checked {
        return e.into_response();
    }
    if !NOTED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "an app uses Pezzo's request cache (cache: true); llmlogd answers every lookup as a miss and stores nothing"
        );
    }
    let reply = if save {
        json!({"hash": null, "exp": null})
    } else {
        json!({"hit": false, "data": null})
    };
    JsonReply(StatusCode::CREATED, reply).into_response()
}

async fn pezzo_cache_retrieve(State(st): St, h: HeaderMap, b: Body) -> Response {
    pezzo_cache_call(&st, h, b, false).await
}
async fn pezzo_cache_save(State(st): St, h: HeaderMap, b: Body) -> Response {
    pezzo_cache_call(&st, h, b, true).await
}

async fn pl_log(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &PL_LOG, h, b).await
}
async fn pl_track_score(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &pl_track_route(TrackKind::Score), h, b).await
}
async fn pl_track_metadata(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &pl_track_route(TrackKind::Metadata), h, b).await
}
async fn pl_track_prompt(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &pl_track_route(TrackKind::Prompt), h, b).await
}
async fn pl_track_group(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &pl_track_route(TrackKind::Group), h, b).await
}
async fn pl_create_group(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &PL_CREATE_GROUP, h, b).await
}
async fn pl_track_request(State(st): St, h: HeaderMap, b: Body) -> Response {
    accept(&st, &PL_TRACK_REQUEST, h, b).await
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the Prometheus text
/// format 0.0.4 (`curl`, and tools that read only that).
async fn metrics(State(st): St, h: HeaderMap) -> Response {
    let format = Exposition::negotiate(
        h.get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let text = st.ingest.metrics.render(&st.ingest.queue, format);
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    r
}

/// Ready: started, not stopping, and a new event would be accepted (not refused for a full
/// queue, a full disk or a store being reopened), with the reason when it is not.
async fn readyz(State(st): St) -> Response {
    if !st.ready.load(Ordering::Acquire) {
        return JsonReply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "starting or stopping"}),
        )
        .into_response();
    }
    match st.ingest.queue.refusing() {
        None => Json200(json!({"status": "ready"})).into_response(),
        Some(reason) => JsonReply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not accepting events", "reason": reason}),
        )
        .into_response(),
    }
}

async fn status(State(st): St) -> Response {
    Json200(st.status.render(&st.ingest.queue)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lone surrogate escape is refused in words that say so; serde_json's own were
    /// "unexpected end of hex escape" and "lone leading surrogate in hex escape" (for a low
    /// one, too).
    #[test]
    fn a_lone_surrogate_escape_is_named_as_such() {
        for body in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\ud800x"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud800\u0041"}"#,
        ] {
            let e = serde_json::from_str::<Value>(body).unwrap_err();
            let msg = json_error(&e, "the event").message;
            assert!(
                msg.starts_with(
                    "the event is not valid JSON: a \\u escape names a lone UTF-16 surrogate"
                ) && msg.contains(" at line 1 column "),
                "{body}: {msg}"
            );
        }
        // A pair is text, and other escape errors keep serde_json's words.
        assert!(serde_json::from_str::<Value>(r#"{"a":"\ud83d\ude00"}"#).is_ok());
        let e = serde_json::from_str::<Value>(r#"{"a":"\uZZZZ"}"#).unwrap_err();
        assert!(!json_error(&e, "the event").message.contains("surrogate"));
    }

    #[test]
    fn one_connection_never_holds_more_than_a_quarter_of_the_body_budget() {
        assert_eq!(budget_bytes(1 << 20), 64 << 20, "the defaults keep 64 MiB");
        for largest in [1 << 20, 16 << 20, 17 << 20, 40 << 20, 64 << 20] {
            let budget = budget_bytes(largest);
            assert!(
                largest <= budget / CONNECTION_SHARES,
                "{largest}: one body within a share of {budget}"
            );
            assert!(
                u32::try_from(largest).is_ok(),
                "a share is one semaphore acquire"
            );
        }
    }

    /// A client that sends a large body and hangs up before the ack drops its request's task
    /// (hyper stops serving it); the event still waits in the queue's channel, so the body's
    /// share of the budget stays taken until the queue is done with it. Before, it was given
    /// back with the task: bodies sent and abandoned could pile up unbudgeted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_body_holds_its_share_until_stored_even_when_the_client_hangs_up() {
        const BUDGET: usize = 64 << 20;
        let dir = tempfile::tempdir().unwrap();
        let ingest = super::super::test_ingest(dir.path());
        let budget = Arc::new(tokio::sync::Semaphore::new(BUDGET));
        let st = Arc::new(HttpState {
            ingest: ingest.clone(),
            max_body: 16 << 20,
            body_timeout: Duration::from_secs(30),
            status: Arc::new(StatusBoard::default()),
            ready: Arc::new(AtomicBool::new(true)),
            body_budget: budget.clone(),
            stopping: Default::default(),
        });
        let body = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(4 << 20));
        let len = body.len();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let held = ingest.queue.hold_writes();
        let request = tokio::spawn(native_events(State(st), headers, Body::from(body)));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ingest.queue.writes_pending() {
            assert!(
                std::time::Instant::now() < deadline,
                "the append never came"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The client hangs up: its request's task is dropped.
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        assert_eq!(
            budget.available_permits(),
            BUDGET - len,
            "the body's share is held while its event waits for the queue"
        );
        drop(held);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while budget.available_permits() != BUDGET {
            assert!(
                std::time::Instant::now() < deadline,
                "the share was not given back once stored: {} of {BUDGET}",
                budget.available_permits()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn growing_lines_and_one_largest_body_fit_the_budget_together() {
        let mib = 1 << 20;
        let largest = 16 * mib;
        assert_eq!(long_line_slots(largest, largest, budget_bytes(largest)), 3);
        assert_eq!(long_line_slots(mib, largest, budget_bytes(largest)), 48);
        assert_eq!(long_line_slots(mib, mib, budget_bytes(mib)), 63);
        for (line, body) in [
            (mib, mib),
            (16 * mib, mib),
            (mib, 64 * mib),
            (64 * mib, 64 * mib),
        ] {
            let largest = line.max(body);
            let budget = budget_bytes(largest);
            let slots = long_line_slots(line, largest, budget);
            assert!(
                slots >= 1 && slots * line + largest <= budget,
                "{line} {body}"
            );
        }
    }

    #[test]
    fn the_accepted_reply_is_what_serde_json_writes() {
        let id = |n: u128| uuid::Uuid::from_u128(0x0190_a0b0_0000_7000_8000_0000_0000_0000 + n);
        for n in [1usize, 3] {
            let ids: Vec<crate::queue::Appended> = (0..n)
                .map(|i| crate::queue::Appended {
                    seq: 41 + i as u64,
                    id: id(i as u128),
                })
                .collect();
            let want = json!({
                "accepted": ids.len(),
                "ids": ids.iter().map(|a| a.id.to_string()).collect::<Vec<_>>(),
                "seqs": ids.iter().map(|a| a.seq).collect::<Vec<_>>(),
            })
            .to_string();
            assert_eq!(accepted_reply(&ids), want);
        }
    }

    /// The shortcut for one canonical object gives what splitting and checking give, and
    /// leaves every other body to them.
    #[test]
    fn one_canonical_event_is_what_the_split_gives() {
        let event = r#"{"schema":"llmlogd.llm/v1","provider":"openai","model":"gpt-4o",
            "request":{"start_time":1714557600.25,"body":{"model":"gpt-4o","messages":[]}},
            "response":{"end_time":"2024-05-01T10:00:01Z","body":{"choices":[]},"http_status":200},
            "status":"success","tags":["a"],"environment":"prod"}"#;
        let body = Bytes::from(format!(" \n{event}\r\n"));
        let fast = one_canonical_event(&body, Framing::Json).expect("canonical");
        let split = split_native(&body, Framing::Json).unwrap();
        let slow = native_event(split[0].0.clone()).unwrap();
        assert_eq!(fast.payload, slow.payload);
        assert_eq!(&fast.payload[..], event.as_bytes());
        assert_eq!(fast.attrs, slow.attrs);
        assert_eq!(fast.attrs.environment.as_deref(), Some("prod"));
        for (other, framing) in [
            (format!("[{event}]"), Framing::Json),
            (event.to_string(), Framing::Ndjson),
            (format!("{event} {event}"), Framing::Json),
            (r#"{"provider":"openai"}"#.to_string(), Framing::Json),
            (
                event.replace("\"tags\":[\"a\"]", "\"tags\":[1]"),
                Framing::Json,
            ),
        ] {
            let b = Bytes::from(other.clone());
            assert!(one_canonical_event(&b, framing).is_none(), "{other}");
        }
    }

    fn raws(body: &str, f: Framing) -> Result<Vec<String>, IngestError> {
        let b = Bytes::copy_from_slice(body.as_bytes());
        split_native(&b, f).map(|v| {
            v.iter()
                .map(|(x, _)| String::from_utf8(x.to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn native_bodies_split_byte_exact() {
        assert_eq!(
            raws(" {\"a\": 1 } \n", Framing::Json).unwrap(),
            vec!["{\"a\": 1 }"]
        );
        assert_eq!(
            raws("[ {\"a\":1} ,{ \"b\" : [2]}]", Framing::Json).unwrap(),
            vec!["{\"a\":1}", "{ \"b\" : [2]}"]
        );
        assert_eq!(
            raws("{\"a\":1}\n\n{\"b\":2}\r\n", Framing::Ndjson).unwrap(),
            vec!["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn native_errors_name_the_problem() {
        let e = raws("{\"a\":", Framing::Json).unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        assert!(e.message.contains("end of input"), "{}", e.message);
        let e = raws("[1]", Framing::Json).unwrap_err();
        assert!(e.message.contains("event [0]"), "{}", e.message);
        let e = raws("{\"a\":1}\nnope\n", Framing::Ndjson).unwrap_err();
        assert!(e.message.contains("line 2"), "{}", e.message);
        let e = raws("[]", Framing::Json).unwrap_err();
        assert_eq!(e.code, "empty");
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let e = raws(&deep, Framing::Json).unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(framing(&h).unwrap(), Framing::Json);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        assert_eq!(framing(&h).unwrap(), Framing::Ndjson);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(framing(&h).unwrap(), Framing::Json);
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let e = framing(&h).unwrap_err();
        assert_eq!((e.status, e.closes), (415, true));
    }

    /// Fuzzing on stable: random JSON shaped like the services' bodies (known field names
    /// mixed with noise) through every parser and renderer. Nothing may panic, and whatever a
    /// validator accepts must render into bodies the target's validator accepts. The case
    /// count is bounded (PROPTEST_CASES, default 256) so CI runs it every time.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "provider",
            "model",
            "input",
            "output",
            "request_start_time",
            "request_end_time",
            "metadata",
            "request",
            "response",
            "body",
            "timestamp",
            "messages",
            "role",
            "content",
            "type",
            "text",
            "tags",
            "score",
            "price",
            "input_tokens",
            "status",
            "error_type",
            "error_message",
            "parameters",
            "client",
            "clientVersion",
            "environment",
            "properties",
            "choices",
            "message",
            "usage",
            "prompt_tokens",
            "completion_tokens",
            "schema",
            "api_type",
            "prompt_name",
            "request_id",
            "api_key",
            "cacheHit",
            "tool_calls",
            "system",
            "stop_reason",
        ];

        fn arb_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                (-1e12f64..1e12).prop_map(|f| json!(f)),
                prop_oneof![
                    Just("OpenAI".to_string()),
                    Just("anthropic".to_string()),
                    Just("2024-01-01T00:00:00.000Z".to_string()),
                    Just("chat".to_string()),
                    Just("ERROR".to_string()),
                    ".{0,12}",
                ]
                .prop_map(Value::String),
            ];
            leaf.prop_recursive(5, 96, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec(
                        (
                            prop_oneof![
                                prop::sample::select(KEYS).prop_map(String::from),
                                "[a-z]{1,6}"
                            ],
                            inner
                        ),
                        0..8
                    )
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn service_parsers_never_panic_and_render_valid(v in arb_json()) {
                use crate::formats::{self, Format};
                for from in [Format::Pezzo, Format::PromptLayer, Format::Native] {
                    let _ = formats::attributes(from, &v);
                    if formats::validate(from, &v).is_ok() {
                        for to in [Format::Pezzo, Format::PromptLayer] {
                            if let Ok(out) = formats::render(from, &v, to) {
                                prop_assert!(
                                    formats::validate(to, &out).is_ok(),
                                    "{:?} → {:?} rendered an invalid body: {}",
                                    from, to, out
                                );
                            }
                        }
                    }
                }
                for kind in crate::formats::TrackKind::ALL {
                    let _ = crate::formats::promptlayer::validate_track(kind, &v);
                }
            }

            #[test]
            fn native_framing_never_panics_and_slices_exactly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let body = Bytes::from(bytes);
                for f in [Framing::Json, Framing::Ndjson] {
                    if let Ok(events) = split_native(&body, f) {
                        for (e, _) in events {
                            let v: Value = serde_json::from_slice(&e).expect("each slice is JSON");
                            prop_assert!(v.is_object());
                        }
                    }
                }
            }

            #[test]
            fn native_framing_of_real_json(v in arb_json(), n in 1usize..4) {
                let obj = json!({"wrapped": v});
                let one = obj.to_string();
                let lines = vec![one.clone(); n].join("\n");
                let got = split_native(&Bytes::from(lines), Framing::Ndjson).unwrap();
                prop_assert_eq!(got.len(), n);
                prop_assert_eq!(&got[0].0[..], one.as_bytes());
            }
        }
    }
}
