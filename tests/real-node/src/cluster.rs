//! Starting and stopping the real single-node cluster.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use test_control_plane::ControlPlane;
use test_support::{Location, Process, Wait};

use crate::Error;
use crate::binaries::{NodeBinaries, PAUSE_IMAGE};
use crate::config::{self, POD_CIDR};
use crate::host::{LOCK_FILE, Snapshot, run};

/// The environment variable that overrides the node's address (default: the address of the
/// interface the default route leaves through).
pub const ENV_NODE_IP: &str = "CCM_REAL_NODE_IP";
/// The namespace containerd's CRI plugin keeps Kubernetes' images and containers in.
const K8S_NAMESPACE: &str = "k8s.io";
/// How long a daemon gets between SIGTERM and SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The kubelet's image credential providers: `--image-credential-provider-config` and
/// `--image-credential-provider-bin-dir`.
#[derive(Debug, Clone)]
pub struct CredentialProviders {
    /// The `CredentialProviderConfig` file (v1alpha1 for this kubelet).
    pub config: PathBuf,
    /// The directory holding the plugin binaries the config names.
    pub bin_dir: PathBuf,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The Node's name (the kubelet's `--hostname-override`).
    pub node_name: String,
    /// The kubelet's credential providers, if any.
    pub credential_providers: Option<CredentialProviders>,
    /// Time allowed for the node to register and become Ready.
    pub startup_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            node_name: "real-node".to_owned(),
            credential_providers: None,
            startup_timeout: Duration::from_secs(120),
        }
    }
}

/// A running single-node cluster; stopped, and the host put back as it was, when dropped.
#[derive(Debug)]
pub struct Cluster {
    kube_proxy: Option<Process>,
    kubelet: Option<Process>,
    scheduler: Option<Process>,
    controller_manager: Option<Process>,
    containerd: Option<Process>,
    snapshot: Option<Snapshot>,
    control_plane: Option<ControlPlane>,
    binaries: NodeBinaries,
    node_name: String,
    node_ip: IpAddr,
    containerd_dir: PathBuf,
    started_in: Duration,
    dir: Option<tempfile::TempDir>,
    // Released last: the next node may start once everything above is undone.
    _lock: File,
}

impl Cluster {
    /// Starts etcd, the API server, kube-controller-manager (`--cloud-provider=external`), the
    /// scheduler, containerd, a kubelet (`--cloud-provider=external`) and kube-proxy, and waits
    /// until the kubelet has registered its Node. Only one runs per machine at a time: a second
    /// start waits for the first to stop.
    pub async fn start(options: ClusterOptions) -> Result<Cluster, Error> {
        let started = Instant::now();
        check_root()?;
        let binaries = NodeBinaries::discover()?;
        let node_ip = node_ip()?;
        let lock = File::create(LOCK_FILE).map_err(Error::io(format!("creating {LOCK_FILE}")))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .map_err(|e| Error::Machine(format!("waiting for {LOCK_FILE}: {e}")))?
            .map_err(Error::io(format!("locking {LOCK_FILE}")))?;
        if let Some(old) = Snapshot::left_behind() {
            tracing::warn!("a real node of a test process that died was not torn down; undoing it");
            let failures = old.restore();
            if !failures.is_empty() {
                return Err(Error::Machine(format!(
                    "could not undo the host changes of an earlier real node: {}",
                    failures.join("; ")
                )));
            }
        }
        let dir = test_support::temp_dir("ccm-real-node-", Location::System)?;
        let snapshot = Snapshot::capture(dir.path())?;
        let mut cluster = Cluster {
            kube_proxy: None,
            kubelet: None,
            scheduler: None,
            controller_manager: None,
            containerd: None,
            snapshot: Some(snapshot),
            control_plane: None,
            binaries,
            node_name: options.node_name.clone(),
            node_ip,
            containerd_dir: dir.path().join("containerd"),
            started_in: Duration::ZERO,
            dir: Some(dir),
            _lock: lock,
        };
        // From here on, dropping `cluster` undoes whatever was started.
        cluster.launch(&options, started).await?;
        cluster.started_in = started.elapsed();
        tracing::info!(node = %cluster.node_name, ip = %node_ip, took = ?cluster.started_in, "real node ready");
        Ok(cluster)
    }

