//! The route controller against a real kube-apiserver (v1.20 by default) and the fake provider
//! served over a real Unix socket: routes for every node's pod CIDRs and the
//! `NetworkUnavailable` condition written once, a deleted node's route removed, a failing
//! route's event and backoff while the others succeed, paged listings read whole before
//! anything is deleted, dual-stack, the route table's capacity, a CNI's condition, and the
//! watch-based mode. The pure rules (every upstream `TestReconcile`,
//! `TestUpdateNetworkingCondition` and `TestHandleNodeUpdate` case) are unit tests next to them
//! (`route::decide::tests`).
//!
//! Every test has its own fake provider, its own nodes (labelled with a per-test value the node
//! cache selects on) and its own cluster name. Most call one reconcile at a time, as upstream's
//! tests do, and read its [`RouteOutcome`] (how many routes were created, how many condition
//! patches were sent); the watch-based test runs the controller.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use cloud_controller_manager::route_rules::{
    CONDITION_NETWORK_UNAVAILABLE, REASON_NO_ROUTE_CREATED, REASON_ROUTE_CREATED,
};
use cloud_controller_manager::{
    CachedNode, ClusterCidrs, Fence, ListRoutesError, NodeInformer, RouteError, RouteOutcome,
    RouteSchedule, RouteSync,
};
use fake_provider::{CpiError, FakeCloud, call, proto};
use k8s_openapi::api::core::v1::{Event, Node, NodeCondition};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use support::{Harness, harness, harness_on};
use test_control_plane::{ControlPlane, Options, unique_name};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);
const CIDR: &str = "10.120.0.0/16";

/// One test's world: the fake provider, a node cache of this test's nodes, the controller.
struct Env {
    h: Harness,
    /// A control plane of this test's own, when it needs other API server options.
    _own: Option<ControlPlane>,
    label: String,
    cluster: String,
    nodes: Store<CachedNode>,
    node_changes: watch::Receiver<u64>,
    sync: Arc<RouteSync>,
    task: tokio::task::JoinHandle<()>,
    _fence: watch::Sender<Option<Fence>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fence() -> Fence {
    Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: "route-test".into(),
        lease_transitions: 1,
        lease_uid: "lease-uid".into(),
    }
}

impl Env {
    async fn new(fake: FakeCloud) -> Env {
        Self::with(harness(fake).await, None, CIDR).await
    }

    async fn with(h: Harness, own: Option<ControlPlane>, cidrs: &str) -> Env {
        let label = unique_name("rt");
        let informer = NodeInformer::selecting(
            h.client.clone(),
            watcher::Config::default().labels(&format!("routetest={label}")),
        );
        let nodes = informer.store.clone();
        let nodes_ready = informer.ready();
        let node_changes = informer.changes();
        let task = tokio::spawn(informer.run(std::future::pending()));
        tokio::time::timeout(WAIT, nodes_ready.clone().wait_for(|r| *r))
            .await
            .expect("node cache synced in time")
            .unwrap();
        let (fence_tx, fence_rx) = watch::channel(Some(fence()));
        let cluster = unique_name("cluster");
        let cidrs: ClusterCidrs = cidrs.parse().unwrap();
        let sync = Arc::new(RouteSync::new(
            h.client.clone(),
            h.cloud.clone().with_fence(fence_rx),
            cluster.clone(),
            cidrs,
            nodes.clone(),
            nodes_ready.clone(),
            h.recorder("route_controller"),
        ));
        Env {
            h,
            _own: own,
            label,
            cluster,
            nodes,
            node_changes,
            sync,
            task,
            _fence: fence_tx,
        }
    }

    fn api(&self) -> Api<Node> {
        Api::all(self.h.client.clone())
    }

