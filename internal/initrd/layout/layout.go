// Package layout is the file layout of berth's initramfs: the paths the
// initramfs writer (internal/initrd) puts there and berth-init
// (internal/setuproot) reads. It holds only constants, so berth-init can
// import it without the writer's archive and compression code.
package layout

// ModulesLoadList lists the modules every boot loads, in dependency order,
// as paths relative to /usr/lib/modules/<kver>.
const ModulesLoadList = "etc/berth/modules.load"

// StorageModulesList lists every storage driver of the initramfs, loaded
// by berth-init all at once only when the root device does not appear with
// the drivers matching the present devices.
const StorageModulesList = "etc/berth/modules.storage"

// FilesystemModulesDir holds one load list per root filesystem type
// (etc/berth/modules.fs/ext4, …: that filesystem's modules with their
// dependencies). berth-init loads only the list of the filesystem it finds
// on the root device: loading every filesystem up front costs seconds
// (btrfs pulls in raid6/xor, which benchmark themselves at load time).
const FilesystemModulesDir = "etc/berth/modules.fs"
