//! The cloud controllers, one module per controller, and the node cache they share.

pub mod node;
pub mod node_lifecycle;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

/// Drops what no controller reads before a Node enters the cache: `managedFields` (most of a
/// cached Node's memory) and the bulky status lists. Writes stay correct: a PUT without
/// `managedFields` keeps the server's, a PUT of the main resource ignores `status`, and status
/// writes are merge patches of the fields they set.
pub fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.config = None;
    }
}

/// Nodes per page of the initial list: smaller pages bound the transient memory of decoding
/// (managedFields included) before `trim_node` drops what is not cached.
const LIST_PAGE_SIZE: u32 = 100;

/// Events buffered per subscriber before the shared watch waits for slow consumers.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One watch of all Nodes shared by every node controller: a read cache plus a handle that
/// lets a controller subscribe to changes.
pub struct NodeInformer {
    /// The shared cache.
    pub store: Store<Node>,
    writer: Option<reflector::store::Writer<Node>>,
    client: kube::Client,
    ready: tokio::sync::watch::Sender<bool>,
}

impl NodeInformer {
    /// Prepares the informer; nothing is watched until [`run`](Self::run).
    pub fn new(client: kube::Client) -> Self {
        let (store, writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
        Self {
            store,
            writer: Some(writer),
            client,
            ready: tokio::sync::watch::channel(false).0,
        }
    }

    /// Turns true once the initial list is in the cache. (Not `Store::wait_until_ready`: with
    /// more than one task waiting on it, only the last one to poll is woken.)
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// A change feed for one controller.
    pub fn subscribe(&self) -> Option<ReflectHandle<Node>> {
        self.writer.as_ref().and_then(|w| w.subscribe())
    }

    /// Drives the watch (relisting on errors and 410s with backoff) until `shutdown`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let api: Api<Node> = Api::all(self.client.clone());
        let stream = reflector::reflector(
            writer,
            watcher(
                api,
                watcher::Config::default()
                    .any_semantic()
                    .page_size(LIST_PAGE_SIZE),
            )
            .default_backoff()
            .modify(trim_node),
        );
        let ready = &self.ready;
        let drive = stream.for_each(|event| async move {
            match event {
                Ok(watcher::Event::InitDone) => {
                    ready.send_replace(true);
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
