//! Prometheus metrics of the controller-manager, with the upstream names, types, labels and
//! buckets where upstream defines them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `running_managed_controllers`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// Controller alias (upstream uses the short names).
    pub name: String,
    /// Always `cloud-controller-manager`.
    pub manager: String,
}

/// Labels of `leader_election_master_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// Lease name.
    pub name: String,
}

/// Labels of the CPI client metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// gRPC method, e.g. `InstancesV2/InstanceMetadata`.
    pub method: String,
    /// `OK` or the CPI error class.
    pub code: String,
}

/// Every metric the controller-manager exports.
pub struct Metrics {
    /// The registry rendered on /metrics.
    pub registry: Registry,
    /// `running_managed_controllers{name,manager}`: 1 while a controller runs.
    pub running_managed_controllers: Family<ControllerLabels, Gauge>,
    /// `leader_election_master_status{name}`: 1 while this replica leads.
    pub leader_election_master_status: Family<LeaseLabels, Gauge>,
    /// `node_controller_cloud_provider_taint_removal_delay_seconds`.
    pub taint_removal_delay: Histogram,
    /// `node_controller_initial_node_sync_delay_seconds`.
    pub initial_node_sync_delay: Histogram,
    /// `cloudprovider_requests_total{method,code}`: CPI calls by outcome.
    pub cpi_requests: Family<RpcLabels, Counter>,
    /// `ccm_uninitialized_nodes`: nodes still carrying the uninitialized taint.
    pub uninitialized_nodes: Gauge,
    /// `ccm_oldest_uninitialized_node_age_seconds`: age of the oldest such node.
    pub oldest_uninitialized_node_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `ccm_managed_nodes`: nodes owned by this provider, as of the last lifecycle pass.
    pub managed_nodes: Gauge,
    /// `ccm_node_deletions_paused`: 1 while the deletion budget is exhausted.
    pub deletions_paused: Gauge,
    /// `rest_client_requests_total{code,method}`: API-server requests by outcome.
    pub rest_client_requests: Family<ApiRequestLabels, Counter>,
    /// `deletions_suppressed_total{reason}`: node deletions not done because existence was not
    /// authoritatively NOT_FOUND.
    pub deletions_suppressed: Family<ReasonLabels, Counter>,
}

/// Labels of `rest_client_requests_total` (client-go's names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequestLabels {
    /// HTTP status code, or `<error>`.
    pub code: String,
    /// HTTP method.
    pub method: String,
}

/// Labels of `deletions_suppressed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why nothing was deleted (the CPI error class or existence answer).
    pub reason: String,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let running_managed_controllers = Family::<ControllerLabels, Gauge>::default();
        registry.register(
            "running_managed_controllers",
            "Indicates where instances of a controller are currently running",
            running_managed_controllers.clone(),
        );
        let leader_election_master_status = Family::<LeaseLabels, Gauge>::default();
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
            leader_election_master_status.clone(),
        );
        // Upstream: exponential(1, 4, 6) => 1, 4, 16, 64, 256, 1024 seconds.
        let taint_removal_delay = Histogram::new(exponential_buckets(1.0, 4.0, 6));
        registry.register(
            "node_controller_cloud_provider_taint_removal_delay_seconds",
            "Number of seconds after node creation when NodeController removed the cloud-provider taint of a single node.",
            taint_removal_delay.clone(),
        );
        let initial_node_sync_delay = Histogram::new(exponential_buckets(1.0, 4.0, 6));
        registry.register(
            "node_controller_initial_node_sync_delay_seconds",
            "Number of seconds after node creation when NodeController finished the initial synchronization of a single node.",
            initial_node_sync_delay.clone(),
        );
        let cpi_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "cloudprovider_requests",
            "Calls to the provider shim by method and outcome",
            cpi_requests.clone(),
        );
        let uninitialized_nodes = Gauge::default();
        registry.register(
            "ccm_uninitialized_nodes",
            "Nodes still carrying the node.cloudprovider.kubernetes.io/uninitialized taint",
            uninitialized_nodes.clone(),
        );
        let deletions_suppressed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "deletions_suppressed",
            "Node deletions not done because the provider's existence answer was not an authoritative NOT_FOUND",
            deletions_suppressed.clone(),
        );
        let rest_client_requests = Family::<ApiRequestLabels, Counter>::default();
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, partitioned by status code and method.",
            rest_client_requests.clone(),
        );
        let oldest_uninitialized_node_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "ccm_oldest_uninitialized_node_age_seconds",
            "Age of the oldest node still carrying the node.cloudprovider.kubernetes.io/uninitialized taint",
            oldest_uninitialized_node_age.clone(),
        );
        let managed_nodes = Gauge::default();
        registry.register(
            "ccm_managed_nodes",
            "Nodes owned by this provider, as of the last cloud-node-lifecycle pass",
            managed_nodes.clone(),
        );
        let deletions_paused = Gauge::default();
        registry.register(
            "ccm_node_deletions_paused",
            "1 while the node deletion budget is exhausted and deletions are held back",
            deletions_paused.clone(),
        );
        Arc::new(Self {
            managed_nodes,
            deletions_paused,
            oldest_uninitialized_node_age,
            rest_client_requests,
            deletions_suppressed,
            registry,
            running_managed_controllers,
            leader_election_master_status,
            taint_removal_delay,
            initial_node_sync_delay,
            cpi_requests,
            uninitialized_nodes,
        })
    }

    /// Marks a controller as running (1) or stopped (0).
    pub fn set_running(&self, alias: &str, running: bool) {
        self.running_managed_controllers
            .get_or_create(&ControllerLabels {
                name: alias.to_string(),
                manager: "cloud-controller-manager".to_string(),
            })
            .set(i64::from(running));
    }

    /// Counts one CPI call.
    pub fn count_rpc(&self, method: &str, code: &str) {
        self.cpi_requests
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    /// Counts one API-server request.
    pub fn count_api_request(&self, method: &str, code: &str) {
        self.rest_client_requests
            .get_or_create(&ApiRequestLabels {
                code: code.to_string(),
                method: method.to_string(),
            })
            .inc();
    }

    /// Counts a node deletion that was not done, by reason.
    pub fn count_suppressed_deletion(&self, reason: &str) {
        self.deletions_suppressed
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
