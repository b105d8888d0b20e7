//! Throwaway certificate authorities and leaf certificates for mTLS tests.
//!
//! Everything here is for tests only: keys are ECDSA P-256, generated fresh for every
//! certificate, and leave the process only through files written into a [`Pki`] temp directory
//! (removed when the [`Pki`] is dropped).
//!
//! ```no_run
//! # fn main() -> Result<(), test_pki::Error> {
//! let ca = test_pki::Ca::new("provider-ca")?;
//! let server = ca.issue(&["localhost", "127.0.0.1", "spiffe://ccm/provider"])?;
//! let pki = test_pki::Pki::new()?;
//! let files = pki.write_tls_files("server", &server, ca.cert_pem())?;
//! // ... start a server on files.cert / files.key / files.ca, later rotate atomically:
//! files.rotate(&ca.issue(&["localhost"])?, ca.cert_pem())?;
//! # Ok(())
//! # }
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// How far back default validity windows start, to tolerate clock skew between processes.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Default lifetime of a leaf certificate.
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Default lifetime of a CA certificate.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// One day, for the validity windows of expired and not-yet-valid certificates.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Errors from generating certificates or writing them to disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed ({context}): {source}")]
    Rcgen {
        /// What was being generated.
        context: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A subject alternative name is not representable (e.g. a non-ASCII DNS name).
    #[error("invalid subject alternative name {san:?}: {source}")]
    InvalidSan {
        /// The offending SAN as given.
        san: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A validity window is empty or starts before the Unix epoch.
    #[error("invalid validity window {not_before:?} .. {not_after:?}")]
    InvalidValidity {
        /// Requested start of validity.
        not_before: SystemTime,
        /// Requested end of validity.
        not_after: SystemTime,
    },
    /// More subject organizations than rcgen can encode (two).
    #[error("{0} subject organizations requested; at most two are supported")]
    TooManyOrganizations(usize),
    /// Reading or writing a file failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn rcgen_err(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let context = context.into();
    move |source| Error::Rcgen { context, source }
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        context,
        path,
        source,
    }
}

/// Sets `params`' validity window; X.509 has one-second resolution, so sub-seconds are dropped.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), Error> {
    let invalid = || Error::InvalidValidity {
        not_before,
        not_after,
    };
    let from = not_before
        .duration_since(UNIX_EPOCH)
        .map_err(|_| invalid())?;
    let until = not_after
        .duration_since(UNIX_EPOCH)
        .map_err(|_| invalid())?;
    if until <= from {
        return Err(invalid());
    }
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(from.as_secs());
    params.not_after = epoch + Duration::from_secs(until.as_secs());
    Ok(())
}

/// Classifies one SAN: IP literal, `spiffe://` (or any `scheme://`) URI, else DNS name.
fn san_type(san: &str) -> Result<SanType, Error> {
    let invalid = |source| Error::InvalidSan {
        san: san.to_owned(),
        source,
    };
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if san.contains("://") {
        return Ok(SanType::URI(san.try_into().map_err(invalid)?));
    }
    Ok(SanType::DnsName(san.try_into().map_err(invalid)?))
}

/// What to put into a leaf certificate; build with [`LeafSpec::new`] and the setters.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject alternative names: IP literals, `spiffe://…` URIs, or DNS names.
    pub sans: Vec<String>,
    /// Subject common name; defaults to the first SAN (Kubernetes reads it as the user name).
    pub common_name: Option<String>,
    /// Subject organizations, at most two (Kubernetes reads them as group names).
    pub organizations: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether the `serverAuth` extended key usage is set.
    pub server_auth: bool,
    /// Whether the `clientAuth` extended key usage is set.
    pub client_auth: bool,
}

impl LeafSpec {
    /// A spec valid from an hour ago for a year, usable for both server and client auth.
    pub fn new(sans: &[&str]) -> Self {
        let now = SystemTime::now();
        LeafSpec {
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            common_name: None,
            organizations: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + LEAF_LIFETIME,
            server_auth: true,
            client_auth: true,
        }
    }

