#!/usr/bin/env bash
# Real Kubernetes 1.20.2 binaries for mesh's tests and testbed cluster, built from Debian's own
# `kubernetes` source package (no registry this project can use ships them): kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, plus Debian's kubectl 1.20.2.
#
#   scripts/kube-apiserver.sh build            # once: ~6-7 min cold on 2 cores, then instant
#   scripts/kube-apiserver.sh start DIR [PORT [ADDRESS]]  # etcd + kube-apiserver; DIR/kubeconfig
#   scripts/kube-apiserver.sh run DIR [PORT [ADDRESS]]    # the same in the foreground (tests)
#   scripts/kube-apiserver.sh stop DIR          # stops what `start DIR` started (by PID)
#   scripts/kube-apiserver.sh kubectl [ARGS]    # the matching kubectl (Debian's 1.20.2)
#   scripts/kube-apiserver.sh path              # prints the cache directory
#
# build: installs golang-go/etcd/rsync/make/jq, adds a deb-src entry *only for the duration of
# the download* (the file is removed again, also on failure), unpacks kubernetes 1.20.2 (the
# whole upstream tree with vendor/) and runs upstream's `make WHAT="cmd/kube-apiserver …"` offline
# (GOPROXY=off, GOPATH mode as debian/rules does). Binaries are cached outside the work tree in
# $MESH_KUBE_CACHE (default /var/cache/mesh-kube), so later runs reuse them; the source tree
# and Go cache are deleted after a successful build (2.5 GB + 1.1 GB).
#
# start/run: etcd on 127.0.0.1:PORT+1 (client) / PORT+2 (peer) and kube-apiserver on
# ADDRESS:PORT (default 127.0.0.1:16443; tests bind it inside their own namespace), static token auth (user admin in system:masters) plus a
# second token for an unprivileged user (`mesh-tester`, no RBAC rights unless granted), RBAC
# authorization, a self-signed serving cert. Writes DIR/kubeconfig (admin),
# DIR/kubeconfig-unprivileged and logs; `start` returns once /readyz answers ok.
set -euo pipefail

CACHE=${MESH_KUBE_CACHE:-/var/cache/mesh-kube}
VERSION=1.20.2
BIN=$CACHE/bin
# What the cached binaries are; a cache without this stamp (or another one) is rebuilt.
COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
STAMP="$COMPONENTS v$VERSION + reflect2 1.0.2 + json-iterator 1.1.12"
SRC_LIST=/etc/apt/sources.list.d/mesh-kube-deb-src.sources

die() { echo "kube-apiserver.sh: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root (apt-get and a cache in $CACHE)"; }

install_packages() {
  local need=()
  command -v go >/dev/null 2>&1 || need+=(golang-go)
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v make >/dev/null 2>&1 || need+=(make)
  command -v jq >/dev/null 2>&1 || need+=(jq)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
  [ -d /usr/share/gocode/src/github.com/json-iterator/go ] || need+=(golang-github-json-iterator-go-dev)
  if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; }
  fi
}

remove_deb_src() {
  if [ -f "$SRC_LIST" ]; then
    rm -f "$SRC_LIST"
    apt-get update -qq || true
  fi
}

