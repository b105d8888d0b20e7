//! The `Routes` service: decisions from [`super::plan`], records in the state database,
//! routes in the kernel through [`Kernel`] (or nowhere else in `state-only` mode).
//!
//! A change decides from the records and the in-memory view of the table ([`TableView`]),
//! not from a dump; changes of one destination run one after the other and changes of
//! different destinations overlap, sharing redb commits ([`super::serial`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use cpi_proto::CpiError;
use cpi_proto::v1::{CreateRouteResponse, DeleteRouteResponse, ListRoutesResponse, Route};
use ipnet::IpNet;
use prometheus_client::registry::Registry;

use super::config::{RouteFlags, RouteMode, RouteTableId};
use super::kernel::{EEXIST, ENETUNREACH, Kernel, KernelError};
use super::metrics::RouteMetrics;
use super::page::page;
use super::plan::{
    KernelRoute, Owned, PlanError, Records, RouteRecord, StartupAction, choose_gateway,
    parse_destination, plan_create, plan_delete, plan_startup, recorded_table, view,
};
use super::serial::{DestinationLocks, RouteCommits};
use super::table::{ProgramOp, TableView, program_op};
use crate::lb::commit::CommitError;
use crate::store::{RouteWrite, Store, StoreError};

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
    commits: RouteCommits,
    mode: RouteMode,
    netns: Option<PathBuf>,
    table: RouteTableId,
    protocol: u8,
    onlink_device: Option<String>,
    capacity: Option<u32>,
    /// Set by [`LocalRoutes::restore`] in `kernel` mode.
    kernel: OnceLock<Kernel>,
    /// The records, mirrored from the database once durable; locked only to read or update
    /// the map, never across IO.
    records: Mutex<Records>,
    /// The kernel table as last dumped and changed by the shim (`kernel` mode).
    table_view: Mutex<TableView>,
    /// Held across each change of a destination, so that a route is decided, persisted and
    /// programmed as one step.
    destinations: DestinationLocks,
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

fn commit_error(error: CommitError) -> CpiError {
    let why = match error {
        CommitError::Failed(why) | CommitError::Behind(why) | CommitError::Stale(why) => why,
        CommitError::WriterGone => "the state writer stopped".into(),
    };
    CpiError::Cloud(format!("route not changed: {why}"))
}

