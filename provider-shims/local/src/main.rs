//! `local-shim`: the CPI provider shim for machines listed in an inventory file.

use anyhow::Context as _;
use clap::Parser as _;
use local_shim::{LocalFlags, LocalShim};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = LocalFlags::parse();
    // Fails only when another provider was installed first, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry =
        cpi_transport::telemetry::init("local-shim").context("initialising telemetry")?;
    let shim = LocalShim::new(&flags).context("starting local-shim")?;
    shim.run(&flags.serve, std::future::pending())
        .await
        .context("serving")?;
    Ok(())
}
