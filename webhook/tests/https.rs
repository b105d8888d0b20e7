//! The webhook over real HTTPS, calling the fake provider over gRPC with mutual TLS: both
//! AdmissionReview versions, uid echo, patch content, provider errors and the failure
//! policies, a stopped or slow shim, and every bad-input rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Harness, ebs_pv, lb_service, patch_of, pv_create, review, service_request};
use fake_provider::{CpiError, FakeCloud, call, proto as pb};
use serde_json::json;

const ZONE: &str = "topology.kubernetes.io/zone";
const REGION: &str = "topology.kubernetes.io/region";

fn labelling_fake() -> FakeCloud {
    FakeCloud {
        volume_labels_enabled: true,
        lb_validation_enabled: true,
        volume_labels: HashMap::from([(
            "pv-1".to_string(),
            HashMap::from([
                (ZONE.to_string(), "z2__z1".to_string()),
                (REGION.to_string(), "r1".to_string()),
            ]),
        )]),
        ..FakeCloud::default()
    }
}

#[tokio::test]
async fn pv_labeler_answers_with_a_json_patch_in_the_request_version() {
    let h = Harness::start(labelling_fake(), &[]).await;
    for version in ["v1", "v1beta1"] {
        let answer = h
            .review(
                "/pv-labeler",
                &review(version, "uid-1", pv_create(ebs_pv("pv-1", "vol-1"))),
            )
            .await;
        assert!(answer.head.contains("application/json"), "{answer:?}");
        let body = answer.json();
        assert_eq!(body["apiVersion"], format!("admission.k8s.io/{version}"));
        assert_eq!(body["kind"], "AdmissionReview");
        let response = answer.response();
        assert_eq!(response["uid"], "uid-1");
        assert_eq!(response["allowed"], true);
        assert_eq!(
            patch_of(&response),
            json!([
                {"op": "add", "path": "/metadata/labels",
                 "value": {ZONE: "z2__z1", REGION: "r1"}},
                {"op": "add", "path": "/spec/nodeAffinity", "value": {"required": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": REGION, "operator": "In", "values": ["r1"]},
                        {"key": ZONE, "operator": "In", "values": ["z1", "z2"]},
                    ]}]}}},
            ])
        );
    }
    let asked = h.fake().state().volumes_asked.clone();
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[0].metadata.as_ref().unwrap().name, "pv-1");
    assert_eq!(
        asked[0].source,
        Some(pb::persistent_volume::Source::AwsEbsVolumeId(
            "vol-1".into()
        ))
    );
}

#[tokio::test]
async fn existing_labels_are_patched_one_escaped_key_at_a_time() {
    let h = Harness::start(labelling_fake(), &[]).await;
    let mut pv = ebs_pv("pv-1", "vol-1");
    pv["metadata"]["labels"] = json!({"app": "db", ZONE: "wrong"});
    let response = h.pv_response("v1", "u", pv).await;
    let patch = patch_of(&response);
    assert_eq!(
        patch[0],
        json!({"op": "add", "path": "/metadata/labels/topology.kubernetes.io~1region", "value": "r1"})
    );
    assert_eq!(
        patch[1],
        json!({"op": "add", "path": "/metadata/labels/topology.kubernetes.io~1zone", "value": "z2__z1"})
    );
}

#[tokio::test]
async fn unchanged_volumes_get_no_patch() {
    let h = Harness::start(labelling_fake(), &[]).await;
    let host_path = json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "local"}, "spec": {"hostPath": {"path": "/data"}}});
    let no_labels = ebs_pv("unknown-to-the-cloud", "vol-2");
    let placeholder = ebs_pv("pending", "placeholder-for-provisioning");
    for pv in [host_path, no_labels, placeholder] {
        let response = h.pv_response("v1", "u", pv.clone()).await;
        assert_eq!(response, json!({"uid": "u", "allowed": true}), "{pv}");
    }
    // Only the volume with a cloud disk was asked about.
    assert_eq!(h.fake().count(call::GET_LABELS_FOR_VOLUME), 1);
    // UPDATE is not the labeler's business.
    let mut update = pv_create(ebs_pv("pv-1", "vol-1"));
    update["operation"] = json!("UPDATE");
    let response = h
        .review("/pv-labeler", &review("v1", "u", update))
        .await
        .response();
    assert_eq!(response, json!({"uid": "u", "allowed": true}));
}

