//! Where a caller finds its shim: the `--provider-*` flags every CPI client (the
//! controller-manager, the webhook) takes, and the endpoint they resolve to.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::ClientEndpoint;
use crate::tls::{ClientTls, TlsError, TlsFiles};

/// The provider-shim flags shared by every CPI client, flattened into its command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProviderFlags {
    /// Where the provider shim listens: `https://HOST:PORT` (mutual TLS) or `unix:///PATH`
    /// (plaintext, sidecar deployments only).
    #[arg(long)]
    pub provider_endpoint: String,
    /// Client certificate presented to the shim.
    #[arg(long)]
    pub provider_tls_cert_file: Option<PathBuf>,
    /// Private key of --provider-tls-cert-file.
    #[arg(long)]
    pub provider_tls_private_key_file: Option<PathBuf>,
    /// CA bundle the shim's serving certificate must chain to.
    #[arg(long)]
    pub provider_ca_file: Option<PathBuf>,
    /// Name expected in the shim's certificate; defaults to the endpoint's host.
    #[arg(long)]
    pub provider_server_name: Option<String>,
}

impl ProviderFlags {
    /// The endpoint the flags describe, checked.
    pub fn endpoint(&self) -> Result<ProviderEndpoint, EndpointError> {
        ProviderEndpoint::parse(
            &self.provider_endpoint,
            &EndpointTls {
                cert: self.provider_tls_cert_file.clone(),
                key: self.provider_tls_private_key_file.clone(),
                ca: self.provider_ca_file.clone(),
                server_name: self.provider_server_name.clone(),
            },
        )
    }
}

/// The resolved shim endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEndpoint {
    /// Mutual TLS over TCP.
    Tls {
        /// `https://host:port`.
        uri: String,
        /// Name verified in the shim's certificate.
        server_name: String,
        /// Client certificate, key and CA bundle.
        files: TlsFiles,
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
            files: TlsFiles { cert, key, ca },
        })
    }

    /// What [`connect`](crate::connect) takes for this endpoint (its TLS files checked for
    /// rotation every `reload_interval`), and the endpoint as logs show it.
    pub fn client(&self, reload_interval: Duration) -> Result<(ClientEndpoint, String), TlsError> {
        Ok(match self {
            Self::Unix(path) => (
                ClientEndpoint::Unix { path: path.clone() },
                format!("unix://{}", path.display()),
            ),
            Self::Tls {
                uri,
                server_name,
                files,
            } => (
                ClientEndpoint::Tls {
                    uri: uri.clone(),
                    tls: ClientTls::new(files.clone(), server_name.clone(), reload_interval)?,
                },
                uri.clone(),
            ),
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
