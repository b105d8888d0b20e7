//! Wiring of the controller-manager: API client, provider shim, secure port, leader election
//! and the controllers the provider supports and `--controllers` enables.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::apiclient::{RateLimitLayer, RequestMetricsLayer};
use crate::auth::Authorizer;
use crate::cloud::{Cloud, CloudError};
use crate::controllers::NodeInformer;
use crate::controllers::node::{NodeController, NodeControllerConfig};
use crate::controllers::node_lifecycle::NodeLifecycleController;
use crate::events::EventBroadcaster;
use crate::leader::{LeaderElector, LeaseConfig, Lost, SharedStatus};
use crate::metrics::{LeaseLabels, Metrics};
use crate::names::{ControllerName, ControllerSelection};
use crate::options::{Options, OptionsError};
use crate::serve::{self, Health, Scope};

/// Why the controller-manager stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Invalid flags.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The kubeconfig could not be loaded.
    #[error("loading the API server configuration: {0}")]
    KubeConfig(String),
    /// The API client could not be built.
    #[error("building the API client: {0}")]
    KubeClient(#[from] kube::Error),
    /// The provider shim could not be used.
    #[error(transparent)]
    Cloud(#[from] CloudError),
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
    /// Leadership was lost; upstream exits so the process restarts as a candidate.
    #[error("leaderelection lost: {0}")]
    LeadershipLost(#[from] Lost),
}

/// Everything controllers need, built once at start-up.
#[derive(Clone)]
pub struct Runtime {
    /// API client of the controllers (rate limited).
    pub client: kube::Client,
    /// Provider shim.
    pub cloud: Cloud,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Our leader-election identity (also the event reporting instance).
    pub identity: String,
    /// Writes the controllers' Events in the background.
    pub events: EventBroadcaster,
}

/// Loads the API-server configuration from `--kubeconfig`/`--master` or the cluster.
pub async fn kube_config(options: &Options) -> Result<kube::Config, AppError> {
    let mut config = if options.kubeconfig.is_empty() {
        kube::Config::infer()
            .await
            .map_err(|e| AppError::KubeConfig(e.to_string()))?
    } else {
        let kubeconfig = Kubeconfig::read_from(&options.kubeconfig).map_err(|e| {
            AppError::KubeConfig(format!("--kubeconfig={}: {e}", options.kubeconfig))
        })?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| {
                AppError::KubeConfig(format!("--kubeconfig={}: {e}", options.kubeconfig))
            })?
    };
    if !options.master.is_empty() {
        config.cluster_url = options
            .master
            .parse()
            .map_err(|e| AppError::KubeConfig(format!("--master={}: {e}", options.master)))?;
    }
    Ok(config)
}

/// The API clients: both over one connection pool, each with its own `--kube-api-qps/burst`
/// token bucket.
pub struct KubeClients {
    /// For the controllers.
    pub controllers: kube::Client,
    /// For leader election and the secure port's token and access reviews: as upstream's
    /// separate leader-election client, lease renewals never queue behind a burst of
    /// controller writes (which could cost the lease).
    pub control: kube::Client,
}

/// Builds the rate-limited, instrumented API clients. Unlike kube's default stack (HTTP/1.1,
/// one TLS connection per request in flight) they negotiate HTTP/2, so every request and watch
/// shares one multiplexed connection: with tens of node workers that saves a TLS handshake and
/// connection buffers per worker (measured in `bench node-init`).
pub fn kube_clients(
    config: &kube::Config,
    options: &Options,
    metrics: &Arc<Metrics>,
) -> Result<KubeClients, AppError> {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    // ALPN (h2, then http/1.1) is set by the connector builder.
    let tls = config.rustls_client_config()?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            // Detect a dead connection (its watches would hang) without a read timeout.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(https);
    // The hyper client is a handle on one pool: both clients share its connection.
    let client = |hyper_client| -> Result<kube::Client, AppError> {
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer()?)
            .layer(config.extra_headers_layer()?)
            .map_err(tower::BoxError::from)
            .service(hyper_client);
        Ok(
            kube::client::ClientBuilder::new(service, config.default_namespace.clone())
                .with_layer(&RequestMetricsLayer::new(metrics.clone()))
                .with_layer(&RateLimitLayer::new(
                    options.kube_api_qps,
                    options.kube_api_burst,
                ))
                .build(),
        )
    };
    Ok(KubeClients {
        controllers: client(hyper_client.clone())?,
        control: client(hyper_client)?,
    })
}

