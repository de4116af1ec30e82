package fsck

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.podman.io/image/v5/types"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// writeLayout writes a one-layer OCI image layout with a few files,
// some large enough to become objects.
// extra is the content of one more file (another image for each value).
func writeLayout(t *testing.T, dir, extra string) {
	t.Helper()
	must(t, writeLayoutErr(dir, extra))
}

// writeLayoutErr is writeLayout for callers without a *testing.T (the race
// test's child processes).
func writeLayoutErr(dir, extra string) error {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var err error
	add := func(name, body string, typ byte) {
		if err != nil {
			return
		}
		h := &tar.Header{Name: name, Typeflag: typ, Mode: 0o644, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if typ == tar.TypeDir {
			h.Mode = 0o755
		} else {
			h.Size = int64(len(body))
		}
		if err = tw.WriteHeader(h); err == nil {
			_, err = io.WriteString(tw, body)
		}
	}
	add("etc/", "", tar.TypeDir)
	add("etc/hostname", "fsck\n", tar.TypeReg)
	add("usr/", "", tar.TypeDir)
	add("usr/bin/", "", tar.TypeDir)
	add("usr/bin/tool", strings.Repeat("tool content\n", 40), tar.TypeReg)
	add("usr/bin/other", strings.Repeat("other content\n", 40), tar.TypeReg)
	add("usr/lib/", "", tar.TypeDir)
	add("usr/lib/modules/", "", tar.TypeDir)
	add("usr/lib/modules/6.12.0-fsck/", "", tar.TypeDir)
	add("usr/lib/modules/6.12.0-fsck/vmlinuz", strings.Repeat("kernel\n", 40), tar.TypeReg)
	add("usr/bin/extra", extra, tar.TypeReg)
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layer := buf.Bytes()
	cfg, _ := json.Marshal(map[string]any{"architecture": "amd64", "os": "linux", "rootfs": map[string]any{"type": "layers", "diff_ids": []string{sha(layer)}}})
	man, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
		"layers": []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": len(layer)}},
	})
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []any{map[string]any{
		"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(man), "size": len(man),
		"annotations": map[string]string{"org.opencontainers.image.ref.name": "v1"}}}})
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return err
	}
	for _, b := range [][]byte{layer, cfg, man} {
		if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", sha(b)[7:]), b, 0o644); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
}

type fixture struct {
	work    string // policy.json, registries.conf
	sysroot string
	l       store.Layout
	img     *oci.Image
	dep     *deploy.Deployment
	esp     boot.ESP
}

// newStore makes what an installed system has: a pulled image, a
// deployment of it and its boot entry on an ESP at efi/.
func newStore(t *testing.T) *fixture {
	t.Helper()
	testenv.RequireRoot(t, "deploy.Create gives the deployment root's ownership")
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	writeLayout(t, layout, "")
	policy := filepath.Join(work, "policy.json")
	must(t, os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644))
	regConf := filepath.Join(work, "registries.conf")
	must(t, os.WriteFile(regConf, []byte("unqualified-search-registries = []\n"), 0o644))
	f := &fixture{work: work, sysroot: t.TempDir()}
	f.l = store.At(f.sysroot)
	var err error
	f.img, err = f.pull(context.Background(), layout)
	must(t, err)
	tree, err := oci.LoadTree(f.sysroot, f.img)
	must(t, err)
	objs, err := composefs.OpenStore(f.l.Objects(), fsverity.SHA256)
	must(t, err)
	res, err := deploy.Create(f.l, deploy.CreateOptions{Tree: tree, Store: objs, Kernel: "6.12.0-fsck", ImageRef: f.img.Ref, ManifestDigest: f.img.ManifestDigest, Origin: "install"})
	must(t, err)
	f.dep = res.Deployment
	f.esp = boot.ESP{Dir: filepath.Join(f.sysroot, "efi")}
	must(t, os.MkdirAll(filepath.Join(f.esp.Dir, "loader"), 0o755))
	kernel := filepath.Join(work, "vmlinuz")
	must(t, os.WriteFile(kernel, []byte("not really a kernel"), 0o644))
	must(t, f.esp.AddBLS(f.dep.ID, boot.BLSEntry{Title: "berth " + f.dep.ID, Linux: kernel, Options: "berth.deploy=" + f.dep.ID}, 0))
	return f
}

