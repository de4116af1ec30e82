#!/bin/sh
# Customize hook of the bootc-style recipe (build-rootfs.sh HOOK), $1 the root filesystem:
# the kernel lives only in /usr/lib/modules/$kver/vmlinuz (as bootc images have it), /boot is
# empty, and no initramfs generator is installed (berth builds its own initramfs).
set -eu
root=$1
for k in "$root"/boot/vmlinuz-*; do
  [ -e "$k" ] || continue
  kver=${k##*/vmlinuz-}
  [ -d "$root/usr/lib/modules/$kver" ] || { echo "hook-bootc: $k has no /usr/lib/modules/$kver" >&2; exit 1; }
  mv "$k" "$root/usr/lib/modules/$kver/vmlinuz"
  [ ! -e "$root/boot/config-$kver" ] || mv "$root/boot/config-$kver" "$root/usr/lib/modules/$kver/config"
  [ ! -e "$root/boot/System.map-$kver" ] || mv "$root/boot/System.map-$kver" "$root/usr/lib/modules/$kver/System.map"
done
gens=$(chroot "$root" dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' initramfs-tools initramfs-tools-core dracut dracut-core dracut-install 2>/dev/null | awk '$1 ~ /^.i/ {print $2}')
# linux-image depends on an initramfs generator: purge it anyway (--force-depends).
[ -z "$gens" ] || chroot "$root" dpkg --purge --force-depends $gens
rm -rf "$root"/boot/* "$root"/vmlinuz* "$root"/initrd.img* "$root"/boot/.[!.]*
if ls "$root"/usr/lib/modules/*/vmlinuz >/dev/null 2>&1; then :; else echo "hook-bootc: no kernel in /usr/lib/modules" >&2; exit 1; fi
if [ -e "$root/usr/lib/systemd/boot/efi" ]; then echo "hook-bootc: systemd-boot-efi is installed" >&2; exit 1; fi
