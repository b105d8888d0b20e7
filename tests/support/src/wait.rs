//! Waiting for a condition with a deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_for`] (and a [`Wait`] without [`Wait::every`]) probes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// A condition did not hold before the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
pub struct WaitError {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub waited: Duration,
    /// What the last probe that answered reported.
    pub last: String,
}

/// A wait for a condition: what it is, how long it may take and how often it is probed.
#[derive(Debug, Clone)]
#[must_use]
pub struct Wait {
    what: String,
    timeout: Duration,
    interval: Duration,
}

impl Wait {
    /// A wait for `what` (named in the error) of at most `timeout`, probing every
    /// [`DEFAULT_INTERVAL`].
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Self {
            what: what.into(),
            timeout,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Probes every `interval` instead (zero: again as soon as a probe answers, for a probe
    /// that waits by itself).
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Runs `probe` until it returns `Ok`, and returns that value; `Err(observation)` means "not
    /// yet". A probe still running at the deadline is cancelled. After the deadline the error
    /// carries the last observation.
    ///
    /// To stop early on a condition that will never change (a process exited), return `Ok` with
    /// a value that says so, e.g. `Ok(Err(exit_status))` for a `T` of `Result<(), ExitStatus>`.
    ///
    /// `probe` is a closure that returns a future (`|| async { … }`, or `move || async move { … }`
    /// to copy references in), so the wait is `Send` whenever that future is.
    pub async fn until<T, F, Fut>(self, mut probe: F) -> Result<T, WaitError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut last: Option<String> = None;
        loop {
            let attempt = Instant::now();
            match tokio::time::timeout_at(deadline, probe()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(observation)) => last = Some(observation),
                // A probe started at the deadline is polled once only; it had no chance to
                // answer, so only an earlier one is worth a mention.
                Err(_) if attempt < deadline => {
                    let note = "the probe did not answer before the deadline";
                    last = Some(match last {
                        Some(previous) => format!("{previous}; then {note}"),
                        None => note.to_owned(),
                    });
                }
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError {
                    what: self.what,
                    waited: now - started,
                    last: last.unwrap_or_else(|| "no probe answered".to_owned()),
                });
            }
            tokio::time::sleep(self.interval.min(deadline - now)).await;
        }
    }
}

/// Waits up to `timeout` for `probe` to return `Ok`, probing every [`DEFAULT_INTERVAL`]; see
/// [`Wait::until`].
pub async fn wait_for<T, F, Fut>(
    what: impl Into<String>,
    timeout: Duration,
    probe: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    Wait::new(what, timeout).until(probe).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn returns_the_first_ok_value() {
        let mut calls = 0;
        let got = Wait::new("three calls", Duration::from_secs(5))
            .every(Duration::from_millis(1))
            .until(|| {
                calls += 1;
                let call = calls;
                async move {
                    if call == 3 {
                        Ok(call)
                    } else {
                        Err(format!("call {call}"))
                    }
                }
            })
            .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn times_out_with_what_and_the_last_observation() {
        let started = std::time::Instant::now();
        let mut calls = 0;
        let err = wait_for("the impossible", Duration::from_millis(300), || {
            calls += 1;
            std::future::ready(Err::<(), _>(format!("observation {calls}")))
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(2), "deadline kept");
        assert_eq!(err.what, "the impossible");
        assert_eq!(err.last, format!("observation {calls}"));
        assert!(calls >= 2, "probed more than once: {calls}");
        let msg = err.to_string();
        assert!(msg.contains("waiting for the impossible"), "{msg}");
        assert!(msg.contains("last observation: observation"), "{msg}");
    }

    #[tokio::test]
    async fn a_hanging_probe_ends_at_the_deadline() {
        let started = std::time::Instant::now();
        let err = wait_for("a hanging probe", Duration::from_millis(200), || {
            std::future::pending::<Result<(), String>>()
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(err.last, "the probe did not answer before the deadline");
    }

    #[test]
    fn waits_borrowing_the_callers_state_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let state = std::sync::Mutex::new(0);
        let state = &state;
        let wait = wait_for("a Send wait", Duration::from_secs(1), move || async move {
            Ok::<_, String>(*state.lock().map_err(|e| e.to_string())?)
        });
        assert_send(&wait);
    }
}