#[tokio::test]
async fn provider_error_is_a_denial_naming_the_volume_and_the_error() {
    let mut fake = labelling_fake();
    fake.volume_labels_err = Some(CpiError::DiskNotFound("vol-1 is gone".into()));
    let h = Harness::start(fake, &[]).await;
    let response = h.pv_response("v1", "u", ebs_pv("pv-1", "vol-1")).await;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("error querying AWS EBS volume vol-1: ")
            && message.contains("vol-1 is gone"),
        "{message}"
    );
}

#[tokio::test]
async fn provider_error_with_policy_ignore_lets_the_volume_through_with_a_warning() {
    let mut fake = labelling_fake();
    fake.volume_labels_err = Some(CpiError::Cloud("quota".into()));
    let h = Harness::start(fake, &["--pv-labeler-failure-policy=ignore"]).await;
    let response = h.pv_response("v1beta1", "u", ebs_pv("pv-1", "vol-1")).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("error querying AWS EBS volume vol-1")
            && warning.contains("failure policy Ignore"),
        "{warning}"
    );
}

#[tokio::test]
async fn stopped_shim_answers_by_each_webhooks_policy_and_readyz_fails() {
    let mut h = Harness::start(labelling_fake(), &[]).await;
    assert_eq!(h.get("/readyz").await.status, 200);
    h.stop_shim().await;
    let ready = h.get("/readyz").await;
    assert_eq!(ready.status, 500, "{ready:?}");
    assert!(ready.body.contains("not reachable"), "{ready:?}");
    assert_eq!(h.get("/healthz").await.status, 200);

    // pv-labeler: Fail by default.
    let response = h.pv_response("v1", "u1", ebs_pv("pv-2", "vol-9")).await;
    assert_eq!(response["uid"], "u1");
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("error querying AWS EBS volume vol-9"),
        "{message}"
    );

    // A volume that needs no answer from the shim is still admitted.
    let host_path = json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "local"}, "spec": {"hostPath": {"path": "/data"}}});
    let response = h.pv_response("v1", "u2", host_path).await;
    assert_eq!(response["allowed"], true);

    // service-lb-validator: Ignore by default.
    let svc = lb_service("web", json!({}));
    let response = h
        .service_response("v1", "u3", service_request("CREATE", svc, None))
        .await;
    assert_eq!(response["allowed"], true);
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("Service \"default/web\"") && warning.contains("failure policy Ignore"),
        "{warning}"
    );
}

/// A CSI PersistentVolume of `driver`.
fn csi_pv(name: &str, driver: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": driver, "volumeHandle": "vol-1"}}
    })
}

#[tokio::test]
async fn csi_volumes_are_asked_about_only_for_the_declared_drivers() {
    let mut fake = labelling_fake();
    fake.csi_drivers = vec!["local.csi".to_string()];
    let mut h = Harness::start(fake, &[]).await;
    // The webhook reads the drivers at start-up; readiness reads them again.
    assert_eq!(h.get("/readyz").await.status, 200);

    let response = h.pv_response("v1", "u1", csi_pv("pv-1", "local.csi")).await;
    assert_eq!(response["allowed"], true);
    assert_eq!(patch_of(&response)[0]["path"], "/metadata/labels");
    let response = h.pv_response("v1", "u2", csi_pv("pv-1", "nfs.csi")).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    let asked: Vec<_> = h
        .fake()
        .state()
        .volumes_asked
        .iter()
        .map(|v| match &v.source {
            Some(pb::persistent_volume::Source::Csi(csi)) => csi.driver.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        asked,
        ["local.csi"],
        "the other driver's volume was not asked about"
    );

    // With the shim DOWN and policy Fail, a volume of another driver is still admitted (and
    // counted as allowed); the declared driver's volume is refused, saying why.
    h.stop_shim().await;
    let response = h.pv_response("v1", "u3", csi_pv("pv-2", "nfs.csi")).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("warnings").is_none(), "{response}");
    let response = h.pv_response("v1", "u4", csi_pv("pv-3", "local.csi")).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("error querying CSI volume local.csi/vol-1"),
        "{message}"
    );
    let metrics = h.get("/metrics").await.body;
    assert!(
        metrics.contains(
            r#"cloud_provider_webhook_decisions_total{webhook="pv-labeler",decision="allowed"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_shim_is_answered_within_the_deadline_by_the_policy() {
    let mut fake = labelling_fake();
    fake.request_delay = Duration::from_secs(5);
    let h = Harness::start(
        fake,
        &[
            "--webhook-deadline=500ms",
            "--service-lb-validator-failure-policy=fail",
        ],
    )
    .await;
    let svc = lb_service("web", json!({}));
    let response = h
        .service_response("v1", "u", service_request("CREATE", svc, None))
        .await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("did not answer within"), "{message}");
}

