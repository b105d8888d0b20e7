//! The range allocator's rules, free of IO: what a node needs ([`decide`]) and the ledger of
//! which CIDR belongs to whom ([`Ledger`]), which the executor feeds with node snapshots and
//! patch outcomes and asks for the next patches.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kube::{Resource, ResourceExt};
use tracing::debug;

use super::cidr_set::{CidrSet, CidrSetError};
use super::config::IpamSettings;
use super::metrics::IpamMetrics;
use crate::cloud::Predecessor;
use crate::k8s::CachedNode;

/// What a node needs from the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing: its podCIDRs are all marked used already (or are not ours to track).
    None,
    /// It has no podCIDRs: give it one per cluster CIDR.
    Allocate,
    /// It has podCIDRs (set by us earlier or by someone else) not yet marked used: respect
    /// them and mark them.
    Occupy(Vec<IpNet>),
}

/// The node's podCIDR texts as written: `spec.podCIDRs`, or the single `spec.podCIDR` of old
/// writers.
fn cidr_texts(node: &CachedNode) -> impl Iterator<Item = &str> {
    let spec = node.spec();
    let listed = spec.pod_cidrs.as_deref().unwrap_or_default();
    let single = spec
        .pod_cidr
        .as_deref()
        .filter(|c| !c.is_empty() && listed.is_empty());
    listed.iter().map(String::as_str).chain(single)
}

/// The node's `spec.podCIDRs` (or the single `spec.podCIDR` of old writers) that parse; an
/// entry that does not parse is logged and left out.
pub fn pod_cidrs(node: &CachedNode) -> Vec<IpNet> {
    cidr_texts(node)
        .filter_map(|text| match text.parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                debug!(node = %node.name_any(), cidr = text, "podCIDR does not parse; ignored");
                None
            }
        })
        .collect()
}

/// The node's name, borrowed (every pass looks at every node: no copies).
fn name_of(node: &CachedNode) -> &str {
    node.meta().name.as_deref().unwrap_or_default()
}

/// The node's UID, borrowed.
fn uid_of(node: &CachedNode) -> &str {
    node.meta().uid.as_deref().unwrap_or_default()
}

/// Whether the node has any podCIDR set, parsable or not (the API server refuses to change
/// one once set, so such a node is never given one).
fn has_pod_cidrs(node: &CachedNode) -> bool {
    let spec = node.spec();
    !spec.pod_cidrs.as_deref().unwrap_or_default().is_empty()
        || spec.pod_cidr.as_deref().is_some_and(|c| !c.is_empty())
}

/// What `node` needs, given the sets (upstream `AllocateOrOccupyCIDR`'s first step).
pub fn decide(node: &CachedNode, sets: &[CidrSet]) -> Action {
    if !has_pod_cidrs(node) {
        return Action::Allocate;
    }
    let unmarked: Vec<IpNet> = pod_cidrs(node)
        .into_iter()
        .filter(|cidr| {
            sets.iter()
                .filter(|set| set.same_family(cidr))
                // Out of range (or of a family we do not allocate): not ours, nothing to mark.
                .any(|set| set.is_occupied(cidr).is_ok_and(|occupied| !occupied))
        })
        .collect();
    if unmarked.is_empty() {
        Action::None
    } else {
        Action::Occupy(unmarked)
    }
}

/// Whether a newly started allocator must first let others' podCIDR writes settle: only when
/// a previous leader may still be writing them, or that is not known.
pub fn must_settle(predecessor: Option<&Predecessor>) -> bool {
    !matches!(predecessor, Some(Predecessor::None))
}

/// A node's CIDRs as last seen on it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    uid: String,
    cidrs: Vec<IpNet>,
    /// The podCIDR texts they were parsed from: an unchanged node is told by comparing these,
    /// without parsing.
    texts: Vec<String>,
    /// The last [`Ledger::observe`] pass that found the node showing them.
    pass: u64,
}

impl Seen {
    /// What `node` shows now.
    fn of(node: &CachedNode) -> Self {
        Self {
            uid: uid_of(node).to_string(),
            cidrs: pod_cidrs(node),
            texts: cidr_texts(node).map(str::to_string).collect(),
            pass: 0,
        }
    }

    /// Whether `node` still shows these CIDRs (the texts compared first, the CIDRs only when
    /// they differ, e.g. written another way).
    fn still_on(&mut self, node: &CachedNode) -> bool {
        if uid_of(node) != self.uid {
            return false;
        }
        if self.texts.iter().map(String::as_str).eq(cidr_texts(node)) {
            return true;
        }
        if pod_cidrs(node) == self.cidrs {
            self.texts = cidr_texts(node).map(str::to_string).collect();
            return true;
        }
        false
    }
}

