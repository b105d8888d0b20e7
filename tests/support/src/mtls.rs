//! Mutual TLS between the `local` shim and the controller-manager.

use std::path::{Path, PathBuf};

use test_pki::{Ca, write_atomic};

use crate::Error;

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
    pub fn write(dir: &Path, ca_name: &str) -> Result<Self, Error> {
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
