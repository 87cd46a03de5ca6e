#!/usr/bin/env bash
# IPAM benchmark: time to first allocation on fresh 3- and 10-node clusters, and local API
# allocation latency. Agents run on 127.0.0.1 with --dataplane none (no root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p mesh-agent --bins --examples
exec target/release/examples/ipam_bench target/release/mesh-agent "${1:-1000}"
