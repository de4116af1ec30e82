#!/bin/bash
# build-tools.sh [OUT] — a cached Debian trixie chroot with systemd-measure, bootctl,
# systemd-stub and ukify, used by internal/uki tests when the VM lane's guest rootfs is not there.
# Prints the chroot path. Cached by the hash of this script: rebuilt only when it changes.
# Needs root and mmdebstrap.
set -euo pipefail
pkgs="systemd,systemd-boot,systemd-boot-efi,systemd-ukify"
hash=$( (cat "$0"; echo "$pkgs") | sha256sum | cut -c1-16)
out=${1:-/var/cache/berth-e2e/tools-$hash}
if [ -f "$out/.recipe" ] && [ "$(cat "$out/.recipe")" = "$hash" ]; then echo "$out"; exit 0; fi
command -v mmdebstrap >/dev/null || { echo "build-tools: mmdebstrap is not installed" >&2; exit 2; }
rm -rf "$out.tmp"; mkdir -p "$(dirname "$out")"
cache=${DEB_CACHE:-/var/cache/berth-e2e/debs}
mkdir -p "$cache"
mmdebstrap --mode=root --variant=apt --include="$pkgs" \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' --setup-hook="sync-in $cache /var/cache/apt/archives/" \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  trixie "$out.tmp" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${MIRROR:-http://deb.debian.org/debian} trixie main" >&2
echo "$hash" > "$out.tmp/.recipe"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
