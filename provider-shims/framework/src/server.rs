//! The builder that turns provider trait implementations into a served shim, and its lifecycle:
//! start-up checks, health, metrics endpoint, signals and draining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cpi_proto::v1 as pb;
use cpi_proto::v1::Capability;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::adapters::{Adapter, Core, ProviderAdapter};
use crate::error::ShimError;
use crate::fence::{FenceGuard, FenceStore, MemoryFenceStore};
use crate::flags::ServeFlags;
use crate::metrics::{HttpEndpoint, ShimMetrics};
use crate::node_sets::{NODE_SET_CAPACITY, NodeSets};
use crate::provider::ProviderDescription;
use crate::services;

/// Collects the services a provider implements; see [`ShimServer::builder`].
pub struct ShimServerBuilder {
    description: ProviderDescription,
    instances_v2: Option<Arc<dyn services::InstancesV2>>,
    instances: Option<Arc<dyn services::Instances>>,
    zones: Option<Arc<dyn services::Zones>>,
    clusters: Option<Arc<dyn services::Clusters>>,
    load_balancer: Option<Arc<dyn services::LoadBalancer>>,
    routes: Option<Arc<dyn services::Routes>>,
    volume_labels: Option<Arc<dyn services::VolumeLabels>>,
    load_balancer_validation: Option<Arc<dyn services::LoadBalancerValidation>>,
    fence_store: Arc<dyn FenceStore>,
    registry: Registry,
}

