//! The API-server client stack: loading the kubeconfig, one HTTP/2 connection shared by every
//! client, client-side rate limiting (`--kube-api-qps`, `--kube-api-burst`; a token bucket that
//! delays, never drops, requests) and the client-go style `rest_client_requests_total{code,method}`
//! counter, as tower layers under kube's client.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cpi_transport::Coalesced;
use hyper_util::rt::TokioIo;
use kube::config::{KubeConfigOptions, Kubeconfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Failure to load the API-server configuration or to build a client from it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No kubeconfig was given and the in-cluster configuration could not be inferred.
    #[error("loading the API server configuration (no --kubeconfig given): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The kubeconfig file could not be read or used.
    #[error("--kubeconfig={path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: kube::config::KubeconfigError,
    },
    /// `--master` is not a URL.
    #[error("--master={value}: {source}")]
    Master {
        /// The flag value.
        value: String,
        /// Why it does not parse.
        source: http::uri::InvalidUri,
    },
    /// The client stack could not be built (TLS or auth settings).
    #[error("building the API client: {0}")]
    Build(#[from] kube::Error),
    /// The kubeconfig's credential plugin failed.
    #[error("building the API client: {0}")]
    Credentials(#[from] CredentialPluginError),
}

/// Loads the API-server configuration from `kubeconfig`/`master` (upstream `--kubeconfig`,
/// `--master`) or, when both are empty, the in-cluster configuration.
pub async fn load_config(kubeconfig: &str, master: &str) -> Result<kube::Config, ClientError> {
    let mut config = if kubeconfig.is_empty() {
        kube::Config::infer().await?
    } else {
        let file_error = |source| ClientError::Kubeconfig {
            path: kubeconfig.to_string(),
            source,
        };
        let file = Kubeconfig::read_from(kubeconfig).map_err(file_error)?;
        kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(file_error)?
    };
    if !master.is_empty() {
        config.cluster_url = master.parse().map_err(|source| ClientError::Master {
            value: master.to_string(),
            source,
        })?;
    }
    Ok(config)
}

/// The manager's API clients: all over one connection, each with its own token bucket.
pub struct Clients {
    /// For the controllers.
    pub controllers: kube::Client,
    /// For leader election: as upstream's separate leader-election client, lease renewals
    /// never queue behind a burst of controller writes (which could cost the lease).
    pub leader_election: kube::Client,
    /// For the secure port's token and access reviews: whoever reaches the port can cause
    /// them, so they must not queue lease renewals or controller writes either.
    pub reviews: kube::Client,
}

/// Builds the rate-limited, instrumented API clients. Unlike kube's default stack (HTTP/1.1,
/// one TLS connection per request in flight) they negotiate HTTP/2, so every request and watch
/// shares one multiplexed connection: with tens of node workers that saves a TLS handshake and
/// connection buffers per worker (measured in `bench node-init`).
pub fn build_clients(
    config: &kube::Config,
    qps: f32,
    burst: u32,
    metrics: &ClientMetrics,
) -> Result<Clients, ClientError> {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    // ALPN (h2, then http/1.1) is set by the connector builder.
    let tls = config.rustls_client_config()?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    // One write per flush instead of one per HTTP/2 frame (see `cpi_transport::Coalesced`).
    let https = tower::ServiceExt::map_response(https, |conn| {
        TokioIo::new(Coalesced::new(TokioIo::new(conn)))
    });
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            // Detect a dead connection (its watches would hang) without a read timeout.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(https);
    // The hyper client is a handle on one pool: both clients share its connection.
    let client = |hyper_client| -> Result<kube::Client, ClientError> {
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .map_err(redact_credential_errors)
            .option_layer(config.auth_layer().map_err(|err| match err {
                kube::Error::Auth(auth) => match redacted(auth) {
                    Ok(plugin) => ClientError::Credentials(plugin),
                    Err(auth) => ClientError::Build(kube::Error::Auth(auth)),
                },
                other => ClientError::Build(other),
            })?)
            .layer(config.extra_headers_layer()?)
            .map_err(tower::BoxError::from)
            .service(hyper_client);
        Ok(
            kube::client::ClientBuilder::new(service, config.default_namespace.clone())
                .with_layer(&RequestMetricsLayer::new(metrics.clone()))
                .with_layer(&RateLimitLayer::new(qps, burst))
                .build(),
        )
    };
    Ok(Clients {
        controllers: client(hyper_client.clone())?,
        leader_election: client(hyper_client.clone())?,
        reviews: client(hyper_client)?,
    })
}

/// A kubeconfig credential plugin (`exec`) that failed. Only its exit status is kept: kube's
/// own error carries the plugin's command line and its whole output, which may hold the very
/// credentials it was asked for, and would end up in logs and events.
#[derive(Debug, thiserror::Error)]
#[error(
    "the kubeconfig's credential plugin failed ({what}); its command line and output are not shown because they may hold credentials"
)]
pub struct CredentialPluginError {
    /// What went wrong, without the plugin's words.
    what: String,
}

