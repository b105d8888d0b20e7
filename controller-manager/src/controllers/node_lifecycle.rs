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
//! the node untouched.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use k8s_openapi::api::core::v1::Taint;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use cpi_proto::CpiError;
use cpi_proto::v1::{self, Capability, Consistency, Existence};

use crate::apiclient;
use crate::cloud::{Cloud, counted};
use crate::controllers::CachedNode;
use crate::convert;
use crate::events::{EventBroadcaster, EventType, Recorder};
use crate::metrics::Metrics;
use crate::names::ControllerName;

/// Taint put on nodes whose instance is shut down.
pub const TAINT_SHUTDOWN: &str = "node.cloudprovider.kubernetes.io/shutdown";

/// When a node whose instance is gone may actually be deleted (operator-pain-points §1.2, §1.7):
/// upstream deletes at the first NOT_FOUND; the binary's defaults are more careful.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionPolicy {
    /// Nodes younger than this (by creationTimestamp) are never deleted for NOT_FOUND: lookups
    /// right after an instance launches are often eventually consistent.
    pub grace_period: Duration,
    /// Consecutive NOT_FOUND answers (one per monitor pass) needed before deleting.
    pub confirmations: u32,
    /// At most this fraction of the provider's nodes (and at least one) is deleted per window;
    /// `None` disables the budget.
    pub budget: Option<DeletionBudget>,
}

/// A rate limit on node deletions.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionBudget {
    /// Fraction of managed nodes, 0 < fraction ≤ 1.
    pub fraction: f64,
    /// Sliding window the fraction applies to.
    pub window: Duration,
}

impl DeletionPolicy {
    /// Upstream behaviour: delete at the first authoritative NOT_FOUND, no budget.
    pub fn upstream() -> Self {
        Self {
            grace_period: Duration::ZERO,
            confirmations: 1,
            budget: None,
        }
    }
}

/// Per-node confirmation counts and the deletions of the budget window.
#[derive(Default)]
struct DeletionState {
    not_found: HashMap<String, u32>,
    recent: VecDeque<Instant>,
    paused_reported: bool,
}

/// The existence verdict the controller acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The instance exists.
    Exists,
    /// The provider said authoritatively that it does not.
    Gone,
    /// Nothing may be concluded; the reason is recorded.
    Unknown(String),
}

/// Shared state of the lifecycle controller.
pub struct NodeLifecycleController {
    client: kube::Client,
    cloud: Cloud,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    store: Store<CachedNode>,
    policy: DeletionPolicy,
    deletions: Mutex<DeletionState>,
}

impl NodeLifecycleController {
    /// Creates the controller over a node cache shared with other controllers.
    pub fn new(
        client: kube::Client,
        cloud: Cloud,
        metrics: Arc<Metrics>,
        store: Store<CachedNode>,
        events: &EventBroadcaster,
    ) -> Self {
        let recorder = events.new_recorder(ControllerName::CloudNodeLifecycle.event_component());
        Self {
            client,
            cloud,
            metrics,
            recorder,
            store,
            policy: DeletionPolicy::upstream(),
            deletions: Mutex::default(),
        }
    }

