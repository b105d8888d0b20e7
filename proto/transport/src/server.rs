//! Serving a tonic router over mTLS TCP or a plaintext Unix socket.
//!
//! Build the router from [`server_builder`], not `tonic::transport::Server::builder()`: it
//! installs [`crate::trace::server_span`] so that every request runs in a `grpc.server` span whose
//! parent is the caller's W3C trace context. (A tonic `Router` cannot be given a layer after it
//! has been built, so [`serve`] cannot add it for you.)
//!
//! ```ignore
//! let router = cpi_transport::server::server_builder().add_service(my_service);
//! cpi_transport::server::serve(router, listen, shutdown).await?;
//! ```
//!
//! TLS is terminated here rather than by tonic's `ServerTlsConfig`, which cannot hot-reload:
//! each accepted TCP connection is handshaken in its own task (bounded by
//! [`HANDSHAKE_TIMEOUT`]) with the [`ServerTls`] configuration current at that moment, and only
//! connections whose client certificate passed verification and the SAN allow-list reach tonic.
//! Refused handshakes are logged at `warn` with the peer address and the reason. The TLS streams
//! carry their peer certificates, so handlers can use `request.peer_certs()`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tracing::{debug, info, warn};

use crate::tls::ServerTls;
use crate::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// How long a client may take to complete the TLS handshake before it is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress beyond this are refused, so a flood cannot exhaust memory.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Where and how a gRPC server listens.
pub enum Listen {
    /// TCP with mandatory mutual TLS.
    Tls {
        /// Address to bind.
        addr: SocketAddr,
        /// TLS configuration.
        tls: ServerTls,
    },
    /// Plaintext over a Unix domain socket (sidecar deployments only).
    Unix {
        /// Socket path; a stale socket file is replaced.
        path: PathBuf,
    },
}

/// Failure to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TCP address could not be bound.
    #[error("bind failed on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// The Unix socket path could not be prepared or bound.
    #[error("socket path {}: {source}", .path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The Unix socket path is served by a running process.
    #[error("socket path {} is in use by a running server", .path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket exists at the socket path; it is not removed.
    #[error("socket path {} exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The HTTP/2 server failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Where a [`Bound`] server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    /// A TCP address (with the real port when port 0 was requested).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl LocalAddr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A listening socket not yet serving; lets callers learn the bound address first.
pub struct Bound {
    inner: BoundInner,
}

enum BoundInner {
    Tls {
        listener: TcpListener,
        local: SocketAddr,
        tls: ServerTls,
    },
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// A tonic server builder with the trace-context span installed; build every CPI router on it.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .trace_fn(crate::trace::server_span)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Binds the listening socket (replacing a stale Unix socket file) without serving yet.
pub async fn bind(listen: Listen) -> Result<Bound, ServeError> {
    let inner = match listen {
        Listen::Tls { addr, tls } => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            BoundInner::Tls {
                listener,
                local,
                tls,
            }
        }
        Listen::Unix { path } => {
            remove_stale_socket(&path)?;
            let listener = UnixListener::bind(&path).map_err(|source| ServeError::Socket {
                path: path.clone(),
                source,
            })?;
            BoundInner::Unix { listener, path }
        }
    };
    Ok(Bound { inner })
}

/// Serves `router` until `shutdown` resolves, then drains in-flight calls. Every request runs in
/// a span whose parent is the caller's W3C trace context (when the router was built from
/// [`server_builder`]).
pub async fn serve(
    router: tonic::transport::server::Router,
    listen: Listen,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    bind(listen).await?.serve(router, shutdown).await
}

impl Bound {
    /// The address actually bound.
    pub fn local_addr(&self) -> LocalAddr {
        match &self.inner {
            BoundInner::Tls { local, .. } => LocalAddr::Tcp(*local),
            BoundInner::Unix { path, .. } => LocalAddr::Unix(path.clone()),
        }
    }

    /// Serves `router` until `shutdown` resolves, then stops accepting and drains in-flight
    /// calls. A Unix socket file is removed afterwards.
    pub async fn serve(
        self,
        router: tonic::transport::server::Router,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        match self.inner {
            BoundInner::Tls {
                listener,
                local,
                tls,
            } => {
                info!(addr = %local, "serving gRPC over mutual TLS");
                let incoming =
                    tls_incoming(listener, move || tls.current_config()).map(Ok::<_, io::Error>);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
                    .map_err(ServeError::from)
            }
            BoundInner::Unix { listener, path } => {
                info!(path = %path.display(), "serving gRPC over plaintext Unix socket");
                let incoming = UnixListenerStream::new(listener);
                let result = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                if let Err(err) = std::fs::remove_file(&path) {
                    debug!(path = %path.display(), error = %err, "could not remove socket file");
                }
                result.map_err(ServeError::from)
            }
        }
    }
}

/// The TLS connections accepted on `listener`, each handshaken with the configuration `config`
/// returns at accept time (so reloaded certificates apply to new connections): at most
/// `MAX_PENDING_HANDSHAKES` handshakes in flight, each bounded by `HANDSHAKE_TIMEOUT`, and a
/// pause after a failed `accept`. Accepting stops when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
) -> impl futures::Stream<Item = TlsStream<TcpStream>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<TlsStream<TcpStream>>(64);
    // The accept loop ends by itself once the receiving end is dropped; aborting on drop covers
    // a loop that is paused at that moment.
    let accept = AbortOnDrop(tokio::spawn(accept_loop(listener, config, tx)));
    ReceiverStream::new(rx).map(move |stream| {
        let _keep = &accept;
        stream
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    // Dropping the JoinSet (when the loop ends) aborts handshakes still in progress.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            () = tx.closed() => break,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                        warn!(%peer, "refusing TCP connection: {MAX_PENDING_HANDSHAKES} TLS handshakes already in progress");
                        continue;
                    }
                    if let Err(err) = tcp.set_nodelay(true) {
                        debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                    }
                    let acceptor = TlsAcceptor::from(config());
                    handshakes.spawn(handshake(acceptor, tcp, peer, tx.clone()));
                }
                Err(err) => {
                    warn!(error = %err, "accepting a TCP connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            debug!(%peer, "TLS handshake complete");
            // Fails only when the server is shutting down; the connection is then dropped.
            let _ = tx.send(stream).await;
        }
        Ok(Err(err)) => {
            warn!(%peer, error = %err, "refusing TLS connection");
        }
        Err(_) => {
            warn!(%peer, "refusing TLS connection: handshake not completed within {HANDSHAKE_TIMEOUT:?}");
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt as _;

    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    // A socket someone still answers on is not stale: replacing it would hijack a live server.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::SocketInUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ServeError::Socket {
        path: path.to_owned(),
        source,
    })?;
    debug!(path = %path.display(), "removed stale socket file");
    Ok(())
}
