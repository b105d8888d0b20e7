//! cloud-node-controller: initialises nodes that carry the
//! `node.cloudprovider.kubernetes.io/uninitialized` taint from the provider's instance
//! metadata (upstream `controllers/node/node_controller.go`), mirrors beta labels to their GA
//! form, and periodically refreshes node addresses.
//!
//! Writes per initialised node: one `PUT` of the Node (providerID, labels, taint) and one
//! `PATCH` of its status (addresses), plus the `Synced` event. Reads come from the watch cache.
//! The rules are pure functions ([`apply_initialization`], [`desired_addresses`],
//! [`labels_to_reconcile`], [`Fingerprints`]); the controller applies what they decide.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeAddress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller as KubeController};
use kube::runtime::reflector::{ObjectRef, ReflectHandle, Store};
use kube::{Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tracing::{Instrument, debug, info, info_span, warn};

use cpi_proto::CpiError;
use cpi_proto::v1::Capability;

use super::{BuildError, Controller, ControllerContext, Names, Stop};
use crate::cloud::{Cloud, LookupError, NodeMetadata};
use crate::flags::{FlagError, parse_duration, positive};
use crate::k8s::well_known::{
    ANNOTATION_PROVIDED_NODE_IP, CONDITION_INITIALIZATION_FAILED, LABEL_INSTANCE_TYPE,
    LABEL_INSTANCE_TYPE_BETA, LABEL_REGION, LABEL_REGION_BETA, LABEL_ZONE, LABEL_ZONE_BETA,
    TAINT_UNINITIALIZED,
};
use crate::k8s::{self, CachedNode, EventType, Labels, Recorder};

mod fingerprint;
mod metrics;

pub use fingerprint::Fingerprints;
pub use metrics::NodeMetrics;

/// Longest condition message written; longer error texts are cut.
const MAX_CONDITION_MESSAGE: usize = 1024;

/// Beta label → GA label pairs kept in sync (the beta label is the source of truth).
const LABEL_PAIRS: [(&str, &str); 3] = [
    (LABEL_ZONE_BETA, LABEL_ZONE),
    (LABEL_REGION_BETA, LABEL_REGION),
    (LABEL_INSTANCE_TYPE_BETA, LABEL_INSTANCE_TYPE),
];

/// Upstream `UpdateNodeSpecBackoff`: 20 attempts, 50 ms apart (jittered).
const UPDATE_ATTEMPTS: u32 = 20;
const UPDATE_STEP: Duration = Duration::from_millis(50);
/// How often the uninitialised-node gauges are refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(10);

/// Flags of the cloud-node controller (upstream names and defaults).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "cloud-node-flags")]
#[command(next_help_heading = "cloud-node-controller")]
pub struct Flags {
    /// Number of nodes synced concurrently by the cloud-node controller.
    #[arg(long, default_value_t = 1)]
    pub concurrent_node_syncs: u16,
    /// Workers of the periodic node address update; 0 means --concurrent-node-syncs.
    #[arg(long, default_value_t = 0)]
    pub concurrent_node_status_updates: u16,
    /// How often the cloud-node controller refreshes node addresses from the provider.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub node_status_update_frequency: Duration,
}

impl Flags {
    /// Number of workers of the periodic address update.
    pub fn status_update_workers(&self) -> usize {
        if self.concurrent_node_status_updates > 0 {
            usize::from(self.concurrent_node_status_updates)
        } else {
            usize::from(self.concurrent_node_syncs)
        }
    }
}

/// The cloud-node controller as the registry runs it: the shared state plus its change feed.
pub struct CloudNodeController {
    state: Arc<NodeController>,
    changes: ReflectHandle<CachedNode>,
    flags: Flags,
}

impl Controller for CloudNodeController {
    const NAMES: Names = Names {
        canonical: "cloud-node-controller",
        alias: "cloud-node",
        event_component: "cloud-node-controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        if flags.concurrent_node_syncs == 0 {
            return Err(FlagError::new(
                "--concurrent-node-syncs",
                "concurrent-node-syncs must be a positive number",
            ));
        }
        positive(
            "--node-status-update-frequency",
            flags.node_status_update_frequency,
        )
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        super::serves_instances(capabilities)
    }

    fn build(
        ctx: &ControllerContext,
        flags: &Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError> {
        let changes = ctx
            .nodes
            .subscribe()
            .ok_or_else(|| BuildError::Disabled("the node watch cannot be subscribed to".into()))?;
        let state = Arc::new(NodeController::with_metrics(
            ctx.client.clone(),
            ctx.cloud.clone(),
            ctx.nodes.cache(),
            ctx.recorder(Self::NAMES.event_component),
            NodeMetrics::register(registry),
        ));
        Ok(Self {
            state,
            changes,
            flags: flags.clone(),
        })
    }

    async fn run(self, stop: Stop) {
        self.state.run(self.changes, &self.flags, stop).await;
    }
}

/// A failed node sync; the node is requeued with backoff and keeps its taint.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The provider call failed.
    #[error("{call} for node {node:?}: {source}")]
    Cloud {
        /// Which call.
        call: &'static str,
        /// Node name.
        node: String,
        /// Provider error.
        source: CpiError,
    },
    /// Both legacy lookups failed: by provider ID, then by node name.
    #[error(
        "error fetching node {node:?} by provider ID: {by_id}, and error by node name: {by_name}"
    )]
    Lookups {
        /// Node name.
        node: String,
        /// Error of the lookup by provider ID.
        by_id: CpiError,
        /// Error of the lookup by node name.
        by_name: CpiError,
    },
    /// Neither the provider nor the node has a provider ID (InstancesV2 path).
    #[error("cloud provider does not set node provider ID for node {0}")]
    NoProviderId(String),
    /// The provider returned a provider ID we must not write.
    #[error("provider returned an invalid provider ID {id:?} for node {node:?}: {reason}")]
    InvalidProviderId {
        /// Node name.
        node: String,
        /// The ID.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The provided-node-ip annotation does not match the provider's addresses.
    #[error("provided node ip for node {node:?} is not valid: {source}")]
    ProvidedNodeIp {
        /// Node name.
        node: String,
        /// What is wrong with it.
        source: NodeIpError,
    },
    /// The zone could not be determined (legacy path).
    #[error("failed to get zone from cloud provider for node {node:?}: {source}")]
    Zone {
        /// Node name.
        node: String,
        /// Provider error.
        source: CpiError,
    },
    /// Writing the Node failed.
    #[error("updating node {node:?}: {source}")]
    Kube {
        /// Node name.
        node: String,
        /// API error.
        source: kube::Error,
    },
    /// The update kept conflicting with other writers.
    #[error("updating node {0:?}: still conflicting after {UPDATE_ATTEMPTS} attempts")]
    Conflicts(String),
}

