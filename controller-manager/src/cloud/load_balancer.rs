//! The LoadBalancer calls (upstream `cloudprovider.LoadBalancer`): the read-only ones plain, the
//! mutating ones (Ensure, Update, EnsureDeleted) stamped with the leader fence, all counted.
//! Backend nodes travel as a [`NodeSet`]: put once per shim and named by id when the shim has
//! `CAPABILITY_LOAD_BALANCER_NODE_SETS`, inline in every call otherwise.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cpi_proto::CpiError;
use cpi_proto::v1::{self, Capability};
use k8s_openapi::api::core::v1::LoadBalancerStatus;
use tokio::sync::Mutex;

use super::client::Cloud;
use super::convert;
use crate::k8s::{CachedNode, CachedService};

/// The CPI view of a Service, with its raw JSON when the shim asked for raw objects.
pub fn service_view(cloud: &Cloud, service: &CachedService) -> v1::Service {
    convert::service(service, cloud.wants_raw_objects())
}

/// The CPI views of a load balancer's backend nodes (no conditions: see
/// [`convert::backend_node`]).
pub fn backend_nodes<'a>(
    cloud: &Cloud,
    nodes: impl IntoIterator<Item = &'a CachedNode>,
) -> Vec<v1::Node> {
    let raw = cloud.wants_raw_objects();
    nodes
        .into_iter()
        .map(|n| convert::backend_node(n, raw))
        .collect()
}

/// One backend node list, as EnsureLoadBalancer and UpdateLoadBalancer send it: the CPI views
/// and the id a node-set shim holds them under. Built once per change of the backend nodes and
/// shared by every call, so the views are encoded once per shim rather than once per Service.
#[derive(Debug)]
pub struct NodeSet {
    id: String,
    nodes: Box<[v1::Node]>,
    /// Whether this set was put to the shim; the lock makes concurrent first calls put it once.
    put: Mutex<bool>,
}

impl NodeSet {
    /// A set of `nodes` under a fresh id (a random per-process prefix and a counter: never
    /// reused for other nodes, never equal to another manager's).
    pub fn new(nodes: Vec<v1::Node>) -> Self {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let prefix = *PREFIX.get_or_init(rand::random);
        Self {
            id: format!("ccm-{prefix:016x}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            nodes: nodes.into_boxed_slice(),
            put: Mutex::new(false),
        }
    }

    /// The id the shim holds this set under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The CPI views of the nodes.
    pub fn nodes(&self) -> &[v1::Node] {
        &self.nodes
    }
}

impl Default for NodeSet {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// How one call names its backend nodes: inline, or by the id of a set put earlier.
struct Backends {
    nodes: Vec<v1::Node>,
    node_set_id: String,
}

/// The status to write for what a shim returned: its ingress points only, `ipMode` only when
/// the API server stores it.
pub fn load_balancer_status(
    status: &v1::LoadBalancerStatus,
    with_ip_mode: bool,
) -> LoadBalancerStatus {
    convert::load_balancer_status_from_proto(status, with_ip_mode)
}

impl Cloud {
    /// Upstream `GetLoadBalancer`: the LB's status when one created for this Service exists.
    pub async fn get_load_balancer(
        &self,
        cluster_name: &str,
        service: &v1::Service,
    ) -> Result<Option<v1::LoadBalancerStatus>, CpiError> {
        let request = v1::LoadBalancerRequest {
            cluster_name: cluster_name.to_string(),
            service: Some(service.clone()),
        };
        let response = self
            .call(
                "LoadBalancer/GetLoadBalancer",
                self.load_balancers().get_load_balancer(request),
            )
            .await?;
        Ok(response.exists.then(|| response.status.unwrap_or_default()))
    }

    /// Upstream `EnsureLoadBalancer` (fenced): the status to write, `None` when the shim
    /// returned none.
    pub async fn ensure_load_balancer(
        &self,
        cluster_name: &str,
        service: v1::Service,
        nodes: &NodeSet,
    ) -> Result<Option<v1::LoadBalancerStatus>, CpiError> {
        let response = self
            .with_node_set(nodes, |backends| {
                let request = self.fenced(v1::EnsureLoadBalancerRequest {
                    cluster_name: cluster_name.to_string(),
                    service: Some(service.clone()),
                    nodes: backends.nodes,
                    fence: None,
                    allow_replacement: false,
                    node_set_id: backends.node_set_id,
                });
                let mut client = self.load_balancers();
                async move {
                    self.call(
                        "LoadBalancer/EnsureLoadBalancer",
                        client.ensure_load_balancer(request),
                    )
                    .await
                }
            })
            .await?;
        Ok(response.status)
    }

    /// Upstream `UpdateLoadBalancer` (fenced): replaces the LB's backend hosts.
    pub async fn update_load_balancer(
        &self,
        cluster_name: &str,
        service: v1::Service,
        nodes: &NodeSet,
    ) -> Result<(), CpiError> {
        self.with_node_set(nodes, |backends| {
            let request = self.fenced(v1::UpdateLoadBalancerRequest {
                cluster_name: cluster_name.to_string(),
                service: Some(service.clone()),
                nodes: backends.nodes,
                fence: None,
                node_set_id: backends.node_set_id,
            });
            let mut client = self.load_balancers();
            async move {
                self.call(
                    "LoadBalancer/UpdateLoadBalancer",
                    client.update_load_balancer(request),
                )
                .await
            }
        })
        .await
        .map(drop)
    }

