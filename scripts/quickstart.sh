#!/usr/bin/env bash
# The main job, on a fresh Debian/Ubuntu machine, as root: install what is missing, build,
# bring up a 3-node mesh with 2 pods per node in network namespaces (real mesh-agents,
# pods attached through the real mesh-cni), print every node's `meshctl status` side by
# side and the connectivity matrix. The testbed stays up to play with; `--down` removes it
# at the end instead.
#
#   sudo scripts/quickstart.sh [--backend vxlan|udp|auto|mixed] [--nodes N] [--pods M] [--down]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "quickstart.sh needs root (network namespaces, veth, bridges): sudo $0 $*" >&2; exit 1; }
backend=vxlan nodes=3 pods=2 teardown=no
while (($#)); do
  case $1 in
    --backend) backend=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --pods) pods=$2; shift 2 ;;
    --down) teardown=yes; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh
echo "==> building (release)"
cargo build --release -q --workspace --bins
tb=target/release/mesh-testbed
"$tb" --name qs down >/dev/null
echo "==> mesh-testbed up --nodes $nodes --pods $pods --backend $backend"
"$tb" --name qs up --nodes "$nodes" --pods "$pods" --backend "$backend"
echo "==> mesh-testbed status"
"$tb" --name qs status
echo "==> mesh-testbed check"
status=0
"$tb" --name qs check || status=$?
if [ "$teardown" = yes ]; then
  "$tb" --name qs down
else
  echo
  echo "The testbed is still up. Try:"
  echo "  sudo $tb --name qs exec n1 -- ip route        # a node's routes"
  echo "  sudo $tb --name qs exec n1p1 -- ping -c1 <ip>  # from a pod"
  echo "  sudo $tb --name qs chaos                       # faults, each followed by the check"
  echo "  sudo $tb --name qs bench                       # pod-to-pod throughput"
  echo "  sudo $tb --name qs down                        # remove everything"
fi
exit $status
