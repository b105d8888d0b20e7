//! Command-line flags, with the upstream `cloud-controller-manager` names and defaults where
//! they apply, plus the provider-shim endpoint and its TLS files.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::controllers::node_lifecycle::{DeletionBudget, DeletionPolicy};
use crate::names::{ControllerSelection, SelectionError};

/// Parses a Go-style duration (`15s`, `5m0s`, `1h30m`) as accepted by upstream flags.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    // humantime rejects Go's "5m0s"-style concatenations without spaces only when units repeat;
    // it accepts "5m0s" and "1h30m" directly.
    humantime::parse_duration(value).map_err(|err| format!("invalid duration {value:?}: {err}"))
}

/// Flags of the `cloud-controller-manager` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cloud-controller-manager",
    version,
    about = "Runs the cloud controllers (cloud-node, cloud-node-lifecycle, service-lb, route) against a provider shim reached over the CPI gRPC protocol."
)]
pub struct Options {
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
    /// The instance prefix for the cluster, passed to load-balancer and route calls (no
    /// effect until the service-lb and route controllers exist in this build).
    #[arg(long, default_value = "kubernetes")]
    pub cluster_name: String,
    /// CIDR range(s) for pods in the cluster (comma-separated, at most one per IP family; no
    /// effect until the route and node-ipam controllers exist in this build).
    #[arg(long, default_value = "")]
    pub cluster_cidr: String,
    /// Whether CIDRs for pods should be allocated and set on the cloud provider (no effect
    /// until the node-ipam controller exists in this build).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub allocate_node_cidrs: bool,
    /// Whether CIDRs allocated by allocate-node-cidrs should be configured on the cloud provider
    /// (no effect until the route controller exists in this build).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub configure_cloud_routes: bool,
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

