//! Unix-socket transport, default deadlines, trace propagation and TLS loading errors.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{Ca, MtlsServer, Pki, TestServer, check, tls_files};
use cpi_transport::{ClientEndpoint, ConnectOptions, Listen, ServerTls, TlsError, TlsFiles};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn unix_channel(path: &std::path::Path, request_timeout: Duration) -> cpi_transport::CpiChannel {
    cpi_transport::connect(
        ClientEndpoint::Unix {
            path: path.to_owned(),
        },
        ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn unix_socket_plaintext_round_trip() {
    let dir = common::tempdir();
    let path = dir.path().join("cpi.sock");
    // A socket file left behind by a crashed server must not prevent start-up.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = TestServer::start(Listen::Unix { path: path.clone() }, Duration::ZERO).await;
    let channel = unix_channel(&path, Duration::from_secs(3));
    check(channel.clone()).await.unwrap();
    check(channel).await.unwrap();

    // A second server on the same live socket is refused instead of hijacking it.
    let second = cpi_transport::bind(Listen::Unix { path: path.clone() }).await;
    assert!(
        matches!(second, Err(cpi_transport::ServeError::SocketInUse { .. })),
        "second bind was not refused"
    );

    server.stop().await.unwrap();
    assert!(!path.exists(), "socket file left behind after shutdown");
}

/// Parses a `grpc-timeout` header value (e.g. `300000u`).
fn grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        other => panic!("unknown grpc-timeout unit {other}"),
    }
}

#[tokio::test]
async fn default_deadline_is_applied() {
    let dir = common::tempdir();
    let path = dir.path().join("slow.sock");
    // Every call takes 1 s on the server.
    let server =
        TestServer::start(Listen::Unix { path: path.clone() }, Duration::from_secs(1)).await;
    let channel = unix_channel(&path, Duration::from_millis(200));

    let started = Instant::now();
    let err = check(channel.clone()).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_millis(900), "took {elapsed:?}");
    let timeout = server.seen.last().grpc_timeout;
    assert_eq!(
        grpc_timeout(&timeout.expect("no grpc-timeout header")),
        Duration::from_millis(200)
    );

    // A call that sets its own deadline keeps it.
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(5));
    HealthClient::new(channel).check(request).await.unwrap();
    let timeout = server.seen.last().grpc_timeout;
    assert_eq!(grpc_timeout(&timeout.unwrap()), Duration::from_secs(5));
}

fn in_memory_tracing() -> (
    SdkTracerProvider,
    InMemorySpanExporter,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(cpi_transport::telemetry::layer_for(&provider));
    let guard = tracing::subscriber::set_default(subscriber);
    (provider, exporter, guard)
}

#[tokio::test]
async fn trace_context_crosses_the_hop() {
    let (provider, exporter, _guard) = in_memory_tracing();
    let s = MtlsServer::start(&[]).await;
    let client = s.client_with_sans("client", &["ccm"]);
    let channel = common::channel(&s.server.uri(), &client);

    let ccm_span = tracing::info_span!("ccm.reconcile");
    let ccm_context = ccm_span.context().span().span_context().clone();
    assert!(ccm_context.is_valid());
    check(channel).instrument(ccm_span).await.unwrap();

    // The traceparent really travelled in the request headers ...
    let traceparent = s.server.seen.last().traceparent;
    let traceparent = traceparent.expect("no traceparent header reached the server");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", ccm_context.trace_id(), ccm_context.span_id())
    );
    // ... and the server's request span joined the caller's trace as its child.
    common::eventually("server span exported", || {
        let exporter = exporter.clone();
        async move {
            exporter
                .get_finished_spans()
                .unwrap()
                .iter()
                .any(|span| span.name == cpi_transport::trace::SERVER_SPAN_NAME)
        }
    })
    .await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let server_span = spans
        .iter()
        .find(|span| span.name == cpi_transport::trace::SERVER_SPAN_NAME)
        .unwrap();
    assert_eq!(server_span.span_context.trace_id(), ccm_context.trace_id());
    assert_eq!(server_span.parent_span_id, ccm_context.span_id());
    assert!(server_span.parent_span_is_remote);
    assert_eq!(server_span.span_kind, SpanKind::Server);
    assert!(server_span.attributes.iter().any(|kv| {
        kv.key.as_str() == "rpc.method" && kv.value.as_str() == "/grpc.health.v1.Health/Check"
    }));
}

