//! The thin executor between a parsed review and the pure rules: checks the kind, reads the
//! object, asks the shim what the rules need within the deadline, and turns a missing answer
//! into the webhook's failure-policy verdict, saying why.

use std::collections::BTreeMap;

use cpi_proto::v1::Capability;
use k8s_openapi::api::core::v1::{PersistentVolume, Service};
use serde_json::Value;
use tokio::time::Instant;

use crate::lb_validator::{LbCheck, lb_check, lb_verdict};
use crate::options::{FailurePolicy, Webhook};
use crate::provider::{Shim, has_capability};
use crate::pv_labeler::{LabelSource, label_patch, label_source, query_error, shim_is_asked};
use crate::review::{AdmissionRequest, BadReview, Verdict};

/// Everything a review needs besides the request.
pub(crate) struct Admitter {
    /// The shim.
    pub shim: Shim,
    /// `--cluster-name`.
    pub cluster_name: String,
    /// `--pv-labeler-failure-policy`.
    pub pv_policy: FailurePolicy,
    /// `--service-lb-validator-failure-policy`.
    pub lb_policy: FailurePolicy,
}

impl Admitter {
    /// The verdict of `webhook` on `request`, to be given by `deadline`.
    pub async fn admit(
        &self,
        webhook: Webhook,
        request: &AdmissionRequest,
        deadline: Instant,
    ) -> Result<Verdict, BadReview> {
        match webhook {
            Webhook::PvLabeler => self.label_volume(request, deadline).await,
            Webhook::ServiceLbValidator => self.validate_service(request, deadline).await,
        }
    }

    async fn label_volume(
        &self,
        request: &AdmissionRequest,
        deadline: Instant,
    ) -> Result<Verdict, BadReview> {
        let webhook = Webhook::PvLabeler;
        check_kind(webhook, request, "PersistentVolume")?;
        if request.operation != "CREATE" {
            return Ok(Verdict::allow());
        }
        let object = request.object.as_ref().ok_or(BadReview::NoObject)?;
        let pv: PersistentVolume = typed(object, "PersistentVolume")?;
        let fail = |why: String| failure(webhook, self.pv_policy, why);
        // The raw object is only sent to a provider that asked for it, so its self-description
        // is needed first; it is cached after the first call.
        let info = match self.shim.info(remaining(deadline)).await {
            Ok(info) => info,
            Err(err) => {
                // Nothing to ask about: no shim answer is needed for this volume.
                return Ok(match label_source(&pv, None) {
                    LabelSource::Unlabelled => Verdict::allow(),
                    LabelSource::Trusted(labels) => patch_verdict(object, &labels),
                    LabelSource::Provider { subject, .. } => fail(query_error(&subject, &err)),
                });
            }
        };
        let raw = info
            .wants_raw_objects
            .then(|| object.to_string().into_bytes());
        let labels = match label_source(&pv, raw) {
            LabelSource::Unlabelled => return Ok(Verdict::allow()),
            LabelSource::Trusted(labels) => labels,
            LabelSource::Provider { .. } if !has_capability(&info, Capability::VolumeLabels) => {
                return Ok(Verdict::allow());
            }
            // A CSI volume of a driver the shim does not declare is not the shim's to label.
            LabelSource::Provider { volume, .. } if !shim_is_asked(&volume, &info.csi_drivers) => {
                return Ok(Verdict::allow());
            }
            LabelSource::Provider { volume, subject } => {
                match self
                    .shim
                    .labels_for_volume(*volume, remaining(deadline))
                    .await
                {
                    Ok(response) => response.labels.into_iter().collect(),
                    Err(err) => return Ok(fail(query_error(&subject, &err))),
                }
            }
        };
        Ok(patch_verdict(object, &labels))
    }

