#!/usr/bin/env bash
# Build the images the e2e cluster runs, with podman (buildah inside) into the e2e storage:
#   $APP_IMAGE   from the project's Dockerfile, BASE_IMAGE = the debootstrap base
#   $REDIS_IMAGE Debian's redis-server on the same base (tests/e2e/cluster/redis.Containerfile)
#   $PAUSE_IMAGE the pod sandbox, the tiny Go pause program alone
# The tags carry a hash of the build's inputs (versions.sh): a tag the storage has is not rebuilt,
# so a run with nothing changed builds nothing; a new tag replaces the older ones of its name.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
"$E2E_DIR/build-base-image.sh"
build=("${PODMAN[@]}" build --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096
  --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" --layers -q)
image() { # image TAG CONTAINERFILE CONTEXT
  local tag="$1" old
  if "${PODMAN[@]}" image exists "$tag"; then
    echo "image $tag: cached"
    return
  fi
  echo "image $tag"
  nice -n 19 "${build[@]}" -t "$tag" -f "$2" "$3" >/dev/null
  for old in $("${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' "${tag%:*}"); do
    [ "$old" = "$tag" ] || "${PODMAN[@]}" rmi "$old" >/dev/null
  done
}
image "$APP_IMAGE" "$REPO/Dockerfile" "$REPO"
image "$REDIS_IMAGE" "$E2E_DIR/redis.Containerfile" "$E2E_DIR/pause"
if ! "${PODMAN[@]}" image exists "$PAUSE_IMAGE"; then
  [ -x "$PAUSE_DIR/bin/pause" ] || { echo "no $PAUSE_DIR/bin/pause: run build-cluster-bins.sh" >&2; exit 1; }
  echo "image $PAUSE_IMAGE"
  tar -C "$PAUSE_DIR/bin" --owner=0 --group=0 -cf - pause |
    "${PODMAN[@]}" import --change 'ENTRYPOINT ["/pause"]' - "$PAUSE_IMAGE" >/dev/null
fi
