//! Framework for provider shims: one trait per CPI service, served with mTLS, health, metrics,
//! tracing and graceful shutdown.
//!
//! A provider implements the traits of the services it supports ([`InstancesV2`], [`Instances`],
//! [`Zones`], [`Clusters`], [`LoadBalancer`], [`Routes`], [`VolumeLabels`],
//! [`LoadBalancerValidation`]), registers them on a [`ShimServer::builder`], and calls
//! [`ShimServer::run`] with the shared [`ServeFlags`]. The framework then:
//!
//! - serves `cloudprovider.v1.Provider` itself, with the capabilities computed from what was
//!   registered, and answers UNIMPLEMENTED for every service that was not;
//! - validates requests before the provider sees them (a missing required field is
//!   `INVALID_ARGUMENT` naming the field), refuses provider IDs the provider does not own
//!   (`NOT_OWNED`), and fences every mutating call against the caller's leader lease
//!   ([`FenceGuard`]);
//! - serves `grpc.health.v1.Health`, Prometheus metrics and `/healthz` `/readyz` `/livez`;
//! - runs every call in a `tracing` span named after the method;
//! - on SIGTERM/SIGINT (or the caller's shutdown future) reports NOT_SERVING, stops accepting
//!   and drains in-flight calls for at most the grace period.
//!
//! The request and response types are the generated `cpi_proto::v1` messages: there is a single
//! definition of every domain type, the protocol.

mod adapters;
mod error;
mod fence;
mod flags;
mod metrics;
mod node_sets;
mod provider;
mod server;
mod services;
mod validate;

pub use cpi_proto::CpiError;
pub use cpi_proto::v1 as proto;
pub use error::ShimError;
pub use fence::{FenceGuard, FenceMark, FenceStore, FenceStoreError, MemoryFenceStore};
pub use flags::{MetricsBind, ServeFlags};
pub use provider::ProviderDescription;
pub use server::{RunningShim, ShimServer, ShimServerBuilder};
pub use services::{
    Clusters, Instances, InstancesV2, LoadBalancer, LoadBalancerValidation, Routes, VolumeLabels,
    Zones,
};
pub use validate::{consistency, node_name};

/// The `prometheus-client` registry type providers add their own metrics to.
pub use prometheus_client::registry::Registry as MetricsRegistry;
