//! End to end: LoadBalancer Services served by the controller-manager's service-lb controller
//! and the `local` shim's proxy, with real traffic. The test stands in for kube-proxy on every
//! node: a TCP and a UDP server on `<InternalIP>:<nodePort>` that answer with the node's name,
//! and `<InternalIP>:10256/healthz`, which the shim probes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, DeleteParams, PostParams};
use test_control_plane::{ControlPlane, Options};
use test_support::{
    KUBE_PROXY_HEALTH_PORT, Location, Process, load_balancer_service, serve_http, temp_dir,
    wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);

/// Three machines on loopback addresses no other suite uses.
fn inventory(prefix: &str) -> String {
    let mut out = String::from("region: lb-region\nmachines:\n");
    for i in 1..=3 {
        out.push_str(&format!(
            "  - name: lb-node-{i}\n    instanceID: m-lb-{i}\n    instanceType: local.small\n    zone: zone-a\n    addresses:\n      - {{type: InternalIP, address: {prefix}.{i}}}\n"
        ));
    }
    out
}

/// A node's stand-in for kube-proxy: answers on TCP and UDP with `name`, health switchable.
struct NodeStandIn {
    healthy: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for NodeStandIn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn stand_in(name: &str, ip: Ipv4Addr, node_ports: &[(u16, &str)]) -> NodeStandIn {
    let healthy = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for &(port, protocol) in node_ports {
        let greeting = format!("{name}\n");
        if protocol == "UDP" {
            let socket = UdpSocket::bind((ip, port)).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((_, from)) = socket.recv_from(&mut buf).await {
                    let _ = socket.send_to(greeting.as_bytes(), from).await;
                }
            }));
        } else {
            let listener = TcpListener::bind((ip, port)).await.unwrap();
            tasks.push(tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let greeting = greeting.clone();
                    tokio::spawn(async move {
                        let _ = conn.write_all(greeting.as_bytes()).await;
                    });
                }
            }));
        }
    }
    let flag = healthy.clone();
    tasks.push(
        serve_http(
            ip.into(),
            KUBE_PROXY_HEALTH_PORT,
            String::new(),
            move || flag.load(Ordering::Relaxed),
        )
        .await
        .unwrap(),
    );
    NodeStandIn { healthy, tasks }
}

fn lb_service(name: &str, ports: &[(&str, i32)], source_ranges: &[&str]) -> Service {
    let mut svc = load_balancer_service("default", name, ports);
    if let Some(spec) = svc.spec.as_mut() {
        spec.load_balancer_source_ranges = (!source_ranges.is_empty())
            .then(|| source_ranges.iter().map(|s| s.to_string()).collect());
    }
    svc
}

