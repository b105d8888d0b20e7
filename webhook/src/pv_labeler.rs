//! `pv-labeler`: the rules of the PersistentVolumeLabel admission plugin (KEP-2699 moved it out
//! of the API server), as pure functions of the PersistentVolume and the provider's answer.
//!
//! 1. [`label_source`]: where the labels come from. Topology labels already on a dynamically
//!    provisioned volume are trusted as they are; a cloud disk (the in-tree sources, and CSI
//!    volumes, which the upstream labeler does not handle) is asked about, unless its ID is the
//!    provisioning placeholder; anything else is left alone.
//! 2. [`label_patch`]: the JSON Patch that writes the labels and merges a node affinity built
//!    from them into every existing node-selector term, exactly as the in-tree plugin did; none
//!    at all when the provider returned no labels (upstream's replacement webhook adds an empty
//!    term then, which matches no node). Applying it twice changes nothing the second time.

use std::collections::{BTreeMap, BTreeSet};

use cpi_proto::v1 as pb;
use k8s_openapi::api::core::v1::PersistentVolume;
use serde_json::{Value, json};

use crate::patch::PatchOp;

/// Annotation the provisioner puts on a dynamically provisioned volume.
pub const ANN_DYNAMICALLY_PROVISIONED: &str = "pv.kubernetes.io/provisioned-by";
/// Volume ID of a volume still being provisioned (upstream `ProvisionedVolumeName`).
pub const PROVISIONED_VOLUME_NAME: &str = "placeholder-for-provisioning";
/// GA zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// GA region label.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// Beta zone label.
pub const LABEL_BETA_ZONE: &str = "failure-domain.beta.kubernetes.io/zone";
/// Beta region label.
pub const LABEL_BETA_REGION: &str = "failure-domain.beta.kubernetes.io/region";
/// Separates the zones of a volume spanning several (upstream `LabelMultiZoneDelimiter`).
pub const MULTI_ZONE_DELIMITER: &str = "__";

/// Where a volume's labels come from.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    /// Not a cloud volume, or one still being provisioned: left unchanged.
    Unlabelled,
    /// Topology labels set by the provisioner, trusted without asking the provider.
    Trusted(BTreeMap<String, String>),
    /// Ask the provider's GetLabelsForVolume about `volume`.
    Provider {
        /// The CPI view of the volume.
        volume: Box<pb::PersistentVolume>,
        /// The volume as upstream names it in errors, e.g. `AWS EBS volume vol-1`.
        subject: String,
    },
}

/// A zone label whose value is not a `__`-separated list of zones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to convert label string for Zone: {value:?} to a Set (label {key})")]
pub struct ZoneError {
    /// Label key.
    pub key: String,
    /// Label value.
    pub value: String,
}

