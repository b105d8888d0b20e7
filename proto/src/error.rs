//! The CPI error model: one enum for every failure class a caller must tell apart, and its
//! lossless mapping onto gRPC statuses with `google.rpc.ErrorInfo` / `RetryInfo` details.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::v1::ErrorReason;

/// `google.rpc.ErrorInfo.domain` of every CPI error.
pub const ERROR_DOMAIN: &str = "cloudprovider.v1";

/// `ErrorInfo.metadata` key naming the offending request field of an `INVALID_OBJECT` error.
const FIELD_KEY: &str = "field";

/// A CPI failure, as raised by a shim or observed by a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpiError {
    /// The instance does not exist; an authoritative answer (upstream `InstanceNotFound`).
    #[error("instance not found: {0}")]
    InstanceNotFound(String),
    /// The disk does not exist (upstream `DiskNotFound`).
    #[error("disk is not found: {0}")]
    DiskNotFound(String),
    /// The provider does not implement the call (upstream `NotImplemented`).
    #[error("unimplemented: {0}")]
    NotImplemented(String),
    /// Another controller implements this load balancer (upstream `ImplementedElsewhere`).
    #[error("implemented by alternate to cloud provider: {0}")]
    ImplementedElsewhere(String),
    /// Retry after a fixed delay without backoff (upstream `api.RetryError`).
    #[error("{message} (retry after {delay:?})")]
    RetryAfter {
        /// What is still in progress.
        message: String,
        /// How long to wait.
        delay: Duration,
    },
    /// The cloud API throttled the shim.
    #[error("throttled by the cloud API: {message}")]
    Throttled {
        /// Cloud message.
        message: String,
        /// When to retry, if the cloud said.
        retry_after: Option<Duration>,
    },
    /// The caller's fence is older than one the shim has already seen: a deposed leader.
    #[error("stale leader: {0}")]
    StaleLeader(String),
    /// The change would replace the cloud object and replacement was not allowed.
    #[error("change requires replacing the cloud object: {0}")]
    ReplacementRequired(String),
    /// The cloud object exists but is not owned by the caller.
    #[error("cloud object not owned by this cluster: {0}")]
    NotOwned(String),
    /// The shim's cloud credentials were rejected.
    #[error("cloud credentials rejected: {0}")]
    CloudAuth(String),
    /// A request field is missing or malformed.
    #[error("invalid {field}: {message}")]
    InvalidObject {
        /// Path of the offending field, e.g. `node.metadata.name`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Any other cloud failure reported by the shim.
    #[error("cloud error: {0}")]
    Cloud(String),
    /// A load-balancer call named a node set the shim does not hold; the caller puts it again.
    #[error("unknown node set: {0}")]
    NodeSetUnknown(String),
    /// The shim could not be reached, or did not answer within the deadline, or answered with
    /// a status that carries no CPI details. Never authoritative about anything.
    #[error("shim call failed ({code:?}): {message}")]
    Transport {
        /// gRPC code observed.
        code: Code,
        /// Status message.
        message: String,
    },
}

impl CpiError {
    /// The `ErrorReason` this error is sent as, if any.
    pub fn reason(&self) -> Option<ErrorReason> {
        Some(match self {
            Self::InstanceNotFound(_) => ErrorReason::InstanceNotFound,
            Self::DiskNotFound(_) => ErrorReason::DiskNotFound,
            Self::NotImplemented(_) => ErrorReason::NotImplemented,
            Self::ImplementedElsewhere(_) => ErrorReason::ImplementedElsewhere,
            Self::RetryAfter { .. } => ErrorReason::RetryAfter,
            Self::Throttled { .. } => ErrorReason::Throttled,
            Self::StaleLeader(_) => ErrorReason::StaleLeader,
            Self::ReplacementRequired(_) => ErrorReason::ReplacementRequired,
            Self::NotOwned(_) => ErrorReason::NotOwned,
            Self::CloudAuth(_) => ErrorReason::CloudAuth,
            Self::InvalidObject { .. } => ErrorReason::InvalidObject,
            Self::Cloud(_) => ErrorReason::CloudError,
            Self::NodeSetUnknown(_) => ErrorReason::NodeSetUnknown,
            Self::Transport { .. } => return None,
        })
    }

