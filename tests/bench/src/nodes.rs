//! The benchmark's machines and Nodes: the `local` shim inventory, Nodes as a kubelet started
//! with `--cloud-provider=external` registers them, and the writes the cloud-node controller
//! issues to initialise one (used by the "API server alone" baseline).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use cloud_controller_manager::well_known::{
    LABEL_INSTANCE_TYPE, LABEL_INSTANCE_TYPE_BETA, LABEL_REGION, LABEL_REGION_BETA, LABEL_ZONE,
    LABEL_ZONE_BETA, TAINT_UNINITIALIZED,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Event, EventSource, Node, NodeAddress, NodeSpec, NodeStatus, ObjectReference,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use test_support::kubelet_registered_node;

/// Label marking which set (`ccm` or `baseline`) a benchmark Node belongs to.
pub const SET_LABEL: &str = "bench.cloud-provider.local/set";
/// Region of every machine.
pub const REGION: &str = "bench-region";

const ZONES: [&str; 3] = ["bench-zone-a", "bench-zone-b", "bench-zone-c"];
const INSTANCE_TYPES: [&str; 3] = ["bench.small", "bench.medium", "bench.large"];

/// One machine of the inventory and the Node that runs on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Node name.
    pub name: String,
    /// Instance ID; the provider ID is `local://<instance_id>`.
    pub instance_id: String,
    /// Instance type.
    pub instance_type: &'static str,
    /// Zone.
    pub zone: &'static str,
    /// InternalIP address.
    pub internal_ip: String,
    /// Hostname address reported by the provider.
    pub hostname: String,
}

impl Machine {
    /// Machine number `index` of the set whose names start with `prefix` (`bench-node`,
    /// `bench-base`); IDs, zones, types and IPs are derived from the index.
    pub fn new(prefix: &str, index: usize) -> Self {
        // Start at .0.0.1 so no address ends in .0.
        let v = index + 1;
        let ip = format!("10.{}.{}.{}", (v >> 16) & 255, (v >> 8) & 255, v & 255);
        let name = format!("{prefix}-{index}");
        Self {
            hostname: format!("{name}.bench.local"),
            instance_id: format!("i-{prefix}-{index}"),
            instance_type: INSTANCE_TYPES[index % INSTANCE_TYPES.len()],
            zone: ZONES[index % ZONES.len()],
            internal_ip: ip,
            name,
        }
    }

    /// The provider ID the `local` shim reports for this machine.
    pub fn provider_id(&self) -> String {
        format!("local://{}", self.instance_id)
    }