impl SyncError {
    /// A CamelCase reason for events and the failure condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Cloud { .. } | Self::Lookups { .. } => "ProviderError",
            Self::NoProviderId(_) => "NoProviderID",
            Self::InvalidProviderId { .. } => "InvalidProviderID",
            Self::ProvidedNodeIp { .. } => "InvalidProvidedNodeIP",
            Self::Zone { .. } => "ZoneUnknown",
            Self::Kube { .. } => "APIError",
            Self::Conflicts(_) => "Conflicts",
        }
    }

    /// A failed instance lookup for `node`.
    fn lookup(node: String, err: LookupError) -> Self {
        match err {
            LookupError::Call { call, source } => Self::Cloud { call, node, source },
            LookupError::Both { by_id, by_name } => Self::Lookups {
                node,
                by_id,
                by_name,
            },
            LookupError::NoProviderId => Self::NoProviderId(node),
            LookupError::EmptyInstanceId { id } => Self::InvalidProviderId {
                node,
                id,
                reason: "the provider returned an empty instance ID",
            },
            LookupError::Zone(source) => Self::Zone { node, source },
        }
    }
}

/// Shared state of the cloud-node controller.
pub struct NodeController {
    client: kube::Client,
    cloud: Cloud,
    metrics: NodeMetrics,
    recorder: Recorder,
    store: Store<CachedNode>,
    /// Failed syncs in a row per node (the backoff exponent).
    failures: Mutex<HashMap<String, u32>>,
    /// What each node looked like when last reconciled or written by us.
    seen: Fingerprints,
}

impl NodeController {
    /// Creates the controller over a node cache shared with other controllers, reporting into
    /// unregistered metrics (the tests' controller).
    pub fn new(
        client: kube::Client,
        cloud: Cloud,
        store: Store<CachedNode>,
        recorder: Recorder,
    ) -> Arc<Self> {
        Arc::new(Self::with_metrics(
            client,
            cloud,
            store,
            recorder,
            NodeMetrics::default(),
        ))
    }

