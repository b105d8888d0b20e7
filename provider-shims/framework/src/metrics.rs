//! Per-RPC metrics and the plain-HTTP endpoint serving them with the health probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use cpi_transport::AcceptLimits;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::ShimError;

// Method and code names are compile-time constants: borrowing them keeps a label lookup on
// every call free of allocations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    provider: String,
    version: String,
}

type HistogramFamily = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~33 s: cloud API calls behind an RPC range from cache hits to slow LB provisioning.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The framework's own metrics.
#[derive(Debug, Clone)]
pub(crate) struct ShimMetrics {
    requests: Family<MethodCode, Counter>,
    duration: HistogramFamily,
    stale_leader: Counter,
}

impl ShimMetrics {
    /// Registers the metrics (and `cpi_shim_info`) in `registry`.
    pub(crate) fn register(registry: &mut Registry, provider: &str, version: &str) -> Self {
        let metrics = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            stale_leader: Counter::default(),
        };
        registry.register(
            "cpi_shim_requests",
            "CPI calls served, by method and gRPC code",
            metrics.requests.clone(),
        );
        registry.register(
            "cpi_shim_request_duration_seconds",
            "Time spent serving CPI calls, by method",
            metrics.duration.clone(),
        );
        registry.register(
            "cpi_shim_stale_leader_rejections",
            "Mutating calls refused because their fence was older than one already seen",
            metrics.stale_leader.clone(),
        );
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            provider: provider.to_string(),
            version: version.to_string(),
        })
        .set(1);
        registry.register("cpi_shim_info", "Provider name and shim version", info);
        metrics
    }

    /// Records one finished call.
    pub(crate) fn observe(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&MethodCode {
                method,
                code: code_name(code),
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabel { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one stale-leader rejection.
    pub(crate) fn stale_leader(&self) {
        self.stale_leader.inc();
    }
}

/// The canonical upper-snake name of a gRPC code, as every gRPC dashboard labels it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// State behind the HTTP endpoint.
#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics: {err}\n"),
        ),
    }
}

async fn ready_handler(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: not serving\n")
    }
}

/// Connections the metrics endpoint holds at once: Prometheus and the kubelet's probes need a
/// few; at the cap the connection idle the longest is closed, so idle clients cannot keep the
/// probes out (issue 8).
const METRICS_MAX_CONNECTIONS: usize = 64;

/// How the metrics endpoint accepts connections: [`AcceptLimits::default`] but for the cap.
fn metrics_limits() -> AcceptLimits {
    AcceptLimits {
        max_connections: METRICS_MAX_CONNECTIONS,
        ..AcceptLimits::default()
    }
}

/// The plain-HTTP endpoint, bound but not yet serving.
pub(crate) struct HttpEndpoint {
    listener: TcpListener,
    router: Router,
}

impl HttpEndpoint {
    /// Binds `addr` now so a taken port fails start-up, before any gRPC is served.
    pub(crate) async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, ShimError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| ShimError::MetricsBind { addr, error })?;
        let router = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/readyz", get(ready_handler))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/livez", get(|| async { "ok\n" }))
            .with_state(HttpState { registry, ready });
        Ok(Self { listener, router })
    }

    /// The bound address (the real port when 0 was asked for).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, under [`metrics_limits`] and with a header-read timeout
    /// of [`cpi_transport::http::HEADER_READ_TIMEOUT`] (which also closes idle keep-alive
    /// connections).
    pub(crate) async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let incoming = cpi_transport::tcp_incoming(self.listener, metrics_limits());
        cpi_transport::serve_http1(
            incoming,
            self.router,
            cpi_transport::http::HEADER_READ_TIMEOUT,
            shutdown,
        )
        .await;
    }
}
