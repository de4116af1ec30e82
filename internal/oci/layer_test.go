package oci

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
)

// memSink stands in for the object store in tests of tar parsing alone;
// digests are plain sha256 here (the real store computes fs-verity).
type memSink struct {
	mu      sync.Mutex
	objects map[string][]byte
	calls   int
}

func (m *memSink) AddReader(r io.Reader) ([]byte, int64, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, 0, err
	}
	d := sha256.Sum256(data)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.objects == nil {
		m.objects = map[string][]byte{}
	}
	m.objects[string(d[:])] = data
	m.calls++
	return d[:], int64(len(data)), nil
}

func applyTars(t *testing.T, layers ...[]byte) (*composefs.Inode, error) {
	t.Helper()
	root := NewRoot()
	sink := &memSink{}
	for _, l := range layers {
		entries, err := readLayer(bytes.NewReader(l), sink, readLimits{}, nil)
		if err != nil {
			return nil, err
		}
		if err := applyLayer(root, entries); err != nil {
			return nil, err
		}
	}
	return root, nil
}

func TestLayerSemantics(t *testing.T) {
	big := strings.Repeat("0123456789", 20)
	long := strings.Repeat("l", 250)
	longPath := strings.Repeat("deep/", 150) + "f"
	l1 := makeTar(t,
		dir("etc/", 0o755),
		file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
		file("usr/bin/tool", big, 0o4755), // parent dirs missing: created like tar -x does
		hardlink("usr/bin/tool-alias", "usr/bin/tool"),
		dir("gone/", 0o755),
		file("gone/f", "x", 0o644),
		dir("opq/", 0o700),
		file("opq/lower1", "1", 0o644),
		file("opq/lower2", "2", 0o644),
		symlink("lib", "usr/lib"),
		tarEntry{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		tarEntry{name: "dev/sda1", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 1},
		tarEntry{name: "dev/big", typ: tar.TypeChar, mode: 0o600, major: 259, minor: 70000},
		tarEntry{name: "run/fifo", typ: tar.TypeFifo, mode: 0o600},
		tarEntry{name: "bin/ping", typ: tar.TypeReg, mode: 0o755, body: []byte(big), uid: 0, gid: 0,
			xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00", "user.note": "hi"}},
		file("empty", "", 0o600),
		file(long, "long name", 0o644),
		file(longPath, "deep", 0o644),
		file("replaced-by-dir", "f", 0o644),
		dir("replaced-by-file/", 0o755),
		file("replaced-by-file/child", "c", 0o644),
	)
	l2 := makeTar(t,
		file(".wh.gone", "", 0o644),
		dir("opq/", 0o750),
		file("opq/.wh..wh..opq", "", 0o644),
		file("opq/upper", "u", 0o644),
		hardlink("etc/passwd-link", "usr/bin/tool"), // hardlink to a lower layer's file
		dir("replaced-by-dir/", 0o711),
		file("replaced-by-file", "now a file", 0o644),
		file("etc/.wh.nonexistent", "", 0o644), // whiteout of nothing: no-op
		file(".wh..wh.plnk", "", 0o644),        // AUFS bookkeeping: ignored
	)
	root, err := applyTars(t, l1, l2)
	if err != nil {
		t.Fatal(err)
	}
	if root.Lookup("gone") != nil {
		t.Error("whiteout did not remove /gone")
	}
	opq := root.Lookup("opq")
	if opq == nil || len(opq.Children) != 1 || opq.Children["upper"] == nil {
		t.Errorf("opaque dir: got children %v", opq.SortedNames())
	}
	if opq.Mode&0o7777 != 0o750 {
		t.Errorf("opaque dir mode %o, want 750", opq.Mode&0o7777)
	}
	tool := root.Lookup("usr/bin/tool")
	if tool == nil || tool != root.Lookup("usr/bin/tool-alias") || tool != root.Lookup("etc/passwd-link") {
		t.Error("hardlinks (within and across layers) are not the same inode")
	}
	if tool.Mode != composefs.SIFREG|0o4755 || tool.Size != uint64(len(big)) || len(tool.Digest) != 32 || tool.Payload == "" {
		t.Errorf("tool: mode %o size %d digest %x payload %q", tool.Mode, tool.Size, tool.Digest, tool.Payload)
	}
	if n := root.Lookup("etc/passwd"); n == nil || string(n.Inline) != "root:x:0:0::/root:/bin/sh\n" {
		t.Error("inline file content wrong")
	}
	if n := root.Lookup("empty"); n == nil || n.Inline != nil || n.Digest != nil || n.Size != 0 {
		t.Error("empty file wrong")
	}
	if n := root.Lookup("dev/null"); n == nil || n.Type() != composefs.SIFCHR || n.Rdev != 1<<8|3 {
		t.Errorf("dev/null: %+v", n)
	}
	if n := root.Lookup("dev/big"); n == nil || n.Rdev != (70000&0xff)|(259<<8)|((70000&^0xff)<<12) {
		t.Errorf("dev/big rdev wrong: %+v", n)
	}
	if n := root.Lookup("dev/sda1"); n == nil || n.Type() != composefs.SIFBLK {
		t.Error("block device missing")
	}
	if n := root.Lookup("run/fifo"); n == nil || n.Type() != composefs.SIFIFO {
		t.Error("fifo missing")
	}
	ping := root.Lookup("bin/ping")
	if v, ok := ping.Xattr("security.capability"); !ok || string(v) != "\x01\x00\x00\x02\x00\x20\x00\x00" {
		t.Error("security.capability lost")
	}
	if v, ok := ping.Xattr("user.note"); !ok || string(v) != "hi" {
		t.Error("user xattr lost")
	}
	if n := root.Lookup("lib"); n == nil || n.Type() != composefs.SIFLNK || n.Target != "usr/lib" {
		t.Error("symlink wrong")
	}
	if root.Lookup(long) == nil || root.Lookup(longPath) == nil {
		t.Error("long names missing")
	}
	if n := root.Lookup("replaced-by-dir"); n == nil || !n.IsDir() || n.Mode&0o7777 != 0o711 {
		t.Error("file not replaced by dir")
	}
	if n := root.Lookup("replaced-by-file"); n == nil || n.Type() != composefs.SIFREG {
		t.Error("dir not replaced by file")
	}
	if root.Lookup(".wh..wh.plnk") != nil || root.Lookup("etc/.wh.nonexistent") != nil {
		t.Error("whiteout markers leaked into the tree")
	}
	if n := root.Lookup("etc/passwd"); n.Mtime.Sec != testTime.Unix() || n.Mtime.Nsec != uint32(testTime.Nanosecond()) {
		t.Errorf("mtime %+v, want %v", n.Mtime, testTime)
	}
}

// A later layer that replaces one name of a hardlinked pair leaves the other
// name with the old content, as tar -x (unlink + create) does.
func TestHardlinkBrokenByLaterLayer(t *testing.T) {
	l1 := makeTar(t, file("a", "old", 0o644), hardlink("b", "a"))
	l2 := makeTar(t, file("a", "new", 0o644))
	root, err := applyTars(t, l1, l2)
	if err != nil {
		t.Fatal(err)
	}
	if string(root.Lookup("a").Inline) != "new" || string(root.Lookup("b").Inline) != "old" {
		t.Error("replacing one hardlink name changed the other")
	}
}

func TestHostileLayers(t *testing.T) {
	oneTiB := int64(1) << 40
	cases := []struct {
		name   string
		layers [][]byte
		want   string
	}{
		{"dotdot", [][]byte{makeTar(t, file("a/../../etc/passwd", "x", 0o644))}, `".." component`},
		{"dotdot-only", [][]byte{makeTar(t, file("..", "x", 0o644))}, `".." component`},
		{"absolute", [][]byte{makeTar(t, file("/etc/passwd", "x", 0o644))}, "absolute path"},
		{"symlinked-parent", [][]byte{makeTar(t, symlink("a", "/etc"), file("a/passwd", "x", 0o644))}, `written through symlink "a" -> "/etc"`},
		{"symlinked-parent-across-layers", [][]byte{makeTar(t, symlink("a", "../../etc")), makeTar(t, file("a/shadow", "x", 0o644))}, "written through symlink"},
		{"symlinked-parent-dir-entry", [][]byte{makeTar(t, symlink("a", "/etc"), dir("a/sub/", 0o755))}, "written through symlink"},
		{"hardlink-missing", [][]byte{makeTar(t, hardlink("b", "nonexistent"))}, "does not exist"},
		{"hardlink-outside", [][]byte{makeTar(t, hardlink("b", "../../etc/shadow"))}, `".." component`},
		{"hardlink-absolute", [][]byte{makeTar(t, hardlink("b", "/etc/shadow"))}, "absolute path"},
		{"hardlink-through-symlink", [][]byte{makeTar(t, symlink("s", "/etc"), hardlink("b", "s/shadow"))}, "does not exist"},
		{"hardlink-to-dir", [][]byte{makeTar(t, dir("d/", 0o755), hardlink("b", "d"))}, "hardlink to directory"},
		{"duplicate", [][]byte{makeTar(t, file("a", "1", 0o644), file("a", "2", 0o644))}, "duplicate entry"},
		{"duplicate-spelled-differently", [][]byte{makeTar(t, file("a/b", "1", 0o644), file("./a//b", "2", 0o644))}, "duplicate entry"},
		{"path-max", [][]byte{makeTar(t, file(strings.Repeat("d/", 2100)+"f", "x", 0o644))}, "longer than PATH_MAX"},
		{"name-max", [][]byte{makeTar(t, file(strings.Repeat("n", 256), "x", 0o644))}, "longer than NAME_MAX"},
		{"one-tib", [][]byte{headerOnly(t, "huge", oneTiB)}, "header claims 1.0 TiB"},
		{"truncated", [][]byte{truncate(makeTar(t, file("big", strings.Repeat("x", 100000), 0o644)), 5000)}, "truncated layer"},
		{"nul-in-name", [][]byte{paxNameWithNUL(t)}, "invalid"},
		{"xattr-namespace", [][]byte{makeTar(t, tarEntry{name: "x", typ: tar.TypeReg, mode: 0o644, xattrs: map[string]string{"bogus.key": "v"}})}, "not in a Linux namespace"},
		{"root-not-dir", [][]byte{makeTar(t, file(".", "", 0o644))}, "root must be a directory"},
		{"parent-is-file", [][]byte{makeTar(t, file("f", "x", 0o644), file("f/g", "y", 0o644))}, `parent "f" is not a directory`},
		{"whiteout-dotdot", [][]byte{makeTar(t, file("a/.wh...", "", 0o644))}, "whiteout of"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := applyTars(t, c.layers...)
			if err == nil {
				t.Fatalf("accepted a hostile layer")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not mention %q", err, c.want)
			}
		})
	}
}

// The 1 TiB header must fail before any content is read.
func TestHugeHeaderFailsEarly(t *testing.T) {
	sink := &memSink{}
	_, err := readLayer(bytes.NewReader(headerOnly(t, "huge", 1<<40)), sink, readLimits{}, nil)
	var le *LayerError
	if !errors.As(err, &le) || sink.calls != 0 {
		t.Fatalf("err %v, sink calls %d", err, sink.calls)
	}
}

func headerOnly(t *testing.T, name string, size int64) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	must(t, tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, Format: tar.FormatPAX}))
	tw.Flush() // a Close would complain about the missing content
	return buf.Bytes()
}

