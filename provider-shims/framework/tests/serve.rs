//! The framework served over a real Unix socket and called with the generated clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::instances_v2_client::InstancesV2Client;
use cpi_proto::v1::load_balancer_client::LoadBalancerClient;
use cpi_transport::{ClientEndpoint, ConnectOptions, CpiChannel};
use shim_framework::{
    InstancesV2, LoadBalancer, MetricsBind, ProviderDescription, RunningShim, ServeFlags,
    ShimServer, node_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// A provider whose answers depend on the node name, counting the calls that reach it.
#[derive(Clone, Default)]
struct TestProvider {
    calls: Arc<AtomicUsize>,
    /// Notified when a call for the node "slow" has reached the provider.
    slow_started: Arc<Notify>,
}

#[tonic::async_trait]
impl InstancesV2 for TestProvider {
    async fn instance_exists(
        &self,
        node: pb::Node,
        _consistency: pb::Consistency,
    ) -> Result<pb::InstanceExistsResponse, CpiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if node_name(&node) == "slow" {
            self.slow_started.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(pb::InstanceExistsResponse {
            existence: pb::Existence::Exists as i32,
            power_state: pb::PowerState::Running as i32,
            detail: String::new(),
        })
    }

    async fn instance_shutdown(
        &self,
        _node: pb::Node,
        _consistency: pb::Consistency,
    ) -> Result<pb::InstanceShutdownResponse, CpiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(pb::InstanceShutdownResponse::default())
    }

    async fn instance_metadata(
        &self,
        node: pb::Node,
    ) -> Result<pb::InstanceMetadataResponse, CpiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match node_name(&node) {
            "gone" => Err(CpiError::InstanceNotFound("gone".into())),
            "busy" => Err(CpiError::RetryAfter {
                message: "still booting".into(),
                delay: Duration::from_secs(7),
            }),
            _ => Ok(pb::InstanceMetadataResponse::default()),
        }
    }
}

#[tonic::async_trait]
impl LoadBalancer for TestProvider {
    async fn get_load_balancer(
        &self,
        _cluster_name: String,
        _service: pb::Service,
    ) -> Result<pb::GetLoadBalancerResponse, CpiError> {
        Ok(pb::GetLoadBalancerResponse::default())
    }

    async fn get_load_balancer_name(
        &self,
        _cluster_name: String,
        service: pb::Service,
    ) -> Result<pb::GetLoadBalancerNameResponse, CpiError> {
        let name = service.metadata.map(|m| m.name).unwrap_or_default();
        Ok(pb::GetLoadBalancerNameResponse { name })
    }

    async fn ensure_load_balancer(
        &self,
        _cluster_name: String,
        _service: pb::Service,
        _nodes: Arc<[pb::Node]>,
        _allow_replacement: bool,
    ) -> Result<pb::EnsureLoadBalancerResponse, CpiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(pb::EnsureLoadBalancerResponse::default())
    }

    async fn update_load_balancer(
        &self,
        _cluster_name: String,
        _service: pb::Service,
        _nodes: Arc<[pb::Node]>,
    ) -> Result<pb::UpdateLoadBalancerResponse, CpiError> {
        Ok(pb::UpdateLoadBalancerResponse {})
    }

    async fn ensure_load_balancer_deleted(
        &self,
        _cluster_name: String,
        _service: pb::Service,
    ) -> Result<pb::EnsureLoadBalancerDeletedResponse, CpiError> {
        Ok(pb::EnsureLoadBalancerDeletedResponse {})
    }
}

