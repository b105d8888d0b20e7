//! The upstream `controllers/service/controller_test.go` cases that need the API server or the
//! provider, one `#[tokio::test]` per case, against a real kube-apiserver (v1.20 by default) and
//! the fake provider served over a real Unix socket; plus end-to-end runs of the controller for
//! the guarantees it adds (no write before the caches sync, readiness never triggers an update,
//! one update per service per node change, finalizer before the first cloud write).
//!
//! Test names are `<upstream test function>__<upstream case name>` in snake case. The pure
//! cases (`TestNeedsUpdate`, `TestNeedsCleanup`, `Test_respectsPredicates`,
//! `TestListWithPredicate`, `Test_shouldSyncUpdatedNode_*`, `TestServiceCache`,
//! `TestServiceQueueDelay`, the no-op decisions of `TestAddFinalizer`/`TestRemoveFinalizer`/
//! `TestPatchStatus`) are unit tests next to the rules (`service_lb::decide::tests`,
//! `service_lb::cache::tests`).
//!
//! Every test uses its own namespace, its own nodes (labelled with a per-test value the node
//! cache selects on) and its own fake provider. API writes of the controller go through a
//! client that logs every request and can answer `PATCH services/status` with a scripted
//! error (upstream's reactor on `patch services`).
//!
//! Fixture adaptations (the rule under test is unchanged):
//! - v1.20 has no `spec.loadBalancerClass`: the "service specifies loadBalancerClass" case sets
//!   it on the cached copy handed to the sync, as upstream hands the object directly;
//! - upstream's `nil` service in a list becomes an empty Service (no type), which the node sync
//!   skips the same way;
//! - the node-lister error of `TestNodeChangesInExternalLoadBalancer` is a node cache that has
//!   not synced (the one way listing nodes fails here);
//! - upstream's fake `GetLoadBalancer` logs nothing; ours logs `get`, so assertions on the
//!   call log look at `create`, `update` and `delete`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, non_snake_case)]

mod support;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_NOT_READY;
use cloud_controller_manager::{
    CachedNode, CachedService, Cloud, Fence, NodeInformer, Op, ServiceChange, ServiceInformer,
    ServiceLb, ServiceSyncError, WatchMetrics,
};
use fake_provider::{CpiError, FakeCloud, FakeZone, call};
use k8s_openapi::api::core::v1::{
    Event, LoadBalancerIngress, LoadBalancerStatus, Namespace, Node, NodeCondition, NodeSpec,
    NodeStatus, Service, ServicePort, ServiceSpec, Taint,
};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use support::{Harness, harness};
use test_control_plane::{ControlPlane, unique_name};
use tokio::sync::watch;

const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
const AUTOSCALER: &str = "ToBeDeletedByClusterAutoscaler";
const EXTERNAL_IP: &str = "203.0.113.10";
const WAIT: Duration = Duration::from_secs(15);

// ------------------------------------------------------------------------------------------------
// The controller's API client: logs every request, answers scripted errors on status patches
// ------------------------------------------------------------------------------------------------

type Body = Box<kube::client::DynBody>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Default)]
struct ApiLog {
    requests: Arc<Mutex<Vec<String>>>,
    /// HTTP code and Status reason answered to every `PATCH .../services/*/status`.
    fault: Arc<Mutex<Option<(u16, &'static str)>>>,
}

impl ApiLog {
    /// `PATCH` requests of `services/status` so far.
    fn status_patches(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                r.starts_with("PATCH ") && r.contains("/services/") && r.ends_with("/status")
            })
            .count()
    }
}

struct Logged<S> {
    inner: S,
    log: ApiLog,
}

impl<S> tower::Layer<S> for ApiLog {
    type Service = Logged<S>;
    fn layer(&self, inner: S) -> Logged<S> {
        Logged {
            inner,
            log: self.clone(),
        }
    }
}

impl<S> tower::Service<http::Request<kube::client::Body>> for Logged<S>
where
    S: tower::Service<
            http::Request<kube::client::Body>,
            Response = http::Response<Body>,
            Error = BoxError,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let line = format!("{} {}", request.method(), request.uri().path());
        let status_patch = request.method() == http::Method::PATCH
            && line.contains("/services/")
            && line.ends_with("/status");
        self.log.requests.lock().unwrap().push(line);
        let fault = *self.log.fault.lock().unwrap();
        if let (true, Some((code, reason))) = (status_patch, fault) {
            let body = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("scripted {reason}"), "reason": reason, "code": code,
            });
            let body: Body = Box::new(
                http_body_util::Full::new(hyper::body::Bytes::from(body.to_string()))
                    .map_err(|never| match never {}),
            );
            let response = http::Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.inner.call(request))
    }
}

use http_body_util::BodyExt as _;

// ------------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------------

/// One test's world: a namespace, a node label, caches of both, the fake provider and a
/// controller client that logs its requests.
struct Env {
    h: Harness,
    ns: String,
    label: String,
    client: kube::Client,
    api: ApiLog,
    cloud: Cloud,
    services: Store<CachedService>,
    nodes: Store<CachedNode>,
    nodes_ready: watch::Receiver<bool>,
    node_changes: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _fence: watch::Sender<Option<Fence>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn fence() -> Fence {
    Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: "service-lb-test".into(),
        lease_transitions: 1,
        lease_uid: "lease-uid".into(),
    }
}

/// The fake of upstream's tests: region `us-central`, an external IP for the ingress.
fn fake() -> FakeCloud {
    FakeCloud {
        external_ip: EXTERNAL_IP.into(),
        zone: FakeZone {
            failure_domain: String::new(),
            region: "us-central".into(),
        },
        ..FakeCloud::default()
    }
}

/// Creates a namespace named from `prefix` and returns its name.
async fn create_namespace(client: &kube::Client, prefix: &str) -> String {
    let ns = unique_name(prefix);
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("create namespace");
    ns
}

impl Env {
    async fn new(fake: FakeCloud) -> Env {
        let h = harness(fake).await;
        let cp = ControlPlane::shared().await.expect("shared control plane");
        let api = ApiLog::default();
        let client = kube::client::ClientBuilder::try_from(cp.kube_config())
            .expect("client builder")
            .with_layer(&api)
            .build();
        let ns = create_namespace(&h.client, "lb").await;
        let label = unique_name("n");
        let informer = ServiceInformer::selecting(
            Api::namespaced(h.client.clone(), &ns),
            watcher::Config::default(),
        );
        let services = informer.store.clone();
        let mut services_ready = informer.ready();
        let svc_task = tokio::spawn(informer.run(|_| {}, std::future::pending()));
        let nodes = NodeInformer::selecting(
            h.client.clone(),
            watcher::Config::default().labels(&format!("lbtest={label}")),
        );
        let node_store = nodes.store.clone();
        let nodes_ready = nodes.ready();
        let node_changes = nodes.changes();
        let node_task = tokio::spawn(nodes.run(std::future::pending()));
        tokio::time::timeout(WAIT, services_ready.wait_for(|r| *r))
            .await
            .expect("service cache synced in time")
            .unwrap();
        tokio::time::timeout(WAIT, nodes_ready.clone().wait_for(|r| *r))
            .await
            .expect("node cache synced in time")
            .unwrap();
        let (fence_tx, fence_rx) = watch::channel(Some(fence()));
        let cloud = h.cloud.clone().with_fence(fence_rx);
        Env {
            h,
            ns,
            label,
            client,
            api,
            cloud,
            services,
            nodes: node_store,
            nodes_ready,
            node_changes,
            tasks: vec![svc_task, node_task],
            _fence: fence_tx,
        }
    }

    /// A controller over this world's caches, with the logging client.
    fn controller(&self) -> Arc<ServiceLb> {
        self.controller_with(self.nodes_ready.clone())
    }

