//! The local shim's load balancers, driven through its real gRPC server (Unix socket, generated
//! clients) with real TCP and UDP traffic on 127.x addresses. Each test has its own pool /24
//! and its own backend /24, so they run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod lb_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::load_balancer_client::LoadBalancerClient;
use cpi_transport::{ClientEndpoint, ConnectOptions, CpiChannel};
use lb_support::*;
use local_shim::lb::{POOL_ANNOTATION, PORT_ERROR_SCTP};
use local_shim::{LocalFlags, LocalShim};
use shim_framework::RunningShim;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::oneshot;

const INVENTORY: &str = include_str!("../examples/inventory.yaml");

struct Shim {
    socket: PathBuf,
    running: RunningShim,
    stop: oneshot::Sender<()>,
}

impl Shim {
    /// A shim whose `default` pool is 127.0.`net`.0/24, plus `extra_pools` YAML.
    async fn start(dir: &Path, net: u8, extra_pools: &str, extra: &[&str]) -> Self {
        std::fs::write(dir.join("inventory.yaml"), INVENTORY).unwrap();
        std::fs::write(
            dir.join("lb.yaml"),
            format!("pools:\n  - name: default\n    addresses: [127.0.{net}.0/24]\n{extra_pools}"),
        )
        .unwrap();
        let socket = dir.join("local.sock");
        let mut args = vec![
            "local-shim".to_string(),
            format!("--unix-socket={}", socket.display()),
            format!("--inventory={}", dir.join("inventory.yaml").display()),
            format!("--state-dir={}", dir.join("state").display()),
            format!("--lb-config={}", dir.join("lb.yaml").display()),
            "--metrics-bind-address=0".into(),
            "--shutdown-grace-period=2s".into(),
            "--lb-health-interval=100ms".into(),
            "--lb-health-timeout=300ms".into(),
            "--lb-connect-timeout=500ms".into(),
            // Nothing listens there: Cluster-policy backends fall back to node-port connects.
            "--lb-kube-proxy-health-port=1".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let flags = LocalFlags::try_parse_from(args).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = LocalShim::new(&flags)
            .unwrap()
            .start(&flags.serve, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        Self {
            socket,
            running,
            stop,
        }
    }

    fn client(&self) -> LoadBalancerClient<CpiChannel> {
        LoadBalancerClient::new(
            cpi_transport::connect(
                ClientEndpoint::Unix {
                    path: self.socket.clone(),
                },
                ConnectOptions::default(),
            )
            .unwrap(),
        )
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.running.wait())
            .await
            .expect("shim did not stop")
            .unwrap();
    }
}

/// Sends `request` with the test fence and returns the status it got.
async fn send_ensure(
    client: &mut LoadBalancerClient<CpiChannel>,
    request: pb::EnsureLoadBalancerRequest,
) -> Result<pb::LoadBalancerStatus, CpiError> {
    client
        .ensure_load_balancer(pb::EnsureLoadBalancerRequest {
            fence: fence(),
            ..request
        })
        .await
        .map(|r| r.into_inner().status.unwrap())
        .map_err(cpi)
}

async fn ensure_in(
    client: &mut LoadBalancerClient<CpiChannel>,
    cluster: &str,
    svc: &pb::Service,
    nodes: &[pb::Node],
) -> Result<pb::LoadBalancerStatus, CpiError> {
    let request = pb::EnsureLoadBalancerRequest {
        cluster_name: cluster.into(),
        service: Some(svc.clone()),
        nodes: nodes.to_vec(),
        ..Default::default()
    };
    send_ensure(client, request).await
}

async fn ensure(
    client: &mut LoadBalancerClient<CpiChannel>,
    svc: &pb::Service,
    nodes: &[pb::Node],
) -> Result<pb::LoadBalancerStatus, CpiError> {
    ensure_in(client, CLUSTER, svc, nodes).await
}

async fn get_in(
    client: &mut LoadBalancerClient<CpiChannel>,
    cluster: &str,
    svc: &pb::Service,
) -> pb::GetLoadBalancerResponse {
    client
        .get_load_balancer(pb::LoadBalancerRequest {
            cluster_name: cluster.into(),
            service: Some(svc.clone()),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn delete_in(client: &mut LoadBalancerClient<CpiChannel>, cluster: &str, svc: &pb::Service) {
    client
        .ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
            cluster_name: cluster.into(),
            service: Some(svc.clone()),
            fence: fence(),
        })
        .await
        .unwrap();
}

fn address(status: &pb::LoadBalancerStatus) -> String {
    status.ingress[0].ip.clone()
}

fn at(status: &pb::LoadBalancerStatus, port: u16) -> SocketAddr {
    SocketAddr::new(ip(&address(status)), port)
}

/// Backends `127.<net>.0.<1..=n>` named `b1…`: TCP and UDP echo on `node_port`, `/healthz` on
/// `health_port`; returns the nodes and the health switches.
async fn backends(
    net: u8,
    n: u8,
    node_port: u16,
    health_port: u16,
) -> (
    Vec<pb::Node>,
    Vec<std::sync::Arc<std::sync::atomic::AtomicU16>>,
) {
    let mut nodes = Vec::new();
    let mut health = Vec::new();
    for i in 1..=n {
        let addr = format!("127.{net}.0.{i}");
        tcp_echo(SocketAddr::new(ip(&addr), node_port), &format!("b{i}")).await;
        udp_echo(SocketAddr::new(ip(&addr), node_port), &format!("b{i}")).await;
        health.push(healthz(SocketAddr::new(ip(&addr), health_port)).await);
        nodes.push(node(&format!("n{i}"), &addr));
    }
    (nodes, health)
}

fn local_policy(mut svc: pb::Service, health_port: i32) -> pb::Service {
    svc.external_traffic_policy = Some("Local".into());
    svc.health_check_node_port = Some(health_port);
    svc
}

const CLIENT: &str = "127.0.0.1";

#[tokio::test]
async fn allocates_from_the_default_pool_and_serves_tcp_and_udp_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 201, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(101, 1, 30053, 31001).await;
    let svc = service(
        "dns",
        "uid-dns",
        &[
            ("TCP", 5353, 30053),
            ("UDP", 5353, 30053),
            ("SCTP", 5354, 30054),
        ],
    );
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    assert_eq!(address(&status), "127.0.201.1");
    let ingress = &status.ingress[0];
    assert_eq!(ingress.ip_mode.as_deref(), Some("Proxy"));
    let ports: Vec<_> = ingress
        .ports
        .iter()
        .map(|p| (p.port, p.protocol.as_str(), p.error.as_deref()))
        .collect();
    assert_eq!(
        ports,
        vec![
            (5353, "TCP", None),
            (5353, "UDP", None),
            (5354, "SCTP", Some(PORT_ERROR_SCTP)),
        ]
    );
    // Traffic: TCP and UDP on the same port, through the proxy to the node port.
    assert_eq!(
        backend_of(ip(CLIENT), at(&status, 5353)).await.as_deref(),
        Some("b1")
    );
    assert_eq!(
        udp_ask(ip(CLIENT), at(&status, 5353), "ping")
            .await
            .as_deref(),
        Some("b1:ping")
    );
    // Get answers for this cluster and UID only; Ensure again keeps everything.
    let got = get_in(&mut lb, CLUSTER, &svc).await;
    assert!(got.exists);
    assert_eq!(got.status.as_ref(), Some(&status));
    let ownership = got.ownership.unwrap();
    assert!(ownership.owned);
    assert_eq!(ownership.object_uid.as_deref(), Some("uid-dns"));
    assert!(!get_in(&mut lb, "c2", &svc).await.exists);
    let recreated = service("dns", "uid-other", &[("TCP", 5353, 30053)]);
    assert!(!get_in(&mut lb, CLUSTER, &recreated).await.exists);
    assert_eq!(ensure(&mut lb, &svc, &nodes).await.unwrap(), status);
    // A second Service gets the next address.
    let web = service("web", "uid-web", &[("TCP", 8080, 30080)]);
    assert_eq!(
        address(&ensure(&mut lb, &web, &nodes).await.unwrap()),
        "127.0.201.2"
    );
    // The name derives from cluster and UID.
    let name = lb
        .get_load_balancer_name(pb::LoadBalancerRequest {
            cluster_name: CLUSTER.into(),
            service: Some(svc.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    assert!(name.contains(CLUSTER) && name.contains("uid-dns"), "{name}");
    shim.stop().await;
    // Listeners stop with the shim.
    assert!(connect_from(ip(CLIENT), at(&status, 5353)).await.is_err());
}

#[tokio::test]
async fn requested_addresses_pools_and_errors_are_precise() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = "  - name: tiny\n    addresses: [127.0.212.1-127.0.212.2]\n    autoAssign: false\n";
    let shim = Shim::start(dir.path(), 202, tiny, &[]).await;
    let mut lb = shim.client();
    let nodes = vec![node("n1", "127.102.0.1")];
    let ports = [("TCP", 8080, 30080)];

    let mut asked = service("a", "uid-a", &ports);
    asked.load_balancer_ip = Some("127.0.202.77".into());
    assert_eq!(
        address(&ensure(&mut lb, &asked, &nodes).await.unwrap()),
        "127.0.202.77"
    );

    let mut taken = service("b", "uid-b", &ports);
    taken.load_balancer_ip = Some("127.0.202.77".into());
    let err = ensure(&mut lb, &taken, &nodes).await.unwrap_err();
    assert!(
        matches!(&err, CpiError::NotOwned(m) if m.contains("127.0.202.77 is used by ns/a")),
        "{err:?}"
    );

    let mut outside = service("c", "uid-c", &ports);
    outside.load_balancer_ip = Some("10.9.9.9".into());
    match ensure(&mut lb, &outside, &nodes).await.unwrap_err() {
        CpiError::InvalidObject { field, message } => {
            assert_eq!(field, "service.spec.loadBalancerIP");
            assert!(message.contains("10.9.9.9 is in no pool"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let in_tiny = |name: &str| {
        annotate(
            service(name, &format!("uid-{name}"), &ports),
            POOL_ANNOTATION,
            "tiny",
        )
    };
    assert_eq!(
        address(&ensure(&mut lb, &in_tiny("t1"), &nodes).await.unwrap()),
        "127.0.212.1"
    );
    assert_eq!(
        address(&ensure(&mut lb, &in_tiny("t2"), &nodes).await.unwrap()),
        "127.0.212.2"
    );
    let err = ensure(&mut lb, &in_tiny("t3"), &nodes).await.unwrap_err();
    assert!(
        matches!(&err, CpiError::Cloud(m) if m.contains("pool tiny has 0 of 2 free")),
        "{err:?}"
    );
    assert_eq!(err.code(), tonic::Code::Unavailable, "retried with backoff");

    let unknown = annotate(service("u", "uid-u", &ports), POOL_ANNOTATION, "red");
    assert!(matches!(
        ensure(&mut lb, &unknown, &nodes).await.unwrap_err(),
        CpiError::InvalidObject { field, .. } if field == "service.metadata.annotations[lb.local-shim/address-pool]"
    ));

    let mut bad = service("r", "uid-r", &ports);
    bad.load_balancer_source_ranges = vec!["10.0.0.0/8".into(), "10.0.0.0/40".into()];
    assert!(matches!(
        ensure(&mut lb, &bad, &nodes).await.unwrap_err(),
        CpiError::InvalidObject { field, .. } if field == "service.spec.loadBalancerSourceRanges[1]"
    ));

    // Moving an address needs replacement.
    let mut moved = asked.clone();
    moved.load_balancer_ip = Some("127.0.202.78".into());
    assert!(matches!(
        ensure(&mut lb, &moved, &nodes).await.unwrap_err(),
        CpiError::ReplacementRequired(_)
    ));
    shim.stop().await;
}

#[tokio::test]
async fn traffic_spreads_and_follows_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 203, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, health) = backends(103, 3, 30080, 31080).await;
    let svc = local_policy(service("web", "uid-web", &[("TCP", 8080, 30080)]), 31080);
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    let to = at(&status, 8080);
    // Wait for the first verdicts, then every backend gets connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for _ in 0..30 {
        *seen
            .entry(backend_of(ip(CLIENT), to).await.unwrap())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // b2's health check fails: after two failed probes it gets no new connections.
    health[1].store(503, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..20 {
        assert_ne!(backend_of(ip(CLIENT), to).await.as_deref(), Some("b2"));
    }
    // One good probe brings it back.
    health[1].store(200, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = false;
    for _ in 0..20 {
        back |= backend_of(ip(CLIENT), to).await.as_deref() == Some("b2");
    }
    assert!(back, "b2 never came back");
    shim.stop().await;
}

#[tokio::test]
async fn a_failed_connect_falls_through_to_the_next_node() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 204, "", &[]).await;
    let mut lb = shim.client();
    // n1 and n2 pass their health checks, but only n2 serves the node port.
    let (mut nodes, _) = backends(104, 1, 31999, 31081).await;
    healthz(SocketAddr::new(ip("127.104.0.2"), 31081)).await;
    tcp_echo(SocketAddr::new(ip("127.104.0.2"), 30080), "b2").await;
    nodes[0] = node("n1", "127.104.0.1");
    nodes.push(node("n2", "127.104.0.2"));
    let svc = local_policy(service("web", "uid-web", &[("TCP", 8080, 30080)]), 31081);
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(
            backend_of(ip(CLIENT), at(&status, 8080)).await.as_deref(),
            Some("b2")
        );
    }
    shim.stop().await;
}

#[tokio::test]
async fn source_ranges_refuse_outside_clients_on_tcp_and_udp() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 205, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(105, 1, 30053, 31082).await;
    let svc = annotate(
        service(
            "dns",
            "uid-dns",
            &[("TCP", 5353, 30053), ("UDP", 5353, 30053)],
        ),
        "service.beta.kubernetes.io/load-balancer-source-ranges",
        " 127.0.0.0/24 ",
    );
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    let to = at(&status, 5353);
    let (inside, outside) = (ip("127.0.0.5"), ip("127.0.1.5"));
    assert_eq!(backend_of(inside, to).await.as_deref(), Some("b1"));
    assert_eq!(backend_of(outside, to).await, None);
    assert_eq!(udp_ask(inside, to, "q").await.as_deref(), Some("b1:q"));
    assert_eq!(udp_ask(outside, to, "q").await, None);
    // The field wins over the annotation.
    let mut field = svc.clone();
    field.load_balancer_source_ranges = vec!["127.0.1.0/24".into()];
    ensure(&mut lb, &field, &nodes).await.unwrap();
    assert_eq!(backend_of(outside, to).await.as_deref(), Some("b1"));
    assert_eq!(backend_of(inside, to).await, None);
    shim.stop().await;
}

#[tokio::test]
async fn client_ip_affinity_sticks() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 206, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(106, 3, 30080, 31083).await;
    let mut svc = local_policy(service("web", "uid-web", &[("TCP", 8080, 30080)]), 31083);
    svc.session_affinity = "ClientIP".into();
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut chosen = std::collections::HashSet::new();
    for c in 1..=8u8 {
        let client = ip(&format!("127.0.0.{c}"));
        let first = backend_of(client, at(&status, 8080)).await.unwrap();
        for _ in 0..5 {
            assert_eq!(backend_of(client, at(&status, 8080)).await.unwrap(), first);
        }
        chosen.insert(first);
    }
    assert!(chosen.len() > 1, "every client on one backend: {chosen:?}");
    shim.stop().await;
}

#[tokio::test]
async fn update_changes_backends_without_dropping_established_connections() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 207, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(107, 2, 30080, 31084).await;
    let svc = local_policy(service("web", "uid-web", &[("TCP", 8080, 30080)]), 31084);
    let status = ensure(&mut lb, &svc, &nodes[..1]).await.unwrap();
    let stream = connect_from(ip(CLIENT), at(&status, 8080)).await.unwrap();
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert_eq!(line, "b1\n");

    lb.update_load_balancer(pb::UpdateLoadBalancerRequest {
        cluster_name: CLUSTER.into(),
        service: Some(svc.clone()),
        nodes: nodes[1..].to_vec(),
        fence: fence(),
        node_set_id: String::new(),
    })
    .await
    .unwrap();
    // The established connection still works; new ones go to the new node.
    stream.get_mut().write_all(b"still here\n").await.unwrap();
    line.clear();
    stream.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still here\n");
    assert_eq!(
        backend_of(ip(CLIENT), at(&status, 8080)).await.as_deref(),
        Some("b2")
    );
    shim.stop().await;
}

#[tokio::test]
async fn a_node_set_put_again_under_its_id_gives_the_new_backends() {
    // The shim reuses the backends it built from a node set while callers name that very set;
    // a set put again under the same id is a new set, so the next call must see its nodes.
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 211, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(111, 2, 30080, 31087).await;
    let svc = service("web", "uid-web", &[("TCP", 8080, 30080)]);
    let put = |nodes: &[pb::Node]| pb::PutNodeSetRequest {
        node_set_id: "set-a".into(),
        nodes: nodes.to_vec(),
    };
    lb.put_node_set(put(&nodes[..1])).await.unwrap();
    let request = pb::EnsureLoadBalancerRequest {
        cluster_name: CLUSTER.into(),
        service: Some(svc.clone()),
        node_set_id: "set-a".into(),
        ..Default::default()
    };
    let status = send_ensure(&mut lb, request).await.unwrap();
    assert_eq!(
        backend_of(ip(CLIENT), at(&status, 8080)).await.as_deref(),
        Some("b1")
    );

    lb.put_node_set(put(&nodes[1..])).await.unwrap();
    let update = pb::UpdateLoadBalancerRequest {
        cluster_name: CLUSTER.into(),
        service: Some(svc.clone()),
        nodes: Vec::new(),
        fence: fence(),
        node_set_id: "set-a".into(),
    };
    lb.update_load_balancer(update.clone()).await.unwrap();
    assert_eq!(
        backend_of(ip(CLIENT), at(&status, 8080)).await.as_deref(),
        Some("b2")
    );
    // The same set named again changes nothing.
    lb.update_load_balancer(update).await.unwrap();
    assert_eq!(
        backend_of(ip(CLIENT), at(&status, 8080)).await.as_deref(),
        Some("b2")
    );
    shim.stop().await;
}

#[tokio::test]
async fn deleted_service_frees_listeners_and_address_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 208, "", &["--lb-address-hold=1500ms"]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(108, 1, 30080, 31085).await;
    let ports = [("TCP", 8080, 30080)];
    let svc = service("web", "uid-1", &ports);
    let status = ensure(&mut lb, &svc, &nodes).await.unwrap();
    let held = address(&status);
    delete_in(&mut lb, CLUSTER, &svc).await;
    delete_in(&mut lb, CLUSTER, &svc).await; // nothing left: still success
    assert!(connect_from(ip(CLIENT), at(&status, 8080)).await.is_err());
    assert!(!get_in(&mut lb, CLUSTER, &svc).await.exists);

