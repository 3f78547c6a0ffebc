#!/usr/bin/env bash
# Build voxrelay's container image where no image can be pulled (`make image`).
#
# The base is Debian bookworm made by debootstrap (minbase, plus python3 and its venv
# module) and imported once as localhost/voxrelay-base:bookworm; buildah then builds
# the Dockerfile on it, RUN steps included, with the vfs storage driver and chroot
# isolation (no overlay mounts or user namespaces needed). Elsewhere the same
# Dockerfile builds on python:3.11-slim, its default BASE.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${IMAGE_TAG:-voxrelay:dev}
base=${IMAGE_BASE:-localhost/voxrelay-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
storage=(--storage-driver vfs)

if ! buildah "${storage[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  root=$(mktemp -d /tmp/voxrelay-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  chmod 755 "$root"  # it becomes the image's /: mktemp's 0700 would lock out its user
  echo "image: debootstrap bookworm into $root"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
    >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman "${storage[@]}" import - "$base" >/dev/null
fi

echo "image: buildah bud on $base"
buildah "${storage[@]}" bud --isolation chroot --format docker --layers=false \
  --build-arg BASE="$base" -t "$tag" .
echo "image: built $tag"
