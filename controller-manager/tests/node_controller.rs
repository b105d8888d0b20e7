//! The upstream `controllers/node/node_controller_test.go` table tests, one `#[tokio::test]` per
//! case, run against a real kube-apiserver and the fake provider served over a real Unix socket.
//!
//! Test names are `<upstream test function>_<upstream case name>` in snake case:
//! `sync_node_*` ← `Test_syncNode` (`instance_v2_*` for the `[instanceV2]` cases),
//! `reconcile_node_labels_*` ← `Test_reconcileNodeLabels`, `node_addresses_not_update*` ←
//! `TestNodeAddressesNotUpdate{,V2}`, `get_instance_metadata_*` ← `TestGetInstanceMetadata`
//! (observed through a sync of a tainted node), `update_node_status_*` ← `TestUpdateNodeStatus`.
//! `TestNodeAddressesChangeDetected` is a pure function test and lives with the controller's unit
//! tests (`node_addresses_change_detected_cases`).
//!
//! Every test uses the control plane shared by this binary, unique node names, and a node cache
//! that watches only its own nodes (a field or label selector), so `update_node_status` never
//! sees another test's nodes.
//!
//! Fixture adaptations (the rule under test is unchanged; see each test):
//! - upstream's malformed provider IDs (`test-provider-id`, `node0.aws.12345`,
//!   `node0.cp.12345`) become `fake://…`: this project only acts on nodes whose provider ID is
//!   `<scheme>://<id>` with a prefix the shim claims (`ProviderInfo.provider_id_prefixes`), and
//!   the shim framework refuses other IDs;
//! - the API server adds `node.kubernetes.io/not-ready:NoSchedule` to every created node, so
//!   taint comparisons leave that taint out.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cloud_controller_manager::well_known::{CONDITION_INITIALIZATION_FAILED, TAINT_UNINITIALIZED};
use cloud_controller_manager::{CachedNode, NodeController, SyncError};
use fake_provider::{CpiError, FakeCloud, FakeZone, call, external_ip, hostname, internal_ip};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use support::{Harness, NodeCache, harness, taints_of};
use test_control_plane::unique_name;

const ANNOTATION_PROVIDED_NODE_IP: &str = "alpha.kubernetes.io/provided-node-ip";
const IMPROVE_COVERAGE_TAINT: &str = "ImproveCoverageTaint";

// ------------------------------------------------------------------------------------------------
// Harness (the fake provider, `Cloud`, client and node caches are in `support`)
// ------------------------------------------------------------------------------------------------

impl Harness {
    /// A node controller over `store`, talking to the fake provider.
    fn controller(&self, store: Store<CachedNode>) -> Arc<NodeController> {
        NodeController::new(
            self.client.clone(),
            self.cloud.clone(),
            store,
            self.recorder("cloud-node-controller"),
        )
    }

    /// Creates `node`, runs one successful `sync_node` on it and returns the node after.
    async fn sync_ok(&self, node: Node) -> Node {
        let (_, result, after) = self.sync(node).await;
        result.unwrap();
        after
    }

    /// Creates `node`, runs one `sync_node` on it and returns (node before, result, node after).
    async fn sync(&self, node: Node) -> (Node, Result<(), SyncError>, Node) {
        let before = self.create(node).await;
        let cache = self.cache_for(&before).await;
        let result = self
            .controller(cache.store.clone())
            .sync_node(&before.name_any())
            .await;
        let after = self.get(&before.name_any()).await;
        (before, result, after)
    }
}

// ------------------------------------------------------------------------------------------------
// Fixtures and projections
// ------------------------------------------------------------------------------------------------

/// Builder for the upstream `existingNode` fixtures.
struct NodeFixture(Node);

fn node(name: &str) -> NodeFixture {
    let mut node = Node::default();
    node.metadata.name = Some(name.to_string());
    NodeFixture(node)
}

fn taint(key: &str) -> Taint {
    Taint {
        key: key.to_string(),
        value: Some("true".to_string()),
        effect: "NoSchedule".to_string(),
        time_added: None,
    }
}

fn upstream_time() -> Time {
    Time("2015-01-01T12:00:00Z".parse().unwrap())
}

impl NodeFixture {
    fn spec(&mut self) -> &mut NodeSpec {
        self.0.spec.get_or_insert_with(Default::default)
    }

    fn status(&mut self) -> &mut NodeStatus {
        self.0.status.get_or_insert_with(Default::default)
    }

    /// Adds a `<key>=true:NoSchedule` taint.
    fn taint(mut self, key: &str) -> Self {
        self.spec()
            .taints
            .get_or_insert_with(Vec::new)
            .push(taint(key));
        self
    }

    /// Adds the `node.cloudprovider.kubernetes.io/uninitialized=true:NoSchedule` taint.
    fn cloud_taint(self) -> Self {
        self.taint(TAINT_UNINITIALIZED)
    }