    /// The gRPC code this error is sent with (see the table in the `.proto` header).
    pub fn code(&self) -> Code {
        match self {
            Self::InstanceNotFound(_) | Self::DiskNotFound(_) => Code::NotFound,
            Self::NotImplemented(_) => Code::Unimplemented,
            Self::ImplementedElsewhere(_)
            | Self::StaleLeader(_)
            | Self::ReplacementRequired(_)
            | Self::NodeSetUnknown(_) => Code::FailedPrecondition,
            Self::RetryAfter { .. } | Self::Cloud(_) => Code::Unavailable,
            Self::Throttled { .. } => Code::ResourceExhausted,
            Self::NotOwned(_) => Code::PermissionDenied,
            Self::CloudAuth(_) => Code::Unauthenticated,
            Self::InvalidObject { .. } => Code::InvalidArgument,
            Self::Transport { code, .. } => *code,
        }
    }

    /// The delay a caller should wait before retrying, when the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RetryAfter { delay, .. } => Some(*delay),
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short, stable label for metrics and event reasons.
    pub fn class(&self) -> &'static str {
        match self.reason() {
            Some(reason) => reason.as_str_name(),
            None => match self.code() {
                Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
                Code::Unavailable => "UNAVAILABLE",
                Code::Unauthenticated => "UNAUTHENTICATED",
                Code::PermissionDenied => "PERMISSION_DENIED",
                Code::Unimplemented => "UNIMPLEMENTED",
                _ => "TRANSPORT",
            },
        }
    }

    /// Builds the gRPC status a shim returns for this error.
    pub fn to_status(&self) -> Status {
        let Some(reason) = self.reason() else {
            return Status::new(self.code(), self.to_string());
        };
        let mut metadata = HashMap::new();
        if let Self::InvalidObject { field, .. } = self {
            metadata.insert(FIELD_KEY.to_string(), field.clone());
        }
        let mut details =
            ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, metadata);
        if let Some(delay) = self.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(self.code(), self.message(), details)
    }

    /// The bare message, without the class prefix `Display` adds.
    fn message(&self) -> String {
        match self {
            Self::InstanceNotFound(m)
            | Self::DiskNotFound(m)
            | Self::NotImplemented(m)
            | Self::ImplementedElsewhere(m)
            | Self::StaleLeader(m)
            | Self::ReplacementRequired(m)
            | Self::NotOwned(m)
            | Self::CloudAuth(m)
            | Self::Cloud(m)
            | Self::NodeSetUnknown(m) => m.clone(),
            Self::RetryAfter { message, .. } | Self::Throttled { message, .. } => message.clone(),
            Self::InvalidObject { message, .. } => message.clone(),
            Self::Transport { message, .. } => message.clone(),
        }
    }

    /// Decodes a status received from a shim. Statuses without CPI details become
    /// [`CpiError::Transport`], except a bare `UNIMPLEMENTED`, which is what gRPC itself answers
    /// for an RPC the shim does not serve and therefore means `NotImplemented`.
    pub fn from_status(status: &Status) -> Self {
        let message = status.message().to_string();
        let info = status
            .get_details_error_info()
            .filter(|info| info.domain == ERROR_DOMAIN);
        let Some(info) = info else {
            if status.code() == Code::Unimplemented {
                return Self::NotImplemented(message);
            }
            return Self::Transport {
                code: status.code(),
                message,
            };
        };
        let retry = status
            .get_details_retry_info()
            .and_then(|retry| retry.retry_delay);
        match ErrorReason::from_str_name(&info.reason) {
            Some(ErrorReason::InstanceNotFound) => Self::InstanceNotFound(message),
            Some(ErrorReason::DiskNotFound) => Self::DiskNotFound(message),
            Some(ErrorReason::NotImplemented) => Self::NotImplemented(message),
            Some(ErrorReason::ImplementedElsewhere) => Self::ImplementedElsewhere(message),
            Some(ErrorReason::RetryAfter) => Self::RetryAfter {
                message,
                delay: retry.unwrap_or(Duration::from_secs(1)),
            },
            Some(ErrorReason::Throttled) => Self::Throttled {
                message,
                retry_after: retry,
            },
            Some(ErrorReason::StaleLeader) => Self::StaleLeader(message),
            Some(ErrorReason::ReplacementRequired) => Self::ReplacementRequired(message),
            Some(ErrorReason::NotOwned) => Self::NotOwned(message),
            Some(ErrorReason::CloudAuth) => Self::CloudAuth(message),
            Some(ErrorReason::InvalidObject) => Self::InvalidObject {
                field: info.metadata.get(FIELD_KEY).cloned().unwrap_or_default(),
                message,
            },
            Some(ErrorReason::CloudError) => Self::Cloud(message),
            Some(ErrorReason::NodeSetUnknown) => Self::NodeSetUnknown(message),
            // A newer shim's reason we do not know: keep the code, never guess a meaning.
            Some(ErrorReason::Unspecified) | None => Self::Transport {
                code: status.code(),
                message: format!("{} ({})", message, info.reason),
            },
        }
    }
}