    fn controller_with(&self, nodes_ready: watch::Receiver<bool>) -> Arc<ServiceLb> {
        Arc::new(ServiceLb::new(
            self.client.clone(),
            self.cloud.clone(),
            "kubernetes".into(),
            self.services.clone(),
            self.nodes.clone(),
            nodes_ready,
            self.node_changes.clone(),
            self.h.recorder("service-controller"),
        ))
    }

    fn service_api(&self) -> Api<Service> {
        Api::namespaced(self.h.client.clone(), &self.ns)
    }

    /// Creates `svc` (and its status, when set) and returns it as the cache holds it.
    async fn create_service(&self, svc: Service) -> Arc<CachedService> {
        let status = svc.status.clone();
        let name = svc.name_any();
        let mut stored = self
            .service_api()
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
        if let Some(status) = status {
            stored = self
                .service_api()
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
                )
                .await
                .expect("set service status");
        }
        self.cached(&stored).await
    }

    /// The cache's copy of `svc` once it holds that version.
    async fn cached(&self, svc: &Service) -> Arc<CachedService> {
        let key = ObjectRef::new(&svc.name_any()).within(&self.ns);
        let version = svc.resource_version();
        let store = self.services.clone();
        test_support::wait_for("the service cache to hold the service", WAIT, || {
            let found = store.get(&key).filter(|s| s.resource_version() == version);
            async move { found.ok_or_else(|| "an older version or none".to_string()) }
        })
        .await
        .expect("service cache catches up")
    }

    async fn get_service(&self, name: &str) -> Option<Service> {
        self.service_api().get_opt(name).await.expect("get service")
    }

    fn node_api(&self) -> Api<Node> {
        Api::all(self.h.client.clone())
    }

    /// Creates `node` carrying this test's label, with its status, and waits for the cache.
    async fn create_node(&self, mut node: Node) -> Node {
        node.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert("lbtest".into(), self.label.clone());
        let created = self.h.create(node).await;
        self.wait_nodes(std::slice::from_ref(&created)).await;
        created
    }

    /// Patches a node and waits for the cache to hold the result.
    async fn patch_node(&self, name: &str, patch: serde_json::Value) -> Node {
        let patched = self
            .node_api()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch node");
        self.wait_nodes(std::slice::from_ref(&patched)).await;
        patched
    }

    async fn patch_node_status(&self, name: &str, patch: serde_json::Value) -> Node {
        let patched = self
            .node_api()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch node status");
        self.wait_nodes(std::slice::from_ref(&patched)).await;
        patched
    }

    async fn delete_node(&self, name: &str) {
        self.node_api()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete node");
        let store = self.nodes.clone();
        let name = name.to_string();
        test_support::wait_for("the node cache to drop the node", WAIT, || {
            let gone = store.get(&ObjectRef::new(&name)).is_none();
            async move {
                if gone {
                    Ok(())
                } else {
                    Err("still cached".to_string())
                }
            }
        })
        .await
        .expect("node cache catches up");
    }

    async fn wait_nodes(&self, nodes: &[Node]) {
        let store = self.nodes.clone();
        test_support::wait_for("the node cache to hold the nodes", WAIT, || {
            let fresh = nodes.iter().all(|n| {
                store
                    .get(&ObjectRef::new(&n.name_any()))
                    .is_some_and(|c| c.resource_version() == n.resource_version())
            });
            async move {
                if fresh {
                    Ok(())
                } else {
                    Err("older versions".to_string())
                }
            }
        })
        .await
        .expect("node cache catches up");
    }

    /// Creates the LoadBalancer Service `name` and waits until the running controller has
    /// written its ingress.
    async fn create_lb_and_wait(&self, name: &str) -> Service {
        self.service_api()
            .create(&PostParams::default(), &lb(name))
            .await
            .unwrap();
        wait_for_ingress(self, name).await
    }

    /// Waits until the fake has seen at least `count` UpdateLoadBalancer calls.
    async fn wait_update_calls(&self, count: usize) {
        let fake = &self.h.fake;
        test_support::wait_for(&format!("{count} UpdateLoadBalancer calls"), WAIT, || {
            let n = fake.update_calls().len();
            async move {
                if n >= count {
                    Ok(())
                } else {
                    Err(format!("{n} updates"))
                }
            }
        })
        .await
        .unwrap();
    }

    /// Names of the hosts of every UpdateLoadBalancer call so far.
    fn update_hosts(&self) -> Vec<Vec<String>> {
        self.h
            .fake
            .update_calls()
            .into_iter()
            .map(|c| c.hosts)
            .collect()
    }

    /// Methods of the create/update/delete calls so far.
    fn writes(&self) -> Vec<&'static str> {
        self.h
            .fake
            .lb_calls()
            .into_iter()
            .map(|c| c.method)
            .filter(|m| *m != call::GET)
            .collect()
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        self.h.events.flush().await;
        Api::<Event>::namespaced(self.h.client.clone(), &self.ns)
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }
}

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

/// Upstream `newService(name, type)`: one port 80 of `protocol`.
fn service(name: &str, type_: &str, protocol: &str) -> Service {
    let mut svc = Service::default();
    svc.metadata.name = Some(name.into());
    svc.spec = Some(ServiceSpec {
        type_: Some(type_.into()),
        ports: Some(vec![ServicePort {
            port: 80,
            protocol: Some(protocol.into()),
            ..ServicePort::default()
        }]),
        ..ServiceSpec::default()
    });
    svc
}

fn lb(name: &str) -> Service {
    service(name, "LoadBalancer", "TCP")
}

fn finalized(mut svc: Service) -> Service {
    svc.metadata.finalizers = Some(vec![FINALIZER.into()]);
    svc
}

fn ingress(ip: &str) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some(ip.into()),
            ..LoadBalancerIngress::default()
        }]),
    }
}

fn with_ingress(mut svc: Service, ip: &str) -> Service {
    svc.status = Some(k8s_openapi::api::core::v1::ServiceStatus {
        load_balancer: Some(ingress(ip)),
        ..Default::default()
    });
    svc
}

fn etp_local(mut svc: Service) -> Service {
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    svc
}

/// Upstream `makeNode`: Ready, providerID set.
fn node(name: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n.spec = Some(NodeSpec {
        provider_id: Some(format!("fake://{name}")),
        ..NodeSpec::default()
    });
    n.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..NodeCondition::default()
        }]),
        ..NodeStatus::default()
    });
    n
}

fn without_provider_id(mut n: Node) -> Node {
    n.spec.as_mut().unwrap().provider_id = None;
    n
}

/// `count` nodes named `<prefix>-node<i>` (1-based) for this test.
async fn nodes(env: &Env, count: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 1..=count {
        let name = format!("{}-node{i}", env.label);
        env.create_node(node(&name)).await;
        names.push(name);
    }
    names
}

fn names(nodes: &[String], which: &[usize]) -> Vec<String> {
    which.iter().map(|i| nodes[i - 1].clone()).collect()
}

fn sorted(mut calls: Vec<Vec<String>>) -> Vec<Vec<String>> {
    calls.sort();
    calls
}

// ------------------------------------------------------------------------------------------------
// TestSyncLoadBalancerIfNeeded
// ------------------------------------------------------------------------------------------------

/// Runs `sync_load_balancer_if_needed` on `svc` and returns (op, result, status patches).
async fn sync_once(env: &Env, svc: &CachedService) -> (Op, Result<(), ServiceSyncError>, usize) {
    let before = env.api.status_patches();
    let ctrl = env.controller();
    let (op, result) = ctrl.sync_load_balancer_if_needed(svc, &svc.key()).await;
    (op, result, env.api.status_patches() - before)
}

