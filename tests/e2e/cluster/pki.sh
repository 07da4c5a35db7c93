#!/usr/bin/env bash
# Certificates and kubeconfigs of the e2e cluster, by openssl, into $STATE/pki: one cluster CA
# (serving and client certificates of every component), a front-proxy CA for the aggregation
# layer (the custom-metrics API), and the service-account signing key. ECDSA P-256 keys: fourteen
# RSA 2048 keys took 6 s of every `make e2e-up`, these take a fraction of one.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
pki="$STATE/pki"
mkdir -p "$pki"
cd "$pki"

ca() { # ca NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.crt" -days 2 \
    -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

cert() { # cert NAME CA SUBJECT [SAN]: a client+server certificate signed by CA
  local name="$1" ca="$2" subj="$3" san="${4:-}"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -days 2 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

kubeconfig() { # kubeconfig NAME: NAME.kubeconfig with NAME.crt/key against the API server
  cat >"$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      certificate-authority: $pki/ca.crt
      server: https://127.0.0.1:$APISERVER_PORT
users:
  - name: $1
    user:
      client-certificate: $pki/$1.crt
      client-key: $pki/$1.key
contexts:
  - name: e2e
    context: {cluster: e2e, user: $1}
current-context: e2e
KC
}

ca ca pricestream-e2e-ca
ca front-proxy-ca pricestream-e2e-front-proxy-ca
cert apiserver ca "/CN=kube-apiserver" \
  "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:${SERVICE_CIDR%0/24}1"
cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert front-proxy-client front-proxy-ca "/CN=front-proxy-client"
cert kubelet ca "/CN=$NODE_NAME" "DNS:$NODE_NAME,IP:$NODE_IP"
cert node ca "/O=system:nodes/CN=system:node:$NODE_NAME"
cert admin ca "/O=system:masters/CN=pricestream-e2e-admin"
cert controller-manager ca "/CN=system:kube-controller-manager"
cert scheduler ca "/CN=system:kube-scheduler"
cert kube-proxy ca "/CN=system:kube-proxy"
# The host processes of the monitoring stack (prometheus-operator, Prometheus, the adapter).
cert monitoring ca "/O=system:masters/CN=pricestream-e2e-monitoring" "DNS:localhost,IP:127.0.0.1,IP:$NODE_IP"
# Serving certificate of the aggregated APIs (custom metrics, resource metrics): the API server
# checks it against the name of the Service each APIService names.
cert aggregated ca "/CN=pricestream-e2e-aggregated" \
  "DNS:e2e-metrics-adapter.monitoring.svc,DNS:e2e-metrics-server.monitoring.svc,IP:$NODE_IP"
for n in admin controller-manager scheduler kube-proxy node monitoring; do kubeconfig "$n"; done
openssl ecparam -name prime256v1 -genkey -noout -out sa.key 2>/dev/null
openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
