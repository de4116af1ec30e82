#!/bin/sh
# Customize hook of the bookworm recipe (build-rootfs.sh HOOK): the kernel of
# bookworm-backports beside the stock one. $1 is the root filesystem being built.
set -eu
chroot "$1" apt-get install -y --no-install-recommends linux-image-amd64/bookworm-backports
