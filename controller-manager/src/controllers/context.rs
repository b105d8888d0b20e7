//! What every controller is built from: the API client, the shared caches, the provider shim
//! (fenced by the current leadership term), events and the cluster-wide settings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kube::runtime::reflector::{ReflectHandle, Store};

use crate::cloud::{Cloud, Predecessor};
use crate::cluster_cidrs::ClusterCidrs;
use crate::flags::FeatureGates;
use crate::k8s::{CachedNode, EventBroadcaster, NodeInformer, Recorder, WatchMetrics};

/// Upstream's shared cloud settings (`KubeCloudSharedConfiguration`) that more than one
/// controller reads.
#[derive(Debug, Clone, Default)]
pub struct ClusterSettings {
    /// `--cluster-name`: the instance prefix passed to load-balancer and route calls.
    pub name: String,
    /// Whether `--cluster-name` was given, rather than upstream's default every cluster shares.
    pub name_given: bool,
    /// `--cluster-cidr`: pod CIDR range(s), at most one per IP family.
    pub cidrs: ClusterCidrs,
    /// `--allocate-node-cidrs`.
    pub allocate_node_cidrs: bool,
    /// `--configure-cloud-routes`.
    pub configure_cloud_routes: bool,
    /// `--feature-gates`.
    pub feature_gates: FeatureGates,
}

/// The shared Node watch: prepared once, run by the manager only if a controller asked for it
/// while being built.
#[derive(Clone)]
pub struct SharedNodes {
    store: Store<CachedNode>,
    ready: tokio::sync::watch::Receiver<bool>,
    changes: tokio::sync::watch::Receiver<u64>,
    informer: Arc<Mutex<Option<NodeInformer>>>,
    wanted: Arc<AtomicBool>,
}

impl SharedNodes {
    /// Shares `informer` (not yet running).
    pub fn new(informer: NodeInformer) -> Self {
        Self {
            store: informer.store.clone(),
            ready: informer.ready(),
            changes: informer.changes(),
            informer: Arc::new(Mutex::new(Some(informer))),
            wanted: Arc::default(),
        }
    }

    /// The node cache (empty until the watch runs).
    pub fn cache(&self) -> Store<CachedNode> {
        self.wanted.store(true, Ordering::Relaxed);
        self.store.clone()
    }

    /// A change feed for one controller; `None` once the watch has started.
    pub fn subscribe(&self) -> Option<ReflectHandle<CachedNode>> {
        self.wanted.store(true, Ordering::Relaxed);
        // The slot is only ever taken whole: a poisoned lock still holds a usable value.
        self.informer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(NodeInformer::subscribe)
    }

    /// Turns true once the initial list is in the cache.
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Ticks after every change applied to the cache, deletions included.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wanted.store(true, Ordering::Relaxed);
        self.changes.clone()
    }

    /// The watch to run, if a controller asked for it (taken once).
    pub fn take(&self) -> Option<NodeInformer> {
        if !self.wanted.load(Ordering::Relaxed) {
            return None;
        }
        self.informer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// How the current leadership term began, told to controllers built before it: whether a
/// previous leader may still have writes in flight. Until the term is known (and in contexts
/// that never learn it) a predecessor is assumed.
#[derive(Debug, Clone)]
pub struct Succession(tokio::sync::watch::Receiver<Option<Predecessor>>);

impl Succession {
    /// A succession told later through the returned sender (when leadership is won).
    pub fn channel() -> (tokio::sync::watch::Sender<Option<Predecessor>>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (tx, Self(rx))
    }

    /// A succession known already (tests, `--leader-elect=false`).
    pub fn known(predecessor: Predecessor) -> Self {
        Self(tokio::sync::watch::channel(Some(predecessor)).1)
    }

    /// One nothing is known of: a predecessor is assumed.
    pub fn unknown() -> Self {
        Self(tokio::sync::watch::channel(None).1)
    }

    /// The predecessor of the current term, if known yet.
    pub fn predecessor(&self) -> Option<Predecessor> {
        self.0.borrow().clone()
    }
}

/// Everything a controller is built from (upstream `ControllerInitContext` plus the clients).
#[derive(Clone)]
pub struct ControllerContext {
    /// The controllers' API client (rate limited by `--kube-api-qps/burst`).
    pub client: kube::Client,
    /// The provider shim; its mutating calls carry the current term's fence.
    pub cloud: Cloud,
    /// The shared Node watch.
    pub nodes: SharedNodes,
    /// Counters for the watches controllers start themselves (the Node watch has them already).
    pub watch_metrics: WatchMetrics,
    /// Cluster-wide settings.
    pub cluster: ClusterSettings,
    /// The Event sink shared by every controller (reporting instance: our identity).
    pub events: EventBroadcaster,
    /// How the leadership term the controllers run in began (known once they start).
    pub succession: Succession,
}

impl ControllerContext {
    /// An event recorder whose Events name `component` as their source.
    pub fn recorder(&self, component: &str) -> Recorder {
        self.events.new_recorder(component)
    }
}