cmd_build() {
  need_root build
  local c go_cached=1 pause_cached=0
  for c in $COMPONENTS kubectl; do [ -x "$BIN/$c" ] || go_cached=0; done
  [ "$(cat "$BIN/BUILD" 2>/dev/null)" = "$STAMP" ] || go_cached=0
  [ -x "$BIN/pause" ] && pause_cached=1
  if [ $go_cached = 1 ] && [ $pause_cached = 1 ]; then
    echo "Kubernetes v$VERSION ($COMPONENTS, kubectl, pause) cached in $BIN"
    return
  fi
  install_packages
  local t0=$SECONDS work=$CACHE/build
  rm -rf "$work" && mkdir -p "$work" "$BIN"

  # The source package: a deb-src entry only while apt downloads it.
  trap remove_deb_src EXIT
  cat > "$SRC_LIST" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq
  (cd "$work" && apt-get source --download-only -qq kubernetes 2>&1 | grep -v 'unsandboxed' || true)
  remove_deb_src
  trap - EXIT
  local orig
  orig=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -n1) || true
  [ -n "$orig" ] || die "apt-get source kubernetes downloaded nothing (is deb.debian.org reachable?)"
  tar xzf "$orig" -C "$work"
  local tree
  tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$tree" ] || die "no kubernetes-* tree in $orig"

  # The sandbox ("pause") image's binary, from the same tree (build/pause/linux/pause.c), static
  # like upstream's; scripts/build-image.sh wraps it as k8s.gcr.io/pause:3.2.
  if [ $pause_cached = 0 ]; then
    gcc -Os -static -s -DVERSION=3.2-mesh -o "$BIN/pause" "$tree/build/pause/linux/pause.c" \
      || die "building pause from $tree/build/pause/linux/pause.c failed (needs gcc + libc6-dev)"
  fi
  if [ $go_cached = 1 ]; then
    rm -rf "$work"
    echo "pause built; Kubernetes v$VERSION was already cached in $BIN"
    return
  fi

  # Kubernetes 1.20 vendors reflect2 1.0.1 / json-iterator 1.1.10, which crash under Go >= 1.18
  # (nil dereference in reflect2.Type2 while decoding maps: kubectl apply fails with
  # INTERNAL_ERROR at random). Upstream fixed it by moving to reflect2 1.0.2 + json-iterator
  # 1.1.12; take exactly those from Debian's packages.
  rsync -a --delete /usr/share/gocode/src/github.com/modern-go/reflect2/ "$tree/vendor/github.com/modern-go/reflect2/"
  rsync -a --delete /usr/share/gocode/src/github.com/json-iterator/go/ "$tree/vendor/github.com/json-iterator/go/"
  local what=""
  for c in $COMPONENTS; do what="$what cmd/$c"; done
  echo "building $COMPONENTS v$VERSION from $(basename "$orig") (cold: ~6-7 min on 2 cores)"
  (
    cd "$tree"
    # CGO off: static binaries, and kubelet/kube-proxy need nothing from the host's libc.
    export GOPATH=$PWD/.go GOPROXY=off GOFLAGS= GOCACHE=$work/gocache CGO_ENABLED=0 HOME=$work/gohome
    mkdir -p "$HOME"
    make WHAT="${what# }" KUBE_GIT_VERSION=v$VERSION GOLDFLAGS="-s -w" >"$work/make.log" 2>&1 \
      || { tail -n 40 "$work/make.log" >&2; exit 1; }
  ) || die "make WHAT=\"$what\" failed (log: $work/make.log)"
  for c in $COMPONENTS; do install -m 0755 "$tree/_output/bin/$c" "$BIN/$c"; done

  # kubectl of the same version: Debian's binary package (kubectl only), unpacked, not installed
  # (it would clash with another kubectl in /usr/bin).
  (cd "$work" && apt-get download -qq kubernetes-client)
  dpkg-deb -x "$work"/kubernetes-client_*.deb "$work/kubectl"
  install -m 0755 "$work/kubectl/usr/bin/kubectl" "$BIN/kubectl"

  echo "$STAMP" > "$BIN/BUILD"
  rm -rf "$work"
  echo "built in $((SECONDS - t0)) s; cached in $BIN ($(du -sh "$BIN" | cut -f1))"
}

