//! The executor: reads the Secrets, asks the plan, writes what it says. Every write carries the
//! resourceVersion it read (a concurrent writer makes it fail, and the Job runs again).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::pki::{self, Ca, PkiError};
use crate::plan::{self, CaAction, LeafAction, LeafSpec, Policy, TlsData, Unusable};

/// The label ccm-certgen puts on the Secrets it makes; it replaces no Secret without it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ccm-certgen");

/// What to provision.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace of every Secret.
    pub namespace: String,
    /// The Secret holding the CA (tls.crt, tls.key, and ca.crt: every CA still trusted).
    pub ca_secret: String,
    /// The leaf Secrets.
    pub leaves: Vec<LeafSpec>,
    /// Mutating and validating webhook configurations of this name get their caBundle set.
    pub webhook_configuration: Option<String>,
    /// The Secret whose ca.crt becomes the caBundle (the webhook's serving certificate's).
    pub webhook_serving_secret: Option<String>,
    /// How long to wait for the webhook configurations to exist.
    pub webhook_wait: Duration,
    /// Lifetimes and renewal window.
    pub policy: Policy,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A Secret is there but unusable; it is left as it is.
    #[error(transparent)]
    Unusable(#[from] Unusable),
    /// Making a certificate failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// An API request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// A webhook configuration did not appear in time.
    #[error("{kind} {name} does not exist (waited {waited:?})")]
    Missing {
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// How long.
        waited: Duration,
    },
    /// `--webhook-configuration` without a serving Secret that has a ca.crt.
    #[error("the webhook serving secret {0:?} has no ca.crt")]
    NoServingCa(String),
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Api { what, source }
}

/// What one run did, one line per object (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// `(object, what was done)`.
    pub changes: Vec<(String, String)>,
}

impl Summary {
    fn note(&mut self, object: &str, what: impl Into<String>) {
        let what = what.into();
        info!(object, what, "ccm-certgen");
        self.changes.push((object.to_owned(), what));
    }

    /// Whether nothing was written.
    pub fn unchanged(&self) -> bool {
        self.changes.iter().all(|(_, what)| what == "kept")
    }
}

fn tls_data(secret: &Secret) -> TlsData {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &str| data.get(key).map(|v| v.0.clone());
    TlsData {
        tls_crt: get("tls.crt"),
        tls_key: get("tls.key"),
        ca_crt: get("ca.crt"),
        managed: secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY.0))
            .is_some_and(|v| v == MANAGED_BY.1),
    }
}

fn pem_bundle(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|der| x509_pem(der))
        .collect::<Vec<_>>()
        .concat()
}

