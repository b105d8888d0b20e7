//! How components speak the CPI: mutual TLS with certificates hot-reloaded from disk and a SAN
//! allow-list, plaintext only over a Unix domain socket, default deadlines, and W3C trace-context
//! propagation in gRPC metadata (plus the OTLP exporter set-up shared by every binary).
//!
//! Server: build the router with [`server::server_builder`] (it installs the per-request trace
//! span), then [`server::serve`] it (or [`server::bind`] first to learn the port). Client:
//! [`client::connect`] returns a lazily-connecting [`CpiChannel`] for the generated clients.
//!
//! Every TCP port is accepted under [`AcceptLimits`] (handshake timeout and cap, connection cap,
//! idle timeout; see [`accept`]); plain HTTP/1.1 endpoints are served with [`serve_http1`], which
//! adds a header-read timeout. CPI connections, both ends, gather their writes until HTTP/2
//! flushes ([`Coalesced`]; the controller-manager's API-server connection uses it too).

pub mod accept;
pub mod client;
mod coalesce;
mod endpoint;
pub mod http;
mod log_limit;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod trace;

use std::time::Duration;

/// HTTP/2 PING interval on both sides, also on idle connections, so a dead peer is noticed
/// before a call needs the connection.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long to wait for a PING acknowledgement before declaring the connection dead.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub use accept::{AcceptLimits, TrackedConnection, tcp_incoming, tls_incoming_with};
pub use client::{ClientEndpoint, ConnectError, ConnectOptions, CpiChannel, connect};
pub use coalesce::Coalesced;
pub use endpoint::{EndpointError, EndpointTls, ProviderEndpoint, ProviderFlags};
pub use http::serve_http1;
pub use log_limit::WARN_INTERVAL;
pub use server::{
    Bound, Listen, LocalAddr, ServeError, UNIX_SOCKET_MODE, UnixPeers, bind, serve, server_builder,
    tls_incoming,
};
pub use tls::{ClientTls, ServerTls, ServingTls, TlsError, TlsFiles};
