//! What `telemetry::init` writes to stderr, seen from outside: each case re-runs this test binary
//! as a child process (so the real `init` installs its process-wide subscriber there) with stderr
//! piped, i.e. not a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

/// Set in the child: makes [`child_logs`] call `init` and log [`MARKER`].
const CHILD_ENV: &str = "CPI_TRANSPORT_LOG_OUTPUT_CHILD";
/// The line the child logs at INFO.
const MARKER: &str = "log-output-test-marker";
/// What OpenTelemetry logs at INFO when `init` installs the global tracer provider.
const OTEL_GLOBAL_SET: &str = "global tracer provider is set";

/// Not a test of its own: the body of the child process (does nothing unless [`CHILD_ENV`] is set).
#[test]
fn child_logs() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let guard = cpi_transport::telemetry::init("log-output-test").unwrap();
    tracing::info!(answer = 42, "{MARKER}");
    drop(guard);
}

/// Runs [`child_logs`] in a child process with `env` set (and the variables `init` reads
/// otherwise removed); returns its stderr.
fn child_stderr(env: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child_logs", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("LOG_FORMAT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .envs(env.iter().copied());
    let output = command.output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        output.status.success(),
        "child failed: {}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
    );
    stderr
}

/// Whether `stderr` holds OpenTelemetry's "global tracer provider is set" line.
fn has_otel_global_set(stderr: &str) -> bool {
    stderr.to_lowercase().contains(OTEL_GLOBAL_SET)
}

#[test]
fn text_logs_to_a_pipe_have_no_colours_and_no_otel_internals() {
    let stderr = child_stderr(&[]);
    assert!(
        stderr.contains(MARKER),
        "our INFO line is missing:\n{stderr}"
    );
    assert!(
        !stderr.contains("\x1b["),
        "ANSI escape codes in piped logs:\n{stderr:?}"
    );
    assert!(
        !has_otel_global_set(&stderr),
        "OpenTelemetry's internal INFO line at the default level:\n{stderr}"
    );
    assert!(
        !stderr.contains("opentelemetry"),
        "OpenTelemetry internal events at the default level:\n{stderr}"
    );
}

#[test]
fn a_global_rust_log_level_keeps_otel_internals_quiet() {
    let stderr = child_stderr(&[("RUST_LOG", "debug")]);
    assert!(stderr.contains(MARKER), "{stderr}");
    assert!(!has_otel_global_set(&stderr), "{stderr}");
}

#[test]
fn rust_log_naming_opentelemetry_turns_its_internals_back_on() {
    let stderr = child_stderr(&[("RUST_LOG", "info,opentelemetry=info")]);
    assert!(stderr.contains(MARKER), "{stderr}");
    assert!(
        has_otel_global_set(&stderr),
        "RUST_LOG=opentelemetry=info did not enable OpenTelemetry's line:\n{stderr}"
    );
    assert!(!stderr.contains("\x1b["), "{stderr:?}");
}

#[test]
fn rust_log_still_filters_our_own_lines() {
    let stderr = child_stderr(&[("RUST_LOG", "warn")]);
    assert!(!stderr.contains(MARKER), "{stderr}");
}

#[test]
fn json_logs_have_no_colours_either() {
    let stderr = child_stderr(&[("LOG_FORMAT", "json")]);
    let line = stderr
        .lines()
        .find(|line| line.contains(MARKER))
        .unwrap_or_else(|| panic!("our INFO line is missing:\n{stderr}"));
    assert!(line.starts_with('{'), "{line}");
    assert!(!stderr.contains("\x1b["), "{stderr:?}");
    assert!(!has_otel_global_set(&stderr), "{stderr}");
}

#[test]
fn no_color_is_honoured() {
    // stderr is a pipe here, so this only shows that `NO_COLOR` does no harm; the terminal case
    // is covered by the unit test of `use_ansi` in `telemetry.rs`.
    let stderr = child_stderr(&[("NO_COLOR", "1")]);
    assert!(stderr.contains(MARKER), "{stderr}");
    assert!(!stderr.contains("\x1b["), "{stderr:?}");
}
