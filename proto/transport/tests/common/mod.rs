//! Shared fixtures: a health-service server on a real socket (with throwaway PKI from
//! `test-pki`), raw TLS probes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cpi_transport::{AcceptLimits, ClientTls, Listen, ServeError, ServerTls, TlsFiles};
use futures::future::BoxFuture;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
pub use test_pki::{Ca, Leaf, Pki};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_health::server::HealthReporter;
use tower::ServiceExt as _;

/// Reload interval used by every test: short so rotations are seen within a few hundred ms.
pub const RELOAD: Duration = Duration::from_millis(100);

/// What the server saw of one request.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub grpc_timeout: Option<String>,
    pub traceparent: Option<String>,
    /// The client's end-entity certificate, as tonic's `peer_certs()` reports it.
    pub peer_cert: Option<Vec<u8>>,
}

/// What the server saw of each request.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Observed>>>);

impl Seen {
    pub fn last(&self) -> Observed {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }
}

/// Wraps a service: records headers, then delays the call by `delay`.
#[derive(Clone)]
pub struct Recording<S> {
    inner: S,
    delay: Duration,
    seen: Seen,
}

impl<S: NamedService> NamedService for Recording<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Recording<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        let peer_cert = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().map(|cert| cert.to_vec()));
        self.seen.0.lock().unwrap().push(Observed {
            grpc_timeout: header("grpc-timeout"),
            traceparent: header("traceparent"),
            peer_cert,
        });
        let inner = self.inner.clone();
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            inner.oneshot(request).await
        })
    }
}

/// A running health server; aborted when dropped.
pub struct TestServer {
    pub addr: Option<SocketAddr>,
    pub reporter: HealthReporter,
    pub seen: Seen,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    pub async fn start(listen: Listen, delay: Duration) -> Self {
        Self::start_limited(listen, delay, AcceptLimits::default()).await
    }

