//! InstancesV2, Instances and Zones answered from the inventory.
//!
//! Lookup rule: a node's `spec.providerID` wins (`local://<instanceID>`); only a node without one
//! is looked up by name. Provider IDs of other providers never get here: the framework answers
//! them `NOT_OWNED` (PERMISSION_DENIED), so this shim never claims, let alone denies, another
//! provider's machines.
//!
//! Absent and `terminated` machines are authoritatively not found (the inventory is the cloud);
//! `shutdown` machines exist. A call asking for strong consistency re-reads the file first, and
//! if the file is broken or refused right then, existence is UNKNOWN and other calls fail
//! retryably.

use std::sync::Arc;

use cpi_proto::CpiError;
use cpi_proto::v1::{
    Consistency, CurrentNodeNameResponse, Existence, InstanceExistsResponse, InstanceIdResponse,
    InstanceMetadata, InstanceMetadataResponse, InstanceShutdownResponse, InstanceTypeResponse,
    Node, NodeAddressesResponse, PowerState, Zone,
};
use shim_framework::{ProviderDescription, node_name};

use crate::inventory::{Inventory, Machine};
use crate::reload::InventoryHandle;

/// The provider name, and the scheme of every provider ID it owns.
pub const PROVIDER_NAME: &str = "local";

/// How a caller named the machine it asks about.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    ProviderId(&'a str),
    Name(&'a str),
}

/// The local provider: answers from the live inventory.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    inventory: InventoryHandle,
    description: ProviderDescription,
    own_zone: Option<Zone>,
}

impl LocalProvider {
    /// A provider over `inventory`; `own_zone` answers `GetZone` (None: NotImplemented).
    pub fn new(inventory: InventoryHandle, own_zone: Option<Zone>) -> Self {
        Self {
            inventory,
            description: description(),
            own_zone,
        }
    }

    /// The inventory this provider answers from.
    pub fn inventory(&self) -> &InventoryHandle {
        &self.inventory
    }

    /// The inventory to answer from, re-read first when the caller asked for strong
    /// consistency.
    async fn snapshot(&self, consistency: Consistency) -> Result<Arc<Inventory>, CpiError> {
        if consistency != Consistency::Strong {
            return Ok(self.inventory.current());
        }
        self.inventory.fresh().await.map_err(|err| {
            CpiError::Cloud(format!(
                "cannot give a fresh answer, the inventory file is not being served: {err}"
            ))
        })
    }

    fn instance_id_of<'a>(&self, provider_id: &'a str) -> Result<&'a str, CpiError> {
        self.description.strip_owned(provider_id).ok_or_else(|| {
            CpiError::NotOwned(format!("provider ID {provider_id:?} is not a local:// ID"))
        })
    }

    /// The machine named by `key`, in any state, or `None` when the inventory has no such
    /// machine.
    fn find<'i>(
        &self,
        inventory: &'i Inventory,
        key: Key<'_>,
    ) -> Result<Option<&'i Machine>, CpiError> {
        Ok(match key {
            Key::ProviderId(id) => inventory.by_instance_id(self.instance_id_of(id)?),
            Key::Name(name) => inventory.by_name(name),
        })
    }

    /// The existing (not terminated) machine named by `key`, else `InstanceNotFound`.
    fn existing<'i>(
        &self,
        inventory: &'i Inventory,
        key: Key<'_>,
    ) -> Result<&'i Machine, CpiError> {
        match self.find(inventory, key)? {
            Some(machine) if machine.state.exists() => Ok(machine),
            Some(machine) => Err(CpiError::InstanceNotFound(format!(
                "machine {:?} ({}) is terminated",
                machine.name,
                describe(key)
            ))),
            None => Err(CpiError::InstanceNotFound(format!(
                "no machine with {} in the inventory",
                describe(key)
            ))),
        }
    }

    async fn exists(
        &self,
        key: Key<'_>,
        consistency: Consistency,
    ) -> Result<InstanceExistsResponse, CpiError> {
        let inventory = match self.snapshot(consistency).await {
            Ok(inventory) => inventory,
            // Not knowing is never "not found".
            Err(err) => {
                return Ok(InstanceExistsResponse {
                    existence: Existence::Unknown as i32,
                    power_state: PowerState::Unspecified as i32,
                    detail: err.to_string(),
                });
            }
        };
        Ok(match self.find(&inventory, key)? {
            Some(machine) => InstanceExistsResponse {
                existence: machine.state.existence() as i32,
                power_state: machine.state.power_state() as i32,
                detail: format!("machine {:?} is {:?}", machine.name, machine.state),
            },
            None => InstanceExistsResponse {
                existence: Existence::NotFound as i32,
                power_state: PowerState::Unspecified as i32,
                detail: format!("no machine with {} in the inventory", describe(key)),
            },
        })
    }

    async fn shutdown(
        &self,
        key: Key<'_>,
        consistency: Consistency,
    ) -> Result<InstanceShutdownResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        match self.find(&inventory, key)? {
            Some(machine) => Ok(InstanceShutdownResponse {
                shutdown: machine.state.is_shutdown(),
                power_state: machine.state.power_state() as i32,
            }),
            None => Err(CpiError::InstanceNotFound(format!(
                "no machine with {} in the inventory",
                describe(key)
            ))),
        }
    }

    fn zone_of(machine: &Machine) -> Zone {
        Zone {
            failure_domain: machine.zone.clone(),
            region: machine.region.clone(),
        }
    }
}

