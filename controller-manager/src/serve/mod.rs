//! The secure port (upstream 10258): `/healthz`, `/readyz`, `/livez` and `/metrics` over HTTPS,
//! with a generated self-signed certificate when no serving certificate is given. A given
//! certificate is re-read every [`SERVING_CERT_RELOAD_INTERVAL`], so a rotated certificate is
//! served to new connections without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use cpi_transport::ServingTls;
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tracing::{info, warn};

use prometheus_client::registry::Registry;

use crate::health::{Health, Scope};

mod auth;

use auth::Decision;
pub use auth::{Authorizer, CACHE_TTL, MAX_REVIEWS_IN_FLIGHT};

/// How often `--tls-cert-file`/`--tls-private-key-file` are re-read for rotation. A constant
/// (10 s, like upstream's dynamic serving certificate) because the manager has no flag for the
/// secure port: `--provider-tls-reload-interval` governs the connection to the shim.
pub const SERVING_CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The serving certificate could not be read.
    #[error("--tls-cert-file/--tls-private-key-file {path}: {message}")]
    Certificate {
        /// Offending file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The serving certificate files could not be loaded.
    #[error("--tls-cert-file/--tls-private-key-file: {0}")]
    ServingTls(#[from] cpi_transport::TlsError),
    /// A self-signed certificate could not be generated.
    #[error("generating a self-signed serving certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// TLS configuration was rejected.
    #[error("serving TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The port could not be bound.
    #[error("binding the secure port {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Arc<Registry>,
}

#[derive(serde::Deserialize)]
struct VerboseQuery {
    verbose: Option<String>,
}

async fn health_endpoint(
    state: AppState,
    scopes: &[Scope],
    query: VerboseQuery,
) -> impl IntoResponse {
    let (ok, report) = state.health.evaluate(scopes);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let body = if query.verbose.is_some() || !ok {
        format!(
            "{report}{}",
            if ok {
                "healthz check passed\n"
            } else {
                "healthz check failed\n"
            }
        )
    } else {
        "ok".to_string()
    };
    (status, body)
}

/// Builds the router of the secure port; with an authoriser every request is reviewed first.
pub fn router(
    health: Health,
    metrics: Arc<Registry>,
    authorizer: Option<Arc<Authorizer>>,
) -> Router {
    let state = AppState { health, metrics };
    let router = Router::new()
        .route(
            "/healthz",
            get(
                |State(s): State<AppState>, Query(q): Query<VerboseQuery>| async move {
                    health_endpoint(s, &[Scope::Live, Scope::Ready], q).await
                },
            ),
        )
        .route(
            "/livez",
            get(
                |State(s): State<AppState>, Query(q): Query<VerboseQuery>| async move {
                    health_endpoint(s, &[Scope::Live], q).await
                },
            ),
        )
        .route(
            "/readyz",
            get(
                |State(s): State<AppState>, Query(q): Query<VerboseQuery>| async move {
                    health_endpoint(s, &[Scope::Ready], q).await
                },
            ),
        )
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&s.metrics),
                )
            }),
        )
        .with_state(state);
    // `route_layer`: only requests for these routes are reviewed; any other path is a 404
    // without a review, so probing random paths costs the API server nothing.
    match authorizer {
        Some(authorizer) => {
            router.route_layer(axum::middleware::from_fn_with_state(authorizer, authorize))
        }
        None => router,
    }
}

/// The registry in the Prometheus text format (empty if encoding fails, which only a
/// metric's own encoder could cause).
fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// Reviews one request with the delegated authoriser before it reaches a handler.
async fn authorize(
    State(authorizer): State<Arc<Authorizer>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let verb = auth::verb_of(request.method());
    match authorizer.check(request.uri().path(), &verb, header).await {
        Decision::Allow => next.run(request).await,
        Decision::Unauthenticated => (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response(),
        Decision::Forbidden(why) => {
            (StatusCode::FORBIDDEN, format!("forbidden: {why}\n")).into_response()
        }
        Decision::Error(why) => {
            // The reason is logged, not shown: the caller may be anyone on the network.
            warn!(error = %why, "secure port: could not review a request");
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n").into_response()
        }
        Decision::Busy => (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, "1")],
            "Too many requests\n",
        )
            .into_response(),
    }
}

/// The only application protocol the secure port speaks.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The secure port's serving certificate: files re-read on rotation, or generated once.
#[derive(Debug, Clone)]
pub enum ServingCert {
    /// `--tls-cert-file`/`--tls-private-key-file`, reloaded when their contents change.
    Files(ServingTls),
    /// A self-signed certificate generated at start-up (no files given); never changes.
    SelfSigned(Arc<ServerConfig>),
}

impl ServingCert {
    /// The configuration new handshakes use right now.
    pub fn current_config(&self) -> Arc<ServerConfig> {
        match self {
            Self::Files(serving) => serving.current_config(),
            Self::SelfSigned(config) => Arc::clone(config),
        }
    }
}

/// Loads the serving certificate (failing fast, then reloading it every
/// [`SERVING_CERT_RELOAD_INTERVAL`]) or, without files, generates a self-signed one.
pub fn tls_acceptor(cert_and_key: Option<(&Path, &Path)>) -> Result<ServingCert, ServeError> {
    if let Some((cert, key)) = cert_and_key {
        let serving = ServingTls::new(
            cert.to_owned(),
            key.to_owned(),
            vec![ALPN_HTTP1.to_vec()],
            SERVING_CERT_RELOAD_INTERVAL,
        )?;
        return Ok(ServingCert::Files(serving));
    }
    let key = rcgen::KeyPair::generate()?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert = params.self_signed(&key)?;
    let key =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| ServeError::Certificate {
            path: "<generated>".into(),
            message: e.to_string(),
        })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(ServingCert::SelfSigned(Arc::new(config)))
}

/// Binds the secure port now (so errors surface at start-up) and returns the bound address and
/// the serving future.
pub async fn bind(
    addr: SocketAddr,
    serving: ServingCert,
    router: Router,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    info!(address = %local, "serving /healthz, /readyz, /livez and /metrics over HTTPS");
    Ok((local, accept_loop(listener, serving, router)))
}

/// Serves HTTP/1.1 on the transport crate's bounded TLS accept loop (handshake timeout,
/// connection caps, idle timeout), with its header-read timeout: slow or idle clients must not
/// hold the connections a kubelet probe needs.
///
/// The configuration is fetched per connection so a reloaded certificate reaches new
/// connections; established ones keep theirs.
async fn accept_loop(listener: TcpListener, serving: ServingCert, router: Router) {
    let incoming = cpi_transport::tls_incoming(listener, move || serving.current_config());
    cpi_transport::serve_http1(
        incoming,
        router,
        cpi_transport::http::HEADER_READ_TIMEOUT,
        std::future::pending(),
    )
    .await;
}