    async fn launch(&mut self, options: &ClusterOptions, started: Instant) -> Result<(), Error> {
        let deadline = started + options.startup_timeout;
        let dir = self.dir()?.to_path_buf();
        let logs = dir.join("logs");
        for sub in [
            "logs",
            "containerd/net.d",
            "containerd/certs.d",
            "kubelet",
            "ipam",
            "volume-plugins",
        ] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(Error::io(format!("creating {}", path.display())))?;
        }
        let cp = ControlPlane::start_with(test_control_plane::Options {
            advertise_address: Some(self.node_ip),
            extra_apiserver_args: vec![
                // `kubectl logs`/`exec` reach the kubelet at the address pods are served on.
                "--kubelet-preferred-address-types=InternalIP".to_owned(),
            ],
            ..test_control_plane::Options::default()
        })
        .await?;
        let kubeconfig = cp.kubeconfig_path().to_path_buf();
        let sa_key = cp.service_account_key_file();
        let ca_file = cp.ca_file().to_path_buf();
        self.control_plane = Some(cp);

        // containerd, with the sandbox image imported before the kubelet asks for it.
        let cd = self.containerd_dir.clone();
        write(
            &cd.join("config.toml"),
            &config::containerd_toml(&cd, &self.binaries.cni_bin_dir, PAUSE_IMAGE),
        )?;
        write(
            &cd.join("net.d/10-ccm-real-node.conflist"),
            &config::cni_conflist(&dir.join("ipam")),
        )?;
        let containerd = Process::builder(
            "containerd",
            &self.binaries.containerd,
            logs.join("containerd.log"),
        )
        .args(["--config".as_ref(), cd.join("config.toml").as_os_str()])
        .spawn()?;
        let log = containerd.log_path().to_path_buf();
        self.containerd = Some(containerd);
        let ctr = self.ctr_base();
        Wait::new("containerd to answer `ctr version`", remaining(deadline))
            .every(Duration::from_millis(100))
            .until(|| {
                let mut c = Command::new(&ctr[0]);
                c.args(&ctr[1..]).arg("version");
                async move { run(c).map(drop).map_err(|e| e.to_string()) }
            })
            .await
            .map_err(|e| not_ready("containerd", e, &log))?;
        self.import_image(&self.binaries.pause_archive.clone())?;

        let kubeconfig_arg = format!("--kubeconfig={}", kubeconfig.display());
        self.controller_manager = Some(
            Process::builder(
                "kube-controller-manager",
                &self.binaries.kube_controller_manager,
                logs.join("kube-controller-manager.log"),
            )
            .args([
                kubeconfig_arg.clone(),
                "--cloud-provider=external".to_owned(),
                format!("--service-account-private-key-file={}", sa_key.display()),
                format!("--root-ca-file={}", ca_file.display()),
                "--use-service-account-credentials=false".to_owned(),
                "--leader-elect=false".to_owned(),
                "--port=0".to_owned(),
                "--secure-port=0".to_owned(),
                "--allocate-node-cidrs=false".to_owned(),
                "--configure-cloud-routes=false".to_owned(),
            ])
            .spawn()?,
        );
        self.scheduler = Some(
            Process::builder(
                "kube-scheduler",
                &self.binaries.kube_scheduler,
                logs.join("kube-scheduler.log"),
            )
            .args([
                kubeconfig_arg.clone(),
                "--leader-elect=false".to_owned(),
                "--port=0".to_owned(),
                "--secure-port=0".to_owned(),
            ])
            .spawn()?,
        );