func (f *fixture) pull(ctx context.Context, layout string) (*oci.Image, error) {
	return oci.Pull(ctx, "oci:"+layout+":v1", oci.PullOptions{
		Sysroot: f.sysroot, PolicyPath: filepath.Join(f.work, "policy.json"), Warnings: io.Discard,
		SystemContext: &types.SystemContext{
			SystemRegistriesConfPath:    filepath.Join(f.work, "registries.conf"),
			SystemRegistriesConfDirPath: filepath.Join(f.work, "d"),
			RegistriesDirPath:           filepath.Join(f.work, "d"),
		},
	})
}

func (f *fixture) check(t *testing.T, verify bool) *Report {
	t.Helper()
	rep, err := Check(Options{Sysroot: f.sysroot, VerifyObjects: verify})
	must(t, err)
	return rep
}

// anObject returns the path of an object the pulled image uses and its
// file's size.
func (f *fixture) anObject(t *testing.T) (string, uint64) {
	t.Helper()
	tree, err := oci.LoadTree(f.sysroot, f.img)
	must(t, err)
	n := tree.Lookup("usr/bin/tool")
	if n == nil || n.Payload == "" {
		t.Fatal("usr/bin/tool is not an object")
	}
	return filepath.Join(f.l.Objects(), n.Payload), n.Size
}

// replaceFile swaps a file's content the way an outside writer would
// (the original may be fs-verity protected and so read-only).
func replaceFile(t *testing.T, p string, data []byte) {
	t.Helper()
	tmp := p + ".new"
	must(t, os.WriteFile(tmp, data, 0o644))
	must(t, os.Rename(tmp, p))
}

func wantProblem(t *testing.T, ps []Problem, path, msg string) {
	t.Helper()
	for _, p := range ps {
		if p.Path == path && strings.Contains(p.Message, msg) {
			return
		}
	}
	t.Errorf("no finding for %s containing %q; got:\n%s", path, msg, list(ps))
}

func list(ps []Problem) string {
	var b strings.Builder
	for _, p := range ps {
		b.WriteString("  " + p.String() + "\n")
	}
	return b.String()
}

func TestCleanStore(t *testing.T) {
	f := newStore(t)
	rep := f.check(t, true)
	if !rep.OK() || len(rep.Warnings) != 0 {
		t.Fatalf("clean store: errors\n%swarnings\n%s", list(rep.Errors), list(rep.Warnings))
	}
	// The deployment's image is the pulled tree (no runtime injected),
	// so one image; three objects (tool, other, vmlinuz).
	if rep.Images != 1 || rep.Objects != 3 || rep.ObjectsVerified != 3 || rep.Records != 1 || rep.Deployments != 1 || rep.BootEntries != 1 || rep.LayerIndexes != 1 {
		t.Errorf("counts: %+v", rep)
	}
}

func TestImageNotNamedByDigest(t *testing.T) {
	f := newStore(t)
	data, err := os.ReadFile(f.l.Image(f.img.ComposefsDigest))
	must(t, err)
	bogus := f.l.Image(strings.Repeat("ab", 32))
	must(t, os.WriteFile(bogus, data, 0o644))
	rep := f.check(t, false)
	wantProblem(t, rep.Errors, bogus, "not its fs-verity digest")
	if len(rep.Errors) != 1 {
		t.Errorf("errors:\n%s", list(rep.Errors))
	}
	// A file that is not an image at all.
	junk := f.l.Image("notadigest")
	must(t, os.WriteFile(junk, []byte("x"), 0o644))
	wantProblem(t, f.check(t, false).Errors, junk, "not named by a fs-verity digest")
}

func TestMissingObject(t *testing.T) {
	f := newStore(t)
	obj, _ := f.anObject(t)
	must(t, os.Remove(obj))
	rep := f.check(t, false)
	wantProblem(t, rep.Errors, f.l.Image(f.img.ComposefsDigest), "object "+obj+" is missing")
	// The layer index lost an object too: pulls re-fetch, a warning.
	if len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0].Message, "1 objects of this layer are missing") {
		t.Errorf("warnings:\n%s", list(rep.Warnings))
	}
}

