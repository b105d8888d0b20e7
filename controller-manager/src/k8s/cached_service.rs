//! [`CachedService`]: a Service as the service-lb controller caches it, and [`ServiceInformer`],
//! the watch that fills the cache and reports every change with the version it replaced.
//!
//! A cached Service keeps the metadata without `managedFields` (most of a Service's JSON once a
//! few managers have written it) and without owner references, the whole spec, and from the
//! status only `loadBalancer`: what the load-balancer rules read and what the CPI's view of a
//! Service carries.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{LoadBalancerStatus, Service, ServiceSpec, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Deserialize;
use tracing::warn;

use super::watch_metrics::WatchMetrics;

/// A `core/v1` Service as the service-lb controller caches it (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Service")]
pub struct CachedService {
    metadata: ObjectMeta,
    spec: ServiceSpec,
    load_balancer: LoadBalancerStatus,
}

impl CachedService {
    /// `spec`.
    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }

    /// `status.loadBalancer`.
    pub fn load_balancer(&self) -> &LoadBalancerStatus {
        &self.load_balancer
    }

    /// `namespace/name`, the work-queue key of upstream's `MetaNamespaceKeyFunc`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// `metadata.finalizers`.
    pub fn finalizers(&self) -> &[String] {
        self.metadata.finalizers.as_deref().unwrap_or_default()
    }

    /// Whether `metadata.deletionTimestamp` is set.
    pub fn is_deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// The cached Service as a `core/v1` Service (for a shim that wants raw objects).
    pub fn to_service(&self) -> Service {
        Service {
            metadata: self.metadata.clone(),
            spec: Some(self.spec.clone()),
            status: Some(ServiceStatus {
                load_balancer: Some(self.load_balancer.clone()),
                ..ServiceStatus::default()
            }),
        }
    }
}

impl From<Service> for CachedService {
    fn from(service: Service) -> Self {
        let mut metadata = service.metadata;
        metadata.managed_fields = None;
        metadata.owner_references = None;
        Self {
            metadata,
            spec: service.spec.unwrap_or_default(),
            load_balancer: service
                .status
                .and_then(|s| s.load_balancer)
                .unwrap_or_default(),
        }
    }
}

impl kube::Resource for CachedService {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Service")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("services")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Request builder for the `services` of `namespace`.
pub fn services(namespace: &str) -> kube::core::Request {
    kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/services"))
}

/// One change seen by the Service watch, in the order the watch saw them.
#[derive(Debug, Clone)]
pub enum ServiceChange {
    /// A Service was added (`old` is `None`) or modified; `old` is the version it replaced.
    Applied {
        /// The version the cache held before, if any.
        old: Option<Arc<CachedService>>,
        /// The new version.
        new: Arc<CachedService>,
    },
    /// A Service was deleted (also reported for Services found gone after a relist).
    Deleted(Arc<CachedService>),
}

/// The `resource` label of the Service watch's metrics.
const RESOURCE: &str = "services";

/// The watch of Services: a read cache plus a callback for every change.
pub struct ServiceInformer {
    /// The cache.
    pub store: Store<CachedService>,
    writer: reflector::store::Writer<CachedService>,
    api: Api<CachedService>,
    config: watcher::Config,
    ready: tokio::sync::watch::Sender<bool>,
    metrics: WatchMetrics,
}

impl ServiceInformer {
    /// Prepares the informer of every Service; nothing is watched until [`run`](Self::run).
    pub fn new(client: kube::Client) -> Self {
        Self::selecting(Api::all(client), watcher::Config::default())
    }

    /// Prepares an informer of the Services `api` and `config` select (tests scope it to their
    /// own namespace).
    pub fn selecting(api: Api<CachedService>, config: watcher::Config) -> Self {
        let writer = reflector::store::Writer::default();
        Self {
            store: writer.as_reader(),
            writer,
            api,
            config,
            ready: tokio::sync::watch::channel(false).0,
            metrics: WatchMetrics::default(),
        }
    }

