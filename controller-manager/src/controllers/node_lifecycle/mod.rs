//! cloud-node-lifecycle-controller (upstream `controllers/nodelifecycle`): every
//! `--node-monitor-period`, NotReady nodes whose instance is authoritatively gone are deleted,
//! and shut-down instances get the `node.cloudprovider.kubernetes.io/shutdown` taint. They lose it
//! once Ready again (upstream) or as soon as the provider says the instance runs (beyond upstream:
//! the taint never outlives the shutdown). Ready nodes are otherwise left alone.
//!
//! Only the provider's own word deletes a node: an explicit `NOT_FOUND` existence answer, or on
//! the legacy path an InstanceID lookup answering `INSTANCE_NOT_FOUND` or an empty instance ID
//! (upstream then asks about `"<name>://"`, which no instance has). Every other outcome —
//! errors, timeouts, `UNKNOWN` — is counted in `deletions_suppressed_total{reason}` and leaves
//! the node untouched. The rules are in [`decide`]; this module asks and acts.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cpi_proto::CpiError;
use cpi_proto::v1::Capability;
use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{BuildError, Controller, ControllerContext, Names, Stop};
use crate::cloud::{Cloud, InstanceExistence};
use crate::flags::{FlagError, parse_duration, positive};
use crate::k8s::well_known::TAINT_SHUTDOWN;
use crate::k8s::{self, CachedNode, EventType, Recorder};

mod decide;
mod metrics;

pub use decide::{DeletionBudget, DeletionPolicy};
use decide::{DeletionState, FirstLook, TaintChange};
pub use metrics::LifecycleMetrics;

/// Flags of the cloud-node-lifecycle controller.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "cloud-node-lifecycle-flags")]
#[command(next_help_heading = "cloud-node-lifecycle-controller")]
pub struct Flags {
    /// How often the cloud-node-lifecycle controller checks node existence and shutdown.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub node_monitor_period: Duration,
    /// Nodes younger than this are never deleted because the provider says their instance is
    /// gone (lookups right after launch are often eventually consistent). 0 = upstream.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub node_deletion_grace_period: Duration,
    /// Consecutive "instance not found" answers (one per monitor period) needed before a node
    /// is deleted. 1 = upstream.
    #[arg(long, default_value_t = 2)]
    pub node_deletion_confirmations: u32,
    /// At most this percentage of the provider's nodes (at least one) is deleted per
    /// --node-deletion-budget-window; 0 disables the budget (upstream).
    #[arg(long, default_value_t = 10.0)]
    pub node_deletion_budget_percent: f64,
    /// Window of --node-deletion-budget-percent.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub node_deletion_budget_window: Duration,
}

impl Flags {
    /// The deletion policy these flags describe.
    pub fn deletion_policy(&self) -> DeletionPolicy {
        DeletionPolicy {
            grace_period: self.node_deletion_grace_period,
            confirmations: self.node_deletion_confirmations,
            budget: (self.node_deletion_budget_percent > 0.0).then(|| DeletionBudget {
                fraction: self.node_deletion_budget_percent / 100.0,
                window: self.node_deletion_budget_window,
            }),
        }
    }
}

/// A failed step of a lifecycle pass; the next pass retries it.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Deleting the Node failed.
    #[error("Failed deleting node {node}: {source}")]
    Delete {
        /// Node name.
        node: String,
        /// API error.
        source: kube::Error,
    },
    /// Adding or removing the shutdown taint failed.
    #[error("failed to update the shutdown taint of node {node}: {source}")]
    Taint {
        /// Node name.
        node: String,
        /// API error.
        source: kube::Error,
    },
    /// The provider could not say whether the instance is shut down.
    #[error("error checking if node {node} is shutdown: {source}")]
    Shutdown {
        /// Node name.
        node: String,
        /// Provider error.
        source: CpiError,
    },
}

impl LifecycleError {
    /// The Event reason of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Delete { .. } => "DeletingNodeFailed",
            Self::Taint { .. } => "ShutdownTaintFailed",
            Self::Shutdown { .. } => "ShutdownCheckFailed",
        }
    }
}

/// The cloud-node-lifecycle controller.
pub struct NodeLifecycleController {
    client: kube::Client,
    cloud: Cloud,
    metrics: LifecycleMetrics,
    recorder: Recorder,
    store: Store<CachedNode>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
    period: Duration,
    policy: DeletionPolicy,
    deletions: Mutex<DeletionState>,
}

