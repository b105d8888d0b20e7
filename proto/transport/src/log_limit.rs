//! Warnings about things a client can trigger at will (failed handshakes, refused certificates,
//! connections closed by the limits) are rate limited: a port scan must not flood the log.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one warning per this interval and [`LogLimiter`]; the others go to `debug`.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Decides whether an event is logged at `warn` or, within [`WARN_INTERVAL`] of the last
/// warning, at `debug` (counted, and the count reported with the next warning).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(WARN_INTERVAL)
    }
}

impl LogLimiter {
    /// A limiter allowing one warning per `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(n)` when this event is to be logged at `warn`, `n` being how many were logged at
    /// `debug` since the previous warning; `None` when it goes to `debug`.
    pub(crate) fn warn_now(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.last_warning {
            Some(last) if now.duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last_warning = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// `warn!` through a [`LogLimiter`]: the event is logged at `warn` with a `suppressed` field (how
/// many went to `debug` since the previous warning), or at `debug` with the same fields.
macro_rules! warn_limited {
    ($limiter:expr, $($event:tt)+) => {
        match $limiter.warn_now() {
            Some(suppressed) => ::tracing::warn!(suppressed, $($event)+),
            None => ::tracing::debug!($($event)+),
        }
    };
}

pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_then_the_count() {
        let limiter = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(limiter.warn_now(), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.warn_now(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limiter.warn_now(), Some(5));
        assert_eq!(limiter.warn_now(), None);
    }
}
