#!/usr/bin/env bash
# Build (once) and cache the binaries of the e2e cluster under .tools/, keyed by version:
#   .tools/k8s-$K8S_VERSION/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy,kubectl}
#   .tools/etcd-$ETCD_VERSION/bin/etcd
#   .tools/pause-1/bin/pause
# Each set is built in a throw-away local Go module (k8s.io/kubernetes cannot be `go install`ed: its
# go.mod replaces its staging modules with local paths; we replace them with their published
# v0.X.Y tags instead). A set whose stamp file exists is skipped: a second run is a no-op.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
mkdir -p "$E2E_CACHE"

build_k8s() {
  local dest="$K8S_DIR" stamp="$K8S_DIR/.built"
  [ -f "$stamp" ] && { echo "kubernetes $K8S_VERSION: cached in $dest"; return; }
  local mod="$dest/src"
  mkdir -p "$mod" "$dest/bin"
  # The staging modules are read from kubernetes' own go.mod, so a version bump needs no list edit.
  # sample-cli-plugin and sample-controller are not served by the module proxy and not needed.
  (cd "$mod" && GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$K8S_VERSION")
  local kgomod
  kgomod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
  {
    echo "module pricestream.local/e2e-k8s"
    echo
    echo "go $(sed -n 's/^go //p' "$kgomod")"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$kgomod" | awk '{print $1}' |
      grep -vE '^k8s\.io/sample-(cli-plugin|controller)$' |
      while read -r m; do echo "replace $m => $m $K8S_STAGING_VERSION"; done
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

// Package tools pins the commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; GOFLAGS=-mod=mod go mod download)
  local ldflags
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitTreeState=clean"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    echo "building $cmd $K8S_VERSION"
    (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 19 go build -trimpath -ldflags "$ldflags" \
      -o "$dest/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  [[ "$("$dest/bin/kubectl" version --client)" == *"$K8S_VERSION"* ]]
  touch "$stamp"
}

build_etcd() {
  local dest="$ETCD_DIR" stamp="$ETCD_DIR/.built"
  [ -f "$stamp" ] && { echo "etcd $ETCD_VERSION: cached in $dest"; return; }
  local mod="$dest/src"
  mkdir -p "$mod" "$dest/bin"
  cat > "$mod/go.mod" <<GOMOD
module pricestream.local/e2e-etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  echo "building etcd $ETCD_VERSION"
  (cd "$mod" && GOFLAGS=-mod=mod go mod download go.etcd.io/etcd/server/v3 &&
    GOFLAGS=-mod=mod go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" &&
    CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 19 go build -trimpath -ldflags "-s -w" \
      -o "$dest/bin/etcd" go.etcd.io/etcd/server/v3)
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

build_etcd
build_pause
build_k8s
