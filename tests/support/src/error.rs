//! The error type of this crate (waiting has its own, [`crate::WaitError`]).

use std::path::PathBuf;

/// Failure of the test harness itself (not of the system under test).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A binary of this workspace has not been built.
    #[error(
        "binary {name:?} not found at {path}: build it first with `cargo build -p cloud-controller-manager -p local-shim` (tests/run-all.sh does)",
        path = .path.display()
    )]
    MissingBinary {
        /// Binary name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The watchdog shell exited before it started the program.
    #[error("the watchdog of {name} exited without starting it; log {log}, last lines:\n{tail}", log = .log.display())]
    Watchdog {
        /// The process's name.
        name: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A command the harness runs (such as `ip`) failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on standard error.
        stderr: String,
    },
    /// Generating or writing certificates failed.
    #[error("certificates: {0}")]
    Pki(#[from] test_pki::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
