//! Kill-and-restart: the `local-shim` binary is killed (SIGKILL) and started again on the same
//! state directory; its load balancers come back with identical addresses and listening
//! listeners before any call, a pool edit moves none of them, and new allocations avoid them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod lb_support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cpi_proto::v1 as pb;
use cpi_proto::v1::load_balancer_client::LoadBalancerClient;
use cpi_transport::{ClientEndpoint, CpiChannel};
use lb_support::*;
use test_support::{Process, free_port, wait_for};

const INVENTORY: &str = include_str!("../examples/inventory.yaml");

fn spawn(dir: &Path, metrics_port: u16, run: u32) -> Process {
    Process::builder(
        format!("local-shim-{run}"),
        env!("CARGO_BIN_EXE_local-shim"),
        dir.join(format!("shim-{run}.log")),
    )
    .args([
        format!("--unix-socket={}", dir.join("local.sock").display()),
        format!("--inventory={}", dir.join("inventory.yaml").display()),
        format!("--state-dir={}", dir.join("state").display()),
        format!("--lb-config={}", dir.join("lb.yaml").display()),
        format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
        "--lb-health-interval=100ms".into(),
        "--lb-kube-proxy-health-port=1".into(),
    ])
    .envs([("RUST_LOG", "info")])
    .spawn()
    .unwrap()
}

/// Writes the `--lb-config` with one pool, `default`, of `cidr`.
fn write_pool(dir: &Path, cidr: &str) {
    std::fs::write(
        dir.join("lb.yaml"),
        format!("pools:\n  - name: default\n    addresses: [{cidr}]\n"),
    )
    .unwrap();
}

/// A shim directory with the example inventory and one pool, `default`, of `cidr`.
fn shim_dir(cidr: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    write_pool(dir.path(), cidr);
    dir
}

/// Three Services `{prefix}-{i}` (UID `{prefix}-uid-{i}`), each 8080/TCP to node port 30080.
fn three_services(prefix: &str) -> Vec<pb::Service> {
    (0..3)
        .map(|i| {
            service(
                &format!("{prefix}-{i}"),
                &format!("{prefix}-uid-{i}"),
                &[("TCP", 8080, 30080)],
            )
        })
        .collect()
}

async fn connect(dir: &Path) -> LoadBalancerClient<CpiChannel> {
    let path = dir.join("local.sock");
    wait_for(
        "the shim's socket to answer",
        Duration::from_secs(30),
        || {
            let path = path.clone();
            async move {
                let channel = answering_channel(ClientEndpoint::Unix { path }).await?;
                Ok(LoadBalancerClient::new(channel))
            }
        },
    )
    .await
    .unwrap()
}

