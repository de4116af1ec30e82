package composefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/testenv"
)

// storeEntries lists every entry below a store directory, relative to it.
func storeEntries(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkObject verifies that the object exists with mode 0644, the
// content want, and a name equal to the fs-verity digest of its content.
func checkObject(t *testing.T, s *Store, digest, want []byte) {
	t.Helper()
	p := s.Path(digest)
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatalf("object %x: %v", digest, err)
	}
	if fi.Mode() != 0o644 {
		t.Errorf("object %s: mode %v, want -rw-r--r--", p, fi.Mode())
	}
	if di, err := os.Stat(filepath.Dir(p)); err != nil || di.Mode().Perm() != 0o755 {
		t.Errorf("object dir %s: %v %v, want 0755", filepath.Dir(p), di.Mode(), err)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("object %s: content differs (%d bytes, want %d)", p, len(got), len(want))
	}
	d, err := fsverity.DigestFile(p, s.Algorithm())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d, digest) {
		t.Errorf("object %s: fs-verity digest of content is %x", p, d)
	}
}

func testContents() [][]byte {
	var out [][]byte
	for _, n := range []int{1, 65, 4095, 4096, 4097, 200000, 1 << 20} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7 + n)
		}
		out = append(out, b)
	}
	return out
}

func TestStoreAddFileCommit(t *testing.T) {
	for _, alg := range []fsverity.Algorithm{fsverity.SHA256, fsverity.SHA512} {
		t.Run(alg.String(), func(t *testing.T) {
			src := t.TempDir()
			s, err := OpenStore(filepath.Join(t.TempDir(), "a", "objects"), alg)
			if err != nil {
				t.Fatal(err)
			}
			var digests [][]byte
			contents := testContents()
			b := s.NewBatch()
			for i, c := range contents {
				p := filepath.Join(src, fmt.Sprintf("f%d", i))
				if err := os.WriteFile(p, c, 0o600); err != nil {
					t.Fatal(err)
				}
				d, err := fsverity.DigestFile(p, alg)
				if err != nil {
					t.Fatal(err)
				}
				digests = append(digests, d)
				if err := b.AddFile(p, d); err != nil {
					t.Fatal(err)
				}
				// The same content again is skipped.
				if err := b.AddFile(p, d); err != nil {
					t.Fatal(err)
				}
				if s.Has(d) {
					t.Fatalf("object %x visible before Commit", d)
				}
			}
			if b.Len() != len(contents) {
				t.Fatalf("batch has %d objects, want %d", b.Len(), len(contents))
			}
			if err := b.Commit(); err != nil {
				t.Fatal(err)
			}
			for i, d := range digests {
				checkObject(t, s, d, contents[i])
			}
			if s.VerityEnabled() == s.VerityUnsupported() {
				t.Errorf("after Commit exactly one of VerityEnabled (%v) and VerityUnsupported (%v) must hold", s.VerityEnabled(), s.VerityUnsupported())
			}
			t.Logf("fs-verity enabled=%v unsupported=%v", s.VerityEnabled(), s.VerityUnsupported())
			for _, e := range storeEntries(t, s.Dir()) {
				if strings.HasPrefix(filepath.Base(e), ".") {
					t.Errorf("leftover %s after Commit", e)
				}
			}
			if err := b.AddFile(filepath.Join(src, "f0"), digests[0]); err == nil {
				t.Error("AddFile after Commit succeeded")
			}
			// A second batch finds everything present and adds nothing.
			b2 := s.NewBatch()
			for i := range contents {
				if err := b2.AddFile(filepath.Join(src, fmt.Sprintf("f%d", i)), digests[i]); err != nil {
					t.Fatal(err)
				}
			}
			if b2.Len() != 0 {
				t.Errorf("second batch staged %d existing objects", b2.Len())
			}
			if err := b2.Commit(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestStoreAddReaderConcurrent(t *testing.T) {
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	contents := testContents()
	b := s.NewBatch()
	var wg sync.WaitGroup
	errs := make(chan error, 4*len(contents))
	// Every content is added by four goroutines at once: one object each.
	for range 4 {
		for _, c := range contents {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d, size, err := b.AddReader(bytes.NewReader(c))
				if err == nil && size != int64(len(c)) {
					err = fmt.Errorf("size %d, want %d", size, len(c))
				}
				if err == nil {
					want, _ := fsverity.Digest(bytes.NewReader(c), fsverity.SHA256)
					if !bytes.Equal(d, want) {
						err = fmt.Errorf("digest %x, want %x", d, want)
					}
				}
				errs <- err
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if b.Len() != len(contents) {
		t.Fatalf("batch has %d objects, want %d", b.Len(), len(contents))
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range storeEntries(t, s.Dir()) {
		if strings.Contains(e, "/") {
			n++
		}
	}
	if n != len(contents) {
		t.Errorf("store has %d objects, want %d", n, len(contents))
	}
	for _, c := range contents {
		d, _ := fsverity.Digest(bytes.NewReader(c), fsverity.SHA256)
		checkObject(t, s, d, c)
	}
}

func TestStoreAbortAndCleanup(t *testing.T) {
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	d, _, err := b.AddReader(strings.NewReader(strings.Repeat("abort me ", 100)))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Abort(); err != nil {
		t.Fatal(err)
	}
	if s.Has(d) || len(storeEntries(t, s.Dir())) != 0 {
		t.Fatalf("Abort left %v", storeEntries(t, s.Dir()))
	}
	if _, _, err := b.AddReader(strings.NewReader("x")); err == nil {
		t.Error("AddReader after Abort succeeded")
	}

	// A batch that is never committed (a crash) leaves only its staging
	// directory, which CleanupTemps removes; no object is visible.
	b = s.NewBatch()
	if d, _, err = b.AddReader(strings.NewReader(strings.Repeat("crash ", 100))); err != nil {
		t.Fatal(err)
	}
	left := storeEntries(t, s.Dir())
	if s.Has(d) || len(left) != 3 || !strings.HasPrefix(left[0], tmpPrefix) {
		t.Fatalf("uncommitted batch left %v, want one staging directory with one bucket holding one file", left)
	}
	if n, err := s.CleanupTemps(time.Hour); err != nil || n != 0 {
		t.Fatalf("CleanupTemps(1h) removed %d (%v), want 0: the batch is new", n, err)
	}
	if n, err := s.CleanupTemps(0); err != nil || n != 1 {
		t.Fatalf("CleanupTemps(0) removed %d (%v), want 1", n, err)
	}
	if left := storeEntries(t, s.Dir()); len(left) != 0 {
		t.Fatalf("after cleanup: %v", left)
	}
}

// TestStoreCopyFallback adds a file from another filesystem (tmpfs), where
// neither FICLONE nor copy_file_range works, so the user-space copy runs.
func TestStoreCopyFallback(t *testing.T) {
	shm, err := os.MkdirTemp("/dev/shm", "berth-store-test-")
	if err != nil {
		testenv.SkipOrFail(t, "no /dev/shm to copy from another filesystem: %v", err)
	}
	defer os.RemoveAll(shm)
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	c := testContents()[5]
	p := filepath.Join(shm, "f")
	if err := os.WriteFile(p, c, 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := fsverity.DigestFile(p, fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	if err := b.AddFile(p, d); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	checkObject(t, s, d, c)
}

func TestStoreRejects(t *testing.T) {
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	defer b.Abort()
	if err := b.AddFile("/etc/hostname", []byte{1, 2, 3}); err == nil {
		t.Error("AddFile with a 3-byte digest succeeded")
	}
	dir := t.TempDir()
	if err := b.AddFile(dir, make([]byte, 32)); err == nil {
		t.Error("AddFile of a directory succeeded")
	}
	if err := b.AddFile(filepath.Join(dir, "missing"), make([]byte, 32)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("AddFile of a missing file: %v", err)
	}
	if _, err := OpenStore(t.TempDir(), 9); err == nil {
		t.Error("OpenStore with algorithm 9 succeeded")
	}
	f := filepath.Join(dir, "file")
	os.WriteFile(f, nil, 0o644)
	if _, err := OpenStore(f, fsverity.SHA256); err == nil {
		t.Error("OpenStore on a file succeeded")
	}
	if got, want := s.Path(make([]byte, 32)), filepath.Join(s.Dir(), "00", strings.Repeat("0", 62)); got != want {
		t.Errorf("Path = %s, want %s", got, want)
	}
	if s.Has(make([]byte, 31)) {
		t.Error("Has(31-byte digest)")
	}
}

// truncatedReader yields some bytes, then fails like a truncated tar entry.
type truncatedReader struct{ left int }

func (r *truncatedReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n := min(len(p), r.left)
	for i := range p[:n] {
		p[i] = 'x'
	}
	r.left -= n
	return n, nil
}

func TestAddReaderTruncatedSource(t *testing.T) {
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	defer b.Abort()
	if _, _, err := b.AddReader(&truncatedReader{left: 100000}); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("AddReader of a truncated source: err = %v, want io.ErrUnexpectedEOF", err)
	}
}
