//! The node-ipam controller (range allocator) against a real kube-apiserver: concurrent node
//! creation, restarts, an overlapping successor (a leader change), a full range, podCIDRs set by
//! someone else, dual-stack, reuse of a deleted node's CIDR, and the start-up settle taken only
//! when a predecessor may still be writing.
//!
//! Isolation: every test labels its nodes with its own run name and gives the controller a node
//! cache watching only that label, so tests share the control plane without seeing each other's
//! nodes. Dual-stack needs kube-apiserver's `IPv6DualStack` gate (v1.20 keeps only the first
//! podCIDR without it), so that test starts a control plane of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use cloud_controller_manager::events::EventBroadcaster;
use cloud_controller_manager::{
    AppError, IpamMetrics, IpamSettings, NodeInformer, NodeIpamController, Predecessor,
    REASON_CIDR_NOT_AVAILABLE, Succession,
};
use fake_provider::FakeCloud;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Event, Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use support::harness;
use test_control_plane::{ControlPlane, Options, unique_name};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The label naming a test's run on its nodes.
const RUN_LABEL: &str = "node-ipam-test/run";

/// How long allocations may take in total (a slow CI machine, hundreds of nodes).
const ALLOCATION_TIMEOUT: Duration = Duration::from_secs(180);

/// Quiet period before a new allocator's first CIDR (the production default).
const SETTLE: Duration = Duration::from_secs(2);

/// One test's API client, Event sink and run label.
struct Cluster {
    client: kube::Client,
    events: EventBroadcaster,
    run: String,
}

