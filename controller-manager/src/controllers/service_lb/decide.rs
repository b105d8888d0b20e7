//! The service-lb controller's rules, as pure functions of the Service, the nodes and the
//! provider's answers (upstream `controllers/service/controller.go` and `service/helpers`).
//! The executor in [`super`] asks and acts; nothing here does IO.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServicePort};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::k8s::well_known::{
    ANNOTATION_LOAD_BALANCER_SOURCE_RANGES, CONDITION_READY, FINALIZER_LOAD_BALANCER_CLEANUP,
    LABEL_EXCLUDE_FROM_EXTERNAL_LB, TAINT_TO_BE_DELETED_BY_CLUSTER_AUTOSCALER,
};
use crate::k8s::{CachedNode, CachedService};

#[cfg(test)]
mod tests;

/// Upstream `minRetryDelay`: the first retry of a failed service sync.
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Upstream `maxRetryDelay`: the longest backoff of a failing service.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Node names listed in an `UpdateLoadBalancerFailed` event before the rest is counted.
const LOGGED_NODE_NAMES: usize = 20;

/// A backend host as `nodesSufficientlyEqual` compares it: the node name and its providerID.
pub type Host = (Box<str>, Option<Box<str>>);

/// What a service sync does with the cloud (upstream `loadBalancerOperation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create or update the load balancer.
    Ensure,
    /// Delete the load balancer (if any) and the finalizer.
    Delete,
}

/// Upstream `wantsLoadBalancer`: type LoadBalancer without a `loadBalancerClass` (any class
/// means another controller implements it).
pub fn wants_load_balancer(svc: &CachedService) -> bool {
    svc.spec().type_.as_deref() == Some("LoadBalancer") && svc.spec().load_balancer_class.is_none()
}

/// Upstream `HasLBFinalizer`.
pub fn has_lb_finalizer(svc: &CachedService) -> bool {
    svc.finalizers()
        .iter()
        .any(|f| f == FINALIZER_LOAD_BALANCER_CLEANUP)
}

/// Upstream `needsCleanup`: has the cleanup finalizer and is being deleted or no longer of type
/// LoadBalancer.
pub fn needs_cleanup(svc: &CachedService) -> bool {
    has_lb_finalizer(svc)
        && (svc.is_deleting() || svc.spec().type_.as_deref() != Some("LoadBalancer"))
}

/// The operation a sync of `svc` performs (upstream `syncLoadBalancerIfNeeded`'s first test).
pub fn op_for(svc: &CachedService) -> Op {
    if !wants_load_balancer(svc) || needs_cleanup(svc) {
        Op::Delete
    } else {
        Op::Ensure
    }
}

/// Whether the informer handlers enqueue a Service seen for the first time (upstream
/// `AddFunc`).
pub fn enqueue_added(svc: &CachedService) -> bool {
    wants_load_balancer(svc) || needs_cleanup(svc)
}

/// A change of a Service that calls for a sync, with the Normal event upstream records for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecChange {
    /// Event reason (upstream's: `Type`, `LoadBalancerSourceRanges`, ...); `None` records
    /// nothing.
    pub reason: Option<&'static str>,
    /// Event message.
    pub message: String,
}

impl SpecChange {
    fn silent() -> Self {
        Self {
            reason: None,
            message: String::new(),
        }
    }

    fn event(reason: &'static str, message: String) -> Self {
        Self {
            reason: Some(reason),
            message,
        }
    }
}

