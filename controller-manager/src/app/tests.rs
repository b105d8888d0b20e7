//! Flag parsing and validation of the whole command line, with upstream's defaults
//! (`TestDefaultFlags`, `TestAddFlags` in upstream `options_test.go`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;

use super::Options;
use crate::cloud::ProviderEndpoint;
use crate::controllers::DeletionPolicy;

fn parse(args: &[&str]) -> Result<Options, clap::Error> {
    let mut full = vec![
        "cloud-controller-manager",
        "--provider-endpoint=unix:///tmp/s",
    ];
    full.extend_from_slice(args);
    Options::try_parse_from(full)
}

#[test]
fn default_flags_match_upstream() {
    let o = parse(&[]).unwrap();
    assert_eq!(o.generic.controllers, vec!["*"]);
    assert_eq!(
        o.generic.cluster_name, None,
        "upstream's kubernetes, applied in app.rs"
    );
    assert!(o.generic.leader_elect);
    assert_eq!(
        o.generic.leader_elect_lease_duration,
        Duration::from_secs(15)
    );
    assert_eq!(
        o.generic.leader_elect_renew_deadline,
        Duration::from_secs(10)
    );
    assert_eq!(o.generic.leader_elect_retry_period, Duration::from_secs(2));
    assert_eq!(o.generic.leader_elect_resource_lock, "leases");
    assert_eq!(
        o.generic.leader_elect_resource_name,
        "cloud-controller-manager"
    );
    assert_eq!(o.generic.leader_elect_resource_namespace, "kube-system");
    assert_eq!(o.generic.kube_api_qps, 20.0);
    assert_eq!(o.generic.kube_api_burst, 30);
    assert_eq!(o.controllers.cloud_node.concurrent_node_syncs, 1);
    assert_eq!(o.controllers.cloud_node.concurrent_node_status_updates, 0);
    assert_eq!(o.controllers.service_lb.concurrent_service_syncs, 1);
    assert_eq!(
        o.controllers.cloud_node.node_status_update_frequency,
        Duration::from_secs(300)
    );
    assert_eq!(
        o.controllers.cloud_node_lifecycle.node_monitor_period,
        Duration::from_secs(5)
    );
    assert_eq!(
        o.controllers.node_route.route_reconciliation_period,
        Duration::from_secs(10)
    );
    assert_eq!(o.generic.secure_port, 10258);
    assert_eq!(o.generic.bind_address.to_string(), "0.0.0.0");
    assert!(o.generic.configure_cloud_routes);
    assert!(!o.generic.allocate_node_cidrs);
    let policy = o.controllers.cloud_node_lifecycle.deletion_policy();
    assert_eq!(policy.grace_period, Duration::from_secs(60));
    assert_eq!(policy.confirmations, 2);
    assert_eq!(
        policy.budget.map(|b| (b.fraction, b.window)),
        Some((0.1, Duration::from_secs(600)))
    );
    o.validate().unwrap();
}

#[test]
fn add_flags_parses_every_flag() {
    let o = parse(&[
        "--kubeconfig=/k",
        "--controllers=cloud-node,-service",
        "--cluster-name=c1",
        "--cluster-cidr=10.0.0.0/16",
        "--leader-elect=false",
        "--leader-elect-lease-duration=30s",
        "--kube-api-qps=50",
        "--kube-api-burst=100",
        "--concurrent-node-syncs=5",
        "--concurrent-node-status-updates=7",
        "--node-status-update-frequency=10m",
        "--node-monitor-period=1m30s",
        "--secure-port=0",
        "--configure-cloud-routes=false",
    ])
    .unwrap();
    assert_eq!(o.generic.kubeconfig, "/k");
    assert_eq!(o.generic.controllers, vec!["cloud-node", "-service"]);
    assert!(!o.generic.leader_elect);
    assert_eq!(
        o.generic.leader_elect_lease_duration,
        Duration::from_secs(30)
    );
    assert_eq!(o.controllers.cloud_node.status_update_workers(), 7);
    assert_eq!(
        o.controllers.cloud_node_lifecycle.node_monitor_period,
        Duration::from_secs(90)
    );
    assert_eq!(
        o.controllers.cloud_node.node_status_update_frequency,
        Duration::from_secs(600)
    );
    assert!(!o.generic.configure_cloud_routes);
    assert_eq!(o.generic.cluster_name.as_deref(), Some("c1"));
    assert_eq!(o.generic.cluster_cidr.to_string(), "10.0.0.0/16");
    assert_eq!(o.generic.kube_api_qps, 50.0);
    assert_eq!(o.generic.kube_api_burst, 100);
    assert_eq!(o.controllers.cloud_node.concurrent_node_syncs, 5);
    assert_eq!(o.generic.secure_port, 0);
    o.validate().unwrap();
}

