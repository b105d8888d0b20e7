//! Instance lookups, each written once over both provider paths: InstancesV2 when the shim
//! implements it, else the legacy Instances (+ Zones) calls, as upstream's controllers choose.

use std::collections::BTreeMap;

use cpi_proto::CpiError;
use cpi_proto::v1::{self, Capability, Consistency, Existence};
use k8s_openapi::api::core::v1::NodeAddress;
use kube::ResourceExt;

use super::client::Cloud;
use super::convert;
use crate::k8s::CachedNode;

/// What the provider says about one node (upstream `cloudprovider.InstanceMetadata`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMetadata {
    /// Provider ID to set (may be empty with the legacy path when InstanceID is not implemented).
    pub provider_id: String,
    /// Instance type; empty when unknown.
    pub instance_type: String,
    /// Node addresses; empty when unknown.
    pub addresses: Vec<NodeAddress>,
    /// Zone; empty when unknown.
    pub zone: String,
    /// Region; empty when unknown.
    pub region: String,
    /// Extra labels proposed by the provider.
    pub additional_labels: BTreeMap<String, String>,
}

/// A failed instance lookup, naming the call(s) that failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// One provider call failed.
    #[error("{call}: {source}")]
    Call {
        /// Which call.
        call: &'static str,
        /// Provider error.
        source: CpiError,
    },
    /// Both legacy lookups failed: by provider ID, then by node name.
    #[error("by provider ID: {by_id}, and by node name: {by_name}")]
    Both {
        /// Error of the lookup by provider ID.
        by_id: CpiError,
        /// Error of the lookup by node name.
        by_name: CpiError,
    },
    /// Neither the provider nor the node has a provider ID (InstancesV2 path).
    #[error("cloud provider does not set node provider ID")]
    NoProviderId,
    /// The legacy InstanceID call answered an empty instance ID.
    #[error("the provider returned an empty instance ID")]
    EmptyInstanceId {
        /// The provider ID that would result (`<provider>://`).
        id: String,
    },
    /// The legacy zone lookup failed.
    #[error("failed to get zone from cloud provider: {0}")]
    Zone(CpiError),
}

/// The provider's existence answer for one node's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceExistence {
    /// The instance exists.
    Exists,
    /// The provider said authoritatively that it does not.
    NotFound,
    /// Nothing may be concluded.
    Unknown(Uncertainty),
}

/// Why an existence answer is inconclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uncertainty {
    /// The provider answered `UNKNOWN`.
    Unknown,
    /// The provider answered `UNSPECIFIED` or a value this build does not know (an older or
    /// newer shim), which is as cautious as `UNKNOWN`.
    Unspecified,
    /// The call failed with this CPI error class.
    Error(&'static str),
}

impl Uncertainty {
    /// The reason label of `deletions_suppressed_total` and of the event text.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Unspecified => "UNSPECIFIED",
            Self::Error(class) => class,
        }
    }
}

/// Maps the tri-state answer: only `NOT_FOUND` means gone.
pub fn existence_from(response: &v1::InstanceExistsResponse) -> InstanceExistence {
    match Existence::try_from(response.existence) {
        Ok(Existence::Exists) => InstanceExistence::Exists,
        Ok(Existence::NotFound) => InstanceExistence::NotFound,
        Ok(Existence::Unknown) => InstanceExistence::Unknown(Uncertainty::Unknown),
        Ok(Existence::Unspecified) | Err(_) => InstanceExistence::Unknown(Uncertainty::Unspecified),
    }
}

impl Cloud {
    /// Upstream `GetInstanceProviderID`: `<provider>://<InstanceID(node_name)>`; `None` when the
    /// provider answers an empty instance ID.
    pub async fn instance_provider_id(
        &self,
        node_name: &str,
        consistency: Consistency,
    ) -> Result<Option<String>, CpiError> {
        let request = v1::NodeNameRequest {
            node_name: node_name.to_string(),
            consistency: consistency as i32,
        };
        let response = self
            .call(
                "Instances/InstanceID",
                self.instances().instance_id(request),
            )
            .await?;
        Ok((!response.instance_id.is_empty())
            .then(|| cpi_proto::provider_id::join(&self.info().name, &response.instance_id)))
    }

    /// Legacy path (upstream `getProviderID`): the node's provider ID, else the one built from
    /// InstanceID; `None` when the provider answers an empty instance ID.
    pub async fn legacy_provider_id(
        &self,
        node: &CachedNode,
        consistency: Consistency,
    ) -> Result<Option<String>, CpiError> {
        if let Some(id) = node.provider_id() {
            return Ok(Some(id.to_string()));
        }
        self.instance_provider_id(&node.name_any(), consistency)
            .await
    }

