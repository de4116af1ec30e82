package kmod

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"
)

func TestResolve(t *testing.T) {
	fsys := fstest.MapFS{
		"m/modules.dep": {Data: []byte(
			"kernel/fs/overlayfs/overlay.ko.xz:\n" +
				"kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n" +
				"kernel/fs/jbd2/jbd2.ko.xz: kernel/lib/crc16.ko.xz\n" +
				"kernel/fs/mbcache.ko.xz:\n" +
				"kernel/lib/crc16.ko.xz:\n" +
				"kernel/crypto/crc32c_generic.ko.xz:\n" +
				"kernel/drivers/block/virtio_blk.ko.xz:\n")},
		"m/modules.builtin": {Data: []byte("kernel/drivers/char/tpm/tpm_crb.ko\n")},
		"m/modules.softdep": {Data: []byte("# comment\nsoftdep ext4 pre: crc32c post: nothing\n")},
		"m/modules.alias":   {Data: []byte("alias crc32c crc32c_generic\nalias pci:v* virtio_blk\n")},
	}
	ix, err := ReadIndex(fsys, "m")
	if err != nil {
		t.Fatal(err)
	}
	c := ix.Resolve([]string{"ext4", "virtio-blk", "tpm_crb", "nvme", "overlay"})
	got := strings.Join(c.Order, " ")
	want := "kernel/crypto/crc32c_generic.ko.xz kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz kernel/fs/ext4/ext4.ko.xz kernel/drivers/block/virtio_blk.ko.xz kernel/fs/overlayfs/overlay.ko.xz"
	if got != want {
		t.Errorf("order:\n got %s\nwant %s", got, want)
	}
	if strings.Join(c.Builtin, ",") != "tpm_crb" || strings.Join(c.Missing, ",") != "nvme" {
		t.Errorf("builtin %v missing %v", c.Builtin, c.Missing)
	}
}

func TestReadIndexRefusesTraversal(t *testing.T) {
	for _, dep := range []string{"../../etc/shadow.ko:\n", "/abs.ko:\n", "a.ko: ../b.ko\n", "no colon\n"} {
		fsys := fstest.MapFS{"m/modules.dep": {Data: []byte(dep)}}
		if _, err := ReadIndex(fsys, "m"); err == nil {
			t.Errorf("modules.dep %q accepted", dep)
		}
	}
}

func TestName(t *testing.T) {
	for in, want := range map[string]string{"a/b/virtio-blk.ko.xz": "virtio_blk", "sd_mod.ko": "sd_mod", "x.ko.zst": "x", "y.ko.gz": "y"} {
		if got := Name(in); got != want {
			t.Errorf("Name(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestMatch(t *testing.T) {
	fsys := fstest.MapFS{
		"m/modules.dep": {Data: []byte("a/ahci.ko.xz: a/libahci.ko.xz\na/libahci.ko.xz:\na/virtio_blk.ko.xz:\na/sd_mod.ko.xz:\n")},
		"m/modules.alias": {Data: []byte(
			"alias pci:v*d*sv*sd*bc01sc06i01* ahci\n" +
				"alias virtio:d00000002v* virtio_blk\n" +
				"alias scsi:t-0x00* sd_mod\n" +
				"alias scsi:t-0x0[0-4]* sd_mod\n" +
				"alias fs-ext4 ext4\n")},
	}
	ix, err := ReadIndex(fsys, "m")
	if err != nil {
		t.Fatal(err)
	}
	for alias, want := range map[string]string{
		"pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01": "ahci",
		"pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i00": "",
		"virtio:d00000002v00001AF4":                             "virtio_blk",
		"virtio:d00000001v00001AF4":                             "",
		"scsi:t-0x00":                                           "sd_mod",
		"scsi:t-0x05":                                           "",
		"fs-ext4":                                               "ext4",
	} {
		if got := strings.Join(ix.Match(alias), ","); got != want {
			t.Errorf("Match(%q) = %q, want %q", alias, got, want)
		}
	}
}

func TestFnmatch(t *testing.T) {
	for _, c := range []struct {
		p, s string
		want bool
	}{
		{"*", "", true}, {"a*b", "ab", true}, {"a*b", "axxb", true}, {"a*b", "axxbc", false},
		{"a?c", "abc", true}, {"a?c", "ac", false}, {"[abc]x", "bx", true}, {"[!abc]x", "bx", false},
		{"[a-c]*", "c1", true}, {"[a-c]*", "d1", false}, {"x[", "x[", true}, {"*a*a*a*a*b", strings.Repeat("a", 60), false},
		{"usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*", "usb:v0781p5581d0100dc00dsc00dp00ic08isc06ip50in00", true},
	} {
		if got := fnmatch(c.p, c.s); got != c.want {
			t.Errorf("fnmatch(%q, %q) = %v", c.p, c.s, got)
		}
	}
}

func TestUeventModalias(t *testing.T) {
	msg := []byte("add@/devices/pci0000:00/0000:00:04.0/virtio1\x00ACTION=add\x00DEVPATH=/devices/x\x00SUBSYSTEM=virtio\x00MODALIAS=virtio:d00000002v00001AF4\x00SEQNUM=1\x00")
	if got := ueventModalias(msg); got != "virtio:d00000002v00001AF4" {
		t.Errorf("add event: %q", got)
	}
	if got := ueventModalias([]byte("remove@/devices/x\x00ACTION=remove\x00MODALIAS=virtio:d1\x00")); got != "" {
		t.Errorf("remove event: %q", got)
	}
}

// TestLoaderCycle loads a module set whose metadata has a dependency cycle
// (hostile or broken): every job must finish (no deadlock), each once.
// The files are not modules, so the kernel refuses them (root: ENOEXEC;
// otherwise EPERM) without side effects.
func TestLoaderCycle(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\nd.ko: a.ko\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "modules.softdep"), []byte("softdep a pre: d\n"), 0o644)
	for _, m := range []string{"a", "b", "c", "d"} {
		os.WriteFile(filepath.Join(dir, m+".ko"), []byte("not a module"), 0o644)
	}
	l, err := NewLoader(dir)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		l.Wait(l.LoadPaths("a.ko", "d.ko")...)
		l.LoadNames("c", "b")
		l.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("loader deadlocked on a dependency cycle")
	}
	res := l.Results()
	if len(res) != 4 {
		t.Fatalf("results %v, want one per module", res)
	}
	for _, r := range res {
		if r.Err == nil {
			t.Errorf("%s: garbage module loaded?", r.Path)
		}
	}
	if len(l.Failures()) != 4 || !strings.Contains(l.Summary(), "4 failed") {
		t.Errorf("summary %q", l.Summary())
	}
}