    /// Sets the subject common name.
    pub fn common_name(mut self, cn: &str) -> Self {
        self.common_name = Some(cn.to_owned());
        self
    }

    /// Adds a subject organization.
    pub fn organization(mut self, org: &str) -> Self {
        self.organizations.push(org.to_owned());
        self
    }

    /// Sets the validity window.
    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Restricts the extended key usage to `serverAuth`.
    pub fn server_only(mut self) -> Self {
        self.server_auth = true;
        self.client_auth = false;
        self
    }

    /// Restricts the extended key usage to `clientAuth`.
    pub fn client_only(mut self) -> Self {
        self.server_auth = false;
        self.client_auth = true;
        self
    }
}

/// An issued leaf certificate with its private key.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// The leaf certificate followed by any intermediate CAs (not the root), PEM.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// A throwaway certificate authority (root or intermediate) that issues leaves.
pub struct Ca {
    name: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    /// This CA's certificate followed by its parents', excluding the root; empty for a root.
    intermediates_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn ca_params(name: &str) -> Result<CertificateParams, Error> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + CA_LIFETIME)?;
    Ok(params)
}

impl Ca {
    /// A new self-signed root CA whose subject common name is `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Ca, Error> {
        let params = ca_params(name)?;
        let key = KeyPair::generate().map_err(rcgen_err("CA key"))?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err(format!("self-signing CA {name:?}")))?;
        Ok(Ca {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            intermediates_pem: String::new(),
        })
    }

    /// A new intermediate CA named `name`, signed by this CA.
    pub fn intermediate(&self, name: &str) -> Result<Ca, Error> {
        let params = ca_params(name)?;
        let key = KeyPair::generate().map_err(rcgen_err("intermediate CA key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(format!("signing intermediate CA {name:?}")))?;
        let cert_pem = cert.pem();
        Ok(Ca {
            name: name.to_owned(),
            intermediates_pem: format!("{cert_pem}{}", self.intermediates_pem),
            cert_pem,
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's subject common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificate, PEM (what a peer puts in its trust bundle).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM (for servers that sign with it, e.g. a CSR signer).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A leaf valid now for one year, for server and client auth, with the given SANs.
    ///
    /// SANs that parse as IP addresses become IP SANs, ones containing `://` (such as
    /// `spiffe://…`) become URI SANs, the rest DNS SANs.
    pub fn issue(&self, sans: &[&str]) -> Result<Leaf, Error> {
        self.issue_with(&LeafSpec::new(sans))
    }

    /// A leaf whose validity ended yesterday (it started two days ago).
    pub fn issue_expired(&self, sans: &[&str]) -> Result<Leaf, Error> {
        let now = SystemTime::now();
        self.issue_with(&LeafSpec::new(sans).valid(now - 2 * DAY, now - DAY))
    }

    /// A leaf whose validity starts tomorrow.
    pub fn issue_not_yet_valid(&self, sans: &[&str]) -> Result<Leaf, Error> {
        let now = SystemTime::now();
        self.issue_with(&LeafSpec::new(sans).valid(now + DAY, now + 2 * DAY))
    }

    /// A client-auth-only leaf for a Kubernetes identity: CN = `user`, O = each of `groups` (≤ 2).
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<Leaf, Error> {
        let spec = groups.iter().fold(
            LeafSpec::new(&[]).common_name(user).client_only(),
            |s, g| s.organization(g),
        );
        self.issue_with(&spec)
    }

    /// A leaf built from a full [`LeafSpec`].
    pub fn issue_with(&self, spec: &LeafSpec) -> Result<Leaf, Error> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err("leaf parameters"))?;
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|s| san_type(s))
            .collect::<Result<_, _>>()?;
        params.distinguished_name = leaf_dn(spec)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = Vec::new();
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, spec.not_before, spec.not_after)?;
        let key = KeyPair::generate().map_err(rcgen_err("leaf key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(format!("signing leaf {:?}", spec.sans)))?;
        let cert_pem = cert.pem();
        Ok(Leaf {
            chain_pem: format!("{cert_pem}{}", self.intermediates_pem),
            cert_pem,
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// Builds a leaf's subject: CN, then one `O` attribute per organization (at most two).
fn leaf_dn(spec: &LeafSpec) -> Result<DistinguishedName, Error> {
    let mut dn = DistinguishedName::new();
    let cn = spec
        .common_name
        .clone()
        .or_else(|| spec.sans.first().cloned())
        .unwrap_or_else(|| "test-leaf".to_owned());
    dn.push(DnType::CommonName, cn);
    match spec.organizations.as_slice() {
        [] => {}
        [one] => dn.push(DnType::OrganizationName, one.as_str()),
        // rcgen keeps one value per attribute type; a custom type with the organizationName OID
        // (2.5.4.10) is a second key that encodes as a second `O` attribute, which Go's
        // crypto/x509 (and so Kubernetes) collects into Subject.Organization.
        [first, second] => {
            dn.push(DnType::OrganizationName, first.as_str());
            dn.push(DnType::CustomDnType(vec![2, 5, 4, 10]), second.as_str());
        }
        more => return Err(Error::TooManyOrganizations(more.len())),
    }
    Ok(dn)
}

/// Concatenates the certificates of several CAs into one trust bundle (e.g. old + new CA).
pub fn ca_bundle(cas: &[&Ca]) -> String {
    cas.iter().map(|ca| ca.cert_pem()).collect()
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `path` atomically: a temp file in the same directory, then `rename`.
///
/// Readers see either the old or the new contents, never a mix. `private` sets mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_new(&tmp, contents, private)
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("renaming into place", path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err("creating", path))?;
    file.write_all(contents).map_err(io_err("writing", path))?;
    file.sync_all().map_err(io_err("syncing", path))
}

/// Overwrites `path` in place (same inode: truncate, then write), unlike [`write_atomic`].
///
/// For rotation tests against watchers that follow an inode rather than a directory entry.
pub fn rewrite_in_place(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("opening for rewrite", path))?;
    file.write_all(contents).map_err(io_err("writing", path))?;
    file.sync_all().map_err(io_err("syncing", path))
}

/// Paths of a certificate chain, its private key and a CA bundle written by [`Pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The leaf certificate chain (leaf first), PEM.
    pub cert: PathBuf,
    /// The private key, PKCS#8 PEM, mode 0600.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Atomically replaces the three files with a new leaf and bundle (key first, then cert, then CA).
    pub fn rotate(&self, leaf: &Leaf, ca_bundle_pem: &str) -> Result<(), Error> {
        write_atomic(&self.key, leaf.key_pem.as_bytes(), true)?;
        write_atomic(&self.cert, leaf.chain_pem.as_bytes(), false)?;
        write_atomic(&self.ca, ca_bundle_pem.as_bytes(), false)
    }
}

/// A temp directory holding PKI files; removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Creates a fresh temp directory.
    pub fn new() -> Result<Pki, Error> {
        let dir = tempfile::Builder::new()
            .prefix("ccm-test-pki-")
            .tempdir()
            .map_err(io_err("creating temp dir in", &std::env::temp_dir()))?;
        Ok(Pki { dir })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Atomically writes `contents` to `name` inside the directory and returns the path.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf, Error> {
        let path = self.dir.path().join(name);
        write_atomic(&path, contents, false)?;
        Ok(path)
    }

    /// Writes `<prefix>.crt` (chain), `<prefix>.key` and `<prefix>-ca.crt` atomically.
    pub fn write_tls_files(
        &self,
        prefix: &str,
        leaf: &Leaf,
        ca_bundle_pem: &str,
    ) -> Result<TlsFiles, Error> {
        let dir = self.dir.path();
        let files = TlsFiles {
            cert: dir.join(format!("{prefix}.crt")),
            key: dir.join(format!("{prefix}.key")),
            ca: dir.join(format!("{prefix}-ca.crt")),
        };
        files.rotate(leaf, ca_bundle_pem)?;
        Ok(files)
    }
}
