//! VolumeLabels for the local provider. It has no cloud disks, so the in-tree disk sources are
//! never its own; the only volumes it can place are those of a CSI driver declared with
//! `--csi-driver-name` (e.g. a node-local storage driver), when the volume says which inventory
//! machine holds it in its volume attribute [`MACHINE_ATTRIBUTE`]. Such a volume gets that
//! machine's zone and region as topology labels, so the webhook pins it to that zone.
//!
//! Everything else answers no labels (the webhook leaves the volume alone): another driver's or
//! an in-tree volume (not ours), and a volume of ours naming no machine (reachable from every
//! machine, so it has no topology). A volume naming a machine that is not in the inventory or is
//! terminated is `DISK_NOT_FOUND`: its machine, hence its data, is gone. Without
//! `--csi-driver-name` the service is not served at all and the shim labels nothing.

use std::collections::HashMap;

use cpi_proto::CpiError;
use cpi_proto::v1::persistent_volume::Source;
use cpi_proto::v1::{GetLabelsForVolumeResponse, PersistentVolume};

use crate::inventory::{Inventory, MachineState};
use crate::reload::InventoryHandle;

/// CSI volume attribute naming the inventory machine (its node name) that holds the volume.
pub const MACHINE_ATTRIBUTE: &str = "local-shim/machine";
/// GA zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// GA region label.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";

/// Volume flags of `local-shim`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VolumeFlags {
    /// CSI driver whose volumes the shim labels with the zone and region of the machine named by
    /// their `local-shim/machine` volume attribute; without it VolumeLabels is not served.
    #[arg(long = "csi-driver-name", value_name = "NAME")]
    pub csi_driver_name: Option<String>,
}

/// The labels of `volume` for a shim owning the CSI driver `driver`, from `inventory`.
pub fn volume_labels(
    inventory: &Inventory,
    driver: &str,
    volume: &PersistentVolume,
) -> Result<HashMap<String, String>, CpiError> {
    let Some(Source::Csi(csi)) = &volume.source else {
        return Ok(HashMap::new());
    };
    if csi.driver != driver {
        return Ok(HashMap::new());
    }
    let Some(name) = csi
        .volume_attributes
        .get(MACHINE_ATTRIBUTE)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return Ok(HashMap::new());
    };
    let machine = inventory
        .by_name(name)
        .filter(|m| m.state != MachineState::Terminated)
        .ok_or_else(|| {
            CpiError::DiskNotFound(format!(
                "CSI volume {}: its machine {name:?} ({MACHINE_ATTRIBUTE}) is not in the \
                 inventory or is terminated",
                csi.volume_handle
            ))
        })?;
    let mut labels = HashMap::new();
    if let Some(zone) = &machine.zone {
        labels.insert(LABEL_ZONE.to_string(), zone.clone());
    }
    if let Some(region) = &machine.region {
        labels.insert(LABEL_REGION.to_string(), region.clone());
    }
    Ok(labels)
}

/// The local shim's VolumeLabels service: [`volume_labels`] over the live inventory.
#[derive(Clone)]
pub struct LocalVolumes {
    inventory: InventoryHandle,
    driver: String,
}

impl LocalVolumes {
    /// Labels volumes of the CSI driver `driver` from `inventory`.
    pub fn new(inventory: InventoryHandle, driver: String) -> Self {
        Self { inventory, driver }
    }
}

#[tonic::async_trait]
impl shim_framework::VolumeLabels for LocalVolumes {
    async fn get_labels_for_volume(
        &self,
        volume: PersistentVolume,
    ) -> Result<GetLabelsForVolumeResponse, CpiError> {
        let labels = volume_labels(&self.inventory.current(), &self.driver, &volume)?;
        Ok(GetLabelsForVolumeResponse { labels })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use cpi_proto::v1::CsiVolumeSource;

    use super::*;

    const INVENTORY: &str = "region: r1\nmachines:\n  - {name: a, instanceID: m-a, zone: z1}\n  \
                             - {name: b, instanceID: m-b}\n  - {name: gone, instanceID: m-g, zone: \
                             z2, state: terminated}\n";
    const DRIVER: &str = "local.csi.example";

    /// A case: name, volume, expected labels.
    type Case = (
        &'static str,
        PersistentVolume,
        &'static [(&'static str, &'static str)],
    );

    fn csi(driver: &str, machine: Option<&str>) -> PersistentVolume {
        PersistentVolume {
            source: Some(Source::Csi(CsiVolumeSource {
                driver: driver.into(),
                volume_handle: "vol-1".into(),
                volume_attributes: machine
                    .map(|m| (MACHINE_ATTRIBUTE.to_string(), m.to_string()))
                    .into_iter()
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn volume_labels_table() {
        let inventory = Inventory::parse(Path::new("inventory.yaml"), INVENTORY).unwrap();
        const ZONE_AND_REGION: &[(&str, &str)] = &[(LABEL_ZONE, "z1"), (LABEL_REGION, "r1")];
        let cases: Vec<Case> = vec![
            (
                "our volume on a machine",
                csi(DRIVER, Some("a")),
                ZONE_AND_REGION,
            ),
            (
                "machine without a zone: region only",
                csi(DRIVER, Some("b")),
                &[(LABEL_REGION, "r1")],
            ),
            ("our volume naming no machine", csi(DRIVER, None), &[]),
            ("our volume, blank machine", csi(DRIVER, Some(" ")), &[]),
            ("another driver's volume", csi("other.csi", Some("a")), &[]),
            (
                "an in-tree cloud disk",
                PersistentVolume {
                    source: Some(Source::AwsEbsVolumeId("vol-1".into())),
                    ..Default::default()
                },
                &[],
            ),
            ("no source", PersistentVolume::default(), &[]),
        ];
        for (name, volume, want) in cases {
            let got = volume_labels(&inventory, DRIVER, &volume).unwrap();
            let want: HashMap<String, String> = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn volume_on_a_missing_or_terminated_machine_is_disk_not_found() {
        let inventory = Inventory::parse(Path::new("inventory.yaml"), INVENTORY).unwrap();
        for machine in ["nope", "gone"] {
            let err = volume_labels(&inventory, DRIVER, &csi(DRIVER, Some(machine))).unwrap_err();
            match err {
                CpiError::DiskNotFound(message) => {
                    assert!(message.contains(&format!("{machine:?}")), "{message}");
                    assert!(message.contains("vol-1"), "{message}");
                }
                other => panic!("{machine}: {other:?}"),
            }
        }
    }
}
