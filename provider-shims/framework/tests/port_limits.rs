//! The shim's ports under idle, slow and failing clients: a shim served by the framework over
//! real mutual TLS on 127.0.0.1 is held by many idle connections, a byte-by-byte handshake and a
//! flood of failed handshakes, while a legitimate client must still be served within a kubelet
//! probe's timeout (issue 8).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use cpi_proto::v1 as pb;
use cpi_transport::{ClientEndpoint, ClientTls, ConnectOptions, CpiChannel, TlsFiles};
use shim_framework::{MetricsBind, ProviderDescription, RunningShim, ServeFlags, ShimServer};
use test_pki::{Ca, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt as _;

/// The SAN of the legitimate client's certificate, the one the shim admits.
const CCM: &str = "ccm.kube-system";

/// A kubelet probe's default timeout: a legitimate call must be answered within it.
const PROBE_BUDGET: Duration = Duration::from_secs(1);

/// Idle connections held open against the gRPC port (the number issue 8 reports).
const IDLE_CONNECTIONS: usize = 1024;

/// A shim with no provider services (Provider and Health only) serving mutual TLS and its
/// metrics endpoint on 127.0.0.1, and a client certificate it admits.
struct TlsShim {
    _pki: Pki,
    client: ClientTls,
    shim: Option<RunningShim>,
    stop: Option<oneshot::Sender<()>>,
}

impl TlsShim {
    /// Starts the shim admitting client certificates of its CA carrying one of `allowed` (any
    /// when empty).
    async fn start(allowed: &[&str]) -> Self {
        let pki = Pki::new().unwrap();
        let ca = Ca::new("ca").unwrap();
        let server = pki
            .write_tls_files("server", &ca.issue(&["localhost"]).unwrap(), ca.cert_pem())
            .unwrap();
        let client = pki
            .write_tls_files("client", &ca.issue(&[CCM]).unwrap(), ca.cert_pem())
            .unwrap();
        let flags = ServeFlags {
            bind_address: "127.0.0.1:0".parse().unwrap(),
            tls_cert_file: Some(server.cert.clone()),
            tls_private_key_file: Some(server.key.clone()),
            client_ca_file: Some(server.ca.clone()),
            allowed_client_sans: allowed.iter().map(|san| (*san).to_owned()).collect(),
            metrics_bind_address: MetricsBind(Some("127.0.0.1:0".parse().unwrap())),
            ..ServeFlags::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let shim = ShimServer::builder(ProviderDescription::new("test", "0.0.1"))
            .build()
            .start(&flags, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        let client = ClientTls::new(
            TlsFiles {
                cert: client.cert,
                key: client.key,
                ca: client.ca,
            },
            "localhost".to_owned(),
            Duration::ZERO,
        )
        .unwrap();
        Self {
            _pki: pki,
            client,
            shim: Some(shim),
            stop: Some(stop),
        }
    }

    fn grpc_addr(&self) -> SocketAddr {
        self.shim.as_ref().unwrap().grpc_addr().tcp().unwrap()
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.shim.as_ref().unwrap().metrics_addr().unwrap()
    }

    /// A fresh channel (so a new connection and handshake) whose deadlines are the probe budget.
    fn channel(&self) -> CpiChannel {
        cpi_transport::connect(
            ClientEndpoint::Tls {
                uri: format!("https://{}", self.grpc_addr()),
                tls: self.client.clone(),
            },
            ConnectOptions {
                connect_timeout: PROBE_BUDGET,
                request_timeout: PROBE_BUDGET,
            },
        )
        .unwrap()
    }

    /// What the controller-manager and a gRPC probe do on a new connection: a health check and
    /// `GetProviderInfo`, both within [`PROBE_BUDGET`] from now.
    async fn probe(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let channel = self.channel();
        let calls = async {
            let health = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|status| format!("health check: {status}"))?;
            if health.into_inner().status() != ServingStatus::Serving {
                return Err("health check: not SERVING".to_owned());
            }
            let info = pb::provider_client::ProviderClient::new(channel)
                .get_provider_info(pb::GetProviderInfoRequest {})
                .await
                .map_err(|status| format!("GetProviderInfo: {status}"))?;
            assert_eq!(info.into_inner().name, "test");
            Ok(())
        };
        match tokio::time::timeout(PROBE_BUDGET, calls).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(err)) => Err(format!("{err} (after {:?})", started.elapsed())),
            Err(_) => Err(format!("no answer within {PROBE_BUDGET:?}")),
        }
    }

    /// Stops the shim and waits (bounded) until it has drained.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let shim = self.shim.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), shim.wait())
            .await
            .expect("shim did not stop within 10 s")
            .unwrap();
    }
}