    fn provider_id(mut self, id: &str) -> Self {
        self.spec().provider_id = Some(id.to_string());
        self
    }

    fn labels(mut self, pairs: &[(&str, &str)]) -> Self {
        self.0.metadata.labels = Some(label_map(pairs));
        self
    }

    fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    fn addresses(mut self, addresses: Vec<NodeAddress>) -> Self {
        self.status().addresses = Some(addresses);
        self
    }

    /// Sets the Ready condition (with upstream's 2015 heartbeat/transition times).
    fn ready(mut self, status: &str) -> Self {
        self.status()
            .conditions
            .get_or_insert_with(Vec::new)
            .push(NodeCondition {
                type_: "Ready".to_string(),
                status: status.to_string(),
                last_heartbeat_time: Some(upstream_time()),
                last_transition_time: Some(upstream_time()),
                ..Default::default()
            });
        self
    }

    fn build(self) -> Node {
        self.0
    }
}

fn label_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn addr(kind: &str, address: &str) -> NodeAddress {
    NodeAddress {
        type_: kind.to_string(),
        address: address.to_string(),
    }
}

/// Upstream's "cloud addrs" as the fake answers them.
fn cloud_addresses() -> Vec<fake_provider::proto::NodeAddress> {
    vec![
        hostname("node0.cloud.internal"),
        internal_ip("10.0.0.1"),
        external_ip("132.143.154.163"),
    ]
}

/// Upstream's "cloud addrs" as they must appear on the node.
fn expected_cloud_addresses() -> Vec<NodeAddress> {
    vec![
        addr("Hostname", "node0.cloud.internal"),
        addr("InternalIP", "10.0.0.1"),
        addr("ExternalIP", "132.143.154.163"),
    ]
}

fn ips_only() -> Vec<fake_provider::proto::NodeAddress> {
    vec![internal_ip("10.0.0.1"), external_ip("132.143.154.163")]
}

fn provider_id_of(node: &Node) -> Option<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .filter(|id| !id.is_empty())
}

fn addresses_of(node: &Node) -> Vec<NodeAddress> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
}

fn labels_of(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

fn annotations_of(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

/// Whether the node still carries the uninitialized taint.
fn is_uninitialized(node: &Node) -> bool {
    taints_of(node).iter().any(|t| t.key == TAINT_UNINITIALIZED)
}

/// (type, status) of every condition.
fn conditions_of(node: &Node) -> Vec<(String, String)> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| {
            c.iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn ready_unknown() -> Vec<(String, String)> {
    vec![("Ready".to_string(), "Unknown".to_string())]
}

/// The node must not have been written at all.
fn assert_unchanged(before: &Node, after: &Node) {
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "node was written"
    );
    assert_eq!(after, before);
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Test_syncNode — Instances
// ------------------------------------------------------------------------------------------------

/// Upstream "node initialized with hostname".
#[tokio::test]
async fn sync_node_node_initialized_with_hostname() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .cloud_taint()
                .addresses(vec![addr("Hostname", "nodeoverriden")])
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![]);
    // The cloud's Hostname replaces the kubelet's.
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    // The instance type is looked up by provider ID, under which the fake has none.
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "node initialized with hostname and cloud provider missing hostname".
#[tokio::test]
async fn sync_node_node_initialized_with_hostname_and_cloud_provider_missing_hostname() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: ips_only(),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .cloud_taint()
                .addresses(vec![addr("Hostname", "nodeoverriden")])
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(
        addresses_of(&after),
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "nodeoverriden"),
        ]
    );
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "node initialized with provider ID".
#[tokio::test]
async fn sync_node_node_initialized_with_provider_id() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h.sync_ok(node(&name).cloud_taint().build()).await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "node ignored": a node without the cloud taint (and without labels) is not touched.
#[tokio::test]
async fn sync_node_node_ignored() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h.sync(node(&name).build()).await;
    result.unwrap();
    assert_unchanged(&before, &after);
    assert_eq!(h.fake.calls(), Vec::<String>::new());
}

/// Upstream "zone/region topology labels added".
#[tokio::test]
async fn sync_node_zone_region_topology_labels_added() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        provider: "aws".into(),
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .ready("Unknown")
                .cloud_taint()
                .build(),
        )
        .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/region", "us-west"),
            ("failure-domain.beta.kubernetes.io/zone", "us-west-1a"),
            ("topology.kubernetes.io/region", "us-west"),
            ("topology.kubernetes.io/zone", "us-west-1a"),
        ])
    );
    assert_eq!(provider_id_of(&after).as_deref(), Some("aws://12345"));
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
}