    // Another Service cannot take the held address; a new Service gets another one.
    let mut other = service("other", "uid-o", &ports);
    other.load_balancer_ip = Some(held.clone());
    let err = ensure(&mut lb, &other, &nodes).await.unwrap_err();
    assert!(
        matches!(&err, CpiError::NotOwned(m) if m.contains("held for deleted Service ns/web")),
        "{err:?}"
    );
    let fresh = service("fresh", "uid-f", &ports);
    assert_ne!(
        address(&ensure(&mut lb, &fresh, &nodes).await.unwrap()),
        held
    );

    // Delete-and-recreate (new UID) within the grace period: same address.
    let recreated = service("web", "uid-2", &ports);
    let again = ensure(&mut lb, &recreated, &nodes).await.unwrap();
    assert_eq!(address(&again), held);
    assert_eq!(
        backend_of(ip(CLIENT), at(&again, 8080)).await.as_deref(),
        Some("b1")
    );

    // After the grace period the address is free for anyone.
    delete_in(&mut lb, CLUSTER, &recreated).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        address(&ensure(&mut lb, &other, &nodes).await.unwrap()),
        held
    );
    shim.stop().await;
}

#[tokio::test]
async fn foreign_load_balancers_are_never_touched() {
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 209, "", &[]).await;
    let mut lb = shim.client();
    let (nodes, _) = backends(109, 1, 30080, 31086).await;
    let svc = service("web", "uid-web", &[("TCP", 8080, 30080)]);
    let theirs = ensure_in(&mut lb, "c2", &svc, &nodes).await.unwrap();
    // Same Service UID, other cluster: not ours to see or delete.
    assert!(!get_in(&mut lb, CLUSTER, &svc).await.exists);
    delete_in(&mut lb, CLUSTER, &svc).await;
    assert!(get_in(&mut lb, "c2", &svc).await.exists);
    assert_eq!(
        backend_of(ip(CLIENT), at(&theirs, 8080)).await.as_deref(),
        Some("b1")
    );
    // Asking for its address names the owner.
    let mut mine = service("mine", "uid-mine", &[("TCP", 8080, 30080)]);
    mine.load_balancer_ip = Some(address(&theirs));
    let err = ensure(&mut lb, &mine, &nodes).await.unwrap_err();
    assert!(
        matches!(&err, CpiError::NotOwned(m) if m.contains("used by ns/web of cluster c2")),
        "{err:?}"
    );
    // Our own Service of the same name gets its own address.
    let ours = ensure(&mut lb, &svc, &nodes).await.unwrap();
    assert_ne!(address(&ours), address(&theirs));
    shim.stop().await;
}

