//! The controller registry (upstream `DefaultInitFuncConstructors`): what the manager knows of
//! each controller, and the macro that lists them.

use std::pin::Pin;

use cpi_proto::v1::Capability;
use prometheus_client::registry::Registry;

use super::context::ControllerContext;
use crate::flags::FlagError;

/// Resolves when the controller must stop (shutdown or lost leadership).
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A controller's upstream names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    /// Canonical name (`--controllers`), e.g. `cloud-node-controller`.
    pub canonical: &'static str,
    /// Alias (never to be removed), also the `running_managed_controllers` name.
    pub alias: &'static str,
    /// `source.component` of the Events it records.
    pub event_component: &'static str,
}

/// Why a controller was not built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// This build does not implement the controller yet.
    #[error("not implemented in this build yet")]
    NotImplemented,
    /// The controller's settings do not allow it to run (say which and why).
    #[error("{0}")]
    Disabled(String),
    /// The controller is enabled but its flags, checked against the shared settings, are
    /// unusable: the manager refuses to start rather than run without it.
    #[error(transparent)]
    Invalid(#[from] FlagError),
}

/// One controller, as the registry runs it. Built once (metrics registered, caches asked for)
/// before leadership is acquired, run while it is held.
pub trait Controller: Sized + Send + 'static {
    /// Its upstream names.
    const NAMES: Names;
    /// Its command-line flags, flattened into the manager's.
    type Flags: clap::Args + Clone + std::fmt::Debug + Send + Sync + 'static;

    /// Checks values clap cannot check on its own.
    fn validate(flags: &Self::Flags) -> Result<(), FlagError>;

    /// Whether a provider with these capabilities supports the controller.
    fn supported_by(capabilities: &[Capability]) -> bool;

    /// Whether it makes fenced (mutating) provider calls: such a controller is not started
    /// while the shim would refuse its fence (`Cloud::fence_problem`).
    const FENCED: bool = false;

    /// Builds the controller; registers its metrics in `registry`.
    fn build(
        ctx: &ControllerContext,
        flags: &Self::Flags,
        registry: &mut Registry,
    ) -> Result<Self, BuildError>;

    /// Runs the controller until `stop` resolves.
    fn run(self, stop: Stop) -> impl Future<Output = ()> + Send;
}

/// Whether the provider serves instance lookups (InstancesV2 or the legacy Instances), which
/// the node controllers need.
pub fn serves_instances(capabilities: &[Capability]) -> bool {
    capabilities.contains(&Capability::InstancesV2) || capabilities.contains(&Capability::Instances)
}

/// A built controller's run: give it its stop signal and await it.
pub type Runner = Box<dyn FnOnce(Stop) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Builds one controller from the context, registering its metrics.
pub type Builder =
    Box<dyn FnOnce(&ControllerContext, &mut Registry) -> Result<Runner, BuildError> + Send>;

/// A registry entry with its flags bound: what `app.rs` loops over.
pub struct Registered {
    /// The controller's names.
    pub names: Names,
    /// Whether a provider with these capabilities supports it.
    pub supported_by: fn(&[Capability]) -> bool,
    /// Whether it makes fenced provider calls ([`Controller::FENCED`]).
    pub fenced: bool,
    /// Builds it.
    pub build: Builder,
}

impl Registered {
    /// The entry of controller `C` with `flags`.
    pub fn of<C: Controller>(flags: C::Flags) -> Self {
        Self {
            names: C::NAMES,
            supported_by: C::supported_by,
            fenced: C::FENCED,
            build: Box::new(move |ctx, registry| {
                let controller = C::build(ctx, &flags, registry)?;
                Ok(Box::new(move |stop| Box::pin(controller.run(stop))))
            }),
        }
    }
}

/// Lists the controllers, in start order, as `field: module::Type`: generates the flattened
/// [`ControllerFlags`](super::ControllerFlags), their validation, the names table and the
/// registry entries.
macro_rules! registry {
    ($($field:ident: $module:ident::$controller:ident),* $(,)?) => {
        /// The flags of every controller, flattened into the command line.
        #[derive(Debug, Clone, clap::Args)]
        pub struct ControllerFlags {
            $(
                #[allow(missing_docs)]
                #[command(flatten)]
                pub $field: <$module::$controller as Controller>::Flags,
            )*
        }

        impl ControllerFlags {
            /// Checks every controller's flags.
            pub fn validate(&self) -> Result<(), $crate::flags::FlagError> {
                $(<$module::$controller as Controller>::validate(&self.$field)?;)*
                Ok(())
            }

            /// The registry, in start order, with these flags bound.
            pub fn registry(self) -> Vec<Registered> {
                vec![$(Registered::of::<$module::$controller>(self.$field)),*]
            }
        }

        /// The names of every controller, in start order.
        pub const ALL_NAMES: &[Names] = &[$(<$module::$controller as Controller>::NAMES),*];
    };
}
