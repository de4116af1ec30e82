package main

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsverity"
)

func runBerth(t *testing.T, args ...string) (string, error) {
	t.Helper()
	global = globalFlags{}
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestComposefsCreateAndDigestCommands(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "small"), []byte("hi"), 0o644)
	os.WriteFile(filepath.Join(src, "big"), bytes.Repeat([]byte("x"), 10000), 0o644)
	os.Mkdir(filepath.Join(src, "dir"), 0o755)

	work := t.TempDir()
	img := filepath.Join(work, "out.cfs")
	store := filepath.Join(work, "store")
	out, err := runBerth(t, "composefs", "create", "--print-digest", "--digest-store", store, src, img)
	if err != nil {
		t.Fatal(err)
	}
	digest := strings.TrimSpace(out)
	want, err := fsverity.DigestFile(img, fsverity.SHA256)
	if err != nil || digest != hex.EncodeToString(want) {
		t.Fatalf("create printed %q, image digest %x (%v)", digest, want, err)
	}
	big := bytes.Repeat([]byte("x"), 10000)
	od, _ := fsverity.Digest(bytes.NewReader(big), fsverity.SHA256)
	if _, err := os.Stat(filepath.Join(store, composefs.PayloadPath(od))); err != nil {
		t.Errorf("object not stored: %v", err)
	}
	for _, args := range [][]string{
		{"composefs", "digest", src},
		{"composefs", "digest", img},
		{"composefs", "create", "--print-digest-only", src},
		{"composefs", "create", "--min-version=0", "--max-version=1", "--print-digest-only", src},
	} {
		out, err := runBerth(t, args...)
		if err != nil || strings.TrimSpace(out) != digest {
			t.Errorf("%v: %q, %v; want %s", args, out, err, digest)
		}
	}
	out, err = runBerth(t, "--json", "composefs", "digest", src)
	if err != nil || !strings.Contains(out, `"digest":"`+digest+`"`) {
		t.Errorf("--json digest: %q, %v", out, err)
	}
	// --use-epoch changes the digest; --min-version=1 changes the header.
	for _, flag := range []string{"--use-epoch", "--min-version=1"} {
		out, err := runBerth(t, "composefs", "create", flag, "--print-digest-only", src)
		if err != nil || strings.TrimSpace(out) == digest {
			t.Errorf("%s did not change the digest: %q, %v", flag, out, err)
		}
	}
	// From a dump file.
	root, err := composefs.ScanDir(src, composefs.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dumpPath := filepath.Join(work, "tree.dump")
	var dump bytes.Buffer
	composefs.WriteDump(&dump, root)
	os.WriteFile(dumpPath, dump.Bytes(), 0o644)
	out, err = runBerth(t, "composefs", "create", "--from-file", "--print-digest-only", dumpPath)
	if err != nil || strings.TrimSpace(out) != digest {
		t.Errorf("--from-file: %q, %v; want %s", out, err, digest)
	}
	for _, args := range [][]string{
		{"composefs", "create", src},
		{"composefs", "create", "--print-digest-only", src, img},
		{"composefs", "create", "--min-version=3", "--print-digest-only", src},
		{"composefs", "digest", filepath.Join(work, "missing")},
	} {
		if _, err := runBerth(t, args...); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}
