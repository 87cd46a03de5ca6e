#!/usr/bin/env bash
# mesh on kind, end to end: cluster without CNI, image built and loaded, deploy/ applied,
# every node Ready with NetworkUnavailable=False, then a pod on each node pinging the others.
# Needs docker (or podman with KIND_EXPERIMENTAL_PROVIDER=podman), kind >= 0.20 and kubectl.
#
#   testbed/kind/run.sh          # create, deploy, verify (leaves the cluster running)
#   testbed/kind/run.sh --down   # delete the cluster
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=mesh
IMAGE=localhost/mesh:0.1.0
ENGINE=${ENGINE:-docker}

if [ "${1:-}" = "--down" ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
for tool in kind kubectl "$ENGINE"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

step "cluster $CLUSTER (3 nodes, no CNI)"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" \
  || kind create cluster --name "$CLUSTER" --config testbed/kind/kind-config.yaml
kubectl config use-context "kind-$CLUSTER" >/dev/null

step "image $IMAGE"
"$ENGINE" build -f deploy/Containerfile -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "deploy/ (kustomize, with a fresh cluster secret if none exists)"
[ -s deploy/cluster-secret ] || head -c 32 /dev/urandom | base64 > deploy/cluster-secret
kubectl apply -k deploy/
kubectl -n mesh-system rollout status ds/mesh --timeout=180s

step "every node Ready, NetworkUnavailable=False (MeshIsUp)"
kubectl wait --for=condition=Ready nodes --all --timeout=180s
kubectl get nodes -o custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,NET:.status.conditions[?(@.type=="NetworkUnavailable")].reason,MESH:.metadata.annotations.mesh\.dev/address'
bad=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="NetworkUnavailable")].status}{"\n"}{end}' | grep -v '=False$' || true)
[ -z "$bad" ] || { echo "NetworkUnavailable not False on: $bad" >&2; exit 1; }

step "meshctl status from one node"
kubectl -n mesh-system exec ds/mesh -- meshctl status
kubectl -n mesh-system exec ds/mesh -- meshctl status peers
kubectl -n mesh-system exec ds/mesh -- meshctl status ipam

step "a pod per node, each pings every other"
for node in $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}'); do
  kubectl run "ping-$node" --image=busybox:1.36 --restart=Never \
    --overrides="{\"spec\":{\"nodeName\":\"$node\",\"tolerations\":[{\"operator\":\"Exists\"}]}}" \
    --command -- sleep 3600 >/dev/null 2>&1 || true
done
kubectl wait --for=condition=Ready pod -l run --timeout=120s
failed=0
pods=$(kubectl get pods -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP}{"\n"}{end}' | grep '^ping-')
for from in $pods; do
  for to in $pods; do
    [ "$from" = "$to" ] && continue
    if kubectl exec "${from%%=*}" -- ping -c 1 -W 2 "${to#*=}" >/dev/null 2>&1; then r=ok; else r=FAIL; failed=1; fi
    printf '%-32s -> %-15s %s\n' "${from%%=*}" "${to#*=}" "$r"
  done
done
[ $failed -eq 0 ] && echo "all pods reach each other: mesh works on kind" || { echo "some pings failed" >&2; exit 1; }