/// Raises the soft open-files limit to `wanted` if the hard limit allows; returns the soft limit
/// in force afterwards.
fn raise_open_files_limit(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return current;
    }
    let target = limit.maximum.map_or(wanted, |hard| hard.min(wanted));
    let raised = Rlimit {
        current: Some(target),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => target,
        Err(_) => current,
    }
}

/// How many idle connections this process can hold: [`IDLE_CONNECTIONS`] unless the open-files
/// limit cannot be raised far enough (each one costs a descriptor on both ends, plus headroom).
fn idle_connection_budget() -> usize {
    const HEADROOM: u64 = 512;
    let wanted = 2 * IDLE_CONNECTIONS as u64 + HEADROOM;
    let limit = raise_open_files_limit(wanted);
    let affordable = usize::try_from(limit.saturating_sub(HEADROOM) / 2).unwrap_or(usize::MAX);
    if affordable < IDLE_CONNECTIONS {
        eprintln!(
            "open-files limit {limit} cannot be raised to {wanted}: using {affordable} idle \
             connections instead of {IDLE_CONNECTIONS}"
        );
    }
    affordable.min(IDLE_CONNECTIONS)
}

/// Opens `count` TCP connections to `addr` that never send a byte.
async fn idle_connections(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    idle
}

/// The start of a TLS 1.2/1.3 ClientHello record announcing 512 bytes: a server cannot tell it
/// from a real client on a slow link until the record is complete, which it never is here.
const CLIENT_HELLO_START: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, TLS 1.0 framing, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // client version TLS 1.2
];

/// Connects to `addr` and sends a ClientHello one byte every 20 ms (at most 100 bytes, so at
/// most 2 s), never completing it; stops when the server closes the connection.
async fn slow_handshake(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    tokio::spawn(async move {
        let random = (0u8..).map(|i| i.wrapping_mul(37));
        for byte in CLIENT_HELLO_START.into_iter().chain(random).take(100) {
            if stream.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Whether the server has closed `stream` (EOF or reset) within `budget`.
async fn closed_by_server(stream: &mut TcpStream, budget: Duration) -> bool {
    let mut discarded = Vec::new();
    let read_all = stream.read_to_end(&mut discarded);
    tokio::time::timeout(budget, read_all).await.is_ok()
}

#[tokio::test]
async fn idle_and_slow_clients_do_not_starve_a_legitimate_client() {
    let idle_count = idle_connection_budget();
    let s = TlsShim::start(&[CCM]).await;
    let addr = s.grpc_addr();
    s.probe().await.unwrap();

    // Accepted in order: by the time the probe's connection is accepted, all of these are
    // holding a handshake slot.
    let idle = idle_connections(addr, idle_count).await;
    let slow = slow_handshake(addr).await;

    let result = s.probe().await;
    assert!(
        result.is_ok(),
        "with {idle_count} idle connections and a slow handshake open, a legitimate client was \
         not served within {PROBE_BUDGET:?}: {}",
        result.unwrap_err()
    );
    // And again while they are all still open: the first success was no accident of timing.
    s.probe().await.unwrap();

    slow.abort();
    drop(idle);
    s.stop().await;
}

/// Log events of the current thread: level and message with fields.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(Level, String)>>>);

impl Events {
    /// Records every event of the current thread (all levels) until the guard is dropped.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        // A callsite's interest is decided once, on its first hit, from the hitting thread's
        // subscriber alone while only one dispatcher exists (tokio-rs/tracing#3611); a second
        // dispatcher that lives forever makes tracing ask every live one (see the transport's
        // test LogCapture).
        static SECOND_DISPATCHER: OnceLock<tracing::Dispatch> = OnceLock::new();
        SECOND_DISPATCHER
            .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    /// The events at `level` whose text contains `needle`.
    fn matching(&self, level: Option<Level>, needle: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, text)| level.is_none_or(|level| *l == level) && text.contains(needle))
            .map(|(l, text)| format!("{l} {text}"))
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut text = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                let _ = write!(text, "{}={value:?} ", field.name());
            },
        );
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), text));
    }
}