func TestObjectWrongSizeAndContent(t *testing.T) {
	f := newStore(t)
	obj, size := f.anObject(t)
	data, err := os.ReadFile(obj)
	must(t, err)
	if uint64(len(data)) != size {
		t.Fatalf("object is %d bytes, file %d", len(data), size)
	}
	// Same size, other content: only --verify-objects sees it.
	flipped := append([]byte(nil), data...)
	flipped[10] ^= 1
	replaceFile(t, obj, flipped)
	if rep := f.check(t, false); !rep.OK() {
		t.Fatalf("without verify: %s", list(rep.Errors))
	}
	rep := f.check(t, true)
	wantProblem(t, rep.Errors, obj, "does not match its name")
	if len(rep.Errors) != 1 {
		t.Errorf("errors:\n%s", list(rep.Errors))
	}
	// Truncated: the size check sees it without reading content.
	replaceFile(t, obj, data[:len(data)-1])
	wantProblem(t, f.check(t, false).Errors, f.l.Image(f.img.ComposefsDigest), "is "+strconv.Itoa(len(data)-1)+" bytes, the image says "+strconv.Itoa(len(data)))
}

func TestBadDeployment(t *testing.T) {
	f := newStore(t)
	meta := filepath.Join(f.l.Deployment(f.dep.ID), deploy.MetadataFile)
	good, err := os.ReadFile(meta)
	must(t, err)
	must(t, os.WriteFile(meta, []byte("{not json"), 0o644))
	wantProblem(t, f.check(t, false).Errors, meta, "parse")

	// Valid metadata, but its image is gone (the record's too).
	must(t, os.WriteFile(meta, good, 0o644))
	img := f.l.Image(f.dep.ComposefsDigest)
	must(t, os.Remove(img))
	rep := f.check(t, false)
	wantProblem(t, rep.Errors, meta, "names composefs image "+img+", which is missing")
}

func TestBootEntryWithoutDeployment(t *testing.T) {
	f := newStore(t)
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	must(t, os.WriteFile(kernel, []byte("k"), 0o644))
	ghost := "99-0123456789ab"
	must(t, f.esp.AddBLS(ghost, boot.BLSEntry{Title: "ghost", Linux: kernel, Options: "berth.deploy=" + ghost}, 0))
	rep := f.check(t, false)
	entries, err := f.esp.Entries()
	must(t, err)
	var path string
	for _, e := range entries {
		if e.ID == ghost {
			path = filepath.Join(f.esp.Dir, e.Path)
		}
	}
	wantProblem(t, rep.Errors, path, "deployment "+ghost+", which does not exist")
	if len(rep.Errors) != 1 {
		t.Errorf("errors:\n%s", list(rep.Errors))
	}
}

func TestRecordWithMissingImage(t *testing.T) {
	f := newStore(t)
	recs, err := filepath.Glob(filepath.Join(f.l.OCI(), "images", "*.json"))
	must(t, err)
	if len(recs) != 1 {
		t.Fatalf("%d records", len(recs))
	}
	data, err := os.ReadFile(recs[0])
	must(t, err)
	other := strings.Repeat("cd", 32)
	must(t, os.WriteFile(recs[0], bytes.ReplaceAll(data, []byte(f.img.ComposefsDigest), []byte(other)), 0o644))
	wantProblem(t, f.check(t, false).Errors, recs[0], "names composefs image "+f.l.Image(other)+", which is missing")

	must(t, os.WriteFile(recs[0], []byte("[1,2"), 0o644))
	wantProblem(t, f.check(t, false).Errors, recs[0], "does not parse")
}

