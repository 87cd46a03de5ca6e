#!/usr/bin/env bash
# Benchmark of mesh as a DaemonSet on the testbed's Kubernetes cluster (root): apply -> all
# nodes Ready, pod startup p50/p99 with mesh vs the reference bridge + host-local conflist on
# the same cluster, the agents' RSS, the stream gap across a rolling restart. Prints markdown
# rows for docs/benchmarks.md.
#
#   sudo scripts/bench-kube.sh [--pods 30] [--workers 2] [--backend vxlan|udp]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-kube.sh needs root: sudo $0 $*" >&2; exit 1; }
scripts/install-deps.sh >/dev/null
scripts/kube-apiserver.sh build
scripts/build-image.sh
cargo build -q --workspace --bins --profile test --locked
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(date -u +%Y-%m-%d)"
exec cargo run -q --profile test --locked -p mesh-testbed --example kube_bench -- "$@"