/// Decides where the labels of `pv` come from. `raw_json` is the whole object, sent only to a
/// provider that asked for raw objects.
pub fn label_source(pv: &PersistentVolume, raw_json: Option<Vec<u8>>) -> LabelSource {
    let labels = pv.metadata.labels.clone().unwrap_or_default();
    let dynamically_provisioned = pv
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANN_DYNAMICALLY_PROVISIONED));
    if dynamically_provisioned {
        let pair = |zone: &str, region: &str| {
            Some(BTreeMap::from([
                (zone.to_string(), labels.get(zone)?.clone()),
                (region.to_string(), labels.get(region)?.clone()),
            ]))
        };
        if let Some(trusted) =
            pair(LABEL_ZONE, LABEL_REGION).or_else(|| pair(LABEL_BETA_ZONE, LABEL_BETA_REGION))
        {
            return LabelSource::Trusted(trusted);
        }
    }
    let Some(spec) = &pv.spec else {
        return LabelSource::Unlabelled;
    };
    use pb::persistent_volume::Source;
    // (source, kind as upstream names it, ID shown, ID compared with the placeholder)
    let (source, kind, id, placeholder_checked) = if let Some(s) = &spec.aws_elastic_block_store {
        let id = s.volume_id.clone();
        (
            Source::AwsEbsVolumeId(id.clone()),
            "AWS EBS volume",
            id.clone(),
            Some(id),
        )
    } else if let Some(s) = &spec.gce_persistent_disk {
        let id = s.pd_name.clone();
        (
            Source::GcePdName(id.clone()),
            "GCE PD volume",
            id.clone(),
            Some(id),
        )
    } else if let Some(s) = &spec.azure_disk {
        let id = s.disk_name.clone();
        (
            Source::AzureDiskName(id.clone()),
            "AzureDisk volume",
            id.clone(),
            Some(id),
        )
    } else if let Some(s) = &spec.cinder {
        let id = s.volume_id.clone();
        (
            Source::CinderVolumeId(id.clone()),
            "Cinder volume",
            id.clone(),
            Some(id),
        )
    } else if let Some(s) = &spec.vsphere_volume {
        // Upstream never checked vSphere paths for the placeholder.
        let id = s.volume_path.clone();
        (
            Source::VsphereVolumePath(id.clone()),
            "vSphere Volume",
            id,
            None,
        )
    } else if let Some(s) = &spec.csi {
        let csi = pb::CsiVolumeSource {
            driver: s.driver.clone(),
            volume_handle: s.volume_handle.clone(),
            volume_attributes: s
                .volume_attributes
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        let id = format!("{}/{}", s.driver, s.volume_handle);
        (
            Source::Csi(csi),
            "CSI volume",
            id,
            Some(s.volume_handle.clone()),
        )
    } else {
        return LabelSource::Unlabelled;
    };
    if placeholder_checked.as_deref() == Some(PROVISIONED_VOLUME_NAME) {
        return LabelSource::Unlabelled;
    }
    LabelSource::Provider {
        volume: Box::new(pb::PersistentVolume {
            metadata: Some(cpi_proto::k8s_view::object_meta(&pv.metadata)),
            capacity: spec
                .capacity
                .as_ref()
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone()),
            storage_class_name: spec.storage_class_name.clone().unwrap_or_default(),
            source: Some(source),
            raw_json: raw_json.unwrap_or_default(),
        }),
        subject: format!("{kind} {id}"),
    }
}

/// Whether the shim declaring `csi_drivers` (`ProviderInfo.csi_drivers`) is asked about
/// `volume`: an in-tree cloud disk always (the shim's answer decides, as upstream), a CSI volume
/// only when its driver is declared. Another driver's volume is not the provider's, so it is
/// admitted unchanged without a call, and a down shim cannot block it under policy `Fail`.
pub fn shim_is_asked(volume: &pb::PersistentVolume, csi_drivers: &[String]) -> bool {
    match &volume.source {
        Some(pb::persistent_volume::Source::Csi(csi)) => csi_drivers.contains(&csi.driver),
        Some(_) => true,
        None => false,
    }
}

/// The message of a denial for a provider failure, as upstream words it.
pub fn query_error(subject: &str, error: &dyn std::fmt::Display) -> String {
    format!("error querying {subject}: {error}")
}

/// The zones of a zone label value: split on `__`, trimmed, de-duplicated and sorted
/// (upstream `LabelZonesToSet`); an empty element is an error.
pub fn zones(key: &str, value: &str) -> Result<BTreeSet<String>, ZoneError> {
    value
        .split(MULTI_ZONE_DELIMITER)
        .map(|zone| {
            let zone = zone.trim();
            if zone.is_empty() {
                Err(ZoneError {
                    key: key.to_string(),
                    value: value.to_string(),
                })
            } else {
                Ok(zone.to_string())
            }
        })
        .collect()
}

fn is_zone_key(key: &str) -> bool {
    key == LABEL_ZONE || key == LABEL_BETA_ZONE
}