/// Controllers to run: enabled by `--controllers` and supported by the provider.
pub fn controllers_to_run(selection: &ControllerSelection, cloud: &Cloud) -> Vec<ControllerName> {
    let capabilities = cloud.capabilities();
    ControllerName::ALL
        .into_iter()
        .filter(|c| {
            if !selection.is_enabled(*c) {
                info!(
                    controller = c.canonical(),
                    "controller disabled by --controllers"
                );
                return false;
            }
            if !c.supported_by(&capabilities) {
                warn!(
                    controller = c.canonical(),
                    "provider does not support this controller; not starting it"
                );
                return false;
            }
            true
        })
        .collect()
}

/// How often the shim is probed for `/readyz`.
const PROVIDER_PROBE_PERIOD: Duration = Duration::from_secs(10);

/// Runs the controller-manager until `shutdown` resolves or leadership is lost.
pub async fn run(
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let selection = options.validate()?;
    let metrics = Metrics::new();
    let config = kube_config(&options).await?;
    let clients = kube_clients(&config, &options, &metrics)?;
    let endpoint = options.provider_endpoint()?;
    let cloud = Cloud::connect(
        &endpoint,
        options.provider_timeout,
        options.provider_tls_reload_interval,
        options.provider_startup_timeout,
    )
    .await?;
    if !options.cloud_provider.is_empty() && options.cloud_provider != cloud.info().name {
        return Err(AppError::ProviderMismatch {
            flag: options.cloud_provider.clone(),
            shim: cloud.info().name.clone(),
        });
    }
    let controllers = controllers_to_run(&selection, &cloud);
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
    let events = EventBroadcaster::start(clients.controllers.clone(), &identity);
    let runtime = Runtime {
        client: clients.controllers,
        cloud,
        metrics: metrics.clone(),
        identity: identity.clone(),
        events,
    };
    if options.secure_port != 0 {
        let acceptor = serve::tls_acceptor(
            options
                .tls_cert_file
                .as_deref()
                .zip(options.tls_private_key_file.as_deref()),
        )?;
        let addr = SocketAddr::new(options.bind_address, options.secure_port);
        let (_, server) = serve::bind(
            addr,
            acceptor,
            serve::router(
                health.clone(),
                metrics.clone(),
                Some(Arc::new(Authorizer::new(
                    clients.control.clone(),
                    options.authorization_always_allow_paths.clone(),
                ))),
            ),
        )
        .await?;
        tokio::spawn(server);
    }
    let mut shutdown = Box::pin(shutdown);
    if !options.leader_elect {
        let running = start_controllers(&runtime, &options, &controllers);
        shutdown.await;
        running.stop().await;
        runtime.events.shutdown().await;
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
                    .map_err(|_| "status lock poisoned".to_string())?;
                match status.last_renew {
                    Some(at)
                        if status.leading
                            && at.elapsed() > lease_duration + Duration::from_secs(20) =>
                    {
                        Err(format!("failed to renew leadership for {:?}", at.elapsed()))
                    }
                    _ => Ok(()),
                }
            }),
        );
    }
    let lease_gauge = metrics
        .leader_election_master_status
        .get_or_create(&LeaseLabels {
            name: options.leader_elect_resource_name.clone(),
        })
        .clone();
    let mut elector = LeaderElector::new(
        clients.control,
        LeaseConfig {
            namespace: options.leader_elect_resource_namespace.clone(),
            name: options.leader_elect_resource_name.clone(),
            identity,
            lease_duration,
            renew_deadline: options.leader_elect_renew_deadline,
            retry_period: options.leader_elect_retry_period,
        },
        status,
    );
    let fence = tokio::select! {
        fence = elector.acquire() => fence,
        () = &mut shutdown => return Ok(()),
    };
    lease_gauge.set(1);
    info!(
        lease_transitions = fence.lease_transitions,
        "became leader; starting controllers"
    );
    let running = start_controllers(&runtime, &options, &controllers);
    let result = tokio::select! {
        lost = elector.hold() => Err(AppError::LeadershipLost(lost)),
        () = &mut shutdown => Ok(()),
    };
    lease_gauge.set(0);
    running.stop().await;
    runtime.events.shutdown().await;
    if result.is_ok() {
        elector.release().await;
    } else {
        error!("leader election lost; controllers stopped");
    }
    result
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
}

