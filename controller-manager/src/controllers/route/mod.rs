//! node-route-controller (upstream `controllers/route`): a cloud route for every pod CIDR of
//! every node, the removal of routes no node needs any more, and the nodes'
//! `NetworkUnavailable` condition.
//!
//! Structure: the rules are pure functions in [`decide`]; [`RouteSync`] lists the routes (every
//! page, or nothing is decided), asks the rules for a [`Plan`](decide::Plan) and performs it:
//! deletions, then creations (at most 200 provider calls in flight), then the condition
//! patches. Nodes come from the watch shared with the node controllers, never from a LIST per
//! reconcile.
//!
//! Scheduling: every `--route-reconciliation-period` (non-sliding), or with the feature gate
//! `CloudControllerManagerWatchBasedRoutesReconciliation` on node changes that matter, at most
//! once per period, by one worker; a change seen during a run causes one more run.
//!
//! Guarantees beyond upstream's (all in the rules): a route the shim says another owner's is
//! never deleted, only reported (pain point 4.3); nodes outside the provider's ownership get
//! no route and keep theirs (4.7); each failing route backs off on its own, 5 s doubling to
//! 5 min, so failing routes neither storm the provider nor delay a new node's (4.2, 4.6);
//! routes beyond the route table's capacity are not attempted and each affected node gets one
//! event (4.1); a CNI's `NetworkUnavailable=False` is never turned `True` (4.5).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1::{self as pb, Capability};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{BuildError, ClusterSettings, Controller, ControllerContext, Names, Stop};
use crate::cloud::{Cloud, ListRoutesError};
use crate::cluster_cidrs::ClusterCidrs;
use crate::flags::{FlagError, parse_duration, positive};
use crate::k8s::{self, CachedNode, EventType, Recorder};

pub mod decide;
mod metrics;

pub use metrics::RouteMetrics;

use decide::{Backoff, ConditionDecision, Creation, Inputs, Plan, RouteKey, Watched};

/// Upstream `maxConcurrentRouteOperations`: provider calls in flight at most.
pub const MAX_CONCURRENT_ROUTE_OPERATIONS: usize = 200;
/// Condition patches in flight at most (the API client is rate limited anyway).
const CONDITION_WRITERS: usize = 32;
/// In the watch-based mode, how often a reconcile runs without any node change (a watch has
/// no informer resync; this stands in for it, so routes changed in the cloud are repaired).
const WATCH_RESYNC: Duration = Duration::from_secs(600);

/// Flags of the route controller.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "route-flags")]
#[command(next_help_heading = "node-route-controller")]
pub struct Flags {
    /// How often the route controller reconciles routes (with
    /// --feature-gates=CloudControllerManagerWatchBasedRoutesReconciliation=true: at most how
    /// often).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub route_reconciliation_period: Duration,
}

/// Why a reconcile, or a part of it, failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The node cache has not synced: no route is touched before it holds the cluster.
    #[error("the node cache has not synced yet")]
    NodesNotSynced,
    /// The routes could not be listed (whole); nothing was changed.
    #[error("listing routes: {0}")]
    List(#[from] ListRoutesError),
    /// CreateRoute failed (upstream's event message).
    #[error("Could not create route {name_hint} {cidr} for node {node} after {after:?}: {source}")]
    Create {
        /// The name hint (the Node's UID).
        name_hint: String,
        /// Destination CIDR.
        cidr: String,
        /// Target node.
        node: String,
        /// How long the call took.
        after: Duration,
        /// The provider's error.
        source: CpiError,
    },
    /// DeleteRoute failed.
    #[error("Could not delete route {name:?} {cidr} (target node {node:?}): {source}")]
    Delete {
        /// The route's cloud name.
        name: String,
        /// Destination CIDR.
        cidr: String,
        /// Target node (empty for a blackhole route).
        node: String,
        /// The provider's error.
        source: CpiError,
    },
    /// The route table cannot hold the node's routes.
    #[error(
        "No route created for pod CIDR(s) {cidrs} of node {node}: the provider's route table holds at most {capacity} routes and {shortfall} more are needed"
    )]
    Capacity {
        /// Target node.
        node: String,
        /// Its pod CIDRs without a route, comma-separated.
        cidrs: String,
        /// The route table's capacity.
        capacity: u32,
        /// Routes wanted beyond it, cluster-wide.
        shortfall: usize,
    },
    /// The `NetworkUnavailable` patch failed.
    #[error("updating the NetworkUnavailable condition of node {node}: {source}")]
    Condition {
        /// Node name.
        node: String,
        /// API error.
        source: kube::Error,
    },
}