/// How the local provider describes itself.
pub fn description() -> ProviderDescription {
    ProviderDescription::new(PROVIDER_NAME, env!("CARGO_PKG_VERSION"))
}

fn describe(key: Key<'_>) -> String {
    match key {
        Key::ProviderId(id) => format!("provider ID {id:?}"),
        Key::Name(name) => format!("node name {name:?}"),
    }
}

/// The key of a node: its provider ID when set, else its name.
fn node_key(node: &Node) -> Key<'_> {
    match node.provider_id.as_deref() {
        Some(id) if !id.is_empty() => Key::ProviderId(id),
        _ => Key::Name(node_name(node)),
    }
}

#[tonic::async_trait]
impl shim_framework::InstancesV2 for LocalProvider {
    async fn instance_exists(
        &self,
        node: Node,
        consistency: Consistency,
    ) -> Result<InstanceExistsResponse, CpiError> {
        self.exists(node_key(&node), consistency).await
    }

    async fn instance_shutdown(
        &self,
        node: Node,
        consistency: Consistency,
    ) -> Result<InstanceShutdownResponse, CpiError> {
        self.shutdown(node_key(&node), consistency).await
    }

    async fn instance_metadata(&self, node: Node) -> Result<InstanceMetadataResponse, CpiError> {
        let inventory = self.inventory.current();
        let machine = self.existing(&inventory, node_key(&node))?;
        Ok(InstanceMetadataResponse {
            metadata: Some(InstanceMetadata {
                provider_id: Some(cpi_proto::provider_id::join(
                    PROVIDER_NAME,
                    &machine.instance_id,
                )),
                instance_type: machine.instance_type.clone(),
                node_addresses: machine.addresses.clone(),
                zone: machine.zone.clone(),
                region: machine.region.clone(),
                additional_labels: machine
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
        })
    }
}

#[tonic::async_trait]
impl shim_framework::Instances for LocalProvider {
    async fn node_addresses(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<NodeAddressesResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        let machine = self.existing(&inventory, Key::Name(&node_name))?;
        Ok(NodeAddressesResponse {
            addresses: machine.addresses.clone(),
        })
    }

    async fn node_addresses_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<NodeAddressesResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        let machine = self.existing(&inventory, Key::ProviderId(&provider_id))?;
        Ok(NodeAddressesResponse {
            addresses: machine.addresses.clone(),
        })
    }

    async fn instance_id(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<InstanceIdResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        let machine = self.existing(&inventory, Key::Name(&node_name))?;
        Ok(InstanceIdResponse {
            instance_id: machine.instance_id.clone(),
        })
    }

    async fn instance_type(
        &self,
        node_name: String,
        consistency: Consistency,
    ) -> Result<InstanceTypeResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        let machine = self.existing(&inventory, Key::Name(&node_name))?;
        Ok(InstanceTypeResponse {
            instance_type: machine.instance_type.clone(),
        })
    }

    async fn instance_type_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceTypeResponse, CpiError> {
        let inventory = self.snapshot(consistency).await?;
        let machine = self.existing(&inventory, Key::ProviderId(&provider_id))?;
        Ok(InstanceTypeResponse {
            instance_type: machine.instance_type.clone(),
        })
    }

