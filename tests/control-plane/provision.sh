#!/usr/bin/env bash
# Provisions the binaries of the test control plane (etcd + kube-apiserver) on a Debian machine
# with no internet beyond the package registries, and caches them outside the checkout.
#
# Result: a directory in envtest layout (KUBEBUILDER_ASSETS) holding `etcd` and `kube-apiserver`.
# Its path is printed on the last line of stdout. `kubectl` is installed too when missing.
#
# Honoured:
#   KUBEBUILDER_ASSETS       if it already holds both binaries, nothing is built and it is printed.
#   CCM_TEST_ASSETS_CACHE    cache root (default: ~/.cache/ccm-test-assets).
set -euo pipefail

K8S_VERSION=v1.20.2
DEB_SOURCE=kubernetes
CACHE_ROOT=${CCM_TEST_ASSETS_CACHE:-$HOME/.cache/ccm-test-assets}
ASSETS=$CACHE_ROOT/$K8S_VERSION

log() { echo "provision: $*" >&2; }

SUDO=
[[ $(id -u) -eq 0 ]] || SUDO=sudo
apt_updated=
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ -z $apt_updated ]]; then $SUDO apt-get update -qq >&2; apt_updated=1; fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# kubectl (the deploy-manifest test applies manifests with it): Debian's kubernetes-client.
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]]; then
  log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

# etcd comes straight from Debian.
apt_install etcd-server
mkdir -p "$ASSETS"
ln -sf "$(command -v etcd)" "$ASSETS/etcd"

# Bump when the build changes in a way the cached binary cannot be checked for cheaply
# (2: the `/version` endpoint reports $K8S_VERSION, not v0.0.0-master).
BUILD_RECIPE=2
if [[ -x "$ASSETS/kube-apiserver" ]] && "$ASSETS/kube-apiserver" --version 2>/dev/null | grep -q "$K8S_VERSION" \
  && [[ "$(cat "$ASSETS/kube-apiserver.recipe" 2>/dev/null)" == "$BUILD_RECIPE" ]]; then
  log "kube-apiserver $K8S_VERSION cached in $ASSETS"
  echo "$ASSETS"
  exit 0
fi

# kube-apiserver: no registry ships a binary; Debian's source package carries the whole tree with
# vendor/, which builds offline with Debian's Go in GOPATH mode.
apt_install golang-go dpkg-dev ca-certificates
src_list=/etc/apt/sources.list.d/ccm-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  log "adding a deb-src entry for bookworm"
  $SUDO tee "$src_list" >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO apt-get update -qq >&2
fi

WORK=$CACHE_ROOT/build
rm -rf "$WORK"
mkdir -p "$WORK/dl" "$WORK/gopath/src/k8s.io" "$WORK/bin"
(cd "$WORK/dl" && apt-get source --download-only -qq "$DEB_SOURCE" >&2)
dsc=$(ls "$WORK"/dl/*.dsc | head -n1)
dpkg-source --no-check -x "$dsc" "$WORK/gopath/src/k8s.io/kubernetes" >&2

export GOPATH=$WORK/gopath GO111MODULE=off GOFLAGS= GOCACHE=$CACHE_ROOT/gocache CGO_ENABLED=0
cd "$GOPATH/src/k8s.io/kubernetes"

log "generating pkg/generated/openapi"
go build -o "$WORK/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
dirs=$(grep -Rl --include='*.go' '^// +k8s:openapi-gen=' pkg vendor 2>/dev/null \
  | xargs -n1 dirname | sort -u \
  | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' -e '^pkg/generated' \
  | sed -e 's#^#k8s.io/kubernetes/#' | paste -sd, -)
"$WORK/bin/openapi-gen" -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$WORK/openapi-report.txt" >&2

log "building kube-apiserver $K8S_VERSION (a few minutes)"
# In GOPATH mode vendored packages' import paths carry the `k8s.io/kubernetes/vendor/` prefix,
# and `-X` silently ignores a path that matches no package. Like hack/lib/version.sh, stamp both
# version packages: component-base (`--version`, logs) and client-go (the `/version` endpoint).
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags=
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
go build -ldflags "$ldflags" -o "$ASSETS/kube-apiserver.tmp" ./cmd/kube-apiserver
"$ASSETS/kube-apiserver.tmp" --version | grep -q "$K8S_VERSION" \
  || { log "built kube-apiserver does not report $K8S_VERSION"; exit 1; }
mv "$ASSETS/kube-apiserver.tmp" "$ASSETS/kube-apiserver"
echo "$BUILD_RECIPE" >"$ASSETS/kube-apiserver.recipe"
cd /
rm -rf "$WORK"
log "done: $ASSETS"
echo "$ASSETS"