fn node_ports(svc: &Service) -> Vec<(u16, String)> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .unwrap()
        .iter()
        .map(|p| {
            (
                u16::try_from(p.node_port.expect("a node port")).unwrap(),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect()
}

async fn wait_address(services: &Api<Service>, name: &str) -> IpAddr {
    wait_for(&format!("{name} to get an address"), WAIT, || async {
        let svc = services.get(name).await.map_err(|e| e.to_string())?;
        svc.status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .ok_or_else(|| "no ingress yet".to_string())?
            .parse::<IpAddr>()
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

/// Connects from `client_ip` to `lb` and reads what the backend says; `None` when refused,
/// closed without a word, or silent for a second.
async fn tcp_hello(client_ip: Ipv4Addr, lb: SocketAddr) -> Option<String> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(client_ip.into(), 0)).ok()?;
    let mut conn = tokio::time::timeout(Duration::from_secs(2), socket.connect(lb))
        .await
        .ok()?
        .ok()?;
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(1), conn.read_to_string(&mut text)).await;
    match read {
        Ok(Ok(_)) if !text.is_empty() => Some(text.trim().to_string()),
        _ => None,
    }
}

/// Sends one datagram from a fresh socket on `client_ip` to `lb`; the reply, if any within a
/// second.
async fn udp_hello(client_ip: Ipv4Addr, lb: SocketAddr) -> Option<String> {
    let socket = UdpSocket::bind((client_ip, 0)).await.ok()?;
    socket.send_to(b"hello", lb).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Starts a control plane that accepts TCP and UDP ports on one LoadBalancer Service (alpha
/// `MixedProtocolLBService` in v1.20), with the manifest RBAC applied.
async fn control_plane() -> (ControlPlane, kube::Client) {
    let cp = ControlPlane::start_with(Options {
        extra_apiserver_args: vec!["--feature-gates=MixedProtocolLBService=true".into()],
        ..Options::default()
    })
    .await
    .expect("control plane");
    apply_rbac(&cp).await;
    let client = cp.client().unwrap();
    (cp, client)
}

fn lb_config(dir: &Path, pool: &str) -> PathBuf {
    let path = dir.join("lb-config.yaml");
    std::fs::write(
        &path,
        format!("pools:\n  - name: e2e\n    addresses: [\"{pool}\"]\n"),
    )
    .unwrap();
    path
}

fn shim_lb_args(config: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--lb-config={}", config.display()),
        "--lb-health-interval=200ms".into(),
        "--lb-health-timeout=200ms".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn_shim(
    dir: &Path,
    label: &str,
    inventory: &Path,
    socket: &Path,
    args: &[String],
) -> Process {
    let mut all = vec![
        format!("--inventory={}", inventory.display()),
        format!("--state-dir={}", dir.join("state").display()),
        format!("--unix-socket={}", socket.display()),
        "--metrics-bind-address=127.0.0.1:0".into(),
    ];
    all.extend_from_slice(args);
    Process::for_workspace_binary("local-shim", label, dir)
        .unwrap()
        .args(all)
        .spawn()
        .unwrap()
}

async fn initialise_nodes(client: &kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 1..=3 {
        let name = format!("lb-node-{i}");
        create_tainted_node(client, &name).await;
        wait_initialised(&nodes, &name, WAIT).await.unwrap();
    }
}

#[tokio::test]
async fn lb_spreads_tcp_and_udp_over_healthy_nodes_and_enforces_source_ranges() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client) = control_plane().await;
    let dir = temp_dir("ccm-e2e-lb-", Location::System).unwrap();
    let d = dir.path();
    let inventory = write_inventory(d, &inventory("127.0.61")).unwrap();
    let config = lb_config(d, "127.0.62.0/28");
    let socket = d.join("shim.sock");
    let shim = spawn_shim(
        d,
        "local-shim",
        &inventory,
        &socket,
        &shim_lb_args(&config, &[]),
    );
    let ccm = spawn_lb_ccm(&cp, &socket, d);
    initialise_nodes(&client).await;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    // Clients from 127.0.63.0/30 are allowed; 127.0.63.9 is not.
    let created = services
        .create(
            &PostParams::default(),
            &lb_service("web", &[("TCP", 80), ("UDP", 80)], &["127.0.63.0/30"]),
        )
        .await
        .unwrap();
    let ports = node_ports(&created);
    let stand_ins: Vec<NodeStandIn> = stand_ins(61, &ports).await;
    let ip = wait_address(&services, "web").await;
    assert!(
        ip.to_string().starts_with("127.0.62."),
        "address {ip} is not from the configured pool 127.0.62.0/28"
    );
    let tcp = SocketAddr::new(ip, 80);
    let allowed = Ipv4Addr::new(127, 0, 63, 1);
    let outside = Ipv4Addr::new(127, 0, 63, 9);

    // Node 3 fails its health check: traffic goes to nodes 1 and 2 only, both of them.
    stand_ins[2].healthy.store(false, Ordering::Relaxed);
    let expected: BTreeSet<String> = ["lb-node-1", "lb-node-2"].map(String::from).into();
    for protocol in ["TCP", "UDP"] {
        let seen = spread(protocol, allowed, tcp, &expected).await;
        assert!(
            seen.is_ok(),
            "{protocol}: {seen:?}\nshim log:\n{}\nccm log:\n{}",
            shim.log_tail(40),
            ccm.log_tail(40)
        );
    }

    // Outside the source ranges: no answer on either protocol.
    for _ in 0..5 {
        assert_eq!(
            tcp_hello(outside, tcp).await,
            None,
            "TCP from outside the source ranges was served"
        );
        assert_eq!(
            udp_hello(outside, tcp).await,
            None,
            "UDP from outside the source ranges was served"
        );
    }

    // Node 3 healthy again: it gets traffic again.
    stand_ins[2].healthy.store(true, Ordering::Relaxed);
    wait_for("node 3 to get traffic again", WAIT, || async {
        for _ in 0..24 {
            if tcp_hello(allowed, tcp).await.as_deref() == Some("lb-node-3") {
                return Ok(());
            }
        }
        Err("no answer from lb-node-3".to_string())
    })
    .await
    .unwrap();
    drop(stand_ins);
}

/// Waits until 24 tries of `protocol` from `client` to `lb` are answered by exactly the nodes
/// `expected`.
async fn spread(
    protocol: &str,
    client: Ipv4Addr,
    lb: SocketAddr,
    expected: &BTreeSet<String>,
) -> Result<BTreeSet<String>, test_support::WaitError> {
    let what = format!("{protocol} traffic to spread over {expected:?}");
    wait_for(&what, WAIT, || async {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let answer = if protocol == "UDP" {
                udp_hello(client, lb).await
            } else {
                tcp_hello(client, lb).await
            };
            seen.extend(answer);
        }
        if &seen == expected {
            Ok(seen)
        } else {
            Err(format!("answers from {seen:?}"))
        }
    })
    .await
}

/// The stand-ins for the three nodes of [`inventory`]`("127.0.<net>")`, serving `ports`.
async fn stand_ins(net: u8, ports: &[(u16, String)]) -> Vec<NodeStandIn> {
    let ports: Vec<(u16, &str)> = ports
        .iter()
        .map(|(p, proto)| (*p, proto.as_str()))
        .collect();
    let mut out = Vec::new();
    for i in 1..=3u8 {
        let name = format!("lb-node-{i}");
        out.push(stand_in(&name, Ipv4Addr::new(127, 0, net, i), &ports).await);
    }
    out
}

/// The controller-manager as the suites run it against the shim at `socket` (local provider,
/// cluster `e2e`, leader election on).
fn spawn_lb_ccm(cp: &ControlPlane, socket: &Path, dir: &Path) -> Process {
    spawn_ccm_unix(
        cp,
        socket,
        "ccm",
        &["--cloud-provider=local".into(), "--cluster-name=e2e".into()],
        &[],
        dir,
    )
}

#[tokio::test]
async fn lb_address_and_listener_survive_a_shim_restart_and_go_with_the_service() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client) = control_plane().await;
    let dir = temp_dir("ccm-e2e-lb-", Location::System).unwrap();
    let d = dir.path();
    let inventory = write_inventory(d, &inventory("127.0.64")).unwrap();
    let config = lb_config(d, "127.0.65.0/28");
    let socket = d.join("shim.sock");
    // No hold: a deleted Service's address is free for the next one at once.
    let args = shim_lb_args(&config, &["--lb-address-hold=0s"]);
    let shim = spawn_shim(d, "local-shim", &inventory, &socket, &args);
    let _ccm = spawn_lb_ccm(&cp, &socket, d);
    initialise_nodes(&client).await;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    // Two Services, so the second holds an address that is not simply the lowest.
    services
        .create(
            &PostParams::default(),
            &lb_service("first", &[("TCP", 80)], &[]),
        )
        .await
        .unwrap();
    let first_ip = wait_address(&services, "first").await;
    let created = services
        .create(
            &PostParams::default(),
            &lb_service("second", &[("TCP", 8080)], &[]),
        )
        .await
        .unwrap();
    let second_ip = wait_address(&services, "second").await;
    let ports = node_ports(&created);
    let stand_ins = stand_ins(64, &ports).await;
    let client_ip = Ipv4Addr::LOCALHOST;
    let second = SocketAddr::new(second_ip, 8080);
    wait_for("the second Service to answer", WAIT, || async {
        tcp_hello(client_ip, second)
            .await
            .ok_or("no answer".to_string())
    })
    .await
    .unwrap();

    // Kill the shim hard and start it again on the same state: same address, listener back.
    shim.kill();
    drop(shim);
    let shim = spawn_shim(d, "local-shim-restarted", &inventory, &socket, &args);
    wait_for(
        "the second Service to answer after the restart",
        WAIT,
        || async {
            tcp_hello(client_ip, second)
                .await
                .ok_or("no answer".to_string())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nshim log:\n{}", shim.log_tail(40)));
    assert_eq!(wait_address(&services, "first").await, first_ip);
    assert_eq!(wait_address(&services, "second").await, second_ip);

    // Deleting the Service closes its listener and frees its address.
    services
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the listener of the deleted Service to close",
        WAIT,
        || async {
            match tcp_hello(client_ip, second).await {
                None => Ok(()),
                Some(answer) => Err(format!("still answered {answer:?}")),
            }
        },
    )
    .await
    .unwrap();
    services
        .create(
            &PostParams::default(),
            &lb_service("third", &[("TCP", 80)], &[]),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_address(&services, "third").await,
        second_ip,
        "the freed address is the lowest free one and goes to the next Service"
    );
    drop(stand_ins);
}

#[tokio::test]
async fn a_shim_fencing_on_another_lease_is_named_at_start_up_and_no_lb_controller_starts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, _client) = control_plane().await;
    let dir = temp_dir("ccm-e2e-lb-", Location::System).unwrap();
    let d = dir.path();
    let inventory = write_inventory(d, &inventory("127.0.66")).unwrap();
    let socket = d.join("shim.sock");
    let _shim = spawn_shim(
        d,
        "local-shim",
        &inventory,
        &socket,
        &["--fence-lease=infra/other".into()],
    );
    let ccm = spawn_lb_ccm(&cp, &socket, d);
    let ccm_ref = &ccm;
    wait_for("the controller-manager to lead", WAIT, || async move {
        if ccm_ref.logs().contains("became leader") {
            Ok(())
        } else {
            Err("not leading yet".to_string())
        }
    })
    .await
    .unwrap();
    let logs = ccm.logs();
    assert!(
        logs.contains("fences mutating calls on the lease \"infra/other\"")
            && logs.contains("--fence-lease=kube-system/cloud-controller-manager"),
        "the mismatch is named with the fix:\n{logs}"
    );
    assert!(
        !logs.contains("started controller controller=\"service-lb-controller\""),
        "the service-lb controller must not start:\n{logs}"
    );
    assert!(
        logs.contains("started controller controller=\"cloud-node-controller\""),
        "the other controllers run:\n{logs}"
    );
}
