//! W3C trace-context propagation across gRPC hops.
//!
//! The client side is [`ClientInterceptor`] (installed by [`crate::client::connect`]); the server
//! side is [`server_span`], installed on the tonic server with `Server::trace_fn` by
//! [`crate::server::server_builder`]. Both use [`TraceContextPropagator`] directly instead of the
//! global propagator, so propagation works whether or not anything was installed globally.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Name of the span every served request runs in.
pub const SERVER_SPAN_NAME: &str = "grpc.server";

/// Client interceptor: injects `traceparent`/`tracestate` from the current span and sets the
/// default deadline (`grpc-timeout`) when the call has none.
#[derive(Clone, Debug)]
pub struct ClientInterceptor {
    /// Deadline applied when a call sets none (zero: no default deadline).
    pub default_timeout: std::time::Duration,
}

impl tonic::service::Interceptor for ClientInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.default_timeout.is_zero() && request.metadata().get("grpc-timeout").is_none() {
            request.set_timeout(self.default_timeout);
        }
        inject_context(&tracing::Span::current().context(), request.metadata_mut());
        Ok(request)
    }
}

/// Writes `cx` as W3C `traceparent`/`tracestate` into gRPC metadata (nothing if `cx` has no
/// valid span).
pub fn inject_context(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// Reads the caller's W3C trace context from HTTP headers (an empty context if absent or
/// malformed).
pub fn extract_context(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The span a served request runs in: `grpc.server`, child of the caller's trace context.
/// Pass it to `tonic::transport::Server::trace_fn` (done by `server::server_builder`).
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        SERVER_SPAN_NAME,
        "rpc.system" = "grpc",
        "rpc.method" = %request.uri().path(),
        "otel.kind" = "server",
    );
    // Fails only when no OpenTelemetry layer is installed or the span is disabled; the request
    // must still be served then.
    let _ = span.set_parent(extract_context(request.headers()));
    span
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(key) = MetadataKey::from_bytes(key.as_bytes()) else {
            return;
        };
        let Ok(value) = MetadataValue::try_from(value.as_str()) else {
            return;
        };
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
