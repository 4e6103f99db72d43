//! One repeated log line at most once per period, with a count of the ones held back: a disk
//! that stays full, or a backlog expiring into the dead letters, must not write a line per
//! event.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::event::now_ms;

/// Lets a repeated log line through at most once per period, counting the ones it held back.
/// Lock-free, so it can be a `static` shared by threads.
pub struct LogThrottle {
    period_ms: u64,
    pub(crate) last_ms: AtomicU64,
    held: AtomicU64,
}

impl LogThrottle {
    pub const fn new(period_ms: u64) -> Self {
        LogThrottle {
            period_ms,
            last_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this one may be logged; otherwise it
    /// is counted as held back.
    pub fn ready(&self) -> Option<u64> {
        if !self.period_over() {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last_ms.store(now_ms().max(1), Ordering::Relaxed);
        Some(self.held.swap(0, Ordering::Relaxed))
    }

    /// `Some(lines held back)` when some were and the period is over: for a summary line
    /// when no new one comes to carry the count.
    pub fn held_if_due(&self) -> Option<u64> {
        if self.held.load(Ordering::Relaxed) == 0 || !self.period_over() {
            return None;
        }
        self.last_ms.store(now_ms().max(1), Ordering::Relaxed);
        Some(self.held.swap(0, Ordering::Relaxed))
    }

    /// Lines held back since the last one let through, and a fresh start: the next line is
    /// let through at once. For the line that says a repeated failure ended.
    pub fn reset(&self) -> u64 {
        self.last_ms.store(0, Ordering::Relaxed);
        self.held.swap(0, Ordering::Relaxed)
    }

    fn period_over(&self) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        last == 0 || now_ms().saturating_sub(last) >= self.period_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_is_let_through_once_per_period_with_a_count() {
        let t = LogThrottle::new(60_000);
        assert_eq!(t.held_if_due(), None, "nothing held");
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        assert_eq!(t.held_if_due(), None, "period not over");
        // The next period's line says how many were held back.
        t.last_ms.store(1, Ordering::Relaxed);
        assert_eq!(t.ready(), Some(2));
        t.ready();
        t.last_ms.store(1, Ordering::Relaxed);
        assert_eq!(t.held_if_due(), Some(1), "a summary without a new line");
        assert_eq!(t.held_if_due(), None);
    }

    #[test]
    fn a_reset_hands_over_the_count_and_lets_the_next_line_through() {
        let t = LogThrottle::new(60_000);
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        assert_eq!(t.reset(), 2, "held back within the period");
        assert_eq!(t.reset(), 0);
        assert_eq!(t.ready(), Some(0), "a new run of failures logs at once");
    }
}