/// Locks a map that is only read or updated in place under the lock: a panic elsewhere cannot
/// leave it half-changed, so a poisoned lock is still consistent.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
                commits: RouteCommits::new(store),
                mode: flags.mode,
                netns: flags.netns_path(),
                table: flags.route_table,
                protocol: flags.route_protocol,
                onlink_device: flags.route_onlink_device.clone(),
                capacity: flags.route_capacity,
                kernel: OnceLock::new(),
                records: Mutex::new(records),
                table_view: Mutex::new(TableView::default()),
                destinations: DestinationLocks::default(),
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
                routes = locked(&inner.records).len(),
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
        // Nothing is served yet: the records cannot change under the start-up plan.
        let records = locked(&inner.records).clone();
        let table = kernel.list().await.inspect_err(|_| {
            inner.metrics.netlink_error("list");
        })?;
        let plan = plan_startup(&records, &table, inner.protocol);
        let mut table_view = TableView::from_dump(table);
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
                    table_view.programmed(*destination, *gateway, inner.protocol);
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
        *locked(&inner.table_view) = table_view;
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

    /// The whole table as the kernel has it (refreshing the view), or as recorded in
    /// `state-only` mode.
    async fn table(&self) -> Result<Vec<KernelRoute>, CpiError> {
        match self.inner.mode {
            RouteMode::StateOnly => Ok(recorded_table(
                &locked(&self.inner.records),
                self.inner.protocol,
            )),
            RouteMode::Kernel => self.dump(None).await.map(|(table, _)| table),
        }
    }

    /// Dumps the table into the view; also returns what the dump has at `held` (a
    /// destination the caller has locked).
    async fn dump(
        &self,
        held: Option<&IpNet>,
    ) -> Result<(Vec<KernelRoute>, Vec<KernelRoute>), CpiError> {
        let kernel = self.kernel()?;
        let before = locked(&self.inner.table_view).changes();
        let table = kernel.list().await.map_err(|error| {
            self.inner.metrics.netlink_error("list");
            CpiError::Cloud(error.to_string())
        })?;
        let at = locked(&self.inner.table_view).refresh(table.clone(), before, held);
        Ok((table, at))
    }

    /// The routes known at `destination`: the view's in `kernel` mode, the record's in
    /// `state-only` mode.
    fn table_at(&self, destination: &IpNet) -> Vec<KernelRoute> {
        match self.inner.mode {
            RouteMode::StateOnly => locked(&self.inner.records)
                .get(destination)
                .map(|owned| KernelRoute {
                    destination: *destination,
                    gateway: Some(owned.record.gateway),
                    protocol: self.inner.protocol,
                    blackhole: false,
                })
                .into_iter()
                .collect(),
            RouteMode::Kernel => locked(&self.inner.table_view).at(destination),
        }
    }

    fn kernel(&self) -> Result<&Kernel, CpiError> {
        self.inner
            .kernel
            .get()
            .ok_or_else(|| CpiError::Cloud("routes: the routing table is not connected yet".into()))
    }

    /// Makes the record of `destination` durable (`None`: removes it), then mirrors it.
    async fn write(
        &self,
        cluster: &str,
        destination: &IpNet,
        record: Option<&Owned>,
    ) -> Result<(), CpiError> {
        let value = match record {
            Some(owned) => Some(
                serde_json::to_vec(&owned.record)
                    .map_err(|e| CpiError::Cloud(format!("encoding a route record: {e}")))?,
            ),
            None => None,
        };
        self.inner
            .commits
            .write(RouteWrite {
                cluster: cluster.to_string(),
                destination: destination.to_string(),
                value,
            })
            .await
            .map_err(commit_error)?;
        let mut records = locked(&self.inner.records);
        match record {
            Some(owned) => records.insert(*destination, owned.clone()),
            None => records.remove(destination),
        };
        self.inner.metrics.managed.set(records.len() as i64);
        Ok(())
    }

    fn program_error(&self, error: KernelError, gateway: IpAddr, node: &str) -> CpiError {
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
    }

    /// Puts `wanted` (just recorded for `cluster`) into the kernel, given the routes `at` its
    /// destination as the view knows them. A destination the view shows free is added
    /// exclusively; if the kernel has a route there after all, the table is dumped and the
    /// create decided again, so a foreign route is refused (`NOT_OWNED`), never replaced.
    async fn program(
        &self,
        cluster: &str,
        destination: &IpNet,
        wanted: &RouteRecord,
        at: &[KernelRoute],
    ) -> Result<(), CpiError> {
        if self.inner.mode == RouteMode::StateOnly {
            // The record is the route.
            return Ok(());
        }
        let kernel = self.kernel()?;
        let (gateway, node, protocol) = (wanted.gateway, &wanted.target_node, self.inner.protocol);
        let added = match program_op(at, destination, protocol) {
            ProgramOp::Replace => kernel.replace(destination, gateway).await,
            ProgramOp::AddExclusive => kernel.add(destination, gateway).await,
        };
        match added {
            Ok(()) => {}
            Err(KernelError::Request {
                errno: Some(EEXIST),
                ..
            }) => {
                let (_, fresh) = self.dump(Some(destination)).await?;
                let recorded = Owned {
                    cluster: cluster.to_string(),
                    record: wanted.clone(),
                };
                let plan = plan_create(
                    cluster,
                    destination,
                    wanted,
                    Some(&recorded),
                    &fresh,
                    protocol,
                )?;
                if plan.program {
                    kernel
                        .replace(destination, gateway)
                        .await
                        .map_err(|error| self.program_error(error, gateway, node))?;
                }
            }
            Err(error) => return Err(self.program_error(error, gateway, node)),
        }
        locked(&self.inner.table_view).programmed(*destination, gateway, protocol);
        Ok(())
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
        let _destination = self.inner.destinations.lock(destination).await;
        let previous = locked(&self.inner.records).get(&destination).cloned();
        let at = self.table_at(&destination);
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
            &at,
            self.inner.protocol,
        )?;
        if plan.is_noop() {
            return Ok("noop");
        }
        // Intent first: a crash before programming leaves a record that start-up programs.
        if plan.write_record {
            let owned = Owned {
                cluster: cluster.clone(),
                record: wanted.clone(),
            };
            self.write(&cluster, &destination, Some(&owned)).await?;
        }
        if plan.program
            && let Err(error) = self.program(&cluster, &destination, &wanted, &at).await
        {
            if plan.write_record {
                self.roll_back(&cluster, &destination, previous).await;
            }
            return Err(error);
        }
        // Per call and on the hot path: debug, not info (errors and warnings stay loud).
        tracing::debug!(%cluster, %destination, node = %route.target_node, %gateway, "route created");
        Ok("success")
    }

    /// Puts the record back as it was before a failed create.
    async fn roll_back(&self, cluster: &str, destination: &IpNet, previous: Option<Owned>) {
        let cluster = previous.as_ref().map_or(cluster, |p| p.cluster.as_str());
        // The new record stays on failure: start-up (or the next create) programs it again.
        if let Err(error) = self.write(cluster, destination, previous.as_ref()).await {
            tracing::warn!(%destination, %error, "routes: could not roll back a route record");
        }
    }

    async fn delete(&self, cluster: String, route: Route) -> Result<&'static str, CpiError> {
        let destination = parse_destination(&route.destination_cidr)?;
        let _destination = self.inner.destinations.lock(destination).await;
        let recorded = locked(&self.inner.records).get(&destination).cloned();
        let at = self.table_at(&destination);
        let plan = plan_delete(
            &cluster,
            &destination,
            recorded.as_ref(),
            &at,
            self.inner.protocol,
        )?;
        if !plan.forget_record && !plan.unprogram {
            return Ok("noop");
        }
        if plan.forget_record {
            self.write(&cluster, &destination, None).await?;
        }
        // A recorded route is ours even if the view missed it; the kernel matches the protocol
        // of a delete, so another's route at the destination is never removed.
        if self.inner.mode == RouteMode::Kernel {
            let kernel = self.kernel()?;
            kernel.delete(&destination).await.map_err(|error| {
                self.inner.metrics.netlink_error("delete");
                CpiError::Cloud(error.to_string())
            })?;
            locked(&self.inner.table_view).unprogrammed(&destination, self.inner.protocol);
        }
        tracing::debug!(%cluster, %destination, "route deleted");
        Ok("success")
    }

    async fn list(
        &self,
        cluster: String,
        page_size: u32,
        page_token: String,
    ) -> Result<ListRoutesResponse, CpiError> {
        let table = self.table().await?;
        let listed = view(
            &cluster,
            &locked(&self.inner.records),
            &table,
            self.inner.protocol,
        );
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
        // A task of its own: a caller going away must not stop a change between its record
        // and its route (or its roll-back).
        let this = self.clone();
        let result = tokio::spawn(async move { this.create(cluster_name, name_hint, route).await })
            .await
            .unwrap_or_else(|join| {
                Err(CpiError::Cloud(format!(
                    "creating the route failed: {join}"
                )))
            });
        self.count("create", &result, |r| r);
        result.map(|_| CreateRouteResponse {})
    }

    async fn delete_route(
        &self,
        cluster_name: String,
        route: Route,
    ) -> Result<DeleteRouteResponse, CpiError> {
        let this = self.clone();
        let result = tokio::spawn(async move { this.delete(cluster_name, route).await })
            .await
            .unwrap_or_else(|join| {
                Err(CpiError::Cloud(format!(
                    "deleting the route failed: {join}"
                )))
            });
        self.count("delete", &result, |r| r);
        result.map(|_| DeleteRouteResponse {})
    }
}