/// Upstream `needsUpdate(old, new)`: whether a Service update changes anything a load balancer
/// depends on. `None` means no sync is needed.
pub fn needs_update(old: &CachedService, new: &CachedService) -> Option<SpecChange> {
    let (old_wants, new_wants) = (wants_load_balancer(old), wants_load_balancer(new));
    if !old_wants && !new_wants {
        return None;
    }
    let (o, n) = (old.spec(), new.spec());
    if old_wants != new_wants {
        return Some(SpecChange::event(
            "Type",
            format!(
                "{} -> {}",
                o.type_.as_deref().unwrap_or_default(),
                n.type_.as_deref().unwrap_or_default()
            ),
        ));
    }
    if new_wants && o.load_balancer_source_ranges != n.load_balancer_source_ranges {
        return Some(SpecChange::event(
            "LoadBalancerSourceRanges",
            format!(
                "{} -> {}",
                go_list(o.load_balancer_source_ranges.as_deref().unwrap_or_default()),
                go_list(n.load_balancer_source_ranges.as_deref().unwrap_or_default())
            ),
        ));
    }
    if !ports_equal_for_lb(
        o.ports.as_deref().unwrap_or_default(),
        n.ports.as_deref().unwrap_or_default(),
    ) || o.session_affinity != n.session_affinity
        || o.session_affinity_config != n.session_affinity_config
    {
        return Some(SpecChange::silent());
    }
    if o.load_balancer_ip != n.load_balancer_ip {
        return Some(SpecChange::event(
            "LoadbalancerIP",
            format!(
                "{} -> {}",
                o.load_balancer_ip.as_deref().unwrap_or_default(),
                n.load_balancer_ip.as_deref().unwrap_or_default()
            ),
        ));
    }
    let (old_ips, new_ips) = (
        o.external_ips.as_deref().unwrap_or_default(),
        n.external_ips.as_deref().unwrap_or_default(),
    );
    if old_ips.len() != new_ips.len() {
        return Some(SpecChange::event(
            "ExternalIP",
            format!("Count: {} -> {}", old_ips.len(), new_ips.len()),
        ));
    }
    if let Some(added) = old_ips.iter().zip(new_ips).find(|(a, b)| a != b) {
        return Some(SpecChange::event(
            "ExternalIP",
            format!("Added: {}", added.1),
        ));
    }
    if old.annotations() != new.annotations() {
        return Some(SpecChange::silent());
    }
    if old.uid() != new.uid() {
        return Some(SpecChange::event(
            "UID",
            format!(
                "{} -> {}",
                old.uid().unwrap_or_default(),
                new.uid().unwrap_or_default()
            ),
        ));
    }
    if o.external_traffic_policy != n.external_traffic_policy {
        return Some(SpecChange::event(
            "ExternalTrafficPolicy",
            format!(
                "{} -> {}",
                o.external_traffic_policy.as_deref().unwrap_or_default(),
                n.external_traffic_policy.as_deref().unwrap_or_default()
            ),
        ));
    }
    if o.health_check_node_port != n.health_check_node_port {
        return Some(SpecChange::event(
            "HealthCheckNodePort",
            format!(
                "{} -> {}",
                o.health_check_node_port.unwrap_or_default(),
                n.health_check_node_port.unwrap_or_default()
            ),
        ));
    }
    // The order of the families does not matter, their number does.
    let (old_families, new_families) = (
        o.ip_families.as_deref().unwrap_or_default().len(),
        n.ip_families.as_deref().unwrap_or_default().len(),
    );
    if old_families != new_families {
        return Some(SpecChange::event(
            "IPFamilies",
            format!("Count: {old_families} -> {new_families}"),
        ));
    }
    None
}

/// Go's `%v` of a string slice: `[a b]`.
fn go_list<S: AsRef<str>>(items: &[S]) -> String {
    let joined: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    format!("[{}]", joined.join(" "))
}

