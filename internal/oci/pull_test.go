package oci

import (
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	"go.podman.io/image/v5/types"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// standardLayers is a multi-layer image exercising whiteouts, opaque
// directories, hardlinks within and across layers, xattrs (including
// security.capability), device nodes, long names and a kernel. Every
// directory is listed explicitly (so tar -x gives the same directory
// mtimes), and no directory is replaced by a file (GNU tar refuses that).
func standardLayers(t testing.TB) [][]byte {
	big := strings.Repeat("berth layer content\n", 50)
	long := strings.Repeat("n", 240)
	l1 := makeTar(t, // depth-first, as build tools write layers
		dir("bin/", 0o755),
		file("bin/tool", big+"tool", 0o4755),
		hardlink("bin/tool2", "bin/tool"),
		tarEntry{name: "bin/ping", typ: '0', mode: 0o755, body: []byte(big + "ping"),
			xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "user.origin": "layer1"}},
		dir("boot/", 0o755),
		dir("dev/", 0o755),
		tarEntry{name: "dev/null", typ: '3', mode: 0o666, major: 1, minor: 3},
		tarEntry{name: "dev/fifo", typ: '6', mode: 0o600},
		dir("etc/", 0o755),
		file("etc/hostname", "berth\n", 0o644),
		file("etc/big.conf", big, 0o640),
		symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
		tarEntry{name: "etc/owned", typ: '0', mode: 0o600, uid: 1000, gid: 100000, body: []byte("owned")},
		dir("opt/", 0o755),
		dir("opt/app/", 0o755),
		file("opt/app/a", "lower a", 0o644),
		file("opt/app/b", big+"lower b", 0o644),
		dir("usr/", 0o755),
		dir("usr/lib/", 0o755),
		dir("usr/lib/modules/", 0o755),
		dir("usr/lib/modules/6.12.0-berth/", 0o755),
		file("usr/lib/modules/6.12.0-berth/vmlinuz", big+"kernel", 0o644),
		dir("var/", 0o755),
		dir("var/cache/", 0o700),
		file("var/cache/junk", big+"junk", 0o644),
		file("var/cache/junk2", "junk2", 0o644),
	)
	l2 := makeTar(t,
		dir("var/", 0o755),
		dir("var/cache/", 0o700),
		file("var/cache/.wh.junk", "", 0o644), // whiteout
		dir("opt/", 0o755),
		dir("opt/app/", 0o750),
		file("opt/app/.wh..wh..opq", "", 0o644), // opaque: a, b gone
		file("opt/app/c", "upper c", 0o644),
		dir("etc/", 0o755),
		file("etc/hostname", "berth2\n", 0o644), // replaced
		hardlink("etc/tool-link", "bin/tool"),   // hardlink to a lower layer
		file("etc/"+long, big+"long", 0o644),
	)
	l3 := makeTar(t,
		dir("bin/", 0o755),
		file("bin/.wh.tool2", "", 0o644), // one name of a hardlinked pair gone
		dir("etc/", 0o755),
		tarEntry{name: "etc/xattrs", typ: '0', mode: 0o644, body: []byte(big),
			xattrs: map[string]string{"user.a": "1", "user.b": strings.Repeat("v", 300)}},
	)
	return [][]byte{l1, l2, l3}
}

// testEnv isolates containers/image from the host configuration.
func testPullOptions(t testing.TB, sysroot string) PullOptions {
	t.Helper()
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.json")
	must(t, os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644))
	regConf := filepath.Join(dir, "registries.conf")
	must(t, os.WriteFile(regConf, []byte("unqualified-search-registries = []\n"), 0o644))
	return PullOptions{
		Sysroot:               sysroot,
		PolicyPath:            policy,
		InsecureSkipTLSVerify: true,
		SystemContext: &types.SystemContext{
			SystemRegistriesConfPath:    regConf,
			SystemRegistriesConfDirPath: filepath.Join(dir, "registries.d"),
			AuthFilePath:                filepath.Join(dir, "auth.json"),
			RegistriesDirPath:           filepath.Join(dir, "registries.d"),
		},
	}
}

