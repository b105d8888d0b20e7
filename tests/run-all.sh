#!/usr/bin/env bash
# Runs the whole test suite: unit tests, gRPC/mTLS tests over real sockets, and the suites that
# start a real etcd + kube-apiserver and the project's binaries as processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# The control-plane binaries (built once, cached outside the checkout).
KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-$(bash tests/control-plane/provision.sh | tail -n1)}
export KUBEBUILDER_ASSETS
# The end-to-end suites run the real binaries; build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
