#!/usr/bin/env bash
# One command: provision what is needed, build the project, and run the whole stack on this
# machine with the `local` provider (see README.md, "Run it locally").
#   bash deploy/local/run.sh               processes against etcd + kube-apiserver (any user)
#   bash deploy/local/run.sh --real-node   pods on a real single-node cluster (root)
set -euo pipefail
cd "$(dirname "$0")/../.."
real_node=
for arg in "$@"; do [[ $arg == --real-node ]] && real_node=1; done
if [[ -n $real_node ]]; then
  KUBEBUILDER_ASSETS=$(bash tests/control-plane/provision.sh --node | tail -n1)
  export KUBEBUILDER_ASSETS
  cargo build --locked -p cloud-controller-manager -p local-shim -p cloud-provider-webhook \
    -p ccm-certgen -p local-cluster
  exec "${CARGO_TARGET_DIR:-target}/debug/local-cluster" "$@"
fi
KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-$(bash tests/control-plane/provision.sh | tail -n1)}
export KUBEBUILDER_ASSETS
cargo build --locked -p cloud-controller-manager -p local-shim -p local-cluster
exec "${CARGO_TARGET_DIR:-target}/debug/local-cluster" \
  --inventory provider-shims/local/examples/inventory.yaml "$@"
