#!/usr/bin/env bash
# Build the images the e2e cluster runs, with podman (buildah inside) into the e2e storage:
#   $APP_IMAGE   from the project's Dockerfile, BASE_IMAGE = the debootstrap base
#   $REDIS_IMAGE Debian's redis-server on the same base (scripts/e2e/redis.Containerfile)
#   $PAUSE_IMAGE the pod sandbox, the tiny Go pause program alone
# Layers are cached by podman: a rebuild with no change takes seconds.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
"$E2E_DIR/build-base-image.sh"
build=("${PODMAN[@]}" build --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096
  --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" --layers -q)
echo "image $APP_IMAGE"
nice -n 19 "${build[@]}" -t "$APP_IMAGE" -f "$REPO/Dockerfile" "$REPO" >/dev/null
echo "image $REDIS_IMAGE"
nice -n 19 "${build[@]}" -t "$REDIS_IMAGE" -f "$E2E_DIR/redis.Containerfile" "$E2E_DIR/pause" >/dev/null
if ! "${PODMAN[@]}" image exists "$PAUSE_IMAGE"; then
  [ -x "$PAUSE_DIR/bin/pause" ] || { echo "no $PAUSE_DIR/bin/pause: run build-cluster-bins.sh" >&2; exit 1; }
  echo "image $PAUSE_IMAGE"
  tar -C "$PAUSE_DIR/bin" --owner=0 --group=0 -cf - pause |
    "${PODMAN[@]}" import --change 'ENTRYPOINT ["/pause"]' - "$PAUSE_IMAGE" >/dev/null
fi