    /// Runs `call` with `set` as its backends: inline for a shim without node sets; else by id,
    /// putting the set first if this manager has not, and once more (then retrying once) when
    /// the shim answers NODE_SET_UNKNOWN (it restarted or evicted the set).
    async fn with_node_set<T, F>(
        &self,
        set: &NodeSet,
        call: impl Fn(Backends) -> F,
    ) -> Result<T, CpiError>
    where
        F: Future<Output = Result<T, CpiError>>,
    {
        if !self.has(Capability::LoadBalancerNodeSets) {
            return call(Backends {
                nodes: set.nodes.to_vec(),
                node_set_id: String::new(),
            })
            .await;
        }
        let by_id = || Backends {
            nodes: Vec::new(),
            node_set_id: set.id.clone(),
        };
        self.put_node_set(set, false).await?;
        match call(by_id()).await {
            Err(CpiError::NodeSetUnknown(_)) => {
                self.put_node_set(set, true).await?;
                call(by_id()).await
            }
            other => other,
        }
    }

    /// PutNodeSet of `set`, unless it was put already and `again` is false.
    async fn put_node_set(&self, set: &NodeSet, again: bool) -> Result<(), CpiError> {
        let mut put = set.put.lock().await;
        if *put && !again {
            return Ok(());
        }
        let request = v1::PutNodeSetRequest {
            node_set_id: set.id.clone(),
            nodes: set.nodes.to_vec(),
        };
        self.call(
            "LoadBalancer/PutNodeSet",
            self.load_balancers().put_node_set(request),
        )
        .await?;
        *put = true;
        Ok(())
    }

    /// Upstream `EnsureLoadBalancerDeleted` (fenced): succeeds when there was none.
    pub async fn ensure_load_balancer_deleted(
        &self,
        cluster_name: &str,
        service: v1::Service,
    ) -> Result<(), CpiError> {
        let request = self.fenced(v1::EnsureLoadBalancerDeletedRequest {
            cluster_name: cluster_name.to_string(),
            service: Some(service),
            fence: None,
        });
        self.call(
            "LoadBalancer/EnsureLoadBalancerDeleted",
            self.load_balancers().ensure_load_balancer_deleted(request),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;
    use std::time::Duration;

    use fake_provider::FakeCloud;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::cloud::{CloudMetrics, ConnectSettings, ProviderEndpoint};

    fn service() -> v1::Service {
        v1::Service {
            metadata: Some(v1::ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                uid: "uid-web".into(),
                ..Default::default()
            }),
            r#type: "LoadBalancer".into(),
            ..Default::default()
        }
    }

    fn node(name: &str) -> v1::Node {
        v1::Node {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn connect(socket: &Path, metrics: CloudMetrics) -> Cloud {
        let settings = ConnectSettings {
            request_timeout: Duration::from_secs(2),
            reload_interval: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(5),
        };
        let fence = v1::Fence {
            lease: "kube-system/cloud-controller-manager".into(),
            holder_identity: "test".into(),
            lease_transitions: 1,
            lease_uid: "lease-uid".into(),
        };
        Cloud::connect(&ProviderEndpoint::Unix(socket.into()), &settings, metrics)
            .await
            .unwrap()
            .with_fence(tokio::sync::watch::channel(Some(fence)).1)
    }

    /// `cloudprovider_requests_total` of `method` with `code`, as scraped.
    fn requests(registry: &Registry, method: &str, code: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let labels = format!("code=\"{code}\",method=\"{method}\"");
        let alt = format!("method=\"{method}\",code=\"{code}\"");
        text.lines()
            .filter(|l| l.starts_with("cloudprovider_requests_total{"))
            .find(|l| l.contains(&labels) || l.contains(&alt))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    #[tokio::test]
    async fn a_node_set_is_put_once_and_put_again_when_the_shim_lost_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cpi.sock");
        let shim = FakeCloud::default().serve_at(&socket).await.unwrap();
        let mut registry = Registry::default();
        let cloud = connect(&socket, CloudMetrics::register(&mut registry)).await;
        assert!(cloud.has(Capability::LoadBalancerNodeSets));

        let set = NodeSet::new(vec![node("n1"), node("n2")]);
        cloud
            .ensure_load_balancer("kubernetes", service(), &set)
            .await
            .unwrap();
        cloud
            .update_load_balancer("kubernetes", service(), &set)
            .await
            .unwrap();
        assert_eq!(requests(&registry, "LoadBalancer/PutNodeSet", "OK"), 1);
        assert_eq!(shim.ensure_calls()[0].hosts, ["n1", "n2"]);
        assert_eq!(shim.update_calls()[0].hosts, ["n1", "n2"]);

        // A restarted shim holds no sets: the call is refused, the set put again, the call
        // retried once.
        shim.shutdown().await.unwrap();
        let restarted = FakeCloud::default().serve_at(&socket).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while cloud.probe().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the restarted shim answers");
        cloud
            .update_load_balancer("kubernetes", service(), &set)
            .await
            .unwrap();
        assert_eq!(
            requests(
                &registry,
                "LoadBalancer/UpdateLoadBalancer",
                "NODE_SET_UNKNOWN"
            ),
            1
        );
        assert_eq!(requests(&registry, "LoadBalancer/PutNodeSet", "OK"), 2);
        assert_eq!(restarted.update_calls()[0].hosts, ["n1", "n2"]);
    }
}
