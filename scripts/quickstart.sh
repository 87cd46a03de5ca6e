#!/usr/bin/env bash
# The main job, on a fresh Debian/Ubuntu machine, as root: install what is missing, build,
# bring up a 3-node mesh with 2 pods per node in network namespaces (real mesh-agents,
# pods attached through the real mesh-cni), print every node's `meshctl status` side by
# side and the connectivity matrix. The testbed stays up to play with; `--down` removes it
# at the end instead.
#
#   sudo scripts/quickstart.sh [--backend vxlan|udp|auto|mixed] [--nodes N] [--pods M] [--down]
#
# With --kubernetes: a real Kubernetes 1.20.2 cluster instead (a control-plane node and N
# workers, default 2, each with its own containerd, kubelet and kube-proxy), its binaries
# built from Debian's source package (~6-7 min once, cached), mesh's image built without
# Docker, mesh installed with `kubectl apply -k deploy/`; then the nodes, mesh's pods,
# `meshctl status` through `kubectl exec`, and the workload checks (pod to pod, ClusterIP,
# NodePort, hostPort).
#
#   sudo scripts/quickstart.sh --kubernetes [--backend vxlan|udp|auto] [--nodes N] [--down]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "quickstart.sh needs root (network namespaces, veth, bridges): sudo $0 $*" >&2; exit 1; }
backend=vxlan nodes= pods=2 teardown=no kubernetes=no
while (($#)); do
  case $1 in
    --backend) backend=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --pods) pods=$2; shift 2 ;;
    --down) teardown=yes; shift ;;
    --kubernetes) kubernetes=yes; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh
if [ "$kubernetes" = yes ]; then
  nodes=${nodes:-2}
  echo "==> Kubernetes 1.20.2 binaries (built once from Debian's source package, then cached)"
  scripts/kube-apiserver.sh build
  echo "==> images: localhost/mesh, localhost/mesh-probe, pause (static release build, no Docker)"
  scripts/build-image.sh
  tb=target/$(rustc -vV | sed -n 's/^host: //p')/release/mesh-testbed
  k() { echo "\$ kubectl $*"; "$tb" --name qsk kubectl -- "$@"; echo; }
  "$tb" --name qsk down >/dev/null
  echo "==> mesh-testbed up --kubernetes --nodes $nodes --backend $backend"
  "$tb" --name qsk up --kubernetes --nodes "$nodes" --backend "$backend"
  k get nodes -o wide
  k -n mesh-system get pods -o wide
  pod=$("$tb" --name qsk kubectl -- -n mesh-system get pods -l app.kubernetes.io/name=mesh -o jsonpath='{.items[0].metadata.name}')
  k -n mesh-system exec "$pod" -c agent -- meshctl status
  echo "==> mesh-testbed check (workloads through the Kubernetes API)"
  status=0
  "$tb" --name qsk check || status=$?
  if [ "$teardown" = yes ]; then
    "$tb" --name qsk down
  else
    echo
    echo "The cluster is still up. Try:"
    echo "  sudo $tb --name qsk kubectl -- get pods -A -o wide"
    echo "  sudo $tb --name qsk kubectl -- -n mesh-system rollout restart ds/mesh"
    echo "  sudo $tb --name qsk status                      # nodes, mesh pods, meshctl status of each"
    echo "  sudo $tb --name qsk exec w1 -- ip route         # a node's routes"
    echo "  sudo $tb --name qsk down                        # remove everything"
  fi
  exit $status
fi
nodes=${nodes:-3}
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
