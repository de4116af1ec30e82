#!/bin/bash
# Installs what berth's lanes need on Debian 12 or newer. Idempotent.
# Every tool a test asks for with testenv.RequireTool/HaveTool is here: under CI=true a
# missing one fails the test that needs it.
set -euo pipefail
pkgs=(
  # build and lint
  git make ca-certificates
  # composefs / fs-verity reference tools and filesystems
  erofs-utils fsverity e2fsprogs btrfs-progs dosfstools mtools gdisk attr acl util-linux kmod
  # initramfs, compression, archives
  cpio zstd xz-utils gzip
  # UKI and signing
  binutils sbsigntool osslsigncode openssl systemd-boot-efi
  # systemd-analyze verifies berth's units and the generator's output
  systemd
  # D-Bus, TPM
  dbus swtpm swtpm-tools tpm2-tools
  # containers-storage test (fills a vfs store)
  skopeo
  # VM lane
  qemu-system-x86 qemu-utils ovmf mmdebstrap debian-archive-keyring openssh-client
)
missing=()
for p in "${pkgs[@]}"; do
  case "$p" in \#*) continue;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "deps: run as root (apt-get install needed)" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH=$PATH:/usr/local/go/bin:$HOME/go/bin
go mod download
echo "deps: ok"
