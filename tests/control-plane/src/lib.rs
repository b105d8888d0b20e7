//! Starts a real etcd + kube-apiserver for tests and hands out clients; cleans up even when a
//! test fails.
//!
//! * [`ControlPlane::shared`] — one control plane per test process, started on first use and
//!   shared by every `#[tokio::test]` of the binary (each test has its own runtime, so clients
//!   are built per call with [`ControlPlane::client`]; nothing is tied to the first runtime).
//! * [`ControlPlane::start`] — a private control plane, stopped and deleted on drop.
//!
//! Binaries are found as described in [`BinaryPaths`]; run `bash tests/control-plane/provision.sh`
//! once per machine. Servers listen on free loopback ports, keep their data in a fresh temp
//! directory (on tmpfs when `/dev/shm` exists), and run under a watchdog that kills them and
//! removes that directory when the test process goes away, however it ends.
//!
//! Identities: [`ControlPlane::client`] is `tests:admin` in `system:masters`;
//! [`ControlPlane::unprivileged_client`] is [`UNPRIVILEGED_USER`] with no RBAC grants;
//! [`ControlPlane::client_as`] impersonates any user and groups, for RBAC tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), test_control_plane::Error> {
//! use k8s_openapi::api::core::v1::Node;
//! let cp = test_control_plane::ControlPlane::shared().await?;
//! let nodes: kube::Api<Node> = kube::Api::all(cp.client()?);
//! # let _ = nodes;
//! # Ok(())
//! # }
//! ```

mod binaries;
mod error;

use std::ffi::OsString;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use binaries::{
    BinaryPaths, ENV_ASSETS_CACHE, ENV_ETCD, ENV_KUBE_APISERVER, ENV_KUBEBUILDER_ASSETS,
};
pub use error::Error;
use test_support::{Location, Process, Wait};

/// The Kubernetes version `provision.sh` builds and the default cache is keyed by.
pub const K8S_VERSION: &str = "v1.20.2";
/// The admin user of [`ControlPlane::client`] (member of `system:masters`).
pub const ADMIN_USER: &str = "tests:admin";
/// A user without any RBAC grants, for permission-failure tests.
pub const UNPRIVILEGED_USER: &str = "tests:unprivileged";
/// The apiserver's `--service-cluster-ip-range`.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The cluster IP of the `kubernetes` Service: the first address of [`SERVICE_CLUSTER_IP_RANGE`].
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The apiserver's `--service-account-issuer`.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";
/// Environment variable overriding the default start-up timeout, in seconds.
pub const ENV_STARTUP_TIMEOUT: &str = "CCM_TEST_STARTUP_TIMEOUT_SECS";

/// Default time allowed for etcd plus kube-apiserver to become ready.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Name prefix of state directories (and of kept logs of failed starts).
const STATE_DIR_PREFIX: &str = "ccm-test-control-plane-";
/// Start attempts when a freshly chosen port was taken by someone else in the meantime.
const START_ATTEMPTS: usize = 3;
/// Name of the etcd process in errors.
const ETCD: &str = "etcd";
/// Name of the kube-apiserver process in errors.
const KUBE_APISERVER: &str = "kube-apiserver";

/// How to start a [`ControlPlane`]; `Options::default()` is what [`ControlPlane::start`] uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Binaries to run; `None` discovers them with [`BinaryPaths::discover`].
    pub binaries: Option<BinaryPaths>,
    /// Extra `--flag=value` arguments appended to kube-apiserver's command line.
    pub extra_apiserver_args: Vec<String>,
    /// Time allowed for both servers to become ready (default 60 s or `$CCM_TEST_STARTUP_TIMEOUT_SECS`).
    pub startup_timeout: Duration,
    /// A host address that pods must reach the API server at (a real node's cluster): the
    /// server then listens on every address, advertises this one (the `kubernetes` Service's
    /// endpoint, kept by the lease reconciler) and its certificate names it and the Service's
    /// cluster IP. `None`: loopback only, no endpoint for the `kubernetes` Service.
    pub advertise_address: Option<std::net::IpAddr>,
}

