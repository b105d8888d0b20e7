//! The provider shim as the controllers see it: the connection and its start-up checks, the
//! counted calls, the leader fence on mutating calls, the instance lookups over InstancesV2 or
//! the legacy services, the load-balancer calls, the CPI views of Kubernetes objects and the
//! `/readyz` probe.

mod client;
mod convert;
mod endpoint;
mod fence;
mod instances;
mod load_balancer;
mod probe;

pub use client::{Cloud, CloudError, CloudMetrics, ConnectSettings};
pub use endpoint::{EndpointError, EndpointTls, ProviderEndpoint};
pub use fence::Fence;
pub use instances::{InstanceExistence, LookupError, NodeMetadata};
pub use load_balancer::{backend_nodes, load_balancer_status, service_view};
