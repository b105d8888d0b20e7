#!/usr/bin/env bash
# Provisions the binaries of the test control plane (etcd + kube-apiserver) on a Debian machine
# with no internet beyond the package registries, and caches them outside the checkout.
#
# Result: a directory in envtest layout (KUBEBUILDER_ASSETS) holding `etcd` and `kube-apiserver`
# (with `--node`, also kubelet, kube-controller-manager, kube-scheduler, kube-proxy, `pause` and
# the sandbox image `pause.oci.tar`).
# Its path is printed on the last line of stdout. `kubectl` is installed too when missing.
#
# Honoured:
#   KUBEBUILDER_ASSETS       if it already holds both binaries, nothing is built and it is printed.
#   CCM_TEST_ASSETS_CACHE    cache root (default: ~/.cache/ccm-test-assets).
#
# Sourcing this file (`source provision.sh`) only defines its apt-sources functions, so they can be
# tried on a copy of an apt configuration without building anything.
set -euo pipefail

K8S_VERSION=v1.20.2
DEB_SOURCE=kubernetes
CACHE_ROOT=${CCM_TEST_ASSETS_CACHE:-$HOME/.cache/ccm-test-assets}
ASSETS=$CACHE_ROOT/$K8S_VERSION
# The name of the sandbox image built from the source tree (tests/real-node uses the same name).
PAUSE_IMAGE=ccm.local/pause:$K8S_VERSION

log() { echo "provision: $*" >&2; }

# The files apt reads its sources from under $1 (an apt configuration directory such as
# /etc/apt): sources.list and sources.list.d/*.list in one-line format, sources.list.d/*.sources
# in deb822 format. Other names there (e.g. `*.disabled`) are ignored by apt, and so here.
apt_source_files() {
  local etc=$1 f
  for f in "$etc/sources.list" "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
    [[ -f $f ]] && printf '%s\n' "$f"
  done
  return 0
}

