//! What the test harnesses of this workspace share, written once:
//!
//! * [`Process`] — a child process that cannot outlive the test process (an `sh` watchdog kills
//!   it, and removes its directory, when the test process goes away however it ends);
//! * [`wait_for`] / [`Wait`] — waiting for a condition with a deadline; a timeout is a
//!   [`WaitError`] naming what was awaited and the last observation;
//! * [`https_get`] — one GET to an HTTPS port, verified against a test CA;
//! * [`temp_dir`] — temp directories, on tmpfs where that matters;
//! * [`Netns`] — a network namespace for one test, removed afterwards;
//! * [`WebhookRegistration`] — the admission webhooks registered with a test API server;
//! * [`workspace_binary`], [`free_port`], [`ShimMtls`], [`kubelet_registered_node`] and
//!   [`initialised`] — running the `local` shim and the controller-manager against a control
//!   plane, for the end-to-end suites, `bench` and `local-cluster`.
//!
//! It depends on no crate of the product or of the other harnesses, so that `test-control-plane`
//! and the controller-manager's own tests can use it without a dependency cycle; where a
//! well-known name of the product matters (the uninitialized taint), callers pass it from
//! `cloud_controller_manager::well_known`.

mod error;
mod https;
mod mtls;
mod netns;
mod node;
mod process;
mod service;
mod temp;
mod wait;
mod webhook;

pub use error::Error;
pub use https::{HttpsError, https_get, tls_connect, tls_connector};
pub use mtls::ShimMtls;
pub use netns::Netns;
pub use node::{initialised, kubelet_registered_node};
pub use process::{Process, ProcessBuilder, last_lines, process_alive, workspace_binary};
pub use service::{KUBE_PROXY_HEALTH_PORT, http_get, load_balancer_service, serve_http};
pub use temp::{Location, temp_dir};
pub use wait::{DEFAULT_INTERVAL, Wait, WaitError, wait_for};
pub use webhook::{WEBHOOK_TEST_LABEL, WebhookRegistration, wait_refused};

/// A free loopback TCP port (it may be taken again before it is used).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
