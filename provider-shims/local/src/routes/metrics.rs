//! Route metrics, registered with the shim's registry under `local_shim_routes_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `op` and `result` of a route operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// `list`, `create`, `delete` or `restore` (start-up).
    pub op: &'static str,
    /// `success`, `noop` or `error`.
    pub result: &'static str,
}

/// `op` of a failed netlink request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetlinkLabel {
    /// `list`, `program` or `delete`.
    pub op: &'static str,
}

/// Every route metric; clones share the series.
#[derive(Debug, Clone, Default)]
pub struct RouteMetrics {
    pub(crate) managed: Gauge,
    pub(crate) operations: Family<OperationLabel, Counter>,
    pub(crate) netlink_errors: Family<NetlinkLabel, Counter>,
}

impl RouteMetrics {
    /// Counts one operation.
    pub(crate) fn operation(&self, op: &'static str, result: &'static str) {
        self.operations
            .get_or_create(&OperationLabel { op, result })
            .inc();
    }

    /// Counts one failed netlink request.
    pub(crate) fn netlink_error(&self, op: &'static str) {
        self.netlink_errors
            .get_or_create(&NetlinkLabel { op })
            .inc();
    }

    /// Registers every series.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("local_shim_routes");
        r.register(
            "managed",
            "Routes recorded in the state database (all clusters)",
            self.managed.clone(),
        );
        r.register(
            "operations",
            "Route operations, by operation and result",
            self.operations.clone(),
        );
        r.register(
            "netlink_errors",
            "Netlink requests the kernel refused or that failed, by operation",
            self.netlink_errors.clone(),
        );
    }
}
