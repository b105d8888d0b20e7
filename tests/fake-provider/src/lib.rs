//! A scriptable provider shim for controller tests, with the semantics of upstream's
//! `k8s.io/cloud-provider/fake` cloud where the upstream controller tests rely on them.
//!
//! A test fills in a [`FakeCloud`] (a plain struct with public fields, so fixtures read like
//! upstream's `&fakecloud.Cloud{...}` literals), calls [`FakeCloud::serve`], and points the
//! controller-manager's `Cloud::connect` at [`ServedFake::socket_path`]. The shim is the real
//! `shim-framework` server on a Unix socket in a temporary directory, in this process, so the
//! controllers talk the real CPI over a real socket.
//!
//! Upstream semantics kept:
//! - `NodeAddresses` and `NodeAddressesByProviderID` both answer [`FakeCloud::addresses`], or
//!   fail with [`FakeCloud::err`]; the zone calls answer [`FakeCloud::zone`] or fail with `err`.
//! - `InstanceID(name)` fails with `ext_id_err[name]` when set, else answers `ext_id[name]`
//!   (empty when missing, no error).
//! - `InstanceType(name)` answers `instance_types[name]`; `InstanceTypeByProviderID(id)`
//!   answers `instance_types[id]`: the map is keyed by provider ID there, as upstream.
//! - Existence (both `InstanceExists` and `InstanceExistsByProviderID`) fails with
//!   `err_by_provider_id`, else answers `EXISTS` / `NOT_FOUND` from `exists_by_provider_id`
//!   (upstream's `false, nil`), unless [`FakeCloud::existence`] overrides the answer (e.g.
//!   `UNKNOWN`, which the CPI has and upstream has not).
//! - Shutdown (both variants) fails with `err_shutdown_by_provider_id`, else answers
//!   `node_shutdown`.
//! - `InstanceMetadata(node)` answers `override_metadata` when set (`Some(None)` is upstream's
//!   `nil` metadata); else fails with `metadata_err`; else `{provider_id[node.name],
//!   instance_types[node.providerID], addresses, zone, additional_labels}`.
//! - Every call is logged (upstream `Calls`, same method names) and first sleeps
//!   `request_delay` (upstream `RequestDelay`).
//! - LoadBalancer (served unless `load_balancers_disabled`, upstream `DisableLoadBalancers`):
//!   `EnsureLoadBalancer` logs `"create"`, records the Service and its hosts in `ensure_calls`,
//!   stores a [`FakeBalancer`] under the LB name (upstream `GetLoadBalancerName`: `"a"` + UID
//!   without dashes, at most 32 characters) with the region of `zone`, and answers one ingress
//!   `{ip: external_ip, ipMode: balancer_ip_mode}`; `UpdateLoadBalancer` logs `"update"` and
//!   records `update_calls`; `EnsureLoadBalancerDeleted` logs `"delete"` and forgets the
//!   balancer; `GetLoadBalancer` logs `"get"` (upstream logs nothing) and answers `exists`.
//!   Each fails with its own scripted error (`ensure_err`, `update_err`, `delete_err`,
//!   `get_err`: e.g. RETRY_AFTER, IMPLEMENTED_ELSEWHERE, INVALID_OBJECT) or else with `err`,
//!   as upstream's shared `Err`. The subject of LB calls is the Service's `namespace/name`;
//!   a call whose subject has a gate in `gates` waits for a permit before answering.
//!
//! - Routes (served unless `routes_disabled`, upstream `DisableRoutes`): stored in `route_map`
//!   under `<cluster>-<targetNode>-<destinationCIDR>` (upstream `RouteMap`). `ListRoutes` logs
//!   `"list-routes"` (subject: the page token), fails with `err` (as upstream) or with
//!   `list_routes_page_errs[page]`, and answers the cluster's routes in key order, at most
//!   `route_page_size` per page (0: as many as asked), with `route_capacity`; listed routes
//!   carry `route_node_addresses` as EnableNodeAddresses. `CreateRoute` logs `"create-route"`
//!   (subject `node/cidr`); a route of an existing key sets `err` (sticky, as upstream) and
//!   fails; it fails with `route_create_errs[cidr]` when set, or when the cluster already has
//!   `route_capacity` routes; else it stores the route named `<cluster>-<nameHint>`, owned by
//!   the cluster. `DeleteRoute` logs `"delete-route"` and removes the route matching (CIDR,
//!   target node, cluster), else sets `err` and fails (as upstream).
//!
//! - VolumeLabels (served when `volume_labels_enabled`, upstream's fake `VolumeLabelMap`):
//!   `GetLabelsForVolume` logs `"get-labels-for-volume"` (subject: the PV name), fails with
//!   `volume_labels_err`, else answers `volume_labels[pv name]` (none when missing, as
//!   upstream's `nil, nil`), and records the volume it was asked about in `volumes_asked`.
//! - LoadBalancerValidation (served when `lb_validation_enabled`): `ValidateLoadBalancer` logs
//!   `"validate-load-balancer"` (subject: the Service's `namespace/name`), fails with
//!   `lb_validation_err`, else answers `lb_validation[namespace/name]` (allowed when missing),
//!   and records each request in `validations_asked`.
//!
//! The fake serves on a Unix socket ([`FakeCloud::serve`]) or on any listener the shim
//! framework's [`ServeFlags`] describe, e.g. mutual TLS over TCP ([`FakeCloud::serve_with`]).
//!
//! Capabilities follow the toggles (`instances_v2_enabled`, `instances_disabled`,
//! `zones_disabled`, `load_balancers_disabled`, `routes_disabled`, `volume_labels_enabled`,
//! `lb_validation_enabled`, `csi_drivers`) at the time [`FakeCloud::serve`] is called; every
//! other field may be changed while serving through [`ServedFake::update`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The CPI error model; scripted errors are values of it.
pub use cpi_proto::CpiError;
/// The generated `cloudprovider.v1` types (addresses, metadata, existence answers).
pub use cpi_proto::v1 as proto;

