#!/usr/bin/env bash
# mmdebstrap customize hook of image/build-image.sh: ROOTFS WHEELHOUSE TEST_MODE OUT
# Small initramfs, networkd with DHCP, atoll from the wheelhouse (install.sh, offline), and for
# the boot test (TEST_MODE=1) the test-only extras described in build-image.sh.
set -euo pipefail
rootfs=$1 house=$2 test_mode=$3 out=$4
in_root() { chroot "$rootfs" "$@"; }

# initramfs: only what finding the root disk needs (MODULES=list was set before the kernel came)
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$rootfs/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null

echo atoll >"$rootfs/etc/hostname"
mkdir -p "$rootfs/etc/systemd/network"
cat >"$rootfs/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
systemctl --root="$rootfs" enable systemd-networkd.service >/dev/null 2>&1

# atoll, exactly as on a real box: the wheelhouse's installer, no network
rm -rf "$rootfs/tmp/wheelhouse"
cp -r "$house" "$rootfs/tmp/wheelhouse"
in_root bash /tmp/wheelhouse/install.sh --no-start
rm -rf "$rootfs/tmp/wheelhouse"

if [ "$test_mode" = 1 ]; then
  mkdir -p "$rootfs/etc/systemd/system/atoll.service.d"
  cat >"$rootfs/etc/systemd/system/atoll.service.d/50-test.conf" <<'EOF'
# boot test only: Python is slow on qemu's emulated CPU; the hang trigger; IP counters
[Service]
Environment=ATOLL_TEST_HANG_SIGNAL=1 ATOLL_N_CTX=512 ATOLL_LOAD_TIMEOUT=600 ATOLL_HEALTH_TIMEOUT=1200 ATOLL_REQUEST_TIMEOUT=1200
TimeoutStartSec=900
WatchdogSec=20
IPAccounting=yes
EOF
  # a root shell on the second serial port, for the test to drive the box (never in a real image)
  cat >"$rootfs/etc/systemd/system/test-shell.service" <<'EOF'
[Unit]
Description=boot test: root shell on ttyS1
ConditionPathExists=/dev/ttyS1
[Service]
ExecStart=/bin/sh -c 'stty -echo -onlcr; exec /bin/sh'
StandardInput=tty-force
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS1
Restart=always
[Install]
WantedBy=multi-user.target
EOF
  systemctl --root="$rootfs" enable test-shell.service >/dev/null 2>&1
  systemctl --root="$rootfs" mask getty@tty1.service serial-getty@ttyS0.service serial-getty@ttyS1.service \
    console-getty.service >/dev/null 2>&1
  in_root runuser -u atoll -- /opt/atoll/venv/bin/atoll token create --role admin --name boot-test \
    --state-dir /var/lib/atoll >"$out/token"
fi
