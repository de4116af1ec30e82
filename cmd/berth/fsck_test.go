package main

import (
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/store"
)

// berth fsck exits non-zero on an error in the store and zero on a
// clean one.
func TestFsckExitStatus(t *testing.T) {
	sysroot := t.TempDir()
	l := store.At(sysroot)
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	run := func() error {
		global = globalFlags{}
		root := newRootCmd()
		root.SetArgs([]string{"--sysroot", sysroot, "-q", "fsck", "--verify-objects"})
		return root.Execute()
	}
	if err := run(); err != nil {
		t.Fatalf("empty store: %v", err)
	}
	// A deployment whose image is not in the store cannot boot.
	writeDeployment(t, l, 1, strings.Repeat("a1", 32))
	if err := run(); err == nil || !strings.Contains(err.Error(), "1 errors") {
		t.Fatalf("deployment without its image: %v", err)
	}
}
