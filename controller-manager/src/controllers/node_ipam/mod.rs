//! node-ipam-controller (KCM `pkg/controller/nodeipam`, range allocator, as the sample CCM runs
//! it): gives every node one pod CIDR per `--cluster-cidr` family, cut from that range at the
//! node mask size, by patching `spec.podCIDR`/`spec.podCIDRs`.
//!
//! One task owns the [`Ledger`] (so allocation decisions are serialized); patches run on up to
//! [`WORKERS`] concurrent tasks. Before the first allocation the ledger is rebuilt from every
//! node's podCIDRs, and it keeps marking the CIDRs seen on any node afterwards, so nothing
//! another writer (a predecessor still finishing, another allocator) put on a node is handed
//! out again. The rules are in [`decide`]; the bitmap is [`cidr_set`].

use std::time::{Duration, Instant};

use cpi_proto::v1::Capability;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{BuildError, Controller, ControllerContext, Names, Stop, Succession};
use crate::flags::FlagError;
use crate::k8s::{self, CachedNode, EventType, Recorder};

mod cidr_set;
mod config;
mod decide;
mod metrics;

use cidr_set::CidrSetError;
use config::MAX_SETTLE;
pub use config::{Flags, IpamSettings, settings};
use decide::{Ledger, Outcome, Step, must_settle, pod_cidrs};
pub use metrics::IpamMetrics;

/// Patches sent at once (upstream `cidrUpdateWorkers`).
pub const WORKERS: usize = 30;

/// Shortest time between two passes over the nodes (each looks at all of them).
const PASS_INTERVAL: Duration = Duration::from_millis(10);

/// Event reason when a cluster CIDR has no free block for a node (upstream).
pub const REASON_CIDR_NOT_AVAILABLE: &str = "CIDRNotAvailable";
/// Event reason when a node's podCIDRs could not be written (upstream).
pub const REASON_CIDR_ASSIGNMENT_FAILED: &str = "CIDRAssignmentFailed";

/// The node-ipam controller (range allocator).
pub struct NodeIpamController {
    client: kube::Client,
    store: Store<CachedNode>,
    ready: watch::Receiver<bool>,
    changes: watch::Receiver<u64>,
    recorder: Recorder,
    metrics: IpamMetrics,
    ledger: Ledger,
    settle: Duration,
    succession: Succession,
}

impl Controller for NodeIpamController {
    const NAMES: Names = Names {
        canonical: "node-ipam-controller",
        alias: "nodeipam",
        event_component: "node-ipam-controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        config::validate(flags)
    }

    fn supported_by(_: &[Capability]) -> bool {
        // The range allocator needs nothing from the provider.
        true
    }

    fn build(
        ctx: &ControllerContext,
        flags: &Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError> {
        if !ctx.cluster.allocate_node_cidrs {
            return Err(BuildError::Disabled(
                "--allocate-node-cidrs is false".into(),
            ));
        }
        let settings = settings(flags, &ctx.cluster.cidrs).map_err(BuildError::Invalid)?;
        let metrics = IpamMetrics::register(registry);
        Self::new(
            ctx.client.clone(),
            ctx.nodes.cache(),
            ctx.nodes.ready(),
            ctx.nodes.changes(),
            ctx.recorder(Self::NAMES.event_component),
            &settings,
            metrics,
        )
        .map(|controller| controller.with_succession(ctx.succession.clone()))
        // `settings` checked every set already.
        .map_err(|err| BuildError::Invalid(FlagError::new("--cluster-cidr", err.to_string())))
    }

    async fn run(self, stop: Stop) {
        self.run_until(stop).await;
    }
}

/// A finished patch: the node and how it ended.
type Finished = (String, Outcome, Result<(), IpamError>);

/// Why a node is left without pod CIDRs for now (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A cluster CIDR has no free block.
    #[error("{source}")]
    NotAvailable {
        /// Node name.
        node: String,
        /// Which range is full.
        source: CidrSetError,
    },
    /// The patch of the node's podCIDRs failed.
    #[error("failed to set podCIDRs {cidrs}: {source}")]
    AssignmentFailed {
        /// Node name.
        node: String,
        /// The CIDRs, comma-separated.
        cidrs: String,
        /// API error.
        source: kube::Error,
    },
}