#[test]
fn tls_errors_name_the_file_and_the_problem() {
    let pki = Pki::new().unwrap();
    let ca = Ca::new("ca").unwrap();
    let leaf = ca.issue(&["localhost"]).unwrap();
    let other = ca.issue(&["localhost"]).unwrap();
    let write = |name: &str, ca_bundle: &str| pki.write_tls_files(name, &leaf, ca_bundle).unwrap();
    let files = tls_files(&write("good", ca.cert_pem()));
    let load = |files: &TlsFiles| {
        ServerTls::new(files.clone(), Vec::new(), Duration::ZERO)
            .err()
            .map(|err| (err.to_string(), err))
    };
    assert!(load(&files).is_none());

    let missing = TlsFiles {
        cert: pki.path().join("nope.crt"),
        ..files.clone()
    };
    let (message, err) = load(&missing).unwrap();
    assert!(matches!(err, TlsError::MissingFile { .. }));
    assert!(message.contains("nope.crt"), "{message}");

    let no_cert = write("no-cert", ca.cert_pem());
    std::fs::write(&no_cert.cert, &leaf.key_pem).unwrap();
    let (message, err) = load(&tls_files(&no_cert)).unwrap();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{message}");
    assert!(message.contains("no-cert.crt"), "{message}");

    let no_key = write("no-key", ca.cert_pem());
    std::fs::write(&no_key.key, &leaf.cert_pem).unwrap();
    let (message, err) = load(&tls_files(&no_key)).unwrap();
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{message}");
    assert!(message.contains("no-key.key"), "{message}");

    let mismatch = write("mismatch", ca.cert_pem());
    std::fs::write(&mismatch.key, &other.key_pem).unwrap();
    let (message, err) = load(&tls_files(&mismatch)).unwrap();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{message}");
    assert!(
        message.contains("mismatch.key") && message.contains("mismatch.crt"),
        "{message}"
    );

    // test-pki names the CA bundle `<prefix>-ca.crt`.
    let empty_ca = write("empty-ca", "");
    let (message, err) = load(&tls_files(&empty_ca)).unwrap();
    assert!(matches!(err, TlsError::EmptyCaBundle { .. }), "{message}");
    assert!(message.contains("empty-ca-ca.crt"), "{message}");

    let half = write("half", ca.cert_pem());
    std::fs::write(&half.cert, &leaf.cert_pem[..leaf.cert_pem.len() / 2]).unwrap();
    let (message, err) = load(&tls_files(&half)).unwrap();
    assert!(matches!(err, TlsError::InvalidPem { .. }), "{message}");
    assert!(message.contains("half.crt"), "{message}");

    let bad_name = cpi_transport::ClientTls::new(files, "not a name!".into(), Duration::ZERO);
    assert!(matches!(bad_name, Err(TlsError::InvalidServerName { .. })));
}

#[tokio::test]
async fn connect_rejects_plaintext_tcp_uri() {
    let pki = Pki::new().unwrap();
    let ca = Ca::new("ca").unwrap();
    let client = common::client_tls(
        &pki.write_tls_files("client", &ca.issue(&["ccm"]).unwrap(), ca.cert_pem())
            .unwrap(),
    );
    let result = cpi_transport::connect(
        ClientEndpoint::Tls {
            uri: "http://127.0.0.1:1".into(),
            tls: client,
        },
        ConnectOptions::default(),
    );
    assert!(matches!(
        result,
        Err(cpi_transport::ConnectError::NotHttps { .. })
    ));
}