func truncate(b []byte, n int) []byte { return b[:n] }

// paxNameWithNUL builds a tar whose PAX path record contains a NUL byte
// (Go's writer refuses to produce one, so the records are written by hand).
func paxNameWithNUL(t *testing.T) []byte {
	rec := func(k, v string) string {
		body := " " + k + "=" + v + "\n"
		n := len(body)
		for {
			s := strconv(n+len(strconv(n))) + body
			if len(s) == n+len(strconv(n)) {
				return s
			}
			n++
		}
	}
	pax := rec("path", "etc/pass\x00wd")
	var buf bytes.Buffer
	buf.Write(rawHeader("PaxHeaders/x", 'x', len(pax)))
	buf.WriteString(pax)
	buf.Write(make([]byte, (512-len(pax)%512)%512))
	buf.Write(rawHeader("placeholder", '0', 0))
	buf.Write(make([]byte, 1024))
	return buf.Bytes()
}

// rawHeader encodes a USTAR header block by hand.
func rawHeader(name string, typ byte, size int) []byte {
	h := make([]byte, 512)
	copy(h[0:100], name)
	copy(h[100:108], "0000644\x00")
	copy(h[108:116], "0000000\x00")
	copy(h[116:124], "0000000\x00")
	copy(h[124:136], fmt.Sprintf("%011o\x00", size))
	copy(h[136:148], "00000000000\x00")
	h[156] = typ
	copy(h[257:265], "ustar\x0000")
	copy(h[148:156], "        ")
	sum := 0
	for _, c := range h {
		sum += int(c)
	}
	copy(h[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return h
}

func strconv(n int) string {
	var b []byte
	if n == 0 {
		return "0"
	}
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}

func TestFindKernels(t *testing.T) {
	root, err := applyTars(t, makeTar(t,
		file("usr/lib/modules/6.12.0-1-amd64/vmlinuz", strings.Repeat("k", 100), 0o644),
		dir("usr/lib/modules/6.1.0-no-kernel/", 0o755),
		file("boot/vmlinuz-6.13.0", strings.Repeat("k", 100), 0o644),
		symlink("boot/vmlinuz-6.14.0", "../usr/lib/modules/6.12.0-1-amd64/vmlinuz"),
		symlink("boot/vmlinuz-dangling", "/nonexistent"),
		symlink("boot/vmlinuz", "vmlinuz-6.13.0"),
	))
	if err != nil {
		t.Fatal(err)
	}
	got, err := FindKernels(root)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "6.12.0-1-amd64,6.13.0,6.14.0" {
		t.Errorf("kernels %v", got)
	}
	empty, _ := applyTars(t, makeTar(t, file("etc/os-release", "ID=debian\n", 0o644)))
	_, err = FindKernels(empty)
	var nk *NoKernelError
	if !errors.As(err, &nk) || !strings.Contains(err.Error(), "apt-get install -y linux-image-amd64") {
		t.Errorf("no-kernel error: %v", err)
	}
}