# Foreground: etcd + kube-apiserver as children that die with this shell (PR_SET_PDEATHSIG via
# setpriv, so even a SIGKILL of the test that started us leaves nothing running); TERM/INT
# stops both. Writes DIR/ready once /readyz answers.
cmd_run() {
  local dir=${1:?usage: run DIR [PORT] [ADDRESS]} port=${2:-16443} address=${3:-127.0.0.1}
  [ -x "$BIN/kube-apiserver" ] || die "no kube-apiserver in $BIN: run '$0 build' first"
  command -v etcd >/dev/null 2>&1 || die "etcd missing: run '$0 build' (installs etcd-server)"
  mkdir -p "$dir/etcd" "$dir/certs"
  dir=$(cd "$dir" && pwd)
  rm -f "$dir/ready"
  local etcd_client=$((port + 1)) etcd_peer=$((port + 2))
  etcd_pid='' kas_pid='' run_dir=$dir
  trap 'stop_children; exit 0' TERM INT
  trap stop_children EXIT

  setpriv --pdeathsig KILL -- etcd --name mesh-test --data-dir "$dir/etcd/data" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "mesh-test=http://127.0.0.1:$etcd_peer" >"$dir/etcd.log" 2>&1 &
  etcd_pid=$!

  [ -f "$dir/sa.key" ] || openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  local admin_token tester_token
  admin_token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  tester_token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s,admin,admin-uid,system:masters\n%s,mesh-tester,mesh-tester-uid\n' \
    "$admin_token" "$tester_token" > "$dir/tokens.csv"
  chmod 600 "$dir/tokens.csv" "$dir/sa.key"

  local i=0
  until etcdctl --endpoints="http://127.0.0.1:$etcd_client" endpoint health >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 100 ] || ! kill -0 "$etcd_pid" 2>/dev/null; then
      tail -n 20 "$dir/etcd.log" >&2; die "etcd not healthy"
    fi
    sleep 0.2
  done

  setpriv --pdeathsig KILL -- "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_client" \
    --bind-address="$address" --secure-port="$port" --advertise-address="$address" \
    --cert-dir="$dir/certs" --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --endpoint-reconciler-type=none \
    --disable-admission-plugins=ServiceAccount --allow-privileged=true >"$dir/kube-apiserver.log" 2>&1 &
  kas_pid=$!

  local who file
  for who in admin:"$admin_token" mesh-tester:"$tester_token"; do
    file=$dir/kubeconfig
    [ "${who%%:*}" = admin ] || file=$dir/kubeconfig-unprivileged
    cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://$address:$port", insecure-skip-tls-verify: true}}]
users: [{name: ${who%%:*}, user: {token: ${who#*:}}}]
contexts: [{name: local, context: {cluster: local, user: ${who%%:*}, namespace: default}}]
current-context: local
EOF
    chmod 600 "$file"
  done

  i=0
  until curl -sfk -H "Authorization: Bearer $admin_token" "https://$address:$port/readyz" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 240 ] || ! kill -0 "$kas_pid" 2>/dev/null; then
      tail -n 30 "$dir/kube-apiserver.log" >&2; die "kube-apiserver not ready"
    fi
    sleep 0.25
  done
  echo "kube-apiserver v$VERSION ready on https://$address:$port; KUBECONFIG=$dir/kubeconfig"
  touch "$dir/ready"
  # Until stopped, or until either child ends (then the other is stopped too).
  wait -n "$etcd_pid" "$kas_pid" || true
  echo "kube-apiserver.sh: etcd or kube-apiserver ended; stopping" >&2
}

stop_children() {
  local pid
  for pid in ${kas_pid:-} ${etcd_pid:-}; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -f "${run_dir:-/nonexistent}/ready"
}

# Background: `run` detached (own session), returns once ready; DIR/pid for `stop`.
cmd_start() {
  local dir=${1:?usage: start DIR [PORT] [ADDRESS]}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  shift
  rm -f "$dir/ready"
  setsid "$0" run "$dir" "$@" >"$dir/run.log" 2>&1 < /dev/null &
  echo "$!" > "$dir/pid"
  local i=0
  until [ -f "$dir/ready" ]; do
    i=$((i + 1))
    if [ $i -ge 400 ] || ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      cat "$dir/run.log" >&2; cmd_stop "$dir"; die "did not become ready"
    fi
    sleep 0.1
  done
  cat "$dir/run.log"
}

cmd_stop() {
  local dir=${1:?usage: stop DIR}
  [ -f "$dir/pid" ] || return 0
  local pid
  pid=$(cat "$dir/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "${1:-}" in
  build) cmd_build ;;
  run) shift; cmd_run "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  kubectl) shift; exec "$BIN/kubectl" "$@" ;;
  path) echo "$CACHE" ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
