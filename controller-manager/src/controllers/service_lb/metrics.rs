//! Metrics of the service-lb controller: upstream's four `service_controller_*` metrics and our
//! gauges of the service queue.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The service-lb controller's metrics.
#[derive(Clone)]
pub struct ServiceLbMetrics {
    /// `service_controller_loadbalancer_sync_total`: UpdateLoadBalancer attempts of node syncs.
    pub loadbalancer_sync: Counter,
    /// `service_controller_nodesync_error_total`: node-list errors and failed host updates.
    pub nodesync_error: Counter,
    /// `service_controller_nodesync_latency_seconds`: one per node sync.
    pub nodesync_latency: Histogram,
    /// `service_controller_update_loadbalancer_host_latency_seconds`: one per host update.
    pub update_host_latency: Histogram,
    /// `ccm_service_queue_depth`: keys queued now.
    queue_depth: Gauge,
    /// `ccm_service_queue_delayed`: keys waiting for a retry delay.
    queue_delayed: Gauge,
}

impl Default for ServiceLbMetrics {
    fn default() -> Self {
        // Upstream: exponential(1, 2, 15) => 1 … 16384 seconds.
        Self {
            loadbalancer_sync: Counter::default(),
            nodesync_error: Counter::default(),
            nodesync_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            update_host_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            queue_depth: Gauge::default(),
            queue_delayed: Gauge::default(),
        }
    }
}

impl ServiceLbMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let upstream = registry.sub_registry_with_prefix("service_controller");
        upstream.register(
            "loadbalancer_sync",
            "A metric counting the amount of times any load balancer has been configured, as an effect of service/node changes on the cluster",
            metrics.loadbalancer_sync.clone(),
        );
        upstream.register(
            "nodesync_error",
            "A metric counting the amount of times any load balancer has been configured and errored, as an effect of node changes on the cluster",
            metrics.nodesync_error.clone(),
        );
        upstream.register(
            "nodesync_latency_seconds",
            "A metric measuring the latency for nodesync which updates loadbalancer hosts on cluster node updates.",
            metrics.nodesync_latency.clone(),
        );
        upstream.register(
            "update_loadbalancer_host_latency_seconds",
            "A metric measuring the latency for updating each load balancer hosts.",
            metrics.update_host_latency.clone(),
        );
        let ours = registry.sub_registry_with_prefix("ccm");
        ours.register(
            "service_queue_depth",
            "Services queued for a load-balancer sync now",
            metrics.queue_depth.clone(),
        );
        ours.register(
            "service_queue_delayed",
            "Services waiting for a load-balancer sync retry delay",
            metrics.queue_delayed.clone(),
        );
        metrics
    }

    /// Sets the queue gauges.
    pub fn observe_queue(&self, depth: usize, delayed: usize) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.queue_delayed
            .set(i64::try_from(delayed).unwrap_or(i64::MAX));
    }
}