/// Upstream "node addresses": only the cloud taint is removed.
#[tokio::test]
async fn sync_node_node_addresses() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        exists_by_provider_id: true,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .ready("Unknown")
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "nil instanceMetadata provided by InstanceV2": no error, node untouched (taint kept).
/// Fixture: provider ID `node0.aws.12345` → `fake://node0.aws.12345`.
#[tokio::test]
async fn sync_node_nil_instance_metadata_provided_by_instance_v2() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        override_metadata: Some(None),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h
        .sync(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.aws.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    result.unwrap();
    assert_unchanged(&before, &after);
    assert_eq!(h.fake.calls(), vec![call::INSTANCE_METADATA]);
}

/// Upstream "provided node IP address". Fixture: provider ID `node0.aws.12345` →
/// `fake://node0.aws.12345`.
#[tokio::test]
async fn sync_node_provided_node_ip_address() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        addresses: ips_only(),
        exists_by_provider_id: true,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.aws.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    assert_eq!(
        annotations_of(&after),
        label_map(&[(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")])
    );
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(
        provider_id_of(&after).as_deref(),
        Some("fake://node0.aws.12345")
    );
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(
        addresses_of(&after),
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "node0.cloud.internal"),
        ]
    );
    assert!(!h.fake.calls().contains(&call::INSTANCE_ID.to_string()));
}

async fn provided_node_ip_error_case(annotation: &str) {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        addresses: ips_only(),
        exists_by_provider_id: true,
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h
        .sync(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, annotation)
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.aws.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    let err = result.expect_err("an invalid provided node IP must fail the sync");
    assert!(
        matches!(&err, SyncError::ProvidedNodeIp { node, .. } if *node == name),
        "unexpected error: {err}"
    );
    assert!(
        err.to_string().starts_with(&format!(
            "provided node ip for node {name:?} is not valid: "
        )),
        "{err}"
    );
    assert_unchanged(&before, &after);
}

/// Upstream "provided node IP address is not valid": error, node unchanged.
#[tokio::test]
async fn sync_node_provided_node_ip_address_is_not_valid() {
    provided_node_ip_error_case("invalid-ip").await;
}

/// Upstream "provided node IP address is not present": error, node unchanged.
#[tokio::test]
async fn sync_node_provided_node_ip_address_is_not_present() {
    provided_node_ip_error_case("10.0.0.2").await;
}

/// Upstream "provider ID already set": the node's provider ID is kept. Fixture:
/// `test-provider-id` → `fake://test-provider-id`.
#[tokio::test]
async fn sync_node_provider_id_already_set() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        addresses: cloud_addresses(),
        exists_by_provider_id: false,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .ready("Unknown")
                .provider_id("fake://test-provider-id")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .build(),
        )
        .await;
    assert_eq!(
        provider_id_of(&after).as_deref(),
        Some("fake://test-provider-id")
    );
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(labels_of(&after), BTreeMap::new());
    assert!(!h.fake.calls().contains(&call::INSTANCE_ID.to_string()));
}

/// Upstream "provider ID not implemented": InstanceID answers NotImplemented → the node is
/// initialised without a provider ID (and without addresses: the cloud has none).
#[tokio::test]
async fn sync_node_provider_id_not_implemented() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        provider: "test".into(),
        ext_id_err: HashMap::from([(name.clone(), CpiError::NotImplemented("InstanceID".into()))]),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(node(&name).ready("Unknown").cloud_taint().build())
        .await;
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(provider_id_of(&after), None);
    assert_eq!(addresses_of(&after), vec![]);
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(labels_of(&after), BTreeMap::new());
}

// ------------------------------------------------------------------------------------------------
// Test_syncNode — [instanceV2]
// ------------------------------------------------------------------------------------------------

/// Upstream "[instanceV2] node initialized with provider ID": the metadata has no provider ID, so
/// the node's is used.
#[tokio::test]
async fn sync_node_instance_v2_node_initialized_with_provider_id() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .cloud_taint()
                .provider_id("fake://12345")
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(labels_of(&after), BTreeMap::new());
    assert_eq!(h.fake.calls(), vec![call::INSTANCE_METADATA]);
}

/// Upstream "[instanceV2] node ignored".
#[tokio::test]
async fn sync_node_instance_v2_node_ignored() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h.sync(node(&name).build()).await;
    result.unwrap();
    assert_unchanged(&before, &after);
    assert_eq!(h.fake.calls(), Vec::<String>::new());
}

/// Upstream "[instanceV2] zone/region topology labels added". Upstream's fake is provider `aws`
/// but its metadata answers `fake://12345`; here the fake claims both prefixes so the
/// ownership check lets that ID through.
#[tokio::test]
async fn sync_node_instance_v2_zone_region_topology_labels_added() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        provider: "aws".into(),
        provider_id_prefixes: vec!["aws://".into(), "fake://".into()],
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        provider_id: map(&[(&name, "fake://12345")]),
        addresses: cloud_addresses(),
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .ready("Unknown")
                .cloud_taint()
                .build(),
        )
        .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/region", "us-west"),
            ("failure-domain.beta.kubernetes.io/zone", "us-west-1a"),
            ("topology.kubernetes.io/region", "us-west"),
            ("topology.kubernetes.io/zone", "us-west-1a"),
        ])
    );
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
    // InstancesV2 replaces Zones.
    assert_eq!(h.fake.calls(), vec![call::INSTANCE_METADATA]);
}

