#!/usr/bin/env bash
# Install atoll on an air-gapped box from a wheelhouse made by image/wheelhouse.sh. Needs no network.
# Run it from the wheelhouse (it is copied there as install.sh), as root:
#
#   ./install.sh [--root DIR] [--flavor auto|cpu|cuda] [--lan "CIDR ..."] [--memory-max SIZE] [--no-start]
#
#   --root DIR      install into a mounted root filesystem (an image being built) instead of this box
#   --flavor        which llama-cpp-python: cuda when the wheelhouse has one and the NVIDIA kernel
#                   driver is loaded (/proc/driver/nvidia/version), else cpu (auto, the default)
#   --lan           the site's LAN ranges allowed to reach atoll (atoll.service.d/10-lan.conf);
#                   without it the example (RFC 1918 + link-local) is installed, unless one exists
#   --memory-max    MemoryMax= for the whole service (atoll.service.d/20-memory.conf), e.g. 12G
#   --no-start      enable the service but do not start it (image builds, chroots)
#
# Before changing anything it checks that every wheel listed in the requirements file is present
# and has the listed SHA-256; a missing or altered wheel stops it with the file named and the box
# untouched. pip then installs with --no-index --require-hashes into a new virtual environment
# /opt/atoll/venv-<version>-<id>; a wheel missing from the list also stops it there, and the new
# directory is removed. Only when that succeeded is /opt/atoll/venv switched to it (a symlink,
# replaced atomically) and the units installed. The previous venv stays for a return.
set -euo pipefail
house=$(cd "$(dirname "$0")" && pwd)
root="" flavor=auto lan="" memory_max="" start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$(realpath -m "$2"); shift 2 ;;
    --flavor) flavor=$2; shift 2 ;;
    --lan) lan=$2; shift 2 ;;
    --memory-max) memory_max=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "install.sh: $*" >&2; exit 1; }

# -- which llama-cpp-python --------------------------------------------------------------------
if [ "$flavor" = auto ]; then
  flavor=cpu
  if [ -f "$house/requirements-cuda.txt" ] && [ -e /proc/driver/nvidia/version ]; then flavor=cuda; fi
fi
case "$flavor" in
  cpu) req=$house/requirements.txt ;;
  cuda) req=$house/requirements-cuda.txt ;;
  *) die "--flavor must be auto, cpu or cuda" ;;
esac
[ -f "$req" ] || die "$req is missing: not a wheelhouse made by image/wheelhouse.sh"