/// A shim serving `TestProvider` (InstancesV2 + LoadBalancer) on a socket in a temp dir.
struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    provider: TestProvider,
    shim: RunningShim,
    stop: Option<oneshot::Sender<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|flags| flags).await
    }

    async fn start_with(configure: impl FnOnce(ServeFlags) -> ServeFlags) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim.sock");
        let provider = TestProvider::default();
        let server = ShimServer::builder(ProviderDescription::new("test", "0.0.1"))
            .instances_v2(provider.clone())
            .load_balancer(provider.clone())
            .build();
        let (stop, stopped) = oneshot::channel::<()>();
        let flags = configure(ServeFlags::unix(&socket));
        let shim = server
            .start(&flags, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        Self {
            _dir: dir,
            socket,
            provider,
            shim,
            stop: Some(stop),
        }
    }

    fn channel(&self) -> CpiChannel {
        cpi_transport::connect(
            ClientEndpoint::Unix {
                path: self.socket.clone(),
            },
            ConnectOptions::default(),
        )
        .unwrap()
    }

    fn calls(&self) -> usize {
        self.provider.calls.load(Ordering::SeqCst)
    }

    /// Triggers shutdown and waits (bounded) for the shim to stop.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.shim.wait())
            .await
            .expect("shim did not stop")
            .unwrap();
    }
}

