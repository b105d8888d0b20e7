//! Metrics of the cloud-node controller: upstream's two `node_controller_*` histograms and our
//! gauges of nodes still waiting for initialisation.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The cloud-node controller's metrics.
#[derive(Clone)]
pub struct NodeMetrics {
    /// `node_controller_cloud_provider_taint_removal_delay_seconds`.
    pub taint_removal_delay: Histogram,
    /// `node_controller_initial_node_sync_delay_seconds`.
    pub initial_node_sync_delay: Histogram,
    /// `ccm_uninitialized_nodes`: nodes still carrying the uninitialized taint.
    uninitialized_nodes: Gauge,
    /// `ccm_oldest_uninitialized_node_age_seconds`: age of the oldest such node.
    oldest_uninitialized_node_age: Gauge<f64, AtomicU64>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        // Upstream: exponential(1, 4, 6) => 1, 4, 16, 64, 256, 1024 seconds.
        Self {
            taint_removal_delay: Histogram::new(exponential_buckets(1.0, 4.0, 6)),
            initial_node_sync_delay: Histogram::new(exponential_buckets(1.0, 4.0, 6)),
            uninitialized_nodes: Gauge::default(),
            oldest_uninitialized_node_age: Gauge::default(),
        }
    }
}

impl NodeMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let upstream = registry.sub_registry_with_prefix("node_controller");
        upstream.register(
            "cloud_provider_taint_removal_delay_seconds",
            "Number of seconds after node creation when NodeController removed the cloud-provider taint of a single node.",
            metrics.taint_removal_delay.clone(),
        );
        upstream.register(
            "initial_node_sync_delay_seconds",
            "Number of seconds after node creation when NodeController finished the initial synchronization of a single node.",
            metrics.initial_node_sync_delay.clone(),
        );
        let ours = registry.sub_registry_with_prefix("ccm");
        ours.register(
            "uninitialized_nodes",
            "Nodes still carrying the node.cloudprovider.kubernetes.io/uninitialized taint",
            metrics.uninitialized_nodes.clone(),
        );
        ours.register(
            "oldest_uninitialized_node_age_seconds",
            "Age of the oldest node still carrying the node.cloudprovider.kubernetes.io/uninitialized taint",
            metrics.oldest_uninitialized_node_age.clone(),
        );
        metrics
    }

    /// Sets the uninitialised-node gauges.
    pub fn observe_uninitialized(&self, count: i64, oldest_age_seconds: f64) {
        self.uninitialized_nodes.set(count);
        self.oldest_uninitialized_node_age.set(oldest_age_seconds);
    }
}
