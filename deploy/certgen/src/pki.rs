//! Making and reading certificates: an ECDSA P-256 CA and the leaf certificates it signs
//! (rcgen), and what the plan needs to know about a certificate found in a Secret (x509-parser).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What went wrong making or reading a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("{context}: {source}")]
    Rcgen {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM block or certificate could not be parsed.
    #[error("{0}")]
    Parse(String),
    /// A validity window ends before it starts or lies before 1970.
    #[error("invalid validity window: {0}")]
    Validity(String),
}

fn rcgen_err(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let context = context.into();
    move |source| PkiError::Rcgen { context, source }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (extended key usage `serverAuth`).
    Server,
    /// A TLS client (extended key usage `clientAuth`).
    Client,
}

/// A certificate authority whose key is at hand: it signs leaves.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key, PEM.
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A freshly issued leaf certificate and its key.
#[derive(Clone)]
pub struct IssuedLeaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedLeaf")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Sets `params`' validity; X.509 has one-second resolution.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), PkiError> {
    let since_epoch = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_err(|_| PkiError::Validity(format!("{t:?} is before 1970")))
    };
    let (from, until) = (since_epoch(not_before)?, since_epoch(not_after)?);
    if until <= from {
        return Err(PkiError::Validity(format!(
            "{not_before:?} .. {not_after:?} is empty"
        )));
    }
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(from.as_secs());
    params.not_after = epoch + Duration::from_secs(until.as_secs());
    Ok(())
}

impl Ca {
    /// A new self-signed CA named `name`, valid from `not_before` to `not_after`.
    pub fn generate(
        name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, not_before, not_after)?;
        let key = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err(format!("self-signing the CA {name:?}")))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored as `cert_pem` (its first certificate) and `key_pem`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("reading the CA key"))?;
        let first = pem_certificates(cert_pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Parse("no certificate in the CA's tls.crt".into()))?;
        if !key_matches(&first, key_pem) {
            return Err(PkiError::Parse(
                "the CA's tls.key is not the key of its tls.crt".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&first.into(), key)
            .map_err(rcgen_err("reading the CA certificate"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// A leaf for `names` (DNS names; the first is also the common name) and `usage`.
    pub fn issue(
        &self,
        names: &[String],
        usage: Usage,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedLeaf, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| {
                n.as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(rcgen_err(format!("DNS name {n:?}")))
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after)?;
        let key = KeyPair::generate().map_err(rcgen_err("generating a leaf key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(format!("signing the certificate for {names:?}")))?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The DER certificates of the `CERTIFICATE` blocks in `pem`, in order.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| PkiError::Parse(format!("bad PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

/// What the plan reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Its DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// Whether it is a CA (basicConstraints cA).
    pub is_ca: bool,
    /// Its extended key usages, as [`Usage`]s.
    pub usages: Vec<Usage>,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::Parse(format!("bad certificate: {e}")))
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

/// Reads what the plan needs from the DER certificate `der`.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let cert = parse(der)?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(PkiError::Parse(format!("bad subjectAltName: {e}"))),
    };
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let usages = match cert.extended_key_usage() {
        Ok(Some(eku)) => [
            (eku.value.server_auth, Usage::Server),
            (eku.value.client_auth, Usage::Client),
        ]
        .into_iter()
        .filter_map(|(set, usage)| set.then_some(usage))
        .collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        not_before: system_time(cert.validity().not_before),
        not_after: system_time(cert.validity().not_after),
        dns_names,
        is_ca,
        usages,
    })
}

/// Whether `ca_der`'s key signed `leaf_der`.
pub fn signed_by(leaf_der: &[u8], ca_der: &[u8]) -> bool {
    match (parse(leaf_der), parse(ca_der)) {
        (Ok(leaf), Ok(ca)) => leaf.verify_signature(Some(ca.public_key())).is_ok(),
        _ => false,
    }
}

/// Whether `key_pem` is the private key of the DER certificate `cert_der`.
pub fn key_matches(cert_der: &[u8], key_pem: &str) -> bool {
    match (parse(cert_der), KeyPair::from_pem(key_pem)) {
        (Ok(cert), Ok(key)) => cert.public_key().raw == key.subject_public_key_info().as_slice(),
        _ => false,
    }
}
