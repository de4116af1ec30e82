#!/bin/bash
# build-rootfs.sh OUT — build the standard Debian trixie guest root filesystem into OUT
# (a directory), cached: if OUT/.recipe holds the hash of this recipe, nothing is done.
# The recipe is packages.txt + files/ + this script. Needs root and mmdebstrap.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-rootfs.sh OUT}
suite=${SUITE:-trixie}
mirror=${MIRROR:-http://deb.debian.org/debian}
hash=$( (cd "$here" && cat build-rootfs.sh packages.txt && find files -print0 | sort -z | xargs -0 ls -ld --time-style=+ | awk '{$6="";print}' && echo "$suite" ) | sha256sum | cut -c1-16)
if [ -f "$out/.recipe" ] && [ "$(cat "$out/.recipe")" = "$hash" ]; then
  echo "guest rootfs: cached ($out, recipe $hash)"; exit 0
fi
include=$(grep -v '^#' "$here/packages.txt" | grep -v '^$' | paste -sd, -)
cache=${DEB_CACHE:-$(dirname "$out")/debs}
mkdir -p "$cache"
rm -rf "$out.tmp"
echo "guest rootfs: mmdebstrap $suite ($include) -> $out"
mmdebstrap --mode=root --variant=apt --include="$include" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --skip=essential/unlink \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' --setup-hook="sync-in $cache /var/cache/apt/archives/" \
  --essential-hook="cp -a $here/files/. \"\$1\"/" \
  --customize-hook='echo berth-guest > "$1"/etc/hostname' \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/etc/machine-id; : > "$1"/etc/machine-id' \
  "$suite" "$out.tmp" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
echo "$hash" > "$out.tmp/.recipe"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "guest rootfs: built ($out, recipe $hash, $(du -sm "$out" | cut -f1) MB)"