#[tokio::test]
async fn sync_load_balancer_if_needed__service_doesnt_want_lb() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env
        .create_service(service("no-external-balancer", "ClusterIP", "TCP"))
        .await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Delete);
    assert_eq!(env.writes(), Vec::<&str>::new(), "no create or delete");
    assert_eq!(patches, 0);
}

async fn wants_lb(protocol: &str) {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env
        .create_service(service(
            &format!("{}-service", protocol.to_lowercase()),
            "LoadBalancer",
            protocol,
        ))
        .await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Ensure);
    assert_eq!(env.writes(), [call::CREATE]);
    let state = env.h.fake.state().clone();
    assert_eq!(state.balancers.len(), 1);
    let balancer = state.balancers.values().next().unwrap();
    let uid = svc.uid().unwrap().replace('-', "");
    assert_eq!(balancer.name, format!("a{uid}")[..32.min(uid.len() + 1)]);
    assert_eq!(balancer.region, "us-central");
    assert_eq!(balancer.ports[0].port, 80);
    assert_eq!(balancer.ports[0].protocol, protocol);
    assert_eq!(patches, 2, "finalizer + status");
    let stored = env.get_service(&svc.name_any()).await.unwrap();
    assert_eq!(
        stored.metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
    assert_eq!(
        stored.status.unwrap().load_balancer.unwrap(),
        ingress(EXTERNAL_IP)
    );
}

#[tokio::test]
async fn sync_load_balancer_if_needed__udp_service_that_wants_lb() {
    wants_lb("UDP").await;
}

#[tokio::test]
async fn sync_load_balancer_if_needed__tcp_service_that_wants_lb() {
    wants_lb("TCP").await;
}

#[tokio::test]
async fn sync_load_balancer_if_needed__sctp_service_that_wants_lb() {
    wants_lb("SCTP").await;
}

#[tokio::test]
async fn sync_load_balancer_if_needed__service_specifies_load_balancer_class() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let stored = env.create_service(lb("with-external-balancer")).await;
    // v1.20 prunes spec.loadBalancerClass: set it on the copy handed to the sync.
    let mut full = stored.to_service();
    full.spec.as_mut().unwrap().load_balancer_class = Some("custom-loadbalancer".into());
    let svc = CachedService::from(full);
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Delete);
    assert_eq!(env.writes(), Vec::<&str>::new(), "no create");
    assert_eq!(patches, 0);
}

#[tokio::test]
async fn sync_load_balancer_if_needed__service_with_finalizer_that_no_longer_wants_lb() {
    let env = Env::new(FakeCloud {
        exists: true,
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let svc = env
        .create_service(with_ingress(
            finalized(service("no-external-balancer", "ClusterIP", "TCP")),
            "8.8.8.8",
        ))
        .await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Delete);
    assert_eq!(env.writes(), [call::DELETE]);
    assert_eq!(patches, 2, "finalizer removal + status clear");
    let stored = env.get_service(&svc.name_any()).await.unwrap();
    assert_eq!(stored.metadata.finalizers, None);
    assert_eq!(
        stored
            .status
            .unwrap()
            .load_balancer
            .unwrap_or_default()
            .ingress,
        None
    );
}

#[tokio::test]
async fn sync_load_balancer_if_needed__service_that_needs_cleanup() {
    let env = Env::new(FakeCloud {
        exists: true,
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let created = env
        .create_service(with_ingress(finalized(lb("basic-service1")), "8.8.8.8"))
        .await;
    env.service_api()
        .delete(&created.name_any(), &DeleteParams::default())
        .await
        .expect("delete service");
    let deleting = env.get_service(&created.name_any()).await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    let svc = env.cached(&deleting).await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Delete);
    assert_eq!(env.writes(), [call::DELETE]);
    assert_eq!(
        patches, 2,
        "finalizer removal + status clear (404, ignored)"
    );
    assert!(env.get_service(&created.name_any()).await.is_none(), "gone");
}

#[tokio::test]
async fn sync_load_balancer_if_needed__service_with_finalizer_that_wants_lb() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env.create_service(finalized(lb("basic-service1"))).await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Ensure);
    assert_eq!(env.writes(), [call::CREATE]);
    assert_eq!(patches, 1, "status only");
}

// ------------------------------------------------------------------------------------------------
// TestUpdateNodesInExternalLoadBalancer (3 nodes, empty lastSyncedNodes)
// ------------------------------------------------------------------------------------------------

/// A Service that exists only in the test (node syncs read nothing else of it).
fn local(svc: Service, ns: &str) -> Arc<CachedService> {
    let mut svc = svc;
    svc.metadata.namespace = Some(ns.into());
    svc.metadata.uid = Some(unique_name("uid"));
    Arc::new(svc.into())
}

