package composefs

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/testenv"
)

// Benchmarks on a real tree (default /usr, or $BERTH_BENCH_TREE), using
// all cores (ScanDir's default). test/bench.sh runs them next to
// mkcomposefs on the same tree. Metrics: files/s counts every entry of
// the tree (what mkcomposefs processes), MB/s the bytes of regular files.

func benchTree(b *testing.B) (string, int, int64) {
	b.Helper()
	tree := os.Getenv("BERTH_BENCH_TREE")
	if tree == "" {
		tree = "/usr"
	}
	root, err := ScanDir(tree, ScanOptions{})
	if err != nil {
		testenv.SkipOrFail(b, "cannot scan %s: %v", tree, err)
	}
	var entries int
	var size int64
	WalkTree(root, func(_ string, n *Inode) error {
		entries++
		if n.Type() == SIFREG {
			size += int64(n.Size)
		}
		return nil
	})
	b.Logf("%s: %d entries, %d MB in regular files, GOMAXPROCS %d", tree, entries, size>>20, runtime.GOMAXPROCS(0))
	return tree, entries, size
}

func report(b *testing.B, entries int, size int64) {
	sec := b.Elapsed().Seconds()
	b.ReportMetric(float64(entries)*float64(b.N)/sec, "files/s")
	b.ReportMetric(float64(size)*float64(b.N)/sec/1e6, "MB/s")
}

// BenchmarkDigestUsr is `berth composefs digest TREE` (mkcomposefs
// --print-digest-only): scan, hash every file, compute the image digest.
func BenchmarkDigestUsr(b *testing.B) {
	tree, entries, size := benchTree(b)
	b.ResetTimer()
	for range b.N {
		root, err := ScanDir(tree, ScanOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ImageDigest(root, WriteOptions{}, fsverity.SHA256); err != nil {
			b.Fatal(err)
		}
	}
	report(b, entries, size)
}

// BenchmarkCreateWithStoreUsr is `berth composefs create --digest-store
// FRESH TREE IMAGE` (mkcomposefs --digest-store): scan, copy every
// external file into a fresh object store, make it durable, write the
// image. The store lives in $BERTH_BENCH_DIR (default: the test's temp
// directory).
func BenchmarkCreateWithStoreUsr(b *testing.B) {
	tree, entries, size := benchTree(b)
	base := os.Getenv("BERTH_BENCH_DIR")
	if base == "" {
		base = b.TempDir()
	}
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		work, err := os.MkdirTemp(base, "berth-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := Create(CreateOptions{
			Source:      tree,
			Output:      filepath.Join(work, "image.cfs"),
			DigestStore: filepath.Join(work, "objects"),
		}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := os.RemoveAll(work); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	report(b, entries, size)
}