/// Upstream "[instanceV2] node addresses".
#[tokio::test]
async fn sync_node_instance_v2_node_addresses() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        ext_id: map(&[(&name, "12345")]),
        provider_id: map(&[(&name, "fake://12345")]),
        addresses: cloud_addresses(),
        exists_by_provider_id: true,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .ready("Unknown")
                .build(),
        )
        .await;
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "[instanceV2] provided node IP address". Fixture: provider ID `node0.aws.12345` →
/// `fake://node0.aws.12345`.
#[tokio::test]
async fn sync_node_instance_v2_provided_node_ip_address() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: ips_only(),
        exists_by_provider_id: true,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.aws.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(
        provider_id_of(&after).as_deref(),
        Some("fake://node0.aws.12345")
    );
    assert_eq!(conditions_of(&after), ready_unknown());
    assert_eq!(
        addresses_of(&after),
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "node0.cloud.internal"),
        ]
    );
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "[instanceV2] provided additional labels". Fixture: provider ID `node0.cp.12345` →
/// `fake://node0.cp.12345`.
#[tokio::test]
async fn sync_node_instance_v2_provided_additional_labels() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: ips_only(),
        exists_by_provider_id: true,
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        additional_labels: map(&[
            ("topology.k8s.cp/zone-id", "az1"),
            ("my.custom.label/foo", "bar"),
        ]),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.cp.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/region", "us-west"),
            ("failure-domain.beta.kubernetes.io/zone", "us-west-1a"),
            ("topology.kubernetes.io/region", "us-west"),
            ("topology.kubernetes.io/zone", "us-west-1a"),
            ("topology.k8s.cp/zone-id", "az1"),
            ("my.custom.label/foo", "bar"),
        ])
    );
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(
        provider_id_of(&after).as_deref(),
        Some("fake://node0.cp.12345")
    );
    assert_eq!(
        addresses_of(&after),
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "node0.cloud.internal"),
        ]
    );
}

/// Upstream "[instanceV2] provided additional labels with labels to discard": labels in the
/// kubernetes.io / k8s.io namespaces are dropped, existing labels are never overwritten,
/// look-alike namespaces are added. Fixture: provider ID `node0.cp.12345` →
/// `fake://node0.cp.12345`.
#[tokio::test]
async fn sync_node_instance_v2_provided_additional_labels_with_labels_to_discard() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: ips_only(),
        exists_by_provider_id: true,
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        additional_labels: map(&[
            ("topology.kubernetes.io/region", "us-other-west"),
            ("topology.k8s.io/region", "us-other-west"),
            ("kubernetes.io/region", "us-other-west"),
            ("k8s.io/region", "us-other-west"),
            ("my.custom.label/foo", "bar"),
            ("my.custom.label/bar", "foo"),
            ("app.k8snio/bar", "foo"),
            ("k8snio/bar", "foo"),
        ]),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .annotation(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.1")
                .labels(&[
                    ("my.custom.label/foo", "fizz"),
                    ("my.custom.label/bar", "foo"),
                ])
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .provider_id("fake://node0.cp.12345")
                .ready("Unknown")
                .addresses(vec![addr("Hostname", "node0.cloud.internal")])
                .build(),
        )
        .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/region", "us-west"),
            ("failure-domain.beta.kubernetes.io/zone", "us-west-1a"),
            ("topology.kubernetes.io/region", "us-west"),
            ("topology.kubernetes.io/zone", "us-west-1a"),
            ("my.custom.label/foo", "fizz"),
            ("my.custom.label/bar", "foo"),
            ("app.k8snio/bar", "foo"),
            ("k8snio/bar", "foo"),
        ])
    );
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(
        addresses_of(&after),
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "node0.cloud.internal"),
        ]
    );
}

/// Upstream "[instanceV2] provider ID already set". Fixture: `test-provider-id` →
/// `fake://test-provider-id`.
#[tokio::test]
async fn sync_node_instance_v2_provider_id_already_set() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: cloud_addresses(),
        exists_by_provider_id: false,
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .labels(&[])
                .ready("Unknown")
                .provider_id("fake://test-provider-id")
                .taint(IMPROVE_COVERAGE_TAINT)
                .cloud_taint()
                .build(),
        )
        .await;
    assert_eq!(
        provider_id_of(&after).as_deref(),
        Some("fake://test-provider-id")
    );
    assert_eq!(taints_of(&after), vec![taint(IMPROVE_COVERAGE_TAINT)]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(conditions_of(&after), ready_unknown());
}

