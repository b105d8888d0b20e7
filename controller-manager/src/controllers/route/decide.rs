//! The route controller's rules, as pure functions of the nodes, the listed routes, the cluster
//! CIDRs, the per-route backoff and `now` (upstream `controllers/route/route_controller.go`).
//! The executor in [`super`] lists, acts and writes what they decide; nothing here does IO.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use cpi_proto::v1;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::NodeCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::cloud::route_addresses;
use crate::cluster_cidrs::ClusterCidrs;
use crate::k8s::CachedNode;

#[cfg(test)]
mod tests;

/// The node condition the controller writes.
pub const CONDITION_NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
/// Reason of `NetworkUnavailable=False` once every route of the node exists.
pub const REASON_ROUTE_CREATED: &str = "RouteCreated";
/// Reason of `NetworkUnavailable=True` while a route of the node is missing.
pub const REASON_NO_ROUTE_CREATED: &str = "NoRouteCreated";
/// Message of `NetworkUnavailable=False/RouteCreated` (upstream's text).
pub const MESSAGE_ROUTE_CREATED: &str = "RouteController created a route";
/// Message of `NetworkUnavailable=True/NoRouteCreated` (upstream's text).
pub const MESSAGE_NO_ROUTE_CREATED: &str = "RouteController failed to create a route";

/// The first retry delay of a route whose creation failed.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(5);
/// The longest delay between two creation attempts of a failing route.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One desired route: a node and one of its pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// Target node name.
    pub node: String,
    /// Destination (pod) CIDR.
    pub cidr: String,
}

impl RouteKey {
    /// The key of `cidr` on `node`.
    pub fn new(node: &str, cidr: &str) -> Self {
        Self {
            node: node.to_string(),
            cidr: cidr.to_string(),
        }
    }
}

/// What a node's pod CIDR needs (upstream `routeAction`, without `remove`, which is a deletion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The route exists as wanted.
    Keep,
    /// No route exists: create one.
    Add,
    /// The route exists with stale node addresses: delete it, then create it again.
    Update,
}

/// A route to create.
#[derive(Debug, Clone, PartialEq)]
pub struct Creation {
    /// Node and CIDR.
    pub key: RouteKey,
    /// Upstream's name hint: the Node's UID.
    pub name_hint: String,
    /// The route as sent.
    pub route: v1::Route,
}

/// What one reconcile does (upstream `reconcile`'s passes, decided up front).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Per managed node with pod CIDRs or routes: the action of each pod CIDR (empty: the node
    /// has routes but no pod CIDRs).
    pub nodes: BTreeMap<String, BTreeMap<String, Action>>,
    /// Routes to delete, as listed.
    pub deletions: Vec<v1::Route>,
    /// Routes to create now.
    pub creations: Vec<Creation>,
    /// Whether every deletion must finish before the first creation.
    pub deletions_first: bool,
    /// Routes that would be deleted but that the shim says this cluster does not own: left
    /// alone and reported (operator pain point 4.3).
    pub foreign: Vec<v1::Route>,
    /// Routes whose destination is not a CIDR: left alone and reported.
    pub invalid: Vec<v1::Route>,
    /// Routes to create that wait for their backoff to expire.
    pub backing_off: Vec<RouteKey>,
    /// Routes to create that do not fit in the route table's capacity: not attempted.
    pub over_capacity: Vec<RouteKey>,
}

impl Plan {
    /// Whether every pod CIDR of `node` has its route (after the creations that succeeded were
    /// marked [`Action::Keep`]); `None` when the node has no entry (nothing to write).
    pub fn routes_created(&self, node: &str) -> Option<bool> {
        let actions = self.nodes.get(node)?;
        // Routes but no pod CIDR: the node's network is not set up by us (upstream: True).
        if actions.is_empty() {
            return Some(false);
        }
        Some(actions.values().all(|a| *a == Action::Keep))
    }

    /// Marks a created route as there.
    pub fn created(&mut self, key: &RouteKey) {
        if let Some(action) = self
            .nodes
            .get_mut(&key.node)
            .and_then(|actions| actions.get_mut(&key.cidr))
        {
            *action = Action::Keep;
        }
    }
}

/// What the rules need besides the nodes and the routes.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// `--cluster-cidr`: only routes inside it are ever deleted.
    pub cidrs: &'a ClusterCidrs,
    /// The route table's capacity the shim reported.
    pub capacity: Option<u32>,
    /// Failing routes and when each may be tried again.
    pub backoff: &'a Backoff,
    /// The time of the decision.
    pub now: Instant,
}

