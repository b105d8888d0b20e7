//! Cost of Ensure at the bench's scale: 1000 LoadBalancer Services on 100 nodes, through the
//! real gRPC server. Ignored by default (it measures, it does not judge); run with
//! `cargo test -p local-shim --release --test lb_scale -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod lb_support;

use std::time::{Duration, Instant};

use cpi_proto::v1 as pb;
use cpi_proto::v1::load_balancer_client::LoadBalancerClient;
use cpi_transport::{ClientEndpoint, ConnectOptions};
use lb_support::*;
use test_support::{Process, wait_for};

/// User + system CPU seconds of process `pid` so far (Linux `/proc/<pid>/stat`, 100 ticks/s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn thousand_services_on_a_hundred_nodes() {
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
    let mut lb = wait_for("the shim to serve", Duration::from_secs(30), || {
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
    // The bench's node addresses (10.0.0.x): unreachable here, as there.
    let nodes: Vec<pb::Node> = (1..=100)
        .map(|i| node(&format!("n{i}"), &format!("10.0.0.{i}")))
        .collect();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    for i in 0..1000 {
        let svc = service(
            &format!("s{i}"),
            &format!("uid-{i}"),
            &[("TCP", 8080, 30000 + i)],
        );
        lb.ensure_load_balancer(pb::EnsureLoadBalancerRequest {
            cluster_name: CLUSTER.into(),
            service: Some(svc),
            nodes: nodes.clone(),
            fence: fence(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let ensure_wall = t0.elapsed();
    let ensure_cpu = cpu_seconds(pid) - cpu0;
    let cpu1 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = cpu_seconds(pid) - cpu1;
    println!(
        "local-shim: start-up CPU {start_cpu:.2} s; 1000 Ensure x 100 nodes: wall {ensure_wall:?}, \
         CPU {ensure_cpu:.2} s; then 10 s idle with health checks: CPU {idle_cpu:.2} s; RSS {}",
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or_default()
    );
    drop(shim);
}
