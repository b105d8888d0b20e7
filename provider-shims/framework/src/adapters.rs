//! Adapters from the provider traits to the generated tonic server traits: validation,
//! provider-ID ownership, fencing, metrics, logging and a span per call.

use std::sync::Arc;
use std::time::Instant;

use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::Node;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::fence::FenceGuard;
use crate::metrics::{ShimMetrics, code_name};
use crate::node_sets::NodeSets;
use crate::provider::ProviderDescription;
use crate::services;
use crate::validate::{consistency, require, require_node, require_non_empty, require_service};

/// What every adapter shares.
pub(crate) struct Core {
    pub(crate) provider: ProviderDescription,
    pub(crate) info: pb::ProviderInfo,
    pub(crate) metrics: ShimMetrics,
    pub(crate) fence: FenceGuard,
    /// Backend node lists put by callers (LoadBalancer.PutNodeSet).
    pub(crate) node_sets: NodeSets,
}

impl Core {
    /// Runs one call: times it, counts it by code, logs it and maps the error to its status.
    async fn call<R>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<R, CpiError>>,
    ) -> Result<Response<R>, Status> {
        let start = Instant::now();
        let result = body.await;
        let elapsed = start.elapsed();
        match result {
            Ok(response) => {
                self.metrics.observe(method, tonic::Code::Ok, elapsed);
                tracing::debug!(method, elapsed_ms = elapsed.as_millis() as u64, "call ok");
                Ok(Response::new(response))
            }
            Err(err) => {
                let status = err.to_status();
                self.metrics.observe(method, status.code(), elapsed);
                let class = err.class();
                let code = code_name(status.code());
                let ms = elapsed.as_millis() as u64;
                // Cloud-side trouble is the operator's business; caller mistakes and expected
                // answers (not found, not implemented) are not.
                if matches!(
                    err,
                    CpiError::Cloud(_) | CpiError::CloudAuth(_) | CpiError::Throttled { .. }
                ) {
                    tracing::warn!(method, class, code, elapsed_ms = ms, error = %err, "call failed");
                } else {
                    tracing::debug!(method, class, code, elapsed_ms = ms, error = %err, "call failed");
                }
                Err(status)
            }
        }
    }

    /// Checks a mutating call's fence, counting stale leaders.
    async fn fenced(&self, fence: Option<&pb::Fence>) -> Result<(), CpiError> {
        let result = self.fence.check(fence).await;
        if let Err(CpiError::StaleLeader(message)) = &result {
            self.metrics.stale_leader();
            tracing::warn!(%message, "refused a call from a deposed leader");
        }
        result
    }

    /// Checks the request's `node`'s provider ID, when it has one, is ours.
    fn node_owned(&self, node: &Node) -> Result<(), CpiError> {
        match node.provider_id.as_deref() {
            Some(id) if !id.is_empty() => self.provider.check_owned("node.provider_id", id),
            _ => Ok(()),
        }
    }

    /// A required provider ID that must be ours.
    fn owned_provider_id(&self, provider_id: String) -> Result<String, CpiError> {
        let provider_id = require_non_empty(provider_id, "provider_id")?;
        self.provider.check_owned("provider_id", &provider_id)?;
        Ok(provider_id)
    }
}

/// Runs `$body` as method `$method` of service `$service` inside an info span named after it.
macro_rules! rpc {
    ($core:expr, $service:literal, $method:literal, $body:expr) => {{
        let core: &Core = &$core;
        let span = tracing::info_span!(
            $method,
            provider = %core.provider.name,
            rpc.service = concat!("cloudprovider.v1.", $service),
            otel.name = concat!("cloudprovider.v1.", $service, "/", $method),
        );
        core.call(concat!($service, "/", $method), $body)
            .instrument(span)
            .await
    }};
}

