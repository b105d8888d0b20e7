//! Metrics of the node-ipam controller: upstream's `node_ipam_controller_cidrset_*` series,
//! labelled by cluster CIDR, and our count of nodes that could not be given a CIDR.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-cluster-CIDR series: `clusterCIDR`, upstream's (camel-case) label name.
type CidrLabels = [(&'static str, String); 1];

/// Labels of `allocation_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// The Event reason of the failure.
    reason: &'static str,
}

/// Builds the tries histogram with upstream's buckets (1, 5, 25, 125, 625).
#[derive(Clone)]
struct TriesBuckets;

impl MetricConstructor<Histogram> for TriesBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(1.0, 5.0, 5))
    }
}

/// The node-ipam controller's metrics.
#[derive(Clone)]
pub struct IpamMetrics {
    allocations: Family<CidrLabels, Counter>,
    releases: Family<CidrLabels, Counter>,
    usage: Family<CidrLabels, Gauge<f64, AtomicU64>>,
    tries: Family<CidrLabels, Histogram, TriesBuckets>,
    failures: Family<ReasonLabels, Counter>,
}

impl Default for IpamMetrics {
    fn default() -> Self {
        Self {
            allocations: Family::default(),
            releases: Family::default(),
            usage: Family::default(),
            tries: Family::new_with_constructor(TriesBuckets),
            failures: Family::default(),
        }
    }
}

impl IpamMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let ours = registry.sub_registry_with_prefix("node_ipam_controller");
        ours.register(
            "cidrset_cidrs_allocations",
            "Node CIDR blocks newly marked used (allocated, or occupied as found on a node or in a service range)",
            metrics.allocations.clone(),
        );
        ours.register(
            "cidrset_cidrs_releases",
            "Node CIDR blocks freed",
            metrics.releases.clone(),
        );
        ours.register(
            "cidrset_usage_cidrs",
            "Fraction of the cluster CIDR's node blocks in use",
            metrics.usage.clone(),
        );
        ours.register(
            "cidrset_allocation_tries_per_request",
            "Blocks looked at before a free one was found, per allocation",
            metrics.tries.clone(),
        );
        ours.register(
            "allocation_failures",
            "Nodes that could not be given a pod CIDR, by Event reason (CIDRNotAvailable: the range is full; CIDRAssignmentFailed: the Node could not be patched)",
            metrics.failures.clone(),
        );
        metrics
    }

    /// The handles of one cluster CIDR's series.
    pub fn set(&self, cluster: &str) -> SetMetrics {
        let labels: CidrLabels = [("clusterCIDR", cluster.to_string())];
        SetMetrics {
            allocations: self.allocations.get_or_create(&labels).clone(),
            releases: self.releases.get_or_create(&labels).clone(),
            usage: self.usage.get_or_create(&labels).clone(),
            tries: self.tries.get_or_create(&labels).clone(),
        }
    }

    /// Counts a node left without a CIDR, by Event reason.
    pub fn count_failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// How many failures of `reason` were counted.
    pub fn failures(&self, reason: &'static str) -> u64 {
        self.failures.get_or_create(&ReasonLabels { reason }).get()
    }
}

/// One cluster CIDR's series, held by its [`CidrSet`](super::cidr_set::CidrSet).
#[derive(Clone, Debug)]
pub struct SetMetrics {
    allocations: Counter,
    releases: Counter,
    usage: Gauge<f64, AtomicU64>,
    tries: Histogram,
}

impl Default for SetMetrics {
    /// Unregistered series (tests).
    fn default() -> Self {
        Self {
            allocations: Counter::default(),
            releases: Counter::default(),
            usage: Gauge::default(),
            tries: TriesBuckets.new_metric(),
        }
    }
}

impl SetMetrics {
    /// Counts a block newly marked used.
    pub fn count_allocation(&self) {
        self.allocations.inc();
    }

    /// Counts a block newly freed.
    pub fn count_release(&self) {
        self.releases.inc();
    }

    /// Sets the used fraction.
    pub fn set_usage(&self, allocated: usize, max: usize) {
        // Both are at most 2^16: exact as f64.
        #[allow(clippy::cast_precision_loss)]
        self.usage.set(allocated as f64 / max.max(1) as f64);
    }

    /// Records how many used blocks an allocation skipped.
    pub fn observe_tries(&self, tries: usize) {
        #[allow(clippy::cast_precision_loss)]
        self.tries.observe(tries as f64);
    }

    /// Blocks newly marked used, so far.
    pub fn allocations(&self) -> u64 {
        self.allocations.get()
    }

    /// Blocks newly freed, so far.
    pub fn releases(&self) -> u64 {
        self.releases.get()
    }

    /// The used fraction.
    pub fn usage(&self) -> f64 {
        self.usage.get()
    }
}