    /// Creates a node of this test with these pod CIDRs and InternalIPs, optionally with a
    /// `NetworkUnavailable` condition, and waits for the cache to hold it. Returns its name.
    async fn node(
        &self,
        suffix: &str,
        cidrs: &[&str],
        ips: &[&str],
        network: Option<(&str, &str)>,
    ) -> String {
        let name = format!("{}-{suffix}", self.label);
        let mut spec = serde_json::json!({});
        if let Some(first) = cidrs.first() {
            spec = serde_json::json!({ "podCIDR": first, "podCIDRs": cidrs });
        }
        let mut status = serde_json::json!({
            "addresses": ips.iter().map(|ip| serde_json::json!({"type": "InternalIP", "address": ip})).collect::<Vec<_>>(),
        });
        if let Some((value, reason)) = network {
            status["conditions"] = serde_json::json!([{
                "type": CONDITION_NETWORK_UNAVAILABLE,
                "status": value,
                "reason": reason,
                "message": "set by the CNI",
                "lastTransitionTime": "2020-01-01T00:00:00Z",
                "lastHeartbeatTime": "2020-01-01T00:00:00Z",
            }]);
        }
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "routetest": self.label } },
            "spec": spec,
            "status": status,
        }))
        .unwrap();
        let created = self.h.create(node).await;
        self.wait_version(&created).await;
        name
    }

    async fn wait_version(&self, node: &Node) {
        let (name, version) = (node.name_any(), node.resource_version());
        self.wait_cache("the node cache to hold the node", move |store| {
            store
                .get(&ObjectRef::new(&name))
                .is_some_and(|c| c.resource_version() == version)
        })
        .await;
    }

    async fn delete_node(&self, name: &str) {
        self.api()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete node");
        let name = name.to_string();
        self.wait_cache("the node cache to drop the node", move |store| {
            store.get(&ObjectRef::new(&name)).is_none()
        })
        .await;
    }

    /// Waits until `holds` is true of the node cache.
    async fn wait_cache(&self, what: &str, holds: impl Fn(&Store<CachedNode>) -> bool) {
        test_support::wait_for(what, WAIT, || {
            let done = holds(&self.nodes);
            async move {
                if done {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        })
        .await
        .expect("node cache catches up");
    }

    async fn reconcile(&self) -> RouteOutcome {
        let outcome = self.sync.reconcile().await.expect("reconcile");
        // Let the cache see the condition patches before the next step reads it.
        for name in self.nodes.state().iter().map(|n| n.name_any()) {
            let stored = self.api().get(&name).await.unwrap();
            self.wait_version(&stored).await;
        }
        outcome
    }

    /// (status, reason) of the node's `NetworkUnavailable`, as stored.
    async fn network(&self, name: &str) -> Option<(String, String)> {
        let node = self.api().get(name).await.unwrap();
        condition(&node).map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
    }

    /// The stored routes as (target node, CIDR, addresses).
    fn routes(&self) -> Vec<(String, String, Vec<String>)> {
        let mut routes: Vec<_> = self
            .h
            .fake
            .routes(&self.cluster)
            .into_iter()
            .map(|r| {
                (
                    r.target_node,
                    r.destination_cidr,
                    r.target_node_addresses
                        .into_iter()
                        .map(|a| a.address)
                        .collect(),
                )
            })
            .collect();
        routes.sort();
        routes
    }

    /// Calls of `method` whose subject is `subject`.
    fn calls_about(&self, method: &str, subject: &str) -> usize {
        self.h
            .fake
            .call_log()
            .iter()
            .filter(|c| c.method == method && c.subject == subject)
            .count()
    }

    /// Events about node `name` with `reason`, once every queued event is written.
    async fn events(&self, name: &str, reason: &str) -> Vec<Event> {
        self.h.events.flush().await;
        Api::<Event>::all(self.h.client.clone())
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    fn add_route(&self, route: proto::Route) {
        let cluster = self.cluster.clone();
        self.h.fake.update(|s| s.add_route(&cluster, route));
    }
}

fn condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_NETWORK_UNAVAILABLE)
}

