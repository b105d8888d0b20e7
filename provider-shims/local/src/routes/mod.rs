//! Pod-network routes (the `Routes` service): each pod CIDR routed through its node's
//! InternalIP in a Linux routing table reached over netlink, in the network namespace and table
//! the operator names (`--route-netns`, `--route-table`), marked with `--route-protocol` so the
//! shim lists and deletes only what it made. Every route is recorded per cluster in the state
//! database before it is programmed, and start-up re-programs the table from the records.
//! `--routes=state-only` keeps the records only.
//!
//! Layout: decisions are pure (`plan`: next hop, create/delete/start-up plans, the listing;
//! `page`: paging; `table`: the in-memory view of the kernel table and how to program it);
//! `kernel` is the netlink executor, `serial` orders changes per destination and shares redb
//! commits between them, and `provider` ties them to the store.

mod config;
mod kernel;
mod metrics;
mod page;
mod plan;
mod provider;
mod serial;
mod table;

pub use config::{DEFAULT_ROUTE_PROTOCOL, MAIN_TABLE, RouteFlags, RouteMode, RouteTableId};
pub use kernel::KernelError;
pub use page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
pub use plan::RouteRecord;
pub use provider::{LocalRoutes, RouteError};
