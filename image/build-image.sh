#!/usr/bin/env bash
# Build the appliance's Debian root filesystem and disk image from a wheelhouse (image/wheelhouse.sh),
# on a connected machine, as root:
#
#   image/build-image.sh WHEELHOUSE OUT [--test] [--size 2G]
#
# OUT/rootfs/    the tree (systemd-nspawn -D OUT/rootfs -b boots it)
# OUT/root.img   ext4 disk image of it (qemu: -drive file=OUT/root.img,if=virtio,format=raw)
# OUT/vmlinuz, OUT/initrd.img   the kernel and initramfs to boot root.img with
#
# Debian bookworm minbase from the mirror this machine's apt sources name, with systemd, udev,
# python3, python3-venv, iproute2, libgomp1 (llama.cpp uses OpenMP) and linux-image-amd64 (not -cloud:
# it lacks USB storage drivers);
# the initramfs holds only virtio_pci, virtio_blk and ext4 (MODULES=list). atoll is installed by the
# wheelhouse's own install.sh inside the tree, with no network, exactly as on a real box; the
# network is systemd-networkd with DHCP on any wired interface.
#
# --test adds what the boot test needs and a site must never ship: a root shell on the second
# serial port (ttyS1), an admin token in OUT/token, the event-loop hang trigger
# (ATOLL_TEST_HANG_SIGNAL=1), IP accounting, and start/watchdog timeouts with slack for a CPU
# emulated by qemu's TCG. A site builds its real image with the same script, without --test.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
house=$(realpath "$1") out=$(realpath -m "$2"); shift 2
test_mode=0 size=2G
while [ $# -gt 0 ]; do
  case "$1" in
    --test) test_mode=1; shift ;;
    --size) size=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$house/requirements.txt" ] || { echo "$house is not a wheelhouse (image/wheelhouse.sh)" >&2; exit 1; }
need() { command -v "$1" >/dev/null || missing+=("$2"); }
missing=()
need mmdebstrap mmdebstrap; need mkfs.ext4 e2fsprogs
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
mirror=${mirror:-http://deb.debian.org/debian}

rm -rf "$out/rootfs"
mkdir -p "$out"
t0=$(date +%s)
mmdebstrap --variant=minbase --quiet \
  --include=systemd,systemd-sysv,udev,python3,python3-venv,iproute2,linux-image-amd64,initramfs-tools,util-linux,libgomp1 \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/atoll"' \
  --customize-hook="\"$here/image/customize.sh\" \"\$1\" \"$house\" $test_mode \"$out\"" \
  bookworm "$out/rootfs" "$mirror"
t1=$(date +%s)
cp -L "$out/rootfs/vmlinuz" "$out/vmlinuz"
cp -L "$out/rootfs/initrd.img" "$out/initrd.img"
rm -f "$out/root.img"
mkfs.ext4 -q -F -L atoll-root -d "$out/rootfs" "$out/root.img" "$size"
t2=$(date +%s)
echo "image built in $out: mmdebstrap+install $((t1 - t0)) s, mkfs $((t2 - t1)) s;" \
  "tree $(du -sh "$out/rootfs" | cut -f1), root.img $(du -h --apparent-size "$out/root.img" | cut -f1) sparse"
