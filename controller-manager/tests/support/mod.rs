//! Harness shared by the controller integration tests: the fake provider served over a real Unix
//! socket with a `Cloud` connected to it, an admin client of the control plane shared by the test
//! binary, and node caches scoped by a selector so tests never see each other's nodes.
#![allow(dead_code)]

use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_NOT_READY;
use cloud_controller_manager::{
    CachedNode, Cloud, CloudMetrics, ConnectSettings, NodeInformer, ProviderEndpoint, Recorder,
    events::EventBroadcaster,
};
use fake_provider::{FakeCloud, ServedFake};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use test_control_plane::ControlPlane;

/// The fake provider served, a `Cloud` connected to it, and an admin client of the shared
/// control plane.
pub struct Harness {
    /// The fake provider, served over a Unix socket.
    pub fake: ServedFake,
    /// A `Cloud` connected to the fake provider.
    pub cloud: Cloud,
    /// An admin client of the control plane shared by this test binary.
    pub client: kube::Client,
    /// The Event sink of the controllers under test.
    pub events: EventBroadcaster,
}

/// Serves `fake`, connects a `Cloud` to it and takes an admin client of the shared control plane.
pub async fn harness(fake: FakeCloud) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await.expect("shared control plane");
    harness_on(cp.client().expect("admin client"), fake).await
}

/// [`harness`] on the control plane `client` talks to (one started with other options).
pub async fn harness_on(client: kube::Client, fake: FakeCloud) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = fake.serve().await.expect("serve the fake provider");
    let cloud = Cloud::connect(
        &ProviderEndpoint::Unix(fake.socket_path().to_path_buf()),
        &ConnectSettings {
            request_timeout: Duration::from_secs(5),
            reload_interval: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(5),
        },
        CloudMetrics::default(),
    )
    .await
    .expect("connect to the fake provider");
    Harness {
        fake,
        cloud,
        events: EventBroadcaster::start(client.clone(), "controller-test"),
        client,
    }
}

impl Harness {
    /// An event recorder for `component`, through the admin client.
    pub fn recorder(&self, component: &str) -> Recorder {
        self.events.new_recorder(component)
    }

    /// All Nodes, through the admin client.
    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Creates the node, then sets its status through the status subresource (create ignores
    /// status), and returns the node as stored.
    pub async fn create(&self, node: Node) -> Node {
        let name = node.name_any();
        let status = node.status.clone();
        let created = self
            .nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        match status {
            Some(status) => self
                .nodes()
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
                )
                .await
                .expect("set node status"),
            None => created,
        }
    }

    /// The node named `name` as stored.
    pub async fn get(&self, name: &str) -> Node {
        self.nodes().get(name).await.expect("get node")
    }

    /// A cache holding only `node`, once it holds `node`'s current version.
    pub async fn cache_for(&self, node: &Node) -> NodeCache {
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", node.name_any()));
        let cache = NodeCache::start(&self.client, config).await;
        cache.wait_for(std::slice::from_ref(node)).await;
        cache
    }
}

/// The controllers' node cache ([`NodeInformer`]) watching only the nodes `config` selects;
/// the watch stops on drop.
pub struct NodeCache {
    /// The reflector's store.
    pub store: Store<CachedNode>,
    /// The watch feeding the store.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NodeCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NodeCache {
    /// Starts watching the nodes `config` selects and waits for the initial list.
    pub async fn start(client: &kube::Client, config: watcher::Config) -> Self {
        let informer = NodeInformer::selecting(client.clone(), config);
        let store = informer.store.clone();
        let mut ready = informer.ready();
        let task = tokio::spawn(informer.run(std::future::pending()));
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|ready| *ready))
            .await
            .expect("node cache ready in time")
            .expect("node informer alive");
        Self { store, task }
    }

    /// Waits until the cache holds every node of `nodes` at exactly that version.
    pub async fn wait_for(&self, nodes: &[Node]) {
        let fresh = || {
            nodes.iter().all(|n| {
                self.store
                    .get(&ObjectRef::<CachedNode>::new(&n.name_any()))
                    .is_some_and(|c| c.resource_version() == n.resource_version())
            })
        };
        test_support::wait_for(
            "the node cache to hold the created nodes",
            Duration::from_secs(10),
            || {
                let caught_up = fresh();
                async move {
                    if caught_up {
                        Ok(())
                    } else {
                        Err("an older version or none".to_string())
                    }
                }
            },
        )
        .await
        .expect("node cache catches up");
    }
}

/// The node's taints other than the `not-ready` one the API server's admission adds.
pub fn taints_of(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != TAINT_NOT_READY)
        .collect()
}
