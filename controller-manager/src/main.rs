//! `cloud-controller-manager` binary: parses flags and runs the manager.

use std::process::ExitCode;

use clap::Parser;
use cloud_controller_manager::{Options, run};

fn main() -> ExitCode {
    let options = Options::parse();
    // One crypto provider for every rustls user in the process (kube, tonic, the secure port).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The manager's work is I/O-bound (a few hundred node syncs a second need a fifth of one
    // core): one runtime thread saves the cross-thread wake-ups of a second one, 8-15% of the
    // CPU in `bench node-init`, and the current-thread scheduler is the cheaper one for it (no
    // work-stealing queues; the main future and the tasks share the thread). Setting
    // TOKIO_WORKER_THREADS asks for the multi-threaded scheduler with that many workers.
    let mut builder = if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cloud-controller-manager: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let _telemetry = match cpi_transport::telemetry::init("cloud-controller-manager") {
            Ok(guard) => Some(guard),
            Err(err) => {
                eprintln!("cloud-controller-manager: telemetry disabled: {err}");
                None
            }
        };
        match run(options, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "cloud-controller-manager stopped");
                eprintln!("cloud-controller-manager: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
