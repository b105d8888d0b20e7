//! Flag-value parsing and the validation error shared by the generic flags and each
//! controller's own, and the `--feature-gates` both read.

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

/// The `--feature-gates` the manager knows (upstream's names), each off unless set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeatureGates {
    /// `CloudControllerManagerWatchBasedRoutesReconciliation` (KEP-5237): the route
    /// controller reconciles on node changes, at most once per period, instead of every period.
    pub watch_based_routes_reconciliation: bool,
    /// `CloudControllerManagerWebhook`: accepted; the webhook is a separate binary here.
    pub webhook: bool,
}

impl FeatureGates {
    /// Every known gate's name, in `--help` order.
    pub const NAMES: [&'static str; 2] = [
        "CloudControllerManagerWatchBasedRoutesReconciliation",
        "CloudControllerManagerWebhook",
    ];

    /// Sets gate `name`; `false` when no gate has that name.
    pub fn set(&mut self, name: &str, enabled: bool) -> bool {
        match name {
            "CloudControllerManagerWatchBasedRoutesReconciliation" => {
                self.watch_based_routes_reconciliation = enabled;
            }
            "CloudControllerManagerWebhook" => self.webhook = enabled,
            _ => return false,
        }
        true
    }
}

/// A `--feature-gates` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeatureGateError {
    /// An entry is not `Name=value`.
    #[error("{entry:?} is not Name=true|false")]
    Malformed {
        /// The entry as given.
        entry: String,
    },
    /// No gate has this name.
    #[error("unrecognized feature gate {name:?} (known: {})", FeatureGates::NAMES.join(", "))]
    Unknown {
        /// The name given.
        name: String,
    },
    /// The value is not a boolean.
    #[error("invalid value {value:?} of feature gate {name}: expected true or false")]
    NotBool {
        /// The gate.
        name: String,
        /// The value given.
        value: String,
    },
}

/// Parses upstream's `mapStringBool` form: `A=true,B=false`; the empty string sets nothing.
pub fn parse_feature_gates(value: &str) -> Result<FeatureGates, FeatureGateError> {
    let mut gates = FeatureGates::default();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, enabled)) = entry.split_once('=') else {
            return Err(FeatureGateError::Malformed {
                entry: entry.to_string(),
            });
        };
        let (name, enabled) = (name.trim(), enabled.trim());
        // Go's strconv.ParseBool, as upstream parses the values.
        let enabled = match enabled {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
            "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
            _ => {
                return Err(FeatureGateError::NotBool {
                    name: name.to_string(),
                    value: enabled.to_string(),
                });
            }
        };
        if !gates.set(name, enabled) {
            return Err(FeatureGateError::Unknown {
                name: name.to_string(),
            });
        }
    }
    Ok(gates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_gates_parse_known_names_and_go_booleans() {
        assert_eq!(parse_feature_gates(""), Ok(FeatureGates::default()));
        let gates = parse_feature_gates(
            "CloudControllerManagerWatchBasedRoutesReconciliation=true, CloudControllerManagerWebhook=F",
        )
        .unwrap();
        assert!(gates.watch_based_routes_reconciliation);
        assert!(!gates.webhook);
        assert!(
            parse_feature_gates("CloudControllerManagerWebhook=1")
                .unwrap()
                .webhook
        );
    }

    #[test]
    fn bad_feature_gates_name_the_entry() {
        let unknown = parse_feature_gates("NoSuchGate=true").unwrap_err();
        assert_eq!(
            unknown,
            FeatureGateError::Unknown {
                name: "NoSuchGate".into()
            }
        );
        assert!(unknown.to_string().contains("NoSuchGate"));
        let not_bool = parse_feature_gates("CloudControllerManagerWebhook=yes").unwrap_err();
        assert!(
            not_bool
                .to_string()
                .contains("CloudControllerManagerWebhook")
        );
        assert!(not_bool.to_string().contains("yes"));
        assert!(matches!(
            parse_feature_gates("CloudControllerManagerWebhook"),
            Err(FeatureGateError::Malformed { .. })
        ));
    }
}
