//! The status board: what each sink is doing, kept by the delivery workers and served as
//! `GET /v1/status` (what `llmlogd status` prints).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};

use crate::event::now_ms;
use crate::queue::Queue;

/// One sink's state, as shown to operators. No keys, no event content.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub kind: String,
    /// ok | backoff | paused | open
    pub state: &'static str,
    /// Events routed to the sink and not yet done (from its cursor to the head; approximate).
    pub backlog: u64,
    pub in_flight: usize,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub last_success_ms: Option<u64>,
    pub oldest_pending_ms: Option<u64>,
    pub paused_until_ms: Option<u64>,
    pub rate_limit: f64,
    pub concurrency: usize,
    /// Most events / body bytes per request now: `batch_max_events` / `batch_max_bytes`, or
    /// lower once the service refused a batch as too large (413, 431).
    pub batch_ceiling_events: usize,
    pub batch_ceiling_bytes: usize,
}

#[derive(Debug, Default)]
pub struct StatusBoard {
    // A std Mutex: held for a field update, never across an await.
    sinks: Mutex<BTreeMap<String, SinkStatus>>,
}

impl StatusBoard {
    pub fn update(&self, name: &str, f: impl FnOnce(&mut SinkStatus)) {
        if let Ok(mut m) = self.sinks.lock() {
            let s = m.entry(name.to_string()).or_insert_with(|| SinkStatus {
                name: name.to_string(),
                state: "ok",
                ..SinkStatus::default()
            });
            f(s);
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.sinks.lock() {
            m.remove(name);
        }
    }

    pub fn get(&self, name: &str) -> Option<SinkStatus> {
        self.sinks.lock().ok()?.get(name).cloned()
    }

    pub fn render(&self, queue: &Queue) -> Value {
        let sinks: Vec<SinkStatus> = self
            .sinks
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let q = queue.stats();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "now_ms": now_ms(),
            "queue": {
                "events": q.events,
                "bytes": q.bytes,
                "oldest_ms": q.oldest_ms,
                "next_seq": q.next_seq,
                "lost_events": queue.lost_events(),
                "last_loss": queue.loss().map(|l| json!({
                    "found": l.last.found,
                    "mark": l.last.mark,
                    "at_ms": l.at_ms,
                })),
                "dead_letters": queue.dead_letter_count(),
                "dead_letter_bytes": queue.dead_letter_bytes(),
                "dead_letters_dropped": queue.dead_letters_dropped(),
                "disk_bytes": queue.disk_bytes(),
                "disk_free_bytes": queue.free_bytes(),
                "data_dir": queue.data_dir().display().to_string(),
            },
            "sinks": sinks,
        })
    }
}