impl IpamError {
    /// The Event reason of this failure (upstream's node status reasons).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAvailable { .. } => REASON_CIDR_NOT_AVAILABLE,
            Self::AssignmentFailed { .. } => REASON_CIDR_ASSIGNMENT_FAILED,
        }
    }

    /// The node concerned.
    pub fn node(&self) -> &str {
        match self {
            Self::NotAvailable { node, .. } | Self::AssignmentFailed { node, .. } => node,
        }
    }
}

impl NodeIpamController {
    /// An allocator over the node cache `store` (synced once `ready` is true, ticking
    /// `changes` on every change) with `settings`' ranges, counting into `metrics`.
    pub fn new(
        client: kube::Client,
        store: Store<CachedNode>,
        ready: watch::Receiver<bool>,
        changes: watch::Receiver<u64>,
        recorder: Recorder,
        settings: &IpamSettings,
        metrics: IpamMetrics,
    ) -> Result<Self, CidrSetError> {
        Ok(Self {
            ledger: Ledger::new(settings, &metrics)?,
            client,
            store,
            ready,
            changes,
            recorder,
            metrics,
            settle: settings.settle,
            succession: Succession::unknown(),
        })
    }

    /// Learns from `succession` (read when the controller starts) whether a predecessor may
    /// still be writing podCIDRs; without it one is assumed and the start settles.
    pub fn with_succession(mut self, succession: Succession) -> Self {
        self.succession = succession;
        self
    }

