//! Reloadable rustls configurations for both sides of an mTLS connection, and for a server that
//! does not ask for client certificates (HTTPS endpoints such as a secure health port).
//!
//! [`ServerTls`], [`ClientTls`] and [`ServingTls`] each hold a complete rustls configuration behind an
//! `RwLock<Arc<..>>`. Every new handshake takes the configuration that is current at that moment;
//! established connections keep the configuration they were made with, so a rotation never drops
//! a connection or an in-flight call.
//!
//! A background thread re-reads the certificate, key and (where there is one) CA files every `reload_interval` and
//! rebuilds the configuration when their *contents* change. Contents rather than mtimes are
//! compared because Kubernetes Secret volumes swap a `..data` symlink (so the path's own metadata
//! may not move) and because two writes within one mtime tick must not be missed. When the new
//! files do not form valid material (half-written file, key not matching the certificate, empty
//! CA bundle) the previous configuration stays in use, a warning is logged, and the files are
//! tried again on the next poll. The thread exits as soon as the last handle is dropped.
//!
//! Rebuilding the whole configuration (instead of swapping only the certificate) also replaces
//! the TLS session caches, so a client cannot resume a session that was authenticated against a
//! CA bundle that has since been rotated out.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, InconsistentKeys,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tracing::{info, warn};

use crate::log_limit::{LogLimiter, warn_limited};

/// The only application protocol spoken: gRPC needs HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// Paths of a certificate, its private key and the CA bundle used to verify the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain presented to the peer.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA bundle the peer's certificate must chain to.
    pub ca: PathBuf,
}

/// Failure to load or use TLS material; names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured file does not exist.
    #[error("TLS file {} does not exist", .path.display())]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A configured file exists but cannot be read.
    #[error("cannot read TLS file {}: {source}", .path.display())]
    Read {
        /// The unreadable file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// A file is not well-formed PEM (often: it is still being written).
    #[error("{} is not valid PEM: {source}", .path.display())]
    InvalidPem {
        /// The malformed file.
        path: PathBuf,
        /// The PEM parser's complaint.
        source: std::io::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("certificate file {} contains no PEM certificate", .path.display())]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The certificate in the file cannot be parsed.
    #[error("certificate file {} holds an unusable certificate: {source}", .path.display())]
    InvalidCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What rustls found wrong.
        source: rustls::Error,
    },
    /// The key file holds no private key block.
    #[error("key file {} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)", .path.display())]
    NoPrivateKey {
        /// The key file.
        path: PathBuf,
    },
    /// The private key cannot be used (unsupported algorithm or malformed).
    #[error("key file {} holds an unusable private key: {source}", .path.display())]
    InvalidPrivateKey {
        /// The key file.
        path: PathBuf,
        /// What rustls found wrong.
        source: rustls::Error,
    },
    /// The private key is not the key of the certificate.
    #[error("private key {} does not match the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The CA bundle holds no certificate.
    #[error("CA bundle {} contains no PEM certificate", .path.display())]
    EmptyCaBundle {
        /// The CA bundle.
        path: PathBuf,
    },
    /// A certificate in the CA bundle cannot be used as a trust anchor.
    #[error("CA bundle {} holds an unusable certificate: {source}", .path.display())]
    InvalidCaCertificate {
        /// The CA bundle.
        path: PathBuf,
        /// What rustls found wrong.
        source: rustls::Error,
    },
    /// A peer verifier cannot be built from the CA bundle.
    #[error("cannot build a certificate verifier from CA bundle {}: {source}", .path.display())]
    Verifier {
        /// The CA bundle.
        path: PathBuf,
        /// What rustls found wrong.
        source: rustls::server::VerifierBuilderError,
    },
    /// The expected server name is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {name:?}: {reason}")]
    InvalidServerName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// rustls rejected the assembled configuration.
    #[error("rustls rejected the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The background reload thread could not be started.
    #[error("cannot start the TLS reload thread: {0}")]
    ReloadThread(#[source] std::io::Error),
}

