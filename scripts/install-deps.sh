#!/usr/bin/env bash
# Installs what building and testing mesh needs on a fresh Debian/Ubuntu machine, or says
# exactly what is missing. Safe to run twice.
set -euo pipefail

missing=()
command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust toolchain >= 1.90, e.g. via rustup)")
if ((${#missing[@]})); then
  printf 'missing and not installable from Debian packages here: %s\n' "${missing[@]}" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    echo "missing Rust component: $component (rustup component add $component)" >&2
    exit 1
  fi
done

# System packages: a C compiler for ring, pkg-config; the network tools the end-to-end tests use.
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
# nft: each agent keeps its overlay guard (who may send VXLAN) in an nftables table.
command -v nft >/dev/null 2>&1 || need+=(nftables)
# setpriv + sysctl: the kube test runs an agent with only the DaemonSet's capabilities.
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
# The reference CNI plugins (portmap, bandwidth, loopback) chained with mesh-cni in tests.
[ -x /usr/lib/cni/portmap ] || need+=(containernetworking-plugins)
# containerd + runc: the real CNI client of the end-to-end tests; protoc for the CRI client.
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
# mesh-testbed bench and scripts/bench-dataplane.sh.
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
# The Kubernetes testbed: kube-proxy needs conntrack; etcd for the control plane;
# scripts/build-image.sh makes the images with mmdebstrap, umoci, skopeo and a static busybox.
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
[ -x /bin/busybox ] && { ldd /bin/busybox 2>&1 || true; } | grep -q 'not a dynamic' || need+=(busybox-static)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (run as root, or: sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "dependencies present"
