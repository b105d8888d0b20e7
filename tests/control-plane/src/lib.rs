//! Starts a real etcd + kube-apiserver for tests and hands out clients; cleans up even when a test fails.
