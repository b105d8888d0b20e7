//! The accept limits over real sockets on 127.0.0.1: the oldest handshake makes room at the
//! handshake cap, the idlest connection at the connection cap, slow handshakes and idle
//! connections are closed, a slow HTTP/1.1 header sender is disconnected, and warnings a client
//! can provoke at will are rate limited (issue 8).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use common::{LogCapture, MtlsServer, channel, check, closed_within, eventually, tls_connect};
use cpi_transport::{AcceptLimits, TrackedConnection};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The SAN the legitimate client's certificate carries.
const CCM: &str = "ccm.kube-system";

/// A kubelet probe's default timeout: a legitimate call must be answered within it.
const PROBE_BUDGET: Duration = Duration::from_secs(1);

/// A legitimate health check on a fresh connection, answered within [`PROBE_BUDGET`].
async fn probe(s: &MtlsServer) {
    let client = s.client_with_sans("client", &[CCM]);
    let started = Instant::now();
    tokio::time::timeout(PROBE_BUDGET, check(channel(&s.server.uri(), &client)))
        .await
        .unwrap_or_else(|_| panic!("no answer within {PROBE_BUDGET:?}"))
        .unwrap_or_else(|status| panic!("refused after {:?}: {status}", started.elapsed()));
}

#[tokio::test]
async fn the_oldest_handshake_makes_room_for_a_new_connection() {
    let limits = AcceptLimits {
        max_handshakes: 4,
        ..AcceptLimits::default()
    };
    let s = MtlsServer::start_limited(&[CCM], limits).await;
    let addr = s.server.addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }

    probe(&s).await;
    // The first idle connections were closed as newer ones arrived.
    assert!(closed_within(&mut idle[0], PROBE_BUDGET).await);
}

#[tokio::test]
async fn a_handshake_not_completed_in_time_is_closed() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let limits = AcceptLimits {
        handshake_timeout: Duration::from_millis(200),
        ..AcceptLimits::default()
    };
    let s = MtlsServer::start_limited(&[CCM], limits).await;
    let mut silent = TcpStream::connect(s.server.addr.unwrap()).await.unwrap();

    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(2)).await);
    assert!(started.elapsed() >= Duration::from_millis(150));
    eventually("the refusal is logged", || {
        let logs = logs.clone();
        async move {
            logs.contents().lines().any(|line| {
                line.contains("WARN") && line.contains("handshake not completed within 200ms")
            })
        }
    })
    .await;
}

/// An HTTP/2 connection over TLS that has exchanged SETTINGS with the server (so the server has
/// admitted and is serving it) and then stays silent.
async fn idle_h2_connection(
    s: &MtlsServer,
    name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client = s.client_with_sans(name, &[CCM]);
    let mut tls = tls_connect(s.server.addr.unwrap(), client.current_config())
        .await
        .unwrap();
    // The client connection preface, then an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut settings = [0u8; 9];
    tokio::time::timeout(PROBE_BUDGET, tls.read_exact(&mut settings))
        .await
        .expect("the server sent no SETTINGS")
        .unwrap();
    tls
}

#[tokio::test]
async fn at_the_connection_cap_the_idlest_connection_makes_room() {
    let limits = AcceptLimits {
        max_connections: 1,
        ..AcceptLimits::default()
    };
    let s = MtlsServer::start_limited(&[CCM], limits).await;
    let mut idle = idle_h2_connection(&s, "idle").await;

    probe(&s).await;
    assert!(
        closed_within(&mut idle, PROBE_BUDGET).await,
        "the idle connection is still open beyond the cap"
    );
}

/// Accepts plain TCP under `limits`; returns the address and the server side's connections.
async fn plain_server(
    limits: AcceptLimits,
) -> (
    std::net::SocketAddr,
    impl futures::Stream<Item = TrackedConnection<TcpStream>> + Unpin,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        Box::pin(cpi_transport::tcp_incoming(listener, limits)),
    )
}

#[tokio::test]
async fn the_idlest_connection_is_closed_oldest_first() {
    let limits = AcceptLimits {
        max_connections: 2,
        ..AcceptLimits::default()
    };
    let (addr, mut incoming) = plain_server(limits).await;
    let mut clients = Vec::new();
    let mut served = Vec::new();
    for _ in 0..2 {
        clients.push(TcpStream::connect(addr).await.unwrap());
        served.push(incoming.next().await.unwrap());
    }
    // The second one carries traffic, so the first is the idlest even at the same millisecond.
    clients[1].write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    served[1].read_exact(&mut buf).await.unwrap();

    clients.push(TcpStream::connect(addr).await.unwrap());
    served.push(incoming.next().await.unwrap());

    let err = tokio::time::timeout(PROBE_BUDGET, served[0].read(&mut buf))
        .await
        .expect("the idlest connection was not closed")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    clients[1].write_all(b"pong").await.unwrap();
    served[1].read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let limits = AcceptLimits {
        idle_timeout: Some(Duration::from_millis(200)),
        ..AcceptLimits::default()
    };
    let (addr, mut incoming) = plain_server(limits).await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    let mut idle = incoming.next().await.unwrap();

    let started = Instant::now();
    let mut buf = [0u8; 1];
    let err = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("idle connection not closed within 2 s")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(150));

    // A byte every 50 ms for twice the idle timeout keeps a connection open.
    let mut busy_client = TcpStream::connect(addr).await.unwrap();
    let mut busy = incoming.next().await.unwrap();
    for _ in 0..8 {
        busy_client.write_all(b"x").await.unwrap();
        busy.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_slow_http_header_sender_is_disconnected() {
    const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(300);
    let (addr, incoming) = plain_server(AcceptLimits::default()).await;
    let service = tower::service_fn(|_: http::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(http::Response::new("ok\n".to_owned()))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cpi_transport::serve_http1(
        incoming,
        service,
        HEADER_READ_TIMEOUT,
        async {
            let _ = stopped.await;
        },
    ));

    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .cycle()
        .take(100)
    {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut slow, Duration::from_millis(50)).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a client trickling its headers was never disconnected"
    );
    let elapsed = started.elapsed();
    assert!(
        (HEADER_READ_TIMEOUT..Duration::from_secs(2)).contains(&elapsed),
        "{elapsed:?}"
    );

    // A normal request is served meanwhile.
    let mut normal = TcpStream::connect(addr).await.unwrap();
    normal
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PROBE_BUDGET, normal.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("serve_http1 did not return after shutdown")
        .unwrap();
}

#[tokio::test]
async fn refused_certificates_are_warned_about_once_per_interval() {
    const ATTEMPTS: usize = 20;
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = MtlsServer::start(&[CCM]).await;
    let intruder = s.client_with_sans("intruder", &["intruder.default"]);

    for _ in 0..ATTEMPTS {
        assert!(check(channel(&s.server.uri(), &intruder)).await.is_err());
    }
    probe(&s).await;

    let logs = logs.contents();
    let warnings: Vec<&str> = logs.lines().filter(|line| line.contains("WARN")).collect();
    let san_warnings = warnings
        .iter()
        .filter(|line| line.contains("not in allow-list"))
        .count();
    let handshake_warnings = warnings
        .iter()
        .filter(|line| line.contains("refusing TLS connection"))
        .count();
    assert_eq!(
        (san_warnings, handshake_warnings),
        (1, 1),
        "{ATTEMPTS} refused clients gave these warnings:\n{}",
        warnings.join("\n")
    );
}