        let kubelet_dir = dir.join("kubelet");
        write(
            &kubelet_dir.join("config.yaml"),
            &config::kubelet_config(self.node_ip, options.credential_providers.is_some()),
        )?;
        let mut kubelet_args = vec![
            kubeconfig_arg.clone(),
            format!("--config={}", kubelet_dir.join("config.yaml").display()),
            format!("--root-dir={}", kubelet_dir.join("root").display()),
            format!("--cert-dir={}", kubelet_dir.join("pki").display()),
            format!(
                "--volume-plugin-dir={}",
                dir.join("volume-plugins").display()
            ),
            "--container-runtime=remote".to_owned(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                cd.join("containerd.sock").display()
            ),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            "--cloud-provider=external".to_owned(),
            format!("--node-ip={}", self.node_ip),
            format!("--hostname-override={}", self.node_name),
            "--v=2".to_owned(),
        ];
        if let Some(providers) = &options.credential_providers {
            kubelet_args.push(format!(
                "--image-credential-provider-config={}",
                providers.config.display()
            ));
            kubelet_args.push(format!(
                "--image-credential-provider-bin-dir={}",
                providers.bin_dir.display()
            ));
        }
        let kubelet = self.kubelet.insert(
            Process::builder("kubelet", &self.binaries.kubelet, logs.join("kubelet.log"))
                .args(kubelet_args)
                .spawn()?,
        );
        let kubelet_log = kubelet.log_path().to_path_buf();

        self.kube_proxy = Some(
            Process::builder(
                "kube-proxy",
                &self.binaries.kube_proxy,
                logs.join("kube-proxy.log"),
            )
            .args([
                kubeconfig_arg,
                format!("--hostname-override={}", self.node_name),
                format!("--bind-address={}", self.node_ip),
                format!("--cluster-cidr={POD_CIDR}"),
                "--proxy-mode=iptables".to_owned(),
                format!("--healthz-bind-address={}:10256", self.node_ip),
                format!(
                    "--metrics-bind-address=127.0.0.1:{}",
                    test_support::free_port().map_err(Error::io("choosing a port"))?
                ),
                // Leave the host's conntrack table settings alone.
                "--conntrack-max-per-core=0".to_owned(),
                "--conntrack-tcp-timeout-established=0".to_owned(),
                "--conntrack-tcp-timeout-close-wait=0".to_owned(),
                "--oom-score-adj=0".to_owned(),
            ])
            .spawn()?,
        );

