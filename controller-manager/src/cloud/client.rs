//! The controller-manager's view of the provider shim: one multiplexed channel, the shim's
//! self-description, and counted calls that return [`CpiError`]s.

use std::time::{Duration, Instant};

use cpi_proto::CpiError;
use cpi_proto::v1::{
    self, Capability, GetProviderInfoRequest, ProviderInfo, instances_client::InstancesClient,
    instances_v2_client::InstancesV2Client, load_balancer_client::LoadBalancerClient,
    provider_client::ProviderClient, routes_client::RoutesClient, zones_client::ZonesClient,
};
use cpi_transport::{ConnectOptions, CpiChannel};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ProviderEndpoint;
use super::fence::{Fence, Fenced, fence_mismatch};
use crate::k8s::CachedNode;

/// Failure to reach or understand the shim at start-up.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// TLS material for the shim connection could not be loaded.
    #[error("provider TLS: {0}")]
    Tls(#[from] cpi_transport::TlsError),
    /// The channel could not be built.
    #[error("provider endpoint: {0}")]
    Connect(#[from] cpi_transport::ConnectError),
    /// The shim did not answer GetProviderInfo in time.
    #[error("provider shim at {endpoint} did not answer within {waited:?}: {last}")]
    Unreachable {
        /// Endpoint tried.
        endpoint: String,
        /// How long we tried.
        waited: Duration,
        /// Last error seen.
        last: CpiError,
    },
    /// The shim's ProviderInfo has no name.
    #[error("provider shim at {endpoint}: ProviderInfo.name is empty")]
    Nameless {
        /// Endpoint tried.
        endpoint: String,
    },
}

/// How the shim is reached (upstream has no such flags: the cloud was in-process).
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Deadline of every call (`--provider-timeout`).
    pub request_timeout: Duration,
    /// How often TLS files are checked for rotation (`--provider-tls-reload-interval`).
    pub reload_interval: Duration,
    /// How long to keep retrying the first call (`--provider-startup-timeout`).
    pub startup_timeout: Duration,
}

/// Labels of `cloudprovider_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// gRPC method, e.g. `InstancesV2/InstanceMetadata`.
    method: String,
    /// `OK` or the CPI error class.
    code: String,
}

/// The CPI client's metrics: `cloudprovider_requests_total{method,code}`.
#[derive(Clone, Default)]
pub struct CloudMetrics {
    requests: Family<RpcLabels, Counter>,
}

impl CloudMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "cloudprovider_requests",
            "Calls to the provider shim by method and outcome",
            metrics.requests.clone(),
        );
        metrics
    }

    fn count(&self, method: &str, code: &str) {
        self.requests
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code: code.to_string(),
            })
            .inc();
    }
}

/// A connected provider shim, shared by every controller: one channel, the shim's
/// self-description, the call counter and the leader fence every mutating call carries.
#[derive(Clone)]
pub struct Cloud {
    info: ProviderInfo,
    channel: CpiChannel,
    metrics: CloudMetrics,
    fence: watch::Receiver<Option<Fence>>,
    /// The lease this manager's fences name (`None` without leader election).
    lease: Option<String>,
}