use cpi_proto::v1::{self as pb, Consistency, Existence, NodeAddressType, PowerState};
use shim_framework::{
    Instances, InstancesV2, LoadBalancer, LoadBalancerValidation, ProviderDescription, Routes,
    RunningShim, ShimError, ShimServer, VolumeLabels, Zones, node_name,
};
use tokio::sync::oneshot;

/// Where a [`ServedFake`] listens.
pub use cpi_transport::LocalAddr;
/// The serving flags of [`FakeCloud::serve_with`].
pub use shim_framework::ServeFlags;

/// Provider name used when [`FakeCloud::provider`] is empty (upstream `ProviderName()`).
pub const DEFAULT_PROVIDER: &str = "fake";

/// How long in-flight calls may run once the fake is shut down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Method names written to the call log; the same strings as upstream's fake.
pub mod call {
    /// `Instances.NodeAddresses`.
    pub const NODE_ADDRESSES: &str = "node-addresses";
    /// `Instances.NodeAddressesByProviderID`.
    pub const NODE_ADDRESSES_BY_PROVIDER_ID: &str = "node-addresses-by-provider-id";
    /// `Instances.InstanceID`.
    pub const INSTANCE_ID: &str = "instance-id";
    /// `Instances.InstanceType`.
    pub const INSTANCE_TYPE: &str = "instance-type";
    /// `Instances.InstanceTypeByProviderID`.
    pub const INSTANCE_TYPE_BY_PROVIDER_ID: &str = "instance-type-by-provider-id";
    /// `Instances.CurrentNodeName`.
    pub const CURRENT_NODE_NAME: &str = "current-node-name";
    /// `Instances.InstanceExistsByProviderID`.
    pub const INSTANCE_EXISTS_BY_PROVIDER_ID: &str = "instance-exists-by-provider-id";
    /// `Instances.InstanceShutdownByProviderID`.
    pub const INSTANCE_SHUTDOWN_BY_PROVIDER_ID: &str = "instance-shutdown-by-provider-id";
    /// `InstancesV2.InstanceExists`.
    pub const INSTANCE_EXISTS: &str = "instance-exists";
    /// `InstancesV2.InstanceShutdown`.
    pub const INSTANCE_SHUTDOWN: &str = "instance-shutdown";
    /// `InstancesV2.InstanceMetadata` (upstream logs it as `instance-metadata-by-provider-id`).
    pub const INSTANCE_METADATA: &str = "instance-metadata";
    /// `Zones.GetZone`.
    pub const GET_ZONE: &str = "get-zone";
    /// `Zones.GetZoneByProviderID`.
    pub const GET_ZONE_BY_PROVIDER_ID: &str = "get-zone-by-provider-id";
    /// `Zones.GetZoneByNodeName`.
    pub const GET_ZONE_BY_NODE_NAME: &str = "get-zone-by-node-name";
    /// `LoadBalancer.EnsureLoadBalancer`.
    pub const CREATE: &str = "create";
    /// `LoadBalancer.UpdateLoadBalancer`.
    pub const UPDATE: &str = "update";
    /// `LoadBalancer.EnsureLoadBalancerDeleted`.
    pub const DELETE: &str = "delete";
    /// `LoadBalancer.GetLoadBalancer` (not logged upstream).
    pub const GET: &str = "get";
    /// `LoadBalancer.GetLoadBalancerName` (not logged upstream).
    pub const GET_NAME: &str = "get-name";
    /// `Routes.ListRoutes` (one per page).
    pub const LIST_ROUTES: &str = "list-routes";
    /// `Routes.CreateRoute`.
    pub const CREATE_ROUTE: &str = "create-route";
    /// `Routes.DeleteRoute`.
    pub const DELETE_ROUTE: &str = "delete-route";
    /// `VolumeLabels.GetLabelsForVolume`.
    pub const GET_LABELS_FOR_VOLUME: &str = "get-labels-for-volume";
    /// `LoadBalancerValidation.ValidateLoadBalancer`.
    pub const VALIDATE_LOAD_BALANCER: &str = "validate-load-balancer";
}

/// A route as the fake stores it (upstream `fakecloud.Route`).
#[derive(Debug, Clone, PartialEq)]
pub struct FakeRoute {
    /// The cluster it belongs to.
    pub cluster: String,
    /// The route.
    pub route: pb::Route,
}

/// Upstream's `RouteMap` key of a route.
pub fn route_key(cluster: &str, route: &pb::Route) -> String {
    format!("{cluster}-{}-{}", route.target_node, route.destination_cidr)
}

/// A load balancer as the fake stores it (upstream `fakecloud.Balancer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeBalancer {
    /// LB name.
    pub name: String,
    /// Region (of `FakeCloud::zone`).
    pub region: String,
    /// `spec.loadBalancerIP` of the Service.
    pub load_balancer_ip: Option<String>,
    /// The Service's ports.
    pub ports: Vec<pb::ServicePort>,
    /// Backend node names.
    pub hosts: Vec<String>,
}

/// One Ensure or Update call (upstream `EnsureCalls` / `UpdateCalls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLbCall {
    /// The Service's `namespace/name`.
    pub service: String,
    /// The Service's UID.
    pub uid: String,
    /// Backend node names, in the order received.
    pub hosts: Vec<String>,
    /// Backend node provider IDs (empty when unset), in the same order.
    pub provider_ids: Vec<String>,
}

/// Upstream `DefaultLoadBalancerName`: `"a"` + the UID without dashes, at most 32 characters.
pub fn default_load_balancer_name(service: &pb::Service) -> String {
    let uid = service
        .metadata
        .as_ref()
        .map(|m| m.uid.replace('-', ""))
        .unwrap_or_default();
    let mut name = format!("a{uid}");
    name.truncate(32);
    name
}

fn service_key(service: &pb::Service) -> String {
    service
        .metadata
        .as_ref()
        .map(|m| format!("{}/{}", m.namespace, m.name))
        .unwrap_or_default()
}

