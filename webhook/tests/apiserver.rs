//! Both webhooks registered with a real kube-apiserver (v1.20, `admissionregistration.k8s.io/v1`)
//! at `https://127.0.0.1:<port>` with the test CA as caBundle, in front of the fake provider
//! served with mutual TLS: the API server refuses Services and volumes with the reasons the
//! webhooks give, and stores the labels and node affinity the pv-labeler's patch adds.
//!
//! Needs the control-plane binaries (`bash tests/control-plane/provision.sh`, or
//! KUBEBUILDER_ASSETS pointing at etcd and kube-apiserver); without them the tests fail saying so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Harness;
use fake_provider::{CpiError, FakeCloud, proto as pb};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{PersistentVolume, Service};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use test_control_plane::{ControlPlane, unique_name};
use test_support::{WEBHOOK_TEST_LABEL, WebhookRegistration, wait_refused};

const ZONE: &str = "topology.kubernetes.io/zone";
const REGION: &str = "topology.kubernetes.io/region";
/// How long the API server may take to start calling a new webhook configuration.
const REGISTRATION: Duration = Duration::from_secs(30);

fn ebs_pv(name: &str, test: &str, volume_id: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {WEBHOOK_TEST_LABEL: test}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "awsElasticBlockStore": {"volumeID": volume_id}}
    }))
    .unwrap()
}

fn lb_service(name: &str, test: &str, pool: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {WEBHOOK_TEST_LABEL: test},
                     "annotations": {"example.com/pool": pool}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .unwrap()
}

/// Both webhooks of `h` registered for objects labelled with `test`; removed on drop.
struct Registered {
    client: Client,
    test: String,
}

impl Registered {
    async fn new(client: Client, h: &Harness) -> Registered {
        let test = unique_name("wh");
        let registration = WebhookRegistration::new(&test, h.addr.port(), &h.ca_pem);
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &registration.mutating)
            .await
            .unwrap();
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &registration.validating)
            .await
            .unwrap();
        Registered { client, test }
    }

    /// Deletes both configurations. One left behind by a failed test is harmless: its object
    /// selector matches no other test's objects.
    async fn remove(self) {
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&format!("{}-pv", self.test), &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.client)
            .delete(&format!("{}-svc", self.test), &DeleteParams::default())
            .await;
    }
}

fn control_plane_missing(err: impl std::fmt::Display) -> ! {
    panic!(
        "a kube-apiserver is needed: run `bash tests/control-plane/provision.sh` (or set KUBEBUILDER_ASSETS): {err}"
    )
}

fn serving_fake() -> FakeCloud {
    FakeCloud {
        volume_labels_enabled: true,
        lb_validation_enabled: true,
        ..FakeCloud::default()
    }
}

#[tokio::test]
async fn api_server_refuses_with_the_reasons_the_webhooks_give() {
    let cp = ControlPlane::shared()
        .await
        .unwrap_or_else(|e| control_plane_missing(e));
    let h = Harness::start(serving_fake(), &[]).await;
    let reg = Registered::new(cp.client().unwrap(), &h).await;
    let test = reg.test.clone();

    // Services: a bad annotation is refused with the provider's field and reason.
    let services: Api<Service> = Api::namespaced(reg.client.clone(), "default");
    h.fake().update(|f| {
        f.lb_validation_err = None;
        for n in 0..100 {
            f.lb_validation.insert(
                format!("default/{test}-bad-{n}"),
                pb::ValidateLoadBalancerResponse {
                    violations: vec![pb::Violation {
                        field: "metadata.annotations[example.com/pool]".into(),
                        message: "no pool named \"nope\"".into(),
                    }],
                    ..Default::default()
                },
            );
        }
    });
    let err = wait_refused(
        "the API server to call service-lb-validator",
        REGISTRATION,
        |attempt| {
            let name = format!("{test}-bad-{attempt}");
            let svc = lb_service(&name, &test, "nope");
            let services = services.clone();
            async move {
                services.create(&PostParams::default(), &svc).await?;
                Ok::<_, kube::Error>(name)
            }
        },
    )
    .await
    .unwrap();
    assert!(
        err.contains("service-lb-validator.test.example.com")
            && err.contains("metadata.annotations[example.com/pool]: no pool named"),
        "{err}"
    );
    let good = format!("{test}-good");
    services
        .create(&PostParams::default(), &lb_service(&good, &test, "blue"))
        .await
        .unwrap();
    let _ = services.delete(&good, &DeleteParams::default()).await;

    // Volumes: a provider error refuses the volume, naming it and the error (no patch is
    // applied, so this also works on API servers that cannot apply one; see the next test).
    h.fake()
        .update(|f| f.volume_labels_err = Some(CpiError::DiskNotFound("vol-3".into())));
    let pvs: Api<PersistentVolume> = Api::all(reg.client.clone());
    let err = pvs
        .create(
            &PostParams::default(),
            &ebs_pv(&format!("{test}-gone"), &test, "vol-3"),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("error querying AWS EBS volume vol-3"), "{err}");
    reg.remove().await;
}

