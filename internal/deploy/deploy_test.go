package deploy

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/store"
)

const digestA = "3fa2c41b09de00112233445566778899aabbccddeeff00112233445566778899"
const digestB = "aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899"

func TestParseFormatID(t *testing.T) {
	id, err := FormatID(7, digestA)
	if err != nil || id != "7-3fa2c41b09de" {
		t.Fatalf("FormatID = %q, %v", id, err)
	}
	s, p, err := ParseID(id)
	if err != nil || s != 7 || p != "3fa2c41b09de" {
		t.Fatalf("ParseID = %d %q %v", s, p, err)
	}
	for _, bad := range []string{"", "7", "7-3FA2C41B09DE", "x-3fa2c41b09de", "7-3fa2c41b09d", "../7-3fa2c41b09de", "7-3fa2c41b09de/..", "-1-3fa2c41b09de", "99999999999999999999-3fa2c41b09de"} {
		if _, _, err := ParseID(bad); err == nil {
			t.Errorf("ParseID(%q) accepted", bad)
		}
	}
	if _, err := FormatID(1, "abc"); err == nil {
		t.Error("FormatID accepted a short digest")
	}
}

// fakeDeployment writes a complete deployment directory the way Create
// finishes one (metadata in place, then rename), for the rules tests.
func fakeDeployment(t *testing.T, l store.Layout, digest string) *Deployment {
	t.Helper()
	unlock, err := Lock(l)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	serial, err := nextSerial(l)
	if err != nil {
		t.Fatal(err)
	}
	id, err := FormatID(serial, digest)
	if err != nil {
		t.Fatal(err)
	}
	d := &Deployment{ID: id, ImageRef: "oci-archive:/x.tar", ComposefsDigest: digest, Kernel: "6.12.0", Origin: "test",
		State: StateStaged, Created: time.Unix(1700000000, 0).UTC(), LocalMode: cmdline.LocalPersistent}
	dir := l.Deployment(id)
	if err := os.MkdirAll(filepath.Join(dir, "upper"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := write(dir, d); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestListRemovePin(t *testing.T) {
	l := store.At(t.TempDir())
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	if ds, err := List(l); err != nil || len(ds) != 0 {
		t.Fatalf("empty List = %v, %v", ds, err)
	}
	a := fakeDeployment(t, l, digestA)
	b := fakeDeployment(t, l, digestB)
	c := fakeDeployment(t, l, digestA) // same image deployed twice: new serial, new id
	if a.ID != "1-3fa2c41b09de" || b.ID != "2-aabbccddeeff" || c.ID != "3-3fa2c41b09de" {
		t.Fatalf("ids %s %s %s", a.ID, b.ID, c.ID)
	}
	ds, err := List(l)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range ds {
		ids = append(ids, d.ID)
	}
	if strings.Join(ids, " ") != "1-3fa2c41b09de 2-aabbccddeeff 3-3fa2c41b09de" {
		t.Fatalf("List = %v", ids)
	}

	// Refusals.
	if err := Remove(l, a.ID, RemoveOptions{Booted: a.ID}); err == nil || !strings.Contains(err.Error(), "booted") {
		t.Errorf("removing the booted deployment: %v", err)
	}
	if err := Remove(l, b.ID, RemoveOptions{Default: b.ID}); err == nil || !strings.Contains(err.Error(), "default") {
		t.Errorf("removing the default deployment: %v", err)
	}
	if _, err := SetPinned(l, a.ID, true); err != nil {
		t.Fatal(err)
	}
	if d, _ := Read(l, a.ID); !d.Pinned {
		t.Fatal("pin not recorded")
	}
	if err := Remove(l, a.ID, RemoveOptions{}); err == nil || !strings.Contains(err.Error(), "pinned") {
		t.Errorf("removing a pinned deployment: %v", err)
	}
	if err := Remove(l, "9-000000000000", RemoveOptions{}); !errors.Is(err, ErrNotFound) {
		t.Errorf("removing a missing deployment: %v", err)
	}
	if err := Remove(l, "../../etc", RemoveOptions{}); err == nil {
		t.Error("Remove accepted a path as id")
	}

	// The newest goes; its serial is never handed out again.
	if err := Remove(l, c.ID, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l.Deployment(c.ID)); !os.IsNotExist(err) {
		t.Fatalf("deployment dir still there: %v", err)
	}
	if _, err := SetPinned(l, a.ID, false); err != nil {
		t.Fatal(err)
	}
	if err := Remove(l, a.ID, RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	d := fakeDeployment(t, l, digestB)
	if d.ID != "4-aabbccddeeff" {
		t.Fatalf("serial reused: %s", d.ID)
	}
	// Losing .serial (it is only a high-water mark) still never reuses an
	// existing serial.
	os.Remove(filepath.Join(l.Deployments(), serialFile))
	if e := fakeDeployment(t, l, digestA); e.ID != "5-3fa2c41b09de" {
		t.Fatalf("after losing .serial: %s", e.ID)
	}
}

func TestLockBusy(t *testing.T) {
	l := store.At(t.TempDir())
	unlock, err := Lock(l)
	if err != nil {
		t.Fatal(err)
	}
	// flock locks belong to the open file description, so a second
	// open in the same process conflicts like another process would.
	if _, err := Lock(l); !errors.Is(err, ErrBusy) {
		t.Fatalf("second Lock: %v", err)
	}
	unlock()
	unlock2, err := Lock(l)
	if err != nil {
		t.Fatal(err)
	}
	unlock2()
}

func TestLeftoversIgnoredAndCleaned(t *testing.T) {
	l := store.At(t.TempDir())
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	good := fakeDeployment(t, l, digestA)
	// A creation interrupted before its rename: complete-looking content
	// under a temporary name, including a valid deployment.json.
	tmp := filepath.Join(l.Deployments(), ".tmp-2-aabbccddeeff-123")
	if err := os.MkdirAll(filepath.Join(tmp, "upper", "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	meta, _ := json.Marshal(&Deployment{ID: "2-aabbccddeeff", ComposefsDigest: digestB})
	if err := os.WriteFile(filepath.Join(tmp, MetadataFile), meta, 0o644); err != nil {
		t.Fatal(err)
	}
	// A removal interrupted after its rename.
	rm := filepath.Join(l.Deployments(), ".rm-3-aabbccddeeff")
	if err := os.MkdirAll(filepath.Join(rm, "work", "work"), 0o755); err != nil {
		t.Fatal(err)
	}
	stateTmp := filepath.Join(l.State(), ".tmp-var-42")
	if err := os.MkdirAll(stateTmp, 0o755); err != nil {
		t.Fatal(err)
	}
	// A foreign directory that is not a deployment id is ignored, not an error.
	if err := os.Mkdir(filepath.Join(l.Deployments(), "lost+found"), 0o700); err != nil {
		t.Fatal(err)
	}
	ds, err := List(l)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 1 || ds[0].ID != good.ID {
		t.Fatalf("List with leftovers = %+v", ds)
	}
	// The half-removed serial 3 is still taken.
	unlock, _ := Lock(l)
	s, err := nextSerial(l)
	unlock()
	if err != nil || s != 4 {
		t.Fatalf("next serial with .rm-3 present = %d, %v", s, err)
	}
	removed, err := Cleanup(l)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 3 {
		t.Fatalf("Cleanup removed %v", removed)
	}
	for _, p := range []string{tmp, rm, stateTmp} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived Cleanup", p)
		}
	}
	if _, err := Read(l, good.ID); err != nil {
		t.Fatalf("Cleanup hurt a complete deployment: %v", err)
	}
}

func TestReadRejectsBadMetadata(t *testing.T) {
	l := store.At(t.TempDir())
	d := fakeDeployment(t, l, digestA)
	path := filepath.Join(l.Deployment(d.ID), MetadataFile)
	for name, content := range map[string]string{
		"id mismatch":     `{"id":"2-3fa2c41b09de","composefs_digest":"` + digestA + `"}`,
		"digest mismatch": `{"id":"` + d.ID + `","composefs_digest":"` + digestB + `"}`,
		"bad digest":      `{"id":"` + d.ID + `","composefs_digest":"3fa2c41b09de"}`,
		"not json":        `{`,
	} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Read(l, d.ID); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if _, err := List(l); err == nil {
			t.Errorf("%s: List accepted", name)
		}
	}
}

func TestMetadataFieldNames(t *testing.T) {
	// Other packages read deployment.json by these names.
	b, err := json.Marshal(&Deployment{})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"id", "image_ref", "manifest_digest", "composefs_digest", "kernel", "origin", "state", "created", "pinned", "local_mode"} {
		if _, ok := m[k]; !ok {
			t.Errorf("deployment.json lacks %q", k)
		}
	}
	if len(m) != 10 {
		t.Errorf("deployment.json has %d fields: %v", len(m), m)
	}
}