# Reads apt source files in either format (deb822 for `*.sources`). With mode=deb-src, prints one
# line per enabled `deb-src` entry. With mode=derive, prints a deb822 `deb-src` stanza for every
# enabled binary (`deb`) entry: same URIs, suites, components and Signed-By / Trusted, so the
# source packages come from wherever the machine's binary packages come from (a mirror included).
# Signed-By may hold an embedded key over continuation lines; they are copied verbatim.
apt_sources_awk() {
  local mode=$1
  shift
  [[ $# -gt 0 ]] || return 0
  awk -v mode="$mode" '
    function has_word(list, word,   n, i, w) {
      n = split(list, w, /[ \t\n]+/)
      for (i = 1; i <= n; i++) if (w[i] == word) return 1
      return 0
    }
    function stanza(uris, suites, comps, signed, trusted) {
      printf "%sTypes: deb-src\nURIs: %s\nSuites: %s\n", (printed++ ? "\n" : ""), uris, suites
      if (comps != "") printf "Components: %s\n", comps
      # An embedded key starts on the next line.
      if (signed != "") printf "Signed-By:%s%s\n", (signed ~ /^\n/ ? "" : " "), signed
      if (trusted != "") printf "Trusted: %s\n", trusted
    }
    # deb822: fields of the current stanza, keyed by lower-cased name.
    function flush822() {
      if (("types" in f) && tolower(f["enabled"]) !~ /^(no|false|off|0)$/) {
        if (mode == "deb-src" && has_word(f["types"], "deb-src")) print "deb-src"
        if (mode == "derive" && has_word(f["types"], "deb") && f["uris"] != "" && f["suites"] != "")
          stanza(f["uris"], f["suites"], f["components"], f["signed-by"], f["trusted"])
      }
      split("", f); key = ""
    }
    FNR == 1 { if (deb822) flush822(); deb822 = (FILENAME ~ /\.sources$/) }
    deb822 {
      if ($0 ~ /^#/) next
      if ($0 ~ /^[ \t]*$/) { flush822(); next }
      if ($0 ~ /^[ \t]/ && key != "") { f[key] = f[key] "\n" $0; next }
      if (match($0, /^[^:]+:/)) {
        key = tolower(substr($0, 1, RLENGTH - 1))
        f[key] = substr($0, RLENGTH + 1)
        sub(/^[ \t]+/, "", f[key]); sub(/[ \t]+$/, "", f[key])
      }
      next
    }
    # One-line format: type [options] uri suite [component...]
    {
      sub(/#.*/, "")
      if ($1 == "deb-src" && mode == "deb-src") { print "deb-src"; next }
      if ($1 != "deb" || mode != "derive") next
      signed = ""; trusted = ""; i = 2
      if ($i ~ /^\[/) {
        for (; i <= NF; i++) {
          opt = $i; gsub(/[][]/, "", opt)
          if (opt ~ /^signed-by=/) { signed = substr(opt, 11); gsub(/,/, " ", signed) }
          if (opt ~ /^trusted=/) trusted = substr(opt, 9)
          if ($i ~ /\]$/) { i++; break }
        }
      }
      if (i + 1 > NF) next
      uri = $i; suite = $(i + 1); comps = ""
      for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
      stanza(uri, suite, comps, signed, trusted)
    }
    END { if (deb822) flush822() }
  ' "$@"
}

# Whether the apt configuration under $1 (e.g. /etc/apt) has an enabled deb-src entry.
has_deb_src() {
  local files
  mapfile -t files < <(apt_source_files "$1")
  [[ -n $(apt_sources_awk deb-src "${files[@]}") ]]
}

# Prints deb822 deb-src stanzas mirroring the binary sources configured under $1 (e.g.
# /etc/apt); fails naming the files it read when there is none.
deb_src_from_binary_sources() {
  local etc=$1 files out
  mapfile -t files < <(apt_source_files "$etc")
  out=$(apt_sources_awk derive "${files[@]}")
  if [[ -z $out ]]; then
    log "no enabled binary (deb) apt source to derive a deb-src entry from; read: ${files[*]:-nothing}" \
      "(looked for $etc/sources.list, $etc/sources.list.d/*.list and $etc/sources.list.d/*.sources)"
    return 1
  fi
  printf '%s\n' "$out"
}

# Sourced: stop after the definitions above.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

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

# Which binaries to provide: the control plane always; with `--node` also the components of a
# real node (see tests/real-node/): kubelet, kube-controller-manager, kube-scheduler, kube-proxy
# and the pause binary, plus containerd, runc, the CNI plugins, the registry and the image tools
# from Debian.
WANT_NODE=
for arg in "$@"; do
  case $arg in
    --node) WANT_NODE=1 ;;
    *) log "unknown argument $arg (known: --node)"; exit 2 ;;
  esac
done

if [[ -n $WANT_NODE ]]; then
  # iptables and conntrack for kube-proxy and the kubelet; busybox-static and apache2-utils
  # (htpasswd) for the test images and the authenticated registry.
  apt_install containerd runc containernetworking-plugins buildah skopeo docker-registry \
    iptables conntrack busybox-static apache2-utils gcc libc6-dev
fi

if [[ -z $WANT_NODE && -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]]; then
  log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

# etcd comes straight from Debian.
apt_install etcd-server
mkdir -p "$ASSETS"
ln -sf "$(command -v etcd)" "$ASSETS/etcd"

# Bump when the build changes in a way the cached binary cannot be checked for cheaply
# (2: the `/version` endpoint reports $K8S_VERSION, not v0.0.0-master; 3: reflect2 1.0.2, see
# below). Each binary records the recipe it was built with in `<name>.recipe`.
BUILD_RECIPE=3
COMPONENTS=(kube-apiserver)
[[ -n $WANT_NODE ]] && COMPONENTS+=(kubelet kube-controller-manager kube-scheduler kube-proxy)
cached() {
  [[ -x "$ASSETS/$1" ]] && "$ASSETS/$1" --version 2>/dev/null | grep -q "$K8S_VERSION" \
    && [[ "$(cat "$ASSETS/$1.recipe" 2>/dev/null)" == "$BUILD_RECIPE" ]]
}
missing=()
for c in "${COMPONENTS[@]}"; do cached "$c" || missing+=("$c"); done
need_pause=
if [[ -n $WANT_NODE ]] && [[ ! -x "$ASSETS/pause" || ! -f "$ASSETS/pause.oci.tar" || "$(cat "$ASSETS/pause.recipe" 2>/dev/null)" != "$BUILD_RECIPE" ]]; then
  need_pause=1
fi
if [[ ${#missing[@]} -eq 0 && -z $need_pause ]]; then
  log "${COMPONENTS[*]} $K8S_VERSION cached in $ASSETS"
  echo "$ASSETS"
  exit 0
fi

# No registry ships these binaries; Debian's source package carries the whole tree with vendor/,
# which builds offline with Debian's Go in GOPATH mode.
apt_install golang-go dpkg-dev ca-certificates golang-github-modern-go-reflect2-dev
src_list=/etc/apt/sources.list.d/ccm-deb-src.sources
if ! has_deb_src /etc/apt; then
  # Derived from the configured binary sources, not a fixed archive, so a mirror keeps working.
  entries=$(deb_src_from_binary_sources /etc/apt)
  log "adding deb-src entries for the configured binary sources in $src_list"
  printf '%s\n' "$entries" | $SUDO tee "$src_list" >/dev/null
  $SUDO apt-get update -qq >&2
fi

WORK=$CACHE_ROOT/build
rm -rf "$WORK"
mkdir -p "$WORK/dl" "$WORK/gopath/src/k8s.io" "$WORK/bin"
(cd "$WORK/dl" && apt-get source --download-only -qq "$DEB_SOURCE" >&2)
dscs=("$WORK"/dl/*.dsc)
dsc=${dscs[0]}
[[ -f $dsc ]] || { log "apt-get source $DEB_SOURCE downloaded no .dsc into $WORK/dl"; exit 1; }
dpkg-source --no-check -x "$dsc" "$WORK/gopath/src/k8s.io/kubernetes" >&2
SRC=$WORK/gopath/src/k8s.io/kubernetes

# The pause binary of the node's sandbox image: a static C program in the same tree.
if [[ -n $need_pause ]]; then
  log "building pause"
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION-ccm" -o "$ASSETS/pause.tmp" "$SRC/build/pause/linux/pause.c" >&2
  strip "$ASSETS/pause.tmp"
  mv "$ASSETS/pause.tmp" "$ASSETS/pause"
  # The sandbox image: nothing but /pause, from scratch (no registry to pull one from), as an
  # OCI archive that `ctr images import` loads into the node's containerd.
  ctr_id=$(buildah from scratch)
  buildah copy "$ctr_id" "$ASSETS/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr_id"
  buildah commit -q "$ctr_id" "$PAUSE_IMAGE" >/dev/null
  buildah rm "$ctr_id" >/dev/null
  rm -f "$ASSETS/pause.oci.tar"
  buildah push -q "$PAUSE_IMAGE" "oci-archive:$ASSETS/pause.oci.tar:$PAUSE_IMAGE"
  buildah rmi "$PAUSE_IMAGE" >/dev/null
  echo "$BUILD_RECIPE" >"$ASSETS/pause.recipe"
fi

if [[ ${#missing[@]} -gt 0 ]]; then
  # The vendored reflect2 1.0.1 reads Go runtime internals that changed in Go 1.18: built with a
  # newer Go, kube-apiserver dies (SIGSEGV in the JSON encoding of a mutating webhook's patch
  # annotation). 1.0.2 is the fix, with the same API; Debian packages it.
  reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f $reflect2/reflect2.go ]] || { log "$reflect2 is missing (golang-github-modern-go-reflect2-dev)"; exit 1; }
  vendored=$SRC/vendor/github.com/modern-go/reflect2
  rm -rf "$vendored"
  mkdir -p "$vendored"
  cp "$reflect2"/*.go "$reflect2"/*.s "$vendored"/
  rm -f "$vendored"/*_test.go

  export GOPATH=$WORK/gopath GO111MODULE=off GOFLAGS='' GOCACHE=$CACHE_ROOT/gocache CGO_ENABLED=0
  cd "$SRC"

  log "generating pkg/generated/openapi"
  go build -o "$WORK/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  dirs=$(grep -Rl --include='*.go' '^// +k8s:openapi-gen=' pkg vendor 2>/dev/null \
    | xargs -n1 dirname | sort -u \
    | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' -e '^pkg/generated' \
    | sed -e 's#^#k8s.io/kubernetes/#' | paste -sd, -)
  "$WORK/bin/openapi-gen" -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$WORK/openapi-report.txt" >&2

  # In GOPATH mode vendored packages' import paths carry the `k8s.io/kubernetes/vendor/` prefix,
  # and `-X` silently ignores a path that matches no package. Like hack/lib/version.sh, stamp both
  # version packages: component-base (`--version`, logs) and client-go (the `/version` endpoint).
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ldflags=
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  # One at a time: on two cores a parallel build gains nothing and needs twice the memory
  # (kubelet alone peaks near 1.7 GB).
  for c in "${missing[@]}"; do
    log "building $c $K8S_VERSION (a few minutes each, cold)"
    go build -ldflags "$ldflags" -o "$ASSETS/$c.tmp" "./cmd/$c"
    "$ASSETS/$c.tmp" --version | grep -q "$K8S_VERSION" \
      || { log "built $c does not report $K8S_VERSION"; exit 1; }
    mv "$ASSETS/$c.tmp" "$ASSETS/$c"
    echo "$BUILD_RECIPE" >"$ASSETS/$c.recipe"
  done
fi
cd /
rm -rf "$WORK"
log "done: $ASSETS"
echo "$ASSETS"