/// One call that reached the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    /// Method name, one of the [`call`] constants.
    pub method: &'static str,
    /// What the call was about: the node name or provider ID argument (empty for `GetZone`).
    pub subject: String,
}

/// Upstream `cloudprovider.Zone`; empty strings are sent as absent fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeZone {
    /// Failure domain (zone).
    pub failure_domain: String,
    /// Region.
    pub region: String,
}

/// The scripted answers of the fake provider, plus its call log (upstream `fakecloud.Cloud`).
#[derive(Debug, Clone)]
pub struct FakeCloud {
    /// Provider name (upstream `Provider`); empty means [`DEFAULT_PROVIDER`].
    pub provider: String,
    /// Provider-ID prefixes claimed in `ProviderInfo`; empty means `"<provider>://"`.
    pub provider_id_prefixes: Vec<String>,
    /// Serve InstancesV2 (upstream `EnableInstancesV2`; off by default).
    pub instances_v2_enabled: bool,
    /// Do not serve Instances (upstream `DisableInstances`).
    pub instances_disabled: bool,
    /// Do not serve Zones (upstream `DisableZones`).
    pub zones_disabled: bool,
    /// Instance IDs by node name (upstream `ExtID`).
    pub ext_id: HashMap<String, String>,
    /// InstanceID errors by node name (upstream `ExtIDErr`).
    pub ext_id_err: HashMap<String, CpiError>,
    /// Instance types by node name (InstanceType) or provider ID (InstanceTypeByProviderID,
    /// InstanceMetadata), as upstream `InstanceTypes`.
    pub instance_types: HashMap<String, String>,
    /// Addresses answered by every address call and by InstanceMetadata (upstream `Addresses`).
    pub addresses: Vec<pb::NodeAddress>,
    /// Error of the address and zone calls (upstream `Err`).
    pub err: Option<CpiError>,
    /// Zone and region (upstream `Zone`).
    pub zone: FakeZone,
    /// InstanceMetadata provider IDs by node name (upstream `ProviderID`).
    pub provider_id: HashMap<String, String>,
    /// InstanceMetadata error (upstream `MetadataErr`).
    pub metadata_err: Option<CpiError>,
    /// Replaces InstanceMetadata's answer; `Some(None)` answers "no metadata" (upstream `nil`).
    pub override_metadata: Option<Option<pb::InstanceMetadata>>,
    /// InstanceMetadata additional labels (upstream `AdditionalLabels`).
    pub additional_labels: HashMap<String, String>,
    /// Existence answer: `true` → EXISTS, `false` → NOT_FOUND (upstream `ExistsByProviderID`).
    pub exists_by_provider_id: bool,
    /// Overrides the existence answer derived from `exists_by_provider_id` (e.g. UNKNOWN).
    pub existence: Option<Existence>,
    /// Existence error (upstream `ErrByProviderID`).
    pub err_by_provider_id: Option<CpiError>,
    /// Shutdown answer (upstream `NodeShutdown`).
    pub node_shutdown: bool,
    /// Shutdown error (upstream `ErrShutdownByProviderID`).
    pub err_shutdown_by_provider_id: Option<CpiError>,
    /// Sleep before answering every call (upstream `RequestDelay`).
    pub request_delay: Duration,
    /// Extra sleep before answering calls about one subject (a node name or provider ID): one
    /// slow instance among fast ones.
    pub subject_delays: HashMap<String, Duration>,
    /// Every call received, in order (upstream `Calls`).
    pub calls: Vec<FakeCall>,
    /// Calls being answered right now.
    pub in_flight: usize,
    /// The most calls ever answered at the same time (how many workers really ran at once).
    pub peak_in_flight: usize,
    /// Do not serve LoadBalancer (upstream `DisableLoadBalancers`).
    pub load_balancers_disabled: bool,
    /// Ingress IP answered by EnsureLoadBalancer (upstream `ExternalIP`).
    pub external_ip: String,
    /// Ingress `ipMode` answered by EnsureLoadBalancer (upstream `BalancerIPMode`).
    pub balancer_ip_mode: Option<String>,
    /// GetLoadBalancer's `exists` (upstream `Exists`).
    pub exists: bool,
    /// EnsureLoadBalancer's error (else `err`).
    pub ensure_err: Option<CpiError>,
    /// UpdateLoadBalancer's error (else `err`).
    pub update_err: Option<CpiError>,
    /// EnsureLoadBalancerDeleted's error (else `err`).
    pub delete_err: Option<CpiError>,
    /// GetLoadBalancer's error (else `err`).
    pub get_err: Option<CpiError>,
    /// Stored balancers by name (upstream `Balancers`).
    pub balancers: HashMap<String, FakeBalancer>,
    /// EnsureLoadBalancer calls (upstream `EnsureCalls`).
    pub ensure_calls: Vec<FakeLbCall>,
    /// UpdateLoadBalancer calls (upstream `UpdateCalls`).
    pub update_calls: Vec<FakeLbCall>,
    /// Calls about a subject with a gate wait for one permit of it before answering.
    pub gates: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Do not serve Routes (upstream `DisableRoutes`).
    pub routes_disabled: bool,
    /// Stored routes by [`route_key`] (upstream `RouteMap`).
    pub route_map: BTreeMap<String, FakeRoute>,
    /// The most routes per ListRoutes page; 0 answers as many as asked.
    pub route_page_size: u32,
    /// The route table's capacity, reported by ListRoutes and enforced by CreateRoute.
    pub route_capacity: Option<u32>,
    /// Listed routes carry EnableNodeAddresses.
    pub route_node_addresses: bool,
    /// CreateRoute errors by destination CIDR (one failing route among others).
    pub route_create_errs: HashMap<String, CpiError>,
    /// ListRoutes errors by 1-based page number (a listing that fails part-way).
    pub list_routes_page_errs: HashMap<usize, CpiError>,
    /// ListRoutes hands out the same next-page token on every page (a broken shim).
    pub repeat_page_token: bool,
    /// Serve VolumeLabels (off by default: upstream's fake has no PVLabeler switch, but most
    /// shims do not label volumes).
    pub volume_labels_enabled: bool,
    /// GetLabelsForVolume answers by PV name (upstream `VolumeLabelMap`).
    pub volume_labels: HashMap<String, HashMap<String, String>>,
    /// CSI drivers declared in `ProviderInfo.csi_drivers` (read when serving starts).
    pub csi_drivers: Vec<String>,
    /// GetLabelsForVolume's error.
    pub volume_labels_err: Option<CpiError>,
    /// Every volume GetLabelsForVolume was asked about, in order.
    pub volumes_asked: Vec<pb::PersistentVolume>,
    /// Serve LoadBalancerValidation (off by default).
    pub lb_validation_enabled: bool,
    /// ValidateLoadBalancer verdicts by the Service's `namespace/name`; allowed when missing.
    pub lb_validation: HashMap<String, pb::ValidateLoadBalancerResponse>,
    /// ValidateLoadBalancer's error.
    pub lb_validation_err: Option<CpiError>,
    /// Every ValidateLoadBalancer request, in order.
    pub validations_asked: Vec<pb::ValidateLoadBalancerRequest>,
}