impl Default for Options {
    fn default() -> Self {
        let startup_timeout = std::env::var(ENV_STARTUP_TIMEOUT)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_STARTUP_TIMEOUT);
        Options {
            binaries: None,
            extra_apiserver_args: Vec::new(),
            startup_timeout,
            advertise_address: None,
        }
    }
}

/// A running etcd + kube-apiserver pair; stopping and deleting everything on drop.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: servers stop before their directory is removed.
    apiserver: Process,
    etcd: Process,
    server_url: String,
    cluster_url: http::Uri,
    ca: test_pki::Ca,
    ca_file: PathBuf,
    admin_token_file: PathBuf,
    unprivileged_token_file: PathBuf,
    kubeconfig: PathBuf,
    version: Info,
    binaries: BinaryPaths,
    startup: Duration,
    kubeconfig_counter: AtomicU64,
    state: tempfile::TempDir,
}

static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

impl ControlPlane {
    /// Starts a fresh control plane with default [`Options`].
    pub async fn start() -> Result<ControlPlane, Error> {
        Self::start_with(Options::default()).await
    }

    /// The control plane shared by all tests of this process, started on first use.
    ///
    /// It is never dropped; its servers die and its directory is removed by the watchdog when
    /// the process exits. Tests sharing it should use unique object names ([`unique_name`]).
    /// If the first start fails, later calls fail immediately with the same message.
    pub async fn shared() -> Result<&'static ControlPlane, Error> {
        let cell = SHARED
            .get_or_init(|| async { Self::start().await.map_err(|e| e.to_string()) })
            .await;
        cell.as_ref()
            .map_err(|msg| Error::SharedStartFailed(msg.clone()))
    }

    /// Starts a fresh control plane with the given options.
    pub async fn start_with(options: Options) -> Result<ControlPlane, Error> {
        install_crypto_provider();
        let binaries = match &options.binaries {
            Some(b) => {
                b.check()?;
                b.clone()
            }
            None => BinaryPaths::discover()?,
        };
        let mut attempt = 1;
        loop {
            match Self::start_once(&binaries, &options).await {
                Ok(cp) => return Ok(cp),
                Err(Failed { error, state }) => {
                    if attempt < START_ATTEMPTS && port_clash(&error) {
                        tracing::warn!(attempt, %error, "port clash while starting the test control plane; retrying");
                        attempt += 1;
                        continue;
                    }
                    return Err(keep_logs(error, state));
                }
            }
        }
    }

    async fn start_once(binaries: &BinaryPaths, options: &Options) -> Result<ControlPlane, Failed> {
        let started = Instant::now();
        let state = state_dir().map_err(|error| Failed { error, state: None })?;
        // On failure the servers stop when `launch` returns (or `launched` drops), before the
        // caller copies their logs out of the still existing directory.
        let launched = match Self::launch(binaries, options, state.path(), started).await {
            Ok(launched) => launched,
            Err(error) => {
                return Err(Failed {
                    error,
                    state: Some(state),
                });
            }
        };
        let kubeconfig = state.path().join("kubeconfig");
        let written = kubeconfig_yaml(
            &launched.server_url,
            &launched.files.ca_file,
            &launched.files.admin_token_file,
            None,
        )
        .and_then(|yaml| {
            test_pki::write_atomic(&kubeconfig, yaml.as_bytes(), true).map_err(Error::from)
        });
        if let Err(error) = written {
            drop(launched);
            return Err(Failed {
                error,
                state: Some(state),
            });
        }
        let Launched {
            apiserver,
            etcd,
            server_url,
            cluster_url,
            files,
            version,
        } = launched;
        let cp = ControlPlane {
            apiserver,
            etcd,
            server_url,
            cluster_url,
            ca: files.ca,
            ca_file: files.ca_file,
            admin_token_file: files.admin_token_file,
            unprivileged_token_file: files.unprivileged_token_file,
            kubeconfig,
            version,
            binaries: binaries.clone(),
            startup: started.elapsed(),
            kubeconfig_counter: AtomicU64::new(0),
            state,
        };
        tracing::info!(
            url = %cp.server_url,
            version = %cp.version.git_version,
            startup = ?cp.startup,
            dir = %cp.state.path().display(),
            "test control plane ready"
        );
        Ok(cp)
    }

    /// Starts both servers in `dir` and waits until they are ready.
    async fn launch(
        binaries: &BinaryPaths,
        options: &Options,
        dir: &Path,
        started: Instant,
    ) -> Result<Launched, Error> {
        let deadline = started + options.startup_timeout;
        let files = write_state_files(dir, options.advertise_address)?;
        let [etcd_port, peer_port, api_port] = free_ports()?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<OsString> = [
            "--name=default".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--logger=zap".to_owned(),
            "--log-outputs=stderr".to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let logs = dir.join("logs");
        let etcd = Process::builder(ETCD, &binaries.etcd, logs.join("etcd.log"))
            .args(&etcd_args)
            .remove_when_orphaned(dir)
            .spawn()?;
        wait_ready(
            (ETCD, &etcd),
            &[],
            Duration::from_millis(50),
            deadline,
            started,
            move || async move {
                match etcd_health(etcd_port).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("GET /health did not report health true".to_owned()),
                    Err(e) => Err(format!("GET /health: {e}")),
                }
            },
        )
        .await?;

        let pki = dir.join("pki");
        let (bind, advertise, reconciler) = match options.advertise_address {
            Some(address) => ("0.0.0.0".to_owned(), address.to_string(), "lease"),
            // Endpoints validation rejects the loopback advertise address; nothing on loopback
            // needs the endpoints of the `kubernetes` Service.
            None => ("127.0.0.1".to_owned(), "127.0.0.1".to_owned(), "none"),
        };
        let mut api_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.join("apiserver").display()),
            format!("--tls-cert-file={}", pki.join("serving.crt").display()),
            format!(
                "--tls-private-key-file={}",
                pki.join("serving.key").display()
            ),
            format!("--client-ca-file={}", files.ca_file.display()),
            format!("--secure-port={api_port}"),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            // No --insecure-port: v1.20 ignores it (insecure serving is off) and v1.24+ rejects it.
            format!(
                "--service-account-key-file={}",
                pki.join("sa.pub").display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.join("sa.key").display()
            ),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            "--authorization-mode=RBAC".to_owned(),
            format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
            format!("--endpoint-reconciler-type={reconciler}"),
        ];
        api_args.extend(options.extra_apiserver_args.iter().cloned());
        let api_args: Vec<OsString> = api_args.into_iter().map(OsString::from).collect();
        let apiserver = Process::builder(
            KUBE_APISERVER,
            &binaries.kube_apiserver,
            logs.join("kube-apiserver.log"),
        )
        .args(&api_args)
        .remove_when_orphaned(dir)
        .spawn()?;

        let server_url = format!("https://127.0.0.1:{api_port}");
        let cluster_url: http::Uri = server_url
            .parse()
            .map_err(|e| Error::Config(format!("server URL {server_url:?}: {e}")))?;
        let config = admin_config(
            cluster_url.clone(),
            files.ca.cert_der(),
            &files.admin_token_file,
        );
        let client =
            kube::Client::try_from(config).map_err(Error::kube("building the admin client"))?;
        wait_ready(
            (KUBE_APISERVER, &apiserver),
            &[(ETCD, &etcd)],
            Duration::from_millis(200),
            deadline,
            started,
            || apiserver_ready(&client),
        )
        .await?;
        let version = client
            .apiserver_version()
            .await
            .map_err(Error::kube("reading /version"))?;
        Ok(Launched {
            apiserver,
            etcd,
            server_url,
            cluster_url,
            files,
            version,
        })
    }

    /// A new admin client (`tests:admin`, group `system:masters`) bound to the current runtime.
    pub fn client(&self) -> Result<kube::Client, Error> {
        make_client(self.kube_config())
    }

    /// A new client for [`UNPRIVILEGED_USER`], who has no RBAC permissions.
    pub fn unprivileged_client(&self) -> Result<kube::Client, Error> {
        let mut config = self.kube_config();
        config.auth_info.token_file = Some(self.unprivileged_token_file.display().to_string());
        make_client(config)
    }

    /// A new client impersonating `user` in `groups` (through the admin's impersonate right).
    pub fn client_as(&self, user: &str, groups: &[&str]) -> Result<kube::Client, Error> {
        make_client(self.kube_config_as(user, groups))
    }

    /// The bearer token of the admin user (group `system:masters`).
    pub fn admin_token(&self) -> Result<String, Error> {
        read_token(&self.admin_token_file)
    }

    /// The bearer token of [`UNPRIVILEGED_USER`].
    pub fn unprivileged_token(&self) -> Result<String, Error> {
        read_token(&self.unprivileged_token_file)
    }

    /// The admin client configuration (bearer token, real TLS verification against our CA).
    pub fn kube_config(&self) -> kube::Config {
        admin_config(
            self.cluster_url.clone(),
            self.ca.cert_der(),
            &self.admin_token_file,
        )
    }

    /// A client configuration impersonating `user` in `groups`.
    pub fn kube_config_as(&self, user: &str, groups: &[&str]) -> kube::Config {
        let mut config = self.kube_config();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            (!groups.is_empty()).then(|| groups.iter().map(|g| (*g).to_owned()).collect());
        config
    }

    /// A kubeconfig file for the admin, for spawning binaries such as the controller-manager.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a new kubeconfig file impersonating `user` in `groups` and returns its path.
    pub fn write_kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<PathBuf, Error> {
        let n = self.kubeconfig_counter.fetch_add(1, Ordering::Relaxed);
        let path = self.state.path().join(format!("kubeconfig-as-{n}"));
        let yaml = kubeconfig_yaml(
            &self.server_url,
            &self.ca_file,
            &self.admin_token_file,
            Some((user, groups)),
        )?;
        std::fs::write(&path, yaml).map_err(Error::io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// Writes a new kubeconfig file authenticating with `token` (e.g. a ServiceAccount's, from
    /// the TokenRequest API) and returns its path; the token is kept in a private file beside it.
    pub fn write_kubeconfig_with_token(&self, token: &str) -> Result<PathBuf, Error> {
        let n = self.kubeconfig_counter.fetch_add(1, Ordering::Relaxed);
        let token_file = self.state.path().join(format!("token-{n}"));
        test_pki::write_atomic(&token_file, token.as_bytes(), true)?;
        let path = self.state.path().join(format!("kubeconfig-token-{n}"));
        let yaml = kubeconfig_yaml(&self.server_url, &self.ca_file, &token_file, None)?;
        std::fs::write(&path, yaml).map_err(Error::io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// The apiserver URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The CA that signed the apiserver's serving certificate and is its `--client-ca-file`.
    ///
    /// Issue a client certificate with `ca().issue_client(user, groups)` to authenticate by
    /// certificate; trust `ca().cert_pem()` to verify the apiserver.
    pub fn ca(&self) -> &test_pki::Ca {
        &self.ca
    }

    /// Path of the PEM file holding [`ControlPlane::ca`]'s certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The apiserver's `/version` as read right after start-up.
    pub fn server_version(&self) -> &Info {
        &self.version
    }

    /// Whether the apiserver is at least `major.minor` (for fields newer servers keep but v1.20 drops).
    pub fn version_at_least(&self, major: u32, minor: u32) -> bool {
        server_major_minor(&self.version).is_some_and(|v| v >= (major, minor))
    }

    /// How long start-up took (both servers ready and `/version` read).
    pub fn startup_duration(&self) -> Duration {
        self.startup
    }

    /// The binaries this control plane runs.
    pub fn binaries(&self) -> &BinaryPaths {
        &self.binaries
    }

    /// Process id of kube-apiserver.
    pub fn apiserver_pid(&self) -> u32 {
        self.apiserver.pid()
    }

    /// Process id of etcd.
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.pid()
    }

    /// kube-apiserver's log file.
    pub fn apiserver_log(&self) -> &Path {
        self.apiserver.log_path()
    }

    /// The private key service-account tokens are signed with (kube-controller-manager's
    /// `--service-account-private-key-file`).
    pub fn service_account_key_file(&self) -> PathBuf {
        self.state.path().join("pki").join("sa.key")
    }

    /// The temp directory holding data, certificates, tokens, kubeconfigs and logs.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Whether both server processes are still running.
    pub fn is_running(&self) -> bool {
        self.apiserver.exit_status().is_none() && self.etcd.exit_status().is_none()
    }
}

/// Waits up to `timeout` until `client` may list Nodes: RBAC objects reach the API server's
/// authorizer through a watch, so a grant takes effect a moment after it is created.
pub async fn wait_until_nodes_listable(
    client: kube::Client,
    timeout: Duration,
) -> Result<(), test_support::WaitError> {
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let nodes = &nodes;
    test_support::wait_for("RBAC to allow listing nodes", timeout, move || async move {
        nodes
            .list(&Default::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
}

/// A name unique within this process and across processes, for objects in a shared control plane.
///
/// Lowercase alphanumerics and `-` only, so it is a valid DNS-1123 label while `prefix` is.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A kubeconfig for the admin token, optionally impersonating `(user, groups)`.
fn kubeconfig_yaml(
    server_url: &str,
    ca_file: &Path,
    token_file: &Path,
    impersonate: Option<(&str, &[&str])>,
) -> Result<String, Error> {
    let name = "ccm-test".to_owned();
    let auth = AuthInfo {
        token_file: Some(token_file.display().to_string()),
        impersonate: impersonate.map(|(user, _)| user.to_owned()),
        impersonate_groups: impersonate
            .filter(|(_, groups)| !groups.is_empty())
            .map(|(_, groups)| groups.iter().map(|g| (*g).to_owned()).collect()),
        ..AuthInfo::default()
    };
    let kubeconfig = Kubeconfig {
        api_version: Some("v1".to_owned()),
        kind: Some("Config".to_owned()),
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: Some(Cluster {
                server: Some(server_url.to_owned()),
                certificate_authority: Some(ca_file.display().to_string()),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.clone(),
            auth_info: Some(auth),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: Some(Context {
                cluster: name.clone(),
                user: Some(name.clone()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(name),
        ..Kubeconfig::default()
    };
    Ok(serde_saphyr::to_string(&kubeconfig)?)
}

/// Installs rustls' ring provider process-wide if no provider is installed yet.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn make_client(config: kube::Config) -> Result<kube::Client, Error> {
    install_crypto_provider();
    kube::Client::try_from(config).map_err(Error::kube("building a kube client"))
}

fn read_token(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| Error::Config(format!("reading token file {}: {e}", path.display())))
}

/// The admin configuration: bearer token from a file, TLS verified against our CA only.
fn admin_config(cluster_url: http::Uri, ca_der: &[u8], token_file: &Path) -> kube::Config {
    let mut config = kube::Config::new(cluster_url);
    config.root_cert = Some(vec![ca_der.to_vec()]);
    config.auth_info.token_file = Some(token_file.display().to_string());
    config
}

fn server_major_minor(info: &Info) -> Option<(u32, u32)> {
    let digits = |s: &str| -> Option<u32> {
        let d: String = s.chars().take_while(char::is_ascii_digit).collect();
        d.parse().ok()
    };
    if let (Some(major), Some(minor)) = (digits(&info.major), digits(&info.minor)) {
        return Some((major, minor));
    }
    // Binaries built without version ldflags leave major/minor empty; try gitVersion.
    let mut parts = info.git_version.trim_start_matches('v').split('.');
    Some((digits(parts.next()?)?, digits(parts.next()?)?))
}

/// A failed start attempt, with the state directory whose logs are worth keeping.
struct Failed {
    error: Error,
    state: Option<tempfile::TempDir>,
}

/// Both servers ready, before the [`ControlPlane`] owns them.
struct Launched {
    apiserver: Process,
    etcd: Process,
    server_url: String,
    cluster_url: http::Uri,
    files: StateFiles,
    version: Info,
}

fn port_clash(error: &Error) -> bool {
    match error {
        Error::ExitedEarly { tail, .. } | Error::NotReady { tail, .. } => {
            tail.contains("address already in use")
        }
        _ => false,
    }
}

/// Copies the logs of a failed start out of the (soon removed) state directory and points the
/// error at the copies, so the paths in the message stay valid.
fn keep_logs(error: Error, state: Option<tempfile::TempDir>) -> Error {
    let Some(state) = state else { return error };
    let state = state.path();
    let suffix = state
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = suffix.trim_start_matches(STATE_DIR_PREFIX);
    let kept = std::env::temp_dir().join(format!("{STATE_DIR_PREFIX}failed-{suffix}"));
    let copied = std::fs::create_dir_all(&kept).is_ok()
        && std::fs::read_dir(state.join("logs"))
            .map(|entries| {
                entries
                    .flatten()
                    .all(|e| std::fs::copy(e.path(), kept.join(e.file_name())).is_ok())
            })
            .unwrap_or(false);
    if !copied {
        return error;
    }
    let relocate = |log: PathBuf| match log.file_name() {
        Some(name) => kept.join(name),
        None => log,
    };
    match error {
        Error::ExitedEarly {
            process,
            status,
            log,
            tail,
        } => Error::ExitedEarly {
            process,
            status,
            log: relocate(log),
            tail,
        },
        Error::NotReady {
            process,
            waited,
            last_check,
            log,
            tail,
        } => Error::NotReady {
            process,
            waited,
            last_check,
            log: relocate(log),
            tail,
        },
        other => other,
    }
}

/// A fresh state directory, on tmpfs when `/dev/shm` is usable (etcd fsyncs a lot).
fn state_dir() -> Result<tempfile::TempDir, Error> {
    Ok(test_support::temp_dir(
        STATE_DIR_PREFIX,
        Location::PreferMemory,
    )?)
}

struct StateFiles {
    ca: test_pki::Ca,
    ca_file: PathBuf,
    admin_token_file: PathBuf,
    unprivileged_token_file: PathBuf,
}

/// Writes certificates, the service-account key, the token file and the logs directory.
fn write_state_files(dir: &Path, advertise: Option<std::net::IpAddr>) -> Result<StateFiles, Error> {
    for sub in ["pki", "logs", "apiserver"] {
        let path = dir.join(sub);
        std::fs::create_dir(&path).map_err(Error::io(format!("creating {}", path.display())))?;
    }
    let pki = dir.join("pki");
    let write = |name: &str, contents: &[u8]| -> Result<PathBuf, Error> {
        let path = pki.join(name);
        test_pki::write_atomic(&path, contents, true)?;
        Ok(path)
    };
    let ca = test_pki::Ca::new("ccm-test-control-plane-ca")?;
    let advertise = advertise.map(|a| a.to_string());
    let mut sans = vec![
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        KUBERNETES_SERVICE_IP,
    ];
    sans.extend(advertise.as_deref());
    let serving = ca.issue_with(
        &test_pki::LeafSpec::new(&sans)
            .common_name("kube-apiserver")
            .server_only(),
    )?;
    write("serving.crt", serving.chain_pem.as_bytes())?;
    write("serving.key", serving.key_pem.as_bytes())?;
    let ca_file = write("ca.crt", ca.cert_pem().as_bytes())?;
    // ECDSA P-256 PKCS#8: accepted by v1.20 both to sign and to verify service-account tokens.
    let sa_key = rcgen::KeyPair::generate()
        .map_err(|e| Error::Config(format!("generating the service-account key: {e}")))?;
    write("sa.key", sa_key.serialize_pem().as_bytes())?;
    // v1.20's --service-account-key-file wants public keys (it does not derive them).
    write("sa.pub", sa_key.public_key_pem().as_bytes())?;

    let admin_token = random_token()?;
    let unprivileged_token = random_token()?;
    let admin_token_file = write("admin.token", admin_token.as_bytes())?;
    let unprivileged_token_file = write("unprivileged.token", unprivileged_token.as_bytes())?;
    // token,user,uid,"group1,group2"
    let csv = format!(
        "{admin_token},{ADMIN_USER},tests-admin,\"system:masters\"\n\
         {unprivileged_token},{UNPRIVILEGED_USER},tests-unprivileged\n"
    );
    let tokens = dir.join("tokens.csv");
    test_pki::write_atomic(&tokens, csv.as_bytes(), true)?;
    Ok(StateFiles {
        ca,
        ca_file,
        admin_token_file,
        unprivileged_token_file,
    })
}

/// 128 random bits from the kernel, hex-encoded.
fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Three distinct free loopback ports (all bound at once, then released).
fn free_ports() -> Result<[u16; 3], Error> {
    let bind =
        || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(Error::io("binding 127.0.0.1:0"));
    let listeners = [bind()?, bind()?, bind()?];
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(Error::io("reading a bound port"))?
            .port();
    }
    Ok(ports)
}

/// Waits until `probe` reports `server` ready, failing early when it or one of the servers it
/// needs exits, and with [`Error::NotReady`] and the probe's last answer at `deadline`.
async fn wait_ready<Fut: Future<Output = Result<(), String>>>(
    (name, server): (&'static str, &Process),
    needs: &[(&'static str, &Process)],
    interval: Duration,
    deadline: Instant,
    started: Instant,
    mut probe: impl FnMut() -> Fut,
) -> Result<(), Error> {
    let outcome = Wait::new(format!("{name} to be ready"), remaining(deadline))
        .every(interval)
        .until(|| {
            let exited =
                std::iter::once(&(name, server))
                    .chain(needs)
                    .find_map(|&(name, process)| {
                        let status = process.exit_status()?;
                        Some(exited_early(name, process, status))
                    });
            let ready = probe();
            async move {
                match exited {
                    Some(error) => Ok(Err(error)),
                    None => ready.await.map(Ok),
                }
            }
        })
        .await;
    outcome.unwrap_or_else(|timeout| Err(not_ready(name, server, started.elapsed(), timeout.last)))
}

/// `GET /health` over plain HTTP/1.0; true when etcd answers 200 with `"health":"true"`.
async fn etcd_health(port: u16) -> std::io::Result<bool> {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        Ok(text.starts_with("HTTP/1.")
            && text.contains(" 200 ")
            && text.contains(r#""health":"true""#))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

/// Whether kube-apiserver answers `GET /readyz` and its bootstrap has created the `default`
/// namespace (each within 5 s): `/readyz` can pass before that namespace exists, and a test
/// creating objects there would then see a 404 that no real cluster gives. The error says how
/// it failed.
async fn apiserver_ready(client: &kube::Client) -> Result<(), String> {
    for path in ["/readyz", "/api/v1/namespaces/default"] {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| format!("building the {path} request: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("GET {path}: {e}")),
            Err(_) => return Err(format!("GET {path}: timed out after 5s")),
        }
    }
    Ok(())
}

/// The time left until `deadline`.
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The error for a server that exited during start-up.
fn exited_early(name: &'static str, server: &Process, status: std::process::ExitStatus) -> Error {
    Error::ExitedEarly {
        process: name,
        status: status.to_string(),
        log: server.log_path().to_path_buf(),
        tail: server.log_tail(30),
    }
}

/// The error for a server that did not become ready in `waited`.
fn not_ready(name: &'static str, server: &Process, waited: Duration, last_check: String) -> Error {
    Error::NotReady {
        process: name,
        waited,
        last_check,
        log: server.log_path().to_path_buf(),
        tail: server.log_tail(30),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn info(major: &str, minor: &str, git: &str) -> Info {
        Info {
            major: major.to_owned(),
            minor: minor.to_owned(),
            git_version: git.to_owned(),
            ..Info::default()
        }
    }

    #[test]
    fn server_version_parses_fields_then_git_version() {
        assert_eq!(
            server_major_minor(&info("1", "20", "v1.20.2")),
            Some((1, 20))
        );
        assert_eq!(
            server_major_minor(&info("1", "31+", "v1.31.0-gke.1")),
            Some((1, 31))
        );
        assert_eq!(server_major_minor(&info("", "", "v1.29.3")), Some((1, 29)));
        assert_eq!(
            server_major_minor(&info("", "", "v0.0.0-master+abc")),
            Some((0, 0))
        );
        assert_eq!(server_major_minor(&info("", "", "")), None);
    }

    #[test]
    fn unique_names_differ_and_are_dns_labels() {
        let (a, b) = (unique_name("svc"), unique_name("svc"));
        assert_ne!(a, b);
        assert!(a.starts_with("svc-"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn kubeconfig_round_trips_through_kube() {
        let yaml = kubeconfig_yaml(
            "https://127.0.0.1:6443",
            Path::new("/x/ca.crt"),
            Path::new("/x/admin.token"),
            Some(("alice", &["devs", "ops"])),
        )
        .unwrap();
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("ccm-test"));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/x/ca.crt"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/x/admin.token"));
        assert_eq!(user.impersonate.as_deref(), Some("alice"));
        assert_eq!(
            user.impersonate_groups.as_deref(),
            Some(&["devs".to_owned(), "ops".to_owned()][..])
        );
    }
}