// startRegistry runs an in-process registry on 127.0.0.1.
func startRegistry(t testing.TB) string {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// pushToRegistry uploads an image with the plain distribution API
// (monolithic blob uploads, then the manifest).
func pushToRegistry(t testing.TB, b *builtImage, reg, repo, tag string) {
	t.Helper()
	for d, data := range b.blobs {
		if d == sha(b.manifest) {
			continue
		}
		resp, err := http.Post("http://"+reg+"/v2/"+repo+"/blobs/uploads/", "application/octet-stream", nil)
		must(t, err)
		resp.Body.Close()
		loc := resp.Header.Get("Location")
		if resp.StatusCode != http.StatusAccepted || loc == "" {
			t.Fatalf("start upload: %s", resp.Status)
		}
		if !strings.HasPrefix(loc, "http") {
			loc = "http://" + reg + loc
		}
		sep := "?"
		if strings.Contains(loc, "?") {
			sep = "&"
		}
		req, _ := http.NewRequest(http.MethodPut, loc+sep+"digest="+d, bytes.NewReader(data))
		resp, err = http.DefaultClient.Do(req)
		must(t, err)
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("upload %s: %s", d, resp.Status)
		}
	}
	req, _ := http.NewRequest(http.MethodPut, "http://"+reg+"/v2/"+repo+"/manifests/"+tag, bytes.NewReader(b.manifest))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	must(t, err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("put manifest: %s", resp.Status)
	}
}

func TestPullTransportsGiveSameDigest(t *testing.T) {
	layers := standardLayers(t)
	ti := &testImage{layers: layers, compression: []string{"gzip", "zstd", "none"}}
	b := ti.build(t)
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	b.writeOCILayout(t, layout, "v1")
	archive := filepath.Join(work, "image.oci.tar")
	tarDir(t, layout, archive)
	dockerArchive := filepath.Join(work, "image.docker.tar")
	b.writeDockerArchive(t, dockerArchive, "example.org/berth/test:v1", layers)
	reg := startRegistry(t)
	pushToRegistry(t, b, reg, "berth/test", "v1")

	refs := []string{
		"oci:" + layout + ":v1",
		"oci-archive:" + archive,
		"docker-archive:" + dockerArchive,
		"docker://" + reg + "/berth/test:v1",
		reg + "/berth/test:v1", // no transport: a registry reference
	}
	var want string
	for _, ref := range refs {
		sysroot := t.TempDir()
		img, err := Pull(context.Background(), ref, testPullOptions(t, sysroot))
		if err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
		if img.Stats.LayersFetched != 3 || img.Stats.LayersReused != 0 {
			t.Errorf("%s: first pull fetched %d reused %d layers", ref, img.Stats.LayersFetched, img.Stats.LayersReused)
		}
		if want == "" {
			want = img.ComposefsDigest
			checkStandardTree(t, sysroot, img)
		} else if img.ComposefsDigest != want {
			t.Errorf("%s: composefs digest %s, want %s (from %s)", ref, img.ComposefsDigest, want, refs[0])
		}
		if strings.Join(img.Kernels, ",") != "6.12.0-berth" {
			t.Errorf("%s: kernels %v", ref, img.Kernels)
		}
		// The same image again: nothing fetched, same digest.
		again, err := Pull(context.Background(), ref, testPullOptions(t, sysroot))
		if err != nil {
			t.Fatalf("re-pull %s: %v", ref, err)
		}
		if again.ComposefsDigest != want || again.Stats.LayersFetched != 0 || again.Stats.LayersReused != 3 || again.Stats.FilesHashed != 0 {
			t.Errorf("%s: re-pull digest %s fetched %d reused %d hashed %d", ref, again.ComposefsDigest, again.Stats.LayersFetched, again.Stats.LayersReused, again.Stats.FilesHashed)
		}
		got, err := LookupImage(sysroot, ref)
		if err != nil || got.ComposefsDigest != want {
			t.Errorf("lookup %s: %v", ref, err)
		}
	}
}

