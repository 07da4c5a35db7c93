#!/usr/bin/env bash
# Start the single-node e2e cluster on this machine, every part a host process recorded by PID
# under $STATE: etcd, kube-apiserver (loopback), controller-manager, scheduler, containerd (runc),
# kubelet, kube-proxy (iptables), dnsmasq for *.svc.cluster.local, and a bridge for the pods.
# On any failure it runs cluster-down.sh, so nothing is left behind.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/lib.sh"
if [ -d "$STATE" ]; then
  echo "$STATE exists: a cluster is up or was not cleaned; run tests/e2e/cluster/cluster-down.sh" >&2
  exit 1
fi
for b in etcd; do [ -x "$ETCD_DIR/bin/$b" ] || { echo "no $ETCD_DIR/bin/$b: make e2e-build" >&2; exit 1; }; done
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  [ -x "$K8S_DIR/bin/$b" ] || { echo "no $K8S_DIR/bin/$b: make e2e-build" >&2; exit 1; }
done
trap 'echo "cluster-up failed; cleaning up" >&2; "$E2E_DIR/cluster-down.sh"' ERR
mkdir -p "$STATE"/{pids,logs,etcd,kubelet,pod-logs,cni/net.d,cni/ipam,dns}
K="$K8S_DIR/bin"
pki="$STATE/pki"

log "host network: bridge $BRIDGE $NODE_IP, forwarding on"
# What this changes on the host, so the down script puts it back.
{
  echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
  echo "bridge_nf_call_iptables=$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo)"
} >"$STATE/host-sysctl"
ls /run/netns 2>/dev/null >"$STATE/netns-before" || true
ip link add "$BRIDGE" type bridge
ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
ip link set "$BRIDGE" up
echo 1 >/proc/sys/net/ipv4/ip_forward
# Pod-to-Service-to-pod on one bridge: bridged replies must see the DNAT (br_netfilter).
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables

log "certificates"
"$E2E_DIR/pki.sh"

log "etcd $ETCD_VERSION"
start etcd "$ETCD_DIR/bin/etcd" --name e2e --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
  --quota-backend-bytes 1073741824 --unsafe-no-fsync
wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

log "kube-apiserver $K8S_VERSION"
start kube-apiserver "$K/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --advertise-address 127.0.0.1 --bind-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
  --endpoint-reconciler-type none \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --authorization-mode Node,RBAC \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
  --enable-aggregator-routing=true \
  --profiling=false
wait_for kube-apiserver 90 kubectl get --raw /readyz

log "kube-controller-manager, kube-scheduler"
start kube-controller-manager "$K/kube-controller-manager" \
  --kubeconfig "$pki/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$pki/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$pki/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --root-ca-file "$pki/ca.crt" --service-account-private-key-file "$pki/sa.key" \
  --use-service-account-credentials --leader-elect=false \
  --horizontal-pod-autoscaler-sync-period 5s --profiling=false
start kube-scheduler "$K/kube-scheduler" \
  --kubeconfig "$pki/scheduler.kubeconfig" \
  --authentication-kubeconfig "$pki/scheduler.kubeconfig" \
  --authorization-kubeconfig "$pki/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false --profiling=false

log "containerd $(containerd --version | awk '{print $3}') (runc)"
mkdir -p "$STATE/containerd"
# containerd's root is kept across clusters, so the images it has are not imported again (about
# 20 s a start). It is trusted only as a complete cluster-down left it: every container deleted
# and .clean listing the images; anything else (a crash, other images) starts from an empty root.
images_wanted="$(printf '%s\n' "$PAUSE_IMAGE" "$APP_IMAGE" "$REDIS_IMAGE" | sort)"
if [ "$(cat "$CONTAINERD_ROOT/.clean" 2>/dev/null)" != "$images_wanted" ]; then
  rm -rf "$CONTAINERD_ROOT"
fi
rm -f "$CONTAINERD_ROOT/.clean"
mkdir -p "$CONTAINERD_ROOT"
cat >"$STATE/containerd/config.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Lowering a process's oom_score_adj is denied on this host.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
TOML
cat >"$STATE/cni/net.d/10-pricestream-e2e.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "pricestream-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
start containerd containerd --config "$STATE/containerd/config.toml"
wait_for containerd 30 "${CTR[@]}" version

log "images into containerd"
"$E2E_DIR/load-images.sh"

log "kubelet"
: >"$STATE/resolv.conf"
cat >"$STATE/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
# This host mounts cgroup v1 (hybrid); kubelet refuses it unless told.
failCgroupV1: false
failSwapOn: false
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $STATE/resolv.conf
podLogsDir: $STATE/pod-logs
serializeImagePulls: false
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 60
syncFrequency: 10s
YAML
start kubelet "$K/kubelet" --config "$STATE/kubelet/config.yaml" --kubeconfig "$pki/node.kubeconfig" \
  --root-dir "$STATE/kubelet" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" -v 1
node_ready() { [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for kubelet 120 node_ready

log "kube-proxy (iptables)"
cat >"$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
nodePortAddresses: [$NODE_IP/32]
iptables: {masqueradeAll: true}
# Leave the host's conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
start kube-proxy "$K/kube-proxy" --config "$STATE/kube-proxy.yaml"
wait_for kube-proxy 30 curl -fsS "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"

log "dnsmasq for *.svc.cluster.local on $NODE_IP:53"
: >"$STATE/dns/services.hosts"
start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll --bind-interfaces \
  --listen-address="$NODE_IP" --port=53 --user=root --pid-file="$STATE/dnsmasq.pid-internal" \
  --addn-hosts="$STATE/dns/services.hosts" --local=/cluster.local/ --log-facility="$STATE/logs/dnsmasq-queries.log"
start dns-sync "$E2E_DIR/dns-sync.sh"
wait_for dnsmasq 10 test -s "$STATE/dnsmasq.pid-internal"
wait_for dns-sync 30 grep -q "kubernetes.default.svc.cluster.local" "$STATE/dns/services.hosts"

# The default namespace's ServiceAccount appears once the controller-manager runs.
wait_for kube-controller-manager 60 kubectl -n default get serviceaccount default
log "cluster up: KUBECONFIG=$KUBECONFIG_ADMIN"