    /// Whether the node's instance exists, asked with strong consistency (the answer may
    /// delete the node). On the legacy path an unknown instance ID is an authoritative
    /// NOT_FOUND, as upstream.
    pub async fn instance_exists(&self, node: &CachedNode) -> InstanceExistence {
        let answer = if self.has(Capability::InstancesV2) {
            let request = v1::InstanceExistsRequest {
                node: Some(convert::node(node, self.wants_raw_objects())),
                consistency: Consistency::Strong as i32,
            };
            self.call(
                "InstancesV2/InstanceExists",
                self.instances_v2().instance_exists(request),
            )
            .await
        } else {
            let provider_id = match self.legacy_provider_id(node, Consistency::Strong).await {
                Ok(None) | Err(CpiError::InstanceNotFound(_)) => {
                    return InstanceExistence::NotFound;
                }
                Ok(Some(id)) => id,
                Err(err) => {
                    tracing::warn!(error = %err, "error getting provider ID");
                    return InstanceExistence::Unknown(Uncertainty::Error(err.class()));
                }
            };
            let request = v1::ProviderIdRequest {
                provider_id,
                consistency: Consistency::Strong as i32,
            };
            self.call(
                "Instances/InstanceExistsByProviderID",
                self.instances().instance_exists_by_provider_id(request),
            )
            .await
        };
        match answer {
            Ok(response) => existence_from(&response),
            Err(err) => {
                tracing::warn!(error = %err, "error checking if node exists");
                InstanceExistence::Unknown(Uncertainty::Error(err.class()))
            }
        }
    }