fn route(node: &str, cidr: &str) -> proto::Route {
    proto::Route {
        name: format!("{node}-{cidr}"),
        target_node: node.into(),
        destination_cidr: cidr.into(),
        ..proto::Route::default()
    }
}

fn owned(cluster: &str, owned: bool) -> Option<proto::Ownership> {
    Some(proto::Ownership {
        owned,
        cluster_id: Some(if owned { cluster } else { "someone-else" }.into()),
        object_uid: None,
    })
}

fn entry(node: &str, cidr: &str, ips: &[&str]) -> (String, String, Vec<String>) {
    (
        node.to_string(),
        cidr.to_string(),
        ips.iter().map(|s| s.to_string()).collect(),
    )
}

fn pair(status: &str, reason: &str) -> Option<(String, String)> {
    Some((status.to_string(), reason.to_string()))
}

#[tokio::test]
async fn routes_are_created_for_every_node_with_pod_cidrs_and_the_condition_written_once() {
    let env = Env::new(FakeCloud::default()).await;
    let a = env.node("a", &["10.120.1.0/24"], &["10.0.0.1"], None).await;
    let b = env.node("b", &["10.120.2.0/24"], &["10.0.0.2"], None).await;
    let c = env.node("c", &[], &["10.0.0.3"], None).await;

    let first = env.reconcile().await;
    assert_eq!(first.created, 2);
    assert_eq!(
        first.conditions_written, 2,
        "one patch per node with routes"
    );
    assert_eq!(
        env.routes(),
        vec![
            entry(&a, "10.120.1.0/24", &["10.0.0.1"]),
            entry(&b, "10.120.2.0/24", &["10.0.0.2"]),
        ]
    );
    assert_eq!(env.network(&a).await, pair("False", REASON_ROUTE_CREATED));
    assert_eq!(env.network(&b).await, pair("False", REASON_ROUTE_CREATED));
    assert_eq!(env.network(&c).await, None, "no pod CIDR: untouched");

    let second = env.reconcile().await;
    assert_eq!(
        second,
        RouteOutcome::default(),
        "nothing to do, nothing written"
    );
    assert_eq!(env.h.fake.count(call::CREATE_ROUTE), 2);
    assert_eq!(env.sync.metrics().route_sync.get(), 2);
    assert_eq!(env.sync.metrics().created.get(), 2);
}

#[tokio::test]
async fn a_deleted_nodes_route_is_removed_and_routes_not_ours_stay() {
    let env = Env::new(FakeCloud::default()).await;
    let a = env.node("a", &["10.120.1.0/24"], &["10.0.0.1"], None).await;
    let b = env.node("b", &["10.120.2.0/24"], &["10.0.0.2"], None).await;
    env.reconcile().await;
    // Outside the cluster CIDR, and inside it but another cluster's: never deleted.
    env.add_route(route("gateway", "192.168.0.0/24"));
    env.add_route(proto::Route {
        ownership: owned(&env.cluster, false),
        ..route("other-cluster-node", "10.120.200.0/24")
    });

    env.delete_node(&b).await;
    let outcome = env.reconcile().await;
    assert_eq!(outcome.deleted, 1);
    assert_eq!(outcome.foreign, 1);
    let mut want = vec![
        entry(&a, "10.120.1.0/24", &["10.0.0.1"]),
        entry("gateway", "192.168.0.0/24", &[]),
        entry("other-cluster-node", "10.120.200.0/24", &[]),
    ];
    want.sort();
    assert_eq!(env.routes(), want);
    assert_eq!(env.sync.metrics().foreign_routes.get(), 1);
}

