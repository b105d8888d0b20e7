//! What can go wrong bringing up or using the real node.

use std::path::PathBuf;

/// An error of the real-node harness; every message says what failed and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary or file the node needs is not there.
    #[error(
        "{what} not found at {path}: run `bash tests/control-plane/provision.sh --node` \
         (it builds the Kubernetes node components and installs containerd, runc, the CNI plugins, \
         buildah and the registry from Debian), or set KUBEBUILDER_ASSETS to a directory holding them"
    )]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The machine cannot run a node (not root, no default route, …).
    #[error("this machine cannot run the real node: {0}")]
    Machine(String),
    /// A file or directory operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A helper command (`ctr`, `iptables-save`, `ip`, …) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and the tail of its output.
        detail: String,
    },
    /// The test control plane did not start.
    #[error(transparent)]
    ControlPlane(#[from] test_control_plane::Error),
    /// Starting or waiting for a process failed.
    #[error(transparent)]
    Support(#[from] test_support::Error),
    /// A component did not become ready in time.
    #[error("{component} not ready: {detail}\n--- last lines of its log ({log}) ---\n{tail}")]
    NotReady {
        /// The component.
        component: &'static str,
        /// What was awaited and the last observation.
        detail: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Something awaited did not happen in time.
    #[error(transparent)]
    Wait(#[from] test_support::WaitError),
    /// An object could not be built from its JSON form.
    #[error("building {0}")]
    Json(String),
    /// An API request failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The cause.
        source: kube::Error,
    },
}

impl Error {
    /// A closure mapping an I/O error to [`Error::Io`] with `context`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
