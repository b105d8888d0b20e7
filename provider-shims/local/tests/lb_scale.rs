//! Cost of the load balancers at the bench's scale: 1000 LoadBalancer Services on 100 nodes,
//! through the real gRPC server, 50 calls in flight as the controller manager sends them; then
//! one node more (1000 UpdateLoadBalancer calls); then 10 s idle. Ignored by default (it
//! measures, it does not judge); run with
//! `cargo test -p local-shim --release --test lb_scale -- --ignored --nocapture --test-threads=1`.
//!
//! Two variants: `loopback_nodes` is the bench's case (node addresses on 127.x, each with a
//! `/healthz` 200 responder on kube-proxy's port 10256, so every kube-proxy check succeeds);
//! `unreachable_nodes` gives the nodes 10.x addresses nothing answers on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod lb_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpi_proto::v1 as pb;
use cpi_proto::v1::load_balancer_client::LoadBalancerClient;
use cpi_transport::{ClientEndpoint, ConnectOptions};
use futures::StreamExt as _;
use lb_support::*;
use test_support::{Process, wait_for};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVICES: i32 = 1000;
const NODES: u32 = 100;
const IN_FLIGHT: usize = 50;

/// One measurement at a time: both variants on 2 cores would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// kube-proxy's `/healthz` stand-in on `addr`: answers 200 and counts the requests.
async fn counting_healthz(addr: SocketAddr, hits: Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            hits.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
}

#[derive(Debug, Clone, Copy)]
enum Nodes {
    /// 127.77.0.x with a `/healthz` responder on :10256 each.
    Loopback,
    /// 10.0.0.x: unreachable here.
    Unreachable,
}

impl Nodes {
    fn address(self, i: u32) -> String {
        match self {
            Self::Loopback => format!("127.77.0.{i}"),
            Self::Unreachable => format!("10.0.0.{i}"),
        }
    }
}

async fn measure(variant: Nodes) {
    let _one = ONE_AT_A_TIME.lock().await;
    let hits = Arc::new(AtomicU64::new(0));
    if let Nodes::Loopback = variant {
        for i in 1..=NODES + 1 {
            let addr = SocketAddr::new(ip(&variant.address(i)), 10256);
            counting_healthz(addr, Arc::clone(&hits)).await;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("inventory.yaml"),
        include_str!("../examples/inventory.yaml"),
    )
    .unwrap();
    std::fs::write(
        d.join("lb.yaml"),
        "pools:\n  - name: default\n    addresses: [127.0.230.0/22]\n",
    )
    .unwrap();
    let socket = d.join("local.sock");
    // The shim as its own process, so its CPU time is measured without the test client's.
    let shim = Process::builder(
        "local-shim",
        env!("CARGO_BIN_EXE_local-shim"),
        d.join("shim.log"),
    )
    .args([
        format!("--unix-socket={}", socket.display()),
        format!("--inventory={}", d.join("inventory.yaml").display()),
        format!("--state-dir={}", d.join("state").display()),
        format!("--lb-config={}", d.join("lb.yaml").display()),
        "--metrics-bind-address=0".into(),
    ])
    .envs([("RUST_LOG", "warn")])
    .spawn()
    .unwrap();
    let lb = wait_for("the shim to serve", Duration::from_secs(30), || {
        let path = socket.clone();
        async move {
            let channel =
                cpi_transport::connect(ClientEndpoint::Unix { path }, ConnectOptions::default())
                    .map_err(|e| e.to_string())?;
            let mut lb = LoadBalancerClient::new(channel);
            lb.get_load_balancer(pb::LoadBalancerRequest {
                cluster_name: CLUSTER.into(),
                service: Some(service("probe", "uid-probe", &[])),
            })
            .await
            .map_err(|e| e.to_string())?;
            Ok(lb)
        }
    })
    .await
    .unwrap();
    let pid = shim.pid();
    let start_cpu = cpu_seconds(pid);
    let start_rss = rss(pid);
    let mut nodes: Vec<pb::Node> = (1..=NODES)
        .map(|i| node(&format!("n{i}"), &variant.address(i)))
        .collect();
    let svc = |i: i32| {
        service(
            &format!("s{i}"),
            &format!("uid-{i}"),
            &[("TCP", 8080, 30000 + i)],
        )
    };

    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let ensured = futures::stream::iter(0..SERVICES)
        .map(|i| {
            let mut lb = lb.clone();
            let request = pb::EnsureLoadBalancerRequest {
                cluster_name: CLUSTER.into(),
                service: Some(svc(i)),
                nodes: nodes.clone(),
                fence: fence(),
                ..Default::default()
            };
            async move { lb.ensure_load_balancer(request).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let ensure_wall = t0.elapsed();
    let ensure_cpu = cpu_seconds(pid) - cpu0;
    for result in ensured {
        result.unwrap();
    }
    let ensure_rss = rss(pid);

    nodes.push(node(
        &format!("n{}", NODES + 1),
        &variant.address(NODES + 1),
    ));
    let cpu1 = cpu_seconds(pid);
    let t1 = Instant::now();
    let updated = futures::stream::iter(0..SERVICES)
        .map(|i| {
            let mut lb = lb.clone();
            let request = pb::UpdateLoadBalancerRequest {
                cluster_name: CLUSTER.into(),
                service: Some(svc(i)),
                nodes: nodes.clone(),
                fence: fence(),
                node_set_id: String::new(),
            };
            async move { lb.update_load_balancer(request).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let update_wall = t1.elapsed();
    let update_cpu = cpu_seconds(pid) - cpu1;
    for result in updated {
        result.unwrap();
    }

    // Let the first probes of the new node settle, then measure a quiet stretch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu2 = cpu_seconds(pid);
    let hits0 = hits.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = cpu_seconds(pid) - cpu2;
    let idle_probes = hits.load(Ordering::Relaxed) - hits0;
    println!(
        "local-shim [{variant:?}]: start-up CPU {start_cpu:.2} s, RSS {start_rss}; \
         {SERVICES} Ensure x {NODES} nodes ({IN_FLIGHT} in flight): wall {ensure_wall:.2?}, \
         CPU {ensure_cpu:.2} s, RSS {ensure_rss}; \
         {SERVICES} Update (+1 node): wall {update_wall:.2?}, CPU {update_cpu:.2} s; \
         10 s idle: CPU {idle_cpu:.2} s, kube-proxy probes answered {idle_probes}; \
         RSS {}",
        rss(pid)
    );
    drop(shim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn loopback_nodes() {
    measure(Nodes::Loopback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn unreachable_nodes() {
    measure(Nodes::Unreachable).await;
}