    /// Whether the node's instance is shut down; a provider that does not know (not
    /// implemented, instance not found) says no.
    pub async fn instance_shutdown(&self, node: &CachedNode) -> Result<bool, CpiError> {
        let result = if self.has(Capability::InstancesV2) {
            let request = v1::InstanceShutdownRequest {
                node: Some(convert::node(node, self.wants_raw_objects())),
                consistency: Consistency::Unspecified as i32,
            };
            self.call(
                "InstancesV2/InstanceShutdown",
                self.instances_v2().instance_shutdown(request),
            )
            .await
        } else {
            let id = match self
                .legacy_provider_id(node, Consistency::Unspecified)
                .await
            {
                Ok(Some(id)) => id,
                Ok(None) | Err(CpiError::InstanceNotFound(_)) => return Ok(false),
                Err(err) => return Err(err),
            };
            let request = v1::ProviderIdRequest {
                provider_id: id,
                consistency: Consistency::Unspecified as i32,
            };
            self.call(
                "Instances/InstanceShutdownByProviderID",
                self.instances().instance_shutdown_by_provider_id(request),
            )
            .await
        };
        match result {
            Ok(response) => Ok(response.shutdown),
            Err(CpiError::NotImplemented(_) | CpiError::InstanceNotFound(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Metadata to initialise the node with (upstream `getInstanceMetadata`); `None` when an
    /// InstancesV2 provider has none for the node yet.
    pub async fn instance_metadata(
        &self,
        node: &CachedNode,
    ) -> Result<Option<NodeMetadata>, LookupError> {
        if !self.has(Capability::InstancesV2) {
            return self.legacy_metadata(node).await.map(Some);
        }
        let Some(md) = self.v2_metadata(node).await? else {
            return Ok(None);
        };
        let mut metadata = metadata_from_proto(md);
        if metadata.provider_id.is_empty() {
            match node.provider_id() {
                Some(id) => metadata.provider_id = id.to_string(),
                None => return Err(LookupError::NoProviderId),
            }
        }
        Ok(Some(metadata))
    }

    /// The node's current addresses by the provider (the periodic address refresh).
    pub async fn node_addresses(&self, node: &CachedNode) -> Result<Vec<NodeAddress>, LookupError> {
        if self.has(Capability::InstancesV2) {
            Ok(self
                .v2_metadata(node)
                .await?
                .map(|m| convert::addresses_from_proto(&m.node_addresses))
                .unwrap_or_default())
        } else {
            self.legacy_addresses(&node.name_any(), node.provider_id().unwrap_or_default())
                .await
        }
    }

    /// InstancesV2 `InstanceMetadata`; `None` when the provider has none for the node yet.
    async fn v2_metadata(
        &self,
        node: &CachedNode,
    ) -> Result<Option<v1::InstanceMetadata>, LookupError> {
        let request = v1::InstanceMetadataRequest {
            node: Some(convert::node(node, self.wants_raw_objects())),
        };
        const CALL: &str = "InstancesV2/InstanceMetadata";
        let response = self
            .call(CALL, self.instances_v2().instance_metadata(request))
            .await
            .map_err(|source| LookupError::Call { call: CALL, source })?;
        Ok(response.metadata)
    }

    async fn legacy_metadata(&self, node: &CachedNode) -> Result<NodeMetadata, LookupError> {
        let name = node.name_any();
        let provider_id = match node.provider_id() {
            Some(id) => id.to_string(),
            None => match self
                .instance_provider_id(&name, Consistency::Unspecified)
                .await
            {
                Ok(Some(id)) => id,
                Ok(None) => {
                    return Err(LookupError::EmptyInstanceId {
                        id: cpi_proto::provider_id::join(&self.info().name, ""),
                    });
                }
                Err(CpiError::NotImplemented(_)) => {
                    tracing::warn!(node = %name, "provider does not implement InstanceID; continuing without a provider ID");
                    String::new()
                }
                Err(source) => {
                    return Err(LookupError::Call {
                        call: "Instances/InstanceID",
                        source,
                    });
                }
            },
        };
        let addresses = self.legacy_addresses(&name, &provider_id).await?;
        let instances = self.instances();
        let instance_type = self
            .by_id_or_name(
                &name,
                &provider_id,
                ("Instances/InstanceTypeByProviderID", |r| {
                    let mut c = instances.clone();
                    async move { c.instance_type_by_provider_id(r).await }
                }),
                ("Instances/InstanceType", |r| {
                    let mut c = instances.clone();
                    async move { c.instance_type(r).await }
                }),
            )
            .await?;
        let mut metadata = NodeMetadata {
            provider_id: provider_id.clone(),
            instance_type: instance_type.instance_type.unwrap_or_default(),
            addresses,
            ..NodeMetadata::default()
        };
        if self.has(Capability::Zones) {
            let zones = self.zones();
            let zone = self
                .by_id_or_name(
                    &name,
                    &provider_id,
                    ("Zones/GetZoneByProviderID", |r| {
                        let mut c = zones.clone();
                        async move { c.get_zone_by_provider_id(r).await }
                    }),
                    ("Zones/GetZoneByNodeName", |r| {
                        let mut c = zones.clone();
                        async move { c.get_zone_by_node_name(r).await }
                    }),
                )
                .await
                .map_err(|err| match err {
                    LookupError::Call { source, .. } => LookupError::Zone(source),
                    other => other,
                })?;
            metadata.zone = zone.failure_domain.unwrap_or_default();
            metadata.region = zone.region.unwrap_or_default();
        }
        Ok(metadata)
    }

    /// Legacy addresses: by provider ID, falling back to the node name.
    async fn legacy_addresses(
        &self,
        name: &str,
        provider_id: &str,
    ) -> Result<Vec<NodeAddress>, LookupError> {
        let instances = self.instances();
        let response = self
            .by_id_or_name(
                name,
                provider_id,
                ("Instances/NodeAddressesByProviderID", |r| {
                    let mut c = instances.clone();
                    async move { c.node_addresses_by_provider_id(r).await }
                }),
                ("Instances/NodeAddresses", |r| {
                    let mut c = instances.clone();
                    async move { c.node_addresses(r).await }
                }),
            )
            .await?;
        Ok(convert::addresses_from_proto(&response.addresses))
    }

    /// The legacy lookup pattern: ask by provider ID (when there is one) and, if that fails,
    /// by node name. When both fail, both errors are reported (as upstream).
    async fn by_id_or_name<T, ById, ByIdFut, ByName, ByNameFut>(
        &self,
        name: &str,
        provider_id: &str,
        by_id: (&'static str, ById),
        by_name: (&'static str, ByName),
    ) -> Result<T, LookupError>
    where
        ById: FnOnce(v1::ProviderIdRequest) -> ByIdFut,
        ByIdFut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        ByName: FnOnce(v1::NodeNameRequest) -> ByNameFut,
        ByNameFut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut by_id_error = None;
        if !provider_id.is_empty() {
            let request = v1::ProviderIdRequest {
                provider_id: provider_id.to_string(),
                consistency: Consistency::Unspecified as i32,
            };
            match self.call(by_id.0, (by_id.1)(request)).await {
                Ok(found) => return Ok(found),
                Err(err) => by_id_error = Some(err),
            }
        }
        let request = v1::NodeNameRequest {
            node_name: name.to_string(),
            consistency: Consistency::Unspecified as i32,
        };
        let by_name_result = self.call(by_name.0, (by_name.1)(request)).await;
        by_name_result.map_err(|by_name_error| match by_id_error {
            Some(by_id_error) => LookupError::Both {
                by_id: by_id_error,
                by_name: by_name_error,
            },
            None => LookupError::Call {
                call: by_name.0,
                source: by_name_error,
            },
        })
    }
}

fn metadata_from_proto(md: v1::InstanceMetadata) -> NodeMetadata {
    NodeMetadata {
        provider_id: md.provider_id.unwrap_or_default(),
        instance_type: md.instance_type.unwrap_or_default(),
        addresses: convert::addresses_from_proto(&md.node_addresses),
        zone: md.zone.unwrap_or_default(),
        region: md.region.unwrap_or_default(),
        additional_labels: md.additional_labels.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_found_is_gone() {
        let answer = |e: Existence| v1::InstanceExistsResponse {
            existence: e as i32,
            ..Default::default()
        };
        assert_eq!(
            existence_from(&answer(Existence::Exists)),
            InstanceExistence::Exists
        );
        assert_eq!(
            existence_from(&answer(Existence::NotFound)),
            InstanceExistence::NotFound
        );
        assert!(matches!(
            existence_from(&answer(Existence::Unknown)),
            InstanceExistence::Unknown(_)
        ));
        assert!(matches!(
            existence_from(&answer(Existence::Unspecified)),
            InstanceExistence::Unknown(_)
        ));
        let future = v1::InstanceExistsResponse {
            existence: 42,
            ..Default::default()
        };
        assert!(matches!(
            existence_from(&future),
            InstanceExistence::Unknown(_)
        ));
    }
}
