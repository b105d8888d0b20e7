//! Cross-component test suites: gRPC over real sockets, leader election, tracing, end-to-end.
