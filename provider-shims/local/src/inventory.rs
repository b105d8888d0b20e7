//! The inventory file: the machines the local provider knows, parsed and validated as a whole.
//!
//! The inventory is authoritative: a machine absent from it (or `terminated`) does not exist.
//! That is why validation is strict (unknown fields, duplicate names or IDs, malformed addresses
//! are all errors): a typo must never read as "this machine is gone".
//!
//! The file is operator-edited and re-read while the shim runs, so reading and parsing are
//! bounded: at most [`MAX_INVENTORY_BYTES`] are read, YAML anchors and aliases are refused before
//! anything is expanded (an alias bomb is a few kilobytes that expand to gigabytes), and the
//! parser's budget caps events, nodes, depth and documents in proportion to that size.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cpi_proto::v1::{Existence, NodeAddress, NodeAddressType, PowerState};
use serde::Deserialize;

/// Largest inventory file accepted: far above any real inventory (a machine takes a few hundred
/// bytes, so this is over ten thousand machines), small enough that a runaway file cannot
/// exhaust the shim's memory.
pub const MAX_INVENTORY_BYTES: u64 = 4 * 1024 * 1024;

/// Deepest nesting an inventory needs is 5 (document, machines, machine, addresses, address);
/// anything much deeper is not an inventory.
const MAX_YAML_DEPTH: usize = 16;

/// Why an inventory could not be loaded; names the file, and the machine and field when known.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("reading inventory {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_INVENTORY_BYTES`].
    #[error(
        "reading inventory {}: the file has {size} bytes, more than the {limit} an inventory may have",
        .path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes (at least `limit + 1` when it grew while being read).
        size: u64,
        /// The cap, [`MAX_INVENTORY_BYTES`].
        limit: u64,
    },
    /// The file is not a YAML inventory (syntax, unknown field, wrong type, over budget).
    #[error("parsing inventory {}: {error}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why (boxed: the parser's error is large, and errors travel in Results).
        error: Box<serde_saphyr::Error>,
    },
    /// The file uses a YAML anchor (`&name`), alias (`*name`) or merge key (`<<`).
    #[error(
        "parsing inventory {}: line {line}, column {column}: YAML anchors and aliases (&name, \
         *name, << merges) are not allowed in an inventory; write each value out",
        .path.display()
    )]
    Alias {
        /// The file.
        path: PathBuf,
        /// Line of the first anchor or alias (1-based; 0 when unknown).
        line: u64,
        /// Its column (1-based; 0 when unknown).
        column: u64,
    },
    /// The file lists no machines and `--allow-empty-inventory` is not set.
    #[error(
        "inventory {}: lists no machines ({existing} existing machines served until now); \
         refused, as every node's instance would read as gone (--allow-empty-inventory allows it)",
        .path.display()
    )]
    Empty {
        /// The file.
        path: PathBuf,
        /// Existing machines of the inventory being served (0 at start-up).
        existing: usize,
    },
    /// A reload would remove more of the served machines than `--inventory-max-drop-percent`.
    #[error(
        "inventory {}: the new content removes {removed} of the {existing} machines being served \
         ({listed} listed), more than --inventory-max-drop-percent={max_drop_percent}; refused, \
         the last good inventory is still served",
        .path.display()
    )]
    Shrink {
        /// The file.
        path: PathBuf,
        /// Existing machines of the inventory being served.
        existing: usize,
        /// How many of them the new content lacks.
        removed: usize,
        /// Machines the new content lists.
        listed: usize,
        /// The limit, in percent.
        max_drop_percent: u8,
    },
    /// A machine entry is invalid.
    #[error("inventory {}: machine {machine}: {field}: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The machine's name, or `#<index>` when it has none.
        machine: String,
        /// The offending field, e.g. `addresses[1].address`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// File format of the inventory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    /// Default region of every machine.
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    machines: Vec<RawMachine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    #[serde(default)]
    name: String,
    #[serde(rename = "instanceID", default)]
    instance_id: String,
    #[serde(rename = "instanceType", default)]
    instance_type: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    addresses: Vec<RawAddress>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// A machine's lifecycle state, as written in the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Running: exists, not shut down.
    Running,
    /// Stopped: still exists (the Node must be kept), but shut down.
    Shutdown,
    /// Gone for good: reads as not found.
    Terminated,
}

