//! Per-sink flow control: a token bucket for requests/s, and AIMD on concurrency and rate.
//!
//! AIMD reacts to every attempt's result (not once per retry sequence): a 429 halves the
//! concurrency and the rate (the worker passes on one 429 per round of requests in flight,
//! `Worker::throttle`: the others answer the pace already halved); each success adds back a little (concurrency by 1/concurrency,
//! rate by 1 % of the configured rate), so the sink climbs back over a few round trips.
//! With no configured rate the sink is unlimited until a 429; the rate it falls back to is
//! half of what it was sending, and climbing back past 4x that lifts the limit again.

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
    pub fn reconfigure(&mut self, max_concurrency: usize, rate: Option<RateConfig>) {
        self.max_concurrency = max_concurrency;
        self.concurrency = self.concurrency.min(max_concurrency as f64).max(1.0);
        self.rate = match (&rate, self.rate) {
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
        f.on_throttle();
        assert_eq!((f.concurrency(), f.rate()), (8, 50.0));
        f.on_throttle();
        assert_eq!((f.concurrency(), f.rate()), (4, 25.0));
        for _ in 0..1000 {
            f.on_success();
        }
        assert_eq!((f.concurrency(), f.rate()), (16, 100.0));
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
}