/// Replaces kube's credential-plugin errors with [`CredentialPluginError`] (the plugin runs
/// again whenever its token expires); other errors pass.
fn redact_credential_errors(err: tower::BoxError) -> tower::BoxError {
    match err.downcast::<kube::client::AuthError>() {
        Ok(auth) => match redacted(*auth) {
            Ok(plugin) => Box::new(plugin),
            Err(auth) => Box::new(auth),
        },
        Err(other) => other,
    }
}

/// The redacted form of a credential-plugin error; any other auth error is handed back.
fn redacted(
    auth: kube::client::AuthError,
) -> Result<CredentialPluginError, kube::client::AuthError> {
    use kube::client::AuthError;
    let what = match &auth {
        AuthError::AuthExecRun { out, .. } => match out.status.code() {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".to_string(),
        },
        AuthError::AuthExecStart(io) => format!("could not be started: {}", io.kind()),
        AuthError::AuthExecParse(_) => "its output is not an ExecCredential".to_string(),
        AuthError::AuthExec(_) | AuthError::AuthExecSerialize(_) | AuthError::MissingCommand => {
            "exec authentication failed".to_string()
        }
        _ => return Err(auth),
    };
    Ok(CredentialPluginError { what })
}

/// Labels of `rest_client_requests_total` (client-go's names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiRequestLabels {
    /// HTTP status code, or `<error>`.
    code: String,
    /// HTTP method.
    method: String,
}

/// The API client's metrics: `rest_client_requests_total{code,method}`.
#[derive(Clone, Default)]
pub struct ClientMetrics {
    requests: Family<ApiRequestLabels, Counter>,
}

impl ClientMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, partitioned by status code and method.",
            metrics.requests.clone(),
        );
        metrics
    }

    fn count(&self, method: &str, code: &str) {
        self.requests
            .get_or_create(&ApiRequestLabels {
                code: code.to_string(),
                method: method.to_string(),
            })
            .inc();
    }
}

/// A token bucket refilled at `qps` tokens per second up to `burst` tokens.
#[derive(Debug)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(qps: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token, or says how long to wait for one.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Never more than an hour: a finite wait even for a tiny or broken rate.
            let wait = (1.0 - self.tokens) / self.qps;
            Err(
                Duration::try_from_secs_f64(wait).map_or(Duration::from_secs(3600), |wait| {
                    wait.min(Duration::from_secs(3600))
                }),
            )
        }
    }
}

/// Layer installing [`RateLimited`].
#[derive(Clone)]
pub struct RateLimitLayer {
    bucket: Arc<Mutex<TokenBucket>>,
}

impl RateLimitLayer {
    /// A limiter shared by every service it wraps.
    pub fn new(qps: f32, burst: u32) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(TokenBucket::new(
                f64::from(qps),
                burst,
                Instant::now(),
            ))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            bucket: self.bucket.clone(),
            sleep: None,
            reserved: false,
        }
    }
}

/// A service that waits for a token in `poll_ready`.
pub struct RateLimited<S> {
    inner: S,
    bucket: Arc<Mutex<TokenBucket>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    reserved: bool,
}

impl<S, R> tower::Service<R> for RateLimited<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.reserved {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            // The bucket's state stays consistent whatever panicked while holding the lock
            // (`try_take` cannot leave it half-updated), so a poisoned lock is taken over.
            let taken = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .try_take(Instant::now());
            match taken {
                Ok(()) => self.reserved = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.reserved = false;
        self.inner.call(request)
    }
}

/// Sends a write whose response body nobody reads, without deserialising it (a Node in the
/// response would cost more CPU than the request itself).
pub async fn send_write(
    client: &kube::Client,
    request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
) -> Result<(), kube::Error> {
    let request = request.map_err(kube::Error::BuildRequest)?;
    client.request_text(request).await.map(drop)
}

/// Request builder for the cluster-scoped `nodes` resource.
pub fn nodes() -> kube::core::Request {
    kube::core::Request::new("/api/v1/nodes")
}

/// Layer counting every request by HTTP method and response code.
#[derive(Clone)]
struct RequestMetricsLayer {
    metrics: ClientMetrics,
}

impl RequestMetricsLayer {
    fn new(metrics: ClientMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Service counting requests by method and code.
pub struct RequestMetrics<S> {
    inner: S,
    metrics: ClientMetrics,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let metrics = self.metrics.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            metrics.count(&method, &code);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_rate_waits_at_most_an_hour() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1e-30, 1, start);
        assert!(bucket.try_take(start).is_ok());
        assert_eq!(bucket.try_take(start), Err(Duration::from_secs(3600)));
    }

    #[test]
    fn burst_then_qps() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, start);
        for _ in 0..3 {
            assert!(bucket.try_take(start).is_ok());
        }
        let wait = bucket.try_take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(bucket.try_take(start + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 2, start);
        let later = start + Duration::from_secs(60);
        assert!(bucket.try_take(later).is_ok());
        assert!(bucket.try_take(later).is_ok());
        assert!(bucket.try_take(later).is_err());
    }
}
