#!/usr/bin/env bash
# The one command that runs every test of the project (.ci/run calls exactly this).
#
#   scripts/test-all.sh
#
# - formatting and lints (cargo fmt --check, cargo clippy -D warnings)
# - unit and property tests of every crate
# - the deterministic simulator campaign (MESH_SIM_SEEDS seeds, default 1000, 50 nodes, 10% loss)
# - integration tests that run real mesh-agent processes on 127.0.0.1 (no root needed)
# - end-to-end tests in network namespaces (root): mesh-agent + the real mesh-cni binary,
#   chained with the reference portmap/bandwidth plugins, and driven by containerd
# - a real Kubernetes 1.20.2 cluster (kubelet, containerd, kube-proxy per node) running mesh
#   as its DaemonSet from images built by scripts/build-image.sh (root)
#
# Tests that need root and network namespaces skip with a loud message when run
# unprivileged, and fail instead when MESH_E2E=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries the end-to-end tests execute (test profile, so cargo test reuses them)"
cargo build --workspace --bins --profile test --locked

step "container images for the Kubernetes testbed (static release build; root only)"
if [ "$(id -u)" -eq 0 ]; then
  scripts/build-image.sh
else
  echo "not root: skipped (the Kubernetes e2e suite skips too, or fails under MESH_E2E=1)"
fi

step "cargo test (unit, property, simulator campaign, agents on loopback, end-to-end in namespaces)"
cargo test --workspace --locked
