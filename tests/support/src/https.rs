//! One HTTPS/1.1 GET over TLS verified against a test CA: how the suites talk to the
//! controller-manager's secure port, byte for byte as a probe or a scraper does.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a GET got no status line.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// Connecting, the TLS handshake, or writing the request failed.
    #[error("GET {path}: {source}")]
    Io {
        /// The path asked for.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built (a bad CA certificate).
    #[error("TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The answer had no HTTP status line.
    #[error("GET {path}: no status line in {answer:?}")]
    NoStatus {
        /// The path asked for.
        path: String,
        /// What came back.
        answer: String,
    },
}

/// A TLS connector trusting only the CA whose DER certificate is `ca_der`.
pub fn tls_connector(ca_der: &[u8]) -> Result<tokio_rustls::TlsConnector, HttpsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Connects to `addr` and completes a TLS handshake for the name `localhost`.
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    connector.connect(name, tcp).await
}

/// GETs `path` from `addr` (certificate name `localhost`) with an optional bearer token and
/// `Connection: close`; returns the status code and the whole answer.
pub async fn https_get(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), HttpsError> {
    let io = |source| HttpsError::Io {
        path: path.to_string(),
        source,
    };
    let mut tls = tls_connect(connector, addr).await.map_err(io)?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(io)?;
    let mut answer = Vec::new();
    // A server that closes without a TLS close_notify still answered.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    match answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
    {
        Some(code) => Ok((code, answer)),
        None => Err(HttpsError::NoStatus {
            path: path.to_string(),
            answer,
        }),
    }
}
