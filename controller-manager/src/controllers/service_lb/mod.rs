//! service-lb-controller (upstream `controllers/service`): cloud load balancers for Services of
//! type LoadBalancer, their status, their cleanup finalizer, and their backend hosts as nodes
//! come and go.
//!
//! Structure: the rules are pure functions in [`decide`]; [`ServiceLb`] asks the caches and the
//! provider what they need and performs what they decide. Services come from the controller's
//! own watch ([`ServiceInformer`], a trimmed cache), nodes from the watch shared with the node
//! controllers. `--concurrent-service-syncs` workers take keys from a rate-limited queue
//! ([`queue`]); one node worker turns bursts of node changes into one node sync, which gives
//! every load balancer whose backend set changed exactly one UpdateLoadBalancer, fanned out
//! over as many tasks as there are service workers (upstream's `ParallelizeUntil(workers)`).
//!
//! Guarantees beyond upstream's (all in the rules): nothing is written to a load balancer before
//! both caches are synced; the backend set never depends on readiness (and the nodes handed to
//! the shim carry no conditions); the finalizer is on the Service before the first cloud write;
//! only the ingress points the shim returned are written; a RETRY_AFTER (or a THROTTLED with a
//! delay) from any call is honoured without backoff.
//!
//! API writes per Service: one strategic-merge PATCH of `services/status` adding the finalizer,
//! one with the status (both skipped when already so), as upstream. Events are written by the
//! shared broadcaster, off the reconcile path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cpi_proto::CpiError;
use cpi_proto::v1::Capability;
use futures::StreamExt;
use k8s_openapi::api::core::v1::LoadBalancerStatus;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{BuildError, ClusterSettings, Controller, ControllerContext, Names, Stop};
use crate::cloud::{Cloud, backend_nodes, load_balancer_status, service_view};
use crate::flags::{FlagError, parse_duration};
use crate::k8s::{
    self, CachedNode, CachedService, EventType, Recorder, ServiceChange, ServiceInformer,
};

mod cache;
pub mod decide;
mod metrics;
mod queue;

pub use cache::{BackendCache, Backends, ServiceCache};
pub use decide::{Op, Requeue};
pub use metrics::ServiceLbMetrics;
pub use queue::WorkQueue;

use decide::NodeTrigger;

/// How long the node worker lets a burst of node changes settle before one node sync.
const NODE_SYNC_BATCH: Duration = Duration::from_millis(100);
/// How long a stopping controller waits for in-flight syncs.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Flags of the service-lb controller (upstream names and defaults).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "service-flags")]
#[command(next_help_heading = "service-lb-controller")]
pub struct Flags {
    /// Number of services synced concurrently by the service-lb controller; also the
    /// parallelism of its node syncs.
    #[arg(long, default_value_t = 1)]
    pub concurrent_service_syncs: u16,
    /// DEPRECATED: has no effect (upstream keeps it as a no-op; node changes trigger node
    /// syncs).
    #[arg(long, default_value = "0s", value_parser = parse_duration, hide = true)]
    pub node_sync_period: Duration,
    /// How often every Service with a load balancer is ensured again, so that an owned load
    /// balancer deleted or changed outside Kubernetes is repaired (not upstream, which only
    /// syncs on changes; 0 disables).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub load_balancer_resync_period: Duration,
}

/// A failed service sync; the key is retried with backoff (or after the provider's delay).
#[derive(Debug, thiserror::Error)]
pub enum ServiceSyncError {
    /// The work-queue key is not `namespace/name`.
    #[error("unexpected key format: {0:?}")]
    KeyFormat(String),
    /// GetLoadBalancer failed on the delete path.
    #[error("failed to check if load balancer exists before cleanup: {0}")]
    CheckExists(CpiError),
    /// EnsureLoadBalancerDeleted failed on the delete path.
    #[error("failed to delete load balancer: {0}")]
    Delete(CpiError),
    /// EnsureLoadBalancerDeleted failed for a Service gone (or re-created) from the cache.
    #[error("{0}")]
    DeleteCached(CpiError),
    /// Removing the cleanup finalizer failed.
    #[error("failed to remove load balancer cleanup finalizer: {0}")]
    RemoveFinalizer(kube::Error),
    /// Adding the cleanup finalizer failed.
    #[error("failed to add load balancer cleanup finalizer: {0}")]
    AddFinalizer(kube::Error),
    /// The Service cannot be handed to the provider.
    #[error("failed to ensure load balancer: invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The node cache has not synced: no backend set can be trusted yet.
    #[error("failed to ensure load balancer: the node cache has not synced yet")]
    NodesNotSynced,
    /// EnsureLoadBalancer failed.
    #[error("failed to ensure load balancer: {0}")]
    Ensure(CpiError),
    /// EnsureLoadBalancer answered without a status.
    #[error("service status returned by EnsureLoadBalancer is nil")]
    NilStatus,
    /// Patching the status failed.
    #[error("failed to update load balancer status: {0}")]
    Status(kube::Error),
}

