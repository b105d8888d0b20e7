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
//! each accepted TCP connection is handshaken in its own task with the [`ServerTls`]
//! configuration current at that moment, and only connections whose client certificate passed
//! verification and the SAN allow-list reach tonic. Accepting follows [`AcceptLimits`]
//! (handshake timeout, caps on handshakes and on connections, idle timeout; see
//! [`crate::accept`]); refused handshakes are logged with the peer address and the reason, at
//! `warn` at most once per [`crate::WARN_INTERVAL`] and otherwise at `debug`. The TLS streams
//! carry their peer certificates, so handlers can use `request.peer_certs()`.
//!
//! A Unix socket is made owner-only (mode 0600) right after binding, and every accepted
//! connection's peer credentials are checked against [`UnixPeers`] (by default the server's own
//! uid and root): the plaintext socket is for a sidecar in the same pod, running as the same
//! user, and file modes alone do not cover a connection made before the mode was set. Refused
//! peers are logged (rate limited like the TLS refusals) and their connection closed.
//!
//! The HTTP/2 settings of [`server_builder`] bound what one connection can ask for:
//! [`MAX_CONCURRENT_STREAMS`] streams at once, resets answered with GOAWAY beyond
//! [`MAX_PENDING_ACCEPT_RESET_STREAMS`] / [`MAX_LOCAL_ERROR_RESET_STREAMS`] (the "rapid reset"
//! floods), PINGs every 30 s with a 10 s timeout, and [`REQUEST_TIMEOUT`] for calls that carry
//! no shorter deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{debug, info};

use crate::log_limit::{LogLimiter, warn_limited};

pub use crate::accept::HANDSHAKE_TIMEOUT;
use crate::accept::{AcceptLimits, TrackedConnection, tls_incoming_with};
use crate::tls::ServerTls;
use crate::{Coalesced, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// HTTP/2 streams (calls) one connection may have open at once; without a value tonic allows
/// any number. A client with more calls in flight queues them until a stream is free (h2 clients
/// honour SETTINGS_MAX_CONCURRENT_STREAMS), so the cap costs a legitimate client no errors.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Streams a client may open and reset before the server has accepted them, before the
/// connection is closed with GOAWAY (h2's own default, set explicitly because it is what stops
/// a "rapid reset" flood).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the server may reset for protocol errors the client provokes, before the connection
/// is closed with GOAWAY. tonic passes "unset" on to hyper, which turns h2's check off; this is
/// h2's default of 1024.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Server-side deadline of a call without a shorter `grpc-timeout` (the controller-manager sends
/// `--provider-timeout`, 30 s by default): a backstop for clients that set none. Streaming calls
/// are bounded only until their response starts.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

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

/// Mode of a bound Unix socket file: read and write (connect) for the owner only.
pub const UNIX_SOCKET_MODE: u32 = 0o600;

/// Which local users may connect to a Unix socket, by the peer credentials of the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UnixPeers {
    /// The server's own uid and root (uid 0): a sidecar in the same pod runs as the same user.
    #[default]
    OwnUidAndRoot,
    /// Exactly these uids (the server's own uid and root only if listed).
    Uids(Vec<u32>),
}

impl UnixPeers {
    /// Whether a peer running as `peer_uid` may connect to a server running as `own_uid`.
    pub fn allows(&self, peer_uid: u32, own_uid: u32) -> bool {
        match self {
            Self::OwnUidAndRoot => peer_uid == own_uid || peer_uid == 0,
            Self::Uids(uids) => uids.contains(&peer_uid),
        }
    }
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
        limits: AcceptLimits,
    },
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Owner of the socket file, i.e. the uid this process binds as.
        own_uid: u32,
        peers: UnixPeers,
    },
}

