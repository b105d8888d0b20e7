//! The real local shim served over a Unix socket and called through the generated clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use cpi_proto::v1::instances_client::InstancesClient;
use cpi_proto::v1::instances_v2_client::InstancesV2Client;
use cpi_proto::v1::zones_client::ZonesClient;
use cpi_transport::{ClientEndpoint, ConnectOptions, CpiChannel};
use local_shim::{LocalFlags, LocalShim};
use shim_framework::RunningShim;
use tokio::sync::oneshot;
use tonic::Code;

const EXAMPLE: &str = include_str!("../examples/inventory.yaml");

struct Shim {
    socket: PathBuf,
    running: RunningShim,
    stop: oneshot::Sender<()>,
}

impl Shim {
    async fn start(dir: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("local.sock");
        let mut args = vec![
            "local-shim".to_string(),
            format!("--unix-socket={}", socket.display()),
            format!("--inventory={}", dir.join("inventory.yaml").display()),
            format!("--state-dir={}", dir.join("state").display()),
            "--inventory-reload-interval=50ms".into(),
            "--shutdown-grace-period=2s".into(),
        ];
        if !extra
            .iter()
            .any(|a| a.starts_with("--metrics-bind-address"))
        {
            args.push("--metrics-bind-address=0".into());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let flags = LocalFlags::try_parse_from(args).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = LocalShim::new(&flags)
            .unwrap()
            .start(&flags.serve, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        Self {
            socket,
            running,
            stop,
        }
    }

    fn channel(&self) -> CpiChannel {
        cpi_transport::connect(
            ClientEndpoint::Unix {
                path: self.socket.clone(),
            },
            ConnectOptions::default(),
        )
        .unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.running.wait())
            .await
            .expect("shim did not stop")
            .unwrap();
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.yaml"), EXAMPLE).unwrap();
    dir
}

fn node(name: &str, provider_id: Option<&str>) -> Option<pb::Node> {
    Some(pb::Node {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        provider_id: provider_id.map(str::to_string),
        ..Default::default()
    })
}

async fn existence(client: &mut InstancesV2Client<CpiChannel>, name: &str) -> i32 {
    client
        .instance_exists(pb::InstanceExistsRequest {
            node: node(name, None),
            consistency: pb::Consistency::Cached as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .existence
}

#[tokio::test]
async fn provider_info_describes_the_local_shim() {
    let dir = setup();
    let shim = Shim::start(dir.path(), &[]).await;
    let info = pb::provider_client::ProviderClient::new(shim.channel())
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "local");
    assert_eq!(info.provider_id_prefixes, vec!["local://".to_string()]);
    assert_eq!(
        info.capabilities,
        vec![
            pb::Capability::InstancesV2 as i32,
            pb::Capability::Instances as i32,
            pb::Capability::Zones as i32,
            pb::Capability::LoadBalancer as i32,
            pb::Capability::LoadBalancerNodeSets as i32,
            pb::Capability::Routes as i32,
            pb::Capability::LoadBalancerValidation as i32,
        ]
    );
    shim.stop().await;
}

#[tokio::test]
async fn instances_v2_answers_from_the_inventory() {
    let dir = setup();
    let shim = Shim::start(dir.path(), &[]).await;
    let mut client = InstancesV2Client::new(shim.channel());

    let meta = client
        .instance_metadata(pb::InstanceMetadataRequest {
            node: node("node-a", None),
        })
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!(meta.provider_id.as_deref(), Some("local://m-a"));
    assert_eq!(meta.instance_type.as_deref(), Some("standard-2"));
    assert_eq!(meta.zone.as_deref(), Some("zone-a"));
    assert_eq!(meta.region.as_deref(), Some("local-1"));
    assert_eq!(meta.node_addresses[0].address, "127.0.10.10");
    assert_eq!(meta.additional_labels["example.com/rack"], "rack-1");

    assert_eq!(
        existence(&mut client, "node-a").await,
        pb::Existence::Exists as i32
    );
    assert_eq!(
        existence(&mut client, "node-c").await,
        pb::Existence::Exists as i32
    );
    assert_eq!(
        existence(&mut client, "node-z").await,
        pb::Existence::NotFound as i32
    );

    let down = client
        .instance_shutdown(pb::InstanceShutdownRequest {
            node: node("whatever", Some("local://m-c")),
            consistency: pb::Consistency::Strong as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(down.shutdown);
    assert_eq!(down.power_state, pb::PowerState::Shutdown as i32);

    let status = client
        .instance_metadata(pb::InstanceMetadataRequest {
            node: node("node-z", None),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::InstanceNotFound(_)
    ));

    // Another provider's node is refused, never reported missing.
    let status = client
        .instance_exists(pb::InstanceExistsRequest {
            node: node("node-a", Some("aws:///eu-west-1a/i-1")),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    shim.stop().await;
}

#[tokio::test]
async fn legacy_instances_and_zones_answer_from_the_inventory() {
    let dir = setup();
    let shim = Shim::start(dir.path(), &["--zone=zone-a"]).await;
    let mut instances = InstancesClient::new(shim.channel());
    let by_name = pb::NodeNameRequest {
        node_name: "node-b".into(),
        consistency: 0,
    };
    let by_id = |id: &str| pb::ProviderIdRequest {
        provider_id: id.into(),
        consistency: 0,
    };
    assert_eq!(
        instances
            .instance_id(by_name.clone())
            .await
            .unwrap()
            .into_inner()
            .instance_id,
        "m-b"
    );
    assert_eq!(
        instances
            .node_addresses(by_name.clone())
            .await
            .unwrap()
            .into_inner()
            .addresses
            .len(),
        3
    );
    assert_eq!(
        instances
            .instance_type_by_provider_id(by_id("local://m-c"))
            .await
            .unwrap()
            .into_inner()
            .instance_type
            .as_deref(),
        Some("standard-4")
    );
    assert_eq!(
        instances
            .instance_exists_by_provider_id(by_id("local://m-x"))
            .await
            .unwrap()
            .into_inner()
            .existence,
        pb::Existence::NotFound as i32
    );
    assert!(
        instances
            .instance_shutdown_by_provider_id(by_id("local://m-c"))
            .await
            .unwrap()
            .into_inner()
            .shutdown
    );
    assert_eq!(
        instances
            .current_node_name(pb::CurrentNodeNameRequest {
                hostname: "node-a".into()
            })
            .await
            .unwrap()
            .into_inner()
            .node_name,
        "node-a"
    );
    let status = instances
        .instance_id(pb::NodeNameRequest {
            node_name: String::new(),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut zones = ZonesClient::new(shim.channel());
    let own = zones
        .get_zone(pb::GetZoneRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.failure_domain.as_deref(), Some("zone-a"));
    assert_eq!(own.region.as_deref(), Some("local-1"));
    let b = zones
        .get_zone_by_node_name(by_name)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.failure_domain.as_deref(), Some("zone-b"));
    let c = zones
        .get_zone_by_provider_id(by_id("local://m-c"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.failure_domain.as_deref(), Some("zone-a"));
    shim.stop().await;
}

#[tokio::test]
async fn inventory_edits_are_served_and_broken_edits_are_not() {
    let dir = setup();
    let shim = Shim::start(dir.path(), &[]).await;
    let mut client = InstancesV2Client::new(shim.channel());
    let path = dir.path().join("inventory.yaml");

    // Terminate node-a.
    std::fs::write(
        &path,
        EXAMPLE.replacen("state: running", "state: terminated", 1),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while existence(&mut client, "node-a").await != pb::Existence::NotFound as i32 {
        assert!(tokio::time::Instant::now() < deadline, "edit not served");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A broken edit (duplicate instance ID) is ignored: node-b stays, node-a stays terminated.
    std::fs::write(&path, EXAMPLE.replace("instanceID: m-b", "instanceID: m-a")).unwrap();
    // A strong read re-reads the file, so the broken edit has certainly been seen (and
    // rejected) before the cached answers are checked; it cannot vouch for anything meanwhile.
    let strong = client
        .instance_exists(pb::InstanceExistsRequest {
            node: node("node-a", None),
            consistency: pb::Consistency::Strong as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strong.existence, pb::Existence::Unknown as i32);
    assert_eq!(
        existence(&mut client, "node-b").await,
        pb::Existence::Exists as i32
    );
    assert_eq!(
        existence(&mut client, "node-a").await,
        pb::Existence::NotFound as i32
    );
    shim.stop().await;
}

fn ssh_key(fence: pb::Fence) -> pb::AddSshKeyRequest {
    pb::AddSshKeyRequest {
        user: "root".into(),
        key_data: b"ssh-ed25519 AAAA".to_vec(),
        fence: Some(fence),
    }
}

fn fence(transitions: i64, holder: &str) -> pb::Fence {
    pb::Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: holder.into(),
        lease_transitions: transitions,
        ..Default::default()
    }
}

#[tokio::test]
async fn fence_marks_survive_a_restart() {
    let dir = setup();
    let shim = Shim::start(dir.path(), &[]).await;
    let status = InstancesClient::new(shim.channel())
        .add_ssh_key_to_all_instances(ssh_key(fence(5, "ccm-new")))
        .await
        .unwrap_err();
    // The fence was accepted (and recorded); the call itself is not supported.
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::NotImplemented(_)
    ));
    shim.stop().await;

    let shim = Shim::start(dir.path(), &[]).await;
    let status = InstancesClient::new(shim.channel())
        .add_ssh_key_to_all_instances(ssh_key(fence(4, "ccm-old")))
        .await
        .unwrap_err();
    assert!(
        matches!(CpiError::from_status(&status), CpiError::StaleLeader(_)),
        "{status:?}"
    );
    shim.stop().await;
}

#[tokio::test]
async fn start_up_fails_clearly_on_a_bad_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let flags = |inventory: &Path| {
        LocalFlags::try_parse_from([
            "local-shim".to_string(),
            "--unix-socket=/nonexistent/x.sock".into(),
            format!("--inventory={}", inventory.display()),
            format!("--state-dir={}", dir.path().join("state").display()),
        ])
        .unwrap()
    };
    let missing = dir.path().join("missing.yaml");
    let msg = LocalShim::new(&flags(&missing)).err().unwrap().to_string();
    assert!(msg.contains("missing.yaml"), "{msg}");

    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(
        &invalid,
        "machines:\n- {name: a, instanceID: i, state: asleep}\n",
    )
    .unwrap();
    let msg = LocalShim::new(&flags(&invalid)).err().unwrap().to_string();
    assert!(msg.contains("machine \"a\": state"), "{msg}");

    assert!(
        LocalFlags::try_parse_from(["local-shim", "--unix-socket=/x"]).is_err(),
        "--inventory is required"
    );
}

/// The shim's `/metrics` page (the framework serves it over plain HTTP/1.1).
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: shim\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The sum of every series of the metrics named `names`, whatever their labels.
fn metric_sum(page: &str, names: &[&str]) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            names.contains(&name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The value of one exact series (name and labels as the page spells them), 0 when absent.
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

/// Every counter the reloader moves when it has read a new content, accepted or not.
const RELOAD_COUNTERS: &[&str] = &[
    "local_shim_inventory_reloads_total",
    "local_shim_inventory_reload_errors_total",
];

/// A shim serving the example inventory with its metrics on an ephemeral port.
async fn shim_with_metrics(dir: &Path) -> (Shim, SocketAddr) {
    let shim = Shim::start(dir, &["--metrics-bind-address=127.0.0.1:0"]).await;
    let addr = shim
        .running
        .metrics_addr()
        .expect("metrics endpoint enabled");
    (shim, addr)
}

/// Writes `content` over the inventory and waits until the background reloader has processed
/// it (a reload counter moved), returning the metrics page read then and how long it took.
async fn edit_and_wait(dir: &Path, addr: SocketAddr, content: &str) -> (String, Duration) {
    let before = metric_sum(&scrape(addr).await, RELOAD_COUNTERS);
    let written = tokio::time::Instant::now();
    std::fs::write(dir.join("inventory.yaml"), content).unwrap();
    let deadline = written + Duration::from_secs(10);
    loop {
        let page = scrape(addr).await;
        if metric_sum(&page, RELOAD_COUNTERS) > before {
            return (page, written.elapsed());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reloader did not process the edit within 10 s:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asks InstanceExists for every example machine, cached and strongly consistent; none may be
/// NOT_FOUND, and the cached answer (the last good inventory) must be EXISTS. Returns the
/// strong answer's detail for node-a.
async fn assert_example_machines_exist(shim: &Shim) -> String {
    let mut client = InstancesV2Client::new(shim.channel());
    let mut detail = String::new();
    for name in ["node-a", "node-b", "node-c"] {
        assert_eq!(
            existence(&mut client, name).await,
            pb::Existence::Exists as i32,
            "{name} must still exist (cached answer)"
        );
        let strong = client
            .instance_exists(pb::InstanceExistsRequest {
                node: node(name, None),
                consistency: pb::Consistency::Strong as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(
            strong.existence,
            pb::Existence::NotFound as i32,
            "{name} must never read as not found: {}",
            strong.detail
        );
        if name == "node-a" {
            detail = strong.detail;
        }
    }
    detail
}

/// Asserts the edit was counted once under `result` and not served: the example's three
/// machines still are, and the file is reported stale.
fn assert_not_served(page: &str, result: &str) {
    let series = format!("local_shim_inventory_reloads_total{{result=\"{result}\"}}");
    assert_eq!(metric(page, &series), 1.0, "{page}");
    assert_eq!(metric(page, "local_shim_inventory_machines"), 3.0, "{page}");
    assert_eq!(metric(page, "local_shim_inventory_stale"), 1.0, "{page}");
}

#[tokio::test]
async fn emptied_inventory_file_never_makes_machines_not_found() {
    let dir = setup();
    let (shim, addr) = shim_with_metrics(dir.path()).await;
    let (page, _) = edit_and_wait(dir.path(), addr, "").await;
    let detail = assert_example_machines_exist(&shim).await;
    assert!(detail.contains("inventory.yaml"), "{detail}");
    assert!(detail.contains("no machines"), "{detail}");
    assert_not_served(&page, "refused_empty");
    shim.stop().await;
}

#[tokio::test]
async fn inventory_file_cut_between_machines_never_makes_machines_not_found() {
    let dir = setup();
    let (shim, addr) = shim_with_metrics(dir.path()).await;
    // An in-place edit read half-way: only node-a's entry made it, and it is valid YAML.
    let cut = &EXAMPLE[..EXAMPLE.find("  - name: node-b").unwrap()];
    let (page, _) = edit_and_wait(dir.path(), addr, cut).await;
    let detail = assert_example_machines_exist(&shim).await;
    assert!(
        detail.contains("removes 2 of the 3 machines"),
        "the refusal names the counts: {detail}"
    );
    assert_not_served(&page, "refused_shrink");
    shim.stop().await;
}

/// The process's peak resident set size so far (Linux `VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    kib * 1024
}

#[tokio::test]
async fn inventory_alias_bomb_is_rejected_quickly_and_never_makes_machines_not_found() {
    let dir = setup();
    let (shim, addr) = shim_with_metrics(dir.path()).await;
    // 512 KiB of label text, referenced 400 times: 200 MiB once aliases are expanded, from a
    // file of a little over 512 KiB.
    let mut bomb = EXAMPLE.replace(
        "      example.com/rack: rack-1\n",
        &format!("      example.com/blob: &blob {}\n", "x".repeat(512 * 1024)),
    );
    bomb.push_str("    labels:\n");
    for i in 0..400 {
        bomb.push_str(&format!("      example.com/copy-{i}: *blob\n"));
    }
    let peak_before = peak_rss();
    let (page, took) = edit_and_wait(dir.path(), addr, &bomb).await;
    let grown = peak_rss().saturating_sub(peak_before);
    // One reload tick is 50 ms; parsing must not add to that noticeably.
    assert!(took < Duration::from_millis(750), "took {took:?}");
    assert!(
        grown < 64 * 1024 * 1024,
        "peak memory grew by {} MiB",
        grown / (1024 * 1024)
    );
    let detail = assert_example_machines_exist(&shim).await;
    assert!(detail.contains("aliases"), "names the cause: {detail}");
    assert_not_served(&page, "invalid");
    shim.stop().await;
}

#[tokio::test]
async fn start_up_fails_clearly_on_an_empty_inventory_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("inventory.yaml");
    std::fs::write(&inventory, "").unwrap();
    let flags = |extra: &[&str]| {
        let mut args = vec![
            "local-shim".to_string(),
            "--unix-socket=/nonexistent/x.sock".into(),
            format!("--inventory={}", inventory.display()),
            format!("--state-dir={}", dir.path().join("state").display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        LocalFlags::try_parse_from(args).unwrap()
    };
    let msg = LocalShim::new(&flags(&[])).err().unwrap().to_string();
    assert!(msg.contains("inventory.yaml: lists no machines"), "{msg}");
    assert!(msg.contains("--allow-empty-inventory"), "{msg}");

    let shim = LocalShim::new(&flags(&["--allow-empty-inventory"])).unwrap();
    assert!(shim.inventory().current().machines().is_empty());
}

#[test]
fn inventory_max_drop_percent_is_a_percentage() {
    let parse = |value: &str| {
        LocalFlags::try_parse_from([
            "local-shim",
            "--unix-socket=/x",
            "--inventory=/x.yaml",
            &format!("--inventory-max-drop-percent={value}"),
        ])
    };
    assert_eq!(parse("0").unwrap().inventory_max_drop_percent, 0);
    assert_eq!(parse("100").unwrap().inventory_max_drop_percent, 100);
    assert!(parse("101").is_err());
    assert!(parse("-1").is_err());
    let defaults =
        LocalFlags::try_parse_from(["local-shim", "--unix-socket=/x", "--inventory=/x.yaml"])
            .unwrap();
    assert_eq!(defaults.inventory_max_drop_percent, 50);
    assert!(!defaults.allow_empty_inventory);
}
