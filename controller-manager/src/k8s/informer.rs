//! One shared watch of all Nodes: a read cache of [`CachedNode`]s plus change feeds for the
//! controllers that react to node changes.

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

use super::cached_node::CachedNode;
use super::watch_metrics::WatchMetrics;

/// Nodes per page of the initial list. Pages bound the memory of decoding the list; they only
/// work for a list from etcd: a list at resourceVersion "0" (served from the API server's watch
/// cache, as client-go's informers do) ignores the limit and returns every node in one body —
/// megabytes at a few thousand nodes.
const LIST_PAGE_SIZE: u32 = 100;

/// The `resource` label of the Node watch's metrics.
const RESOURCE: &str = "nodes";

/// Events buffered per subscriber before the shared watch waits for slow consumers.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One watch of all Nodes shared by every node controller: a read cache plus a handle that
/// lets a controller subscribe to changes.
pub struct NodeInformer {
    /// The shared cache.
    pub store: Store<CachedNode>,
    writer: Option<reflector::store::Writer<CachedNode>>,
    client: kube::Client,
    config: watcher::Config,
    ready: tokio::sync::watch::Sender<bool>,
    changes: tokio::sync::watch::Sender<u64>,
    metrics: WatchMetrics,
}

impl NodeInformer {
    /// Prepares the informer of every Node; nothing is watched until [`run`](Self::run).
    pub fn new(client: kube::Client) -> Self {
        Self::selecting(client, watcher::Config::default())
    }

    /// Prepares an informer of the Nodes `config`'s selectors select (tests scope it to their
    /// own nodes).
    pub fn selecting(client: kube::Client, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
        Self {
            store,
            writer: Some(writer),
            client,
            config: config.page_size(LIST_PAGE_SIZE),
            ready: tokio::sync::watch::channel(false).0,
            changes: tokio::sync::watch::channel(0).0,
            metrics: WatchMetrics::default(),
        }
    }

    /// Counts what the watch delivers in `metrics` (as resource `nodes`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: WatchMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Turns true once the initial list is in the cache. (Not `Store::wait_until_ready`: with
    /// more than one task waiting on it, only the last one to poll is woken.)
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Ticks after every change the cache has applied, deletions included (a subscription's
    /// feed carries no deletions); a burst of changes may show as one tick.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A change feed for one controller.
    pub fn subscribe(&self) -> Option<ReflectHandle<CachedNode>> {
        self.writer.as_ref().and_then(|w| w.subscribe())
    }

    /// Drives the watch (relisting on errors and 410s with backoff) until `shutdown`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let api: Api<CachedNode> = Api::all(self.client.clone());
        let watch = watcher(api, self.config.clone()).default_backoff();
        let stream = reflector::reflector(writer, self.metrics.counted(RESOURCE, watch));
        let ready = &self.ready;
        let changes = &self.changes;
        let drive = stream.for_each(|event| async move {
            match event {
                Ok(watcher::Event::InitDone) => {
                    ready.send_replace(true);
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "node watch error; retrying with backoff"),
            }
        });
        tokio::select! {
            () = drive => {}
            () = shutdown => {}
        }
    }
}