impl Default for FakeCloud {
    fn default() -> Self {
        Self {
            provider: DEFAULT_PROVIDER.to_string(),
            provider_id_prefixes: Vec::new(),
            instances_v2_enabled: false,
            instances_disabled: false,
            zones_disabled: false,
            ext_id: HashMap::new(),
            ext_id_err: HashMap::new(),
            instance_types: HashMap::new(),
            addresses: Vec::new(),
            err: None,
            zone: FakeZone::default(),
            provider_id: HashMap::new(),
            metadata_err: None,
            override_metadata: None,
            additional_labels: HashMap::new(),
            exists_by_provider_id: false,
            existence: None,
            err_by_provider_id: None,
            node_shutdown: false,
            err_shutdown_by_provider_id: None,
            request_delay: Duration::ZERO,
            subject_delays: HashMap::new(),
            calls: Vec::new(),
            in_flight: 0,
            peak_in_flight: 0,
            load_balancers_disabled: false,
            external_ip: String::new(),
            balancer_ip_mode: None,
            exists: false,
            ensure_err: None,
            update_err: None,
            delete_err: None,
            get_err: None,
            balancers: HashMap::new(),
            ensure_calls: Vec::new(),
            update_calls: Vec::new(),
            gates: HashMap::new(),
            routes_disabled: false,
            route_map: BTreeMap::new(),
            route_page_size: 0,
            route_capacity: None,
            route_node_addresses: false,
            route_create_errs: HashMap::new(),
            list_routes_page_errs: HashMap::new(),
            repeat_page_token: false,
            volume_labels_enabled: false,
            csi_drivers: Vec::new(),
            volume_labels: HashMap::new(),
            volume_labels_err: None,
            volumes_asked: Vec::new(),
            lb_validation_enabled: false,
            lb_validation: HashMap::new(),
            lb_validation_err: None,
            validations_asked: Vec::new(),
        }
    }
}

/// Why the fake could not be served or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The temporary directory for the socket could not be created.
    #[error("creating the fake provider's socket directory: {0}")]
    TempDir(#[source] std::io::Error),
    /// The shim framework refused to start or failed while serving.
    #[error("fake provider shim: {0}")]
    Shim(#[from] ShimError),
    /// The shim did not stop within the grace period.
    #[error("fake provider shim did not stop within {0:?}")]
    StopTimeout(Duration),
}

/// `NodeAddress` of the given type.
pub fn address(kind: NodeAddressType, address: &str) -> pb::NodeAddress {
    pb::NodeAddress {
        r#type: kind as i32,
        address: address.to_string(),
    }
}

/// A `Hostname` address.
pub fn hostname(name: &str) -> pb::NodeAddress {
    address(NodeAddressType::Hostname, name)
}

/// An `InternalIP` address.
pub fn internal_ip(ip: &str) -> pb::NodeAddress {
    address(NodeAddressType::InternalIp, ip)
}

/// An `ExternalIP` address.
pub fn external_ip(ip: &str) -> pb::NodeAddress {
    address(NodeAddressType::ExternalIp, ip)
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_string())
}

impl FakeCloud {
    /// The provider name announced in `ProviderInfo` (upstream `ProviderName()`).
    pub fn provider_name(&self) -> &str {
        if self.provider.is_empty() {
            DEFAULT_PROVIDER
        } else {
            &self.provider
        }
    }

    /// Stores `route` for `cluster` (a fixture: no call is logged).
    pub fn add_route(&mut self, cluster: &str, route: pb::Route) {
        self.route_map.insert(
            route_key(cluster, &route),
            FakeRoute {
                cluster: cluster.to_string(),
                route,
            },
        );
    }

    /// The existence answer when no error is scripted.
    fn existence_answer(&self) -> pb::InstanceExistsResponse {
        let existence = self.existence.unwrap_or(if self.exists_by_provider_id {
            Existence::Exists
        } else {
            Existence::NotFound
        });
        pb::InstanceExistsResponse {
            existence: existence as i32,
            power_state: PowerState::Unspecified as i32,
            detail: String::new(),
        }
    }

    fn existence_result(&self) -> Result<pb::InstanceExistsResponse, CpiError> {
        match &self.err_by_provider_id {
            Some(err) => Err(err.clone()),
            None => Ok(self.existence_answer()),
        }
    }

    fn shutdown_result(&self) -> Result<pb::InstanceShutdownResponse, CpiError> {
        if let Some(err) = &self.err_shutdown_by_provider_id {
            return Err(err.clone());
        }
        Ok(pb::InstanceShutdownResponse {
            shutdown: self.node_shutdown,
            power_state: if self.node_shutdown {
                PowerState::Shutdown as i32
            } else {
                PowerState::Unspecified as i32
            },
        })
    }

    fn addresses_result(&self) -> Result<pb::NodeAddressesResponse, CpiError> {
        match &self.err {
            Some(err) => Err(err.clone()),
            None => Ok(pb::NodeAddressesResponse {
                addresses: self.addresses.clone(),
            }),
        }
    }

