//! Load-balancer metrics, registered with the shim's registry under `local_shim_lb_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `pool` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// Pool name.
    pub pool: String,
}

/// `reason` label of allocation failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Failure class.
    pub reason: &'static str,
}

/// `listener` label, e.g. `127.0.100.7:80/TCP`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// The listener.
    pub listener: String,
}

/// Listener and `reason` of a refused client.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// The listener.
    pub listener: String,
    /// `source_range` or `no_backend`.
    pub reason: &'static str,
}

/// Listener and `direction` of bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    /// The listener.
    pub listener: String,
    /// `rx` (client to backend) or `tx` (backend to client).
    pub direction: &'static str,
}

/// A probed target: node address and what is probed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    /// Node address.
    pub node: String,
    /// `healthz:<port>`, `kube-proxy:<port>` or `node-port:<port>`.
    pub target: String,
}

/// `kind` of probe.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `http` or `tcp`.
    pub kind: &'static str,
}

fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Every load-balancer metric; clones share the series.
#[derive(Debug, Clone)]
pub struct LbMetrics {
    pub(crate) pool_size: Family<PoolLabel, Gauge>,
    pub(crate) pool_used: Family<PoolLabel, Gauge>,
    pub(crate) pool_free: Family<PoolLabel, Gauge>,
    pub(crate) allocation_failures: Family<ReasonLabel, Counter>,
    pub(crate) outside_pools: Gauge,
    pub(crate) load_balancers: Gauge,
    pub(crate) connections: Family<ListenerLabel, Counter>,
    pub(crate) rejected: Family<RejectLabel, Counter>,
    pub(crate) bytes: Family<BytesLabel, Counter>,
    pub(crate) udp_flows: Family<ListenerLabel, Gauge>,
    pub(crate) backend_health: Family<TargetLabel, Gauge>,
    pub(crate) probe_duration: Family<KindLabel, Histogram, fn() -> Histogram>,
}

impl Default for LbMetrics {
    fn default() -> Self {
        Self {
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_free: Family::default(),
            allocation_failures: Family::default(),
            outside_pools: Gauge::default(),
            load_balancers: Gauge::default(),
            connections: Family::default(),
            rejected: Family::default(),
            bytes: Family::default(),
            udp_flows: Family::default(),
            backend_health: Family::default(),
            probe_duration: Family::new_with_constructor(probe_histogram),
        }
    }
}

impl LbMetrics {
    /// Registers every series.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("local_shim_lb");
        r.register(
            "pool_addresses",
            "Addresses in the pool",
            self.pool_size.clone(),
        );
        r.register(
            "pool_addresses_used",
            "Addresses of the pool allocated or held for a deleted Service",
            self.pool_used.clone(),
        );
        r.register(
            "pool_addresses_free",
            "Free addresses of the pool",
            self.pool_free.clone(),
        );
        r.register(
            "allocation_failures",
            "Ensure calls that got no address, by reason",
            self.allocation_failures.clone(),
        );
        r.register(
            "allocations_outside_pools",
            "Allocations kept although no configured pool holds their address any more",
            self.outside_pools.clone(),
        );
        r.register(
            "load_balancers",
            "Load balancers served",
            self.load_balancers.clone(),
        );
        r.register(
            "connections",
            "TCP connections proxied to a backend",
            self.connections.clone(),
        );
        r.register(
            "rejected",
            "Clients refused (TCP connections, UDP flows), by reason",
            self.rejected.clone(),
        );
        r.register("bytes", "Bytes proxied, by direction", self.bytes.clone());
        r.register(
            "udp_flows",
            "UDP flows in the flow table",
            self.udp_flows.clone(),
        );
        r.register(
            "backend_health",
            "Probe verdict per node target: 1 healthy, 0 unhealthy, -1 not yet known",
            self.backend_health.clone(),
        );
        r.register(
            "probe_duration_seconds",
            "Health probe latency",
            self.probe_duration.clone(),
        );
    }
}