fn x509_pem(der: &[u8]) -> String {
    // rcgen's PEM encoder, through a parsed certificate, would need a key; encode directly.
    let b64 = base64_encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    // serde_json encodes ByteString as base64: reuse it rather than add a crate.
    serde_json::to_value(ByteString(bytes.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Writes `data` into the Secret `name` (created as `kubernetes.io/tls` if `existing` is
/// `None`, else replaced at the resourceVersion read).
async fn write_secret(
    api: &Api<Secret>,
    name: &str,
    existing: Option<Secret>,
    data: BTreeMap<String, ByteString>,
) -> Result<(), RunError> {
    let mut labels = BTreeMap::new();
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    match existing {
        Some(mut secret) => {
            secret
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .extend(labels);
            secret.data = Some(data);
            secret.string_data = None;
            api.replace(name, &PostParams::default(), &secret)
                .await
                .map_err(api_err(format!("updating secret {name}")))?;
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret)
                .await
                .map_err(api_err(format!("creating secret {name}")))?;
        }
    }
    Ok(())
}

fn tls_map(crt: &str, key: &str, ca: &str) -> BTreeMap<String, ByteString> {
    [("tls.crt", crt), ("tls.key", key), ("ca.crt", ca)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// Makes or loads the CA; returns it with the trusted bundle (DER, the CA first).
async fn ensure_ca(
    api: &Api<Secret>,
    config: &Config,
    now: SystemTime,
    summary: &mut Summary,
) -> Result<(Ca, Vec<Vec<u8>>), RunError> {
    let name = &config.ca_secret;
    let existing = api
        .get_opt(name)
        .await
        .map_err(api_err(format!("reading secret {name}")))?;
    let found = existing.as_ref().map(tls_data);
    match plan::decide_ca(name, found.as_ref(), now, &config.policy)? {
        CaAction::Keep => {
            let found = found.ok_or_else(|| missing(name))?;
            let (crt, key) = ca_pems(&found);
            let ca = Ca::load(&crt, &key)?;
            let trusted = pki::pem_certificates(found.ca_crt.as_deref().unwrap_or_default())?;
            summary.note(name, "kept");
            Ok((ca, trusted))
        }
        CaAction::Bundle { trusted } => {
            let found = found.ok_or_else(|| missing(name))?;
            let (crt, key) = ca_pems(&found);
            let ca = Ca::load(&crt, &key)?;
            write_secret(
                api,
                name,
                existing,
                tls_map(&crt, &key, &pem_bundle(&trusted)),
            )
            .await?;
            summary.note(name, "pruned expired CAs from ca.crt");
            Ok((ca, trusted))
        }
        CaAction::New {
            reason,
            still_trusted,
        } => {
            let since_epoch = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let ca = Ca::generate(
                &format!("ccm-certgen-ca-{since_epoch}"),
                now - config.policy.backdate,
                now + config.policy.ca_lifetime,
            )?;
            let mut trusted = pki::pem_certificates(ca.cert_pem.as_bytes())?;
            trusted.extend(still_trusted);
            let data = tls_map(&ca.cert_pem, &ca.key_pem, &pem_bundle(&trusted));
            write_secret(api, name, existing, data).await?;
            summary.note(name, format!("new CA ({reason})"));
            Ok((ca, trusted))
        }
    }
}

/// decide_ca answers `New` for a missing Secret: an error rather than a panic all the same.
fn missing(name: &str) -> Unusable {
    Unusable {
        secret: name.to_owned(),
        reason: "missing".into(),
    }
}

fn ca_pems(found: &TlsData) -> (String, String) {
    let text = |v: &Option<Vec<u8>>| {
        String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned()
    };
    (text(&found.tls_crt), text(&found.tls_key))
}

/// Keeps one leaf Secret right.
async fn ensure_leaf(
    api: &Api<Secret>,
    spec: &LeafSpec,
    ca: &Ca,
    trusted: &[Vec<u8>],
    policy: &Policy,
    now: SystemTime,
    summary: &mut Summary,
) -> Result<(), RunError> {
    let name = &spec.secret;
    let existing = api
        .get_opt(name)
        .await
        .map_err(api_err(format!("reading secret {name}")))?;
    let found = existing.as_ref().map(tls_data);
    let bundle = pem_bundle(trusted);
    match plan::decide_leaf(
        spec,
        found.as_ref(),
        trusted,
        bundle.as_bytes(),
        now,
        policy,
    ) {
        LeafAction::Keep => summary.note(name, "kept"),
        LeafAction::Foreign => {
            warn!(secret = %name, "not made by ccm-certgen (no {}={} label): left alone", MANAGED_BY.0, MANAGED_BY.1);
            summary.note(name, "kept");
        }
        LeafAction::Bundle => {
            let mut data = existing
                .as_ref()
                .and_then(|s| s.data.clone())
                .unwrap_or_default();
            data.insert("ca.crt".into(), ByteString(bundle.into_bytes()));
            write_secret(api, name, existing, data).await?;
            summary.note(name, "updated ca.crt");
        }
        LeafAction::Issue(reason) => {
            let ca_der = trusted.first().map(Vec::as_slice).unwrap_or_default();
            let ca_end = pki::cert_info(ca_der)?.not_after;
            let (from, until) = plan::leaf_validity(now, ca_end, policy);
            let leaf = ca.issue(&spec.names, spec.usage, from, until)?;
            write_secret(
                api,
                name,
                existing,
                tls_map(&leaf.cert_pem, &leaf.key_pem, &bundle),
            )
            .await?;
            summary.note(name, format!("issued ({reason})"));
        }
    }
    Ok(())
}

/// Sets the caBundle of the mutating and validating webhook configurations `name`.
async fn patch_webhooks(
    client: &kube::Client,
    name: &str,
    ca_bundle_b64: &str,
    wait: Duration,
    summary: &mut Summary,
) -> Result<(), RunError> {
    for (kind, plural) in [
        (
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
        ),
        (
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
        ),
    ] {
        let url = format!("/apis/admissionregistration.k8s.io/v1/{plural}/{name}");
        let object = format!("{kind}/{name}");
        let started = tokio::time::Instant::now();
        let config: serde_json::Value = loop {
            let request = http::Request::get(&url)
                .body(Vec::new())
                .map_err(|e| api_err(format!("reading {object}"))(kube::Error::HttpError(e)))?;
            match client.request::<serde_json::Value>(request).await {
                Ok(config) => break config,
                Err(kube::Error::Api(status)) if status.code == 404 && started.elapsed() < wait => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    return Err(RunError::Missing {
                        kind,
                        name: name.to_owned(),
                        waited: wait,
                    });
                }
                Err(e) => return Err(api_err(format!("reading {object}"))(e)),
            }
        };
        let Some(patch) = plan::ca_bundle_patch(&config, ca_bundle_b64) else {
            summary.note(&object, "kept");
            continue;
        };
        let body = serde_json::to_vec(&patch)
            .map_err(|e| api_err(format!("patching {object}"))(kube::Error::SerdeError(e)))?;
        let request = http::Request::patch(&url)
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(body)
            .map_err(|e| api_err(format!("patching {object}"))(kube::Error::HttpError(e)))?;
        client
            .request::<serde_json::Value>(request)
            .await
            .map_err(api_err(format!("patching {object}")))?;
        summary.note(&object, "set caBundle");
    }
    Ok(())
}

/// One run: the CA, every leaf, then the webhook configurations' caBundle.
pub async fn run(
    client: &kube::Client,
    config: &Config,
    now: SystemTime,
) -> Result<Summary, RunError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let mut summary = Summary::default();
    let (ca, trusted) = ensure_ca(&secrets, config, now, &mut summary).await?;
    for spec in &config.leaves {
        ensure_leaf(
            &secrets,
            spec,
            &ca,
            &trusted,
            &config.policy,
            now,
            &mut summary,
        )
        .await?;
    }
    if let Some(name) = &config.webhook_configuration {
        let serving = config.webhook_serving_secret.clone().unwrap_or_default();
        let ca_crt = secrets
            .get_opt(&serving)
            .await
            .map_err(api_err(format!("reading secret {serving}")))?
            .as_ref()
            .map(tls_data)
            .and_then(|d| d.ca_crt)
            .ok_or_else(|| RunError::NoServingCa(serving.clone()))?;
        patch_webhooks(
            client,
            name,
            &base64_encode(&ca_crt),
            config.webhook_wait,
            &mut summary,
        )
        .await?;
    }
    Ok(summary)
}