/// Upstream `portsEqualForLB`: same count and, index by index, the same name, protocol, port,
/// node port, target port and appProtocol.
fn ports_equal_for_lb(old: &[ServicePort], new: &[ServicePort]) -> bool {
    old.len() == new.len()
        && old.iter().zip(new).all(|(a, b)| {
            a.name == b.name
                && a.protocol.as_deref().unwrap_or("TCP") == b.protocol.as_deref().unwrap_or("TCP")
                && a.port == b.port
                && a.node_port == b.node_port
                && a.target_port == b.target_port
                && a.app_protocol == b.app_protocol
        })
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Upstream `nodeIncludedPredicate`: a node carrying the exclusion label is included only when
/// the label's value parses as false.
pub fn node_included(node: &CachedNode) -> bool {
    match node.labels().get(LABEL_EXCLUDE_FROM_EXTERNAL_LB) {
        None => true,
        Some(value) => parse_bool(value) == Some(false),
    }
}

/// Upstream `nodeUnTaintedPredicate`: no `ToBeDeletedByClusterAutoscaler` taint.
pub fn node_untainted(node: &CachedNode) -> bool {
    !node.has_taint(TAINT_TO_BE_DELETED_BY_CLUSTER_AUTOSCALER)
}

/// Upstream `nodeNotDeletedPredicate`: no deletion timestamp.
pub fn node_not_deleted(node: &CachedNode) -> bool {
    node.meta().deletion_timestamp.is_none()
}

/// Upstream `stableNodeSetPredicates`: the backend set of every load balancer. Readiness is
/// deliberately not considered.
pub fn stable_node(node: &CachedNode) -> bool {
    node_not_deleted(node) && node_included(node) && node_untainted(node)
}

/// Upstream `allNodePredicates` (included, untainted and Ready); upstream keeps it for a unit
/// test only, and so does this build.
pub fn all_node_predicates(node: &CachedNode) -> bool {
    node_included(node)
        && node_untainted(node)
        && node
            .conditions()
            .iter()
            .any(|c| c.type_ == CONDITION_READY && c.status == "True")
}

/// Upstream `listWithPredicates`: the nodes satisfying `predicate`, in order.
pub fn list_with_predicate<'a, N: AsRef<CachedNode> + 'a>(
    nodes: impl IntoIterator<Item = &'a N>,
    predicate: impl Fn(&CachedNode) -> bool,
) -> Vec<&'a N> {
    nodes
        .into_iter()
        .filter(|n| predicate(n.as_ref()))
        .collect()
}

/// What of a node decides whether a node update triggers a node sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTrigger {
    /// [`node_included`].
    pub included: bool,
    /// `spec.providerID`.
    pub provider_id: Option<Box<str>>,
}

impl NodeTrigger {
    /// The trigger-relevant view of `node`.
    pub fn of(node: &CachedNode) -> Self {
        Self {
            included: node_included(node),
            provider_id: node.provider_id().map(Box::from),
        }
    }
}

/// Upstream `shouldSyncUpdatedNode`: the included predicate flipped or the providerID changed.
/// Taints, readiness, other labels and the deletion timestamp do not trigger a sync.
pub fn should_sync_updated_node(old: &CachedNode, new: &CachedNode) -> bool {
    NodeTrigger::of(old) != NodeTrigger::of(new)
}

/// Upstream `nodesSufficientlyEqual` over `(name, providerID)` pairs sorted by name: the same
/// count and the same providerID for every name.
pub fn nodes_sufficiently_equal(a: &[Host], b: &[Host]) -> bool {
    a == b
}

/// Whether a load balancer may be given `current` backends (`current_len` nodes) after last
/// being given `previous_len` (`None`: never, in this process): never an empty set in place of
/// a non-empty one. A control-plane disruption or a mass edit that empties the node set must
/// not drain every load balancer in one step (operators' experience with upstream, which does);
/// the load balancer keeps its last backends and the Service gets a Warning instead.
pub fn may_replace_backends(previous_len: Option<usize>, current_len: usize) -> bool {
    current_len > 0 || previous_len.is_none_or(|previous| previous == 0)
}

/// Upstream `LoadBalancerStatusEqual`: ingress by ingress, the IP, host name, `ipMode` and
/// ports (a missing list equals an empty one).
pub fn load_balancer_status_equal(l: &LoadBalancerStatus, r: &LoadBalancerStatus) -> bool {
    let (l, r) = (
        l.ingress.as_deref().unwrap_or_default(),
        r.ingress.as_deref().unwrap_or_default(),
    );
    l.len() == r.len() && l.iter().zip(r).all(|(a, b)| ingress_equal(a, b))
}

fn ingress_equal(a: &LoadBalancerIngress, b: &LoadBalancerIngress) -> bool {
    a.ip == b.ip
        && a.hostname == b.hostname
        && a.ip_mode == b.ip_mode
        && a.ports.as_deref().unwrap_or_default() == b.ports.as_deref().unwrap_or_default()
}

/// What an API server that stores `ipMode` makes of `status`: an IP ingress without a mode is
/// defaulted to `VIP`. Compared against, never written.
pub fn as_stored_with_ip_mode(status: &LoadBalancerStatus) -> LoadBalancerStatus {
    let mut stored = status.clone();
    for ingress in stored.ingress.iter_mut().flatten() {
        if ingress.ip.is_some() && ingress.ip_mode.is_none() {
            ingress.ip_mode = Some("VIP".to_string());
        }
    }
    stored
}

