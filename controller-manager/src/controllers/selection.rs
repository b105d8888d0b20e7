//! Controller names and aliases (upstream `names/controller_names.go`), and the `--controllers`
//! selection rules (`*`, `foo`, `-foo`; first match wins; aliases resolve to canonical names).

use super::{ALL_NAMES, Names};

/// An unknown name in `--controllers`.
#[derive(Debug, thiserror::Error)]
#[error("--controllers: unknown controller {name:?}; known controllers: {known}")]
pub struct SelectionError {
    /// The offending entry.
    pub name: String,
    /// Every known name with its alias.
    pub known: String,
}

/// Looks a controller up by canonical name or alias.
pub fn lookup(name: &str) -> Option<Names> {
    ALL_NAMES
        .iter()
        .copied()
        .find(|n| n.canonical == name || n.alias == name)
}

/// The parsed `--controllers` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSelection {
    entries: Vec<(Option<&'static str>, bool)>,
}

impl ControllerSelection {
    /// Parses the flag values; unknown names are rejected.
    pub fn parse(values: &[String]) -> Result<Self, SelectionError> {
        let mut entries = Vec::new();
        for raw in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
            if raw == "*" {
                entries.push((None, true));
                continue;
            }
            let (name, enabled) = match raw.strip_prefix('-') {
                Some(rest) => (rest, false),
                None => (raw, true),
            };
            let controller = lookup(name).ok_or_else(|| SelectionError {
                name: raw.to_string(),
                known: ALL_NAMES
                    .iter()
                    .map(|n| format!("{} ({})", n.canonical, n.alias))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            entries.push((Some(controller.canonical), enabled));
        }
        Ok(Self { entries })
    }

    /// Upstream `IsControllerEnabled`: an explicit entry wins (first match), else `*` enables
    /// every on-by-default controller (all of them are on by default).
    pub fn is_enabled(&self, controller: &Names) -> bool {
        let mut star = false;
        for (name, enabled) in &self.entries {
            match name {
                Some(n) if *n == controller.canonical => return *enabled,
                None => star = true,
                _ => {}
            }
        }
        star
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use cpi_proto::v1::Capability;

    use super::super::{
        Controller, node::CloudNodeController, node_ipam::NodeIpamController,
        node_lifecycle::NodeLifecycleController, route::RouteController,
        service_lb::ServiceLbController,
    };
    use super::*;

    const CLOUD_NODE: Names = CloudNodeController::NAMES;
    const CLOUD_NODE_LIFECYCLE: Names = NodeLifecycleController::NAMES;
    const SERVICE_LB: Names = ServiceLbController::NAMES;
    const NODE_ROUTE: Names = RouteController::NAMES;

    fn sel(values: &[&str]) -> ControllerSelection {
        ControllerSelection::parse(&values.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    #[test]
    fn names_follow_upstream_format() {
        for c in ALL_NAMES {
            let name = c.canonical;
            assert!(name.ends_with("-controller"), "{name}");
            assert!(name.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-'));
            assert_eq!(lookup(c.alias), Some(*c));
        }
    }

    #[test]
    fn upstream_names_and_aliases() {
        let pairs: Vec<_> = ALL_NAMES.iter().map(|n| (n.canonical, n.alias)).collect();
        assert_eq!(
            pairs,
            [
                ("cloud-node-controller", "cloud-node"),
                ("cloud-node-lifecycle-controller", "cloud-node-lifecycle"),
                ("service-lb-controller", "service"),
                ("node-route-controller", "route"),
                ("node-ipam-controller", "nodeipam"),
            ]
        );
    }

    #[test]
    fn star_enables_all() {
        let s = sel(&["*"]);
        assert!(ALL_NAMES.iter().all(|c| s.is_enabled(c)));
    }

    #[test]
    fn aliases_resolve_in_custom_list() {
        let s = sel(&["cloud-node", "-service", "*"]);
        assert!(s.is_enabled(&CLOUD_NODE));
        assert!(!s.is_enabled(&SERVICE_LB));
        assert!(s.is_enabled(&NODE_ROUTE));
    }

    #[test]
    fn explicit_list_without_star_enables_only_named() {
        let s = sel(&["cloud-node-controller"]);
        assert!(s.is_enabled(&CLOUD_NODE));
        assert!(!s.is_enabled(&CLOUD_NODE_LIFECYCLE));
    }

    #[test]
    fn first_match_wins() {
        let s = sel(&["-route", "route"]);
        assert!(!s.is_enabled(&NODE_ROUTE));
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let err = ControllerSelection::parse(&["bogus".to_string()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"bogus\""), "{text}");
        assert!(text.contains("node-ipam-controller (nodeipam)"), "{text}");
    }

    #[test]
    fn capabilities_gate_controllers() {
        let caps = [Capability::InstancesV2];
        assert!(CloudNodeController::supported_by(&caps));
        assert!(NodeLifecycleController::supported_by(&caps));
        assert!(!ServiceLbController::supported_by(&caps));
        assert!(!RouteController::supported_by(&caps));
        // The range allocator needs nothing from the provider.
        assert!(NodeIpamController::supported_by(&caps));
    }
}