/// Serves the `Provider` service from the computed `ProviderInfo`.
pub(crate) struct ProviderAdapter {
    pub(crate) core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::provider_server::Provider for ProviderAdapter {
    async fn get_provider_info(
        &self,
        _request: Request<pb::GetProviderInfoRequest>,
    ) -> Result<Response<pb::ProviderInfo>, Status> {
        rpc!(self.core, "Provider", "GetProviderInfo", async {
            let mut info = self.core.info.clone();
            info.fence_lease = self.core.fence.lease().await;
            Ok(info)
        })
    }
}

/// Wraps one provider trait object for its generated server trait.
pub(crate) struct Adapter<T: ?Sized> {
    pub(crate) inner: Arc<T>,
    pub(crate) core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::instances_v2_server::InstancesV2 for Adapter<dyn services::InstancesV2> {
    async fn instance_exists(
        &self,
        request: Request<pb::InstanceExistsRequest>,
    ) -> Result<Response<pb::InstanceExistsResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "InstancesV2", "InstanceExists", async {
            let node = require_node(req.node, "node")?;
            self.core.node_owned(&node)?;
            self.inner
                .instance_exists(node, consistency(req.consistency))
                .await
        })
    }

    async fn instance_shutdown(
        &self,
        request: Request<pb::InstanceShutdownRequest>,
    ) -> Result<Response<pb::InstanceShutdownResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "InstancesV2", "InstanceShutdown", async {
            let node = require_node(req.node, "node")?;
            self.core.node_owned(&node)?;
            self.inner
                .instance_shutdown(node, consistency(req.consistency))
                .await
        })
    }

    async fn instance_metadata(
        &self,
        request: Request<pb::InstanceMetadataRequest>,
    ) -> Result<Response<pb::InstanceMetadataResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "InstancesV2", "InstanceMetadata", async {
            let node = require_node(req.node, "node")?;
            self.core.node_owned(&node)?;
            self.inner.instance_metadata(node).await
        })
    }
}

#[tonic::async_trait]
impl pb::instances_server::Instances for Adapter<dyn services::Instances> {
    async fn node_addresses(
        &self,
        request: Request<pb::NodeNameRequest>,
    ) -> Result<Response<pb::NodeAddressesResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "NodeAddresses", async {
            let name = require_non_empty(req.node_name, "node_name")?;
            self.inner
                .node_addresses(name, consistency(req.consistency))
                .await
        })
    }

    async fn node_addresses_by_provider_id(
        &self,
        request: Request<pb::ProviderIdRequest>,
    ) -> Result<Response<pb::NodeAddressesResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "NodeAddressesByProviderID", async {
            let id = self.core.owned_provider_id(req.provider_id)?;
            self.inner
                .node_addresses_by_provider_id(id, consistency(req.consistency))
                .await
        })
    }

    async fn instance_id(
        &self,
        request: Request<pb::NodeNameRequest>,
    ) -> Result<Response<pb::InstanceIdResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "InstanceID", async {
            let name = require_non_empty(req.node_name, "node_name")?;
            self.inner
                .instance_id(name, consistency(req.consistency))
                .await
        })
    }

    async fn instance_type(
        &self,
        request: Request<pb::NodeNameRequest>,
    ) -> Result<Response<pb::InstanceTypeResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "InstanceType", async {
            let name = require_non_empty(req.node_name, "node_name")?;
            self.inner
                .instance_type(name, consistency(req.consistency))
                .await
        })
    }

    async fn instance_type_by_provider_id(
        &self,
        request: Request<pb::ProviderIdRequest>,
    ) -> Result<Response<pb::InstanceTypeResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "InstanceTypeByProviderID", async {
            let id = self.core.owned_provider_id(req.provider_id)?;
            self.inner
                .instance_type_by_provider_id(id, consistency(req.consistency))
                .await
        })
    }

    async fn add_ssh_key_to_all_instances(
        &self,
        request: Request<pb::AddSshKeyRequest>,
    ) -> Result<Response<pb::AddSshKeyResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "AddSSHKeyToAllInstances", async {
            self.core.fenced(req.fence.as_ref()).await?;
            let user = require_non_empty(req.user, "user")?;
            self.inner
                .add_ssh_key_to_all_instances(user, req.key_data)
                .await
        })
    }

    async fn current_node_name(
        &self,
        request: Request<pb::CurrentNodeNameRequest>,
    ) -> Result<Response<pb::CurrentNodeNameResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Instances", "CurrentNodeName", async {
            let hostname = require_non_empty(req.hostname, "hostname")?;
            self.inner.current_node_name(hostname).await
        })
    }

    async fn instance_exists_by_provider_id(
        &self,
        request: Request<pb::ProviderIdRequest>,
    ) -> Result<Response<pb::InstanceExistsResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "Instances",
            "InstanceExistsByProviderID",
            async {
                let id = self.core.owned_provider_id(req.provider_id)?;
                self.inner
                    .instance_exists_by_provider_id(id, consistency(req.consistency))
                    .await
            }
        )
    }

    async fn instance_shutdown_by_provider_id(
        &self,
        request: Request<pb::ProviderIdRequest>,
    ) -> Result<Response<pb::InstanceShutdownResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "Instances",
            "InstanceShutdownByProviderID",
            async {
                let id = self.core.owned_provider_id(req.provider_id)?;
                self.inner
                    .instance_shutdown_by_provider_id(id, consistency(req.consistency))
                    .await
            }
        )
    }
}

