//! Global telemetry set-up (its own binary: it installs the process-wide subscriber).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[tokio::test]
async fn init_without_otlp_installs_logging_only() {
    let guard = cpi_transport::telemetry::init("telemetry-test").unwrap();

    // Without an OTLP endpoint no OpenTelemetry layer is installed: spans carry no trace context
    // (and cost nothing beyond logging).
    let span = tracing::info_span!("work");
    let context = span.context().span().span_context().clone();
    assert!(!context.is_valid(), "{context:?}");

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
