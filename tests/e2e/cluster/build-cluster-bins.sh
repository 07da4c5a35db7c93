#!/usr/bin/env bash
# Build (once) and cache the binaries of the e2e cluster under $E2E_CACHE, keyed by version:
#   k8s-$K8S_VERSION-set-$GO_SET/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy,kubectl}
#   etcd-$ETCD_VERSION-set-$GO_SET/bin/etcd
#   pause-1/bin/pause
# Kubernetes and etcd are built from the local module of tests/e2e/cluster/go-module.sh, with the
# monitoring stack's Go parts (build-monitoring-bins.sh), so they share compiled packages. A set
# whose stamp file exists is skipped: a second run is a no-op.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/go-module.sh"
mkdir -p "$E2E_CACHE"

build_k8s() {
  local dest="$K8S_DIR" stamp="$K8S_DIR/.built"
  [ -f "$stamp" ] && { echo "kubernetes $K8S_VERSION: cached in $dest"; return; }
  mkdir -p "$dest/bin"
  local ldflags cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitTreeState=clean"
  # One `go build` for the six: one action graph keeps both cores busy to the end, and a command
  # links while the next one's packages compile.
  echo "building ${cmds[*]} $K8S_VERSION"
  go_build -ldflags "$ldflags" -o "$dest/bin/" "${cmds[@]/#/k8s.io/kubernetes/cmd/}"
  [[ "$("$dest/bin/kubectl" version --client)" == *"$K8S_VERSION"* ]]
  touch "$stamp"
}

build_etcd() {
  local dest="$ETCD_DIR" stamp="$ETCD_DIR/.built"
  [ -f "$stamp" ] && { echo "etcd $ETCD_VERSION: cached in $dest"; return; }
  mkdir -p "$dest/bin"
  echo "building etcd $ETCD_VERSION"
  go_build -ldflags "-s -w" -o "$dest/bin/etcd" go.etcd.io/etcd/server/v3
  [[ "$("$dest/bin/etcd" --version)" == *"etcd Version: ${ETCD_VERSION#v}"* ]]
  touch "$stamp"
}

build_pause() {
  local dest="$PAUSE_DIR" stamp="$PAUSE_DIR/.built"
  [ -f "$stamp" ] && { echo "pause: cached in $dest"; return; }
  mkdir -p "$dest/bin"
  (cd "$E2E_DIR/pause" && CGO_ENABLED=0 nice -n 19 go build -trimpath -ldflags "-s -w" -o "$dest/bin/pause" .)
  touch "$stamp"
}

build_pause
if [ ! -f "$K8S_DIR/.built" ] || [ ! -f "$ETCD_DIR/.built" ]; then
  go_module
fi
build_k8s
build_etcd