#[tonic::async_trait]
impl pb::zones_server::Zones for Adapter<dyn services::Zones> {
    async fn get_zone(
        &self,
        _request: Request<pb::GetZoneRequest>,
    ) -> Result<Response<pb::Zone>, Status> {
        rpc!(self.core, "Zones", "GetZone", self.inner.get_zone())
    }

    async fn get_zone_by_provider_id(
        &self,
        request: Request<pb::ProviderIdRequest>,
    ) -> Result<Response<pb::Zone>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Zones", "GetZoneByProviderID", async {
            let id = self.core.owned_provider_id(req.provider_id)?;
            self.inner.get_zone_by_provider_id(id).await
        })
    }

    async fn get_zone_by_node_name(
        &self,
        request: Request<pb::NodeNameRequest>,
    ) -> Result<Response<pb::Zone>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Zones", "GetZoneByNodeName", async {
            let name = require_non_empty(req.node_name, "node_name")?;
            self.inner.get_zone_by_node_name(name).await
        })
    }
}

#[tonic::async_trait]
impl pb::clusters_server::Clusters for Adapter<dyn services::Clusters> {
    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "Clusters",
            "ListClusters",
            self.inner.list_clusters(req.page_size, req.page_token)
        )
    }

    async fn master(
        &self,
        request: Request<pb::MasterRequest>,
    ) -> Result<Response<pb::MasterResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Clusters", "Master", async {
            let name = require_non_empty(req.cluster_name, "cluster_name")?;
            self.inner.master(name).await
        })
    }
}

