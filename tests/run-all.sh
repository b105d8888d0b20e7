#!/usr/bin/env bash
# Runs the whole test suite: unit tests, gRPC/mTLS tests over real sockets, and the suites that
# start a real etcd + kube-apiserver and the project's binaries as processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# The control-plane and node binaries (built once, cached outside the checkout), kubectl, and
# containerd, runc, the CNI plugins, buildah and the registry for the real-node suites. Always
# run: it installs what is missing and is quick when everything is cached.
KUBEBUILDER_ASSETS=$(bash tests/control-plane/provision.sh --node | tail -n1)
export KUBEBUILDER_ASSETS
# --- credential-provider: moto_server for the ECR tests (idempotent; the tests also look on PATH) ---
MOTO_VENV="${CCM_TEST_ASSETS_CACHE:-$HOME/.cache/ccm-test-assets}/moto-venv"
if [ ! -x "$MOTO_VENV/bin/moto_server" ] && ! command -v moto_server >/dev/null 2>&1; then
  python3 -m venv "$MOTO_VENV" && "$MOTO_VENV/bin/pip" install --quiet 'moto[server]'
fi
# --- end credential-provider ---
# The end-to-end suites spawn these binaries; build them first (`cargo test` builds only the
# binaries of the package under test).
cargo build --locked -p cloud-controller-manager -p local-shim -p cloud-provider-webhook -p ccm-certgen \
  -p credential-provider
cargo test --workspace --locked -- --test-threads=2
