//! Process-wide logging and tracing set-up: `tracing` to stderr, plus OTLP export when the
//! standard `OTEL_EXPORTER_OTLP_*` variables are set.
//!
//! The OpenTelemetry layer is installed only when an OTLP endpoint is configured: it costs CPU on
//! every span enter/exit (measured at about a tenth of the controller-manager's CPU when
//! initialising 2000 nodes), which a process that exports nothing should not pay. Without it no
//! trace context is sent to the next hop.
//!
//! Environment:
//! - `RUST_LOG`: the `tracing` filter (default `info`);
//! - `LOG_FORMAT=json`: one JSON object per line instead of text;
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (and the other standard
//!   `OTEL_EXPORTER_OTLP_*` variables): export spans over OTLP/gRPC.

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
    let filter = EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::INFO.into())
        .from_env()?;
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
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