#[tokio::test]
async fn a_failing_route_gets_an_event_and_backs_off_while_the_others_succeed() {
    let mut fake = FakeCloud::default();
    fake.route_create_errs.insert(
        "10.120.2.0/24".into(),
        CpiError::Cloud("quota exceeded".into()),
    );
    let env = Env::new(fake).await;
    let a = env.node("a", &["10.120.1.0/24"], &["10.0.0.1"], None).await;
    let b = env.node("b", &["10.120.2.0/24"], &["10.0.0.2"], None).await;

    let first = env.reconcile().await;
    assert_eq!((first.created, first.failed_creations), (1, 1));
    assert_eq!(
        env.routes(),
        vec![entry(&a, "10.120.1.0/24", &["10.0.0.1"])]
    );
    assert_eq!(env.network(&a).await, pair("False", REASON_ROUTE_CREATED));
    assert_eq!(env.network(&b).await, pair("True", REASON_NO_ROUTE_CREATED));
    let events = env.events(&b, "FailedToCreateRoute").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let message = events[0].message.clone().unwrap();
    let uid = env.api().get(&b).await.unwrap().uid().unwrap();
    assert!(
        message.starts_with(&format!(
            "Could not create route {uid} 10.120.2.0/24 for node {b} after "
        )),
        "{message}"
    );
    assert!(message.contains("quota exceeded"), "{message}");
    assert_eq!(events[0].involved_object.api_version.as_deref(), Some("v1"));

    // Within its backoff the failing route is not tried again; the condition is already right.
    let second = env.reconcile().await;
    assert_eq!(second.backing_off, 1);
    assert_eq!(second.conditions_written, 0);
    let subject = format!("{b}/10.120.2.0/24");
    assert_eq!(env.calls_about(call::CREATE_ROUTE, &subject), 1);
    assert_eq!(env.sync.failures(&b, "10.120.2.0/24"), 1);
    assert_eq!(env.sync.metrics().failures("create"), 1);
}

