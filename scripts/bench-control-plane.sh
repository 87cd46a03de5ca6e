#!/usr/bin/env bash
# Control-plane benchmark: N mesh-agent processes on loopback (default 50).
# Prints a Markdown row for docs/benchmarks.md. Needs no root; sends traffic only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
agents="${1:-50}"
cargo build --release -q -p mesh-agent --bins --examples
exec target/release/examples/control_plane_bench target/release/mesh-agent "$agents"
