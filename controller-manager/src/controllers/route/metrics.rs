//! Metrics of the route controller, all under `route_controller_`: upstream's
//! `route_sync_total`, plus counters of the routes created, deleted and failed, the capacity
//! shortfall, the routes left alone because another owner's, and the reconcile duration.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `route_controller_route_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    /// `create` or `delete`.
    operation: &'static str,
}

/// The route controller's metrics.
#[derive(Clone)]
pub struct RouteMetrics {
    /// `route_controller_route_sync_total`: one per reconcile (upstream).
    pub route_sync: Counter,
    /// `route_controller_routes_created_total`.
    pub created: Counter,
    /// `route_controller_routes_deleted_total`.
    pub deleted: Counter,
    /// `route_controller_route_failures_total{operation}`.
    failures: Family<OperationLabels, Counter>,
    /// `route_controller_route_capacity_shortfall`: routes wanted that the route table cannot
    /// hold, as of the last reconcile.
    pub capacity_shortfall: Gauge,
    /// `route_controller_foreign_routes`: routes in the cluster CIDRs that the shim says
    /// another owner's, left alone, as of the last reconcile.
    pub foreign_routes: Gauge,
    /// `route_controller_reconcile_duration_seconds`.
    pub reconcile_duration: Histogram,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            route_sync: Counter::default(),
            created: Counter::default(),
            deleted: Counter::default(),
            failures: Family::default(),
            capacity_shortfall: Gauge::default(),
            foreign_routes: Gauge::default(),
            // 10 ms … ~160 s.
            reconcile_duration: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
        }
    }
}

impl RouteMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("route_controller");
        r.register(
            "route_sync",
            "A metric counting the amount of times routes have been synced with the cloud provider.",
            metrics.route_sync.clone(),
        );
        r.register(
            "routes_created",
            "Routes created in the cloud",
            metrics.created.clone(),
        );
        r.register(
            "routes_deleted",
            "Routes deleted from the cloud",
            metrics.deleted.clone(),
        );
        r.register(
            "route_failures",
            "Failed route creations and deletions",
            metrics.failures.clone(),
        );
        r.register(
            "route_capacity_shortfall",
            "Routes wanted that the provider's route table cannot hold, as of the last reconcile",
            metrics.capacity_shortfall.clone(),
        );
        r.register(
            "foreign_routes",
            "Routes inside the cluster CIDRs that the provider says another owner's, left alone",
            metrics.foreign_routes.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of one route reconcile",
            metrics.reconcile_duration.clone(),
        );
        metrics
    }

    /// Counts one failed `operation` (`create` or `delete`).
    pub fn failed(&self, operation: &'static str) {
        self.failures
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Failed operations of kind `operation` so far.
    pub fn failures(&self, operation: &'static str) -> u64 {
        self.failures
            .get_or_create(&OperationLabels { operation })
            .get()
    }
}
