//! Flag-value parsing and the validation error shared by the generic flags and each
//! controller's own.

use std::time::Duration;

/// A duration flag value that does not parse, or is absurdly long.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    /// Not a duration.
    #[error("invalid duration {value:?}: {source}")]
    Invalid {
        /// The value given.
        value: String,
        /// Why it does not parse.
        source: humantime::DurationError,
    },
    /// Longer than [`MAX_DURATION`]: no period or timeout of the manager is, and adding such
    /// a duration to the clock would overflow.
    #[error("duration {0:?} is longer than a year")]
    TooLong(String),
}

/// The longest duration any flag accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a Go-style duration (`15s`, `5m0s`, `1h30m`) as accepted by upstream flags.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let parsed = humantime::parse_duration(value).map_err(|source| DurationError::Invalid {
        value: value.to_string(),
        source,
    })?;
    if parsed > MAX_DURATION {
        return Err(DurationError::TooLong(value.to_string()));
    }
    Ok(parsed)
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
