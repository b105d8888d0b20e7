//! The `cloud-provider-webhook` binary refuses flags that cannot work, naming the flag, before
//! it serves anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Runs the binary with `args` (a valid base plus these) and returns its exit success and
/// standard error.
fn run(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloud-provider-webhook"));
    command
        .arg(format!("--webhook-tls-cert-file={missing}"))
        .arg(format!("--webhook-tls-private-key-file={missing}"))
        .arg("--webhook-secure-port=0")
        .args(args)
        // No spans are exported from these runs.
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn no_enabled_webhook_is_refused() {
    let (ok, stderr) = run(&["--provider-endpoint=unix:///x", "--webhooks=-pv-labeler"]);
    assert!(!ok);
    assert!(stderr.contains("--webhooks enables no webhook"), "{stderr}");
}

#[test]
fn unknown_webhook_is_refused() {
    let (ok, stderr) = run(&["--provider-endpoint=unix:///x", "--webhooks=pv-labeller"]);
    assert!(!ok);
    assert!(
        stderr.contains("\"pv-labeller\" is not a known webhook"),
        "{stderr}"
    );
}

#[test]
fn https_endpoint_without_tls_files_is_refused() {
    let (ok, stderr) = run(&["--provider-endpoint=https://127.0.0.1:1", "--webhooks=*"]);
    assert!(!ok);
    assert!(stderr.contains("--provider-ca-file"), "{stderr}");
}

#[test]
fn missing_serving_certificate_is_refused_naming_the_flag() {
    let (ok, stderr) = run(&["--provider-endpoint=unix:///x", "--webhooks=*"]);
    assert!(!ok);
    assert!(
        stderr.contains("--webhook-tls-cert-file") && stderr.contains("missing.pem"),
        "{stderr}"
    );
}
