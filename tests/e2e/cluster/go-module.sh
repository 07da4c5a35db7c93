# The one local Go module every Go binary of the e2e is built from (sourced by
# build-cluster-bins.sh and build-monitoring-bins.sh; see GO_SET in versions.sh).
# shellcheck shell=bash
#
# It requires k8s.io/kubernetes (which cannot be `go install`ed: its go.mod replaces its staging
# modules with local paths; we require and replace them with their published $K8S_STAGING_VERSION
# tags instead), etcd's server, metrics-server and our metrics-adapter. Go's minimal version
# selection then picks one version of every module for all of them: Kubernetes' own, except the
# few indirect ones (grpc, otel, x/net, logr ...) that custom-metrics-apiserver or metrics-server
# require newer, which Kubernetes is built with too. Built separately, each binary recompiled
# client-go, apiserver, api, grpc ... at its own versions.
# prometheus-operator v0.87.1 is not in it: with metrics-server's prometheus/prometheus v0.313.0,
# which brings alertmanager v0.33.0 (it wants v0.307.3 and v0.29.0), it does not compile
# (alertmanager's config.URL, promql's parser.ParseExpr are gone), so it is built alone.

GO_MODULE_PATH=pricestream.local/e2e-go
ADAPTER_MODULE=pricestream.local/e2e-metrics-adapter

# The commands the module builds: tools.go imports them all, so `go mod tidy` resolves them together.
GO_MODULE_CMDS=(
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3
  sigs.k8s.io/metrics-server/cmd/metrics-server "$ADAPTER_MODULE"
)

go_module() { # make $GO_MODULE_DIR (once): go.mod, go.sum and every module it needs downloaded
  local mod="$GO_MODULE_DIR" stamp="$GO_MODULE_DIR/.ready"
  if [ -f "$stamp" ]; then
    # The module is cached outside the clone, keyed by versions, not by the checkout: its replace
    # names the adapter by absolute path, so point it at this checkout's (the clone, or this
    # folder, may have moved since the module was made).
    (cd "$mod" && go mod edit -replace="$ADAPTER_MODULE=$E2E_DIR/metrics-adapter")
    return
  fi
  mkdir -p "$mod"
  rm -f "$mod/go.mod" "$mod/go.sum"
  # The staging modules are read from kubernetes' own go.mod, so a version bump needs no list edit.
  # sample-cli-plugin and sample-controller are not served by the module proxy and not needed.
  local kgomod staging
  kgomod="$(cd "$mod" && GOFLAGS=-mod=mod go list -m -f '{{.GoMod}}' "k8s.io/kubernetes@$K8S_VERSION")"
  staging="$(grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$kgomod" | awk '{print $1}' |
    grep -vE '^k8s\.io/sample-(cli-plugin|controller)$')"
  local m
  {
    echo "module $GO_MODULE_PATH"
    echo
    echo "go $(sed -n 's/^go //p' "$kgomod")"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo "	sigs.k8s.io/metrics-server $METRICS_SERVER_VERSION"
    echo "	$ADAPTER_MODULE v0.0.0"
    # Required, not only replaced: a package's cache key carries its module's selected version,
    # and kubernetes requires these at v0.0.0 where the others require them at their tags.
    for m in $staging; do echo "	$m $K8S_STAGING_VERSION"; done
    echo ")"
    echo
    for m in $staging; do echo "replace $m => $m $K8S_STAGING_VERSION"; done
    # tests/e2e/cluster/metrics-adapter keeps its own go.mod (for working on it alone).
    echo "replace $ADAPTER_MODULE => $E2E_DIR/metrics-adapter"
  } >"$mod/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "// Package tools pins the commands this module builds."
    echo "package tools"
    echo
    echo "import ("
    for m in "${GO_MODULE_CMDS[@]}"; do echo "	_ \"$m\""; done
    echo ")"
  } >"$mod/tools.go"
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; GOFLAGS=-mod=mod go mod download)
  touch "$stamp"
}

go_build() { # go_build ARGS...: `go build` in the module, as every binary of it is built
  (cd "$GO_MODULE_DIR" && CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 19 go build -trimpath "$@")
}
