//! One trait per CPI service. Arguments are the validated fields of the request message, results
//! are the generated response messages; the framework's adapters do the rest.
//!
//! Guarantees made by the adapters before a provider method runs: every `Node` has
//! `metadata.name` (and, for `InstancesV2`, a provider ID that is absent or one of ours); every
//! `Service` of a `LoadBalancer` call has `metadata.name` and `metadata.namespace`; every
//! provider-ID argument is well formed and carries one of the provider's own prefixes (foreign
//! ones are answered `NOT_OWNED` by the framework); and every mutating call has passed the fence
//! check. Backend nodes of LB calls are not ownership-checked: the caller filters them; they
//! arrive shared (`Arc<[Node]>`) because a caller may send one node set for many calls (see
//! `PutNodeSet`), so a provider can key derived data on the list it was given.

use std::sync::Arc;

use cpi_proto::CpiError;
use cpi_proto::v1::{
    AddSshKeyResponse, Consistency, CreateRouteResponse, CurrentNodeNameResponse,
    DeleteRouteResponse, EnsureLoadBalancerDeletedResponse, EnsureLoadBalancerResponse,
    GetLabelsForVolumeResponse, GetLoadBalancerNameResponse, GetLoadBalancerResponse,
    InstanceExistsResponse, InstanceIdResponse, InstanceMetadataResponse, InstanceShutdownResponse,
    InstanceTypeResponse, ListClustersResponse, ListRoutesResponse, MasterResponse, Node,
    NodeAddressesResponse, PersistentVolume, Route, Service, UpdateLoadBalancerResponse,
    ValidateLoadBalancerResponse, Zone,
};

/// Upstream `InstancesV2`: questions about the instance behind a Node.
#[tonic::async_trait]
pub trait InstancesV2: Send + Sync + 'static {
    /// Tri-state existence. EXISTS for stopped instances; NOT_FOUND only when authoritative;
    /// UNKNOWN (or an error) whenever the cloud could not tell.
    async fn instance_exists(
        &self,
        node: Node,
        consistency: Consistency,
    ) -> Result<InstanceExistsResponse, CpiError>;

    /// Whether the instance is shut down (but still exists).
    async fn instance_shutdown(
        &self,
        node: Node,
        consistency: Consistency,
    ) -> Result<InstanceShutdownResponse, CpiError>;

    /// What the node needs to be initialised; `metadata: None` leaves it uninitialised for now.
    async fn instance_metadata(&self, node: Node) -> Result<InstanceMetadataResponse, CpiError>;
}

/// Upstream legacy `Instances`.
#[tonic::async_trait]
pub trait Instances: Send + Sync + 'static {
    /// Addresses of the instance with this node name.
    async fn node_addresses(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<NodeAddressesResponse, CpiError>;

    /// Addresses of the instance with this provider ID.
    async fn node_addresses_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<NodeAddressesResponse, CpiError>;

    /// Instance ID (without the provider prefix); `InstanceNotFound` only when it does not exist.
    async fn instance_id(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<InstanceIdResponse, CpiError>;

    /// Instance type of the node.
    async fn instance_type(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<InstanceTypeResponse, CpiError>;

    /// Instance type by provider ID.
    async fn instance_type_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceTypeResponse, CpiError>;

    /// Installs an SSH key on every instance; fenced. Most providers do not support it.
    async fn add_ssh_key_to_all_instances(
        &self,
        _user: String,
        _key_data: Vec<u8>,
    ) -> Result<AddSshKeyResponse, CpiError> {
        Err(CpiError::NotImplemented(
            "AddSSHKeyToAllInstances is not supported by this provider".into(),
        ))
    }

    /// Node name of the instance with this host name.
    async fn current_node_name(
        &self,
        hostname: String,
    ) -> Result<CurrentNodeNameResponse, CpiError>;

    /// Tri-state existence by provider ID.
    async fn instance_exists_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceExistsResponse, CpiError>;

    /// Whether the instance is shut down, by provider ID.
    async fn instance_shutdown_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceShutdownResponse, CpiError>;
}

/// Upstream legacy `Zones`; callers skip it when `InstancesV2` is offered.
#[tonic::async_trait]
pub trait Zones: Send + Sync + 'static {
    /// Zone of the machine the shim runs on.
    async fn get_zone(&self) -> Result<Zone, CpiError>;

    /// Zone of an instance by provider ID.
    async fn get_zone_by_provider_id(&self, provider_id: String) -> Result<Zone, CpiError>;

    /// Zone of an instance by node name.
    async fn get_zone_by_node_name(&self, node_name: String) -> Result<Zone, CpiError>;
}

/// Upstream `Clusters`.
#[tonic::async_trait]
pub trait Clusters: Send + Sync + 'static {
    /// One page of cluster names; `page_size` 0 lets the provider choose.
    async fn list_clusters(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<ListClustersResponse, CpiError>;

    /// Address of a cluster's master.
    async fn master(&self, cluster_name: String) -> Result<MasterResponse, CpiError>;
}

/// Upstream `LoadBalancer`. The mutating calls have passed the fence check.
#[tonic::async_trait]
pub trait LoadBalancer: Send + Sync + 'static {
    /// The Service's LB; `exists: false` when none was created for it.
    async fn get_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<GetLoadBalancerResponse, CpiError>;

    /// Cloud name of the Service's LB.
    async fn get_load_balancer_name(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<GetLoadBalancerNameResponse, CpiError>;

    /// Creates or updates the LB; `REPLACEMENT_REQUIRED` when that needs a replacement and
    /// `allow_replacement` is false.
    async fn ensure_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
        nodes: Arc<[Node]>,
        allow_replacement: bool,
    ) -> Result<EnsureLoadBalancerResponse, CpiError>;

    /// Updates only the LB's backend hosts.
    async fn update_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
        nodes: Arc<[Node]>,
    ) -> Result<UpdateLoadBalancerResponse, CpiError>;

    /// Deletes the LB; succeeds when it did not exist.
    async fn ensure_load_balancer_deleted(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<EnsureLoadBalancerDeletedResponse, CpiError>;
}

/// Upstream `Routes`. The mutating calls have passed the fence check.
#[tonic::async_trait]
pub trait Routes: Send + Sync + 'static {
    /// One page of the cluster's managed routes.
    async fn list_routes(
        &self,
        cluster_name: String,
        page_size: u32,
        page_token: String,
    ) -> Result<ListRoutesResponse, CpiError>;

    /// Creates a route; an identical existing route is success.
    async fn create_route(
        &self,
        cluster_name: String,
        name_hint: String,
        route: Route,
    ) -> Result<CreateRouteResponse, CpiError>;

    /// Deletes a route as listed; an absent route is success.
    async fn delete_route(
        &self,
        cluster_name: String,
        route: Route,
    ) -> Result<DeleteRouteResponse, CpiError>;
}

/// Upstream `PVLabeler`.
#[tonic::async_trait]
pub trait VolumeLabels: Send + Sync + 'static {
    /// Topology labels for a PersistentVolume; `DiskNotFound` when its disk does not exist.
    async fn get_labels_for_volume(
        &self,
        volume: PersistentVolume,
    ) -> Result<GetLabelsForVolumeResponse, CpiError>;
}

/// Load-balancer settings validation for the admission webhook.
#[tonic::async_trait]
pub trait LoadBalancerValidation: Send + Sync + 'static {
    /// Verdict on a Service being created (`old_service: None`) or updated.
    async fn validate_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
        old_service: Option<Service>,
    ) -> Result<ValidateLoadBalancerResponse, CpiError>;
}
