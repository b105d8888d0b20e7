//! The secure port (upstream 10258): `/healthz`, `/readyz`, `/livez` and `/metrics` over HTTPS,
//! with a generated self-signed certificate when no serving certificate is given.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use prometheus_client::registry::Registry;

use crate::health::{Health, Scope};

mod auth;

use auth::Decision;
pub use auth::{Authorizer, CACHE_TTL, MAX_REVIEWS_IN_FLIGHT};

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

/// Loads (or generates) the serving certificate and builds the TLS acceptor.
pub fn tls_acceptor(cert_and_key: Option<(&Path, &Path)>) -> Result<TlsAcceptor, ServeError> {
    let (certs, key) = match cert_and_key {
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ServeError::Certificate {
                    path: cert.display().to_string(),
                    message: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ServeError::Certificate {
                    path: cert.display().to_string(),
                    message: "no certificate found".into(),
                });
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ServeError::Certificate {
                path: key.display().to_string(),
                message: e.to_string(),
            })?;
            (certs, key)
        }
        None => {
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])?;
            let cert = params.self_signed(&key)?;
            (
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| {
                    ServeError::Certificate {
                        path: "<generated>".into(),
                        message: e.to_string(),
                    }
                })?,
            )
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds the secure port now (so errors surface at start-up) and returns the bound address and
/// the serving future.
pub async fn bind(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    info!(address = %local, "serving /healthz, /readyz, /livez and /metrics over HTTPS");
    Ok((local, accept_loop(listener, acceptor, router)))
}

/// Serves HTTP/1.1 on the transport crate's bounded TLS accept loop (handshake timeout,
/// connection caps, idle timeout), with its header-read timeout: slow or idle clients must not
/// hold the connections a kubelet probe needs.
async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    let config = acceptor.config().clone();
    let incoming = cpi_transport::tls_incoming(listener, move || config.clone());
    cpi_transport::serve_http1(
        incoming,
        router,
        cpi_transport::http::HEADER_READ_TIMEOUT,
        std::future::pending(),
    )
    .await;
}