#[tonic::async_trait]
impl pb::load_balancer_server::LoadBalancer for Adapter<dyn services::LoadBalancer> {
    async fn get_load_balancer(
        &self,
        request: Request<pb::LoadBalancerRequest>,
    ) -> Result<Response<pb::GetLoadBalancerResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "LoadBalancer", "GetLoadBalancer", async {
            let service = require_service(req.service, "service")?;
            self.inner
                .get_load_balancer(req.cluster_name, service)
                .await
        })
    }

    async fn get_load_balancer_name(
        &self,
        request: Request<pb::LoadBalancerRequest>,
    ) -> Result<Response<pb::GetLoadBalancerNameResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "LoadBalancer", "GetLoadBalancerName", async {
            let service = require_service(req.service, "service")?;
            self.inner
                .get_load_balancer_name(req.cluster_name, service)
                .await
        })
    }

    async fn ensure_load_balancer(
        &self,
        request: Request<pb::EnsureLoadBalancerRequest>,
    ) -> Result<Response<pb::EnsureLoadBalancerResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "LoadBalancer", "EnsureLoadBalancer", async {
            let service = require_service(req.service, "service")?;
            let nodes = self.core.node_sets.resolve(req.nodes, &req.node_set_id)?;
            self.core.fenced(req.fence.as_ref()).await?;
            self.inner
                .ensure_load_balancer(req.cluster_name, service, nodes, req.allow_replacement)
                .await
        })
    }

    async fn update_load_balancer(
        &self,
        request: Request<pb::UpdateLoadBalancerRequest>,
    ) -> Result<Response<pb::UpdateLoadBalancerResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "LoadBalancer", "UpdateLoadBalancer", async {
            let service = require_service(req.service, "service")?;
            let nodes = self.core.node_sets.resolve(req.nodes, &req.node_set_id)?;
            self.core.fenced(req.fence.as_ref()).await?;
            self.inner
                .update_load_balancer(req.cluster_name, service, nodes)
                .await
        })
    }

    async fn ensure_load_balancer_deleted(
        &self,
        request: Request<pb::EnsureLoadBalancerDeletedRequest>,
    ) -> Result<Response<pb::EnsureLoadBalancerDeletedResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "LoadBalancer",
            "EnsureLoadBalancerDeleted",
            async {
                let service = require_service(req.service, "service")?;
                self.core.fenced(req.fence.as_ref()).await?;
                self.inner
                    .ensure_load_balancer_deleted(req.cluster_name, service)
                    .await
            }
        )
    }

    async fn put_node_set(
        &self,
        request: Request<pb::PutNodeSetRequest>,
    ) -> Result<Response<pb::PutNodeSetResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "LoadBalancer", "PutNodeSet", async {
            self.core.node_sets.put(req.node_set_id, req.nodes)?;
            Ok(pb::PutNodeSetResponse {})
        })
    }
}

#[tonic::async_trait]
impl pb::routes_server::Routes for Adapter<dyn services::Routes> {
    async fn list_routes(
        &self,
        request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "Routes",
            "ListRoutes",
            self.inner
                .list_routes(req.cluster_name, req.page_size, req.page_token)
        )
    }

    async fn create_route(
        &self,
        request: Request<pb::CreateRouteRequest>,
    ) -> Result<Response<pb::CreateRouteResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Routes", "CreateRoute", async {
            let route = require(req.route, "route")?;
            if route.destination_cidr.is_empty() {
                return Err(crate::validate::invalid(
                    "route.destination_cidr",
                    "must not be empty",
                ));
            }
            self.core.fenced(req.fence.as_ref()).await?;
            self.inner
                .create_route(req.cluster_name, req.name_hint, route)
                .await
        })
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteRouteResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "Routes", "DeleteRoute", async {
            let route = require(req.route, "route")?;
            self.core.fenced(req.fence.as_ref()).await?;
            self.inner.delete_route(req.cluster_name, route).await
        })
    }
}

#[tonic::async_trait]
impl pb::volume_labels_server::VolumeLabels for Adapter<dyn services::VolumeLabels> {
    async fn get_labels_for_volume(
        &self,
        request: Request<pb::GetLabelsForVolumeRequest>,
    ) -> Result<Response<pb::GetLabelsForVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc!(self.core, "VolumeLabels", "GetLabelsForVolume", async {
            let volume = require(req.volume, "volume")?;
            self.inner.get_labels_for_volume(volume).await
        })
    }
}

#[tonic::async_trait]
impl pb::load_balancer_validation_server::LoadBalancerValidation
    for Adapter<dyn services::LoadBalancerValidation>
{
    async fn validate_load_balancer(
        &self,
        request: Request<pb::ValidateLoadBalancerRequest>,
    ) -> Result<Response<pb::ValidateLoadBalancerResponse>, Status> {
        let req = request.into_inner();
        rpc!(
            self.core,
            "LoadBalancerValidation",
            "ValidateLoadBalancer",
            async {
                // On CREATE a generateName'd Service may not have its name yet: only presence
                // is required here.
                let service = require(req.service, "service")?;
                self.inner
                    .validate_load_balancer(req.cluster_name, service, req.old_service)
                    .await
            }
        )
    }
}
