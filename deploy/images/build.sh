#!/usr/bin/env bash
# Builds the stack's container images with buildah, FROM scratch, without any registry: each
# image holds one binary of this repository, the shared libraries `ldd` lists for it, and an
# /etc/passwd naming the user it runs as (uid/gid 65532, non-root).
#
# Usage: deploy/images/build.sh [flags]
#   --profile debug|release   cargo profile whose binaries are packed ($PROFILE, default release)
#   --target-dir DIR          cargo target dir ($CARGO_TARGET_DIR, default <repo>/target)
#   --build                   run `cargo build --profile ... -p <crates>` first (default: use
#                             the binaries already built, failing if one is missing)
#   --prefix P                image name prefix ($CCM_IMAGE_PREFIX, default ccm/)
#   --tag T                   image tag ($CCM_IMAGE_TAG, default dev): images are P<binary>:T
#   --only a,b                build only these binaries (default: all; see BINARIES below)
#   --containerd-address SOCK import each image into that containerd's k8s.io namespace
#                             (ctr --address SOCK -n k8s.io images import), as a kubelet's
#                             image docker.io/P<binary>:T (what `image: P<binary>:T` means)
#   --archive-dir DIR         write DIR/<binary>.tar, docker-archive (ctr import, podman load)
#   --oci-dir DIR             write DIR/<binary>.oci.tar, OCI archive
#   --push REGISTRY           push each image to REGISTRY/P<binary>:T with skopeo;
#                             $CCM_REGISTRY_CREDS (user:password) if set, and
#                             --push-tls-verify=false for a plain-HTTP local registry
#   --no-check                skip the self-check
# The images are always in buildah's local storage too (buildah images).
#
# Self-check (default on): every image is mounted and its binary run with --help in a chroot as
# uid 65532, with nothing but the image's files: a missing library or loader fails the build.
#
# credential-provider is built only when <target-dir>/<profile>/credential-provider exists;
# otherwise the script says it is skipped and why (it is a host binary, another crate).
set -euo pipefail

BINARIES=(cloud-controller-manager local-shim cloud-provider-webhook ccm-certgen credential-provider)
# The cargo package of each binary (for --build).
declare -A PACKAGE=(
  [cloud-controller-manager]=cloud-controller-manager
  [local-shim]=local-shim
  [cloud-provider-webhook]=cloud-provider-webhook
  [ccm-certgen]=ccm-certgen
  [credential-provider]=credential-provider
)

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
profile=${PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
prefix=${CCM_IMAGE_PREFIX:-ccm/}
tag=${CCM_IMAGE_TAG:-dev}
only=""
containerd=""
archive_dir=""
oci_dir=""
push=""
push_tls_verify=true
check=true
build=false

die() { echo "build.sh: $*" >&2; exit 1; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --profile) need_value "$@"; profile=$2; shift 2 ;;
    --target-dir) need_value "$@"; target_dir=$2; shift 2 ;;
    --build) build=true; shift ;;
    --prefix) need_value "$@"; prefix=$2; shift 2 ;;
    --tag) need_value "$@"; tag=$2; shift 2 ;;
    --only) need_value "$@"; only=$2; shift 2 ;;
    --containerd-address) need_value "$@"; containerd=$2; shift 2 ;;
    --archive-dir) need_value "$@"; archive_dir=$2; shift 2 ;;
    --oci-dir) need_value "$@"; oci_dir=$2; shift 2 ;;
    --push) need_value "$@"; push=$2; shift 2 ;;
    --push-tls-verify=*) push_tls_verify=${1#*=}; shift ;;
    --no-check) check=false; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
done
case $profile in debug|release) ;; *) die "--profile must be debug or release, not $profile" ;; esac
command -v buildah >/dev/null || die "buildah is missing: apt-get install buildah (Debian)"
[[ -z $containerd ]] || command -v ctr >/dev/null || die "ctr is missing: apt-get install containerd"
[[ -z $push ]] || command -v skopeo >/dev/null || die "skopeo is missing: apt-get install skopeo"

selected=("${BINARIES[@]}")
if [[ -n $only ]]; then
  IFS=, read -r -a selected <<<"$only"
  for b in "${selected[@]}"; do
    [[ -n ${PACKAGE[$b]:-} ]] || die "--only: unknown binary $b (known: ${BINARIES[*]})"
  done