impl Controller for NodeLifecycleController {
    const NAMES: Names = Names {
        canonical: "cloud-node-lifecycle-controller",
        alias: "cloud-node-lifecycle",
        event_component: "cloud-node-lifecycle-controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        positive("--node-monitor-period", flags.node_monitor_period)?;
        if !(0.0..=100.0).contains(&flags.node_deletion_budget_percent) {
            return Err(FlagError::new(
                "--node-deletion-budget-percent",
                "must be between 0 and 100",
            ));
        }
        if flags.node_deletion_confirmations == 0 {
            return Err(FlagError::new(
                "--node-deletion-confirmations",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        super::serves_instances(capabilities)
    }

    fn build(
        ctx: &ControllerContext,
        flags: &Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError> {
        let mut controller = Self::new(
            ctx.client.clone(),
            ctx.cloud.clone(),
            ctx.nodes.cache(),
            ctx.recorder(Self::NAMES.event_component),
        )
        .with_deletion_policy(flags.deletion_policy());
        controller.metrics = LifecycleMetrics::register(registry);
        controller.ready = Some(ctx.nodes.ready());
        controller.period = flags.node_monitor_period;
        Ok(controller)
    }

    async fn run(self, stop: Stop) {
        let mut stop = stop;
        // Nothing can be judged before the cache holds the nodes.
        if let Some(mut ready) = self.ready.clone() {
            tokio::select! {
                ready = ready.wait_for(|ready| *ready) => {
                    if ready.is_err() {
                        return;
                    }
                }
                () = &mut stop => return,
            }
        }
        loop {
            self.monitor_nodes().await;
            tokio::select! {
                () = tokio::time::sleep(self.period) => {}
                () = &mut stop => return,
            }
        }
    }
}

impl NodeLifecycleController {
    /// A controller over a node cache shared with other controllers, with upstream's deletion
    /// behaviour and unregistered metrics.
    pub fn new(
        client: kube::Client,
        cloud: Cloud,
        store: Store<CachedNode>,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            cloud,
            metrics: LifecycleMetrics::default(),
            recorder,
            store,
            ready: None,
            period: Duration::from_secs(5),
            policy: DeletionPolicy::upstream(),
            deletions: Mutex::default(),
        }
    }

    /// Replaces the upstream deletion behaviour with `policy`.
    pub fn with_deletion_policy(mut self, policy: DeletionPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// One pass over every node (upstream `MonitorNodes`).
    pub async fn monitor_nodes(&self) {
        let nodes = self.store.state();
        debug!(nodes = nodes.len(), "monitoring nodes");
        let managed = nodes.iter().filter(|n| self.cloud.owns_node(n)).count();
        self.metrics.set_managed(managed);
        // One pass at a time owns the deletion state.
        let mut state = self.deletions.lock().await;
        let live: HashSet<String> = nodes.iter().filter_map(|n| n.uid()).collect();
        state.retain_nodes(&live);
        for node in nodes {
            let span = info_span!("cloud-node-lifecycle.check", node = %node.name_any());
            let result = self
                .check_node(&node, &mut state, managed)
                .instrument(span)
                .await;
            if let Err(err) = result {
                warn!(node = %node.name_any(), reason = err.reason(), error = %err, "node lifecycle check failed");
            }
        }
    }

    /// Asks what the rules need to know about one node, and does what they decide.
    async fn check_node(
        &self,
        node: &CachedNode,
        state: &mut DeletionState,
        managed: usize,
    ) -> Result<(), LifecycleError> {
        match decide::first_look(node, self.cloud.owns_node(node)) {
            FirstLook::Skip => return Ok(()),
            FirstLook::RemoveShutdownTaint => {
                return self.set_shutdown_taint(node, TaintChange::Remove).await;
            }
            FirstLook::AskExistence => {}
        }
        let existence = self.cloud.instance_exists(node).await;
        let uid = node.uid().unwrap_or_default();
        if existence != InstanceExistence::NotFound {
            state.not_gone(&uid);
        }
        if !matches!(existence, InstanceExistence::Unknown(_)) {
            state.conclusive(&uid);
        }
        match existence {
            InstanceExistence::NotFound => {
                let admitted = state.admit(
                    node,
                    &self.policy,
                    managed,
                    Instant::now(),
                    Timestamp::now(),
                );
                self.report_budget(state);
                match admitted {
                    Ok(()) => self.delete(node).await,
                    Err(hold) => {
                        self.metrics.count_suppressed(hold.reason());
                        debug!(
                            reason = hold.reason(),
                            "instance not found, deletion held back"
                        );
                        Ok(())
                    }
                }
            }
            InstanceExistence::Unknown(why) => {
                let reason = why.reason();
                self.metrics.count_suppressed(reason);
                // A NotReady node whose instance cannot be checked is exactly the case where
                // deleting would be wrong; say so on the node, once per change of reason (a
                // Warning every pass while the shim is down would be a write per node per pass).
                if !state.inconclusive(&uid, reason) {
                    return Ok(());
                }
                self.recorder
                    .record(
                        &node.object_ref(&()),
                        EventType::Warning,
                        "DeletionSuppressed",
                        &format!(
                            "Node is not ready and the provider could not say whether its instance exists ({reason}); the node is kept"
                        ),
                    );
                Ok(())
            }
            InstanceExistence::Exists => {
                let shut_down = self.cloud.instance_shutdown(node).await.map_err(|source| {
                    LifecycleError::Shutdown {
                        node: node.name_any(),
                        source,
                    }
                })?;
                match decide::shutdown_taint(node, shut_down) {
                    Some(change) => self.set_shutdown_taint(node, change).await,
                    None => {
                        debug!(shut_down, "instance exists");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Mirrors the budget state into the gauge, logging when deletions pause.
    fn report_budget(&self, state: &mut DeletionState) {
        if state.pause_started()
            && let Some(budget) = &self.policy.budget
        {
            warn!(
                window = ?budget.window,
                "node deletion budget exhausted; deleting no more nodes until the window passes"
            );
        }
        self.metrics.set_paused(state.budget_exhausted());
    }

    async fn delete(&self, node: &CachedNode) -> Result<(), LifecycleError> {
        let name = node.name_any();
        let reference = node.object_ref(&());
        info!(node = %name, "deleting node because it does not exist in the cloud provider");
        self.recorder.record(
            &reference,
            EventType::Normal,
            "DeletingNode",
            &format!("Deleting node {name} because it does not exist in the cloud provider"),
        );
        // Precondition on the UID: never delete a node re-created under the same name since we
        // looked at it.
        let params = DeleteParams {
            preconditions: node.uid().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let request = k8s::nodes().delete(&name, &params);
        if let Err(source) = k8s::send_write(&self.client, request).await {
            let err = LifecycleError::Delete { node: name, source };
            self.recorder.record(
                &reference,
                EventType::Warning,
                err.reason(),
                &err.to_string(),
            );
            return Err(err);
        }
        Ok(())
    }

    async fn set_shutdown_taint(
        &self,
        node: &CachedNode,
        change: TaintChange,
    ) -> Result<(), LifecycleError> {
        let name = node.name_any();
        let mut taints: Vec<Taint> = node.taints().to_vec();
        taints.retain(|t| !(t.key == TAINT_SHUTDOWN && t.effect == "NoSchedule"));
        if change == TaintChange::Add {
            taints.push(Taint {
                key: TAINT_SHUTDOWN.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
        }
        // resourceVersion makes this an optimistic-concurrency write: a concurrent change to the
        // taints fails with 409 instead of being overwritten; the next pass retries.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": node.resource_version() },
            "spec": { "taints": taints },
        });
        let request = k8s::nodes().patch(&name, &PatchParams::default(), &Patch::Merge(&patch));
        k8s::send_write(&self.client, request)
            .await
            .map_err(|source| LifecycleError::Taint {
                node: name.clone(),
                source,
            })?;
        info!(node = %name, ?change, "updated shutdown taint");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};

    fn with_ready(status: Option<&str>) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: status.map(|s| {
                    vec![NodeCondition {
                        type_: "Ready".into(),
                        status: s.into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_condition_defaults_to_unknown() {
        assert_eq!(CachedNode::from(with_ready(None)).ready_status(), "Unknown");
        assert_eq!(
            CachedNode::from(with_ready(Some("False"))).ready_status(),
            "False"
        );
        assert_eq!(
            CachedNode::from(with_ready(Some("True"))).ready_status(),
            "True"
        );
    }
}
