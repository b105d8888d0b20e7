//! Why a shim could not start or stopped serving.

use std::net::SocketAddr;

/// A start-up or serving failure of the framework; every message names the flag or address.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// TCP serving without the TLS flags.
    #[error(
        "serving on TCP requires mutual TLS, but {missing} not set (or pass --unix-socket PATH \
         to serve plaintext on a Unix socket)"
    )]
    MissingTls {
        /// The missing flags, e.g. `--client-ca-file is`.
        missing: String,
    },
    /// `--unix-socket` together with TCP/TLS flags.
    #[error(
        "--unix-socket cannot be combined with {0}: a shim serves either mTLS TCP or a Unix socket"
    )]
    ConflictingListen(String),
    /// The TLS files could not be loaded (the message names the file).
    #[error(transparent)]
    Tls(#[from] cpi_transport::TlsError),
    /// The metrics endpoint could not bind.
    #[error("binding --metrics-bind-address {addr}: {error}")]
    MetricsBind {
        /// Address asked for.
        addr: SocketAddr,
        /// Why it failed.
        error: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("installing the SIGTERM/SIGINT handlers: {0}")]
    Signal(std::io::Error),
    /// The gRPC listener could not bind, or the server failed (the message says which).
    #[error(transparent)]
    Serve(#[from] cpi_transport::ServeError),
    /// The serving task panicked or was cancelled.
    #[error("shim task failed: {0}")]
    Task(String),
}
