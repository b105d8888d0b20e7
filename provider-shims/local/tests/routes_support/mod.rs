//! Shared pieces of the route tests: a throwaway network namespace driven with `ip`, and the
//! real `local-shim` binary serving it over mutual TLS (also used by the admission tests).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::routes_client::RoutesClient;
use cpi_transport::{ClientEndpoint, ClientTls, CpiChannel, TlsFiles};
use test_support::{Process, ShimMtls, free_port, wait_for};

#[path = "../lb_support/mod.rs"]
mod lb_support;

// Each route test crate uses its own subset.
#[allow(unused_imports)]
pub use lb_support::{CLUSTER, answering_channel, cpi, cpu_seconds, fence, scrape_metrics};
const INVENTORY: &str = include_str!("../../examples/inventory.yaml");

/// A network namespace of its own (test-support's, with `lo` up and a veth link `nodes0`
/// holding 10.99.0.1/16 and fd99::1/64, so node addresses 10.99.x.y and fd99::x are next hops),
/// deleted when dropped.
pub struct Netns {
    inner: test_support::Netns,
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let inner = test_support::Netns::create()
            .expect("the route tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's `ip`");
        inner
            .add_link("nodes0", &["10.99.0.1/16", "fd99::1/64"])
            .unwrap();
        Self {
            name: inner.name().to_string(),
            inner,
        }
    }

    /// `ip -n <ns> <args>`, panicking with `ip`'s error.
    pub fn ip(&self, args: &[&str]) -> String {
        self.inner.ip(args).unwrap()
    }

    /// Adds a route of another protocol (`static`) at `cidr` in the main table.
    pub fn add_static_route(&self, cidr: &str) {
        self.ip(&["route", "add", cidr, "via", "10.99.0.77", "proto", "static"]);
    }

    /// Asserts that the main table still routes `cidr` only as [`Netns::add_static_route`] did.
    pub fn assert_static_route_intact(&self, cidr: &str) {
        let lines = self.routes("-4", "main", cidr);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("via 10.99.0.77") && lines[0].contains("proto static"),
            "{lines:?}"
        );
    }

    /// Re-points the route of ours (protocol 108) at `cidr` in `table` through `via`, as
    /// someone changing it behind the shim's back.
    pub fn repoint_route(&self, cidr: &str, table: &str, via: &str) {
        self.ip(&[
            "route", "replace", cidr, "via", via, "table", table, "proto", "108",
        ]);
    }

    /// Lines of `ip -n <ns> <-4|-6> route show table <table>` naming `prefix`.
    pub fn routes(&self, family: &str, table: &str, prefix: &str) -> Vec<String> {
        self.ip(&[family, "route", "show", "table", table])
            .lines()
            .filter(|line| line.starts_with(prefix))
            .map(|line| line.trim().to_string())
            .collect()
    }
}

/// The real binary over mutual TLS, on a state directory that outlives restarts.
pub struct Shim {
    pub process: Process,
    /// The mTLS channel, for clients of other services.
    pub channel: CpiChannel,
    pub client: RoutesClient<CpiChannel>,
    pub metrics_port: u16,
}

/// Files of one shim: inventory, certificates, state.
pub struct ShimDir {
    pub dir: tempfile::TempDir,
    runs: AtomicU32,
}

impl ShimDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
        ShimMtls::write(dir.path(), "routes-test-ca").unwrap();
        Self {
            dir,
            runs: AtomicU32::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the binary with `extra` flags and waits until it answers.
    pub async fn start(&self, extra: &[String]) -> Shim {
        let dir = self.path();
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let port = free_port().unwrap();
        let metrics_port = free_port().unwrap();
        let mut args = vec![
            format!("--inventory={}", dir.join("inventory.yaml").display()),
            format!("--state-dir={}", dir.join("state").display()),
            format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
        ];
        args.extend(shim_tls_args(dir, port));
        args.extend(extra.iter().cloned());
        let process = Process::builder(
            format!("local-shim-routes-{run}"),
            env!("CARGO_BIN_EXE_local-shim"),
            dir.join(format!("shim-{run}.log")),
        )
        .args(args)
        .envs([("RUST_LOG", "info")])
        .spawn()
        .unwrap();
        let channel = connect(dir, port, &process).await;
        Shim {
            process,
            client: RoutesClient::new(channel.clone()),
            channel,
            metrics_port,
        }
    }
}

