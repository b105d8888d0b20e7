#!/usr/bin/env bash
# One command: provision etcd + kube-apiserver, build the project, and run the whole stack on
# this machine with the `local` provider (see README.md, "Run it locally").
set -euo pipefail
cd "$(dirname "$0")/../.."
KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-$(bash tests/control-plane/provision.sh | tail -n1)}
export KUBEBUILDER_ASSETS
cargo build --locked -p cloud-controller-manager -p local-shim -p local-cluster
exec "${CARGO_TARGET_DIR:-target}/debug/local-cluster" \
  --inventory provider-shims/local/examples/inventory.yaml "$@"
