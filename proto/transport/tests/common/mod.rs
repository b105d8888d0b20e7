//! Shared fixtures: throwaway PKI, a health-service server on a real socket, raw TLS probes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cpi_transport::{ClientTls, Listen, ServeError, ServerTls, TlsFiles};
use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
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

/// A throwaway certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM, plus the certificate's DER for comparisons.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf with DNS SANs, usable as both server and client certificate.
    pub fn leaf(&self, dns_sans: &[&str]) -> Leaf {
        let sans = dns_sans
            .iter()
            .map(|san| SanType::DnsName((*san).try_into().unwrap()))
            .collect();
        self.leaf_with(dns_sans.first().copied().unwrap_or("leaf"), sans)
    }

    /// A leaf whose only SAN is a URI (SPIFFE-style identities).
    pub fn leaf_uri(&self, uri: &str) -> Leaf {
        self.leaf_with(uri, vec![SanType::URI(uri.try_into().unwrap())])
    }

    fn leaf_with(&self, cn: &str, sans: Vec<SanType>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes one side's cert, key and CA bundle into `dir/<name>.{crt,key,ca}`.
pub fn write_files(dir: &Path, name: &str, leaf: &Leaf, ca_bundle: &str) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join(format!("{name}.ca")),
    };
    std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    std::fs::write(&files.ca, ca_bundle).unwrap();
    files
}

/// Replaces a file the way kubelet does: write elsewhere, then rename over it.
pub fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

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
        let (reporter, health) = tonic_health::server::health_reporter();
        let seen = Seen::default();
        let router = cpi_transport::server_builder().add_service(Recording {
            inner: health,
            delay,
            seen: seen.clone(),
        });
        let bound = cpi_transport::bind(listen).await.unwrap();
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
        let listen = Listen::Tls {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls,
        };
        Self::start(listen, Duration::ZERO).await
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

pub fn server_tls(files: TlsFiles, allowed: &[&str]) -> ServerTls {
    ServerTls::new(
        files,
        allowed.iter().map(|s| (*s).to_owned()).collect(),
        RELOAD,
    )
    .unwrap()
}

pub fn client_tls(files: TlsFiles) -> ClientTls {
    ClientTls::new(files, "localhost".to_owned(), RELOAD).unwrap()
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

/// Handshakes with a raw rustls client and returns the certificate the server presented.
pub async fn presented_cert(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<CertificateDer<'static>> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, conn) = stream.get_ref();
    Ok(conn.peer_certificates().unwrap()[0].clone().into_owned())
}

/// A channel over a hand-made rustls client config (for clients `ClientTls` cannot express).
pub fn raw_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let config = Arc::clone(&config);
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
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