/// Where one of our allocations is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its patch is being sent.
    InFlight,
    /// Patched; not yet seen on the node.
    Patched,
    /// The patch failed without a definite answer (it may have been applied): the CIDRs stay
    /// reserved for this node and are patched again after the backoff.
    Held,
}

/// CIDRs we handed to a node that the cache does not show on it yet.
#[derive(Debug, Clone)]
struct Pending {
    uid: String,
    cidrs: Vec<IpNet>,
    stage: Stage,
}

/// A node's retry delay after a failure.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    not_before: Instant,
    /// The range was full: retried as soon as anything is freed.
    full: bool,
    /// The last [`Ledger::observe`] pass that found the node.
    pass: u64,
}

/// First retry delay after a failure; doubled per further failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

fn delay(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(BACKOFF_MAX)
}

/// What the executor must do next for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Patch the node (name, UID precondition) with these podCIDRs, in cluster CIDR order.
    Patch {
        /// Node name.
        node: String,
        /// Node UID.
        uid: String,
        /// Its podCIDRs.
        cidrs: Vec<IpNet>,
    },
    /// A cluster CIDR has no free block for the node.
    Full {
        /// Node name.
        node: String,
        /// Which range is full.
        error: CidrSetError,
    },
}

/// How a patch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node has our CIDRs.
    Patched,
    /// The API server answered that nothing was written (the node changed identity, the
    /// request was refused, ...): the CIDRs are freed and the node retried after a backoff.
    NotApplied,
    /// No definite answer (timeout, connection lost, server error): the write may have landed,
    /// so the CIDRs stay reserved for the node and the same patch is retried after a backoff.
    Unknown,
    /// The node already had podCIDRs (the API server refuses to change them): these, read
    /// back, are respected; ours are freed unless they are the same.
    Taken(Vec<IpNet>),
    /// The node is gone.
    Gone,
}

/// What one look at the nodes changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Nodes whose podCIDRs appeared or changed since the previous look, not by us.
    pub foreign_changes: usize,
    /// Blocks freed.
    pub released: usize,
}

/// The ledger's maps keyed by node name. Every pass looks up every node's name, so they hash
/// with [`NameHasher`] rather than SipHash: the names are those the API server accepted for
/// Nodes, which only kubelets and administrators create.
type ByNode<K, V> = HashMap<K, V, BuildHasherDefault<NameHasher>>;

/// A folded-multiply hash (as in wyhash and foldhash), eight bytes at a time: a few
/// instructions per name. (FxHash's plain multiply is cheaper but makes names that differ in
/// two words collide.)
#[derive(Debug, Default, Clone, Copy)]
struct NameHasher(u64);