    fn zone_result(&self) -> Result<pb::Zone, CpiError> {
        match &self.err {
            Some(err) => Err(err.clone()),
            None => Ok(pb::Zone {
                failure_domain: non_empty(&self.zone.failure_domain),
                region: non_empty(&self.zone.region),
            }),
        }
    }

    fn metadata_result(&self, node: &pb::Node) -> Result<pb::InstanceMetadataResponse, CpiError> {
        if let Some(metadata) = &self.override_metadata {
            return Ok(pb::InstanceMetadataResponse {
                metadata: metadata.clone(),
            });
        }
        if let Some(err) = &self.metadata_err {
            return Err(err.clone());
        }
        let name = node_name(node);
        let node_provider_id = node.provider_id.as_deref().unwrap_or_default();
        Ok(pb::InstanceMetadataResponse {
            metadata: Some(pb::InstanceMetadata {
                provider_id: self.provider_id.get(name).and_then(|id| non_empty(id)),
                instance_type: self
                    .instance_types
                    .get(node_provider_id)
                    .and_then(|t| non_empty(t)),
                node_addresses: self.addresses.clone(),
                zone: non_empty(&self.zone.failure_domain),
                region: non_empty(&self.zone.region),
                additional_labels: self
                    .additional_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
        })
    }

    /// Serves this fake on a Unix socket in a new temporary directory, in the background of the
    /// current tokio runtime, with the services its toggles enable.
    pub async fn serve(self) -> Result<ServedFake, FakeError> {
        let dir = tempfile::Builder::new()
            .prefix("fake-provider-")
            .tempdir()
            .map_err(FakeError::TempDir)?;
        let socket = dir.path().join("cpi.sock");
        let mut served = self.serve_at(&socket).await?;
        served._dir = Some(dir);
        Ok(served)
    }

    /// Serves this fake on the Unix socket `socket` (for example the one a stopped fake
    /// served on, to play a restarted shim).
    pub async fn serve_at(self, socket: &Path) -> Result<ServedFake, FakeError> {
        self.serve_with(ServeFlags::unix(socket)).await
    }

    /// Serves this fake as `flags` say (e.g. mutual TLS on `127.0.0.1:0`, read the port from
    /// [`ServedFake::address`]); the shutdown grace period is always short.
    pub async fn serve_with(self, mut flags: ServeFlags) -> Result<ServedFake, FakeError> {
        let description = ProviderDescription::new(self.provider_name(), env!("CARGO_PKG_VERSION"))
            .with_cluster_id(true)
            .with_provider_id_prefixes(self.provider_id_prefixes.clone())
            .with_csi_drivers(self.csi_drivers.clone());
        let (v2, instances, zones, load_balancers, routes, volume_labels, lb_validation) = (
            self.instances_v2_enabled,
            !self.instances_disabled,
            !self.zones_disabled,
            !self.load_balancers_disabled,
            !self.routes_disabled,
            self.volume_labels_enabled,
            self.lb_validation_enabled,
        );
        let state = Arc::new(Mutex::new(self));
        let provider = FakeProvider {
            state: Arc::clone(&state),
        };
        let mut builder = ShimServer::builder(description);
        if v2 {
            builder = builder.instances_v2(provider.clone());
        }
        if instances {
            builder = builder.instances(provider.clone());
        }
        if load_balancers {
            builder = builder.load_balancer(provider.clone());
        }
        if routes {
            builder = builder.routes(provider.clone());
        }
        if volume_labels {
            builder = builder.volume_labels(provider.clone());
        }
        if lb_validation {
            builder = builder.load_balancer_validation(provider.clone());
        }
        if zones {
            builder = builder.zones(provider);
        }
        flags.shutdown_grace_period = SHUTDOWN_GRACE;
        let (stop, stopped) = oneshot::channel::<()>();
        let shim = builder
            .build()
            .start(&flags, async move {
                let _ = stopped.await;
            })
            .await?;
        let address = shim.grpc_addr().clone();
        Ok(ServedFake {
            socket: flags.unix_socket.clone().unwrap_or_default(),
            address,
            state,
            shim: Some(shim),
            stop: Some(stop),
            _dir: None,
        })
    }
}

/// A [`FakeCloud`] being served; stops serving when dropped.
pub struct ServedFake {
    socket: PathBuf,
    address: LocalAddr,
    state: Arc<Mutex<FakeCloud>>,
    shim: Option<RunningShim>,
    stop: Option<oneshot::Sender<()>>,
    // Last: the directory (and socket) go after the server is told to stop.
    _dir: Option<tempfile::TempDir>,
}

impl ServedFake {
    /// Path of the Unix socket the CPI is served on (for `ProviderEndpoint::Unix`); empty
    /// when it is served over TCP.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Where the CPI is served (the real port when port 0 was asked for).
    pub fn address(&self) -> &LocalAddr {
        &self.address
    }

    /// The shared state, locked (never hold it across an `.await`).
    pub fn state(&self) -> MutexGuard<'_, FakeCloud> {
        lock(&self.state)
    }

    /// Changes the scripted answers while serving.
    pub fn update(&self, change: impl FnOnce(&mut FakeCloud)) {
        change(&mut lock(&self.state));
    }

    /// Method names of every call received so far, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state)
            .calls
            .iter()
            .map(|c| c.method.to_string())
            .collect()
    }

    /// Every call received so far, with its subject, in order.
    pub fn call_log(&self) -> Vec<FakeCall> {
        lock(&self.state).calls.clone()
    }

    /// Forgets the calls received so far (including the Ensure and Update records).
    pub fn clear_calls(&self) {
        let mut state = lock(&self.state);
        state.calls.clear();
        state.ensure_calls.clear();
        state.update_calls.clear();
    }

    /// The LoadBalancer calls (`create`, `update`, `delete`, `get`) received so far, in order.
    pub fn lb_calls(&self) -> Vec<FakeCall> {
        lock(&self.state)
            .calls
            .iter()
            .filter(|c| [call::CREATE, call::UPDATE, call::DELETE, call::GET].contains(&c.method))
            .cloned()
            .collect()
    }

