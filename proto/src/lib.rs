//! The Cloud Provider Interface (`cloudprovider.v1`) as generated Rust types, plus its error
//! model: [`CpiError`] maps each upstream sentinel error and each safety class onto a gRPC status
//! carrying `google.rpc.ErrorInfo` / `google.rpc.RetryInfo` details, and back.
//!
//! The `.proto` file in `cloudprovider/v1/` is the language-neutral source of truth; read its
//! header for the evolution rules and the error table.

pub mod error;

/// Generated messages, clients and servers of `cloudprovider.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cloudprovider.v1");
}

pub use error::{CpiError, ERROR_DOMAIN};

/// Label keys and provider-ID helpers shared by every component.
pub mod provider_id {
    /// Splits `"<scheme>://<id>"` into its scheme and ID; `None` for anything else (no scheme,
    /// empty scheme or empty ID), so malformed IDs are rejected per node, never process-wide.
    pub fn split(provider_id: &str) -> Option<(&str, &str)> {
        let (scheme, id) = provider_id.split_once("://")?;
        if scheme.is_empty() || id.is_empty() {
            return None;
        }
        Some((scheme, id))
    }

    /// Builds `"<provider>://<instance-id>"`, the upstream provider-ID convention.
    pub fn join(provider: &str, instance_id: &str) -> String {
        format!("{provider}://{instance_id}")
    }

    /// The ownership rule every component applies: the instance part of `provider_id` when it
    /// belongs to the provider `name` claiming the prefixes `claimed` (none claimed means
    /// `"<name>://"`), with something after the prefix. Empty claimed prefixes own nothing.
    pub fn strip_owned<'a>(
        name: &str,
        claimed: &[String],
        provider_id: &'a str,
    ) -> Option<&'a str> {
        if claimed.is_empty() {
            let (scheme, rest) = split(provider_id)?;
            return (scheme == name).then_some(rest);
        }
        claimed
            .iter()
            .filter(|prefix| !prefix.is_empty())
            .find_map(|prefix| provider_id.strip_prefix(prefix.as_str()))
            .filter(|rest| !rest.is_empty())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn split_accepts_scheme_and_id() {
            assert_eq!(split("local://m-1"), Some(("local", "m-1")));
            assert_eq!(
                split("aws:///us-east-1a/i-1"),
                Some(("aws", "/us-east-1a/i-1"))
            );
        }

        #[test]
        fn split_rejects_malformed_ids() {
            for bad in ["", "local", "local://", "://x", "aws", "local:/x"] {
                assert_eq!(split(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn ownership_by_name_or_claimed_prefixes() {
            let none: &[String] = &[];
            assert_eq!(strip_owned("local", none, "local://m-1"), Some("m-1"));
            assert_eq!(strip_owned("local", none, "local://"), None);
            assert_eq!(strip_owned("local", none, "localhost://x"), None);
            let claimed = [
                "hcloud://".to_string(),
                "hrobot://".to_string(),
                String::new(),
            ];
            assert_eq!(strip_owned("hcloud", &claimed, "hrobot://42"), Some("42"));
            assert_eq!(strip_owned("hcloud", &claimed, "hrobot://"), None);
            assert_eq!(strip_owned("hcloud", &claimed, "talos://x"), None);
        }

        #[test]
        fn join_builds_upstream_form() {
            assert_eq!(join("fake", "12345"), "fake://12345");
        }
    }
}
