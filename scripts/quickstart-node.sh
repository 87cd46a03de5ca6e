#!/usr/bin/env bash
# One node in a network namespace with a real mesh-agent, pods attached through the real
# mesh-cni, `meshctl status` and a connectivity matrix; removes everything at the end.
# Root, on Debian/Ubuntu (installs what it needs).
#
#   sudo scripts/quickstart-node.sh [PODS]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "quickstart-node.sh needs root (network namespaces, veth, bridges)" >&2; exit 1; }
scripts/install-deps.sh
cargo build --release -q --workspace --bins
cargo build --release -q -p mesh-testbed --example node_demo
MESH_BIN_DIR="$PWD/target/release" exec target/release/examples/node_demo "${1:-3}"