        let client = self.client()?;
        let nodes: kube::Api<Node> = kube::Api::all(client);
        let name = self.node_name.clone();
        Wait::new(
            format!("the kubelet to register Node {name} and report it Ready"),
            remaining(deadline),
        )
        .every(Duration::from_millis(250))
        .until(|| {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes.get_opt(&name).await.map_err(|e| e.to_string())?;
                let node = node.ok_or_else(|| "not registered yet".to_owned())?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "Ready");
                match ready {
                    Some(c) if c.status == "True" => Ok(()),
                    Some(c) => Err(format!(
                        "Ready={}: {}",
                        c.status,
                        c.message.unwrap_or_default()
                    )),
                    None => Err("no Ready condition yet".to_owned()),
                }
            }
        })
        .await
        .map_err(|e| not_ready("kubelet", e, &kubelet_log))?;
        Ok(())
    }

    /// The control plane (etcd + kube-apiserver) of this cluster.
    pub fn control_plane(&self) -> &ControlPlane {
        // Set by `start` before it returns; only `Drop` takes it.
        self.control_plane
            .as_ref()
            .unwrap_or_else(|| unreachable!("control plane taken before drop"))
    }

    /// A new admin client.
    pub fn client(&self) -> Result<kube::Client, Error> {
        Ok(self.control_plane().client()?)
    }

    /// The admin kubeconfig file.
    pub fn kubeconfig(&self) -> &Path {
        self.control_plane().kubeconfig_path()
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.arg(format!("--kubeconfig={}", self.kubeconfig().display()));
        c
    }

    /// The programs this node runs and uses.
    pub fn binaries(&self) -> &NodeBinaries {
        &self.binaries
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The Node's address (its InternalIP; the API server advertises it too).
    pub fn node_ip(&self) -> IpAddr {
        self.node_ip
    }

    /// How long the start took.
    pub fn startup_duration(&self) -> Duration {
        self.started_in
    }

    /// The directory holding every component's state and logs (`logs/`).
    pub fn dir(&self) -> Result<&Path, Error> {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .ok_or_else(|| Error::Machine("the node's directory is gone".to_owned()))
    }

    /// containerd's directory: its socket `containerd.sock` and per-registry configuration
    /// under `certs.d/<host:port>/hosts.toml`.
    pub fn containerd_dir(&self) -> &Path {
        &self.containerd_dir
    }

    /// The last `lines` lines of a component's log (`kubelet`, `containerd`, `kube-proxy`,
    /// `kube-controller-manager`, `kube-scheduler`), for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let process = match component {
            "kubelet" => self.kubelet.as_ref(),
            "containerd" => self.containerd.as_ref(),
            "kube-proxy" => self.kube_proxy.as_ref(),
            "kube-controller-manager" => self.controller_manager.as_ref(),
            "kube-scheduler" => self.scheduler.as_ref(),
            _ => None,
        };
        process.map_or_else(
            || format!("no component {component}"),
            |p| p.log_tail(lines),
        )
    }

    /// Loads an OCI or Docker archive into the node's containerd, where the kubelet finds its
    /// images without pulling (`imagePullPolicy: IfNotPresent`).
    pub fn import_image(&self, archive: &Path) -> Result<(), Error> {
        let ctr = self.ctr_base();
        let mut c = Command::new(&ctr[0]);
        c.args(&ctr[1..])
            .args(["-n", K8S_NAMESPACE, "images", "import"])
            .arg(archive);
        run(c).map(drop)
    }

    /// `ctr` and its address argument.
    fn ctr_base(&self) -> Vec<String> {
        vec![
            self.binaries.ctr.display().to_string(),
            "--address".to_owned(),
            self.containerd_dir
                .join("containerd.sock")
                .display()
                .to_string(),
        ]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Node daemons first (the kubelet would restart what is killed under it), then the
        // containers and host state, then the control plane, then the directory.
        for process in [
            self.kubelet.take(),
            self.kube_proxy.take(),
            self.scheduler.take(),
            self.controller_manager.take(),
            self.containerd.take(),
        ]
        .into_iter()
        .flatten()
        {
            process.terminate(STOP_GRACE);
        }
        if let Some(snapshot) = self.snapshot.take() {
            let failures = snapshot.restore();
            if !failures.is_empty() {
                eprintln!(
                    "real node teardown left host changes behind: {}",
                    failures.join("; ")
                );
            }
        }
        self.control_plane.take();
        self.dir.take();
    }
}

fn check_root() -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(Error::io("reading /proc/self/status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if uid == "0" {
        Ok(())
    } else {
        Err(Error::Machine(format!(
            "the kubelet, containerd and kube-proxy need root (effective uid {uid}): run the real-node tests as root"
        )))
    }
}

/// The node's address: `$CCM_REAL_NODE_IP`, else the IPv4 address of the interface the
/// default route leaves through (pods must reach it: it is the API server's endpoint).
fn node_ip() -> Result<IpAddr, Error> {
    if let Ok(ip) = std::env::var(ENV_NODE_IP) {
        return ip.trim().parse().map_err(|e| {
            Error::Machine(format!("{ENV_NODE_IP}={ip:?} is not an IP address: {e}"))
        });
    }
    let routes = run({
        let mut c = Command::new("ip");
        c.args(["-4", "-o", "route", "show", "default"]);
        c
    })?;
    let dev = routes
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .ok_or_else(|| {
            Error::Machine(format!(
                "no IPv4 default route to take the node's address from; set {ENV_NODE_IP} to an address of this machine that is not loopback"
            ))
        })?
        .to_owned();
    let addrs = run({
        let mut c = Command::new("ip");
        c.args(["-4", "-o", "addr", "show", "dev", &dev]);
        c
    })?;
    addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| {
            Error::Machine(format!(
                "{dev} (the default route's interface) has no IPv4 address; set {ENV_NODE_IP}"
            ))
        })
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn not_ready(component: &'static str, error: test_support::WaitError, log: &Path) -> Error {
    Error::NotReady {
        component,
        detail: error.to_string(),
        log: log.to_path_buf(),
        tail: test_support::last_lines(&std::fs::read_to_string(log).unwrap_or_default(), 40),
    }
}