fi

bin_dir=$target_dir/$profile
if $build; then
  packages=()
  for b in "${selected[@]}"; do
    [[ $b == credential-provider ]] || packages+=(-p "${PACKAGE[$b]}")
  done
  cargo_profile=$profile; [[ $profile == debug ]] && cargo_profile=dev
  (cd "$repo" && CARGO_TARGET_DIR=$target_dir cargo build --profile "$cargo_profile" "${packages[@]}")
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies $1 and every library ldd lists for it (with the loader) into the root $2, keeping
# their paths; symlinks are resolved so the image holds files, not dangling links.
stage_binary() {
  local binary=$1 root=$2 lib
  install -D -m 0755 "$binary" "$root/usr/local/bin/$(basename "$binary")"
  if command -v strip >/dev/null; then strip --strip-unneeded "$root/usr/local/bin/$(basename "$binary")"; fi
  while read -r lib; do
    [[ -n $lib ]] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$binary" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}')
  mkdir -p "$root/etc"
  echo "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin" >"$root/etc/passwd"
  echo "nonroot:x:65532:" >"$root/etc/group"
}

# Runs the image's binary with --help in a chroot of the image's files, as uid 65532.
self_check() {
  local image=$1 binary=$2 container mnt out
  container=$(buildah from --pull-never "$image")
  mnt=$(buildah mount "$container")
  if ! out=$(chroot --userspec=65532:65532 "$mnt" "/usr/local/bin/$binary" --help 2>&1); then
    buildah umount "$container" >/dev/null; buildah rm "$container" >/dev/null
    die "self-check: $image: /usr/local/bin/$binary --help failed in the image:
$out"
  fi
  buildah umount "$container" >/dev/null
  buildah rm "$container" >/dev/null
  echo "self-check: $image runs ($(head -n1 <<<"$out"))"
}

built=()
for b in "${selected[@]}"; do
  binary=$bin_dir/$b
  if [[ ! -x $binary ]]; then
    if [[ $b == credential-provider && -z $only ]]; then
      echo "build.sh: skipping credential-provider: $binary is not built (cargo build -p credential-provider, then run this again)" >&2
      continue
    fi
    die "$binary is not built: cargo build$([[ $profile == release ]] && echo ' --release') -p ${PACKAGE[$b]} (or pass --build)"
  fi
  image=$prefix$b:$tag
  ctx=$work/$b
  stage_binary "$binary" "$ctx/rootfs"
  buildah bud --quiet --pull-never --layers=false -f "$here/$b.Containerfile" -t "$image" "$ctx" >/dev/null
  size=$(du -sh "$ctx/rootfs" | cut -f1)
  echo "built $image ($size)"
  $check && self_check "$image" "$b"
  if [[ -n $containerd ]]; then
    buildah push --quiet "$image" "docker-archive:$work/$b.tar:$image" >/dev/null
    ctr --address "$containerd" -n k8s.io images import "$work/$b.tar" >/dev/null
    echo "imported $image into $containerd (namespace k8s.io)"
  fi
  if [[ -n $archive_dir ]]; then
    mkdir -p "$archive_dir"
    buildah push --quiet "$image" "docker-archive:$archive_dir/$b.tar:$image" >/dev/null
    echo "wrote $archive_dir/$b.tar"
  fi
  if [[ -n $oci_dir ]]; then
    mkdir -p "$oci_dir"
    buildah push --quiet "$image" "oci-archive:$oci_dir/$b.oci.tar:$image" >/dev/null
    echo "wrote $oci_dir/$b.oci.tar"
  fi
  if [[ -n $push ]]; then
    creds=()
    [[ -z ${CCM_REGISTRY_CREDS:-} ]] || creds=(--dest-creds "$CCM_REGISTRY_CREDS")
    skopeo copy --quiet --dest-tls-verify="$push_tls_verify" "${creds[@]}" \
      "containers-storage:localhost/$image" "docker://$push/$image"
    echo "pushed $push/$image"
  fi
  built+=("$image")
done
echo "images: ${built[*]}"