#[tokio::test]
async fn concurrent_ensures_get_distinct_durable_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![node("n1", "127.110.0.1")];
    let svc = |i: i32| {
        service(
            &format!("c{i}"),
            &format!("uid-c{i}"),
            &[("TCP", 8080, 30080)],
        )
    };
    let first: Vec<String> = {
        let shim = Shim::start(dir.path(), 210, "", &[]).await;
        // Concurrent changing calls share commits; each still decides seeing the others'
        // not-yet-durable allocations, so no address is given twice.
        let answers = futures::future::join_all((0..40).map(|i| {
            let mut lb = shim.client();
            let nodes = nodes.clone();
            async move { ensure(&mut lb, &svc(i), &nodes).await.unwrap() }
        }))
        .await;
        let addresses: Vec<String> = answers.iter().map(address).collect();
        let distinct: std::collections::HashSet<&String> = addresses.iter().collect();
        assert_eq!(distinct.len(), addresses.len(), "{addresses:?}");
        // Concurrent calls for one Service run one after the other and agree.
        let mut lb = shim.client();
        let again = futures::future::join_all((0..8).map(|_| {
            let mut lb = shim.client();
            let nodes = nodes.clone();
            async move { address(&ensure(&mut lb, &svc(0), &nodes).await.unwrap()) }
        }))
        .await;
        assert!(again.iter().all(|a| *a == addresses[0]), "{again:?}");
        delete_in(&mut lb, CLUSTER, &svc(39)).await;
        shim.stop().await;
        addresses
    };
    // Every answer was durable: a restarted shim has the same addresses.
    let shim = Shim::start(dir.path(), 210, "", &[]).await;
    let mut lb = shim.client();
    for (i, want) in first.iter().enumerate().take(39) {
        let got = get_in(&mut lb, CLUSTER, &svc(i as i32)).await;
        assert_eq!(address(&got.status.unwrap()), *want, "c{i}");
    }
    assert!(!get_in(&mut lb, CLUSTER, &svc(39)).await.exists);
    shim.stop().await;
}
