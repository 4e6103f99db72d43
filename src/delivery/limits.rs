//! Per-sink flow control: a token bucket for requests/s, and AIMD on concurrency and rate.
//!
//! AIMD reacts to every attempt's result (not once per retry sequence): a 429 halves the
//! concurrency and the rate (the worker passes on one 429 per round of requests in flight,
//! `Worker::throttle`: the others answer the pace already halved); each success adds back a little (concurrency by 1/concurrency,
//! rate by 1 % of the configured rate), so the sink climbs back over a few round trips.
//! With no configured rate the sink is unlimited until a 429; the rate it falls back to is
//! half of what it was sending, and climbing back past 4x that lifts the limit again.
//!
//! The batch ceiling ([`BatchCeiling`]) is what the service was seen to accept in one request:
//! a 413 (body too large) lowers its bytes, a 431 (headers too large: the http sink's
//! `X-Llmlogd-Event-Ids` grows with the batch) its events, to half the refused request. Later
//! batches are formed under it, so a service that takes at most 1 MB costs the refused
//! requests once, not at every batch. It climbs back by a quarter after
//! `CEILING_GROW_AFTER` batches delivered near it and at least `CEILING_GROW_EVERY` since it
//! last moved, never above the configured `batch_max_*`, so a limit the service raised is found
//! again (one refused request per step too far, a few minutes apart).

use std::time::{Duration, Instant};

use crate::config::RateConfig;

/// Requests per second below which the adaptive rate never goes.
const MIN_RATE: f64 = 0.2;

#[derive(Debug)]
pub struct FlowControl {
    max_concurrency: usize,
    concurrency: f64,
    configured: Option<RateConfig>,
    /// The current limit; `None` = unlimited.
    rate: Option<f64>,
    /// Unlimited sinks: the rate we learned at the last 429, to know when to lift the limit.
    learned_from: f64,
    tokens: f64,
    last: Instant,
    /// Recent send rate (requests/s), an exponentially weighted average.
    sent_rate: f64,
    last_send: Option<Instant>,
}

impl FlowControl {
    pub fn new(max_concurrency: usize, rate: Option<RateConfig>, now: Instant) -> Self {
        let burst = rate.as_ref().map_or(0.0, |r| r.burst as f64);
        FlowControl {
            max_concurrency,
            concurrency: max_concurrency as f64,
            rate: rate.as_ref().map(|r| r.per_second),
            configured: rate,
            learned_from: 0.0,
            tokens: burst,
            last: now,
            sent_rate: 0.0,
            last_send: None,
        }
    }

    /// Applies a new config (reload), keeping what was learned where it still fits.
    /// A limit at its configured value (nothing lowered it) takes the new value at once, a
    /// raised one too: an operator who raises `concurrency` or `rate_limit` to drain a
    /// backlog got the old value, climbing a little per success (from 2 to 16 requests in
    /// flight, some 120 deliveries).
    pub fn reconfigure(&mut self, max_concurrency: usize, rate: Option<RateConfig>) {
        let at_max = self.concurrency >= self.max_concurrency as f64;
        self.max_concurrency = max_concurrency;
        self.concurrency = if at_max {
            max_concurrency as f64
        } else {
            self.concurrency.min(max_concurrency as f64).max(1.0)
        };
        let was = self.configured.as_ref().map(|c| c.per_second);
        self.rate = match (&rate, self.rate) {
            (Some(r), Some(cur)) if Some(cur) == was => Some(r.per_second),
            (Some(r), Some(cur)) => Some(cur.min(r.per_second)),
            (Some(r), None) => Some(r.per_second),
            (None, cur) => cur.filter(|_| self.configured.is_none()),
        };
        self.configured = rate;
    }

    /// How many requests may be in flight now.
    pub fn concurrency(&self) -> usize {
        (self.concurrency.floor() as usize).clamp(1, self.max_concurrency)
    }