impl Cloud {
    /// Builds the channel and reads ProviderInfo, retrying with backoff until the start-up
    /// timeout (the shim may start after us).
    pub async fn connect(
        endpoint: &ProviderEndpoint,
        settings: &ConnectSettings,
        metrics: CloudMetrics,
    ) -> Result<Self, CloudError> {
        let ConnectSettings {
            request_timeout,
            reload_interval,
            startup_timeout,
        } = *settings;
        let (client_endpoint, shown) = endpoint.client(reload_interval)?;
        let channel = cpi_transport::client::connect(
            client_endpoint,
            ConnectOptions {
                request_timeout,
                ..ConnectOptions::default()
            },
        )?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        let info = loop {
            match ProviderClient::new(channel.clone())
                .get_provider_info(GetProviderInfoRequest {})
                .await
            {
                Ok(response) => break response.into_inner(),
                Err(status) => {
                    let err = CpiError::from_status(&status);
                    if started.elapsed() + delay > startup_timeout {
                        return Err(CloudError::Unreachable {
                            endpoint: shown,
                            waited: started.elapsed(),
                            last: err,
                        });
                    }
                    warn!(endpoint = %shown, error = %err, "provider shim not ready yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        if info.name.is_empty() {
            return Err(CloudError::Nameless { endpoint: shown });
        }
        info!(
            provider = %info.name,
            shim_version = %info.shim_version,
            capabilities = ?capabilities(&info),
            "connected to provider shim"
        );
        Ok(Self {
            info,
            channel,
            metrics,
            // Until leader election hands a fence over, mutating calls carry none.
            fence: watch::channel(None).1,
            lease: None,
        })
    }

    /// This handle with its mutating calls fenced by the current value of `fence` (updated
    /// by leader election at every term).
    pub fn with_fence(mut self, fence: watch::Receiver<Option<Fence>>) -> Self {
        self.fence = fence;
        self
    }

    /// This handle's fences name `lease` (`"<namespace>/<name>"`), or none are sent (`None`:
    /// no leader election).
    pub fn with_lease(mut self, lease: Option<String>) -> Self {
        self.lease = lease;
        self
    }

    /// Why the shim would refuse this manager's mutating calls (its `--fence-lease` does not
    /// match the lease the fences name, or it requires a fence none is sent with), if it would.
    pub fn fence_problem(&self) -> Option<String> {
        fence_mismatch(self.lease.as_deref(), &self.info.fence_lease)
    }

    /// The fence of the current leadership term, if any; every mutating call carries it.
    pub fn fence(&self) -> Option<Fence> {
        self.fence.borrow().clone()
    }

    /// `request` stamped with the current term's fence. Every mutating call goes through this,
    /// so no controller can forget the fence or send a stale one it kept.
    pub fn fenced<R: Fenced>(&self, mut request: R) -> R {
        request.set_fence(self.fence());
        request
    }

    /// Asks the shim for its ProviderInfo again: a cheap end-to-end check that it answers.
    pub async fn probe(&self) -> Result<(), CpiError> {
        ProviderClient::new(self.channel.clone())
            .get_provider_info(GetProviderInfoRequest {})
            .await
            .map(drop)
            .map_err(|status| CpiError::from_status(&status))
    }

    /// The shim's self-description.
    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }

    /// Services the shim implements.
    pub fn capabilities(&self) -> Vec<Capability> {
        capabilities(&self.info)
    }

    /// Whether the shim implements a service.
    pub fn has(&self, capability: Capability) -> bool {
        self.info.capabilities.contains(&(capability as i32))
    }

    /// Whether `provider_id` belongs to this provider (its prefix is one the shim claims).
    pub fn owns_provider_id(&self, provider_id: &str) -> bool {
        owns_provider_id(&self.info, provider_id)
    }

    /// Whether a Node is this provider's to manage: its providerID (if set) has a claimed
    /// prefix. Nodes without one yet are candidates (they are looked up by name).
    pub fn owns_node(&self, node: &CachedNode) -> bool {
        node.provider_id()
            .is_none_or(|id| self.owns_provider_id(id))
    }

    /// InstancesV2 client over the shared channel.
    pub fn instances_v2(&self) -> InstancesV2Client<CpiChannel> {
        InstancesV2Client::new(self.channel.clone())
    }

    /// Legacy Instances client over the shared channel.
    pub fn instances(&self) -> InstancesClient<CpiChannel> {
        InstancesClient::new(self.channel.clone())
    }

    /// Legacy Zones client over the shared channel.
    pub fn zones(&self) -> ZonesClient<CpiChannel> {
        ZonesClient::new(self.channel.clone())
    }

    /// LoadBalancer client over the shared channel.
    pub fn load_balancers(&self) -> LoadBalancerClient<CpiChannel> {
        LoadBalancerClient::new(self.channel.clone())
    }

    /// Routes client over the shared channel.
    pub fn routes(&self) -> RoutesClient<CpiChannel> {
        RoutesClient::new(self.channel.clone())
    }

    /// Whether objects handed to the shim should carry their raw JSON.
    pub fn wants_raw_objects(&self) -> bool {
        self.info.wants_raw_objects
    }
}

impl Cloud {
    /// Awaits one CPI call, counts its outcome in `cloudprovider_requests_total{method,code}`
    /// and decodes a failure into a [`CpiError`]. Every controller calls the shim through this.
    pub async fn call<T>(
        &self,
        method: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CpiError> {
        match call.await {
            Ok(response) => {
                self.metrics.count(method, "OK");
                Ok(response.into_inner())
            }
            Err(status) => {
                let err = CpiError::from_status(&status);
                self.metrics.count(method, err.class());
                Err(err)
            }
        }
    }
}

fn capabilities(info: &ProviderInfo) -> Vec<Capability> {
    info.capabilities
        .iter()
        .filter_map(|c| Capability::try_from(*c).ok())
        .filter(|c| *c != Capability::Unspecified)
        .collect()
}

/// Ownership rule shared by every controller ([`cpi_proto::provider_id::strip_owned`]): a
/// providerID is ours when it starts with one of the prefixes the shim claims (default
/// `<name>://`).
pub fn owns_provider_id(info: &v1::ProviderInfo, provider_id: &str) -> bool {
    cpi_proto::provider_id::strip_owned(&info.name, &info.provider_id_prefixes, provider_id)
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_defaults_to_provider_name_prefix() {
        let info = ProviderInfo {
            name: "local".into(),
            ..Default::default()
        };
        assert!(owns_provider_id(&info, "local://m-1"));
        assert!(!owns_provider_id(&info, "aws:///us-east-1a/i-1"));
        assert!(!owns_provider_id(&info, "localhost://x"));
    }

    #[test]
    fn ownership_uses_claimed_prefixes() {
        let info = ProviderInfo {
            name: "hcloud".into(),
            provider_id_prefixes: vec!["hcloud://".into(), "hrobot://".into()],
            ..Default::default()
        };
        assert!(owns_provider_id(&info, "hrobot://42"));
        assert!(!owns_provider_id(&info, "talos://x"));
    }
}