    async fn current_node_name(
        &self,
        hostname: String,
    ) -> Result<CurrentNodeNameResponse, CpiError> {
        // Local machines are registered under their host names.
        Ok(CurrentNodeNameResponse {
            node_name: hostname,
        })
    }

    async fn instance_exists_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceExistsResponse, CpiError> {
        self.exists(Key::ProviderId(&provider_id), consistency)
            .await
    }

    async fn instance_shutdown_by_provider_id(
        &self,
        provider_id: String,
        consistency: Consistency,
    ) -> Result<InstanceShutdownResponse, CpiError> {
        self.shutdown(Key::ProviderId(&provider_id), consistency)
            .await
    }
}

#[tonic::async_trait]
impl shim_framework::Zones for LocalProvider {
    async fn get_zone(&self) -> Result<Zone, CpiError> {
        let mut zone = self.own_zone.clone().ok_or_else(|| {
            CpiError::NotImplemented("GetZone needs --zone on the local shim".into())
        })?;
        if zone.region.is_none() {
            zone.region = self.inventory.current().region().map(str::to_string);
        }
        Ok(zone)
    }

    async fn get_zone_by_provider_id(&self, provider_id: String) -> Result<Zone, CpiError> {
        let inventory = self.inventory.current();
        let machine = self.existing(&inventory, Key::ProviderId(&provider_id))?;
        Ok(Self::zone_of(machine))
    }