impl From<CpiError> for Status {
    fn from(err: CpiError) -> Self {
        err.to_status()
    }
}

impl From<Status> for CpiError {
    fn from(status: Status) -> Self {
        Self::from_status(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(err: CpiError) -> CpiError {
        CpiError::from_status(&err.to_status())
    }

    #[test]
    fn every_class_survives_the_wire() {
        let cases = vec![
            CpiError::InstanceNotFound("i-1".into()),
            CpiError::DiskNotFound("vol-1".into()),
            CpiError::NotImplemented("zones".into()),
            CpiError::ImplementedElsewhere("lb".into()),
            CpiError::RetryAfter {
                message: "LB create in progress".into(),
                delay: Duration::from_secs(42),
            },
            CpiError::Throttled {
                message: "429".into(),
                retry_after: Some(Duration::from_millis(1500)),
            },
            CpiError::Throttled {
                message: "429".into(),
                retry_after: None,
            },
            CpiError::StaleLeader("transitions 3 < 4".into()),
            CpiError::ReplacementRequired("scheme changed".into()),
            CpiError::NotOwned("lb-x".into()),
            CpiError::CloudAuth("401".into()),
            CpiError::InvalidObject {
                field: "node.metadata.name".into(),
                message: "must not be empty".into(),
            },
            CpiError::Cloud("boom".into()),
            CpiError::NodeSetUnknown("ns-7".into()),
        ];
        for err in cases {
            assert_eq!(roundtrip(err.clone()), err);
        }
    }

    #[test]
    fn retry_error_keeps_its_delay() {
        let status = CpiError::RetryAfter {
            message: "provisioning".into(),
            delay: Duration::from_secs(42),
        }
        .to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            CpiError::from_status(&status).retry_after(),
            Some(Duration::from_secs(42))
        );
    }

    #[test]
    fn bare_unimplemented_means_not_implemented() {
        let err = CpiError::from_status(&Status::unimplemented("no such method"));
        assert!(matches!(err, CpiError::NotImplemented(_)));
    }

    #[test]
    fn bare_not_found_is_not_authoritative() {
        // A NOT_FOUND without CPI details (a proxy, a wrong path) must never read as
        // "instance not found".
        let err = CpiError::from_status(&Status::not_found("route not found"));
        assert!(matches!(
            err,
            CpiError::Transport {
                code: Code::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn foreign_domain_is_ignored() {
        let details =
            ErrorDetails::with_error_info("INSTANCE_NOT_FOUND", "example.com", HashMap::new());
        let status = Status::with_error_details(Code::NotFound, "x", details);
        assert!(matches!(
            CpiError::from_status(&status),
            CpiError::Transport { .. }
        ));
    }

    #[test]
    fn unknown_reason_keeps_code() {
        let details =
            ErrorDetails::with_error_info("FROM_THE_FUTURE", ERROR_DOMAIN, HashMap::new());
        let status = Status::with_error_details(Code::Aborted, "x", details);
        assert_eq!(CpiError::from_status(&status).code(), Code::Aborted);
    }
}
