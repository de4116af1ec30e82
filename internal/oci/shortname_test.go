package oci

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// shortNameOptions are test pull options whose registries.conf is conf.
func shortNameOptions(t *testing.T, conf string) (PullOptions, *bytes.Buffer) {
	t.Helper()
	opts := testPullOptions(t, t.TempDir())
	must(t, os.WriteFile(opts.SystemContext.SystemRegistriesConfPath, []byte(conf), 0o644))
	// The per-user alias cache must not leak in from $HOME.
	opts.SystemContext.UserShortNameAliasConfPath = filepath.Join(t.TempDir(), "short-name-aliases.conf")
	var warn bytes.Buffer
	opts.Warnings = &warn
	return opts, &warn
}

func TestShortNameAlias(t *testing.T) {
	reg := startRegistry(t)
	b := (&testImage{layers: standardLayers(t)}).build(t)
	pushToRegistry(t, b, reg, "x/y", "tag")
	want := unsignedDigest(t, b)
	conf := "unqualified-search-registries = []\nshort-name-mode = \"enforcing\"\n[aliases]\n\"myimg\" = \"" + reg + "/x/y\"\n"

	for _, in := range []string{"myimg:tag", "myimg@" + sha(b.manifest)} {
		opts, warn := shortNameOptions(t, conf)
		img, err := Pull(context.Background(), in, opts)
		if err != nil {
			t.Fatalf("pull %s: %v", in, err)
		}
		if img.ComposefsDigest != want {
			t.Errorf("%s: composefs digest %s, want %s", in, img.ComposefsDigest, want)
		}
		// Recorded under the name it resolved to, so an upgrade pulls the
		// same image even if the alias changes later.
		wantRef := reg + "/x/y" + strings.TrimPrefix(in, "myimg")
		if img.Ref != wantRef || img.Transport != "docker" {
			t.Errorf("%s: recorded as %s (%s), want %s", in, img.Ref, img.Transport, wantRef)
		}
		if _, err := LookupImage(opts.Sysroot, wantRef); err != nil {
			t.Errorf("%s: %v", in, err)
		}
		// Found by the short name too, with the same registries.conf.
		t.Setenv("CONTAINERS_REGISTRIES_CONF", opts.SystemContext.SystemRegistriesConfPath)
		if got, err := LookupImage(opts.Sysroot, in); err != nil || got.Ref != wantRef {
			t.Errorf("lookup %s: %v", in, err)
		}
		t.Setenv("CONTAINERS_REGISTRIES_CONF", filepath.Join(t.TempDir(), "none.conf"))
		if _, err := LookupImage(opts.Sysroot, in); err == nil {
			t.Errorf("lookup %s found an image without the alias", in)
		}
		if !strings.Contains(warn.String(), "resolved short name") || !strings.Contains(warn.String(), "alias") {
			t.Errorf("%s: resolution not reported: %q", in, warn.String())
		}
	}
}

func TestShortNameUnresolvable(t *testing.T) {
	opts, _ := shortNameOptions(t, "unqualified-search-registries = []\n")
	_, err := Pull(context.Background(), "nosuch:1", opts)
	if err == nil {
		t.Fatal("an unresolvable short name was pulled")
	}
	for _, w := range []string{`"nosuch:1" is a short name`, "no unqualified-search-registries", "give the registry", opts.SystemContext.SystemRegistriesConfPath} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	// Nothing was imported.
	if imgs, _ := ListImages(opts.Sysroot); len(imgs) != 0 {
		t.Errorf("%d images recorded", len(imgs))
	}

	// An alias added to the same file counts at the next pull (berthd is
	// long-lived; containers/image would cache the old file).
	reg := startRegistry(t)
	pushToRegistry(t, (&testImage{layers: standardLayers(t)}).build(t), reg, "x/nosuch", "1")
	must(t, os.WriteFile(opts.SystemContext.SystemRegistriesConfPath, []byte("unqualified-search-registries = []\n[aliases]\n\"nosuch\" = \""+reg+"/x/nosuch\"\n"), 0o644))
	if img, err := Pull(context.Background(), "nosuch:1", opts); err != nil || img.Ref != reg+"/x/nosuch:1" {
		t.Fatalf("after adding the alias: %v", err)
	}
}

func TestShortNameSearchRegistries(t *testing.T) {
	empty := startRegistry(t)
	reg := startRegistry(t)
	b := (&testImage{layers: standardLayers(t)}).build(t)
	pushToRegistry(t, b, reg, "os", "v1") // library/ is added for docker.io only
	search := `unqualified-search-registries = ["` + empty + `", "` + reg + `"]` + "\n"

	// Permissive: every search registry in order, the first that has it.
	opts, warn := shortNameOptions(t, search+"short-name-mode = \"permissive\"\n")
	img, err := Pull(context.Background(), "os:v1", opts)
	if err != nil {
		t.Fatalf("permissive: %v", err)
	}
	if img.Ref != reg+"/os:v1" {
		t.Errorf("permissive: recorded as %s", img.Ref)
	}
	if !strings.Contains(warn.String(), empty+"/os:v1") {
		t.Errorf("candidates not reported: %q", warn.String())
	}
	_, err = Pull(context.Background(), "missing:v1", opts)
	if err == nil || !strings.Contains(err.Error(), empty+"/missing:v1") || !strings.Contains(err.Error(), reg+"/missing:v1") {
		t.Errorf("permissive, image nowhere: %v", err)
	}

	// Enforcing with two candidates: podman would prompt on a terminal;
	// berth never prompts, so it refuses and says how to fix it.
	opts, _ = shortNameOptions(t, search+"short-name-mode = \"enforcing\"\n")
	_, err = Pull(context.Background(), "os:v1", opts)
	if err == nil || !strings.Contains(err.Error(), "ambiguous") || !strings.Contains(err.Error(), "give the full name") {
		t.Errorf("enforcing, two search registries: %v", err)
	}
	// One search registry is not ambiguous.
	opts, _ = shortNameOptions(t, `unqualified-search-registries = ["`+reg+`"]`+"\nshort-name-mode = \"enforcing\"\n")
	if img, err := Pull(context.Background(), "os:v1", opts); err != nil || img.Ref != reg+"/os:v1" {
		t.Errorf("enforcing, one search registry: %v", err)
	}
}

// Qualified names and other transports are not short names.
func TestNotShortNames(t *testing.T) {
	for _, in := range []string{"docker://debian:trixie", "oci:/tmp/layout:v1", "example.org/os:1", "localhost/os", "127.0.0.1:5000/os:1", "oci-archive:/x.tar"} {
		sn, err := resolveShortName(nil, in)
		if err != nil || sn != nil {
			t.Errorf("%s: resolved as a short name: %+v, %v", in, sn, err)
		}
	}
}
