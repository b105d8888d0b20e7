//! The Kubernetes side of the manager: the API clients, Events, the shared Node watch and its
//! compact cache, and the API's well-known label, taint and condition names.

mod cached_node;
mod client;
pub mod events;
mod informer;
pub mod well_known;

pub use cached_node::{CachedNode, Labels};
pub use client::{ClientError, ClientMetrics, build_clients, load_config, nodes, send_write};
pub use events::{EventBroadcaster, EventType, Recorder};
pub use informer::NodeInformer;