async fn update_nodes(
    services: impl Fn(&str) -> Vec<Arc<CachedService>>,
    workers: usize,
    want: usize,
) {
    let env = Env::new(fake()).await;
    let node_names = nodes(&env, 3).await;
    let ctrl = env.controller();
    let retry = ctrl
        .update_load_balancer_hosts(services(&env.ns), workers)
        .await;
    assert!(retry.is_empty(), "no retries: {retry:?}");
    let calls = env.update_hosts();
    assert_eq!(calls.len(), want, "{calls:?}");
    for hosts in calls {
        assert_eq!(hosts, node_names);
    }
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__no_services_present() {
    update_nodes(|_| vec![], 1, 0).await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__services_do_not_have_external_load_balancers() {
    update_nodes(
        |ns| {
            vec![
                local(service("s0", "ClusterIP", "TCP"), ns),
                local(service("s1", "NodePort", "TCP"), ns),
            ]
        },
        1,
        0,
    )
    .await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__services_does_have_an_external_load_balancer() {
    update_nodes(|ns| vec![local(lb("s0"), ns)], 1, 1).await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__three_services_have_an_external_load_balancer() {
    update_nodes(
        |ns| {
            vec![
                local(lb("s0"), ns),
                local(lb("s1"), ns),
                local(lb("s2"), ns),
            ]
        },
        1,
        3,
    )
    .await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__two_services_have_an_external_load_balancer_and_two_dont()
 {
    update_nodes(
        |ns| {
            vec![
                local(service("s0", "NodePort", "TCP"), ns),
                local(lb("s1"), ns),
                local(lb("s3"), ns),
                local(service("s4", "ClusterIP", "TCP"), ns),
            ]
        },
        1,
        2,
    )
    .await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__one_service_has_an_external_load_balancer_and_one_is_nil()
 {
    update_nodes(
        |ns| vec![local(lb("s0"), ns), Arc::new(CachedService::default())],
        1,
        1,
    )
    .await;
}

#[tokio::test]
async fn update_nodes_in_external_load_balancer__four_services_have_external_load_balancer_with_only_2_workers()
 {
    update_nodes(
        |ns| {
            vec![
                local(lb("s0"), ns),
                local(lb("s1"), ns),
                local(lb("s3"), ns),
                local(lb("s4"), ns),
            ]
        },
        2,
        4,
    )
    .await;
}

// ------------------------------------------------------------------------------------------------
// TestNodeChangesForStableNodeSetEnabled (3 LB services, two with ETP=Local, lastSynced seeded)
// ------------------------------------------------------------------------------------------------

/// Seeds lastSyncedNodes with `initial` nodes, applies `change`, runs one node sync and
/// returns the hosts of the update calls it made.
async fn stable_node_set<F, Fut>(
    env: &Env,
    initial: usize,
    change: F,
) -> (Vec<String>, Vec<Vec<String>>)
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = ()>,
{
    let node_names = nodes(env, initial).await;
    let ctrl = env.controller();
    for svc in [
        local(lb("s0"), &env.ns),
        local(etp_local(lb("s1")), &env.ns),
        local(etp_local(lb("s2")), &env.ns),
    ] {
        ctrl.cache().set(&svc.key(), svc);
    }
    ctrl.sync_nodes().await;
    assert_eq!(
        env.update_hosts().len(),
        3,
        "seeding syncs every service once"
    );
    env.h.fake.clear_calls();
    change(node_names.clone()).await;
    ctrl.sync_nodes().await;
    (node_names, env.update_hosts())
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__no_node_changes() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (_, calls) = stable_node_set(env, 3, |_| async {}).await;
    assert_eq!(calls.len(), 0);
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_new_node_gets_added() {
    let env = Env::new(fake()).await;
    let label = env.label.clone();
    let (nodes, calls) = stable_node_set(&env, 2, |_| async {
        env.create_node(node(&format!("{label}-node3"))).await;
    })
    .await;
    let mut all = nodes;
    all.push(format!("{label}-node3"));
    assert_eq!(
        calls,
        vec![all.clone(), all.clone(), all],
        "ETP=Local treated the same"
    );
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_new_node_gets_added_with_retries() {
    let env = Env::new(FakeCloud {
        exists: true,
        ..fake()
    })
    .await;
    let node_names = nodes(&env, 2).await;
    let ctrl = env.controller();
    for svc in [
        local(lb("s0"), &env.ns),
        local(etp_local(lb("s1")), &env.ns),
        local(etp_local(lb("s2")), &env.ns),
    ] {
        ctrl.cache().set(&svc.key(), svc);
    }
    ctrl.sync_nodes().await;
    env.h.fake.clear_calls();
    env.create_node(node(&format!("{}-node3", env.label))).await;
    env.h
        .fake
        .update(|f| f.update_err = Some(CpiError::Cloud("update failed".into())));
    let retry = ctrl
        .update_load_balancer_hosts(ctrl.cache().all_services(), 1)
        .await;
    assert_eq!(retry.len(), 3, "every failed service is retried");
    // The retry pass sees the same nodes: lastSyncedNodes was stored despite the failures.
    let again = ctrl
        .update_load_balancer_hosts(ctrl.cache().all_services(), 1)
        .await;
    assert!(again.is_empty());
    let mut three = node_names;
    three.push(format!("{}-node3", env.label));
    assert_eq!(
        env.update_hosts(),
        vec![three.clone(), three.clone(), three]
    );
    assert_eq!(
        env.events("UpdateLoadBalancerFailed").await.len(),
        3,
        "one Warning per failed service"
    );
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_node_goes_not_ready() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (_, calls) = stable_node_set(env, 3, |n| async move {
        env.patch_node_status(
            &n[1],
            serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        )
        .await;
    })
    .await;
    assert_eq!(calls.len(), 0, "readiness is ignored");
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_node_gets_tainted() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (nodes, calls) = stable_node_set(env, 3, |n| async move {
        env.patch_node(
            &n[1],
            serde_json::json!({"spec": {"taints": [{"key": AUTOSCALER, "value": "1", "effect": "NoSchedule"}]}}),
        )
        .await;
    })
    .await;
    let want = names(&nodes, &[1, 3]);
    assert_eq!(calls, vec![want.clone(), want.clone(), want]);
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_node_goes_ready() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (_, calls) = stable_node_set(env, 3, |n| async move {
        // node2 starts NotReady in upstream's case; here it is flipped twice, and neither flip
        // reaches a load balancer.
        for status in ["False", "True"] {
            env_patch_ready(env, &n[1], status).await;
        }
    })
    .await;
    assert_eq!(calls.len(), 0, "readiness is ignored");
}

async fn env_patch_ready(env: &Env, name: &str, status: &str) {
    env.patch_node_status(
        name,
        serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": status}]}}),
    )
    .await;
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_node_get_excluded() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (nodes, calls) = stable_node_set(env, 3, |n| async move {
        env.patch_node(
            &n[1],
            serde_json::json!({"metadata": {"labels": {EXCLUDE: ""}}}),
        )
        .await;
    })
    .await;
    let want = names(&nodes, &[1, 3]);
    assert_eq!(calls, vec![want.clone(), want.clone(), want]);
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_old_node_gets_deleted() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (nodes, calls) = stable_node_set(env, 3, |n| async move {
        env.delete_node(&n[2]).await;
    })
    .await;
    let want = names(&nodes, &[1, 2]);
    assert_eq!(calls, vec![want.clone(), want.clone(), want]);
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_node_marked_for_deletion() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (nodes, calls) = stable_node_set(env, 3, |n| async move {
        // A finalizer keeps the node around with its deletion timestamp.
        env.patch_node(
            &n[1],
            serde_json::json!({"metadata": {"finalizers": ["example.com/keep"]}}),
        )
        .await;
        env.node_api()
            .delete(&n[1], &DeleteParams::default())
            .await
            .expect("delete node");
        let deleting = env.node_api().get(&n[1]).await.unwrap();
        assert!(deleting.metadata.deletion_timestamp.is_some());
        env.wait_nodes(std::slice::from_ref(&deleting)).await;
    })
    .await;
    let want = names(&nodes, &[1, 3]);
    assert_eq!(calls, vec![want.clone(), want.clone(), want]);
    // Let the node go.
    env.node_api()
        .patch(
            &nodes[1],
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn node_changes_for_stable_node_set_enabled__1_spurious_node_update() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (_, calls) = stable_node_set(env, 3, |n| async move {
        env.patch_node(
            &n[1],
            serde_json::json!({"spec": {"taints": [{"key": "Other", "value": "1", "effect": "NoSchedule"}]}}),
        )
        .await;
    })
    .await;
    assert_eq!(calls.len(), 0);
}

// ------------------------------------------------------------------------------------------------
// TestNodeChangesInExternalLoadBalancer (4 LB services, one controller across the cases)
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn node_changes_in_external_load_balancer__all_cases_in_sequence() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let services: Vec<_> = (0..4)
        .map(|i| local(lb(&format!("s{i}")), &env.ns))
        .collect();
    for svc in &services {
        ctrl.cache().set(&svc.key(), svc.clone());
    }
    let mut all = Vec::new();
    for (case, count, workers) in [("only 1 node", 1, 3), ("2 nodes", 2, 1), ("4 nodes", 4, 3)] {
        while all.len() < count {
            let name = format!("{}-node{}", env.label, all.len() + 1);
            env.create_node(node(&name)).await;
            all.push(name);
        }
        env.h.fake.clear_calls();
        let retry = ctrl
            .update_load_balancer_hosts(ctrl.cache().all_services(), workers)
            .await;
        assert!(retry.is_empty(), "{case}: no retries");
        assert_eq!(
            env.update_hosts(),
            vec![all.clone(); 4],
            "{case}: every service updated with every node"
        );
    }
    // "error occur during sync" (3 workers) and "... with 1 workers": listing nodes fails.
    let (_, not_synced) = watch::channel(false);
    let failing = env.controller_with(not_synced);
    for svc in &services {
        failing.cache().set(&svc.key(), svc.clone());
    }
    for (case, workers) in [
        ("error occur during sync", 3),
        ("error occur during sync with 1 workers", 1),
    ] {
        env.h.fake.clear_calls();
        let mut retry = failing
            .update_load_balancer_hosts(failing.cache().all_services(), workers)
            .await;
        retry.sort();
        let mut keys: Vec<String> = services.iter().map(|s| s.key()).collect();
        keys.sort();
        assert_eq!(retry, keys, "{case}: every service retried");
        assert_eq!(env.update_hosts().len(), 0, "{case}: no update calls");
    }
}

// ------------------------------------------------------------------------------------------------
// TestNodesNotEqual
// ------------------------------------------------------------------------------------------------

async fn nodes_not_equal<F, Fut>(env: &Env, initial: Vec<Node>, change: F) -> usize
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    for n in initial {
        env.create_node(n).await;
    }
    let ctrl = env.controller();
    for svc in [local(lb("s0"), &env.ns), local(lb("s1"), &env.ns)] {
        ctrl.cache().set(&svc.key(), svc);
    }
    ctrl.sync_nodes().await;
    env.h.fake.clear_calls();
    change().await;
    ctrl.sync_nodes().await;
    env.update_hosts().len()
}

#[tokio::test]
async fn nodes_not_equal__nodes_with_updated_provider_id() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (a, b) = (
        format!("{}-node1", env.label),
        format!("{}-node2", env.label),
    );
    let updates = nodes_not_equal(
        env,
        vec![without_provider_id(node(&a)), without_provider_id(node(&b))],
        || async {
            for name in [&a, &b] {
                env.patch_node(
                    name,
                    serde_json::json!({"spec": {"providerID": format!("fake://{name}")}}),
                )
                .await;
            }
        },
    )
    .await;
    assert_eq!(updates, 2, "both services updated");
}

#[tokio::test]
async fn nodes_not_equal__nodes_unchanged() {
    let env = Env::new(fake()).await;
    let env = &env;
    let (a, b) = (
        format!("{}-node1", env.label),
        format!("{}-node2", env.label),
    );
    let updates = nodes_not_equal(env, vec![node(&a), node(&b)], || async {}).await;
    assert_eq!(updates, 0);
}

#[tokio::test]
async fn nodes_not_equal__change_node_with_empty_provider_id() {
    let env = Env::new(fake()).await;
    let label = env.label.clone();
    let (a, b) = (format!("{label}-node1"), format!("{label}-node2"));
    let updates = nodes_not_equal(
        &env,
        vec![without_provider_id(node(&a)), without_provider_id(node(&b))],
        || async {
            env.delete_node(&b).await;
            env.create_node(without_provider_id(node(&format!("{label}-node3"))))
                .await;
        },
    )
    .await;
    assert_eq!(updates, 2);
}

// ------------------------------------------------------------------------------------------------
// TestProcessServiceCreateOrUpdate, TestProcessServiceCreateOrUpdateK8sError
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn process_service_create_or_update__if_updating_a_valid_service() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("sync-test-name")).await;
    let ctrl = env.controller();
    ctrl.process_service_create_or_update(svc.clone())
        .await
        .unwrap();
    assert!(ctrl.cache().get(&svc.key()).is_some());
}

#[tokio::test]
async fn process_service_create_or_update__if_updating_loadbalancer_ip() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("sync-test-name")).await;
    let ctrl = env.controller();
    ctrl.process_service_create_or_update(svc.clone())
        .await
        .unwrap();
    let updated = env
        .service_api()
        .patch(
            "sync-test-name",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"loadBalancerIP": "1.1.1.1"}})),
        )
        .await
        .unwrap();
    let new = env.cached(&updated).await;
    let old = ctrl.cache().get(&svc.key()).unwrap();
    ctrl.on_service_change(ServiceChange::Applied {
        old: Some(old),
        new: new.clone(),
    });
    assert_eq!(ctrl.queue().len(), 1);
    assert_eq!(
        ctrl.queue().get().await.unwrap(),
        format!("{}/sync-test-name", env.ns)
    );
    ctrl.process_service_create_or_update(new).await.unwrap();
    let cached = ctrl.cache().get(&svc.key()).unwrap();
    assert_eq!(cached.spec().load_balancer_ip.as_deref(), Some("1.1.1.1"));
}