    /// The routes stored for `cluster`, in key order.
    pub fn routes(&self, cluster: &str) -> Vec<pb::Route> {
        lock(&self.state)
            .route_map
            .values()
            .filter(|r| r.cluster == cluster)
            .map(|r| r.route.clone())
            .collect()
    }

    /// How many calls of `method` were received so far.
    pub fn count(&self, method: &str) -> usize {
        lock(&self.state)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .count()
    }

    /// EnsureLoadBalancer calls so far.
    pub fn ensure_calls(&self) -> Vec<FakeLbCall> {
        lock(&self.state).ensure_calls.clone()
    }

    /// UpdateLoadBalancer calls so far.
    pub fn update_calls(&self) -> Vec<FakeLbCall> {
        lock(&self.state).update_calls.clone()
    }

    /// Stops serving and waits (at most a few seconds) for the shim to finish.
    pub async fn shutdown(mut self) -> Result<(), FakeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(shim) = self.shim.take() else {
            return Ok(());
        };
        let limit = SHUTDOWN_GRACE * 5;
        match tokio::time::timeout(limit, shim.wait()).await {
            Ok(result) => result.map_err(FakeError::from),
            Err(_) => Err(FakeError::StopTimeout(limit)),
        }
    }
}

impl Drop for ServedFake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn lock(state: &Mutex<FakeCloud>) -> MutexGuard<'_, FakeCloud> {
    // A test that panicked while holding the lock must not hide the state from the others.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The trait implementations the shim framework serves, over the shared state.
#[derive(Clone)]
struct FakeProvider {
    state: Arc<Mutex<FakeCloud>>,
}

impl FakeProvider {
    /// Logs the call, sleeps the scripted delay, then answers from the state.
    async fn answer<T>(
        &self,
        method: &'static str,
        subject: &str,
        answer: impl FnOnce(&FakeCloud) -> T,
    ) -> T {
        self.answer_mut(method, subject, |state| answer(state))
            .await
    }

    /// [`answer`](Self::answer) for calls that change the state.
    async fn answer_mut<T>(
        &self,
        method: &'static str,
        subject: &str,
        answer: impl FnOnce(&mut FakeCloud) -> T,
    ) -> T {
        let delay = {
            let mut state = lock(&self.state);
            state.calls.push(FakeCall {
                method,
                subject: subject.to_string(),
            });
            state.in_flight += 1;
            state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
            state.request_delay
                + state
                    .subject_delays
                    .get(subject)
                    .copied()
                    .unwrap_or_default()
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let gate = lock(&self.state).gates.get(subject).cloned();
        if let Some(gate) = gate
            && let Ok(permit) = gate.acquire().await
        {
            permit.forget();
        }
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        answer(&mut state)
    }
}

#[tonic::async_trait]
impl Instances for FakeProvider {
    async fn node_addresses(
        &self,
        node_name: String,
        _consistency: Consistency,
    ) -> Result<pb::NodeAddressesResponse, CpiError> {
        self.answer(
            call::NODE_ADDRESSES,
            &node_name,
            FakeCloud::addresses_result,
        )
        .await
    }

    async fn node_addresses_by_provider_id(
        &self,
        provider_id: String,
        _consistency: Consistency,
    ) -> Result<pb::NodeAddressesResponse, CpiError> {
        self.answer(
            call::NODE_ADDRESSES_BY_PROVIDER_ID,
            &provider_id,
            FakeCloud::addresses_result,
        )
        .await
    }

    async fn instance_id(
        &self,
        node_name: String,
        _consistency: Consistency,
    ) -> Result<pb::InstanceIdResponse, CpiError> {
        self.answer(call::INSTANCE_ID, &node_name, |s| {
            match s.ext_id_err.get(&node_name) {
                Some(err) => Err(err.clone()),
                None => Ok(pb::InstanceIdResponse {
                    instance_id: s.ext_id.get(&node_name).cloned().unwrap_or_default(),
                }),
            }
        })
        .await
    }

    async fn instance_type(
        &self,
        node_name: String,
        _consistency: Consistency,
    ) -> Result<pb::InstanceTypeResponse, CpiError> {
        self.answer(call::INSTANCE_TYPE, &node_name, |s| {
            Ok(pb::InstanceTypeResponse {
                instance_type: s.instance_types.get(&node_name).and_then(|t| non_empty(t)),
            })
        })
        .await
    }

    async fn instance_type_by_provider_id(
        &self,
        provider_id: String,
        _consistency: Consistency,
    ) -> Result<pb::InstanceTypeResponse, CpiError> {
        self.answer(call::INSTANCE_TYPE_BY_PROVIDER_ID, &provider_id, |s| {
            Ok(pb::InstanceTypeResponse {
                instance_type: s
                    .instance_types
                    .get(&provider_id)
                    .and_then(|t| non_empty(t)),
            })
        })
        .await
    }

    async fn current_node_name(
        &self,
        hostname: String,
    ) -> Result<pb::CurrentNodeNameResponse, CpiError> {
        self.answer(call::CURRENT_NODE_NAME, &hostname, |_| {
            Ok(pb::CurrentNodeNameResponse {
                node_name: hostname.clone(),
            })
        })
        .await
    }

    async fn instance_exists_by_provider_id(
        &self,
        provider_id: String,
        _consistency: Consistency,
    ) -> Result<pb::InstanceExistsResponse, CpiError> {
        self.answer(
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            &provider_id,
            FakeCloud::existence_result,
        )
        .await
    }

    async fn instance_shutdown_by_provider_id(
        &self,
        provider_id: String,
        _consistency: Consistency,
    ) -> Result<pb::InstanceShutdownResponse, CpiError> {
        self.answer(
            call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID,
            &provider_id,
            FakeCloud::shutdown_result,
        )
        .await
    }
}

#[tonic::async_trait]
impl InstancesV2 for FakeProvider {
    async fn instance_exists(
        &self,
        node: pb::Node,
        _consistency: Consistency,
    ) -> Result<pb::InstanceExistsResponse, CpiError> {
        self.answer(
            call::INSTANCE_EXISTS,
            node_name(&node),
            FakeCloud::existence_result,
        )
        .await
    }

