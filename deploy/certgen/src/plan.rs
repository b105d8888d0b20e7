//! The decisions, as pure functions of what the Secrets hold and `now`: whether the CA is kept,
//! replaced or its trusted bundle pruned; whether each leaf is kept, re-issued or only given the
//! new bundle; and the JSON patch that sets the webhook configurations' caBundle.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::pki::{self, Usage};

/// Lifetimes and the renewal window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A leaf is re-issued once it has less than this left (`--renew-before`).
    pub renew_before: Duration,
    /// Lifetime of a new leaf (`--leaf-lifetime`), cut at its CA's end.
    pub leaf_lifetime: Duration,
    /// Lifetime of a new CA (`--ca-lifetime`).
    pub ca_lifetime: Duration,
    /// How far back a new certificate's validity starts, for clock skew between machines.
    pub backdate: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Policy {
            renew_before: Duration::from_secs(30 * DAY),
            leaf_lifetime: Duration::from_secs(365 * DAY),
            ca_lifetime: Duration::from_secs(10 * 365 * DAY),
            backdate: Duration::from_secs(60 * 60),
        }
    }
}

impl Policy {
    /// A CA is replaced once it has less than this left: a leaf issued just before still
    /// expires before it (leaves never outlive their CA), and the new CA has been in every
    /// ca.crt for a whole leaf lifetime by the time the old one ends.
    pub fn ca_renew_before(&self) -> Duration {
        self.leaf_lifetime + self.renew_before
    }
}

/// One leaf certificate to keep in a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// The Secret's name.
    pub secret: String,
    /// Its DNS names; the first is also the subject's common name.
    pub names: Vec<String>,
    /// Server or client.
    pub usage: Usage,
}

/// The parts of a Secret the plan reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsData {
    /// `tls.crt`.
    pub tls_crt: Option<Vec<u8>>,
    /// `tls.key`.
    pub tls_key: Option<Vec<u8>>,
    /// `ca.crt`.
    pub ca_crt: Option<Vec<u8>>,
    /// Whether ccm-certgen made it (its `app.kubernetes.io/managed-by` label).
    pub managed: bool,
}

/// Why a Secret is left alone and the run fails rather than replace it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("secret {secret}: {reason}; delete it to have ccm-certgen make a new one")]
pub struct Unusable {
    /// The Secret.
    pub secret: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What to do about the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaAction {
    /// Sign with the stored CA; its ca.crt is right.
    Keep,
    /// Make a new CA, because of `reason`; `still_trusted` (DER) are older CA certificates
    /// that stay in every ca.crt until they expire.
    New {
        /// Why.
        reason: String,
        /// Older CAs still trusted.
        still_trusted: Vec<Vec<u8>>,
    },
    /// Keep the CA, but its ca.crt should be `trusted` (DER, the CA first): an older CA
    /// expired.
    Bundle {
        /// The certificates ca.crt should hold.
        trusted: Vec<Vec<u8>>,
    },
}

fn remaining(not_after: SystemTime, now: SystemTime) -> Duration {
    not_after.duration_since(now).unwrap_or(Duration::ZERO)
}

/// The CA certificates of `bundle_pem` other than `current` that are still valid at `now`.
fn still_trusted(
    bundle_pem: Option<&[u8]>,
    current: Option<&[u8]>,
    now: SystemTime,
) -> Vec<Vec<u8>> {
    let Some(Ok(certs)) = bundle_pem.map(pki::pem_certificates) else {
        return Vec::new();
    };
    certs
        .into_iter()
        .filter(|der| Some(der.as_slice()) != current)
        .filter(|der| matches!(pki::cert_info(der), Ok(info) if info.is_ca && info.not_after > now))
        .collect()
}

/// Decides about the CA Secret `secret`, found as `found`.
pub fn decide_ca(
    secret: &str,
    found: Option<&TlsData>,
    now: SystemTime,
    policy: &Policy,
) -> Result<CaAction, Unusable> {
    let Some(found) = found else {
        return Ok(CaAction::New {
            reason: "no CA yet".into(),
            still_trusted: Vec::new(),
        });
    };
    let unusable = |reason: &str| Unusable {
        secret: secret.to_owned(),
        reason: reason.to_owned(),
    };
    let (Some(crt), Some(key)) = (&found.tls_crt, &found.tls_key) else {
        return Err(unusable("no tls.crt or tls.key"));
    };
    let der = pki::pem_certificates(crt)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .ok_or_else(|| unusable("tls.crt holds no certificate"))?;
    let info = pki::cert_info(&der).map_err(|e| unusable(&e.to_string()))?;
    if !info.is_ca {
        return Err(unusable("tls.crt is not a CA certificate"));
    }
    let key = std::str::from_utf8(key).map_err(|_| unusable("tls.key is not PEM"))?;
    if !pki::key_matches(&der, key) {
        return Err(unusable("tls.key is not the key of tls.crt"));
    }
    let others = still_trusted(found.ca_crt.as_deref(), Some(&der), now);
    let left = remaining(info.not_after, now);
    if left < policy.ca_renew_before() {
        let mut still = others;
        if info.not_after > now {
            still.insert(0, der);
        }
        return Ok(CaAction::New {
            reason: format!("the CA has {}s left", left.as_secs()),
            still_trusted: still,
        });
    }
    let mut trusted = vec![der];
    trusted.extend(others);
    let stored = found
        .ca_crt
        .as_deref()
        .and_then(|b| pki::pem_certificates(b).ok());
    if stored.as_ref() == Some(&trusted) {
        Ok(CaAction::Keep)
    } else {
        Ok(CaAction::Bundle { trusted })
    }
}

/// What to do about one leaf Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafAction {
    /// It is right as it is.
    Keep,
    /// Its certificate is good, but its ca.crt is not the current bundle: replace only that.
    Bundle,
    /// Issue a new certificate and key, because of the reason given.
    Issue(String),
    /// Another party made it (no managed-by label): left alone.
    Foreign,
}

