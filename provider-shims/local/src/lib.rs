//! The embedded local provider: machines from an inventory file, state in a crash-safe embedded
//! database.
//!
//! The inventory (YAML, `--inventory`) is the local "cloud": it is re-read every
//! `--inventory-reload-interval`, a broken edit keeps the last good version, and a machine absent
//! from it or `terminated` is authoritatively gone. Because of that, an edit that empties the
//! inventory or removes more than `--inventory-max-drop-percent` of its machines at once is
//! refused like a broken one (see [`shrink`]). State the shim must not forget across
//! restarts (the fence high-water marks, load-balancer addresses) lives in
//! `<--state-dir>/state.redb`.
//!
//! Served: Provider, InstancesV2, Instances, Zones, LoadBalancer ([`lb`]: an in-process L4
//! proxy per Service, addresses from the pools of `--lb-config`), LoadBalancerValidation (the
//! same rules, for the admission webhook), Routes ([`routes`]: pod CIDRs routed through node
//! InternalIPs in a Linux routing table, over netlink) and, with `--csi-driver-name`,
//! VolumeLabels ([`volumes`]: that driver's volumes get their machine's zone and region). Provider IDs are
//! `local://<instanceID>`; nodes carrying any other provider ID are answered NOT_OWNED by the
//! framework.

pub mod instances;
pub mod inventory;
pub mod lb;
pub mod reload;
pub mod routes;
pub mod shrink;
mod state_file;
pub mod store;
pub mod volumes;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use cpi_proto::v1::Zone;
use shim_framework::{RunningShim, ServeFlags, ShimError, ShimServer};

pub use instances::{LocalProvider, PROVIDER_NAME};
pub use inventory::{Inventory, InventoryError, Machine, MachineState};
pub use lb::{LbError, LbFlags, LocalLoadBalancer};
pub use reload::InventoryHandle;
pub use routes::{LocalRoutes, RouteError, RouteFlags};
pub use shrink::{Shrink, ShrinkPolicy, ShrinkVerdict};
pub use store::{Store, StoreError};
pub use volumes::{LocalVolumes, MACHINE_ATTRIBUTE, VolumeFlags};

/// Command line of the `local-shim` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "local-shim",
    version,
    about = "The local CPI provider shim: machines from an inventory file"
)]
pub struct LocalFlags {
    /// Serving flags shared by every shim.
    #[command(flatten)]
    pub serve: ServeFlags,

    /// Inventory file (YAML) listing the machines.
    #[arg(long, value_name = "PATH")]
    pub inventory: PathBuf,

    /// How often the inventory file is checked for changes; 0 disables reloading.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub inventory_reload_interval: Duration,

    /// A reload removing more than this percentage of the machines served now is refused, and
    /// the last good inventory kept (0: refuse any removal; 100: no limit).
    #[arg(
        long,
        value_name = "PERCENT",
        default_value_t = 50,
        value_parser = clap::value_parser!(u8).range(0..=100)
    )]
    pub inventory_max_drop_percent: u8,

    /// Accept an inventory listing no machines, at start-up and on reload (by default start-up
    /// fails and a reload is refused, as every node's instance would read as gone).
    #[arg(long)]
    pub allow_empty_inventory: bool,

    /// Directory of the state database (state.redb).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/local-shim")]
    pub state_dir: PathBuf,

    /// Zone of the machine the shim runs on, answered by Zones.GetZone (NotImplemented when
    /// unset).
    #[arg(long)]
    pub zone: Option<String>,

    /// Region answered with --zone; defaults to the inventory's top-level region.
    #[arg(long, requires = "zone")]
    pub region: Option<String>,

    /// Load-balancer flags.
    #[command(flatten)]
    pub lb: LbFlags,

    /// Route flags.
    #[command(flatten)]
    pub routes: RouteFlags,

    /// Volume-label flags.
    #[command(flatten)]
    pub volumes: VolumeFlags,
}

