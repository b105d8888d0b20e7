//! The `Routes` service: decisions from [`super::plan`], records in the state database,
//! routes in the kernel through [`Kernel`] (or nowhere else in `state-only` mode).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use cpi_proto::CpiError;
use cpi_proto::v1::{CreateRouteResponse, DeleteRouteResponse, ListRoutesResponse, Route};
use ipnet::IpNet;
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;

use super::config::{RouteFlags, RouteMode, RouteTableId};
use super::kernel::{ENETUNREACH, Kernel, KernelError};
use super::metrics::RouteMetrics;
use super::page::page;
use super::plan::{
    KernelRoute, Owned, PlanError, Records, RouteRecord, StartupAction, choose_gateway,
    parse_destination, plan_create, plan_delete, plan_startup, recorded_table, view,
};
use crate::store::{Store, StoreError};

/// Why routes could not be restored at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The routing table could not be reached or repaired.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A stored route cannot be read; refusing to start rather than forget a route of ours.
    #[error(
        "state database routes_v1 row ({cluster:?}, {destination:?}) is unreadable ({error}); \
         refusing to start, as the route would no longer be known as the shim's"
    )]
    Corrupt {
        /// Cluster of the row.
        cluster: String,
        /// Destination of the row.
        destination: String,
        /// Decoding error.
        error: String,
    },
}

struct Inner {
    store: Store,
    mode: RouteMode,
    netns: Option<PathBuf>,
    table: RouteTableId,
    protocol: u8,
    onlink_device: Option<String>,
    capacity: Option<u32>,
    /// Set by [`LocalRoutes::restore`] in `kernel` mode.
    kernel: OnceLock<Kernel>,
    /// The records, mirrored from the database; held across each change so that a route is
    /// decided, persisted and programmed as one step.
    records: Mutex<Records>,
    metrics: RouteMetrics,
}