/// Decides about the leaf Secret of `spec`, found as `found`, with `trusted` (DER) the CA
/// certificates every ca.crt holds (as `bundle_pem`).
pub fn decide_leaf(
    spec: &LeafSpec,
    found: Option<&TlsData>,
    trusted: &[Vec<u8>],
    bundle_pem: &[u8],
    now: SystemTime,
    policy: &Policy,
) -> LeafAction {
    let Some(found) = found else {
        return LeafAction::Issue("missing".into());
    };
    if !found.managed {
        return LeafAction::Foreign;
    }
    let issue = |reason: &str| LeafAction::Issue(reason.to_owned());
    let (Some(crt), Some(key)) = (&found.tls_crt, &found.tls_key) else {
        return issue("no tls.crt or tls.key");
    };
    let Some(der) = pki::pem_certificates(crt)
        .ok()
        .and_then(|certs| certs.into_iter().next())
    else {
        return issue("tls.crt holds no certificate");
    };
    let info = match pki::cert_info(&der) {
        Ok(info) => info,
        Err(e) => return issue(&e.to_string()),
    };
    if !std::str::from_utf8(key).is_ok_and(|key| pki::key_matches(&der, key)) {
        return issue("tls.key is not the key of tls.crt");
    }
    let (mut have, mut want) = (info.dns_names.clone(), spec.names.clone());
    have.sort();
    want.sort();
    if have != want {
        return issue(&format!("names {have:?}, wanted {want:?}"));
    }
    if !info.usages.contains(&spec.usage) {
        return issue(&format!("not for {:?} use", spec.usage));
    }
    if !trusted.iter().any(|ca| pki::signed_by(&der, ca)) {
        return issue("not signed by a trusted CA");
    }
    let left = remaining(info.not_after, now);
    if left < policy.renew_before {
        return issue(&format!("{}s left", left.as_secs()));
    }
    if found.ca_crt.as_deref() != Some(bundle_pem) {
        return LeafAction::Bundle;
    }
    LeafAction::Keep
}

/// The validity of a new leaf signed by a CA that ends at `ca_not_after`: it never outlives it.
pub fn leaf_validity(
    now: SystemTime,
    ca_not_after: SystemTime,
    policy: &Policy,
) -> (SystemTime, SystemTime) {
    (
        now - policy.backdate,
        (now + policy.leaf_lifetime).min(ca_not_after),
    )
}