fn start_controllers(
    runtime: &Runtime,
    options: &Options,
    controllers: &[ControllerName],
) -> Running {
    let mut running = Running {
        stops: Vec::new(),
        tasks: JoinSet::new(),
    };
    let stopper = |running: &mut Running| {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        running.stops.push(stop_tx);
        async move {
            let _ = stop_rx.await;
        }
    };
    // One Node watch serves every node controller.
    let needs_nodes = controllers.iter().any(|c| {
        matches!(
            c,
            ControllerName::CloudNode | ControllerName::CloudNodeLifecycle
        )
    });
    let informer = needs_nodes.then(|| NodeInformer::new(runtime.client.clone()));
    // Upstream `--controller-start-interval`: a jittered pause between two controller starts.
    let mut start_delay = Duration::ZERO;
    for controller in controllers {
        let delay = start_delay;
        start_delay += options
            .controller_start_interval
            .mul_f64(1.0 + rand::random::<f64>());
        let stop = stopper(&mut running);
        let rt = runtime.clone();
        let alias = controller.alias();
        match (controller, informer.as_ref()) {
            (ControllerName::CloudNode, Some(informer)) => {
                let Some(changes) = informer.subscribe() else {
                    warn!(
                        "node informer cannot be subscribed to; cloud-node controller not started"
                    );
                    continue;
                };
                let store = informer.store.clone();
                let config = NodeControllerConfig {
                    workers: options.concurrent_node_syncs,
                    status_update_frequency: options.node_status_update_frequency,
                    status_update_workers: options.node_status_update_workers(),
                };
                let controller = NodeController::new(
                    rt.client.clone(),
                    rt.cloud.clone(),
                    rt.metrics.clone(),
                    store,
                    &rt.events,
                );
                running.tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    rt.metrics.set_running(alias, true);
                    controller.run(changes, config, stop).await;
                    rt.metrics.set_running(alias, false);
                });
            }
            (ControllerName::CloudNodeLifecycle, Some(informer)) => {
                let controller = NodeLifecycleController::new(
                    rt.client.clone(),
                    rt.cloud.clone(),
                    rt.metrics.clone(),
                    informer.store.clone(),
                    &rt.events,
                )
                .with_deletion_policy(options.deletion_policy());
                let period = options.node_monitor_period;
                let ready = informer.ready();
                running.tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    rt.metrics.set_running(alias, true);
                    controller.run(period, ready, stop).await;
                    rt.metrics.set_running(alias, false);
                });
            }
            (other, _) => {
                warn!(
                    controller = other.canonical(),
                    "controller is not implemented in this build yet; not starting it"
                );
                continue;
            }
        }
        info!(controller = controller.canonical(), "started controller");
    }
    if let Some(informer) = informer {
        let stop = stopper(&mut running);
        running.tasks.spawn(informer.run(stop));
    }
    running
}