// checkStandardTree reads the composefs image back and checks what the
// layers say it must contain.
func checkStandardTree(t *testing.T, sysroot string, img *Image) {
	t.Helper()
	if err := composefs.Check(store.At(sysroot).Image(img.ComposefsDigest)); err != nil {
		t.Fatalf("composefs check: %v", err)
	}
	root, err := LoadTree(sysroot, img)
	if err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{"var/cache/junk", "opt/app/a", "opt/app/b", "bin/tool2"} {
		if root.Lookup(gone) != nil {
			t.Errorf("%s survived its whiteout", gone)
		}
	}
	for _, present := range []string{"var/cache/junk2", "opt/app/c", "etc/xattrs", "dev/null", "dev/fifo"} {
		if root.Lookup(present) == nil {
			t.Errorf("%s missing", present)
		}
	}
	if n := root.Lookup("etc/hostname"); n == nil || string(n.Inline) != "berth2\n" {
		t.Errorf("etc/hostname not replaced")
	}
	if root.Lookup("bin/tool") != root.Lookup("etc/tool-link") {
		t.Errorf("hardlink across layers is not one inode in the image")
	}
	ping := root.Lookup("bin/ping")
	if v, ok := ping.Xattr("security.capability"); !ok || len(v) != 20 {
		t.Errorf("security.capability lost")
	}
	objects := store.At(sysroot).Objects()
	if _, err := os.Stat(filepath.Join(objects, ping.Payload)); err != nil {
		t.Errorf("object of bin/ping: %v", err)
	}
}

// Re-pulling an image where one of four layers changed fetches and hashes
// only that layer.
func TestRepullFetchesOnlyChangedLayer(t *testing.T) {
	big := strings.Repeat("x", 1000)
	mk := func(tag string) [][]byte {
		var ls [][]byte
		for i := range 4 {
			d := string(rune('a' + i))
			ls = append(ls, makeTar(t, dir(d+"/", 0o755),
				file(d+"/one", big+d+"1", 0o644), file(d+"/two", big+d+"2", 0o644), file(d+"/small", d, 0o644)))
		}
		ls[2] = makeTar(t, dir("c/", 0o755), file("c/one", big+"c1"+tag, 0o644), file("c/two", big+"c2", 0o644),
			file("c/three", big+"c3"+tag, 0o644), file("c/small", "c", 0o644))
		return ls
	}
	sysroot := t.TempDir()
	work := t.TempDir()
	v1 := (&testImage{layers: mk("v1")}).build(t)
	v1.writeOCILayout(t, filepath.Join(work, "v1"), "v1")
	v2 := (&testImage{layers: mk("v2")}).build(t)
	v2.writeOCILayout(t, filepath.Join(work, "v2"), "v2")

	img1, err := Pull(context.Background(), "oci:"+filepath.Join(work, "v1")+":v1", testPullOptions(t, sysroot))
	if err != nil {
		t.Fatal(err)
	}
	if img1.Stats.LayersFetched != 4 || img1.Stats.FilesHashed != 9 {
		t.Fatalf("first pull: fetched %d layers, hashed %d files", img1.Stats.LayersFetched, img1.Stats.FilesHashed)
	}
	img2, err := Pull(context.Background(), "oci:"+filepath.Join(work, "v2")+":v2", testPullOptions(t, sysroot))
	if err != nil {
		t.Fatal(err)
	}
	if img2.Stats.LayersFetched != 1 || img2.Stats.LayersReused != 3 || img2.Stats.FilesHashed != 3 {
		t.Errorf("second pull: fetched %d reused %d layers, hashed %d files; want 1, 3, 3", img2.Stats.LayersFetched, img2.Stats.LayersReused, img2.Stats.FilesHashed)
	}
	if img1.ComposefsDigest == img2.ComposefsDigest {
		t.Error("changed image has the same digest")
	}
	imgs, err := ListImages(sysroot)
	if err != nil || len(imgs) != 2 {
		t.Fatalf("list: %d images, %v", len(imgs), err)
	}
}

