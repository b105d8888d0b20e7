//! Wiring of the controller-manager: API clients, provider shim, secure port, leader election,
//! and the controllers of the registry that the provider supports and `--controllers` enables.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::cloud::{Cloud, CloudError, CloudMetrics, EndpointError, Fence, Predecessor};
use crate::controllers::{
    BuildError, ClusterSettings, ControllerContext, ControllerFlags, ControllerSelection, Names,
    Registered, Runner, SelectionError, SharedNodes, Stop, Succession,
};
use crate::flags::FlagError;
use crate::health::{Health, Scope, Unhealthy};
use crate::k8s::{ClientError, ClientMetrics, EventBroadcaster, NodeInformer, WatchMetrics};
use crate::leader::{Acquired, LeaderElector, LeaseConfig, Lost, SharedStatus};
use crate::metrics::ManagerMetrics;
use crate::options::{GenericOptions, OptionsError};
use crate::serve::{self, Authorizer};

/// Flags of the `cloud-controller-manager` binary: the generic ones and every controller's.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cloud-controller-manager",
    version,
    about = "Runs the cloud controllers (cloud-node, cloud-node-lifecycle, service-lb, route, node-ipam) against a provider shim reached over the CPI gRPC protocol."
)]
pub struct Options {
    /// The manager's own flags.
    #[command(flatten)]
    pub generic: GenericOptions,
    /// The controllers' flags.
    #[command(flatten)]
    pub controllers: ControllerFlags,
}

impl Options {
    /// Checks every flag; returns the resolved controller selection.
    pub fn validate(&self) -> Result<ControllerSelection, AppError> {
        let selection = ControllerSelection::parse(&self.generic.controllers)?;
        self.generic.validate()?;
        self.controllers.validate().map_err(OptionsError::from)?;
        Ok(selection)
    }
}