async fn ensure(
    lb: &mut LoadBalancerClient<CpiChannel>,
    svc: &pb::Service,
    nodes: &[pb::Node],
) -> String {
    lb.ensure_load_balancer(pb::EnsureLoadBalancerRequest {
        cluster_name: CLUSTER.into(),
        service: Some(svc.clone()),
        nodes: nodes.to_vec(),
        fence: fence(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
    .ingress[0]
        .ip
        .clone()
}

async fn get(lb: &mut LoadBalancerClient<CpiChannel>, svc: &pb::Service) -> Option<String> {
    let got = lb
        .get_load_balancer(pb::LoadBalancerRequest {
            cluster_name: CLUSTER.into(),
            service: Some(svc.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    got.exists
        .then(|| got.status.unwrap().ingress[0].ip.clone())
}

#[tokio::test]
async fn kill_and_restart_keeps_addresses_and_listeners() {
    let dir = shim_dir("127.0.220.0/24");
    let dir = dir.path();
    let nodes = vec![node("n1", "127.120.0.1")];
    tcp_echo(SocketAddr::new(ip("127.120.0.1"), 30080), "b1").await;
    let services = three_services("web");

    let metrics_port = free_port().unwrap();
    let first = spawn(dir, metrics_port, 1);
    let mut lb = connect(dir).await;
    let mut before = Vec::new();
    for svc in &services {
        before.push(ensure(&mut lb, svc, &nodes).await);
    }
    assert_eq!(before, ["127.0.220.1", "127.0.220.2", "127.0.220.3"]);
    first.kill();
    assert!(
        connect_from(ip("127.0.0.1"), SocketAddr::new(ip(&before[0]), 8080))
            .await
            .is_err()
    );

    // The operator moves the pool while the shim is down: existing addresses must not move.
    write_pool(dir, "127.0.221.0/24");
    let second = spawn(dir, metrics_port, 2);
    let mut lb = connect(dir).await;
    // Before any Ensure: the same addresses, and the listeners serve.
    for (svc, ip_before) in services.iter().zip(&before) {
        assert_eq!(get(&mut lb, svc).await.as_deref(), Some(ip_before.as_str()));
        assert_eq!(
            backend_of(ip("127.0.0.1"), SocketAddr::new(ip(ip_before), 8080))
                .await
                .as_deref(),
            Some("b1"),
            "listener on {ip_before} after restart"
        );
    }
    let scraped = scrape_metrics(metrics_port).await;
    assert!(
        scraped.contains("local_shim_lb_allocations_outside_pools 3"),
        "{scraped}"
    );
    assert!(
        scraped.contains("local_shim_lb_load_balancers 3"),
        "{scraped}"
    );
    assert!(
        second.logs().contains("in no configured pool any more"),
        "{}",
        second.log_tail(20)
    );
    // The controller's Ensure calls after the restart keep them; a new Service gets a new one.
    for (svc, ip_before) in services.iter().zip(&before) {
        assert_eq!(&ensure(&mut lb, svc, &nodes).await, ip_before);
    }
    let new = service("new", "uid-new", &[("TCP", 8080, 30080)]);
    assert_eq!(ensure(&mut lb, &new, &nodes).await, "127.0.221.1");
    let scraped = scrape_metrics(metrics_port).await;
    assert!(
        scraped.contains("local_shim_lb_pool_addresses_used{pool=\"default\"} 1"),
        "{scraped}"
    );
    drop(second);
}

/// Schema 3: a backend list is stored once however many load balancers name it, a node change
/// stores the new list, and a list goes with the last load balancer naming it; the stored rows
/// bring every load balancer back with its backends.
#[tokio::test]
async fn backend_lists_are_stored_once_and_go_with_their_last_load_balancer() {
    let dir = shim_dir("127.0.222.0/24");
    let dir = dir.path();
    let one = vec![node("n1", "127.121.0.1")];
    let two = vec![node("n1", "127.121.0.1"), node("n2", "127.121.0.2")];
    tcp_echo(SocketAddr::new(ip("127.121.0.1"), 30080), "b1").await;
    let services = three_services("lists");
    let rows = || {
        let store = local_shim::Store::open(&dir.join("state")).unwrap();
        store.load_lb_rows().unwrap()
    };

    let first = spawn(dir, free_port().unwrap(), 1);
    let mut lb = connect(dir).await;
    for svc in &services {
        ensure(&mut lb, svc, &one).await;
    }
    lb.update_load_balancer(pb::UpdateLoadBalancerRequest {
        cluster_name: CLUSTER.into(),
        service: Some(services[0].clone()),
        nodes: two.clone(),
        fence: fence(),
        node_set_id: String::new(),
    })
    .await
    .unwrap();
    first.kill();
    let stored = rows();
    assert_eq!(stored.records.len(), 3);
    assert_eq!(stored.backends.len(), 2, "one list per distinct node set");
    for (key, value) in &stored.records {
        assert!(value.len() < 1024, "{key}: {} bytes", value.len());
    }

    let second = spawn(dir, free_port().unwrap(), 2);
    let mut lb = connect(dir).await;
    for svc in &services[1..] {
        lb.ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
            cluster_name: CLUSTER.into(),
            service: Some(svc.clone()),
            fence: fence(),
        })
        .await
        .unwrap();
    }
    second.kill();
    let stored = rows();
    assert_eq!(stored.records.len(), 1);
    assert_eq!(
        stored.backends.len(),
        1,
        "the one-node list went with its last load balancer"
    );

    // The remaining load balancer comes back with its two-node list and serves through it.
    let _third = spawn(dir, free_port().unwrap(), 3);
    let mut lb = connect(dir).await;
    let address = get(&mut lb, &services[0]).await.unwrap();
    assert_eq!(
        backend_of(ip("127.0.0.1"), SocketAddr::new(ip(&address), 8080))
            .await
            .as_deref(),
        Some("b1")
    );
}
