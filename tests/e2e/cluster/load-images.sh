#!/usr/bin/env bash
# Copy the e2e images from the podman storage into the cluster's containerd (namespace k8s.io):
# `podman save | ctr images import`. The pod specs name them as built (localhost/...), so with
# pullPolicy IfNotPresent the kubelet never tries a registry. An image containerd's (kept) root
# already has is skipped: its tag is a hash of its inputs (versions.sh).
set -euo pipefail
source "$(dirname "$0")/versions.sh"
have="$("${CTR[@]}" images ls -q)"
for img in "$PAUSE_IMAGE" "$APP_IMAGE" "$REDIS_IMAGE"; do
  if grep -qxF "$img" <<<"$have"; then
    echo "$img: in containerd"
    continue
  fi
  "${PODMAN[@]}" save --format docker-archive "$img" | "${CTR[@]}" images import - >/dev/null
  echo "imported $img"
done