#[test]
fn upstream_deletion_behaviour_can_be_restored() {
    let o = parse(&[
        "--node-deletion-grace-period=0s",
        "--node-deletion-confirmations=1",
        "--node-deletion-budget-percent=0",
    ])
    .unwrap();
    assert_eq!(
        o.controllers.cloud_node_lifecycle.deletion_policy(),
        DeletionPolicy::upstream()
    );
}

#[test]
fn status_update_workers_default_to_node_syncs() {
    let o = parse(&["--concurrent-node-syncs=4"]).unwrap();
    assert_eq!(o.controllers.cloud_node.status_update_workers(), 4);
}

#[test]
fn unknown_flag_fails_fast() {
    let err = parse(&["--no-such-flag=1"]).unwrap_err();
    assert!(err.to_string().contains("--no-such-flag"), "{err}");
}

#[test]
fn invalid_duration_names_the_value() {
    let err = parse(&["--node-monitor-period=soon"]).unwrap_err();
    assert!(err.to_string().contains("soon"), "{err}");
}

#[test]
fn concurrent_node_syncs_must_be_positive() {
    let err = parse(&["--concurrent-node-syncs=0"])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("concurrent-node-syncs must be a positive number")
    );
}

#[test]
fn resource_lock_must_be_leases() {
    let err = parse(&["--leader-elect-resource-lock=endpoints"])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("leases"), "{err}");
}

#[test]
fn unknown_controller_is_rejected() {
    let err = parse(&["--controllers=cloud-node,bogus"])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn https_endpoint_needs_tls_files() {
    let o =
        Options::try_parse_from(["ccm", "--provider-endpoint=https://shim.example:10270"]).unwrap();
    let err = o.validate().unwrap_err();
    assert!(err.to_string().contains("--provider-ca-file"), "{err}");
}

#[test]
fn https_endpoint_server_name_defaults_to_host() {
    let o = Options::try_parse_from([
        "ccm",
        "--provider-endpoint=https://[::1]:10270",
        "--provider-tls-cert-file=/c",
        "--provider-tls-private-key-file=/k",
        "--provider-ca-file=/ca",
    ])
    .unwrap();
    match o.generic.provider_endpoint().unwrap() {
        ProviderEndpoint::Tls { server_name, .. } => assert_eq!(server_name, "::1"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn plain_http_endpoint_is_refused() {
    let o = Options::try_parse_from(["ccm", "--provider-endpoint=http://shim:10270"]).unwrap();
    let err = o.validate().unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
}

#[test]
fn kube_api_qps_is_bounded() {
    for bad in [
        "--kube-api-qps=0",
        "--kube-api-qps=0.0000001",
        "--kube-api-qps=NaN",
    ] {
        let err = parse(&[bad]).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("--kube-api-qps"), "{bad}: {err}");
    }
    let err = parse(&["--kube-api-burst=0"])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("--kube-api-burst"), "{err}");
}

#[test]
fn absurd_durations_are_refused() {
    let err = parse(&["--node-monitor-period=100000000000000y"]).unwrap_err();
    assert!(err.to_string().contains("--node-monitor-period"), "{err}");
    let err = parse(&["--leader-elect-lease-duration=400days"]).unwrap_err();
    assert!(err.to_string().contains("longer than a year"), "{err}");
}
