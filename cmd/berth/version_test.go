package main

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/version"
)

// stdout runs the berth command line args and returns what it printed.
func stdout(t *testing.T, args ...string) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stdout
	os.Stdout = w
	global = globalFlags{}
	root := newRootCmd()
	root.SetOut(w)
	root.SetArgs(args)
	err = root.Execute()
	os.Stdout = saved
	w.Close()
	var buf bytes.Buffer
	io.Copy(&buf, r)
	if err != nil {
		t.Fatalf("berth %v: %v", args, err)
	}
	return buf.String()
}

// berth version and berth --version report the version, the commit, the
// Go release and the format versions from the packages that write them.
func TestVersionReportsBuildAndFormats(t *testing.T) {
	defer func(c string) { version.Commit = c }(version.Commit)
	version.Commit = "0123456789ab-dirty"
	var info version.Info
	if err := json.Unmarshal([]byte(stdout(t, "version", "--json")), &info); err != nil {
		t.Fatal(err)
	}
	if info.Version != version.Version || info.Commit != "0123456789ab-dirty" || info.GoVersion != runtime.Version() ||
		info.ComposefsHeader != composefs.HeaderVersion || info.ComposefsFormat != composefs.MaxFormatVersion || info.StoreLayout != store.LayoutVersion {
		t.Errorf("version --json: %+v", info)
	}
	text := stdout(t, "version")
	for _, want := range []string{"berth " + version.Version, "0123456789ab-dirty", runtime.Version(), "layout version 1"} {
		if !strings.Contains(text, want) {
			t.Errorf("berth version does not say %q:\n%s", want, text)
		}
	}
	if line := stdout(t, "--version"); !strings.HasPrefix(line, "berth "+version.Version+" (0123456789ab-dirty), "+runtime.Version()) || strings.Count(line, "\n") != 1 {
		t.Errorf("berth --version: %q", line)
	}
}