/// Upstream "[instanceV2] provider ID not implemented": neither the node nor the metadata has a
/// provider ID → error, taint kept, node unchanged.
#[tokio::test]
async fn sync_node_instance_v2_provider_id_not_implemented() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        provider: "test".into(),
        ext_id_err: HashMap::from([(name.clone(), CpiError::NotImplemented("InstanceID".into()))]),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h
        .sync(node(&name).ready("Unknown").cloud_taint().build())
        .await;
    let err = result.expect_err("no provider ID anywhere must fail the sync");
    assert!(
        matches!(&err, SyncError::NoProviderId(n) if *n == name),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("cloud provider does not set node provider ID for node {name}")
    );
    assert_unchanged(&before, &after);
}

/// Upstream "[instanceV2] error getting InstanceMetadata": error, node unchanged.
#[tokio::test]
async fn sync_node_instance_v2_error_getting_instance_metadata() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        provider: "test".into(),
        ext_id_err: HashMap::from([(name.clone(), CpiError::NotImplemented("InstanceID".into()))]),
        metadata_err: Some(CpiError::Cloud("metadata error".into())),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h
        .sync(node(&name).ready("Unknown").cloud_taint().build())
        .await;
    let err = result.expect_err("a metadata error must fail the sync");
    assert!(
        matches!(
            &err,
            SyncError::Cloud { call: "InstancesV2/InstanceMetadata", source: CpiError::Cloud(m), .. }
                if m == "metadata error"
        ),
        "{err:?}"
    );
    assert_unchanged(&before, &after);
}

// ------------------------------------------------------------------------------------------------
// Test_reconcileNodeLabels (through a sync of an initialised, i.e. untainted, node)
// ------------------------------------------------------------------------------------------------

async fn reconcile_case(labels: &[(&str, &str)]) -> (Harness, Node, Node) {
    let name = unique_name("node01");
    let h = harness(FakeCloud::default()).await;
    let (before, result, after) = h.sync(node(&name).labels(labels).build()).await;
    result.unwrap();
    assert_eq!(
        h.fake.calls(),
        Vec::<String>::new(),
        "label reconciliation asks nothing of the cloud"
    );
    (h, before, after)
}

/// Upstream "requires reconcile".
#[tokio::test]
async fn reconcile_node_labels_requires_reconcile() {
    let (_h, _, after) = reconcile_case(&[
        ("failure-domain.beta.kubernetes.io/zone", "foo"),
        ("failure-domain.beta.kubernetes.io/region", "bar"),
        ("beta.kubernetes.io/instance-type", "the-best-type"),
    ])
    .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/zone", "foo"),
            ("failure-domain.beta.kubernetes.io/region", "bar"),
            ("topology.kubernetes.io/zone", "foo"),
            ("topology.kubernetes.io/region", "bar"),
            ("beta.kubernetes.io/instance-type", "the-best-type"),
            ("node.kubernetes.io/instance-type", "the-best-type"),
        ])
    );
}

/// Upstream "doesn't require reconcile": nothing is written.
#[tokio::test]
async fn reconcile_node_labels_doesnt_require_reconcile() {
    let (_h, before, after) = reconcile_case(&[
        ("failure-domain.beta.kubernetes.io/zone", "foo"),
        ("failure-domain.beta.kubernetes.io/region", "bar"),
        ("topology.kubernetes.io/zone", "foo"),
        ("topology.kubernetes.io/region", "bar"),
        ("beta.kubernetes.io/instance-type", "the-best-type"),
        ("node.kubernetes.io/instance-type", "the-best-type"),
    ])
    .await;
    assert_unchanged(&before, &after);
}

/// Upstream "require reconcile -- secondary labels are different from primary": the beta
/// label wins.
#[tokio::test]
async fn reconcile_node_labels_require_reconcile_secondary_labels_are_different_from_primary() {
    let (_h, _, after) = reconcile_case(&[
        ("failure-domain.beta.kubernetes.io/zone", "foo"),
        ("failure-domain.beta.kubernetes.io/region", "bar"),
        ("topology.kubernetes.io/zone", "wrongfoo"),
        ("topology.kubernetes.io/region", "wrongbar"),
        ("beta.kubernetes.io/instance-type", "the-best-type"),
        ("node.kubernetes.io/instance-type", "the-wrong-type"),
    ])
    .await;
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("failure-domain.beta.kubernetes.io/zone", "foo"),
            ("failure-domain.beta.kubernetes.io/region", "bar"),
            ("topology.kubernetes.io/zone", "foo"),
            ("topology.kubernetes.io/region", "bar"),
            ("beta.kubernetes.io/instance-type", "the-best-type"),
            ("node.kubernetes.io/instance-type", "the-best-type"),
        ])
    );
}

// ------------------------------------------------------------------------------------------------
// TestNodeAddressesNotUpdate / TestNodeAddressesNotUpdateV2 (through one status pass)
// ------------------------------------------------------------------------------------------------

