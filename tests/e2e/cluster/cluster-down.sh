#!/usr/bin/env bash
# Stop the e2e cluster and remove every trace of it, also after a failed or half-done up:
# the recorded processes (by PID), the pods' containers and shims, the mounts under $STATE, the
# pods' network namespaces, the iptables chains of kube-proxy, kubelet and CNI, the bridge, the
# cgroups kubelet made, the host sysctls it changed, and $STATE itself. Safe to run twice.
set -uo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/lib.sh"
[ -d "$STATE" ] || { ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"; exit 0; }
log "cluster down"
# Host processes of the checks (monitoring stack, adapter, webhook) first, then the control loops;
# each group at once.
others=()
for f in "$STATE"/pids/*.pid; do
  [ -e "$f" ] || continue
  n="$(basename "$f" .pid)"
  case "$n" in
    etcd | kube-apiserver | kube-controller-manager | kube-scheduler | containerd | kubelet | kube-proxy | dnsmasq | dns-sync) ;;
    *) others+=("$n") ;;
  esac
done
stop_all 5 dns-sync "${others[@]}"
stop_all 10 kubelet kube-proxy

# Every task containerd runs (pods' containers and sandboxes), then the shims, each by PID.
if [ -S "$CONTAINERD_SOCK" ]; then
  for id in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1
  done
  sleep 1
  for id in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$id" >/dev/null 2>&1; done
  for id in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$id" >/dev/null 2>&1; done
  # No container left: the root may serve the next cluster (cluster-up.sh), with these images.
  if containers="$("${CTR[@]}" containers ls -q 2>/dev/null)" && [ -z "$containers" ]; then
    images_kept="$("${CTR[@]}" images ls -q 2>/dev/null | grep -v '^sha256:' | sort)"
  fi
fi
stop containerd 10
# A shim outlives containerd; each records its PID in containerd's state folder.
for f in "$STATE"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
  [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
done
stop_all 5 kube-scheduler kube-controller-manager
stop kube-apiserver 10
stop_all 10 etcd dnsmasq

# Network namespaces the CRI plugin made for pods (not there before up).
for ns in $(ls /run/netns 2>/dev/null); do
  case "$ns" in cni-*) ;; *) continue ;; esac
  grep -qx "$ns" "$STATE/netns-before" 2>/dev/null && continue
  ip netns delete "$ns" 2>/dev/null || { umount -l "/run/netns/$ns" 2>/dev/null; rm -f "/run/netns/$ns"; }
done

# Mounts under $STATE (pod volumes, overlay rootfs, shm) or containerd's root, deepest first.
for _ in 1 2 3; do
  mapfile -t mnts < <(awk -v p="$STATE/" -v r="$CONTAINERD_ROOT/" \
    'index($5, p) == 1 || index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  [ ${#mnts[@]} -eq 0 ] && break
  for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

# iptables: kube-proxy removes its own; then any KUBE-*/CNI-* chain left (kubelet's canaries).
[ -x "$K8S_DIR/bin/kube-proxy" ] && "$K8S_DIR/bin/kube-proxy" --cleanup >/dev/null 2>&1
for ipt in iptables ip6tables; do
  for t in filter nat mangle raw; do
    "$ipt" -t "$t" -S 2>/dev/null | grep -E '^-A .*-j (KUBE-|CNI-)|^-A (KUBE-|CNI-)' | grep -vE '^-A (KUBE-|CNI-)' |
      while read -r rule; do
        # shellcheck disable=SC2086
        "$ipt" -t "$t" ${rule/#-A/-D} 2>/dev/null
      done
    for c in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-)/ {print $2}'); do
      "$ipt" -t "$t" -F "$c" 2>/dev/null
    done
    for c in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-)/ {print $2}'); do
      "$ipt" -t "$t" -X "$c" 2>/dev/null
    done
  done
done
# conntrack entries of the Service range.
command -v conntrack >/dev/null && conntrack -D -d "$SERVICE_CIDR" >/dev/null 2>&1

ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"

# cgroups kubelet made (kubepods hierarchy, one per v1 controller), leaves first.
for ctl in /sys/fs/cgroup/*/; do
  [ -d "${ctl}kubepods" ] || continue
  find "${ctl}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done

if [ -f "$STATE/host-sysctl" ]; then
  v="$(sed -n 's/^ip_forward=//p' "$STATE/host-sysctl")"
  [ -n "$v" ] && echo "$v" >/proc/sys/net/ipv4/ip_forward
  v="$(sed -n 's/^bridge_nf_call_iptables=//p' "$STATE/host-sysctl")"
  [ -n "$v" ] && echo "$v" >/proc/sys/net/bridge/bridge-nf-call-iptables
fi
rm -rf "$STATE/cni/ipam"
if [ -n "${images_kept:-}" ] && [ -d "$CONTAINERD_ROOT" ]; then
  # The CRI plugin's per-pod files; its sandboxes went with the containers.
  rm -rf "$CONTAINERD_ROOT/io.containerd.grpc.v1.cri"
  printf '%s\n' "$images_kept" >"$CONTAINERD_ROOT/.clean"
fi
rm -rf "$STATE" 2>/dev/null || { sleep 1; rm -rf "$STATE"; }
[ -d "$STATE" ] && { echo "could not remove $STATE" >&2; exit 1; }
log "cluster down: done"
