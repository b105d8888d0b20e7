//! The shim's view of the programmed table, kept in memory so that CreateRoute and DeleteRoute
//! decide without dumping the whole table (a dump per call made N creates cost O(N²)).
//!
//! The view is loaded by the start-up dump, replaced by every ListRoutes dump and updated by
//! the shim's own writes. It can be stale for routes changed behind the shim's back, so it is
//! only trusted where a mistake is harmless or caught: a destination it shows free is added
//! exclusively (`NLM_F_EXCL`), and the kernel's `EEXIST` sends the caller back to a fresh dump
//! ([`ProgramOp`]); a foreign route is therefore never overwritten.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::plan::{KernelRoute, ours_at};

/// The routes of the table by destination, and how many changes the shim has made to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableView {
    routes: BTreeMap<IpNet, Vec<KernelRoute>>,
    /// Bumped by each of the shim's own writes, so that a dump taken while one ran is not
    /// allowed to undo it.
    changes: u64,
}

/// How a route of ours is put into the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramOp {
    /// The view shows no route of ours there: add, failing with `EEXIST` if the destination
    /// is taken after all (then the caller dumps and decides again).
    AddExclusive,
    /// Ours is there with another next hop (or as a blackhole): replace it atomically.
    Replace,
}

/// How to program our route at a destination whose known routes are `at`.
pub fn program_op(at: &[KernelRoute], destination: &IpNet, protocol: u8) -> ProgramOp {
    match ours_at(at, destination, protocol) {
        Some(_) => ProgramOp::Replace,
        None => ProgramOp::AddExclusive,
    }
}

fn by_destination(dump: Vec<KernelRoute>) -> BTreeMap<IpNet, Vec<KernelRoute>> {
    let mut routes: BTreeMap<IpNet, Vec<KernelRoute>> = BTreeMap::new();
    for route in dump {
        routes.entry(route.destination).or_default().push(route);
    }
    routes
}

impl TableView {
    /// The view of a freshly dumped table.
    pub fn from_dump(dump: Vec<KernelRoute>) -> Self {
        Self {
            routes: by_destination(dump),
            changes: 0,
        }
    }

    /// How many changes the shim has made; pass it to [`TableView::refresh`] with a dump
    /// started after reading it.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The known routes at `destination`.
    pub fn at(&self, destination: &IpNet) -> Vec<KernelRoute> {
        self.routes.get(destination).cloned().unwrap_or_default()
    }

    /// Records that our route at `destination` now goes through `gateway` (an add or replace
    /// succeeded); routes of other protocols there are kept.
    pub fn programmed(&mut self, destination: IpNet, gateway: IpAddr, protocol: u8) {
        let routes = self.routes.entry(destination).or_default();
        routes.retain(|r| r.protocol != protocol);
        routes.push(KernelRoute {
            destination,
            gateway: Some(gateway),
            protocol,
            blackhole: false,
        });
        self.changes += 1;
    }

    /// Records that our route at `destination` is gone.
    pub fn unprogrammed(&mut self, destination: &IpNet, protocol: u8) {
        if let Some(routes) = self.routes.get_mut(destination) {
            routes.retain(|r| r.protocol != protocol);
            if routes.is_empty() {
                self.routes.remove(destination);
            }
        }
        self.changes += 1;
    }

    /// Takes in a dump started when [`TableView::changes`] read `changes_before`: the whole
    /// view is replaced if the shim changed nothing meanwhile (otherwise the dump may predate
    /// a change and only `held`, the destination the caller has locked, is taken from it).
    /// Returns the routes the dump has at `held`.
    pub fn refresh(
        &mut self,
        dump: Vec<KernelRoute>,
        changes_before: u64,
        held: Option<&IpNet>,
    ) -> Vec<KernelRoute> {
        let mut fresh = by_destination(dump);
        let at = held
            .and_then(|destination| fresh.get(destination).cloned())
            .unwrap_or_default();
        if self.changes == changes_before {
            self.routes = std::mem::take(&mut fresh);
        } else if let Some(destination) = held {
            if at.is_empty() {
                self.routes.remove(destination);
            } else {
                self.routes.insert(*destination, at.clone());
            }
        }
        at
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::routes::plan::tests::{OURS, STATIC, net};

    fn kroute(dst: &str, gateway: &str, protocol: u8) -> KernelRoute {
        crate::routes::plan::tests::kroute(dst, Some(gateway), protocol)
    }

    #[test]
    fn a_free_destination_is_added_exclusively_and_ours_is_replaced() {
        let dst = net("10.244.1.0/24");
        assert_eq!(program_op(&[], &dst, OURS), ProgramOp::AddExclusive);
        let ours = [kroute("10.244.1.0/24", "10.99.0.1", OURS)];
        assert_eq!(program_op(&ours, &dst, OURS), ProgramOp::Replace);
        // A foreign route never leads to a replace (the plan refuses it before; a stale view
        // that misses it still only adds exclusively).
        let foreign = [kroute("10.244.1.0/24", "10.99.0.9", STATIC)];
        assert_eq!(program_op(&foreign, &dst, OURS), ProgramOp::AddExclusive);
    }

    #[test]
    fn own_writes_update_the_view_and_keep_foreign_routes() {
        let dst = net("10.244.1.0/24");
        let mut view = TableView::from_dump(vec![
            kroute("10.244.1.0/24", "10.99.0.1", OURS),
            kroute("10.244.1.0/24", "10.99.0.9", STATIC),
        ]);
        view.programmed(dst, "10.99.0.2".parse().unwrap(), OURS);
        assert_eq!(
            view.at(&dst),
            vec![
                kroute("10.244.1.0/24", "10.99.0.9", STATIC),
                kroute("10.244.1.0/24", "10.99.0.2", OURS),
            ]
        );
        view.unprogrammed(&dst, OURS);
        assert_eq!(
            view.at(&dst),
            vec![kroute("10.244.1.0/24", "10.99.0.9", STATIC)]
        );
        assert_eq!(view.changes(), 2);
    }

    #[test]
    fn a_dump_replaces_the_view_unless_the_shim_wrote_meanwhile() {
        let (a, b) = (net("10.244.1.0/24"), net("10.244.2.0/24"));
        let mut view = TableView::default();
        let before = view.changes();
        let at = view.refresh(
            vec![kroute("10.244.1.0/24", "10.99.0.1", OURS)],
            before,
            None,
        );
        assert!(at.is_empty());
        assert_eq!(view.at(&a).len(), 1);

        // A dump that started before our add of b does not erase b, and does not bring a's
        // (possibly older) state back either; only the held destination is taken from it.
        let before = view.changes();
        view.programmed(b, "10.99.0.2".parse().unwrap(), OURS);
        let stale = vec![kroute("10.244.3.0/24", "10.99.0.3", STATIC)];
        let at = view.refresh(stale, before, Some(&net("10.244.3.0/24")));
        assert_eq!(at, vec![kroute("10.244.3.0/24", "10.99.0.3", STATIC)]);
        assert_eq!(view.at(&a).len(), 1);
        assert_eq!(view.at(&b).len(), 1);
        assert_eq!(view.at(&net("10.244.3.0/24")).len(), 1);

        // The held destination found empty is forgotten.
        let before = view.changes() - 1;
        assert!(view.refresh(Vec::new(), before, Some(&a)).is_empty());
        assert!(view.at(&a).is_empty());
        assert_eq!(view.at(&b).len(), 1);
    }
}