impl RouteError {
    /// A CamelCase reason for events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NodesNotSynced => "NodesNotSynced",
            Self::List(_) => "FailedToListRoutes",
            Self::Create { .. } => "FailedToCreateRoute",
            Self::Delete { .. } => "FailedToDeleteRoute",
            Self::Capacity { .. } => "RouteCapacityExceeded",
            Self::Condition { .. } => "FailedToUpdateNetworkCondition",
        }
    }
}

/// How reconciles are triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every period, non-sliding (upstream's default).
    Periodic(Duration),
    /// On node changes that matter, at most once per period (KEP-5237).
    WatchBased(Duration),
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Routes created.
    pub created: usize,
    /// Routes deleted.
    pub deleted: usize,
    /// Creations that failed.
    pub failed_creations: usize,
    /// Deletions that failed.
    pub failed_deletions: usize,
    /// Routes left alone because the shim says another owner's.
    pub foreign: usize,
    /// Routes not tried because they back off.
    pub backing_off: usize,
    /// Routes not tried because the route table is full.
    pub over_capacity: usize,
    /// `NetworkUnavailable` patches sent.
    pub conditions_written: usize,
    /// Nodes whose `NetworkUnavailable=False` of another writer was left although a route is
    /// missing.
    pub conditions_left: Vec<String>,
}

/// The route controller as the registry runs it.
pub struct RouteController {
    state: Arc<RouteSync>,
    schedule: Schedule,
    node_changes: watch::Receiver<u64>,
}

impl Controller for RouteController {
    const NAMES: Names = Names {
        canonical: "node-route-controller",
        alias: "route",
        event_component: "route_controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        positive(
            "--route-reconciliation-period",
            flags.route_reconciliation_period,
        )
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        capabilities.contains(&Capability::Routes)
    }

    const FENCED: bool = true;

    fn build(
        ctx: &ControllerContext,
        flags: &Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError> {
        routes_configured(&ctx.cluster)?;
        let state = RouteSync::new(
            ctx.client.clone(),
            ctx.cloud.clone(),
            ctx.cluster.name.clone(),
            ctx.cluster.cidrs.clone(),
            ctx.nodes.cache(),
            ctx.nodes.ready(),
            ctx.recorder(Self::NAMES.event_component),
        )
        .with_metrics(RouteMetrics::register(registry));
        let period = flags.route_reconciliation_period;
        Ok(Self {
            state: Arc::new(state),
            schedule: if ctx.cluster.feature_gates.watch_based_routes_reconciliation {
                Schedule::WatchBased(period)
            } else {
                Schedule::Periodic(period)
            },
            node_changes: ctx.nodes.changes(),
        })
    }

    async fn run(self, stop: Stop) {
        self.state.run(self.schedule, self.node_changes, stop).await;
    }
}

/// Upstream `startRouteController`'s checks: routes are configured
/// (`--configure-cloud-routes`) and there are cluster CIDRs to route. Without them the
/// controller is not started (upstream exits fatally on an empty `--cluster-cidr`).
fn routes_configured(cluster: &ClusterSettings) -> Result<(), BuildError> {
    if !cluster.configure_cloud_routes {
        return Err(BuildError::Disabled(
            "--configure-cloud-routes=false: routes are not managed".into(),
        ));
    }
    if cluster.cidrs.is_empty() {
        return Err(BuildError::Disabled(
            "the provider implements Routes but --cluster-cidr is empty: set --cluster-cidr to \
             the pod network's CIDR(s), or --configure-cloud-routes=false to leave routes alone"
                .into(),
        ));
    }
    Ok(())
}