    /// The controller reporting into `metrics`.
    fn with_metrics(
        client: kube::Client,
        cloud: Cloud,
        store: Store<CachedNode>,
        recorder: Recorder,
        metrics: NodeMetrics,
    ) -> Self {
        Self {
            client,
            cloud,
            metrics,
            recorder,
            store,
            failures: Mutex::new(HashMap::new()),
            seen: Fingerprints::default(),
        }
    }

    /// The failure counts; a poisoned map is still a map of counts.
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the controller on the shared change feed until `shutdown` resolves. Changes that
    /// cannot alter the outcome of a sync (status heartbeats, our own writes) are filtered out
    /// before they reach the work queue.
    pub async fn run(
        self: Arc<Self>,
        changes: ReflectHandle<CachedNode>,
        flags: &Flags,
        shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ) {
        let this = self.clone();
        let relevant = changes.filter(move |node| std::future::ready(this.seen.changed(node)));
        let controller = KubeController::for_shared_stream(relevant, self.store.clone())
            .with_config(
                kube::runtime::controller::Config::default()
                    .concurrency(flags.concurrent_node_syncs),
            );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let status_loop = tokio::spawn(self.clone().status_loop(
            flags.node_status_update_frequency,
            flags.status_update_workers(),
            stop_rx.clone(),
        ));
        let gauges = tokio::spawn(self.clone().gauge_loop(stop_rx));
        controller
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, self)
            .for_each(|result| async move {
                if let Err(err) = result {
                    debug!(error = %err, "cloud-node reconcile failed");
                }
            })
            .await;
        let _ = stop_tx.send(true);
        let _ = status_loop.await;
        let _ = gauges.await;
    }

    async fn gauge_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(GAUGE_PERIOD) => {}
                _ = stop.changed() => return,
            }
            self.observe_uninitialized();
            self.forget_failures_of_deleted_nodes();
        }
    }

    /// Drops the backoff counts of nodes no longer in the cache (deleted while failing).
    fn forget_failures_of_deleted_nodes(&self) {
        let exists = |name: &str| {
            self.store
                .get(&ObjectRef::<CachedNode>::new(name))
                .is_some()
        };
        let mut failures = self.failures();
        if !failures.is_empty() {
            failures.retain(|name, _| exists(name));
        }
        drop(failures);
        self.seen.retain(exists);
    }

    /// Upstream `syncNode`: syncs the cached node of this name (absent → nothing to do).
    pub async fn sync_node(&self, name: &str) -> Result<(), SyncError> {
        let Some(node) = self.store.get(&ObjectRef::<CachedNode>::new(name)) else {
            return Ok(());
        };
        self.sync(&node).await
    }

    /// One reconcile as the controller loop runs it: [`sync`](Self::sync), and when a tainted
    /// node fails, a Warning `FailedToInitialize` event and the
    /// [`CONDITION_INITIALIZATION_FAILED`] condition naming the error.
    pub async fn reconcile_node(&self, node: &CachedNode) -> Result<(), SyncError> {
        let result = self.sync(node).await;
        // (A node we do not own never fails: `sync` leaves it alone.)
        if let Err(err) = &result
            && has_uninitialized_taint(node)
        {
            // Operators must see why a node stays unschedulable without reading our logs;
            // repeats are aggregated by the recorder.
            self.recorder.record(
                &node.object_ref(&()),
                EventType::Warning,
                "FailedToInitialize",
                &format!("Node initialisation failed and will be retried: {err}"),
            );
            self.mark_initialization_failed(node, err).await;
        }
        result
    }

    /// Sets the failure condition, unless the cached node already carries this very failure.
    async fn mark_initialization_failed(&self, node: &CachedNode, err: &SyncError) {
        let name = node.name_any();
        let reason = err.reason();
        let message = k8s::truncated(err.to_string(), MAX_CONDITION_MESSAGE);
        let existing = node
            .conditions()
            .iter()
            .find(|c| c.type_ == CONDITION_INITIALIZATION_FAILED && c.status == "True");
        if existing.is_some_and(|c| {
            c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(message.as_str())
        }) {
            return;
        }
        let now = Time(Timestamp::now());
        let since = existing
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        // A strategic merge patch: conditions merge by type, so the kubelet's are kept.
        let patch = serde_json::json!({ "status": { "conditions": [{
            "type": CONDITION_INITIALIZATION_FAILED,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }]}});
        self.patch_status(
            &name,
            &Patch::Strategic(&patch),
            "set the initialisation-failure condition",
        )
        .await;
    }

    /// Removes the failure condition from a node that is now initialised (only when present).
    async fn clear_initialization_failed(&self, node: &CachedNode) {
        if !node
            .conditions()
            .iter()
            .any(|c| c.type_ == CONDITION_INITIALIZATION_FAILED)
        {
            return;
        }
        let name = node.name_any();
        let patch = serde_json::json!({ "status": { "conditions": [{
            "type": CONDITION_INITIALIZATION_FAILED,
            "$patch": "delete",
        }]}});
        self.patch_status(
            &name,
            &Patch::Strategic(&patch),
            "remove the initialisation-failure condition",
        )
        .await;
    }

    /// Patches `nodes/status` of `name`; a failure is logged (the next sync or pass retries).
    async fn patch_status(&self, name: &str, patch: &Patch<&serde_json::Value>, what: &str) {
        let request =
            k8s::nodes().patch_subresource("status", name, &PatchParams::default(), patch);
        if let Err(err) = k8s::send_write(&self.client, request).await {
            warn!(node = %name, error = %err, "failed to {what}");
        }
    }

    /// Initialises a tainted node, or reconciles the labels of an initialised one.
    async fn sync(&self, node: &CachedNode) -> Result<(), SyncError> {
        if !self.cloud.owns_node(node) {
            debug!("node's provider ID belongs to another provider; leaving it alone");
            return Ok(());
        }
        if has_uninitialized_taint(node) {
            self.initialize(node).await
        } else {
            self.reconcile_labels(node).await
        }
    }

    /// Refreshes the uninitialised-node gauges from the cache.
    pub fn observe_uninitialized(&self) {
        let now = Timestamp::now();
        let mut count = 0i64;
        let mut oldest = 0f64;
        for node in self.store.state() {
            if !has_uninitialized_taint(&node) || !self.cloud.owns_node(&node) {
                continue;
            }
            count += 1;
            if let Some(created) = node.meta().creation_timestamp.as_ref() {
                let age = now.duration_since(created.0).as_secs_f64();
                oldest = oldest.max(age);
            }
        }
        self.metrics.observe_uninitialized(count, oldest);
    }

    /// Upstream `UpdateNodeStatus`: one address-refresh pass over every initialised node.
    pub async fn update_node_status(self: &Arc<Self>, workers: usize) {
        let started = Instant::now();
        let nodes: Vec<Arc<CachedNode>> = self
            .store
            .state()
            .into_iter()
            .filter(|n| !has_uninitialized_taint(n) && self.cloud.owns_node(n))
            .collect();
        let count = nodes.len();
        futures::stream::iter(nodes)
            .for_each_concurrent(workers.max(1), |node| {
                let this = self.clone();
                async move { this.refresh_addresses(&node).await }
            })
            .await;
        debug!(nodes = count, elapsed = ?started.elapsed(), "node status update pass done");
    }

    /// Initialises one tainted node: one PUT of the Node, then one status PATCH.
    async fn initialize(&self, node: &CachedNode) -> Result<(), SyncError> {
        let name = node.name_any();
        debug!(node = %name, "initializing node with cloud provider");
        let metadata = self
            .cloud
            .instance_metadata(node)
            .await
            .map_err(|err| SyncError::lookup(name.clone(), err))?;
        let Some(metadata) = metadata else {
            info!(node = %name, "skip sync node: the provider returned nil metadata");
            return Ok(());
        };
        if !metadata.provider_id.is_empty() {
            validate_provider_id(&name, &metadata.provider_id, &self.cloud)?;
        }
        // One copy of the node per attempt: the first from the reconciled object, later ones from
        // the newer version the watch cache delivered after a conflict.
        let mut newer: Option<Arc<CachedNode>> = None;
        let mut updated = None;
        for attempt in 0..UPDATE_ATTEMPTS {
            let base: &CachedNode = newer.as_deref().unwrap_or(node);
            let mut desired = base.to_node();
            apply_initialization(&mut desired, &metadata)?;
            // The main resource ignores status: leave it out of the body.
            let status = desired.status.take();
            let body = serde_json::to_vec(&desired).map_err(|e| SyncError::Kube {
                node: name.clone(),
                source: kube::Error::SerdeError(e),
            })?;
            desired.status = status;
            // A PUT carrying the cached resourceVersion: a concurrent writer makes it fail with
            // 409 instead of being overwritten. Its response is not needed: the main resource
            // ignores status, so `desired` is what the server now holds (but for metadata the
            // server maintains).
            let request = k8s::nodes().replace(&name, &PostParams::default(), body);
            match k8s::send_write(&self.client, request).await {
                Ok(()) => {
                    updated = Some(desired);
                    break;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    debug!(node = %name, attempt, "conflict initializing node; retrying from the watch cache");
                    let fresh = self.newer_from_cache(base).await;
                    newer = Some(fresh);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
                Err(source) => return Err(SyncError::Kube { node: name, source }),
            }
        }
        let Some(updated) = updated.map(CachedNode::from) else {
            return Err(SyncError::Conflicts(name));
        };
        // The watch will deliver this very write: it needs no second reconcile.
        self.seen.record(&updated);
        let age = creation_age(&updated);
        if let Some(age) = age {
            self.metrics.taint_removal_delay.observe(age.as_secs_f64());
        }
        self.update_addresses(&updated, &metadata.addresses).await;
        self.clear_initialization_failed(&updated).await;
        self.recorder.record(
            &updated.object_ref(&()),
            EventType::Normal,
            "Synced",
            "Node synced successfully",
        );
        if let Some(age) = creation_age(&updated) {
            self.metrics
                .initial_node_sync_delay
                .observe(age.as_secs_f64());
        }
        info!(node = %name, provider_id = %metadata.provider_id, "node initialized");
        Ok(())
    }

    /// Waits (briefly) for the watch cache to hold a newer version of `node`.
    async fn newer_from_cache(&self, node: &CachedNode) -> Arc<CachedNode> {
        let key = ObjectRef::<CachedNode>::new(&node.name_any());
        let seen = node.resource_version();
        for _ in 0..10 {
            if let Some(cached) = self.store.get(&key)
                && cached.resource_version() != seen
            {
                return cached;
            }
            tokio::time::sleep(jittered(UPDATE_STEP)).await;
        }
        self.store
            .get(&key)
            .unwrap_or_else(|| Arc::new(node.clone()))
    }

    /// Patches status.addresses when the provider's list differs (upstream
    /// `updateNodeAddress`).
    async fn update_addresses(&self, node: &CachedNode, cloud_addresses: &[NodeAddress]) {
        let name = node.name_any();
        let new = match desired_addresses(node, cloud_addresses) {
            Ok(Some(new)) => new,
            Ok(None) => return,
            Err(err) => {
                warn!(node = %name, error = %err, "not updating node addresses");
                return;
            }
        };
        // A merge patch replaces the whole list (a strategic one would merge addresses by type
        // and keep stale ones).
        let patch = serde_json::json!({ "status": { "addresses": new } });
        self.patch_status(&name, &Patch::Merge(&patch), "patch node addresses")
            .await;
    }

    /// Mirrors beta labels to GA ones on an initialised node (upstream `reconcileNodeLabels`).
    async fn reconcile_labels(&self, node: &CachedNode) -> Result<(), SyncError> {
        let Some(missing) = labels_to_reconcile(node.labels()) else {
            return Ok(());
        };
        let name = node.name_any();
        let patch = serde_json::json!({ "metadata": { "labels": missing } });
        let request = k8s::nodes().patch(&name, &PatchParams::default(), &Patch::Merge(&patch));
        match k8s::send_write(&self.client, request).await {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(SyncError::Kube { node: name, source }),
        }
    }

    /// The periodic address refresh of initialised nodes (`--node-status-update-frequency`).
    async fn status_loop(
        self: Arc<Self>,
        every: Duration,
        workers: usize,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            self.update_node_status(workers).await;
        }
    }

    async fn refresh_addresses(&self, node: &CachedNode) {
        match self.cloud.node_addresses(node).await {
            Ok(addresses) => self.update_addresses(node, &addresses).await,
            Err(err) => warn!(error = %err, "address refresh failed"),
        }
    }
}