impl ServiceSyncError {
    /// The Event reason of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::DeleteCached(_) => "DeleteLoadBalancerFailed",
            _ => "SyncLoadBalancerFailed",
        }
    }

    /// The provider's error, if the failure is one.
    pub fn cpi_error(&self) -> Option<&CpiError> {
        match self {
            Self::CheckExists(e) | Self::Delete(e) | Self::DeleteCached(e) | Self::Ensure(e) => {
                Some(e)
            }
            _ => None,
        }
    }

    /// What the queue does with the key: the provider's retry delay when it gave one
    /// (RETRY_AFTER, or THROTTLED with a delay), else backoff.
    pub fn requeue(&self) -> Requeue {
        match self.cpi_error().and_then(CpiError::retry_after) {
            Some(delay) => Requeue::After(delay),
            None => Requeue::RateLimited,
        }
    }
}

/// Why a host update of one load balancer failed (the service is retried by a full sync).
#[derive(Debug, thiserror::Error)]
pub enum HostUpdateError {
    /// UpdateLoadBalancer failed and the load balancer exists (or its existence is unknown).
    #[error("{0}")]
    Update(CpiError),
    /// The node cache has not synced.
    #[error("the node cache has not synced yet")]
    NodesNotSynced,
}

impl HostUpdateError {
    /// The Event reason of this failure.
    pub fn reason(&self) -> &'static str {
        "UpdateLoadBalancerFailed"
    }
}

/// The service-lb controller as the registry runs it.
pub struct ServiceLbController {
    state: Arc<ServiceLb>,
    informer: ServiceInformer,
    resync: Duration,
}

impl Controller for ServiceLbController {
    const NAMES: Names = Names {
        canonical: "service-lb-controller",
        alias: "service",
        event_component: "service-controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        if flags.concurrent_service_syncs == 0 {
            return Err(FlagError::new(
                "--concurrent-service-syncs",
                "must be a positive number",
            ));
        }
        Ok(())
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        capabilities.contains(&Capability::LoadBalancer)
    }

    const FENCED: bool = true;

    fn build(
        ctx: &ControllerContext,
        flags: &Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError> {
        cluster_name_owns_load_balancers(&ctx.cluster)?;
        let informer =
            ServiceInformer::new(ctx.client.clone()).with_metrics(ctx.watch_metrics.clone());
        let state = ServiceLb::new(
            ctx.client.clone(),
            ctx.cloud.clone(),
            ctx.cluster.name.clone(),
            informer.store.clone(),
            ctx.nodes.cache(),
            ctx.nodes.ready(),
            ctx.nodes.changes(),
            ctx.recorder(Self::NAMES.event_component),
        )
        .with_workers(usize::from(flags.concurrent_service_syncs))
        .with_metrics(ServiceLbMetrics::register(registry));
        Ok(Self {
            state: Arc::new(state),
            informer,
            resync: flags.load_balancer_resync_period,
        })
    }

    async fn run(self, stop: Stop) {
        self.state.run(self.informer, self.resync, stop).await;
    }
}

/// The service-lb controller's state and its sync operations (upstream `Controller`).
pub struct ServiceLb {
    client: kube::Client,
    cloud: Cloud,
    cluster_name: String,
    recorder: Recorder,
    metrics: ServiceLbMetrics,
    services: Store<CachedService>,
    nodes: Store<CachedNode>,
    nodes_ready: watch::Receiver<bool>,
    /// The node cache's change counter: it wakes the node worker and keys the backend set.
    node_changes: watch::Receiver<u64>,
    cache: ServiceCache,
    backends: BackendCache,
    queue: WorkQueue,
    ip_mode: AtomicBool,
    workers: usize,
    /// The trigger-relevant view of every node at the last node-change check.
    node_triggers: Mutex<std::collections::HashMap<String, NodeTrigger>>,
    /// Keys queued by the periodic resync and not synced since (their syncs stay quiet).
    resyncing: Mutex<std::collections::HashSet<String>>,
}