impl MachineState {
    fn parse(raw: Option<&str>) -> Result<Self, String> {
        match raw {
            None | Some("running") => Ok(Self::Running),
            Some("shutdown") => Ok(Self::Shutdown),
            Some("terminated") => Ok(Self::Terminated),
            Some(other) => Err(format!(
                "{other:?} is not one of \"running\", \"shutdown\", \"terminated\""
            )),
        }
    }

    /// Tri-state existence: stopped machines exist, terminated ones do not.
    pub fn existence(self) -> Existence {
        match self {
            Self::Running | Self::Shutdown => Existence::Exists,
            Self::Terminated => Existence::NotFound,
        }
    }

    /// Power state reported with existence and shutdown answers.
    pub fn power_state(self) -> PowerState {
        match self {
            Self::Running => PowerState::Running,
            Self::Shutdown => PowerState::Shutdown,
            Self::Terminated => PowerState::Terminated,
        }
    }

    /// Whether the machine is shut down but still exists.
    pub fn is_shutdown(self) -> bool {
        self == Self::Shutdown
    }

    /// Whether the machine still exists (in any power state).
    pub fn exists(self) -> bool {
        self.existence() == Existence::Exists
    }
}

/// One validated machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Node name.
    pub name: String,
    /// Instance ID (the part after `local://`).
    pub instance_id: String,
    /// Instance type, if given.
    pub instance_type: Option<String>,
    /// Zone, if given.
    pub zone: Option<String>,
    /// Region: the machine's own, else the inventory's.
    pub region: Option<String>,
    /// Addresses in file order.
    pub addresses: Vec<NodeAddress>,
    /// Lifecycle state.
    pub state: MachineState,
    /// Additional node labels.
    pub labels: BTreeMap<String, String>,
}

/// A validated inventory with its lookup indexes.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    region: Option<String>,
    machines: Vec<Machine>,
    by_name: HashMap<String, usize>,
    by_instance_id: HashMap<String, usize>,
}

impl Inventory {
    /// Reads the inventory file at `path`, at most [`MAX_INVENTORY_BYTES`] of it.
    pub fn read(path: &Path) -> Result<String, InventoryError> {
        let read_error = |error| InventoryError::Read {
            path: path.to_path_buf(),
            error,
        };
        let too_large = |size| InventoryError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_INVENTORY_BYTES,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let size = file.metadata().map_err(read_error)?.len();
        if size > MAX_INVENTORY_BYTES {
            return Err(too_large(size));
        }
        // The file may grow between the size check and the read: never read past the cap.
        let mut text = String::new();
        let read = file
            .take(MAX_INVENTORY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if read as u64 > MAX_INVENTORY_BYTES {
            return Err(too_large(read as u64));
        }
        Ok(text)
    }

    /// Parses and validates inventory text; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, InventoryError> {
        let raw = parse_yaml(path, text)?;
        let region = non_empty(raw.region);
        let mut inventory = Self {
            region: region.clone(),
            ..Self::default()
        };
        for (index, raw_machine) in raw.machines.into_iter().enumerate() {
            let label = if raw_machine.name.is_empty() {
                format!("#{index}")
            } else {
                format!("{:?}", raw_machine.name)
            };
            let invalid = |field: &str, message: String| InventoryError::Invalid {
                path: path.to_path_buf(),
                machine: label.clone(),
                field: field.to_string(),
                message,
            };
            let machine = validate_machine(raw_machine, region.as_ref())
                .map_err(|(field, message)| invalid(&field, message))?;
            if inventory.by_name.contains_key(&machine.name) {
                return Err(invalid("name", "is used by another machine".into()));
            }
            if inventory.by_instance_id.contains_key(&machine.instance_id) {
                return Err(invalid(
                    "instanceID",
                    format!("{:?} is used by another machine", machine.instance_id),
                ));
            }
            let at = inventory.machines.len();
            inventory.by_name.insert(machine.name.clone(), at);
            inventory
                .by_instance_id
                .insert(machine.instance_id.clone(), at);
            inventory.machines.push(machine);
        }
        Ok(inventory)
    }

    /// The inventory-wide default region.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// All machines, in file order.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// The machine with this node name.
    pub fn by_name(&self, name: &str) -> Option<&Machine> {
        self.by_name.get(name).map(|&i| &self.machines[i])
    }

    /// The machine with this instance ID.
    pub fn by_instance_id(&self, instance_id: &str) -> Option<&Machine> {
        self.by_instance_id
            .get(instance_id)
            .map(|&i| &self.machines[i])
    }
}