// Failed and cancelled imports leave a consistent store.
func TestFailedImportsLeaveCleanStore(t *testing.T) {
	f := newStore(t)
	// A layer whose content does not match its digest: found after its
	// files were streamed into the object store's staging.
	bad := filepath.Join(t.TempDir(), "bad")
	writeLayout(t, bad, strings.Repeat("new content\n", 100))
	blobs, err := filepath.Glob(filepath.Join(bad, "blobs", "sha256", "*"))
	must(t, err)
	for _, p := range blobs {
		data, err := os.ReadFile(p)
		must(t, err)
		if i := bytes.Index(data, []byte("new content")); i >= 0 {
			data[i] = 'N'
			must(t, os.WriteFile(p, data, 0o644))
		}
	}
	if _, err := f.pull(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "digest mismatch") {
		t.Fatalf("corrupt layer: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	other := filepath.Join(t.TempDir(), "other")
	writeLayout(t, other, strings.Repeat("other image\n", 100))
	if _, err := f.pull(ctx, other); err == nil {
		t.Fatal("cancelled pull succeeded")
	}
	if rep := f.check(t, true); !rep.OK() || len(rep.Warnings) != 0 {
		t.Fatalf("after failed imports: errors\n%swarnings\n%s", list(rep.Errors), list(rep.Warnings))
	}
}

// What a killed import, deployment or job leaves is garbage that cleanup
// or recovery removes: warnings, no errors.
func TestLeftoversAreWarnings(t *testing.T) {
	f := newStore(t)
	// As composefs.Batch and oci.writeImage name their temporaries.
	staging := filepath.Join(f.l.Objects(), ".tmp-batch-123")
	must(t, os.MkdirAll(staging, 0o755))
	must(t, os.WriteFile(filepath.Join(staging, "0"), []byte("half an object"), 0o644))
	tmpImage := filepath.Join(f.l.Images(), ".tmp-import-1-2")
	must(t, os.WriteFile(tmpImage, []byte("half an image"), 0o644))
	tmpDeploy := filepath.Join(f.l.Deployments(), ".tmp-5-0123456789ab")
	must(t, os.MkdirAll(tmpDeploy, 0o755))
	tmpState := filepath.Join(f.l.State(), ".tmp-home")
	must(t, os.MkdirAll(tmpState, 0o755))
	// An object committed by an import that died before writing its image.
	objs, err := composefs.OpenStore(f.l.Objects(), fsverity.SHA256)
	must(t, err)
	b := objs.NewBatch()
	d, _, err := b.AddReader(strings.NewReader(strings.Repeat("orphan\n", 30)))
	must(t, err)
	must(t, b.Commit())
	orphan := objs.Path(d)
	journal := filepath.Join(f.l.Root, "job.json")
	must(t, os.WriteFile(journal, []byte(`{"id":4,"kind":"upgrade","pid":999999,"state":"running","started":"2026-01-01T00:00:00Z"}`), 0o644))

	rep := f.check(t, true)
	if !rep.OK() {
		t.Fatalf("leftovers are errors:\n%s", list(rep.Errors))
	}
	wantProblem(t, rep.Warnings, staging, "interrupted object import")
	wantProblem(t, rep.Warnings, tmpImage, "interrupted image write")
	wantProblem(t, rep.Warnings, tmpDeploy, "interrupted deployment")
	wantProblem(t, rep.Warnings, tmpState, "interrupted state seeding")
	wantProblem(t, rep.Warnings, f.l.Objects(), "1 objects")
	wantProblem(t, rep.Warnings, journal, "job 4 (upgrade)")
	for _, w := range rep.Warnings {
		if w.Fix == "" {
			t.Errorf("warning without a fix: %s", w)
		}
		if w.Path == f.l.Objects() && !strings.Contains(w.Message, orphan) {
			t.Errorf("unreferenced object not named: %s", w)
		}
	}

	// After cleanup and deploy cleanup only the journal remains.
	_, err = oci.Cleanup(f.sysroot)
	must(t, err)
	_, err = deploy.Cleanup(f.l)
	must(t, err)
	must(t, os.Remove(journal))
	if rep := f.check(t, true); !rep.OK() || len(rep.Warnings) != 0 {
		t.Fatalf("after cleanup: errors\n%swarnings\n%s", list(rep.Errors), list(rep.Warnings))
	}
}

func TestNoStore(t *testing.T) {
	if _, err := Check(Options{Sysroot: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "no berth store") {
		t.Fatalf("empty sysroot: %v", err)
	}
}
