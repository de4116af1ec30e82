package uki

import (
	"os"
	"testing"
)

// FuzzAssemble feeds mutated stubs to the appender: it must return an
// error or a UKI whose sections parse back, never panic.
func FuzzAssemble(f *testing.F) {
	f.Add(minimalPE(1, 0x400))
	if b, err := os.ReadFile(hostStub); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, stub []byte) {
		img, _, err := Assemble(Options{Stub: stub, Linux: []byte("kernel"), Cmdline: "x", OSRelease: []byte("ID=x\n")})
		if err != nil {
			return
		}
		secs, err := ReadSections(img)
		if err != nil {
			t.Fatalf("assembled image does not parse: %v", err)
		}
		if string(secs[".linux"]) != "kernel" || string(secs[".cmdline"]) != "x" {
			t.Fatalf("sections lost: %q %q", secs[".linux"], secs[".cmdline"])
		}
	})
}
