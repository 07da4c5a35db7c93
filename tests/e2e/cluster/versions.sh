# Versions and paths of the e2e cluster, sourced by every script in tests/e2e/cluster/.
# shellcheck shell=bash
E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$E2E_DIR/../../.." && pwd)"  # E2E_DIR is tests/e2e/cluster
TOOLS="${TOOLS:-$REPO/.tools}"
# What the e2e builds (binaries, the base rootfs, the podman storage) is keyed by version or by a
# hash of its inputs, never by the checkout, so it lives outside the clone as the Go caches do: a
# fresh clone of an unchanged tree builds nothing. E2E_CACHE=$REPO/.tools keeps it in the clone.
E2E_CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pricestream-e2e}"
K8S_VERSION=v1.37.2
K8S_STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.7.0
PROM_OPERATOR_VERSION=v0.87.1
CUSTOM_METRICS_APISERVER_VERSION=v1.37.0
METRICS_SERVER_VERSION=v0.9.0
# The Go binaries but the operator (Kubernetes, etcd, metrics-server, the adapter) are built from
# ONE local module (go-module.sh here), so they share one module graph: Go's build cache
# reuses a compiled package only when it and all its dependencies are the same, and with one graph
# client-go, apiserver, grpc, otel ... are compiled once instead of once per binary. A binary's
# dependencies are then the whole set's, so each of them is keyed by the whole set (GO_SET), not
# only by its own version; the adapter's go.mod is in it as its requirements are.
GO_SET="$(printf '%s\n' go-set-1 "$K8S_VERSION" "$K8S_STAGING_VERSION" "$ETCD_VERSION" \
  "$CUSTOM_METRICS_APISERVER_VERSION" "$METRICS_SERVER_VERSION" | cat - "$E2E_DIR/metrics-adapter/go.mod" |
  sha256sum | cut -c1-8)"
GO_MODULE_DIR="$E2E_CACHE/go-module-$GO_SET"
K8S_DIR="$E2E_CACHE/k8s-$K8S_VERSION-set-$GO_SET"
ETCD_DIR="$E2E_CACHE/etcd-$ETCD_VERSION-set-$GO_SET"
PAUSE_DIR="$E2E_CACHE/pause-1"
KUBECTL="$K8S_DIR/bin/kubectl"
HELM="${HELM:-$TOOLS/bin/helm}"
# The e2e image's base (build-base-image.sh here) and the podman storage kept under .tools.
BASE_KEY=base-bookworm-python3-1
BASE_IMAGE=localhost/pricestream-e2e-base:bookworm-python3-1
PODMAN_ROOT="$E2E_CACHE/podman-storage"
PODMAN=(podman --root "$PODMAN_ROOT" --runroot /run/pricestream-e2e-podman --storage-driver overlay
  --cgroup-manager cgroupfs --events-backend none --runtime runc)
APP_VERSION="$(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$REPO/deploy/helm/pricestream/Chart.yaml")"
# Image tags carry a hash of everything their build reads (the Dockerfile's context as
# .dockerignore keeps it, and the base), so build-images.sh skips a tag podman already has.
inputs_key() { # inputs_key DIR PATH...: a short hash of the files under PATH... (relative to DIR)
  (cd "$1" && shift && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum && echo "$BASE_IMAGE") | sha256sum | cut -c1-12
}
APP_IMAGE="localhost/pricestream:$APP_VERSION-$(inputs_key "$REPO" Dockerfile .dockerignore pyproject.toml docs/package.md service)"
REDIS_IMAGE="localhost/pricestream-e2e-redis:bookworm-$(inputs_key "$E2E_DIR" redis.Containerfile)"
PAUSE_IMAGE=localhost/pricestream-e2e-pause:1
# The running cluster: state, network and ports. Ports are off every default a test or another
# tool of this machine binds (6443, 2379, 10250, 9090, 9093, 6379, 50051, 9464 ...).
STATE="${E2E_STATE:-/tmp/pricestream-e2e}"
NODE_NAME=pricestream-e2e
BRIDGE=pse2e0
# RFC 2544's benchmarking range: test hosts only, never a real network.
POD_CIDR=198.18.0.0/24
NODE_IP=198.18.0.1
SERVICE_CIDR=198.19.0.0/24
ETCD_PORT=17379
ETCD_PEER_PORT=17380
APISERVER_PORT=17443
KCM_PORT=17257
SCHEDULER_PORT=17259
KUBELET_PORT=17250
KUBELET_HEALTHZ_PORT=17248
KUBE_PROXY_METRICS_PORT=17249
KUBE_PROXY_HEALTHZ_PORT=17256
KUBECONFIG_ADMIN="$STATE/pki/admin.kubeconfig"
CONTAINERD_SOCK="$STATE/containerd/containerd.sock"
CTR=(ctr --address "$CONTAINERD_SOCK" -n k8s.io)
# containerd's root (images and their snapshots) outlives a cluster: see cluster-up.sh.
CONTAINERD_ROOT="$E2E_CACHE/containerd-root"
PROM_OPERATOR_DIR="$E2E_CACHE/prometheus-operator-$PROM_OPERATOR_VERSION"
METRICS_SERVER_DIR="$E2E_CACHE/metrics-server-$METRICS_SERVER_VERSION-set-$GO_SET"
# Keyed by its source too: an edit of the adapter rebuilds it (and only it).
ADAPTER_DIR="$E2E_CACHE/metrics-adapter-$CUSTOM_METRICS_APISERVER_VERSION-set-$GO_SET-$(cat "$E2E_DIR"/metrics-adapter/go.mod "$E2E_DIR"/metrics-adapter/*.go 2>/dev/null | sha256sum | cut -c1-12)"
# Monitoring stack: host processes (monitoring-up.sh here).
OPERATOR_PORT=17080
PROMETHEUS_PORT=17090
ALERTMANAGER_PORT=17093
WEBHOOK_PORT=17094
ADAPTER_PORT=17444
METRICS_SERVER_PORT=17445