#[tokio::test]
async fn service_lb_validator_denies_listing_each_offending_field() {
    let mut fake = labelling_fake();
    fake.lb_validation.insert(
        "default/bad".into(),
        pb::ValidateLoadBalancerResponse {
            violations: vec![
                pb::Violation {
                    field: "metadata.annotations[example.com/pool]".into(),
                    message: "no such pool".into(),
                },
                pb::Violation {
                    field: "spec.loadBalancerSourceRanges[0]".into(),
                    message: "not a CIDR".into(),
                },
            ],
            warnings: Vec::new(),
            requires_replacement: false,
        },
    );
    let h = Harness::start(fake, &["--cluster-name=prod"]).await;
    let bad = lb_service("bad", json!({"example.com/pool": "nope"}));
    let response = h
        .service_response("v1beta1", "u", service_request("CREATE", bad, None))
        .await;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 422);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("metadata.annotations[example.com/pool]: no such pool")
            && message.contains("spec.loadBalancerSourceRanges[0]: not a CIDR"),
        "{message}"
    );

    let good = lb_service("good", json!({}));
    let old = lb_service("good", json!({"example.com/pool": "old"}));
    let response = h
        .service_response("v1", "u", service_request("UPDATE", good, Some(old)))
        .await;
    assert_eq!(response, json!({"uid": "u", "allowed": true}));
    let asked = h.fake().state().validations_asked.clone();
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[1].cluster_name, "prod");
    let old_view = asked[1].old_service.as_ref().unwrap();
    assert_eq!(
        old_view.metadata.as_ref().unwrap().annotations["example.com/pool"],
        "old"
    );

    // Neither a ClusterIP Service nor one of another class is asked about.
    let mut cluster_ip = lb_service("cip", json!({}));
    cluster_ip["spec"]["type"] = json!("ClusterIP");
    let mut classed = lb_service("classed", json!({}));
    classed["spec"]["loadBalancerClass"] = json!("example.com/other");
    for svc in [cluster_ip, classed] {
        let response = h
            .service_response("v1", "u", service_request("CREATE", svc, None))
            .await;
        assert_eq!(response["allowed"], true);
    }
    assert_eq!(h.fake().count(call::VALIDATE_LOAD_BALANCER), 2);
}

#[tokio::test]
async fn provider_without_validation_allows_everything() {
    let h = Harness::start(FakeCloud::default(), &[]).await;
    let svc = lb_service("web", json!({"example.com/anything": "x"}));
    let response = h
        .service_response("v1", "u", service_request("CREATE", svc, None))
        .await;
    assert_eq!(response, json!({"uid": "u", "allowed": true}));
    // Nor is a volume labelled by a provider without VolumeLabels.
    let response = h.pv_response("v1", "u", ebs_pv("pv-1", "vol-1")).await;
    assert_eq!(response, json!({"uid": "u", "allowed": true}));
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let h = Harness::start(labelling_fake(), &[]).await;
    let good = review("v1", "u", pv_create(ebs_pv("pv-1", "vol-1"))).to_string();
    // (case, content type, body, status, part of the message)
    type Case = (
        &'static str,
        Option<&'static str>,
        Vec<u8>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("wrong content type", Some("text/plain"), good.clone().into_bytes(), 400, "expected application/json"),
        ("no content type", None, good.clone().into_bytes(), 400, "expected application/json"),
        ("empty body", Some("application/json"), Vec::new(), 400, "request body is empty"),
        ("not JSON", Some("application/json"), b"{\"apiVersion\":".to_vec(), 400, "not JSON"),
        ("not a review", Some("application/json"), br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec(), 400, "not an admission.k8s.io/v1 or v1beta1 AdmissionReview"),
        ("no request", Some("application/json"), br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), 400, "has no request"),
        ("no uid", Some("application/json"), br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}"#.to_vec(), 400, "no uid"),
        ("request of the wrong shape", Some("application/json"), br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":[]}"#.to_vec(), 400, "malformed"),
    ];
    for (name, content_type, body, status, message) in cases {
        let answer = h.post("/pv-labeler", content_type, &body).await;
        assert_eq!(answer.status, status, "{name}: {answer:?}");
        assert!(answer.body.contains(message), "{name}: {answer:?}");
    }

    // An object of a kind this webhook does not review.
    let svc = lb_service("web", json!({}));
    let answer = h
        .review(
            "/pv-labeler",
            &review("v1", "u", service_request("CREATE", svc, None)),
        )
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer
            .body
            .contains("reviews PersistentVolume objects, not v1, Kind=Service"),
        "{answer:?}"
    );

    // An object that does not parse as its kind.
    let mut broken = pv_create(ebs_pv("pv-1", "vol-1"));
    broken["object"]["spec"] = json!("not a spec");
    let answer = h.review("/pv-labeler", &review("v1", "u", broken)).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.body.contains("not a valid PersistentVolume"),
        "{answer:?}"
    );

    // Missing object.
    let mut no_object = pv_create(ebs_pv("pv-1", "vol-1"));
    no_object["object"] = json!(null);
    let answer = h.review("/pv-labeler", &review("v1", "u", no_object)).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("no object"), "{answer:?}");

    // Wrong method, unknown path.
    assert_eq!(h.get("/pv-labeler").await.status, 405);
    assert_eq!(h.get("/admit").await.status, 404);
    assert_eq!(h.fake().count(call::GET_LABELS_FOR_VOLUME), 0);
}

