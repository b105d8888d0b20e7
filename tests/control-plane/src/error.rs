//! The error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while finding, starting or talking to the test control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd and/or kube-apiserver could not be found; the message says where we looked.
    #[error(
        "test control plane binaries not found: {details}. Run `bash tests/control-plane/provision.sh` \
         (builds and caches kube-apiserver {version} and etcd under ~/.cache/ccm-test-assets/{version}), \
         or set {assets} (a directory holding kube-apiserver and etcd) or \
         {apiserver} / {etcd} (paths of the single binaries)",
        version = crate::K8S_VERSION,
        assets = crate::ENV_KUBEBUILDER_ASSETS,
        apiserver = crate::ENV_KUBE_APISERVER,
        etcd = crate::ENV_ETCD
    )]
    BinariesNotFound {
        /// One entry per missing binary: what was looked for, where, and why it was rejected.
        details: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Generating the control plane's certificates failed.
    #[error("generating the control plane's certificates: {0}")]
    Pki(#[from] test_pki::Error),
    /// Creating the state directory or starting a server process failed.
    #[error(transparent)]
    Support(#[from] test_support::Error),
    /// A server process exited before it became ready.
    #[error("{process} exited during start-up ({status}); log {log}, last lines:\n{tail}", log = .log.display())]
    ExitedEarly {
        /// `etcd` or `kube-apiserver`.
        process: &'static str,
        /// How it exited.
        status: String,
        /// Its log file (kept after the failure).
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A server process did not become ready in time.
    #[error(
        "{process} not ready after {waited:?} (last check: {last_check}); log {log}, last lines:\n{tail}",
        log = .log.display()
    )]
    NotReady {
        /// `etcd` or `kube-apiserver`.
        process: &'static str,
        /// How long we waited.
        waited: Duration,
        /// The outcome of the last readiness probe.
        last_check: String,
        /// Its log file (kept after the failure).
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A Kubernetes API call or client construction failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The underlying kube error.
        #[source]
        source: kube::Error,
    },
    /// The client configuration could not be built.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// Serialising a kubeconfig failed.
    #[error("serialising a kubeconfig: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    /// The process-wide shared control plane failed to start earlier in this process.
    #[error("the shared test control plane failed to start (first attempt in this process): {0}")]
    SharedStartFailed(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }
}