/// The JSON Patch writing `labels` onto the PersistentVolume `object` and merging the node
/// affinity they imply; empty when nothing changes.
pub fn label_patch(
    object: &Value,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<PatchOp>, ZoneError> {
    if labels.is_empty() {
        return Ok(Vec::new());
    }
    let mut requirements = Vec::with_capacity(labels.len());
    for (key, value) in labels {
        let values: Vec<String> = if is_zone_key(key) {
            zones(key, value)?.into_iter().collect()
        } else {
            vec![value.clone()]
        };
        requirements.push(json!({"key": key, "operator": "In", "values": values}));
    }
    let mut ops = Vec::new();
    match object.pointer("/metadata/labels") {
        Some(Value::Object(existing)) => {
            for (key, value) in labels {
                if existing.get(key).and_then(Value::as_str) != Some(value) {
                    ops.push(PatchOp::add(&["metadata", "labels", key], json!(value)));
                }
            }
        }
        _ => ops.push(add_nested(object, &["metadata", "labels"], json!(labels))),
    }
    ops.extend(affinity_patch(object, labels, requirements));
    Ok(ops)
}

/// Appends `requirements` to every node-selector term (creating one when there is none),
/// unless any of their keys already appears in any term: then the user's affinity stands.
fn affinity_patch(
    object: &Value,
    labels: &BTreeMap<String, String>,
    requirements: Vec<Value>,
) -> Vec<PatchOp> {
    const TERMS: [&str; 4] = ["spec", "nodeAffinity", "required", "nodeSelectorTerms"];
    let terms = object
        .pointer("/spec/nodeAffinity/required/nodeSelectorTerms")
        .and_then(Value::as_array)
        .filter(|terms| !terms.is_empty());
    let Some(terms) = terms else {
        return vec![add_nested(
            object,
            &TERMS,
            json!([{"matchExpressions": requirements}]),
        )];
    };
    let conflict = terms.iter().any(|term| {
        term.get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|expr| expr.get("key").and_then(Value::as_str))
            .any(|key| labels.contains_key(key))
    });
    if conflict {
        return Vec::new();
    }
    let mut ops = Vec::new();
    for (index, term) in terms.iter().enumerate() {
        let index = index.to_string();
        let mut path = TERMS.to_vec();
        path.extend([index.as_str(), "matchExpressions"]);
        if term.get("matchExpressions").is_some_and(Value::is_array) {
            path.push("-");
            ops.extend(
                requirements
                    .iter()
                    .map(|requirement| PatchOp::add(&path, requirement.clone())),
            );
        } else {
            ops.push(PatchOp::add(&path, json!(requirements)));
        }
    }
    ops
}

/// `add` of `leaf` at `path`, created at the first level that does not exist yet (an `add`
/// whose parent is missing is an error in RFC 6902).
fn add_nested(object: &Value, path: &[&str], leaf: Value) -> PatchOp {
    let mut depth = 0;
    let mut node = object;
    while depth + 1 < path.len() {
        match node.get(path[depth]) {
            Some(next @ Value::Object(_)) => {
                node = next;
                depth += 1;
            }
            _ => break,
        }
    }
    let value = path[depth + 1..]
        .iter()
        .rev()
        .fold(leaf, |value, segment| json!({ *segment: value }));
    PatchOp::add(&path[..=depth], value)
}

#[cfg(test)]
mod tests {
    //! One test per case of the in-tree plugin's `admission_test.go`, plus the differences.

    use super::*;
    use crate::patch::apply;

    /// What the fake labeler answers.
    type Cloud = Result<BTreeMap<String, String>, &'static str>;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Runs the rules on `pv` as the webhook does, applies the patch, and admits the result a
    /// second time (upstream's reinvocation testing): the second pass must change nothing.
    fn admit(pv: Value, cloud: Cloud) -> Result<Value, String> {
        let once = admit_once(&pv, cloud.clone())?;
        let again = admit_once(&once, cloud)?;
        assert_eq!(once, again, "a second admission changed the volume");
        Ok(once)
    }

    fn admit_once(pv: &Value, cloud: Cloud) -> Result<Value, String> {
        let typed: PersistentVolume = serde_json::from_value(pv.clone()).unwrap();
        let labels = match label_source(&typed, None) {
            LabelSource::Unlabelled => return Ok(pv.clone()),
            LabelSource::Trusted(labels) => labels,
            LabelSource::Provider { subject, .. } => {
                cloud.map_err(|err| query_error(&subject, &err))?
            }
        };
        let ops = label_patch(pv, &labels).map_err(|e| e.to_string())?;
        let mut patched = pv.clone();
        apply(&mut patched, &ops);
        Ok(patched)
    }