    /// The addresses the provider reports, in the order the shim returns them.
    pub fn addresses(&self) -> Vec<NodeAddress> {
        vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: self.internal_ip.clone(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: self.hostname.clone(),
            },
        ]
    }

    /// The Node a kubelet with `--cloud-provider=external` registers for this machine,
    /// labelled with `set`.
    pub fn tainted_node(&self, set: &str) -> Node {
        let labels: BTreeMap<String, String> = [
            (SET_LABEL, set),
            ("kubernetes.io/hostname", self.name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            ("beta.kubernetes.io/os", "linux"),
            ("beta.kubernetes.io/arch", "amd64"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let resources: BTreeMap<String, Quantity> = [
            ("cpu", "4"),
            ("memory", "16393244Ki"),
            ("pods", "110"),
            ("ephemeral-storage", "101430960Ki"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
        let mut node = kubelet_registered_node(&self.name, Some(&self.name), TAINT_UNINITIALIZED);
        node.metadata.labels = Some(labels);
        if let Some(status) = node.status.as_mut() {
            status.capacity = Some(resources.clone());
            status.allocatable = Some(resources);
        }
        node
    }

    /// `node` as the cloud-node controller's `PUT` leaves it: taint removed, provider ID and
    /// the GA and beta instance-type, zone and region labels set.
    pub fn initialised(&self, node: &Node) -> Node {
        let mut node = node.clone();
        let spec = node.spec.get_or_insert_with(NodeSpec::default);
        spec.provider_id = Some(self.provider_id());
        if let Some(taints) = spec.taints.as_mut() {
            taints.retain(|t| t.key != TAINT_UNINITIALIZED);
        }
        let labels = node.metadata.labels.get_or_insert_with(BTreeMap::new);
        for (key, value) in [
            (LABEL_INSTANCE_TYPE, self.instance_type),
            (LABEL_INSTANCE_TYPE_BETA, self.instance_type),
            (LABEL_ZONE, self.zone),
            (LABEL_ZONE_BETA, self.zone),
            (LABEL_REGION, REGION),
            (LABEL_REGION_BETA, REGION),
        ] {
            labels.insert(key.to_string(), value.to_string());
        }
        node
    }

    /// The merge patch of `nodes/status` the controller sends: the provider's addresses.
    pub fn status_patch(&self) -> serde_json::Value {
        serde_json::json!({ "status": { "addresses": self.addresses() } })
    }
}

/// The `local` shim inventory listing `machines`.
pub fn inventory_yaml(machines: &[Machine]) -> String {
    let mut out = format!("region: {REGION}\nmachines:\n");
    for m in machines {
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "  - name: {}\n    instanceID: {}\n    instanceType: {}\n    zone: {}\n    addresses:\n      - {{type: InternalIP, address: {}}}\n      - {{type: Hostname, address: {}}}\n",
            m.name, m.instance_id, m.instance_type, m.zone, m.internal_ip, m.hostname
        );
    }
    out
}

/// The `Synced` Event the cloud-node controller records for an initialised node.
pub fn synced_event(node: &Node) -> Event {
    let now = Timestamp::now();
    let reference: ObjectReference = node.object_ref(&());
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", node.name_any(), now.as_nanosecond())),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        involved_object: reference,
        reason: Some("Synced".into()),
        message: Some("Node synced successfully".into()),
        type_: Some("Normal".into()),
        source: Some(EventSource {
            component: Some("cloud-node-controller".into()),
            host: None,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some("cloud-node-controller".into()),
        reporting_instance: Some("bench".into()),
        ..Event::default()
    }
}

/// Creates the tainted Nodes of `machines` with `concurrency` requests in flight; returns the
/// created objects (in `machines` order) and how long it took.
pub async fn create_tainted(
    client: &kube::Client,
    machines: &[Machine],
    set: &str,
    concurrency: usize,
) -> anyhow::Result<(Vec<Node>, Duration)> {
    let api: Api<Node> = Api::all(client.clone());
    let started = Instant::now();
    let created: Vec<Node> = futures::stream::iter(machines.iter())
        .map(|m| {
            let api = api.clone();
            let node = m.tainted_node(set);
            async move {
                api.create(&PostParams::default(), &node)
                    .await
                    .map_err(|e| anyhow::anyhow!("creating node {}: {e}", m.name))
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok((created, started.elapsed()))
}

/// The "API server alone" baseline: for every `(machine, created node)` pair, with `workers`
/// nodes in flight, the three writes the controller issues per node — a `PUT` of the Node,
/// a merge `PATCH` of `nodes/status` and a `POST` of the `Synced` Event — in that order.
/// Returns the wall time of all writes.
pub async fn initialise_like_the_controller(
    client: &kube::Client,
    machines: &[Machine],
    created: &[Node],
    workers: usize,
) -> anyhow::Result<Duration> {
    let nodes: Api<Node> = Api::all(client.clone());
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    futures::stream::iter(machines.iter().zip(created.iter()))
        .map(|(machine, node)| {
            let nodes = nodes.clone();
            let events = events.clone();
            async move {
                let name = machine.name.as_str();
                let desired = machine.initialised(node);
                let updated = nodes
                    .replace(name, &PostParams::default(), &desired)
                    .await
                    .map_err(|e| anyhow::anyhow!("PUT node {name}: {e}"))?;
                nodes
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(&machine.status_patch()),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("PATCH node {name} status: {e}"))?;
                events
                    .create(&PostParams::default(), &synced_event(&updated))
                    .await
                    .map_err(|e| anyhow::anyhow!("POST event of node {name}: {e}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(workers.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeStatus;
    use test_support::initialised;

    #[test]
    fn machines_are_distinct_and_valid() {
        let a = Machine::new("bench-node", 0);
        let b = Machine::new("bench-node", 256);
        assert_eq!(a.internal_ip, "10.0.0.1");
        assert_eq!(b.internal_ip, "10.0.1.1");
        assert_eq!(a.provider_id(), "local://i-bench-node-0");
        assert_ne!(a.zone, Machine::new("bench-node", 1).zone);
    }

    #[test]
    fn inventory_lists_every_machine() {
        let machines: Vec<Machine> = (0..3).map(|i| Machine::new("m", i)).collect();
        let yaml = inventory_yaml(&machines);
        assert!(yaml.starts_with("region: bench-region\nmachines:\n"));
        assert_eq!(yaml.matches("- name: m-").count(), 3);
        assert!(yaml.contains("{type: InternalIP, address: 10.0.0.3}"));
    }

    #[test]
    fn initialised_copy_passes_the_check_once_addresses_are_patched() {
        let m = Machine::new("bench-node", 7);
        let node = m.tainted_node("ccm");
        assert!(initialised(&node, TAINT_UNINITIALIZED).is_err());
        let mut done = m.initialised(&node);
        assert!(
            initialised(&done, TAINT_UNINITIALIZED).is_err(),
            "still only the kubelet's Hostname"
        );
        done.status
            .get_or_insert_with(NodeStatus::default)
            .addresses = Some(m.addresses());
        assert_eq!(initialised(&done, TAINT_UNINITIALIZED), Ok(()));
        let labels = done.labels();
        assert_eq!(labels["topology.kubernetes.io/zone"], m.zone);
        assert_eq!(labels[SET_LABEL], "ccm");
    }
}

/// A Node as the cloud-node controller leaves it (provider ID, one InternalIP, no taint), and
/// its inventory machine: the starting point of the runs that measure other controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainNode {
    /// Node name; the instance ID is `i-<name>`.
    pub name: String,
    /// InternalIP address.
    pub ip: String,
    /// Value of [`SET_LABEL`].
    set: &'static str,
}

impl PlainNode {
    /// The node `name` at `ip`, labelled as belonging to `set`.
    pub fn new(name: String, ip: String, set: &'static str) -> Self {
        Self { name, ip, set }
    }

    /// The Node object, ready to create.
    pub fn initialised(&self) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    SET_LABEL.to_string(),
                    self.set.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!("local://i-{}", self.name)),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: self.ip.clone(),
                }]),
                ..NodeStatus::default()
            }),
        }
    }
}

/// The `local` shim inventory of `nodes`.
pub fn plain_inventory(nodes: &[PlainNode]) -> String {
    let mut out = format!("region: {REGION}\nmachines:\n");
    for node in nodes {
        let _ = write!(
            out,
            "  - name: {}\n    instanceID: i-{}\n    instanceType: {}\n    zone: {}\n    addresses:\n      - {{type: InternalIP, address: {}}}\n",
            node.name, node.name, INSTANCE_TYPES[0], ZONES[0], node.ip
        );
    }
    out
}
