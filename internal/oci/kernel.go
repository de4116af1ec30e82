package oci

import (
	"path"
	"sort"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
)

// NoKernelError says an image carries no kernel berth can boot, and what
// to add to the image to fix that.
type NoKernelError struct{}

func (*NoKernelError) Error() string {
	return "the image contains no kernel (looked for /usr/lib/modules/$kver/vmlinuz and /boot/vmlinuz-$kver); " +
		"add one to the image, e.g. Debian/Ubuntu: `RUN apt-get install -y linux-image-amd64` (Ubuntu: linux-image-generic), " +
		"Fedora: `RUN dnf install -y kernel`, Arch: `RUN pacman -S --noconfirm linux`"
}

// FindKernels returns the sorted kernel versions an image tree carries:
// /usr/lib/modules/$kver/vmlinuz (Fedora, Arch, bootc style) and
// /boot/vmlinuz-$kver (Debian, Ubuntu). A symlink counts when it resolves,
// inside the tree, to a regular file. No kernel gives *NoKernelError.
func FindKernels(root *composefs.Inode) ([]string, error) {
	found := map[string]bool{}
	for _, modDir := range []string{"usr/lib/modules", "lib/modules"} {
		mods := resolve(root, modDir, 0)
		if mods == nil || !mods.IsDir() {
			continue
		}
		for _, kver := range mods.SortedNames() {
			if isRegular(root, path.Join(modDir, kver, "vmlinuz")) {
				found[kver] = true
			}
		}
	}
	if boot := resolve(root, "boot", 0); boot != nil && boot.IsDir() {
		for _, name := range boot.SortedNames() {
			kver, ok := strings.CutPrefix(name, "vmlinuz-")
			if !ok || kver == "" || strings.HasSuffix(kver, ".old") {
				continue
			}
			if isRegular(root, "boot/"+name) {
				found[kver] = true
			}
		}
	}
	if len(found) == 0 {
		return nil, &NoKernelError{}
	}
	out := make([]string, 0, len(found))
	for k := range found {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

func isRegular(root *composefs.Inode, p string) bool {
	n := resolve(root, p, 0)
	return n != nil && n.Type() == composefs.SIFREG
}

// resolve looks p up in the tree, following symlinks (absolute ones
// relative to the tree root) with a depth limit, never leaving the tree.
func resolve(root *composefs.Inode, p string, depth int) *composefs.Inode {
	if depth > 16 {
		return nil
	}
	cur := root
	parts := strings.Split(strings.Trim(p, "/"), "/")
	curPath := ""
	for i, c := range parts {
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			curPath = path.Dir("/" + curPath)[1:]
			cur = resolve(root, curPath, depth+1)
			if cur == nil {
				return nil
			}
			continue
		}
		if cur == nil || !cur.IsDir() {
			return nil
		}
		next := cur.Children[c]
		if next == nil {
			return nil
		}
		if next.Type() == composefs.SIFLNK {
			t := next.Target
			if !strings.HasPrefix(t, "/") {
				t = path.Join("/"+curPath, t)
			}
			rest := strings.Join(parts[i+1:], "/")
			return resolve(root, path.Join(t, rest), depth+1)
		}
		cur = next
		curPath = path.Join(curPath, c)
	}
	return cur
}