    fn pv(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec})
    }

    fn ebs() -> Value {
        pv(
            "awsebs",
            json!({"awsElasticBlockStore": {"volumeID": "123"}}),
        )
    }

    fn with(mut pv: Value, pointer: &str, value: Value) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        pv.pointer_mut(parent).unwrap()[key] = value;
        pv
    }

    fn cloud_labels() -> BTreeMap<String, String> {
        labels(&[("a", "1"), ("b", "2"), (LABEL_BETA_ZONE, "1__2__3")])
    }

    fn req(key: &str, values: &[&str]) -> Value {
        json!({"key": key, "operator": "In", "values": values})
    }

    fn terms(terms: Value) -> Value {
        json!({"required": {"nodeSelectorTerms": terms}})
    }

    fn expected_abz(pv: Value) -> Value {
        let pv = with(
            pv,
            "/metadata/labels",
            json!({"a": "1", "b": "2", LABEL_BETA_ZONE: "1__2__3"}),
        );
        with(
            pv,
            "/spec/nodeAffinity",
            terms(json!([{"matchExpressions": [
                req("a", &["1"]), req("b", &["2"]), req(LABEL_BETA_ZONE, &["1", "2", "3"])
            ]}])),
        )
    }

    #[test]
    fn non_cloud_pv_ignored() {
        let host_path = pv(
            "noncloud",
            json!({"hostPath": {"path": "/", "type": "Directory"}}),
        );
        assert_eq!(
            admit(host_path.clone(), Ok(cloud_labels())).unwrap(),
            host_path
        );
    }

    #[test]
    fn cloud_provider_error_blocks_creation_of_volume() {
        assert_eq!(
            admit(ebs(), Err("invalid volume")).unwrap_err(),
            "error querying AWS EBS volume 123: invalid volume"
        );
    }

    #[test]
    fn cloud_provider_returns_no_labels() {
        assert_eq!(admit(ebs(), Ok(BTreeMap::new())).unwrap(), ebs());
    }

    #[test]
    fn cloud_provider_returns_nil_nil() {
        // The CPI has no nil map: an absent `labels` field decodes as empty, as above.
        let ops = label_patch(
            &ebs(),
            &pb::GetLabelsForVolumeResponse::default()
                .labels
                .into_iter()
                .collect(),
        )
        .unwrap();
        assert!(ops.is_empty());
    }

    #[test]
    fn aws_ebs_pv_labeled_correctly() {
        assert_eq!(
            admit(ebs(), Ok(cloud_labels())).unwrap(),
            expected_abz(ebs())
        );
    }

    fn provisioned(pv: Value, zone: &str, region: &str) -> Value {
        let pv = with(
            pv,
            "/metadata/labels",
            json!({zone: "domain1", region: "region1"}),
        );
        with(
            pv,
            "/metadata/annotations",
            json!({ANN_DYNAMICALLY_PROVISIONED: "kubernetes.io/aws-ebs"}),
        )
    }

    fn expected_provisioned(pv: Value, zone: &str, region: &str) -> Value {
        let mut requirements = vec![req(zone, &["domain1"]), req(region, &["region1"])];
        requirements.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        with(
            pv,
            "/spec/nodeAffinity",
            terms(json!([{ "matchExpressions": requirements }])),
        )
    }

    #[test]
    fn existing_labels_from_dynamic_provisioning_are_not_changed() {
        let input = provisioned(ebs(), LABEL_BETA_ZONE, LABEL_BETA_REGION);
        assert_eq!(
            admit(input.clone(), Err("must not be asked")).unwrap(),
            expected_provisioned(input, LABEL_BETA_ZONE, LABEL_BETA_REGION)
        );
    }

    #[test]
    fn existing_ga_labels_from_dynamic_provisioning_are_not_changed() {
        let input = provisioned(ebs(), LABEL_ZONE, LABEL_REGION);
        assert_eq!(
            admit(input.clone(), Err("must not be asked")).unwrap(),
            expected_provisioned(input, LABEL_ZONE, LABEL_REGION)
        );
    }

    #[test]
    fn existing_labels_from_user_are_changed() {
        let input = with(
            ebs(),
            "/metadata/labels",
            json!({LABEL_BETA_ZONE: "domain2", LABEL_BETA_REGION: "region2"}),
        );
        let cloud = labels(&[(LABEL_BETA_ZONE, "domain1"), (LABEL_BETA_REGION, "region1")]);
        let expected = with(
            ebs(),
            "/metadata/labels",
            json!({LABEL_BETA_ZONE: "domain1", LABEL_BETA_REGION: "region1"}),
        );
        assert_eq!(
            admit(input, Ok(cloud)).unwrap(),
            expected_provisioned(expected, LABEL_BETA_ZONE, LABEL_BETA_REGION)
        );
    }

    #[test]
    fn gce_pd_pv_labeled_correctly() {
        let gce = pv("gcepd", json!({"gcePersistentDisk": {"pdName": "123"}}));
        assert_eq!(
            admit(gce.clone(), Ok(cloud_labels())).unwrap(),
            expected_abz(gce)
        );
    }

    #[test]
    fn azure_disk_pv_labeled_correctly() {
        let azure = pv(
            "azurepd",
            json!({"azureDisk": {"diskName": "123", "diskURI": "/subscriptions/x/123"}}),
        );
        assert_eq!(
            admit(azure.clone(), Ok(cloud_labels())).unwrap(),
            expected_abz(azure)
        );
    }

    #[test]
    fn cinder_disk_pv_labeled_correctly() {
        let cinder = pv("cinder", json!({"cinder": {"volumeID": "123"}}));
        assert_eq!(
            admit(cinder.clone(), Ok(cloud_labels())).unwrap(),
            expected_abz(cinder)
        );
    }

    #[test]
    fn aws_ebs_pv_overrides_user_applied_labels() {
        let input = with(ebs(), "/metadata/labels", json!({"a": "not1"}));
        assert_eq!(
            admit(input, Ok(cloud_labels())).unwrap(),
            expected_abz(ebs())
        );
    }

    #[test]
    fn aws_ebs_pv_conflicting_affinity_rules_left_in_tact() {
        let user = terms(json!([{"matchExpressions": [req("c", &["3"])]}]));
        let input = with(ebs(), "/spec/nodeAffinity", user.clone());
        let cloud = labels(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let expected = with(
            input.clone(),
            "/metadata/labels",
            json!({"a": "1", "b": "2", "c": "3"}),
        );
        assert_eq!(admit(input, Ok(cloud)).unwrap(), expected);
    }

    #[test]
    fn aws_ebs_pv_non_conflicting_affinity_rules_added() {
        let user = terms(json!([{"matchExpressions": [
            req("a", &["1"]), req("b", &["2"]), req("c", &["3"])
        ]}]));
        let input = with(ebs(), "/spec/nodeAffinity", user);
        let cloud = labels(&[("d", "1"), ("e", "2"), ("f", "3")]);
        let expected = with(
            with(
                ebs(),
                "/metadata/labels",
                json!({"d": "1", "e": "2", "f": "3"}),
            ),
            "/spec/nodeAffinity",
            terms(json!([{"matchExpressions": [
                req("a", &["1"]), req("b", &["2"]), req("c", &["3"]),
                req("d", &["1"]), req("e", &["2"]), req("f", &["3"])
            ]}])),
        );
        assert_eq!(admit(input, Ok(cloud)).unwrap(), expected);
    }

    #[test]
    fn vsphere_pv_labeled_correctly() {
        let vsphere = pv("vSpherePV", json!({"vsphereVolume": {"volumePath": "123"}}));
        assert_eq!(
            admit(vsphere.clone(), Ok(cloud_labels())).unwrap(),
            expected_abz(vsphere)
        );
    }

    #[test]
    fn vsphere_pv_non_conflicting_affinity_rules_added() {
        let user = terms(json!([{"matchExpressions": [req("a", &["1"])]}, {}]));
        let vsphere = pv("vSpherePV", json!({"vsphereVolume": {"volumePath": "123"}}));
        let input = with(vsphere.clone(), "/spec/nodeAffinity", user);
        let cloud = labels(&[("d", "1")]);
        let expected = with(
            with(vsphere, "/metadata/labels", json!({"d": "1"})),
            "/spec/nodeAffinity",
            terms(json!([
                {"matchExpressions": [req("a", &["1"]), req("d", &["1"])]},
                {"matchExpressions": [req("d", &["1"])]}
            ])),
        );
        assert_eq!(admit(input, Ok(cloud)).unwrap(), expected);
    }

    // Beyond the in-tree cases.

    #[test]
    fn placeholder_volume_is_not_asked_about() {
        for spec in [
            json!({"awsElasticBlockStore": {"volumeID": PROVISIONED_VOLUME_NAME}}),
            json!({"gcePersistentDisk": {"pdName": PROVISIONED_VOLUME_NAME}}),
            json!({"azureDisk": {"diskName": PROVISIONED_VOLUME_NAME, "diskURI": "x"}}),
            json!({"cinder": {"volumeID": PROVISIONED_VOLUME_NAME}}),
        ] {
            let input = pv("p", spec);
            assert_eq!(
                admit(input.clone(), Err("must not be asked")).unwrap(),
                input
            );
        }
    }

    #[test]
    fn csi_volume_is_asked_about_with_its_driver() {
        let csi = pv(
            "csi",
            json!({"csi": {"driver": "disk.example.com", "volumeHandle": "vol-1"},
                   "capacity": {"storage": "1Gi"}, "storageClassName": "fast"}),
        );
        let typed: PersistentVolume = serde_json::from_value(csi).unwrap();
        let LabelSource::Provider { volume, subject } = label_source(&typed, None) else {
            panic!("a CSI volume is the provider's to label");
        };
        assert_eq!(subject, "CSI volume disk.example.com/vol-1");
        assert_eq!(volume.capacity.as_deref(), Some("1Gi"));
        assert_eq!(volume.storage_class_name, "fast");
        assert!(matches!(
            volume.source,
            Some(pb::persistent_volume::Source::Csi(ref c)) if c.driver == "disk.example.com"
        ));
    }

    fn provider_volume(spec: Value) -> pb::PersistentVolume {
        let typed: PersistentVolume = serde_json::from_value(pv("v", spec)).unwrap();
        match label_source(&typed, None) {
            LabelSource::Provider { volume, .. } => *volume,
            other => panic!("expected a volume to ask about, got {other:?}"),
        }
    }

    #[test]
    fn csi_volume_of_a_declared_driver_is_asked_about() {
        let volume = provider_volume(json!({"csi": {"driver": "local.csi", "volumeHandle": "v"}}));
        let declared = ["other.csi".to_string(), "local.csi".to_string()];
        assert!(shim_is_asked(&volume, &declared));
    }

    #[test]
    fn csi_volume_of_another_driver_is_not_asked_about() {
        let volume = provider_volume(json!({"csi": {"driver": "nfs.csi", "volumeHandle": "v"}}));
        assert!(!shim_is_asked(&volume, &["local.csi".to_string()]));
        // No declared driver (or a shim older than the field): no CSI volume is the shim's.
        assert!(!shim_is_asked(&volume, &[]));
    }

    #[test]
    fn in_tree_volume_is_asked_about_whatever_drivers_are_declared() {
        let volume = provider_volume(json!({"awsElasticBlockStore": {"volumeID": "vol-1"}}));
        assert!(shim_is_asked(&volume, &[]));
        assert!(shim_is_asked(&volume, &["local.csi".to_string()]));
    }

    #[test]
    fn no_labels_adds_no_empty_node_selector_term() {
        // Upstream's replacement webhook adds `nodeSelectorTerms: [{}]` here, matching no node.
        let ops = label_patch(&ebs(), &BTreeMap::new()).unwrap();
        assert!(ops.is_empty());
    }

    #[test]
    fn malformed_multi_zone_value_is_refused() {
        let err = admit(ebs(), Ok(labels(&[(LABEL_ZONE, "a____b")]))).unwrap_err();
        assert!(
            err.contains("failed to convert label string for Zone"),
            "{err}"
        );
    }

    #[test]
    fn zones_are_trimmed_deduplicated_and_sorted() {
        let set = zones(LABEL_ZONE, " b__a__b ").unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn patch_escapes_label_keys_and_creates_missing_parents() {
        let ops = label_patch(&ebs(), &labels(&[(LABEL_ZONE, "z1")])).unwrap();
        let ops = serde_json::to_value(&ops).unwrap();
        assert_eq!(
            ops,
            json!([
                {"op": "add", "path": "/metadata/labels", "value": {LABEL_ZONE: "z1"}},
                {"op": "add", "path": "/spec/nodeAffinity", "value":
                    terms(json!([{"matchExpressions": [req(LABEL_ZONE, &["z1"])]}]))}
            ])
        );
        let existing = with(ebs(), "/metadata/labels", json!({"x": "y"}));
        let ops = label_patch(&existing, &labels(&[(LABEL_ZONE, "z1")])).unwrap();
        assert_eq!(
            serde_json::to_value(&ops[0]).unwrap(),
            json!({"op": "add", "path": "/metadata/labels/topology.kubernetes.io~1zone", "value": "z1"})
        );
    }

    #[test]
    fn empty_term_list_gets_one_term() {
        let input = with(ebs(), "/spec/nodeAffinity", terms(json!([])));
        let out = admit(input, Ok(labels(&[("a", "1")]))).unwrap();
        assert_eq!(
            out.pointer("/spec/nodeAffinity").unwrap(),
            &terms(json!([{"matchExpressions": [req("a", &["1"])]}]))
        );
    }
}
