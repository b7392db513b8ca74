//! Rate limiting for log lines that someone outside can cause at will.
//!
//! A warning that fires once per failed accept is fine while failures are
//! rare, but one that a client can trigger in a loop (exhausting the file
//! descriptors makes every accept fail at once) would grow the log as fast as
//! the loop spins. Such call sites
//! log at most once per interval and report how many occurrences they left
//! out.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One limiter per log call site (a `static`, or a field of what logs).
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    /// When a line was last let through, and occurrences suppressed since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when a line may be logged now, with the number of
    /// occurrences left out since the previous one; `None` to stay quiet.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock();
        let (last, suppressed) = &mut *state;
        match last {
            Some(t) if now.saturating_duration_since(*t) < self.every => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0));
        let let_through = (1..=1000u64)
            .filter(|ms| limiter.allow(t0 + Duration::from_millis(*ms)).is_some())
            .count();
        assert_eq!(let_through, 0, "a burst within the interval is suppressed");
        assert_eq!(limiter.allow(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(limiter.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(25)), Some(1));
    }
}