    /// Replaces the upstream deletion behaviour with `policy`.
    pub fn with_deletion_policy(mut self, policy: DeletionPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Runs `monitor_nodes` every `period`, once `cache_ready` turns true, until `shutdown`.
    pub async fn run(
        self,
        period: Duration,
        mut cache_ready: tokio::sync::watch::Receiver<bool>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        // Nothing can be judged before the cache holds the nodes.
        tokio::select! {
            ready = cache_ready.wait_for(|ready| *ready) => {
                if ready.is_err() {
                    return;
                }
            }
            () = &mut shutdown => return,
        }
        loop {
            self.monitor_nodes().await;
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// One pass over every node (upstream `MonitorNodes`).
    pub async fn monitor_nodes(&self) {
        let nodes = self.store.state();
        debug!(nodes = nodes.len(), "monitoring nodes");
        let managed = nodes.iter().filter(|n| self.cloud.owns_node(n)).count();
        if let Ok(mut state) = self.deletions.lock() {
            let live: std::collections::HashSet<String> =
                nodes.iter().filter_map(|n| n.uid()).collect();
            state.not_found.retain(|uid, _| live.contains(uid));
        }
        self.metrics
            .managed_nodes
            .set(i64::try_from(managed).unwrap_or(i64::MAX));
        for node in nodes {
            let span = info_span!("cloud-node-lifecycle.check", node = %node.name_any());
            self.check_node(&node).instrument(span).await;
        }
    }

    async fn check_node(&self, node: &CachedNode) {
        if !self.cloud.owns_node(node) {
            return;
        }
        if node.ready_status() == "True" {
            if node.has_taint(TAINT_SHUTDOWN) {
                self.set_shutdown_taint(node, false).await;
            }
            return;
        }
        let verdict = self.existence(node).await;
        if verdict != Verdict::Gone
            && let (Some(uid), Ok(mut state)) = (node.uid(), self.deletions.lock())
        {
            state.not_found.remove(&uid);
        }
        match verdict {
            Verdict::Gone => match self.may_delete(node) {
                Ok(()) => self.delete(node).await,
                Err(reason) => {
                    self.metrics.count_suppressed_deletion(reason);
                    debug!(reason, "instance not found, deletion held back");
                }
            },
            Verdict::Unknown(reason) => {
                self.metrics.count_suppressed_deletion(&reason);
                // A NotReady node whose instance cannot be checked is exactly the case where
                // deleting would be wrong; say so on the node (aggregated by the recorder).
                self.recorder.record(
                    &node.object_ref(&()),
                    EventType::Warning,
                    "DeletionSuppressed",
                    &format!(
                        "Node is not ready and the provider could not say whether its instance exists ({reason}); the node is kept"
                    ),
                );
            }
            Verdict::Exists => match self.shutdown(node).await {
                Ok(true) if !node.has_taint(TAINT_SHUTDOWN) => {
                    self.set_shutdown_taint(node, true).await;
                }
                // Beyond upstream (which waits for Ready): an instance that runs again loses the
                // taint at once, so the taint never claims a shutdown that is over.
                Ok(false) if node.has_taint(TAINT_SHUTDOWN) => {
                    self.set_shutdown_taint(node, false).await;
                }
                Ok(shutdown) => debug!(shutdown, "instance exists"),
                Err(err) => warn!(error = %err, "error checking if node is shutdown"),
            },
        }
    }

    /// Applies the deletion policy to a node the provider reported gone; `Err` names why not.
    fn may_delete(&self, node: &CachedNode) -> Result<(), &'static str> {
        let policy = &self.policy;
        if !policy.grace_period.is_zero() {
            let young = node
                .meta()
                .creation_timestamp
                .as_ref()
                .is_none_or(|created| {
                    let age = Timestamp::now().duration_since(created.0);
                    Duration::try_from(age).is_ok_and(|age| age < policy.grace_period)
                });
            if young {
                return Err("grace_period");
            }
        }
        let Ok(mut state) = self.deletions.lock() else {
            return Err("internal");
        };
        if let Some(uid) = node.uid() {
            let seen = state.not_found.entry(uid).or_insert(0);
            *seen = seen.saturating_add(1);
            if *seen < policy.confirmations.max(1) {
                return Err("confirming");
            }
        }
        if let Some(budget) = &policy.budget {
            let managed = usize::try_from(self.metrics.managed_nodes.get()).unwrap_or(0);
            if !budget_allows(&mut state.recent, Instant::now(), managed, budget) {
                self.metrics.deletions_paused.set(1);
                if !state.paused_reported {
                    state.paused_reported = true;
                    warn!(
                        window = ?budget.window,
                        "node deletion budget exhausted; deleting no more nodes until the window passes"
                    );
                }
                return Err("budget");
            }
            state.paused_reported = false;
            self.metrics.deletions_paused.set(0);
        }
        if let Some(uid) = node.uid() {
            state.not_found.remove(&uid);
        }
        Ok(())
    }

    async fn existence(&self, node: &CachedNode) -> Verdict {
        if self.cloud.has(Capability::InstancesV2) {
            let request = v1::InstanceExistsRequest {
                node: Some(convert::node(node, self.cloud.wants_raw_objects())),
                consistency: Consistency::Strong as i32,
            };
            return self
                .verdict(
                    "InstancesV2/InstanceExists",
                    self.cloud.instances_v2().instance_exists(request),
                )
                .await;
        }
        let provider_id = match self.legacy_provider_id(node, Consistency::Strong).await {
            Ok(None) | Err(CpiError::InstanceNotFound(_)) => return Verdict::Gone,
            Ok(Some(id)) => id,
            Err(err) => {
                warn!(error = %err, "error getting provider ID");
                return Verdict::Unknown(err.class().to_string());
            }
        };
        let request = v1::ProviderIdRequest {
            provider_id,
            consistency: Consistency::Strong as i32,
        };
        self.verdict(
            "Instances/InstanceExistsByProviderID",
            self.cloud
                .instances()
                .instance_exists_by_provider_id(request),
        )
        .await
    }

    /// Legacy path (upstream `getProviderID`): the node's provider ID, else the one built from
    /// InstanceID; `None` when the provider answers an empty instance ID.
    async fn legacy_provider_id(
        &self,
        node: &CachedNode,
        consistency: Consistency,
    ) -> Result<Option<String>, CpiError> {
        if let Some(id) = node.provider_id() {
            return Ok(Some(id.to_string()));
        }
        self.cloud
            .instance_provider_id(&self.metrics, &node.name_any(), consistency)
            .await
    }

    async fn verdict(
        &self,
        method: &str,
        call: impl Future<Output = Result<tonic::Response<v1::InstanceExistsResponse>, tonic::Status>>,
    ) -> Verdict {
        match counted(&self.metrics, method, call).await {
            Ok(response) => verdict_from(&response),
            Err(err) => {
                warn!(error = %err, "error checking if node exists");
                Verdict::Unknown(err.class().to_string())
            }
        }
    }

    async fn shutdown(&self, node: &CachedNode) -> Result<bool, CpiError> {
        let result = if self.cloud.has(Capability::InstancesV2) {
            let request = v1::InstanceShutdownRequest {
                node: Some(convert::node(node, self.cloud.wants_raw_objects())),
                consistency: Consistency::Unspecified as i32,
            };
            counted(
                &self.metrics,
                "InstancesV2/InstanceShutdown",
                self.cloud.instances_v2().instance_shutdown(request),
            )
            .await
        } else {
            // Upstream `getProviderID`: the node's, else built from InstanceID.
            let id = match self
                .legacy_provider_id(node, Consistency::Unspecified)
                .await
            {
                Ok(Some(id)) => id,
                Ok(None) | Err(CpiError::InstanceNotFound(_)) => return Ok(false),
                Err(err) => return Err(err),
            };
            let request = v1::ProviderIdRequest {
                provider_id: id,
                consistency: Consistency::Unspecified as i32,
            };
            counted(
                &self.metrics,
                "Instances/InstanceShutdownByProviderID",
                self.cloud
                    .instances()
                    .instance_shutdown_by_provider_id(request),
            )
            .await
        };
        match result {
            Ok(response) => Ok(response.shutdown),
            Err(CpiError::NotImplemented(_) | CpiError::InstanceNotFound(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    async fn delete(&self, node: &CachedNode) {
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
        let request = apiclient::nodes().delete(&name, &params);
        if let Err(err) = apiclient::send_write(&self.client, request).await {
            warn!(node = %name, error = %err, "failed deleting node");
            self.recorder.record(
                &reference,
                EventType::Warning,
                "DeletingNodeFailed",
                &format!("Failed deleting node {name}: {err}"),
            );
        }
    }

    async fn set_shutdown_taint(&self, node: &CachedNode, present: bool) {
        let name = node.name_any();
        let mut taints: Vec<Taint> = node.taints().to_vec();
        taints.retain(|t| !(t.key == TAINT_SHUTDOWN && t.effect == "NoSchedule"));
        if present {
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
        let request =
            apiclient::nodes().patch(&name, &PatchParams::default(), &Patch::Merge(&patch));
        match apiclient::send_write(&self.client, request).await {
            Ok(()) => info!(node = %name, present, "updated shutdown taint"),
            Err(err) => warn!(node = %name, error = %err, "failed to update shutdown taint"),
        }
    }
}

/// Admits one deletion if fewer than max(1, ⌊fraction × managed⌋) happened within the window,
/// recording it in `recent`.
pub fn budget_allows(
    recent: &mut VecDeque<Instant>,
    now: Instant,
    managed: usize,
    budget: &DeletionBudget,
) -> bool {
    while recent
        .front()
        .is_some_and(|at| now.duration_since(*at) > budget.window)
    {
        recent.pop_front();
    }
    // Truncation is intended: the budget is a whole number of nodes.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let allowed = ((managed as f64 * budget.fraction).floor() as usize).max(1);
    if recent.len() >= allowed {
        return false;
    }
    recent.push_back(now);
    true
}

/// Maps the tri-state answer: only `NOT_FOUND` means gone; `UNSPECIFIED` (an older shim or a
/// missing field) is as cautious as `UNKNOWN`.
pub fn verdict_from(response: &v1::InstanceExistsResponse) -> Verdict {
    match Existence::try_from(response.existence) {
        Ok(Existence::Exists) => Verdict::Exists,
        Ok(Existence::NotFound) => Verdict::Gone,
        Ok(Existence::Unknown) => Verdict::Unknown("UNKNOWN".into()),
        Ok(Existence::Unspecified) | Err(_) => Verdict::Unknown("UNSPECIFIED".into()),
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
    fn budget_allows_a_fraction_per_window_and_at_least_one() {
        let budget = DeletionBudget {
            fraction: 0.1,
            window: Duration::from_secs(600),
        };
        let start = Instant::now();
        let mut recent = VecDeque::new();
        // 10% of 30 nodes = 3 deletions per window.
        for _ in 0..3 {
            assert!(budget_allows(&mut recent, start, 30, &budget));
        }
        assert!(!budget_allows(&mut recent, start, 30, &budget));
        // Once the window has passed, deletions resume.
        let later = start + Duration::from_secs(601);
        assert!(budget_allows(&mut recent, later, 30, &budget));
        // A small cluster still gets one deletion per window, never zero.
        let mut small = VecDeque::new();
        assert!(budget_allows(&mut small, start, 3, &budget));
        assert!(!budget_allows(&mut small, start, 3, &budget));
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

    #[test]
    fn only_not_found_is_gone() {
        let answer = |e: Existence| v1::InstanceExistsResponse {
            existence: e as i32,
            ..Default::default()
        };
        assert_eq!(verdict_from(&answer(Existence::Exists)), Verdict::Exists);
        assert_eq!(verdict_from(&answer(Existence::NotFound)), Verdict::Gone);
        assert!(matches!(
            verdict_from(&answer(Existence::Unknown)),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            verdict_from(&answer(Existence::Unspecified)),
            Verdict::Unknown(_)
        ));
        let future = v1::InstanceExistsResponse {
            existence: 42,
            ..Default::default()
        };
        assert!(matches!(verdict_from(&future), Verdict::Unknown(_)));
    }
}
