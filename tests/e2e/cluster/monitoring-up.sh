#!/usr/bin/env bash
# The monitoring stack of the e2e cluster, as host processes recorded under $STATE/pids:
# - prometheus-operator (built from its module) against the API server, with its CRDs and a
#   Prometheus object that selects every ServiceMonitor and PrometheusRule;
# - Debian's Prometheus, on the configuration and rule files the operator generates (the
#   operator itself can only run Prometheus as pods from an image; prometheus-config-sync.py
#   copies what it writes into the cluster to this host process: see that file);
# - Debian's Alertmanager on the shipped routing tree (deploy/alertmanager/alertmanager.yml:
#   page/critical to the pager, ticket/warning to the tickets, the inhibit rules), its receivers
#   pointed at the test's webhook (127.0.0.1:$WEBHOOK_PORT/pager and /tickets; written by
#   alertmanager-config.py here), found by Prometheus through a Service of the cluster, as the
#   operator configures it;
# - the custom-metrics adapter (metrics-adapter/) behind an APIService, for the HPA, and
#   metrics-server (resource metrics: the HPA's CPU target), both host processes.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/lib.sh"
pki="$STATE/pki"
mkdir -p "$STATE/prometheus/data" "$STATE/prometheus/rules" "$STATE/alertmanager/data"

log "prometheus-operator CRDs"
kubectl apply --server-side -f "$PROM_OPERATOR_DIR/crds/" >/dev/null
kubectl wait --for condition=Established --timeout 60s crd --all >/dev/null
kubectl create namespace monitoring --dry-run=client -o yaml | kubectl apply -f - >/dev/null

log "prometheus-operator $PROM_OPERATOR_VERSION"
start prometheus-operator "$PROM_OPERATOR_DIR/bin/operator" --apiserver "https://127.0.0.1:$APISERVER_PORT" \
  --ca-file "$pki/ca.crt" --cert-file "$pki/monitoring.crt" --key-file "$pki/monitoring.key" \
  --web.listen-address "127.0.0.1:$OPERATOR_PORT" \
  --log-level info
wait_for prometheus-operator 60 curl -fsS "http://127.0.0.1:$OPERATOR_PORT/healthz"

# Alertmanager: a host process, published in the cluster as a Service without selector.
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: e2e-alertmanager, namespace: monitoring}
spec:
  ports: [{name: web, port: $ALERTMANAGER_PORT, targetPort: $ALERTMANAGER_PORT}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: e2e-alertmanager, namespace: monitoring}
subsets:
  - addresses: [{ip: $NODE_IP}]
    ports: [{name: web, port: $ALERTMANAGER_PORT}]
---
apiVersion: monitoring.coreos.com/v1
kind: Prometheus
metadata: {name: e2e, namespace: monitoring}
spec:
  # Debian's Prometheus on this host; no pods (replicas 0): the operator still renders its
  # configuration Secret and rule ConfigMaps, which the host process uses.
  version: v2.42.0
  replicas: 0
  serviceAccountName: default
  scrapeInterval: 5s
  evaluationInterval: 5s
  serviceMonitorSelector: {}
  serviceMonitorNamespaceSelector: {}
  podMonitorSelector: {}
  podMonitorNamespaceSelector: {}
  ruleSelector: {}
  ruleNamespaceSelector: {}
  alerting:
    alertmanagers:
      - {namespace: monitoring, name: e2e-alertmanager, port: web}
YAML

log "alertmanager $(prometheus-alertmanager --version 2>&1 | awk 'NR==1 {print $3}') on $NODE_IP:$ALERTMANAGER_PORT"
# The shipped routing tree (deploy/alertmanager/alertmanager.yml), its pager and ticket receivers
# pointed at the test's webhook (/pager, /tickets); only the top-level group_wait/group_interval
# shortened (see the script).
"${PYTHON:-$REPO/.venv/bin/python}" "$E2E_DIR/alertmanager-config.py" "http://127.0.0.1:$WEBHOOK_PORT" \
  >"$STATE/alertmanager/alertmanager.yml"
start alertmanager prometheus-alertmanager --config.file "$STATE/alertmanager/alertmanager.yml" \
  --storage.path "$STATE/alertmanager/data" --web.listen-address "$NODE_IP:$ALERTMANAGER_PORT" \
  --cluster.listen-address ""
