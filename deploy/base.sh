#!/usr/bin/env bash
# A Debian bookworm base image made from Debian packages alone (debootstrap, then docker import),
# for machines that cannot pull from a registry; elsewhere the Dockerfiles use debian:bookworm-slim.
#   bash deploy/base.sh [TAG]      # default thaw-base:bookworm; needs root, debootstrap, docker
set -euo pipefail
tag=${1:-thaw-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then echo "$tag exists"; exit 0; fi
command -v debootstrap >/dev/null || { echo "base.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag"
docker image ls "$tag"
