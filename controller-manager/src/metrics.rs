//! The manager's own metrics (upstream names): which controllers run and whether this replica
//! leads. Each layer and controller registers its own metrics beside these.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `running_managed_controllers`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    /// Controller alias (upstream uses the short names).
    name: &'static str,
    /// Always `cloud-controller-manager`.
    manager: &'static str,
}

/// Labels of `leader_election_master_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    /// Lease name.
    name: String,
}

/// The manager's metrics.
#[derive(Clone, Default)]
pub struct ManagerMetrics {
    running_managed_controllers: Family<ControllerLabels, Gauge>,
    leader_election_master_status: Family<LeaseLabels, Gauge>,
}

impl ManagerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "running_managed_controllers",
            "Indicates where instances of a controller are currently running",
            metrics.running_managed_controllers.clone(),
        );
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
            metrics.leader_election_master_status.clone(),
        );
        metrics
    }

    /// Marks a controller (by alias) as running (1) or stopped (0).
    pub fn set_running(&self, alias: &'static str, running: bool) {
        self.running_managed_controllers
            .get_or_create(&ControllerLabels {
                name: alias,
                manager: "cloud-controller-manager",
            })
            .set(i64::from(running));
    }

    /// Marks whether this replica leads `lease`.
    pub fn set_leading(&self, lease: &str, leading: bool) {
        self.leader_election_master_status
            .get_or_create(&LeaseLabels {
                name: lease.to_string(),
            })
            .set(i64::from(leading));
    }
}