async fn k8s_error(code: u16, reason: &'static str) -> (Env, Result<(), ServiceSyncError>) {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env.create_service(finalized(lb("svc"))).await;
    *env.api.fault.lock().unwrap() = Some((code, reason));
    let result = env.controller().process_service_create_or_update(svc).await;
    (env, result)
}

#[tokio::test]
async fn process_service_create_or_update_k8s_error__conflict_error() {
    let (env, result) = k8s_error(409, "Conflict").await;
    let err = result.unwrap_err();
    assert!(matches!(err, ServiceSyncError::Status(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("failed to update load balancer status: "),
        "{err}"
    );
    let events = env.events("SyncLoadBalancerFailed").await;
    assert_eq!(events.len(), 1);
    let message = events[0].message.clone().unwrap_or_default();
    assert!(message.contains("Error syncing load balancer"), "{message}");
}

#[tokio::test]
async fn process_service_create_or_update_k8s_error__not_found_error() {
    let (_env, result) = k8s_error(404, "NotFound").await;
    result.unwrap();
}

// ------------------------------------------------------------------------------------------------
// TestSyncService, TestProcessServiceDeletion
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sync_service__if_an_invalid_service_name_is_synced() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let err = ctrl.sync_service("invalid/key/string").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"unexpected key format: "invalid/key/string""#
    );
    assert!(ctrl.cache().get("invalid/key/string").is_none());
}

#[tokio::test]
async fn sync_service__if_valid_service() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let svc = local(lb("external-balancer"), &env.ns);
    ctrl.cache().set(&svc.key(), svc.clone());
    ctrl.sync_service(&svc.key()).await.unwrap();
    assert!(
        ctrl.cache().get(&svc.key()).is_none(),
        "deletion path dropped it"
    );
    assert_eq!(env.writes(), [call::DELETE]);
}

#[tokio::test]
async fn process_service_deletion__if_a_non_existent_service_is_deleted() {
    let env = Env::new(fake()).await;
    env.controller()
        .process_service_deletion(&format!("{}/gone", env.ns))
        .await
        .unwrap();
    assert!(env.writes().is_empty());
}

#[tokio::test]
async fn process_service_deletion__if_cloudprovided_failed_to_delete_the_service() {
    let env = Env::new(FakeCloud {
        delete_err: Some(CpiError::Cloud("error Deleting the Loadbalancer".into())),
        ..fake()
    })
    .await;
    let ctrl = env.controller();
    let svc = local(lb("external-balancer"), &env.ns);
    ctrl.cache().set(&svc.key(), svc.clone());
    let err = ctrl.process_service_deletion(&svc.key()).await.unwrap_err();
    assert_eq!(
        err.cpi_error(),
        Some(&CpiError::Cloud("error Deleting the Loadbalancer".into()))
    );
    assert_eq!(err.reason(), "DeleteLoadBalancerFailed");
    assert!(ctrl.cache().get(&svc.key()).is_some(), "kept for the retry");
}

#[tokio::test]
async fn process_service_deletion__if_delete_was_successful() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let svc = local(lb("external-balancer"), &env.ns);
    ctrl.cache().set(&svc.key(), svc.clone());
    ctrl.process_service_deletion(&svc.key()).await.unwrap();
    assert!(ctrl.cache().get(&svc.key()).is_none());
}

