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

# System packages: a C compiler for ring, pkg-config; iproute2/iperf3 for the network tests.
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (run as root, or: sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
echo "dependencies present"
