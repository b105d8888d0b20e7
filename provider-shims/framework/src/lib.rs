//! Framework for provider shims: one trait per CPI service, served with mTLS, health, metrics, tracing and graceful shutdown.