/// A tainted node's addresses are not written by the address update. Observed through one
/// `update_node_status` pass over a cache holding the tainted node and, as a witness that the
/// pass did run, an initialised node that does get the addresses.
async fn node_addresses_not_update_case(instances_v2: bool) {
    let h = harness(FakeCloud {
        instances_v2_enabled: instances_v2,
        addresses: cloud_addresses(),
        exists_by_provider_id: false,
        ..FakeCloud::default()
    })
    .await;
    let scope = unique_name("addresses-not-update");
    let selector = [("ccm-test/scope", scope.as_str())];
    let tainted = h
        .create(
            node(&unique_name("node0"))
                .labels(&selector)
                .ready("Unknown")
                .cloud_taint()
                .build(),
        )
        .await;
    let witness = h
        .create(
            node(&unique_name("node1"))
                .labels(&selector)
                .provider_id("fake://witness")
                .build(),
        )
        .await;
    let cache = NodeCache::start(
        &h.client,
        watcher::Config::default().labels(&format!("ccm-test/scope={scope}")),
    )
    .await;
    cache.wait_for(&[tainted.clone(), witness.clone()]).await;
    h.controller(cache.store.clone())
        .update_node_status(1)
        .await;

    let after = h.get(&tainted.name_any()).await;
    assert_eq!(
        addresses_of(&after),
        vec![],
        "node addresses should not be updated"
    );
    assert_unchanged(&tainted, &after);
    let witness = h.get(&witness.name_any()).await;
    assert_eq!(addresses_of(&witness), expected_cloud_addresses());
}

/// Upstream `TestNodeAddressesNotUpdate`.
#[tokio::test]
async fn node_addresses_not_update() {
    node_addresses_not_update_case(false).await;
}

/// Upstream `TestNodeAddressesNotUpdateV2`.
#[tokio::test]
async fn node_addresses_not_update_v2() {
    node_addresses_not_update_case(true).await;
}

// ------------------------------------------------------------------------------------------------
// TestGetInstanceMetadata (observed through a sync of a tainted node)
// ------------------------------------------------------------------------------------------------

/// Upstream "cloud implemented with Instances and provider ID": provider ID built from
/// InstanceID, the cloud's addresses, no instance type (none under the provider ID), no zone.
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_and_provider_id() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        provider_id: map(&[(&name, "fake://12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h.sync_ok(node(&name).cloud_taint().build()).await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(labels_of(&after), BTreeMap::new());
    assert_eq!(
        h.fake.calls(),
        vec![
            call::INSTANCE_ID,
            call::NODE_ADDRESSES_BY_PROVIDER_ID,
            call::INSTANCE_TYPE_BY_PROVIDER_ID,
            call::GET_ZONE_BY_PROVIDER_ID,
        ]
    );
}

/// Upstream "cloud implemented with Instances (providerID not implemented)": no error, no
/// provider ID, the cloud's addresses.
///
/// Difference in the instance type: upstream's fake answers `InstanceTypeByProviderID("")`
/// with `""` and no error, so upstream's metadata has no instance type. An empty provider ID
/// cannot be sent over the CPI (the shim framework refuses it as INVALID_OBJECT), so the
/// controller goes straight to upstream's fallback, `InstanceType(nodeName)`, which here
/// answers `t1.micro` — what upstream does with any real provider that errors on an empty ID.
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_provider_id_not_implemented() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id_err: HashMap::from([(name.clone(), CpiError::NotImplemented("InstanceID".into()))]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h.sync_ok(node(&name).cloud_taint().build()).await;
    assert_eq!(provider_id_of(&after), None);
    assert_eq!(taints_of(&after), vec![]);
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("beta.kubernetes.io/instance-type", "t1.micro"),
            ("node.kubernetes.io/instance-type", "t1.micro"),
        ])
    );
    assert_eq!(
        h.fake.calls(),
        vec![
            call::INSTANCE_ID,
            call::NODE_ADDRESSES,
            call::INSTANCE_TYPE,
            call::GET_ZONE_BY_NODE_NAME,
        ]
    );
}

