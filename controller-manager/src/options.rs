//! The manager's generic command-line flags (everything but the controllers' own), with the
//! upstream `cloud-controller-manager` names and defaults where they apply, plus the
//! provider-shim endpoint and its TLS files.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use cpi_transport::ProviderFlags;

use crate::cloud::{ConnectSettings, EndpointError, ProviderEndpoint};
use crate::cluster_cidrs::{ClusterCidrError, ClusterCidrs};
use crate::flags::{FeatureGates, FlagError, parse_duration, parse_feature_gates};

/// Upstream's default `--cluster-name`.
pub const DEFAULT_CLUSTER_NAME: &str = "kubernetes";

/// The generic flags of the `cloud-controller-manager` binary.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "generic-options")]
pub struct GenericOptions {
    /// Path to a kubeconfig file; empty uses the in-cluster configuration.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, default_value = "")]
    pub master: String,
    /// Controllers to enable: '*' enables all on-by-default controllers, 'foo' enables foo,
    /// '-foo' disables foo. Upstream names and aliases are accepted.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub controllers: Vec<String>,
    /// The instance prefix for the cluster, passed to load-balancer and route calls [default:
    /// kubernetes]. The service-lb controller only starts when it is set explicitly: every
    /// cluster shares the default, and two clusters' load balancers must never be confused.
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// CIDR range(s) for pods in the cluster (comma-separated, at most one per IP family).
    #[arg(long, default_value = "", value_parser = parse_cluster_cidrs)]
    pub cluster_cidr: ClusterCidrs,
    /// Whether CIDRs for pods should be allocated and set on the cloud provider.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub allocate_node_cidrs: bool,
    /// Whether CIDRs allocated by allocate-node-cidrs should be configured on the cloud
    /// provider.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub configure_cloud_routes: bool,
    /// Alpha features to switch on or off, as comma-separated `Name=true|false` pairs. Known
    /// gates: CloudControllerManagerWatchBasedRoutesReconciliation (default false: the route
    /// controller reconciles every --route-reconciliation-period; true: on node changes, at
    /// most once per period), CloudControllerManagerWebhook (default false; no effect here).
    #[arg(long, default_value = "", value_parser = parse_feature_gates)]
    pub feature_gates: FeatureGates,
    /// Name of the provider; when set it must match the name the shim reports.
    #[arg(long, default_value = "")]
    pub cloud_provider: String,

    /// Start a leader election client and gain leadership before running the controllers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// How long non-leaders wait after observing a renewal before trying to take over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// How long the leader keeps retrying to renew before it gives up leadership.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// How long clients wait between attempts to acquire and renew leadership.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// The type of resource object used for locking; only 'leases' is supported.
    #[arg(long, default_value = "leases")]
    pub leader_elect_resource_lock: String,
    /// The name of the Lease used for leader election.
    #[arg(long, default_value = "cloud-controller-manager")]
    pub leader_elect_resource_name: String,
    /// The namespace of the Lease used for leader election.
    #[arg(long, default_value = "kube-system")]
    pub leader_elect_resource_namespace: String,

    /// Queries per second allowed towards the API server.
    #[arg(long, default_value_t = 20.0)]
    pub kube_api_qps: f32,
    /// Burst allowed towards the API server.
    #[arg(long, default_value_t = 30)]
    pub kube_api_burst: u32,

    /// Jittered pause between starting two controllers.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub controller_start_interval: Duration,

    /// The port serving /healthz, /readyz, /livez and /metrics over HTTPS; 0 disables it.
    #[arg(long, default_value_t = 10258)]
    pub secure_port: u16,
    /// The IP address the secure port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Serving certificate of the secure port; without it a self-signed one is generated.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of --tls-cert-file.
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,

    /// Paths of the secure port served without authentication or authorisation; everything
    /// else needs a bearer token allowed by a SubjectAccessReview (as upstream).
    #[arg(long, value_delimiter = ',', default_value = "/healthz,/readyz,/livez")]
    pub authorization_always_allow_paths: Vec<String>,
    /// Where the provider shim listens and its TLS files (shared with the webhook).
    #[command(flatten)]
    pub provider: ProviderFlags,
    /// Deadline of every call to the shim.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub provider_timeout: Duration,
    /// How often TLS files are checked for rotation.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub provider_tls_reload_interval: Duration,
    /// How long to keep retrying to reach the shim at start-up before giving up.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub provider_startup_timeout: Duration,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// A flag value is out of range or inconsistent with another.
    #[error(transparent)]
    Invalid(#[from] FlagError),
    /// `--provider-endpoint` and its TLS files cannot be used.
    #[error("--provider-endpoint: {0}")]
    Endpoint(#[from] EndpointError),
}

fn invalid(flag: &'static str, message: impl Into<String>) -> OptionsError {
    OptionsError::Invalid(FlagError::new(flag, message))
}

fn parse_cluster_cidrs(value: &str) -> Result<ClusterCidrs, ClusterCidrError> {
    value.parse()
}

impl GenericOptions {
    /// Checks values clap cannot check on its own (`--controllers` is checked against the
    /// registry by the caller).
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.leader_elect && self.leader_elect_resource_lock != "leases" {
            return Err(invalid(
                "--leader-elect-resource-lock",
                format!(
                    "only \"leases\" is supported, got {:?}",
                    self.leader_elect_resource_lock
                ),
            ));
        }
        if self.leader_elect {
            if self.leader_elect_lease_duration <= self.leader_elect_renew_deadline {
                return Err(invalid(
                    "--leader-elect-lease-duration",
                    "must be greater than --leader-elect-renew-deadline",
                ));
            }
            if self.leader_elect_renew_deadline <= self.leader_elect_retry_period {
                return Err(invalid(
                    "--leader-elect-renew-deadline",
                    "must be greater than --leader-elect-retry-period",
                ));
            }
            if self.leader_elect_retry_period.is_zero() {
                return Err(invalid("--leader-elect-retry-period", "must be positive"));
            }
        }
        // Below one request per 100 s the client would wait minutes for its first token.
        if !(0.01..=1e6).contains(&self.kube_api_qps) {
            return Err(invalid(
                "--kube-api-qps",
                "must be between 0.01 and 1000000",
            ));
        }
        if self.kube_api_burst == 0 {
            return Err(invalid("--kube-api-burst", "must be at least 1"));
        }
        if self.tls_cert_file.is_some() != self.tls_private_key_file.is_some() {
            return Err(invalid(
                "--tls-cert-file",
                "--tls-cert-file and --tls-private-key-file must be given together",
            ));
        }
        self.provider_endpoint()?;
        Ok(())
    }

    /// The shim endpoint, checked: TLS endpoints need all three TLS files.
    pub fn provider_endpoint(&self) -> Result<ProviderEndpoint, EndpointError> {
        self.provider.endpoint()
    }

    /// How the shim is reached.
    pub fn connect_settings(&self) -> ConnectSettings {
        ConnectSettings {
            request_timeout: self.provider_timeout,
            reload_interval: self.provider_tls_reload_interval,
            startup_timeout: self.provider_startup_timeout,
        }
    }
}