/// Server-side TLS: requires client certificates chaining to the CA bundle and whose SAN is on
/// the allow-list; reloads all three files when they change on disk.
#[derive(Clone)]
pub struct ServerTls {
    reloadable: Arc<Reloadable<ServerConfig>>,
    allowed_sans: Arc<[String]>,
}

impl ServerTls {
    /// Loads the files now (failing fast) and re-reads them every `reload_interval`.
    /// `allowed_sans` empty means any certificate from the CA is accepted.
    /// A zero `reload_interval` disables reloading.
    pub fn new(
        files: TlsFiles,
        allowed_sans: Vec<String>,
        reload_interval: Duration,
    ) -> Result<Self, TlsError> {
        let allowed_sans: Arc<[String]> = allowed_sans.into();
        let allowed = Arc::clone(&allowed_sans);
        // One limiter across reloads: a client refused over and over is warned about once per
        // interval, however often the configuration is rebuilt.
        let refusals = Arc::new(LogLimiter::default());
        let watched = WatchedFiles::from(&files);
        let build = move |contents: &FileContents| {
            build_server_config(&files, contents, &allowed, &refusals)
        };
        let reloadable = Reloadable::start(watched, Box::new(build), reload_interval, "server")?;
        Ok(Self {
            reloadable,
            allowed_sans,
        })
    }

    /// The configuration new handshakes use right now.
    pub fn current_config(&self) -> Arc<ServerConfig> {
        self.reloadable.current()
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.reloadable.files)
            .field("allowed_sans", &self.allowed_sans)
            .finish_non_exhaustive()
    }
}

/// Client-side TLS: verifies the server against the CA bundle and `server_name`, presents the
/// client certificate; reloads files when they change on disk.
#[derive(Clone)]
pub struct ClientTls {
    reloadable: Arc<Reloadable<ClientConfig>>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// Loads the files now (failing fast) and re-reads them every `reload_interval`.
    /// A zero `reload_interval` disables reloading.
    pub fn new(
        files: TlsFiles,
        server_name: String,
        reload_interval: Duration,
    ) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(server_name.clone()).map_err(|err| {
            TlsError::InvalidServerName {
                name: server_name,
                reason: err.to_string(),
            }
        })?;
        let watched = WatchedFiles::from(&files);
        let build = move |contents: &FileContents| build_client_config(&files, contents);
        let reloadable = Reloadable::start(watched, Box::new(build), reload_interval, "client")?;
        Ok(Self {
            reloadable,
            server_name,
        })
    }

    /// The configuration new connections use right now.
    pub fn current_config(&self) -> Arc<ClientConfig> {
        self.reloadable.current()
    }

    /// The name the server certificate must be valid for.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.reloadable.files)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Server-side TLS without client authentication: presents the certificate in `cert` (with the
/// key in `key`) to anyone; reloads both files when they change on disk.
#[derive(Clone)]
pub struct ServingTls {
    reloadable: Arc<Reloadable<ServerConfig>>,
}

impl ServingTls {
    /// Loads the files now (failing fast) and re-reads them every `reload_interval`; every
    /// configuration offers `alpn_protocols`. A zero `reload_interval` disables reloading.
    pub fn new(
        cert: PathBuf,
        key: PathBuf,
        alpn_protocols: Vec<Vec<u8>>,
        reload_interval: Duration,
    ) -> Result<Self, TlsError> {
        let watched = WatchedFiles {
            cert,
            key,
            ca: None,
        };
        let (cert, key) = (watched.cert.clone(), watched.key.clone());
        let build = move |contents: &FileContents| {
            build_serving_config(&cert, &key, contents, &alpn_protocols)
        };
        let reloadable = Reloadable::start(watched, Box::new(build), reload_interval, "serving")?;
        Ok(Self { reloadable })
    }

