#!/usr/bin/env bash
# Keep dnsmasq's hosts file equal to the cluster's Services: `NAME.NAMESPACE.svc.cluster.local`
# -> its ClusterIP, or each ready endpoint for a headless Service. Polls every 2 s; reloads
# dnsmasq (SIGHUP) only when the file changes.
set -uo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/lib.sh"
hosts="$STATE/dns/services.hosts"
tmpl='{{range .items}}{{if and .spec.clusterIP (ne .spec.clusterIP "None")}}{{.spec.clusterIP}} {{.metadata.name}}.{{.metadata.namespace}}.svc.cluster.local{{"\n"}}{{end}}{{end}}'
eps='{{range .items}}{{$s := index .metadata.labels "kubernetes.io/service-name"}}{{$n := .metadata.namespace}}{{range .endpoints}}{{if .conditions.ready}}{{range .addresses}}{{.}} {{$s}}.{{$n}}.svc.cluster.local{{"\n"}}{{end}}{{end}}{{end}}{{end}}'
while true; do
  if svc="$(kubectl get svc -A -o go-template="$tmpl" 2>/dev/null)" &&
    headless="$(kubectl get endpointslices -A -l 'service.kubernetes.io/headless' -o go-template="$eps" 2>/dev/null)"; then
    new="$(printf '%s\n%s\n' "$svc" "$headless" | sed '/^$/d' | sort)"
    if [ "$new" != "$(cat "$hosts")" ]; then
      printf '%s\n' "$new" >"$hosts.tmp" && mv "$hosts.tmp" "$hosts"
      [ -f "$STATE/pids/dnsmasq.pid" ] && kill -HUP "$(cat "$STATE/pids/dnsmasq.pid")" 2>/dev/null
    fi
  fi
  sleep 2
done
