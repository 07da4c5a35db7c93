#!/usr/bin/env bash
# Build (once) and cache the Go parts of the e2e monitoring stack under $E2E_CACHE, keyed by version:
#   prometheus-operator-$PROM_OPERATOR_VERSION/bin/operator
#   metrics-server-$METRICS_SERVER_VERSION-set-$GO_SET/bin/metrics-server (the HPA's CPU metric)
#   metrics-adapter-$CUSTOM_METRICS_APISERVER_VERSION-set-$GO_SET-<source hash>/bin/metrics-adapter
# metrics-server and the adapter from the local module of tests/e2e/cluster/go-module.sh, which
# Kubernetes (build-cluster-bins.sh) is built from too: what they share (client-go, apiserver,
# grpc ...) is compiled once. The operator does not compile in it and is built alone.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/go-module.sh"

# Alone, in a local module that requires it at its own versions (see go-module.sh for why), as its
# go.mod replaces two of its own submodules with local paths: here they point at their tags.
build_operator() {
  local dest="$PROM_OPERATOR_DIR" stamp="$PROM_OPERATOR_DIR/.built"
  [ -f "$stamp" ] && { echo "prometheus-operator $PROM_OPERATOR_VERSION: cached in $dest"; return; }
  local mod="$dest/src" v="$PROM_OPERATOR_VERSION" p=github.com/prometheus-operator/prometheus-operator
  mkdir -p "$mod" "$dest/bin"
  cat >"$mod/go.mod" <<GOMOD
module pricestream.local/e2e-prometheus-operator

go 1.24.0

require $p $v

replace (
	$p/pkg/apis/monitoring => $p/pkg/apis/monitoring $v
	$p/pkg/client => $p/pkg/client $v
)
GOMOD
  echo "building prometheus-operator $v"
  (cd "$mod" && GOFLAGS=-mod=mod go mod download "$p" && GOFLAGS=-mod=mod go get "$p/cmd/operator@$v" &&
    CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 19 go build -trimpath \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${v#v}" -o "$dest/bin/operator" "$p/cmd/operator")
  # Its CRDs, from the same module (the chart's ServiceMonitor and PrometheusRule need them).
  mkdir -p "$dest/crds"
  cp "$(go env GOMODCACHE)/$p@$v/example/prometheus-operator-crd/"*.yaml "$dest/crds/"
  chmod u+w "$dest/crds/"*.yaml
  touch "$stamp"
}

build_adapter() {
  local dest="$ADAPTER_DIR" stamp="$ADAPTER_DIR/.built"
  [ -f "$stamp" ] && { echo "metrics-adapter: cached in $dest"; return; }
  mkdir -p "$dest/bin"
  echo "building metrics-adapter (custom-metrics-apiserver $CUSTOM_METRICS_APISERVER_VERSION)"
  go_build -ldflags "-s -w" -o "$dest/bin/metrics-adapter" "$ADAPTER_MODULE"
  touch "$stamp"
}

build_metrics_server() {
  local dest="$METRICS_SERVER_DIR" stamp="$METRICS_SERVER_DIR/.built"
  [ -f "$stamp" ] && { echo "metrics-server $METRICS_SERVER_VERSION: cached in $dest"; return; }
  mkdir -p "$dest/bin"
  echo "building metrics-server $METRICS_SERVER_VERSION"
  go_build -ldflags "-s -w" -o "$dest/bin/metrics-server" sigs.k8s.io/metrics-server/cmd/metrics-server
  touch "$stamp"
}

if [ ! -f "$ADAPTER_DIR/.built" ] || [ ! -f "$METRICS_SERVER_DIR/.built" ]; then
  go_module
fi
build_adapter
build_metrics_server
build_operator