/// The API server applies the pv-labeler's JSON Patch and stores the labels and node affinity
/// (this needs the kube-apiserver `provision.sh` builds with reflect2 1.0.2: with the vendored
/// 1.0.1 and Go >= 1.18 it crashes on any mutating webhook's patch).
#[tokio::test]
async fn api_server_stores_the_labels_and_affinity_of_the_patch() {
    // A private control plane: should it crash, no other test loses its API server.
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| control_plane_missing(e));
    let h = Harness::start(serving_fake(), &[]).await;
    let reg = Registered::new(cp.client().unwrap(), &h).await;
    let test = reg.test.clone();
    let pvs: Api<PersistentVolume> = Api::all(reg.client.clone());
    let labels = HashMap::from([
        (ZONE.to_string(), "z-b__z-a".to_string()),
        (REGION.to_string(), "r-1".to_string()),
    ]);
    let mut attempt = 0;
    let stored = test_support::wait_for("the API server to call pv-labeler", REGISTRATION, || {
        attempt += 1;
        let name = format!("{test}-probe-{attempt}");
        h.fake().update(|f| {
            f.volume_labels.insert(name.clone(), labels.clone());
        });
        let (pvs, test) = (pvs.clone(), test.clone());
        async move {
            let created = pvs
                .create(&PostParams::default(), &ebs_pv(&name, &test, "vol-1"))
                .await
                .map_err(|e| e.to_string())?;
            let got = created.metadata.labels.clone().unwrap_or_default();
            if got.contains_key(ZONE) {
                Ok(created)
            } else {
                Err(format!("{name} stored without labels: {got:?}"))
            }
        }
    })
    .await
    .unwrap_or_else(|err| {
        let log = std::fs::read_to_string(cp.apiserver_log()).unwrap_or_default();
        let start = log.find("fatal error").unwrap_or(log.len());
        let excerpt: String = log[start..].chars().take(2000).collect();
        panic!("{err}\nkube-apiserver log from its crash, if any:\n{excerpt}")
    });
    let stored_labels = stored.metadata.labels.clone().unwrap();
    assert_eq!(stored_labels[ZONE], "z-b__z-a");
    assert_eq!(stored_labels[REGION], "r-1");
    assert_eq!(
        serde_json::to_value(stored.spec.unwrap().node_affinity).unwrap(),
        json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": REGION, "operator": "In", "values": ["r-1"]},
            {"key": ZONE, "operator": "In", "values": ["z-a", "z-b"]},
        ]}]}})
    );
    // A volume the cloud has no labels for is stored as it was sent.
    let plain = pvs
        .create(
            &PostParams::default(),
            &ebs_pv(&format!("{test}-plain"), &test, "vol-2"),
        )
        .await
        .unwrap();
    assert!(plain.spec.unwrap().node_affinity.is_none());

    // Every other source the labeler asks about is stored labelled; sources it does not model
    // are stored as sent, and the provider is not asked about them.
    let sources = [
        (
            "gce",
            json!({"gcePersistentDisk": {"pdName": "pd-1"}}),
            true,
        ),
        (
            "azure",
            json!({"azureDisk": {"diskName": "d-1", "kind": "Managed",
                "diskURI": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d-1"}}),
            true,
        ),
        ("cinder", json!({"cinder": {"volumeID": "c-1"}}), true),
        (
            "hostpath",
            json!({"hostPath": {"path": "/var/lib/data"}}),
            false,
        ),
        (
            "nfs",
            json!({"nfs": {"server": "nfs.example", "path": "/export"}}),
            false,
        ),
    ];
    for (kind, source, labelled) in sources {
        let name = format!("{test}-{kind}");
        h.fake().update(|f| {
            f.volume_labels.insert(name.clone(), labels.clone());
        });
        let mut pv = json!({
            "metadata": {"name": name, "labels": {WEBHOOK_TEST_LABEL: test}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}
        });
        for (key, value) in source.as_object().unwrap() {
            pv["spec"][key] = value.clone();
        }
        let pv: PersistentVolume = serde_json::from_value(pv).unwrap();
        let stored = pvs.create(&PostParams::default(), &pv).await.unwrap();
        let got = stored.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            got.get(ZONE).map(String::as_str),
            labelled.then_some("z-b__z-a"),
            "{kind}: stored labels {got:?}"
        );
        assert_eq!(
            stored.spec.unwrap().node_affinity.is_some(),
            labelled,
            "{kind}: node affinity"
        );
        let asked =
            h.fake().state().calls.iter().any(|c| {
                c.method == fake_provider::call::GET_LABELS_FOR_VOLUME && c.subject == name
            });
        assert_eq!(asked, labelled, "{kind}: was the provider asked?");
    }
    reg.remove().await;
}