    async fn validate_service(
        &self,
        request: &AdmissionRequest,
        deadline: Instant,
    ) -> Result<Verdict, BadReview> {
        let webhook = Webhook::ServiceLbValidator;
        check_kind(webhook, request, "Service")?;
        if request.operation != "CREATE" && request.operation != "UPDATE" {
            return Ok(Verdict::allow());
        }
        let object = request.object.as_ref().ok_or(BadReview::NoObject)?;
        let service: Service = typed(object, "Service")?;
        let old: Option<Service> = match &request.old_object {
            Some(old) if !old.is_null() => Some(typed(old, "Service")?),
            _ => None,
        };
        let name = format!("{}/{}", request.namespace, object_name(request, object));
        let fail = |why: String| {
            failure(
                webhook,
                self.lb_policy,
                format!("validating the load balancer of Service {name:?}: {why}"),
            )
        };
        if lb_check(&request.operation, &service, old.as_ref(), "", false) == LbCheck::Skip {
            return Ok(Verdict::allow());
        }
        let info = match self.shim.info(remaining(deadline)).await {
            Ok(info) => info,
            Err(err) => return Ok(fail(err.to_string())),
        };
        if !has_capability(&info, Capability::LoadBalancerValidation) {
            return Ok(Verdict::allow());
        }
        let LbCheck::Ask(message) = lb_check(
            &request.operation,
            &service,
            old.as_ref(),
            &self.cluster_name,
            info.wants_raw_objects,
        ) else {
            return Ok(Verdict::allow());
        };
        match self
            .shim
            .validate_load_balancer(*message, remaining(deadline))
            .await
        {
            Ok(response) => Ok(lb_verdict(&name, &response)),
            Err(err) => Ok(fail(err.to_string())),
        }
    }
}

/// The name of the object under review (`generateName` objects have none yet).
fn object_name<'a>(request: &'a AdmissionRequest, object: &'a Value) -> &'a str {
    if !request.name.is_empty() {
        return &request.name;
    }
    object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The labelling patch, or a denial when a zone label cannot be read (as the in-tree plugin).
fn patch_verdict(object: &Value, labels: &BTreeMap<String, String>) -> Verdict {
    match label_patch(object, labels) {
        Ok(ops) => Verdict::patched(ops),
        Err(err) => Verdict::deny(403, "Forbidden", err.to_string()),
    }
}

/// The verdict when the shim gave no answer: the failure policy decides, the message says why.
fn failure(webhook: Webhook, policy: FailurePolicy, why: String) -> Verdict {
    match policy {
        FailurePolicy::Fail => {
            tracing::info!(webhook = webhook.name(), reason = %why, "denied by the failure policy");
            Verdict::deny(403, "Forbidden", why)
        }
        FailurePolicy::Ignore => {
            tracing::warn!(webhook = webhook.name(), reason = %why, "admitted unchanged by the failure policy");
            Verdict::allow().with_warning(format!(
                "{why}; admitted unchanged (failure policy Ignore of webhook {})",
                webhook.name()
            ))
        }
    }
}

/// Refuses a request for an object this webhook does not review (a misconfigured rule).
fn check_kind(
    webhook: Webhook,
    request: &AdmissionRequest,
    expected: &'static str,
) -> Result<(), BadReview> {
    let kind = &request.kind;
    if kind.group.is_empty() && kind.version == "v1" && kind.kind == expected {
        return Ok(());
    }
    let group = if kind.group.is_empty() {
        String::new()
    } else {
        format!("{}/", kind.group)
    };
    Err(BadReview::UnexpectedKind {
        webhook: webhook.name(),
        expected,
        got: format!("{group}{}, Kind={}", kind.version, kind.kind),
    })
}

fn typed<T: serde::de::DeserializeOwned>(
    object: &Value,
    kind: &'static str,
) -> Result<T, BadReview> {
    T::deserialize(object).map_err(|source| BadReview::BadObject { kind, source })
}

fn remaining(deadline: Instant) -> std::time::Duration {
    deadline.saturating_duration_since(Instant::now())
}
