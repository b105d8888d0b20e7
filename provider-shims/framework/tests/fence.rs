//! The fence guard over a real Unix socket (issue 8): a fence is only what its caller claims, so
//! the guard must not let one absurd or misdirected claim lock the real leader out, and a Lease
//! that was deleted and recreated (new UID, transitions back to 0) must not lock out every
//! future leader.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::routes_client::RoutesClient;
use cpi_transport::{ClientEndpoint, ConnectOptions, CpiChannel};
use shim_framework::{ProviderDescription, Routes, RunningShim, ServeFlags, ShimServer};
use tokio::sync::oneshot;
use tonic::Code;

/// The lease the framework fences on by default.
const LEASE: &str = "kube-system/cloud-controller-manager";
/// UIDs of two generations of that Lease (deleted and recreated in between).
const FIRST_UID: &str = "2a7c0a8e-0000-4000-8000-000000000001";
const SECOND_UID: &str = "2a7c0a8e-0000-4000-8000-000000000002";

/// Routes that always succeed: a call that passes the fence succeeds.
struct AcceptingRoutes;

#[tonic::async_trait]
impl Routes for AcceptingRoutes {
    async fn list_routes(
        &self,
        _cluster_name: String,
        _page_size: u32,
        _page_token: String,
    ) -> Result<pb::ListRoutesResponse, CpiError> {
        Ok(pb::ListRoutesResponse::default())
    }

    async fn create_route(
        &self,
        _cluster_name: String,
        _name_hint: String,
        _route: pb::Route,
    ) -> Result<pb::CreateRouteResponse, CpiError> {
        Ok(pb::CreateRouteResponse {})
    }

    async fn delete_route(
        &self,
        _cluster_name: String,
        _route: pb::Route,
    ) -> Result<pb::DeleteRouteResponse, CpiError> {
        Ok(pb::DeleteRouteResponse {})
    }
}

