//! Global telemetry set-up (its own binary: it installs the process-wide subscriber).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[tokio::test]
async fn init_installs_a_subscriber_that_mints_trace_ids_without_an_exporter() {
    let guard = cpi_transport::telemetry::init("telemetry-test").unwrap();

    // Even with no OTLP endpoint, spans carry real trace ids so they can be propagated.
    let span = tracing::info_span!("work");
    let context = span.context().span().span_context().clone();
    assert!(context.is_valid(), "{context:?}");

    // A second installation is refused rather than silently ignored.
    assert!(matches!(
        cpi_transport::telemetry::init("again"),
        Err(cpi_transport::telemetry::TelemetryError::AlreadyInstalled(
            _
        ))
    ));
    drop(span);
    drop(guard);
}