/// Why the controller-manager stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Invalid flags.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// `--controllers` names an unknown controller.
    #[error(transparent)]
    Controllers(#[from] SelectionError),
    /// The API client could not be set up.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The provider shim could not be used.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// `--provider-endpoint` cannot be used.
    #[error("--provider-endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    /// `--cloud-provider` disagrees with the shim.
    #[error("--cloud-provider={flag:?} but the provider shim reports {shim:?}")]
    ProviderMismatch {
        /// Flag value.
        flag: String,
        /// Shim's name.
        shim: String,
    },
    /// The secure port could not be served.
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    /// An enabled controller's flags are unusable with the shared settings.
    #[error("{controller}: {source}")]
    ControllerFlags {
        /// The controller's canonical name.
        controller: &'static str,
        /// The offending flag and what is wrong.
        source: FlagError,
    },
    /// Leadership was lost; upstream exits so the process restarts as a candidate.
    #[error("leaderelection lost: {0}")]
    LeadershipLost(#[from] Lost),
}

/// How often the shim is probed for `/readyz`.
const PROVIDER_PROBE_PERIOD: Duration = Duration::from_secs(10);

/// Runs the controller-manager until `shutdown` resolves or leadership is lost.
pub async fn run(
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let selection = options.validate()?;
    let Options {
        generic: options,
        controllers: flags,
    } = options;
    let mut registry = Registry::default();
    let metrics = ManagerMetrics::register(&mut registry);
    let config = crate::k8s::load_config(&options.kubeconfig, &options.master).await?;
    let clients = crate::k8s::build_clients(
        &config,
        options.kube_api_qps,
        options.kube_api_burst,
        &ClientMetrics::register(&mut registry),
    )?;
    let (fence_tx, fence_rx) = watch::channel(None::<Fence>);
    let cloud = Cloud::connect(
        &options.provider_endpoint()?,
        &options.connect_settings(),
        CloudMetrics::register(&mut registry),
    )
    .await?
    .with_fence(fence_rx)
    .with_lease(options.leader_elect.then(|| {
        format!(
            "{}/{}",
            options.leader_elect_resource_namespace, options.leader_elect_resource_name
        )
    }));
    if let Some(problem) = cloud.fence_problem() {
        // Only controllers that change cloud state need the fence; they refuse to start.
        warn!(%problem, "the provider shim would refuse mutating calls");
    }
    if !options.cloud_provider.is_empty() && options.cloud_provider != cloud.info().name {
        return Err(AppError::ProviderMismatch {
            flag: options.cloud_provider.clone(),
            shim: cloud.info().name.clone(),
        });
    }
    let health = Health::default();
    health.add("ping", Scope::Live, Arc::new(|| Ok(())));
    health.add(
        "provider",
        Scope::Ready,
        cloud.readiness_check(PROVIDER_PROBE_PERIOD),
    );
    let identity = format!(
        "{}_{}",
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into()),
        uuid::Uuid::new_v4()
    );
    // Events are written off the reconcile path, by one sink for every controller.
    let events = EventBroadcaster::start(clients.controllers.clone(), &identity);
    let (succession_tx, succession) = Succession::channel();
    let watch_metrics = WatchMetrics::register(&mut registry);
    let ctx = ControllerContext {
        client: clients.controllers.clone(),
        nodes: SharedNodes::new(
            NodeInformer::new(clients.controllers).with_metrics(watch_metrics.clone()),
        ),
        watch_metrics,
        cloud,
        cluster: ClusterSettings {
            name: options
                .cluster_name
                .clone()
                .unwrap_or_else(|| crate::options::DEFAULT_CLUSTER_NAME.to_string()),
            name_given: options.cluster_name.is_some(),
            cidrs: options.cluster_cidr.clone(),
            allocate_node_cidrs: options.allocate_node_cidrs,
            configure_cloud_routes: options.configure_cloud_routes,
            feature_gates: options.feature_gates,
        },
        events: events.clone(),
        succession,
    };
    // Built before leadership, as upstream registers metrics at start-up: a standby serves
    // the same metric names as the leader.
    let built = build_controllers(&ctx, &selection, flags.registry(), &mut registry)?;
    let registry = Arc::new(registry);
    if options.secure_port != 0 {
        let serving = serve::tls_acceptor(
            options
                .tls_cert_file
                .as_deref()
                .zip(options.tls_private_key_file.as_deref()),
        )?;
        let addr = SocketAddr::new(options.bind_address, options.secure_port);
        let (_, server) = serve::bind(
            addr,
            serving,
            serve::router(
                health.clone(),
                registry.clone(),
                Some(Arc::new(Authorizer::new(
                    clients.reviews.clone(),
                    options.authorization_always_allow_paths.clone(),
                ))),
            ),
        )
        .await?;
        tokio::spawn(server);
    }
    let mut shutdown = Box::pin(shutdown);
    let start_interval = options.controller_start_interval;
    if !options.leader_elect {
        // Without a lease there is no term to fence on: the shim must not require one.
        tracing::warn!(
            "--leader-elect=false: mutating provider calls carry no fence; run a single \
             controller-manager, and its shim with --fence-lease=none"
        );
        // A single replica by the operator's word: nobody else's writes can be in flight.
        succession_tx.send_replace(Some(Predecessor::None));
        let running = start(built, &ctx.nodes, &metrics, start_interval);
        shutdown.await;
        running.stop().await;
        events.shutdown().await;
        return Ok(());
    }
    let status = SharedStatus::default();
    let lease_duration = options.leader_elect_lease_duration;
    {
        let status = status.clone();
        // Upstream NewLeaderHealthzAdaptor(20s): unhealthy when we think we lead but have not
        // renewed for lease duration + 20 s.
        health.add(
            "leaderElection",
            Scope::Live,
            Arc::new(move || {
                let status = status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match status.last_renew {
                    Some(at)
                        if status.leading
                            && at.elapsed() > lease_duration + Duration::from_secs(20) =>
                    {
                        Err(Unhealthy(format!(
                            "failed to renew leadership for {:?}",
                            at.elapsed()
                        )))
                    }
                    _ => Ok(()),
                }
            }),
        );
    }
    let lease_name = options.leader_elect_resource_name.clone();
    let mut elector = LeaderElector::new(
        clients.leader_election,
        LeaseConfig {
            namespace: options.leader_elect_resource_namespace.clone(),
            name: lease_name.clone(),
            identity,
            lease_duration,
            renew_deadline: options.leader_elect_renew_deadline,
            retry_period: options.leader_elect_retry_period,
        },
        status,
    );
    let Acquired { fence, predecessor } = tokio::select! {
        acquired = elector.acquire() => acquired,
        () = &mut shutdown => return Ok(()),
    };
    metrics.set_leading(&lease_name, true);
    info!(
        lease_transitions = fence.lease_transitions,
        "became leader; starting controllers"
    );
    // Every mutating CPI call from now on carries this term's fence.
    fence_tx.send_replace(Some(fence));
    // Told before any controller starts: node-ipam waits for a predecessor's last writes.
    succession_tx.send_replace(Some(predecessor));
    let running = start(built, &ctx.nodes, &metrics, start_interval);
    let result = tokio::select! {
        lost = elector.hold() => Err(AppError::LeadershipLost(lost)),
        () = &mut shutdown => Ok(()),
    };
    metrics.set_leading(&lease_name, false);
    if result.is_ok() {
        running.stop().await;
    } else {
        // Deposed: another replica may already act; nothing more of ours may run, not even
        // for a graceful stop. (The fence stays: a call already on its way carries this
        // term's, which the shim refuses once the successor has spoken.)
        running.abort().await;
    }
    events.shutdown().await;
    if result.is_ok() {
        elector.release().await;
    } else {
        error!("leader election lost; controllers stopped");
    }
    result
}