#[tokio::test]
async fn every_page_is_read_before_anything_is_deleted() {
    let fake = FakeCloud {
        route_page_size: 2,
        ..FakeCloud::default()
    };
    let env = Env::new(fake).await;
    let a = env.node("a", &["10.120.1.0/24"], &["10.0.0.1"], None).await;
    for i in 0..7 {
        env.add_route(route(
            &format!("gone-{i}"),
            &format!("10.120.{}.0/24", 100 + i),
        ));
    }
    // The third page fails: the whole listing fails and nothing is changed.
    env.h.fake.update(|s| {
        s.list_routes_page_errs
            .insert(3, CpiError::Cloud("page lost".into()));
    });
    let err = env.sync.reconcile().await.unwrap_err();
    assert!(
        matches!(err, RouteError::List(ListRoutesError::Page { page: 3, .. })),
        "{err}"
    );
    assert_eq!(env.h.fake.count(call::DELETE_ROUTE), 0);
    assert_eq!(env.h.fake.count(call::CREATE_ROUTE), 0);
    assert_eq!(env.routes().len(), 7);

    env.h.fake.update(|s| s.list_routes_page_errs.clear());
    env.h.fake.clear_calls();
    let outcome = env.reconcile().await;
    assert_eq!(
        env.h.fake.count(call::LIST_ROUTES),
        4,
        "7 routes in pages of 2"
    );
    let log = env.h.fake.call_log();
    let first_delete = log.iter().position(|c| c.method == call::DELETE_ROUTE);
    let last_list = log.iter().rposition(|c| c.method == call::LIST_ROUTES);
    assert!(first_delete > last_list, "all pages read first: {log:?}");
    assert_eq!((outcome.deleted, outcome.created), (7, 1));
    assert_eq!(
        env.routes(),
        vec![entry(&a, "10.120.1.0/24", &["10.0.0.1"])]
    );

    // A shim that repeats its page token is an error, not a loop.
    env.h.fake.update(|s| s.repeat_page_token = true);
    let err = env.sync.reconcile().await.unwrap_err();
    assert!(
        matches!(err, RouteError::List(ListRoutesError::RepeatedToken { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn dual_stack_nodes_get_a_route_per_family() {
    // v1.20 keeps a second pod CIDR only with its (alpha) dual-stack gate on.
    let cp = ControlPlane::start_with(Options {
        extra_apiserver_args: vec!["--feature-gates=IPv6DualStack=true".into()],
        ..Options::default()
    })
    .await
    .expect("a control plane with dual-stack on");
    let h = harness_on(cp.client().expect("admin client"), FakeCloud::default()).await;
    let env = Env::with(h, Some(cp), "10.120.0.0/16,fd00:120::/48").await;
    let a = env
        .node(
            "a",
            &["10.120.1.0/24", "fd00:120:0:1::/64"],
            &["10.0.0.1", "fd00::1"],
            None,
        )
        .await;
    let stored = env.api().get(&a).await.unwrap();
    assert_eq!(
        stored.spec.unwrap().pod_cidrs.unwrap_or_default().len(),
        2,
        "the API server keeps both pod CIDRs"
    );
    let outcome = env.reconcile().await;
    assert_eq!(outcome.created, 2);
    assert_eq!(
        env.routes(),
        vec![
            entry(&a, "10.120.1.0/24", &["10.0.0.1", "fd00::1"]),
            entry(&a, "fd00:120:0:1::/64", &["10.0.0.1", "fd00::1"]),
        ]
    );
    assert_eq!(env.network(&a).await, pair("False", REASON_ROUTE_CREATED));
}

#[tokio::test]
async fn routes_beyond_the_route_table_capacity_are_not_attempted() {
    let fake = FakeCloud {
        route_capacity: Some(2),
        ..FakeCloud::default()
    };
    let env = Env::new(fake).await;
    let a = env.node("a", &["10.120.1.0/24"], &[], None).await;
    let b = env.node("b", &["10.120.2.0/24"], &[], None).await;
    let c = env.node("c", &["10.120.3.0/24"], &[], None).await;

    let first = env.reconcile().await;
    assert_eq!((first.created, first.over_capacity), (2, 1));
    assert_eq!(
        env.h.fake.count(call::CREATE_ROUTE),
        2,
        "the third is not tried"
    );
    assert_eq!(env.sync.metrics().capacity_shortfall.get(), 1);
    assert_eq!(env.network(&a).await, pair("False", REASON_ROUTE_CREATED));
    assert_eq!(env.network(&b).await, pair("False", REASON_ROUTE_CREATED));
    assert_eq!(env.network(&c).await, pair("True", REASON_NO_ROUTE_CREATED));
    env.reconcile().await;
    assert_eq!(env.h.fake.count(call::CREATE_ROUTE), 2);
    let events = env.events(&c, "RouteCapacityExceeded").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].count.unwrap_or(1),
        1,
        "one event per node, not per reconcile"
    );
}

#[tokio::test]
async fn a_cnis_condition_is_replaced_by_route_created() {
    let env = Env::new(FakeCloud::default()).await;
    let a = env
        .node(
            "a",
            &["10.120.1.0/24"],
            &["10.0.0.1"],
            Some(("False", "CalicoIsUp")),
        )
        .await;
    let outcome = env.reconcile().await;
    assert_eq!(outcome.conditions_written, 1);
    let node = env.api().get(&a).await.unwrap();
    let c = condition(&node).unwrap();
    assert_eq!(c.status, "False");
    assert_eq!(c.reason.as_deref(), Some(REASON_ROUTE_CREATED));
    assert_eq!(
        c.message.as_deref(),
        Some("RouteController created a route")
    );
    // Still False since the CNI said so.
    assert_eq!(
        c.last_transition_time.as_ref().unwrap().0.to_string(),
        "2020-01-01T00:00:00Z"
    );
}

#[tokio::test]
async fn a_cnis_false_is_never_turned_true() {
    let mut fake = FakeCloud::default();
    fake.route_create_errs
        .insert("10.120.1.0/24".into(), CpiError::Cloud("nope".into()));
    let env = Env::new(fake).await;
    let a = env
        .node(
            "a",
            &["10.120.1.0/24"],
            &["10.0.0.1"],
            Some(("False", "CalicoIsUp")),
        )
        .await;
    let outcome = env.reconcile().await;
    assert_eq!(outcome.failed_creations, 1);
    assert_eq!(outcome.conditions_written, 0);
    assert_eq!(outcome.conditions_left, vec![a.clone()]);
    assert_eq!(env.network(&a).await, pair("False", "CalicoIsUp"));
}

/// Waits until the fake has answered at least `count` first ListRoutes pages (reconciles).
async fn wait_reconciles(env: &Env, count: usize) {
    let fake = &env.h.fake;
    test_support::wait_for(&format!("{count} reconciles"), WAIT, || {
        let n = fake
            .call_log()
            .iter()
            .filter(|c| c.method == call::LIST_ROUTES && c.subject.is_empty())
            .count();
        async move {
            if n >= count {
                Ok(n)
            } else {
                Err(format!("{n} reconciles"))
            }
        }
    })
    .await
    .expect("reconciles");
}

#[tokio::test]
async fn watch_based_mode_reconciles_on_a_pod_cidr_change_without_waiting_for_the_period() {
    let env = Env::new(FakeCloud::default()).await;
    let a = env.node("a", &[], &["10.0.0.1"], None).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(env.sync.clone().run(
        // At most one reconcile per 200 ms, and none without a node change.
        RouteSchedule::WatchBased(Duration::from_millis(200)),
        env.node_changes.clone(),
        Box::pin(async move {
            let _ = stop_rx.await;
        }),
    ));
    wait_reconciles(&env, 1).await;
    assert!(env.routes().is_empty());

    // A status heartbeat is not a reason to reconcile.
    let patched = env
        .api()
        .patch_status(
            &a,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"status": {"nodeInfo": {"kubeletVersion": "v1.20.2"}}}),
            ),
        )
        .await
        .unwrap();
    env.wait_version(&patched).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        env.h.fake.count(call::LIST_ROUTES),
        1,
        "no reconcile without a change that matters"
    );

    let patched = env
        .api()
        .patch(
            &a,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"podCIDR": "10.120.7.0/24", "podCIDRs": ["10.120.7.0/24"]}})),
        )
        .await
        .unwrap();
    env.wait_version(&patched).await;
    wait_reconciles(&env, 2).await;
    test_support::wait_for("the route of the new pod CIDR", WAIT, || {
        let routes = env.routes();
        let want = vec![entry(&a, "10.120.7.0/24", &["10.0.0.1"])];
        async move {
            if routes == want {
                Ok(())
            } else {
                Err(format!("{routes:?}"))
            }
        }
    })
    .await
    .unwrap();

    // A node added while a reconcile is held up is reconciled by the next run: nothing lost.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    env.h.fake.update(|s| {
        s.gates.insert(String::new(), gate.clone());
    });
    let b = env.node("b", &["10.120.8.0/24"], &["10.0.0.2"], None).await;
    wait_reconciles(&env, 3).await;
    let c = env.node("c", &["10.120.9.0/24"], &["10.0.0.3"], None).await;
    gate.add_permits(100);
    test_support::wait_for("routes of the nodes added during a run", WAIT, || {
        let routes = env.routes();
        let want = vec![
            entry(&a, "10.120.7.0/24", &["10.0.0.1"]),
            entry(&b, "10.120.8.0/24", &["10.0.0.2"]),
            entry(&c, "10.120.9.0/24", &["10.0.0.3"]),
        ];
        async move {
            if routes == want {
                Ok(())
            } else {
                Err(format!("{routes:?}"))
            }
        }
    })
    .await
    .unwrap();
    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, running)
        .await
        .expect("stops")
        .unwrap();
}
