//! The provider shim as the controllers see it: the connection and its start-up checks, the
//! counted calls, the leader fence on mutating calls, the instance lookups over InstancesV2 or
//! the legacy services, the load-balancer and route calls, the CPI views of Kubernetes objects
//! and the `/readyz` probe.

mod client;
mod convert;
mod fence;
mod instances;
mod load_balancer;
mod probe;
mod routes;

pub use client::{Cloud, CloudError, CloudMetrics, ConnectSettings};
pub use cpi_transport::{EndpointError, ProviderEndpoint};
pub use fence::{Fence, Predecessor};
pub use instances::{InstanceExistence, LookupError, NodeMetadata};
pub use load_balancer::{NodeSet, backend_nodes, load_balancer_status, service_view};
pub use routes::{ListRoutesError, RouteList, route_addresses};
