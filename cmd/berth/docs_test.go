package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestManPagesCurrent keeps docs/man in step with the command definitions:
// run `make man` after changing a command or flag.
func TestManPagesCurrent(t *testing.T) {
	dir := t.TempDir()
	root := newRootCmd()
	root.SetArgs([]string{"docs", "man", dir})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	got, _ := filepath.Glob(filepath.Join(dir, "*.1"))
	want, _ := filepath.Glob(filepath.Join("..", "..", "docs", "man", "*.1"))
	if len(got) != len(want) {
		t.Fatalf("docs/man has %d pages, the commands make %d: run `make man`", len(want), len(got))
	}
	for _, g := range got {
		w := filepath.Join("..", "..", "docs", "man", filepath.Base(g))
		a, _ := os.ReadFile(g)
		b, err := os.ReadFile(w)
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("%s is out of date: run `make man`", w)
		}
	}
}
