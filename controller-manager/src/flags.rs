//! Flag-value parsing and the validation error shared by the generic flags and each
//! controller's own.

use std::time::Duration;

/// A duration flag value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {value:?}: {source}")]
pub struct DurationError {
    /// The value given.
    value: String,
    /// Why it does not parse.
    source: humantime::DurationError,
}

/// Parses a Go-style duration (`15s`, `5m0s`, `1h30m`) as accepted by upstream flags.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(value).map_err(|source| DurationError {
        value: value.to_string(),
        source,
    })
}

/// A flag value that is out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct FlagError {
    /// The offending flag, with its dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

impl FlagError {
    /// A problem with `flag`.
    pub fn new(flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            flag,
            message: message.into(),
        }
    }
}

/// Refuses a zero duration for `flag` (periods and intervals).
pub fn positive(flag: &'static str, value: Duration) -> Result<(), FlagError> {
    if value.is_zero() {
        return Err(FlagError::new(flag, "must be positive"));
    }
    Ok(())
}
