//! Command-line flags: upstream's webhook serving flags (`options/webhook.go`), the provider
//! endpoint flags of the controller-manager, and what upstream has no flag for (the answer
//! deadline, the failure policy of each webhook).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use cpi_transport::{EndpointError, ProviderEndpoint, ProviderFlags};

/// The webhooks this server knows, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Webhook {
    /// Mutating: topology labels and node affinity of new PersistentVolumes.
    PvLabeler,
    /// Validating: load-balancer settings of Services.
    ServiceLbValidator,
}

impl Webhook {
    /// Every known webhook.
    pub const ALL: [Webhook; 2] = [Webhook::PvLabeler, Webhook::ServiceLbValidator];

    /// The name used by `--webhooks`, in metrics and as the path (`/<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::PvLabeler => "pv-labeler",
            Self::ServiceLbValidator => "service-lb-validator",
        }
    }

    /// The path the webhook is served on.
    pub fn path(self) -> String {
        format!("/{}", self.name())
    }
}

/// What a webhook answers when the provider shim cannot give an answer (down, slow, failing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Deny the request, saying why.
    Fail,
    /// Allow the request unchanged, with a warning saying why.
    Ignore,
}

impl FailurePolicy {
    /// The name as in a webhook configuration's `failurePolicy`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fail => "Fail",
            Self::Ignore => "Ignore",
        }
    }
}

/// A flag value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// `--webhooks` names an unknown webhook.
    #[error("--webhooks: {0:?} is not a known webhook (known: pv-labeler, service-lb-validator)")]
    UnknownWebhook(String),
    /// `--webhooks` enables nothing.
    #[error("--webhooks enables no webhook; give \"*\" or the names of those to serve")]
    NoWebhook,
    /// `--provider-endpoint` cannot be used.
    #[error("--provider-endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    /// A duration is out of range.
    #[error("{flag}: {message}")]
    Invalid {
        /// Flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn parse_duration(value: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(value)
}

/// The webhook server's flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cloud-provider-webhook",
    about = "Admission webhooks backed by the cloud provider shim"
)]
pub struct Options {
    /// Webhooks to serve: `*` for all, `name` to enable one, `-name` to disable one
    /// (pv-labeler, service-lb-validator). None are served by default, as upstream.
    #[arg(long, value_delimiter = ',')]
    pub webhooks: Vec<String>,
    /// Address the webhook port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub webhook_bind_address: IpAddr,
    /// Port of the HTTPS webhook listener (0: any free port).
    #[arg(long, default_value_t = 10260)]
    pub webhook_secure_port: u16,
    /// PEM certificate chain the webhook port serves; re-read when it changes on disk.
    #[arg(long)]
    pub webhook_tls_cert_file: PathBuf,
    /// Private key of --webhook-tls-cert-file.
    #[arg(long)]
    pub webhook_tls_private_key_file: PathBuf,
    /// How long a review may take before it is answered by the failure policy. Keep it below
    /// the webhook configuration's `timeoutSeconds` (10 s by default): past that the API
    /// server applies its own failure policy without our message. A shorter `?timeout=` sent
    /// by the API server wins.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub webhook_deadline: Duration,
    /// Answer of pv-labeler when the shim cannot label a volume. Fail (as the in-tree plugin):
    /// a volume without its zone could be used from a node that cannot attach it.
    #[arg(long, value_enum, default_value = "fail")]
    pub pv_labeler_failure_policy: FailurePolicy,
    /// Answer of service-lb-validator when the shim cannot validate. Ignore: the service
    /// controller still reports bad settings as Events, and Services keep being admitted
    /// while the shim is down.
    #[arg(long, value_enum, default_value = "ignore")]
    pub service_lb_validator_failure_policy: FailurePolicy,
    /// Cluster name sent to ValidateLoadBalancer (as the controller-manager's --cluster-name).
    #[arg(long, default_value = "kubernetes")]
    pub cluster_name: String,
    /// Where the provider shim listens and its TLS files (as on the controller-manager).
    #[command(flatten)]
    pub provider: ProviderFlags,
    /// How often TLS files (serving and client) are checked for rotation.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

impl Options {
    /// The address the webhook port binds.
    pub fn bind_address(&self) -> SocketAddr {
        SocketAddr::new(self.webhook_bind_address, self.webhook_secure_port)
    }

    /// The failure policy of `webhook`.
    pub fn failure_policy(&self, webhook: Webhook) -> FailurePolicy {
        match webhook {
            Webhook::PvLabeler => self.pv_labeler_failure_policy,
            Webhook::ServiceLbValidator => self.service_lb_validator_failure_policy,
        }
    }

