package harness

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// makeTree builds a small root filesystem with every kind of entry the packer handles.
func makeTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"usr/bin", "usr/lib/modules/6.12.0/kernel", "boot", "etc", "dev", "var/lib"} {
		must(os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	must(os.WriteFile(filepath.Join(root, "usr/bin/tool"), []byte("#!/bin/sh\necho tool\n"), 0o755))
	must(os.Link(filepath.Join(root, "usr/bin/tool"), filepath.Join(root, "usr/bin/tool-alias")))
	must(os.WriteFile(filepath.Join(root, "usr/lib/modules/6.12.0/vmlinuz"), []byte("kernel"), 0o644))
	must(os.WriteFile(filepath.Join(root, "boot/vmlinuz-6.12.0"), []byte("kernel"), 0o600))
	must(os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("guest\n"), 0o644))
	must(os.Symlink("usr/bin", filepath.Join(root, "bin")))
	must(os.Chmod(filepath.Join(root, "usr/bin"), 0o755|os.ModeSetgid))
	must(syscall.Mkfifo(filepath.Join(root, "var/lib/fifo"), 0o600))
	must(os.Chown(filepath.Join(root, "etc/hostname"), 123, 456))
	must(os.WriteFile(filepath.Join(root, ".recipe"), []byte("x"), 0o644))
	// An xattr with a binary value, as security.capability would be.
	if err := unix.Lsetxattr(filepath.Join(root, "usr/bin/tool"), "user.berth-test", []byte{0, 1, 2, 0xff}, 0); err != nil {
		t.Logf("no user xattrs on %s (%v): xattr round trip not checked", root, err)
	}
	// A device node under /dev is dropped (only root can make one).
	if os.Geteuid() == 0 {
		must(unix.Mknod(filepath.Join(root, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	}
	return root
}

type entry struct {
	typ             byte
	mode            int64
	uid, gid        int
	link, body, xat string
}

// readArchive unpacks the layers of an oci-archive written by PackOCIArchive.
func readArchive(t *testing.T, path string) (layers []map[string]entry, manifest map[string]any) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	var index struct {
		Manifests []struct{ Digest string } `json:"manifests"`
	}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		switch {
		case h.Name == "index.json":
			if err := json.Unmarshal(b, &index); err != nil {
				t.Fatal(err)
			}
		case strings.HasPrefix(h.Name, "blobs/sha256/") && h.Typeflag == tar.TypeReg:
			blobs["sha256:"+strings.TrimPrefix(h.Name, "blobs/sha256/")] = b
			if got := sha256Digest(b); got != "sha256:"+strings.TrimPrefix(h.Name, "blobs/sha256/") {
				t.Errorf("blob %s has digest %s", h.Name, got)
			}
		}
	}
	if len(index.Manifests) != 1 {
		t.Fatalf("index has %d manifests", len(index.Manifests))
	}
	var m struct {
		Layers []struct{ Digest string } `json:"layers"`
	}
	mb := blobs[index.Manifests[0].Digest]
	json.Unmarshal(mb, &manifest)
	if err := json.Unmarshal(mb, &m); err != nil {
		t.Fatal(err)
	}
	for _, l := range m.Layers {
		zr, err := gzip.NewReader(strings.NewReader(string(blobs[l.Digest])))
		if err != nil {
			t.Fatal(err)
		}
		lt := tar.NewReader(zr)
		entries := map[string]entry{}
		for {
			h, err := lt.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(lt)
			if h.Uname != "" || h.Gname != "" {
				t.Errorf("%s: user/group names %q/%q in a layer", h.Name, h.Uname, h.Gname)
			}
			entries[h.Name] = entry{typ: h.Typeflag, mode: h.Mode, uid: h.Uid, gid: h.Gid, link: h.Linkname,
				body: string(b), xat: h.PAXRecords["SCHILY.xattr.user.berth-test"]}
		}
		layers = append(layers, entries)
	}
	return layers, manifest
}

func TestPackOCIArchive(t *testing.T) {
	root := makeTree(t)
	out := filepath.Join(t.TempDir(), "img.oci.tar")
	res, err := PackOCIArchive(root, out, PackOptions{Skip: []string{".recipe"}})
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := readArchive(t, out)
	if len(layers) != 3 {
		t.Fatalf("%d layers, want 3 (kernel, usr, rest)", len(layers))
	}
	names := func(m map[string]entry) []string {
		var s []string
		for k := range m {
			s = append(s, k)
		}
		sort.Strings(s)
		return s
	}
	kernel, usr, rest := layers[0], layers[1], layers[2]
	want := map[int][]string{
		0: {"boot/", "boot/vmlinuz-6.12.0", "usr/", "usr/lib/", "usr/lib/modules/", "usr/lib/modules/6.12.0/", "usr/lib/modules/6.12.0/kernel/", "usr/lib/modules/6.12.0/vmlinuz"},
		1: {"usr/", "usr/bin/", "usr/bin/tool", "usr/bin/tool-alias", "usr/lib/"},
		2: {"bin", "dev/", "etc/", "etc/hostname", "var/", "var/lib/", "var/lib/fifo"},
	}
	for i, l := range layers {
		if got := strings.Join(names(l), " "); got != strings.Join(want[i], " ") {
			t.Errorf("layer %d: %s\nwant %s", i, got, strings.Join(want[i], " "))
		}
	}
	if e := usr["usr/bin/tool-alias"]; e.typ != tar.TypeLink || e.link != "usr/bin/tool" {
		t.Errorf("hardlink: %+v", e)
	}
	if e := usr["usr/bin/tool"]; e.body != "#!/bin/sh\necho tool\n" || e.mode != 0o755 {
		t.Errorf("tool: %+v", e)
	}
	if e := usr["usr/bin/"]; e.mode != 0o2755 {
		t.Errorf("setgid dir mode %o", e.mode)
	}
	if x, err := unix.Lgetxattr(filepath.Join(root, "usr/bin/tool"), "user.berth-test", make([]byte, 16)); err == nil && x == 4 {
		if e := usr["usr/bin/tool"]; e.xat != "\x00\x01\x02\xff" {
			t.Errorf("xattr not carried as PAX record: %q", e.xat)
		}
	}
	if e := rest["etc/hostname"]; e.uid != 123 || e.gid != 456 {
		t.Errorf("numeric owner: %+v", e)
	}
	if e := rest["bin"]; e.typ != tar.TypeSymlink || e.link != "usr/bin" {
		t.Errorf("symlink: %+v", e)
	}
	if e := rest["var/lib/fifo"]; e.typ != tar.TypeFifo {
		t.Errorf("fifo: %+v", e)
	}
	if e := kernel["boot/vmlinuz-6.12.0"]; e.mode != 0o600 || e.body != "kernel" {
		t.Errorf("kernel: %+v", e)
	}

	// Deterministic: a second pack of the same tree is byte-identical.
	out2 := filepath.Join(t.TempDir(), "img2.oci.tar")
	res2, err := PackOCIArchive(root, out2, PackOptions{Skip: []string{".recipe"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ManifestDigest != res2.ManifestDigest {
		t.Errorf("manifest digest differs between two packs: %s vs %s", res.ManifestDigest, res2.ManifestDigest)
	}
	b1, _ := os.ReadFile(out)
	b2, _ := os.ReadFile(out2)
	if string(b1) != string(b2) {
		t.Error("archives differ between two packs of the same tree")
	}

	// An independent OCI implementation reads it.
	if testenv.HaveTool(t, "skopeo", "skopeo") {
		outp, err := exec.Command("skopeo", "inspect", "oci-archive:"+out).CombinedOutput()
		if err != nil {
			t.Fatalf("skopeo inspect: %v: %s", err, outp)
		}
		var inspect struct{ Layers []string }
		if err := json.Unmarshal(outp, &inspect); err != nil || len(inspect.Layers) != 3 || inspect.Layers[0] != res.Layers[0] {
			t.Errorf("skopeo inspect: %v %s", err, outp)
		}
	}
}

func TestPackRefusesDeviceOutsideDev(t *testing.T) {
	testenv.RequireRoot(t, "mknod")
	root := t.TempDir()
	if err := unix.Mknod(filepath.Join(root, "sda"), unix.S_IFBLK|0o600, int(unix.Mkdev(8, 0))); err != nil {
		t.Fatal(err)
	}
	_, err := PackOCIArchive(root, filepath.Join(t.TempDir(), "x.tar"), PackOptions{})
	if err == nil || !strings.Contains(err.Error(), "unsupported file type") {
		t.Fatalf("want an unsupported file type error, got %v", err)
	}
}
