#!/usr/bin/env bash
# CNI latency benchmark (root): mesh-cni through a real mesh-agent against the reference
# bridge + host-local plugins, executed the same way in the same node namespace, plus the
# bare process start (VERSION). Needs containernetworking-plugins (/usr/lib/cni).
#
#   scripts/bench-cni.sh [RUNS]      (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-cni.sh needs root (network namespaces)" >&2; exit 1; }
[ -x /usr/lib/cni/bridge ] || { echo "missing /usr/lib/cni/bridge: apt-get install containernetworking-plugins" >&2; exit 1; }
cargo build --release -q --workspace --bins
cargo build --release -q -p mesh-testbed --example cni_bench
MESH_BIN_DIR="$PWD/target/release" exec target/release/examples/cni_bench "${1:-50}"