func countFiles(t *testing.T, dir string) (n int, names []string) {
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n++
			names = append(names, p)
		}
		return nil
	})
	return n, names
}

func TestHostileImages(t *testing.T) {
	layers := standardLayers(t)
	ok := func() *testImage { return &testImage{layers: layers, compression: []string{"none", "gzip", "zstd"}} }
	var manyLayers []string
	var manyDiffIDs []string
	for range 10000 {
		manyLayers = append(manyLayers, `{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"`+sha(layers[0])+`","size":`+itoa(len(layers[0]))+`}`)
		manyDiffIDs = append(manyDiffIDs, `"`+sha(layers[0])+`"`)
	}
	manyCfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[` + strings.Join(manyDiffIDs, ",") + `]}}`)
	manyMan := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` + sha(manyCfg) + `","size":` + itoa(len(manyCfg)) + `},"layers":[` + strings.Join(manyLayers, ",") + `]}`)

	flipped := append([]byte(nil), layers[0]...)
	i := strings.Index(string(flipped), "berth layer content")
	flipped[i] ^= 1
	truncated := compressBlob(t, layers[1], "gzip")
	truncated = truncated[:len(truncated)/2]
	hugeLayer := headerOnly(t, "huge", 1<<40)

	cases := []struct {
		name string
		img  *testImage
		want string
	}{
		{"manifest-not-json", &testImage{layers: layers, manifestRaw: []byte("this is not JSON")}, "not a JSON object"},
		{"10000-layers", &testImage{layers: layers[:1], manifestRaw: manyMan, configRaw: manyCfg}, "lists 10000 layers"},
		{"bogus-diff-ids", func() *testImage { x := ok(); x.diffIDs = []string{sha(layers[0])}; return x }(), "lists 1 rootfs.diff_ids for 3 manifest layers"},
		{"wrong-diff-id", func() *testImage {
			x := ok()
			x.diffIDs = []string{sha(layers[1]), sha(layers[0]), sha(layers[2])}
			return x
		}(), "uncompressed layer digest mismatch"},
		{"blob-digest-mismatch", func() *testImage { x := ok(); x.blobOverrides = map[int][]byte{0: flipped}; return x }(), "layer blob digest mismatch"},
		{"truncated-layer", func() *testImage { x := ok(); x.honestBlobs = map[int][]byte{1: truncated}; return x }(), "unexpected EOF"},
		{"1TiB-header", func() *testImage {
			x := ok()
			x.layers = append(append([][]byte{}, layers...), hugeLayer)
			x.compression = append(x.compression, "gzip")
			return x
		}(), "header claims 1.0 TiB"},
		{"symlink-parent", func() *testImage {
			x := ok()
			x.layers = append(append([][]byte{}, layers...), makeTar(t, symlink("evil", "/etc"), file("evil/passwd", "pwned", 0o644)))
			x.compression = append(x.compression, "gzip")
			return x
		}(), "written through symlink"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			work := t.TempDir()
			b := c.img.build(t)
			b.writeOCILayout(t, work, "v1")
			sysroot := t.TempDir()
			_, err := Pull(context.Background(), "oci:"+work+":v1", testPullOptions(t, sysroot))
			if err == nil {
				t.Fatal("hostile image accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not mention %q", err, c.want)
			}
			// Nothing half-done in the store: no objects, images or records.
			for _, d := range []string{store.At(sysroot).Objects(), store.At(sysroot).Images(), recordsDir(sysroot), layersDir(sysroot)} {
				if n, names := countFiles(t, d); n != 0 {
					t.Errorf("failed import left %d files: %v", n, names)
				}
			}
		})
	}
}

