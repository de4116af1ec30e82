package fsverity

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// toolDigest runs the Debian fsverity tool, the reference implementation.
func toolDigest(t *testing.T, path string, alg Algorithm) []byte {
	t.Helper()
	// The Debian fsverity tool is the reference for these digests.
	bin := testenv.RequireTool(t, "fsverity", "fsverity")
	out, err := exec.Command(bin, "digest", "--hash-alg="+alg.String(), "--block-size=4096", path).CombinedOutput()
	if err != nil {
		t.Fatalf("fsverity digest %s: %v: %s", path, err, out)
	}
	// Output: "sha256:<hex> <path>"
	f := strings.Fields(string(out))
	if len(f) < 1 || !strings.HasPrefix(f[0], alg.String()+":") {
		t.Fatalf("unexpected fsverity output %q", out)
	}
	d, err := hex.DecodeString(strings.TrimPrefix(f[0], alg.String()+":"))
	if err != nil {
		t.Fatalf("parse fsverity output %q: %v", out, err)
	}
	return d
}

func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func randBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

var algs = []Algorithm{SHA256, SHA512}

func TestDigestMatchesTool(t *testing.T) {
	dir := t.TempDir()
	sizes := []int{0, 1, 4095, 4096, 4097, 128 * 4096, 128*4096 + 1, 129 * 4096, 64*4096 + 7, 1 << 20}
	for _, size := range sizes {
		data := randBytes(size, uint64(size))
		p := writeFile(t, dir, "f", data)
		for _, alg := range algs {
			want := toolDigest(t, p, alg)
			got, err := Digest(bytes.NewReader(data), alg)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("Digest size=%d %s = %x, tool says %x", size, alg, got, want)
			}
			if len(got) != alg.Size() {
				t.Errorf("digest length %d, want %d", len(got), alg.Size())
			}
			gotFile, err := DigestFile(p, alg)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(gotFile, want) {
				t.Errorf("DigestFile size=%d %s = %x, tool says %x", size, alg, gotFile, want)
			}
		}
	}
}