    /// Number of nodes synced concurrently by the cloud-node controller.
    #[arg(long, default_value_t = 1)]
    pub concurrent_node_syncs: u16,
    /// Workers of the periodic node address update; 0 means --concurrent-node-syncs.
    #[arg(long, default_value_t = 0)]
    pub concurrent_node_status_updates: u16,
    /// Number of services synced concurrently by the service-lb controller (no effect until it
    /// exists in this build).
    #[arg(long, default_value_t = 1)]
    pub concurrent_service_syncs: u16,
    /// How often the cloud-node controller refreshes node addresses from the provider.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub node_status_update_frequency: Duration,
    /// How often the cloud-node-lifecycle controller checks node existence and shutdown.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub node_monitor_period: Duration,
    /// Nodes younger than this are never deleted because the provider says their instance is
    /// gone (lookups right after launch are often eventually consistent). 0 = upstream.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub node_deletion_grace_period: Duration,
    /// Consecutive "instance not found" answers (one per monitor period) needed before a node
    /// is deleted. 1 = upstream.
    #[arg(long, default_value_t = 2)]
    pub node_deletion_confirmations: u32,
    /// At most this percentage of the provider's nodes (at least one) is deleted per
    /// --node-deletion-budget-window; 0 disables the budget (upstream).
    #[arg(long, default_value_t = 10.0)]
    pub node_deletion_budget_percent: f64,
    /// Window of --node-deletion-budget-percent.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub node_deletion_budget_window: Duration,
    /// How often the route controller reconciles routes (no effect until it exists in this
    /// build).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub route_reconciliation_period: Duration,
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
    /// Where the provider shim listens: `https://HOST:PORT` (mutual TLS) or `unix:///PATH`
    /// (plaintext, sidecar deployments only).
    #[arg(long)]
    pub provider_endpoint: String,
    /// Client certificate presented to the shim.
    #[arg(long)]
    pub provider_tls_cert_file: Option<PathBuf>,
    /// Private key of --provider-tls-cert-file.
    #[arg(long)]
    pub provider_tls_private_key_file: Option<PathBuf>,
    /// CA bundle the shim's serving certificate must chain to.
    #[arg(long)]
    pub provider_ca_file: Option<PathBuf>,
    /// Name expected in the shim's certificate; defaults to the endpoint's host.
    #[arg(long)]
    pub provider_server_name: Option<String>,
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
    /// `--controllers` names an unknown controller.
    #[error(transparent)]
    Controllers(#[from] SelectionError),
    /// A flag value is out of range or inconsistent with another.
    #[error("{flag}: {message}")]
    Invalid {
        /// The offending flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> OptionsError {
    OptionsError::Invalid {
        flag,
        message: message.into(),
    }
}

impl Options {
    /// Checks values clap cannot check on its own; returns the resolved controller selection.
    pub fn validate(&self) -> Result<ControllerSelection, OptionsError> {
        let selection = ControllerSelection::parse(&self.controllers)?;
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
        if self.concurrent_node_syncs == 0 {
            return Err(invalid(
                "--concurrent-node-syncs",
                "concurrent-node-syncs must be a positive number",
            ));
        }
        if self.concurrent_service_syncs == 0 {
            return Err(invalid(
                "--concurrent-service-syncs",
                "must be a positive number",
            ));
        }
        if self.kube_api_qps.is_nan() || self.kube_api_qps <= 0.0 {
            return Err(invalid("--kube-api-qps", "must be positive"));
        }
        if self.node_monitor_period.is_zero() {
            return Err(invalid("--node-monitor-period", "must be positive"));
        }
        if !(0.0..=100.0).contains(&self.node_deletion_budget_percent) {
            return Err(invalid(
                "--node-deletion-budget-percent",
                "must be between 0 and 100",
            ));
        }
        if self.node_deletion_confirmations == 0 {
            return Err(invalid(
                "--node-deletion-confirmations",
                "must be at least 1",
            ));
        }
        if self.node_status_update_frequency.is_zero() {
            return Err(invalid(
                "--node-status-update-frequency",
                "must be positive",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_private_key_file.is_some() {
            return Err(invalid(
                "--tls-cert-file",
                "--tls-cert-file and --tls-private-key-file must be given together",
            ));
        }
        self.provider_endpoint()?;
        Ok(selection)
    }

    /// The cloud-node-lifecycle deletion policy these flags describe.
    pub fn deletion_policy(&self) -> DeletionPolicy {
        DeletionPolicy {
            grace_period: self.node_deletion_grace_period,
            confirmations: self.node_deletion_confirmations,
            budget: (self.node_deletion_budget_percent > 0.0).then(|| DeletionBudget {
                fraction: self.node_deletion_budget_percent / 100.0,
                window: self.node_deletion_budget_window,
            }),
        }
    }

    /// Number of workers of the periodic address update.
    pub fn node_status_update_workers(&self) -> usize {
        if self.concurrent_node_status_updates > 0 {
            usize::from(self.concurrent_node_status_updates)
        } else {
            usize::from(self.concurrent_node_syncs)
        }
    }

    /// The shim endpoint, checked: TLS endpoints need all three TLS files.
    pub fn provider_endpoint(&self) -> Result<ProviderEndpoint, OptionsError> {
        let endpoint = self.provider_endpoint.trim();
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(invalid(
                    "--provider-endpoint",
                    "unix:// needs a socket path",
                ));
            }
            return Ok(ProviderEndpoint::Unix(PathBuf::from(path)));
        }
        let Some(rest) = endpoint.strip_prefix("https://") else {
            return Err(invalid(
                "--provider-endpoint",
                format!(
                    "{endpoint:?} must start with https:// (mutual TLS) or unix:// (plaintext Unix socket)"
                ),
            ));
        };
        let host = authority_host(rest)
            .ok_or_else(|| invalid("--provider-endpoint", format!("{endpoint:?} has no host")))?;
        let (Some(cert), Some(key), Some(ca)) = (
            self.provider_tls_cert_file.clone(),
            self.provider_tls_private_key_file.clone(),
            self.provider_ca_file.clone(),
        ) else {
            return Err(invalid(
                "--provider-endpoint",
                "an https:// endpoint needs --provider-tls-cert-file, --provider-tls-private-key-file and --provider-ca-file",
            ));
        };
        Ok(ProviderEndpoint::Tls {
            uri: endpoint.to_string(),
            server_name: self
                .provider_server_name
                .clone()
                .unwrap_or_else(|| host.to_string()),
            cert,
            key,
            ca,
        })
    }
}

/// Host part of `host:port[/...]`, with IPv6 brackets removed.
fn authority_host(rest: &str) -> Option<&str> {
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}

/// The resolved shim endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEndpoint {
    /// Mutual TLS over TCP.
    Tls {
        /// `https://host:port`.
        uri: String,
        /// Name verified in the shim's certificate.
        server_name: String,
        /// Client certificate.
        cert: PathBuf,
        /// Client key.
        key: PathBuf,
        /// CA bundle.
        ca: PathBuf,
    },
    /// Plaintext over a Unix socket.
    Unix(PathBuf),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        let mut full = vec![
            "cloud-controller-manager",
            "--provider-endpoint=unix:///tmp/s",
        ];
        full.extend_from_slice(args);
        Options::try_parse_from(full)
    }

    #[test]
    fn default_flags_match_upstream() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.controllers, vec!["*"]);
        assert_eq!(o.cluster_name, "kubernetes");
        assert!(o.leader_elect);
        assert_eq!(o.leader_elect_lease_duration, Duration::from_secs(15));
        assert_eq!(o.leader_elect_renew_deadline, Duration::from_secs(10));
        assert_eq!(o.leader_elect_retry_period, Duration::from_secs(2));
        assert_eq!(o.leader_elect_resource_lock, "leases");
        assert_eq!(o.leader_elect_resource_name, "cloud-controller-manager");
        assert_eq!(o.leader_elect_resource_namespace, "kube-system");
        assert_eq!(o.kube_api_qps, 20.0);
        assert_eq!(o.kube_api_burst, 30);
        assert_eq!(o.concurrent_node_syncs, 1);
        assert_eq!(o.concurrent_node_status_updates, 0);
        assert_eq!(o.concurrent_service_syncs, 1);
        assert_eq!(o.node_status_update_frequency, Duration::from_secs(300));
        assert_eq!(o.node_monitor_period, Duration::from_secs(5));
        assert_eq!(o.route_reconciliation_period, Duration::from_secs(10));
        assert_eq!(o.secure_port, 10258);
        assert_eq!(o.bind_address.to_string(), "0.0.0.0");
        assert!(o.configure_cloud_routes);
        assert!(!o.allocate_node_cidrs);
        let policy = o.deletion_policy();
        assert_eq!(policy.grace_period, Duration::from_secs(60));
        assert_eq!(policy.confirmations, 2);
        assert_eq!(
            policy.budget,
            Some(DeletionBudget {
                fraction: 0.1,
                window: Duration::from_secs(600)
            })
        );
        o.validate().unwrap();
    }

    #[test]
    fn add_flags_parses_every_flag() {
        let o = parse(&[
            "--kubeconfig=/k",
            "--controllers=cloud-node,-service",
            "--cluster-name=c1",
            "--cluster-cidr=10.0.0.0/16",
            "--leader-elect=false",
            "--leader-elect-lease-duration=30s",
            "--kube-api-qps=50",
            "--kube-api-burst=100",
            "--concurrent-node-syncs=5",
            "--concurrent-node-status-updates=7",
            "--node-status-update-frequency=10m",
            "--node-monitor-period=1m30s",
            "--secure-port=0",
            "--configure-cloud-routes=false",
        ])
        .unwrap();
        assert_eq!(o.kubeconfig, "/k");
        assert_eq!(o.controllers, vec!["cloud-node", "-service"]);
        assert!(!o.leader_elect);
        assert_eq!(o.leader_elect_lease_duration, Duration::from_secs(30));
        assert_eq!(o.node_status_update_workers(), 7);
        assert_eq!(o.node_monitor_period, Duration::from_secs(90));
        assert_eq!(o.node_status_update_frequency, Duration::from_secs(600));
        assert!(!o.configure_cloud_routes);
        assert_eq!(o.cluster_name, "c1");
        assert_eq!(o.cluster_cidr, "10.0.0.0/16");
        assert_eq!(o.kube_api_qps, 50.0);
        assert_eq!(o.kube_api_burst, 100);
        assert_eq!(o.concurrent_node_syncs, 5);
        assert_eq!(o.secure_port, 0);
        o.validate().unwrap();
    }

    #[test]
    fn upstream_deletion_behaviour_can_be_restored() {
        let o = parse(&[
            "--node-deletion-grace-period=0s",
            "--node-deletion-confirmations=1",
            "--node-deletion-budget-percent=0",
        ])
        .unwrap();
        assert_eq!(o.deletion_policy(), DeletionPolicy::upstream());
    }

    #[test]
    fn status_update_workers_default_to_node_syncs() {
        let o = parse(&["--concurrent-node-syncs=4"]).unwrap();
        assert_eq!(o.node_status_update_workers(), 4);
    }

    #[test]
    fn unknown_flag_fails_fast() {
        let err = parse(&["--no-such-flag=1"]).unwrap_err();
        assert!(err.to_string().contains("--no-such-flag"), "{err}");
    }

    #[test]
    fn invalid_duration_names_the_value() {
        let err = parse(&["--node-monitor-period=soon"]).unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn concurrent_node_syncs_must_be_positive() {
        let err = parse(&["--concurrent-node-syncs=0"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("concurrent-node-syncs must be a positive number")
        );
    }

    #[test]
    fn resource_lock_must_be_leases() {
        let err = parse(&["--leader-elect-resource-lock=endpoints"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("leases"), "{err}");
    }

    #[test]
    fn unknown_controller_is_rejected() {
        let err = parse(&["--controllers=cloud-node,bogus"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn https_endpoint_needs_tls_files() {
        let o = Options::try_parse_from(["ccm", "--provider-endpoint=https://shim.example:10270"])
            .unwrap();
        let err = o.validate().unwrap_err();
        assert!(err.to_string().contains("--provider-ca-file"), "{err}");
    }

    #[test]
    fn https_endpoint_server_name_defaults_to_host() {
        let o = Options::try_parse_from([
            "ccm",
            "--provider-endpoint=https://[::1]:10270",
            "--provider-tls-cert-file=/c",
            "--provider-tls-private-key-file=/k",
            "--provider-ca-file=/ca",
        ])
        .unwrap();
        match o.provider_endpoint().unwrap() {
            ProviderEndpoint::Tls { server_name, .. } => assert_eq!(server_name, "::1"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn plain_http_endpoint_is_refused() {
        let o = Options::try_parse_from(["ccm", "--provider-endpoint=http://shim:10270"]).unwrap();
        let err = o.validate().unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }
}