/// A shim serving [`AcceptingRoutes`] on a socket in a temp dir, with `flags` on top of the
/// Unix-socket defaults; stops when dropped.
struct Shim {
    socket: PathBuf,
    _running: RunningShim,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Shim {
    async fn start(configure: impl FnOnce(&mut ServeFlags)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim.sock");
        let mut flags = ServeFlags::unix(&socket);
        flags.shutdown_grace_period = Duration::from_millis(100);
        configure(&mut flags);
        let (stop, stopped) = oneshot::channel::<()>();
        let running = ShimServer::builder(ProviderDescription::new("test", "0.0.1"))
            .routes(AcceptingRoutes)
            .build()
            .start(&flags, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        Self {
            socket,
            _running: running,
            _stop: stop,
            _dir: dir,
        }
    }

    /// What the shim's GetProviderInfo answers.
    async fn info(&self) -> pb::ProviderInfo {
        let endpoint = ClientEndpoint::Unix {
            path: self.socket.clone(),
        };
        let channel = cpi_transport::connect(endpoint, ConnectOptions::default()).unwrap();
        pb::provider_client::ProviderClient::new(channel)
            .get_provider_info(pb::GetProviderInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    fn routes(&self) -> RoutesClient<CpiChannel> {
        let endpoint = ClientEndpoint::Unix {
            path: self.socket.clone(),
        };
        RoutesClient::new(cpi_transport::connect(endpoint, ConnectOptions::default()).unwrap())
    }
}

fn fence(lease: &str, uid: &str, transitions: i64, holder: &str) -> pb::Fence {
    pb::Fence {
        lease: lease.into(),
        lease_uid: uid.into(),
        holder_identity: holder.into(),
        lease_transitions: transitions,
    }
}

/// A valid CreateRoute request carrying `fence`.
fn route_request(fence: Option<pb::Fence>) -> pb::CreateRouteRequest {
    pb::CreateRouteRequest {
        cluster_name: "c1".into(),
        name_hint: "n1".into(),
        route: Some(pb::Route {
            target_node: "n1".into(),
            destination_cidr: "10.244.1.0/24".into(),
            ..Default::default()
        }),
        fence,
    }
}

/// One mutating call (CreateRoute) carrying `fence`.
async fn mutate(routes: &mut RoutesClient<CpiChannel>, fence: pb::Fence) -> Result<(), CpiError> {
    routes
        .create_route(route_request(Some(fence)))
        .await
        .map(|_| ())
        .map_err(|status| CpiError::from_status(&status))
}

/// The message of `result`, which must be INVALID_ARGUMENT on `field`.
fn invalid_message(result: Result<(), CpiError>, field: &str) -> String {
    let err = result.expect_err("must be refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    match err {
        CpiError::InvalidObject {
            field: got,
            message,
        } if got == field => message,
        other => panic!("expected INVALID_ARGUMENT on {field}, got {other:?}"),
    }
}

#[tokio::test]
async fn max_transitions_are_refused_and_do_not_lock_out_the_leader() {
    let shim = Shim::start(|_| {}).await;
    let mut routes = shim.routes();
    let leader = fence(LEASE, FIRST_UID, 3, "ccm-a");
    mutate(&mut routes, leader.clone()).await.expect("leader");

    // A client claiming the real lease at i64::MAX, under its UID or under another one.
    for uid in [FIRST_UID, SECOND_UID] {
        let forged = fence(LEASE, uid, i64::MAX, "rogue");
        let message = invalid_message(mutate(&mut routes, forged).await, "fence.lease_transitions");
        assert!(message.contains(&i64::MAX.to_string()), "{message}");
        // ... and the real leader's next call still passes.
        mutate(&mut routes, leader.clone())
            .await
            .expect("the leader is not locked out by a forged fence");
    }
}

#[tokio::test]
async fn a_fence_for_another_lease_is_refused_naming_the_expected_one() {
    let shim = Shim::start(|_| {}).await;
    let mut routes = shim.routes();
    for other in [
        "kube-system/someone-else",
        "default/cloud-controller-manager",
    ] {
        let refused = mutate(&mut routes, fence(other, FIRST_UID, 0, "ccm-x")).await;
        let message = invalid_message(refused, "fence.lease");
        assert!(message.contains(LEASE), "{message}");
        assert!(message.contains(other), "{message}");
        assert!(message.contains("--fence-lease"), "{message}");
    }
    // Nothing was recorded for them: the real leader starts from scratch at any low term.
    mutate(&mut routes, fence(LEASE, FIRST_UID, 1, "ccm-a"))
        .await
        .expect("the real lease is accepted");
}

#[tokio::test]
async fn a_recreated_lease_is_a_new_generation() {
    let shim = Shim::start(|_| {}).await;
    let mut routes = shim.routes();
    mutate(&mut routes, fence(LEASE, FIRST_UID, 5, "ccm-a"))
        .await
        .expect("leader of the first Lease");
    let deposed = mutate(&mut routes, fence(LEASE, FIRST_UID, 4, "ccm-b")).await;
    assert!(
        matches!(deposed, Err(CpiError::StaleLeader(_))),
        "{deposed:?}"
    );

    // The Lease is deleted and created again: new UID, transitions start over at 0.
    mutate(&mut routes, fence(LEASE, SECOND_UID, 0, "ccm-c"))
        .await
        .expect("the first leader of the recreated Lease is accepted");
    mutate(&mut routes, fence(LEASE, SECOND_UID, 0, "ccm-c"))
        .await
        .expect("and keeps being accepted");
    // Within the new generation fencing works as before.
    mutate(&mut routes, fence(LEASE, SECOND_UID, 1, "ccm-d"))
        .await
        .expect("its successor");
    let deposed = mutate(&mut routes, fence(LEASE, SECOND_UID, 0, "ccm-c")).await;
    assert!(
        matches!(deposed, Err(CpiError::StaleLeader(_))),
        "{deposed:?}"
    );
}

#[tokio::test]
async fn fence_lease_flag_pins_another_lease() {
    let shim = Shim::start(|flags| {
        flags.fence_lease = "infra/my-ccm".parse().unwrap();
    })
    .await;
    let mut routes = shim.routes();
    mutate(&mut routes, fence("infra/my-ccm", FIRST_UID, 2, "ccm-a"))
        .await
        .expect("the pinned lease");
    let refused = mutate(&mut routes, fence(LEASE, FIRST_UID, 2, "ccm-a")).await;
    let message = invalid_message(refused, "fence.lease");
    assert!(message.contains("infra/my-ccm"), "{message}");
}

#[tokio::test]
async fn provider_info_names_the_fenced_lease_so_callers_can_check_theirs() {
    let default = Shim::start(|_| {}).await;
    assert_eq!(default.info().await.fence_lease, LEASE);
    let pinned = Shim::start(|flags| {
        flags.fence_lease = "infra/my-ccm".parse().unwrap();
    })
    .await;
    assert_eq!(pinned.info().await.fence_lease, "infra/my-ccm");
    let off = Shim::start(|flags| flags.fence_lease = "none".into()).await;
    assert_eq!(off.info().await.fence_lease, "none");
    // Fencing off: a mutating call without a fence goes through.
    let mut routes = off.routes();
    let unfenced = routes.create_route(route_request(None)).await;
    assert!(unfenced.is_ok(), "{unfenced:?}");
    let mut fenced_routes = default.routes();
    let refused = fenced_routes.create_route(route_request(None)).await;
    assert!(refused.is_err(), "a fenced shim requires the fence");
}
