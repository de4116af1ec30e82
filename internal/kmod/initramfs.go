package kmod

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Initramfs is berth-init's module loading in berth's initramfs (the lists
// are written by internal/initrd):
//
//   - always: the modules every boot needs (composefs: erofs, overlay,
//     loop), in the background from the start;
//   - hardware: the drivers whose aliases match a present device
//     (coldplug) or one that appears while we wait (uevents);
//   - storage: every storage driver in the initramfs, loaded only if the
//     root device has not appeared after a while (a device whose driver
//     does not announce a matching alias);
//   - the root filesystem's modules, once its type is known.
//
// All methods are safe on a nil *Initramfs (no modules for this kernel).
type Initramfs struct {
	con     io.Writer
	l       *Loader
	always  []<-chan struct{}
	storage string
	fsDir   string
}

// StartInitramfs starts loading; it returns at once. alwaysList,
// storageList and fsDir are absolute paths of the initramfs's lists.
func StartInitramfs(con io.Writer, alwaysList, storageList, fsDir string) *Initramfs {
	var uts unix.Utsname
	unix.Uname(&uts)
	kver := unix.ByteSliceToString(uts.Release[:])
	dir := filepath.Join("/usr/lib/modules", kver)
	if _, err := os.Stat(dir); err != nil {
		fmt.Fprintf(con, "berth: WARNING: this initramfs has no modules for the running kernel %s (%v); relying on built-in drivers\n", kver, err)
		return nil
	}
	l, err := NewLoader(dir)
	if err != nil {
		fmt.Fprintf(con, "berth: WARNING: module metadata of %s: %v; relying on built-in drivers\n", kver, err)
		return nil
	}
	m := &Initramfs{con: con, l: l, storage: storageList, fsDir: fsDir}
	if err := l.StartHotplug(); err != nil {
		fmt.Fprintf(con, "berth: WARNING: %v; devices that appear later get their drivers only from the storage fallback\n", err)
	}
	// Device drivers first: they are on the way to the root device; the
	// composefs modules are needed only once it is mounted.
	if _, err := l.Coldplug("/sys"); err != nil {
		fmt.Fprintf(con, "berth: WARNING: %v\n", err)
	}
	m.always = l.LoadPaths(readList(alwaysList)...)
	return m
}

// LoadStorage loads every storage driver of the initramfs (the fallback
// when the root device does not show up).
func (m *Initramfs) LoadStorage() {
	if m == nil {
		return
	}
	paths := readList(m.storage)
	fmt.Fprintf(m.con, "berth: root device not found yet; loading all %d storage modules\n", len(paths))
	m.l.LoadPaths(paths...)
}

// LoadFilesystem loads the modules of the root filesystem type and waits
// for them (a missing list: built in, or nothing extra needed).
func (m *Initramfs) LoadFilesystem(fstype string) {
	if m == nil || fstype == "" {
		return
	}
	paths := readList(filepath.Join(m.fsDir, filepath.Base(fstype)))
	m.l.Wait(m.l.LoadPaths(paths...)...)
}

// Finish waits for the modules every boot needs (the root filesystem's
// were waited for by LoadFilesystem), stops listening to uevents (before
// switching root; the real root's udev replays what it missed) and
// reports on the console. Drivers of other devices still probing (AHCI
// scanning empty ports) are not waited for: they finish in the kernel,
// and the real root's udev handles what they find.
func (m *Initramfs) Finish() {
	if m == nil {
		return
	}
	m.l.Wait(m.always...)
	m.l.StopHotplug()
	fmt.Fprintf(m.con, "berth: %s\n", m.l.Summary())
	for _, err := range m.l.Failures() {
		fmt.Fprintf(m.con, "berth: %v\n", err)
	}
}

// readList reads a module list (one path per line; # comments); a missing
// file is an empty list.
func readList(file string) []string {
	f, err := os.Open(file)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}
