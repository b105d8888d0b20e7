//! The LoadBalancer calls (upstream `cloudprovider.LoadBalancer`): the read-only ones plain, the
//! mutating ones (Ensure, Update, EnsureDeleted) stamped with the leader fence, all counted.

use cpi_proto::CpiError;
use cpi_proto::v1;
use k8s_openapi::api::core::v1::LoadBalancerStatus;

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
        nodes: Vec<v1::Node>,
    ) -> Result<Option<v1::LoadBalancerStatus>, CpiError> {
        let request = self.fenced(v1::EnsureLoadBalancerRequest {
            cluster_name: cluster_name.to_string(),
            service: Some(service),
            nodes,
            fence: None,
            allow_replacement: false,
        });
        let response = self
            .call(
                "LoadBalancer/EnsureLoadBalancer",
                self.load_balancers().ensure_load_balancer(request),
            )
            .await?;
        Ok(response.status)
    }

    /// Upstream `UpdateLoadBalancer` (fenced): replaces the LB's backend hosts.
    pub async fn update_load_balancer(
        &self,
        cluster_name: &str,
        service: v1::Service,
        nodes: Vec<v1::Node>,
    ) -> Result<(), CpiError> {
        let request = self.fenced(v1::UpdateLoadBalancerRequest {
            cluster_name: cluster_name.to_string(),
            service: Some(service),
            nodes,
            fence: None,
        });
        self.call(
            "LoadBalancer/UpdateLoadBalancer",
            self.load_balancers().update_load_balancer(request),
        )
        .await
        .map(drop)
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