/// The route controller's state and its reconcile (upstream `RouteController`).
pub struct RouteSync {
    client: kube::Client,
    cloud: Cloud,
    cluster_name: String,
    cidrs: ClusterCidrs,
    nodes: Store<CachedNode>,
    nodes_ready: watch::Receiver<bool>,
    recorder: Recorder,
    metrics: RouteMetrics,
    backoff: Mutex<Backoff>,
    /// Nodes with routes the route table cannot hold (they have had their event).
    capacity_blocked: Mutex<HashSet<String>>,
    /// Foreign routes at the last reconcile (a warning is logged when the count changes).
    foreign: AtomicUsize,
    /// Provider calls in flight, deletions and creations together.
    operations: Semaphore,
}

impl RouteSync {
    /// A controller over the node cache `nodes` (synced once `nodes_ready` turns true),
    /// reporting into unregistered metrics (what the tests build).
    pub fn new(
        client: kube::Client,
        cloud: Cloud,
        cluster_name: String,
        cidrs: ClusterCidrs,
        nodes: Store<CachedNode>,
        nodes_ready: watch::Receiver<bool>,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            cloud,
            cluster_name,
            cidrs,
            nodes,
            nodes_ready,
            recorder,
            metrics: RouteMetrics::default(),
            backoff: Mutex::default(),
            capacity_blocked: Mutex::default(),
            foreign: AtomicUsize::new(0),
            operations: Semaphore::new(MAX_CONCURRENT_ROUTE_OPERATIONS),
        }
    }

    /// Reports into `metrics`.
    pub fn with_metrics(mut self, metrics: RouteMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The metrics.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    /// The per-route backoff (a poisoned lock still holds usable counts).
    fn backoff(&self) -> MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Failures in a row of the route of `cidr` on `node`.
    pub fn failures(&self, node: &str, cidr: &str) -> u32 {
        self.backoff().failures(&RouteKey::new(node, cidr))
    }

    /// Runs reconciles on `schedule` until `stop`, the first once the node cache has synced.
    pub async fn run(
        self: Arc<Self>,
        schedule: Schedule,
        node_changes: watch::Receiver<u64>,
        mut stop: Stop,
    ) {
        let mut nodes_ready = self.nodes_ready.clone();
        let synced = tokio::select! {
            ready = nodes_ready.wait_for(|r| *r) => ready.is_ok(),
            () = &mut stop => false,
        };
        if !synced {
            return;
        }
        info!(?schedule, "node cache synced; starting route reconciles");
        match schedule {
            Schedule::Periodic(period) => self.run_periodic(period, stop).await,
            Schedule::WatchBased(period) => self.run_watch_based(period, node_changes, stop).await,
        }
    }

    /// Upstream `wait.NonSlidingUntil(reconcileNodeRoutes, period)`.
    async fn run_periodic(&self, period: Duration, mut stop: Stop) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = &mut stop => return,
            }
            self.reconcile_logged().await;
        }
    }

    /// The watch-based mode: one worker, a reconcile when the node cache changed in a way that
    /// matters (or every [`WATCH_RESYNC`]), at most one per `period`; the nodes are looked at
    /// afresh when a run starts, so a change during a run causes one more.
    async fn run_watch_based(
        &self,
        period: Duration,
        mut changes: watch::Receiver<u64>,
        mut stop: Stop,
    ) {
        changes.borrow_and_update();
        let mut resync = tokio::time::interval_at(Instant::now() + WATCH_RESYNC, WATCH_RESYNC);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seen = self.watched();
        // Upstream's informer adds every node at start: one reconcile first.
        let mut pending = true;
        let mut last_start: Option<Instant> = None;
        loop {
            if !pending {
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let now = self.watched();
                        pending = decide::nodes_changed(&seen, &now);
                        seen = now;
                    }
                    _ = resync.tick() => pending = true,
                    () = &mut stop => return,
                }
                continue;
            }
            if let Some(started) = last_start {
                tokio::select! {
                    () = tokio::time::sleep_until(started + period) => {}
                    () = &mut stop => return,
                }
            }
            // Upstream forgets the key before reconciling: what changes from here on is seen.
            changes.borrow_and_update();
            seen = self.watched();
            pending = false;
            last_start = Some(Instant::now());
            if !self.reconcile_logged().await {
                pending = true;
            }
        }
    }

    /// The watched fields of every cached node.
    fn watched(&self) -> HashMap<String, Watched> {
        self.nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), Watched::of(n)))
            .collect()
    }

    /// One reconcile, its failure logged; whether it succeeded.
    async fn reconcile_logged(&self) -> bool {
        match self.reconcile().await {
            Ok(outcome) => {
                debug!(?outcome, "route reconcile done");
                true
            }
            Err(err) => {
                warn!(error = %err, "route reconcile failed; retrying on the next period");
                false
            }
        }
    }

    /// Upstream `reconcileNodeRoutes`: lists every route, decides, deletes, creates and writes
    /// the nodes' `NetworkUnavailable`. Failed cloud calls do not fail it (they are retried
    /// by later reconciles, each route after its backoff); a failed listing does, before
    /// anything is changed.
    pub async fn reconcile(&self) -> Result<Outcome, RouteError> {
        let started = Instant::now();
        self.metrics.route_sync.inc();
        let result = self.reconcile_inner().await;
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn reconcile_inner(&self) -> Result<Outcome, RouteError> {
        if !*self.nodes_ready.borrow() {
            return Err(RouteError::NodesNotSynced);
        }
        let list = self.cloud.list_routes(&self.cluster_name).await?;
        let nodes: BTreeMap<String, Arc<CachedNode>> = self
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let mut plan = {
            let mut backoff = self.backoff();
            let plan = decide::reconcile(
                nodes.values().map(AsRef::as_ref),
                |n| self.cloud.owns_node(n),
                &list.routes,
                &Inputs {
                    cidrs: &self.cidrs,
                    capacity: list.capacity,
                    backoff: &backoff,
                    now: Instant::now().into_std(),
                },
            );
            backoff.retain_wanted(&plan);
            plan
        };
        let mut outcome = Outcome {
            foreign: plan.foreign.len(),
            backing_off: plan.backing_off.len(),
            over_capacity: plan.over_capacity.len(),
            ..Outcome::default()
        };
        self.report_unmanageable(&plan);
        self.report_capacity(&plan, list.capacity, &nodes);

        let deletions = std::mem::take(&mut plan.deletions);
        let creations = std::mem::take(&mut plan.creations);
        let deletions_first = plan.deletions_first;
        // A node's condition is written as soon as its last creation has ended, while the
        // other nodes' routes are still being created (not after all of them).
        let (conditions, queued) = futures::channel::mpsc::unbounded();
        let mut outstanding: HashMap<&str, usize> = HashMap::new();
        for creation in &creations {
            if let Some((name, _)) = nodes.get_key_value(&creation.key.node) {
                *outstanding.entry(name.as_str()).or_default() += 1;
            }
        }
        for (name, node) in &nodes {
            if !outstanding.contains_key(name.as_str()) {
                self.queue_condition(&plan, name, node, &conditions, &mut outcome);
            }
        }
        let mut deleted = Outcome::default();
        let changes = async {
            let deleting = self.delete_all(deletions, &mut deleted);
            let creating = self.create_all(
                creations,
                &nodes,
                &mut plan,
                &mut outstanding,
                conditions,
                &mut outcome,
            );
            if deletions_first {
                deleting.await;
                creating.await;
            } else {
                tokio::join!(deleting, creating);
            }
        };
        let ((), written) = tokio::join!(changes, self.write_conditions(queued));
        outcome.deleted = deleted.deleted;
        outcome.failed_deletions = deleted.failed_deletions;
        outcome.conditions_written = written;
        Ok(outcome)
    }

    /// Logs the routes left alone: another owner's (warned when their number changes) and
    /// those whose destination is not a CIDR.
    fn report_unmanageable(&self, plan: &Plan) {
        let foreign = plan.foreign.len();
        self.metrics
            .foreign_routes
            .set(i64::try_from(foreign).unwrap_or(i64::MAX));
        if self.foreign.swap(foreign, Ordering::Relaxed) != foreign && foreign > 0 {
            let cidrs: Vec<&str> = plan
                .foreign
                .iter()
                .map(|r| r.destination_cidr.as_str())
                .collect();
            warn!(
                count = foreign,
                ?cidrs,
                "routes inside the cluster CIDRs carry another owner's identity; leaving them alone"
            );
        }
        for route in &plan.invalid {
            debug!(name = %route.name, cidr = %route.destination_cidr, "route destination is not a CIDR; ignoring it");
        }
    }

    /// Sets the shortfall gauge and gives each node newly short of routes one Warning event.
    fn report_capacity(
        &self,
        plan: &Plan,
        capacity: Option<u32>,
        nodes: &BTreeMap<String, Arc<CachedNode>>,
    ) {
        let shortfall = plan.over_capacity.len();
        self.metrics
            .capacity_shortfall
            .set(i64::try_from(shortfall).unwrap_or(i64::MAX));
        let mut by_node: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for key in &plan.over_capacity {
            by_node.entry(&key.node).or_default().push(&key.cidr);
        }
        let mut blocked = self
            .capacity_blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        blocked.retain(|node| by_node.contains_key(node.as_str()));
        for (node, cidrs) in by_node {
            if !blocked.insert(node.to_string()) {
                continue;
            }
            let err = RouteError::Capacity {
                node: node.to_string(),
                cidrs: cidrs.join(","),
                capacity: capacity.unwrap_or_default(),
                shortfall,
            };
            warn!(error = %err, "route table full");
            if let Some(cached) = nodes.get(node) {
                self.recorder.record(
                    &cached.object_ref(&()),
                    EventType::Warning,
                    err.reason(),
                    &err.to_string(),
                );
            }
        }
    }

    /// Deletes `routes`, at most [`MAX_CONCURRENT_ROUTE_OPERATIONS`] calls in flight in all.
    async fn delete_all(&self, routes: Vec<pb::Route>, outcome: &mut Outcome) {
        let results: Vec<bool> = futures::stream::iter(routes)
            .map(|route| self.delete(route))
            .buffer_unordered(MAX_CONCURRENT_ROUTE_OPERATIONS)
            .collect()
            .await;
        outcome.deleted += results.iter().filter(|ok| **ok).count();
        outcome.failed_deletions += results.iter().filter(|ok| !**ok).count();
    }

    async fn delete(&self, route: pb::Route) -> bool {
        let Ok(_permit) = self.operations.acquire().await else {
            return false;
        };
        let (name, cidr, node) = (
            route.name.clone(),
            route.destination_cidr.clone(),
            route.target_node.clone(),
        );
        match self.cloud.delete_route(&self.cluster_name, route).await {
            Ok(()) => {
                info!(%name, %cidr, %node, "deleted route");
                self.metrics.deleted.inc();
                true
            }
            Err(source) => {
                self.metrics.failed("delete");
                let err = RouteError::Delete {
                    name,
                    cidr,
                    node,
                    source,
                };
                warn!(error = %err, "route deletion failed; retrying on a later reconcile");
                false
            }
        }
    }

    /// Creates `creations`, at most [`MAX_CONCURRENT_ROUTE_OPERATIONS`] calls in flight in
    /// all, marking each created route in `plan`; once the last of a node's creations (counted
    /// in `outstanding`) has ended, queues the node's condition on `conditions`.
    async fn create_all(
        &self,
        creations: Vec<Creation>,
        nodes: &BTreeMap<String, Arc<CachedNode>>,
        plan: &mut Plan,
        outstanding: &mut HashMap<&str, usize>,
        conditions: Conditions,
        outcome: &mut Outcome,
    ) {
        let mut results = futures::stream::iter(creations)
            .map(|creation| self.create(creation, nodes))
            .buffer_unordered(MAX_CONCURRENT_ROUTE_OPERATIONS);
        while let Some((key, ok)) = results.next().await {
            if ok {
                outcome.created += 1;
                plan.created(&key);
            } else {
                outcome.failed_creations += 1;
            }
            let Some((name, node)) = nodes.get_key_value(&key.node) else {
                continue;
            };
            if let Some(left) = outstanding.get_mut(name.as_str()) {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.queue_condition(plan, name, node, &conditions, outcome);
                }
            }
        }
    }

    async fn create(
        &self,
        creation: Creation,
        nodes: &BTreeMap<String, Arc<CachedNode>>,
    ) -> (RouteKey, bool) {
        let Creation {
            key,
            name_hint,
            route,
        } = creation;
        let Ok(_permit) = self.operations.acquire().await else {
            return (key, false);
        };
        let started = Instant::now();
        match self
            .cloud
            .create_route(&self.cluster_name, &name_hint, route)
            .await
        {
            Ok(()) => {
                info!(node = %key.node, cidr = %key.cidr, after = ?started.elapsed(), "created route");
                self.metrics.created.inc();
                self.backoff().succeeded(&key);
                (key, true)
            }
            Err(source) => {
                self.metrics.failed("create");
                let delay = self.backoff().failed(&key, Instant::now().into_std());
                let err = RouteError::Create {
                    name_hint,
                    cidr: key.cidr.clone(),
                    node: key.node.clone(),
                    after: started.elapsed(),
                    source,
                };
                warn!(error = %err, retry_in = ?delay, "route creation failed");
                if let Some(node) = nodes.get(&key.node) {
                    self.recorder.record(
                        &node.object_ref(&()),
                        EventType::Warning,
                        err.reason(),
                        &err.to_string(),
                    );
                }
                (key, false)
            }
        }
    }

    /// Upstream's condition rule for one node with an entry in the plan: queues the
    /// `NetworkUnavailable` patch when the value changes.
    fn queue_condition(
        &self,
        plan: &Plan,
        name: &str,
        node: &CachedNode,
        conditions: &Conditions,
        outcome: &mut Outcome,
    ) {
        let Some(created) = plan.routes_created(name) else {
            return;
        };
        let now = Time(Timestamp::now());
        match decide::network_condition(decide::current_condition(node), created, &now) {
            ConditionDecision::Unchanged => {}
            ConditionDecision::LeftToOtherWriter { reason } => {
                debug!(
                    node = %name,
                    %reason,
                    "a route is missing, but another writer set NetworkUnavailable=False; leaving it"
                );
                outcome.conditions_left.push(name.to_string());
            }
            // The writer only ends with the reconcile, after the last send.
            ConditionDecision::Patch(patch) => {
                drop(conditions.unbounded_send((name.to_string(), patch)))
            }
        }
    }

    /// Sends the queued `NetworkUnavailable` patches, a bounded number at once, until the
    /// queue closes; returns how many were written.
    async fn write_conditions(
        &self,
        queued: futures::channel::mpsc::UnboundedReceiver<(String, serde_json::Value)>,
    ) -> usize {
        queued
            .map(|(name, patch)| async move {
                let request = k8s::nodes().patch_subresource(
                    "status",
                    &name,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                );
                match k8s::send_write(&self.client, request).await {
                    Ok(()) => true,
                    Err(source) => {
                        let err = RouteError::Condition { node: name, source };
                        warn!(error = %err, "retrying on a later reconcile");
                        false
                    }
                }
            })
            .buffer_unordered(CONDITION_WRITERS)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    }
}