# -- checks that change nothing ----------------------------------------------------------------
py=${PYTHON:-python3}
"$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$py is missing, older than 3.11, or has no venv module (Debian: apt-get install python3-venv)"
bad=0
while read -r line; do
  [[ "$line" =~ ^([A-Za-z0-9_.-]+)==([^ ]+)\ --hash=sha256:([0-9a-f]{64})\ +#\ (.+)$ ]] \
    || die "$(basename "$req"): cannot read the line: $line"
  want=${BASH_REMATCH[3]} file=${BASH_REMATCH[4]}
  if [ ! -f "$house/$file" ]; then
    echo "install.sh: missing wheel: $file (listed in $(basename "$req"))" >&2; bad=1; continue
  fi
  got=$(sha256sum "$house/$file" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "install.sh: hash mismatch: $file has sha256 $got, $(basename "$req") lists $want" >&2; bad=1
  fi
done < <(grep -v '^\s*$' "$req")
[ "$bad" = 0 ] || die "the wheelhouse is incomplete or altered; nothing was changed"
version=$(sed -n 's/^atoll==\([^ ]*\) .*/\1/p' "$req")
[ -n "$version" ] || die "$(basename "$req") lists no atoll wheel"
id=$(sha256sum "$req" | cut -c1-8)

# -- a new venv beside the current one ---------------------------------------------------------
opt=$root/opt/atoll
venv=$opt/venv-$version-$id
if [ -f "$venv/.installed" ]; then
  echo "atoll $version ($id) is already installed in $venv"
else
  rm -rf "$venv"
  made=""  # the topmost directory this run creates, removed with the venv if pip fails
  if [ ! -d "$opt" ]; then
    made=$opt
    while [ ! -d "$(dirname "$made")" ]; do made=$(dirname "$made"); done
    mkdir -p "$opt"
  fi
  trap 'rm -rf "$venv" ${made:+"$made"}' EXIT
  "$py" -m venv "$venv"
  links=(--find-links "$house/wheels" --find-links "$house/llama-$flavor")
  if ! log=$("$venv/bin/python" -m pip install --no-index --require-hashes --no-cache-dir \
        --disable-pip-version-check -q "${links[@]}" -r "$req" 2>&1); then
    echo "$log" | grep -E '^ERROR|requirement|hash|    [A-Za-z0-9_.-]+==' >&2 || echo "$log" >&2
    die "pip could not install from the wheelhouse (above: the package it lacks or refused); nothing was changed"
  fi
  touch "$venv/.installed"
  trap - EXIT
fi
ln -sfn "$(basename "$venv")" "$opt/venv.new"
mv -T "$opt/venv.new" "$opt/venv"
echo "atoll $version: $opt/venv -> $(basename "$venv") ($flavor)"

# -- units, account, directories ---------------------------------------------------------------
sd=$house/systemd
install -D -m 0644 "$sd/atoll.service" "$root/etc/systemd/system/atoll.service"
dropins=$root/etc/systemd/system/atoll.service.d
mkdir -p "$dropins"
if [ -n "$lan" ]; then
  printf '# the site LAN ranges allowed to reach atoll (install.sh --lan)\n[Service]\nIPAddressAllow=%s\n' \
    "$lan" >"$dropins/10-lan.conf"
elif [ ! -f "$dropins/10-lan.conf" ]; then
  cp "$sd/10-lan.conf.example" "$dropins/10-lan.conf"
fi
if [ -n "$memory_max" ]; then
  printf '# install.sh --memory-max\n[Service]\nMemoryMax=%s\n' "$memory_max" >"$dropins/20-memory.conf"
fi
install -D -m 0644 "$sd/99-atoll-usb.rules" "$root/etc/udev/rules.d/99-atoll-usb.rules"
install -D -m 0644 "$sd/atoll.sysusers.conf" "$root/usr/lib/sysusers.d/atoll.conf"
install -D -m 0644 "$sd/atoll.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/atoll.conf"
for f in env.example atoll.toml.example; do
  install -D -m 0644 "$sd/$f" "$root/usr/share/doc/atoll/$f"
done
install -D -m 0644 "$house/README.md" "$root/opt/atoll/README.md"

rootarg=()
[ -n "$root" ] && rootarg=(--root="$root")
systemd-sysusers "${rootarg[@]}" "$root/usr/lib/sysusers.d/atoll.conf"
systemd-tmpfiles "${rootarg[@]}" --create "$root/usr/lib/tmpfiles.d/atoll.conf" 2>/dev/null || true
install -d -m 0750 "$root/var/lib/atoll"
chown "$(awk -F: '$1 == "atoll" { print $3 ":" $4 }' "$root/etc/passwd")" "$root/var/lib/atoll"
systemctl "${rootarg[@]}" enable atoll.service 2>/dev/null

# -- the first-boot bundle (trust root + default models), as the atoll user --------------------
if [ -d "$house/bundle" ] && [ -f "$house/root.json" ] && [ -z "$root" ]; then
  as_atoll=(runuser -u atoll -- env ATOLL_STATE_DIR=/var/lib/atoll)
  if [ ! -f /var/lib/atoll/trust/root.json ]; then
    cp "$house/root.json" /var/lib/atoll/.root.json && chown atoll: /var/lib/atoll/.root.json
    "${as_atoll[@]}" /opt/atoll/venv/bin/atoll trust init --from /var/lib/atoll/.root.json --install \
      --state-dir /var/lib/atoll
    rm -f /var/lib/atoll/.root.json
  fi
  # a copy the atoll user can read (the bundle builder writes blobs 0600)
  first=/var/lib/atoll/.first-boot
  rm -rf "$first" && cp -r "$house/bundle" "$first" && chown -R atoll: "$first"
  "${as_atoll[@]}" /opt/atoll/venv/bin/atoll import --quiet --state-dir /var/lib/atoll "$first" \
    || echo "install.sh: the first-boot bundle was not imported (see above); the box serves nothing until one is" >&2
  rm -rf "$first"
fi

if [ -z "$root" ] && [ "$start" = 1 ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  udevadm control --reload || true
  systemctl restart atoll.service
  echo "atoll started: journalctl -u atoll"
fi