/// A controller built and ready to run.
pub struct Built {
    names: Names,
    run: Runner,
}

/// Builds the registry's controllers that `selection` enables and the provider supports
/// (upstream `startControllers`' checks), registering their metrics. An enabled controller
/// whose flags are unusable fails the start-up, as upstream's init errors are fatal.
pub fn build_controllers(
    ctx: &ControllerContext,
    selection: &ControllerSelection,
    registry: Vec<Registered>,
    metrics: &mut Registry,
) -> Result<Vec<Built>, AppError> {
    let capabilities = ctx.cloud.capabilities();
    let mut built = Vec::new();
    for entry in registry {
        let names = entry.names;
        if !selection.is_enabled(&names) {
            info!(
                controller = names.canonical,
                "controller disabled by --controllers"
            );
            continue;
        }
        if !(entry.supported_by)(&capabilities) {
            warn!(
                controller = names.canonical,
                "provider does not support this controller; not starting it"
            );
            continue;
        }
        if entry.fenced
            && let Some(problem) = ctx.cloud.fence_problem()
        {
            warn!(controller = names.canonical, reason = %problem, "not starting controller");
            continue;
        }
        match (entry.build)(ctx, metrics) {
            Ok(run) => built.push(Built { names, run }),
            Err(BuildError::NotImplemented) => warn!(
                controller = names.canonical,
                "controller is not implemented in this build yet; not starting it"
            ),
            Err(BuildError::Invalid(source)) => {
                return Err(AppError::ControllerFlags {
                    controller: names.canonical,
                    source,
                });
            }
            Err(why) => {
                warn!(controller = names.canonical, reason = %why, "not starting controller")
            }
        }
    }
    Ok(built)
}

/// Running controller tasks and the switches that stop them.
pub struct Running {
    stops: Vec<oneshot::Sender<()>>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Signals every controller to stop and waits (bounded) for them.
    pub async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.tasks.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, self.tasks.join_next())
                .await
                .is_err()
            {
                warn!("controllers did not stop within 10s; aborting them");
                self.tasks.abort_all();
                break;
            }
        }
    }

    /// Aborts every controller at once and waits for the aborts to land.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    fn stopper(&mut self) -> Stop {
        let (tx, rx) = oneshot::channel::<()>();
        self.stops.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Starts the built controllers, `--controller-start-interval` apart (jittered), and the
/// shared Node watch if a controller uses it.
fn start(
    built: Vec<Built>,
    nodes: &SharedNodes,
    metrics: &ManagerMetrics,
    start_interval: Duration,
) -> Running {
    let mut running = Running {
        stops: Vec::new(),
        tasks: JoinSet::new(),
    };
    let mut start_delay = Duration::ZERO;
    for controller in built {
        let delay = start_delay;
        start_delay += start_interval.mul_f64(1.0 + rand::random::<f64>());
        let run = (controller.run)(running.stopper());
        let metrics = metrics.clone();
        let alias = controller.names.alias;
        running.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            metrics.set_running(alias, true);
            run.await;
            metrics.set_running(alias, false);
        });
        info!(
            controller = controller.names.canonical,
            "started controller"
        );
    }
    if let Some(informer) = nodes.take() {
        let stop = running.stopper();
        running.tasks.spawn(informer.run(stop));
    }
    running
}

#[cfg(test)]
mod tests;