/// Where a reconcile queues the condition patches to send: (node, patch).
type Conditions = futures::channel::mpsc::UnboundedSender<(String, serde_json::Value)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(configure: bool, cidrs: &str) -> ClusterSettings {
        ClusterSettings {
            configure_cloud_routes: configure,
            cidrs: cidrs.parse().unwrap(),
            ..ClusterSettings::default()
        }
    }

    #[test]
    fn not_started_without_configure_cloud_routes() {
        let err = routes_configured(&settings(false, "10.244.0.0/16")).unwrap_err();
        assert!(
            err.to_string().contains("--configure-cloud-routes=false"),
            "{err}"
        );
    }

    #[test]
    fn not_started_without_cluster_cidr_and_says_what_to_set() {
        let err = routes_configured(&settings(true, "")).unwrap_err();
        assert!(matches!(err, BuildError::Disabled(_)));
        let message = err.to_string();
        assert!(message.contains("set --cluster-cidr"), "{message}");
        assert!(
            message.contains("--configure-cloud-routes=false"),
            "{message}"
        );
    }

    #[test]
    fn started_with_cluster_cidrs() {
        assert!(routes_configured(&settings(true, "10.244.0.0/16,fd00::/56")).is_ok());
    }

    #[test]
    fn errors_have_event_reasons() {
        let err = RouteError::Create {
            name_hint: "uid-1".into(),
            cidr: "10.244.1.0/24".into(),
            node: "n1".into(),
            after: Duration::from_millis(5),
            source: CpiError::Cloud("quota".into()),
        };
        assert_eq!(err.reason(), "FailedToCreateRoute");
        assert_eq!(
            err.to_string(),
            "Could not create route uid-1 10.244.1.0/24 for node n1 after 5ms: cloud error: quota"
        );
    }
}