    /// Checks what clap cannot: the webhook list, the deadline, the endpoint.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if enabled_webhooks(&self.webhooks)?.is_empty() {
            return Err(OptionsError::NoWebhook);
        }
        if self.webhook_deadline.is_zero() || self.webhook_deadline > Duration::from_secs(30) {
            return Err(OptionsError::Invalid {
                flag: "--webhook-deadline",
                message: "must be above 0 and at most 30s (the API server's longest timeout)"
                    .into(),
            });
        }
        self.provider_endpoint().map(|_| ())
    }

    /// The shim endpoint, checked: `https://` needs all three TLS files.
    pub fn provider_endpoint(&self) -> Result<ProviderEndpoint, OptionsError> {
        Ok(self.provider.endpoint()?)
    }
}

/// The webhooks `--webhooks` enables (upstream `IsControllerEnabled` with nothing disabled by
/// default): a name enables it, `-name` disables it, `*` enables all not disabled.
pub fn enabled_webhooks(list: &[String]) -> Result<BTreeSet<Webhook>, OptionsError> {
    let known = |name: &str| {
        Webhook::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| OptionsError::UnknownWebhook(name.to_string()))
    };
    let (mut on, mut off, mut star) = (BTreeSet::new(), BTreeSet::new(), false);
    for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        if entry == "*" {
            star = true;
        } else if let Some(name) = entry.strip_prefix('-') {
            off.insert(known(name)?);
        } else {
            on.insert(known(entry)?);
        }
    }
    Ok(Webhook::ALL
        .into_iter()
        .filter(|w| !off.contains(w) && (on.contains(w) || star))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Upstream `TestWebhookEnableDisable`.
    #[test]
    fn webhook_enable_disable() {
        use Webhook::*;
        let cases: [(&[&str], &[Webhook]); 6] = [
            (
                &["pv-labeler", "service-lb-validator"],
                &[PvLabeler, ServiceLbValidator],
            ),
            (&["pv-labeler"], &[PvLabeler]),
            (&["pv-labeler", "-service-lb-validator"], &[PvLabeler]),
            (&["-service-lb-validator"], &[]),
            (&["*"], &[PvLabeler, ServiceLbValidator]),
            (&["*", "-pv-labeler"], &[ServiceLbValidator]),
        ];
        for (flags, expected) in cases {
            let got: Vec<Webhook> = enabled_webhooks(&list(flags))
                .unwrap()
                .into_iter()
                .collect();
            assert_eq!(got, expected, "--webhooks={flags:?}");
        }
        assert!(enabled_webhooks(&[]).unwrap().is_empty());
        assert_eq!(
            enabled_webhooks(&list(&["pv-labeller"])),
            Err(OptionsError::UnknownWebhook("pv-labeller".into()))
        );
        assert_eq!(
            enabled_webhooks(&list(&["-nope"])),
            Err(OptionsError::UnknownWebhook("nope".into()))
        );
    }

    fn parse(extra: &[&str]) -> Options {
        let mut args = vec![
            "cloud-provider-webhook",
            "--webhook-tls-cert-file=c",
            "--webhook-tls-private-key-file=k",
        ];
        args.extend_from_slice(extra);
        Options::try_parse_from(args).unwrap()
    }

    #[test]
    fn defaults_follow_upstream() {
        let o = parse(&["--provider-endpoint=unix:///s", "--webhooks=*"]);
        assert_eq!(o.bind_address(), "0.0.0.0:10260".parse().unwrap());
        assert_eq!(o.webhook_deadline, Duration::from_secs(8));
        assert_eq!(o.failure_policy(Webhook::PvLabeler), FailurePolicy::Fail);
        assert_eq!(
            o.failure_policy(Webhook::ServiceLbValidator),
            FailurePolicy::Ignore
        );
        assert!(o.validate().is_ok());
    }

    #[test]
    fn bad_flag_combinations_are_refused() {
        let o = parse(&["--provider-endpoint=unix:///s"]);
        assert_eq!(o.validate(), Err(OptionsError::NoWebhook));
        let o = parse(&["--provider-endpoint=https://shim:1", "--webhooks=*"]);
        assert!(
            matches!(o.validate(), Err(OptionsError::Endpoint(m)) if m.to_string().contains("--provider-ca-file"))
        );
        let o = parse(&["--provider-endpoint=http://shim:1", "--webhooks=*"]);
        assert!(matches!(o.validate(), Err(OptionsError::Endpoint(_))));
        let o = parse(&[
            "--provider-endpoint=unix:///s",
            "--webhooks=*",
            "--webhook-deadline=0s",
        ]);
        assert!(matches!(o.validate(), Err(OptionsError::Invalid { .. })));
    }

    #[test]
    fn https_endpoint_defaults_server_name_to_host() {
        let o = parse(&[
            "--provider-endpoint=https://[::1]:10270",
            "--provider-tls-cert-file=c",
            "--provider-tls-private-key-file=k",
            "--provider-ca-file=ca",
        ]);
        let ProviderEndpoint::Tls { server_name, .. } = o.provider_endpoint().unwrap() else {
            panic!("https endpoint");
        };
        assert_eq!(server_name, "::1");
    }
}
