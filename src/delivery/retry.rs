//! What a reply means for delivery, and when to try again.
//!
//! | reply | verdict |
//! |---|---|
//! | 2xx | delivered (unless the sink reads a refusal in the body) |
//! | 401, 403 | pause the sink until a reload; keep every event (a refused *app's* key, in `worker.rs`: that event → dead letter while other keys work, else retried) |
//! | 413, 431 | halve the batch, and lower the sink's batch ceiling (`limits::BatchCeiling`); a single event → dead letter |
//! | 429, 503 with Retry-After | pause the sink until then (at most `max_retry_after`, at least `retry_initial`; from a second on, persisted, so a restart honours it); not a failed attempt |
//! | 408, 429, 5xx, connect error, timeout | retry with jittered exponential backoff |
//! | 3xx (redirects are never followed) | retry like a 5xx; the error names the Location |
//! | other 4xx (404 included) | halve the batch (only the refused events go); a single event → dead letter, with status and body |
//!
//! A 404 (405, 410) for every request usually means the sink's URL is wrong, not the events;
//! holding them like an outage was tried and left out: issue #4 sends every other 4xx to the
//! dead letters, and nothing is lost there (`llmlogd dlq replay` once the URL is fixed).

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use crate::ops::metrics::FailureClass;

/// What the engine does with the events of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    /// Transient: retry later (counts as an attempt).
    Retry(FailureClass),
    /// Pause the whole sink for this long; not an attempt.
    PauseFor(Duration, FailureClass),
    /// Pause the whole sink until the config is reloaded.
    PauseAuth,
    /// Send these events in halves (a refusal of some of them, or too large a batch).
    Split(FailureClass),
    /// Give up on the events (dead letters).
    Reject(FailureClass),
}

/// Classifies an HTTP status (with its Retry-After, if any).
pub fn classify(status: u16, retry_after: Option<Duration>, batch_len: usize) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        401 | 403 => Verdict::PauseAuth,
        // 431: the request's headers are too large; the http sink's `X-Llmlogd-Event-Ids`
        // grows with the batch (Node's default limit is 16 KiB, ~490 ids), so it is a batch
        // too large too.
        413 | 431 if batch_len > 1 => Verdict::Split(FailureClass::too_large),
        413 | 431 => Verdict::Reject(FailureClass::too_large),
        429 | 503 if retry_after.is_some() => Verdict::PauseFor(
            retry_after.unwrap_or_default(),
            if status == 429 {
                FailureClass::status_429
            } else {
                FailureClass::status_5xx
            },
        ),
        429 => Verdict::Retry(FailureClass::status_429),
        408 => Verdict::Retry(FailureClass::status_408),
        // Following would turn the POST into a bodiless GET (301/302/303) whose 200 says
        // nothing about the events; the URL needs fixing, and nothing is lost meanwhile.
        300..=399 => Verdict::Retry(FailureClass::redirect),
        // A refusal names no event: halve the batch until the refused ones are alone, so
        // only they reach the dead letters.
        400..=499 if batch_len > 1 => Verdict::Split(FailureClass::rejected_4xx),
        500..=599 => Verdict::Retry(FailureClass::status_5xx),
        _ => Verdict::Reject(FailureClass::rejected_4xx),
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date. A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Some services send fractional seconds; accept them.
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(1e9)));
        }
        return None;
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Jittered exponential backoff (±50 %, doubling, capped), from the backoff crate.
pub fn backoff(initial: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBackoff {
        current_interval: initial,
        initial_interval: initial,
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_interval: max,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// The next interval of `b`, never above `max`: the crate caps the interval before its
/// ±50 % jitter, so unclamped it reaches 1.5 × `max`.
pub fn next_probe(b: &mut ExponentialBackoff, max: Duration) -> Duration {
    b.next_backoff().unwrap_or(max).min(max)
}

/// The delay before attempt `attempts + 1` (attempts ≥ 1), jittered, never above `max`.
pub fn delay_after(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let mut b = backoff(initial, max);
    let mut d = initial;
    for _ in 0..attempts.clamp(1, 64) {
        d = b.next_backoff().unwrap_or(max);
    }
    d.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        assert_eq!(classify(201, None, 3), Verdict::Delivered);
        assert_eq!(classify(401, None, 3), Verdict::PauseAuth);
        assert_eq!(classify(403, None, 1), Verdict::PauseAuth);
        assert_eq!(
            classify(413, None, 3),
            Verdict::Split(FailureClass::too_large)
        );
        assert_eq!(
            classify(422, None, 3),
            Verdict::Split(FailureClass::rejected_4xx)
        );
        assert_eq!(
            classify(413, None, 1),
            Verdict::Reject(FailureClass::too_large)
        );
        assert_eq!(
            classify(431, None, 500),
            Verdict::Split(FailureClass::too_large)
        );
        assert_eq!(
            classify(429, Some(Duration::from_secs(3)), 1),
            Verdict::PauseFor(Duration::from_secs(3), FailureClass::status_429)
        );
        assert_eq!(
            classify(429, None, 1),
            Verdict::Retry(FailureClass::status_429)
        );
        assert_eq!(
            classify(503, None, 1),
            Verdict::Retry(FailureClass::status_5xx)
        );
        assert_eq!(
            classify(500, Some(Duration::from_secs(3)), 1),
            Verdict::Retry(FailureClass::status_5xx)
        );
        assert_eq!(
            classify(408, None, 1),
            Verdict::Retry(FailureClass::status_408)
        );
        for s in [301, 302, 303, 307, 308] {
            assert_eq!(classify(s, None, 3), Verdict::Retry(FailureClass::redirect));
        }
        for s in [404, 405, 410] {
            assert_eq!(
                classify(s, None, 200),
                Verdict::Split(FailureClass::rejected_4xx)
            );
            assert_eq!(
                classify(s, None, 1),
                Verdict::Reject(FailureClass::rejected_4xx)
            );
        }
        assert_eq!(
            classify(422, None, 1),
            Verdict::Reject(FailureClass::rejected_4xx)
        );
    }

    #[test]
    fn retry_after_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempts in 1..40 {
            let d = delay_after(attempts, i, m);
            assert!(d <= m, "{attempts}: {d:?}");
            assert!(d >= Duration::from_millis(50), "{attempts}: {d:?}");
        }
        assert!(delay_after(30, i, m) >= Duration::from_millis(2500));
    }

    #[test]
    fn probe_intervals_grow_and_are_capped_at_max() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = backoff(i, m);
        // From the 5th interval on the crate's interval is at `max`; with ±50 % jitter half
        // of the 40 would be above it unclamped.
        let ds: Vec<Duration> = (0..45).map(|_| next_probe(&mut b, m)).collect();
        assert!(ds.iter().all(|d| *d <= m), "{ds:?}");
        assert!(ds[5..].iter().all(|d| *d >= m / 2), "{ds:?}");
    }
}
