//! Unit tests of the pure parts of the cloud-node controller, named after the upstream cases in
//! `node_controller_test.go` and `node/helpers/address_test.go`.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::k8s::truncated;
use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, Taint};

fn addr(kind: &str, address: &str) -> NodeAddress {
    NodeAddress {
        type_: kind.into(),
        address: address.into(),
    }
}

fn tainted_node(extra_taints: &[&str]) -> Node {
    let mut taints = vec![Taint {
        key: TAINT_UNINITIALIZED.into(),
        value: Some("true".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }];
    for key in extra_taints {
        taints.push(Taint {
            key: (*key).into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }
    let mut node = Node::default();
    node.metadata.name = Some("node0".into());
    node.spec = Some(NodeSpec {
        taints: Some(taints),
        ..Default::default()
    });
    node
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn zone_region_topology_labels_added() {
    let mut node = tainted_node(&[]);
    let md = NodeMetadata {
        provider_id: "aws://12345".into(),
        zone: "us-west-1a".into(),
        region: "us-west".into(),
        ..Default::default()
    };
    apply_initialization(&mut node, &md).unwrap();
    assert_eq!(
        node.metadata.labels.unwrap(),
        labels(&[
            (LABEL_ZONE_BETA, "us-west-1a"),
            (LABEL_ZONE, "us-west-1a"),
            (LABEL_REGION_BETA, "us-west"),
            (LABEL_REGION, "us-west"),
        ])
    );
    let spec = node.spec.unwrap();
    assert_eq!(spec.provider_id.as_deref(), Some("aws://12345"));
    assert!(spec.taints.unwrap().is_empty());
}

#[test]
fn node_addresses_other_taint_kept() {
    let mut node = tainted_node(&["ImproveCoverageTaint"]);
    apply_initialization(&mut node, &NodeMetadata::default()).unwrap();
    let taints = node.spec.unwrap().taints.unwrap();
    assert_eq!(taints.len(), 1);
    assert_eq!(taints[0].key, "ImproveCoverageTaint");
}

#[test]
fn provider_id_already_set_is_kept() {
    let mut node = tainted_node(&[]);
    node.spec.as_mut().unwrap().provider_id = Some("test-provider-id".into());
    let md = NodeMetadata {
        provider_id: "fake://12345".into(),
        ..Default::default()
    };
    apply_initialization(&mut node, &md).unwrap();
    assert_eq!(
        node.spec.unwrap().provider_id.as_deref(),
        Some("test-provider-id")
    );
}

#[test]
fn instance_type_labels_overwrite_existing_values() {
    let mut node = tainted_node(&[]);
    node.metadata.labels = Some(labels(&[(LABEL_INSTANCE_TYPE, "old")]));
    let md = NodeMetadata {
        instance_type: "t1.micro".into(),
        ..Default::default()
    };
    apply_initialization(&mut node, &md).unwrap();
    let l = node.metadata.labels.unwrap();
    assert_eq!(l[LABEL_INSTANCE_TYPE], "t1.micro");
    assert_eq!(l[LABEL_INSTANCE_TYPE_BETA], "t1.micro");
}

#[test]
fn instance_v2_provided_additional_labels_with_labels_to_discard() {
    let mut node = tainted_node(&[]);
    node.metadata.labels = Some(labels(&[
        ("my.custom.label/foo", "fizz"),
        ("my.custom.label/bar", "foo"),
    ]));
    let md = NodeMetadata {
        zone: "us-west-1a".into(),
        region: "us-west".into(),
        additional_labels: labels(&[
            ("topology.kubernetes.io/region", "us-other-west"),
            ("topology.k8s.io/region", "us-other-west"),
            ("kubernetes.io/region", "us-other-west"),
            ("k8s.io/region", "us-other-west"),
            ("my.custom.label/foo", "bar"),
            ("my.custom.label/bar", "foo"),
            ("app.k8snio/bar", "foo"),
            ("k8snio/bar", "foo"),
        ]),
        ..Default::default()
    };
    apply_initialization(&mut node, &md).unwrap();
    assert_eq!(
        node.metadata.labels.unwrap(),
        labels(&[
            (LABEL_ZONE_BETA, "us-west-1a"),
            (LABEL_ZONE, "us-west-1a"),
            (LABEL_REGION_BETA, "us-west"),
            (LABEL_REGION, "us-west"),
            ("my.custom.label/foo", "fizz"),
            ("my.custom.label/bar", "foo"),
            ("app.k8snio/bar", "foo"),
            ("k8snio/bar", "foo"),
        ])
    );
}

#[test]
fn provided_node_ip_address_is_not_valid() {
    let mut node = tainted_node(&[]);
    node.metadata.annotations = Some(labels(&[(ANNOTATION_PROVIDED_NODE_IP, "invalid-ip")]));
    let before = node.clone();
    let md = NodeMetadata {
        addresses: vec![addr("InternalIP", "10.0.0.1")],
        ..Default::default()
    };
    assert!(matches!(
        apply_initialization(&mut node, &md),
        Err(SyncError::ProvidedNodeIp { .. })
    ));
    assert_eq!(node, before);
}

#[test]
fn provided_node_ip_address_is_not_present() {
    let mut node = tainted_node(&[]);
    node.metadata.annotations = Some(labels(&[(ANNOTATION_PROVIDED_NODE_IP, "10.0.0.2")]));
    let md = NodeMetadata {
        addresses: vec![addr("InternalIP", "10.0.0.1")],
        ..Default::default()
    };
    let before = node.clone();
    let err = apply_initialization(&mut node, &md)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10.0.0.2") && err.contains("10.0.0.1"),
        "{err}"
    );
    assert_eq!(node, before);
}

#[test]
fn reconcile_labels_requires_reconcile() {
    let l = labels(&[
        (LABEL_ZONE_BETA, "foo"),
        (LABEL_REGION_BETA, "bar"),
        (LABEL_INSTANCE_TYPE_BETA, "the-best-type"),
    ]);
    assert_eq!(
        labels_to_reconcile(&Labels::from(l)),
        Some(labels(&[
            (LABEL_ZONE, "foo"),
            (LABEL_REGION, "bar"),
            (LABEL_INSTANCE_TYPE, "the-best-type"),
        ]))
    );
}

#[test]
fn reconcile_labels_does_not_require_reconcile() {
    let l = labels(&[
        (LABEL_ZONE_BETA, "foo"),
        (LABEL_REGION_BETA, "bar"),
        (LABEL_INSTANCE_TYPE_BETA, "the-best-type"),
        (LABEL_ZONE, "foo"),
        (LABEL_REGION, "bar"),
        (LABEL_INSTANCE_TYPE, "the-best-type"),
    ]);
    assert_eq!(labels_to_reconcile(&Labels::from(l)), None);
}

#[test]
fn reconcile_labels_secondary_labels_are_different_from_primary() {
    let l = labels(&[
        (LABEL_ZONE_BETA, "foo"),
        (LABEL_REGION_BETA, "bar"),
        (LABEL_INSTANCE_TYPE_BETA, "the-best-type"),
        (LABEL_ZONE, "wrongfoo"),
        (LABEL_REGION, "wrongbar"),
        (LABEL_INSTANCE_TYPE, "the-wrong-type"),
    ]);
    assert_eq!(
        labels_to_reconcile(&Labels::from(l)),
        Some(labels(&[
            (LABEL_ZONE, "foo"),
            (LABEL_REGION, "bar"),
            (LABEL_INSTANCE_TYPE, "the-best-type"),
        ]))
    );
}

#[test]
fn node_addresses_change_detected_cases() {
    let base = vec![
        addr("InternalIP", "10.0.0.1"),
        addr("ExternalIP", "1.1.1.1"),
    ];
    assert!(!node_addresses_change_detected(&base, &base));
    let mut ext = base.clone();
    ext[1].address = "2.2.2.2".into();
    assert!(node_addresses_change_detected(&base, &ext));
    let mut more = base.clone();
    more.push(addr("Hostname", "h"));
    assert!(node_addresses_change_detected(&more, &base));
    assert!(node_addresses_change_detected(&base, &more));
    let swapped = vec![
        addr("ExternalIP", "10.0.0.1"),
        addr("InternalIP", "1.1.1.1"),
    ];
    assert!(node_addresses_change_detected(&base, &swapped));
}

#[test]
fn node_addresses_not_update_while_tainted() {
    let node = tainted_node(&[]);
    assert_eq!(
        desired_addresses(
            &CachedNode::from(node.clone()),
            &[addr("InternalIP", "10.0.0.1")]
        )
        .unwrap(),
        None
    );
}

#[test]
fn cloud_provider_missing_hostname_keeps_kubelet_hostname() {
    let node = Node {
        status: Some(NodeStatus {
            addresses: Some(vec![addr("Hostname", "nodeoverriden")]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let new = desired_addresses(
        &CachedNode::from(node),
        &[
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
        ],
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        new,
        vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("Hostname", "nodeoverriden"),
        ]
    );
}

#[test]
fn empty_cloud_addresses_never_clear() {
    let node = Node {
        status: Some(NodeStatus {
            addresses: Some(vec![addr("InternalIP", "10.0.0.1")]),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        desired_addresses(&CachedNode::from(node.clone()), &[]).unwrap(),
        None
    );
}

mod node_ip {
    use super::*;

    #[test]
    fn single_internal_ip_match() {
        let cloud = vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("10.0.0.1", &cloud).unwrap(),
            cloud
        );
    }

    #[test]
    fn node_ip_is_external_ip() {
        let cloud = vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "55.55.55.55"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("55.55.55.55", &cloud).unwrap(),
            vec![
                addr("ExternalIP", "55.55.55.55"),
                addr("InternalIP", "10.0.0.1")
            ]
        );
    }

    #[test]
    fn internal_and_external_share_ips() {
        let cloud = vec![
            addr("InternalIP", "55.55.55.55"),
            addr("ExternalIP", "55.55.55.55"),
            addr("ExternalIP", "44.44.44.44"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("55.55.55.55", &cloud).unwrap(),
            vec![
                addr("InternalIP", "55.55.55.55"),
                addr("ExternalIP", "55.55.55.55")
            ]
        );
    }

    #[test]
    fn dns_names_are_kept_in_order() {
        let cloud = vec![
            addr("InternalIP", "10.0.0.1"),
            addr("ExternalIP", "132.143.154.163"),
            addr("InternalDNS", "ip-10-0-0-1.ec2.internal"),
            addr("Hostname", "node0"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("10.0.0.1", &cloud).unwrap(),
            cloud
        );
    }

    #[test]
    fn multiple_internal_ips_keep_only_the_match() {
        let cloud = vec![
            addr("InternalIP", "10.0.0.1"),
            addr("InternalIP", "10.0.0.2"),
            addr("ExternalIP", "132.143.154.163"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("10.0.0.2", &cloud).unwrap(),
            vec![
                addr("InternalIP", "10.0.0.2"),
                addr("ExternalIP", "132.143.154.163")
            ]
        );
    }

    #[test]
    fn node_ip_absent_is_an_error() {
        let cloud = vec![addr("InternalIP", "10.0.0.1")];
        assert!(node_addresses_from_node_ip("10.0.0.9", &cloud).is_err());
    }

    #[test]
    fn ipv6_textual_forms_match() {
        let cloud = vec![addr("InternalIP", "0:0:0:0:0:0:0:ba3d")];
        assert_eq!(
            node_addresses_from_node_ip("::ba3d", &cloud).unwrap(),
            cloud
        );
    }

    #[test]
    fn single_stack_cloud_dual_stack_request_is_an_error() {
        let cloud = vec![addr("InternalIP", "10.0.0.1")];
        assert!(node_addresses_from_node_ip("10.0.0.1,fd00::1", &cloud).is_err());
    }

    #[test]
    fn dual_stack_ipv6_first_orders_by_node_ip() {
        let cloud = vec![
            addr("InternalIP", "10.0.0.1"),
            addr("InternalIP", "fd00::1"),
        ];
        assert_eq!(
            node_addresses_from_node_ip("fd00::1,10.0.0.1", &cloud).unwrap(),
            vec![
                addr("InternalIP", "fd00::1"),
                addr("InternalIP", "10.0.0.1")
            ]
        );
    }

    #[test]
    fn annotation_rules() {
        assert!(parse_node_ip_annotation("10.0.0.1").is_ok());
        assert!(parse_node_ip_annotation("10.0.0.1,fd00::1").is_ok());
        assert!(parse_node_ip_annotation("10.0.0.1,10.0.0.2").is_err());
        assert!(parse_node_ip_annotation("10.0.0.1,fd00::1,fd00::2").is_err());
        assert!(parse_node_ip_annotation("0.0.0.0,fd00::1").is_err());
        assert!(parse_node_ip_annotation("nope").is_err());
    }
}

#[test]
fn reserved_label_namespaces() {
    for key in [
        "kubernetes.io/x",
        "k8s.io/x",
        "node.kubernetes.io/x",
        "a.k8s.io/x",
    ] {
        assert!(is_reserved_label(key), "{key}");
    }
    for key in ["k8snio/x", "app.k8snio/x", "mykubernetes.io/x", "plain"] {
        assert!(!is_reserved_label(key), "{key}");
    }
}

#[test]
fn backoff_is_exponential_and_capped() {
    assert_eq!(backoff(1), Duration::from_millis(5));
    assert_eq!(backoff(2), Duration::from_millis(10));
    assert_eq!(backoff(40), Duration::from_secs(1000));
}

#[test]
fn condition_messages_are_cut_on_a_character_boundary() {
    assert_eq!(truncated("short".into(), 10), "short");
    let cut = truncated("é".repeat(20), 10);
    assert!(cut.len() <= 10, "{cut}");
    assert!(cut.ends_with("..."));
    assert!(cut.starts_with("ééé"));
}