// TestSparseFile checks a >128 MiB sparse file (a three-level tree for
// sha256, four for sha512) with data islands at unaligned offsets, hashed
// through the SEEK_DATA/SEEK_HOLE path.
func TestSparseFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	const size = 130<<20 + 12345
	islands := []int64{0, 5000, 3 << 20, 64<<20 + 17, 128 << 20, size - 100}
	for i, off := range islands {
		if _, err := f.WriteAt(randBytes(3000+i, uint64(off)), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var st = mustStat(t, p)
	if st.Size() != size {
		t.Fatalf("size %d", st.Size())
	}
	for _, alg := range algs {
		want := toolDigest(t, p, alg)
		got, err := DigestFile(p, alg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("sparse DigestFile %s = %x, tool says %x", alg, got, want)
		}
		if alg != SHA256 {
			continue
		}
		// The dense path (reading every zero) must agree too.
		fh, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := New(alg)
		if err := h.ReadFile(fh, size, false); err != nil {
			t.Fatal(err)
		}
		fh.Close()
		if got := h.Sum(); !bytes.Equal(got, want) {
			t.Errorf("dense ReadFile %s = %x, tool says %x", alg, got, want)
		}
	}
	// A fully sparse file: no data at all.
	q := filepath.Join(dir, "hole")
	if err := os.WriteFile(q, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(q, 300<<20); err != nil {
		t.Fatal(err)
	}
	for _, alg := range algs {
		want := toolDigest(t, q, alg)
		got, err := DigestFile(q, alg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("all-hole DigestFile %s = %x, tool says %x", alg, got, want)
		}
	}
}

func mustStat(t *testing.T, p string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// TestHasherOddWrites feeds the same data in irregular pieces (and mixes
// in WriteZeros) and checks the digest does not depend on write sizes.
func TestHasherOddWrites(t *testing.T) {
	data := randBytes(3*128*4096+999, 7)
	// Zero a stretch covering whole and partial blocks.
	for i := 100000; i < 100000+600000; i++ {
		data[i] = 0
	}
	for _, alg := range algs {
		want, err := Digest(bytes.NewReader(data), alg)
		if err != nil {
			t.Fatal(err)
		}
		r := rand.New(rand.NewPCG(1, 2))
		h := New(alg)
		for off := 0; off < len(data); {
			n := min(len(data)-off, []int{1, 7, 4095, 4096, 4097, 8191, 65536, 12345}[r.IntN(8)])
			if off >= 100000 && off+n <= 700000 && r.IntN(2) == 0 {
				h.WriteZeros(uint64(n))
			} else {
				h.Write(data[off : off+n])
			}
			off += n
			// Sum must not disturb the stream.
			if r.IntN(50) == 0 {
				h.Sum()
			}
		}
		if got := h.Sum(); !bytes.Equal(got, want) {
			t.Errorf("%s odd writes = %x, want %x", alg, got, want)
		}
		if h.Size() != uint64(len(data)) {
			t.Errorf("Size = %d", h.Size())
		}
		h.Reset()
		h.Write(data)
		if got := h.Sum(); !bytes.Equal(got, want) {
			t.Errorf("%s after Reset = %x, want %x", alg, got, want)
		}
	}
}

func TestParseAlgorithm(t *testing.T) {
	for _, a := range algs {
		got, err := ParseAlgorithm(a.String())
		if err != nil || got != a {
			t.Errorf("ParseAlgorithm(%q) = %v, %v", a.String(), got, err)
		}
	}
	if _, err := ParseAlgorithm("md5"); err == nil {
		t.Error("ParseAlgorithm(md5) succeeded")
	}
	if SHA256.Size() != 32 || SHA512.Size() != 64 || SHA256 != 1 || SHA512 != 2 {
		t.Error("algorithm constants do not match the kernel's")
	}
}

// TestIoctlsReportMissingSupport runs the real ioctls. On a kernel and
// filesystem with fs-verity it enables and measures; elsewhere (this
// host's kernel has no CONFIG_FS_VERITY, and tmpfs has no fs-verity) it
// checks that the error says fs-verity is missing.
func TestIoctlsReportMissingSupport(t *testing.T) {
	dir := t.TempDir()
	data := randBytes(10000, 3)
	p := writeFile(t, dir, "f", data)
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, _, merr := Measure(f)
	err = Enable(f, SHA256)
	if err == nil {
		alg, d, err := Measure(f)
		if err != nil {
			t.Fatalf("Measure after Enable: %v", err)
		}
		want, _ := Digest(bytes.NewReader(data), SHA256)
		if alg != SHA256 || !bytes.Equal(d, want) {
			t.Errorf("Measure = %v %x, want sha256 %x", alg, d, want)
		}
		if !errors.Is(merr, ErrNotEnabled) {
			t.Errorf("Measure before Enable: %v, want ErrNotEnabled", merr)
		}
		return
	}
	if !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Enable: %v; want an error wrapping ErrNotSupported", err)
	}
	if !strings.Contains(err.Error(), "lacks fs-verity") || !strings.Contains(err.Error(), p) {
		t.Errorf("Enable error %q does not say the filesystem or kernel lacks fs-verity", err)
	}
	if !errors.Is(merr, ErrNotSupported) && !errors.Is(merr, ErrNotEnabled) {
		t.Errorf("Measure: %v; want ErrNotSupported or ErrNotEnabled", merr)
	}
	t.Logf("no fs-verity here, as expected on this kernel: %v", err)
}

func TestDigestFileRejectsNonRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, fifo, filepath.Join(dir, "missing")} {
		if _, err := DigestFile(p, SHA256); err == nil {
			t.Errorf("DigestFile(%s) succeeded", p)
		}
	}
	if _, err := DigestFile(writeFile(t, dir, "f", []byte("x")), Algorithm(9)); err == nil {
		t.Error("unknown algorithm accepted")
	}
}
