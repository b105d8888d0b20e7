//! The admission-time services of the real `local-shim` binary over mutual TLS: its
//! LoadBalancerValidation verdicts (a good Service passes, each bad field is reported with its
//! path, the same after a restart) and VolumeLabels with and without `--csi-driver-name`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod routes_support;

use cpi_proto::v1 as pb;
use cpi_proto::v1::load_balancer_validation_client::LoadBalancerValidationClient;
use cpi_proto::v1::volume_labels_client::VolumeLabelsClient;
use cpi_transport::CpiChannel;
use routes_support::{CLUSTER, Shim, ShimDir};

const LB_CONFIG: &str = "pools:\n  - name: blue\n    addresses: [127.0.101.0/24]\n  - name: green\n    \
                         addresses: [127.0.102.10-127.0.102.20]\n    autoAssign: false\n";
const POOL: &str = "lb.local-shim/address-pool";
const IP: &str = "lb.local-shim/load-balancer-ip";
const RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
const DRIVER: &str = "local.csi.example";

async fn start(dir: &ShimDir, extra: &[&str]) -> Shim {
    let mut args = vec![
        format!("--lb-config={}", dir.path().join("lb.yaml").display()),
        "--routes=state-only".to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    dir.start(&args).await
}

fn shim_dir() -> ShimDir {
    let dir = ShimDir::new();
    std::fs::write(dir.path().join("lb.yaml"), LB_CONFIG).unwrap();
    dir
}

/// A Service as the API server admits it on CREATE (no UID, no node ports yet).
fn service(annotations: &[(&str, &str)], f: impl FnOnce(&mut pb::Service)) -> pb::Service {
    let mut svc = pb::Service {
        metadata: Some(pb::ObjectMeta {
            name: "web".into(),
            namespace: "default".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        r#type: "LoadBalancer".into(),
        ports: vec![
            pb::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                ..Default::default()
            },
            pb::ServicePort {
                name: "dns".into(),
                protocol: "UDP".into(),
                port: 53,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    f(&mut svc);
    svc
}

/// `(field, message)` of each violation.
async fn verdict(channel: &CpiChannel, svc: &pb::Service) -> Vec<(String, String)> {
    LoadBalancerValidationClient::new(channel.clone())
        .validate_load_balancer(pb::ValidateLoadBalancerRequest {
            cluster_name: CLUSTER.into(),
            service: Some(svc.clone()),
            old_service: None,
        })
        .await
        .unwrap()
        .into_inner()
        .violations
        .into_iter()
        .map(|v| (v.field, v.message))
        .collect()
}

/// A case: name, Service, the violated fields with a piece of each message.
type Case = (&'static str, pb::Service, Vec<(String, &'static str)>);

fn cases() -> Vec<Case> {
    let ann = |key: &str| format!("metadata.annotations[{key}]");
    vec![
        ("good Service", service(&[], |_| {}), vec![]),
        (
            "good Service with a pool, an address in it and source ranges",
            service(&[(POOL, "green"), (RANGES, "10.0.0.0/8, fd00::/8")], |s| {
                s.load_balancer_ip = Some("127.0.102.15".into());
            }),
            vec![],
        ),
        (
            "unknown pool",
            service(&[(POOL, "red")], |_| {}),
            vec![(ann(POOL), "no pool named \"red\" (pools: blue, green)")],
        ),
        (
            "address annotation outside every pool",
            service(&[(IP, "192.0.2.1")], |_| {}),
            vec![(ann(IP), "192.0.2.1 is in no pool")],
        ),
        (
            "loadBalancerIP outside the named pool",
            service(&[(POOL, "green")], |s| {
                s.load_balancer_ip = Some("127.0.101.7".into());
            }),
            vec![(
                "spec.loadBalancerIP".into(),
                "is in pool blue, not in the requested pool green",
            )],
        ),
        (
            "loadBalancerIP of a family the Service does not allow",
            service(&[], |s| {
                s.ip_families = vec!["IPv4".into()];
                s.load_balancer_ip = Some("fd00::1".into());
            }),
            vec![(
                "spec.loadBalancerIP".into(),
                "not one of the Service's ipFamilies",
            )],
        ),
        (
            "bad source ranges, each",
            service(&[], |s| {
                s.load_balancer_source_ranges = vec!["10.0.0.0/33".into(), "1.2.3.4".into()];
            }),
            vec![
                (
                    "spec.loadBalancerSourceRanges[0]".into(),
                    "prefix must be 0..=32",
                ),
                ("spec.loadBalancerSourceRanges[1]".into(), "missing /prefix"),
            ],
        ),
        (
            "bad source-ranges annotation entry",
            service(&[(RANGES, "10.0.0.0/8,nope")], |_| {}),
            vec![(format!("{}[1]", ann(RANGES)), "\"nope\" is not a CIDR")],
        ),
        (
            "SCTP port",
            service(&[], |s| s.ports[1].protocol = "SCTP".into()),
            vec![("spec.ports[1].protocol".into(), "port dns (53) is SCTP")],
        ),
        (
            "all at once",
            service(&[(POOL, "red"), (RANGES, "x")], |s| {
                s.ports[0].protocol = "SCTP".into();
            }),
            vec![
                (format!("{}[0]", ann(RANGES)), "\"x\" is not a CIDR"),
                ("spec.ports[0].protocol".into(), "port http (80) is SCTP"),
                (ann(POOL), "no pool named \"red\""),
            ],
        ),
    ]
}

async fn assert_cases(channel: &CpiChannel, run: &str) {
    for (name, svc, want) in cases() {
        let got = verdict(channel, &svc).await;
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        let want_fields: Vec<&str> = want.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, want_fields, "{run}: {name}: {got:?}");
        for ((_, message), (_, piece)) in got.iter().zip(&want) {
            assert!(message.contains(piece), "{run}: {name}: {message:?}");
        }
    }
}

#[tokio::test]
async fn validate_load_balancer_over_mtls_survives_a_restart() {
    let dir = shim_dir();
    let first = start(&dir, &[]).await;
    let info = pb::provider_client::ProviderClient::new(first.channel.clone())
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.capabilities
            .contains(&(pb::Capability::LoadBalancerValidation as i32))
    );
    assert!(
        !info
            .capabilities
            .contains(&(pb::Capability::VolumeLabels as i32)),
        "no --csi-driver-name: nothing to label"
    );
    assert!(info.csi_drivers.is_empty(), "{:?}", info.csi_drivers);
    assert_cases(&first.channel, "first run").await;
    first.process.kill();
    drop(first);

    let second = start(&dir, &[]).await;
    assert_cases(&second.channel, "after a restart").await;
}

async fn labels(
    channel: &CpiChannel,
    source: pb::persistent_volume::Source,
) -> Result<Vec<(String, String)>, tonic::Status> {
    let response = VolumeLabelsClient::new(channel.clone())
        .get_labels_for_volume(pb::GetLabelsForVolumeRequest {
            volume: Some(pb::PersistentVolume {
                source: Some(source),
                ..Default::default()
            }),
        })
        .await?;
    let mut labels: Vec<_> = response.into_inner().labels.into_iter().collect();
    labels.sort();
    Ok(labels)
}

fn csi(driver: &str, machine: &str) -> pb::persistent_volume::Source {
    pb::persistent_volume::Source::Csi(pb::CsiVolumeSource {
        driver: driver.into(),
        volume_handle: "vol-1".into(),
        volume_attributes: [(
            local_shim::MACHINE_ATTRIBUTE.to_string(),
            machine.to_string(),
        )]
        .into_iter()
        .collect(),
    })
}

#[tokio::test]
async fn volume_labels_over_mtls_for_the_declared_csi_driver() {
    let dir = shim_dir();
    let shim = start(&dir, &[&format!("--csi-driver-name={DRIVER}")]).await;
    let info = pb::provider_client::ProviderClient::new(shim.channel.clone())
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.capabilities
            .contains(&(pb::Capability::VolumeLabels as i32))
    );
    // Declared, so the webhook asks about this driver's volumes only.
    assert_eq!(info.csi_drivers, vec![DRIVER.to_string()]);
    // The example inventory: node-a is in zone-a of region local-1.
    assert_eq!(
        labels(&shim.channel, csi(DRIVER, "node-a")).await.unwrap(),
        vec![
            ("topology.kubernetes.io/region".into(), "local-1".into()),
            ("topology.kubernetes.io/zone".into(), "zone-a".into()),
        ]
    );
    assert_eq!(
        labels(&shim.channel, csi("other.csi", "node-a"))
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        labels(
            &shim.channel,
            pb::persistent_volume::Source::GcePdName("pd-1".into())
        )
        .await
        .unwrap(),
        vec![]
    );
    let missing = labels(&shim.channel, csi(DRIVER, "node-z"))
        .await
        .unwrap_err();
    assert_eq!(
        routes_support::cpi(missing).to_string(),
        "disk is not found: CSI volume vol-1: its machine \"node-z\" (local-shim/machine) is not in the inventory or is terminated"
    );
}