wait_for alertmanager 30 curl -fsS "http://$NODE_IP:$ALERTMANAGER_PORT/-/ready"

log "prometheus $(prometheus --version 2>&1 | awk 'NR==1 {print $3}') on 127.0.0.1:$PROMETHEUS_PORT"
rm -f "$STATE/prometheus/prometheus.yaml"
start prometheus-config-sync "${PYTHON:-$REPO/.venv/bin/python}" "$E2E_DIR/prometheus-config-sync.py"
wait_for prometheus-config-sync 60 test -s "$STATE/prometheus/prometheus.yaml"
start prometheus prometheus --config.file "$STATE/prometheus/prometheus.yaml" \
  --storage.tsdb.path "$STATE/prometheus/data" --web.listen-address "127.0.0.1:$PROMETHEUS_PORT" \
  --web.enable-lifecycle --storage.tsdb.retention.time 2h
wait_for prometheus 60 curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"

log "custom-metrics adapter on $NODE_IP:$ADAPTER_PORT"
start metrics-adapter "$ADAPTER_DIR/bin/metrics-adapter" \
  --lister-kubeconfig "$pki/monitoring.kubeconfig" \
  --authentication-kubeconfig "$pki/monitoring.kubeconfig" \
  --authorization-kubeconfig "$pki/monitoring.kubeconfig" \
  --bind-address "$NODE_IP" --secure-port "$ADAPTER_PORT" \
  --tls-cert-file "$pki/aggregated.crt" --tls-private-key-file "$pki/aggregated.key" \
  --prometheus-url "http://127.0.0.1:$PROMETHEUS_PORT"
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: e2e-metrics-adapter, namespace: monitoring}
spec:
  ports: [{name: https, port: 443, targetPort: $ADAPTER_PORT}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: e2e-metrics-adapter, namespace: monitoring}
subsets:
  - addresses: [{ip: $NODE_IP}]
    ports: [{name: https, port: $ADAPTER_PORT}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta2.custom.metrics.k8s.io}
spec:
  group: custom.metrics.k8s.io
  version: v1beta2
  service: {name: e2e-metrics-adapter, namespace: monitoring, port: 443}
  caBundle: $(base64 -w0 "$pki/ca.crt")
  groupPriorityMinimum: 100
  versionPriority: 200
YAML
apiservice_ok() {
  [ "$(kubectl get apiservice v1beta2.custom.metrics.k8s.io -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" = True ]
}
wait_for metrics-adapter 60 apiservice_ok
log "metrics-server $METRICS_SERVER_VERSION on $NODE_IP:$METRICS_SERVER_PORT"
start metrics-server "$METRICS_SERVER_DIR/bin/metrics-server" \
  --kubeconfig "$pki/monitoring.kubeconfig" \
  --authentication-kubeconfig "$pki/monitoring.kubeconfig" \
  --authorization-kubeconfig "$pki/monitoring.kubeconfig" \
  --bind-address "$NODE_IP" --secure-port "$METRICS_SERVER_PORT" \
  --tls-cert-file "$pki/aggregated.crt" --tls-private-key-file "$pki/aggregated.key" \
  --kubelet-port "$KUBELET_PORT" --kubelet-preferred-address-types InternalIP \
  --kubelet-certificate-authority "$pki/ca.crt" --metric-resolution 15s --kubelet-request-timeout 5s
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: e2e-metrics-server, namespace: monitoring}
spec:
  ports: [{name: https, port: 443, targetPort: $METRICS_SERVER_PORT}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: e2e-metrics-server, namespace: monitoring}
subsets:
  - addresses: [{ip: $NODE_IP}]
    ports: [{name: https, port: $METRICS_SERVER_PORT}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  service: {name: e2e-metrics-server, namespace: monitoring, port: 443}
  caBundle: $(base64 -w0 "$pki/ca.crt")
  groupPriorityMinimum: 100
  versionPriority: 100
YAML
wait_for metrics-server 60 kubectl get --raw /apis/metrics.k8s.io/v1beta1/nodes
log "monitoring up: Prometheus http://127.0.0.1:$PROMETHEUS_PORT, Alertmanager http://$NODE_IP:$ALERTMANAGER_PORT"
