#!/usr/bin/env bash
# Quickstart: build, start three mesh agents on 127.0.0.1 (control plane only, no root),
# show the mesh as node-1 sees it, then stop them. Pass --keep to leave them running.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep" ] && keep=true

cargo build --release -q -p mesh-agent --bins
bin=target/release
work=$(mktemp -d /tmp/mesh-quickstart.XXXXXX)
head -c 32 /dev/urandom | base64 > "$work/secret"
pids=()
cleanup() {
  if ! $keep; then
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
  fi
}
trap cleanup EXIT

for i in 1 2 3; do
  "$bin/mesh-agent" --node-name "node-$i" --listen "127.0.0.1:1678$i" \
    --peers 127.0.0.1:16781,127.0.0.1:16782 --secret-file "$work/secret" \
    --state-dir "$work/state-$i" --socket "$work/node-$i.sock" \
    --metrics-addr "127.0.0.1:1679$i" --dataplane none 2>"$work/node-$i.log" &
  pids+=($!)
done

for _ in $(seq 1 50); do
  if "$bin/meshctl" --socket "$work/node-1.sock" status peers -o json 2>/dev/null | grep -c '"state": "alive"' | grep -q '^3$'; then
    break
  fi
  sleep 0.2
done

echo "== meshctl status (node-1)"; "$bin/meshctl" --socket "$work/node-1.sock" status
echo; echo "== meshctl status peers (node-1)"; "$bin/meshctl" --socket "$work/node-1.sock" status peers
echo; echo "== meshctl status connections (node-1)"; "$bin/meshctl" --socket "$work/node-1.sock" status connections
if $keep; then
  echo; echo "agents left running (pids ${pids[*]}); sockets and logs in $work"
  echo "try: $bin/meshctl --socket $work/node-2.sock status peers --dot"
fi
