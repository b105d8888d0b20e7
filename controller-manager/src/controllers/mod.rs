//! The cloud controllers, one directory each, and the registry the manager starts them from.
//!
//! Adding a controller: a directory with a type implementing [`Controller`] (its names, flags,
//! capability check, and how it is built and run) and one line in [`registry!`] below.

mod context;
#[macro_use]
mod registry;
mod node;
mod node_ipam;
mod node_lifecycle;

mod route;
mod selection;
mod service_lb;

pub use context::{ClusterSettings, ControllerContext, SharedNodes, Succession};
pub use registry::{BuildError, Controller, Names, Registered, Runner, Stop, serves_instances};
pub use selection::{ControllerSelection, SelectionError};

pub use node::{NodeController, SyncError};
pub use node_ipam::{
    IpamError, IpamMetrics, IpamSettings, NodeIpamController, REASON_CIDR_ASSIGNMENT_FAILED,
    REASON_CIDR_NOT_AVAILABLE, settings as node_ipam_settings,
};
pub use node_lifecycle::{DeletionPolicy, NodeLifecycleController};
pub use route::{
    Outcome as RouteOutcome, RouteError, RouteMetrics, RouteSync, Schedule as RouteSchedule,
    decide as route_rules,
};
pub use service_lb::{
    Backends, HostUpdateError, Op, Requeue, ServiceLb, ServiceLbMetrics, ServiceSyncError,
    WorkQueue, decide as service_lb_rules,
};

registry! {
    cloud_node: node::CloudNodeController,
    cloud_node_lifecycle: node_lifecycle::NodeLifecycleController,
    service_lb: service_lb::ServiceLbController,
    node_route: route::RouteController,
    node_ipam: node_ipam::NodeIpamController,
}
