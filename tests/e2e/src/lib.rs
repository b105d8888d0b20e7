//! Support for the cross-component suites (and for `bench` and `local-cluster`, which run the
//! same binaries): locating the project's binaries, running them as child processes with their
//! logs captured, waiting for conditions with a deadline, the mutual TLS between the `local` shim
//! and the controller-manager, and what "initialised" means for a Node.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use test_pki::{Ca, write_atomic};

/// Failure of the test harness itself (not of the system under test).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A project binary has not been built.
    #[error(
        "binary {name:?} not found at {path}: build it first with `cargo build -p cloud-controller-manager -p local-shim` (tests/run-all.sh does)"
    )]
    MissingBinary {
        /// Binary name.
        name: String,
        /// Where it was looked for.
        path: String,
    },
    /// Spawning failed.
    #[error("spawning {name}: {source}")]
    Spawn {
        /// Binary name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A condition did not become true in time.
    #[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// Last observation.
        last: String,
    },
    /// Generating or writing certificates failed.
    #[error("certificates: {0}")]
    Pki(#[from] test_pki::Error),
}

/// Path of a workspace binary, next to the running test executable's `deps/` directory.
pub fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(|e| HarnessError::Spawn {
        name: name.into(),
        source: e,
    })?;
    // Binaries sit in target/<profile>/; test executables in target/<profile>/deps/.
    let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        here.join(name),
        here.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| HarnessError::MissingBinary {
            name: name.into(),
            path: candidates[1].display().to_string(),
        })
}

/// A project binary running as a child process; killed when dropped.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `name` with `args` and extra `env`, logging stdout+stderr to `<log_dir>/<label>.log`.
    pub fn spawn(
        name: &str,
        label: &str,
        args: &[String],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        let path = binary(name)?;
        let log = log_dir.join(format!("{label}.log"));
        let spawn_err = |source| HarnessError::Spawn {
            name: name.into(),
            source,
        };
        let out = File::create(&log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut command = Command::new(path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "info");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().map_err(spawn_err)?;
        Ok(Self {
            name: label.into(),
            child,
            log,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running; `Some(code)` once it exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process hard (SIGKILL), as a crashed node would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace` for it.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("---- logs of {} ----\n{}", self.name, self.logs());
        }
    }
}

/// Polls `probe` every 100 ms until it returns `Ok`, or fails after `timeout` with the last
/// observation it reported.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<T, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(observation) => observation,
        };
        if started.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: what.into(),
                waited: started.elapsed(),
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The taint kubelets started with `--cloud-provider=external` register with.
pub const TAINT_UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";

/// A Node as a kubelet with `--cloud-provider=external` registers it: the uninitialized taint
/// and, when given, the kubelet's Hostname address (status is ignored on create; patch it).
pub fn kubelet_registered_node(name: &str, hostname: Option<&str>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_UNINITIALIZED.into(),
                value: Some("true".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        }),
        status: hostname.map(|hostname| NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "Hostname".into(),
                address: hostname.into(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// Writes a `local` shim inventory file and returns its path.
pub fn write_inventory(dir: &Path, yaml: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("inventory.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// Describes why `node` is not initialised by the cloud-node controller yet: it still has the
/// uninitialized taint, has no provider ID, or has no InternalIP in its status (the addresses
/// arrive in a status patch after the taint goes, so the taint alone is not enough).
pub fn initialised(node: &Node) -> Result<(), String> {
    let spec = node.spec.as_ref();
    if spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_UNINITIALIZED))
    {
        return Err("still tainted".into());
    }
    if spec
        .and_then(|s| s.provider_id.as_deref())
        .is_none_or(str::is_empty)
    {
        return Err("no providerID".into());
    }
    let has_internal = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| a.iter().any(|a| a.type_ == "InternalIP"));
    if !has_internal {
        return Err(format!("no InternalIP yet: {:?}", node.status));
    }
    Ok(())
}

/// A free loopback TCP port (it may be taken again before it is used).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Mutual TLS between the `local` shim and the controller-manager: a throwaway CA, a serving
/// leaf for the shim (`localhost`, `127.0.0.1`) and a client leaf for the controller-manager
/// (`cloud-controller-manager`, the SAN the shim admits), written as PEM files to one directory.
#[derive(Debug, Clone)]
pub struct ShimMtls {
    ca: PathBuf,
    shim_cert: PathBuf,
    shim_key: PathBuf,
    ccm_cert: PathBuf,
    ccm_key: PathBuf,
}

impl ShimMtls {
    /// The SAN of the controller-manager's client certificate, which the shim requires.
    pub const CCM_SAN: &str = "cloud-controller-manager";
    /// The name the controller-manager verifies the shim's certificate against.
    pub const SHIM_SERVER_NAME: &str = "localhost";

    /// Issues the certificates from a new CA named `ca_name` and writes them to `dir` (keys
    /// private to the user).
    pub fn write(dir: &Path, ca_name: &str) -> Result<Self, HarnessError> {
        let ca = Ca::new(ca_name)?;
        let shim = ca.issue(&[Self::SHIM_SERVER_NAME, "127.0.0.1"])?;
        let ccm = ca.issue(&[Self::CCM_SAN])?;
        let files = Self {
            ca: dir.join("ca.pem"),
            shim_cert: dir.join("shim.pem"),
            shim_key: dir.join("shim-key.pem"),
            ccm_cert: dir.join("ccm.pem"),
            ccm_key: dir.join("ccm-key.pem"),
        };
        write_atomic(&files.ca, ca.cert_pem().as_bytes(), false)?;
        write_atomic(&files.shim_cert, shim.chain_pem.as_bytes(), false)?;
        write_atomic(&files.shim_key, shim.key_pem.as_bytes(), true)?;
        write_atomic(&files.ccm_cert, ccm.chain_pem.as_bytes(), false)?;
        write_atomic(&files.ccm_key, ccm.key_pem.as_bytes(), true)?;
        Ok(files)
    }

    /// `local-shim` flags: serve on `127.0.0.1:<port>` with the shim's certificate and admit
    /// only clients of this CA carrying [`ShimMtls::CCM_SAN`].
    pub fn shim_args(&self, port: u16) -> Vec<String> {
        vec![
            format!("--bind-address=127.0.0.1:{port}"),
            format!("--tls-cert-file={}", self.shim_cert.display()),
            format!("--tls-private-key-file={}", self.shim_key.display()),
            format!("--client-ca-file={}", self.ca.display()),
            format!("--allowed-client-sans={}", Self::CCM_SAN),
        ]
    }

    /// `cloud-controller-manager` flags: reach the shim at `https://127.0.0.1:<port>` with the
    /// controller-manager's certificate, verifying the shim against this CA.
    pub fn ccm_args(&self, port: u16) -> Vec<String> {
        vec![
            format!("--provider-endpoint=https://127.0.0.1:{port}"),
            format!("--provider-tls-cert-file={}", self.ccm_cert.display()),
            format!("--provider-tls-private-key-file={}", self.ccm_key.display()),
            format!("--provider-ca-file={}", self.ca.display()),
            format!("--provider-server-name={}", Self::SHIM_SERVER_NAME),
        ]
    }
}
