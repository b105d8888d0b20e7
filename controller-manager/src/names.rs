//! Controller names and aliases (upstream `names/controller_names.go`), and the `--controllers`
//! selection rules (`*`, `foo`, `-foo`; first match wins; aliases resolve to canonical names).

use cpi_proto::v1::Capability;

/// One controller this manager can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControllerName {
    /// `cloud-node-controller` (alias `cloud-node`).
    CloudNode,
    /// `cloud-node-lifecycle-controller` (alias `cloud-node-lifecycle`).
    CloudNodeLifecycle,
    /// `service-lb-controller` (alias `service`).
    ServiceLb,
    /// `node-route-controller` (alias `route`).
    NodeRoute,
}

impl ControllerName {
    /// Every controller, in start order.
    pub const ALL: [ControllerName; 4] = [
        Self::CloudNode,
        Self::CloudNodeLifecycle,
        Self::ServiceLb,
        Self::NodeRoute,
    ];

    /// Canonical upstream name.
    pub fn canonical(self) -> &'static str {
        match self {
            Self::CloudNode => "cloud-node-controller",
            Self::CloudNodeLifecycle => "cloud-node-lifecycle-controller",
            Self::ServiceLb => "service-lb-controller",
            Self::NodeRoute => "node-route-controller",
        }
    }

    /// Upstream alias (never to be removed), also the `running_managed_controllers` name.
    pub fn alias(self) -> &'static str {
        match self {
            Self::CloudNode => "cloud-node",
            Self::CloudNodeLifecycle => "cloud-node-lifecycle",
            Self::ServiceLb => "service",
            Self::NodeRoute => "route",
        }
    }

    /// Source component of the events this controller emits.
    pub fn event_component(self) -> &'static str {
        match self {
            Self::CloudNode => "cloud-node-controller",
            Self::CloudNodeLifecycle => "cloud-node-lifecycle-controller",
            Self::ServiceLb => "service-controller",
            Self::NodeRoute => "route_controller",
        }
    }

    /// Whether a provider with these capabilities supports the controller.
    pub fn supported_by(self, capabilities: &[Capability]) -> bool {
        let has = |c| capabilities.contains(&c);
        match self {
            Self::CloudNode | Self::CloudNodeLifecycle => {
                has(Capability::InstancesV2) || has(Capability::Instances)
            }
            Self::ServiceLb => has(Capability::LoadBalancer),
            Self::NodeRoute => has(Capability::Routes),
        }
    }

    /// Looks a name or alias up.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.canonical() == name || c.alias() == name)
    }
}

/// An unknown name in `--controllers`.
#[derive(Debug, thiserror::Error)]
#[error(
    "--controllers: unknown controller {name:?}; known controllers: cloud-node-controller (cloud-node), cloud-node-lifecycle-controller (cloud-node-lifecycle), service-lb-controller (service), node-route-controller (route)"
)]
pub struct SelectionError {
    /// The offending entry.
    pub name: String,
}

/// The parsed `--controllers` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSelection {
    entries: Vec<(Option<ControllerName>, bool)>,
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
            let controller = ControllerName::from_name(name).ok_or_else(|| SelectionError {
                name: raw.to_string(),
            })?;
            entries.push((Some(controller), enabled));
        }
        Ok(Self { entries })
    }

    /// Upstream `IsControllerEnabled`: an explicit entry wins (first match), else `*` enables
    /// every on-by-default controller (all of them are on by default).
    pub fn is_enabled(&self, controller: ControllerName) -> bool {
        let mut star = false;
        for (name, enabled) in &self.entries {
            match name {
                Some(n) if *n == controller => return *enabled,
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
    use super::*;

    fn sel(values: &[&str]) -> ControllerSelection {
        ControllerSelection::parse(&values.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    #[test]
    fn names_follow_upstream_format() {
        for c in ControllerName::ALL {
            let name = c.canonical();
            assert!(name.ends_with("-controller"), "{name}");
            assert!(name.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-'));
            assert_eq!(ControllerName::from_name(c.alias()), Some(c));
        }
    }

    #[test]
    fn star_enables_all() {
        let s = sel(&["*"]);
        assert!(ControllerName::ALL.into_iter().all(|c| s.is_enabled(c)));
    }

    #[test]
    fn aliases_resolve_in_custom_list() {
        let s = sel(&["cloud-node", "-service", "*"]);
        assert!(s.is_enabled(ControllerName::CloudNode));
        assert!(!s.is_enabled(ControllerName::ServiceLb));
        assert!(s.is_enabled(ControllerName::NodeRoute));
    }

    #[test]
    fn explicit_list_without_star_enables_only_named() {
        let s = sel(&["cloud-node-controller"]);
        assert!(s.is_enabled(ControllerName::CloudNode));
        assert!(!s.is_enabled(ControllerName::CloudNodeLifecycle));
    }

    #[test]
    fn first_match_wins() {
        let s = sel(&["-route", "route"]);
        assert!(!s.is_enabled(ControllerName::NodeRoute));
    }

    #[test]
    fn capabilities_gate_controllers() {
        let caps = [Capability::InstancesV2];
        assert!(ControllerName::CloudNode.supported_by(&caps));
        assert!(ControllerName::CloudNodeLifecycle.supported_by(&caps));
        assert!(!ControllerName::ServiceLb.supported_by(&caps));
        assert!(!ControllerName::NodeRoute.supported_by(&caps));
    }
}
