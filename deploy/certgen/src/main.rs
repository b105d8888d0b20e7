//! `ccm-certgen`: see the library's documentation and deploy/parts/certgen/certgen.yaml.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use ccm_certgen::{Config, LeafSpec, Policy, Usage};
use clap::Parser;

/// Creates the stack's CA and TLS Secrets when missing or near expiry, keeps valid ones, and
/// sets the webhook configurations' caBundle. Safe to run again at any time.
#[derive(Debug, Parser)]
#[command(name = "ccm-certgen", version)]
struct Flags {
    /// Kubeconfig file; in a pod, leave empty for the pod's service account.
    #[arg(long, default_value = "")]
    kubeconfig: String,
    /// Namespace of every Secret.
    #[arg(long, default_value = "kube-system")]
    namespace: String,
    /// The Secret holding the CA.
    #[arg(long, default_value = "ccm-certgen-ca")]
    ca_secret: String,
    /// A serving certificate: SECRET=DNSNAME[,DNSNAME...] (repeatable).
    #[arg(long = "server", value_parser = parse_leaf_server)]
    servers: Vec<LeafSpec>,
    /// A client certificate: SECRET=DNSNAME[,DNSNAME...] (repeatable).
    #[arg(long = "client", value_parser = parse_leaf_client)]
    clients: Vec<LeafSpec>,
    /// Set the caBundle of the Mutating- and ValidatingWebhookConfiguration of this name.
    #[arg(long)]
    webhook_configuration: Option<String>,
    /// The Secret whose ca.crt becomes the caBundle: the webhook's serving certificate
    /// (required with --webhook-configuration).
    #[arg(long, requires = "webhook_configuration")]
    webhook_serving_secret: Option<String>,
    /// How long to wait for the webhook configurations to be created.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    webhook_wait: Duration,
    /// Re-issue a certificate with less than this left.
    #[arg(long, default_value = "720h", value_parser = humantime::parse_duration)]
    renew_before: Duration,
    /// Lifetime of a new leaf certificate.
    #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
    leaf_lifetime: Duration,
    /// Lifetime of a new CA (replaced once it has less than leaf lifetime + renew-before left).
    #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
    ca_lifetime: Duration,
}

fn parse_leaf(arg: &str, usage: Usage) -> Result<LeafSpec, String> {
    let (secret, names) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected SECRET=DNSNAME[,DNSNAME...]"))?;
    let names: Vec<String> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if secret.is_empty() || names.is_empty() {
        return Err(format!("{arg:?}: expected SECRET=DNSNAME[,DNSNAME...]"));
    }
    Ok(LeafSpec {
        secret: secret.to_owned(),
        names,
        usage,
    })
}

fn parse_leaf_server(arg: &str) -> Result<LeafSpec, String> {
    parse_leaf(arg, Usage::Server)
}

fn parse_leaf_client(arg: &str) -> Result<LeafSpec, String> {
    parse_leaf(arg, Usage::Client)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let flags = Flags::parse();
    if flags.leaf_lifetime + flags.renew_before >= flags.ca_lifetime {
        anyhow::bail!("--ca-lifetime must be longer than --leaf-lifetime plus --renew-before");
    }
    let webhook_serving_secret = flags.webhook_serving_secret.clone();
    if flags.webhook_configuration.is_some() && webhook_serving_secret.is_none() {
        anyhow::bail!("--webhook-configuration needs --webhook-serving-secret");
    }
    let config = Config {
        namespace: flags.namespace,
        ca_secret: flags.ca_secret,
        leaves: flags.servers.into_iter().chain(flags.clients).collect(),
        webhook_configuration: flags.webhook_configuration,
        webhook_serving_secret,
        webhook_wait: flags.webhook_wait,
        policy: Policy {
            renew_before: flags.renew_before,
            leaf_lifetime: flags.leaf_lifetime,
            ca_lifetime: flags.ca_lifetime,
            ..Policy::default()
        },
    };
    let kube_config = if flags.kubeconfig.is_empty() {
        kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster configuration")?
    } else {
        let kubeconfig = kube::config::Kubeconfig::read_from(&flags.kubeconfig)
            .with_context(|| format!("--kubeconfig={}", flags.kubeconfig))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .with_context(|| format!("--kubeconfig={}", flags.kubeconfig))?
    };
    let client = kube::Client::try_from(kube_config).context("building the API client")?;
    let summary = ccm_certgen::run(&client, &config, SystemTime::now()).await?;
    if summary.unchanged() {
        tracing::info!("every certificate is valid: nothing changed");
    }
    Ok(())
}
