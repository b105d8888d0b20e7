//! node-ipam-controller (upstream `controllers/nodeipam`): pod CIDRs for nodes from
//! `--cluster-cidr`. Registered with its upstream names; not implemented in this build.

use cpi_proto::v1::Capability;
use prometheus_client::registry::Registry;

use super::{BuildError, Controller, ControllerContext, Names, Stop};
use crate::flags::FlagError;

/// Flags of the node-ipam controller (none yet: `--allocate-node-cidrs` and `--cluster-cidr`
/// are shared settings).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "nodeipam-flags")]
#[command(next_help_heading = "node-ipam-controller")]
pub struct Flags {}

/// The node-ipam controller (not implemented yet).
pub struct NodeIpamController;

impl Controller for NodeIpamController {
    const NAMES: Names = Names {
        canonical: "node-ipam-controller",
        alias: "nodeipam",
        event_component: "node-ipam-controller",
    };
    type Flags = Flags;

    fn validate(_: &Flags) -> Result<(), FlagError> {
        Ok(())
    }

    fn supported_by(_: &[Capability]) -> bool {
        // The range allocator needs nothing from the provider.
        true
    }

    fn build(ctx: &ControllerContext, _: &Flags, _: &mut Registry) -> Result<Self, BuildError> {
        if !ctx.cluster.allocate_node_cidrs {
            return Err(BuildError::Disabled(
                "--allocate-node-cidrs is false".into(),
            ));
        }
        Err(BuildError::NotImplemented)
    }

    async fn run(self, stop: Stop) {
        stop.await;
    }
}