fn shim_tls_args(dir: &Path, port: u16) -> Vec<String> {
    vec![
        format!("--bind-address=127.0.0.1:{port}"),
        format!("--tls-cert-file={}", dir.join("shim.pem").display()),
        format!(
            "--tls-private-key-file={}",
            dir.join("shim-key.pem").display()
        ),
        format!("--client-ca-file={}", dir.join("ca.pem").display()),
        format!("--allowed-client-sans={}", ShimMtls::CCM_SAN),
    ]
}

async fn connect(dir: &Path, port: u16, process: &Process) -> CpiChannel {
    let files = TlsFiles {
        cert: dir.join("ccm.pem"),
        key: dir.join("ccm-key.pem"),
        ca: dir.join("ca.pem"),
    };
    let waited = wait_for(
        "the shim to answer over mTLS",
        Duration::from_secs(30),
        || {
            let files = files.clone();
            async move {
                let tls = ClientTls::new(files, ShimMtls::SHIM_SERVER_NAME.into(), Duration::ZERO)
                    .map_err(|e| e.to_string())?;
                answering_channel(ClientEndpoint::Tls {
                    uri: format!("https://127.0.0.1:{port}"),
                    tls,
                })
                .await
            }
        },
    )
    .await;
    match waited {
        Ok(channel) => channel,
        Err(error) => panic!("{error}\nshim log:\n{}", process.log_tail(40)),
    }
}

/// A route to `node` through its InternalIPs `addresses`.
pub fn route(node: &str, cidr: &str, addresses: &[&str]) -> pb::Route {
    pb::Route {
        target_node: node.into(),
        enable_node_addresses: true,
        target_node_addresses: addresses
            .iter()
            .map(|a| pb::NodeAddress {
                r#type: pb::NodeAddressType::InternalIp as i32,
                address: a.to_string(),
            })
            .collect(),
        destination_cidr: cidr.into(),
        ..Default::default()
    }
}

pub async fn create(
    client: &mut RoutesClient<CpiChannel>,
    route: pb::Route,
) -> Result<(), CpiError> {
    client
        .create_route(pb::CreateRouteRequest {
            cluster_name: CLUSTER.into(),
            name_hint: format!("uid-{}", route.target_node),
            route: Some(route),
            fence: fence(),
        })
        .await
        .map(|_| ())
        .map_err(|s| CpiError::from_status(&s))
}

pub async fn delete(client: &mut RoutesClient<CpiChannel>, cidr: &str) -> Result<(), CpiError> {
    client
        .delete_route(pb::DeleteRouteRequest {
            cluster_name: CLUSTER.into(),
            route: Some(pb::Route {
                destination_cidr: cidr.into(),
                ..Default::default()
            }),
            fence: fence(),
        })
        .await
        .map(|_| ())
        .map_err(|s| CpiError::from_status(&s))
}

/// Every page of ListRoutes, `page_size` at a time; also returns the number of pages.
pub async fn list_all(
    client: &mut RoutesClient<CpiChannel>,
    page_size: u32,
) -> (Vec<pb::Route>, usize) {
    let mut routes = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_routes(pb::ListRoutesRequest {
                cluster_name: CLUSTER.into(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.routes.len() <= page_size.max(1) as usize || page_size == 0);
        routes.extend(page.routes);
        if page.next_page_token.is_empty() {
            return (routes, pages);
        }
        token = page.next_page_token;
    }
}

/// The listed route for `cidr`.
pub fn listed<'a>(routes: &'a [pb::Route], cidr: &str) -> &'a pb::Route {
    routes
        .iter()
        .find(|r| r.destination_cidr == cidr)
        .unwrap_or_else(|| panic!("{cidr} not listed in {routes:#?}"))
}

/// `--route-netns` / `--route-table` flags for `netns`.
pub fn route_flags(netns: &Netns, table: &str) -> Vec<String> {
    vec![
        format!("--route-netns={}", netns.name),
        format!("--route-table={table}"),
    ]
}