impl LocalFlags {
    /// The shrink rule the inventory flags ask for.
    pub fn shrink_policy(&self) -> ShrinkPolicy {
        ShrinkPolicy {
            max_drop_percent: self.inventory_max_drop_percent,
            allow_empty: self.allow_empty_inventory,
        }
    }
}

/// Why the local shim could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalShimError {
    /// The inventory could not be loaded at start-up.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// The state database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The load balancer could not start (configuration, stored state).
    #[error(transparent)]
    Lb(#[from] LbError),
    /// The routes could not be loaded or the routing table reached.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// Serving failed.
    #[error(transparent)]
    Shim(#[from] ShimError),
}

/// A local shim with its inventory loaded and database open, ready to serve.
pub struct LocalShim {
    server: ShimServer,
    inventory: InventoryHandle,
    load_balancer: LocalLoadBalancer,
    routes: LocalRoutes,
    reload_interval: Duration,
}

impl LocalShim {
    /// Loads the inventory and opens the state database, failing on either (blocking).
    pub fn new(flags: &LocalFlags) -> Result<Self, LocalShimError> {
        let inventory = InventoryHandle::load(&flags.inventory, flags.shrink_policy())?;
        let store = Store::open(&flags.state_dir)?;
        let own_zone = flags.zone.clone().map(|zone| Zone {
            failure_domain: Some(zone),
            region: flags.region.clone(),
        });
        let load_balancer = LocalLoadBalancer::new(store.clone(), &flags.lb)?;
        let routes = LocalRoutes::new(store.clone(), &flags.routes)?;
        let provider = LocalProvider::new(inventory.clone(), own_zone);
        // The declared driver tells the webhook which CSI volumes are this shim's to label.
        let description = instances::description()
            .with_csi_drivers(flags.volumes.csi_driver_name.iter().cloned().collect());
        let mut builder = ShimServer::builder(description)
            .instances_v2(provider.clone())
            .instances(provider.clone())
            .zones(provider)
            .load_balancer(load_balancer.clone())
            .load_balancer_validation(load_balancer.clone())
            .routes(routes.clone());
        // Only a shim owning a CSI driver has volumes to label; without one the capability is
        // not advertised and the webhook asks nothing.
        if let Some(driver) = &flags.volumes.csi_driver_name {
            builder = builder.volume_labels(LocalVolumes::new(inventory.clone(), driver.clone()));
        }
        let server = builder
            .fence_store(store)
            .register_metrics(|registry| {
                inventory.register_metrics(registry);
                load_balancer.register_metrics(registry);
                routes.register_metrics(registry);
            })
            .build();
        tracing::info!(
            inventory = %flags.inventory.display(),
            machines = inventory.current().machines().len(),
            state_dir = %flags.state_dir.display(),
            "inventory loaded and state database open"
        );
        Ok(Self {
            server,
            inventory,
            load_balancer,
            routes,
            reload_interval: flags.inventory_reload_interval,
        })
    }

    /// The live inventory the shim will serve (for its reload state and errors).
    pub fn inventory(&self) -> &InventoryHandle {
        &self.inventory
    }

    /// Starts serving in the background (see [`ShimServer::start`]) and reloading the inventory.
    pub async fn start(
        self,
        serve: &ServeFlags,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<RunningShim, LocalShimError> {
        // Stored load balancers listen again before any call can allocate a new address.
        self.load_balancer.restore().await;
        // The routing table matches the records before any call lists it.
        self.routes.restore().await?;
        let running = self.server.start(serve, shutdown).await?;
        // The reloader ends by itself once the served provider (the last handle) is dropped.
        let _reloader = self.inventory.spawn_reloader(self.reload_interval);
        Ok(running)
    }

    /// Serves until SIGTERM, SIGINT or `shutdown`, then drains.
    pub async fn run(
        self,
        serve: &ServeFlags,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), LocalShimError> {
        Ok(self.start(serve, shutdown).await?.wait().await?)
    }
}
