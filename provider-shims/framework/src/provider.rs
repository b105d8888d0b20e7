//! What a provider says about itself, and the provider-ID ownership rule derived from it.

use cpi_proto::CpiError;

/// A provider's self-description; becomes `ProviderInfo` once the services are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDescription {
    /// Provider name; provider IDs are `"<name>://<instance-id>"`.
    pub name: String,
    /// Upstream `HasClusterID()`.
    pub has_cluster_id: bool,
    /// Provider-ID prefixes this shim owns; empty means `"<name>://"`.
    pub provider_id_prefixes: Vec<String>,
    /// Shim build version, for logs and metrics.
    pub shim_version: String,
    /// Whether callers should send the raw JSON of every object.
    pub wants_raw_objects: bool,
    /// CSI drivers whose volumes this shim labels (`ProviderInfo.csi_drivers`).
    pub csi_drivers: Vec<String>,
}

impl ProviderDescription {
    /// A description with the default prefix `"<name>://"`, no cluster ID and no raw objects.
    pub fn new(name: impl Into<String>, shim_version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            has_cluster_id: false,
            provider_id_prefixes: Vec::new(),
            shim_version: shim_version.into(),
            wants_raw_objects: false,
            csi_drivers: Vec::new(),
        }
    }

    /// Sets `has_cluster_id`.
    pub fn with_cluster_id(mut self, has_cluster_id: bool) -> Self {
        self.has_cluster_id = has_cluster_id;
        self
    }

    /// Replaces the owned provider-ID prefixes.
    pub fn with_provider_id_prefixes(mut self, prefixes: Vec<String>) -> Self {
        self.provider_id_prefixes = prefixes;
        self
    }

    /// Sets `wants_raw_objects`.
    pub fn with_raw_objects(mut self, wants_raw_objects: bool) -> Self {
        self.wants_raw_objects = wants_raw_objects;
        self
    }

    /// Replaces the CSI drivers whose volumes this shim labels.
    pub fn with_csi_drivers(mut self, drivers: Vec<String>) -> Self {
        self.csi_drivers = drivers;
        self
    }

    /// The prefixes actually owned: the configured ones, or `"<name>://"`.
    pub fn owned_prefixes(&self) -> Vec<String> {
        if self.provider_id_prefixes.is_empty() {
            vec![format!("{}://", self.name)]
        } else {
            self.provider_id_prefixes.clone()
        }
    }

    /// Strips the owning prefix: `Some(rest)` when this provider owns `provider_id`.
    pub fn strip_owned<'a>(&self, provider_id: &'a str) -> Option<&'a str> {
        cpi_proto::provider_id::strip_owned(&self.name, &self.provider_id_prefixes, provider_id)
    }

    /// Checks that `provider_id` (found at request field `field`) is well formed and ours.
    /// Foreign IDs are `NotOwned`, so a shim never answers, let alone acts, for another
    /// provider's machines (a wrong "not found" there would get the node deleted).
    pub fn check_owned(&self, field: &str, provider_id: &str) -> Result<(), CpiError> {
        if cpi_proto::provider_id::split(provider_id).is_none() {
            return Err(CpiError::InvalidObject {
                field: field.to_string(),
                message: format!("{provider_id:?} is not of the form <provider>://<instance-id>"),
            });
        }
        if self.strip_owned(provider_id).is_none() {
            return Err(CpiError::NotOwned(format!(
                "provider ID {provider_id:?} does not start with any of {:?} owned by provider {:?}",
                self.owned_prefixes(),
                self.name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_is_the_name() {
        let p = ProviderDescription::new("local", "1");
        assert_eq!(p.owned_prefixes(), vec!["local://".to_string()]);
        assert_eq!(p.strip_owned("local://m-1"), Some("m-1"));
        assert_eq!(p.strip_owned("aws://m-1"), None);
        assert_eq!(p.strip_owned("local://"), None);
        assert_eq!(p.strip_owned("localx://m-1"), None);
    }

    #[test]
    fn explicit_prefixes_replace_the_default() {
        let p = ProviderDescription::new("aws", "1")
            .with_provider_id_prefixes(vec!["aws:///eu-west-1".into()]);
        assert_eq!(p.strip_owned("aws:///eu-west-1a/i-1"), Some("a/i-1"));
        assert_eq!(p.strip_owned("aws:///us-east-1a/i-1"), None);
    }

    #[test]
    fn check_owned_tells_malformed_from_foreign() {
        let p = ProviderDescription::new("local", "1");
        assert!(p.check_owned("provider_id", "local://m").is_ok());
        assert!(matches!(
            p.check_owned("provider_id", "garbage"),
            Err(CpiError::InvalidObject { field, .. }) if field == "provider_id"
        ));
        assert!(matches!(
            p.check_owned("provider_id", "hcloud://1"),
            Err(CpiError::NotOwned(_))
        ));
        // A claimed prefix without `://` does not make a malformed ID acceptable.
        let claimed =
            ProviderDescription::new("local", "1").with_provider_id_prefixes(vec!["loc".into()]);
        assert!(claimed.check_owned("provider_id", "loc://m").is_ok());
        assert!(matches!(
            claimed.check_owned("provider_id", "local-m"),
            Err(CpiError::InvalidObject { .. })
        ));
    }
}