/// The strategic-merge patch adding the cleanup finalizer (upstream `addFinalizer` through
/// `PatchService`); `None` when it is already there (no API call).
pub fn add_finalizer_patch(svc: &CachedService) -> Option<Value> {
    if has_lb_finalizer(svc) {
        return None;
    }
    let mut order: Vec<&str> = svc.finalizers().iter().map(String::as_str).collect();
    order.push(FINALIZER_LOAD_BALANCER_CLEANUP);
    Some(json!({
        "metadata": {
            "$setElementOrder/finalizers": order,
            "finalizers": [FINALIZER_LOAD_BALANCER_CLEANUP],
        }
    }))
}

/// The strategic-merge patch removing the cleanup finalizer (upstream `removeFinalizer`);
/// `None` when it is not there (no API call). Other writers' finalizers are left alone.
pub fn remove_finalizer_patch(svc: &CachedService) -> Option<Value> {
    if !has_lb_finalizer(svc) {
        return None;
    }
    let rest: Vec<&str> = svc
        .finalizers()
        .iter()
        .map(String::as_str)
        .filter(|f| *f != FINALIZER_LOAD_BALANCER_CLEANUP)
        .collect();
    let mut metadata = json!({
        "$deleteFromPrimitiveList/finalizers": [FINALIZER_LOAD_BALANCER_CLEANUP],
    });
    if !rest.is_empty() {
        metadata["$setElementOrder/finalizers"] = json!(rest);
    }
    Some(json!({ "metadata": metadata }))
}

/// Whether a sync records the `EnsuredLoadBalancer` Event: always when a change asked for the
/// sync; on a periodic resync only when the status changed, so a pass over unchanged load
/// balancers writes no Events (a resync records no `EnsuringLoadBalancer` either).
pub fn records_ensured_event(resync: bool, status_changed: bool) -> bool {
    !resync || status_changed
}

/// Whether `svc` already has the load-balancer status `new` (`compare_as_stored`: as an
/// `ipMode`-aware API server would store it).
pub fn status_unchanged(
    svc: &CachedService,
    new: &LoadBalancerStatus,
    compare_as_stored: bool,
) -> bool {
    if compare_as_stored {
        load_balancer_status_equal(svc.load_balancer(), &as_stored_with_ip_mode(new))
    } else {
        load_balancer_status_equal(svc.load_balancer(), new)
    }
}

/// The strategic-merge patch of `status.loadBalancer` (upstream `patchStatus`); `None` when
/// the status is already `new` (no API call). `compare_as_stored` compares against what an
/// `ipMode`-aware API server would store.
pub fn status_patch(
    svc: &CachedService,
    new: &LoadBalancerStatus,
    compare_as_stored: bool,
) -> Option<Value> {
    if status_unchanged(svc, new, compare_as_stored) {
        return None;
    }
    let ingress = match new.ingress.as_deref() {
        Some(ingress) if !ingress.is_empty() => json!(ingress),
        _ => Value::Null,
    };
    Some(json!({ "status": { "loadBalancer": { "ingress": ingress } } }))
}

/// A Service the controller refuses to hand to the provider: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Checks what every provider needs of a load-balanced Service before Ensure: parsable source
/// ranges (upstream `GetLoadBalancerSourceRanges`) and a node port on every port unless
/// `allocateLoadBalancerNodePorts` is false.
pub fn validate_for_ensure(svc: &CachedService) -> Result<(), Invalid> {
    source_ranges(svc)?;
    if svc.spec().allocate_load_balancer_node_ports != Some(false) {
        for (i, port) in svc.spec().ports.iter().flatten().enumerate() {
            if port.node_port.is_none_or(|p| p == 0) {
                return Err(Invalid {
                    field: format!("spec.ports[{i}].nodePort"),
                    message: "is not set; a load balancer needs a node port on every port unless spec.allocateLoadBalancerNodePorts is false".into(),
                });
            }
        }
    }
    Ok(())
}