    async fn instance_shutdown(
        &self,
        node: pb::Node,
        _consistency: Consistency,
    ) -> Result<pb::InstanceShutdownResponse, CpiError> {
        self.answer(
            call::INSTANCE_SHUTDOWN,
            node_name(&node),
            FakeCloud::shutdown_result,
        )
        .await
    }

    async fn instance_metadata(
        &self,
        node: pb::Node,
    ) -> Result<pb::InstanceMetadataResponse, CpiError> {
        self.answer(call::INSTANCE_METADATA, node_name(&node), |s| {
            s.metadata_result(&node)
        })
        .await
    }
}

#[tonic::async_trait]
impl Zones for FakeProvider {
    async fn get_zone(&self) -> Result<pb::Zone, CpiError> {
        self.answer(call::GET_ZONE, "", FakeCloud::zone_result)
            .await
    }

    async fn get_zone_by_provider_id(&self, provider_id: String) -> Result<pb::Zone, CpiError> {
        self.answer(
            call::GET_ZONE_BY_PROVIDER_ID,
            &provider_id,
            FakeCloud::zone_result,
        )
        .await
    }

    async fn get_zone_by_node_name(&self, node_name: String) -> Result<pb::Zone, CpiError> {
        self.answer(
            call::GET_ZONE_BY_NODE_NAME,
            &node_name,
            FakeCloud::zone_result,
        )
        .await
    }
}

impl FakeCloud {
    fn lb_error(&self, specific: &Option<CpiError>) -> Result<(), CpiError> {
        match specific.as_ref().or(self.err.as_ref()) {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn lb_call(service: &pb::Service, nodes: &[pb::Node]) -> FakeLbCall {
        FakeLbCall {
            service: service_key(service),
            uid: service
                .metadata
                .as_ref()
                .map(|m| m.uid.clone())
                .unwrap_or_default(),
            hosts: nodes.iter().map(|n| node_name(n).to_string()).collect(),
            provider_ids: nodes
                .iter()
                .map(|n| n.provider_id.clone().unwrap_or_default())
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl LoadBalancer for FakeProvider {
    async fn get_load_balancer(
        &self,
        _cluster_name: String,
        service: pb::Service,
    ) -> Result<pb::GetLoadBalancerResponse, CpiError> {
        self.answer(call::GET, &service_key(&service), |s| {
            s.lb_error(&s.get_err)?;
            let name = default_load_balancer_name(&service);
            let status = s.balancers.get(&name).map(|_| pb::LoadBalancerStatus {
                ingress: vec![pb::LoadBalancerIngress {
                    ip: s.external_ip.clone(),
                    ip_mode: s.balancer_ip_mode.clone(),
                    ..Default::default()
                }],
            });
            Ok(pb::GetLoadBalancerResponse {
                exists: s.exists,
                status: if s.exists { status } else { None },
                ownership: None,
            })
        })
        .await
    }

    async fn get_load_balancer_name(
        &self,
        _cluster_name: String,
        service: pb::Service,
    ) -> Result<pb::GetLoadBalancerNameResponse, CpiError> {
        self.answer(call::GET_NAME, &service_key(&service), |_| {
            Ok(pb::GetLoadBalancerNameResponse {
                name: default_load_balancer_name(&service),
            })
        })
        .await
    }

    async fn ensure_load_balancer(
        &self,
        _cluster_name: String,
        service: pb::Service,
        nodes: Arc<[pb::Node]>,
        _allow_replacement: bool,
    ) -> Result<pb::EnsureLoadBalancerResponse, CpiError> {
        self.answer_mut(call::CREATE, &service_key(&service), |s| {
            let record = FakeCloud::lb_call(&service, &nodes);
            s.ensure_calls.push(record.clone());
            s.lb_error(&s.ensure_err)?;
            let name = default_load_balancer_name(&service);
            s.balancers.insert(
                name.clone(),
                FakeBalancer {
                    name,
                    region: s.zone.region.clone(),
                    load_balancer_ip: service.load_balancer_ip.clone(),
                    ports: service.ports.clone(),
                    hosts: record.hosts,
                },
            );
            Ok(pb::EnsureLoadBalancerResponse {
                status: Some(pb::LoadBalancerStatus {
                    ingress: vec![pb::LoadBalancerIngress {
                        ip: s.external_ip.clone(),
                        ip_mode: s.balancer_ip_mode.clone(),
                        ..Default::default()
                    }],
                }),
                ownership: None,
            })
        })
        .await
    }

    async fn update_load_balancer(
        &self,
        _cluster_name: String,
        service: pb::Service,
        nodes: Arc<[pb::Node]>,
    ) -> Result<pb::UpdateLoadBalancerResponse, CpiError> {
        self.answer_mut(call::UPDATE, &service_key(&service), |s| {
            let record = FakeCloud::lb_call(&service, &nodes);
            s.update_calls.push(record.clone());
            s.lb_error(&s.update_err)?;
            if let Some(balancer) = s.balancers.get_mut(&default_load_balancer_name(&service)) {
                balancer.hosts = record.hosts;
            }
            Ok(pb::UpdateLoadBalancerResponse {})
        })
        .await
    }

    async fn ensure_load_balancer_deleted(
        &self,
        _cluster_name: String,
        service: pb::Service,
    ) -> Result<pb::EnsureLoadBalancerDeletedResponse, CpiError> {
        self.answer_mut(call::DELETE, &service_key(&service), |s| {
            s.lb_error(&s.delete_err)?;
            s.balancers.remove(&default_load_balancer_name(&service));
            Ok(pb::EnsureLoadBalancerDeletedResponse {})
        })
        .await
    }
}

fn route_subject(route: &pb::Route) -> String {
    format!("{}/{}", route.target_node, route.destination_cidr)
}

impl FakeCloud {
    fn list_routes_page(
        &self,
        cluster: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListRoutesResponse, CpiError> {
        if let Some(err) = &self.err {
            return Err(err.clone());
        }
        let start: usize = if page_token.is_empty() {
            0
        } else {
            page_token.parse().map_err(|_| CpiError::InvalidObject {
                field: "page_token".into(),
                message: format!("{page_token:?} is not a token this shim handed out"),
            })?
        };
        let size = [page_size, self.route_page_size]
            .into_iter()
            .filter(|s| *s > 0)
            .min()
            .map_or(usize::MAX, |s| s as usize);
        let page = if size == usize::MAX {
            1
        } else {
            start / size + 1
        };
        if let Some(err) = self.list_routes_page_errs.get(&page) {
            return Err(err.clone());
        }
        let all: Vec<&FakeRoute> = self
            .route_map
            .values()
            .filter(|r| r.cluster == cluster)
            .collect();
        let end = start.saturating_add(size).min(all.len());
        let routes = all
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|r| pb::Route {
                enable_node_addresses: self.route_node_addresses,
                ..r.route.clone()
            })
            .collect();
        let next_page_token = if self.repeat_page_token {
            "1".to_string()
        } else if end < all.len() {
            end.to_string()
        } else {
            String::new()
        };
        Ok(pb::ListRoutesResponse {
            routes,
            next_page_token,
            capacity: self.route_capacity,
        })
    }

    fn create_route(
        &mut self,
        cluster: &str,
        name_hint: &str,
        route: pb::Route,
    ) -> Result<pb::CreateRouteResponse, CpiError> {
        let key = route_key(cluster, &route);
        if self.route_map.contains_key(&key) {
            // Upstream's fake: the error sticks and every later call that checks it fails.
            let err = CpiError::Cloud(format!("route {key} already exists"));
            self.err = Some(err.clone());
            return Err(err);
        }
        if let Some(err) = self.route_create_errs.get(&route.destination_cidr) {
            return Err(err.clone());
        }
        let stored = self
            .route_map
            .values()
            .filter(|r| r.cluster == cluster)
            .count();
        if self
            .route_capacity
            .is_some_and(|capacity| stored >= capacity as usize)
        {
            return Err(CpiError::Cloud(format!(
                "route table full: {stored} routes"
            )));
        }
        self.route_map.insert(
            key,
            FakeRoute {
                cluster: cluster.to_string(),
                route: pb::Route {
                    name: format!("{cluster}-{name_hint}"),
                    ownership: Some(pb::Ownership {
                        owned: true,
                        cluster_id: Some(cluster.to_string()),
                        object_uid: None,
                    }),
                    ..route
                },
            },
        );
        Ok(pb::CreateRouteResponse {})
    }

    fn delete_route(
        &mut self,
        cluster: &str,
        route: &pb::Route,
    ) -> Result<pb::DeleteRouteResponse, CpiError> {
        let found = self.route_map.iter().find_map(|(key, r)| {
            (r.cluster == cluster
                && r.route.destination_cidr == route.destination_cidr
                && r.route.target_node == route.target_node)
                .then(|| key.clone())
        });
        match found {
            Some(key) => {
                self.route_map.remove(&key);
                Ok(pb::DeleteRouteResponse {})
            }
            None => {
                let err = CpiError::Cloud(format!(
                    "no such route: {} to {:?}",
                    route.destination_cidr, route.target_node
                ));
                self.err = Some(err.clone());
                Err(err)
            }
        }
    }
}

#[tonic::async_trait]
impl Routes for FakeProvider {
    async fn list_routes(
        &self,
        cluster_name: String,
        page_size: u32,
        page_token: String,
    ) -> Result<pb::ListRoutesResponse, CpiError> {
        self.answer(call::LIST_ROUTES, &page_token, |s| {
            s.list_routes_page(&cluster_name, page_size, &page_token)
        })
        .await
    }

    async fn create_route(
        &self,
        cluster_name: String,
        name_hint: String,
        route: pb::Route,
    ) -> Result<pb::CreateRouteResponse, CpiError> {
        self.answer_mut(call::CREATE_ROUTE, &route_subject(&route), |s| {
            s.create_route(&cluster_name, &name_hint, route)
        })
        .await
    }

    async fn delete_route(
        &self,
        cluster_name: String,
        route: pb::Route,
    ) -> Result<pb::DeleteRouteResponse, CpiError> {
        self.answer_mut(call::DELETE_ROUTE, &route_subject(&route), |s| {
            s.delete_route(&cluster_name, &route)
        })
        .await
    }
}

#[tonic::async_trait]
impl VolumeLabels for FakeProvider {
    async fn get_labels_for_volume(
        &self,
        volume: pb::PersistentVolume,
    ) -> Result<pb::GetLabelsForVolumeResponse, CpiError> {
        let name = volume
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        self.answer_mut(call::GET_LABELS_FOR_VOLUME, &name, |s| {
            s.volumes_asked.push(volume);
            match &s.volume_labels_err {
                Some(err) => Err(err.clone()),
                None => Ok(pb::GetLabelsForVolumeResponse {
                    labels: s.volume_labels.get(&name).cloned().unwrap_or_default(),
                }),
            }
        })
        .await
    }
}

#[tonic::async_trait]
impl LoadBalancerValidation for FakeProvider {
    async fn validate_load_balancer(
        &self,
        cluster_name: String,
        service: pb::Service,
        old_service: Option<pb::Service>,
    ) -> Result<pb::ValidateLoadBalancerResponse, CpiError> {
        let key = service_key(&service);
        self.answer_mut(call::VALIDATE_LOAD_BALANCER, &key, |s| {
            s.validations_asked.push(pb::ValidateLoadBalancerRequest {
                cluster_name,
                service: Some(service),
                old_service,
            });
            match &s.lb_validation_err {
                Some(err) => Err(err.clone()),
                None => Ok(s.lb_validation.get(&key).cloned().unwrap_or_default()),
            }
        })
        .await
    }
}