/// The JSON patch that sets the caBundle of every webhook of the webhook configuration
/// `config` (as JSON) that does not have `ca_bundle_b64` already, or `None` if all have it.
/// Each change is guarded by a `test` of the webhook's name, so a configuration reordered
/// meanwhile is refused rather than given the bundle in the wrong place.
pub fn ca_bundle_patch(config: &Value, ca_bundle_b64: &str) -> Option<Value> {
    let webhooks = config["webhooks"].as_array()?;
    let ops: Vec<Value> = webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| w["clientConfig"]["caBundle"].as_str() != Some(ca_bundle_b64))
        .flat_map(|(i, w)| {
            [
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w["name"]}),
                json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                       "value": ca_bundle_b64}),
            ]
        })
        .collect();
    (!ops.is_empty()).then_some(Value::Array(ops))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::pki::Ca;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn policy() -> Policy {
        Policy::default()
    }

    fn ca(now: SystemTime, name: &str, lifetime: Duration) -> Ca {
        Ca::generate(name, now - DAY, now + lifetime).unwrap()
    }

    fn der(pem: &str) -> Vec<u8> {
        pki::pem_certificates(pem.as_bytes()).unwrap().remove(0)
    }

    fn ca_secret(ca: &Ca, bundle: &str) -> TlsData {
        TlsData {
            tls_crt: Some(ca.cert_pem.clone().into_bytes()),
            tls_key: Some(ca.key_pem.clone().into_bytes()),
            ca_crt: Some(bundle.as_bytes().to_vec()),
            managed: true,
        }
    }

    fn spec() -> LeafSpec {
        LeafSpec {
            secret: "local-shim-tls".into(),
            names: vec!["local-shim.kube-system.svc".into()],
            usage: Usage::Server,
        }
    }

    fn leaf_secret(ca: &Ca, spec: &LeafSpec, until: SystemTime, bundle: &str) -> TlsData {
        let now = SystemTime::now();
        let leaf = ca.issue(&spec.names, spec.usage, now - DAY, until).unwrap();
        TlsData {
            tls_crt: Some(leaf.cert_pem.into_bytes()),
            tls_key: Some(leaf.key_pem.into_bytes()),
            ca_crt: Some(bundle.as_bytes().to_vec()),
            managed: true,
        }
    }

    #[test]
    fn missing_ca_is_made() {
        let action = decide_ca("ca", None, SystemTime::now(), &policy()).unwrap();
        assert!(matches!(action, CaAction::New { still_trusted, .. } if still_trusted.is_empty()));
    }

    #[test]
    fn valid_ca_is_kept() {
        let now = SystemTime::now();
        let ca = ca(now, "ca", 10 * 365 * DAY);
        let found = ca_secret(&ca, &ca.cert_pem);
        assert_eq!(
            decide_ca("ca", Some(&found), now, &policy()),
            Ok(CaAction::Keep)
        );
    }

    #[test]
    fn ca_near_expiry_is_replaced_and_stays_trusted() {
        let now = SystemTime::now();
        // Less than a leaf lifetime plus the renewal window left.
        let old = ca(now, "old", 300 * DAY);
        let found = ca_secret(&old, &old.cert_pem);
        let Ok(CaAction::New { still_trusted, .. }) = decide_ca("ca", Some(&found), now, &policy())
        else {
            panic!("a CA with 300 days left must be replaced");
        };
        assert_eq!(still_trusted, vec![der(&old.cert_pem)]);
    }

    #[test]
    fn expired_ca_in_the_bundle_is_pruned() {
        let now = SystemTime::now();
        let current = ca(now, "current", 10 * 365 * DAY);
        let expired = Ca::generate("expired", now - 3 * DAY, now - DAY).unwrap();
        let found = ca_secret(
            &current,
            &format!("{}{}", current.cert_pem, expired.cert_pem),
        );
        assert_eq!(
            decide_ca("ca", Some(&found), now, &policy()),
            Ok(CaAction::Bundle {
                trusted: vec![der(&current.cert_pem)]
            })
        );
    }

    #[test]
    fn unusable_ca_is_not_replaced() {
        let now = SystemTime::now();
        let a = ca(now, "a", 10 * 365 * DAY);
        let b = ca(now, "b", 10 * 365 * DAY);
        let mut found = ca_secret(&a, &a.cert_pem);
        found.tls_key = Some(b.key_pem.into_bytes());
        let err = decide_ca("ccm-certgen-ca", Some(&found), now, &policy()).unwrap_err();
        assert!(err.to_string().contains("ccm-certgen-ca"), "{err}");
        assert!(err.to_string().contains("not the key"), "{err}");
    }

    #[test]
    fn leaf_decisions() {
        let now = SystemTime::now();
        let ca = ca(now, "ca", 10 * 365 * DAY);
        let trusted = vec![der(&ca.cert_pem)];
        let bundle = ca.cert_pem.as_bytes();
        let p = policy();
        let decide =
            |found: Option<&TlsData>| decide_leaf(&spec(), found, &trusted, bundle, now, &p);

        assert!(matches!(decide(None), LeafAction::Issue(_)));
        // Idempotence: a valid certificate is kept, however often it is looked at.
        let fresh = leaf_secret(&ca, &spec(), now + 365 * DAY, &ca.cert_pem);
        assert_eq!(decide(Some(&fresh)), LeafAction::Keep);
        assert_eq!(decide(Some(&fresh)), LeafAction::Keep);
        // Near expiry: inside --renew-before.
        let near = leaf_secret(&ca, &spec(), now + 29 * DAY, &ca.cert_pem);
        assert!(matches!(decide(Some(&near)), LeafAction::Issue(r) if r.contains("left")));
        let outside = leaf_secret(&ca, &spec(), now + 31 * DAY, &ca.cert_pem);
        assert_eq!(decide(Some(&outside)), LeafAction::Keep);
        // Other names.
        let mut other = spec();
        other.names = vec!["elsewhere.svc".into()];
        let renamed = leaf_secret(&ca, &other, now + 365 * DAY, &ca.cert_pem);
        assert!(matches!(decide(Some(&renamed)), LeafAction::Issue(r) if r.contains("names")));
        // A client certificate where a server one is wanted.
        other = spec();
        other.usage = Usage::Client;
        let client = leaf_secret(&ca, &other, now + 365 * DAY, &ca.cert_pem);
        assert!(matches!(decide(Some(&client)), LeafAction::Issue(_)));
        // Signed by a CA that is not trusted.
        let stranger = Ca::generate("stranger", now - DAY, now + 3650 * DAY).unwrap();
        let foreign_ca = leaf_secret(&stranger, &spec(), now + 365 * DAY, &ca.cert_pem);
        assert!(matches!(decide(Some(&foreign_ca)), LeafAction::Issue(r) if r.contains("trusted")));
        // The key of another certificate.
        let mut swapped = fresh.clone();
        swapped.tls_key = near.tls_key.clone();
        assert!(matches!(decide(Some(&swapped)), LeafAction::Issue(r) if r.contains("key")));
        // Only the bundle is outdated: the certificate and key stay.
        let mut old_bundle = fresh.clone();
        old_bundle.ca_crt = Some(stranger.cert_pem.clone().into_bytes());
        assert_eq!(decide(Some(&old_bundle)), LeafAction::Bundle);
        // Not made by ccm-certgen: never touched.
        let mut theirs = near.clone();
        theirs.managed = false;
        assert_eq!(decide(Some(&theirs)), LeafAction::Foreign);
    }

    #[test]
    fn leaf_signed_by_the_previous_ca_is_kept_during_rotation() {
        let now = SystemTime::now();
        let old = ca(now, "old", 300 * DAY);
        let new = ca(now, "new", 3650 * DAY);
        let trusted = vec![der(&new.cert_pem), der(&old.cert_pem)];
        let bundle = format!("{}{}", new.cert_pem, old.cert_pem);
        let leaf = leaf_secret(&old, &spec(), now + 200 * DAY, &bundle);
        assert_eq!(
            decide_leaf(
                &spec(),
                Some(&leaf),
                &trusted,
                bundle.as_bytes(),
                now,
                &policy()
            ),
            LeafAction::Keep
        );
    }

    #[test]
    fn leaf_never_outlives_its_ca() {
        let now = SystemTime::now();
        let (from, until) = leaf_validity(now, now + 10 * DAY, &policy());
        assert_eq!(until, now + 10 * DAY);
        assert!(from < now);
        let (_, until) = leaf_validity(now, now + 3650 * DAY, &policy());
        assert_eq!(until, now + policy().leaf_lifetime);
    }

    #[test]
    fn ca_bundle_patch_sets_only_missing_bundles() {
        let config = json!({"webhooks": [
            {"name": "a", "clientConfig": {"caBundle": "Q0E="}},
            {"name": "b", "clientConfig": {}},
        ]});
        let patch = ca_bundle_patch(&config, "Q0E=").unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "b"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Q0E="},
            ])
        );
        let done = json!({"webhooks": [{"name": "a", "clientConfig": {"caBundle": "Q0E="}}]});
        assert_eq!(ca_bundle_patch(&done, "Q0E="), None);
    }
}
