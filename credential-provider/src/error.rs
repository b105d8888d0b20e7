//! Typed errors. Every message says what failed and what to check, and none carries a
//! secret: the kubelet appends stderr to its log.

use std::path::PathBuf;

use crate::protocol::DecodeError;

/// Why the plugin could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was bad.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Bad command line.
    #[error("{0}; see `credential-provider --help`")]
    Args(String),
    /// No registry family claims the image and no local entry matches it.
    #[error(
        "image {image:?} matches no registry family (not ECR, GCR/Artifact Registry or ACR) and no entry of the local credentials file {path}; add an entry whose `match` covers it, or force a family with --provider"
    )]
    NoFamily {
        /// The image.
        image: String,
        /// The local credentials file.
        path: PathBuf,
    },
    /// The local credentials file could not be read.
    #[error(
        "reading the local credentials file {path}: {source}; check --local-config and the file's permissions"
    )]
    LocalRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The local credentials file is malformed.
    #[error("local credentials file {path}: {detail}")]
    LocalParse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        detail: String,
    },
    /// No entry of the local credentials file matches the image.
    #[error(
        "no entry of the local credentials file {path} matches image {image:?}; add one whose `match` covers its registry"
    )]
    LocalNoMatch {
        /// The image.
        image: String,
        /// The file.
        path: PathBuf,
    },
    /// Every matching entry of the local credentials file has expired.
    #[error(
        "the credentials for {pattern:?} in {path} expired at {expired_at}; renew them in the file"
    )]
    LocalExpired {
        /// The entry's `match`.
        pattern: String,
        /// The file.
        path: PathBuf,
        /// When (RFC 3339).
        expired_at: String,
    },
    /// AWS configuration is incomplete.
    #[error("AWS configuration: {0}")]
    AwsConfig(String),
    /// An AWS API call failed.
    #[error(
        "{call} failed: {detail}; check the node's AWS credentials (instance role, AWS_* variables or AWS_PROFILE in the provider's env), the region and that the AWS API endpoint is reachable"
    )]
    AwsCall {
        /// The operation.
        call: &'static str,
        /// The SDK's error chain.
        detail: String,
    },
    /// Assuming the service account's role failed.
    #[error(
        "failed to assume role {role} with the service-account token: {detail}; check the role's trust policy for the cluster's OIDC issuer and the token audience"
    )]
    AssumeRole {
        /// The role ARN.
        role: String,
        /// The SDK's error chain.
        detail: String,
    },
    /// A token service answered something unusable.
    #[error("{service} answered without a usable {what}; check the service's health")]
    BadAnswer {
        /// Which service.
        service: &'static str,
        /// What was missing or malformed.
        what: &'static str,
    },
    /// An HTTP request failed.
    #[error("{what}: request to {url} failed: {detail}; {hint}")]
    Http {
        /// What the request was for.
        what: &'static str,
        /// The URL (never with credentials).
        url: String,
        /// Why.
        detail: String,
        /// What to check.
        hint: String,
    },
    /// The HTTP client's TLS configuration could not be built.
    #[error("TLS set-up of the HTTP client: {0}")]
    Tls(rustls::Error),
    /// The service-account token mode lacks something.
    #[error("{0}")]
    ServiceAccount(String),
    /// The Azure cloud config is unusable.
    #[error("Azure cloud config {path}: {detail}")]
    AzureConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}
