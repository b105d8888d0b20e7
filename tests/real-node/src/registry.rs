//! A distribution registry on loopback that the node's containerd pulls from, optionally
//! requiring a user and password (htpasswd), for image-pull and credential-provider tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_support::{Process, Wait};

use crate::Error;
use crate::cluster::Cluster;
use crate::config;
use crate::host::run;

/// A running registry; stopped when dropped (its storage lives in the node's directory).
#[derive(Debug)]
pub struct Registry {
    process: Process,
    host_port: String,
    credentials: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry on a free loopback port, with basic auth for `credentials` when given,
    /// and tells the node's containerd to reach it over plain HTTP.
    pub async fn start(
        cluster: &Cluster,
        credentials: Option<(&str, &str)>,
    ) -> Result<Registry, Error> {
        let port = test_support::free_port().map_err(Error::io("choosing a port"))?;
        Self::start_on(cluster, port, credentials).await
    }

    /// As [`Registry::start`], on `127.0.0.1:port` (for a kubelet configured with the address
    /// before the registry runs).
    pub async fn start_on(
        cluster: &Cluster,
        port: u16,
        credentials: Option<(&str, &str)>,
    ) -> Result<Registry, Error> {
        let dir = cluster.dir()?.join(format!("registry-{port}"));
        std::fs::create_dir_all(dir.join("data"))
            .map_err(Error::io(format!("creating {}", dir.display())))?;
        let htpasswd = match credentials {
            Some((user, password)) => {
                let mut c = Command::new("htpasswd");
                c.args(["-Bbn", user, password]);
                let line = run(c)?;
                let path = dir.join("htpasswd");
                std::fs::write(&path, line)
                    .map_err(Error::io(format!("writing {}", path.display())))?;
                Some(path)
            }
            None => None,
        };
        let config_path = dir.join("config.yml");
        std::fs::write(
            &config_path,
            config::registry_yaml(&dir.join("data"), port, htpasswd.as_deref()),
        )
        .map_err(Error::io(format!("writing {}", config_path.display())))?;
        let host_port = format!("127.0.0.1:{port}");
        let hosts = cluster.containerd_dir().join("certs.d").join(&host_port);
        std::fs::create_dir_all(&hosts)
            .map_err(Error::io(format!("creating {}", hosts.display())))?;
        std::fs::write(hosts.join("hosts.toml"), config::hosts_toml(&host_port))
            .map_err(Error::io(format!("writing {}", hosts.display())))?;
        let process = Process::builder(
            "registry",
            &cluster.binaries().registry,
            dir.join("registry.log"),
        )
        .args([PathBuf::from("serve"), config_path])
        .spawn()?;
        let log = process.log_path().to_path_buf();
        let url = host_port.clone();
        Wait::new(
            format!("the registry on {url} to accept connections"),
            Duration::from_secs(20),
        )
        .until(|| {
            let url = url.clone();
            async move {
                tokio::net::TcpStream::connect(&url)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .await
        .map_err(|e| Error::NotReady {
            component: "registry",
            detail: e.to_string(),
            log: log.clone(),
            tail: test_support::last_lines(&std::fs::read_to_string(&log).unwrap_or_default(), 30),
        })?;
        Ok(Registry {
            process,
            host_port,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        })
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// Copies an OCI archive into the registry as `name` (e.g. `demo/web:1`), with the
    /// registry's credentials; returns the full image reference.
    pub fn push(&self, archive: &Path, name: &str) -> Result<String, Error> {
        let reference = format!("{}/{name}", self.host_port);
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((user, password)) = &self.credentials {
            c.arg(format!("--dest-creds={user}:{password}"));
        }
        c.arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{reference}"));
        run(c)?;
        Ok(reference)
    }

    /// The registry's log so far (it names the user of each authenticated request).
    pub fn logs(&self) -> String {
        self.process.logs()
    }
}