    /// The configuration new handshakes use right now.
    pub fn current_config(&self) -> Arc<ServerConfig> {
        self.reloadable.current()
    }
}

impl fmt::Debug for ServingTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingTls")
            .field("files", &self.reloadable.files)
            .finish_non_exhaustive()
    }
}

/// The files one [`Reloadable`] watches; `ca` is absent for a server that verifies no peer.
#[derive(Debug)]
struct WatchedFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

impl From<&TlsFiles> for WatchedFiles {
    fn from(files: &TlsFiles) -> Self {
        Self {
            cert: files.cert.clone(),
            key: files.key.clone(),
            ca: Some(files.ca.clone()),
        }
    }
}

/// Raw bytes of the watched files, compared between polls to detect a change.
#[derive(PartialEq, Eq)]
struct FileContents {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl FileContents {
    fn read(files: &WatchedFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read_file(&files.cert)?,
            key: read_file(&files.key)?,
            ca: files.ca.as_deref().map(read_file).transpose()?,
        })
    }

    /// The CA bundle's bytes; empty (rejected later as an empty bundle) if none was watched,
    /// which the constructors of the mTLS types rule out.
    fn ca(&self) -> &[u8] {
        self.ca.as_deref().unwrap_or_default()
    }
}

type Builder<T> = Box<dyn Fn(&FileContents) -> Result<Arc<T>, TlsError> + Send + Sync>;

/// A configuration rebuilt from files whenever they change.
struct Reloadable<T> {
    files: WatchedFiles,
    side: &'static str,
    current: RwLock<Arc<T>>,
    build: Builder<T>,
    /// What the last reload attempt read, so unchanged (or unchanged-and-broken) files are
    /// neither rebuilt nor re-reported on every poll.
    last_attempt: Mutex<FileContents>,
    /// Last read error reported, so a persistently missing file is logged once, not per poll.
    last_read_error: Mutex<Option<String>>,
    /// Dropping this (with the last handle) wakes the reload thread so it exits at once.
    _stop: mpsc::Sender<()>,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    fn start(
        files: WatchedFiles,
        build: Builder<T>,
        reload_interval: Duration,
        side: &'static str,
    ) -> Result<Arc<Self>, TlsError> {
        let contents = FileContents::read(&files)?;
        let initial = build(&contents)?;
        let (stop_tx, stop_rx) = mpsc::channel();
        let this = Arc::new(Self {
            files,
            side,
            current: RwLock::new(initial),
            build,
            last_attempt: Mutex::new(contents),
            last_read_error: Mutex::new(None),
            _stop: stop_tx,
        });
        if !reload_interval.is_zero() {
            let weak = Arc::downgrade(&this);
            // Reload warnings go to the subscriber current where the configuration was made
            // (the global one in binaries; a scoped one in tests and embedders).
            let dispatch = tracing::dispatcher::get_default(Clone::clone);
            let dispatch =
                (!dispatch.is::<tracing::subscriber::NoSubscriber>()).then_some(dispatch);
            std::thread::Builder::new()
                .name(format!("tls-reload-{side}"))
                .spawn(move || match dispatch {
                    Some(dispatch) => tracing::dispatcher::with_default(&dispatch, || {
                        reload_loop(weak, stop_rx, reload_interval);
                    }),
                    None => reload_loop(weak, stop_rx, reload_interval),
                })
                .map_err(TlsError::ReloadThread)?;
        }
        Ok(this)
    }

    fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn poll(&self) {
        let contents = match FileContents::read(&self.files) {
            Ok(contents) => {
                *self
                    .last_read_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                contents
            }
            Err(err) => {
                let message = err.to_string();
                let mut last = self
                    .last_read_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if last.as_deref() != Some(message.as_str()) {
                    warn!(side = self.side, error = %err, "cannot re-read TLS files; keeping the previous TLS material");
                    *last = Some(message);
                }
                return;
            }
        };
        let mut last_attempt = self
            .last_attempt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *last_attempt == contents {
            return;
        }
        match (self.build)(&contents) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
                info!(
                    side = self.side,
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    ca = ?self.files.ca,
                    "reloaded TLS material; new handshakes use it"
                );
            }
            Err(err) => {
                warn!(side = self.side, error = %err, "TLS files changed but do not form valid material; keeping the previous TLS material");
            }
        }
        *last_attempt = contents;
    }
}

