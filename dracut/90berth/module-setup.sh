#!/bin/bash
# dracut module "berth": lets a systemd (dracut) initrd boot a berth
# deployment. It installs berth-init, berth-generator and
# berth-setup-root.service; the generator pulls the service in only when
# berth.* kernel arguments are present, so the initrd still boots the
# stock system without them. See docs/boot.md.

berth_init=/usr/lib/berth/berth-init
berth_generator=/usr/lib/systemd/system-generators/berth-generator

# Included by default wherever berth is installed.
check() {
    [[ -x $berth_init && -x $berth_generator ]] || return 1
    require_binaries "$berth_init" || return 1
    return 0
}

depends() {
    echo systemd
    return 0
}

installkernel() {
    # composefs: EROFS (file-backed or on a loop device) under overlayfs.
    hostonly='' instmods erofs overlay loop
}

install() {
    # berth-init and the generator are static: no libraries to follow.
    inst_simple "$berth_init"
    inst_simple "$berth_generator" "$systemdutildir/system-generators/berth-generator"
    # Without an installed unit, berth-generator writes its own copy.
    if [[ -f $systemdsystemunitdir/berth-setup-root.service ]]; then
        inst_simple "$systemdsystemunitdir/berth-setup-root.service"
    fi
}