/// A tonic server builder with the trace-context span installed; build every CPI router on it.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .trace_fn(crate::trace::server_span)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .timeout(REQUEST_TIMEOUT)
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
                limits: AcceptLimits::default(),
            }
        }
        Listen::Unix { path } => {
            remove_stale_socket(&path)?;
            let listener = UnixListener::bind(&path).map_err(|source| ServeError::Socket {
                path: path.clone(),
                source,
            })?;
            // Owner-only before anything else happens; the peer check in `serve` covers a
            // connection attempted in the moment between bind and chmod.
            let own_uid = restrict_socket_file(&path)?;
            BoundInner::Unix {
                listener,
                path,
                own_uid,
                peers: UnixPeers::default(),
            }
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

    /// Accepts TCP connections under `limits` instead of [`AcceptLimits::default`] (no effect on
    /// a Unix socket, whose peers are local processes).
    pub fn with_limits(mut self, new_limits: AcceptLimits) -> Self {
        if let BoundInner::Tls { limits, .. } = &mut self.inner {
            *limits = new_limits;
        }
        self
    }

    /// Accepts Unix-socket connections only from `new_peers` instead of
    /// [`UnixPeers::default`] (no effect on TCP, whose peers are checked by mTLS).
    pub fn with_unix_peers(mut self, new_peers: UnixPeers) -> Self {
        if let BoundInner::Unix { peers, .. } = &mut self.inner {
            *peers = new_peers;
        }
        self
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
                limits,
            } => {
                info!(addr = %local, ?limits, "serving gRPC over mutual TLS");
                let incoming = tls_incoming_with(listener, move || tls.current_config(), limits)
                    .map(|conn| Ok::<_, io::Error>(Coalesced::new(conn)));
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
                    .map_err(ServeError::from)
            }
            BoundInner::Unix {
                listener,
                path,
                own_uid,
                peers,
            } => {
                info!(
                    path = %path.display(),
                    own_uid,
                    ?peers,
                    "serving gRPC over plaintext Unix socket"
                );
                let limiter = LogLimiter::default();
                let incoming =
                    UnixListenerStream::new(listener).filter_map(move |conn| match conn {
                        Ok(stream) => admit_unix_peer(stream, &peers, own_uid, &limiter)
                            .map(|stream| Ok(Coalesced::new(stream))),
                        // Accept errors go to tonic as before.
                        Err(err) => Some(Err(err)),
                    });
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

/// [`tls_incoming_with`] under [`AcceptLimits::default`]: the TLS connections accepted on
/// `listener`, each handshaken with the configuration `config` returns at accept time (so
/// reloaded certificates apply to new connections). Accepting stops when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
) -> impl futures::Stream<Item = TrackedConnection<TlsStream<TcpStream>>> + Send + 'static {
    tls_incoming_with(listener, config, AcceptLimits::default())
}

/// `stream` if its peer may connect; otherwise logs the refusal and drops (closes) it.
fn admit_unix_peer(
    stream: tokio::net::UnixStream,
    peers: &UnixPeers,
    own_uid: u32,
    limiter: &LogLimiter,
) -> Option<tokio::net::UnixStream> {
    match stream.peer_cred() {
        Ok(cred) if peers.allows(cred.uid(), own_uid) => Some(stream),
        Ok(cred) => {
            warn_limited!(
                limiter,
                peer_uid = cred.uid(),
                peer_gid = cred.gid(),
                peer_pid = ?cred.pid(),
                own_uid,
                "refused Unix-socket connection: peer uid not allowed"
            );
            None
        }
        Err(err) => {
            // Without credentials the peer cannot be vouched for.
            warn_limited!(
                limiter,
                error = %err,
                "refused Unix-socket connection: peer credentials unavailable"
            );
            None
        }
    }
}

/// Sets the socket file at `path` to [`UNIX_SOCKET_MODE`] and returns its owner's uid.
fn restrict_socket_file(path: &Path) -> Result<u32, ServeError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    let socket_error = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))
        .map_err(socket_error)?;
    // The file was just created by this process, so its owner is the uid we run as (no unsafe
    // `geteuid` needed).
    let metadata = std::fs::symlink_metadata(path).map_err(socket_error)?;
    Ok(metadata.uid())
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