/// Upstream "cloud implemented with Instances (providerID not implemented) and node with
/// providerID": the node's provider ID is used, InstanceID is not needed.
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_provider_id_not_implemented_and_node_with_provider_id()
 {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id_err: HashMap::from([(name.clone(), CpiError::NotImplemented("InstanceID".into()))]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .cloud_taint()
                .provider_id("fake://asdasd")
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://asdasd"));
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(labels_of(&after), BTreeMap::new());
    assert!(!h.fake.calls().contains(&call::INSTANCE_ID.to_string()));
}

/// Upstream "cloud implemented with InstancesV2 (with providerID)".
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_v2_with_provider_id() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        provider_id: map(&[(&name, "fake://12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h.sync_ok(node(&name).cloud_taint().build()).await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    // The metadata's instance type is looked up under the node's provider ID, which was empty.
    assert_eq!(labels_of(&after), BTreeMap::new());
}

/// Upstream "cloud implemented with InstancesV2 (without providerID)": error (the node is
/// requeued). That the addresses are still returned alongside the error is not observable here.
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_v2_without_provider_id() {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let (before, result, after) = h.sync(node(&name).cloud_taint().build()).await;
    let err = result.expect_err("no provider ID anywhere must fail the sync");
    assert!(
        matches!(&err, SyncError::NoProviderId(n) if *n == name),
        "{err}"
    );
    assert_unchanged(&before, &after);
}

/// Upstream "cloud implemented with InstancesV2 (without providerID) and node with providerID":
/// provider ID from the node, instance type `t1.micro` (keyed by that provider ID).
#[tokio::test]
async fn get_instance_metadata_cloud_implemented_with_instances_v2_without_provider_id_and_node_with_provider_id()
 {
    let name = unique_name("node0");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        instance_types: map(&[(&name, "t1.micro"), ("fake://12345", "t1.micro")]),
        ext_id: map(&[(&name, "12345")]),
        addresses: cloud_addresses(),
        ..FakeCloud::default()
    })
    .await;
    let after = h
        .sync_ok(
            node(&name)
                .cloud_taint()
                .provider_id("fake://12345")
                .build(),
        )
        .await;
    assert_eq!(provider_id_of(&after).as_deref(), Some("fake://12345"));
    assert_eq!(addresses_of(&after), expected_cloud_addresses());
    assert_eq!(
        labels_of(&after),
        label_map(&[
            ("beta.kubernetes.io/instance-type", "t1.micro"),
            ("node.kubernetes.io/instance-type", "t1.micro"),
        ])
    );
}

// ------------------------------------------------------------------------------------------------
// TestUpdateNodeStatus
// ------------------------------------------------------------------------------------------------

/// 100 initialised nodes, 10 ms cloud latency: one status pass with `workers` workers makes
/// exactly one cloud call per node and writes every node's addresses.
async fn update_node_status_case(workers: usize) {
    const NODES: usize = 100;
    let h = harness(FakeCloud {
        addresses: cloud_addresses(),
        request_delay: Duration::from_millis(10),
        ..FakeCloud::default()
    })
    .await;
    let scope = unique_name("update-node-status");
    let created: Vec<Node> = futures::stream::iter(0..NODES)
        .map(|i| {
            let h = &h;
            let scope = scope.as_str();
            async move {
                h.create(
                    node(&format!("{scope}-node0{i}"))
                        .labels(&[("ccm-test/scope", scope)])
                        .build(),
                )
                .await
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    let cache = NodeCache::start(
        &h.client,
        watcher::Config::default().labels(&format!("ccm-test/scope={scope}")),
    )
    .await;
    cache.wait_for(&created).await;
    assert_eq!(cache.store.state().len(), NODES);

    h.controller(cache.store.clone())
        .update_node_status(workers)
        .await;

    let log = h.fake.call_log();
    assert_eq!(
        log.len(),
        NODES,
        "expected {NODES} cloud-provider calls, got {log:?}"
    );
    // The worker count is what bounds the provider calls in flight.
    let peak = h.fake.state().peak_in_flight;
    assert!(
        peak <= workers,
        "{peak} calls in flight with {workers} workers"
    );
    if workers > 1 {
        assert!(peak > 1, "{workers} workers never ran two calls at once");
    }
    assert!(log.iter().all(|c| c.method == call::NODE_ADDRESSES));
    let asked: HashSet<String> = log.into_iter().map(|c| c.subject).collect();
    let names: HashSet<String> = created.iter().map(ResourceExt::name_any).collect();
    assert_eq!(asked, names, "one address lookup per node");

    let listed: Vec<Node> = h
        .nodes()
        .list(&ListParams::default().labels(&format!("ccm-test/scope={scope}")))
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), NODES);
    for n in &listed {
        assert_eq!(
            addresses_of(n),
            expected_cloud_addresses(),
            "{}",
            n.name_any()
        );
    }
}

/// Upstream "single thread".
#[tokio::test]
async fn update_node_status_single_thread() {
    update_node_status_case(1).await;
}

/// Upstream "5 workers".
#[tokio::test]
async fn update_node_status_5_workers() {
    update_node_status_case(5).await;
}

/// Upstream "10 workers".
#[tokio::test]
async fn update_node_status_10_workers() {
    update_node_status_case(10).await;
}

/// Upstream "30 workers".
#[tokio::test]
async fn update_node_status_30_workers() {
    update_node_status_case(30).await;
}

// ------------------------------------------------------------------------------------------------
// Beyond upstream: one slow instance does not hold up the others
// ------------------------------------------------------------------------------------------------

/// Two tainted nodes synced at the same time through one `Cloud` (one multiplexed channel): the
/// provider takes 3 s to answer for the first; the second is initialised while that call is
/// still outstanding.
#[tokio::test]
async fn slow_provider_call_for_one_node_does_not_block_another() {
    let scope = unique_name("slow-call");
    let (slow, fast) = (format!("{scope}-slow"), format!("{scope}-fast"));
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: cloud_addresses(),
        subject_delays: [(slow.clone(), Duration::from_secs(3))].into(),
        ..FakeCloud::default()
    })
    .await;
    let mut created = Vec::new();
    for name in [&slow, &fast] {
        created.push(
            h.create(
                node(name)
                    .labels(&[("ccm-test/scope", scope.as_str())])
                    .cloud_taint()
                    .provider_id(&format!("fake://{name}"))
                    .build(),
            )
            .await,
        );
    }
    let cache = NodeCache::start(
        &h.client,
        watcher::Config::default().labels(&format!("ccm-test/scope={scope}")),
    )
    .await;
    cache.wait_for(&created).await;
    let controller = h.controller(cache.store.clone());

    let slow_sync = tokio::spawn({
        let controller = controller.clone();
        let slow = slow.clone();
        async move { controller.sync_node(&slow).await }
    });
    // Let the slow call reach the provider first: without it the test would prove nothing.
    let reached = test_support::wait_for(
        "the slow call to reach the fake",
        Duration::from_secs(2),
        || {
            let reached = h.fake.call_log().iter().any(|c| c.subject == slow);
            async move {
                if reached {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        },
    )
    .await;
    assert!(
        reached.is_ok(),
        "the slow node's provider call never reached the fake"
    );
    controller.sync_node(&fast).await.unwrap();

    assert!(
        !slow_sync.is_finished(),
        "the fast node's sync waited for the slow node's provider call"
    );
    let fast_after = h.get(&fast).await;
    assert!(!is_uninitialized(&fast_after));
    let slow_now = h.get(&slow).await;
    assert!(is_uninitialized(&slow_now));

    slow_sync.await.unwrap().unwrap();
    let slow_after = h.get(&slow).await;
    assert!(!is_uninitialized(&slow_after));
}

// ------------------------------------------------------------------------------------------------
// Beyond upstream: a failing initialisation is visible on the node
// ------------------------------------------------------------------------------------------------

/// The `CloudInitializationFailed` condition of `node`: (status, reason, message, heartbeat).
fn failure_condition(node: &Node) -> Option<(String, String, String, Option<Time>)> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == CONDITION_INITIALIZATION_FAILED)
        })
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
                c.last_heartbeat_time.clone(),
            )
        })
}

