//! Process-wide logging and tracing set-up: `tracing` to stderr, plus OTLP export when the
//! standard `OTEL_EXPORTER_OTLP_*` variables are set.
//!
//! The OpenTelemetry layer is installed only when an OTLP endpoint is configured: it costs CPU on
//! every span enter/exit (measured at about a tenth of the controller-manager's CPU when
//! initialising 2000 nodes), which a process that exports nothing should not pay. Without it no
//! trace context is sent to the next hop.
//!
//! Environment:
//! - `RUST_LOG`: the `tracing` filter (default `info`). OpenTelemetry's own internal events
//!   (targets starting with `opentelemetry`, e.g. "Global tracer provider is set" at every start)
//!   are kept to `warn` and above unless `RUST_LOG` names that target itself, e.g.
//!   `RUST_LOG=info,opentelemetry=debug`;
//! - `NO_COLOR` (non-empty): no ANSI colours. Text logs are coloured only when stderr is a
//!   terminal, so redirected and collected logs never carry escape codes;
//! - `LOG_FORMAT=json`: one JSON object per line instead of text;
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (and the other standard
//!   `OTEL_EXPORTER_OTLP_*` variables): export spans over OTLP/gRPC.

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Instrumentation scope of the spans this workspace creates.
const TRACER_NAME: &str = "cloud-provider";

/// Filter directives placed before `RUST_LOG`'s: a later directive for the same target replaces
/// an earlier one, so `RUST_LOG=opentelemetry=info` still turns OpenTelemetry's internal events
/// back on. The prefix covers `opentelemetry`, `opentelemetry_sdk`, `opentelemetry-otlp`, ….
const DEFAULT_DIRECTIVES: &str = "opentelemetry=warn";

/// The level used when `RUST_LOG` is unset or empty.
const DEFAULT_LEVEL: &str = "info";

/// Keeps the exporter alive; flushes spans when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.force_flush() {
            eprintln!("telemetry: flushing spans failed: {err}");
        }
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry: shutting down the tracer provider failed: {err}");
        }
    }
}

/// Failure to set up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` does not parse.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    /// The OTLP exporter cannot be built from the `OTEL_EXPORTER_OTLP_*` variables.
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// OTLP export was requested outside a Tokio runtime (its gRPC client needs one).
    #[error("OTLP export is configured but telemetry::init was called outside a Tokio runtime")]
    NoRuntime,
    /// A global subscriber is already installed.
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber for `service_name` (the OTel `service.name`).
pub fn init(service_name: &str) -> Result<TelemetryGuard, TelemetryError> {
    // As `EnvFilter::from_env`: an unset or non-Unicode `RUST_LOG` counts as empty.
    let filter = filter_directives(&std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default());
    let filter = EnvFilter::builder()
        .parse(filter)
        .map_err(tracing_subscriber::filter::FromEnvError::from)?;
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };

    let otlp_endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok().filter(|value| !value.is_empty()));
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    if otlp_endpoint.is_some() {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TelemetryError::NoRuntime);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otlp_endpoint.is_some().then(|| layer_for(&provider)))
        .try_init()?;
    // For libraries that propagate through the global API rather than through this crate.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(service = service_name, %endpoint, "exporting spans over OTLP/gRPC");
    }
    Ok(TelemetryGuard { provider })
}

/// The filter for a `RUST_LOG` value: [`DEFAULT_DIRECTIVES`], then the user's directives (or
/// [`DEFAULT_LEVEL`] when there are none).
fn filter_directives(rust_log: &str) -> String {
    let user = if rust_log
        .split(',')
        .all(|directive| directive.trim().is_empty())
    {
        DEFAULT_LEVEL
    } else {
        rust_log
    };
    format!("{DEFAULT_DIRECTIVES},{user}")
}

/// Whether text logs get ANSI colours: only on a terminal, and never when `NO_COLOR` is set to
/// a non-empty value (the convention `tracing-subscriber` itself follows).
fn use_ansi(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The OpenTelemetry `Resource` identifying `service_name`.
fn resource(service_name: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_owned())
        .build()
}

/// A `tracing` layer turning spans into OpenTelemetry spans of `provider` (a building block for
/// custom subscribers and tests).
pub fn layer_for<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    // Busy/idle timing reads the clock on every poll of an instrumented future; thread and
    // source-location attributes are not worth their per-span allocations.
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(TRACER_NAME))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(use_ansi(true, Some("".as_ref())));
        assert!(!use_ansi(true, Some("1".as_ref())));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(false, Some("1".as_ref())));
    }

    #[test]
    fn opentelemetry_is_quiet_unless_rust_log_names_it() {
        let parse = |rust_log: &str| {
            EnvFilter::builder()
                .parse(filter_directives(rust_log))
                .unwrap()
                .to_string()
        };
        assert_eq!(filter_directives(""), "opentelemetry=warn,info");
        assert_eq!(filter_directives(" , "), "opentelemetry=warn,info");
        assert_eq!(parse("debug"), "opentelemetry=warn,debug");
        // The user's directive for the same target replaces the default one.
        assert_eq!(
            parse("info,opentelemetry=debug"),
            "opentelemetry=debug,info"
        );
        assert!(
            EnvFilter::builder()
                .parse(filter_directives("info,=x=y"))
                .is_err()
        );
    }
}
