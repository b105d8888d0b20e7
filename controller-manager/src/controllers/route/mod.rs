//! node-route-controller (upstream `controllers/route`): routes for the nodes' pod CIDRs.
//! Registered with its upstream names and flags; not implemented in this build.

use std::time::Duration;

use cpi_proto::v1::Capability;
use prometheus_client::registry::Registry;

use super::{BuildError, Controller, ControllerContext, Names, Stop};
use crate::flags::{FlagError, parse_duration, positive};

/// Flags of the route controller.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "route-flags")]
#[command(next_help_heading = "node-route-controller")]
pub struct Flags {
    /// How often the route controller reconciles routes (no effect until it exists in this
    /// build).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub route_reconciliation_period: Duration,
}

/// The route controller (not implemented yet).
pub struct RouteController;

impl Controller for RouteController {
    const NAMES: Names = Names {
        canonical: "node-route-controller",
        alias: "route",
        event_component: "route_controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        positive(
            "--route-reconciliation-period",
            flags.route_reconciliation_period,
        )
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        capabilities.contains(&Capability::Routes)
    }

    fn build(_: &ControllerContext, _: &Flags, _: &mut Registry) -> Result<Self, BuildError> {
        Err(BuildError::NotImplemented)
    }

    async fn run(self, stop: Stop) {
        stop.await;
    }
}