    async fn get_zone_by_node_name(&self, node_name: String) -> Result<Zone, CpiError> {
        let inventory = self.inventory.current();
        let machine = self.existing(&inventory, Key::Name(&node_name))?;
        Ok(Self::zone_of(machine))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::shrink::ShrinkPolicy;
    use cpi_proto::v1::ObjectMeta;
    use shim_framework::{Instances, InstancesV2, Zones};

    const INVENTORY: &str = r#"
region: r1
machines:
  - name: node-a
    instanceID: i-a
    instanceType: small
    zone: zone-a
    addresses: [{type: InternalIP, address: 10.0.0.1}]
    labels: {example.com/rack: r1}
  - {name: node-b, instanceID: i-b, zone: zone-b, state: shutdown}
  - {name: node-c, instanceID: i-c, state: terminated}
"#;

    fn provider() -> (tempfile::TempDir, LocalProvider) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, INVENTORY).unwrap();
        let handle = InventoryHandle::load(&path, ShrinkPolicy::default()).unwrap();
        (dir, LocalProvider::new(handle, None))
    }

    fn node(name: &str, provider_id: Option<&str>) -> Node {
        Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            provider_id: provider_id.map(str::to_string),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn lookup_by_provider_id_wins_over_name() {
        let (_dir, p) = provider();
        // Name says node-a, provider ID says node-b's machine: the provider ID is authoritative.
        let meta = p
            .instance_metadata(node("node-a", Some("local://i-b")))
            .await
            .unwrap()
            .metadata
            .unwrap();
        assert_eq!(meta.provider_id.as_deref(), Some("local://i-b"));
        assert_eq!(meta.zone.as_deref(), Some("zone-b"));
        // An unknown provider ID is not found even if the name exists.
        assert!(matches!(
            p.instance_metadata(node("node-a", Some("local://i-zzz")))
                .await,
            Err(CpiError::InstanceNotFound(_))
        ));
    }

    #[tokio::test]
    async fn lookup_by_name_without_provider_id() {
        let (_dir, p) = provider();
        for provider_id in [None, Some("")] {
            let meta = p
                .instance_metadata(node("node-a", provider_id))
                .await
                .unwrap()
                .metadata
                .unwrap();
            assert_eq!(meta.provider_id.as_deref(), Some("local://i-a"));
            assert_eq!(meta.instance_type.as_deref(), Some("small"));
            assert_eq!(meta.region.as_deref(), Some("r1"));
            assert_eq!(meta.node_addresses.len(), 1);
            assert_eq!(meta.additional_labels["example.com/rack"], "r1");
        }
        assert!(matches!(
            p.instance_metadata(node("node-z", None)).await,
            Err(CpiError::InstanceNotFound(_))
        ));
    }

    #[tokio::test]
    async fn state_maps_to_existence_and_shutdown() {
        let (_dir, p) = provider();
        let table = [
            (
                "node-a",
                Existence::Exists,
                Some(false),
                PowerState::Running,
            ),
            (
                "node-b",
                Existence::Exists,
                Some(true),
                PowerState::Shutdown,
            ),
            (
                "node-c",
                Existence::NotFound,
                Some(false),
                PowerState::Terminated,
            ),
            ("node-z", Existence::NotFound, None, PowerState::Unspecified),
        ];
        for (name, existence, shutdown, power) in table {
            for consistency in [Consistency::Cached, Consistency::Strong] {
                let exists = p
                    .instance_exists(node(name, None), consistency)
                    .await
                    .unwrap();
                assert_eq!(exists.existence, existence as i32, "{name}");
                assert_eq!(exists.power_state, power as i32, "{name}");
                let down = p.instance_shutdown(node(name, None), consistency).await;
                match shutdown {
                    Some(expected) => assert_eq!(down.unwrap().shutdown, expected, "{name}"),
                    None => assert!(matches!(down, Err(CpiError::InstanceNotFound(_))), "{name}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn strong_consistency_on_a_broken_file_is_unknown() {
        let (dir, p) = provider();
        std::fs::write(dir.path().join("inv.yaml"), "machines: [").unwrap();
        let answer = p
            .instance_exists(node("node-a", None), Consistency::Strong)
            .await
            .unwrap();
        assert_eq!(answer.existence, Existence::Unknown as i32);
        // Cached answers keep coming from the last good inventory.
        let cached = p
            .instance_exists(node("node-a", None), Consistency::Cached)
            .await
            .unwrap();
        assert_eq!(cached.existence, Existence::Exists as i32);
    }

    #[tokio::test]
    async fn legacy_instances_follow_the_same_rules() {
        let (_dir, p) = provider();
        let c = Consistency::Unspecified;
        assert_eq!(
            p.instance_id("node-b".into(), c).await.unwrap().instance_id,
            "i-b"
        );
        assert!(matches!(
            p.instance_id("node-c".into(), c).await,
            Err(CpiError::InstanceNotFound(_))
        ));
        assert_eq!(
            p.instance_type_by_provider_id("local://i-a".into(), c)
                .await
                .unwrap()
                .instance_type
                .as_deref(),
            Some("small")
        );
        assert_eq!(
            p.instance_type("node-b".into(), c)
                .await
                .unwrap()
                .instance_type,
            None
        );
        assert_eq!(
            p.node_addresses_by_provider_id("local://i-a".into(), c)
                .await
                .unwrap()
                .addresses[0]
                .address,
            "10.0.0.1"
        );
        let exists = p
            .instance_exists_by_provider_id("local://i-c".into(), c)
            .await
            .unwrap();
        assert_eq!(exists.existence, Existence::NotFound as i32);
        assert!(
            p.instance_shutdown_by_provider_id("local://i-b".into(), c)
                .await
                .unwrap()
                .shutdown
        );
        assert_eq!(
            p.current_node_name("node-a".into())
                .await
                .unwrap()
                .node_name,
            "node-a"
        );
        assert!(matches!(
            p.add_ssh_key_to_all_instances("root".into(), vec![]).await,
            Err(CpiError::NotImplemented(_))
        ));
    }

    #[tokio::test]
    async fn zones_come_from_the_inventory_and_the_flag() {
        let (_dir, p) = provider();
        assert!(matches!(
            p.get_zone().await,
            Err(CpiError::NotImplemented(_))
        ));
        let zone = p.get_zone_by_node_name("node-a".into()).await.unwrap();
        assert_eq!(zone.failure_domain.as_deref(), Some("zone-a"));
        assert_eq!(zone.region.as_deref(), Some("r1"));
        let zone = p
            .get_zone_by_provider_id("local://i-b".into())
            .await
            .unwrap();
        assert_eq!(zone.failure_domain.as_deref(), Some("zone-b"));
        let own = LocalProvider::new(
            p.inventory().clone(),
            Some(Zone {
                failure_domain: Some("zone-x".into()),
                region: None,
            }),
        );
        let zone = own.get_zone().await.unwrap();
        assert_eq!(zone.failure_domain.as_deref(), Some("zone-x"));
        assert_eq!(
            zone.region.as_deref(),
            Some("r1"),
            "region from the inventory"
        );
    }
}
