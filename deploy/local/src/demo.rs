//! The demo load balancer: a LoadBalancer Service served by the `local` shim's proxy, with this
//! process standing in for kube-proxy on every node (the node port and `:10256/healthz`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cpi_proto::v1::NodeAddressType;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, PostParams};
use local_shim::Inventory;
use test_support::{KUBE_PROXY_HEALTH_PORT, Wait, load_balancer_service, serve_http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Name of the demo Service (namespace `default`).
const SERVICE: &str = "demo-web";

/// Creates the demo Service, serves its node port on every machine with a loopback
/// InternalIP, waits for its address and fetches a page through it. Returns the stand-in
/// servers, which must live as long as the demo.
pub async fn serve(
    client: kube::Client,
    inventory: &Inventory,
    timeout: Duration,
) -> Result<Vec<JoinHandle<()>>> {
    let services: Api<Service> = Api::namespaced(client, "default");
    println!("creating LoadBalancer Service default/{SERVICE} (port 80) ...");
    let created = services
        .create(
            &PostParams::default(),
            &load_balancer_service("default", SERVICE, &[("TCP", 80)]),
        )
        .await
        .with_context(|| format!("creating Service default/{SERVICE}"))?;
    let node_port = created
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port)
        .and_then(|p| u16::try_from(p).ok())
        .context("the API server allocated no node port to the demo Service")?;

    let mut servers = Vec::new();
    for machine in inventory.machines() {
        let Some(ip) = machine
            .addresses
            .iter()
            .filter(|a| a.r#type == NodeAddressType::InternalIp as i32)
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .find(IpAddr::is_loopback)
        else {
            println!(
                "  {}: no loopback InternalIP, so nothing stands in for kube-proxy there (its health check will fail)",
                machine.name
            );
            continue;
        };
        let greeting = format!("hello from {} ({ip}:{node_port})\n", machine.name);
        for (port, body) in [(node_port, greeting), (KUBE_PROXY_HEALTH_PORT, "ok".into())] {
            servers.push(
                serve_http(ip, port, body, || true)
                    .await
                    .with_context(|| format!("listening on {ip}:{port}"))?,
            );
        }
        println!(
            "  {}: serving node port {ip}:{node_port} and {ip}:{KUBE_PROXY_HEALTH_PORT}/healthz (as kube-proxy would)",
            machine.name
        );
    }

    let started = Instant::now();
    let address = Wait::new("the demo Service to get an address", timeout)
        .every(Duration::from_millis(200))
        .until(|| async {
            let svc = services
                .get(SERVICE)
                .await
                .map_err(|e| format!("reading the Service: {e}"))?;
            svc.status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .and_then(|ingress| ingress.into_iter().find_map(|i| i.ip))
                .ok_or_else(|| "no status.loadBalancer.ingress yet".to_string())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "  [{:>6.2}s] default/{SERVICE} has address {address}",
        started.elapsed().as_secs_f64()
    );

    // The shim marks a backend up after its first health check, so the first tries may be
    // refused.
    let page = Wait::new("the demo load balancer to answer", timeout)
        .every(Duration::from_millis(250))
        .until(|| async { get(&address, 80).await.map_err(|e| format!("{e:#}")) })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "  [{:>6.2}s] GET http://{address}/ through the load balancer: {}",
        started.elapsed().as_secs_f64(),
        page.trim_end()
    );
    println!("  try it: curl http://{address}/");
    Ok(servers)
}

/// `GET /` on `address:port` over HTTP/1.0; the body of a 200 answer.
async fn get(address: &str, port: u16) -> Result<String> {
    let mut conn =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((address, port)))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connecting to {address}:{port}"))?;
    conn.write_all(b"GET / HTTP/1.0\r\nhost: demo\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(2), conn.read_to_string(&mut response))
        .await
        .context("no answer within 2 s")??;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("not an HTTP answer: {response:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("answered {:?}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// Waits until every one of `total` nodes has pod CIDRs (from the node-ipam controller) and
/// `NetworkUnavailable=False` (its routes exist, in the shim's database for the demo), printing
/// each node once.
pub async fn pod_networking(client: kube::Client, total: usize, timeout: Duration) -> Result<()> {
    let nodes: Api<Node> = Api::all(client);
    let started = Instant::now();
    let shown = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let outcome = Wait::new("every node to have pod CIDRs and routes", timeout)
        .every(Duration::from_millis(200))
        .until(|| async {
            let list = nodes
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut shown = shown.borrow_mut();
            for node in list.items {
                let name = node.metadata.name.clone().unwrap_or_default();
                let cidrs = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_cidrs.clone())
                    .unwrap_or_default();
                let routed = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
                    });
                if cidrs.is_empty() || !routed || !shown.insert(name.clone()) {
                    continue;
                }
                println!(
                    "  [{:6.2}s] {name:<10} pod CIDRs {}, route created, NetworkUnavailable=False",
                    started.elapsed().as_secs_f64(),
                    cidrs.join(",")
                );
            }
            if shown.len() < total {
                Err(format!("{}/{total} nodes routed", shown.len()))
            } else {
                Ok(())
            }
        })
        .await;
    outcome.map_err(|e| anyhow::anyhow!("{e}"))
}
