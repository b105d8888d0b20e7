//! service-lb-controller (upstream `controllers/service`): load balancers for Services of type
//! LoadBalancer. Registered with its upstream names and flags; not implemented in this build.

use cpi_proto::v1::Capability;
use prometheus_client::registry::Registry;

use super::{BuildError, Controller, ControllerContext, Names, Stop};
use crate::flags::FlagError;

/// Flags of the service-lb controller.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "service-flags")]
#[command(next_help_heading = "service-lb-controller")]
pub struct Flags {
    /// Number of services synced concurrently by the service-lb controller (no effect until it
    /// exists in this build).
    #[arg(long, default_value_t = 1)]
    pub concurrent_service_syncs: u16,
}

/// The service-lb controller (not implemented yet).
pub struct ServiceLbController;

impl Controller for ServiceLbController {
    const NAMES: Names = Names {
        canonical: "service-lb-controller",
        alias: "service",
        event_component: "service-controller",
    };
    type Flags = Flags;

    fn validate(flags: &Flags) -> Result<(), FlagError> {
        if flags.concurrent_service_syncs == 0 {
            return Err(FlagError::new(
                "--concurrent-service-syncs",
                "must be a positive number",
            ));
        }
        Ok(())
    }

    fn supported_by(capabilities: &[Capability]) -> bool {
        capabilities.contains(&Capability::LoadBalancer)
    }

    fn build(_: &ControllerContext, _: &Flags, _: &mut Registry) -> Result<Self, BuildError> {
        Err(BuildError::NotImplemented)
    }

    async fn run(self, stop: Stop) {
        stop.await;
    }
}
