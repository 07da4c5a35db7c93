#!/usr/bin/env bash
# Copy the e2e images from the podman storage into the cluster's containerd (namespace k8s.io):
# `podman save | ctr images import`. The pod specs name them as built (localhost/...), so with
# pullPolicy IfNotPresent the kubelet never tries a registry.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
for img in "$PAUSE_IMAGE" "$APP_IMAGE" "$REDIS_IMAGE"; do
  "${PODMAN[@]}" save --format docker-archive "$img" | "${CTR[@]}" images import - >/dev/null
  echo "imported $img"
done