/// Upstream `reconcile(nodes, routes)`, decided: the action of every pod CIDR of every managed
/// node, the routes to delete and the routes to create now. Nodes `owns` refuses are outside
/// the provider's ownership: they get no route and their routes are left alone (pain point
/// 4.7). A listed route is deleted only when it is inside the cluster CIDRs and the shim does
/// not say another owner's (4.3).
pub fn reconcile<'a>(
    nodes: impl IntoIterator<Item = &'a CachedNode>,
    owns: impl Fn(&CachedNode) -> bool,
    routes: &[v1::Route],
    inputs: &Inputs<'_>,
) -> Plan {
    let mut by_node: HashMap<&str, Vec<&v1::Route>> = HashMap::new();
    for route in routes.iter().filter(|r| !r.target_node.is_empty()) {
        by_node.entry(&route.target_node).or_default().push(route);
    }
    let mut plan = Plan::default();
    let mut unmanaged = HashSet::new();
    let mut managed = Vec::new();
    for node in nodes {
        let name = node.name_any();
        if !owns(node) {
            unmanaged.insert(name);
            continue;
        }
        let existing = by_node.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let pod_cidrs = node.spec().pod_cidrs.as_deref().unwrap_or_default();
        if pod_cidrs.is_empty() {
            if !existing.is_empty() {
                plan.nodes.insert(name, BTreeMap::new());
            }
            continue;
        }
        let addresses = route_addresses(node);
        let wanted = address_set(&addresses);
        let mut actions = BTreeMap::new();
        for cidr in pod_cidrs {
            let action = match existing.iter().find(|r| r.destination_cidr == *cidr) {
                None => Action::Add,
                Some(route) if !route.enable_node_addresses => Action::Keep,
                Some(route) if address_set(&route.target_node_addresses) == wanted => Action::Keep,
                // Someone else's route to this node: never deleted, so never replaced.
                Some(route) if is_foreign(route) => Action::Keep,
                Some(_) => Action::Update,
            };
            actions.insert(cidr.clone(), action);
        }
        plan.nodes.insert(name.clone(), actions);
        managed.push((name, node));
    }

    for route in routes {
        let Ok(destination) = route.destination_cidr.parse::<IpNet>() else {
            plan.invalid.push(route.clone());
            continue;
        };
        if !inputs.cidrs.is_responsible_for(&destination) || unmanaged.contains(&route.target_node)
        {
            continue;
        }
        let action = plan
            .nodes
            .get(&route.target_node)
            .and_then(|actions| actions.get(&route.destination_cidr));
        let delete = route.blackhole || matches!(action, None | Some(Action::Update));
        if !delete {
            continue;
        }
        if is_foreign(route) {
            plan.foreign.push(route.clone());
        } else {
            plan.deletions.push(route.clone());
        }
    }

    let mut candidates = Vec::new();
    for (name, node) in &managed {
        let Some(actions) = plan.nodes.get(name) else {
            continue;
        };
        for (cidr, action) in actions {
            if *action == Action::Keep {
                continue;
            }
            let key = RouteKey::new(name, cidr);
            if inputs.backoff.blocked(&key, inputs.now) {
                plan.backing_off.push(key);
                continue;
            }
            candidates.push(Creation {
                name_hint: node.uid().unwrap_or_default(),
                route: v1::Route {
                    target_node: name.clone(),
                    target_node_addresses: route_addresses(node),
                    destination_cidr: cidr.clone(),
                    ..v1::Route::default()
                },
                key,
            });
        }
    }
    candidates.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(capacity) = inputs.capacity {
        let staying = routes.len().saturating_sub(plan.deletions.len());
        let free = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .saturating_sub(staying);
        if candidates.len() > free {
            plan.over_capacity = candidates
                .split_off(free)
                .into_iter()
                .map(|c| c.key)
                .collect();
        }
    }
    plan.creations = candidates;

    let replaced: HashSet<&str> = plan
        .deletions
        .iter()
        .map(|r| r.destination_cidr.as_str())
        .collect();
    plan.deletions_first = !plan.deletions.is_empty()
        // Upstream: a recreated route must not be deleted by the pass that replaces it.
        && (routes.first().is_some_and(|r| r.enable_node_addresses)
            // Freed slots must be free before they are used.
            || inputs.capacity.is_some()
            // Never two routes for one CIDR at once (pain point 4.4).
            || plan
                .creations
                .iter()
                .any(|c| replaced.contains(c.key.cidr.as_str())));
    plan
}

/// Whether the shim says the route carries another owner's identity.
pub fn is_foreign(route: &v1::Route) -> bool {
    route.ownership.as_ref().is_some_and(|o| !o.owned)
}