impl ServiceLb {
    /// A controller over the given caches, with one worker, no `ipMode` writes and unregistered
    /// metrics (what the tests build).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        cloud: Cloud,
        cluster_name: String,
        services: Store<CachedService>,
        nodes: Store<CachedNode>,
        nodes_ready: watch::Receiver<bool>,
        node_changes: watch::Receiver<u64>,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            cloud,
            cluster_name,
            recorder,
            metrics: ServiceLbMetrics::default(),
            services,
            nodes,
            nodes_ready,
            node_changes,
            cache: ServiceCache::default(),
            backends: BackendCache::default(),
            queue: WorkQueue::default(),
            ip_mode: AtomicBool::new(false),
            workers: 1,
            node_triggers: Mutex::default(),
            resyncing: Mutex::default(),
        }
    }

    /// Sets the number of service workers (and node-sync parallelism).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Reports into `metrics`.
    pub fn with_metrics(mut self, metrics: ServiceLbMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets whether `ipMode` is written (the API server stores it).
    pub fn set_ip_mode(&self, supported: bool) {
        self.ip_mode.store(supported, Ordering::Relaxed);
    }

    /// The service work queue.
    pub fn queue(&self) -> &WorkQueue {
        &self.queue
    }

    /// The Services processed so far (upstream `serviceCache`).
    pub fn cache(&self) -> &ServiceCache {
        &self.cache
    }

    /// The metrics.
    pub fn metrics(&self) -> &ServiceLbMetrics {
        &self.metrics
    }

    /// Runs the controller until `stop`: the Service watch, the service workers once both
    /// caches have synced, the node worker, and every `resync` (unless zero) a full pass.
    pub async fn run(self: Arc<Self>, informer: ServiceInformer, resync: Duration, stop: Stop) {
        let mut stop = stop;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut services_ready = informer.ready();
        let handler = {
            let this = self.clone();
            move |change| this.on_service_change(change)
        };
        let watch = tokio::spawn(informer.run(handler, stopped(stop_rx.clone())));
        // No load-balancer write before both caches hold the cluster's state.
        let mut nodes_ready = self.nodes_ready.clone();
        let synced = async {
            let services = services_ready.wait_for(|r| *r).await.is_ok();
            let nodes = nodes_ready.wait_for(|r| *r).await.is_ok();
            services && nodes
        };
        let synced = tokio::select! {
            synced = synced => synced,
            () = &mut stop => false,
        };
        if synced {
            info!("service and node caches synced; starting service-lb workers");
            self.detect_ip_mode().await;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..self.workers {
                tasks.spawn(self.clone().worker());
            }
            let node_worker = tokio::spawn(
                self.clone()
                    .node_worker(self.node_changes.clone(), stopped(stop_rx.clone())),
            );
            let resync_loop = (!resync.is_zero())
                .then(|| tokio::spawn(self.clone().resync_loop(resync, stopped(stop_rx.clone()))));
            stop.await;
            self.queue.shut_down();
            let _ = stop_tx.send(true);
            let drained = tokio::time::timeout(STOP_GRACE, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!("service-lb workers did not stop in time; aborting them");
                tasks.abort_all();
            }
            node_worker.abort();
            if let Some(resync_loop) = resync_loop {
                resync_loop.abort();
            }
        }
        let _ = stop_tx.send(true);
        let _ = watch.await;
    }

    /// Asks the API server's version whether it stores `ingress[].ipMode` (1.30+); on failure
    /// `ipMode` is not written (the field is optional).
    async fn detect_ip_mode(&self) {
        match self.client.apiserver_version().await {
            Ok(info) => {
                let supported = decide::stores_ip_mode(&info.major, &info.minor);
                info!(
                    version = %info.git_version,
                    ip_mode = supported,
                    "writing status.loadBalancer.ingress[].ipMode only if the API server stores it"
                );
                self.set_ip_mode(supported);
            }
            Err(err) => {
                warn!(error = %err, "could not read the API server version; not writing ingress ipMode")
            }
        }
    }

    /// Upstream's Service informer handlers: enqueue added Services that want a load balancer
    /// or need cleanup, updated ones whose change matters (`needsUpdate`) or that need cleanup.
    /// Upstream has no delete handler; a deleted Service this controller has processed is
    /// enqueued here so its load balancer goes even when its finalizer was removed by hand.
    pub fn on_service_change(&self, change: ServiceChange) {
        match change {
            ServiceChange::Applied { old: None, new } => {
                if decide::enqueue_added(&new) {
                    self.queue.add(new.key());
                }
            }
            ServiceChange::Applied {
                old: Some(old),
                new,
            } => {
                let change = decide::needs_update(&old, &new);
                if let Some(decide::SpecChange {
                    reason: Some(reason),
                    message,
                }) = &change
                {
                    self.event(&new, EventType::Normal, reason, message);
                }
                if change.is_some() || decide::needs_cleanup(&new) {
                    self.queue.add(new.key());
                }
            }
            ServiceChange::Deleted(gone) => {
                let key = gone.key();
                if self.cache.get(&key).is_some() {
                    self.queue.add(key);
                }
            }
        }
    }

    async fn worker(self: Arc<Self>) {
        while self.process_next_service_item().await {}
    }

    /// Takes one key from the queue, syncs it and requeues it as the result says (upstream
    /// `processNextServiceItem`); false once the queue is shut down.
    pub async fn process_next_service_item(&self) -> bool {
        let Some(key) = self.queue.get().await else {
            return false;
        };
        let span = info_span!("service-lb.sync", service = %key);
        let result = self.sync_service(&key).instrument(span).await;
        self.handle_result(&key, result.as_ref().err());
        self.queue.done(&key);
        self.metrics
            .observe_queue(self.queue.len(), self.queue.delayed());
        true
    }

    /// Requeues `key` as the sync's outcome says.
    fn handle_result(&self, key: &str, err: Option<&ServiceSyncError>) {
        let requeue = err.map_or(Requeue::Forget, ServiceSyncError::requeue);
        match (requeue, err) {
            (Requeue::After(delay), Some(err)) => {
                info!(service = %key, error = %err, retry_in = ?delay, "provider asked to retry the service later");
            }
            (Requeue::RateLimited, Some(err)) => {
                warn!(service = %key, error = %err, "error syncing service; retrying with backoff");
            }
            _ => {}
        }
        self.queue.requeue(key, requeue);
    }

    /// Upstream `syncService`: the Service of `key` from the cache, created/updated or, when
    /// gone, deleted.
    pub async fn sync_service(&self, key: &str) -> Result<(), ServiceSyncError> {
        let started = Instant::now();
        let (namespace, name) =
            decide::split_key(key).ok_or_else(|| ServiceSyncError::KeyFormat(key.to_string()))?;
        let found = self.services.get(&ObjectRef::new(name).within(namespace));
        let result = match found {
            None => self.process_service_deletion(key).await,
            Some(svc) => self.process_service_create_or_update(svc).await,
        };
        debug!(service = %key, took = ?started.elapsed(), "finished syncing service");
        result
    }

    /// Upstream `processServiceDeletion`: deletes the load balancer of a Service that is gone,
    /// if this controller had processed it.
    pub async fn process_service_deletion(&self, key: &str) -> Result<(), ServiceSyncError> {
        let Some(cached) = self.cache.get(key) else {
            debug!(service = %key, "service not in cache; nothing to delete");
            return Ok(());
        };
        if let Err(err) = self.process_load_balancer_delete(&cached).await {
            self.event(
                &cached,
                EventType::Warning,
                err.reason(),
                &format!("Error deleting load balancer: {err}"),
            );
            return Err(err);
        }
        self.cache.delete(key);
        Ok(())
    }

    /// Upstream `processLoadBalancerDelete`: deletes the load balancer of a cached Service
    /// that wanted one.
    async fn process_load_balancer_delete(
        &self,
        svc: &CachedService,
    ) -> Result<(), ServiceSyncError> {
        if !decide::wants_load_balancer(svc) {
            return Ok(());
        }
        self.event(
            svc,
            EventType::Normal,
            "DeletingLoadBalancer",
            "Deleting load balancer",
        );
        self.cloud
            .ensure_load_balancer_deleted(&self.cluster_name, service_view(&self.cloud, svc))
            .await
            .map_err(ServiceSyncError::DeleteCached)?;
        self.event(
            svc,
            EventType::Normal,
            "DeletedLoadBalancer",
            "Deleted load balancer",
        );
        Ok(())
    }

    /// Upstream `processServiceCreateOrUpdate`: deletes the load balancer of a previous
    /// Service of the same name first (new UID), then syncs this one.
    pub async fn process_service_create_or_update(
        &self,
        svc: Arc<CachedService>,
    ) -> Result<(), ServiceSyncError> {
        let key = svc.key();
        if let Some(cached) = self.cache.get(&key)
            && cached.uid() != svc.uid()
        {
            info!(service = %key, "service was deleted and re-created; deleting the old load balancer first");
            self.process_load_balancer_delete(&cached).await?;
        }
        self.cache.set(&key, svc.clone());
        let (op, result) = self.sync_load_balancer_if_needed(&svc, &key).await;
        if let Err(err) = result {
            self.event(
                &svc,
                EventType::Warning,
                err.reason(),
                &format!("Error syncing load balancer: {err}"),
            );
            return Err(err);
        }
        if op == Op::Delete {
            self.cache.delete(&key);
        }
        Ok(())
    }

    /// Upstream `syncLoadBalancerIfNeeded`: ensures or deletes the load balancer, keeps the
    /// finalizer and patches the status when it changed.
    pub async fn sync_load_balancer_if_needed(
        &self,
        svc: &CachedService,
        key: &str,
    ) -> (Op, Result<(), ServiceSyncError>) {
        let op = decide::op_for(svc);
        let result = match op {
            Op::Delete => self.delete_load_balancer(svc).await,
            Op::Ensure => self.ensure_path(svc, key).await,
        };
        let result = match result {
            Ok(Some(status)) => self
                .patch_status(svc, &status)
                .await
                .or_else(|err| match &err {
                    // The Service is gone (say, its finalizer was just removed): nothing to do.
                    kube::Error::Api(status) if status.code == 404 => Ok(()),
                    _ => Err(ServiceSyncError::Status(err)),
                }),
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
        (op, result)
    }

    /// The delete path: the load balancer (if it exists), then the finalizer. The status to
    /// write is empty.
    async fn delete_load_balancer(
        &self,
        svc: &CachedService,
    ) -> Result<Option<LoadBalancerStatus>, ServiceSyncError> {
        let view = service_view(&self.cloud, svc);
        let exists = self
            .cloud
            .get_load_balancer(&self.cluster_name, &view)
            .await
            .map_err(ServiceSyncError::CheckExists)?;
        if exists.is_some() {
            self.event(
                svc,
                EventType::Normal,
                "DeletingLoadBalancer",
                "Deleting load balancer",
            );
            match self
                .cloud
                .ensure_load_balancer_deleted(&self.cluster_name, view)
                .await
            {
                Ok(()) | Err(CpiError::ImplementedElsewhere(_)) => {}
                Err(err) => return Err(ServiceSyncError::Delete(err)),
            }
        }
        self.remove_finalizer(svc)
            .await
            .map_err(ServiceSyncError::RemoveFinalizer)?;
        self.event(
            svc,
            EventType::Normal,
            "DeletedLoadBalancer",
            "Deleted load balancer",
        );
        Ok(Some(LoadBalancerStatus::default()))
    }

    /// The ensure path: the finalizer first, then EnsureLoadBalancer; the status to write, or
    /// `None` when another controller implements this load balancer.
    async fn ensure_path(
        &self,
        svc: &CachedService,
        key: &str,
    ) -> Result<Option<LoadBalancerStatus>, ServiceSyncError> {
        let resync = self
            .resyncing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
        if !resync {
            self.event(
                svc,
                EventType::Normal,
                "EnsuringLoadBalancer",
                "Ensuring load balancer",
            );
        }
        // Before any cloud write, so a load balancer never exists without it.
        self.add_finalizer(svc)
            .await
            .map_err(ServiceSyncError::AddFinalizer)?;
        let status = match self.ensure_load_balancer(svc, key).await {
            Err(ServiceSyncError::Ensure(CpiError::ImplementedElsewhere(_))) => {
                debug!(service = %key, "load balancer implemented elsewhere; status left alone");
                return Ok(None);
            }
            Err(err) => return Err(err),
            Ok(None) => return Err(ServiceSyncError::NilStatus),
            Ok(Some(status)) => status,
        };
        let ip_mode = self.ip_mode.load(Ordering::Relaxed);
        let status = load_balancer_status(&status, ip_mode);
        let changed = !decide::status_unchanged(svc, &status, ip_mode);
        if decide::records_ensured_event(resync, changed) {
            self.event(
                svc,
                EventType::Normal,
                "EnsuredLoadBalancer",
                "Ensured load balancer",
            );
        }
        Ok(Some(status))
    }

    /// Upstream `ensureLoadBalancer`: EnsureLoadBalancer with the stable backend set, recorded
    /// as the service's last synced set before the call.
    async fn ensure_load_balancer(
        &self,
        svc: &CachedService,
        key: &str,
    ) -> Result<Option<cpi_proto::v1::LoadBalancerStatus>, ServiceSyncError> {
        decide::validate_for_ensure(svc).map_err(|invalid| ServiceSyncError::Invalid {
            field: invalid.field,
            message: invalid.message,
        })?;
        let mut backends = self
            .current_backends()
            .ok_or(ServiceSyncError::NodesNotSynced)?;
        let previous = self.cache.last_synced(key);
        if !decide::may_replace_backends(previous.as_ref().map(|p| p.len()), backends.len()) {
            if let Some(previous) = previous {
                self.keeping_backends_event(svc, previous.len());
                backends = previous;
            }
        } else if backends.is_empty() {
            self.event(
                svc,
                EventType::Warning,
                "UnAvailableLoadBalancer",
                "There are no available nodes for LoadBalancer",
            );
        }
        self.cache.store_last_synced(key, backends.clone());
        self.cloud
            .ensure_load_balancer(
                &self.cluster_name,
                service_view(&self.cloud, svc),
                &backends.nodes,
            )
            .await
            .map_err(ServiceSyncError::Ensure)
    }

    /// The current stable backend set; `None` while the node cache has not synced.
    pub fn current_backends(&self) -> Option<Arc<Backends>> {
        if !*self.nodes_ready.borrow() {
            return None;
        }
        // The generation first: a change after it only costs a rebuild on the next call.
        let generation = *self.node_changes.borrow();
        Some(self.backends.current(
            generation,
            || self.nodes.state(),
            |stable| backend_nodes(&self.cloud, stable.iter().copied()),
        ))
    }

    /// Upstream `addFinalizer`: a PATCH only when the finalizer is missing.
    pub async fn add_finalizer(&self, svc: &CachedService) -> Result<(), kube::Error> {
        match decide::add_finalizer_patch(svc) {
            Some(patch) => self.patch_service(svc, &patch).await,
            None => Ok(()),
        }
    }

    /// Upstream `removeFinalizer`: a PATCH only when the finalizer is present.
    pub async fn remove_finalizer(&self, svc: &CachedService) -> Result<(), kube::Error> {
        match decide::remove_finalizer_patch(svc) {
            Some(patch) => self.patch_service(svc, &patch).await,
            None => Ok(()),
        }
    }

    /// Upstream `patchStatus`: a PATCH only when the status differs.
    pub async fn patch_status(
        &self,
        svc: &CachedService,
        status: &LoadBalancerStatus,
    ) -> Result<(), kube::Error> {
        match decide::status_patch(svc, status, self.ip_mode.load(Ordering::Relaxed)) {
            Some(patch) => self.patch_service(svc, &patch).await,
            None => Ok(()),
        }
    }

    /// Upstream `PatchService`: a strategic-merge PATCH of the `status` subresource (used for
    /// the finalizer too), response body unread.
    async fn patch_service(&self, svc: &CachedService, patch: &Value) -> Result<(), kube::Error> {
        let namespace = svc.namespace().unwrap_or_default();
        let request = k8s::services(&namespace).patch_subresource(
            "status",
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        );
        k8s::send_write(&self.client, request).await
    }

    /// The node worker: after each burst of node changes (settled for [`NODE_SYNC_BATCH`]),
    /// one node sync if a node was added or deleted, or its exclusion or providerID changed.
    async fn node_worker(
        self: Arc<Self>,
        mut changes: watch::Receiver<u64>,
        stop: impl Future<Output = ()>,
    ) {
        // The nodes as the caches first hold them are what the first Ensures use: no sync.
        self.nodes_changed();
        let work = async {
            while changes.changed().await.is_ok() {
                tokio::time::sleep(NODE_SYNC_BATCH).await;
                changes.mark_unchanged();
                if self.nodes_changed() {
                    self.sync_nodes().await;
                }
            }
        };
        tokio::select! {
            () = work => {}
            () = stop => {}
        }
    }

    /// Whether a node was added or deleted, or its exclusion or providerID changed, since the
    /// last call (upstream's node handlers with `shouldSyncUpdatedNode`).
    pub fn nodes_changed(&self) -> bool {
        let nodes = self.nodes.state();
        let mut triggers = self
            .node_triggers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut changed = triggers.len() != nodes.len();
        let mut next = std::collections::HashMap::with_capacity(nodes.len());
        for node in &nodes {
            let name = node.name_any();
            let trigger = NodeTrigger::of(node);
            if !changed && triggers.get(&name) != Some(&trigger) {
                changed = true;
            }
            next.insert(name, trigger);
        }
        *triggers = next;
        changed
    }

    /// Every `period`, queues every Service that wants a load balancer or needs its cleanup,
    /// until `stop`: a full sync ensures each one again, which repairs an owned load balancer
    /// changed or deleted outside Kubernetes (writes to the API happen only if its status
    /// changed). The queue de-duplicates keys, so a slow pass never piles up.
    async fn resync_loop(self: Arc<Self>, period: Duration, stop: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pass = async {
            loop {
                ticks.tick().await;
                let keys: Vec<String> = self
                    .services
                    .state()
                    .iter()
                    .filter(|svc| decide::wants_load_balancer(svc) || decide::needs_cleanup(svc))
                    .map(|svc| svc.key())
                    .collect();
                self.resyncing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(keys.iter().cloned());
                debug!(queued = keys.len(), "periodic load-balancer resync");
                for key in keys {
                    self.queue.add(key);
                }
            }
        };
        tokio::select! {
            () = pass => {}
            () = stop => {}
        }
    }

    /// Upstream `syncNodes`: every cached Service whose backend set changed gets one
    /// UpdateLoadBalancer; failed ones are queued for a full sync.
    pub async fn sync_nodes(&self) {
        let started = Instant::now();
        let services = self.cache.all_services();
        let retry = self
            .update_load_balancer_hosts(services, self.workers)
            .await;
        for key in retry {
            self.queue.add(key);
        }
        let took = started.elapsed();
        self.metrics.nodesync_latency.observe(took.as_secs_f64());
        debug!(took = ?took, "node sync finished");
    }

    /// Upstream `updateLoadBalancerHosts`: the node sync of `services` over `workers` tasks;
    /// returns the keys of the services to retry.
    pub async fn update_load_balancer_hosts(
        &self,
        services: Vec<Arc<CachedService>>,
        workers: usize,
    ) -> Vec<String> {
        futures::stream::iter(services)
            .map(|svc| async move {
                let retry = self.node_sync_service(&svc).await;
                retry.then(|| svc.key())
            })
            .buffer_unordered(workers.max(1))
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Upstream `nodeSyncService`: true when the service must be retried.
    async fn node_sync_service(&self, svc: &CachedService) -> bool {
        if !decide::wants_load_balancer(svc) {
            return false;
        }
        let key = svc.key();
        let Some(current) = self.current_backends() else {
            self.metrics.nodesync_error.inc();
            warn!(service = %key, "node cache not synced; retrying the service");
            return true;
        };
        if let Some(previous) = self.cache.last_synced(&key)
            && !decide::may_replace_backends(Some(previous.len()), current.len())
        {
            self.keeping_backends_event(svc, previous.len());
            return false;
        }
        // Stored before the update, even if it fails: a failure is retried by a full sync.
        let previous = self.cache.store_last_synced(&key, current.clone());
        if previous.is_some_and(|p| decide::nodes_sufficiently_equal(&p.hosts, &current.hosts)) {
            return false;
        }
        match self.locked_update_load_balancer_hosts(svc, &current).await {
            Ok(()) => false,
            Err(err) => {
                self.metrics.nodesync_error.inc();
                warn!(service = %key, error = %err, "failed to update load balancer hosts; retrying the service");
                true
            }
        }
    }

    /// The Warning recorded when the node set went empty and the load balancer keeps its
    /// `kept` backends ([`decide::may_replace_backends`]).
    fn keeping_backends_event(&self, svc: &CachedService, kept: usize) {
        self.event(
            svc,
            EventType::Warning,
            "UnAvailableLoadBalancer",
            &format!(
                "There are no available nodes for LoadBalancer; it keeps its {kept} backends \
                 rather than losing every one at once"
            ),
        );
    }

    /// Upstream `lockedUpdateLoadBalancerHosts`: one UpdateLoadBalancer, counted and timed.
    async fn locked_update_load_balancer_hosts(
        &self,
        svc: &CachedService,
        backends: &Backends,
    ) -> Result<(), HostUpdateError> {
        self.metrics.loadbalancer_sync.inc();
        let started = Instant::now();
        let view = service_view(&self.cloud, svc);
        let result = self
            .cloud
            .update_load_balancer(&self.cluster_name, view.clone(), &backends.nodes)
            .await;
        self.metrics
            .update_host_latency
            .observe(started.elapsed().as_secs_f64());
        let err = match result {
            Ok(()) => {
                if backends.is_empty() {
                    self.event(
                        svc,
                        EventType::Warning,
                        "UnAvailableLoadBalancer",
                        "There are no available nodes for LoadBalancer",
                    );
                } else {
                    self.event(
                        svc,
                        EventType::Normal,
                        "UpdatedLoadBalancer",
                        "Updated load balancer with new hosts",
                    );
                }
                return Ok(());
            }
            Err(CpiError::ImplementedElsewhere(_)) => return Ok(()),
            Err(err) => err,
        };
        match self
            .cloud
            .get_load_balancer(&self.cluster_name, &view)
            .await
        {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            Err(lookup) => {
                warn!(service = %svc.key(), error = %lookup, "error checking whether the load balancer exists after a failed host update");
            }
        }
        let err = HostUpdateError::Update(err);
        self.event(
            svc,
            EventType::Warning,
            err.reason(),
            &decide::update_failure_message(&decide::node_names(&backends.hosts), &err),
        );
        Err(err)
    }

    fn event(&self, svc: &CachedService, type_: EventType, reason: &str, message: &str) {
        self.recorder
            .record(&svc.object_ref(&()), type_, reason, message);
    }
}

/// Refuses a cluster name that cannot tell this cluster's load balancers from another's: an
/// empty one, or upstream's default, which every cluster that did not set one shares.
fn cluster_name_owns_load_balancers(cluster: &ClusterSettings) -> Result<(), BuildError> {
    if cluster.name.is_empty() {
        return Err(BuildError::Disabled(
            "--cluster-name is empty; load balancers are named after it".into(),
        ));
    }
    if !cluster.name_given {
        return Err(BuildError::Disabled(format!(
            "--cluster-name is not set: the default {:?} is every cluster's, and load balancers \
             are owned by cluster name; set a name unique to this cluster",
            cluster.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod build_tests {
    use super::*;

    fn settings(name: &str, name_given: bool) -> ClusterSettings {
        ClusterSettings {
            name: name.into(),
            name_given,
            ..ClusterSettings::default()
        }
    }

    #[test]
    fn the_controller_needs_a_cluster_name_set_explicitly() {
        assert!(cluster_name_owns_load_balancers(&settings("prod-eu-1", true)).is_ok());
        assert!(cluster_name_owns_load_balancers(&settings("kubernetes", true)).is_ok());
        let Err(BuildError::Disabled(why)) =
            cluster_name_owns_load_balancers(&settings("kubernetes", false))
        else {
            panic!("the shared default must not start the controller");
        };
        assert!(why.contains("--cluster-name is not set"), "{why}");
        assert!(matches!(
            cluster_name_owns_load_balancers(&settings("", true)),
            Err(BuildError::Disabled(_))
        ));
    }
}