impl ShimServerBuilder {
    /// Serves `cloudprovider.v1.InstancesV2` with `provider`.
    pub fn instances_v2(mut self, provider: impl services::InstancesV2) -> Self {
        self.instances_v2 = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.Instances` with `provider`.
    pub fn instances(mut self, provider: impl services::Instances) -> Self {
        self.instances = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.Zones` with `provider`.
    pub fn zones(mut self, provider: impl services::Zones) -> Self {
        self.zones = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.Clusters` with `provider`.
    pub fn clusters(mut self, provider: impl services::Clusters) -> Self {
        self.clusters = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.LoadBalancer` with `provider`.
    pub fn load_balancer(mut self, provider: impl services::LoadBalancer) -> Self {
        self.load_balancer = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.Routes` with `provider`.
    pub fn routes(mut self, provider: impl services::Routes) -> Self {
        self.routes = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.VolumeLabels` with `provider`.
    pub fn volume_labels(mut self, provider: impl services::VolumeLabels) -> Self {
        self.volume_labels = Some(Arc::new(provider));
        self
    }

    /// Serves `cloudprovider.v1.LoadBalancerValidation` with `provider`.
    pub fn load_balancer_validation(
        mut self,
        provider: impl services::LoadBalancerValidation,
    ) -> Self {
        self.load_balancer_validation = Some(Arc::new(provider));
        self
    }

    /// Keeps the fence mark of `--fence-lease` in `store` instead of process memory.
    pub fn fence_store(mut self, store: impl FenceStore) -> Self {
        self.fence_store = Arc::new(store);
        self
    }

    /// Lets the provider register its own metrics next to the framework's.
    pub fn register_metrics(mut self, register: impl FnOnce(&mut Registry)) -> Self {
        register(&mut self.registry);
        self
    }

    /// Computes `ProviderInfo` and wraps every registered service in its adapter.
    pub fn build(mut self) -> ShimServer {
        let registered = [
            (self.instances_v2.is_some(), Capability::InstancesV2),
            (self.instances.is_some(), Capability::Instances),
            (self.zones.is_some(), Capability::Zones),
            (self.clusters.is_some(), Capability::Clusters),
            (self.load_balancer.is_some(), Capability::LoadBalancer),
            // The framework serves node sets for every LoadBalancer provider.
            (
                self.load_balancer.is_some(),
                Capability::LoadBalancerNodeSets,
            ),
            (self.routes.is_some(), Capability::Routes),
            (self.volume_labels.is_some(), Capability::VolumeLabels),
            (
                self.load_balancer_validation.is_some(),
                Capability::LoadBalancerValidation,
            ),
        ];
        let capabilities: Vec<Capability> = registered
            .iter()
            .filter(|(present, _)| *present)
            .map(|(_, capability)| *capability)
            .collect();
        let info = pb::ProviderInfo {
            name: self.description.name.clone(),
            has_cluster_id: self.description.has_cluster_id,
            capabilities: capabilities.iter().map(|c| *c as i32).collect(),
            protocol_version: pb::ProtocolVersion::ProtocolVersion1 as i32,
            provider_id_prefixes: self.description.owned_prefixes(),
            shim_version: self.description.shim_version.clone(),
            wants_raw_objects: self.description.wants_raw_objects,
            csi_drivers: self.description.csi_drivers.clone(),
            // Answered from the fence guard: `--fence-lease` is applied when serving starts.
            fence_lease: String::new(),
        };
        let metrics = ShimMetrics::register(
            &mut self.registry,
            &self.description.name,
            &self.description.shim_version,
        );
        let core = Arc::new(Core {
            provider: self.description,
            info,
            metrics,
            fence: FenceGuard::new(self.fence_store),
            node_sets: NodeSets::new(NODE_SET_CAPACITY),
        });
        let services = Services {
            instances_v2: self
                .instances_v2
                .map(|i| pb::instances_v2_server::InstancesV2Server::new(adapter(i, &core))),
            instances: self
                .instances
                .map(|i| pb::instances_server::InstancesServer::new(adapter(i, &core))),
            zones: self
                .zones
                .map(|i| pb::zones_server::ZonesServer::new(adapter(i, &core))),
            clusters: self
                .clusters
                .map(|i| pb::clusters_server::ClustersServer::new(adapter(i, &core))),
            load_balancer: self
                .load_balancer
                .map(|i| pb::load_balancer_server::LoadBalancerServer::new(adapter(i, &core))),
            routes: self
                .routes
                .map(|i| pb::routes_server::RoutesServer::new(adapter(i, &core))),
            volume_labels: self
                .volume_labels
                .map(|i| pb::volume_labels_server::VolumeLabelsServer::new(adapter(i, &core))),
            load_balancer_validation: self.load_balancer_validation.map(|i| {
                pb::load_balancer_validation_server::LoadBalancerValidationServer::new(adapter(
                    i, &core,
                ))
            }),
        };
        ShimServer {
            core,
            services,
            registry: self.registry,
        }
    }
}

fn adapter<T: ?Sized>(inner: Arc<T>, core: &Arc<Core>) -> Adapter<T> {
    Adapter {
        inner,
        core: Arc::clone(core),
    }
}

/// The generated servers of the registered services.
struct Services {
    instances_v2:
        Option<pb::instances_v2_server::InstancesV2Server<Adapter<dyn services::InstancesV2>>>,
    instances: Option<pb::instances_server::InstancesServer<Adapter<dyn services::Instances>>>,
    zones: Option<pb::zones_server::ZonesServer<Adapter<dyn services::Zones>>>,
    clusters: Option<pb::clusters_server::ClustersServer<Adapter<dyn services::Clusters>>>,
    load_balancer:
        Option<pb::load_balancer_server::LoadBalancerServer<Adapter<dyn services::LoadBalancer>>>,
    routes: Option<pb::routes_server::RoutesServer<Adapter<dyn services::Routes>>>,
    volume_labels:
        Option<pb::volume_labels_server::VolumeLabelsServer<Adapter<dyn services::VolumeLabels>>>,
    load_balancer_validation: Option<
        pb::load_balancer_validation_server::LoadBalancerValidationServer<
            Adapter<dyn services::LoadBalancerValidation>,
        >,
    >,
}

/// The gRPC name of `S` when it is registered.
fn name_of<S: NamedService>(service: &Option<S>) -> Option<&'static str> {
    service.as_ref().map(|_| S::NAME)
}

impl Services {
    /// Fully-qualified names of the registered services, for the health service.
    fn names(&self) -> Vec<&'static str> {
        [
            name_of(&self.instances_v2),
            name_of(&self.instances),
            name_of(&self.zones),
            name_of(&self.clusters),
            name_of(&self.load_balancer),
            name_of(&self.routes),
            name_of(&self.volume_labels),
            name_of(&self.load_balancer_validation),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A shim ready to serve: `ProviderInfo` computed, adapters built.
pub struct ShimServer {
    core: Arc<Core>,
    services: Services,
    registry: Registry,
}

impl ShimServer {
    /// Starts describing a shim; register services, then [`ShimServerBuilder::build`].
    pub fn builder(description: ProviderDescription) -> ShimServerBuilder {
        ShimServerBuilder {
            description,
            instances_v2: None,
            instances: None,
            zones: None,
            clusters: None,
            load_balancer: None,
            routes: None,
            volume_labels: None,
            load_balancer_validation: None,
            fence_store: Arc::new(MemoryFenceStore::default()),
            registry: Registry::default(),
        }
    }

    /// What `GetProviderInfo` answers.
    pub fn provider_info(&self) -> &pb::ProviderInfo {
        &self.core.info
    }

    /// Serves until SIGTERM, SIGINT or `shutdown`, then drains (see [`ShimServer::start`]).
    pub async fn run(
        self,
        flags: &ServeFlags,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ShimError> {
        self.start(flags, shutdown).await?.wait().await
    }

    /// Checks the flags, loads TLS material and binds the gRPC and metrics listeners (failing
    /// fast on any of them), then serves in the background, fencing mutating calls on
    /// `--fence-lease`. On SIGTERM, SIGINT or `shutdown`:
    /// every health status turns NOT_SERVING and /readyz fails, the listener closes, and
    /// in-flight calls get up to `--shutdown-grace-period` to finish before they are abandoned.
    pub async fn start(
        self,
        flags: &ServeFlags,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<RunningShim, ShimError> {
        let listen = flags.listen()?;
        self.core.fence.set_lease(&flags.fence_lease).await;
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigterm = signal(SignalKind::terminate()).map_err(ShimError::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(ShimError::Signal)?;
        let ready = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(self.registry);
        let http = match flags.metrics_bind_address.0 {
            Some(addr) => Some(HttpEndpoint::bind(addr, registry, Arc::clone(&ready)).await?),
            None => None,
        };
        let metrics_addr = http.as_ref().and_then(HttpEndpoint::local_addr);

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut names = self.services.names();
        names.push(pb::provider_server::SERVICE_NAME);
        for name in &names {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let services = self.services;
        let router = cpi_transport::server_builder()
            .add_service(health_service)
            .add_service(pb::provider_server::ProviderServer::new(ProviderAdapter {
                core: Arc::clone(&self.core),
            }))
            .add_optional_service(services.instances_v2)
            .add_optional_service(services.instances)
            .add_optional_service(services.zones)
            .add_optional_service(services.clusters)
            .add_optional_service(services.load_balancer)
            .add_optional_service(services.routes)
            .add_optional_service(services.volume_labels)
            .add_optional_service(services.load_balancer_validation);
        if matches!(listen, cpi_transport::Listen::Tls { .. })
            && flags.allowed_client_sans.is_empty()
        {
            tracing::warn!(
                "--allowed-client-sans is empty: any client certificate issued by \
                 --client-ca-file is accepted; list the controller-manager's SAN to admit only it"
            );
        }
        // Bound before anything is reported ready, so a taken port or socket fails start-up.
        let bound = cpi_transport::bind(listen).await?;
        let grpc_addr = bound.local_addr();

        let (draining_tx, draining_rx) = watch::channel(false);
        let stop = {
            let ready = Arc::clone(&ready);
            async move {
                tokio::select! {
                    () = shutdown => tracing::info!("shutdown requested"),
                    Some(()) = sigterm.recv() => tracing::info!("SIGTERM received"),
                    Some(()) = sigint.recv() => tracing::info!("SIGINT received"),
                }
                ready.store(false, Ordering::SeqCst);
                set_not_serving(&reporter, &names).await;
                tracing::info!("not serving any more; draining in-flight calls");
                let _ = draining_tx.send(true);
            }
        };
        let grace = flags.shutdown_grace_period;
        let provider = self.core.provider.name.clone();
        ready.store(true, Ordering::SeqCst);
        let fence_lease = &flags.fence_lease;
        tracing::info!(%provider, grpc = %grpc_addr, ?metrics_addr, %fence_lease, "serving CPI");
        if fence_lease == crate::fence::NO_FENCE {
            tracing::warn!(
                "--fence-lease=none: mutating calls are not fenced; run one controller-manager \
                 only (with --leader-elect=false)"
            );
        }
        let task = tokio::spawn(async move {
            let (stop_http_tx, mut stop_http_rx) = watch::channel(false);
            let http_task = http.map(|http| {
                tokio::spawn(http.serve(async move {
                    let _ = stop_http_rx.wait_for(|stop| *stop).await;
                }))
            });
            let result = drain(bound.serve(router, stop), draining_rx, grace).await;
            ready.store(false, Ordering::SeqCst);
            let _ = stop_http_tx.send(true);
            if let Some(http_task) = http_task {
                let _ = http_task.await;
            }
            tracing::info!(%provider, "stopped");
            result
        });
        Ok(RunningShim {
            grpc_addr,
            metrics_addr,
            task,
        })
    }
}

async fn set_not_serving(reporter: &HealthReporter, names: &[&'static str]) {
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for name in names {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// Awaits `serve`, but no longer than `grace` once draining has begun.
async fn drain(
    serve: impl Future<Output = Result<(), cpi_transport::ServeError>>,
    mut draining: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), ShimError> {
    tokio::pin!(serve);
    let deadline = async move {
        if draining.wait_for(|d| *d).await.is_err() {
            // The stop future is gone only when serve itself has finished.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut serve => result.map_err(ShimError::from),
        () = deadline => {
            tracing::warn!(?grace, "shutdown grace period over; abandoning in-flight calls");
            Ok(())
        }
    }
}

/// A shim serving in the background.
pub struct RunningShim {
    grpc_addr: cpi_transport::LocalAddr,
    metrics_addr: Option<SocketAddr>,
    task: JoinHandle<Result<(), ShimError>>,
}

impl RunningShim {
    /// Where the gRPC service listens (the real port when port 0 was asked for).
    pub fn grpc_addr(&self) -> &cpi_transport::LocalAddr {
        &self.grpc_addr
    }

    /// Where the metrics endpoint listens (the real port when port 0 was asked for).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until the shim has stopped and drained.
    pub async fn wait(self) -> Result<(), ShimError> {
        self.task
            .await
            .map_err(|err| ShimError::Task(err.to_string()))?
    }
}
