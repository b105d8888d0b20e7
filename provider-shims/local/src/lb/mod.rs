//! Real L4 load balancers for Services of type LoadBalancer: addresses from named pools,
//! persisted in the state database before they are reported and re-adopted at start-up; a
//! tokio TCP/UDP proxy per (address, protocol, port) to every node's InternalIP at the node
//! port; shared active health checks; source ranges and `ClientIP` affinity.
//!
//! Layout: decisions are pure (`pool` validation, `alloc` address choice, `balance` backend
//! order and health transitions, `spec` request validation and source-range checks, `validate`
//! the admission verdict built from `spec` and `alloc`); `health`, `proxy` and `provider` do
//! the IO.

mod alloc;
mod balance;
pub(crate) mod commit;
mod config;
mod health;
mod intern;
mod metrics;
mod pool;
mod provider;
mod proxy;
mod records;
mod spec;
mod stored;
mod validate;

pub use config::{DEFAULT_POOL_CIDR, LbConfigError, LbFlags, load_pools, parse_pools};
pub use pool::{Cidr, Family, Pool, PoolError, Pools};
pub use provider::{
    IP_MODE_PROXY, LbError, LocalLoadBalancer, PORT_ERROR_BIND, PORT_ERROR_NO_NODE_PORT,
    PORT_ERROR_SCTP, load_balancer_name,
};
pub use spec::{
    DEFAULT_AFFINITY_TIMEOUT_SECONDS, IP_ANNOTATION, POOL_ANNOTATION, SHARING_ANNOTATION,
    SOURCE_RANGES_ANNOTATION,
};
pub use validate::validate_service;