fn reload_loop<T: Send + Sync + 'static>(
    weak: Weak<Reloadable<T>>,
    stop: mpsc::Receiver<()>,
    interval: Duration,
) {
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(reloadable) = weak.upgrade() else {
            return;
        };
        reloadable.poll();
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    // `std::fs::read` follows symlinks, so a swapped `..data` link yields the new file.
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TlsError::MissingFile {
                path: path.to_owned(),
            }
        } else {
            TlsError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::InvalidPem {
            path: path.to_owned(),
            source,
        })
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    contents: &FileContents,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_certs(cert_path, &contents.cert)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = parse_key(key_path, &contents.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::InvalidPrivateKey {
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Some key types cannot report their public key; the handshake will then fail loudly.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(source) => Err(TlsError::InvalidCertificate {
            path: cert_path.to_owned(),
            source,
        }),
    }
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::InvalidPem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_owned(),
        })
}

fn root_store(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let certs = parse_certs(path, pem)?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaBundle {
            path: path.to_owned(),
        });
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|source| TlsError::InvalidCaCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(Arc::new(store))
}

fn build_server_config(
    files: &TlsFiles,
    contents: &FileContents,
    allowed_sans: &Arc<[String]>,
    refusals: &Arc<LogLimiter>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certified = certified_key(&files.cert, &files.key, contents, &provider)?;
    let roots = root_store(&files.ca, contents.ca())?;
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(|source| TlsError::Verifier {
            path: files.ca.clone(),
            source,
        })?;
    let verifier = Arc::new(SanAllowListVerifier {
        inner: webpki,
        allowed_sans: Arc::clone(allowed_sans),
        refusals: Arc::clone(refusals),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

fn build_serving_config(
    cert: &Path,
    key: &Path,
    contents: &FileContents,
    alpn_protocols: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certified = certified_key(cert, key, contents, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = alpn_protocols.to_vec();
    Ok(Arc::new(config))
}

fn build_client_config(
    files: &TlsFiles,
    contents: &FileContents,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let certified = certified_key(&files.cert, &files.key, contents, &provider)?;
    let roots = root_store(&files.ca, contents.ca())?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(|source| TlsError::Verifier {
            path: files.ca.clone(),
            source,
        })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_webpki_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Chain validation by webpki, then authorisation by the client certificate's DNS/URI SANs.
#[derive(Debug)]
struct SanAllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed_sans: Arc<[String]>,
    /// Rate limits the warning about a refused certificate (see [`crate::accept`]).
    refusals: Arc<LogLimiter>,
}

/// Why an otherwise valid client certificate was refused.
struct SanNotAllowed {
    presented: Vec<String>,
    allowed: Vec<String>,
}

impl fmt::Display for SanNotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client certificate SANs {:?} not in allow-list {:?}",
            self.presented, self.allowed
        )
    }
}

impl ClientCertVerifier for SanAllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_sans.is_empty() {
            return Ok(verified);
        }
        let presented = certificate_sans(end_entity)?;
        if presented
            .iter()
            .any(|san| self.allowed_sans.iter().any(|allowed| allowed == san))
        {
            return Ok(verified);
        }
        let refusal = SanNotAllowed {
            presented,
            allowed: self.allowed_sans.to_vec(),
        };
        warn_limited!(self.refusals, "refusing client: {refusal}");
        // Authenticated but not authorised: `access_denied` is the alert for exactly that.
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// DNS and URI subject alternative names of a DER certificate (the CN is deliberately ignored).
pub(crate) fn certificate_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, rustls::Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}
