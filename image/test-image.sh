#!/usr/bin/env bash
# The appliance test: build the offline wheelhouse, the Debian image from it, and boot it
# (systemd-nspawn, then qemu with TCG), running the `image` tests. Needs root and a connected
# machine (Debian packages and PyPI wheels are fetched here, at build time; the box never is).
#
#   image/test-image.sh [pytest args]          (.ci/run calls it; about 10-15 min on 2 cores)
#
# Re-uses .cache/wheelhouse/llama-cpu (the portable llama-cpp-python build, ~6 min) when present.
# ATOLL_IMAGE_REUSE=1 skips rebuilding an existing image (for iterating on the tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[ "${ATOLL_SKIP_SETUP:-0}" = 1 ] || image/setup.sh --test   # (skip: a worktree sharing another venv)
pkgs=()
command -v mmdebstrap >/dev/null || pkgs+=(mmdebstrap)
command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
command -v systemd-nspawn >/dev/null || pkgs+=(systemd-container)
command -v mkfs.ext4 >/dev/null || pkgs+=(e2fsprogs)
if [ ${#pkgs[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
export ATOLL_WHEELHOUSE=${ATOLL_WHEELHOUSE:-$here/.cache/wheelhouse}
export ATOLL_IMAGE=${ATOLL_IMAGE:-$here/.cache/image}
export ATOLL_IMAGE_KEYS=${ATOLL_IMAGE_KEYS:-$here/.cache/image-keys}
atoll=.venv/bin/atoll
k=$ATOLL_IMAGE_KEYS
if [ ! -f "$k/root.json" ]; then   # the test site's keys: a root key and a release key
  rm -rf "$k"
  $atoll keys generate root1 --out "$k" >/dev/null
  $atoll keys generate release1 --out "$k" >/dev/null
  $atoll trust init --root-key "$k/root1.pub.json" --bundle-key "$k/release1.pub.json" --expires 365d \
    --sign "$k/root1.key" --out "$k/root.json" >/dev/null
fi
if [ "${ATOLL_IMAGE_REUSE:-0}" != 1 ] || [ ! -f "$ATOLL_IMAGE/root.img" ]; then
  t0=$(date +%s)
  image/wheelhouse.sh "$ATOLL_WHEELHOUSE" --first-boot-key "$k/release1.key" --root-json "$k/root.json"
  t1=$(date +%s)
  image/build-image.sh "$ATOLL_WHEELHOUSE" "$ATOLL_IMAGE" --test
  echo "wheelhouse $((t1 - t0)) s, image $(($(date +%s) - t1)) s"
fi
exec .venv/bin/python -m pytest --image -m image -s -p no:cacheprovider tests/appliance "$@"
