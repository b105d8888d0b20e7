//! `cloud-provider-webhook` binary: parses flags and serves the admission webhooks.

use std::process::ExitCode;

use clap::Parser;
use cloud_provider_webhook::{Options, run};

fn main() -> ExitCode {
    let options = Options::parse();
    // One crypto provider for every rustls user in the process (tonic, the webhook port).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cloud-provider-webhook: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let _telemetry = match cpi_transport::telemetry::init("cloud-provider-webhook") {
            Ok(guard) => Some(guard),
            Err(err) => {
                eprintln!("cloud-provider-webhook: telemetry disabled: {err}");
                None
            }
        };
        match run(&options, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "cloud-provider-webhook stopped");
                eprintln!("cloud-provider-webhook: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
