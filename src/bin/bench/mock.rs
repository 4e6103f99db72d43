//! The remote services, mocked in the bench process: a hyper server that answers every
//! `POST` with `200 {"success":true,"id":N}` at once, or after a fixed delay (a service that
//! takes 50 ms). It counts the events it received, by the ids llmlogd sends with them
//! (`X-Llmlogd-Event-Ids` on the http sink, `Idempotency-Key` on the PromptLayer sink), so a
//! drain is measured where it lands and duplicates are visible.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

/// What a mock saw.
pub struct MockStats {
    base: Instant,
    pub requests: AtomicU64,
    /// Events received, duplicates included.
    pub events: AtomicU64,
    pub body_bytes: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    // A std Mutex: held for a few inserts, never across an await.
    ids: Mutex<HashSet<u128>>,
}

impl MockStats {
    fn new() -> Self {
        MockStats {
            base: Instant::now(),
            requests: AtomicU64::new(0),
            events: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            ids: Mutex::new(HashSet::new()),
        }
    }

    /// Distinct event ids received.
    pub fn unique(&self) -> u64 {
        self.ids.lock().map_or(0, |s| s.len() as u64)
    }

    /// When the first reply went out.
    pub fn first(&self) -> Option<Instant> {
        let ns = self.first_ns.load(Ordering::Relaxed);
        (ns != u64::MAX).then(|| self.base + Duration::from_nanos(ns))
    }

    /// When the latest reply went out.
    pub fn last(&self) -> Option<Instant> {
        let ns = self.last_ns.load(Ordering::Relaxed);
        (ns != 0).then(|| self.base + Duration::from_nanos(ns))
    }
}

/// A running mock; stops when dropped.
pub struct Mock {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    stop: CancellationToken,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a mock on `127.0.0.1:0` that answers after `delay`.
pub async fn start(delay: Duration) -> std::io::Result<Mock> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(MockStats::new());
    let stop = CancellationToken::new();
    let (st, stop2) = (stats.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop2.cancelled() => return,
                c = listener.accept() => c,
            };
            let Ok((s, _)) = conn else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            let (st, stop3) = (st.clone(), stop2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, st.clone(), delay));
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(s), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop3.cancelled() => {}
                }
            });
        }
    });
    Ok(Mock { addr, stats, stop })
}

fn parse_ids(h: &str) -> Vec<u128> {
    h.split(',')
        .filter_map(|s| {
            let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
            u128::from_str_radix(&hex, 16).ok()
        })
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<MockStats>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ids = req
        .headers()
        .get("x-llmlogd-event-ids")
        .or_else(|| req.headers().get("idempotency-key"))
        .and_then(|v| v.to_str().ok())
        .map(parse_ids)
        .unwrap_or_default();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
            *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let n = st.requests.fetch_add(1, Ordering::Relaxed) + 1;
    st.events
        .fetch_add(ids.len().max(1) as u64, Ordering::Relaxed);
    st.body_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if !ids.is_empty() {
        if let Ok(mut s) = st.ids.lock() {
            s.extend(ids);
        }
    }
    let now = st.base.elapsed().as_nanos() as u64;
    st.first_ns.fetch_min(now, Ordering::Relaxed);
    st.last_ns.fetch_max(now, Ordering::Relaxed);
    let mut r = Response::new(Full::new(Bytes::from(format!(
        r#"{{"success":true,"id":{n}}}"#
    ))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}