/// Upstream `equalNodeAddrs`: addresses compared as a set of (type, address).
fn address_set(addresses: &[v1::NodeAddress]) -> BTreeSet<(i32, &str)> {
    addresses
        .iter()
        .map(|a| (a.r#type, a.address.as_str()))
        .collect()
}

/// Per-route backoff of failed creations (pain points 4.2 and 4.6): each failing route waits
/// on its own, so routes that keep failing neither storm the provider nor delay others.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failing: HashMap<RouteKey, Failing>,
}

#[derive(Debug, Clone, Copy)]
struct Failing {
    failures: u32,
    retry_at: Instant,
}

/// The wait after the `failures`-th failure in a row: 5 s, doubling, at most 5 min.
pub fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    INITIAL_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

impl Backoff {
    /// Records a failed creation of `key` at `now`; returns the wait before the next attempt.
    pub fn failed(&mut self, key: &RouteKey, now: Instant) -> Duration {
        let failures = self.failing.get(key).map_or(0, |f| f.failures) + 1;
        let delay = backoff_delay(failures);
        self.failing.insert(
            key.clone(),
            Failing {
                failures,
                retry_at: now + delay,
            },
        );
        delay
    }

    /// Forgets the failures of `key` (it was created).
    pub fn succeeded(&mut self, key: &RouteKey) {
        self.failing.remove(key);
    }

    /// Whether `key` must not be tried at `now`.
    pub fn blocked(&self, key: &RouteKey, now: Instant) -> bool {
        self.failing.get(key).is_some_and(|f| now < f.retry_at)
    }

    /// Failures in a row of `key`.
    pub fn failures(&self, key: &RouteKey) -> u32 {
        self.failing.get(key).map_or(0, |f| f.failures)
    }

    /// Forgets the routes the plan no longer wants (node deleted, CIDR changed).
    pub fn retain_wanted(&mut self, plan: &Plan) {
        self.failing.retain(|key, _| {
            plan.nodes
                .get(&key.node)
                .is_some_and(|actions| actions.contains_key(&key.cidr))
        });
    }

    /// How many routes are failing.
    pub fn len(&self) -> usize {
        self.failing.len()
    }

    /// Whether no route is failing.
    pub fn is_empty(&self) -> bool {
        self.failing.is_empty()
    }
}

/// What to do with a node's `NetworkUnavailable` condition.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionDecision {
    /// Already the value and reason wanted: write nothing.
    Unchanged,
    /// Another writer (a CNI) set `False` with its own reason and a route is missing: setting
    /// `True` would mark a node it runs as unavailable (pain point 4.5). Left as is.
    LeftToOtherWriter {
        /// The other writer's reason.
        reason: String,
    },
    /// The strategic-merge patch of `nodes/status` to send.
    Patch(Value),
}

/// Upstream `updateNetworkingCondition`: the condition to write for a node whose routes are
/// (`routes_created`) or are not all there, given its current condition. Writes nothing when
/// value and reason are already right, and never turns another writer's `False` into `True`.
/// The transition time is kept when the status does not change.
pub fn network_condition(
    existing: Option<&NodeCondition>,
    routes_created: bool,
    now: &Time,
) -> ConditionDecision {
    let (status, reason, message) = if routes_created {
        ("False", REASON_ROUTE_CREATED, MESSAGE_ROUTE_CREATED)
    } else {
        ("True", REASON_NO_ROUTE_CREATED, MESSAGE_NO_ROUTE_CREATED)
    };
    if let Some(current) = existing {
        let current_reason = current.reason.as_deref().unwrap_or_default();
        if current.status == status && current_reason == reason {
            return ConditionDecision::Unchanged;
        }
        if !routes_created && current.status == "False" && current_reason != REASON_ROUTE_CREATED {
            return ConditionDecision::LeftToOtherWriter {
                reason: current_reason.to_string(),
            };
        }
    }
    let transition = existing
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    ConditionDecision::Patch(json!({ "status": { "conditions": [{
        "type": CONDITION_NETWORK_UNAVAILABLE,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "lastHeartbeatTime": now,
    }]}}))
}

/// The `NetworkUnavailable` condition of a node, if any.
pub fn current_condition(node: &CachedNode) -> Option<&NodeCondition> {
    node.conditions()
        .iter()
        .find(|c| c.type_ == CONDITION_NETWORK_UNAVAILABLE)
}

/// What of a node the watch-based mode reacts to (KEP-5237): its pod CIDRs, its addresses,
/// and its version (an equal version is a resync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<String>,
    /// `status.addresses` as (type, address).
    pub addresses: Vec<(String, String)>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
}

impl Watched {
    /// The watched fields of `node`.
    pub fn of(node: &CachedNode) -> Self {
        Self {
            pod_cidrs: node.spec().pod_cidrs.clone().unwrap_or_default(),
            addresses: node
                .addresses()
                .iter()
                .map(|a| (a.type_.clone(), a.address.clone()))
                .collect(),
            resource_version: node.resource_version(),
        }
    }
}

/// Upstream's node update handler in the watch-based mode: reconcile when the pod CIDRs or
/// the addresses changed, or on a resync (same version).
pub fn update_triggers(old: &Watched, new: &Watched) -> bool {
    old.resource_version == new.resource_version
        || old.pod_cidrs != new.pod_cidrs
        || old.addresses != new.addresses
}

/// Whether the node cache changed in a way that calls for a reconcile since `seen`: a node
/// added or deleted, or one updated as [`update_triggers`] says. (A watch has no resync, so
/// nodes at the same version are skipped here; a timer stands in for resyncs.)
pub fn nodes_changed(seen: &HashMap<String, Watched>, now: &HashMap<String, Watched>) -> bool {
    seen.len() != now.len()
        || now.iter().any(|(name, new)| match seen.get(name) {
            None => true,
            Some(old) => old.resource_version != new.resource_version && update_triggers(old, new),
        })
}