#[tokio::test]
async fn a_handshake_failure_flood_logs_a_bounded_number_of_warnings() {
    const FLOOD: usize = 200;
    const REFUSAL: &str = "refusing TLS connection";
    let events = Events::default();
    let _guard = events.install();
    let s = TlsShim::start(&[CCM]).await;
    let addr = s.grpc_addr();

    // What a port scanner or a plain-HTTP client does: bytes that are no TLS handshake. The
    // server closes each connection once it has refused the handshake.
    for _ in 0..FLOOD {
        let mut scan = TcpStream::connect(addr).await.unwrap();
        scan.write_all(b"GET / HTTP/1.1\r\nHost: shim\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_by_server(&mut scan, Duration::from_secs(5)).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while events.matching(None, REFUSAL).len() < FLOOD {
        assert!(
            Instant::now() < deadline,
            "only {} of {FLOOD} refusals logged at any level",
            events.matching(None, REFUSAL).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let warnings = events.matching(Some(Level::WARN), "TLS");
    assert!(
        (1..=2).contains(&warnings.len()),
        "{FLOOD} failed handshakes within seconds gave {} warnings (expected one, with the \
         rest at debug):\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    // The legitimate client is unaffected.
    s.probe().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn idle_metrics_connections_beyond_the_cap_are_closed() {
    const IDLE: usize = 100;
    let s = TlsShim::start(&[CCM]).await;
    let metrics = s.metrics_addr();
    let mut idle = idle_connections(metrics, IDLE).await;

    let started = Instant::now();
    let readyz = tokio::time::timeout(PROBE_BUDGET, async {
        let mut stream = TcpStream::connect(metrics).await.unwrap();
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    })
    .await
    .expect("/readyz not answered within the probe budget");
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
    // The connection idle the longest made room for the newer ones.
    let remaining = PROBE_BUDGET.saturating_sub(started.elapsed());
    assert!(
        closed_by_server(&mut idle[0], remaining).await,
        "{IDLE} idle connections to the metrics port are all still open"
    );
    drop(idle);
    s.stop().await;
}

#[tokio::test]
async fn an_empty_san_allow_list_is_warned_about_at_start_up() {
    let events = Events::default();
    let _guard = events.install();

    let open = TlsShim::start(&[]).await;
    let warnings = events.matching(Some(Level::WARN), "--allowed-client-sans");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("any client certificate"),
        "{warnings:?}"
    );
    open.stop().await;

    let restricted = TlsShim::start(&[CCM]).await;
    let warnings = events.matching(Some(Level::WARN), "--allowed-client-sans");
    assert_eq!(
        warnings.len(),
        1,
        "warned although SANs were given: {warnings:?}"
    );
    restricted.stop().await;
}

#[test]
fn the_metrics_port_listens_on_loopback_by_default() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeFlags,
    }
    let loopback: SocketAddr = "127.0.0.1:10271".parse().unwrap();
    let cli = Cli::try_parse_from(["shim"]).unwrap();
    assert_eq!(cli.serve.metrics_bind_address, MetricsBind(Some(loopback)));
    assert_eq!(
        ServeFlags::default().metrics_bind_address,
        MetricsBind(Some(loopback))
    );
}