/// Upstream `GetLoadBalancerSourceRanges`: `spec.loadBalancerSourceRanges` when non-empty,
/// else the annotation (trimmed, comma-separated), else allow-all; every entry must be a
/// CIDR. Returns the normalised, de-duplicated ranges.
pub fn source_ranges(svc: &CachedService) -> Result<Vec<(IpAddr, u8)>, Invalid> {
    let spec_ranges = svc
        .spec()
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut ranges = Vec::new();
    if !spec_ranges.is_empty() {
        for (i, range) in spec_ranges.iter().enumerate() {
            let parsed = parse_cidr(range.trim()).ok_or_else(|| Invalid {
                field: format!("spec.loadBalancerSourceRanges[{i}]"),
                message: format!("{range:?} is not a CIDR"),
            })?;
            ranges.push(parsed);
        }
    } else {
        let annotation = svc
            .annotations()
            .get(ANNOTATION_LOAD_BALANCER_SOURCE_RANGES)
            .map(|v| v.trim())
            .unwrap_or_default();
        if annotation.is_empty() {
            ranges.push((IpAddr::from([0, 0, 0, 0]), 0));
        } else {
            for range in annotation.split(',') {
                let parsed = parse_cidr(range.trim()).ok_or_else(|| Invalid {
                    field: format!(
                        "metadata.annotations[{ANNOTATION_LOAD_BALANCER_SOURCE_RANGES}]"
                    ),
                    message: format!("{range:?} is not a CIDR"),
                })?;
                ranges.push(parsed);
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
}

/// Go's `net.ParseCIDR`, normalised to the network address: `None` unless `ip/prefix`.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = text.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
        return None;
    }
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    match ip {
        IpAddr::V4(v4) if prefix <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            Some((
                IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & mask)),
                prefix,
            ))
        }
        IpAddr::V6(v6) if prefix <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            Some((
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask)),
                prefix,
            ))
        }
        _ => None,
    }
}

/// Upstream `IsAllowAll`: the ranges contain `0.0.0.0/0`.
pub fn is_allow_all(ranges: &[(IpAddr, u8)]) -> bool {
    ranges.contains(&(IpAddr::from([0, 0, 0, 0]), 0))
}

/// What the service queue does with a key after a sync (upstream `processNextServiceItem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Success: forget the key's failures.
    Forget,
    /// The provider asked to retry after this delay: `AddAfter`, no backoff.
    After(Duration),
    /// Any other failure: `AddRateLimited` (5 s doubling to 300 s).
    RateLimited,
}

/// Upstream's per-item exponential backoff: 5 s × 2^(failures-1), at most 300 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    MIN_RETRY_DELAY
        .saturating_mul(1u32 << exp)
        .min(MAX_RETRY_DELAY)
}

/// Upstream's `UpdateLoadBalancerFailed` message: at most 20 node names, then the count of the
/// rest, as Go prints a string slice.
pub fn update_failure_message(names: &[&str], error: &dyn std::fmt::Display) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(LOGGED_NODE_NAMES)
        .map(|n| (*n).to_string())
        .collect();
    if names.len() > LOGGED_NODE_NAMES {
        shown.push(format!("<{} more>", names.len() - LOGGED_NODE_NAMES));
    }
    format!(
        "Error updating load balancer with new hosts {} [node names limited, total number of nodes: {}], error: {}",
        go_list(&shown),
        names.len(),
        error
    )
}

/// Upstream `cache.SplitMetaNamespaceKey`: `name` or `namespace/name`.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    match key.split('/').collect::<Vec<_>>()[..] {
        [name] => Some(("", name)),
        [namespace, name] => Some((namespace, name)),
        _ => None,
    }
}

/// Whether an API server of this version stores `status.loadBalancer.ingress[].ipMode`
/// (beta and on by default from 1.30; earlier servers drop it).
pub fn stores_ip_mode(major: &str, minor: &str) -> bool {
    let number = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) => major > 1 || (major == 1 && minor >= 30),
        _ => false,
    }
}

/// Node names of a backend set, for events.
pub fn node_names(nodes: &[Host]) -> Vec<&str> {
    nodes.iter().map(|(name, _)| name.as_ref()).collect()
}

/// `svc`'s name as events and logs show it.
pub fn display_key(svc: &CachedService) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}
