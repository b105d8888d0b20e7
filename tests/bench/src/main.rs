//! `bench`: performance measurements of the controller-manager and a provider shim against a
//! real kube-apiserver (the test control plane).
//!
//! `bench node-init --nodes N` starts the control plane, registers N tainted Nodes, runs the
//! `local` shim and the controller-manager, and reports how long initialising every Node took,
//! the CPU time and peak RSS of both processes and the API requests per Node, next to the time
//! the API server alone needs for the same writes. `bench admission` sends AdmissionReviews to
//! the webhook server at a fixed rate. `bench credential-provider` times invocations of the
//! kubelet image credential-provider plugin. See `tests/bench/README.md`.

mod admission;
mod credential_provider;
mod lb;
mod metrics;
mod nodes;
mod procfs;
mod report;
mod routes;
mod run;

use clap::{Args, Parser, Subcommand};

/// Command line of the `bench` binary.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Performance measurements of the cloud-controller-manager against a real kube-apiserver."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time the initialisation of N tainted Nodes by the controller-manager and the local shim.
    NodeInit(NodeInitArgs),
    /// Time LoadBalancer Services served by the service-lb controller and the local shim's load
    /// balancers, then one Node added.
    Lb(LbArgs),
    /// Time pod CIDRs allocated by the node-ipam controller and routes created by the route
    /// controller and the `local` shim in a network namespace's routing table.
    Routes(RoutesArgs),
    /// Send AdmissionReviews over TLS at a fixed rate to the webhook server, with a provider
    /// shim behind it; report latency quantiles, CPU and RSS.
    Admission(AdmissionArgs),
    /// Time invocations of the kubelet image credential-provider plugin as the kubelet makes
    /// them: warm on-disk cache, cold against moto, the spawn floor, and the binary's size.
    CredentialProvider(CredentialProviderArgs),
    /// Serve the fake provider over mutual TLS (the shim of `bench admission`).
    #[command(hide = true)]
    FakeShim(FakeShimArgs),
}

/// Flags of `bench admission`.
#[derive(Debug, Clone, Args)]
pub struct AdmissionArgs {
    /// Requests per second (the first rate with --find-max).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds each rate is held.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Keep-alive HTTP/1.1 connections the requests are spread over.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// The webhook the reviews go to.
    #[arg(long, value_enum, default_value = "service-lb-validator")]
    pub webhook: admission::Target,
    /// The provider shim behind the webhook: `local` (the `local-shim` binary) or `fake` (the
    /// fake provider, served by this binary).
    #[arg(long, value_enum, default_value = "local")]
    pub shim: admission::ShimKind,
    /// Step the rate up until p99 reaches 10 ms; report the highest rate under it.
    #[arg(long)]
    pub find_max: bool,
    /// `RUST_LOG` of the webhook and the shim.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Copy the logs of the webhook and the shim into this directory.
    #[arg(long)]
    pub keep_logs: Option<std::path::PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `bench credential-provider`.
#[derive(Debug, Clone, Args)]
pub struct CredentialProviderArgs {
    /// Timed invocations of the spawn floor, the warm-cache and the local-family series.
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Timed invocations of the cold series (each a call to moto).
    #[arg(long, default_value_t = 100)]
    pub cold_runs: usize,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `bench fake-shim`: the shim framework's serving flags.
#[derive(Debug, Clone, Args)]
pub struct FakeShimArgs {
    /// Where and how the fake serves.
    #[command(flatten)]
    pub serve: fake_provider::ServeFlags,
}

/// Flags of `bench routes`.
#[derive(Debug, Clone, Args)]
pub struct RoutesArgs {
    /// Number of Nodes.
    #[arg(long, default_value_t = 2000)]
    pub nodes: usize,
    /// Reconcile on Node changes (`--feature-gates=
    /// CloudControllerManagerWatchBasedRoutesReconciliation=true`) rather than only every
    /// period (upstream's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_based: bool,
    /// `--route-reconciliation-period` (upstream's default 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub period: std::time::Duration,
    /// Requests in flight in the "API server alone" baseline.
    #[arg(long, default_value_t = 50)]
    pub workers: u16,
    /// Flags every run shares.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags of `bench lb`.
#[derive(Debug, Clone, Args)]
pub struct LbArgs {
    /// Number of LoadBalancer Services.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    /// Number of Nodes (one more is added in the second phase).
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// `--concurrent-service-syncs` of the controller-manager, and the concurrency of the
    /// "API server alone" baseline.
    #[arg(long, default_value_t = 50)]
    pub workers: u16,
    /// Flags every run shares.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags of every run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// `--kube-api-qps` of the controller-manager (upstream's default is 20; the bench raises
    /// it so that the controller, not the client-side limit, is measured).
    #[arg(long, default_value_t = 100_000.0)]
    pub kube_api_qps: f32,
    /// `--kube-api-burst` of the controller-manager (upstream's default is 30).
    #[arg(long, default_value_t = 100_000)]
    pub kube_api_burst: u32,
    /// Create requests in flight while registering the objects the run starts from.
    #[arg(long, default_value_t = 64)]
    pub create_concurrency: usize,
    /// Seconds to wait for each phase before failing the run.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// `RUST_LOG` of the controller-manager and the shim.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Copy the logs of the controller-manager, the shim and kube-apiserver into this directory.
    #[arg(long)]
    pub keep_logs: Option<std::path::PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run kube-apiserver with its watch cache (off by default: with it, this v1.20.2 server
    /// stops sending watch events in the middle of a burst; see tests/bench/README.md).
    #[arg(long)]
    pub apiserver_watch_cache: bool,
}

/// Flags of `bench node-init`.
#[derive(Debug, Clone, Args)]
pub struct NodeInitArgs {
    /// Number of Nodes (and inventory machines).
    #[arg(long, default_value_t = 2000)]
    pub nodes: usize,
    /// `--concurrent-node-syncs` of the controller-manager, and the concurrency of the
    /// "API server alone" baseline.
    #[arg(long, default_value_t = 50)]
    pub workers: u16,
    /// Flags every run shares.
    #[command(flatten)]
    pub run: RunArgs,
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::NodeInit(args) => {
                let report = run::node_init(&args).await?;
                if args.run.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", report.render_text());
                }
                anyhow::Ok(())
            }
            Command::Routes(args) => {
                let report = routes::routes(&args).await?;
                if args.run.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", routes::render_text(&report));
                }
                anyhow::Ok(())
            }
            Command::Admission(args) => {
                let report = admission::admission(&args).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", admission::render_text(&report));
                }
                anyhow::Ok(())
            }
            Command::FakeShim(args) => admission::fake_shim(args).await,
            Command::CredentialProvider(args) => {
                // Sequential child processes and blocking pipes: nothing else runs meanwhile.
                let report = credential_provider::credential_provider(&args)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", credential_provider::render_text(&report));
                }
                anyhow::Ok(())
            }
            Command::Lb(args) => {
                let report = lb::lb(&args).await?;
                if args.run.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", lb::render_text(&report));
                }
                anyhow::Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