impl NameHasher {
    /// An odd constant with well-spread bits (rustc's Fx constant).
    const SEED: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        let product = u128::from(self.0 ^ word) * u128::from(Self::SEED);
        let [low, high] = [product, product >> 64].map(|half| {
            // Keeps the low 64 bits of each half.
            u64::try_from(half & u128::from(u64::MAX)).unwrap_or_default()
        });
        self.0 = low ^ high;
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The length first: the last word is padded with zeros.
        self.add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.add(u64::from_le_bytes(buf));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Which CIDR belongs to whom: the sets per family plus, per node, what was seen on it and
/// what we handed out but have not seen yet. One owner (the executor's task) changes it, so
/// every allocation decision is serialized.
#[derive(Debug)]
pub struct Ledger {
    sets: Vec<CidrSet>,
    reserved: Vec<IpNet>,
    seen: ByNode<String, Seen>,
    pending: ByNode<String, Pending>,
    backoff: ByNode<String, Backoff>,
    /// Blocks were released outside [`observe`](Self::observe): the next one marks every
    /// node's CIDRs again, as one may have been on another node too.
    remark: bool,
    /// Counts [`observe`](Self::observe) passes; entries not found in a pass are gone.
    pass: u64,
}

impl Ledger {
    /// The ledger of `settings`, service ranges marked used (upstream `filterOutServiceRange`).
    pub fn new(settings: &IpamSettings, metrics: &IpamMetrics) -> Result<Self, CidrSetError> {
        let sets = settings
            .pools
            .iter()
            .map(|(cluster, mask)| CidrSet::new(*cluster, *mask, metrics.set(&cluster.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ledger = Self {
            sets,
            reserved: settings.service_ranges.clone(),
            seen: ByNode::default(),
            pending: ByNode::default(),
            backoff: ByNode::default(),
            remark: false,
            pass: 0,
        };
        ledger.mark_reserved();
        Ok(ledger)
    }

    /// The CIDR sets.
    pub fn sets(&self) -> &[CidrSet] {
        &self.sets
    }

    /// Takes in the nodes as the cache has them now: frees the CIDRs of nodes that are gone
    /// (or re-created, or whose CIDRs changed), marks every CIDR seen on a node, and drops the
    /// pending allocations the nodes now show.
    pub fn observe(&mut self, nodes: &[Arc<CachedNode>]) -> Observed {
        let mut observed = Observed::default();
        let before: usize = self.sets.iter().map(CidrSet::allocated).sum();
        // One look at each node (this runs on every change of any node): which still show
        // what was seen on them, which show podCIDRs not seen yet, where the pending ones are.
        self.pass = self.pass.wrapping_add(1);
        let pass = self.pass;
        let mut unchanged = 0;
        let mut fresh: Vec<&CachedNode> = Vec::new();
        let mut pending_live: ByNode<&str, &CachedNode> = ByNode::default();
        for node in nodes {
            let node = node.as_ref();
            let name = name_of(node);
            let still = self.seen.get_mut(name).is_some_and(|seen| {
                let still = seen.still_on(node);
                if still {
                    seen.pass = pass;
                }
                still
            });
            if still {
                unchanged += 1;
            } else if has_pod_cidrs(node) {
                fresh.push(node);
            }
            if !self.pending.is_empty() && self.pending.contains_key(name) {
                pending_live.insert(name, node);
            }
            if !self.backoff.is_empty()
                && let Some(backoff) = self.backoff.get_mut(name)
            {
                backoff.pass = pass;
            }
        }
        // Gone or changed: free what was seen on them (re-marked below if still on a node).
        let mut freed = Vec::new();
        if unchanged != self.seen.len() {
            self.seen.retain(|_, seen| {
                let keep = seen.pass == pass;
                if !keep {
                    freed.extend(seen.cidrs.iter().copied());
                }
                keep
            });
        }
        let mut landed = Vec::new();
        self.pending.retain(|name, pending| {
            let Some(node) = pending_live.get(name.as_str()) else {
                freed.extend(pending.cidrs.iter().copied());
                return false;
            };
            if uid_of(node) != pending.uid {
                freed.extend(pending.cidrs.iter().copied());
                return false;
            }
            if has_pod_cidrs(node) {
                // Ours landed, or someone else's did: either way the node's own are marked
                // below, and ours are freed if they are not the ones it has.
                let on_node = pod_cidrs(node);
                freed.extend(pending.cidrs.iter().filter(|c| !on_node.contains(c)));
                landed.push(name.clone());
                return false;
            }
            true
        });
        for cidr in &freed {
            self.release(cidr);
        }
        for node in fresh {
            let name = name_of(node);
            if let Action::Occupy(unmarked) = decide(node, &self.sets) {
                for cidr in &unmarked {
                    self.occupy(cidr);
                }
            }
            if !landed.iter().any(|l| l == name) {
                // Not one we were waiting for: another writer's.
                observed.foreign_changes += 1;
            }
            let seen = Seen {
                pass,
                ..Seen::of(node)
            };
            self.seen.insert(name.to_string(), seen);
            self.backoff.remove(name);
        }
        if !freed.is_empty() || std::mem::take(&mut self.remark) {
            // A freed CIDR may also have been on another node, or in a service range.
            let still: Vec<IpNet> = self
                .seen
                .values()
                .flat_map(|s| s.cidrs.iter().copied())
                .chain(self.pending.values().flat_map(|p| p.cidrs.iter().copied()))
                .collect();
            for cidr in &still {
                self.occupy(cidr);
            }
            self.mark_reserved();
        }
        self.backoff.retain(|_, backoff| backoff.pass == pass);
        let after: usize = self.sets.iter().map(CidrSet::allocated).sum();
        observed.released = before.saturating_sub(after);
        if observed.released > 0 {
            // Room again: nodes that found a range full are tried now.
            self.backoff.retain(|_, b| !b.full);
        }
        observed
    }

    /// The patches to send now (at most `limit`), allocating for nodes that need it; nodes in
    /// backoff, or with a patch under way, wait.
    pub fn next_steps(
        &mut self,
        nodes: &[Arc<CachedNode>],
        now: Instant,
        limit: usize,
    ) -> Vec<Step> {
        let mut steps = Vec::new();
        for node in nodes {
            if steps.len() >= limit {
                break;
            }
            // Only a node without podCIDRs needs an allocation (what `decide` says, without
            // parsing any CIDR).
            if has_pod_cidrs(node) {
                continue;
            }
            let name = name_of(node);
            if !self.backoff.is_empty()
                && self.backoff.get(name).is_some_and(|b| b.not_before > now)
            {
                continue;
            }
            let uid = uid_of(node);
            match self.pending.get_mut(name) {
                Some(pending) if pending.stage == Stage::Held && pending.uid == uid => {
                    pending.stage = Stage::InFlight;
                    steps.push(Step::Patch {
                        node: name.to_string(),
                        uid: uid.to_string(),
                        cidrs: pending.cidrs.clone(),
                    });
                    continue;
                }
                Some(_) => continue,
                None => {}
            }
            let (name, uid) = (name.to_string(), uid.to_string());
            match self.allocate() {
                Ok(cidrs) => {
                    self.pending.insert(
                        name.clone(),
                        Pending {
                            uid: uid.clone(),
                            cidrs: cidrs.clone(),
                            stage: Stage::InFlight,
                        },
                    );
                    steps.push(Step::Patch {
                        node: name,
                        uid,
                        cidrs,
                    });
                }
                Err(error) => {
                    self.fail(&name, now, true);
                    steps.push(Step::Full { node: name, error });
                }
            }
        }
        steps
    }

    /// One block per set; all or nothing.
    fn allocate(&mut self) -> Result<Vec<IpNet>, CidrSetError> {
        let mut cidrs = Vec::with_capacity(self.sets.len());
        for index in 0..self.sets.len() {
            match self.sets[index].allocate_next() {
                Ok(cidr) => cidrs.push(cidr),
                Err(error) => {
                    for cidr in &cidrs {
                        self.release(cidr);
                    }
                    return Err(error);
                }
            }
        }
        Ok(cidrs)
    }

    /// Records how `node`'s patch ended.
    pub fn finished(&mut self, node: &str, outcome: Outcome, now: Instant) {
        let Some(pending) = self.pending.get_mut(node) else {
            return;
        };
        match outcome {
            Outcome::Patched => {
                pending.stage = Stage::Patched;
                self.backoff.remove(node);
            }
            Outcome::Unknown => {
                pending.stage = Stage::Held;
                self.fail(node, now, false);
            }
            Outcome::NotApplied | Outcome::Gone => {
                let ours = self
                    .pending
                    .remove(node)
                    .map(|p| p.cidrs)
                    .unwrap_or_default();
                for cidr in &ours {
                    self.release(cidr);
                }
                self.remark |= !ours.is_empty();
                if outcome == Outcome::NotApplied {
                    self.fail(node, now, false);
                }
            }
            Outcome::Taken(theirs) => {
                let Some(pending) = self.pending.remove(node) else {
                    return;
                };
                for cidr in pending.cidrs.iter().filter(|c| !theirs.contains(c)) {
                    self.release(cidr);
                    self.remark = true;
                }
                for cidr in &theirs {
                    self.occupy(cidr);
                }
                self.seen.insert(
                    node.to_string(),
                    Seen {
                        uid: pending.uid,
                        texts: theirs.iter().map(ToString::to_string).collect(),
                        cidrs: theirs,
                        pass: self.pass,
                    },
                );
            }
        }
    }

    /// When the earliest backoff still running at `now` ends (those already over are
    /// [`next_steps`](Self::next_steps)' business).
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.backoff
            .values()
            .map(|b| b.not_before)
            .filter(|at| *at > now)
            .min()
    }

    fn fail(&mut self, node: &str, now: Instant, full: bool) {
        let backoff = self.backoff.entry(node.to_string()).or_insert(Backoff {
            failures: 0,
            not_before: now,
            full,
            pass: self.pass,
        });
        backoff.failures = backoff.failures.saturating_add(1);
        backoff.not_before = now + delay(backoff.failures);
        backoff.full = full;
    }

    fn set_of(&mut self, cidr: &IpNet) -> Option<&mut CidrSet> {
        self.sets.iter_mut().find(|set| set.same_family(cidr))
    }

    /// Marks `cidr` used; a CIDR outside every cluster CIDR is not ours and is ignored.
    fn occupy(&mut self, cidr: &IpNet) {
        if let Some(set) = self.set_of(cidr)
            && let Err(err) = set.occupy(cidr)
        {
            debug!(%cidr, error = %err, "CIDR is not in a cluster CIDR; not tracked");
        }
    }

    fn release(&mut self, cidr: &IpNet) {
        if let Some(set) = self.set_of(cidr) {
            let _ = set.release(cidr);
        }
    }

    fn mark_reserved(&mut self) {
        for cidr in self.reserved.clone() {
            self.occupy(&cidr);
        }
    }
}

#[cfg(test)]
mod tests;