/// Deserialises the file format within a budget proportional to [`MAX_INVENTORY_BYTES`], with
/// anchors and aliases refused before any is expanded.
fn parse_yaml(path: &Path, text: &str) -> Result<RawInventory, InventoryError> {
    let parse_error = |error| InventoryError::Parse {
        path: path.to_path_buf(),
        error: Box::new(error),
    };
    if text.len() as u64 > MAX_INVENTORY_BYTES {
        return Err(InventoryError::TooLarge {
            path: path.to_path_buf(),
            size: text.len() as u64,
            limit: MAX_INVENTORY_BYTES,
        });
    }
    // Without aliases, events, nodes and scalar bytes number at most about one per input byte
    // (the densest, `{a,b,…}`, is two scalars per two bytes), so twice the size cap bounds them
    // without refusing any file under the cap.
    let bound = usize::try_from(MAX_INVENTORY_BYTES)
        .unwrap_or(usize::MAX)
        .saturating_mul(2);
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = bound;
    budget.max_nodes = bound;
    budget.max_total_scalar_bytes = bound;
    budget.max_depth = MAX_YAML_DEPTH;
    budget.max_documents = 1;
    budget.max_aliases = 0;
    budget.max_anchors = 0;
    budget.max_merge_keys = 0;
    budget.max_inclusion_depth = 0;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // One-line errors: they end up in log lines and in answers' detail strings.
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(text, options).map_err(|error| match &error {
        serde_saphyr::Error::Budget {
            breach:
                serde_saphyr::budget::BudgetBreach::Aliases { .. }
                | serde_saphyr::budget::BudgetBreach::Anchors { .. }
                | serde_saphyr::budget::BudgetBreach::MergeKeys { .. },
            ..
        } => {
            let at = error.location();
            InventoryError::Alias {
                path: path.to_path_buf(),
                line: at.map_or(0, |at| at.line()),
                column: at.map_or(0, |at| at.column()),
            }
        }
        _ => parse_error(error),
    })
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Validates one machine; the error is `(field, message)`.
fn validate_machine(
    raw: RawMachine,
    default_region: Option<&String>,
) -> Result<Machine, (String, String)> {
    let err = |field: &str, message: &str| (field.to_string(), message.to_string());
    if raw.name.is_empty() {
        return Err(err("name", "is required"));
    }
    if raw.name.chars().any(char::is_whitespace) {
        return Err(err("name", "must not contain whitespace"));
    }
    if raw.instance_id.is_empty() {
        return Err(err("instanceID", "is required"));
    }
    if raw.instance_id.chars().any(char::is_whitespace) || raw.instance_id.contains("://") {
        return Err(err(
            "instanceID",
            "must not contain whitespace or \"://\" (it becomes local://<instanceID>)",
        ));
    }
    let state = MachineState::parse(raw.state.as_deref()).map_err(|m| ("state".into(), m))?;
    let addresses = raw
        .addresses
        .into_iter()
        .enumerate()
        .map(|(i, address)| {
            validate_address(address).map_err(|(f, m)| (format!("addresses[{i}].{f}"), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(key) = raw
        .labels
        .keys()
        .find(|k| k.is_empty() || k.chars().any(char::is_whitespace))
    {
        return Err((
            format!("labels[{key:?}]"),
            "label keys must be non-empty and contain no whitespace".into(),
        ));
    }
    Ok(Machine {
        name: raw.name,
        instance_id: raw.instance_id,
        instance_type: non_empty(raw.instance_type),
        zone: non_empty(raw.zone),
        region: non_empty(raw.region).or_else(|| default_region.cloned()),
        addresses,
        state,
        labels: raw.labels,
    })
}

fn validate_address(raw: RawAddress) -> Result<NodeAddress, (String, String)> {
    let kind = match raw.kind.as_str() {
        "InternalIP" => NodeAddressType::InternalIp,
        "ExternalIP" => NodeAddressType::ExternalIp,
        "Hostname" => NodeAddressType::Hostname,
        "InternalDNS" => NodeAddressType::InternalDns,
        "ExternalDNS" => NodeAddressType::ExternalDns,
        other => {
            return Err((
                "type".into(),
                format!(
                    "{other:?} is not one of InternalIP, ExternalIP, Hostname, InternalDNS, \
                     ExternalDNS"
                ),
            ));
        }
    };
    let is_ip = matches!(
        kind,
        NodeAddressType::InternalIp | NodeAddressType::ExternalIp
    );
    if is_ip {
        raw.address.parse::<IpAddr>().map_err(|_| {
            (
                "address".to_string(),
                format!("{:?} is not an IP address ({})", raw.address, raw.kind),
            )
        })?;
    } else if raw.address.is_empty() || raw.address.chars().any(char::is_whitespace) {
        return Err((
            "address".into(),
            format!("{:?} is not a host name ({})", raw.address, raw.kind),
        ));
    }
    Ok(NodeAddress {
        r#type: kind as i32,
        address: raw.address,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(Path::new("inv.yaml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const GOOD: &str = r#"
region: region-1
machines:
  - name: node-a
    instanceID: i-a
    instanceType: small
    zone: zone-a
    addresses:
      - {type: InternalIP, address: 10.0.0.1}
      - {type: Hostname, address: node-a}
    labels:
      example.com/rack: r1
  - name: node-b
    instanceID: i-b
    zone: zone-b
    region: region-2
    state: shutdown
  - name: node-c
    instanceID: i-c
    state: terminated
"#;

    #[test]
    fn parses_a_valid_inventory_with_defaults() {
        let inv = parse(GOOD).unwrap();
        assert_eq!(inv.machines().len(), 3);
        let a = inv.by_name("node-a").unwrap();
        assert_eq!(a.instance_id, "i-a");
        assert_eq!(a.instance_type.as_deref(), Some("small"));
        assert_eq!(a.region.as_deref(), Some("region-1"), "top-level default");
        assert_eq!(a.state, MachineState::Running, "default state");
        assert_eq!(a.addresses[0].r#type, NodeAddressType::InternalIp as i32);
        assert_eq!(a.labels["example.com/rack"], "r1");
        let b = inv.by_instance_id("i-b").unwrap();
        assert_eq!(b.name, "node-b");
        assert_eq!(b.region.as_deref(), Some("region-2"), "own region wins");
        assert_eq!(b.state, MachineState::Shutdown);
        assert!(inv.by_name("node-z").is_none());
    }

    #[test]
    fn empty_file_is_an_empty_inventory() {
        assert!(parse("machines: []").unwrap().machines().is_empty());
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let msg = error("machines:\n- {name: a, instanceID: i-1}\n- {name: a, instanceID: i-2}\n");
        assert!(
            msg.contains("machine \"a\": name: is used by another machine"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_instance_ids_are_rejected() {
        let msg = error("machines:\n- {name: a, instanceID: i-1}\n- {name: b, instanceID: i-1}\n");
        assert!(msg.contains("machine \"b\": instanceID"), "{msg}");
    }

    #[test]
    fn empty_ids_are_rejected() {
        let msg = error("machines:\n- {name: a, instanceID: \"\"}\n");
        assert!(
            msg.contains("machine \"a\": instanceID: is required"),
            "{msg}"
        );
        let msg = error("machines:\n- {instanceID: i-1}\n");
        assert!(msg.contains("machine #0: name: is required"), "{msg}");
    }

    #[test]
    fn bad_address_types_are_rejected() {
        let msg = error(
            "machines:\n- name: a\n  instanceID: i-1\n  addresses:\n  - {type: PublicIP, address: 1.2.3.4}\n",
        );
        assert!(msg.contains("machine \"a\": addresses[0].type"), "{msg}");
        assert!(msg.contains("PublicIP"), "{msg}");
    }

    #[test]
    fn bad_ips_are_rejected() {
        let msg = error(
            "machines:\n- name: a\n  instanceID: i-1\n  addresses:\n  - {type: InternalIP, address: 10.0.0.1}\n  - {type: ExternalIP, address: 300.1.1.1}\n",
        );
        assert!(msg.contains("machine \"a\": addresses[1].address"), "{msg}");
        assert!(msg.contains("not an IP address"), "{msg}");
    }

    #[test]
    fn bad_states_are_rejected() {
        let msg = error("machines:\n- {name: a, instanceID: i-1, state: stopped}\n");
        assert!(msg.contains("machine \"a\": state"), "{msg}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        // A misspelt key must not silently drop data the shim answers authoritatively from.
        let msg = error("machines:\n- {name: a, instanceId: i-1}\n");
        assert!(msg.contains("instanceId"), "{msg}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let msg = error("machines: [\n");
        assert!(msg.starts_with("parsing inventory inv.yaml"), "{msg}");
    }

    #[test]
    fn anchors_and_aliases_are_refused_with_their_line() {
        let msg = error("machines:\n- name: a\n  instanceID: i-a\n  labels: {x: &v one, y: *v}\n");
        assert!(
            msg.starts_with("parsing inventory inv.yaml: line 4"),
            "{msg}"
        );
        assert!(msg.contains("anchors and aliases"), "{msg}");
        // An anchor alone is refused too: it only exists to be aliased.
        let msg = error("machines:\n- &m {name: a, instanceID: i-a}\n");
        assert!(msg.contains("anchors and aliases"), "{msg}");
        let msg = error("machines:\n- name: a\n  instanceID: i-a\n  labels:\n    <<: {x: y}\n");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("anchors and aliases"), "{msg}");
    }

    #[test]
    fn alias_bomb_is_refused_quickly_before_any_expansion() {
        // The classic "billion laughs": nine levels of ten aliases each, 10^9 strings expanded.
        let mut bomb = String::from("machines:\n- name: a\n  instanceID: i-a\n  labels:\n");
        bomb.push_str("    l0: &l0 lol\n");
        for level in 1..=9 {
            let refs = vec![format!("*l{}", level - 1); 10].join(", ");
            bomb.push_str(&format!("    l{level}: &l{level} [{refs}]\n"));
        }
        let started = std::time::Instant::now();
        let msg = error(&bomb);
        let took = started.elapsed();
        assert!(msg.contains("anchors and aliases"), "{msg}");
        assert!(
            took < std::time::Duration::from_millis(250),
            "took {took:?}"
        );
    }

    #[test]
    fn more_than_one_document_is_refused() {
        let msg = error("machines: []\n---\nmachines: []\n");
        assert!(msg.starts_with("parsing inventory inv.yaml"), "{msg}");
    }

    #[test]
    fn nesting_deeper_than_an_inventory_is_refused() {
        let deep = format!("machines: {}{}\n", "[".repeat(100), "]".repeat(100));
        let msg = error(&deep);
        assert!(msg.starts_with("parsing inventory inv.yaml"), "{msg}");
    }

    #[test]
    fn files_over_the_size_cap_are_refused_naming_file_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let size = MAX_INVENTORY_BYTES + 1;
        std::fs::write(&path, " ".repeat(usize::try_from(size).unwrap())).unwrap();
        let msg = Inventory::read(&path).unwrap_err().to_string();
        assert!(msg.contains("big.yaml"), "{msg}");
        assert!(msg.contains(&format!("has {size} bytes")), "{msg}");
        assert!(msg.contains(&MAX_INVENTORY_BYTES.to_string()), "{msg}");
        // Text handed over directly is held to the same cap.
        let text = " ".repeat(usize::try_from(size).unwrap());
        assert!(matches!(parse(&text), Err(InventoryError::TooLarge { .. })));
    }

    #[test]
    fn a_large_real_inventory_fits_the_bounds() {
        // Ten thousand machines, each as the bench writes them: well inside the size cap, and
        // the parser's budget must not refuse it.
        let mut text = String::from("region: r\nmachines:\n");
        for i in 0..10_000 {
            text.push_str(&format!(
                "  - name: node-{i}\n    instanceID: m-{i}\n    instanceType: t\n    zone: z\n    \
                 addresses:\n      - {{type: InternalIP, address: 10.0.{}.{}}}\n      - \
                 {{type: Hostname, address: node-{i}}}\n",
                i / 250,
                i % 250
            ));
        }
        assert!((text.len() as u64) < MAX_INVENTORY_BYTES);
        let started = std::time::Instant::now();
        assert_eq!(parse(&text).unwrap().machines().len(), 10_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn state_maps_to_existence_and_shutdown() {
        let table = [
            (
                MachineState::Running,
                Existence::Exists,
                PowerState::Running,
                false,
            ),
            (
                MachineState::Shutdown,
                Existence::Exists,
                PowerState::Shutdown,
                true,
            ),
            (
                MachineState::Terminated,
                Existence::NotFound,
                PowerState::Terminated,
                false,
            ),
        ];
        for (state, existence, power, shutdown) in table {
            assert_eq!(state.existence(), existence, "{state:?}");
            assert_eq!(state.power_state(), power, "{state:?}");
            assert_eq!(state.is_shutdown(), shutdown, "{state:?}");
        }
    }
}
