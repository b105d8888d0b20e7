//! Registering `cloud-provider-webhook` with an API server, as a deployment would: both
//! webhooks at `https://127.0.0.1:<port>/<name>` with the test CA as caBundle.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::{WaitError, wait_for};

/// Objects carrying this label (with the test's own value) are sent to the test's webhooks, so
/// that other tests sharing the API server never meet them.
pub const WEBHOOK_TEST_LABEL: &str = "webhook-test";

/// The two configurations registering the webhooks for one test's objects.
#[derive(Debug, Clone)]
pub struct WebhookRegistration {
    /// `pv-labeler` on PersistentVolume CREATE, named `<test>-pv`.
    pub mutating: MutatingWebhookConfiguration,
    /// `service-lb-validator` on Service CREATE and UPDATE, named `<test>-svc`.
    pub validating: ValidatingWebhookConfiguration,
}

impl WebhookRegistration {
    /// Both webhooks served on `127.0.0.1:<port>` with the certificate authority `ca_pem`, for
    /// objects labelled [`WEBHOOK_TEST_LABEL`]` = test`; failure policy `Fail`, 10 s timeout.
    pub fn new(test: &str, port: u16, ca_pem: &str) -> Self {
        let client_config = |path: &str| WebhookClientConfig {
            url: Some(format!("https://127.0.0.1:{port}{path}")),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: None,
        };
        let rule = |resource: &str, operations: &[&str], scope: &str| RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(operations.iter().map(|o| o.to_string()).collect()),
            resources: Some(vec![resource.into()]),
            scope: Some(scope.into()),
        };
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([(
                WEBHOOK_TEST_LABEL.to_string(),
                test.to_string(),
            )])),
            ..Default::default()
        };
        let versions = vec!["v1".to_string(), "v1beta1".to_string()];
        let meta = |suffix: &str| ObjectMeta {
            name: Some(format!("{test}-{suffix}")),
            ..Default::default()
        };
        Self {
            mutating: MutatingWebhookConfiguration {
                metadata: meta("pv"),
                webhooks: Some(vec![MutatingWebhook {
                    name: "pv-labeler.test.example.com".into(),
                    client_config: client_config("/pv-labeler"),
                    rules: Some(vec![rule("persistentvolumes", &["CREATE"], "*")]),
                    admission_review_versions: versions.clone(),
                    side_effects: "None".into(),
                    failure_policy: Some("Fail".into()),
                    timeout_seconds: Some(10),
                    object_selector: Some(selector.clone()),
                    ..Default::default()
                }]),
            },
            validating: ValidatingWebhookConfiguration {
                metadata: meta("svc"),
                webhooks: Some(vec![ValidatingWebhook {
                    name: "service-lb-validator.test.example.com".into(),
                    client_config: client_config("/service-lb-validator"),
                    rules: Some(vec![rule("services", &["CREATE", "UPDATE"], "Namespaced")]),
                    admission_review_versions: versions,
                    side_effects: "None".into(),
                    failure_policy: Some("Fail".into()),
                    timeout_seconds: Some(10),
                    object_selector: Some(selector),
                    ..Default::default()
                }]),
            },
        }
    }
}

/// Waits up to `timeout` until `create(attempt)` (1, 2, …; a fresh object name each time) is
/// refused, and returns the refusal: an API server starts calling a newly registered webhook
/// only after a moment, so the first objects may be stored. `create` answers the name of the
/// object stored, or the API server's error.
pub async fn wait_refused<F, Fut, E>(
    what: &str,
    timeout: Duration,
    mut create: F,
) -> Result<String, WaitError>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<String, E>>,
    E: Display,
{
    let mut attempt = 0;
    wait_for(what, timeout, || {
        attempt += 1;
        let created = create(attempt);
        async move {
            match created.await {
                Ok(name) => Err(format!("{name} was stored")),
                Err(err) => Ok(err.to_string()),
            }
        }
    })
    .await
}
