//! `ccm-certgen`: certificates for the stack without cert-manager. One run makes the CA Secret
//! and the leaf Secrets (type `kubernetes.io/tls`, with `ca.crt`) that are missing, unreadable,
//! for other names, not from a trusted CA or near their end, keeps every other one as it is (so
//! running pods keep theirs), and sets the webhook configurations' caBundle. Decisions are pure
//! functions of the Secrets and `now` ([`decide_ca`], [`decide_leaf`], [`ca_bundle_patch`]);
//! [`run`] does the API calls.

mod apply;
mod pki;
mod plan;

pub use apply::{Config, MANAGED_BY, RunError, Summary, run};
pub use pki::{
    Ca, CertInfo, IssuedLeaf, PkiError, Usage, cert_info, key_matches, pem_certificates, signed_by,
};
pub use plan::{
    CaAction, LeafAction, LeafSpec, Policy, TlsData, Unusable, ca_bundle_patch, decide_ca,
    decide_leaf, leaf_validity,
};
