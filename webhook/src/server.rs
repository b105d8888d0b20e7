//! The HTTPS webhook port: one path per enabled webhook (`/<name>`), `/healthz`, `/readyz`
//! (the shim answers) and `/metrics`, served on the transport crate's bounded TLS accept loop
//! with the serving certificate re-read when it is rotated on disk.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::admit::Admitter;
use crate::options::{Options, OptionsError, Webhook, enabled_webhooks};
use crate::provider::{ClientError, Shim};
use crate::review::{self, BadReview, MAX_BODY_BYTES, ReviewVersion, Verdict};

/// The only application protocol served (the accept loop serves HTTP/1.1).
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// How long `/readyz` waits for the shim.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A flag value cannot work.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The serving certificate could not be loaded.
    #[error("--webhook-tls-cert-file/--webhook-tls-private-key-file: {0}")]
    ServingTls(#[source] cpi_transport::TlsError),
    /// The shim client could not be set up.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The port could not be bound.
    #[error("binding the webhook port {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Labels of the request metrics (upstream's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// HTTP status code answered.
    code: String,
    /// Webhook name.
    webhook: String,
}

/// Labels of the decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// Webhook name.
    webhook: String,
    /// `allowed`, `denied` or `patched`.
    decision: String,
}

type DurationFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The webhook metrics.
#[derive(Clone)]
struct Metrics {
    requests: Family<RequestLabels, Counter>,
    durations: DurationFamily,
    decisions: Family<DecisionLabels, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        fn histogram() -> Histogram {
            // 1 ms to about 16 s: the answer deadline is at most 30 s but normally 8 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        }
        let metrics = Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(histogram as fn() -> Histogram),
            decisions: Family::default(),
        };
        registry.register(
            "cloud_provider_webhook_request",
            "Admission requests by webhook and HTTP status code",
            metrics.requests.clone(),
        );
        registry.register(
            "cloud_provider_webhook_request_duration_seconds",
            "Time to answer an admission request, by webhook and HTTP status code",
            metrics.durations.clone(),
        );
        registry.register(
            "cloud_provider_webhook_decisions",
            "Admission verdicts by webhook: allowed unchanged, patched or denied",
            metrics.decisions.clone(),
        );
        metrics
    }
}

struct App {
    admitter: Admitter,
    deadline: Duration,
    metrics: Metrics,
    registry: Registry,
}

/// A bound webhook port, ready to serve.
pub struct Bound {
    addr: SocketAddr,
    serving: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Bound {
    /// The address bound (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the shutdown future given to [`bind`] resolves and connections drain.
    pub async fn serve(self) {
        self.serving.await;
    }
}

/// Checks `options`, loads the serving certificate, builds the (lazily connecting) shim client
/// and binds the port; serving stops when `shutdown` resolves.
pub async fn bind(
    options: &Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Bound, WebhookError> {
    options.validate()?;
    let enabled = enabled_webhooks(&options.webhooks)?;
    let serving = cpi_transport::ServingTls::new(
        options.webhook_tls_cert_file.clone(),
        options.webhook_tls_private_key_file.clone(),
        vec![ALPN_HTTP1.to_vec()],
        options.tls_reload_interval,
    )
    .map_err(WebhookError::ServingTls)?;
    let shim = Shim::new(&options.provider_endpoint()?, options.tls_reload_interval)?;
    // Read the shim's self-description (its capabilities and CSI drivers) now, so that volumes
    // of other CSI drivers are admitted even if the shim goes down before the first review;
    // each readiness probe reads it again. A shim not up yet is not an error here.
    let first_read = shim.clone();
    tokio::spawn(async move {
        if let Err(err) = first_read.refresh_info(READY_TIMEOUT).await {
            tracing::info!(%err, "provider shim not reachable at start-up; asking again on use");
        }
    });
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let app = Arc::new(App {
        admitter: Admitter {
            shim,
            cluster_name: options.cluster_name.clone(),
            pv_policy: options.failure_policy(Webhook::PvLabeler),
            lb_policy: options.failure_policy(Webhook::ServiceLbValidator),
        },
        deadline: options.webhook_deadline,
        metrics,
        registry,
    });
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));
    for webhook in enabled.iter().copied() {
        router = router.route(
            &webhook.path(),
            post(move |State(app): State<Arc<App>>, request: Request| {
                admission(app, webhook, request)
            }),
        );
    }
    let router = router.with_state(app);
    let addr = options.bind_address();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WebhookError::Bind { addr, source })?;
    let names: Vec<&str> = enabled.iter().map(|w| w.name()).collect();
    tracing::info!(address = %addr, webhooks = ?names, "serving admission webhooks over HTTPS");
    let incoming = cpi_transport::tls_incoming(listener, move || serving.current_config());
    let serving = cpi_transport::serve_http1(
        incoming,
        router,
        cpi_transport::http::HEADER_READ_TIMEOUT,
        shutdown,
    );
    Ok(Bound {
        addr,
        serving: Box::pin(serving),
    })
}

