#!/usr/bin/env bash
# The e2e image's base, made without Docker Hub: `debootstrap --variant=minbase bookworm` plus
# Debian's python3 (3.11, as the Dockerfile's default base), imported into the e2e podman storage
# as $BASE_IMAGE. The root filesystem tarball is cached under .tools/ keyed by $BASE_KEY; bump the
# key to rebuild. A second run is a no-op once the image is in the storage.
set -euo pipefail
source "$(dirname "$0")/versions.sh"
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  echo "base image $BASE_IMAGE: cached"
  exit 0
fi
dir="$E2E_CACHE/$BASE_KEY"
tarball="$dir/rootfs.tar"
if [ ! -f "$tarball" ]; then
  rm -rf "$dir" && mkdir -p "$dir"
  rootfs="$dir/rootfs"
  mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  echo "debootstrap bookworm (minbase + python3) into $rootfs"
  nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$dir/debootstrap.log" 2>&1 ||
    { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
  # The official python images call it `python`; the Dockerfile does too.
  ln -sf python3 "$rootfs/usr/bin/python"
  # pip in the build stage trusts what this machine trusts (its CA bundle may carry a local CA).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$rootfs"
fi
"${PODMAN[@]}" import --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE imported"
