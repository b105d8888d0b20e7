//! `local-shim`: the CPI provider shim for machines listed in an inventory file.

use anyhow::Context as _;
use clap::Parser;
use local_shim::{LocalFlags, LocalShim, Store};

/// The command line: the shim's flags and the operator's fence reset.
#[derive(Debug, Parser)]
#[command(
    name = "local-shim",
    version,
    about = "The local CPI provider shim: machines from an inventory file"
)]
struct Cli {
    /// The shim's flags.
    #[command(flatten)]
    flags: LocalFlags,

    /// Forget the fence marks stored in --state-dir before serving, so the next fence sets a
    /// new mark (after restoring etcd, for example; see README.md, "Resetting the fence").
    /// Remove it again once the shim has started.
    #[arg(long)]
    reset_fence: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { flags, reset_fence } = Cli::parse();
    // Fails only when another provider was installed first, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry =
        cpi_transport::telemetry::init("local-shim").context("initialising telemetry")?;
    if reset_fence {
        // Its own open and close: the shim opens the database again below.
        let cleared = Store::open(&flags.state_dir)
            .and_then(|store| store.clear_fence_marks())
            .context("--reset-fence")?;
        tracing::warn!(
            state_dir = %flags.state_dir.display(),
            cleared,
            "--reset-fence: forgot the stored fence marks; remove the flag once started"
        );
    }
    let shim = LocalShim::new(&flags).context("starting local-shim")?;
    shim.run(&flags.serve, std::future::pending())
        .await
        .context("serving")?;
    Ok(())
}