// ------------------------------------------------------------------------------------------------
// TestSlowNodeSync
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn slow_node_sync() {
    let env = Env::new(fake()).await;
    let label = env.label.clone();
    nodes(&env, 2).await;
    let ctrl = env.controller();
    let s1 = env.create_service(lb("service1")).await;
    let s2 = env.create_service(lb("service2")).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    env.h.fake.update(|f| {
        f.gates.insert(s1.key(), gate.clone());
        f.gates.insert(s2.key(), gate.clone());
    });
    ctrl.cache().set(&s1.key(), s1.clone());
    ctrl.cache().set(&s2.key(), s2.clone());
    // The node sync (1 worker) blocks inside its first UpdateLoadBalancer.
    let syncing = tokio::spawn({
        let ctrl = ctrl.clone();
        async move {
            ctrl.update_load_balancer_hosts(ctrl.cache().all_services(), 1)
                .await
        }
    });
    let fake = &env.h.fake;
    // The call log records a call on arrival; `update_calls` once answered.
    let arrived = || -> Vec<String> {
        fake.lb_calls()
            .into_iter()
            .filter(|c| c.method == call::UPDATE)
            .map(|c| c.subject)
            .collect()
    };
    test_support::wait_for("the node sync to reach UpdateLoadBalancer", WAIT, || {
        let n = arrived().len();
        async move {
            if n == 1 {
                Ok(())
            } else {
                Err(format!("{n} update calls"))
            }
        }
    })
    .await
    .unwrap();
    let blocked = arrived()[0].clone();
    let other = if blocked == s1.key() { &s2 } else { &s1 };
    // Meanwhile a node is added and the other service is synced.
    env.create_node(node(&format!("{label}-node3"))).await;
    env.h.fake.update(|f| {
        f.gates.clear();
    });
    ctrl.sync_service(&other.key()).await.unwrap();
    gate.add_permits(10);
    assert!(syncing.await.unwrap().is_empty());
    let updates = env.h.fake.update_calls();
    let ensures = env.h.fake.ensure_calls();
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(
        updates[0].hosts,
        [format!("{label}-node1"), format!("{label}-node2")]
    );
    assert_eq!(ensures.len(), 1);
    assert_eq!(ensures[0].service, other.key());
    assert_eq!(
        ensures[0].hosts,
        [
            format!("{label}-node1"),
            format!("{label}-node2"),
            format!("{label}-node3")
        ]
    );
}

// ------------------------------------------------------------------------------------------------
// TestAddFinalizer / TestRemoveFinalizer / TestPatchStatus (against the API server)
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn add_finalizer__no_op_and_add() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let with = env.create_service(finalized(lb("with"))).await;
    ctrl.add_finalizer(&with).await.unwrap();
    assert_eq!(env.api.status_patches(), 0, "no-op add finalizer");
    let without = env.create_service(lb("without")).await;
    ctrl.add_finalizer(&without).await.unwrap();
    assert_eq!(env.api.status_patches(), 1, "add finalizer");
    let stored = env.get_service("without").await.unwrap();
    assert_eq!(
        stored.metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
    assert!(stored.spec.unwrap().ports.is_some(), "spec untouched");
}

#[tokio::test]
async fn remove_finalizer__no_op_and_remove() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let without = env.create_service(lb("without")).await;
    ctrl.remove_finalizer(&without).await.unwrap();
    assert_eq!(env.api.status_patches(), 0, "no-op remove finalizer");
    let mut other = finalized(lb("with"));
    other.metadata.finalizers = Some(vec!["example.com/other".into(), FINALIZER.into()]);
    let with = env.create_service(other).await;
    ctrl.remove_finalizer(&with).await.unwrap();
    assert_eq!(env.api.status_patches(), 1, "remove finalizer");
    let stored = env.get_service("with").await.unwrap();
    assert_eq!(
        stored.metadata.finalizers,
        Some(vec!["example.com/other".to_string()]),
        "other writers' finalizers stay"
    );
    // Release the service.
    env.service_api()
        .patch(
            "with",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn patch_status__no_op_add_clear() {
    let env = Env::new(fake()).await;
    let ctrl = env.controller();
    let with = env
        .create_service(with_ingress(lb("with"), "8.8.8.8"))
        .await;
    ctrl.patch_status(&with, &ingress("8.8.8.8")).await.unwrap();
    assert_eq!(env.api.status_patches(), 0, "no-op add status");
    let without = env.create_service(lb("without")).await;
    ctrl.patch_status(&without, &ingress("8.8.8.8"))
        .await
        .unwrap();
    assert_eq!(env.api.status_patches(), 1, "add status");
    assert_eq!(
        env.get_service("without")
            .await
            .unwrap()
            .status
            .unwrap()
            .load_balancer
            .unwrap(),
        ingress("8.8.8.8")
    );
    ctrl.patch_status(&without, &LoadBalancerStatus::default())
        .await
        .unwrap();
    assert_eq!(
        env.api.status_patches(),
        1,
        "no-op clear status (cached copy has none)"
    );
    ctrl.patch_status(&with, &LoadBalancerStatus::default())
        .await
        .unwrap();
    assert_eq!(env.api.status_patches(), 2, "clear status");
    assert_eq!(
        env.get_service("with")
            .await
            .unwrap()
            .status
            .unwrap()
            .load_balancer
            .unwrap_or_default()
            .ingress,
        None
    );
}

// ------------------------------------------------------------------------------------------------
// TestServiceQueueDelay through the real sync (the pure half is a unit test)
// ------------------------------------------------------------------------------------------------

async fn queue_delay(ensure_err: Option<CpiError>) -> (Arc<ServiceLb>, String, Env) {
    let env = Env::new(FakeCloud {
        ensure_err,
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("svc")).await;
    let ctrl = env.controller();
    ctrl.queue().add(svc.key());
    assert!(ctrl.process_next_service_item().await);
    (ctrl, svc.key(), env)
}

#[tokio::test]
async fn service_queue_delay__processing_successful() {
    let (ctrl, key, _env) = queue_delay(None).await;
    assert_eq!(ctrl.queue().num_requeues(&key), 0);
    assert_eq!(ctrl.queue().delayed(), 0);
}

#[tokio::test]
async fn service_queue_delay__regular_error() {
    let (ctrl, key, _env) = queue_delay(Some(CpiError::Cloud("boom".into()))).await;
    assert_eq!(ctrl.queue().num_requeues(&key), 1);
    assert_eq!(ctrl.queue().delayed(), 1);
}

#[tokio::test]
async fn service_queue_delay__retry_error() {
    let (ctrl, key, _env) = queue_delay(Some(CpiError::RetryAfter {
        message: "LB create in progress".into(),
        delay: Duration::from_secs(42),
    }))
    .await;
    assert_eq!(ctrl.queue().num_requeues(&key), 0, "no backoff");
    assert_eq!(ctrl.queue().delayed(), 1, "AddAfter(42s)");
}

// ------------------------------------------------------------------------------------------------
// Provider answers and bad objects
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn implemented_elsewhere__finalizer_added_status_left_alone() {
    let env = Env::new(FakeCloud {
        ensure_err: Some(CpiError::ImplementedElsewhere("another controller".into())),
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("svc")).await;
    let (op, result, patches) = sync_once(&env, &svc).await;
    result.unwrap();
    assert_eq!(op, Op::Ensure);
    assert_eq!(patches, 1, "finalizer only, no status patch");
}

#[tokio::test]
async fn invalid_object_from_the_shim__warning_names_the_field_and_backs_off() {
    let env = Env::new(FakeCloud {
        ensure_err: Some(CpiError::InvalidObject {
            field: "service.metadata.annotations[example.com/lb-size]".into(),
            message: "must be small, medium or large".into(),
        }),
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("svc")).await;
    let ctrl = env.controller();
    ctrl.queue().add(svc.key());
    ctrl.process_next_service_item().await;
    assert_eq!(
        ctrl.queue().num_requeues(&svc.key()),
        1,
        "rate-limited retry"
    );
    let events = env.events("SyncLoadBalancerFailed").await;
    let message = events[0].message.clone().unwrap_or_default();
    assert!(
        message.contains("service.metadata.annotations[example.com/lb-size]"),
        "{message}"
    );
}

#[tokio::test]
async fn unparsable_source_range_annotation__warning_names_the_field_no_cloud_write() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    // The API server validates the annotation on LoadBalancer Services; a Service created
    // before becoming one keeps a bad value, so the controller is handed it directly here.
    let stored = env.create_service(lb("svc")).await;
    let mut full = stored.to_service();
    full.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/load-balancer-source-ranges".to_string(),
            "10.0.0.0/8,nope".to_string(),
        )]
        .into(),
    );
    let ctrl = env.controller();
    let err = ctrl
        .process_service_create_or_update(Arc::new(full.into()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]"
        ),
        "{err}"
    );
    assert!(env.writes().is_empty(), "nothing sent to the provider");
}