/// Binds and serves until `shutdown` resolves.
pub async fn run(
    options: &Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    bind(options, shutdown).await?.serve().await;
    Ok(())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.admitter.shim.refresh_info(READY_TIMEOUT).await {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "provider shim at {} not reachable: {err}\n",
                app.admitter.shim.endpoint()
            ),
        )
            .into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &app.registry).is_err() {
        out.clear();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// One admission request: parse, admit, answer, count.
async fn admission(app: Arc<App>, webhook: Webhook, request: Request) -> Response {
    let started = Instant::now();
    let budget = answer_deadline(app.deadline, request.uri().query());
    let response = match review_of(&app, webhook, request, budget).await {
        Ok((version, uid, verdict)) => {
            app.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    webhook: webhook.name().to_string(),
                    decision: verdict.outcome().to_string(),
                })
                .inc();
            let mut response = Response::new(Body::from(review::encode(version, &uid, &verdict)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(bad) => {
            tracing::info!(webhook = webhook.name(), error = %bad, "refused an admission request");
            (bad.status(), format!("{bad}\n")).into_response()
        }
    };
    let labels = RequestLabels {
        code: response.status().as_u16().to_string(),
        webhook: webhook.name().to_string(),
    };
    app.metrics.requests.get_or_create(&labels).inc();
    app.metrics
        .durations
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Reads, checks and admits one review.
async fn review_of(
    app: &App,
    webhook: Webhook,
    request: Request,
    budget: Duration,
) -> Result<(ReviewVersion, String, Verdict), BadReview> {
    let deadline = Instant::now() + budget;
    let headers = request.headers();
    review::check_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = declared.filter(|l| *l > MAX_BODY_BYTES) {
        tracing::debug!(length, "declared body too large");
        return Err(BadReview::TooLarge(MAX_BODY_BYTES));
    }
    let body = request.into_body();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let body = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => return Err(BadReview::SlowBody(budget)),
        Ok(Err(err)) => {
            let err = err.into_inner();
            if err.is::<http_body_util::LengthLimitError>() {
                return Err(BadReview::TooLarge(MAX_BODY_BYTES));
            }
            return Err(BadReview::Read(err.to_string()));
        }
        Ok(Ok(body)) => body,
    };
    let review = review::parse(&body)?;
    let span = tracing::info_span!(
        "admission",
        webhook = webhook.name(),
        uid = %review.request.uid,
        operation = %review.request.operation,
        name = %review.request.name,
    );
    let verdict = app
        .admitter
        .admit(webhook, &review.request, deadline)
        .instrument(span)
        .await?;
    tracing::debug!(
        webhook = webhook.name(),
        uid = %review.request.uid,
        outcome = verdict.outcome(),
        "answered an admission request"
    );
    Ok((review.version, review.request.uid, verdict))
}

/// The time a review may take: `--webhook-deadline`, or less when the API server's
/// `?timeout=` (its `timeoutSeconds`) leaves less, keeping a second (or a fifth of a shorter
/// timeout) to get the answer back.
fn answer_deadline(flag: Duration, query: Option<&str>) -> Duration {
    let timeout = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("timeout="))
        .and_then(|value| humantime::parse_duration(value).ok());
    match timeout {
        Some(timeout) => {
            let margin = (timeout / 5).min(Duration::from_secs(1));
            flag.min(timeout.saturating_sub(margin))
        }
        None => flag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_stays_below_the_api_server_timeout() {
        let flag = Duration::from_secs(8);
        assert_eq!(answer_deadline(flag, None), flag);
        assert_eq!(answer_deadline(flag, Some("timeout=10s")), flag);
        assert_eq!(
            answer_deadline(flag, Some("x=1&timeout=5s")),
            Duration::from_secs(4)
        );
        assert_eq!(
            answer_deadline(flag, Some("timeout=2s")),
            Duration::from_millis(1600)
        );
        assert_eq!(answer_deadline(flag, Some("timeout=bogus")), flag);
    }
}