impl Cluster {
    /// A run on the control plane shared by this binary.
    async fn shared() -> Self {
        let h = harness(FakeCloud::default()).await;
        Self {
            client: h.client.clone(),
            events: h.events.clone(),
            run: unique_name("ipam"),
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn selector(&self) -> String {
        format!("{RUN_LABEL}={}", self.run)
    }

    /// A node of this run, with `pod_cidrs` already set when not empty.
    fn node(&self, name: &str, pod_cidrs: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([(RUN_LABEL.to_string(), self.run.clone())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: pod_cidrs.first().map(|c| (*c).to_string()),
                pod_cidrs: (!pod_cidrs.is_empty())
                    .then(|| pod_cidrs.iter().map(|c| (*c).to_string()).collect()),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    /// Creates `count` bare nodes of this run concurrently; returns their names.
    async fn create_nodes(&self, prefix: &str, count: usize) -> Vec<String> {
        let names: Vec<String> = (0..count)
            .map(|i| format!("{}-{prefix}-{i}", self.run))
            .collect();
        futures::stream::iter(names.clone())
            .map(|name| async move {
                self.nodes()
                    .create(&PostParams::default(), &self.node(&name, &[]))
                    .await
                    .expect("create node")
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        names
    }

    /// The run's nodes as stored.
    async fn list(&self) -> Vec<Node> {
        self.nodes()
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .expect("list nodes")
            .items
    }

    /// Waits until at least `count` of the run's nodes have podCIDRs; returns all of them.
    async fn wait_allocated(&self, count: usize) -> Vec<Node> {
        test_support::wait_for(
            format!("{count} nodes with podCIDRs"),
            ALLOCATION_TIMEOUT,
            || async move {
                let nodes = self.list().await;
                let done = nodes.iter().filter(|n| !cidrs_of(n).is_empty()).count();
                if done >= count {
                    Ok(nodes)
                } else {
                    Err(format!("{done} of {} nodes have podCIDRs", nodes.len()))
                }
            },
        )
        .await
        .expect("nodes get podCIDRs")
    }

    /// Starts an allocator over this run's nodes that knows nothing of its predecessor (so it
    /// settles first, as after a leader change).
    async fn start(&self, pools: &[(&str, u8)], service: &[&str]) -> Allocator {
        self.start_after(pools, service, Succession::unknown(), SETTLE)
            .await
    }

    /// Starts an allocator over this run's nodes whose term began as `succession` says, with
    /// a start-up quiet period of `settle`.
    async fn start_after(
        &self,
        pools: &[(&str, u8)],
        service: &[&str],
        succession: Succession,
        settle: Duration,
    ) -> Allocator {
        let informer = NodeInformer::selecting(
            self.client.clone(),
            watcher::Config::default().labels(&self.selector()),
        );
        let mut registry = Registry::default();
        let metrics = IpamMetrics::register(&mut registry);
        let settings = IpamSettings {
            pools: pools
                .iter()
                .map(|(c, m)| (c.parse().unwrap(), *m))
                .collect(),
            service_ranges: service.iter().map(|c| c.parse().unwrap()).collect(),
            settle,
        };
        let controller = NodeIpamController::new(
            self.client.clone(),
            informer.store.clone(),
            informer.ready(),
            informer.changes(),
            self.events.new_recorder("node-ipam-controller"),
            &settings,
            metrics.clone(),
        )
        .expect("controller")
        .with_succession(succession);
        let watch = tokio::spawn(informer.run(std::future::pending()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller.run_until(async move {
            let _ = stopped.await;
        }));
        Allocator {
            stop: Some(stop),
            task,
            watch,
            metrics,
            registry,
        }
    }

    /// Deletes the run's nodes (best effort: the control plane may be private and gone soon).
    async fn cleanup(&self) {
        let _ = self
            .nodes()
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&self.selector()),
            )
            .await;
    }
}

/// A running allocator.
struct Allocator {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    watch: JoinHandle<()>,
    metrics: IpamMetrics,
    registry: Registry,
}

impl Allocator {
    /// Tells it to stop (its patches under way still finish).
    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops it and waits until it has.
    async fn stop(mut self) {
        self.signal_stop();
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("allocator stops in time")
            .expect("allocator task");
        self.watch.abort();
    }

    /// Asserts that a scrape of its metrics has `line`.
    fn assert_scraped(&self, line: &str) {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.task.abort();
        self.watch.abort();
    }
}

/// Waits until all `count` nodes of the run have podCIDRs, checks them with
/// [`assert_distinct`], then stops `ipam` and deletes the nodes.
async fn expect_all_distinct(c: &Cluster, ipam: Allocator, count: usize, pools: &[&str]) {
    let nodes = c.wait_allocated(count).await;
    assert_eq!(nodes.len(), count);
    assert_distinct(&nodes, pools);
    ipam.stop().await;
    c.cleanup().await;
}

/// The node's podCIDRs.
fn cidrs_of(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
}

/// Every node has podCIDRs inside `pools` (one per pool, in order, podCIDR the first), and no
/// CIDR is on two nodes.
fn assert_distinct(nodes: &[Node], pools: &[&str]) {
    let pools: Vec<IpNet> = pools.iter().map(|p| p.parse().unwrap()).collect();
    let mut seen = HashSet::new();
    for node in nodes {
        let cidrs = cidrs_of(node);
        assert_eq!(cidrs.len(), pools.len(), "{}: {cidrs:?}", node.name_any());
        assert_eq!(
            node.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()),
            cidrs.first(),
            "podCIDR is the first podCIDRs entry"
        );
        for (cidr, pool) in cidrs.iter().zip(&pools) {
            let net: IpNet = cidr.parse().unwrap();
            assert!(
                pool.contains(&net),
                "{cidr} of {} outside {pool}",
                node.name_any()
            );
            assert!(seen.insert(cidr.clone()), "{cidr} handed out twice");
        }
    }
}

#[tokio::test]
async fn five_hundred_nodes_created_concurrently_get_distinct_cidrs() {
    let c = Cluster::shared().await;
    let pools = [("10.128.0.0/15", 24)];
    let ipam = c.start(&pools, &[]).await;
    c.create_nodes("n", 500).await;
    c.wait_allocated(500).await;
    ipam.assert_scraped(
        "node_ipam_controller_cidrset_cidrs_allocations_total{clusterCIDR=\"10.128.0.0/15\"} 500",
    );
    expect_all_distinct(&c, ipam, 500, &["10.128.0.0/15"]).await;
}

#[tokio::test]
async fn a_restart_mid_way_hands_out_no_cidr_twice() {
    let c = Cluster::shared().await;
    let pools = [("10.130.0.0/16", 24)];
    let first = c.start(&pools, &[]).await;
    let creating = c.create_nodes("n", 200);
    let partial = async {
        c.wait_allocated(40).await;
        first.stop().await;
    };
    tokio::join!(creating, partial);
    let second = c.start(&pools, &[]).await;
    expect_all_distinct(&c, second, 200, &["10.130.0.0/16"]).await;
}

#[tokio::test]
async fn an_overlapping_successor_hands_out_no_cidr_twice() {
    // A leader change: the successor starts while the predecessor's last patches still land.
    let c = Cluster::shared().await;
    let pools = [("10.131.0.0/16", 24)];
    let mut first = c.start(&pools, &[]).await;
    let creating = c.create_nodes("n", 200);
    let handover = async {
        c.wait_allocated(30).await;
        first.signal_stop();
        let second = c.start(&pools, &[]).await;
        first.stop().await;
        second
    };
    let ((), second) = tokio::join!(async { drop(creating.await) }, handover);
    expect_all_distinct(&c, second, 200, &["10.131.0.0/16"]).await;
}

/// A settle longer than any test waits (the allocator caps it at 30 s).
const ENDLESS_SETTLE: Duration = Duration::from_secs(3600);

/// Well within the capped settle: allocations seen by then did not wait for it.
const BEFORE_SETTLE_ENDS: Duration = Duration::from_secs(20);

#[tokio::test]
async fn without_a_predecessor_allocation_starts_without_settling() {
    // The Lease was free, released, created or ours (or --leader-elect=false): nobody else
    // can have podCIDR writes in flight, so the quiet period is skipped.
    let c = Cluster::shared().await;
    let ipam = c
        .start_after(
            &[("10.136.0.0/16", 24)],
            &[],
            Succession::known(Predecessor::None),
            ENDLESS_SETTLE,
        )
        .await;
    c.create_nodes("n", 20).await;
    let nodes = test_support::wait_for(
        "20 nodes with podCIDRs before the settle could have ended",
        BEFORE_SETTLE_ENDS,
        || async {
            let nodes = c.list().await;
            let done = nodes.iter().filter(|n| !cidrs_of(n).is_empty()).count();
            if done == 20 {
                Ok(nodes)
            } else {
                Err(format!("{done} of {} nodes have podCIDRs", nodes.len()))
            }
        },
    )
    .await
    .expect("allocation does not wait for a settle");
    assert_distinct(&nodes, &["10.136.0.0/16"]);
    ipam.stop().await;
    c.cleanup().await;
}

#[tokio::test]
async fn after_an_unreleased_predecessor_allocation_waits_for_the_settle() {
    // The Lease was taken over from a holder that did not release it: its last patches may
    // still land, so nothing is handed out until others' writes have been quiet long enough.
    let c = Cluster::shared().await;
    let ipam = c
        .start_after(
            &[("10.137.0.0/16", 24)],
            &[],
            Succession::known(Predecessor::Unreleased("replica-a".into())),
            ENDLESS_SETTLE,
        )
        .await;
    c.create_nodes("n", 5).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let allocated = c
        .list()
        .await
        .iter()
        .filter(|n| !cidrs_of(n).is_empty())
        .count();
    assert_eq!(allocated, 0, "a CIDR was handed out while settling");
    ipam.stop().await;
    c.cleanup().await;
}

#[tokio::test]
async fn a_full_range_gives_cidr_not_available() {
    let c = Cluster::shared().await;
    // Four /30 blocks.
    let ipam = c.start(&[("10.132.0.0/28", 30)], &[]).await;
    c.create_nodes("n", 5).await;
    let nodes = c.wait_allocated(4).await;
    let without: Vec<String> = nodes
        .iter()
        .filter(|n| cidrs_of(n).is_empty())
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(without.len(), 1, "one node is left without a CIDR");
    let name = &without[0];
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let event = test_support::wait_for(
        "the CIDRNotAvailable Event",
        Duration::from_secs(60),
        || {
            let events = events.clone();
            let fields = format!("involvedObject.name={name},reason={REASON_CIDR_NOT_AVAILABLE}");
            async move {
                let list = events
                    .list(&ListParams::default().fields(&fields))
                    .await
                    .map_err(|e| e.to_string())?;
                list.items
                    .into_iter()
                    .next()
                    .ok_or_else(|| "none yet".to_string())
            }
        },
    )
    .await
    .expect("CIDRNotAvailable event");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.involved_object.kind.as_deref(), Some("Node"));
    assert_eq!(event.involved_object.api_version.as_deref(), Some("v1"));
    assert_eq!(
        event.source.as_ref().and_then(|s| s.component.as_deref()),
        Some("node-ipam-controller")
    );
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("Node {name} status is now: CIDRNotAvailable")),
        "{event:?}"
    );
    assert!(ipam.metrics.failures(REASON_CIDR_NOT_AVAILABLE) >= 1);
    ipam.assert_scraped(
        "node_ipam_controller_allocation_failures_total{reason=\"CIDRNotAvailable\"}",
    );
    ipam.assert_scraped(
        "node_ipam_controller_cidrset_usage_cidrs{clusterCIDR=\"10.132.0.0/28\"} 1.0",
    );
    ipam.stop().await;
    c.cleanup().await;
}

#[tokio::test]
async fn pod_cidrs_set_by_someone_else_are_respected_and_never_handed_out() {
    let c = Cluster::shared().await;
    // Four /26 blocks; the first is taken before the allocator starts, the third after.
    let before = format!("{}-before", c.run);
    c.nodes()
        .create(&PostParams::default(), &c.node(&before, &["10.133.0.0/26"]))
        .await
        .expect("create node with podCIDRs");
    let ipam = c.start(&[("10.133.0.0/24", 26)], &[]).await;
    let after = format!("{}-after", c.run);
    c.nodes()
        .create(
            &PostParams::default(),
            &c.node(&after, &["10.133.0.128/26"]),
        )
        .await
        .expect("create node with podCIDRs");
    // The allocator has seen it: wait for its cache to hold it through a CIDR given out later.
    c.create_nodes("n", 2).await;
    let nodes = c.wait_allocated(4).await;
    assert_distinct(&nodes, &["10.133.0.0/24"]);
    let by_name = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name_any() == name)
            .map(cidrs_of)
            .unwrap()
    };
    assert_eq!(by_name(&before), vec!["10.133.0.0/26"]);
    assert_eq!(by_name(&after), vec!["10.133.0.128/26"]);
    ipam.stop().await;
    c.cleanup().await;
}