    /// Runs until `stop` resolves; patches under way then finish (a successor must see them).
    pub async fn run_until(mut self, stop: impl Future<Output = ()> + Send) {
        let mut stop = std::pin::pin!(stop);
        let mut ready = self.ready.clone();
        tokio::select! {
            ready = ready.wait_for(|ready| *ready) => {
                if ready.is_err() {
                    return;
                }
            }
            () = &mut stop => return,
        }
        let predecessor = self.succession.predecessor();
        if must_settle(predecessor.as_ref()) {
            if !self.settle(&mut stop).await {
                return;
            }
        } else {
            debug!("no predecessor can still be writing podCIDRs; allocating without settling");
        }
        info!(
            pools = ?self.ledger.sets().iter().map(|s| (s.cluster().to_string(), s.node_mask())).collect::<Vec<_>>(),
            "node CIDR allocation starts"
        );
        let mut workers: JoinSet<Finished> = JoinSet::new();
        loop {
            while let Some(joined) = workers.try_join_next() {
                self.finish(joined);
            }
            let passed = tokio::time::Instant::now();
            let nodes = self.store.state();
            self.ledger.observe(&nodes);
            let free = WORKERS.saturating_sub(workers.len());
            for step in self.ledger.next_steps(&nodes, Instant::now(), free) {
                self.start(step, &mut workers);
            }
            drop(nodes);
            let retry = self.ledger.next_retry(Instant::now());
            tokio::select! {
                () = &mut stop => break,
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(joined) = workers.join_next() => self.finish(joined),
                () = sleep_until(retry) => {}
            }
            // A pass looks at every node: a burst of changes and finished patches is taken in
            // by one pass rather than one each.
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep_until(passed + PASS_INTERVAL) => {}
            }
        }
        // Let patches already sent land and be accounted for.
        while let Some(joined) = workers.join_next().await {
            self.finish(joined);
        }
    }

    /// Rebuilds the ledger from every node, then waits until podCIDRs written by others have
    /// stopped changing for `settle` (bounded by [`MAX_SETTLE`]). False if stopped meanwhile.
    async fn settle(&mut self, stop: &mut (impl Future<Output = ()> + Unpin)) -> bool {
        let started = tokio::time::Instant::now();
        let mut quiet_since = started;
        self.ledger.observe(&self.store.state());
        loop {
            let quiet_until = quiet_since + self.settle;
            let give_up = started + MAX_SETTLE;
            if tokio::time::Instant::now() >= quiet_until.min(give_up) {
                if quiet_until > give_up {
                    warn!(
                        "node podCIDRs kept changing for {MAX_SETTLE:?} before the first \
                         allocation: is another allocator writing them?"
                    );
                }
                return true;
            }
            tokio::select! {
                () = &mut *stop => return false,
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    if self.ledger.observe(&self.store.state()).foreign_changes > 0 {
                        quiet_since = tokio::time::Instant::now();
                    }
                }
                () = tokio::time::sleep_until(quiet_until.min(give_up)) => {}
            }
        }
    }

    /// Starts one step: a patch on a worker, or the full-range Event.
    fn start(&self, step: Step, workers: &mut JoinSet<Finished>) {
        match step {
            Step::Full { node, error } => self.report(&IpamError::NotAvailable {
                node,
                source: error,
            }),
            Step::Patch { node, uid, cidrs } => {
                debug!(%node, ?cidrs, "assigning pod CIDRs");
                let client = self.client.clone();
                workers.spawn(async move {
                    let (outcome, result) = patch_pod_cidrs(&client, &node, &uid, &cidrs).await;
                    let result = result.map_err(|source| IpamError::AssignmentFailed {
                        node: node.clone(),
                        cidrs: cidrs
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        source,
                    });
                    (node, outcome, result)
                });
            }
        }
    }

    /// Takes a worker's result into the ledger; failures get a Warning on the node.
    fn finish(&mut self, joined: Result<Finished, tokio::task::JoinError>) {
        let (node, outcome, result) = match joined {
            Ok(finished) => finished,
            Err(err) => {
                // A worker only ends this way when aborted with the controller.
                debug!(error = %err, "pod CIDR patch did not finish");
                return;
            }
        };
        if let Err(err) = &result
            && matches!(outcome, Outcome::NotApplied | Outcome::Unknown)
        {
            self.report(err);
        }
        if let Outcome::Taken(theirs) = &outcome {
            info!(%node, ?theirs, "node already had pod CIDRs; respecting them");
        }
        self.ledger.finished(&node, outcome, Instant::now());
    }

    /// Logs and counts a node left without CIDRs, with a Warning on the node.
    fn report(&self, err: &IpamError) {
        let node = err.node();
        warn!(%node, reason = err.reason(), error = %err, "node left without pod CIDRs; retrying with backoff");
        self.metrics.count_failure(err.reason());
        if let Some(reference) = self.reference(node) {
            self.recorder.record(
                &reference,
                EventType::Warning,
                err.reason(),
                &format!("Node {node} status is now: {}: {err}", err.reason()),
            );
        }
    }

    /// The Event reference of a cached node.
    fn reference(&self, node: &str) -> Option<ObjectReference> {
        self.store
            .get(&ObjectRef::new(node))
            .map(|cached| cached.object_ref(&()))
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Writes `cidrs` as the node's podCIDR/podCIDRs (the UID in the patch makes the API server
/// refuse a node re-created under the same name), and says how it ended.
async fn patch_pod_cidrs(
    client: &kube::Client,
    node: &str,
    uid: &str,
    cidrs: &[IpNet],
) -> (Outcome, Result<(), kube::Error>) {
    let texts: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    let patch = serde_json::json!({
        "metadata": { "uid": uid },
        "spec": { "podCIDR": texts.first(), "podCIDRs": texts },
    });
    let request = k8s::nodes().patch(node, &PatchParams::default(), &Patch::Merge(&patch));
    let err = match k8s::send_write(client, request).await {
        Ok(()) => return (Outcome::Patched, Ok(())),
        Err(err) => err,
    };
    let outcome = match &err {
        kube::Error::Api(status) if status.code == 404 => Outcome::Gone,
        // podCIDRs are immutable once set: read back what the node has.
        kube::Error::Api(status) if status.code == 422 => read_back(client, node, uid).await,
        kube::Error::Api(status) if status.code >= 500 => Outcome::Unknown,
        kube::Error::Api(_) => Outcome::NotApplied,
        _ => Outcome::Unknown,
    };
    (outcome, Err(err))
}

/// After a refused patch: the podCIDRs the node has, if any.
async fn read_back(client: &kube::Client, node: &str, uid: &str) -> Outcome {
    let api: Api<Node> = Api::all(client.clone());
    match api.get_opt(node).await {
        Ok(Some(current)) if current.metadata.uid.as_deref() == Some(uid) => {
            let cidrs = pod_cidrs(&CachedNode::from(current));
            if cidrs.is_empty() {
                Outcome::NotApplied
            } else {
                Outcome::Taken(cidrs)
            }
        }
        Ok(_) => Outcome::Gone,
        Err(_) => Outcome::Unknown,
    }
}
