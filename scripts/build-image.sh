#!/usr/bin/env bash
# Builds mesh's container images as OCI archives, without Docker or a registry:
#
#   scripts/build-image.sh [--tag TAG] [--out DIR] [--no-build]
#
#   DIR/mesh-TAG.oci.tar        localhost/mesh:TAG         what deploy/Containerfile builds: a
#                                                          Debian bookworm rootfs with iptables and nft
#                                                          (made by mmdebstrap) + mesh-agent,
#                                                          meshctl, mesh-cni in /usr/local/bin;
#                                                          entrypoint mesh-agent
#   DIR/mesh-probe-TAG.oci.tar  localhost/mesh-probe:TAG   the testbed cluster's workload: Debian's
#                                                          static busybox + mesh-probe
#   DIR/pause-3.2.oci.tar       k8s.gcr.io/pause:3.2       the sandbox image, Kubernetes' own
#                                                          pause.c (built by kube-apiserver.sh)
#
# TAG defaults to deploy/kustomization.yaml's newTag; DIR to target/images. Load an archive into
# a containerd with `ctr -n k8s.io images import DIR/mesh-TAG.oci.tar` (the name travels in it).
#
# The binaries are a release build linked statically against glibc (`+crt-static`; this
# machine has no musl target): the init container copies mesh-cni to the host, where it must
# run without the image's libraries. --no-build takes what target/<host>/release already has.
#
# Tools, all Debian's: mmdebstrap (the rootfs; cached in $MESH_IMAGE_CACHE, default
# /var/cache/mesh-image, keyed by the package list), umoci (OCI layout: one layer per rootfs
# and per binary set) and skopeo (layout -> oci-archive with the image name).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-image.sh: $*" >&2; exit 1; }

TAG=$(sed -n 's/^ *newTag: *//p' deploy/kustomization.yaml | head -n1)
OUT=target/images
BUILD=1
while (($#)); do
  case "$1" in
    --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) sed -n '2,27p' "$0" >&2; exit 2 ;;
  esac
done
[ -n "$TAG" ] || die "no tag: pass --tag (deploy/kustomization.yaml has no newTag)"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag $TAG is not a valid image tag"
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap builds the rootfs in a chroot; umoci keeps file owners)"

CACHE=${MESH_IMAGE_CACHE:-/var/cache/mesh-image}
KUBE_BIN=${MESH_KUBE_CACHE:-/var/cache/mesh-kube}/bin
SUITE=bookworm
PACKAGES=iptables,nftables
HOST=$(rustc -vV | sed -n 's/^host: //p')
REL=target/$HOST/release
ARCH=$(dpkg --print-architecture)   # the OCI name of this machine's architecture (amd64, arm64)

need=()
for t in mmdebstrap:mmdebstrap umoci:umoci skopeo:skopeo busybox:busybox-static; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; }
fi
is_static() { { ldd "$1" 2>&1 || true; } | grep -qE 'not a dynamic|statically linked'; }
# Static busybox: the package of that name (Debian's `busybox` is dynamic).
BUSYBOX=/bin/busybox
is_static "$BUSYBOX" || die "$BUSYBOX is not static: apt-get install busybox-static"

t0=$SECONDS
if [ $BUILD = 1 ]; then
  echo "==> release build, statically linked (+crt-static, $HOST)"
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$HOST" -p mesh-agent -p mesh-cni -p mesh-testbed --bins
fi
for b in mesh-agent meshctl mesh-cni mesh-probe; do
  [ -x "$REL/$b" ] || die "$REL/$b is missing (run without --no-build)"
  is_static "$REL/$b" || die "$REL/$b is not statically linked"
done
[ -x "$KUBE_BIN/pause" ] || die "no $KUBE_BIN/pause: run scripts/kube-apiserver.sh build first"

mkdir -p "$CACHE" "$OUT"
# The rootfs, once per suite + package list. essential = Debian's Essential set + what
# --include pulls in; maintainer scripts run, so iptables' alternatives point at iptables-nft
# (like current kube-proxy).
key=$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
rootfs=$CACHE/rootfs-$SUITE-$key.tar
if [ ! -s "$rootfs" ]; then
  echo "==> Debian $SUITE rootfs with $PACKAGES (mmdebstrap, cached in $CACHE)"
  mmdebstrap --quiet --format=tar --variant=essential --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$rootfs.tmp" || { rm -f "$rootfs.tmp"; die "mmdebstrap failed (is deb.debian.org reachable?)"; }
  mv "$rootfs.tmp" "$rootfs"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# oci_archive NAME:TAG OUT ENTRYPOINT... : the layers staged in $work/layer-* (in order) as one
# image. umoci writes the layout, skopeo the archive.
oci_archive() {
  local ref=$1 out=$2; shift 2
  local layout=$work/layout-$$-$RANDOM dir args=()
  umoci init --layout "$layout"
  umoci new --image "$layout:build"
  for dir in "$work"/layer-*; do
    umoci insert --image "$layout:build" "$dir" /
    rm -rf "$dir"
  done
  for a in "$@"; do args+=(--config.entrypoint "$a"); done
  umoci config --image "$layout:build" "${args[@]}" --config.workingdir / \
    --os linux --architecture "$ARCH" --author mesh --created "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  umoci gc --layout "$layout"
  rm -f "$out.tmp"
  skopeo copy --quiet "oci:$layout:build" "oci-archive:$out.tmp:$ref"
  mv "$out.tmp" "$out"
  rm -rf "$layout"
  echo "    $ref -> $out ($(du -h "$out" | cut -f1))"
}

echo "==> localhost/mesh:$TAG"
mkdir -p "$work/layer-1" "$work/layer-2/usr/local/bin"
tar -xf "$rootfs" -C "$work/layer-1"
install -m 0755 "$REL/mesh-agent" "$REL/meshctl" "$REL/mesh-cni" "$work/layer-2/usr/local/bin/"
oci_archive "localhost/mesh:$TAG" "$OUT/mesh-$TAG.oci.tar" /usr/local/bin/mesh-agent

echo "==> localhost/mesh-probe:$TAG"
mkdir -p "$work/layer-1/bin" "$work/layer-1/tmp" "$work/layer-1/etc" "$work/layer-1/usr/local/bin"
chmod 1777 "$work/layer-1/tmp"
install -m 0755 "$BUSYBOX" "$work/layer-1/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$work/layer-1/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$work/layer-1/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$work/layer-1/etc/group"
install -m 0755 "$REL/mesh-probe" "$work/layer-1/usr/local/bin/mesh-probe"
oci_archive "localhost/mesh-probe:$TAG" "$OUT/mesh-probe-$TAG.oci.tar" /usr/local/bin/mesh-probe serve

echo "==> k8s.gcr.io/pause:3.2"
mkdir -p "$work/layer-1"
install -m 0755 "$KUBE_BIN/pause" "$work/layer-1/pause"
oci_archive "k8s.gcr.io/pause:3.2" "$OUT/pause-3.2.oci.tar" /pause

echo "images in $OUT ($((SECONDS - t0)) s)"