    /// [`TestServer::start`] accepting TCP connections under `limits`.
    pub async fn start_limited(listen: Listen, delay: Duration, limits: AcceptLimits) -> Self {
        let (reporter, health) = tonic_health::server::health_reporter();
        let seen = Seen::default();
        let router = cpi_transport::server_builder().add_service(Recording {
            inner: health,
            delay,
            seen: seen.clone(),
        });
        let bound = cpi_transport::bind(listen)
            .await
            .unwrap()
            .with_limits(limits);
        let addr = bound.local_addr().tcp();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(router, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            reporter,
            seen,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn start_tls(tls: ServerTls) -> Self {
        Self::start_tls_limited(tls, AcceptLimits::default()).await
    }

    /// A TLS server on 127.0.0.1 accepting under `limits`.
    pub async fn start_tls_limited(tls: ServerTls, limits: AcceptLimits) -> Self {
        let listen = Listen::Tls {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls,
        };
        Self::start_limited(listen, Duration::ZERO, limits).await
    }

    pub fn uri(&self) -> String {
        format!("https://{}", self.addr.unwrap())
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server did not stop within 5 s")
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The transport's view of TLS files written by `test-pki`.
pub fn tls_files(files: &test_pki::TlsFiles) -> TlsFiles {
    TlsFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
        ca: files.ca.clone(),
    }
}

/// Server TLS from `files`, admitting client SANs in `allowed` (empty: any), reloading fast.
pub fn server_tls(files: &test_pki::TlsFiles, allowed: &[&str]) -> ServerTls {
    ServerTls::new(
        tls_files(files),
        allowed.iter().map(|s| (*s).to_owned()).collect(),
        RELOAD,
    )
    .unwrap()
}

/// Client TLS from `files`, expecting a `localhost` server, reloading fast.
pub fn client_tls(files: &test_pki::TlsFiles) -> ClientTls {
    ClientTls::new(tls_files(files), "localhost".to_owned(), RELOAD).unwrap()
}

/// A TLS health server presenting a `localhost` certificate from its own CA, and its material.
pub struct MtlsServer {
    /// The temp directory every side's files are written to.
    pub pki: Pki,
    /// Issued the server's certificate; the server trusts it for clients.
    pub ca: Ca,
    /// The certificate the server presents.
    pub leaf: Leaf,
    /// The server's certificate, key and CA bundle (the bundle holds `ca`).
    pub files: test_pki::TlsFiles,
    /// The running server.
    pub server: TestServer,
}

impl MtlsServer {
    /// Starts a server admitting client certificates from its CA whose SAN is in `allowed`
    /// (empty: any).
    pub async fn start(allowed: &[&str]) -> Self {
        Self::start_limited(allowed, AcceptLimits::default()).await
    }

    /// [`MtlsServer::start`] accepting under `limits`.
    pub async fn start_limited(allowed: &[&str], limits: AcceptLimits) -> Self {
        let pki = Pki::new().unwrap();
        let ca = Ca::new("ca").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let files = pki.write_tls_files("server", &leaf, ca.cert_pem()).unwrap();
        let server = TestServer::start_tls_limited(server_tls(&files, allowed), limits).await;
        Self {
            pki,
            ca,
            leaf,
            files,
            server,
        }
    }

    /// A client presenting `leaf` (files named after `name`) and trusting the server's CA.
    pub fn client(&self, name: &str, leaf: &Leaf) -> ClientTls {
        client_tls(
            &self
                .pki
                .write_tls_files(name, leaf, self.ca.cert_pem())
                .unwrap(),
        )
    }

    /// A client presenting a fresh certificate from the server's CA with `sans`.
    pub fn client_with_sans(&self, name: &str, sans: &[&str]) -> ClientTls {
        self.client(name, &self.ca.issue(sans).unwrap())
    }
}

/// A fresh channel (so a fresh connection and handshake) to `uri` with `tls`.
pub fn channel(uri: &str, tls: &ClientTls) -> cpi_transport::CpiChannel {
    cpi_transport::connect(
        cpi_transport::ClientEndpoint::Tls {
            uri: uri.to_owned(),
            tls: tls.clone(),
        },
        cpi_transport::ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
        },
    )
    .unwrap()
}

/// One `grpc.health.v1.Health/Check` call; `Ok` only if the server answered SERVING.
pub async fn check<C>(channel: C) -> Result<(), tonic::Status>
where
    C: tonic::client::GrpcService<Body> + Send,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    assert_eq!(response.into_inner().status(), ServingStatus::Serving);
    Ok(())
}

/// What a server showed a raw rustls client during the handshake.
pub struct Handshake {
    /// The server's end-entity certificate.
    pub cert: CertificateDer<'static>,
    /// The application protocol negotiated through ALPN.
    pub alpn: Option<Vec<u8>>,
}

/// A raw rustls client connection to the `localhost` server at `addr`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Handshakes with a raw rustls client and returns what the server presented and negotiated.
pub async fn handshake(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<Handshake> {
    let stream = tls_connect(addr, config).await?;
    let (_, conn) = stream.get_ref();
    Ok(Handshake {
        cert: conn.peer_certificates().unwrap()[0].clone().into_owned(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    })
}

/// Handshakes with a raw rustls client and returns the certificate the server presented.
pub async fn presented_cert(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<CertificateDer<'static>> {
    handshake(addr, config)
        .await
        .map(|handshake| handshake.cert)
}

/// A channel over a hand-made rustls client config (for clients `ClientTls` cannot express).
pub fn raw_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let config = Arc::clone(&config);
            async move {
                let stream = tls_connect(addr, config).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
}

/// A rustls client that trusts `ca_pem` and presents no certificate.
pub fn anonymous_client_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Whether the peer closed `stream` (EOF or error) within `budget`; data read meanwhile is
/// discarded.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    budget: Duration,
) -> bool {
    use tokio::io::AsyncReadExt as _;
    tokio::time::timeout(budget, stream.read_to_end(&mut Vec::new()))
        .await
        .is_ok()
}

/// Polls `condition` every 50 ms for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Captures formatted log lines of the current thread.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Installs a text subscriber writing here for the current thread.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        // While exactly one dispatcher exists, tracing-core decides a callsite's interest on its
        // first hit from the hitting thread's subscriber alone (tokio-rs/tracing#3611): a
        // callsite first hit by another test's thread, which has none, would stay disabled here
        // too. A second dispatcher that lives forever makes it ask every live one instead.
        static SECOND_DISPATCHER: OnceLock<tracing::Dispatch> = OnceLock::new();
        SECOND_DISPATCHER
            .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