    /// Counts what the watch delivers in `metrics` (as resource `services`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: WatchMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Turns true once the initial list is in the cache.
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Drives the watch (relisting on errors with backoff) until `shutdown`, calling
    /// `on_change` after each change is in the cache. A relist reports the listed Services as
    /// modified (against the versions cached before it) and the ones it no longer has as
    /// deleted.
    pub async fn run(
        mut self,
        mut on_change: impl FnMut(ServiceChange) + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let watch = watcher(self.api.clone(), self.config.clone()).default_backoff();
        let mut stream = self.metrics.counted(RESOURCE, watch).boxed();
        let mut listed: Vec<Arc<CachedService>> = Vec::new();
        let drive = async {
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(err) => {
                        warn!(error = %err, "service watch error; retrying with backoff");
                        continue;
                    }
                };
                match event {
                    watcher::Event::Apply(service) => {
                        let key = ObjectRef::from_obj(&service);
                        let old = self.store.get(&key);
                        self.writer
                            .apply_watcher_event(&watcher::Event::Apply(service));
                        if let Some(new) = self.store.get(&key) {
                            on_change(ServiceChange::Applied { old, new });
                        }
                    }
                    watcher::Event::Delete(service) => {
                        self.writer
                            .apply_watcher_event(&watcher::Event::Delete(service.clone()));
                        on_change(ServiceChange::Deleted(Arc::new(service)));
                    }
                    watcher::Event::Init => {
                        listed.clear();
                        self.writer.apply_watcher_event(&watcher::Event::Init);
                    }
                    watcher::Event::InitApply(service) => {
                        self.writer
                            .apply_watcher_event(&watcher::Event::InitApply(service.clone()));
                        listed.push(Arc::new(service));
                    }
                    watcher::Event::InitDone => {
                        let before = self.store.state();
                        self.writer.apply_watcher_event(&watcher::Event::InitDone);
                        let now: HashSet<ObjectRef<CachedService>> =
                            listed.iter().map(|s| ObjectRef::from_obj(&**s)).collect();
                        let mut old_by_key = std::collections::HashMap::with_capacity(before.len());
                        for old in before {
                            let key = ObjectRef::from_obj(&*old);
                            if now.contains(&key) {
                                old_by_key.insert(key, old);
                            } else {
                                on_change(ServiceChange::Deleted(old));
                            }
                        }
                        for new in listed.drain(..) {
                            let key = ObjectRef::from_obj(&*new);
                            // The store's own Arc, so the controller holds no second copy.
                            let new = self.store.get(&key).unwrap_or(new);
                            on_change(ServiceChange::Applied {
                                old: old_by_key.remove(&key),
                                new,
                            });
                        }
                        self.ready.send_replace(true);
                    }
                }
            }
        };
        tokio::select! {
            () = drive => {}
            () = shutdown => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const SERVICE: &str = r#"{
        "kind": "Service", "apiVersion": "v1",
        "metadata": {
            "name": "s", "namespace": "ns", "uid": "u", "resourceVersion": "3",
            "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            "annotations": {"a": "b"},
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    }"#;

    #[test]
    fn keeps_what_the_rules_read_and_drops_managed_fields() {
        let cached: CachedService = serde_json::from_str(SERVICE).unwrap();
        assert_eq!(cached.key(), "ns/s");
        assert_eq!(kube::Resource::meta(&cached).managed_fields, None);
        assert_eq!(cached.spec().type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(cached.finalizers().len(), 1);
        assert!(!cached.is_deleting());
        let ingress = cached.load_balancer().ingress.as_ref().unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("1.2.3.4"));
        let back = cached.to_service();
        assert_eq!(CachedService::from(back), cached);
    }

    #[test]
    fn missing_parts_decode_as_empty() {
        let cached: CachedService = serde_json::from_str(r#"{"metadata": {"name": "s"}}"#).unwrap();
        assert_eq!(cached.key(), "/s");
        assert_eq!(cached.load_balancer(), &LoadBalancerStatus::default());
    }
}