    /// The current requests/s limit, 0 when unlimited (for metrics).
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }

    fn burst(&self) -> f64 {
        match (&self.configured, self.rate) {
            (Some(c), Some(r)) => (c.burst as f64).min(r.max(1.0)),
            (None, Some(r)) => r.max(1.0),
            _ => f64::INFINITY,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(r) = self.rate {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * r).min(self.burst());
        }
        self.last = now;
    }

    /// Takes a token for one request, or says how long until one is available.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.rate.is_some() {
            if self.tokens < 1.0 {
                let r = self.rate.unwrap_or(1.0).max(MIN_RATE);
                return Err(Duration::from_secs_f64(
                    ((1.0 - self.tokens) / r).max(0.001),
                ));
            }
            self.tokens -= 1.0;
        }
        if let Some(prev) = self.last_send {
            let dt = now.saturating_duration_since(prev).as_secs_f64().max(1e-3);
            self.sent_rate = 0.9 * self.sent_rate + 0.1 * (1.0 / dt);
        }
        self.last_send = Some(now);
        Ok(())
    }

    /// A 429: halve concurrency and rate.
    pub fn on_throttle(&mut self) {
        self.concurrency = (self.concurrency / 2.0).max(1.0);
        let base = self.rate.unwrap_or(self.sent_rate.max(1.0));
        let next = (base / 2.0).max(MIN_RATE);
        if self.rate.is_none() {
            self.learned_from = next;
        }
        self.rate = Some(next);
        self.tokens = self.tokens.min(1.0);
    }

    /// A success: additive increase.
    pub fn on_success(&mut self) {
        let max = self.max_concurrency as f64;
        if self.concurrency < max {
            self.concurrency = (self.concurrency + 1.0 / self.concurrency).min(max);
        }
        if let Some(r) = self.rate {
            match &self.configured {
                Some(c) => self.rate = Some((r + c.per_second * 0.01).min(c.per_second)),
                None => {
                    let next = r + (r * 0.01).max(0.05);
                    self.rate = (next < self.learned_from * 4.0).then_some(next);
                }
            }
        }
    }
}

/// Batches delivered near the ceiling before it climbs a step.
const CEILING_GROW_AFTER: u32 = 16;
/// At least this long between two moves of the ceiling, so a service whose limit sits just
/// above a step refuses a request at most once per this interval.
const CEILING_GROW_EVERY: Duration = Duration::from_secs(60);

/// The largest request a sink's service was seen to accept (see the module doc).
#[derive(Debug, Clone)]
pub struct BatchCeiling {
    max_events: usize,
    max_bytes: usize,
    events: usize,
    bytes: usize,
    /// Batches delivered near the ceiling since it last moved.
    successes: u32,
    moved: Instant,
}

impl BatchCeiling {
    /// No ceiling learned yet: the configured `batch_max_events` / `batch_max_bytes`.
    pub fn new(max_events: usize, max_bytes: usize, now: Instant) -> Self {
        BatchCeiling {
            max_events,
            max_bytes,
            events: max_events,
            bytes: max_bytes,
            successes: 0,
            moved: now,
        }
    }

    /// Most events in one request now (at least one).
    pub fn events(&self) -> usize {
        self.events
    }

    /// Most body bytes in one request now (a single event larger than this still goes, alone).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The service refused a request of `events` events and `bytes` body bytes as too large
    /// (`status` 413 or 431). Only a batch lowers it: a lone event refused is that event's
    /// problem (the dead letters), so the ceiling never goes below one event.
    pub fn too_large(&mut self, status: u16, events: usize, bytes: usize, now: Instant) {
        if events < 2 {
            return;
        }
        if status == 431 {
            self.events = self.events.min(events / 2).max(1);
        } else {
            self.bytes = self.bytes.min(bytes / 2).max(1);
        }
        self.successes = 0;
        self.moved = now;
    }

