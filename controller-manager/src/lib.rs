//! The generic cloud-controller-manager: watches the API server and drives a provider shim over
//! the CPI gRPC protocol, with the controllers, flags, leader election, metrics and health of
//! the upstream `k8s.io/cloud-provider` framework.

pub mod apiclient;
pub mod app;
pub mod auth;
pub mod cloud;
pub mod controllers;
pub mod convert;
pub mod events;
mod k8s;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod options;
pub mod serve;

pub use k8s::well_known;
