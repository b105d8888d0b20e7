//! `service-lb-validator`: asks the provider whether a load-balancer Service's settings are
//! acceptable, so a bad annotation is refused when it is applied rather than reported later as
//! an Event of a load balancer that never comes up. Pure rules: which requests are asked about
//! ([`lb_check`]) and how the provider's verdict is answered ([`lb_verdict`]).

use cpi_proto::v1 as pb;
use k8s_openapi::api::core::v1::Service;

use crate::review::Verdict;
use crate::view::service_view;

/// What to do with a Service admission request.
#[derive(Debug, Clone, PartialEq)]
pub enum LbCheck {
    /// Not the provider's business (not a LoadBalancer, another class, another operation).
    Skip,
    /// Ask ValidateLoadBalancer.
    Ask(Box<pb::ValidateLoadBalancerRequest>),
}

/// Decides whether `service` (and, on UPDATE, the stored `old`) is validated by the provider:
/// CREATE and UPDATE of a Service of type LoadBalancer without `loadBalancerClass` (a class
/// hands the Service to another controller). `raw` embeds the objects as JSON for providers
/// that asked for raw objects.
pub fn lb_check(
    operation: &str,
    service: &Service,
    old: Option<&Service>,
    cluster_name: &str,
    raw: bool,
) -> LbCheck {
    if operation != "CREATE" && operation != "UPDATE" {
        return LbCheck::Skip;
    }
    let Some(spec) = &service.spec else {
        return LbCheck::Skip;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") || spec.load_balancer_class.is_some() {
        return LbCheck::Skip;
    }
    LbCheck::Ask(Box::new(pb::ValidateLoadBalancerRequest {
        cluster_name: cluster_name.to_string(),
        service: Some(service_view(service, raw)),
        old_service: old
            .filter(|_| operation == "UPDATE")
            .map(|old| service_view(old, raw)),
    }))
}

/// The answer to the provider's verdict on the Service `name` (`namespace/name`): a denial
/// listing every offending field and why, or an allowance carrying the provider's warnings.
pub fn lb_verdict(name: &str, response: &pb::ValidateLoadBalancerResponse) -> Verdict {
    let mut verdict = if response.violations.is_empty() {
        Verdict::allow()
    } else {
        let reasons: Vec<String> = response
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect();
        Verdict::deny(
            422,
            "Invalid",
            format!(
                "Service {name:?} is refused by the cloud provider: {}",
                reasons.join("; ")
            ),
        )
    };
    verdict.warnings.extend(response.warnings.iter().cloned());
    if response.requires_replacement {
        verdict.warnings.push(format!(
            "Service {name:?}: this change replaces its cloud load balancer (its address may change)"
        ));
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default",
                         "annotations": {"example.com/pool": "blue"}},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn load_balancer_services_are_asked_about_on_create_and_update() {
        let svc = service(json!({"type": "LoadBalancer", "ports": [{"port": 80}]}));
        let old = service(json!({"type": "LoadBalancer"}));
        let LbCheck::Ask(create) = lb_check("CREATE", &svc, None, "kubernetes", false) else {
            panic!("CREATE must be validated");
        };
        let view = create.service.unwrap();
        assert_eq!(create.cluster_name, "kubernetes");
        assert_eq!(
            view.metadata.unwrap().annotations["example.com/pool"],
            "blue"
        );
        assert_eq!(view.ports[0].protocol, "TCP");
        assert!(create.old_service.is_none());
        let LbCheck::Ask(update) = lb_check("UPDATE", &svc, Some(&old), "k", true) else {
            panic!("UPDATE must be validated");
        };
        assert!(update.old_service.is_some());
        assert!(!update.service.unwrap().raw_json.is_empty());
    }

    #[test]
    fn other_services_and_operations_are_skipped() {
        let lb = service(json!({"type": "LoadBalancer"}));
        assert_eq!(lb_check("DELETE", &lb, None, "k", false), LbCheck::Skip);
        assert_eq!(lb_check("CONNECT", &lb, None, "k", false), LbCheck::Skip);
        let cluster_ip = service(json!({"type": "ClusterIP"}));
        assert_eq!(
            lb_check("CREATE", &cluster_ip, None, "k", false),
            LbCheck::Skip
        );
        let classed = service(json!({"type": "LoadBalancer", "loadBalancerClass": "other/lb"}));
        assert_eq!(
            lb_check("CREATE", &classed, None, "k", false),
            LbCheck::Skip
        );
    }

    #[test]
    fn violations_become_one_denial_naming_each_field() {
        let response = pb::ValidateLoadBalancerResponse {
            violations: vec![
                pb::Violation {
                    field: "metadata.annotations[example.com/pool]".into(),
                    message: "no pool \"blue\"".into(),
                },
                pb::Violation {
                    field: "spec.loadBalancerSourceRanges[0]".into(),
                    message: "not a CIDR".into(),
                },
            ],
            warnings: vec!["w".into()],
            requires_replacement: false,
        };
        let verdict = lb_verdict("default/web", &response);
        assert!(!verdict.allowed);
        let status = verdict.status.unwrap();
        assert_eq!(status.code, 422);
        assert_eq!(
            status.message,
            "Service \"default/web\" is refused by the cloud provider: \
             metadata.annotations[example.com/pool]: no pool \"blue\"; \
             spec.loadBalancerSourceRanges[0]: not a CIDR"
        );
        assert_eq!(verdict.warnings, ["w"]);
    }

    #[test]
    fn no_violation_is_allowed_with_a_replacement_warning() {
        let response = pb::ValidateLoadBalancerResponse {
            requires_replacement: true,
            ..Default::default()
        };
        let verdict = lb_verdict("default/web", &response);
        assert!(verdict.allowed);
        assert!(verdict.warnings[0].contains("replaces its cloud load balancer"));
    }
}
