//! Unix-socket hardening: the socket file is owner-only and peers are checked by uid.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use cpi_transport::{ClientEndpoint, ConnectOptions, Listen, UNIX_SOCKET_MODE, UnixPeers};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Binds a Unix socket at `path`, serves the health service on it accepting `peers`, and
/// returns the shutdown trigger and the serving task.
async fn serve_health(
    path: &Path,
    peers: Option<UnixPeers>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), cpi_transport::ServeError>>,
) {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = cpi_transport::server_builder().add_service(health);
    let mut bound = cpi_transport::bind(Listen::Unix {
        path: path.to_owned(),
    })
    .await
    .unwrap();
    if let Some(peers) = peers {
        bound = bound.with_unix_peers(peers);
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(router, async {
        let _ = rx.await;
    }));
    (tx, task)
}

async fn health_check(path: &Path) -> Result<(), tonic::Status> {
    let channel = cpi_transport::connect(
        ClientEndpoint::Unix {
            path: path.to_owned(),
        },
        ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
        },
    )
    .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
}

fn own_uid(dir: &Path) -> u32 {
    // The test's temp directory was created by this process, so it is owned by our uid.
    std::fs::metadata(dir).unwrap().uid()
}

#[tokio::test]
async fn socket_file_is_owner_only_after_bind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpi.sock");
    let bound = cpi_transport::bind(Listen::Unix { path: path.clone() })
        .await
        .unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert_eq!(UNIX_SOCKET_MODE, 0o600);
    drop(bound);
}

#[test]
fn default_peers_are_own_uid_and_root_only() {
    let peers = UnixPeers::default();
    assert!(peers.allows(1000, 1000));
    assert!(peers.allows(0, 1000));
    assert!(!peers.allows(1001, 1000));
    assert!(!peers.allows(65534, 0));

    let listed = UnixPeers::Uids(vec![42]);
    assert!(listed.allows(42, 1000));
    assert!(
        !listed.allows(1000, 1000),
        "own uid allowed though not listed"
    );
    assert!(!listed.allows(0, 1000), "root allowed though not listed");
}

#[tokio::test]
async fn peer_outside_the_allow_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let me = own_uid(dir.path());
    let other = if me == 4242 { 4243 } else { 4242 };

    // An allow-list without our uid: our own connection must be closed unanswered.
    let path = dir.path().join("refusing.sock");
    let (stop, task) = serve_health(&path, Some(UnixPeers::Uids(vec![other]))).await;
    let err = health_check(&path).await.unwrap_err();
    // Closed before HTTP/2 starts: a transport error (which code depends on how far the
    // client got when the close arrived: refused on connect, reset on a write, or the
    // connection seen closed while the call waited), never an answer.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(err.metadata().is_empty(), "answered: {err:?}");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The same client is served when its uid is listed, and by default (same uid).
    let path = dir.path().join("listed.sock");
    let (stop, task) = serve_health(&path, Some(UnixPeers::Uids(vec![other, me]))).await;
    health_check(&path).await.unwrap();
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    let path = dir.path().join("default.sock");
    let (stop, task) = serve_health(&path, None).await;
    health_check(&path).await.unwrap();
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
