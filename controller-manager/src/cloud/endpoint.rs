//! Where the shim listens, as given by `--provider-endpoint` and its TLS files.

use std::path::PathBuf;

/// The resolved shim endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEndpoint {
    /// Mutual TLS over TCP.
    Tls {
        /// `https://host:port`.
        uri: String,
        /// Name verified in the shim's certificate.
        server_name: String,
        /// Client certificate.
        cert: PathBuf,
        /// Client key.
        key: PathBuf,
        /// CA bundle.
        ca: PathBuf,
    },
    /// Plaintext over a Unix socket.
    Unix(PathBuf),
}

/// The TLS files of an `https://` endpoint, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct EndpointTls {
    /// Client certificate presented to the shim.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// CA bundle the shim's serving certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Name expected in the shim's certificate; defaults to the endpoint's host.
    pub server_name: Option<String>,
}

/// An endpoint that cannot be used; the message is phrased for `--provider-endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `unix://` without a path.
    #[error("unix:// needs a socket path")]
    NoSocketPath,
    /// Neither `https://` nor `unix://`.
    #[error("{0:?} must start with https:// (mutual TLS) or unix:// (plaintext Unix socket)")]
    Scheme(String),
    /// `https://` without a host.
    #[error("{0:?} has no host")]
    NoHost(String),
    /// `https://` without all three TLS files.
    #[error(
        "an https:// endpoint needs --provider-tls-cert-file, --provider-tls-private-key-file and --provider-ca-file"
    )]
    MissingTlsFiles,
}

impl ProviderEndpoint {
    /// Parses `--provider-endpoint`; `https://` endpoints need all three TLS files.
    pub fn parse(endpoint: &str, tls: &EndpointTls) -> Result<Self, EndpointError> {
        let endpoint = endpoint.trim();
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(EndpointError::NoSocketPath);
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let Some(rest) = endpoint.strip_prefix("https://") else {
            return Err(EndpointError::Scheme(endpoint.to_string()));
        };
        let host = authority_host(rest).ok_or_else(|| EndpointError::NoHost(endpoint.into()))?;
        let (Some(cert), Some(key), Some(ca)) = (tls.cert.clone(), tls.key.clone(), tls.ca.clone())
        else {
            return Err(EndpointError::MissingTlsFiles);
        };
        Ok(Self::Tls {
            uri: endpoint.to_string(),
            server_name: tls.server_name.clone().unwrap_or_else(|| host.to_string()),
            cert,
            key,
            ca,
        })
    }
}

/// Host part of `host:port[/...]`, with IPv6 brackets removed.
fn authority_host(rest: &str) -> Option<&str> {
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}
