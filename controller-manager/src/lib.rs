//! The generic cloud-controller-manager: watches the API server and drives a provider shim over
//! the CPI gRPC protocol, with the controllers, flags, leader election, metrics and health of
//! the upstream `k8s.io/cloud-provider` framework.
//!
//! Layers, each importing only those below it: `app` (wiring) → `options`, `serve`, `leader`,
//! `controllers` → `cloud` → `k8s`, `health`, `cluster_cidrs`. This facade exports what the binary and the
//! integration tests use.

mod app;
mod cloud;
mod cluster_cidrs;
mod controllers;
mod flags;
mod health;
mod k8s;
mod leader;
mod metrics;
mod options;
pub mod serve;

pub use app::{AppError, Options, run};
pub use cloud::{
    Cloud, CloudMetrics, ConnectSettings, Fence, ListRoutesError, Predecessor, ProviderEndpoint,
    RouteList,
};
pub use cluster_cidrs::{ClusterCidrError, ClusterCidrs};
pub use controllers::{
    Backends, DeletionPolicy, HostUpdateError, NodeController, NodeLifecycleController, Op,
    Requeue, RouteError, RouteMetrics, RouteOutcome, RouteSchedule, RouteSync, ServiceLb,
    ServiceLbMetrics, ServiceSyncError, Succession, SyncError, WorkQueue, route_rules,
    service_lb_rules,
};
pub use controllers::{
    IpamError, IpamMetrics, IpamSettings, NodeIpamController, REASON_CIDR_ASSIGNMENT_FAILED,
    REASON_CIDR_NOT_AVAILABLE, node_ipam_settings,
};
pub use flags::{FeatureGateError, FeatureGates, parse_feature_gates};
pub use health::{Health, Scope, Unhealthy};
pub use k8s::{
    CachedNode, CachedService, EventType, NodeInformer, Recorder, ServiceChange, ServiceInformer,
    WatchMetrics, events, well_known,
};
pub use leader::Acquired;
