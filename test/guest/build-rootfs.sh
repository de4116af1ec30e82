#!/bin/bash
# build-rootfs.sh OUT [PACKAGES] — build a standard Debian guest root filesystem into OUT
# (a directory) from the package list PACKAGES (default: packages.txt beside this script),
# cached: if OUT/.recipe holds the hash of this recipe, nothing is done.
# The recipe is the package list + files/ + this script + the suite. Needs root and mmdebstrap.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-rootfs.sh OUT [PACKAGES] | build-rootfs.sh --hash [PACKAGES]}
pkgs=$(realpath "${2:-$here/packages.txt}")
suite=${SUITE:-trixie}
mirror=${MIRROR:-http://deb.debian.org/debian}
hash=$( (cd "$here" && cat build-rootfs.sh && cat "$pkgs" && find files -print0 | sort -z | xargs -0 ls -ld --time-style=+ | awk '{$6="";print}' && echo "$suite" ) | sha256sum | cut -c1-16)
if [ "$out" = --hash ]; then echo "$hash"; exit 0; fi
if [ -f "$out/.recipe" ] && [ "$(cat "$out/.recipe")" = "$hash" ]; then
  echo "guest rootfs: cached ($out, recipe $hash)"; exit 0
fi
command -v mmdebstrap >/dev/null || { echo "guest rootfs: mmdebstrap is not installed (apt-get install mmdebstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "guest rootfs: must run as root (mmdebstrap --mode=root)" >&2; exit 1; }
include=$(grep -v '^#' "$pkgs" | grep -v '^$' | paste -sd, -)
cache=${DEB_CACHE:-$(dirname "$out")/debs}
mkdir -p "$cache"
rm -rf "$out.tmp"
echo "guest rootfs: mmdebstrap $suite ($include) -> $out"
# --essential-hook copies files/ before the kernel is installed, so the small dracut config is
# in place when the kernel postinst builds the image's own initramfs (dracut runs once).
# root gets an empty password for the serial console of `make vm` (sshd still refuses empty
# passwords; the lane logs in with a per-run key that berth installs).
mmdebstrap --mode=root --variant=apt --include="$include" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --skip=essential/unlink \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' --setup-hook="sync-in $cache /var/cache/apt/archives/" \
  --essential-hook="cp -a $here/files/. \"\$1\"/" \
  --customize-hook='echo berth-guest > "$1"/etc/hostname' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='chroot "$1" passwd -d root >/dev/null' \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/etc/machine-id; : > "$1"/etc/machine-id' \
  "$suite" "$out.tmp" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
echo "$hash" > "$out.tmp/.recipe"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "guest rootfs: built ($out, recipe $hash, $(du -sm "$out" | cut -f1) MB)"
