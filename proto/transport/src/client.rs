//! Connecting to a shim: mTLS TCP or plaintext Unix socket, default deadlines and trace
//! propagation on every call.
//!
//! [`connect`] returns at once: the channel connects on first use and reconnects after failures.
//! One channel is one HTTP/2 connection on which every call is its own stream, so a slow call
//! never blocks others; clone the [`CpiChannel`] (cheap) rather than connecting again.
//!
//! TLS is done by this module's connector, not by tonic, so each new connection picks up the
//! [`ClientTls`] material current at that moment (hot-reloaded certificates and CA bundle).
//! Established connections keep the material they were made with.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

use crate::tls::ClientTls;
use crate::trace::ClientInterceptor;
use crate::{Coalesced, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// URI given to tonic for Unix sockets: it needs one, the connector ignores it.
const UNIX_PLACEHOLDER_URI: &str = "http://[::]:50051";

/// The channel type every generated CPI client is built on.
pub type CpiChannel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    crate::trace::ClientInterceptor,
>;

/// Where the shim is.
#[derive(Clone)]
pub enum ClientEndpoint {
    /// `https://host:port` with mutual TLS.
    Tls {
        /// e.g. `https://127.0.0.1:10443`.
        uri: String,
        /// TLS configuration.
        tls: ClientTls,
    },
    /// Plaintext over a Unix domain socket.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

/// Connection tuning.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Deadline for establishing a connection (TCP connect plus TLS handshake).
    pub connect_timeout: Duration,
    /// Deadline applied to every call that does not set its own.
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Failure to set up a channel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint URI does not parse.
    #[error("invalid endpoint URI {uri:?}: {source}")]
    InvalidUri {
        /// The rejected URI.
        uri: String,
        /// Why it was rejected.
        source: http::uri::InvalidUri,
    },
    /// The endpoint URI is not `https://host:port`.
    #[error("endpoint URI {uri:?} must be https://host[:port] (mutual TLS is mandatory over TCP)")]
    NotHttps {
        /// The rejected URI.
        uri: String,
    },
    /// Called outside a Tokio runtime (the channel's background task needs one).
    #[error("cpi_transport::connect must be called from within a Tokio runtime")]
    NoRuntime,
    /// tonic rejected the endpoint.
    #[error("invalid endpoint {uri:?}: {source}")]
    Endpoint {
        /// The rejected URI.
        uri: String,
        /// tonic's complaint.
        source: tonic::transport::Error,
    },
}

/// Builds a lazily-connecting, reconnecting channel (connection reused across calls).
/// Must be called from within a Tokio runtime.
pub fn connect(
    endpoint: ClientEndpoint,
    options: ConnectOptions,
) -> Result<CpiChannel, ConnectError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ConnectError::NoRuntime);
    }
    let interceptor = ClientInterceptor {
        default_timeout: options.request_timeout,
    };
    let channel = match endpoint {
        ClientEndpoint::Tls { uri, tls } => {
            let parsed: Uri = uri.parse().map_err(|source| ConnectError::InvalidUri {
                uri: uri.clone(),
                source,
            })?;
            let (Some("https"), Some(authority), Some(host)) =
                (parsed.scheme_str(), parsed.authority(), parsed.host())
            else {
                return Err(ConnectError::NotHttps { uri });
            };
            let port = parsed.port_u16().unwrap_or(443);
            // IPv6 literals come bracketed in URIs but not in socket addresses.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            // tonic refuses https URIs without its own TLS config; our connector does the TLS,
            // so tonic is told plain http (the :authority header is unchanged).
            let tonic_uri = format!("http://{authority}");
            let endpoint = configure(
                Endpoint::from_shared(tonic_uri).map_err(|source| ConnectError::Endpoint {
                    uri: uri.clone(),
                    source,
                })?,
                &options,
            );
            let target = Arc::new(TlsTarget { host, port, tls });
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let target = Arc::clone(&target);
                async move { target.connect().await }
            }))
        }
        ClientEndpoint::Unix { path } => {
            let endpoint = configure(Endpoint::from_static(UNIX_PLACEHOLDER_URI), &options);
            let path = Arc::new(path);
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = Arc::clone(&path);
                async move {
                    let stream = UnixStream::connect(path.as_path()).await.map_err(|err| {
                        io::Error::new(
                            err.kind(),
                            format!("connecting to unix socket {}: {err}", path.display()),
                        )
                    })?;
                    Ok::<_, io::Error>(TokioIo::new(Coalesced::new(stream)))
                }
            }))
        }
    };
    Ok(CpiChannel::new(channel, interceptor))
}

fn configure(endpoint: Endpoint, options: &ConnectOptions) -> Endpoint {
    endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

struct TlsTarget {
    host: String,
    port: u16,
    tls: ClientTls,
}

impl TlsTarget {
    async fn connect(
        &self,
    ) -> io::Result<TokioIo<Coalesced<tokio_rustls::client::TlsStream<TcpStream>>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("TCP connect to {}:{}: {err}", self.host, self.port),
                )
            })?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(self.tls.current_config());
        let stream = connector
            .connect(self.tls.server_name().clone(), tcp)
            .await
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "TLS handshake with {}:{} (expecting server name {}): {err}",
                        self.host,
                        self.port,
                        self.tls.server_name().to_str()
                    ),
                )
            })?;
        Ok(TokioIo::new(Coalesced::new(stream)))
    }
}
