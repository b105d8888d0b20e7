//! Typed errors. Every message says what failed and what to check, and none carries a
//! secret: the kubelet appends stderr to its log.

use std::path::PathBuf;

use crate::protocol::ApiVersion;

/// The request on stdin could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Nothing (or only whitespace) on stdin.
    #[error("empty request on stdin; the kubelet writes one CredentialProviderRequest as JSON")]
    Empty,
    /// Not JSON, or a field of the wrong type, unknown or duplicated.
    #[error("invalid request at line {line} column {column}: {what}")]
    Json {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
        /// What is wrong, without the offending value (it may be a secret).
        what: String,
    },
    /// A required field is missing or empty.
    #[error("request has no `{0}`")]
    MissingField(&'static str),
    /// The `apiVersion` is not a credentialprovider.kubelet.k8s.io version.
    #[error(
        "unsupported apiVersion {0:?}; expected credentialprovider.kubelet.k8s.io/v1, v1beta1 or v1alpha1 (check the provider's apiVersion in the kubelet's --image-credential-provider-config)"
    )]
    UnknownVersion(String),
    /// The `kind` is not the expected one.
    #[error("unexpected kind {0:?}; expected CredentialProviderRequest")]
    WrongKind(String),
    /// A v1-only field in an older version.
    #[error("unknown field `{0}` in {v}", v = .1.as_str())]
    NotInVersion(&'static str, ApiVersion),
    /// A `cacheDuration` that is not a Go duration.
    #[error("cacheDuration {0:?} is not a duration")]
    BadDuration(String),
}

impl DecodeError {
    /// Keeps the position and the kind of a JSON error but never the value it quotes.
    pub(crate) fn from_json(e: serde_json::Error) -> Self {
        let text = e.to_string();
        let what = if text.contains("unknown field")
            || text.contains("duplicate field")
            || text.contains("missing field")
            || text.contains("unknown variant")
        {
            // "unknown field `x`, expected one of ..." — the field name only.
            let head = text.split(" at line").next().unwrap_or(&text);
            head.split(", expected").next().unwrap_or(head).to_string()
        } else if e.is_syntax() || e.is_eof() {
            "not valid JSON".to_string()
        } else {
            "a field has the wrong type".to_string()
        };
        Self::Json {
            line: e.line(),
            column: e.column(),
            what,
        }
    }
}

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
