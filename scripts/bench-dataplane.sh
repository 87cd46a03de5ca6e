#!/usr/bin/env bash
# Data-plane benchmark (root): pod-to-pod TCP throughput (1 and 4 streams) and ping RTT for
# direct routing, kernel VXLAN programmed by hand (Flannel's layout), mesh's vxlan and udp
# backends and a naive one-syscall-per-packet TUN forwarder, interleaved, in one run on
# the same machine; prints a table with ratios and the userspace forwarders' CPU use.
#
#   sudo scripts/bench-dataplane.sh [ITERATIONS] [SECONDS]     (default 3 x 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-dataplane.sh needs root (network namespaces)" >&2; exit 1; }
command -v iperf3 >/dev/null || { echo "missing iperf3: apt-get install iperf3" >&2; exit 1; }
cargo build --release -q --workspace --bins
cargo build --release -q -p mesh-testbed --example dataplane_bench --example naive_forwarder
MESH_BIN_DIR="$PWD/target/release" exec target/release/examples/dataplane_bench "${1:-3}" "${2:-5}"