fn node(name: &str) -> pb::Node {
    pb::Node {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service() -> pb::Service {
    pb::Service {
        metadata: Some(pb::ObjectMeta {
            name: "web".into(),
            namespace: "default".into(),
            uid: "0000-1111".into(),
            ..Default::default()
        }),
        r#type: "LoadBalancer".into(),
        ..Default::default()
    }
}

fn fence(transitions: i64, holder: &str) -> Option<pb::Fence> {
    Some(pb::Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: holder.into(),
        lease_transitions: transitions,
        ..Default::default()
    })
}

async fn ensure(
    client: &mut LoadBalancerClient<CpiChannel>,
    fence: Option<pb::Fence>,
) -> Result<(), CpiError> {
    client
        .ensure_load_balancer(pb::EnsureLoadBalancerRequest {
            cluster_name: "c1".into(),
            service: Some(service()),
            nodes: vec![node("n1")],
            fence,
            allow_replacement: false,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|status| CpiError::from_status(&status))
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    (status, response)
}

fn invalid_field(err: CpiError) -> String {
    match err {
        CpiError::InvalidObject { field, .. } => field,
        other => panic!("expected InvalidObject, got {other:?}"),
    }
}

#[tokio::test]
async fn provider_info_lists_registered_capabilities() {
    let h = Harness::start().await;
    let mut client = pb::provider_client::ProviderClient::new(h.channel());
    let info = client
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "test");
    assert_eq!(info.shim_version, "0.0.1");
    assert_eq!(
        info.protocol_version,
        pb::ProtocolVersion::ProtocolVersion1 as i32
    );
    assert_eq!(info.provider_id_prefixes, vec!["test://".to_string()]);
    assert_eq!(
        info.capabilities,
        vec![
            pb::Capability::InstancesV2 as i32,
            pb::Capability::LoadBalancer as i32,
            pb::Capability::LoadBalancerNodeSets as i32
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn unregistered_service_answers_unimplemented() {
    let h = Harness::start().await;
    let mut zones = pb::zones_client::ZonesClient::new(h.channel());
    let status = zones.get_zone(pb::GetZoneRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::NotImplemented(_)
    ));
    h.stop().await;
}

#[tokio::test]
async fn missing_node_is_invalid_argument() {
    let h = Harness::start().await;
    let mut client = InstancesV2Client::new(h.channel());
    let cases = [
        (None, "node"),
        (Some(pb::Node::default()), "node.metadata"),
        (Some(node("")), "node.metadata.name"),
    ];
    for (n, field) in cases {
        let status = client
            .instance_exists(pb::InstanceExistsRequest {
                node: n,
                consistency: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert_eq!(invalid_field(CpiError::from_status(&status)), field);
    }
    // A backend node without a name is named by its index.
    let mut lb = LoadBalancerClient::new(h.channel());
    let status = lb
        .update_load_balancer(pb::UpdateLoadBalancerRequest {
            cluster_name: "c1".into(),
            service: Some(service()),
            nodes: vec![node("n1"), node("")],
            fence: fence(1, "a"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        invalid_field(CpiError::from_status(&status)),
        "nodes[1].metadata.name"
    );
    assert_eq!(h.calls(), 0, "invalid requests must not reach the provider");
    h.stop().await;
}

#[tokio::test]
async fn foreign_provider_id_is_not_owned() {
    let h = Harness::start().await;
    let mut client = InstancesV2Client::new(h.channel());
    let mut foreign = node("n1");
    foreign.provider_id = Some("aws:///eu-west-1a/i-1".into());
    let status = client
        .instance_exists(pb::InstanceExistsRequest {
            node: Some(foreign),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::NotOwned(_)
    ));
    let mut ours = node("n1");
    ours.provider_id = Some("test://i-1".into());
    client
        .instance_exists(pb::InstanceExistsRequest {
            node: Some(ours),
            consistency: 0,
        })
        .await
        .unwrap();
    assert_eq!(h.calls(), 1);
    h.stop().await;
}

#[tokio::test]
async fn stale_fence_is_rejected() {
    let h = Harness::start().await;
    let mut lb = LoadBalancerClient::new(h.channel());
    ensure(&mut lb, fence(5, "ccm-b")).await.unwrap();
    let older = ensure(&mut lb, fence(4, "ccm-a")).await.unwrap_err();
    assert!(matches!(older, CpiError::StaleLeader(_)), "{older:?}");
    assert_eq!(older.code(), Code::FailedPrecondition);
    // Same generation, different holder: two leaders cannot share one generation.
    let impostor = ensure(&mut lb, fence(5, "ccm-a")).await.unwrap_err();
    assert!(matches!(impostor, CpiError::StaleLeader(_)), "{impostor:?}");
    assert_eq!(h.calls(), 1, "only the accepted call reached the provider");
    h.stop().await;
}

#[tokio::test]
async fn newer_fence_is_accepted_and_raises_the_mark() {
    let h = Harness::start().await;
    let mut lb = LoadBalancerClient::new(h.channel());
    ensure(&mut lb, fence(1, "ccm-a")).await.unwrap();
    ensure(&mut lb, fence(1, "ccm-a")).await.unwrap();
    ensure(&mut lb, fence(2, "ccm-b")).await.unwrap();
    // The mark is now 2: the previous leader is refused on every mutating call.
    let err = ensure(&mut lb, fence(1, "ccm-a")).await.unwrap_err();
    assert!(matches!(err, CpiError::StaleLeader(_)), "{err:?}");
    let status = lb
        .ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
            cluster_name: "c1".into(),
            service: Some(service()),
            fence: fence(1, "ccm-a"),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::StaleLeader(_)
    ));
    assert_eq!(h.calls(), 3);
    h.stop().await;
}

#[tokio::test]
async fn missing_fence_is_rejected() {
    let h = Harness::start().await;
    let mut lb = LoadBalancerClient::new(h.channel());
    let err = ensure(&mut lb, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(err), "fence");
    let status = lb
        .ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
            cluster_name: "c1".into(),
            service: Some(service()),
            fence: None,
        })
        .await
        .unwrap_err();
    assert_eq!(invalid_field(CpiError::from_status(&status)), "fence");
    // Read-only calls need no fence.
    lb.get_load_balancer(pb::LoadBalancerRequest {
        cluster_name: "c1".into(),
        service: Some(service()),
    })
    .await
    .unwrap();
    assert_eq!(h.calls(), 0);
    h.stop().await;
}

async fn check(client: &mut HealthClient<CpiChannel>, service: &str) -> Result<i32, Code> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let h = Harness::start_with(|mut flags| {
        flags.shutdown_grace_period = Duration::from_secs(2);
        flags
    })
    .await;
    let mut health = HealthClient::new(h.channel());
    let serving = ServingStatus::Serving as i32;
    assert_eq!(check(&mut health, "").await, Ok(serving));
    assert_eq!(
        check(&mut health, "cloudprovider.v1.InstancesV2").await,
        Ok(serving)
    );
    assert_eq!(
        check(&mut health, "cloudprovider.v1.LoadBalancer").await,
        Ok(serving)
    );
    assert_eq!(
        check(&mut health, "cloudprovider.v1.Provider").await,
        Ok(serving)
    );
    assert_eq!(
        check(&mut health, "cloudprovider.v1.Zones").await,
        Err(Code::NotFound)
    );

    let mut watch = health
        .watch(HealthCheckRequest {
            service: "cloudprovider.v1.InstancesV2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, serving);

    let mut h = h;
    let _ = h.stop.take().unwrap().send(());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no health update after shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(10), h.shim.wait())
        .await
        .expect("shim did not stop within the grace period")
        .unwrap();
}

#[tokio::test]
async fn in_flight_call_completes_during_drain() {
    let mut h = Harness::start().await;
    let mut client = InstancesV2Client::new(h.channel());
    // Establish the connection first so the slow call is in flight when shutdown begins.
    client
        .instance_shutdown(pb::InstanceShutdownRequest {
            node: Some(node("n1")),
            consistency: 0,
        })
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        client
            .instance_exists(pb::InstanceExistsRequest {
                node: Some(node("slow")),
                consistency: 0,
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), h.provider.slow_started.notified())
        .await
        .expect("the slow call never reached the provider");
    let _ = h.stop.take().unwrap().send(());
    let answer = call.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.existence, pb::Existence::Exists as i32);
    h.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_code() {
    let h = Harness::start_with(|mut flags| {
        flags.metrics_bind_address = MetricsBind(Some("127.0.0.1:0".parse().unwrap()));
        flags
    })
    .await;
    let addr = h.shim.metrics_addr().unwrap();
    let mut client = InstancesV2Client::new(h.channel());
    for _ in 0..2 {
        client
            .instance_exists(pb::InstanceExistsRequest {
                node: Some(node("n1")),
                consistency: 0,
            })
            .await
            .unwrap();
    }
    client
        .instance_exists(pb::InstanceExistsRequest {
            node: None,
            consistency: 0,
        })
        .await
        .unwrap_err();
    let mut lb = LoadBalancerClient::new(h.channel());
    ensure(&mut lb, fence(3, "b")).await.unwrap();
    ensure(&mut lb, fence(2, "a")).await.unwrap_err();

    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"cpi_shim_requests_total{method="InstancesV2/InstanceExists",code="OK"} 2"#,
        r#"cpi_shim_requests_total{method="InstancesV2/InstanceExists",code="INVALID_ARGUMENT"} 1"#,
        r#"cpi_shim_requests_total{method="LoadBalancer/EnsureLoadBalancer",code="FAILED_PRECONDITION"} 1"#,
        r#"cpi_shim_request_duration_seconds_count{method="InstancesV2/InstanceExists"} 3"#,
        "cpi_shim_stale_leader_rejections_total 1",
        r#"cpi_shim_info{provider="test",version="0.0.1"} 1"#,
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    for probe in ["/healthz", "/livez", "/readyz"] {
        assert_eq!(http_get(addr, probe).await.0, 200, "{probe}");
    }
    h.stop().await;
}

#[tokio::test]
async fn cpi_error_classes_reach_the_client() {
    let h = Harness::start().await;
    let mut client = InstancesV2Client::new(h.channel());
    let cases = [
        ("gone", CpiError::InstanceNotFound("gone".into())),
        (
            "busy",
            CpiError::RetryAfter {
                message: "still booting".into(),
                delay: Duration::from_secs(7),
            },
        ),
    ];
    for (name, expected) in cases {
        let status = client
            .instance_metadata(pb::InstanceMetadataRequest {
                node: Some(node(name)),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), expected.code());
        assert_eq!(CpiError::from_status(&status), expected);
    }
    h.stop().await;
}

#[tokio::test]
async fn missing_tls_fails_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = ShimServer::builder(ProviderDescription::new("test", "0"))
        .instances_v2(TestProvider::default())
        .build();
    let flags = ServeFlags {
        bind_address: "127.0.0.1:0".parse().unwrap(),
        tls_cert_file: Some(dir.path().join("cert.pem")),
        ..ServeFlags::default()
    };
    let err = server
        .start(&flags, std::future::pending())
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("--tls-private-key-file"), "{msg}");
    assert!(msg.contains("--client-ca-file"), "{msg}");
}