#[tokio::test]
async fn oversized_and_slow_bodies_are_refused_without_reading_them_all() {
    let h = Harness::start(labelling_fake(), &["--webhook-deadline=1s"]).await;
    // Declared too large: refused from the headers.
    let answer = h
        .raw(b"POST /pv-labeler HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\nConnection: close\r\n\r\n{")
        .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(
        answer.body.contains("larger than 3145728 bytes"),
        "{answer:?}"
    );

    // Chunked, no length declared: reading stops at the limit.
    let chunk = vec![b' '; 1024 * 1024];
    let mut request = b"POST /pv-labeler HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = h.raw(&request).await;
    assert_eq!(answer.status, 413, "{answer:?}");

    // A body that never arrives is answered once the deadline passes.
    let answer = h
        .raw(b"POST /pv-labeler HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{")
        .await;
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(answer.body.contains("not received within"), "{answer:?}");
}

#[tokio::test]
async fn only_enabled_webhooks_are_served() {
    let h = Harness::start(labelling_fake(), &["--webhooks=pv-labeler"]).await;
    let svc = lb_service("web", json!({}));
    let answer = h
        .review(
            "/service-lb-validator",
            &review("v1", "u", service_request("CREATE", svc, None)),
        )
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = h
        .review(
            "/pv-labeler",
            &review("v1", "u", pv_create(ebs_pv("pv-1", "vol-1"))),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test]
async fn metrics_count_requests_and_decisions() {
    let h = Harness::start(labelling_fake(), &[]).await;
    h.review(
        "/pv-labeler",
        &review("v1", "u", pv_create(ebs_pv("pv-1", "vol-1"))),
    )
    .await;
    h.post("/pv-labeler", Some("text/plain"), b"x").await;
    let metrics = h.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    for line in [
        r#"cloud_provider_webhook_request_total{code="200",webhook="pv-labeler"} 1"#,
        r#"cloud_provider_webhook_request_total{code="400",webhook="pv-labeler"} 1"#,
        r#"cloud_provider_webhook_request_duration_seconds_count{code="200",webhook="pv-labeler"} 1"#,
        r#"cloud_provider_webhook_decisions_total{webhook="pv-labeler",decision="patched"} 1"#,
    ] {
        assert!(
            metrics.body.contains(line),
            "{line} missing from:\n{}",
            metrics.body
        );
    }
}

#[tokio::test]
async fn rotated_serving_certificate_reaches_new_connections() {
    let h = Harness::start(labelling_fake(), &["--tls-reload-interval=50ms"]).await;
    let before = h.served_certificate().await;
    let leaf = h.ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    h.serving.rotate(&leaf, &h.ca_pem).unwrap();
    let served = test_support::wait_for(
        "the rotated serving certificate",
        Duration::from_secs(10),
        || async {
            let now = h.served_certificate().await;
            if now == leaf.cert_der {
                Ok(now)
            } else {
                Err(format!("still serving the old one: {}", now == before))
            }
        },
    )
    .await
    .unwrap();
    assert_ne!(served, before);
    // Reviews keep working on the new certificate.
    let response = h.pv_response("v1", "u", ebs_pv("pv-1", "vol-1")).await;
    assert_eq!(response["allowed"], true);
}