#[tokio::test]
async fn a_deleted_nodes_cidr_is_reused_later() {
    let c = Cluster::shared().await;
    // Two /25 blocks.
    let ipam = c.start(&[("10.134.0.0/24", 25)], &[]).await;
    let names = c.create_nodes("n", 2).await;
    let nodes = c.wait_allocated(2).await;
    let freed = nodes
        .iter()
        .find(|n| n.name_any() == names[0])
        .map(cidrs_of)
        .unwrap();
    c.nodes()
        .delete(&names[0], &DeleteParams::default())
        .await
        .expect("delete node");
    c.create_nodes("later", 1).await;
    let nodes = c.wait_allocated(2).await;
    assert_eq!(nodes.len(), 2);
    assert_distinct(&nodes, &["10.134.0.0/24"]);
    let later = nodes
        .iter()
        .find(|n| n.name_any().contains("-later-"))
        .unwrap();
    assert_eq!(
        cidrs_of(later),
        freed,
        "the deleted node's CIDR is given out again"
    );
    ipam.stop().await;
    c.cleanup().await;
}

#[tokio::test]
async fn dual_stack_nodes_get_one_cidr_of_each_family() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start_with(Options {
        extra_apiserver_args: vec!["--feature-gates=IPv6DualStack=true".to_string()],
        ..Options::default()
    })
    .await
    .expect("a control plane with IPv6DualStack (set KUBEBUILDER_ASSETS to the test assets)");
    let client = cp.client().expect("admin client");
    let c = Cluster {
        events: EventBroadcaster::start(client.clone(), "node-ipam-test"),
        client,
        run: unique_name("ipam-dual"),
    };
    let pools = [("10.135.0.0/16", 24), ("fd00:135::/48", 64)];
    let ipam = c.start(&pools, &["10.135.0.0/24"]).await;
    c.create_nodes("n", 10).await;
    let nodes = c.wait_allocated(10).await;
    assert_distinct(&nodes, &["10.135.0.0/16", "fd00:135::/48"]);
    // The service range's block is never handed out.
    assert!(
        nodes.iter().all(|n| cidrs_of(n)[0] != "10.135.0.0/24"),
        "a CIDR inside --service-cluster-ip-range was handed out"
    );
    ipam.stop().await;
}

#[tokio::test]
async fn allocate_node_cidrs_without_cluster_cidr_fails_the_start_up() {
    let h = harness(FakeCloud::default()).await;
    let cp = ControlPlane::shared().await.expect("shared control plane");
    let options = cloud_controller_manager::Options::try_parse_from([
        "cloud-controller-manager".to_string(),
        format!("--kubeconfig={}", cp.kubeconfig_path().display()),
        format!(
            "--provider-endpoint=unix://{}",
            h.fake.socket_path().display()
        ),
        "--leader-elect=false".to_string(),
        "--secure-port=0".to_string(),
        "--allocate-node-cidrs=true".to_string(),
        "--controllers=node-ipam-controller".to_string(),
    ])
    .expect("flags parse");
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        cloud_controller_manager::run(options, std::future::pending()),
    )
    .await
    .expect("the manager gives up at start-up instead of running");
    match result {
        Err(AppError::ControllerFlags { controller, source }) => {
            assert_eq!(controller, "node-ipam-controller");
            assert_eq!(source.flag, "--cluster-cidr");
            assert!(
                source.message.contains("--allocate-node-cidrs=true"),
                "{source}"
            );
        }
        other => panic!("expected a start-up error naming --cluster-cidr, got {other:?}"),
    }
}