/// A tainted node whose metadata lookup fails gets the failure condition (next to the kubelet's
/// Ready condition), is not rewritten for the same failure, and loses the condition together
/// with the taint once the provider answers.
#[tokio::test]
async fn failing_initialization_is_named_in_a_condition_until_it_succeeds() {
    let name = unique_name("init-failure");
    let h = harness(FakeCloud {
        instances_v2_enabled: true,
        addresses: cloud_addresses(),
        metadata_err: Some(CpiError::Cloud("metadata service unreachable".into())),
        ..FakeCloud::default()
    })
    .await;
    let before = h
        .create(
            node(&name)
                .cloud_taint()
                .provider_id(&format!("fake://{name}"))
                .ready("Unknown")
                .build(),
        )
        .await;
    let cache = h.cache_for(&before).await;
    let controller = h.controller(cache.store.clone());
    let cached = |cache: &NodeCache| {
        cache
            .store
            .get(&ObjectRef::<CachedNode>::new(&name))
            .expect("node cached")
    };

    let err = controller
        .reconcile_node(&cached(&cache))
        .await
        .expect_err("metadata lookup fails");
    let failed = h.get(&name).await;
    let (status, reason, message, heartbeat) =
        failure_condition(&failed).expect("failure condition set");
    assert_eq!((status.as_str(), reason.as_str()), ("True", err.reason()));
    assert!(
        message.contains("metadata service unreachable"),
        "{message}"
    );
    assert!(conditions_of(&failed).contains(&("Ready".to_string(), "Unknown".to_string())));
    assert!(is_uninitialized(&failed));

    // The same failure again: the node is not rewritten.
    cache.wait_for(std::slice::from_ref(&failed)).await;
    controller
        .reconcile_node(&cached(&cache))
        .await
        .expect_err("still failing");
    let again = h.get(&name).await;
    assert_eq!(again.resource_version(), failed.resource_version());
    assert_eq!(failure_condition(&again).map(|c| c.3), Some(heartbeat));

    // The provider recovers: initialised, and the condition is gone.
    h.fake.update(|f| f.metadata_err = None);
    controller
        .reconcile_node(&cached(&cache))
        .await
        .expect("initialises");
    let after = h.get(&name).await;
    assert_eq!(failure_condition(&after), None);
    assert!(!is_uninitialized(&after));
    assert!(conditions_of(&after).contains(&("Ready".to_string(), "Unknown".to_string())));
}
