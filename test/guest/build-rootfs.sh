#!/bin/bash
# build-rootfs.sh OUT [PACKAGES] — build a standard Debian guest root filesystem into OUT
# (a directory) from the package list PACKAGES (default: packages.txt beside this script),
# cached: if OUT/.recipe holds the hash of this recipe, nothing is done.
# The recipe is the package list + files/ + this script + the suite + the extra apt sources +
# the customize hook. Needs root and mmdebstrap.
# Env (set per recipe by the harness, test/e2e/harness/guest.go):
#   SUITE    Debian suite (default trixie)
#   SOURCES  extra apt source lines, one a line (e.g. bookworm-backports), used by the build
#   HOOK     a script beside this one, run as a customize hook with the rootfs as $1 (before
#            the package cache is synced out; it may install or remove packages in the chroot)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-rootfs.sh OUT [PACKAGES] | build-rootfs.sh --hash [PACKAGES]}
pkgs=$(realpath "${2:-$here/packages.txt}")
suite=${SUITE:-trixie}
mirror=${MIRROR:-http://deb.debian.org/debian}
sources=${SOURCES:-}
hook=${HOOK:-}
if [ -n "$hook" ]; then
  case $hook in */*|.*) echo "guest rootfs: HOOK must name a script beside build-rootfs.sh, got $hook" >&2; exit 1;; esac
  [ -f "$here/$hook" ] || { echo "guest rootfs: hook $here/$hook not found" >&2; exit 1; }
fi
hash=$( (cd "$here" && cat build-rootfs.sh && cat "$pkgs" && find files -print0 | sort -z | xargs -0 ls -ld --time-style=+ | awk '{$6="";print}' && echo "$suite" &&
  if [ -n "$sources" ] || [ -n "$hook" ]; then echo "sources:$sources"; echo "hook:$hook"; [ -z "$hook" ] || cat "$hook"; fi ) | sha256sum | cut -c1-16)
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
srcargs=("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main")
while IFS= read -r line; do [ -z "$line" ] || srcargs+=("$line"); done <<<"$sources"
hookargs=()
[ -z "$hook" ] || hookargs=(--customize-hook="$here/$hook \"\$1\"")
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
  "${hookargs[@]}" \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/etc/machine-id; : > "$1"/etc/machine-id' \
  "$suite" "$out.tmp" "${srcargs[@]}"
echo "$hash" > "$out.tmp/.recipe"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "guest rootfs: built ($out, recipe $hash, $(du -sm "$out" | cut -f1) MB)"
