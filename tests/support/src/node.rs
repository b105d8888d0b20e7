//! Nodes as a kubelet with `--cloud-provider=external` registers them, and what "initialised"
//! means for one.
//!
//! The uninitialized taint's key is a parameter: it is the product's
//! (`cloud_controller_manager::well_known::TAINT_UNINITIALIZED`), and this crate does not depend
//! on the product (see the crate documentation).

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A Node as a kubelet with `--cloud-provider=external` registers it: tainted with
/// `uninitialized_taint` and, when given, with the kubelet's Hostname address (status is ignored
/// on create; patch it).
pub fn kubelet_registered_node(
    name: &str,
    hostname: Option<&str>,
    uninitialized_taint: &str,
) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: uninitialized_taint.into(),
                value: Some("true".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        }),
        status: hostname.map(|hostname| NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "Hostname".into(),
                address: hostname.into(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// Describes why `node` is not initialised by the cloud-node controller yet: it still has the
/// `uninitialized_taint`, has no provider ID, or has no InternalIP in its status (the addresses
/// arrive in a status patch after the taint goes, so the taint alone is not enough).
pub fn initialised(node: &Node, uninitialized_taint: &str) -> Result<(), String> {
    let spec = node.spec.as_ref();
    if spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == uninitialized_taint))
    {
        return Err("still tainted".into());
    }
    if spec
        .and_then(|s| s.provider_id.as_deref())
        .is_none_or(str::is_empty)
    {
        return Err("no providerID".into());
    }
    let has_internal = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| a.iter().any(|a| a.type_ == "InternalIP"));
    if !has_internal {
        return Err(format!("no InternalIP yet: {:?}", node.status));
    }
    Ok(())
}