    /// A request of `events` events and `bytes` bytes was delivered. Only a batch near the
    /// ceiling is evidence that it holds (light traffic's small batches say nothing), and
    /// after enough of them, slowly, the ceiling climbs a step.
    pub fn delivered(&mut self, events: usize, bytes: usize, now: Instant) {
        let (low_events, low_bytes) = (self.events < self.max_events, self.bytes < self.max_bytes);
        let near =
            (low_events && events * 2 >= self.events) || (low_bytes && bytes * 2 >= self.bytes);
        if !near {
            return;
        }
        self.successes = self.successes.saturating_add(1);
        if self.successes < CEILING_GROW_AFTER
            || now.saturating_duration_since(self.moved) < CEILING_GROW_EVERY
        {
            return;
        }
        let step = |v: usize, max: usize| v.saturating_add((v / 4).max(1)).min(max);
        self.events = step(self.events, self.max_events);
        self.bytes = step(self.bytes, self.max_bytes);
        self.successes = 0;
        self.moved = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_paces_requests() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(
            4,
            Some(RateConfig {
                per_second: 10.0,
                burst: 2,
            }),
            t0,
        );
        assert!(f.try_acquire(t0).is_ok());
        assert!(f.try_acquire(t0).is_ok());
        let wait = f.try_acquire(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert!(f.try_acquire(t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn aimd_halves_on_429_and_climbs_back() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(
            16,
            Some(RateConfig {
                per_second: 100.0,
                burst: 100,
            }),
            t0,
        );
        // A full bucket (burst 100) does not send a burst back at a service that asked to
        // slow down: one send, then the halved rate.
        f.on_throttle();
        assert_eq!((f.concurrency(), f.rate()), (8, 50.0));
        assert!(f.try_acquire(t0).is_ok());
        assert!(f.try_acquire(t0).is_err(), "no burst after a 429");
        f.on_throttle();
        assert_eq!((f.concurrency(), f.rate()), (4, 25.0));
        for _ in 0..1000 {
            f.on_success();
        }
        assert_eq!((f.concurrency(), f.rate()), (16, 100.0));
    }

    #[test]
    fn a_reload_raising_the_limits_applies_them_at_once_unless_a_429_lowered_them() {
        let t0 = Instant::now();
        let rate = |per_second| {
            Some(RateConfig {
                per_second,
                burst: 10,
            })
        };
        let mut f = FlowControl::new(2, rate(5.0), t0);
        f.reconfigure(16, rate(50.0));
        assert_eq!((f.concurrency(), f.rate()), (16, 50.0), "raised at once");
        f.reconfigure(4, rate(20.0));
        assert_eq!((f.concurrency(), f.rate()), (4, 20.0), "lowered at once");
        f.on_throttle();
        f.reconfigure(16, rate(50.0));
        assert_eq!(
            (f.concurrency(), f.rate()),
            (2, 10.0),
            "what the 429 taught stays"
        );
    }

    #[test]
    fn unlimited_sink_learns_a_rate_then_lifts_it() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(8, None, t0);
        assert_eq!(f.rate(), 0.0);
        for i in 0..20 {
            f.try_acquire(t0 + Duration::from_millis(10 * i)).unwrap();
        }
        f.on_throttle();
        assert!(f.rate() > 0.0 && f.concurrency() == 4);
        for _ in 0..10_000 {
            f.on_success();
        }
        assert_eq!(f.rate(), 0.0, "limit lifted after recovering");
        assert_eq!(f.concurrency(), 8);
    }

    #[test]
    fn the_batch_ceiling_learns_from_413_and_431_and_climbs_back_slowly() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = BatchCeiling::new(100, 64_000, t0);
        // A lone event refused: nothing learned (it goes to the dead letters).
        c.too_large(413, 1, 50_000, at(0));
        assert_eq!((c.events(), c.bytes()), (100, 64_000));
        c.too_large(413, 60, 64_000, at(0));
        assert_eq!((c.events(), c.bytes()), (100, 32_000), "413: bytes");
        // A larger request refused later (sent before) lowers nothing further.
        c.too_large(413, 60, 64_000, at(0));
        assert_eq!(c.bytes(), 32_000);
        // Small batches are no evidence; near-ceiling ones are, after a while.
        for s in 0..1000 {
            c.delivered(1, 100, at(1 + s));
        }
        assert_eq!(c.bytes(), 32_000, "small batches are no evidence");
        for _ in 0..CEILING_GROW_AFTER {
            c.delivered(1, 20_000, at(10));
        }
        assert_eq!(c.bytes(), 32_000, "not before CEILING_GROW_EVERY");
        c.delivered(1, 20_000, at(61));
        assert_eq!((c.events(), c.bytes()), (100, 40_000), "one step up");
        c.too_large(431, 3, 300, at(100));
        assert_eq!(c.events(), 1, "431: events");
        c.too_large(431, 2, 300, at(100));
        assert_eq!(c.events(), 1, "never below one event");
        for k in 0..200 {
            for _ in 0..CEILING_GROW_AFTER {
                c.delivered(c.events(), c.bytes(), at(161 + 61 * k));
            }
        }
        assert_eq!(
            (c.events(), c.bytes()),
            (100, 64_000),
            "back at the maxima, not above"
        );
    }
}