#[tokio::test]
async fn stale_fence__ensure_refused_by_the_shim() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let svc = env.create_service(lb("svc")).await;
    // A newer term of the same lease has spoken: this controller's term is stale.
    let newer = Fence {
        holder_identity: "other".into(),
        lease_transitions: 2,
        ..fence()
    };
    let (_keep, rx) = watch::channel(Some(newer));
    let newer_cloud = env.cloud.clone().with_fence(rx);
    let other = Arc::new(ServiceLb::new(
        env.client.clone(),
        newer_cloud,
        "kubernetes".into(),
        env.services.clone(),
        env.nodes.clone(),
        env.nodes_ready.clone(),
        env.node_changes.clone(),
        env.h.recorder("service-controller"),
    ));
    other
        .process_service_create_or_update(svc.clone())
        .await
        .unwrap();
    let stale = env.controller();
    let err = stale
        .sync_load_balancer_if_needed(&svc, &svc.key())
        .await
        .1
        .unwrap_err();
    assert!(
        matches!(err, ServiceSyncError::Ensure(CpiError::StaleLeader(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn recreated_with_new_uid__old_load_balancer_deleted_first() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let first = env.create_service(lb("svc")).await;
    let ctrl = env.controller();
    ctrl.process_service_create_or_update(first.clone())
        .await
        .unwrap();
    // Deleted without the controller seeing it (finalizer removed by hand), then re-created.
    env.service_api()
        .patch(
            "svc",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    env.service_api()
        .delete("svc", &DeleteParams::default())
        .await
        .unwrap();
    let second = env.create_service(lb("svc")).await;
    assert_ne!(first.uid(), second.uid());
    env.h.fake.clear_calls();
    ctrl.process_service_create_or_update(second.clone())
        .await
        .unwrap();
    let calls = env.h.fake.lb_calls();
    let writes: Vec<_> = calls.iter().filter(|c| c.method != call::GET).collect();
    assert_eq!(writes[0].method, call::DELETE, "{calls:?}");
    assert_eq!(writes[1].method, call::CREATE, "{calls:?}");
    assert_eq!(env.h.fake.ensure_calls()[0].uid, second.uid().unwrap());
}

// ------------------------------------------------------------------------------------------------
// The controller running: caches, node changes, readiness
// ------------------------------------------------------------------------------------------------

/// Starts the whole controller (its own Service watch of this namespace, no periodic resync)
/// until dropped.
fn run(
    env: &Env,
    nodes_ready: watch::Receiver<bool>,
) -> (Arc<ServiceLb>, tokio::sync::oneshot::Sender<()>) {
    run_resyncing(env, nodes_ready, Duration::ZERO)
}

/// [`run`] with a periodic resync every `resync`.
fn run_resyncing(
    env: &Env,
    nodes_ready: watch::Receiver<bool>,
    resync: Duration,
) -> (Arc<ServiceLb>, tokio::sync::oneshot::Sender<()>) {
    let informer = ServiceInformer::selecting(
        Api::namespaced(env.h.client.clone(), &env.ns),
        watcher::Config::default(),
    );
    let ctrl = Arc::new(ServiceLb::new(
        env.client.clone(),
        env.cloud.clone(),
        "kubernetes".into(),
        informer.store.clone(),
        env.nodes.clone(),
        nodes_ready,
        env.node_changes.clone(),
        env.h.recorder("service-controller"),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = Box::pin(async move {
        let _ = stop_rx.await;
    });
    tokio::spawn(ctrl.clone().run(informer, resync, stop));
    (ctrl, stop_tx)
}

async fn wait_for_ingress(env: &Env, name: &str) -> Service {
    let api = env.service_api();
    let name = name.to_string();
    test_support::wait_for("the service to get its ingress", WAIT, || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let svc = api.get(&name).await.map_err(|e| e.to_string())?;
            let has = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .is_some_and(|i| !i.is_empty());
            if has {
                Ok(svc)
            } else {
                Err("no ingress yet".into())
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn running__services_get_ingress_node_add_updates_each_once_ready_flips_update_none() {
    let env = Env::new(FakeCloud {
        balancer_ip_mode: Some("Proxy".into()),
        ..fake()
    })
    .await;
    let node_names = nodes(&env, 2).await;
    let (_ctrl, _stop) = run(&env, env.nodes_ready.clone());
    for i in 0..3 {
        env.service_api()
            .create(&PostParams::default(), &lb(&format!("s{i}")))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let svc = wait_for_ingress(&env, &format!("s{i}")).await;
        assert_eq!(svc.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        let ingress = &svc.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0];
        assert_eq!(ingress.ip.as_deref(), Some(EXTERNAL_IP));
        assert_eq!(
            ingress.ip_mode, None,
            "v1.20 does not store ipMode; not written"
        );
    }
    assert_eq!(env.h.fake.ensure_calls().len(), 3);
    assert_eq!(
        env.api.status_patches(),
        6,
        "finalizer + status per service, nothing more"
    );

    // Readiness flips: no UpdateLoadBalancer at all.
    for name in &node_names {
        env.patch_node_status(
            name,
            serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.update_hosts().len(), 0, "Ready flips cause no update");

    // A node is added: each service gets exactly one update with the new set.
    let third = format!("{}-node3", env.label);
    env.create_node(node(&third)).await;
    env.wait_update_calls(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all = node_names.clone();
    all.push(third);
    assert_eq!(
        sorted(env.update_hosts()),
        vec![all.clone(), all.clone(), all]
    );
    assert_eq!(
        env.api.status_patches(),
        6,
        "node syncs write nothing to the API server"
    );
}

#[tokio::test]
async fn running__a_burst_of_node_changes_is_one_node_sync() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let (ctrl, _stop) = run(&env, env.nodes_ready.clone());
    env.create_lb_and_wait("s0").await;
    // Five nodes at once, faster than the batch window.
    let api = env.node_api();
    let creates = (2..=6).map(|i| {
        let mut n = node(&format!("{}-node{i}", env.label));
        n.metadata.labels = Some([("lbtest".to_string(), env.label.clone())].into());
        let api = api.clone();
        async move { api.create(&PostParams::default(), &n).await.unwrap() }
    });
    futures::future::join_all(creates).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let updates = env.update_hosts();
    assert!(!updates.is_empty());
    assert_eq!(updates.last().unwrap().len(), 6, "converged on all nodes");
    assert!(
        updates.len() <= 2,
        "a burst coalesces: {} updates",
        updates.len()
    );
    let _ = ctrl;
}

#[tokio::test]
async fn running__no_load_balancer_write_before_the_node_cache_has_synced() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let (ready_tx, ready_rx) = watch::channel(false);
    let (_ctrl, _stop) = run(&env, ready_rx);
    env.service_api()
        .create(&PostParams::default(), &lb("s0"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.writes().is_empty(), "no Ensure before the caches sync");
    assert_eq!(env.api.status_patches(), 0, "no finalizer either");
    ready_tx.send_replace(true);
    wait_for_ingress(&env, "s0").await;
    assert_eq!(env.writes(), [call::CREATE]);
}

#[tokio::test]
async fn running__deleting_the_service_deletes_the_load_balancer_and_the_finalizer() {
    let env = Env::new(FakeCloud {
        exists: true,
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let (_ctrl, _stop) = run(&env, env.nodes_ready.clone());
    env.create_lb_and_wait("s0").await;
    env.service_api()
        .delete("s0", &DeleteParams::default())
        .await
        .unwrap();
    let api = env.service_api();
    test_support::wait_for("the service to be gone", WAIT, || {
        let api = api.clone();
        async move {
            match api.get_opt("s0").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".into()),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(env.writes(), [call::CREATE, call::DELETE]);
    assert!(env.h.fake.state().balancers.is_empty());
    assert_eq!(env.events("DeletedLoadBalancer").await.len(), 1);
}

#[tokio::test]
async fn running__type_flip_away_and_back_cleans_up_and_recreates() {
    let env = Env::new(FakeCloud {
        exists: true,
        ..fake()
    })
    .await;
    nodes(&env, 1).await;
    let (_ctrl, _stop) = run(&env, env.nodes_ready.clone());
    env.create_lb_and_wait("s0").await;
    env.service_api()
        .patch(
            "s0",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": null}]}})),
        )
        .await
        .unwrap();
    let api = env.service_api();
    test_support::wait_for("finalizer and ingress removed", WAIT, || {
        let api = api.clone();
        async move {
            let svc = api.get("s0").await.map_err(|e| e.to_string())?;
            let clean = svc.metadata.finalizers.is_none()
                && svc
                    .status
                    .and_then(|s| s.load_balancer)
                    .and_then(|l| l.ingress)
                    .is_none();
            if clean { Ok(()) } else { Err("not yet".into()) }
        }
    })
    .await
    .unwrap();
    env.service_api()
        .patch(
            "s0",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"type": "LoadBalancer"}})),
        )
        .await
        .unwrap();
    wait_for_ingress(&env, "s0").await;
    assert_eq!(env.writes(), [call::CREATE, call::DELETE, call::CREATE]);
    assert!(
        !env.events("Type").await.is_empty(),
        "the type change is recorded"
    );
}

/// The node the admission plugin taints until Ready must not matter to the backend set.
#[tokio::test]
async fn not_ready_taint_does_not_exclude_a_node() {
    let env = Env::new(fake()).await;
    let mut n = node(&format!("{}-node1", env.label));
    n.spec.as_mut().unwrap().taints = Some(vec![Taint {
        key: TAINT_NOT_READY.into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    }]);
    env.create_node(n).await;
    let svc = env.create_service(lb("s0")).await;
    env.controller()
        .process_service_create_or_update(svc)
        .await
        .unwrap();
    assert_eq!(env.h.fake.ensure_calls()[0].hosts.len(), 1);
}

#[tokio::test]
async fn running__periodic_resync_recreates_a_load_balancer_deleted_out_of_band() {
    let env = Env::new(fake()).await;
    nodes(&env, 1).await;
    let (_ctrl, _stop) = run_resyncing(&env, env.nodes_ready.clone(), Duration::from_millis(300));
    env.create_lb_and_wait("s0").await;
    let patches = env.api.status_patches();

    // Someone deletes the load balancer in the cloud console.
    env.h.fake.update(|f| f.balancers.clear());
    let fake = &env.h.fake;
    test_support::wait_for("the resync to recreate the load balancer", WAIT, || {
        let n = fake.state().balancers.len();
        async move {
            if n == 1 {
                Ok(())
            } else {
                Err(format!("{n} balancers"))
            }
        }
    })
    .await
    .unwrap();
    assert!(
        env.h.fake.ensure_calls().len() >= 2,
        "the resync ensured the Service again"
    );
    assert_eq!(
        env.api.status_patches(),
        patches,
        "an unchanged status is not written again"
    );
    // Resync passes over an unchanged load balancer record no Events.
    for reason in ["EnsuringLoadBalancer", "EnsuredLoadBalancer"] {
        let count: i32 = env
            .events(reason)
            .await
            .iter()
            .map(|e| e.count.unwrap_or(1))
            .sum();
        assert_eq!(count, 1, "{reason}");
    }
}

#[tokio::test]
async fn running__every_node_excluded_at_once_keeps_the_backends_and_warns() {
    let env = Env::new(fake()).await;
    let node_names = nodes(&env, 2).await;
    let (_ctrl, _stop) = run(&env, env.nodes_ready.clone());
    env.create_lb_and_wait("s0").await;

    // Every node leaves the backend set in one step: no UpdateLoadBalancer draining the LB.
    for name in &node_names {
        env.patch_node(
            name,
            serde_json::json!({"metadata": {"labels": {EXCLUDE: "true"}}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The two label patches may reach the node sync one at a time: [node2] is a fine step.
    let updates = env.update_hosts();
    assert!(updates.iter().all(|hosts| !hosts.is_empty()), "{updates:?}");
    let warned = env.events("UnAvailableLoadBalancer").await;
    assert!(
        warned.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("rather than losing every one"))),
        "{warned:?}"
    );
    let before = updates.len();

    // One node back: the set shrinks to it (not to empty), in one update.
    env.patch_node(
        &node_names[0],
        serde_json::json!({"metadata": {"labels": {EXCLUDE: "false"}}}),
    )
    .await;
    env.wait_update_calls(before + 1).await;
    assert_eq!(
        env.update_hosts().last(),
        Some(&vec![node_names[0].clone()])
    );
}

/// The Service cache keeps up with a burst of writes like the controller's own (a finalizer
/// PATCH and a status PATCH per Service, 50 in flight), and ends holding every last version,
/// each write delivered as its own watch event. (`bench lb`'s larger burst has stopped the
/// watches of this kube-apiserver's watch cache; see tests/bench/README.md.)
#[tokio::test]
async fn service_cache_follows_a_burst_of_finalizer_and_status_writes() {
    use futures::StreamExt as _;

    const SERVICES: usize = 300;
    let cp = ControlPlane::shared().await.expect("shared control plane");
    let client = cp.client().expect("admin client");
    let ns = create_namespace(&client, "burst").await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let api = api.clone();
            let ns = ns.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &test_support::load_balancer_service(&ns, &format!("s{i}"), &[("TCP", 80)]),
                )
                .await
                .expect("create service");
            }
        })
        .buffer_unordered(50)
        .collect::<Vec<()>>()
        .await;

    let mut registry = prometheus_client::registry::Registry::default();
    let informer = ServiceInformer::selecting(
        Api::namespaced(client.clone(), &ns),
        watcher::Config::default(),
    )
    .with_metrics(WatchMetrics::register(&mut registry));
    let store = informer.store.clone();
    let mut ready = informer.ready();
    let task = tokio::spawn(informer.run(|_| {}, std::future::pending()));
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .expect("service cache synced in time")
        .unwrap();

    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("s{i}");
                let finalizer = serde_json::json!({"metadata": {"finalizers": [FINALIZER]}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&finalizer))
                    .await
                    .expect("finalizer patch");
                let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [
                    {"ip": format!("198.51.100.{}", i % 250 + 1)}
                ]}}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .expect("status patch");
            }
        })
        .buffer_unordered(50)
        .collect::<Vec<()>>()
        .await;

    test_support::wait_for(
        "the cache to hold every Service's last version",
        WAIT,
        || {
            let served = store
                .state()
                .iter()
                .filter(|s| {
                    s.finalizers().iter().any(|f| f == FINALIZER)
                        && s.load_balancer()
                            .ingress
                            .as_ref()
                            .is_some_and(|i| !i.is_empty())
                })
                .count();
            async move {
                if served == SERVICES {
                    Ok(())
                } else {
                    Err(format!(
                        "{served} of {SERVICES} with the finalizer and an address"
                    ))
                }
            }
        },
    )
    .await
    .unwrap();
    // One listed Service each, then each write as its own event: nothing was lost or relisted.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        format!(r#"ccm_watch_events_total{{resource="services",event="init_apply"}} {SERVICES}"#),
        format!(
            r#"ccm_watch_events_total{{resource="services",event="apply"}} {}"#,
            2 * SERVICES
        ),
        r#"ccm_watch_events_total{resource="services",event="init"} 1"#.to_string(),
    ] {
        assert!(text.contains(&line), "{line:?} not in\n{text}");
    }
    task.abort();
}
