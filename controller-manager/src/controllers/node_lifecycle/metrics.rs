//! Metrics of the cloud-node-lifecycle controller (ours; upstream has none).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `deletions_suppressed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// Why nothing was deleted (the CPI error class, the existence answer or the policy hold).
    reason: &'static str,
}

/// The cloud-node-lifecycle controller's metrics.
#[derive(Clone, Default)]
pub struct LifecycleMetrics {
    /// `ccm_managed_nodes`: nodes owned by this provider, as of the last pass.
    managed_nodes: Gauge,
    /// `ccm_node_deletions_paused`: 1 while the deletion budget is exhausted.
    deletions_paused: Gauge,
    /// `deletions_suppressed_total{reason}`.
    deletions_suppressed: Family<ReasonLabels, Counter>,
}

impl LifecycleMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "deletions_suppressed",
            "Node deletions not done because the provider's existence answer was not an authoritative NOT_FOUND",
            metrics.deletions_suppressed.clone(),
        );
        let ours = registry.sub_registry_with_prefix("ccm");
        ours.register(
            "managed_nodes",
            "Nodes owned by this provider, as of the last cloud-node-lifecycle pass",
            metrics.managed_nodes.clone(),
        );
        ours.register(
            "node_deletions_paused",
            "1 while the node deletion budget is exhausted and deletions are held back",
            metrics.deletions_paused.clone(),
        );
        metrics
    }

    /// Sets the number of the provider's nodes.
    pub fn set_managed(&self, count: usize) {
        self.managed_nodes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets whether deletions are paused by the budget.
    pub fn set_paused(&self, paused: bool) {
        self.deletions_paused.set(i64::from(paused));
    }

    /// Counts a node deletion that was not done, by reason.
    pub fn count_suppressed(&self, reason: &'static str) {
        self.deletions_suppressed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