func itoa(n int) string { return strconv(n) }

func TestPolicyRejects(t *testing.T) {
	b := (&testImage{layers: standardLayers(t)}).build(t)
	work := t.TempDir()
	b.writeOCILayout(t, work, "v1")
	opts := testPullOptions(t, t.TempDir())
	must(t, os.WriteFile(opts.PolicyPath, []byte(`{"default":[{"type":"reject"}]}`), 0o644))
	_, err := Pull(context.Background(), "oci:"+work+":v1", opts)
	if err == nil || !strings.Contains(err.Error(), "rejected by the signature policy") {
		t.Fatalf("policy reject not honoured: %v", err)
	}
	// A policy that requires a signature the image does not have.
	must(t, os.WriteFile(opts.PolicyPath, []byte(`{"default":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/nonexistent.gpg"}]}`), 0o644))
	if _, err := Pull(context.Background(), "oci:"+work+":v1", opts); err == nil {
		t.Fatal("unsigned image accepted under a signedBy policy")
	}
}

// A sparse file (GNU tar --sparse, PAX 1.0 sparse format) imports with its
// full logical content.
func TestSparseLayer(t *testing.T) {
	testenv.RequireTool(t, "tar", "tar") // GNU tar builds the sparse layer
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	must(t, err)
	must(t, f.Truncate(8<<20))
	_, err = f.WriteAt([]byte("in the middle"), 4<<20)
	must(t, err)
	f.Close()
	out, err := exec.Command("tar", "--sparse", "--format=pax", "--owner=0", "--group=0", "-C", src, "-cf", "-", "sparse").Output()
	if err != nil {
		t.Fatalf("tar: %v", err)
	}
	if !strings.Contains(string(out), "GNU.sparse") {
		t.Fatal("tar did not write a sparse entry")
	}
	work := t.TempDir()
	(&testImage{layers: [][]byte{out}}).build(t).writeOCILayout(t, work, "v1")
	sysroot := t.TempDir()
	img, err := Pull(context.Background(), "oci:"+work+":v1", testPullOptions(t, sysroot))
	if err != nil {
		t.Fatal(err)
	}
	root, err := LoadTree(sysroot, img)
	must(t, err)
	n := root.Lookup("sparse")
	if n == nil || n.Size != 8<<20 {
		t.Fatalf("sparse file: %+v", n)
	}
	data, err := os.ReadFile(filepath.Join(store.At(sysroot).Objects(), n.Payload))
	must(t, err)
	if len(data) != 8<<20 || string(data[4<<20:4<<20+13]) != "in the middle" {
		t.Fatal("sparse content wrong")
	}
}

// Without any containers-policy.json, Pull uses the containers default
// (accept anything) and says so on stderr.
func TestNoPolicyFileUsesDefault(t *testing.T) {
	work := t.TempDir()
	(&testImage{layers: standardLayers(t)}).build(t).writeOCILayout(t, work, "v1")
	opts := testPullOptions(t, t.TempDir())
	opts.PolicyPath = ""
	t.Setenv("HOME", t.TempDir())
	t.Setenv("CONTAINERS_POLICY_JSON", "")
	opts.SystemContext.RootForImplicitAbsolutePaths = t.TempDir() // hides /etc/containers/policy.json
	var warn bytes.Buffer
	opts.Warnings = &warn
	if _, err := Pull(context.Background(), "oci:"+work+":v1", opts); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(warn.String(), "no containers-policy.json found") {
		t.Errorf("no notice about the default policy: %q", warn.String())
	}
	// A policy path that is named but missing is an error, not a fallback.
	t.Setenv("CONTAINERS_POLICY_JSON", filepath.Join(work, "missing.json"))
	if _, err := Pull(context.Background(), "oci:"+work+":v1", opts); err == nil {
		t.Error("a missing $CONTAINERS_POLICY_JSON was ignored")
	}
}