async fn reconcile(node: Arc<CachedNode>, ctx: Arc<NodeController>) -> Result<Action, SyncError> {
    let name = node.name_any();
    let span = info_span!("cloud-node.sync", node = %name);
    async move {
        ctx.reconcile_node(&node).await?;
        ctx.failures().remove(&name);
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

/// Upstream `DefaultTypedControllerRateLimiter` per-item part: 5 ms doubling up to 1000 s.
fn error_policy(node: Arc<CachedNode>, err: &SyncError, ctx: Arc<NodeController>) -> Action {
    let name = node.name_any();
    let attempts = {
        let mut failures = ctx.failures();
        let n = failures.entry(name.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(attempts);
    warn!(node = %name, error = %err, retry_in = ?delay, "error syncing node; requeuing");
    Action::requeue(delay)
}

/// Per-item exponential backoff: 5 ms × 2^(n-1), capped at 1000 s.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    Duration::from_millis(5)
        .saturating_mul(1u32 << exp)
        .min(Duration::from_secs(1000))
}

fn jittered(base: Duration) -> Duration {
    base.mul_f64(1.0 + rand::random::<f64>())
}

fn creation_age(node: &CachedNode) -> Option<Duration> {
    let created = node.meta().creation_timestamp.as_ref()?.0;
    let age = Timestamp::now().duration_since(created);
    Duration::try_from(age).ok()
}

/// Whether the node carries the uninitialized taint (any value or effect).
pub fn has_uninitialized_taint(node: &CachedNode) -> bool {
    node.has_taint(TAINT_UNINITIALIZED)
}

fn validate_provider_id(node: &str, id: &str, cloud: &Cloud) -> Result<(), SyncError> {
    let invalid = |reason| SyncError::InvalidProviderId {
        node: node.to_string(),
        id: id.to_string(),
        reason,
    };
    if cpi_proto::provider_id::split(id).is_none() {
        return Err(invalid("not of the form <provider>://<instance-id>"));
    }
    if !cloud.owns_provider_id(id) {
        return Err(invalid("its prefix is not one the provider claims"));
    }
    Ok(())
}

/// Applies the upstream node modifiers (upstream `updateNodeWithInstanceMetadata` and the
/// taint removal of `syncNode`) to `node`: provider ID if unset, the uninitialized taint
/// removed, instance-type/zone/region labels in beta and GA form, and the provider's extra
/// labels outside the reserved namespaces without overwriting existing values.
pub fn apply_initialization(node: &mut Node, md: &NodeMetadata) -> Result<(), SyncError> {
    let name = node.name_any();
    if let Some(provided) = node.annotations().get(ANNOTATION_PROVIDED_NODE_IP) {
        node_addresses_from_node_ip(provided, &md.addresses).map_err(|source| {
            SyncError::ProvidedNodeIp {
                node: name.clone(),
                source,
            }
        })?;
    }
    let spec = node.spec.get_or_insert_with(Default::default);
    if spec.provider_id.as_deref().unwrap_or_default().is_empty() && !md.provider_id.is_empty() {
        spec.provider_id = Some(md.provider_id.clone());
    }
    if let Some(taints) = spec.taints.as_mut() {
        taints.retain(|t| t.key != TAINT_UNINITIALIZED);
    }
    let labels = node.metadata.labels.get_or_insert_with(Default::default);
    for (value, keys) in [
        (
            &md.instance_type,
            [LABEL_INSTANCE_TYPE_BETA, LABEL_INSTANCE_TYPE],
        ),
        (&md.zone, [LABEL_ZONE_BETA, LABEL_ZONE]),
        (&md.region, [LABEL_REGION_BETA, LABEL_REGION]),
    ] {
        if !value.is_empty() {
            for key in keys {
                labels.insert(key.to_string(), value.clone());
            }
        }
    }
    for (key, value) in &md.additional_labels {
        if is_reserved_label(key) {
            warn!(node = %name, label = %key, "discarding additional label in a kubernetes.io/k8s.io namespace");
            continue;
        }
        match labels.get(key) {
            Some(existing) if existing != value => {
                warn!(node = %name, label = %key, "not overwriting existing label with the provider's value");
            }
            Some(_) => {}
            None => {
                labels.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(())
}

/// Upstream regex `(^|\.)(kubernetes|k8s)\.io/`.
fn is_reserved_label(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else {
        return false;
    };
    ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")))
}

/// GA labels to add or correct so they match their beta counterparts (upstream
/// `reconcileNodeLabels`); `None` when
/// nothing needs to change.
pub fn labels_to_reconcile(labels: &Labels) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (primary, secondary) in LABEL_PAIRS {
        let Some(value) = labels.get(primary) else {
            continue;
        };
        if labels.get(secondary) != Some(value) {
            out.insert(secondary.to_string(), value.to_string());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The address list to write (upstream `updateNodeAddress`: the provider's addresses, the
/// kubelet's Hostname kept when the provider has none, the node IP first), `Ok(None)` when
/// nothing changes.
pub fn desired_addresses(
    node: &CachedNode,
    cloud: &[NodeAddress],
) -> Result<Option<Vec<NodeAddress>>, NodeIpError> {
    if has_uninitialized_taint(node) || cloud.is_empty() {
        return Ok(None);
    }
    let current = node.addresses();
    let mut new = cloud.to_vec();
    if !new.iter().any(|a| a.type_ == "Hostname") {
        new.extend(current.iter().filter(|a| a.type_ == "Hostname").cloned());
    }
    if let Some(provided) = node.annotations().get(ANNOTATION_PROVIDED_NODE_IP) {
        new = node_addresses_from_node_ip(provided, &new)?;
    }
    Ok(node_addresses_change_detected(current, &new).then_some(new))
}

/// Upstream `nodeAddressesChangeDetected`.
pub fn node_addresses_change_detected(old: &[NodeAddress], new: &[NodeAddress]) -> bool {
    if old.len() != new.len() {
        return true;
    }
    let by_type: HashMap<&str, &str> = old
        .iter()
        .map(|a| (a.type_.as_str(), a.address.as_str()))
        .collect();
    new.iter()
        .any(|a| by_type.get(a.type_.as_str()) != Some(&a.address.as_str()))
}

/// Why the kubelet's provided node IP cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIpError {
    /// A part is not an IP address.
    #[error("could not parse {0:?} as an IP address")]
    Unparsable(String),
    /// Two addresses of one family.
    #[error("dual-stack node IP {0:?} must have one IP of each family")]
    SameFamily(String),
    /// A dual-stack pair with `0.0.0.0` or `::`.
    #[error("dual-stack node IP {0:?} cannot include an unspecified address")]
    Unspecified(String),
    /// Neither one address nor a pair.
    #[error("must contain one IP or a dual-stack pair, got {0:?}")]
    Count(String),
    /// The provider has no address equal to the node IP.
    #[error(
        "failed to get node address from cloud provider that matches ip: {ip} (provider addresses: {known:?})"
    )]
    NoMatch {
        /// The node IP.
        ip: IpAddr,
        /// The provider's addresses.
        known: Vec<String>,
    },
}

/// Upstream `ParseNodeIPAnnotation`: one IP, or a dual-stack pair of different families.
pub fn parse_node_ip_annotation(value: &str) -> Result<Vec<IpAddr>, NodeIpError> {
    let ips = value
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| NodeIpError::Unparsable(s.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match ips.as_slice() {
        [_] => Ok(ips),
        [a, b] => {
            if a.is_ipv4() == b.is_ipv4() {
                Err(NodeIpError::SameFamily(value.to_string()))
            } else if a.is_unspecified() || b.is_unspecified() {
                Err(NodeIpError::Unspecified(value.to_string()))
            } else {
                Ok(ips)
            }
        }
        _ => Err(NodeIpError::Count(value.to_string())),
    }
}

/// Upstream `GetNodeAddressesFromNodeIP`: the addresses matching the node IP(s) first, then
/// every address whose type none of them has.
pub fn node_addresses_from_node_ip(
    provided: &str,
    cloud: &[NodeAddress],
) -> Result<Vec<NodeAddress>, NodeIpError> {
    let node_ips = parse_node_ip_annotation(provided)?;
    let mut result = Vec::new();
    let mut marked: Vec<&str> = Vec::new();
    for ip in &node_ips {
        let mut found = false;
        for address in cloud {
            if address.address.trim().parse::<IpAddr>().ok() == Some(*ip) {
                result.push(address.clone());
                marked.push(address.type_.as_str());
                found = true;
            }
        }
        if !found {
            return Err(NodeIpError::NoMatch {
                ip: *ip,
                known: cloud.iter().map(|a| a.address.clone()).collect(),
            });
        }
    }
    result.extend(
        cloud
            .iter()
            .filter(|a| !marked.contains(&a.type_.as_str()))
            .cloned(),
    );
    Ok(result)
}

#[cfg(test)]
mod tests;
