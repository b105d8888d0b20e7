//! The admission webhook server of the cloud-controller-manager split (KEP-2699): webhooks
//! whose answers come from the provider shim over the CPI.
//!
//! * `pv-labeler` (mutating): the PersistentVolumeLabel admission plugin's rules — topology
//!   labels from the shim's GetLabelsForVolume and a node affinity built from them — answered
//!   as an RFC 6902 JSON Patch ([`pv_labeler`]).
//! * `service-lb-validator` (validating): the shim's ValidateLoadBalancer verdict on
//!   load-balancer Services ([`lb_validator`]).
//!
//! Start with [`Options`] (the flags) and [`bind`] / [`run`]. Reviews are read in
//! `admission.k8s.io/v1` and `v1beta1` and answered in the version they came in ([`review`]).

mod admit;
pub mod lb_validator;
mod options;
pub mod patch;
mod provider;
pub mod pv_labeler;
pub mod review;
mod server;
mod view;

pub use options::{FailurePolicy, Options, OptionsError, Webhook, enabled_webhooks};
pub use provider::{ClientError, Shim, ShimError};
pub use server::{Bound, WebhookError, bind, run};