/// The local shim's routes; cheap to clone.
#[derive(Clone)]
pub struct LocalRoutes {
    inner: Arc<Inner>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn store_error(error: StoreError) -> CpiError {
    CpiError::Cloud(format!("route not changed: {error}"))
}

impl LocalRoutes {
    /// Loads the recorded routes (blocking); the table is reached by [`LocalRoutes::restore`].
    pub fn new(store: Store, flags: &RouteFlags) -> Result<Self, RouteError> {
        let mut records = Records::new();
        for row in store.load_routes()? {
            let corrupt = |error: String| RouteError::Corrupt {
                cluster: row.cluster.clone(),
                destination: row.destination.clone(),
                error,
            };
            let destination: IpNet = row
                .destination
                .parse()
                .map_err(|e: ipnet::AddrParseError| corrupt(e.to_string()))?;
            let record: RouteRecord =
                serde_json::from_slice(&row.value).map_err(|e| corrupt(e.to_string()))?;
            records.insert(
                destination,
                Owned {
                    cluster: row.cluster.clone(),
                    record,
                },
            );
        }
        let metrics = RouteMetrics::default();
        metrics.managed.set(records.len() as i64);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                mode: flags.mode,
                netns: flags.netns_path(),
                table: flags.route_table,
                protocol: flags.route_protocol,
                onlink_device: flags.route_onlink_device.clone(),
                capacity: flags.route_capacity,
                kernel: OnceLock::new(),
                records: Mutex::new(records),
                metrics,
            }),
        })
    }

    /// Registers the route metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
    }

    /// Before serving: connects to the table (`kernel` mode) and brings it in line with the
    /// records: a recorded route missing is added, one with another next hop re-programmed;
    /// routes of ours without a record are left for the controller, others untouched.
    pub async fn restore(&self) -> Result<(), RouteError> {
        let inner = &self.inner;
        if inner.mode == RouteMode::StateOnly {
            tracing::info!(
                routes = inner.records.lock().await.len(),
                "routes: state-only mode, no routing table is touched"
            );
            return Ok(());
        }
        let kernel = Kernel::open(
            inner.netns.as_deref(),
            inner.table.0,
            inner.protocol,
            inner.onlink_device.as_deref(),
        )
        .await?;
        let kernel = inner.kernel.get_or_init(|| kernel);
        let records = inner.records.lock().await;
        let table = kernel.list().await.inspect_err(|_| {
            inner.metrics.netlink_error("list");
        })?;
        let plan = plan_startup(&records, &table, inner.protocol);
        let (mut added, mut reprogrammed, mut failed) = (0, 0, 0);
        for action in &plan.actions {
            let (destination, gateway, counter) = match action {
                StartupAction::Add {
                    destination,
                    gateway,
                } => (destination, gateway, &mut added),
                StartupAction::Reprogram {
                    destination,
                    gateway,
                } => (destination, gateway, &mut reprogrammed),
            };
            match kernel.replace(destination, *gateway).await {
                Ok(()) => {
                    *counter += 1;
                    inner.metrics.operation("restore", "success");
                }
                // Left for the controller's next create, which reports it on the node.
                Err(error) => {
                    failed += 1;
                    inner.metrics.netlink_error("program");
                    inner.metrics.operation("restore", "error");
                    tracing::warn!(%error, "routes: could not restore a recorded route");
                }
            }
        }
        for destination in &plan.blocked {
            tracing::warn!(
                %destination,
                "routes: a recorded destination is now routed by another protocol; left alone"
            );
        }
        tracing::info!(
            netns = %inner.netns.as_deref().map_or("(own)".into(), |p| p.display().to_string()),
            table = %inner.table,
            protocol = inner.protocol,
            recorded = records.len(),
            in_place = plan.in_place,
            added,
            reprogrammed,
            failed,
            blocked = plan.blocked.len(),
            unrecorded = plan.unrecorded,
            "routes: routing table reconciled with the state database"
        );
        Ok(())
    }

    /// The table as the kernel has it, or as recorded in `state-only` mode.
    async fn table(&self, records: &Records) -> Result<Vec<KernelRoute>, CpiError> {
        match self.inner.mode {
            RouteMode::StateOnly => Ok(recorded_table(records, self.inner.protocol)),
            RouteMode::Kernel => {
                let kernel = self.kernel()?;
                kernel.list().await.map_err(|error| {
                    self.inner.metrics.netlink_error("list");
                    CpiError::Cloud(error.to_string())
                })
            }
        }
    }

    fn kernel(&self) -> Result<&Kernel, CpiError> {
        self.inner
            .kernel
            .get()
            .ok_or_else(|| CpiError::Cloud("routes: the routing table is not connected yet".into()))
    }

    async fn write(
        &self,
        cluster: &str,
        destination: &IpNet,
        record: Option<&RouteRecord>,
    ) -> Result<(), CpiError> {
        let value = match record {
            Some(record) => Some(
                serde_json::to_vec(record)
                    .map_err(|e| CpiError::Cloud(format!("encoding a route record: {e}")))?,
            ),
            None => None,
        };
        let store = self.inner.store.clone();
        let (cluster, destination) = (cluster.to_string(), destination.to_string());
        tokio::task::spawn_blocking(move || {
            store.write_route(&cluster, &destination, value.as_deref())
        })
        .await
        .map_err(|e| CpiError::Cloud(format!("route not changed: writing task failed: {e}")))?
        .map_err(store_error)
    }

    async fn program(
        &self,
        destination: &IpNet,
        gateway: IpAddr,
        node: &str,
    ) -> Result<(), CpiError> {
        let Some(kernel) = self.inner.kernel.get() else {
            // state-only: the record is the route.
            return Ok(());
        };
        kernel.replace(destination, gateway).await.map_err(|error| {
            self.inner.metrics.netlink_error("program");
            match &error {
                KernelError::Request {
                    errno: Some(ENETUNREACH),
                    ..
                } => CpiError::Cloud(format!(
                    "next hop {gateway} of node {node:?} is unreachable from table {} of the \
                     route namespace ({}): no connected network holds it; put the node network \
                     on an interface there or set --route-onlink-device ({error})",
                    self.inner.table,
                    self.inner
                        .netns
                        .as_deref()
                        .map_or("the shim's own".into(), |p| p.display().to_string()),
                )),
                _ => CpiError::Cloud(error.to_string()),
            }
        })
    }

    async fn create(
        &self,
        cluster: String,
        name_hint: String,
        route: Route,
    ) -> Result<&'static str, CpiError> {
        if cluster.is_empty() {
            return Err(PlanError::Invalid {
                field: "cluster_name",
                message: "must not be empty".into(),
            }
            .into());
        }
        let destination = parse_destination(&route.destination_cidr)?;
        if route.target_node.is_empty() {
            return Err(PlanError::Invalid {
                field: "route.target_node",
                message: "must not be empty".into(),
            }
            .into());
        }
        let gateway = choose_gateway(
            &route.target_node,
            &destination,
            &route.target_node_addresses,
        )?;
        let mut records = self.inner.records.lock().await;
        let table = self.table(&records).await?;
        let previous = records.get(&destination).cloned();
        let created_unix = previous
            .as_ref()
            .filter(|p| p.cluster == cluster && p.record.target_node == route.target_node)
            .map_or_else(now_unix, |p| p.record.created_unix);
        let wanted = RouteRecord {
            target_node: route.target_node.clone(),
            node_addresses: route
                .target_node_addresses
                .iter()
                .map(|a| (a.r#type, a.address.clone()))
                .collect(),
            name_hint,
            gateway,
            created_unix,
        };
        let plan = plan_create(
            &cluster,
            &destination,
            &wanted,
            previous.as_ref(),
            &table,
            self.inner.protocol,
        )?;
        if plan.is_noop() {
            return Ok("noop");
        }
        // Intent first: a crash before programming leaves a record that start-up programs.
        if plan.write_record {
            self.write(&cluster, &destination, Some(&wanted)).await?;
            records.insert(
                destination,
                Owned {
                    cluster: cluster.clone(),
                    record: wanted.clone(),
                },
            );
            self.inner.metrics.managed.set(records.len() as i64);
        }
        if plan.program
            && let Err(error) = self
                .program(&destination, gateway, &route.target_node)
                .await
        {
            if plan.write_record {
                self.roll_back(&mut records, &cluster, &destination, previous)
                    .await;
            }
            return Err(error);
        }
        tracing::info!(%cluster, %destination, node = %route.target_node, %gateway, "route created");
        Ok("success")
    }

    /// Puts the record back as it was before a failed create.
    async fn roll_back(
        &self,
        records: &mut Records,
        cluster: &str,
        destination: &IpNet,
        previous: Option<Owned>,
    ) {
        let restored = self
            .write(cluster, destination, previous.as_ref().map(|p| &p.record))
            .await;
        match (restored, previous) {
            (Ok(()), Some(previous)) => {
                records.insert(*destination, previous);
            }
            (Ok(()), None) => {
                records.remove(destination);
            }
            // The new record stays: start-up (or the next create) programs it again.
            (Err(error), _) => {
                tracing::warn!(%destination, %error, "routes: could not roll back a route record");
            }
        }
        self.inner.metrics.managed.set(records.len() as i64);
    }

    async fn delete(&self, cluster: String, route: Route) -> Result<&'static str, CpiError> {
        let destination = parse_destination(&route.destination_cidr)?;
        let mut records = self.inner.records.lock().await;
        let table = self.table(&records).await?;
        let plan = plan_delete(
            &cluster,
            &destination,
            records.get(&destination),
            &table,
            self.inner.protocol,
        )?;
        if !plan.forget_record && !plan.unprogram {
            return Ok("noop");
        }
        if plan.forget_record {
            self.write(&cluster, &destination, None).await?;
            records.remove(&destination);
            self.inner.metrics.managed.set(records.len() as i64);
        }
        if plan.unprogram
            && let Some(kernel) = self.inner.kernel.get()
        {
            kernel.delete(&destination).await.map_err(|error| {
                self.inner.metrics.netlink_error("delete");
                CpiError::Cloud(error.to_string())
            })?;
        }
        tracing::info!(%cluster, %destination, "route deleted");
        Ok("success")
    }

    async fn list(
        &self,
        cluster: String,
        page_size: u32,
        page_token: String,
    ) -> Result<ListRoutesResponse, CpiError> {
        let listed = {
            let records = self.inner.records.lock().await;
            let table = self.table(&records).await?;
            view(&cluster, &records, &table, self.inner.protocol)
        };
        let (routes, next_page_token) = page(listed, page_size, &page_token)?;
        Ok(ListRoutesResponse {
            routes,
            next_page_token,
            capacity: self.inner.capacity,
        })
    }

    fn count<T>(
        &self,
        op: &'static str,
        result: &Result<T, CpiError>,
        ok: impl Fn(&T) -> &'static str,
    ) {
        let label = match result {
            Ok(value) => ok(value),
            Err(_) => "error",
        };
        self.inner.metrics.operation(op, label);
    }
}

#[tonic::async_trait]
impl shim_framework::Routes for LocalRoutes {
    async fn list_routes(
        &self,
        cluster_name: String,
        page_size: u32,
        page_token: String,
    ) -> Result<ListRoutesResponse, CpiError> {
        let result = self.list(cluster_name, page_size, page_token).await;
        self.count("list", &result, |_| "success");
        result
    }

    async fn create_route(
        &self,
        cluster_name: String,
        name_hint: String,
        route: Route,
    ) -> Result<CreateRouteResponse, CpiError> {
        let result = self.create(cluster_name, name_hint, route).await;
        self.count("create", &result, |r| r);
        result.map(|_| CreateRouteResponse {})
    }

    async fn delete_route(
        &self,
        cluster_name: String,
        route: Route,
    ) -> Result<DeleteRouteResponse, CpiError> {
        let result = self.delete(cluster_name, route).await;
        self.count("delete", &result, |r| r);
        result.map(|_| DeleteRouteResponse {})
    }
}
