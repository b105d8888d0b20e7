//! The `/readyz` view of the shim: a background probe and the history it feeds.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cpi_proto::CpiError;

use super::client::Cloud;
use crate::health::{Check, Unhealthy};

impl Cloud {
    /// A `/readyz` check fed by a background probe of the shim every `period`. It fails once
    /// [`ProbeHistory::FAILURES_TO_FAIL`] probes in a row went unanswered (one miss is
    /// tolerated: a shim restart should not flap readiness). The probe stops when the check is
    /// dropped.
    pub fn readiness_check(&self, period: Duration) -> Check {
        let history = Arc::new(Mutex::new(ProbeHistory::default()));
        let weak = Arc::downgrade(&history);
        let cloud = self.clone();
        tokio::spawn(async move {
            loop {
                let result = cloud.probe().await;
                let Some(history) = weak.upgrade() else {
                    return;
                };
                // `record` replaces whole fields: a poisoned history is still consistent.
                history
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(result);
                drop(history);
                tokio::time::sleep(period).await;
            }
        });
        Arc::new(move || {
            history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .verdict()
        })
    }
}

/// Consecutive failed probes of the shim and the last error, behind the `/readyz` check.
#[derive(Debug, Default)]
pub struct ProbeHistory {
    consecutive_failures: u32,
    last_error: String,
}

impl ProbeHistory {
    /// Failed probes in a row after which the shim counts as down.
    pub const FAILURES_TO_FAIL: u32 = 2;

    /// Records one probe's outcome; a success forgets earlier failures.
    pub fn record(&mut self, result: Result<(), CpiError>) {
        match result {
            Ok(()) => *self = Self::default(),
            Err(err) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = err.to_string();
            }
        }
    }

    /// The readiness verdict: an error naming the last failure once the shim counts as down.
    pub fn verdict(&self) -> Result<(), Unhealthy> {
        if self.consecutive_failures >= Self::FAILURES_TO_FAIL {
            Err(Unhealthy(format!(
                "provider shim not answering ({} probes in a row failed): {}",
                self.consecutive_failures, self.last_error
            )))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> Result<(), CpiError> {
        Err(CpiError::from_status(&tonic::Status::unavailable(
            "connection refused",
        )))
    }

    #[test]
    fn one_failed_probe_is_tolerated() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        assert_eq!(history.verdict(), Ok(()));
    }

    #[test]
    fn two_failed_probes_in_a_row_fail_with_the_last_error() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        history.record(unavailable());
        let err = history.verdict().expect_err("down after two misses").0;
        assert!(err.contains("2 probes in a row"), "{err}");
        assert!(err.contains("connection refused"), "{err}");
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        history.record(Ok(()));
        history.record(unavailable());
        assert_eq!(history.verdict(), Ok(()));
    }
}
